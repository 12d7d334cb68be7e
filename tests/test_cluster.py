"""The dedup store on a Redis Cluster of real ``redis-server`` processes (3 primaries, each
with a replica), under the two events that make clusters hard: a primary dying while
messages flow, and slots moving between primaries while messages flow."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest
from redis.crc import key_slot

from idempotent_worker.dedup.base import ClaimStatus, Completion
from idempotent_worker.dedup.cluster import RedisClusterDedupStore, bucket_tags
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.local import topologies
from idempotent_worker.local.demo import read_all
from tests.support.chaos import PARTITIONS, Scenario, wait_until
from tests.support.kafka import Record, produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.chaos]


@pytest.fixture
def cluster(tmp_path):
    with topologies.RedisCluster(tmp_path / "cluster") as cluster:
        yield cluster


@pytest.fixture
def scenario(kafka_bootstrap, cluster, unique_name, make_topics, ledger, tmp_path):
    scenario = Scenario(kafka_bootstrap, cluster.url, unique_name, make_topics, ledger, tmp_path)
    scenario.extra["WORKER_REDIS__CLUSTER"] = "true"
    # Every duplicate is answered by the cluster, not by a replica's memory of what it
    # completed itself: what the cluster forgets would show.
    scenario.extra["WORKER_DEDUP__LOCAL_CACHE_SIZE"] = "0"
    return scenario


def replay(scenario, ids):
    """Publish the input's records of ``ids`` again, same bytes, spread over the partitions."""
    records = [
        Record(value=value, key=headers["message-id"], headers=headers, partition=n % PARTITIONS)
        for n, (headers, value) in enumerate(read_all(scenario.bootstrap, scenario.input))
        if headers.get("message-id", b"").decode() in ids
    ]
    return produce(scenario.bootstrap, scenario.input, records)


def skipped_so_far(replicas):
    """Duplicates skipped over the replicas; a scrape of a replica busy catching up after
    the failover may be reset, so it is asked again."""
    for _ in range(10):
        try:
            return replicas.metric("idempotent_worker_duplicates_skipped_total")
        except OSError:
            time.sleep(0.5)
    return replicas.metric("idempotent_worker_duplicates_skipped_total")


def test_a_primary_killed_mid_flow_fails_over_without_losing_or_rerunning(scenario, cluster):
    """With redis.min_replicas = 1 no claim or completion counts before a replica has it,
    so the promoted replica forgets nothing the worker relied on. (With 0, what the primary
    acknowledged in its last moment before replicating it is forgotten, and a duplicate of
    such an id runs again: 0, 28 and 68 ids in three runs of this scenario here.) The
    promoted replica has no replica of its own until the dead primary comes back as one:
    meanwhile the worker holds on the writes to its slots."""
    scenario.extra["WORKER_REDIS__MIN_REPLICAS"] = "1"
    scenario.extra["WORKER_REDIS__REPLICA_TIMEOUT_MS"] = "200"  # under the 0.5 s client timeout
    # The slots' writes hold from the kill until the node is back as a replica: longer
    # than the scenarios' 3 s lease, and a claim outlived by an outage can be taken over
    # (the README's limit). Like the Redis-kill scenario, a lease longer than the outage.
    scenario.extra["WORKER_DEDUP__LEASE_SECONDS"] = "30"
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=500, rounds=20, interval=0.5)
        wait_until(lambda: len(scenario.ledger.runs()) > 2000, 60, "the first runs")
        victim = cluster.primaries()[0]
        victim.process.kill()
        victim.process.wait()
        ran_before = set(scenario.ledger.runs())
        cluster.wait_healthy()  # its replica promoted
        victim.start()  # back as the new primary's replica
        cluster.wait_healthy()
        skipped_at_promotion = skipped_so_far(replicas)
        traffic.join()
        wait_until(scenario.finished, 180, "every id to run and be committed")
        skipped = replicas.metric("idempotent_worker_duplicates_skipped_total")
        # What ran before the kill, published again: every id skipped, including those
        # whose records the dead primary held (the promoted replica has them).
        replayed = replay(scenario, ran_before)
        wait_until(lambda: scenario.lag() == 0, 60, "the replay to be consumed")
        skipped_replay = replicas.metric("idempotent_worker_duplicates_skipped_total") - skipped
        codes = replicas.end_all()
    lost, twice, dead = scenario.account(
        "Redis Cluster primary SIGKILLed, replica promoted, min_replicas 1",
        10_000,
        "1 SIGKILL of 3 primaries",
    )
    assert codes == [0, 0, 0]
    assert (lost, twice, dead) == (0, 0, 0)
    assert skipped > skipped_at_promotion  # duplicates still skipped after the promotion
    assert skipped_replay >= replayed - twice


