"""Dedup modes against a real broker and Redis: replaying the first reply to a
duplicate request (``on_duplicate = "replay"``), and shadow mode (``dedup = "shadow"``)."""

from __future__ import annotations

import signal

import pytest

from idempotent_worker.config.settings import load_settings
from idempotent_worker.errors import ConfigError
from idempotent_worker.local.demo import read_all
from tests.support.chaos import Scenario, wait_until
from tests.support.harness import make_settings, run_worker
from tests.support.kafka import produce, with_id

pytestmark = pytest.mark.integration


@pytest.fixture
def topics(unique_name, make_topics):
    names = {kind: unique_name(kind) for kind in ("in", "a", "b", "audit")}
    make_topics({names["in"]: 3, names["a"]: 1, names["b"]: 1, names["audit"]: 1})
    make_topics({f"{names['in']}.dlq": 1})
    return names


def replay_route(topics, **extra):
    return {
        "topic": topics["in"],
        "handler": "tests.support.handlers:reply_once",
        "on_duplicate": "replay",
        "reply_to": "header:reply-topic",
        "correlation_header": "correlation-id",
        **extra,
    }


def request(topics, requester, correlation, id="x", partition=0, value=None):
    return with_id(
        id,
        partition=partition,
        value=value,
        **{"reply-topic": topics[requester], "correlation-id": correlation},
    )


def replies(bootstrap, topic):
    return [(headers, value) for headers, value in read_all(bootstrap, topic)]


@pytest.fixture
def audit(topics, monkeypatch):
    monkeypatch.setenv("AUDIT_TOPIC", topics["audit"])


def test_a_duplicate_request_gets_the_first_reply_on_its_own_topic_with_its_own_correlation(
    kafka_bootstrap, redis_url, unique_name, topics, ledger, audit
):
    # One partition, so that A's request runs first.
    produce(kafka_bootstrap, topics["in"], [request(topics, "a", "c1"), request(topics, "b", "c2")])
    settings = make_settings(kafka_bootstrap, redis_url, unique_name("g"), [replay_route(topics)])
    run = run_worker(settings, max_messages=2)

    assert ledger.runs() == {"x": 1}
    [(first, value_a)] = replies(kafka_bootstrap, topics["a"])
    [(second, value_b)] = replies(kafka_bootstrap, topics["b"])
    assert value_a == value_b and value_a.startswith(b"reply to x, run ")
    assert first == {"message-id": b"x:0", "correlation-id": b"c1"}
    assert second == {"message-id": b"x:0", "correlation-id": b"c2"}
    # An output that named its topic goes there again, without a correlation id.
    audits = replies(kafka_bootstrap, topics["audit"])
    assert audits == [({"message-id": b"x:1"}, b"audit")] * 2
    assert run.value("replies_replayed_total", topic=topics["in"]) == 1
    assert run.value("duplicates_skipped_total", topic=topics["in"], reason="replayed") == 1


def test_a_reply_too_large_to_keep_and_a_conflicting_payload_are_not_replayed(
    kafka_bootstrap, redis_url, unique_name, topics, ledger, audit
):
    produce(kafka_bootstrap, topics["in"], [request(topics, "a", "c1", id="big")])
    produce(kafka_bootstrap, topics["in"], [request(topics, "a", "c1", id="other")])
    produce(
        kafka_bootstrap,
        topics["in"],
        [
            request(topics, "b", "c2", id="big"),
            request(topics, "b", "c3", id="other", value=b'{"changed": 1}'),
        ],
    )
    route = replay_route(topics)
    group = unique_name("g")
    # Above 50 bytes nothing is kept: "big"'s reply and audit outputs take about 90.
    settings = make_settings(
        kafka_bootstrap, redis_url, group, [route], dedup={"max_stored_reply_bytes": 50}
    )
    run = run_worker(settings, max_messages=4)

    assert ledger.runs() == {"big": 1, "other": 1}
    assert replies(kafka_bootstrap, topics["b"]) == []
    assert run.value("duplicates_skipped_total", topic=topics["in"], reason="reply_not_kept") == 1
    [(letter, _)] = replies(kafka_bootstrap, f"{topics['in']}.dlq")
    assert (letter["dlq-reason"], letter["message-id"]) == (b"id_conflict", b"other")
    assert run.value("replies_replayed_total", topic=topics["in"]) == 0


