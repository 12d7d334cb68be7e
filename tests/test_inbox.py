"""The transactional inbox against a real PostgreSQL: what one ``ctx.inbox()`` block
commits, skips, rolls back, waits for and stores, with each supported driver, and the
cleanup of old rows. The worker-level and fault scenarios are in test_inbox_worker.py."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from idempotent_worker.config.settings import InboxSettings, Settings, load_settings
from idempotent_worker.errors import ConfigError, PermanentFailure, RetryLater
from idempotent_worker.inbox import AlreadyApplied, Inbox
from idempotent_worker.inbox.cleanup import InboxCleanup
from idempotent_worker.inbox.sql import Table
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.processing.context import HandlerContext
from idempotent_worker.types import Message

pytestmark = pytest.mark.integration

LOG = structlog.get_logger()


@pytest.fixture
def names() -> Callable[[str], str]:
    """Table, schema and group names no other test uses."""
    return lambda kind: f"{kind}_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def conn(postgres_url: str) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(postgres_url) as connection:
        yield connection


@pytest.fixture
def business(conn: psycopg.Connection[Any], names: Callable[[str], str]) -> str:
    table = names("pay")
    conn.execute(f'CREATE TABLE "{table}" (message_id text, value bytea)')
    conn.commit()
    return table


@pytest.fixture
def inbox(names: Callable[[str], str]) -> Inbox:
    return Inbox(InboxSettings(table=names("inbox"), lock_timeout_ms=300), names("group"), LOG)


def context(inbox: Inbox, id: str, value: bytes = b"v", attempt: int = 1) -> HandlerContext:
    message = Message(id, "orders", 0, 7, b"k", value)
    return HandlerContext(message, attempt, lambda: LOG, "out", inbox, "fp-" + id, "orders/0/7")


def applied(inbox: Inbox, conn: psycopg.Connection[Any], id: str) -> HandlerContext:
    """A run whose only effect is its output: the inbox row holds it."""
    ctx = context(inbox, id)
    with ctx.inbox(conn):
        ctx.emit(f"{id} applied")
    return ctx


def rows(conn: psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    result = conn.execute(f'SELECT * FROM "{table}" ORDER BY 1').fetchall()
    conn.commit()
    return result


def inbox_rows(conn: psycopg.Connection[Any], inbox: Inbox) -> list[tuple[Any, ...]]:
    query = f"SELECT message_id, fingerprint, origin FROM {inbox.table.qualified} ORDER BY 1"
    result = conn.execute(query).fetchall()
    conn.commit()
    return result


def test_the_body_commits_with_the_row_and_a_second_run_gets_the_first_ones_outputs(
    conn, business, inbox
):
    first = context(inbox, "a")
    with first.inbox(conn):  # the table does not exist yet: created on first use
        conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("a", b"v"))
        first.emit("paid", key=b"k", headers={"h": b"\x00\xff"})
        first.emit(b"\x01", topic="audit")
    assert rows(conn, business) == [("a", b"v")]
    assert inbox_rows(conn, inbox) == [("a", "fp-a", "orders/0/7")]

    second = context(inbox, "a", attempt=2)
    ran = False
    with pytest.raises(AlreadyApplied), second.inbox(conn):
        ran = True
    assert not ran
    assert second.applied is not None
    assert (second.applied.fingerprint, second.applied.origin) == ("fp-a", "orders/0/7")
    stored = [(o.topic, o.key, o.value, o.headers) for o in second.applied.outputs]
    assert stored == [  # no topic: the route's default for the message that produces it
        (None, b"k", b"paid", [("message-id", b"a:0"), ("h", b"\x00\xff")]),
        ("audit", None, b"\x01", [("message-id", b"a:1")]),
    ]
    assert rows(conn, business) == [("a", b"v")]


def test_a_body_that_raises_leaves_neither_its_writes_nor_the_row(conn, business, inbox):
    ctx = context(inbox, "b")
    with pytest.raises(ZeroDivisionError), ctx.inbox(conn):
        conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("b", b"v"))
        ctx.emit("lost")
        1 / 0  # noqa: B018
    assert rows(conn, business) == []
    assert inbox_rows(conn, inbox) == []
    retry = context(inbox, "b", attempt=2)
    with retry.inbox(conn):
        conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("b", b"v"))
    assert rows(conn, business) == [("b", b"v")]


def test_inside_an_open_transaction_the_inbox_is_a_savepoint_of_it(conn, business, inbox):
    applied(inbox, conn, "first")  # creates the table, outside the test's transaction
    conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("before", b""))
    ctx = context(inbox, "c")
    with ctx.inbox(conn):
        conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("c", b"v"))
    conn.rollback()  # the caller's transaction decides: neither row stays
    assert rows(conn, business) == []
    assert [row[0] for row in inbox_rows(conn, inbox)] == ["first"]


def test_a_transaction_holding_the_id_bounds_the_wait_then_decides(
    postgres_url, conn, business, inbox
):
    zombie = context(inbox, "z")
    block = zombie.inbox(conn)
    block.__enter__()  # its transaction stays open: a replica paused mid-handler
    conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("z", b"zombie"))
    zombie.emit("from the zombie")
    with psycopg.connect(postgres_url) as other:
        started = time.monotonic()
        successor = context(inbox, "z", attempt=2)
        held = r"inbox.lock_timeout_ms \(300 ms\)"
        with pytest.raises(RetryLater, match=held), successor.inbox(other):
            pytest.fail("the body ran while another transaction held the id")
        assert 0.3 <= time.monotonic() - started < 2
        block.__exit__(None, None, None)  # the zombie commits first: its effects stand
        again = context(inbox, "z", attempt=3)
        with pytest.raises(AlreadyApplied), again.inbox(other):
            pytest.fail("the body ran after the zombie committed")
    assert again.applied is not None
    assert [o.value for o in again.applied.outputs] == [b"from the zombie"]
    assert rows(conn, business) == [("z", b"zombie")]


def test_a_waiting_run_proceeds_at_once_when_the_holder_rolls_back(
    postgres_url, conn, business, inbox
):
    holder = context(inbox, "r")
    block = holder.inbox(conn)
    block.__enter__()
    threading.Timer(0.1, block.__exit__, (RuntimeError, RuntimeError(), None)).start()
    with psycopg.connect(postgres_url) as other:
        successor = context(inbox, "r", attempt=2)
        with successor.inbox(other):
            other.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("r", b"successor"))
    assert rows(conn, business) == [("r", b"successor")]


def test_outputs_over_the_cap_fail_permanently_and_roll_back(conn, business, names):
    inbox = Inbox(InboxSettings(table=names("inbox"), max_output_bytes=100), "g", LOG)
    ctx = context(inbox, "big")
    with pytest.raises(PermanentFailure, match=r"over inbox\.max_output_bytes"), ctx.inbox(conn):
        conn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', ("big", b""))
        ctx.emit(b"x" * 101)
    assert rows(conn, business) == []
    assert inbox_rows(conn, inbox) == []


def test_one_block_per_run(conn, inbox):
    ctx = applied(inbox, conn, "twice")
    with pytest.raises(PermanentFailure, match="once per run"), ctx.inbox(conn):
        pytest.fail("a second block ran")


def test_a_connection_of_another_kind_is_refused_by_name(conn, inbox, postgres_url):
    wrong = r"psycopg Connection .* not str"
    with pytest.raises(TypeError, match=wrong), context(inbox, "x").inbox("postgresql://"):
        pytest.fail("entered with a string")

    async def mixed_up() -> None:
        async with await psycopg.AsyncConnection.connect(postgres_url) as aconn:
            with (
                pytest.raises(TypeError, match="needs `async with"),
                context(inbox, "y").inbox(aconn),
            ):
                pytest.fail("entered an AsyncConnection synchronously")
        with pytest.raises(TypeError, match="takes a psycopg AsyncConnection, not Connection"):
            async with context(inbox, "y").inbox(conn):
                pytest.fail("entered a Connection asynchronously")

    asyncio.run(mixed_up())
    sqlite = create_engine("sqlite://")
    with (
        Session(sqlite) as session,
        pytest.raises(TypeError, match="PostgreSQL, not sqlite"),
        context(inbox, "z").inbox(session),
    ):
        pytest.fail("entered on SQLite")


def test_async_connection(postgres_url, conn, business, inbox):
    async def handle(id: str, attempt: int) -> HandlerContext:
        ctx = context(inbox, id, attempt=attempt)
        async with await psycopg.AsyncConnection.connect(postgres_url) as aconn:
            with contextlib.suppress(AlreadyApplied):  # the second run: ctx.applied says so
                async with ctx.inbox(aconn):
                    await aconn.execute(f'INSERT INTO "{business}" VALUES (%s, %s)', (id, b"v"))
                    ctx.emit("async")
        return ctx

    first = asyncio.run(handle("async", 1))
    second = asyncio.run(handle("async", 2))
    assert first.applied is None
    assert second.applied is not None and second.applied.outputs[0].value == b"async"
    assert rows(conn, business) == [("async", b"v")]


@pytest.mark.parametrize("kind", ["Session", "Connection"])
def test_sqlalchemy(postgres_url, conn, business, inbox, kind):
    engine = create_engine(postgres_url.replace("postgresql://", "postgresql+psycopg://", 1))
    insert = text(f'INSERT INTO "{business}" VALUES (:id, :value)')

    def handle(attempt: int) -> HandlerContext:
        ctx = context(inbox, kind, attempt=attempt)
        opened = Session(engine) if kind == "Session" else engine.connect()
        # The second run raises AlreadyApplied on entering: ctx.applied tells.
        with opened as db, contextlib.suppress(AlreadyApplied), ctx.inbox(db):
            db.execute(insert, {"id": kind, "value": b"v"})
            ctx.emit(kind)
        return ctx

    assert handle(1).applied is None
    applied = handle(2).applied
    assert applied is not None and applied.outputs[0].value == kind.encode()
    assert rows(conn, business) == [(kind, b"v")]
    engine.dispose()


def test_a_table_in_its_own_schema(conn, names):
    schema = names("schema")
    conn.execute(f'CREATE SCHEMA "{schema}"')
    conn.commit()
    inbox = Inbox(InboxSettings(schema=schema, table="Inbox"), "g", LOG)
    applied(inbox, conn, "s")
    assert inbox_rows(conn, inbox) == [("s", "fp-s", "orders/0/7")]


def test_inbox_ddl_prints_what_the_worker_creates(conn, names, tmp_path):
    table = names("migrated")
    load_inbox(tmp_path, f'table = "{table}"')  # writes tmp_path / "worker.toml"
    config = tmp_path / "worker.toml"
    argv = [sys.executable, "-m", "idempotent_worker", "inbox", "ddl", "--config", str(config)]
    ddl = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    assert f'CREATE TABLE IF NOT EXISTS "public"."{table}"' in ddl
    for statement in filter(str.strip, ddl.split(";")):
        conn.execute(statement)  # as a migration tool would run it
    conn.commit()
    inbox = Inbox(InboxSettings(table=table), "g", LOG)
    applied(inbox, conn, "m")
    assert inbox_rows(conn, inbox) == [("m", "fp-m", "orders/0/7")]


def cleanup_settings(postgres_url: str, table: str, group: str, batch: int) -> Settings:
    return Settings(
        kafka={"bootstrap_servers": "x:9092", "group_id": group},
        redis={"url": "redis://x"},
        dedup={"ttl_seconds": 3600},
        inbox={"url": postgres_url, "table": table, "cleanup_batch_size": batch},
        routes=[{"topic": "t", "handler": "a:b"}],
    )


def load_inbox(tmp_path: Path, inbox: str) -> Settings:
    config = tmp_path / "worker.toml"
    config.write_text(
        '[kafka]\nbootstrap_servers = "x:9092"\ngroup_id = "g"\n[redis]\nurl = "redis://x"\n'
        f'[inbox]\n{inbox}\n[[routes]]\ntopic = "t"\nhandler = "a:b"\n'
    )
    return load_settings(config)


def test_cleanup_deletes_only_the_groups_expired_rows_in_bounded_batches(postgres_url, conn, names):
    table = names("inbox")
    settings = cleanup_settings(postgres_url, table, "g", batch=10)
    registry = CollectorRegistry()
    cleanup = InboxCleanup(settings, Metrics(registry), LOG)
    try:
        assert cleanup.round() == [0]  # creates the table
        insert = (
            f'INSERT INTO "public"."{table}" (consumer_group, message_id, applied_at, '
            "fingerprint, origin) VALUES (%s, %s, now() - make_interval(secs => %s), '', '')"
        )
        rows = [("g", f"old-{n}", 3601 + n) for n in range(25)]
        rows += [("g", f"new-{n}", 3500) for n in range(5)]
        rows += [("other", f"old-{n}", 7200) for n in range(3)]
        with conn.cursor() as cursor:
            cursor.executemany(insert, rows)
        conn.commit()

        with psycopg.connect(postgres_url, autocommit=True) as rival:
            rival.execute("SELECT pg_advisory_lock(%s)", (cleanup_lock("g"),))
            assert cleanup.round() is None  # another replica is cleaning
            rival.execute("SELECT pg_advisory_unlock(%s)", (cleanup_lock("g"),))
        assert cleanup.round() == [10, 10, 5]
    finally:
        cleanup.close()
    left = conn.execute(f'SELECT consumer_group, message_id FROM "{table}" ORDER BY 1, 2')
    assert [f"{g}/{id}" for g, id in left.fetchall()] == [
        *(f"g/new-{n}" for n in range(5)),
        *(f"other/old-{n}" for n in range(3)),
    ]
    assert registry.get_sample_value("idempotent_worker_inbox_rows_deleted_total") == 25


def cleanup_lock(group: str) -> int:
    from idempotent_worker.inbox.sql import lock_key

    return lock_key("cleanup", group)


def test_inbox_settings_are_checked_by_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^inbox.url: must be a postgresql:// URL$"):
        load_inbox(tmp_path, 'url = "mysql://u:secret@h/db"')
    with pytest.raises(ConfigError, match=r"^inbox.schema: String should match"):
        load_inbox(tmp_path, 'schema = "bad\\"name"')
    settings = load_inbox(tmp_path, 'url = "postgresql://u:secret@h/db"\nschema = "app"')
    assert settings.inbox.schema_ == "app"
    assert "secret" in settings.secret_values()


def test_the_ddl_of_the_default_table():
    statements = Table("public", "idempotent_worker_inbox").ddl()
    assert "PRIMARY KEY (consumer_group, message_id)" in statements[0]
    assert '"idempotent_worker_inbox_applied_at"' in statements[1]
