"""The fault suite: real worker processes, the real broker and real ``redis-server``
processes, and faults injected into them while messages flow.

Each scenario checks its invariant against the ground truth: the ids read back from
the input topic (what was published), the ledger the handler appends every run to
(what ran), and the output and dead-letter topics (what came out). Each adds a row to
the table printed at the end of the session.
"""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
import redis

from idempotent_worker.dedup import State
from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.local import embedded
from idempotent_worker.local.demo import FAST_CONSUMER, metric_sum, probe, scrape
from tests.support.chaos import PARTITIONS, Scenario, during, wait_until
from tests.support.kafka import committed_offsets, produce, with_id

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]


@pytest.fixture
def scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path):
    return Scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path)


def test_sigkill_storm_loses_nothing_and_reruns_only_the_crash_window(scenario):
    # Each completion written at once: the crash window is the message in hand. (By
    # default completions wait up to 5 ms for company, and a kill re-runs what was
    # handled in those 5 ms too.)
    scenario.extra["WORKER_DEDUP__COMPLETE_LINGER_MS"] = "0"
    rng = random.Random(11)
    kills = 0
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=1000, rounds=20, interval=1.0)
        while kills < 10 or traffic.flowing():
            time.sleep(rng.uniform(1.5, 2.5))
            slot = rng.randrange(3)
            assert replicas.end(slot, signal.SIGKILL) == -signal.SIGKILL
            replicas.start(slot)
            kills += 1
        traffic.join()
        wait_until(scenario.finished, 240, "every id to run and be committed")
        codes = replicas.end_all()
    lost, twice, dead = scenario.account("SIGKILL storm, 3 replicas", 20_000, f"{kills} SIGKILL")
    assert codes == [0, 0, 0]
    assert lost == 0 and dead == 0
    assert twice <= kills  # at most the message in hand when a replica died
    distinct, repeated = scenario.outputs()
    assert distinct == {f"{id}:0" for id in scenario.published()}  # downstream dedup sees one
    assert repeated <= kills


def test_sigterm_under_load_exits_cleanly_and_reruns_nothing(scenario):
    with scenario.replicas(2) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=1000, rounds=8, interval=0.5)
        codes = []
        for slot in (0, 1, 0):
            time.sleep(1)
            codes.append(replicas.end(slot, signal.SIGTERM))
            replicas.start(slot)
            replicas.settle(PARTITIONS)
        traffic.join()
        wait_until(scenario.finished, 180, "every id to run and be committed")
        codes += replicas.end_all()
    lost, twice, dead = scenario.account("SIGTERM under load, 2 replicas", 8_000, "3 SIGTERM")
    assert codes == [0] * 5
    assert (lost, twice, dead) == (0, 0, 0)
    assert scenario.outputs()[1] == 0


@pytest.fixture
def own_redis(tmp_path, scenario):
    """A redis-server of the scenario's own, persisted to an append-only file fsynced at
    every write, so that it can be killed and restarted without losing a record."""
    with embedded.redis(tmp_path, appendonly=True) as server:
        scenario.redis_url = f"redis://127.0.0.1:{server.port}/0"
        yield server


def hold_still(scenario, replicas, seconds):
    """Assert that every replica reports not ready within 3 s of the fault (the batch in
    hand, then one client timeout), and that from then until a second before the fault
    ends, no handler starts, no offset is committed and no replica is ready or dies."""
    started = time.monotonic()

    def ready():
        return any(probe(port, "/readyz") for port in replicas.ports)

    wait_until(lambda: not ready(), 3, "every replica to report not ready")
    ran = sum(scenario.ledger.runs().values())
    committed = committed_offsets(scenario.bootstrap, scenario.group, scenario.input)
    for _ in during(seconds - 1 - (time.monotonic() - started)):
        assert sum(scenario.ledger.runs().values()) == ran, "a handler ran without Redis"
        assert not ready()
        assert replicas.running() == [0, 1], "a replica died instead of holding still"
        assert committed_offsets(scenario.bootstrap, scenario.group, scenario.input) == committed


