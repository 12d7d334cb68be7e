"""Handled messages, marked completed in groups: one store round trip per group.

A handled message waits at most ``dedup.complete_linger_ms`` for company; lanes running
concurrently share one write every linger, and the loop writes what is left at the end
of each batch.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from idempotent_worker.dedup.base import Claim, ClaimStatus, Completion
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.parts import Clock
from idempotent_worker.processing.cache import CompletedIds
from idempotent_worker.processing.guard import GuardedStore
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.leases import LeaseKeeper
from idempotent_worker.processing.outcomes import Outcomes


@dataclass(slots=True)
class Handled:
    """A message whose handler succeeded and whose completion is not written yet."""

    item: Item
    completion: Completion
    attempt: int
    seconds: float


class Completions:
    def __init__(
        self,
        store: GuardedStore,
        leases: LeaseKeeper,
        cache: CompletedIds,
        metrics: Metrics,
        outcomes: Outcomes,
        linger_ms: float,
        ttl_seconds: int,
        position_ttl_seconds: int | None,
        on_loop_thread: Callable[[], bool],
        clock: Clock,
    ) -> None:
        self._clock = clock
        self._store = store
        self._leases = leases
        self._cache = cache
        self._metrics = metrics
        self._outcomes = outcomes
        self._linger = linger_ms / 1000
        self._ttl = ttl_seconds
        self._position_ttl = position_ttl_seconds
        self._on_loop_thread = on_loop_thread
        self._handled: list[Handled] = []
        self._since = 0.0
        self._handled_lock = threading.Lock()
        self._flush_lock = clock.lock()

    def add(self, handled: Handled) -> None:
        with self._handled_lock:
            if not self._handled:
                self._since = self._clock.monotonic()
            self._handled.append(handled)
        if handled.seconds >= self._linger and self._on_loop_thread():
            # One at a time and slow: no company worth waiting for. (Lanes running
            # concurrently share one write every linger instead.)
            self.flush()

    def flush_if_lingered(self) -> None:
        if self._handled and self._clock.monotonic() - self._since >= self._linger:
            self.flush()

    def flush(self) -> None:
        """Write the completions of every message handled so far, in one round trip."""
        with self._flush_lock:
            with self._handled_lock:
                handled, self._handled = self._handled, []
            if not handled:
                return
            completions = [h.completion for h in handled]
            results = self._store.complete(completions, self._ttl, self._position_ttl)
            self._leases.drop_each((c.token, c.id) for c in completions)
            remembered: list[tuple[str, Claim]] = []
            succeeded: Counter[str] = Counter()
            for h, completion, completed in zip(handled, completions, results, strict=True):
                if not completed:
                    self._outcomes.lease_lost(h.item, h.attempt, h.seconds)
                    continue
                if completion.sequence is None:
                    # The local cache never holds replies (routes that replay ask the
                    # store), nor entities (sequence routes compare with positions).
                    claim = Claim(ClaimStatus.COMPLETED, completion.origin, completion.fingerprint)
                    remembered.append((completion.id, claim))
                if h.item.applied:
                    self._metrics.duplicates.labels(h.item.route.topic, "inbox").inc()
                    self._outcomes.log(h.item, "duplicate", reason="inbox", attempt=h.attempt)
                else:
                    succeeded[h.item.route.topic] += 1
                    if self._outcomes.debug:
                        seconds = round(h.seconds, 6)
                        self._outcomes.log(
                            h.item, "success", attempt=h.attempt, duration_seconds=seconds
                        )
                h.item.done = True
            self._cache.put_each(remembered)
            for topic, count in succeeded.items():
                self._metrics.topic(topic).succeeded.inc(count)
