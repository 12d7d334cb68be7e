"""Network partitions (marker ``chaos``): three replicas, each in a network namespace
of its own (tests/support/netns.py), one of them cut from Redis, from the broker or from
both by iptables rules that drop its packets silently, then healed. Checked each time:
nothing lost (every id ran and its output is in the output topic), ids run twice only
in the window the README states, every partition handled again after the heal, and
the cut replica not ready while it cannot do its work.

Skipped, with the reason, where namespaces cannot be made (not root, no ``ip`` or
``iptables``); CI runs as root and ``scripts/setup.sh`` installs both."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections import Counter

import pytest
from confluent_kafka import Consumer, TopicPartition

from idempotent_worker.local.demo import create_topics, read_all
from tests.support import netns
from tests.support.chaos import PARTITIONS, REPO, Scenario, during, wait_until
from tests.support.kafka import dead_letter, produce
from tests.support.netns import Network

pytestmark = [
    pytest.mark.chaos,
    pytest.mark.netns,
    pytest.mark.skipif(netns.unavailable() is not None, reason=str(netns.unavailable())),
]

LEASE = 6
CUT_REPLICA = 0
CRASH_WINDOW = 5
"""Ids a replica that lost Redis past its lease may see run again elsewhere: the README's
window, the message in hand (one lane) and those it handled in the last
``dedup.complete_linger_ms`` (5 ms: a few, with a handler of a millisecond or two)."""
READY_WITHIN = 7
"""Seconds a cut replica may still answer ready: a Redis call's timeout and a retry, or
librdkafka's statistics (every second here) reporting the coordinator unreachable."""


@pytest.fixture
def network(request, tmp_path):
    """Three replicas' namespaces (``redis_replica`` by indirect parametrisation: and a
    Redis replica in one more)."""
    options = getattr(request, "param", {})
    with Network(3, tmp_path, **options) as network:
        yield network


@pytest.fixture
def scenario(network, unique_name, ledger, tmp_path):
    scenario = Scenario(
        network.bootstrap,
        network.redis_url,
        unique_name,
        lambda topics: create_topics(network.bootstrap, topics),
        ledger,
        tmp_path,
    )
    consumer = {
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 1000,
        "fetch.wait.max.ms": 10,
        "statistics.interval.ms": 1000,
    }
    scenario.extra.update(
        {
            "WORKER_HTTP__HOST": "0.0.0.0",
            "WORKER_DEDUP__LEASE_SECONDS": str(LEASE),
            "WORKER_KAFKA__CONSUMER": json.dumps(consumer),
        }
    )
    return scenario


def cut_and_heal(network, scenario, replicas, seconds, *, redis=False, broker=False):
    """Cut the replica while traffic flows, for ``seconds``; how long it answered
    /readyz 200 during the cut past ``READY_WITHIN``, and the seconds from the heal to
    every id run and committed. Prints the longest stretch of the cut in which no
    handler ran anywhere while the traffic flowed (the healthy replicas' progress)."""
    traffic = scenario.traffic(batch=300, rounds=8, interval=1.0)
    time.sleep(3)
    network.cut(CUT_REPLICA, redis=redis, broker=broker)
    ready_late = stalled = 0.0
    cut_at = last_run = time.monotonic()
    runs = sum(scenario.ledger.runs().values())
    for _ in during(seconds, step=0.5):
        if time.monotonic() - cut_at > READY_WITHIN and replicas.ready(CUT_REPLICA):
            ready_late += 0.5
        if (now_runs := sum(scenario.ledger.runs().values())) != runs or not traffic.flowing():
            runs, last_run = now_runs, time.monotonic()
        stalled = max(stalled, time.monotonic() - last_run)
    print(f"longest stretch without a run anywhere during the cut: {stalled:.1f} s")
    network.heal(CUT_REPLICA)
    return ready_late, finish_after_heal(scenario, traffic)


def finish_after_heal(scenario, traffic):
    """Seconds from now (the heal) until every id ran and the group committed all."""
    healed = time.monotonic()
    traffic.join()
    wait_until(scenario.finished, 120, "every id to run and be committed after the heal")
    return time.monotonic() - healed