def fault_under_traffic(scenario, inject, seconds, name, faults):
    with scenario.replicas(2) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=250, rounds=16, interval=0.5)
        wait_until(lambda: len(scenario.ledger.runs()) > 500, 60, "the first runs")
        with inject():
            hold_still(scenario, replicas, seconds)
        traffic.join()
        wait_until(scenario.finished, 120, "every id to run and be committed")
        errors = replicas.metric("idempotent_worker_dedup_store_errors_total")
        codes = replicas.end_all()
    lost, twice, dead = scenario.account(name, 4_000, faults)
    assert codes == [0, 0]
    assert (lost, twice, dead) == (0, 0, 0)
    assert errors > 0  # the outage was seen, and counted
    assert scenario.outputs()[1] == 0


def test_redis_killed_then_restarted_holds_still_and_resumes(scenario, own_redis):
    scenario.extra["WORKER_DEDUP__LEASE_SECONDS"] = "30"  # longer than the outage

    class Killed:
        def __enter__(self):
            own_redis.process.kill()
            own_redis.process.wait()

        def __exit__(self, *exc_info):
            own_redis.start()

    name = "redis-server killed, restarted with AOF"
    fault_under_traffic(scenario, Killed, 10, name, "SIGKILL, down 10 s")


@pytest.mark.parametrize(("how", "lanes"), [("SIGSTOP", 1), ("CLIENT PAUSE", 1), ("SIGSTOP", 16)])
def test_redis_paused_past_the_client_timeout_holds_still(scenario, own_redis, how, lanes):
    scenario.extra["WORKER_DEDUP__LEASE_SECONDS"] = "30"
    scenario.route["max_in_flight"] = lanes
    seconds = 5

    class Paused:
        def __enter__(self):
            if how == "SIGSTOP":
                own_redis.process.send_signal(signal.SIGSTOP)
            else:
                with redis.Redis(port=own_redis.port) as client:
                    client.execute_command("CLIENT", "PAUSE", seconds * 1000, "ALL")

        def __exit__(self, *exc_info):
            if how == "SIGSTOP":
                own_redis.process.send_signal(signal.SIGCONT)

    name = f"Redis paused ({how}), client timeout 0.5 s"
    if lanes > 1:
        name += f", max_in_flight {lanes}"
    fault_under_traffic(scenario, Paused, seconds, name, f"{how} {seconds} s")


def test_flushall_is_survived_and_counted(scenario, own_redis):
    # Without the local cache of completed ids, which would hide part of the damage.
    scenario.extra["WORKER_DEDUP__LOCAL_CACHE_SIZE"] = "0"
    with scenario.replicas(2) as replicas:
        replicas.start_all(PARTITIONS)
        ids = [f"f-{n}" for n in range(300)]
        produce(scenario.bootstrap, scenario.input, (with_id(i, n % 6) for n, i in enumerate(ids)))
        wait_until(scenario.finished, 60, "the first pass")
        with redis.Redis(port=own_redis.port) as client:
            client.flushall()
        # A replay of the same records: with the completed records gone they run again.
        produce(scenario.bootstrap, scenario.input, (with_id(i, n % 6) for n, i in enumerate(ids)))
        wait_until(lambda: scenario.lag() == 0, 60, "the replay")
        wait_until(
            lambda: replicas.metric("idempotent_worker_dedup_store_resets_total") == 2,
            30,
            "both replicas to notice the reset",
        )
        codes = replicas.end_all()
    lost, twice, dead = scenario.account("FLUSHALL, then a replay", 600, "1 FLUSHALL")
    assert codes == [0, 0]
    assert lost == 0 and dead == 0
    assert twice == 300  # let through, as the reset metric and the log warn
    assert replicas.logs().count("the dedup store lost its records") == 2


@pytest.mark.parametrize("strategy", ["range", "cooperative-sticky"])
def test_rebalance_storm_loses_nothing_and_runs_nothing_twice(scenario, strategy):
    consumer = {**FAST_CONSUMER, "partition.assignment.strategy": strategy}
    scenario.extra["WORKER_KAFKA__CONSUMER"] = json.dumps(consumer)
    rng = random.Random(5)
    changes = 0
    with scenario.replicas(4) as replicas:
        replicas.start(0)
        traffic = scenario.traffic(batch=200, rounds=60, interval=1.0)
        codes = []
        while traffic.flowing():
            replicas.settle(PARTITIONS)
            time.sleep(rng.uniform(0.5, 2.0))
            slot = rng.randrange(4)
            if slot not in replicas.running():
                replicas.start(slot)
            elif len(replicas.running()) > 1:
                codes.append(replicas.end(slot))
            changes += 1
        wait_until(scenario.finished, 180, "every id to run and be committed")
        codes += replicas.end_all()
    name = f"rebalance storm, 1 to 4 replicas, {strategy}"
    lost, twice, dead = scenario.account(name, 12_000, f"{changes} starts/stops in 60 s")
    assert set(codes) == {0}
    assert (lost, twice, dead) == (0, 0, 0)
    assert scenario.outputs()[1] == 0


