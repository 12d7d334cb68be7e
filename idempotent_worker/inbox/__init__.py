"""The transactional inbox: ``with ctx.inbox(conn):`` makes a handler's database writes
and the record "this message id is applied" one transaction.

Entering the block opens a transaction on the handler's connection and inserts the
id's row into the inbox table. The body's writes and that row commit together when the
block ends, and roll back together if it raises. If the row is already there, an
earlier run committed its effects and died before Redis heard of it: the body must not
run, so entering raises :class:`AlreadyApplied`, and the worker produces the outputs
that earlier run stored in the row, then completes the id.

Replicas never run an id's body at once while their Redis claims hold. When they do (a
replica frozen past its lease with its transaction open), an advisory lock on the id
makes the second one wait, at most ``inbox.lock_timeout_ms``, then retry the message
with backoff; whichever transaction commits first applies the effects, and the other
finds the row and applies nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.settings import InboxSettings
from idempotent_worker.errors import PermanentFailure, RetryLater
from idempotent_worker.inbox.drivers import (
    AsyncTransaction,
    Params,
    Row,
    Transaction,
    begin,
    begin_async,
)
from idempotent_worker.inbox.sql import CREATE_LOCK, UNDEFINED_TABLE, Table, lock_key
from idempotent_worker.replies import Kept, decode, encode, size


class Run(Protocol):
    """What an inbox block needs of the handler's run (the handler context has it)."""

    fingerprint: str
    origin: str
    applied: Applied | None

    @property
    def message_id(self) -> str: ...

    def enter_inbox(self) -> None: ...

    def leave_inbox(self) -> None: ...

    def kept(self) -> list[Kept]: ...


LOCK_POLL_SECONDS = 0.05


class AlreadyApplied(BaseException):
    """Raised by entering ``ctx.inbox()`` when an earlier run of the id committed: the
    body must not run. Not an ``Exception``, so ``except Exception`` in a handler does
    not swallow it (and the worker knows even if something does)."""


@dataclass(frozen=True, slots=True)
class Applied:
    """The inbox row of an id whose effects an earlier run committed."""

    fingerprint: str
    origin: str
    outputs: list[Kept]


class Inbox:
    """What every ``ctx.inbox()`` block of one worker shares: the table and its limits."""

    def __init__(self, settings: InboxSettings, group: str, log: FilteringBoundLogger) -> None:
        self.table = Table(settings.schema_, settings.table)
        self.group = group
        self.lock_timeout = settings.lock_timeout_ms / 1000
        self.max_output_bytes = settings.max_output_bytes
        self._log = log
        self._cleaned = settings.url is not None
        self._used = False

    def first_use(self) -> None:
        if not self._used:
            self._used = True
            if not self._cleaned:
                self._log.warning(
                    "a handler uses the inbox and inbox.url is not set: old inbox rows "
                    "will not be deleted",
                    table=self.table.qualified,
                )


