"""Where a message's id comes from: the ``id`` setting of a route.

``parse_id_spec`` turns a spec such as ``header:message-id`` into a function that
extracts the id from a record's parts, raising :class:`MessageIdError` with a short
reason when it cannot. Such a message is dead-lettered, never processed without dedup.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping

from idempotent_worker.errors import MessageIdError

MAX_ID_LENGTH = 512
MAX_SEQUENCE_DIGITS = 20
"""A sequence is a non-negative integer of at most this many digits (any 64-bit one)."""
SEPARATOR = "\x1f"

IdExtractor = Callable[[str, int, int, bytes | None, bytes | None, Mapping[str, bytes | None]], str]
"""``(topic, partition, offset, key, value, headers) -> id``."""


def parse_id_spec(spec: str) -> IdExtractor:
    """The extractor for ``spec``; raises ``ValueError`` naming what is wrong with it."""
    kind, _, argument = spec.partition(":")
    if kind == "header" and argument:
        return _from_header(argument)
    if kind == "json" and argument and all(argument.split(".")):
        return _from_json(argument.split("."))
    if spec == "key":
        return _from_key
    if spec == "hash":
        return _from_hash
    if spec == "coordinates":
        return _from_coordinates
    if spec == "cloudevents":
        return _from_cloudevents
    raise ValueError(
        f"'{spec}' is not an id spec: use header:<name>, key, json:<dotted.path>, hash, "
        "coordinates or cloudevents"
    )


PositionExtractor = Callable[
    [str, int, int, bytes | None, bytes | None, Mapping[str, bytes | None]], tuple[str, int]
]
"""``(topic, partition, offset, key, value, headers) -> (entity, sequence)``."""


def parse_position_specs(entity_spec: str, sequence_spec: str) -> PositionExtractor:
    """The extractor of a sequence route's entity and sequence (``entity`` is ``key``,
    ``header:<name>`` or ``json:<path>``; ``sequence`` is ``header:<name>`` or
    ``json:<path>``). Failures are reported as ``entity_*`` or ``sequence_*``."""
    entity = _renamed(parse_entity_spec(entity_spec), "entity")
    sequence = _renamed(parse_sequence_spec(sequence_spec), "sequence")

    def extract(
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes | None],
    ) -> tuple[str, int]:
        number = int(sequence(topic, partition, offset, key, value, headers))
        return entity(topic, partition, offset, key, value, headers), number

    return extract


def parse_entity_spec(spec: str) -> IdExtractor:
    if spec in ("hash", "coordinates", "cloudevents"):
        raise ValueError(f"'{spec}' is not an entity spec: use key, header:<name> or json:<path>")
    return parse_id_spec(spec)


def parse_sequence_spec(spec: str) -> IdExtractor:
    """An extractor of the sequence as decimal digits (checked, no leading zeros)."""
    if not (spec.startswith("header:") or spec.startswith("json:")):
        raise ValueError(f"'{spec}' is not a sequence spec: use header:<name> or json:<path>")
    text = parse_id_spec(spec)
    what = spec.replace(":", " ", 1)

    def extract(
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes | None],
    ) -> str:
        digits = text(topic, partition, offset, key, value, headers)
        if not (digits.isascii() and digits.isdigit()) or len(digits) > MAX_SEQUENCE_DIGITS:
            raise MessageIdError(
                "id_invalid",
                f"{what} is {digits[:40]!r}: not a non-negative integer of at most "
                f"{MAX_SEQUENCE_DIGITS} digits",
            )
        return str(int(digits))

    return extract


def _renamed(extract: IdExtractor, part: str) -> IdExtractor:
    """``extract`` with its ``id_*`` failure reasons reported as ``<part>_*``."""

    def renamed(
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes | None],
    ) -> str:
        try:
            return extract(topic, partition, offset, key, value, headers)
        except MessageIdError as exc:
            reason = part + exc.reason[2:] if exc.reason.startswith("id_") else exc.reason
            raise MessageIdError(reason, exc.detail) from None

    return renamed


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise MessageIdError("id_not_utf8", f"{what} is not UTF-8") from None
    return _checked(text, what)


def _checked(text: str, what: str) -> str:
    if not text:
        raise MessageIdError("id_missing", f"{what} is empty")
    if len(text) > MAX_ID_LENGTH:
        raise MessageIdError("id_invalid", f"{what} is longer than {MAX_ID_LENGTH} characters")
    if SEPARATOR in text:
        # Reserved: it separates the topic from the entity in a sequence route's claim
        # key, and the fields packed into one argument of the store's scripts.
        raise MessageIdError("id_invalid", f"{what} contains the character U+001F")
    return text


def _from_header(name: str) -> IdExtractor:
    def extract(
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes | None],
    ) -> str:
        return _text(_header(headers, name), f"header '{name}'")

    return extract


def _from_json(path: list[str]) -> IdExtractor:
    dotted = ".".join(path)

    def extract(
        topic: str,
        partition: int,
        offset: int,
        key: bytes | None,
        value: bytes | None,
        headers: Mapping[str, bytes | None],
    ) -> str:
        if value is None:
            raise MessageIdError("id_missing", "message has no value")
        try:
            node = json.loads(value)
        except ValueError:
            raise MessageIdError("value_not_json", "value is not valid UTF-8 JSON") from None
        for part in path:
            if not isinstance(node, dict) or part not in node:
                raise MessageIdError("id_missing", f"JSON field '{dotted}' is absent")
            node = node[part]
        if isinstance(node, bool) or not isinstance(node, str | int):
            raise MessageIdError("id_invalid", f"JSON field '{dotted}' is not a string or integer")
        return _checked(str(node), f"JSON field '{dotted}'")

    return extract


def _from_key(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes | None],
) -> str:
    if key is None:
        raise MessageIdError("id_missing", "message has no key")
    return _text(key, "key")


def _from_hash(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes | None],
) -> str:
    digest = hashlib.sha256()
    # Length-prefix each part so that (key="ab", value="c") and (key="a", value="bc") differ,
    # and a missing part differs from an empty one.
    for part in (key, value):
        digest.update(b"-" if part is None else len(part).to_bytes(8, "big") + part)
    return digest.hexdigest()


CLOUDEVENTS_CONTENT_TYPE = "application/cloudevents"
"""A structured-mode CloudEvent's ``content-type`` starts with this (``+json``, a
charset, ...)."""


def _from_cloudevents(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes | None],
) -> str:
    """A CloudEvent's ``source`` and ``id``, which together identify it (the
    specification's uniqueness), as ``<source> <id>``: from the ``ce_source`` and
    ``ce_id`` headers (binary mode), or from the JSON value's ``source`` and ``id``
    when ``content-type`` is ``application/cloudevents+json`` (structured mode). A source
    is a URI-reference, which holds no whitespace: one that does is refused, so that the
    joined id names one event."""
    content_type = (headers.get("content-type") or b"").decode("latin-1").strip().lower()
    if content_type.startswith(CLOUDEVENTS_CONTENT_TYPE):
        source, id = _structured_event(value)
    elif headers.get("ce_id") is not None or headers.get("ce_source") is not None:
        source, id = (
            _text(_header(headers, name), f"header '{name}'") for name in ("ce_source", "ce_id")
        )
    else:
        raise MessageIdError(
            "id_missing",
            "not a CloudEvent: no ce_id/ce_source headers, and content-type is not "
            f"{CLOUDEVENTS_CONTENT_TYPE}+json",
        )
    if any(character.isspace() for character in source):
        raise MessageIdError(
            "id_invalid", "the CloudEvent's source holds whitespace: not a URI-reference"
        )
    return _checked(f"{source} {id}", "the CloudEvent's source and id")


def _header(headers: Mapping[str, bytes | None], name: str) -> bytes:
    raw = headers.get(name)
    if raw is None:
        raise MessageIdError("id_missing", f"header '{name}' is absent")
    return raw


def _structured_event(value: bytes | None) -> tuple[str, str]:
    """A structured-mode CloudEvent's source and id."""
    if value is None:
        raise MessageIdError("id_missing", "a structured CloudEvent without a value")
    try:
        event = json.loads(value)
    except ValueError:
        raise MessageIdError("value_not_json", "value is not valid UTF-8 JSON") from None
    if not isinstance(event, dict):
        raise MessageIdError("id_invalid", "a structured CloudEvent's value is not a JSON object")
    fields = []
    for name in ("source", "id"):
        field = event.get(name)
        if field is None:
            raise MessageIdError("id_missing", f"the CloudEvent has no '{name}'")
        if not isinstance(field, str):
            raise MessageIdError("id_invalid", f"the CloudEvent's '{name}' is not a string")
        fields.append(_checked(field, f"the CloudEvent's '{name}'"))
    return fields[0], fields[1]


def _from_coordinates(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    headers: Mapping[str, bytes | None],
) -> str:
    return f"{topic}/{partition}/{offset}"
