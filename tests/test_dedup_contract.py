"""One contract, every dedup store: the in-memory one, Redis (a real server) and a real
Redis Cluster (three primaries, each with a replica)."""

import signal
import time

import pytest
import redis
from redis.crc import key_slot

from idempotent_worker.dedup import ClaimStatus, State, lua
from idempotent_worker.dedup.base import FIRST_CLAIM, Completion
from idempotent_worker.dedup.cluster import BUCKETS, RedisClusterDedupStore, bucket_tags
from idempotent_worker.dedup.lua import grouped, pack
from idempotent_worker.dedup.memory import MemoryDedupStore
from idempotent_worker.dedup.redis import Durability, RedisDedupStore
from idempotent_worker.dedup.scripts import CLAIM
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.local import embedded
from tests.support import stores
from tests.support.harness import complete
from tests.support.stores import prefix_keys, sentinel_store

LEASE = stores.LEASE


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_and_flush(request):
    """(store, flush): flush() empties the store as FLUSHALL would."""
    if request.param == "memory":
        store = MemoryDedupStore()
        yield store, store.flush
    else:
        store, client, prefix = request.getfixturevalue(f"{request.param}_store")

        def flush():  # only this test's keys: the server is shared with other tests
            for key in prefix_keys(client, prefix):
                client.delete(key)

        yield store, flush


def statuses(claims):
    return [claim.status for claim in claims]


def test_claim_absent_then_busy_for_others(store):
    assert statuses(store.claim(["a"], "t1", LEASE)) == [ClaimStatus.CLAIMED]
    assert statuses(store.claim(["a"], "t2", LEASE)) == [ClaimStatus.BUSY]
    assert store.state("a") is State.IN_PROGRESS


def test_claim_again_with_same_token_refreshes(store_and_wait):
    store, wait = store_and_wait
    store.claim(["a"], "t1", LEASE)
    wait(LEASE * 0.6)
    assert statuses(store.claim(["a"], "t1", LEASE)) == [ClaimStatus.CLAIMED]
    wait(LEASE * 0.6)
    assert store.state("a") is State.IN_PROGRESS  # alive thanks to the refresh


def test_a_first_claim_repeated_under_its_token_counts_one_run(store):
    """A claim whose reply was lost (a timeout after Redis applied it) is sent again
    under the same token: it is the same first run, not a second one."""
    assert [c.attempt for c in store.claim(["a"], "t1", LEASE)] == [1]
    assert [c.attempt for c in store.claim(["a"], "t1", LEASE)] == [1]
    store.release(["a"], "t1")  # the run failed
    assert [c.attempt for c in store.claim(["a"], "t2", LEASE)] == [0]  # earlier runs: begin
    assert store.begin("a", "t2") == 2


def test_batch_claim_reports_each_id_in_order(store):
    store.claim(["busy"], "other", LEASE)
    store.claim(["done"], "other", LEASE)
    assert complete(store, "done", "other", 60, "t/0/5")
    claims = store.claim(["new", "busy", "done"], "me", LEASE)
    assert statuses(claims) == [ClaimStatus.CLAIMED, ClaimStatus.BUSY, ClaimStatus.COMPLETED]
    assert claims[2].origin == "t/0/5"


def test_complete_only_by_owner_and_repeatable(store):
    store.claim(["a"], "t1", LEASE)
    assert not complete(store, "a", "t2", 60, "t/0/1")
    assert store.state("a") is State.IN_PROGRESS
    assert complete(store, "a", "t1", 60, "t/0/1")
    assert complete(store, "a", "t1", 60, "t/0/1")  # an ambiguous first attempt may be repeated
    assert not complete(store, "a", "t2", 60, "t/0/1")
    assert store.state("a") is State.COMPLETED


def test_completed_id_is_a_duplicate_for_everyone(store):
    store.claim(["a"], "t1", LEASE)
    complete(store, "a", "t1", 60, "t/2/9")
    for token in ("t1", "t2"):
        [claim] = store.claim(["a"], token, LEASE)
        assert claim.status is ClaimStatus.COMPLETED
        assert claim.origin == "t/2/9"


def test_release_only_by_owner(store):
    store.claim(["a", "b"], "t1", LEASE)
    store.claim(["c"], "t2", LEASE)
    assert store.release(["a", "b", "c", "absent"], "t2") == 1
    assert store.state("a") is State.IN_PROGRESS
    assert store.release(["a", "b", "c"], "t1") == 2
    assert [store.state(id) for id in "abc"] == [State.ABSENT] * 3
    assert store.release(["a"], "t1") == 0
    assert store.release([], "t1") == 0
    assert statuses(store.claim(["a"], "t2", LEASE)) == [ClaimStatus.CLAIMED]


