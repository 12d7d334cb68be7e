"""Sequence mode (``dedup = "sequence"``) against a real broker and Redis: entity
histories with re-sent events consumed by three replicas, gaps in both policies, and a
replica SIGKILLed mid-stream."""

from __future__ import annotations

import itertools
import json
import random
import signal
import threading
import time
from collections import Counter, defaultdict

import pytest
import redis
from confluent_kafka import Producer

from idempotent_worker.local.demo import read_all
from tests.support import figures
from tests.support.chaos import PARTITIONS, Row, Scenario, report, wait_until
from tests.support.harness import make_settings, run_worker
from tests.support.kafka import Record, produce

pytestmark = pytest.mark.integration

SEQUENCE_ROUTE = {"dedup": "sequence", "entity": "json:entity", "sequence": "json:version"}


def event(entity: str, version: int, key: str | None = None) -> dict[str, object]:
    return {"key": key or entity, "value": json.dumps({"entity": entity, "version": version})}


def histories(entities: int, versions: int, resend_share: float, seed: int = 7):
    """Rounds of events, one per version: every entity's next version keyed by the entity
    (its originals in order on one partition), each followed, with ``resend_share``
    chance, by a re-send of one of that entity's versions so far under another key."""
    rng = random.Random(seed)
    rounds = []
    for version in range(1, versions + 1):
        round_ = []
        for n in range(entities):
            entity = f"e-{n}"
            round_.append(event(entity, version))
            if rng.random() < resend_share:
                again = rng.randint(1, version)
                round_.append(event(entity, again, key=f"resend-{version}-{n}"))
        rounds.append(round_)
    return rounds


def publish(bootstrap: str, topic: str, rounds, interval: float) -> threading.Thread:
    """Publish ``rounds`` in the background, ``interval`` s apart."""

    def run() -> None:
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True})
        for round_ in rounds:
            for record in round_:
                producer.produce(topic, **record)
                producer.poll(0)
            producer.flush(30)
            time.sleep(interval)
        assert producer.flush(30) == 0

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


class Applied:
    """The ledger of ``applies_in_order``: each entity's runs, in the order they ended."""

    def __init__(self, text: str) -> None:
        self.runs: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
        for line in text.splitlines():
            id, start, end = line.split()
            entity, version = id.rsplit("@", 1)
            self.runs[entity].append((int(version), float(start), float(end)))

    def versions(self, entity: str) -> list[int]:
        return [version for version, _, _ in self.runs[entity]]

    def total(self) -> int:
        return sum(len(runs) for runs in self.runs.values())

    def overlaps(self) -> list[str]:
        """Entities two of whose runs overlapped in time."""
        found = []
        for entity, runs in self.runs.items():
            ordered = sorted(runs, key=lambda run: run[1])
            if any(b[1] < a[2] for a, b in itertools.pairwise(ordered)):
                found.append(entity)
        return found


def stale_skips(logs: str) -> dict[tuple[str, int], int]:
    """(entity, version) -> the position its stale skip found, from DEBUG log lines."""
    found = {}
    for line in logs.splitlines():
        if '"reason": "stale"' not in line:
            continue
        fields = json.loads(line)
        entity, version = fields["id"].rsplit("@", 1)
        found[(entity, int(version))] = fields["position"]
    return found


@pytest.fixture
def scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path):
    scenario = Scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path)
    scenario.handler = "applies_in_order"
    scenario.route = dict(SEQUENCE_ROUTE)
    return scenario