def test_static_members_restart_without_a_rebalance(scenario):
    """With ``group.instance.id`` a replica that restarts within the session timeout gets
    its partitions back and the others never notice: no rebalance."""
    env_for = scenario.env_for

    def static_env(port):
        # A session long enough for a restart on a loaded machine (10 s was passed once
        # under make test): a static member is only kept within it.
        consumer = {**FAST_CONSUMER, "session.timeout.ms": 30000, "group.instance.id": f"w-{port}"}
        return {**env_for(port), "WORKER_KAFKA__CONSUMER": json.dumps(consumer)}

    scenario.env_for = static_env
    with scenario.replicas(2) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=300, rounds=10, interval=0.5)

        def rebalances_seen_by_the_other():
            return metric_sum([scrape(replicas.ports[1])], "idempotent_worker_rebalances_total")

        before = rebalances_seen_by_the_other()
        time.sleep(1)
        codes = [replicas.end(0)]
        replicas.start(0)
        traffic.join()
        wait_until(scenario.finished, 120, "every id to run and be committed")
        rebalances = rebalances_seen_by_the_other() - before
        assigned = [metric_sum([scrape(port)], "idempotent_worker_assigned_partitions")
                    for port in replicas.ports]  # fmt: skip
        codes += replicas.end_all()
    faults = "1 SIGTERM + restart"
    lost, twice, dead = scenario.account("static membership restart", 3_000, faults)
    assert codes == [0, 0, 0]
    assert (lost, twice, dead) == (0, 0, 0)
    assert rebalances == 0
    assert assigned == [3, 3]


def test_duplicate_storm_runs_the_handler_once(scenario):
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        produce(scenario.bootstrap, scenario.input, (with_id("hot", n % 6) for n in range(1000)))
        wait_until(lambda: scenario.lag() == 0, 60, "the storm to be consumed")
        skipped = replicas.metric("idempotent_worker_duplicates_skipped_total")
        codes = replicas.end_all()
    assert scenario.account("duplicate storm, 1 id x 1000", 1000, "-") == (0, 0, 0)
    assert codes == [0, 0, 0]
    assert scenario.ledger.runs() == {"hot": 1}
    assert skipped == 999
    assert scenario.outputs() == ({"hot:0"}, 0)


def test_a_zombie_replica_cannot_complete_or_publish(scenario):
    scenario.handler = "slow_then_emit"
    scenario.extra["WORKER_DEDUP__LEASE_SECONDS"] = "2"
    with scenario.replicas(2) as replicas:
        replicas.start(0)
        replicas.settle(PARTITIONS)
        produce(scenario.bootstrap, scenario.input, [with_id("z", value=b"4")])
        store = RedisDedupStore.from_url(scenario.redis_url, f"idempotent-worker:{scenario.group}")
        try:
            wait_until(lambda: store.state("z") is State.IN_PROGRESS, 30, "the handler to start")
            replicas.send(0, signal.SIGSTOP)  # the zombie: frozen mid-handler
            replicas.start(1)  # its successor takes the partition, then the id
            wait_until(lambda: store.state("z") is State.COMPLETED, 60, "the successor's run")
        finally:
            store.close()
        replicas.send(0, signal.SIGCONT)
        wait_until(
            lambda: replicas.metric("idempotent_worker_lease_lost_total") == 1,
            30,
            "the zombie's completion to be refused",
        )
        wait_until(lambda: scenario.lag() == 0, 60, "the group to commit")
        codes = replicas.end_all()
    lost, _, dead = scenario.account("zombie (SIGSTOP past the lease)", 1, "SIGSTOP+SIGCONT")
    assert codes == [0, 0]
    # The handler itself ran twice (the zombie's run cannot be stopped), but only the
    # successor's run published its output and completed the id.
    assert scenario.ledger.runs() == {"z": 2}
    assert scenario.outputs() == ({"z:0"}, 0)
    assert (lost, dead) == (0, 0)
