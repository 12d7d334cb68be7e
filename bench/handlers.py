"""Handlers the benchmark routes to. Each records the ids it ran in ``tally``, in this
process, so the benchmark can check at the end that every id ran exactly once."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from idempotent_worker import Context, Message


class Tally:
    """How many times each id ran: one byte per id, allocated up front, so that counting
    a million runs does not grow the process whose memory is being measured. The ids
    are the benchmark's own, ``b-<n>`` for n in ``range(count)``."""

    def __init__(self, count: int) -> None:
        self.counts = bytearray(count)
        self.total = 0
        self.first = self.last = 0.0
        self._lock = threading.Lock()

    def record(self, *ids: str) -> None:
        now = time.perf_counter()
        with self._lock:
            if not self.total:
                self.first = now
            for id in ids:
                self.counts[int(id[2:])] += 1
            self.total += len(ids)
            self.last = now

    def expect_once(self, name: str) -> None:
        never = self.counts.count(0)
        more = len(self.counts) - never - self.counts.count(1)
        if never or more:
            raise AssertionError(
                f"{name}: {never} ids never handled, {more} handled more than once"
            )


tally = Tally(0)


def reset(count: int) -> None:
    global tally
    tally = Tally(count)


def noop(message: Message, ctx: Context) -> None:
    tally.record(message.id)


def emits_one(message: Message, ctx: Context) -> None:
    """The ordinary case: one output per message, to the route's output topic."""
    tally.record(message.id)
    ctx.emit(message.value)


def emits_one_batch(batch: list[tuple[Message, Context]]) -> None:
    """The same on a batch route: a partition's messages in one call, one output each."""
    tally.record(*(message.id for message, _ in batch))
    for message, ctx in batch:
        ctx.emit(message.value)


class Sequence:
    versions = 1
    """Events per entity in bench/sequence.py's histories."""


def noop_sequence(message: Message, ctx: Context) -> None:
    """A no-op for sequence routes: ``e-<entity>@<version>`` is tallied as the id
    bench/sequence.py gave the same event, ``b-<entity * versions + version - 1>``."""
    entity, version = message.id.rsplit("@", 1)
    tally.record(f"b-{int(entity[2:]) * Sequence.versions + int(version) - 1}")


def sleeps_10ms(message: Message, ctx: Context) -> None:
    time.sleep(0.01)
    tally.record(message.id)


async def sleeps_10ms_async(message: Message, ctx: Context) -> None:
    await asyncio.sleep(0.01)
    tally.record(message.id)


class Database:
    """Where the database handlers write: a URL and a table with no constraint, one
    connection per handler thread."""

    url = ""
    table = ""
    local = threading.local()

    @classmethod
    def connection(cls) -> Any:
        if getattr(cls.local, "connection", None) is None:
            import psycopg

            cls.local.connection = psycopg.connect(cls.url)
        return cls.local.connection

    @classmethod
    def insert(cls) -> str:
        return f'INSERT INTO "{cls.table}" (message_id, value) VALUES (%s, %s)'


def db_row(message: Message, ctx: Context) -> None:
    """One row per message in a transaction of its own, without the inbox."""
    conn = Database.connection()
    with conn.transaction():
        conn.execute(Database.insert(), (message.id, message.value))
    tally.record(message.id)


def db_row_inbox(message: Message, ctx: Context) -> None:
    """The same row, in the inbox's transaction."""
    conn = Database.connection()
    with ctx.inbox(conn):
        conn.execute(Database.insert(), (message.id, message.value))
    tally.record(message.id)
