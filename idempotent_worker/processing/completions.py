"""Handled messages, marked completed in groups: one store round trip per group.

A handled message waits at most ``dedup.complete_linger_ms`` for company; lanes running
concurrently share one write every linger, and the loop writes what is left at the end
of each batch. A message's outputs are acknowledged before its completion is written:
a group written on the linger takes the messages whose outputs were answered by then
(the others wait for the next), the end of a batch waits for all of them at once.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace

from idempotent_worker.dedup.base import Claim, ClaimStatus, Completion
from idempotent_worker.errors import Interrupted, LeaseLost
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.parts import Clock
from idempotent_worker.processing.cache import CompletedIds
from idempotent_worker.processing.delivery import FencedDelivery, Sent
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
    sent: Sent | None = None
    """Its outputs, on their way to the broker."""


class Completions:
    def __init__(
        self,
        store: GuardedStore,
        leases: LeaseKeeper,
        delivery: FencedDelivery,
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
        self._delivery = delivery
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
        """Write the completions of the messages whose outputs were answered, if the
        oldest waited a linger."""
        if self._handled and self._clock.monotonic() - self._since >= self._linger:
            self.flush(wait=False)

    def flush(self, wait: bool = True) -> None:
        """Write the completions of every message handled so far, in one round trip,
        once their outputs are acknowledged (``wait``), or of those whose outputs were
        answered already, each id's in the order they were handled."""
        with self._flush_lock:
            handled = self._take() if wait else self._take_answered()
            if not handled:
                return
            if wait:
                self._delivery.wait([h.sent for h in handled if h.sent is not None])
            handled = [h for h in handled if self._settled(h)]
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
                    h.item.finish("duplicate", reason="inbox", attempt=h.attempt)
                    continue
                succeeded[h.item.route.topic] += 1
                if self._outcomes.debug:
                    seconds = round(h.seconds, 6)
                    self._outcomes.log(
                        h.item, "success", attempt=h.attempt, duration_seconds=seconds
                    )
                h.item.finish("processed", attempt=h.attempt)
            self._cache.put_each(remembered)
            for topic, count in succeeded.items():
                self._metrics.topic(topic).succeeded.inc(count)

    def _take(self) -> list[Handled]:
        with self._handled_lock:
            handled, self._handled = self._handled, []
        return handled

    def _take_answered(self) -> list[Handled]:
        """The handled messages whose outputs were answered, none after an earlier
        message of the same id (or entity) whose outputs were not."""
        self._delivery.poll()
        answered: list[Handled] = []
        waiting: list[Handled] = []
        blocked: set[str] = set()
        with self._handled_lock:
            for h in self._handled:
                if h.item.key in blocked or (h.sent is not None and not h.sent.answered):
                    waiting.append(h)
                    blocked.add(h.item.key)
                else:
                    answered.append(h)
            self._handled = waiting
            if waiting:
                self._since = self._clock.monotonic()  # looked at again after a linger
        return answered

    def _settled(self, h: Handled) -> bool:
        """Whether ``h``'s outputs are out (delivered again if any failed): its
        completion then holds the token they went out under."""
        token = h.completion.token
        try:
            settled = self._delivery.settle(h.sent, h.item, token)
        except LeaseLost:
            self._outcomes.lease_lost(h.item, h.attempt, h.seconds)
            return False
        except Interrupted as exc:
            self._delivery.abandon(h.item, exc.token or token)
            return False
        if settled is not None and settled != token:
            h.completion = replace(h.completion, token=settled)
        return True