def test_completed_record_cannot_be_released(store):
    store.claim(["a"], "t1", LEASE)
    complete(store, "a", "t1", 60, "t/0/1")
    assert store.release(["a"], "t1") == 0
    assert store.state("a") is State.COMPLETED


def test_expired_lease_lets_another_claim_and_fences_the_first(store_and_wait):
    store, wait = store_and_wait
    store.claim(["a"], "t1", LEASE)
    wait(LEASE * 1.5)
    assert store.state("a") is State.ABSENT
    assert statuses(store.claim(["a"], "t2", LEASE)) == [ClaimStatus.CLAIMED]
    assert not complete(store, "a", "t1", 60, "t/0/1")
    assert store.release(["a"], "t1") == 0
    assert complete(store, "a", "t2", 60, "t/0/1")
    assert not complete(store, "a", "t1", 60, "t/0/1")  # completed by another: still refused


def test_expired_lease_nobody_took_over_still_completes(store_and_wait):
    store, wait = store_and_wait
    store.claim(["a"], "t1", LEASE)
    wait(LEASE * 1.5)
    assert complete(store, "a", "t1", 60, "t/0/1")
    assert store.state("a") is State.COMPLETED


def test_completed_record_expires_after_ttl(store_and_wait):
    store, wait = store_and_wait
    store.claim(["a"], "t1", LEASE)
    assert complete(store, "a", "t1", 1, "t/0/1")
    assert store.state("a") is State.COMPLETED
    wait(1.3)
    assert store.state("a") is State.ABSENT


def test_empty_batch(store):
    assert store.claim([], "t1", LEASE) == []


@pytest.mark.parametrize("store_class", [RedisDedupStore, RedisClusterDedupStore])
def test_redis_store_wraps_connection_errors(store_class):
    store = store_class.from_url("redis://127.0.0.1:1/0", "x", timeout=0.5)
    with pytest.raises(StoreUnavailable, match="redis"):
        store.claim(["a"], "t1", LEASE)
    with pytest.raises(StoreUnavailable):
        store.ping()


def test_a_stopped_redis_fails_after_one_client_timeout(tmp_path):
    """No retries hidden in the client: the guard must learn of an outage at once."""
    with embedded.redis(tmp_path) as server:
        store = RedisDedupStore.from_url(f"redis://127.0.0.1:{server.port}/0", "x", timeout=0.3)
        store.ping()
        server.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="Timeout"):
                store.claim(["a"], "t1", LEASE)
            assert time.monotonic() - started < 1.0  # redis-py's default: 10 retries
        finally:
            server.process.send_signal(signal.SIGCONT)


def test_a_first_claim_counts_the_first_run(store):
    assert store.claim(["a"], "t1", LEASE)[0].attempt == 1  # no begin needed
    assert store.begin("a", "t2") == 0  # not its claim: nothing to count
    store.release(["a"], "t1")  # a failed run: the count stays
    [claim] = store.claim(["a"], "t2", LEASE)
    assert (claim.status, claim.attempt) == (ClaimStatus.CLAIMED, 0)  # runs were counted
    assert store.begin("a", "t2") == 2
    store.release(["a"], "t2", "clear")  # given up: forgotten
    assert store.claim(["a"], "t3", LEASE)[0].attempt == 1


def test_a_begin_sent_again_counts_its_run_once(store):
    # A begin whose reply was lost (a timeout after Redis applied it) is sent again by
    # the store guard: the same run, not a second one for the crash-loop count.
    store.claim(["a"], "t1", LEASE)
    store.release(["a"], "t1")
    store.claim(["a"], "t2", LEASE)
    assert store.begin("a", "t2") == store.begin("a", "t2") == 2
    assert store.renew(["a"], "t2", LEASE) == [True]
    assert store.begin("a", "t2") == 2  # a renewal keeps the mark
    store.release(["a"], "t2")
    store.claim(["a"], "t3", LEASE)
    assert store.begin("a", "t3") == 3  # a new claim's run counts


def test_an_unstarted_claim_released_with_clear_leaves_no_count(store):
    store.claim(["a", "b"], "t1", LEASE)
    store.release(["a", "b"], "t1", "clear")  # e.g. revoked before they ran
    assert [c.attempt for c in store.claim(["a", "b"], "t2", LEASE)] == [1, 1]


