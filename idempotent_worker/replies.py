"""A handler's outputs (``Output``, what ``ctx.emit`` collects) and outputs kept to be
produced again, byte for byte (``Kept``): the reply a duplicate replays (``on_duplicate
= "replay"``) and the outputs of a run the database inbox applied. A leaf: the
processing and the inbox both build on it.

An output that named no topic went to the route's default: the request's reply topic
(``reply_to``) or its ``output_topic``. It is kept without a topic and without the
correlation header, and both are taken again from the message that replays it, so a
retrying client gets the reply on its own reply topic with its own correlation id.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Output:
    topic: str
    value: bytes | str | None
    key: bytes | str | None
    headers: list[tuple[str, bytes | str]]


NOT_KEPT = "!"
"""Stored instead of a reply above ``dedup.max_stored_reply_bytes``."""


@dataclass(frozen=True, slots=True)
class Kept:
    topic: str | None
    """None: the default topic of the message that produces it."""
    value: bytes | None
    key: bytes | None
    headers: list[tuple[str, bytes]]
    """The ``message-id`` header first; no correlation header."""


def keep(output: Output, named: bool, correlated: bool) -> Kept:
    """``output`` as kept: without its topic unless the handler ``named`` it, without the
    correlation header (its last) if ``correlated``."""
    headers = output.headers[:-1] if correlated else output.headers
    return Kept(
        output.topic if named else None,
        _bytes(output.value),
        _bytes(output.key),
        [(name, _bytes(header) or b"") for name, header in headers],
    )


def size(outputs: Sequence[Kept]) -> int:
    """Bytes of keys, values and headers."""
    return sum(
        len(o.key or b"") + len(o.value or b"") + sum(len(n) + len(h) for n, h in o.headers)
        for o in outputs
    )


def encode(outputs: Sequence[Kept]) -> str:
    """JSON with bytes in base64: no ``|``, so it can end a Redis record."""
    return json.dumps(
        [
            {
                "topic": o.topic,
                "key": _b64(o.key),
                "value": _b64(o.value),
                "headers": [[name, _b64(header)] for name, header in o.headers],
            }
            for o in outputs
        ],
        separators=(",", ":"),
    )


def decode(text: str | None) -> list[Kept]:
    return [
        Kept(
            item["topic"],
            _unb64(item["value"]),
            _unb64(item["key"]),
            [(name, _unb64(header) or b"") for name, header in item["headers"]],
        )
        for item in json.loads(text or "[]")
    ]


def resolve(
    outputs: Sequence[Kept], default_topic: str | None, correlation: tuple[str, bytes] | None
) -> list[Output]:
    """The outputs to produce for a message whose default topic and correlation header
    are these. An output without a topic and no default to send it to is dropped."""
    produced = []
    for o in outputs:
        topic = o.topic or default_topic
        if topic is None:
            continue
        headers: list[tuple[str, bytes | str]] = list(o.headers)
        if o.topic is None and correlation is not None:
            headers.append(correlation)
        produced.append(Output(topic, o.value, o.key, headers))
    return produced


def _bytes(value: bytes | str | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode()


def _unb64(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)
