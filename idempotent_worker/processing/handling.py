"""One message, from its claim to its end: the per-message state machine.

    handle(claim)
      COMPLETED   -> the route's mode: skip it, replay its reply, or (shadow) run it
      CLAIMED     -> run:
        begin       count the run when earlier runs began (and flush what is handled)
        too many    runs began and none finished: dead-letter (attempts_exhausted)
        attempt     the handler, then its outputs (attempts.py; fenced: delivery.py)
        lease lost  another replica took the id: nothing produced, nothing completed
        failure     retry after backoff (claim released, taken again), or dead-letter

A batch route (``batch = true``) takes the claimed messages of a partition that may run
at once through one attempt (``run_together``: one call of its handler), then each
one's result through the same steps; the others go through ``handle`` one by one.

Completions are written in groups by idempotent_worker/processing/completions.py; dead letters by
deadletter/letter.py; what a route does with duplicates is its mode (processing/modes/).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.registry import ResolvedRoute
from idempotent_worker.config.settings import Settings
from idempotent_worker.deadletter.letter import DeadLetter
from idempotent_worker.dedup.base import Claim, ClaimStatus
from idempotent_worker.errors import (
    Interrupted,
    LeaseLost,
    PermanentFailure,
    RetryLater,
)
from idempotent_worker.inbox import Inbox
from idempotent_worker.kafka.outputs import Outputs
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.parts import Clock
from idempotent_worker.processing.aio import EventLoopThread
from idempotent_worker.processing.attempts import Attempts
from idempotent_worker.processing.cache import CompletedIds
from idempotent_worker.processing.completions import Completions, Handled
from idempotent_worker.processing.deadletters import DeadLetterWriter
from idempotent_worker.processing.delivery import FencedDelivery, claim_item
from idempotent_worker.processing.guard import GuardedStore
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.leases import LeaseKeeper
from idempotent_worker.processing.modes import mode_for
from idempotent_worker.processing.modes.base import DedupMode, duplicate_reason
from idempotent_worker.processing.outcomes import Outcomes, fields_of

CLAIM_WAIT_INTERVAL = 0.05


def noop() -> None:
    """Nothing to let go before a wait (a caller without a batch of claims)."""


class Handling:
    def __init__(
        self,
        settings: Settings,
        modes: Mapping[str, DedupMode],
        store: GuardedStore,
        leases: LeaseKeeper,
        delivery: FencedDelivery,
        completions: Completions,
        dead_letters: DeadLetterWriter,
        cache: CompletedIds,
        attempts: Attempts,
        metrics: Metrics,
        outcomes: Outcomes,
        log: FilteringBoundLogger,
        sleep: Callable[[float], bool],
        new_token: Callable[[], str],
    ) -> None:
        self._settings = settings
        self.modes = modes
        self._store = store
        self._leases = leases
        self.delivery = delivery
        self.completions = completions
        self.dead_letters = dead_letters
        self._cache = cache
        self._attempts = attempts
        self.metrics = metrics
        self.outcomes = outcomes
        self.log = log
        self.sleep = sleep
        self._new_token = new_token

    def handle(
        self, item: Item, claim: Claim | None, token: str, before_wait: Callable[[], None] = noop
    ) -> None:
        """Take ``item`` to its end from ``claim``; ``before_wait`` is called before a
        retry waits on another replica's claim (the loop lets its lane's later claims go)."""
        if claim is None:
            return
        mode = self.modes[item.route.topic]
        if claim.status is ClaimStatus.COMPLETED:
            mode.duplicate(self, item, claim)
        elif mode.admit(self, item, claim, token):
            self.run(item, token, claim.attempt, before_wait)

    def acquire(
        self, item: Item, token: str, before_wait: Callable[[], None] = noop
    ) -> Claim | None:
        """Claim one message's id (or entity), waiting while another claim holds it (after
        calling ``before_wait``). None if stopping meanwhile."""
        claim = claim_item(self._store, item, token)
        if claim.status is ClaimStatus.BUSY:
            # Perhaps our own completion, not written yet: write it, then look again.
            self.completions.flush()
            claim = claim_item(self._store, item, token)
        waited = time.perf_counter()
        if claim.status is ClaimStatus.BUSY:
            before_wait()
            self.metrics.claim_waits.labels(item.route.topic).inc()
            self.log.info("waiting for another claim", id=item.id, origin=item.origin)
        while claim.status is ClaimStatus.BUSY:
            if not self.sleep(CLAIM_WAIT_INTERVAL):
                return None
            # Other lanes' handled messages are written while this one waits: their
            # claims may be what the other replica waits for.
            self.completions.flush_if_lingered()
            claim = claim_item(self._store, item, token)
            if claim.status is not ClaimStatus.BUSY and item.span is not None:
                item.span.set(claim_wait_seconds=round(time.perf_counter() - waited, 6))
        if claim.status is ClaimStatus.CLAIMED:
            self._leases.hold(token, [item.key])
        return claim

    # -- duplicates ----------------------------------------------------------------------

    def skip(self, item: Item, claim: Claim, reason: str | None = None) -> None:
        """Count ``item`` as a duplicate of ``claim``'s completed id; a different payload
        follows ``dedup.on_payload_conflict``."""
        reason = reason or duplicate_reason(item, claim)
        if reason == "conflict" and self._settings.dedup.on_payload_conflict == "dead_letter":
            detail = (
                f"id {item.id!r} was already processed from {claim.origin} with a different payload"
            )
            self.dead_letters.write(
                item, DeadLetter("id_conflict", "PayloadConflict", detail, 0, item.id)
            )
            return
        if reason != "conflict":
            self._cache.put(item.id, Claim(ClaimStatus.COMPLETED, claim.origin, claim.fingerprint))
        self.metrics.duplicates.labels(item.route.topic, reason).inc()
        if self.outcomes.debug:
            self.outcomes.log(item, "duplicate", reason=reason, first_seen=claim.origin)
        outcome = reason if reason in ("redelivery", "conflict") else "duplicate"
        item.finish(outcome, reason=reason, first_origin=claim.origin)

    # -- a claimed message ---------------------------------------------------------------

    def run(
        self, item: Item, token: str, attempt: int, before_wait: Callable[[], None] = noop
    ) -> None:
        """Run the handler until it succeeds or the message is given up.

        ``attempt`` is the run number the claim already counted (a fresh claim counts
        run 1), or 0 when the run must be counted first: earlier runs began and did
        not finish (a crash, a timeout) or failed."""
        if attempt == 0 and item.span is not None:
            # Runs of its id began elsewhere (or before a restart) and did not finish: a
            # replica that died or lost its lease.
            item.span.set(taken_over=True)
        while True:
            if attempt == 0:
                # Runs of this id began before and did not finish: it may be the message
                # that kills its worker. Complete what was handled before it runs.
                self.completions.flush()
                attempt = self._store.begin(item.key, token)
            if attempt > self._settings.retry.max_attempts:
                # Earlier runs started and never finished: their worker died or timed out.
                detail = f"{attempt - 1} runs started and none finished (crash or timeout?)"
                exhausted = DeadLetter(
                    "attempts_exhausted", "AttemptsExhausted", detail, attempt - 1, item.id
                )
                self.give_up(item, token, exhausted)
                return
            if attempt:
                self.completions.flush_if_lingered()  # may wait out a store outage
            if not attempt or not self.delivery.holds(item, token):
                # The claim expired before the run (a long wait on Redis), or it was not
                # renewed for most of a lease (an outage) and may have run out, the id
                # taken by another replica. Claim it afresh (a duplicate by now, or a
                # wait) rather than run on a lost claim.
                self._leases.drop(token, [item.key])
                token = self._new_token()
                claim = self._reclaim(item, token, before_wait)
                if claim is None:
                    return
                attempt = claim.attempt
                continue
            started = time.perf_counter()
            result = self.attempt(item, attempt, token)
            seconds = time.perf_counter() - started
            retried = self._settle(item, token, attempt, result, seconds, before_wait)
            if retried is None:
                return
            token, attempt = retried

    def joins_call(self, item: Item, claim: Claim, token: str) -> bool:
        """Whether a batch route's message goes into one call with the messages gathered
        before it: claimed for a run that may start now (earlier runs finished, the
        fence fresh), or a duplicate whose mode needs nothing of them."""
        if claim.status is ClaimStatus.COMPLETED:
            return self.modes[item.route.topic].quiet
        return (
            claim.status is ClaimStatus.CLAIMED
            and 0 < claim.attempt <= self._settings.retry.max_attempts
            and self.delivery.holds(item, token)
        )

    def run_together(
        self, claims: Sequence[tuple[Item, Claim]], token: str, before_wait: Callable[[], None]
    ) -> None:
        """Take to their end a batch route's messages of one partition that ``joins_call``
        let in, claimed under ``token``: the duplicates by their mode, the others in one
        call of the handler; what fails is retried, or given up, one message at a time,
        as ``run`` does."""
        runs: list[tuple[Item, int]] = []
        for item, claim in claims:
            mode = self.modes[item.route.topic]
            if claim.status is ClaimStatus.COMPLETED:
                mode.duplicate(self, item, claim)
            elif mode.admit(self, item, claim, token):
                runs.append((item, claim.attempt))
        if runs:
            self.completions.flush_if_lingered()  # may wait out a store outage
        # The fence once more, right before the call: a wait since (an outage, a dead
        # letter's write) may have outlived the claims. From the first that may have
        # lapsed, the messages run one at a time (and claim afresh), in order.
        held = next(
            (n for n, (item, _) in enumerate(runs) if not self.delivery.holds(item, token)),
            len(runs),
        )
        if held:
            started = time.perf_counter()
            results = self._attempts.together(runs[:held], token)
            seconds = time.perf_counter() - started
            for (item, attempt), result in zip(runs[:held], results, strict=True):
                retried = self._settle(item, token, attempt, result, seconds, before_wait)
                if retried is not None:
                    self.run(item, *retried, before_wait)
        for item, attempt in runs[held:]:
            self.run(item, token, attempt, before_wait)

    def _settle(
        self,
        item: Item,
        token: str,
        attempt: int,
        result: Handled | LeaseLost | Interrupted | Exception,
        seconds: float,
        before_wait: Callable[[], None],
    ) -> tuple[str, int] | None:
        """What one attempt's result leads to: None once the message has ended (or the
        worker is stopping); after a failure to retry, the token and attempt to run with."""
        if isinstance(result, Handled):
            self.completions.add(result)
            return None
        if isinstance(result, LeaseLost):
            self.outcomes.lease_lost(item, attempt, seconds)
            return None
        if isinstance(result, Interrupted):
            if result.token is not None:
                self.delivery.abandon(item, result.token)
            return None
        letter = self.failed(item, attempt, result)
        if letter is not None:
            self.give_up(item, token, letter)
            return None
        return self._retry(item, token, self.backoff(attempt, result), before_wait)

    def failed(self, item: Item, attempt: int, failure: Exception) -> DeadLetter | None:
        """Count and log a failed attempt; the dead letter if the message is given up."""
        self.metrics.processed.labels(item.route.topic, "failed").inc()
        self.log.warning(
            "handler failed",
            **fields_of(item),
            attempt=attempt,
            error_type=type(failure).__name__,
            error=str(failure),
        )
        permanent = isinstance(failure, PermanentFailure)
        if not permanent and attempt < self._settings.retry.max_attempts:
            return None
        reason = "permanent_failure" if permanent else "handler_failed"
        return DeadLetter(reason, type(failure).__name__, str(failure), attempt, item.id)

    def _retry(
        self, item: Item, token: str, delay: float, before_wait: Callable[[], None]
    ) -> tuple[str, int] | None:
        """Let the claim go, wait ``delay``, claim the id again under a new token: that
        token and the claim's attempt, or None if the message ended meanwhile."""
        self._leases.drop(token, [item.key])
        self._store.release([item.key], token, "keep")
        if not self.sleep(delay):
            return None
        token = self._new_token()
        claim = self._reclaim(item, token, before_wait)
        return None if claim is None else (token, claim.attempt)

    def _reclaim(
        self, item: Item, token: str, before_wait: Callable[[], None] = noop
    ) -> Claim | None:
        """Claim the message's id again: the claim, or None if it was finished meanwhile
        (then handled here, by the route's mode) or the worker is stopping."""
        claim = self.acquire(item, token, before_wait)
        if claim is not None and claim.status is ClaimStatus.COMPLETED:
            self.modes[item.route.topic].duplicate(self, item, claim)
            return None
        return claim

    def give_up(self, item: Item, token: str, letter: DeadLetter) -> None:
        """Dead-letter a claimed message, then drop its claim and its attempt count (kept
        if the worker stopped before the letter was written: a message that crashes its
        workers must still reach the dead-letter topic after a restart)."""
        written = self.dead_letters.write(item, letter)
        self._leases.drop(token, [item.key])
        self._store.release([item.key], token, "clear" if written else "keep")

    def backoff(self, attempt: int, failure: Exception) -> float:
        retry = self._settings.retry
        if isinstance(failure, RetryLater) and failure.delay is not None:
            return min(failure.delay, retry.backoff_max_seconds)
        return float(
            min(retry.backoff_initial_seconds * 2 ** (attempt - 1), retry.backoff_max_seconds)
        )

    # -- one run ---------------------------------------------------------------------------

    def attempt(
        self, item: Item, attempt: int, token: str | None
    ) -> Handled | LeaseLost | Interrupted | Exception:
        """One run of the handler and its outputs: see ``Attempts.one``."""
        return self._attempts.one(item, attempt, token)