def check(scenario, replicas, name, faults, twice_bound):
    assert replicas.end_all() == [0, 0, 0]
    lost, twice, dead = scenario.account(name, 2400, faults)
    outputs, _ = scenario.outputs()  # an output's id is its input's, with its index
    assert lost == 0 and dead == 0
    # No output dropped behind a committed offset:
    assert scenario.published() <= {output.rsplit(":", 1)[0] for output in outputs}
    assert twice <= twice_bound


def test_a_replica_cut_from_redis_past_its_lease_loses_no_output(network, scenario):
    scenario.handler = "ledger_and_emit"
    with scenario.replicas(3, network) as replicas:
        replicas.start_all(PARTITIONS)
        ready_late, recovery = cut_and_heal(network, scenario, replicas, 10, redis=True)
        print(f"cut from Redis 10 s: recovered {recovery:.1f} s after the heal")
        assert ready_late == 0
        check(scenario, replicas, "one replica cut from Redis 10 s", "iptables DROP", CRASH_WINDOW)


def test_a_replica_cut_from_the_broker_is_not_ready_and_loses_nothing(network, scenario):
    # Commits seconds apart: the cut replica likely sends one after the cut, for records
    # read before it (a commit that waited for its answer held the loop, and with it
    # the statistics that make the replica not ready, for socket.timeout.ms).
    scenario.extra["WORKER_KAFKA__COMMIT_INTERVAL_SECONDS"] = "4"
    with scenario.replicas(3, network) as replicas:
        replicas.start_all(PARTITIONS)
        ready_late, recovery = cut_and_heal(network, scenario, replicas, 12, broker=True)
        print(f"cut from the broker 12 s: recovered {recovery:.1f} s after the heal")
        assert ready_late == 0
        check(scenario, replicas, "one replica cut from the broker 12 s", "iptables DROP", 0)


def test_a_replica_isolated_comes_back_and_handles_its_partitions(network, scenario):
    with scenario.replicas(3, network) as replicas:
        replicas.start_all(PARTITIONS)
        ready_late, recovery = cut_and_heal(
            network, scenario, replicas, 10, redis=True, broker=True
        )
        print(f"isolated 10 s: recovered {recovery:.1f} s after the heal")
        assert ready_late == 0
        check(scenario, replicas, "one replica isolated 10 s", "iptables DROP", CRASH_WINDOW)


def test_a_replica_cut_from_redis_then_from_the_broker_too_is_not_stuck(network, scenario):
    with scenario.replicas(3, network) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=300, rounds=8, interval=1.0)
        time.sleep(3)
        network.cut(CUT_REPLICA, redis=True)
        time.sleep(LEASE + 1)  # its claims expire
        assert not replicas.ready(CUT_REPLICA)
        network.cut(CUT_REPLICA, broker=True)
        for _ in during(8, step=0.5):
            assert not replicas.ready(CUT_REPLICA)
        network.heal(CUT_REPLICA)
        recovery = finish_after_heal(scenario, traffic)
        print(f"cut from Redis, then the broker: recovered {recovery:.1f} s after the heal")
        check(
            scenario, replicas, "cut from Redis, then also from the broker", "iptables DROP",
            CRASH_WINDOW,
        )  # fmt: skip


@pytest.mark.parametrize("network", [{"redis_replica": True}], indirect=True)
def test_redis_cut_from_its_replica_under_min_replicas_holds_and_loses_nothing(network, scenario):
    """``redis.min_replicas = 1``: while the Redis replica is cut from its primary, no
    write is acknowledged; every replica holds still, not ready, and carries on after."""
    scenario.extra.update(
        {"WORKER_REDIS__MIN_REPLICAS": "1", "WORKER_REDIS__REPLICA_TIMEOUT_MS": "300"}
    )
    with scenario.replicas(3, network) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=300, rounds=8, interval=1.0)
        time.sleep(3)
        network.cut(network.redis_replica, redis=True)
        cut_at = time.monotonic()
        ready_late = 0.0
        runs = sum(scenario.ledger.runs().values())
        for _ in during(10, step=0.5):
            late = time.monotonic() - cut_at > READY_WITHIN
            ready_late += 0.5 * sum(late and replicas.ready(k) for k in range(3))
        ran = sum(scenario.ledger.runs().values()) - runs
        network.heal(network.redis_replica)
        recovery = finish_after_heal(scenario, traffic)
        print(f"Redis cut from its replica 10 s: {ran} runs during the cut, "
              f"recovered {recovery:.1f} s after the heal")  # fmt: skip
        assert ready_late == 0
        check(
            scenario, replicas, "Redis cut from its replica 10 s, min_replicas 1",
            "iptables DROP", CRASH_WINDOW,
        )  # fmt: skip