def test_a_claim_nobody_holds_any_more_is_completed_by_whoever_did_the_work(
    store_and_wait,
):
    store, wait = store_and_wait
    store.claim(["a", "b"], "t1", LEASE)
    wait(LEASE + 0.2)
    store.claim(["a"], "t2", LEASE)  # took over a, then died too
    store.release(["b"], "t1")
    wait(LEASE + 0.2)
    assert store.complete([Completion("a", "t1", "t/0/1"), Completion("b", "t3", "t/0/2")], 60) == [
        True,
        True,
    ]
    assert store.state("a") is State.COMPLETED


def test_clear_never_forgets_the_runs_of_another_claim(store):
    store.claim(["a"], "t1", LEASE)
    store.release(["a"], "t1")  # run 1 failed
    store.claim(["a"], "t2", LEASE)
    assert store.begin("a", "t2") == 2
    assert store.release(["a"], "t1", "clear") == 0  # late, from the first owner
    store.release(["a"], "t2")
    store.claim(["a"], "t3", LEASE)
    assert store.begin("a", "t3") == 3


def test_clear_never_forgets_the_runs_of_another_owners_expired_claim(store_and_wait):
    store, wait = store_and_wait
    store.claim(["a"], "t1", LEASE)
    store.release(["a"], "t1")  # run 1 failed
    store.claim(["a"], "t2", LEASE)
    assert store.begin("a", "t2") == 2  # then its replica died: the claim expires
    wait(LEASE + 0.2)
    assert store.release(["a"], "t1", "clear") == 0  # late, from the first owner
    store.claim(["a"], "t3", LEASE)
    assert store.begin("a", "t3") == 3  # the crash loop's count goes on


def test_redis_keeps_records_as_fields_of_a_few_windows(redis_store):
    store, client, prefix = redis_store
    store.claim(["a", "b", "c"], "t1", LEASE)
    store.release(["b"], "t1")
    assert complete(store, "c", "t1", 60, "t/0/3")  # another TTL than the store's: moved
    windows = [name.decode() for name in client.zrange(f"{prefix}#windows", 0, -1)]
    assert len(windows) == 2 and all(name.startswith(f"{prefix}/") for name in windows)
    fields = {field.decode() for name in windows for field in client.hkeys(name)}
    assert fields == {"a", "b", "c", "\x1f"}  # and each window's sentinel
    assert sorted(k.decode() for k in client.keys(f"{prefix}*")) == sorted(
        [f"{prefix}#windows", f"{prefix}#topics", *windows]
    )
    # the completion's window expires between one and 1.25 TTLs from now
    [completed_in] = [name for name in windows if client.hexists(name, "c")]
    assert 59_000 <= client.pttl(completed_in) <= 75_000


def test_redis_epoch_check_drops_expired_windows_from_the_index(redis_store):
    store, client, prefix = redis_store
    store.epoch("e")
    store.claim(["a"], "t1", LEASE)
    assert complete(store, "a", "t1", 1, "t/0/1")  # a window of its own, 1.25 s
    assert client.zcard(f"{prefix}#windows") == 3  # the claim's window, that one, layout
    time.sleep(1.4)
    store.epoch("e")
    assert client.zcard(f"{prefix}#windows") == 2
    assert store.state("a") is State.ABSENT


def test_redis_window_lost_on_one_redis_is_a_store_reset_not_a_stall(redis_store):
    """On one Redis a listed window cannot be migrating: if it is gone (evicted, or
    deleted by hand) its records are lost. The store goes on, and the epoch changes so
    that every replica counts and logs a reset."""
    store, client, prefix = redis_store
    before = store.epoch("e1")
    store.claim(["a"], "t1", LEASE)
    assert complete(store, "a", "t1", 60, "t/0/1")
    for name in client.zrange(f"{prefix}#windows", 0, -1):
        if not name.startswith(b"layout:"):
            client.delete(name)
    [claim] = store.claim(["a"], "t2", LEASE)  # not TRYAGAIN until the window's expiry
    assert claim.status is ClaimStatus.CLAIMED  # its record went with the window
    assert store.epoch("e2") != before