def test_slots_moved_mid_flow_lose_nothing_and_rerun_nothing(scenario, cluster):
    source, target = cluster.primaries()[:2]
    source_id = cluster.command(source, "CLUSTER", "MYID").strip()
    target_id = cluster.command(target, "CLUSTER", "MYID").strip()
    with scenario.replicas(3) as replicas:
        replicas.start_all(PARTITIONS)
        traffic = scenario.traffic(batch=500, rounds=20, interval=0.5)
        wait_until(lambda: len(scenario.ledger.runs()) > 2000, 60, "the first runs")
        owned_before = cluster.slots(source)
        reshard = [
            "redis-cli", "--cluster", "reshard", f"127.0.0.1:{source.port}",
            "--cluster-from", source_id, "--cluster-to", target_id,
            "--cluster-slots", "2100", "--cluster-yes",
        ]  # fmt: skip
        ran_before = sum(scenario.ledger.runs().values())
        result = subprocess.run(reshard, capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr
        ran_during = sum(scenario.ledger.runs().values()) - ran_before
        traffic.join()
        wait_until(scenario.finished, 180, "every id to run and be committed")
        codes = replicas.end_all()
    lost, twice, dead = scenario.account(
        "Redis Cluster reshard, 2100 of 16384 slots", 10_000, "1 reshard"
    )
    # The slots moved while messages flowed (how many ran meanwhile depends on how fast the
    # reshard went on a shared machine: 779 to several thousand were seen).
    assert ran_during > 200
    moved = owned_before - cluster.slots(source)
    assert len(moved) == 2100
    # 2100 contiguous slots hold at least one bucket's (one per 1024): records moved
    assert moved & {key_slot(tag.encode()) for tag in bucket_tags()}
    assert codes == [0, 0, 0]
    assert (lost, twice, dead) == (0, 0, 0)
    assert scenario.outputs()[1] == 0


def test_a_worker_started_while_the_cluster_is_down_holds_then_starts(
    kafka_bootstrap, tmp_path, unique_name, make_topics, ledger
):
    """The cluster's layout is asked for at first use, so a worker started before the
    cluster answers holds (not ready) and starts by itself once it does."""
    cluster = topologies.RedisCluster(tmp_path / "cluster")
    scenario = Scenario(kafka_bootstrap, cluster.url, unique_name, make_topics, ledger, tmp_path)
    scenario.extra["WORKER_REDIS__CLUSTER"] = "true"
    with scenario.replicas(1) as replicas:
        replicas.start(0)

        def outage_seen():
            try:
                return replicas.metric("idempotent_worker_dedup_store_errors_total") > 0
            except OSError:  # its HTTP server not up yet
                return False

        try:
            wait_until(outage_seen, 30, "the worker to meet the outage")
            assert replicas.running() == [0]
            cluster.start()
            replicas.settle(PARTITIONS)
            produce(scenario.bootstrap, scenario.input, [Record(headers={"message-id": "x"})])
            wait_until(lambda: scenario.ledger.runs() == {"x": 1}, 30, "the message to run")
            assert replicas.end(0, signal.SIGTERM) == 0
        finally:
            cluster.stop()


def script_calls(cluster, node):
    """EVALSHA calls ``node`` ran, and those that failed or were refused."""
    stats = cluster.command(node, "INFO", "commandstats")
    line = next((ln for ln in stats.splitlines() if ln.startswith("cmdstat_evalsha:")), None)
    if line is None:
        return 0, 0
    fields = dict(pair.split("=") for pair in line.strip().partition(":")[2].split(","))
    return int(fields.get("calls", 0)), int(fields.get("failed_calls", 0)) + int(
        fields.get("rejected_calls", 0)
    )


def test_a_batch_costs_one_script_call_per_primary(cluster):
    """A batch's ids are spread over 16 buckets, five or six per primary: their claims
    (and then their completions) are one grouped script call per primary, not one per
    bucket."""
    store = RedisClusterDedupStore.from_url(cluster.url, "grouped")
    warm = [f"warm-{n}" for n in range(300)]  # the scripts loaded on every primary
    store.claim(warm, "t", 30)
    store.complete([Completion(id, "t", "t/0/0") for id in warm], 600)
    ids = [f"id-{n}" for n in range(300)]
    assert {c.status for c in store.claim(ids[:1], "t0", 30)} == {ClaimStatus.CLAIMED}
    primaries = cluster.primaries()
    before = [script_calls(cluster, node) for node in primaries]
    try:
        claims = store.claim(ids, "t1", 30)
        done = store.complete([Completion(id, "t1", f"t/0/{n}") for n, id in enumerate(ids)], 600)
    finally:
        store.close()
    assert [c.status for c in claims] == [ClaimStatus.BUSY] + [ClaimStatus.CLAIMED] * 299
    assert done == [False] + [True] * 299  # the first is t0's
    after = [script_calls(cluster, node) for node in primaries]
    assert [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before, strict=True)] == [
        (2, 0)
    ] * len(primaries)


