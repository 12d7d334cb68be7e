"""The per-message state machine (processing/handling.py) on in-memory parts: the memory
store with a virtual clock, a producer whose deliveries fail on demand. What happens
after a handler succeeded is the worker's business, never the handler's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import structlog
from confluent_kafka import KafkaError
from confluent_kafka import Message as KafkaMessage
from prometheus_client import CollectorRegistry

from idempotent_worker.config.registry import resolve_routes
from idempotent_worker.dedup import State
from idempotent_worker.dedup.memory import MemoryDedupStore
from idempotent_worker.errors import PermanentFailure, StoreUnavailable
from idempotent_worker.kafka.outputs import Delivery, failure
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import Parts as WorkerParts
from idempotent_worker.parts import SystemClock
from idempotent_worker.processing.aio import EventLoopThread
from idempotent_worker.processing.cache import CompletedIds
from idempotent_worker.processing.guard import GuardedStore
from idempotent_worker.processing.handling import Handling, assemble
from idempotent_worker.processing.items import Item, prepare
from idempotent_worker.processing.leases import LeaseKeeper
from tests.support.harness import make_settings
from tests.support.stores import FakeClock

LEASE = 10.0
TOPIC = "orders"


@dataclass
class Script:
    """What the handlers of this module do, set by each test."""

    runs: list[str] = field(default_factory=list)
    during: list[object] = field(default_factory=list)
    """Called with the message inside the handler (e.g. to move the clock)."""


SCRIPT = Script()


def emits(message, ctx):
    quiet(message, ctx)
    ctx.emit(b"out", topic="out")


def quiet(message, ctx):
    SCRIPT.runs.append(message.id)
    for step in SCRIPT.during:
        step(message)


def rejects(message, ctx):
    quiet(message, ctx)
    raise PermanentFailure("no")


class FakeOutputs:
    """A producer: each send is a delivery; ``failures`` confirms fail before one passes."""

    def __init__(self, leases: LeaseKeeper | None = None) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.failures = 0
        self.running_at_confirm: list[int] = []
        self.leases = leases

    def send(self, topic, value, *, key=None, headers=()):
        self.sent.append((topic, value))
        return Delivery()

    def wait(self, deliveries, timeout, serve=None):
        if self.leases is not None:
            self.running_at_confirm.append(self.leases.running())
        error = None
        if self.failures and deliveries:
            self.failures -= 1
            error = KafkaError(KafkaError._MSG_TIMED_OUT, "broker away")
        for delivery in deliveries:
            delivery(error, None)

    def confirm(self, deliveries, timeout, serve=None):
        self.wait(deliveries, timeout, serve)
        if error := failure(deliveries):
            raise error

    def poll(self):
        pass


class FakeConsumer:
    paused = False

    def hold(self):
        self.paused = True

    def resume(self):
        self.paused = False

    def poll_while_holding(self, seconds, stopping):
        pass


class FailingStore(MemoryDedupStore):
    """The memory store, failing the operations in ``failing``."""

    def __init__(self, clock):
        super().__init__(clock)
        self.failing: set[str] = set()

    def renew(self, ids, token, lease_seconds):
        if "renew" in self.failing:
            raise StoreUnavailable("renew: connection reset")
        return super().renew(ids, token, lease_seconds)


class StoreClock(SystemClock):
    """The system clock, but for ``monotonic``: the store's virtual time, so that the
    lease keeper and the store see the same lease run out."""

    def __init__(self, clock: FakeClock) -> None:
        self._clock = clock

    def monotonic(self) -> float:
        return self._clock.now


class Parts:
    def __init__(self, handler: str) -> None:
        SCRIPT.runs.clear()
        SCRIPT.during.clear()
        self.clock = FakeClock()
        self.store = FailingStore(self.clock)
        self.stopping = False
        self.registry = CollectorRegistry()
        metrics = Metrics(self.registry)
        health = Health(60)
        log = structlog.get_logger()
        self.settings = make_settings(
            "127.0.0.1:9", "redis://127.0.0.1:9", "g", [
                {"topic": TOPIC, "handler": f"tests.test_handling:{handler}", "dlq_topic": "dlq"}
            ], dedup={"lease_seconds": LEASE},
        )  # fmt: skip
        self.routes = resolve_routes(self.settings)
        self.leases = LeaseKeeper(
            self.store, LEASE, metrics, health, log,
            parts=WorkerParts(clock=StoreClock(self.clock)),
        )  # fmt: skip
        self.outputs = FakeOutputs(self.leases)
        guarded = GuardedStore(
            self.store, FakeConsumer(), metrics, health, log, lambda: self.stopping, LEASE,
            lambda: True, SystemClock(),
        )  # fmt: skip
        tokens = itertools.count()
        self.event_loop = EventLoopThread()
        self.handling: Handling = assemble(
            self.settings, self.routes, guarded, self.leases, self.outputs,  # type: ignore[arg-type]
            CompletedIds(100, 3600), self.event_loop, metrics, log, self.sleep,
            lambda: f"test:{next(tokens)}", lambda: True, SystemClock(),
        )  # fmt: skip
        self._offsets = itertools.count()

    def sleep(self, seconds: float) -> bool:
        self.clock.now += seconds
        return not self.stopping

    def item(self, id: str) -> Item:
        record = KafkaMessage(
            topic=TOPIC, partition=0, offset=next(self._offsets), value=b"v",
            headers=[("message-id", id.encode())],
        )  # fmt: skip
        return prepare(record, self.routes, 1 << 20)

    def handle(self, item: Item, token: str = "batch:1") -> None:
        [claim] = self.store.claim([item.key], token, LEASE)
        self.leases.hold(token, [item.key])  # as the loop does with a batch's claims
        self.handling.handle(item, claim, token)
        self.handling.completions.flush()

    def value(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(f"idempotent_worker_{name}", labels) or 0.0


@pytest.fixture
def parts(request) -> Iterator[Parts]:
    built = Parts(request.param if hasattr(request, "param") else "emits")
    yield built
    built.event_loop.close()


def test_a_failed_delivery_is_delivered_again_without_running_the_handler_again(parts):
    parts.outputs.failures = 2
    item = parts.item("a")
    parts.handle(item)
    assert SCRIPT.runs == ["a"]
    assert parts.outputs.sent == [("out", b"out")] * 3
    assert parts.store.state("a") is State.COMPLETED and item.done
    assert parts.value("output_delivery_failures_total", topic=TOPIC) == 2
    assert parts.value("messages_processed_total", topic=TOPIC, outcome="failed") == 0
    assert parts.value("messages_processed_total", topic=TOPIC, outcome="success") == 1


def test_the_handler_timeout_does_not_time_the_delivery(parts):
    parts.outputs.failures = 1
    parts.handle(parts.item("a"))
    assert parts.outputs.running_at_confirm == [0, 0]


def test_stopping_while_outputs_fail_leaves_the_message_unfinished_and_its_run_counted(parts):
    parts.outputs.failures = 100
    SCRIPT.during.append(lambda message: setattr(parts, "stopping", True))
    item = parts.item("a")
    parts.handle(item)
    assert SCRIPT.runs == ["a"] and not item.done
    inspection = parts.store.inspect("a")
    assert inspection.state is State.ABSENT and inspection.runs == 1


def test_a_claim_held_with_most_of_its_lease_left_fences_its_outputs_without_a_write(
    parts, monkeypatch
):
    """The fence is the lease keeper's knowledge when it is fresh: no renew (a write, an
    fsync with appendfsync always) per emitting message."""
    renewals = []
    monkeypatch.setattr(
        parts.store, "renew", lambda ids, token, lease: renewals.append(ids) or [True] * len(ids)
    )
    parts.handle(parts.item("a"))
    assert parts.outputs.sent == [("out", b"out")] and renewals == []
    # Past two thirds of the lease since the claim was confirmed, the fence asks the store.
    SCRIPT.during.append(lambda message: setattr(parts.clock, "now", parts.clock.now + LEASE))
    parts.handle(parts.item("b"))
    assert renewals == [["b"]] and parts.store.state("b") is State.COMPLETED


def test_an_expired_claim_nobody_took_is_taken_again_before_the_outputs(parts):
    """A store outage longer than the lease: the handler ran, nobody else took the id;
    its outputs go out under a new claim and the id is completed, not lost."""
    SCRIPT.during.append(lambda message: setattr(parts.clock, "now", parts.clock.now + 2 * LEASE))
    item = parts.item("a")
    parts.handle(item)
    assert parts.outputs.sent == [("out", b"out")]
    assert parts.store.state("a") is State.COMPLETED and item.done
    assert parts.value("lease_lost_total", topic=TOPIC) == 0


def test_a_claim_another_replica_took_publishes_nothing(parts):
    def taken_over(message):
        parts.clock.now += 2 * LEASE
        parts.store.claim([message.id], "other-replica:1", LEASE)

    SCRIPT.during.append(taken_over)
    item = parts.item("a")
    parts.handle(item)
    assert parts.outputs.sent == []
    assert parts.store.inspect("a").owner == "other-replica:1"
    assert parts.value("lease_lost_total", topic=TOPIC) == 1


@pytest.mark.parametrize("parts", ["quiet"], indirect=True)
def test_a_completion_after_the_claim_expired_with_nobody_taking_it_is_written(parts):
    item = parts.item("a")
    [claim] = parts.store.claim(["a"], "batch:1", LEASE)
    parts.handling.handle(item, claim, "batch:1")
    parts.clock.now += 2 * LEASE  # an outage before the completion was written
    parts.handling.completions.flush()
    assert parts.store.state("a") is State.COMPLETED and item.done
    assert parts.value("lease_lost_total", topic=TOPIC) == 0
    assert parts.value("messages_processed_total", topic=TOPIC, outcome="success") == 1


@pytest.mark.parametrize("parts", ["quiet"], indirect=True)
def test_a_refused_completion_of_an_id_another_replica_holds_is_lease_lost(parts):
    item = parts.item("a")
    [claim] = parts.store.claim(["a"], "batch:1", LEASE)
    parts.handling.handle(item, claim, "batch:1")
    parts.clock.now += 2 * LEASE
    parts.store.claim(["a"], "other-replica:1", LEASE)
    parts.handling.completions.flush()
    assert parts.store.inspect("a").owner == "other-replica:1"
    assert parts.value("lease_lost_total", topic=TOPIC) == 1
    assert parts.value("messages_processed_total", topic=TOPIC, outcome="success") == 0


@pytest.mark.parametrize("parts", ["rejects"], indirect=True)
def test_stopping_during_a_failing_dead_letter_write_keeps_the_run_count(parts):
    """The crash-loop count of a poison message survives a restart in the middle."""
    parts.outputs.failures = 100
    SCRIPT.during.append(lambda message: setattr(parts, "stopping", True))
    item = parts.item("a")
    parts.handle(item)
    assert not item.done
    assert parts.store.inspect("a").runs == 1


def test_a_store_outage_at_shutdown_is_not_the_handlers_failure(parts):
    def outage(message):  # long enough that the fence must ask the store
        parts.store.failing.add("renew")
        parts.clock.now += LEASE
        parts.stopping = True

    SCRIPT.during.append(outage)
    with pytest.raises(StoreUnavailable):
        parts.handle(parts.item("a"))
    assert SCRIPT.runs == ["a"]
    assert parts.value("messages_processed_total", topic=TOPIC, outcome="failed") == 0