def assemble(
    settings: Settings,
    routes: Mapping[str, ResolvedRoute],
    store: GuardedStore,
    leases: LeaseKeeper,
    outputs: Outputs,
    cache: CompletedIds,
    event_loop: EventLoopThread,
    metrics: Metrics,
    log: FilteringBoundLogger,
    sleep: Callable[[float], bool],
    new_token: Callable[[], str],
    on_loop_thread: Callable[[], bool],
    clock: Clock,
) -> Handling:
    """The state machine with its parts: completions, dead letters, each route's mode."""
    dedup = settings.dedup
    outcomes = Outcomes(metrics, log, settings.log.level == "DEBUG")
    delivery = FencedDelivery(
        outputs, store, leases, settings.retry, metrics, log, sleep, new_token
    )
    completions = Completions(
        store, leases, delivery, cache, metrics, outcomes, dedup.complete_linger_ms,
        dedup.ttl_seconds, dedup.sequence_ttl_seconds, on_loop_thread, clock,
    )  # fmt: skip
    dead_letters = DeadLetterWriter(outputs, metrics, outcomes, log, settings.retry, sleep)
    modes = {
        topic: mode_for(route, dedup.max_stored_reply_bytes) for topic, route in routes.items()
    }
    inbox = Inbox(settings.inbox, settings.kafka.group_id, log)
    attempts = Attempts(modes, leases, delivery, inbox, event_loop, metrics, log)
    return Handling(
        settings, modes, store, leases, delivery, completions, dead_letters, cache, attempts,
        metrics, outcomes, log, sleep, new_token,
    )  # fmt: skip
