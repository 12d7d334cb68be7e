"""Database handlers for the inbox tests: each writes one business row per message to
``BUSINESS_TABLE`` (a table with no unique constraint, so a second run of a message's
effects is a second row) on the PostgreSQL database at ``INBOX_TEST_URL``."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from idempotent_worker import Context, Message

_local = threading.local()
_engine: Any = None


def _connection() -> psycopg.Connection[Any]:
    """One connection per handler thread, opened on first use."""
    if getattr(_local, "connection", None) is None:
        _local.connection = psycopg.connect(os.environ["INBOX_TEST_URL"])
    connection: psycopg.Connection[Any] = _local.connection
    return connection


def _insert() -> str:
    return f'INSERT INTO "{os.environ["BUSINESS_TABLE"]}" (message_id, value) VALUES (%s, %s)'


def _after_commit(message: Message, ctx: Context) -> None:
    """Linger after the commit (``AFTER_COMMIT_SECONDS``: the window a crash re-runs in)
    and kill the process the first time a run of an id in ``CRASH_IDS`` gets here (a
    marker file per id in ``CRASH_MARKERS`` remembers it across processes)."""
    time.sleep(float(os.environ.get("AFTER_COMMIT_SECONDS", "0")))
    if message.id in os.environ.get("CRASH_IDS", "").split(","):
        marker = Path(os.environ["CRASH_MARKERS"]) / message.id
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)


def inbox_row(message: Message, ctx: Context) -> None:
    conn = _connection()
    with ctx.inbox(conn):
        conn.execute(_insert(), (message.id, message.value))
        ctx.emit(message.value, key=message.key)
    _after_commit(message, ctx)


def plain_row(message: Message, ctx: Context) -> None:
    """The same effects without the inbox: a transaction of the handler's own."""
    conn = _connection()
    with conn.transaction():
        conn.execute(_insert(), (message.id, message.value))
        ctx.emit(message.value, key=message.key)
    _after_commit(message, ctx)


def inbox_stall(message: Message, ctx: Context) -> None:
    """Holds its transaction open for the value's seconds on the first run."""
    conn = _connection()
    with ctx.inbox(conn):
        conn.execute(_insert(), (message.id, message.value))
        if ctx.attempt == 1:
            time.sleep(float(message.value or b"0"))
        ctx.emit(message.value, key=message.key)


def inbox_flaky(message: Message, ctx: Context) -> None:
    """Writes, then fails inside the block on the first run: nothing may stay."""
    conn = _connection()
    with ctx.inbox(conn):
        conn.execute(_insert(), (message.id, message.value))
        ctx.emit(message.value, key=message.key)
        if ctx.attempt == 1:
            raise RuntimeError("failing after the write, inside the inbox")


async def inbox_async(message: Message, ctx: Context) -> None:
    url = os.environ["INBOX_TEST_URL"]
    async with await psycopg.AsyncConnection.connect(url) as conn, ctx.inbox(conn):
        await conn.execute(_insert(), (message.id, message.value))
        ctx.emit(message.value, key=message.key)


def inbox_sqlalchemy(message: Message, ctx: Context) -> None:
    global _engine
    if _engine is None:
        url = os.environ["INBOX_TEST_URL"].replace("postgresql://", "postgresql+psycopg://", 1)
        _engine = create_engine(url)
    statement = text(f'INSERT INTO "{os.environ["BUSINESS_TABLE"]}" VALUES (:id, :value)')
    with Session(_engine) as session, ctx.inbox(session):
        session.execute(statement, {"id": message.id, "value": message.value})
        ctx.emit(message.value, key=message.key)