@pytest.mark.parametrize("moved", ["window", "index"])
@pytest.mark.parametrize("others", [0, 40])
def test_a_bucket_half_moved_fails_the_call_instead_of_misreading(cluster, moved, others):
    """Mid-reshard, a bucket's window can sit on one node and its index (the key the
    scripts declare) on the other, either way round: the call is refused (TRYAGAIN, or
    Redis's "non local key") rather than take the window's ids for absent ones, and the
    worker holds as for any store failure until the whole slot has moved. With ``others``
    ids of other buckets, the primary's buckets go in one grouped call, refused as a
    whole and sent again bucket by bucket."""
    store = RedisClusterDedupStore.from_url(cluster.url, f"moving-{moved}", timeout=0.5)
    store.claim(["x"], "t1", 30)
    assert store.complete([Completion("x", "t1", "t/0/1")], 600) == [True]
    bucket = store._bucket("x")
    slot = store._slots[bucket]
    owner = next(p for p in cluster.primaries() if slot in cluster.slots(p))
    other = next(p for p in cluster.primaries() if p is not owner)
    windows = cluster.command(owner, "KEYS", f"{store._bases[bucket]}/*").split()
    [window] = [w for w in windows if cluster.command(owner, "HEXISTS", w, "x").strip() == "1"]
    key = window if moved == "window" else f"{store._bases[bucket]}#windows"
    owner_id = cluster.command(owner, "CLUSTER", "MYID").strip()
    other_id = cluster.command(other, "CLUSTER", "MYID").strip()
    cluster.command(other, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", owner_id)
    cluster.command(owner, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", other_id)
    cluster.command(owner, "MIGRATE", "127.0.0.1", str(other.port), key, "0", "5000")
    try:
        with pytest.raises(StoreUnavailable, match=r"non local key|TRYAGAIN|TryAgain|Ask"):
            store.claim(["x", *(f"other-{n}" for n in range(others))], "t2", 30)
    finally:
        store.close()
