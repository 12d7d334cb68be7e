"""A consumed record as the loop carries it, from reading it to its end."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Message as KafkaMessage

from idempotent_worker.config.ids import SEPARATOR
from idempotent_worker.config.registry import ResolvedRoute
from idempotent_worker.deadletter.letter import DeadLetter
from idempotent_worker.errors import MessageIdError
from idempotent_worker.kafka.records import coordinates, header_pairs
from idempotent_worker.observe.tracing import MessageSpan
from idempotent_worker.types import Message


@dataclass(slots=True)
class Item:
    record: KafkaMessage
    route: ResolvedRoute
    origin: str
    """``topic/partition/offset``: what a completed record remembers, to tell redeliveries."""
    message: Message | None
    fingerprint: str
    """Of the value: a completed id remembers it, to tell a true duplicate from a conflict."""
    rejection: DeadLetter | None = None
    """Why the record goes straight to the dead-letter topic (no usable id, too large)."""
    applied: bool = False
    """The inbox found the id's effects committed by an earlier run (a duplicate)."""
    done: bool = False
    """Finished (completed, skipped or dead-lettered): its offset may be committed."""
    key: str = ""
    """What the message claims in the dedup store: its id, or on a sequence route its
    entity (``<topic>\\x1f<entity>``, one claim and one position per entity)."""
    sequence: int | None = None
    """On a sequence route, the message's position in its entity's history."""
    span: MessageSpan | None = None
    """Its trace span, when tracing is on."""

    def finish(self, outcome: str, **attributes: Any) -> None:
        """Finished (its offset may be committed) with ``outcome``, which its span says."""
        self.done = True
        if self.span is not None:
            self.span.end(outcome, **attributes)

    @property
    def id(self) -> str:
        assert self.message is not None
        return self.message.id


def prepare(
    record: KafkaMessage, routes: Mapping[str, ResolvedRoute], max_payload_bytes: int
) -> Item:
    """The record's route, id and fingerprint; a record too large or without a usable id
    comes with the dead letter that rejects it."""
    topic, partition, offset = coordinates(record)
    route = routes[topic]
    headers = dict(header_pairs(record))
    key, value = record.key(), record.value()
    origin = f"{topic}/{partition}/{offset}"
    fingerprint = hashlib.blake2b(value or b"", digest_size=8).hexdigest()
    size = len(key or b"") + len(value or b"")
    size += sum(len(name) + len(header or b"") for name, header in headers.items())
    if size > max_payload_bytes:
        detail = (
            f"key, value and headers: {size} bytes, over kafka.max_payload_bytes "
            f"({max_payload_bytes})"
        )
        letter = DeadLetter("payload_too_large", "PayloadTooLarge", detail, 0, drop_value=True)
        return Item(record, route, origin, None, fingerprint, letter)
    sequence = None
    try:
        if route.extract_position is None:
            id = claimed = route.extract_id(topic, partition, offset, key, value, headers)
        else:
            entity, sequence = route.extract_position(topic, partition, offset, key, value, headers)
            id, claimed = f"{entity}@{sequence}", f"{topic}{SEPARATOR}{entity}"
    except MessageIdError as exc:
        letter = DeadLetter(exc.reason, "MessageIdError", exc.detail, 0)
        return Item(record, route, origin, None, fingerprint, letter)
    kind, timestamp = record.timestamp()
    message = Message(
        id, topic, partition, offset, key, value, headers, timestamp if kind else None
    )
    return Item(record, route, origin, message, fingerprint, key=claimed, sequence=sequence)
