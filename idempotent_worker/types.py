"""The handler API: what a handler receives and what it may call.

A handler is a plain function ``handle(message, ctx) -> None`` named in the
configuration by its import path, e.g. ``"idempotent_worker.examples.orders:handle"``.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from structlog.typing import FilteringBoundLogger


@dataclass(frozen=True, slots=True)
class Message:
    """One consumed Kafka record, with the id the route extracted from it."""

    id: str
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: Mapping[str, bytes] = field(default_factory=dict)
    timestamp: int | None = None
    """Milliseconds since the epoch, as Kafka reports it, or None when the broker gave none."""

    def json(self) -> Any:
        """The value decoded as JSON (raises ``ValueError`` on a value that is not JSON)."""
        if self.value is None:
            raise ValueError("message has no value")
        return json.loads(self.value)


class InboxBlock(Protocol):
    """What ``ctx.inbox(connection)`` returns: entered with ``with`` (or ``async with``
    for an asynchronous connection) around the handler's database work."""

    def __enter__(self) -> None: ...

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    async def __aenter__(self) -> None: ...

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class Context(Protocol):
    """What a handler can do besides reading its message."""

    @property
    def attempt(self) -> int:
        """1 on the first run of this message id, 2 on the first retry, and so on."""

    @property
    def logger(self) -> FilteringBoundLogger:
        """A logger bound to topic, partition, offset and message id."""

    def emit(
        self,
        value: bytes | str | None,
        *,
        topic: str | None = None,
        key: bytes | str | None = None,
        headers: Mapping[str, bytes | str] | None = None,
    ) -> str:
        """Produce an output through the worker's idempotent producer.

        Goes to the route's ``output_topic`` unless ``topic`` is given. The output
        carries a ``message-id`` header derived from the input id and the
        output's position, which is returned. Outputs are confirmed delivered
        before the input is marked completed and its offset committed.
        """

    def inbox(self, connection: object) -> InboxBlock:
        """The transactional inbox around this handler's database work:
        ``with ctx.inbox(conn):`` (psycopg ``Connection``, SQLAlchemy ``Session`` or
        ``Connection``) or ``async with ctx.inbox(aconn):`` (psycopg ``AsyncConnection``).

        The block's writes commit together with a row recording this message id, and
        the outputs emitted so far are stored in that row. If an earlier run already
        committed, the body does not run: the worker produces that run's stored
        outputs and completes the message. At most one block per run.
        """


Handler = Callable[[Message, Context], Awaitable[None] | None]
"""The type of a handler function: a plain function, or an ``async def`` one."""

BatchResults = Sequence[Exception | None] | None
"""What a batch handler returns: None if every message succeeded, else one entry per
message, in order: None (it succeeded) or the exception it failed with."""

BatchHandler = Callable[[list[tuple[Message, Context]]], Awaitable[BatchResults] | BatchResults]
"""A route with ``batch = true``: one call per partition of a poll batch."""
