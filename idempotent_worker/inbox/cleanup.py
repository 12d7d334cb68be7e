"""Deletes inbox rows older than ``dedup.ttl_seconds``, from one replica at a time.

Every ``inbox.cleanup_interval_seconds`` a replica tries to take a session advisory
lock for its group; the one that gets it deletes expired rows in batches of
``inbox.cleanup_batch_size``, each batch a short transaction of its own (one unbounded
DELETE on a large table holds its locks for as long as it runs), until a batch comes
back short. It also creates the table at start-up if missing.
"""

from __future__ import annotations

import threading
from types import ModuleType
from typing import Any

from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.settings import Settings
from idempotent_worker.errors import ConfigError
from idempotent_worker.inbox.sql import (
    CLEANUP_UNLOCK,
    CREATE_LOCK,
    TRY_CLEANUP_LOCK,
    Table,
    lock_key,
)
from idempotent_worker.observe.metrics import Metrics


class InboxCleanup:
    def __init__(self, settings: Settings, metrics: Metrics, log: FilteringBoundLogger) -> None:
        self._psycopg = import_psycopg()
        inbox = settings.inbox
        assert inbox.url is not None
        self._url = inbox.url.get_secret_value()
        self._table = Table(inbox.schema_, inbox.table)
        self._group = settings.kafka.group_id
        self._ttl = settings.dedup.ttl_seconds
        self._batch = inbox.cleanup_batch_size
        self._interval = inbox.cleanup_interval_seconds
        self._metrics = metrics
        self._log = log.bind(table=self._table.qualified)
        self._connection: Any = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="inbox-cleanup", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._connection is not None:
            self._connection.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.round()
            except self._psycopg.Error as exc:
                self._log.warning("inbox cleanup failed; trying again later", error=str(exc))
                if self._connection is not None:
                    self._connection.close()
                    self._connection = None
            self._stop.wait(self._interval)

    def round(self) -> list[int] | None:
        """Delete what has expired, if no other replica is at it: the rows each batch
        deleted, or None when another replica holds the lock."""
        connection = self._connect()
        lock = {"lock": lock_key("cleanup", self._group)}
        if not connection.execute(TRY_CLEANUP_LOCK, lock).fetchone()[0]:
            return None
        batches: list[int] = []
        try:
            params = {"group": self._group, "ttl": self._ttl, "batch": self._batch}
            while not self._stop.is_set():
                deleted = connection.execute(self._table.delete_expired(), params).rowcount
                batches.append(deleted)
                self._metrics.inbox_rows_deleted.inc(deleted)
                if deleted < self._batch:
                    break
        finally:
            connection.execute(CLEANUP_UNLOCK, lock)
        if sum(batches):
            self._log.info("deleted expired inbox rows", rows=sum(batches), batches=len(batches))
        return batches

    def _connect(self) -> Any:
        if self._connection is None:
            # Bounded: a server that vanished without closing (a network partition) fails
            # the call instead of holding the cleanup thread forever.
            connection = self._psycopg.connect(
                self._url,
                autocommit=True,
                connect_timeout=10,
                keepalives=1,
                keepalives_idle=10,
                keepalives_interval=5,
                keepalives_count=3,
                options="-c statement_timeout=60000",
            )
            with connection.transaction():
                connection.execute(CREATE_LOCK, {"lock": lock_key("create", self._group)})
                for statement in self._table.ddl():
                    connection.execute(statement)
            self._connection = connection
        return self._connection


def import_psycopg() -> ModuleType:
    """psycopg, which the worker's own inbox connection (``inbox.url``) needs."""
    try:
        import psycopg
    except ImportError:
        raise ConfigError(
            "inbox.url", "needs psycopg: pip install 'idempotent-worker[postgres]'"
        ) from None
    return psycopg