class InboxBlock:
    """``with ctx.inbox(conn):`` (or ``async with``) around a handler's database work."""

    def __init__(self, inbox: Inbox, ctx: Run, connection: object) -> None:
        self._inbox = inbox
        self._ctx = ctx
        self._connection = connection
        self._transaction: Transaction | None = None
        self._async_transaction: AsyncTransaction | None = None
        id = ctx.message_id
        self._row: Params = {
            "group": inbox.group,
            "id": id,
            "fingerprint": ctx.fingerprint,
            "origin": ctx.origin,
            "lock": lock_key(inbox.group, id),
        }

    # -- with ------------------------------------------------------------------------

    def __enter__(self) -> None:
        self._ctx.enter_inbox()
        try:
            self._begin()
        except BaseException:  # AlreadyApplied included: the block ends here
            self._ctx.leave_inbox()
            raise

    def _begin(self) -> None:
        self._inbox.first_use()
        deadline = time.monotonic() + self._inbox.lock_timeout
        created = False
        while True:
            transaction = begin(self._connection)
            try:
                taken, inserted = transaction.execute(self._inbox.table.enter(), self._row)[0]
                if inserted:
                    self._transaction = transaction
                    return
                row = transaction.execute(self._inbox.table.applied(), self._row) if taken else []
            except Exception as exc:
                transaction.rollback()
                if created or _sqlstate(exc) != UNDEFINED_TABLE:
                    raise
                self._create_table()
                created = True
                continue
            transaction.rollback()
            self._found(row, deadline)
            time.sleep(LOCK_POLL_SECONDS)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self._end(kind)
        finally:
            self._ctx.leave_inbox()

    def _end(self, kind: type[BaseException] | None) -> None:
        transaction = self._transaction
        assert transaction is not None
        if kind is not None:
            transaction.rollback()
            return
        try:
            if outputs := self._stored_outputs():
                transaction.execute(self._inbox.table.store_outputs(), outputs)
        except BaseException:
            transaction.rollback()
            raise
        transaction.commit()

    def _create_table(self) -> None:
        transaction = begin(self._connection)
        try:
            transaction.execute(CREATE_LOCK, {"lock": lock_key("create", self._inbox.group)})
            for statement in self._inbox.table.ddl():
                transaction.execute(statement, {})
        except BaseException:
            transaction.rollback()
            raise
        transaction.commit()

    # -- async with ------------------------------------------------------------------

    async def __aenter__(self) -> None:
        self._ctx.enter_inbox()
        try:
            await self._begin_async()
        except BaseException:
            self._ctx.leave_inbox()
            raise

    async def _begin_async(self) -> None:
        self._inbox.first_use()
        deadline = time.monotonic() + self._inbox.lock_timeout
        created = False
        while True:
            transaction = await begin_async(self._connection)
            try:
                rows = await transaction.execute(self._inbox.table.enter(), self._row)
                taken, inserted = rows[0]
                if inserted:
                    self._async_transaction = transaction
                    return
                row = (
                    await transaction.execute(self._inbox.table.applied(), self._row)
                    if taken
                    else []
                )
            except Exception as exc:
                await transaction.rollback()
                if created or _sqlstate(exc) != UNDEFINED_TABLE:
                    raise
                await self._create_table_async()
                created = True
                continue
            await transaction.rollback()
            self._found(row, deadline)
            await asyncio.sleep(LOCK_POLL_SECONDS)

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._end_async(kind)
        finally:
            self._ctx.leave_inbox()

    async def _end_async(self, kind: type[BaseException] | None) -> None:
        transaction = self._async_transaction
        assert transaction is not None
        if kind is not None:
            await transaction.rollback()
            return
        try:
            if outputs := self._stored_outputs():
                await transaction.execute(self._inbox.table.store_outputs(), outputs)
        except BaseException:
            await transaction.rollback()
            raise
        await transaction.commit()

    async def _create_table_async(self) -> None:
        transaction = await begin_async(self._connection)
        try:
            lock = {"lock": lock_key("create", self._inbox.group)}
            await transaction.execute(CREATE_LOCK, lock)
            for statement in self._inbox.table.ddl():
                await transaction.execute(statement, {})
        except BaseException:
            await transaction.rollback()
            raise
        await transaction.commit()

    # -- shared by both ----------------------------------------------------------------

    def _found(self, row: list[Row], deadline: float) -> None:
        """The id's row was not inserted: raise if it exists (applied before) or if the
        other transaction holding the id's lock did not finish in time."""
        if row:
            fingerprint, origin, outputs = row[0]
            applied = Applied(fingerprint, origin, decode(outputs))
            self._ctx.applied = applied
            raise AlreadyApplied
        if time.monotonic() >= deadline:
            raise RetryLater(
                f"another transaction holds inbox id {self._ctx.message_id!r} for longer than "
                f"inbox.lock_timeout_ms ({self._inbox.lock_timeout * 1000:g} ms): a replica "
                "paused mid-transaction?"
            )

    def _stored_outputs(self) -> Params | None:
        outputs = self._ctx.kept()
        if not outputs:
            return None
        limit = self._inbox.max_output_bytes
        if (bytes := size(outputs)) > limit:
            raise PermanentFailure(
                f"the outputs of this run take {bytes} bytes, over inbox.max_output_bytes "
                f"({limit}): its transaction was rolled back"
            )
        return {**self._row, "outputs": encode(outputs)}


def _sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a driver's error: psycopg's own, or wrapped by SQLAlchemy."""
    for error in (exc, getattr(exc, "orig", None)):
        code = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(code, str):
            return code
    return None
