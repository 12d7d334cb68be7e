"""One transaction on a handler's own database connection, whatever its driver.

psycopg 3 and SQLAlchemy are optional: nothing here imports them. A connection is
recognised by the modules its driver already loaded, since a handler holding one has
imported its driver. A connection already inside a transaction gets a savepoint,
and its effects commit when that outer transaction does.
"""

from __future__ import annotations

import sys
from typing import Any, Protocol

from idempotent_worker.inbox.sql import named

Row = tuple[Any, ...]
Params = dict[str, Any]


class Transaction(Protocol):
    def execute(self, statement: str, params: Params) -> list[Row]: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...


class AsyncTransaction(Protocol):
    async def execute(self, statement: str, params: Params) -> list[Row]: ...
    async def commit(self) -> None: ...
    async def rollback(self) -> None: ...


SUPPORTED = (
    "a psycopg Connection or AsyncConnection, or a SQLAlchemy Session or Connection on PostgreSQL"
)


def begin(connection: object) -> Transaction:
    """Open a transaction (or a savepoint) on a synchronous ``connection``."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is not None and isinstance(connection, psycopg.Connection):
        return _Psycopg(connection)
    if psycopg is not None and isinstance(connection, psycopg.AsyncConnection):
        raise TypeError("an AsyncConnection needs `async with ctx.inbox(conn)` in an async handler")
    orm = sys.modules.get("sqlalchemy.orm")
    engine = sys.modules.get("sqlalchemy.engine")
    if (orm is not None and isinstance(connection, orm.Session)) or (
        engine is not None and isinstance(connection, engine.Connection)
    ):
        return _SqlAlchemy(connection)
    raise TypeError(f"ctx.inbox() takes {SUPPORTED}, not {type(connection).__name__}")


async def begin_async(connection: object) -> AsyncTransaction:
    """Open a transaction (or a savepoint) on a psycopg ``AsyncConnection``."""
    psycopg = sys.modules.get("psycopg")
    if psycopg is None or not isinstance(connection, psycopg.AsyncConnection):
        raise TypeError(
            "`async with ctx.inbox(conn)` takes a psycopg AsyncConnection, "
            f"not {type(connection).__name__} (use `with` for a synchronous connection)"
        )
    transaction = _AsyncPsycopg(connection)
    await transaction.start()
    return transaction


class _Psycopg:
    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._block = connection.transaction()
        self._block.__enter__()

    def execute(self, statement: str, params: Params) -> list[Row]:
        cursor = self._connection.execute(statement, params)
        return list(cursor.fetchall()) if cursor.description else []

    def commit(self) -> None:
        self._block.__exit__(None, None, None)

    def rollback(self) -> None:
        # psycopg's block rolls back on any exception; this one only says so.
        self._block.__exit__(_RolledBack, _RolledBack(), None)


class _AsyncPsycopg:
    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._block = connection.transaction()

    async def start(self) -> None:
        await self._block.__aenter__()

    async def execute(self, statement: str, params: Params) -> list[Row]:
        cursor = await self._connection.execute(statement, params)
        return list(await cursor.fetchall()) if cursor.description else []

    async def commit(self) -> None:
        await self._block.__aexit__(None, None, None)

    async def rollback(self) -> None:
        await self._block.__aexit__(_RolledBack, _RolledBack(), None)


class _SqlAlchemy:
    def __init__(self, connection: Any) -> None:
        from sqlalchemy import text

        bind = connection.get_bind() if hasattr(connection, "get_bind") else connection
        dialect = bind.dialect.name
        if dialect != "postgresql":
            raise TypeError(f"the inbox needs PostgreSQL, not {dialect}")
        self._text = text
        self._connection = connection
        self._block = (
            connection.begin_nested() if connection.in_transaction() else connection.begin()
        )

    def execute(self, statement: str, params: Params) -> list[Row]:
        result = self._connection.execute(self._text(named(statement)), params)
        return [tuple(row) for row in result.fetchall()] if result.returns_rows else []

    def commit(self) -> None:
        self._block.commit()

    def rollback(self) -> None:
        self._block.rollback()


class _RolledBack(Exception):
    """Handed to psycopg's transaction block to make it roll back."""
