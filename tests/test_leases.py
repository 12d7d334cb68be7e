"""The lease keeper's thread, on the in-memory store with real time: it keeps held
claims alive past their lease and notices a store that lost its records."""

import time

import structlog
from prometheus_client import CollectorRegistry

from worker.dedup import ClaimStatus, State
from worker.dedup.memory import MemoryDedupStore
from worker.errors import StoreUnavailable
from worker.leases import LeaseKeeper
from worker.metrics import Metrics
from worker.server import Health

LEASE = 0.3


def keeper_on(store, health=None):
    metrics = Metrics(CollectorRegistry())
    keeper = LeaseKeeper(store, LEASE, metrics, health or Health(60), structlog.get_logger())
    keeper.start()
    return keeper, metrics


def resets(metrics):
    return metrics.registry.get_sample_value("idempotent_worker_dedup_store_resets_total")


def test_held_claims_outlive_their_lease_until_dropped():
    store = MemoryDedupStore()
    keeper, _ = keeper_on(store)
    try:
        store.claim(["held", "not-held"], "t1", LEASE)
        keeper.hold("t1", ["held"])
        time.sleep(LEASE * 4)
        assert store.state("held") is State.IN_PROGRESS
        assert store.state("not-held") is State.ABSENT
        keeper.drop("t1", ["held"])
        time.sleep(LEASE * 2)
        assert store.claim(["held"], "t2", LEASE)[0].status is ClaimStatus.CLAIMED
    finally:
        keeper.close()


def test_an_emptied_store_is_counted_once():
    store = MemoryDedupStore()
    keeper, metrics = keeper_on(store)
    try:
        time.sleep(LEASE)  # the first check only learns the epoch
        assert resets(metrics) == 0
        store.flush()
        time.sleep(LEASE * 2)
        assert resets(metrics) == 1
    finally:
        keeper.close()


class Unplugged(MemoryDedupStore):
    """A store whose every call fails while ``down`` is set."""

    down = False

    def epoch(self, candidate):
        if self.down:
            raise StoreUnavailable("unplugged")
        return super().epoch(candidate)


def test_an_idle_replica_reports_the_store_down_and_back():
    store, health = Unplugged(), Health(60)
    health.store_ok = True
    keeper, metrics = keeper_on(store, health)
    try:
        store.down = True
        time.sleep(LEASE * 2)
        assert not health.store_ok
        assert metrics.registry.get_sample_value(
            "idempotent_worker_dedup_store_errors_total", {"operation": "epoch"}
        )
        store.down = False
        time.sleep(LEASE * 2)
        assert health.store_ok
    finally:
        keeper.close()