def test_redis_completed_record_fits_32_bytes(redis_store, redis_url):
    store, client, prefix = redis_store
    store.claim(["order-000000000001"], "host-1-abcdef01:7", LEASE)
    fingerprint = "9f86d081884c7d65"
    done = Completion("order-000000000001", "host-1-abcdef01:7", "orders/3/12345678", fingerprint)
    assert store.complete([done], 60) == [True]
    [window] = [n for n in client.keys(f"{prefix}/*") if client.hexists(n, "order-000000000001")]
    assert len(client.hget(window, "order-000000000001")) <= 28  # sds header + NUL: 32 B
    another = RedisDedupStore.from_url(redis_url, prefix)  # learns the topic names from Redis
    [claim] = another.claim(["order-000000000001"], "t2", LEASE)
    another.close()
    assert (claim.status, claim.origin, claim.fingerprint) == (
        ClaimStatus.COMPLETED,
        "orders/3/12345678",
        fingerprint,
    )
    assert store.complete([done], 60) == [True]  # repeated: the same record
    other = Completion("order-000000000001", "host-2-abcdef02:1", "orders/3/12345678", fingerprint)
    assert store.complete([other], 60) == [False]


def test_redis_honours_records_of_the_previous_layout_during_an_upgrade(redis_store):
    """A store the previous version ran on: one key per id, ``c|<token>|<origin>|<fp>``
    once completed, ``p|<token>|<lease end>|<runs>`` while in progress."""
    store, client, prefix = redis_store
    client.set(f"{prefix}#epoch", "old")
    client.set(f"{prefix}:done", "c|old:1|t/0/1|f1", ex=3600)
    far = int(time.time() * 1000) + 60_000
    client.set(f"{prefix}:held", f"p|old:2|{far}|1", ex=3600)
    client.set(f"{prefix}:crashed", "p|old:3|1|2", ex=3600)  # its lease ended long ago
    assert store.epoch("new") == "old"  # the old records are read from now on
    done, held, crashed = store.claim(["done", "held", "crashed"], "t1", LEASE)
    assert (done.status, done.origin, done.fingerprint) == (ClaimStatus.COMPLETED, "t/0/1", "f1")
    assert held.status is ClaimStatus.BUSY
    assert (crashed.status, crashed.attempt) == (ClaimStatus.CLAIMED, 0)
    assert not client.exists(f"{prefix}:crashed")  # taken over into this layout
    assert store.begin("crashed", "t1") == 3
    assert store.state("done") is State.COMPLETED
    assert store.forget(["done"], force=False) == ["completed"]
    assert not client.exists(f"{prefix}:done")


def test_redis_reads_no_previous_layout_on_a_new_store(redis_store):
    store, client, prefix = redis_store
    store.epoch("new")  # no marker before: nothing of the previous layout can exist
    client.set(f"{prefix}:stray", "c|old:1|t/0/1|f1")
    assert store.claim(["stray"], "t1", LEASE)[0] == FIRST_CLAIM


def test_redis_treats_a_claim_of_the_previous_layout_as_busy(redis_store):
    """Records written by a version with a separate attempts key (``p|<token>`` with a
    millisecond expiry): a rolling upgrade waits for their lease like any other."""
    store, client, prefix = redis_store
    client.set(f"{prefix}:a", "p|old-token", px=int(LEASE * 1000))
    assert statuses(store.claim(["a"], "t1", LEASE)) == [ClaimStatus.BUSY]
    assert not complete(store, "a", "t1", 60, "t/0/1")
    time.sleep(LEASE + 0.1)
    assert store.claim(["a"], "t1", LEASE)[0] == FIRST_CLAIM


def test_runs_survive_an_expired_lease(store_and_wait):
    store, wait = store_and_wait
    store.claim(["a"], "crashed", LEASE)  # counts run 1; its worker dies mid-run
    wait(LEASE + 0.2)
    [claim] = store.claim(["a"], "next", LEASE)
    assert claim.attempt == 0
    assert store.begin("a", "next") == 2


def test_completion_forgets_runs_and_remembers_the_fingerprint(store):
    store.claim(["a"], "t1", LEASE)
    assert complete(store, "a", "t1", 60, "t/0/1", "f1")
    [claim] = store.claim(["a"], "t2", LEASE)
    assert (claim.status, claim.origin, claim.fingerprint) == (ClaimStatus.COMPLETED, "t/0/1", "f1")
    assert store.release(["a"], "t2", "clear") == 0