@pytest.mark.e2e
def test_the_reply_is_replayed_by_a_replica_started_after_the_first_was_killed(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path, topics
):
    scenario = Scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path)
    scenario.input = topics["in"]  # the requests
    scenario.handler = "reply_once"
    scenario.route = replay_route(topics)
    scenario.extra["AUDIT_TOPIC"] = topics["audit"]
    with scenario.replicas(1) as replicas:
        replicas.start(0)
        produce(kafka_bootstrap, topics["in"], [request(topics, "a", "c1")])
        wait_until(lambda: replies(kafka_bootstrap, topics["a"]), 60, "the first reply")
        assert replicas.end(0, signal.SIGKILL) == -signal.SIGKILL
        replicas.start(0)  # a new process: nothing of the first in memory
        produce(kafka_bootstrap, topics["in"], [request(topics, "b", "c2", partition=2)])
        wait_until(lambda: replies(kafka_bootstrap, topics["b"]), 60, "the replayed reply")
        assert replicas.end_all() == [0]
    [(_, first)] = replies(kafka_bootstrap, topics["a"])
    [(headers, replayed)] = replies(kafka_bootstrap, topics["b"])
    assert replayed == first
    assert headers == {"message-id": b"x:0", "correlation-id": b"c2"}
    assert ledger.runs() == {"x": 1}


def test_shadow_mode_detects_what_the_default_mode_skips_and_runs_everything(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger
):
    topic = unique_name("in")
    make_topics({topic: 3, f"{topic}.dlq": 1})
    ids = [f"s-{n}" for n in range(20)]
    records = [with_id(id, partition=n % 3) for n, id in enumerate(ids)]
    records += [with_id(id, partition=(n + 1) % 3) for n, id in enumerate(ids) if n % 3 == 0]
    produce(kafka_bootstrap, topic, records)
    route = {"topic": topic, "handler": "tests.support.handlers:ledger"}
    counts = {}
    for mode in ("id", "shadow"):
        ledger.path.write_text("")
        settings = make_settings(
            kafka_bootstrap, redis_url, unique_name(mode), [{**route, "dedup": mode}]
        )
        run = run_worker(settings, max_messages=len(records))
        counts[mode] = (
            sum(ledger.runs().values()),
            run.value("duplicates_skipped_total", topic=topic, reason="duplicate"),
            run.value("duplicates_detected_total", topic=topic, reason="duplicate"),
        )
    assert counts["id"] == (20, 7, 0)
    assert counts["shadow"] == (27, 0, 7)  # every message ran; the same 7 detected

    # The shadow group's records are there: switched to the default mode, it skips.
    ledger.path.write_text("")
    produce(kafka_bootstrap, topic, [with_id("s-5", partition=2)])
    shadow_group = settings.kafka.group_id
    settings = make_settings(kafka_bootstrap, redis_url, shadow_group, [route])
    run = run_worker(settings, max_messages=1)
    assert ledger.runs() == {}
    assert run.value("duplicates_skipped_total", topic=topic, reason="duplicate") == 1


def test_shadow_mode_has_nothing_to_replay(tmp_path):
    config = tmp_path / "worker.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "x:9092"\ngroup_id = "g"\n[redis]\nurl = "redis://x"\n'
        '[[routes]]\ntopic = "t"\nhandler = "a:b"\ndedup = "shadow"\non_duplicate = "replay"\n'
    )
    with pytest.raises(ConfigError, match=r"^routes\[0\]\.on_duplicate: a shadow route"):
        load_settings(config)
