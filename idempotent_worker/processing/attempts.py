"""One run of a handler: its context built, the handler called (once for a message, or
once for a batch route's messages), the call timed and watched for its timeout, then
each message's outputs sent (fenced by its claim) and the completion to write once they
are acknowledged. The state machine around it (retries, giving up) is handling.py's."""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import cast

from structlog.typing import FilteringBoundLogger

from idempotent_worker.dedup.base import Completion
from idempotent_worker.errors import Interrupted, LeaseLost, RetryLater
from idempotent_worker.inbox import AlreadyApplied, Inbox
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.processing.aio import EventLoopThread
from idempotent_worker.processing.completions import Handled
from idempotent_worker.processing.context import HandlerContext
from idempotent_worker.processing.delivery import FencedDelivery
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.leases import LeaseKeeper
from idempotent_worker.processing.modes.base import DedupMode
from idempotent_worker.processing.outcomes import fields_of
from idempotent_worker.replies import resolve
from idempotent_worker.types import BatchHandler, Handler


class Attempts:
    def __init__(
        self,
        modes: Mapping[str, DedupMode],
        leases: LeaseKeeper,
        delivery: FencedDelivery,
        inbox: Inbox,
        event_loop: EventLoopThread,
        metrics: Metrics,
        log: FilteringBoundLogger,
    ) -> None:
        self._modes = modes
        self._leases = leases
        self._delivery = delivery
        self._inbox = inbox
        self._event_loop = event_loop
        self._metrics = metrics
        self._log = log

    def one(
        self, item: Item, attempt: int, token: str | None
    ) -> Handled | LeaseLost | Interrupted | Exception:
        """Run the handler once and send its outputs (fenced by ``token``'s claim if
        given): what to complete once they are acknowledged; the handler's exception if
        it failed; LeaseLost or Interrupted if its outputs could not go out. If the inbox
        found an earlier run applied, that run's kept outputs are produced instead.

        The route's timeout is the handler's alone: delivering its outputs and checking
        the fence wait out a store or broker outage as the loop does, and a failure
        there is the worker's, never the handler's (it does not run the handler again)."""
        return self.together([(item, attempt)], token)[0]

    def together(
        self, runs: Sequence[tuple[Item, int]], token: str | None
    ) -> list[Handled | LeaseLost | Interrupted | Exception]:
        """``one`` for each of ``runs`` (a message and its attempt), in one call of
        the handler: a batch route's handler gets them all (its route's timeout is the
        call's), any other route's exactly one."""
        route = runs[0][0].route
        contexts = [self._context(item, attempt) for item, attempt in runs]
        first = runs[0][0]
        running = self._leases.handler_started(route.timeout_seconds, first.origin, first.id)
        started = time.perf_counter()
        started_ns = time.time_ns()
        failures: Sequence[Exception | None] = [None] * len(runs)
        try:
            # The first message's handler span is current while the handler runs: its
            # own instrumentation nests under it.
            with first.span.child("handler") if first.span is not None else nullcontext():
                if route.batch:
                    handle_all = cast(BatchHandler, route.handler)
                    result = handle_all([(ctx.message, ctx) for ctx in contexts])
                else:
                    handle = cast(Handler, route.handler)
                    result = handle(contexts[0].message, contexts[0])
                if inspect.isawaitable(result):  # decided per call: see processing/aio.py
                    result = self._event_loop.run(result)
            if route.batch:
                failures = per_message(result, len(runs))
        except (Exception, AlreadyApplied) as exc:
            # A handler may raise anything: that is its way to fail (for every message of
            # its call). But a message the inbox found applied is done, whatever the
            # handler made of that, once the first run's outputs are out.
            if not isinstance(exc, Exception):
                if all(ctx.applied is None for ctx in contexts):
                    raise
                # The inbox stopped the batch's call at a message applied before: the
                # messages it did not reach are run again.
                exc = RetryLater("the call ended at a message the inbox found applied", delay=0)
            failures = [exc] * len(runs)
        finally:
            self._leases.handler_finished(running)
            exemplar = first.span.exemplar() if first.span is not None else None
            duration = self._metrics.topic(route.topic).handler_duration
            duration.observe(time.perf_counter() - started, exemplar)
            for item, attempt in runs:
                if item.span is not None:
                    item.span.set(attempt=attempt)
                    if item is not first:  # the batch's call, under each message's span
                        item.span.timed("handler", started_ns, time.time_ns())
        seconds = time.perf_counter() - started
        return [
            self._deliver(item, attempt, ctx, failure, token, seconds)
            for (item, attempt), ctx, failure in zip(runs, contexts, failures, strict=True)
        ]

    def _context(self, item: Item, attempt: int) -> HandlerContext:
        message = item.message
        assert message is not None
        route = item.route
        return HandlerContext(
            message,
            attempt,
            lambda: self._log.bind(**fields_of(item), attempt=attempt),
            route.default_topic(message.headers),
            self._inbox,
            item.fingerprint,
            item.origin,
            route.correlation(message.headers),
            route.cloudevent,
            item.span,
        )

    def _deliver(
        self,
        item: Item,
        attempt: int,
        ctx: HandlerContext,
        failure: Exception | None,
        token: str | None,
        seconds: float,
    ) -> Handled | LeaseLost | Interrupted | Exception:
        """Send one message's outputs once its handler returned: see ``one``."""
        outputs = ctx.outputs
        if ctx.applied is not None:
            assert item.message is not None
            headers, route = item.message.headers, item.route
            outputs = resolve(
                ctx.applied.outputs, route.default_topic(headers), route.correlation(headers)
            )
        elif failure is not None:
            return failure
        try:
            token, sent = self._delivery.send(outputs, item, token)
        except (LeaseLost, Interrupted) as exc:
            return exc
        if outputs and item.span is not None:
            item.span.outputs_sent()
        completion = self._completion(item, ctx, token or "")
        return Handled(item, completion, attempt, seconds, sent)

    def _completion(self, item: Item, ctx: HandlerContext, token: str) -> Completion:
        mode = self._modes[item.route.topic]
        applied = ctx.applied
        if applied is None:
            reply = mode.reply(ctx.kept)
            return Completion(item.key, token, item.origin, item.fingerprint, reply, item.sequence)
        item.applied = True
        if applied.fingerprint != item.fingerprint:
            self._log.warning(
                "the inbox holds this id applied from a different payload",
                **fields_of(item),
                applied_from=applied.origin,
            )
        # The inbox's row is the first run's: remember its payload, origin and outputs.
        reply = mode.reply(lambda: applied.outputs)
        return Completion(
            item.key, token, applied.origin, applied.fingerprint, reply, item.sequence
        )


def per_message(result: object, count: int) -> Sequence[Exception | None]:
    """A batch handler's result, one entry per message: None for all succeeded, or its
    own list; anything else fails the whole call (with the reason)."""
    if result is None:
        return [None] * count
    got = f"a {type(result).__name__}"
    if isinstance(result, Sequence) and not isinstance(result, str | bytes):
        entries = list(result)
        if len(entries) == count and all(e is None or isinstance(e, Exception) for e in entries):
            return entries
        got += f" of {len(entries)}"
    problem = TypeError(
        f"a batch handler returns None, or one entry per message ({count}): None or an "
        f"exception; it returned {got}"
    )
    return [problem] * count
