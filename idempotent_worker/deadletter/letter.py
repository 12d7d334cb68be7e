"""What a dead-letter record carries: the original record plus ``dlq-*`` headers saying
why. The loop's writer is processing/deadletters.py; ``dlq replay`` is replay.py."""

from __future__ import annotations

from dataclasses import dataclass

from confluent_kafka import Message as KafkaMessage

from idempotent_worker.kafka.records import coordinates, header_pairs


@dataclass(frozen=True, slots=True)
class DeadLetter:
    reason: str
    """Short machine-readable cause: handler_failed, permanent_failure, id_missing, ..."""
    error_type: str
    error_message: str
    attempts: int
    message_id: str | None = None
    drop_value: bool = False
    """Write the dead-letter record without the value and the original headers (too large
    to copy); the ``dlq-original-*`` headers point at the original record."""


MAX_ERROR_MESSAGE = 1000


def dead_letter_headers(record: KafkaMessage, letter: DeadLetter) -> list[tuple[str, bytes]]:
    """The original headers (unless dropped), then the dead-letter headers."""
    topic, partition, offset = coordinates(record)
    return [
        *([] if letter.drop_value else header_pairs(record)),
        ("dlq-reason", letter.reason.encode()),
        ("dlq-error-type", letter.error_type.encode()),
        ("dlq-error-message", letter.error_message[:MAX_ERROR_MESSAGE].encode()),
        ("dlq-attempts", str(letter.attempts).encode()),
        ("dlq-original-topic", topic.encode()),
        ("dlq-original-partition", str(partition).encode()),
        ("dlq-original-offset", str(offset).encode()),
        *([("dlq-message-id", letter.message_id.encode())] if letter.message_id else []),
        *([("dlq-value-dropped", b"true")] if letter.drop_value else []),
    ]
