"""Small accessors that turn confluent-kafka's loosely typed records into plain values."""

from __future__ import annotations

from confluent_kafka import Message as KafkaMessage


def header_pairs(record: KafkaMessage) -> list[tuple[str, bytes]]:
    """The record's headers in order, values as bytes (a null value becomes ``b""``)."""
    headers = record.headers()
    if not headers:
        return []
    pairs = headers.items() if isinstance(headers, dict) else headers
    return [
        (name, value.encode() if isinstance(value, str) else value or b"") for name, value in pairs
    ]


def coordinates(record: KafkaMessage) -> tuple[str, int, int]:
    """(topic, partition, offset) of a consumed record."""
    return str(record.topic()), int(record.partition() or 0), int(record.offset() or 0)
