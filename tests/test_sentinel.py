"""The dedup store behind Redis Sentinel (a primary, a replica, three Sentinels: real
``redis-server`` processes), and what ``redis.min_replicas`` buys when a primary dies
with writes its replica never received."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request

import pytest

from idempotent_worker.local import topologies
from idempotent_worker.local.demo import read_all
from tests.support.chaos import PARTITIONS, Scenario, during, wait_until
from tests.support.kafka import Record, produce, with_id

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]


def sentinel_scenario(sentinel, kafka_bootstrap, unique_name, make_topics, ledger, tmp_path):
    scenario = Scenario(kafka_bootstrap, "redis://", unique_name, make_topics, ledger, tmp_path)
    scenario.extra.update(
        {
            "WORKER_REDIS__SENTINEL_MASTER": sentinel.master,
            "WORKER_REDIS__SENTINELS": json.dumps(sentinel.addresses),
            "WORKER_REDIS__REPLICA_TIMEOUT_MS": "200",
            # Longer than any outage here: a claim outlived by an outage can be taken
            # over (the README's limit), which is not what these scenarios look at.
            "WORKER_DEDUP__LEASE_SECONDS": "30",
            # Every duplicate answered by Redis, not by a replica's memory of its own
            # completions: what the store forgets shows.
            "WORKER_DEDUP__LOCAL_CACHE_SIZE": "0",
        }
    )
    return scenario


@pytest.fixture
def sentinel(tmp_path):
    with topologies.RedisSentinel(tmp_path / "sentinel") as sentinel:
        yield sentinel


@pytest.fixture
def scenario(sentinel, kafka_bootstrap, unique_name, make_topics, ledger, tmp_path):
    return sentinel_scenario(sentinel, kafka_bootstrap, unique_name, make_topics, ledger, tmp_path)


def readyz(port):
    """(status, body) of a replica's /readyz."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def wait_for_promotion(sentinel, old_primary):
    wait_until(lambda: sentinel.primary() is not old_primary, 30, "Sentinel to promote")


def test_sentinel_failover_under_traffic_loses_nothing_and_keeps_skipping(scenario, sentinel):
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=500, rounds=20, interval=0.5)
        wait_until(lambda: len(scenario.ledger.runs()) > 2000, 60, "the first runs")
        primary = sentinel.primary()
        primary.process.kill()
        primary.process.wait()
        wait_for_promotion(sentinel, primary)
        ran_before = set(scenario.ledger.runs())
        skipped_at_promotion = replicas.metric("idempotent_worker_duplicates_skipped_total")
        traffic.join()
        wait_until(scenario.finished, 180, "every id to run and be committed")
        skipped = replicas.metric("idempotent_worker_duplicates_skipped_total")
        # What ran before the kill, published again after it: skipped by the new primary.
        records = [
            Record(value=value, key=headers["message-id"], headers=headers, partition=n % 6)
            for n, (headers, value) in enumerate(read_all(scenario.bootstrap, scenario.input))
            if headers["message-id"].decode() in ran_before
        ]
        produce(scenario.bootstrap, scenario.input, records)
        wait_until(lambda: scenario.lag() == 0, 60, "the replay to be consumed")
        skipped_replay = replicas.metric("idempotent_worker_duplicates_skipped_total") - skipped
        running = replicas.running()
        codes = replicas.end_all()
    lost, twice, dead = scenario.account(
        "Sentinel: primary SIGKILLed, replica promoted, min_replicas 0", 10_000, "1 SIGKILL"
    )
    assert running == [0, 1, 2] and codes == [0, 0, 0]  # followed it, no restart
    assert replicas.exit_codes == [0, 0, 0]
    assert lost == 0 and dead == 0
    assert skipped > skipped_at_promotion  # duplicates still skipped after the promotion
    # min_replicas 0: what the primary acknowledged in its last moment may be gone, and
    # a duplicate of such an id runs again; everything else replayed was skipped.
    assert skipped_replay >= len(records) - twice