def test_renew_extends_only_the_callers_live_claims(store_and_wait):
    store, wait = store_and_wait
    store.claim(["mine", "released"], "t1", LEASE)
    store.claim(["theirs"], "t2", LEASE)
    store.release(["released"], "t1")
    for _ in range(3):  # three lease periods, renewed in between
        wait(LEASE / 2)
        assert store.renew(["mine", "theirs", "released", "absent"], "t1", LEASE) == [
            True,
            False,
            False,
            False,
        ]
    assert statuses(store.claim(["mine"], "t3", LEASE)) == [ClaimStatus.BUSY]
    assert store.state("released") is State.ABSENT  # a renewal never resurrects a claim


def test_epoch_is_set_once_and_changes_when_the_store_is_emptied(store_and_flush):
    store, flush = store_and_flush
    assert store.epoch("first") == "first"
    assert store.epoch("second") == "first"
    store.claim(["a"], "t1", 30)
    assert complete(store, "a", "t1", 60, "t/0/0")
    flush()
    assert store.state("a") is State.ABSENT
    assert store.epoch("third") == "third"


def test_one_complete_call_settles_each_id_on_its_own(store):
    store.claim(["a", "b"], "t1", LEASE)
    store.claim(["c"], "t2", LEASE)
    results = store.complete(
        [Completion("a", "t1", "t/0/1"), Completion("c", "t1", "t/0/2"), Completion("b", "t1", "")],
        60,
    )
    assert results == [True, False, True]  # c is t2's claim
    assert [store.state(id) for id in "abc"] == [
        State.COMPLETED,
        State.COMPLETED,
        State.IN_PROGRESS,
    ]