def test_a_flapping_link_loses_nothing(network, scenario):
    with scenario.replicas(3, network) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=300, rounds=8, interval=1.0)
        time.sleep(2)
        flaps = 0
        for _ in during(10, step=0):
            network.cut(CUT_REPLICA, redis=True, broker=True)
            time.sleep(1.0)
            network.heal(CUT_REPLICA)
            time.sleep(1.0)
            flaps += 1
        recovery = finish_after_heal(scenario, traffic)
        print(f"{flaps} flaps: recovered {recovery:.1f} s after the last")
        check(
            scenario, replicas, "a link to both flapping every 1 s", f"{flaps} cuts", CRASH_WINDOW
        )


LETTERS = 4000


@pytest.mark.parametrize("cut", ["redis", "broker"])
def test_a_dlq_replay_cut_mid_run_replays_each_letter_once(tmp_path, unique_name, cut):
    """``dlq replay`` run in a namespace, cut from Redis or the broker while it replays,
    then healed; run again until it says it is done: every letter replayed, none twice."""
    with Network(1, tmp_path) as network:
        topic = unique_name("in")
        dlq = f"{topic}.dlq"
        create_topics(network.bootstrap, {topic: 1, dlq: 2})
        letters = [dead_letter(topic, f"id{n}", "handler_failed") for n in range(LETTERS)]
        for n, letter in enumerate(letters):
            letter.partition = n % 2
        produce(network.bootstrap, dlq, letters)
        config = tmp_path / "worker.toml"
        config.write_text(
            f'[kafka]\nbootstrap_servers = "{network.bootstrap}"\n'
            f'group_id = "{unique_name("group")}"\n'
            f'[redis]\nurl = "{network.redis_url}"\nsocket_timeout_seconds = 0.5\n'
            f"[dedup]\nlease_seconds = {LEASE}\n"
            f'[[routes]]\ntopic = "{topic}"\nhandler = "tests.support.handlers:ledger"\n'
        )
        argv = network.command(
            0,
            [sys.executable, "-m", "idempotent_worker", "dlq", "replay", "--topic", dlq, "--config",
             str(config)],
        )  # fmt: skip
        first = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_until(lambda: replayed(network, topic), 30, "the replay to start re-publishing")
        network.cut(0, redis=cut == "redis", broker=cut == "broker")
        time.sleep(8)
        network.heal(0)
        lines = first.communicate(timeout=180)[0].decode().splitlines()
        print(f"first run, exit {first.returncode}: {lines[-1]}")
        if cut == "redis":  # the cut fell in the run, which waited for the store
            assert any("dedup store unavailable" in line for line in lines)
        for _ in range(3):  # again, as an operator would after an incomplete run
            rerun = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=180)
            print(f"run again, exit {rerun.returncode}: {rerun.stdout.splitlines()[-1:]}")
            if rerun.returncode == 0 and "replayed 0," in rerun.stdout:
                break
        counts = Counter(
            headers["replay-of"].decode()
            for headers, _ in read_all(network.bootstrap, topic)
            if "replay-of" in headers
        )
        assert len(counts) == LETTERS, f"{LETTERS - len(counts)} letters never replayed"
        assert [p for p, n in counts.items() if n > 1] == []


def replayed(network, topic):
    """Whether anything was re-published to ``topic`` yet (its end moved)."""
    consumer = Consumer({"bootstrap.servers": network.bootstrap, "group.id": "peek"})
    try:
        return consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=5)[1] > 0
    finally:
        consumer.close()
