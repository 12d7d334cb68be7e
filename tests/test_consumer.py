"""The group consumer on the real broker: partitions paused while the dedup store was
away and lost meanwhile come back working (librdkafka keeps a partition's pause flag
across a reassignment)."""

from __future__ import annotations

import random
import time

import pytest
import structlog
from confluent_kafka import TopicPartition
from prometheus_client import CollectorRegistry

from idempotent_worker.kafka.consumer import GroupConsumer
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import Parts
from tests.sim.broker import Broker, SimConsumer
from tests.sim.sched import Scheduler
from tests.support.harness import make_settings
from tests.support.kafka import Record, produce


def consume_until(consumer: GroupConsumer, done, seconds: float = 20.0) -> list:
    records = []
    deadline = time.monotonic() + seconds
    while not done(records) and time.monotonic() < deadline:
        records.extend(r for r in consumer.consume() if r.error() is None)
    return records


@pytest.mark.integration
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


def consumer_on(broker: Broker, records: int) -> GroupConsumer:
    """A group consumer of topic ``t`` (one partition holding ``records`` records) on the
    simulator's in-memory broker, joined and past its first poll."""
    broker.create("t", 1)
    for _ in range(records):
        broker.append("t", 0, None, b"v", [])
    settings = make_settings(
        "sim:9092", "redis://sim:6379", "g", [{"topic": "t", "handler": "x:y"}]
    )
    parts = Parts(consumer=lambda config: SimConsumer(broker, config))
    consumer = GroupConsumer(
        settings, Metrics(CollectorRegistry()), Health(60), structlog.get_logger(),
        lambda e: None, parts,
    )  # fmt: skip
    consumer.subscribe(["t"])
    consumer.consume()  # joined: t[0] assigned
    return consumer


def given_back(consumer: GroupConsumer, committed: int = 0) -> None:
    """t[0] revoked and assigned again, to be read again from its commit."""
    consumer._on_revoke(consumer._consumer, [TopicPartition("t", 0)])
    consumer._on_assign(consumer._consumer, [TopicPartition("t", 0)])
    consumer._consumer.seek(TopicPartition("t", 0, committed))


def test_an_unfinished_message_holds_its_partitions_offset_across_batches():
    """A message left unfinished in one batch keeps every later batch's finished messages
    of its partition from moving the offset past it, until the partition is assigned
    again (and read again from its commit)."""
    broker = Broker(Scheduler(random.Random(0)))
    consumer = consumer_on(broker, 4)
    first, second, third, fourth = broker.topics["t"][0]
    assert consumer.store_offsets([first], [second]) == 1
    assert consumer.store_offsets([third, fourth], []) == 2
    assert consumer._consumer.stored == {("t", 0): 1}  # never past the unfinished one
    given_back(consumer)
    consumer.consume()
    assert consumer.store_offsets([second, third], []) == 2
    assert consumer._consumer.stored == {("t", 0): 3}


def test_a_message_read_before_its_partition_changed_hands_holds_nothing():
    """Revoked and given back while its batch was in hand (the batch lets that message
    go), the partition is read again from its commit, which another replica moved past
    the message meanwhile: its old copy must not hold the offset back for good
    (simulator seed 74181: a partition stuck)."""
    broker = Broker(Scheduler(random.Random(0)))
    consumer = consumer_on(broker, 3)
    first, second, third = broker.topics["t"][0]
    given_back(consumer, committed=1)
    assert consumer.store_offsets([], [first]) == 0
    consumer.consume()
    assert consumer.store_offsets([second, third], []) == 2
    assert consumer._consumer.stored == {("t", 0): 3}


def test_a_record_read_before_its_partition_changed_hands_is_not_owned():
    """Revoked and given back while its batch was in hand, the partition is read again
    from its commit: the old batch's records of it are not this replica's to run any
    more. A lane that let one go (revoked) must not run the next one after the
    partition came back (simulator seed 26: a sequence's later message ran first and
    the earlier one was skipped as stale)."""
    broker = Broker(Scheduler(random.Random(0)))
    consumer = consumer_on(broker, 2)
    first, _ = broker.topics["t"][0]
    assert consumer.owns(first)
    given_back(consumer)
    assert not consumer.owns(first)
    consumer.consume()
    assert consumer.owns(first)


def test_an_interval_commit_refused_is_sent_again():
    """Interval commits do not wait for their answer (a commit sent into a cut waited
    for socket.timeout.ms, and the loop with it); one answered with an error is sent
    again with the next, and no second one is sent while one is on its way."""
    broker = Broker(Scheduler(random.Random(0)))
    consumer = consumer_on(broker, 2)
    consumer._commit_interval = 0
    cut = True
    broker.coordinator_fails = lambda member: cut
    consumer.store_offsets(broker.topics["t"][0], [])
    consumer.commit_if_due()
    consumer.commit_if_due()  # the first is on its way: not sent again yet
    assert len(consumer._consumer.answers) == 1
    consumer._consumer._serve()  # a poll: the answer, the coordinator was not reached
    cut = False
    assert broker.committed == {}
    consumer.commit_if_due()
    consumer._consumer._serve()
    assert broker.committed == {("t", 0): 2}
    assert consumer._metrics.commits.labels("error")._value.get() == 1