def positions(redis_url: str, group: str) -> dict[str, int]:
    """The group's positions (its keys ``<prefix>=<topic>\x1f<entity>``), as entity ->
    position."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        keys = client.keys(f"idempotent-worker:{group}=*")
        values = client.mget(keys) if keys else []
    finally:
        client.close()
    return {key.rsplit("\x1f", 1)[-1]: int(value) for key, value in zip(keys, values, strict=True)}


def claims_left(redis_url: str, group: str) -> int:
    """Records left in the group's windows besides their sentinels: entity claims not
    ended."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        windows = client.keys(f"idempotent-worker:{group}/*")
        return sum(client.hlen(window) - 1 for window in windows)
    finally:
        client.close()


@pytest.mark.e2e
def test_three_replicas_apply_each_entity_in_order_once_and_skip_what_is_stale(scenario):
    entities, versions = 1000, 20
    rounds = histories(entities, versions, resend_share=0.3)
    published = sum(len(r) for r in rounds)
    scenario.extra["WORKER_LOG__LEVEL"] = "DEBUG"
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        publisher = publish(scenario.bootstrap, scenario.input, rounds, interval=0.1)
        publisher.join(120)
        wait_until(lambda: scenario.lag() == 0, 120, "the group to consume everything")
        stale_metric = replicas.metric(
            "idempotent_worker_duplicates_skipped_total", topic=scenario.input, reason="stale"
        )
        replicas.end_all()

    applied = Applied(scenario.ledger.path.read_text())
    sent: dict[str, set[int]] = defaultdict(set)
    for round_ in rounds:
        for record in round_:
            fields = json.loads(record["value"])
            sent[fields["entity"]].add(fields["version"])
    for entity in sent:
        runs = applied.versions(entity)
        assert runs == sorted(set(runs)), f"{entity} applied {runs}: not strictly increasing"
        assert runs[-1] == versions
    assert applied.overlaps() == []
    # Every version never applied was stale when it arrived: its skip found a position
    # at or above it, and that position is a version the entity applied.
    skips = stale_skips(replicas.logs())
    unexplained = [
        (entity, version)
        for entity, versions_sent in sent.items()
        for version in versions_sent - set(applied.versions(entity))
        if not (
            (found := skips.get((entity, version))) is not None
            and found >= version
            and found in applied.versions(entity)
        )
    ]
    assert unexplained == []
    assert stale_metric == published - applied.total()
    assert positions(scenario.redis_url, scenario.group) == {
        f"e-{n}": versions for n in range(entities)
    }
    assert claims_left(scenario.redis_url, scenario.group) == 0
    figures.record(
        f"sequence mode, 3 replicas: {published} published, {applied.total()} applied once "
        f"each, {int(stale_metric)} stale skips, {entities} entities, one Redis key each"
    )


@pytest.mark.parametrize("on_gap", ["process", "dead_letter"])
def test_a_gap_is_counted_and_handled_or_dead_lettered(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger, on_gap
):
    topic = unique_name("in")
    make_topics({topic: 1, f"{topic}.dlq": 1})
    records = [
        Record(**event("a", 1)),
        Record(**event("a", 2)),
        Record(**event("a", 5)),  # 3 and 4 never came
        Record(**event("b", 9)),  # an entity's first message sets its position: no gap
        Record(key="a", value=json.dumps({"entity": "a"})),
        Record(key="a", value=json.dumps({"entity": "a", "version": "v6"})),
    ]
    produce(kafka_bootstrap, topic, records)
    route = {
        "topic": topic,
        "handler": "tests.support.handlers:applies_in_order",
        **SEQUENCE_ROUTE,
        "on_gap": on_gap,
    }
    run = run_worker(
        make_settings(kafka_bootstrap, redis_url, unique_name("g"), [route]),
        max_messages=len(records),
    )
    applied = Applied(ledger.path.read_text())
    dead = {
        headers["dlq-reason"].decode(): json.loads(value)
        for headers, value in read_all(kafka_bootstrap, f"{topic}.dlq")
    }
    assert run.value("sequence_gaps_total", topic=topic) == 1
    assert applied.versions("b") == [9]
    assert dead.keys() >= {"sequence_missing", "sequence_invalid"}
    if on_gap == "process":
        assert applied.versions("a") == [1, 2, 5]
        assert "sequence_gap" not in dead
    else:
        assert applied.versions("a") == [1, 2]
        assert dead["sequence_gap"] == {"entity": "a", "version": 5}


@pytest.mark.e2e
def test_a_replica_killed_mid_stream_loses_nothing_and_no_position_goes_back(scenario):
    entities, versions = 300, 20
    rounds = histories(entities, versions, resend_share=0.3, seed=11)
    published = sum(len(r) for r in rounds)
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        publisher = publish(scenario.bootstrap, scenario.input, rounds, interval=0.25)
        wait_until(lambda: scenario.ledger.path.stat().st_size > 100_000, 60, "progress")
        replicas.end(1, signal.SIGKILL)
        replicas.start(1)
        publisher.join(120)
        wait_until(lambda: scenario.lag() == 0, 120, "the group to consume everything")
        replicas.end_all()

    applied = Applied(scenario.ledger.path.read_text())
    backwards = [
        entity
        for entity in applied.runs
        if any(b < a for a, b in itertools.pairwise(applied.versions(entity)))
    ]
    assert backwards == []
    final = positions(scenario.redis_url, scenario.group)
    lost = [f"e-{n}" for n in range(entities) if final.get(f"e-{n}") != versions]
    assert lost == []
    twice = sum(
        count - 1
        for entity in applied.runs
        for count in Counter(applied.versions(entity)).values()
        if count > 1
    )
    report(Row("sequence mode, replica SIGKILLed", published, "1 SIGKILL", len(lost), twice, 0))
