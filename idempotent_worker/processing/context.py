"""The ``ctx`` a handler receives: its attempt number, a bound logger, ``emit`` and
``inbox``.

``emit`` only collects outputs. The loop produces them after the handler returns and
after checking that this replica still holds the message's claim, so a replica that
lost its claim while it ran (a zombie, paused past its lease) publishes nothing.
``inbox`` is the transactional inbox of database handlers (see :mod:`idempotent_worker.inbox`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from structlog.typing import FilteringBoundLogger

from idempotent_worker.errors import PermanentFailure
from idempotent_worker.inbox import Applied, Inbox, InboxBlock
from idempotent_worker.observe.tracing import MessageSpan
from idempotent_worker.replies import Kept, Output, keep
from idempotent_worker.types import Context, Message

OUTPUT_ID_HEADER = "message-id"


class HandlerContext(Context):
    def __init__(
        self,
        message: Message,
        attempt: int,
        make_logger: Callable[[], FilteringBoundLogger],
        default_topic: str | None,
        inbox: Inbox,
        fingerprint: str,
        origin: str,
        correlation: tuple[str, bytes] | None = None,
        cloudevent: tuple[str, str] | None = None,
        span: MessageSpan | None = None,
    ) -> None:
        self.message = message
        self._attempt = attempt
        self._make_logger = make_logger
        self._logger: FilteringBoundLogger | None = None
        self._default_topic = default_topic
        self._inbox = inbox
        self._inbox_entered = False
        self.fingerprint = fingerprint
        self.origin = origin
        self._correlation = correlation
        self._cloudevent = cloudevent
        self._span = span
        """The message's trace span: each output carries its context."""
        self._inbox_started = 0
        """Outputs' ``ce_source`` and ``ce_type``, if the route emits CloudEvents."""
        self.outputs: list[Output] = []
        """What the handler emitted, in order."""
        self._named: list[bool] = []
        """Per output: whether the handler named its topic."""
        self.applied: Applied | None = None
        """Set when the inbox found this id applied by an earlier run."""

    @property
    def message_id(self) -> str:
        return self.message.id

    @property
    def attempt(self) -> int:
        return self._attempt

    @property
    def logger(self) -> FilteringBoundLogger:
        # Bound on first use: most handlers never log, and binding costs on every message.
        if self._logger is None:
            self._logger = self._make_logger()
        return self._logger

    def emit(
        self,
        value: bytes | str | None,
        *,
        topic: str | None = None,
        key: bytes | str | None = None,
        headers: Mapping[str, bytes | str] | None = None,
    ) -> str:
        target = topic or self._default_topic
        if target is None:
            raise PermanentFailure("ctx.emit() without topic= on a route that has no output_topic")
        # The n-th output of an input gets the same id on every run, so a re-run after a
        # crash re-emits ids that a downstream idempotent consumer skips.
        output_id = f"{self.message.id}:{len(self.outputs)}"
        extra = [(name, value) for name, value in (headers or {}).items()]
        if topic is None and self._correlation is not None:
            extra.append(self._correlation)  # a reply carries the request's correlation id
        if self._cloudevent is not None:
            source, kind = self._cloudevent
            given = {name for name, _ in extra}
            event = [("ce_specversion", "1.0"), ("ce_id", output_id), ("ce_source", source)]
            event.append(("ce_type", kind))
            extra += [(name, value) for name, value in event if name not in given]
        if self._span is not None:
            extra += self._span.headers()
        self.outputs.append(Output(target, value, key, [(OUTPUT_ID_HEADER, output_id), *extra]))
        self._named.append(topic is not None)
        return output_id

    def kept(self) -> list[Kept]:
        """The outputs so far as kept for producing again (see replies.py)."""
        correlated = self._correlation is not None
        return [
            keep(output, named, correlated and not named)
            for output, named in zip(self.outputs, self._named, strict=True)
        ]

    def inbox(self, connection: object) -> InboxBlock:
        return InboxBlock(self._inbox, self, connection)

    def enter_inbox(self) -> None:
        if self._inbox_entered:
            raise PermanentFailure("ctx.inbox() can be entered once per run of a handler")
        self._inbox_entered = True
        self._inbox_started = time.time_ns()

    def leave_inbox(self) -> None:
        """The inbox block ended (committed, rolled back, or found the id applied)."""
        if self._span is not None:
            applied = self.applied is not None
            self._span.timed("inbox", self._inbox_started, time.time_ns(), applied=applied)