def forgetful_failover(scenario, sentinel, min_replicas):
    """Cut the replica off, let one worker handle 200 new ids with only the primary
    behind it, kill the primary, promote the cut-off replica, then publish the 200 ids
    again. (ids run again, whether the worker held while the replica was cut off)"""
    scenario.extra["WORKER_REDIS__MIN_REPLICAS"] = str(min_replicas)
    first = [f"a-{n}" for n in range(100)]
    cut_off = [f"b-{n}" for n in range(200)]
    primary, replica = sentinel.primary(), sentinel.servers[1]

    def publish(ids):
        produce(scenario.bootstrap, scenario.input, [with_id(i, n % 6) for n, i in enumerate(ids)])

    def ran(ids):
        runs = scenario.ledger.runs()
        return all(runs[id] >= 1 for id in ids)

    with scenario.replicas(1) as replicas:
        replicas.start_all(PARTITIONS)
        publish(first)
        wait_until(lambda: ran(first) and scenario.lag() == 0, 60, "the first ids")
        replica.process.send_signal(signal.SIGSTOP)
        sentinel.command(primary, "CLIENT", "KILL", "TYPE", "replica")
        publish(cut_off)
        held = False
        if min_replicas:
            wait_until(lambda: readyz(replicas.ports[0])[0] == 503, 10, "the worker to hold")
            held = "replicas acknowledged" in readyz(replicas.ports[0])[1]
            for _ in during(3):
                assert not any(scenario.ledger.runs()[id] for id in cut_off)
        else:
            wait_until(lambda: ran(cut_off) and scenario.lag() == 0, 60, "the cut-off ids")
        primary.process.kill()
        primary.process.wait()
        replica.process.send_signal(signal.SIGCONT)
        wait_for_promotion(sentinel, primary)
        primary.start()  # back, and made the new primary's replica by the Sentinels
        sentinel.wait_ready()
        wait_until(lambda: ran(cut_off) and scenario.lag() == 0, 60, "the cut-off ids to run")
        publish(cut_off)  # their duplicates
        wait_until(lambda: scenario.lag() == 0, 60, "the duplicates")
        runs = scenario.ledger.runs()
        codes = replicas.end_all()
        logs = replicas.logs()
    assert codes == [0]
    assert all(runs[id] == 1 for id in first)
    rerun = sum(1 for id in cut_off if runs[id] > 1)
    scenario.account(
        f"forgetful failover (Sentinel), min_replicas {min_replicas}",
        500,
        "replica cut off, primary SIGKILLed",
    )
    if min_replicas:
        assert "replicas acknowledged the write" in logs  # the log says why it held
    return rerun, held


def test_a_forgetful_failover_reruns_ids_unless_replicas_acknowledged_them(
    kafka_bootstrap, unique_name, make_topics, ledger, tmp_path
):
    results = {}
    for min_replicas in (0, 1):
        workdir = tmp_path / f"min-replicas-{min_replicas}"
        workdir.mkdir()
        ledger.path.write_text("")
        with topologies.RedisSentinel(workdir / "sentinel") as sentinel:
            scenario = sentinel_scenario(
                sentinel, kafka_bootstrap, unique_name, make_topics, ledger, workdir
            )
            results[min_replicas] = forgetful_failover(scenario, sentinel, min_replicas)
    print(f"ids run again after the failover: min_replicas 0: {results[0][0]} of 200, "
          f"min_replicas 1: {results[1][0]} of 200")  # fmt: skip
    assert results[0] == (200, False)  # every completion only the primary had: forgotten
    assert results[1] == (0, True)  # held instead of acknowledging them


def test_a_replica_that_stays_down_holds_the_worker_until_it_returns(scenario, sentinel):
    scenario.extra["WORKER_REDIS__MIN_REPLICAS"] = "1"
    replica = sentinel.servers[1]
    ids = [f"r-{n}" for n in range(300)]
    with scenario.replicas(1) as replicas:
        replicas.start_all(PARTITIONS)
        replica.process.kill()
        replica.process.wait()
        produce(scenario.bootstrap, scenario.input, [with_id(i, n % 6) for n, i in enumerate(ids)])
        wait_until(lambda: readyz(replicas.ports[0])[0] == 503, 10, "the worker to hold")
        status, body = readyz(replicas.ports[0])
        for _ in during(3):
            assert sum(scenario.ledger.runs().values()) == 0, "a handler ran unacknowledged"
            assert replicas.running() == [0]
        replica.start()
        wait_until(lambda: scenario.finished(), 60, "the worker to resume and finish")
        wait_until(lambda: readyz(replicas.ports[0])[0] == 200, 10, "ready again")
        codes = replicas.end_all()
        logs = replicas.logs()
    lost, twice, dead = scenario.account(
        "Sentinel: replica down, min_replicas 1", 300, "replica SIGKILLed, back after 3 s"
    )
    assert (status, body.strip()) == (
        503,
        "not ready: dedup store: redis: 0 of 1 replicas acknowledged the write within 200 ms "
        "(redis.min_replicas)",
    )
    assert "0 of 1 replicas acknowledged the write" in logs
    assert codes == [0]
    assert (lost, twice, dead) == (0, 0, 0)
