"""The inbox table and every statement the worker sends to it.

One row per (consumer group, message id) whose handler's database effects committed,
written in the same transaction as those effects. Statements use psycopg's
``%(name)s`` placeholders; :func:`named` turns them into SQLAlchemy's ``:name``.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

UNDEFINED_TABLE = "42P01"
"""SQLSTATE of a statement naming a table that does not exist."""


@dataclass(frozen=True, slots=True)
class Table:
    schema: str
    name: str

    @property
    def qualified(self) -> str:
        # Both parts are plain identifiers (checked by the settings); quoting keeps their case.
        return f'"{self.schema}"."{self.name}"'

    def ddl(self) -> list[str]:
        """The statements that create the table and its cleanup index if missing."""
        return [
            f"""CREATE TABLE IF NOT EXISTS {self.qualified} (
    consumer_group text NOT NULL,
    message_id text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now(),
    fingerprint text NOT NULL,
    origin text NOT NULL,
    outputs jsonb,
    PRIMARY KEY (consumer_group, message_id)
)""",
            f'CREATE INDEX IF NOT EXISTS "{self.name}_applied_at" '
            f"ON {self.qualified} (consumer_group, applied_at)",
        ]

    def enter(self) -> str:
        """Take the id's advisory lock without waiting and, if it was free, insert the
        id's row unless one exists: (lock taken, row inserted)."""
        return f"""WITH lock AS (SELECT pg_try_advisory_xact_lock(%(lock)s) AS taken),
inserted AS (
    INSERT INTO {self.qualified} (consumer_group, message_id, fingerprint, origin)
    SELECT %(group)s, %(id)s, %(fingerprint)s, %(origin)s FROM lock WHERE taken
    ON CONFLICT (consumer_group, message_id) DO NOTHING
    RETURNING 1
)
SELECT taken, EXISTS (SELECT 1 FROM inserted) FROM lock"""

    def applied(self) -> str:
        """The row of an id applied before: (fingerprint, origin, outputs as JSON text)."""
        return (
            f"SELECT fingerprint, origin, CAST(outputs AS text) FROM {self.qualified} "
            "WHERE consumer_group = %(group)s AND message_id = %(id)s"
        )

    def store_outputs(self) -> str:
        return (
            f"UPDATE {self.qualified} SET outputs = CAST(%(outputs)s AS jsonb) "
            "WHERE consumer_group = %(group)s AND message_id = %(id)s"
        )

    def delete_expired(self) -> str:
        """One bounded batch of the group's rows older than the TTL, oldest first; rows
        another transaction holds are left for the next round."""
        return f"""DELETE FROM {self.qualified} WHERE (consumer_group, message_id) IN (
    SELECT consumer_group, message_id FROM {self.qualified}
    WHERE consumer_group = %(group)s AND applied_at < now() - make_interval(secs => %(ttl)s)
    ORDER BY applied_at
    LIMIT %(batch)s
    FOR UPDATE SKIP LOCKED
)"""


CREATE_LOCK = "SELECT pg_advisory_xact_lock(%(lock)s)"
"""Serialises creating the table: two replicas running CREATE TABLE IF NOT EXISTS at
once can both try to create it, and one fails."""

TRY_CLEANUP_LOCK = "SELECT pg_try_advisory_lock(%(lock)s)"
CLEANUP_UNLOCK = "SELECT pg_advisory_unlock(%(lock)s)"


def lock_key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts`` (PostgreSQL's bigint)."""
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


_PLACEHOLDER = re.compile(r"%\((\w+)\)s")


def named(statement: str) -> str:
    """``statement`` with SQLAlchemy's ``:name`` placeholders."""
    return _PLACEHOLDER.sub(r":\1", statement)
