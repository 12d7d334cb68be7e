"""Keeps this replica's claims alive, and stops a handler that runs past its timeout.

A background thread renews every claim the loop holds (the batch's claims and the
message in hand) every ``lease_seconds / 3``, so a slow handler keeps its id for as long
as it runs. Renewal never takes an id: a claim lost meanwhile (the lease ran out during
a Redis outage and another replica claimed the id) stays lost, is logged and counted,
and the store refuses this replica's completion (fencing).

The same thread watches the store's epoch marker (see ``DedupStore.epoch``): if it
changes, the store lost its records, so completed ids can run again. The worker cannot
undo that and keeps running, but it says so: an error log line and
``idempotent_worker_dedup_store_resets_total``. The check also keeps ``/readyz``
honest on a replica with nothing to consume, which would not otherwise meet an outage.
It also watches the store's forget counter (``idempotent-worker ids forget``): when it
moves, the replica drops its local cache of completed ids, which may hold a forgotten
one. The loop reads the counter too (``learn_forgets``) before it trusts a cache hit,
so a copy read right after a forget runs again.

A Python thread cannot be killed, so a handler past its route's timeout ends the
process: the thread logs it and exits with ``EXIT_HANDLER_TIMEOUT``. The message's
offset was not committed and its claim is no longer renewed, so after the lease another
replica (or this one, restarted by its orchestrator) runs it again; the shared attempt
count sends it to the dead-letter topic if it keeps timing out.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from structlog.typing import FilteringBoundLogger

from idempotent_worker.dedup.base import DedupStore
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import SYSTEM, Parts

EXIT_HANDLER_TIMEOUT = 3

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class _Running:
    started: float
    timeout: float
    origin: str
    id: str


class LeaseKeeper:
    def __init__(
        self,
        store: DedupStore,
        lease_seconds: float,
        metrics: Metrics,
        health: Health,
        log: FilteringBoundLogger,
        on_timeout: Callable[[], None] = lambda: os._exit(EXIT_HANDLER_TIMEOUT),
        on_forgotten: Callable[[], None] = lambda: None,
        parts: Parts = SYSTEM,
    ) -> None:
        self._clock = parts.clock
        self._store = store
        self._lease = lease_seconds
        self._interval = lease_seconds / 3
        self._metrics = metrics
        self._health = health
        self._log = log
        self._on_timeout = on_timeout
        self._on_forgotten = on_forgotten
        self._forgets: int | None = None
        self._held: dict[str, dict[str, float]] = {}
        """token -> id -> when the claim was last taken or renewed."""
        self._running: dict[int, _Running] = {}  # handlers running now, by handle
        self._handles = itertools.count()
        self._epoch: str | None = None
        self._lock = threading.Lock()
        self._forgets_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = parts.thread(self._loop, "lease-keeper")

    def start(self) -> None:
        """Check the epoch once before the first claim (it also tells the store's scripts
        whether records of a previous layout may exist), then every renewal interval."""
        self._check_epoch()
        self.learn_forgets()
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def hold(self, token: str, ids: Iterable[str]) -> None:
        now = self._clock.monotonic()
        with self._lock:
            self._held.setdefault(token, {}).update((id, now) for id in ids)

    def fresh(self, token: str, id: str) -> bool:
        """Whether ``token``'s claim of ``id`` is held and was taken or renewed lately
        enough to run a handler on: a third of the lease at least is left. After a store
        outage longer than that, the loop checks the claim before it runs the handler
        (another replica may have taken the id once the lease ran out)."""
        confirmed = self._held.get(token, {}).get(id)
        return confirmed is not None and (
            self._clock.monotonic() - confirmed < self._lease - self._interval
        )

    def drop(self, token: str, ids: Iterable[str]) -> None:
        self.drop_each((token, id) for id in ids)

    def drop_each(self, claims: Iterable[tuple[str, str]]) -> None:
        """Stop renewing each (token, id) of ``claims``."""
        with self._lock:
            for token, id in claims:
                held = self._held.get(token)
                if held is not None:
                    held.pop(id, None)
                    if not held:
                        del self._held[token]

    def running(self) -> int:
        """How many handlers run now."""
        return len(self._running)

    def handler_started(self, timeout: float, origin: str, id: str) -> int:
        """Watch a handler starting now; the handle to pass to ``handler_finished``."""
        handle = next(self._handles)
        with self._lock:
            self._running[handle] = _Running(self._clock.monotonic(), timeout, origin, id)
        return handle

    def handler_finished(self, handle: int) -> None:
        with self._lock:
            del self._running[handle]

    def _loop(self) -> None:
        next_renewal = self._clock.monotonic() + self._interval
        while not self._clock.wait_event(self._stop, min(0.2, self._interval)):
            with self._lock:
                running = list(self._running.values())
            now = self._clock.monotonic()
            late = next((r for r in running if now - r.started > r.timeout), None)
            if late is not None:
                self._log.error(
                    "handler timed out; exiting so that the message is retried elsewhere",
                    timeout_seconds=late.timeout,
                    exit_code=EXIT_HANDLER_TIMEOUT,
                    origin=late.origin,
                    id=late.id,
                )
                self._on_timeout()
                return
            if now >= next_renewal:
                # The next round is due an interval after this one began (each call
                # may wait out a socket timeout), or soon if a renewal failed: a claim
                # must survive any outage shorter than two thirds of the lease, less a timeout.
                renewed = self._renew()
                self._check_epoch()
                self.learn_forgets()
                next_renewal = now + self._interval if renewed else self._clock.monotonic()

    def _timed(self, operation: str, call: Callable[..., T], *args: Any) -> T | None:
        """``call(*args)``, timed and counted like the loop's store calls; None (logged,
        counted) if the store failed: the next round tries again, nothing waits for it."""
        started = time.perf_counter()
        try:
            result = call(*args)
        except StoreUnavailable as exc:
            self._metrics.store_errors.labels(operation).inc()
            self._log.warning("dedup store call failed", operation=operation, error=str(exc))
            self._health.store_error = str(exc)
            return None
        self._metrics.store_duration.labels(operation).observe(time.perf_counter() - started)
        return result

    def _check_epoch(self) -> None:
        epoch = self._timed("epoch", self._store.epoch, uuid.uuid4().hex)
        self._health.store_ok = epoch is not None
        if epoch is None:
            return
        if self._epoch is not None and epoch != self._epoch:
            self._metrics.store_resets.inc()
            self._log.error(
                "the dedup store lost its records (FLUSHALL, or a restart without "
                "persistence): ids completed before now can run again if redelivered"
            )
        self._epoch = epoch

    def learn_forgets(self) -> bool:
        """Read the store's forget counter and drop the local cache of completed ids if it
        moved since it was last read; False if it cannot be read (trust no cache hit)."""
        forgets = self._timed("forgets", self._store.forgets)
        if forgets is None:
            return False
        with self._forgets_lock:
            if self._forgets is not None and forgets != self._forgets:
                self._log.info("ids were forgotten: dropping the local cache of completed ids")
                self._on_forgotten()
            self._forgets = forgets
        return True

    def _renew(self) -> bool:
        """Renew every held claim; False if the store failed a call."""
        with self._lock:
            held = [(token, sorted(ids)) for token, ids in self._held.items()]
        answered = True
        for token, ids in held:
            started = self._clock.monotonic()
            renewed = self._timed("renew", self._store.renew, ids, token, self._lease)
            if renewed is None:
                answered = False
                continue
            with self._lock:
                confirmed = self._held.get(token, {})
                for id, ok in zip(ids, renewed, strict=True):
                    if ok and id in confirmed:
                        confirmed[id] = started
            lost = [id for id, ok in zip(ids, renewed, strict=True) if not ok]
            if lost:
                # Completed or released by the loop since the snapshot, or really lost:
                # either way there is nothing left to renew. complete() fences the latter.
                self.drop(token, lost)
        return answered
