"""Producing test records and reading a group's committed offsets on the real broker."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, Producer, TopicPartition

from idempotent_worker.local.demo import read_all


@dataclass
class Record:
    value: bytes | str | None = b"{}"
    key: bytes | str | None = None
    headers: dict[str, bytes | str] = field(default_factory=dict)
    partition: int = 0


def produce(bootstrap: str, topic: str, records: Iterable[Record]) -> int:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "linger.ms": 5}
    )
    count = 0
    for record in records:
        producer.produce(
            topic,
            value=record.value,
            key=record.key,
            headers=list(record.headers.items()),
            partition=record.partition,
        )
        producer.poll(0)
        count += 1
    assert producer.flush(30) == 0
    return count


def with_id(
    id: str, partition: int = 0, value: str | bytes | None = None, **headers: str
) -> Record:
    return Record(
        value=f'{{"id": "{id}"}}' if value is None else value,
        key=id,
        headers={"message-id": id, **headers},
        partition=partition,
    )


def dead_letter(topic: str, id: str, reason: str, **extra: str) -> Record:
    """A dead-letter record as the worker writes it, for the cases it does not make."""
    headers = {
        "message-id": id,
        "dlq-reason": reason,
        "dlq-message-id": id,
        "dlq-original-topic": topic,
        "dlq-original-partition": "0",
        "dlq-original-offset": "0",
        **extra,
    }
    return Record(value=None if "dlq-value-dropped" in extra else b"{}", key=id, headers=headers)


def committed_offsets(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    """``group``'s committed offset per partition of ``topic`` (0 where none is)."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False}
    )
    try:
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        committed = consumer.committed([TopicPartition(topic, p) for p in partitions], timeout=10)
    finally:
        consumer.close()
    return {tp.partition: max(tp.offset, 0) for tp in committed}


def group_lag(bootstrap: str, group: str, topic: str) -> int:
    """Records at or past ``group``'s committed offsets, counted by reading them."""
    return len(read_all(bootstrap, topic, committed_offsets(bootstrap, group, topic)))