def test_cluster_buckets_spread_evenly_over_the_slots():
    tags = bucket_tags(BUCKETS)
    assert tags == bucket_tags(BUCKETS)  # the layout never changes under running replicas
    slots = [key_slot(tag.encode()) for tag in tags]
    assert [slot * BUCKETS // 16384 for slot in slots] == list(range(BUCKETS))


def test_cluster_spreads_ids_over_every_primary(cluster_store):
    store, client, prefix = cluster_store
    ids = [f"id-{n}" for n in range(3000)]
    assert {claim.status for claim in store.claim(ids, "t1", 30)} == {ClaimStatus.CLAIMED}
    per_primary = []
    for node in client.get_primaries():
        connection = node.redis_connection
        windows = [key for key in connection.keys(f"{prefix}:*") if b"#" not in key]
        per_primary.append(sum(connection.hlen(window) - 1 for window in windows))  # sentinel
    assert sum(per_primary) == 3000
    assert max(per_primary) <= 0.4 * 3000, per_primary
    # every window and index in a bucket's slot
    keys = client.keys(f"{prefix}:*", target_nodes=redis.RedisCluster.PRIMARIES)
    assert len(keys) == 2 * BUCKETS  # one window and its index per bucket
    assert {client.keyslot(key) for key in keys} == set(store._slots)


def test_cluster_reloads_scripts_a_node_forgot(cluster_store):
    """A promoted replica starts with an empty script cache (NOSCRIPT)."""
    store, client, _ = cluster_store
    assert store.claim(["a", "b", "c"], "t1", 30)[0].attempt == 1
    for node in client.get_nodes():
        node.redis_connection.script_flush()
    assert statuses(store.claim(["a", "b", "c", "d"], "t2", 30)) == [ClaimStatus.BUSY] * 3 + [
        ClaimStatus.CLAIMED
    ]


def test_a_grouped_call_reads_every_bucket_before_it_writes_any(redis_store):
    """The grouped form of a script (one call for several buckets of a primary) refuses
    with TRYAGAIN, having written nothing, when a later bucket lists a window that is
    not there (on its way to another node mid-reshard): an earlier bucket's claims are
    not left behind by a call that fails."""
    _, client, prefix = redis_store
    first, second = f"{prefix}:{{a}}", f"{prefix}:{{b}}"
    far = int(time.time() * 1000) + 600_000
    client.zadd(f"{second}#windows", {f"{second}/{far}": far})  # listed, not there
    call = client.register_script(grouped(CLAIM))
    buckets = [(first, pack(["x", "y"])), (second, pack(["z"]))]
    args: list = [len(buckets)]
    for base, ids in buckets:
        args += [1, 5, f"{base}#windows", base, "t1", 30_000, 600, ids]
    with pytest.raises(redis.exceptions.TryAgainError, match="windows of this slot are moving"):
        call(keys=[f"{first}#windows"], args=args)
    assert client.keys(f"{first}*") == []
    client.delete(f"{second}#windows")
    assert call(keys=[f"{first}#windows"], args=args) == [[b"+1", b"+1"], [b"+1"]]


def test_cluster_epoch_changes_when_one_primary_loses_its_records(cluster_store):
    store, client, prefix = cluster_store
    epoch = store.epoch("first")
    assert epoch == "first"
    primary = client.get_primaries()[1].redis_connection
    for key in primary.keys(f"{prefix}#epoch*"):
        primary.delete(key)
    changed = store.epoch("second")
    assert changed != epoch and {"first", "second"} == set(changed.split(","))
    assert store.epoch("third") == changed


def test_sentinels_refuse_a_wrong_password(redis_sentinel):
    addresses = [(h, int(p)) for h, p in (a.split(":") for a in redis_sentinel.addresses)]
    store = RedisDedupStore.from_sentinel(
        "redis://", redis_sentinel.master, addresses, "x", sentinel_password="wrong", timeout=0.5
    )
    with pytest.raises(StoreUnavailable):
        store.ping()
    store.close()


def test_min_replicas_holds_writes_until_a_replica_acknowledges(redis_sentinel):
    """Against the session's primary, which has one replica: 1 is met, 2 is not."""
    met = sentinel_store(redis_sentinel, "wait-1", durability=Durability(1, 200), timeout=1)
    unmet = sentinel_store(redis_sentinel, "wait-2", durability=Durability(2, 200), timeout=1)
    try:
        assert met.claim(["a"], "t1", 30)[0].attempt == 1
        assert met.complete([Completion("a", "t1", "t/0/0")], 60) == [True]
        with pytest.raises(StoreUnavailable, match="1 of 2 replicas acknowledged"):
            unmet.claim(["a"], "t2", 30)
        with pytest.raises(StoreUnavailable, match="1 of 2 replicas acknowledged"):
            unmet.epoch("e")  # so that /readyz follows it on an idle replica too
    finally:
        met.close()
        unmet.close()


def test_a_completion_keeps_a_reply_for_duplicates(store):
    store.claim(["r", "plain"], "t1", LEASE)
    replies = [
        Completion("r", "t1", "t/0/1", "fp", '[{"topic":null}]'),
        Completion("plain", "t1", "t/0/2", "fp"),
    ]
    assert store.complete(replies, 60) == [True, True]
    kept, plain = store.claim(["r", "plain"], "t2", LEASE)
    assert (kept.status, kept.reply, kept.fingerprint) == (
        ClaimStatus.COMPLETED,
        '[{"topic":null}]',
        "fp",
    )
    assert (plain.reply, plain.fingerprint) == (None, "fp")


def test_inspect_tells_each_state(store):
    assert store.inspect("i").state is State.ABSENT
    store.claim(["i"], "owner:1", 30)
    busy = store.inspect("i")
    assert (busy.state, busy.owner, busy.runs) == (State.IN_PROGRESS, "owner:1", 1)
    assert 0 < busy.lease_left_ms <= 30_000
    complete(store, "i", "owner:1", 60, "t/0/9", "fp")
    done = store.inspect("i")
    assert (done.state, done.origin, done.fingerprint) == (State.COMPLETED, "t/0/9", "fp")
    assert 0 < done.ttl_left_ms <= 75_000  # a window outlives its records by up to 0.25 TTL


def test_forget_deletes_completed_ids_and_claims_only_when_forced(store):
    store.claim(["done", "busy"], "t1", 30)
    complete(store, "done", "t1", 60, "t/0/1")
    before = store.forgets()
    assert store.forget(["done", "busy", "never"], force=False) == [
        "completed",
        "refused",
        "absent",
    ]
    assert store.state("done") is State.ABSENT and store.state("busy") is State.IN_PROGRESS
    assert store.forget(["busy"], force=True) == ["in_progress"]
    assert store.claim(["busy"], "t2", LEASE)[0].status is ClaimStatus.CLAIMED
    assert store.forgets() == before + 2


def test_packed_script_arguments_round_trip_and_refuse_the_field_end(redis_client):
    fields = ["order-1", "", "a|b:c", "é"]
    unpack = redis_client.register_script(lua.COMMON + "return unpack(ARGV[1])")
    assert unpack(args=[lua.pack(fields)]) == fields
    assert unpack(args=[lua.pack([])]) == []
    with pytest.raises(ValueError, match="U\\+001F"):
        lua.pack(["order\x1f1"])
