"""The lease keeper's thread, on the in-memory store with real time: it keeps held
claims alive past their lease and notices a store that lost its records."""

import random
import time

import pytest
import structlog
from prometheus_client import CollectorRegistry

from idempotent_worker.dedup import ClaimStatus, State
from idempotent_worker.dedup.memory import MemoryDedupStore
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import Parts
from idempotent_worker.processing.leases import LeaseKeeper
from tests.sim.sched import Scheduler, SimClock

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


class SlowlyUnplugged(MemoryDedupStore):
    """On virtual time: every call during ``outage`` waits out a socket timeout, then
    fails."""

    def __init__(self, scheduler, outage, timeout):
        super().__init__(clock=lambda: scheduler.now)
        self._scheduler, self._outage, self._timeout = scheduler, outage, timeout

    def __getattribute__(self, name):
        attribute = super().__getattribute__(name)
        if name.startswith("_") or name in ("flush",) or not callable(attribute):
            return attribute
        scheduler, (start, end) = self._scheduler, self._outage

        def call(*args):
            if start <= scheduler.now < end:
                scheduler.sleep(self._timeout)
                raise StoreUnavailable(f"{name}: timed out")
            return attribute(*args)

        return call


def taken_during(outage: tuple[float, float], lease: float = 6.0) -> list[float]:
    """When a rival found the claim of "held" gone, with a keeper holding it (and another
    batch's claim) through ``outage``, on virtual time: every store call in it waits out
    a 0.5 s timeout, then fails."""
    scheduler = Scheduler(random.Random(0))
    store = SlowlyUnplugged(scheduler, outage, timeout=0.5)
    parts = Parts(clock=SimClock(scheduler), thread=lambda t, n: scheduler.spawn(t, n, "r"))
    keeper = LeaseKeeper(
        store, lease, Metrics(CollectorRegistry()), Health(60), structlog.get_logger(),
        parts=parts,
    )  # fmt: skip
    store.claim(["held"], "ours", lease)
    keeper.hold("ours", ["held"])
    store.claim(["also held"], "another batch", lease)
    keeper.hold("another batch", ["also held"])
    taken = []

    def rival():
        while scheduler.now < lease * 5:
            scheduler.sleep(0.1)
            if MemoryDedupStore.state(store, "held") is not State.IN_PROGRESS:
                taken.append(scheduler.now)

    scheduler.spawn(keeper.start, "start", "r").start()
    scheduler.spawn(rival, "rival", "other").start()
    try:
        scheduler.run(lease * 5, lambda: False)
    finally:
        scheduler.close()
    return taken


def test_an_outage_shorter_than_the_lease_loses_no_claim():
    """Renewal resumes as soon as the store answers again, not a whole interval after
    the failed round (whose calls each waited out a timeout)."""
    assert taken_during((12.5, 14.5)) == []


@pytest.mark.parametrize("phase", [0.1, 0.7, 1.3, 1.9])
def test_an_outage_of_two_thirds_of_the_lease_less_a_timeout_loses_no_claim(phase):
    """The bound docs/guarantees.md states, wherever the outage starts in the renewal
    interval (2 s of a 6 s lease, the last renewal at 12 s): a claim is renewed within
    a store timeout and the keeper's pause (0.2 s) of the store's return, so it
    survives an outage of up to two thirds of the lease less those."""
    assert taken_during((12 + phase, 12 + phase + 6 * 2 / 3 - 0.5 - 0.25)) == []
