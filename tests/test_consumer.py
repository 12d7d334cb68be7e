"""The group consumer on the real broker: partitions paused while the dedup store was
away and lost meanwhile come back working (librdkafka keeps a partition's pause flag
across a reassignment)."""

from __future__ import annotations

import time

import pytest
import structlog
from prometheus_client import CollectorRegistry

from tests.support.harness import make_settings
from tests.support.kafka import Record, produce
from worker.consumer import GroupConsumer
from worker.metrics import Metrics
from worker.server import Health

pytestmark = pytest.mark.integration


def consume_until(consumer: GroupConsumer, done, seconds: float = 20.0) -> list:
    records = []
    deadline = time.monotonic() + seconds
    while not done(records) and time.monotonic() < deadline:
        records.extend(r for r in consumer.consume() if r.error() is None)
    return records


def test_partitions_lost_while_held_are_consumed_again_once_reassigned(
    kafka_bootstrap, redis_url, unique_name, make_topics
):
    topic = unique_name("in")
    make_topics({topic: 2})
    settings = make_settings(
        kafka_bootstrap, redis_url, unique_name("group"), [{"topic": topic, "handler": "x:y"}]
    )
    health = Health(60)
    consumer = GroupConsumer(
        settings, Metrics(CollectorRegistry()), health, structlog.get_logger(), lambda e: None
    )
    try:
        consumer.subscribe([topic])
        produce(kafka_bootstrap, topic, [Record(partition=p) for p in (0, 1)])
        assert len(consume_until(consumer, lambda r: len(r) >= 2)) == 2
        # The store goes away: the worker holds its partitions still...
        consumer.hold()
        # ...and meanwhile loses them (its session timed out) and gets them back.
        consumer._consumer.unsubscribe()
        consumer._on_lost(consumer._consumer, consumer._assignment())
        assert not health.joined
        consumer.resume()  # the store is back: nothing is owned at this moment
        consumer.subscribe([topic])
        produce(kafka_bootstrap, topic, [Record(partition=p) for p in (0, 1)])
        records = consume_until(consumer, lambda r: len(r) >= 4)
        assert health.joined
        assert sorted((r.partition(), r.offset()) for r in records) == [
            (0, 0), (0, 1), (1, 0), (1, 1),
        ]  # fmt: skip
    finally:
        consumer.close()
