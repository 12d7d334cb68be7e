"""The dedup store as the loop uses it: timed, counted, and failing closed.

While the store fails, every call retries with backoff and the worker holds still:
no handler runs (the loop is inside this call), no offset is committed, the owned
partitions are paused, and the consumer is polled so it keeps its group membership.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from structlog.typing import FilteringBoundLogger

from idempotent_worker.dedup.base import Attempts, Claim, Completion, DedupStore
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.kafka.consumer import GroupConsumer
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import Clock

T = TypeVar("T")

MAX_BACKOFF = 5.0


class GuardedStore:
    def __init__(
        self,
        store: DedupStore,
        consumer: GroupConsumer,
        metrics: Metrics,
        health: Health,
        log: FilteringBoundLogger,
        stopping: Callable[[], bool],
        lease_seconds: float,
        on_loop_thread: Callable[[], bool],
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._store = store
        self._consumer = consumer
        self._metrics = metrics
        self._health = health
        self._log = log
        self._stopping = stopping
        self._lease = lease_seconds
        self._on_loop_thread = on_loop_thread
        self._failing = False
        self._outage = False
        """The partitions are held for an outage (not for a wait of the loop's)."""

    def claim(self, ids: Sequence[str], token: str) -> dict[str, Claim]:
        claims = self._call("claim", self._store.claim, ids, token, self._lease)
        return dict(zip(ids, claims, strict=True))

    def claim_positions(self, entities: Sequence[tuple[str, int]], token: str) -> dict[str, Claim]:
        claims = self._call("claim", self._store.claim_positions, entities, token, self._lease)
        return {entity: claim for (entity, _), claim in zip(entities, claims, strict=True)}

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        """An ambiguous failure (e.g. a timeout after Redis applied it) is retried: the
        script re-reads each record and answers True if it is completed under its token."""
        return self._call(
            "complete", self._store.complete, completions, ttl_seconds, position_ttl_seconds
        )

    def begin(self, id: str, token: str) -> int:
        return self._call("begin", self._store.begin, id, token)

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        return self._call("release", self._store.release, ids, token, attempts) if ids else 0

    def renew(self, ids: Sequence[str], token: str) -> list[bool]:
        return self._call("renew", self._store.renew, ids, token, self._lease)

    def eviction_policy(self) -> str | None:
        return self._call("config", self._store.eviction_policy)

    def release_if_reachable(
        self, ids: Sequence[str], token: str, attempts: Attempts = "keep"
    ) -> None:
        """Release without waiting out an outage: the leases expire by themselves."""
        if not ids:
            return
        try:
            self._store.release(ids, token, attempts)
        except StoreUnavailable as exc:
            self._log.info("claims left to expire", count=len(ids), error=str(exc))

    def ping(self) -> None:
        self._call("ping", self._store.ping)

    def hold_still(self, seconds: float) -> None:
        """Pause the owned partitions and serve the group protocol for ``seconds`` (while
        the store is away, or while the loop waits on its lanes or a backoff)."""
        if not self._consumer.paused:
            self._consumer.hold()
        self._consumer.poll_while_holding(seconds, self._stopping)

    def resume_if_held(self) -> None:
        if self._consumer.paused and self._health.store_ok:
            if self._outage:
                self._log.info("dedup store reachable again; resuming")
                self._health.progressed()  # the outage was not a stuck partition
                self._outage = False
            self._consumer.resume()

    def _call(self, operation: str, call: Callable[..., T], *args: Any) -> T:
        """Raises StoreUnavailable only when the worker is asked to stop during an outage."""
        delay = 0.1
        while True:
            started = time.perf_counter()
            try:
                result = call(*args)
            except StoreUnavailable as exc:
                self._metrics.store_errors.labels(operation).inc()
                if not self._failing:  # once an outage, from whichever thread meets it
                    self._failing = True
                    self._log.error(
                        "dedup store unavailable; holding", operation=operation, error=str(exc)
                    )
                self._health.store_error = str(exc)
                self._health.store_ok = False
                self._outage = True
                if self._stopping():
                    raise
                if self._on_loop_thread():
                    self.hold_still(delay)
                else:
                    # A handler lane: only the loop's thread touches the consumer; it
                    # holds the partitions while it waits for the lanes.
                    self._clock.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            self._metrics.store_duration.labels(operation).observe(time.perf_counter() - started)
            self._failing = False
            self._health.store_ok = True
            if self._on_loop_thread():
                self.resume_if_held()
            return result
