"""The inbox through the worker: in this process against the real broker, Redis and
PostgreSQL, then as real processes that crash right after their transaction
committed, die in a SIGKILL storm, or freeze mid-transaction past their lease."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import psycopg
import pytest
import structlog

from idempotent_worker.config.settings import InboxSettings
from idempotent_worker.dedup import State
from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.inbox import Inbox
from idempotent_worker.inbox.sql import lock_key
from idempotent_worker.local.demo import metric_sum, read_all, scrape
from idempotent_worker.processing.context import HandlerContext
from idempotent_worker.types import Message
from tests.support.chaos import PARTITIONS, Row, Scenario, message_ids, report, wait_until
from tests.support.harness import make_settings, run_worker
from tests.support.kafka import produce, with_id

HANDLERS = "tests.support.inbox_handlers"


class Database:
    """The business table the handlers write one row per run of a message's effects to."""

    def __init__(self, url: str, table: str) -> None:
        self.url = url
        self.table = table
        with psycopg.connect(url) as conn:
            conn.execute(f'CREATE TABLE "{table}" (message_id text, value bytea)')

    @property
    def env(self) -> dict[str, str]:
        return {"INBOX_TEST_URL": self.url, "BUSINESS_TABLE": self.table}

    def doubled(self) -> bool:
        """Whether some message id has more than one business row."""
        with psycopg.connect(self.url) as conn:
            query = f'SELECT 1 FROM "{self.table}" GROUP BY message_id HAVING count(*) > 1'
            return conn.execute(query).fetchone() is not None

    def rows(self) -> Counter[str]:
        """Business rows per message id."""
        with psycopg.connect(self.url) as conn:
            query = f'SELECT message_id FROM "{self.table}"'
            return Counter(id for (id,) in conn.execute(query).fetchall())


@pytest.fixture
def database(postgres_url: str) -> Database:
    return Database(postgres_url, f"business_{uuid.uuid4().hex[:12]}")


# -- in this process --------------------------------------------------------------------


@pytest.fixture
def env(kafka_bootstrap, redis_url, unique_name, make_topics, database, monkeypatch):
    for name, value in database.env.items():
        monkeypatch.setenv(name, value)
    topic = unique_name("in")
    make_topics({topic: 3, f"{topic}.out": 3, f"{topic}.dlq": 1})
    group = unique_name("group")

    class Env:
        input = topic
        output = f"{topic}.out"

        def settings(self, handler: str, **sections: Any) -> Any:
            route = {
                "topic": topic,
                "handler": f"{HANDLERS}:{handler}",
                "output_topic": self.output,
            }
            return make_settings(kafka_bootstrap, redis_url, group, [route], **sections)

        def outputs(self) -> Counter[str]:
            return message_ids(kafka_bootstrap, self.output)

        def store(self) -> RedisDedupStore:
            return RedisDedupStore.from_url(redis_url, f"test:{group}")

        group_id = group

    return Env()


@pytest.mark.integration
@pytest.mark.parametrize("handler", ["inbox_row", "inbox_async", "inbox_sqlalchemy"])
def test_each_driver_applies_each_id_once(env, database, kafka_bootstrap, handler):
    records = [with_id(f"id-{n}", partition=n % 3) for n in range(12)]
    records += [with_id(f"id-{n}", partition=(n + 1) % 3) for n in range(0, 12, 2)]
    produce(kafka_bootstrap, env.input, records)
    run = run_worker(env.settings(handler), max_messages=len(records))
    assert database.rows() == {f"id-{n}": 1 for n in range(12)}
    assert env.outputs() == {f"id-{n}:0": 1 for n in range(12)}
    assert run.value("duplicates_skipped_total", topic=env.input, reason="duplicate") == 6


@pytest.mark.integration
def test_a_failed_body_is_rolled_back_then_retried(env, database, kafka_bootstrap):
    produce(kafka_bootstrap, env.input, [with_id(f"f-{n}", partition=n % 3) for n in range(6)])
    run = run_worker(env.settings("inbox_flaky"), max_messages=6)
    assert database.rows() == {f"f-{n}": 1 for n in range(6)}
    assert env.outputs() == {f"f-{n}:0": 1 for n in range(6)}
    assert run.value("messages_processed_total", topic=env.input, outcome="failed") == 6
    assert run.value("messages_processed_total", topic=env.input, outcome="success") == 6


@pytest.mark.integration
def test_an_id_applied_by_a_run_that_died_is_completed_with_its_stored_outputs(
    env, database, kafka_bootstrap
):
    # What a run that died between its commit and Redis leaves: the row and its outputs.
    inbox = Inbox(InboxSettings(), env.group_id, structlog.get_logger())
    message = Message("died", env.input, 0, 0, b"died", b'{"id": "died"}')
    first = HandlerContext(message, 1, structlog.get_logger, env.output, inbox, "", "x/0/0")
    with psycopg.connect(database.url) as conn, first.inbox(conn):
        conn.execute(f'INSERT INTO "{database.table}" VALUES (%s, %s)', ("died", b"first"))
        first.emit(b"from the first run", key=b"died", headers={"h": "1"})

    produce(kafka_bootstrap, env.input, [with_id("died"), with_id("fresh")])
    run = run_worker(env.settings("inbox_row"), max_messages=2)
    assert database.rows() == {"died": 1, "fresh": 1}  # the body did not run again
    assert run.value("duplicates_skipped_total", topic=env.input, reason="inbox") == 1
    assert run.value("messages_processed_total", topic=env.input, outcome="success") == 1
    replayed = [
        (headers, value)
        for headers, value in read_all(kafka_bootstrap, env.output)
        if headers["message-id"] == b"died:0"
    ]
    assert replayed == [({"message-id": b"died:0", "h": b"1"}, b"from the first run")]
    store = env.store()
    try:
        assert store.state("died") is State.COMPLETED
    finally:
        store.close()


# -- real processes -------------------------------------------------------------------


@pytest.fixture
def scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path, database):
    scenario = Scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path)
    scenario.extra.update(database.env)
    scenario.handler = f"{HANDLERS}:inbox_row"
    return scenario


def applied_everything(scenario: Scenario, database: Database) -> Callable[[], bool]:
    return lambda: scenario.published() <= database.rows().keys() and scenario.lag() == 0


@pytest.mark.integration
@pytest.mark.e2e
def test_a_crash_right_after_the_commit_replays_the_stored_outputs(scenario, database):
    crash = ["c-1", "c-4", "c-7"]
    scenario.extra["CRASH_IDS"] = ",".join(crash)
    scenario.extra["CRASH_MARKERS"] = str(scenario.logdir)
    scenario.extra["WORKER_LOG__LEVEL"] = "INFO"
    produce(scenario.bootstrap, scenario.input, [with_id(f"c-{n}") for n in range(10)])
    with scenario.replicas(1) as replicas:
        replicas.start(0)
        deadline = time.monotonic() + 120
        while not applied_everything(scenario, database)():
            assert time.monotonic() < deadline, "timed out waiting for every id"
            if replicas.poll(0) is not None:
                replicas.start(0)  # as a supervisor restarts a replica that died
            time.sleep(0.2)
        crashes = replicas.exit_codes.copy()
        codes = replicas.end_all()
        logs = replicas.logs()
    assert codes == [0]
    assert crashes == [-signal.SIGKILL] * len(crash)
    assert database.rows() == {f"c-{n}": 1 for n in range(10)}  # no body ran twice
    # The crashed runs produced nothing; their outputs came from the inbox, once each.
    assert message_ids(scenario.bootstrap, scenario.output) == {f"c-{n}:0": 1 for n in range(10)}
    replays = [
        json.loads(line)["id"]
        for line in logs.splitlines()
        if '"reason": "inbox"' in line and '"outcome": "duplicate"' in line
    ]
    assert sorted(replays) == crash
    store = RedisDedupStore.from_url(scenario.redis_url, f"idempotent-worker:{scenario.group}")
    try:
        assert {store.state(id) for id in crash} == {State.COMPLETED}
    finally:
        store.close()


def storm(scenario: Scenario, database: Database, name: str, until_doubled: bool) -> Row:
    """Three replicas, one SIGKILLed every 1.5-2.5 s while orders with 30% duplicate ids
    flow, at least 6 times (and one killing itself after the commit of each of the
    scenario's ``CRASH_IDS``); with ``until_doubled``, also until a business row is doubled
    (at most 40 kills: most kills land in a rebalance or a restart, not in the window),
    with more orders published meanwhile (a kill of an idle replica doubles nothing:
    under `make test`'s load, 40 kills once came after the orders were all handled)."""
    rng = random.Random(7)
    kills = 0
    with scenario.replicas(3) as replicas:

        def revive() -> None:
            """Start again a replica that killed itself (``CRASH_IDS``)."""
            for slot in range(3):
                if replicas.poll(slot) is not None:
                    replicas.start(slot)

        replicas.start_all(PARTITIONS)
        traffic = [scenario.traffic(batch=100, rounds=20, interval=0.25)]
        while kills < 6 or traffic[-1].flowing() or (until_doubled and not database.doubled()):
            if kills == 40:
                break
            if not traffic[-1].flowing() and until_doubled:
                traffic.append(scenario.traffic(batch=100, rounds=20, interval=0.25))
            time.sleep(rng.uniform(1.5, 2.5))
            revive()
            slot = rng.randrange(3)
            assert replicas.end(slot, signal.SIGKILL) == -signal.SIGKILL
            replicas.start(slot)
            kills += 1
        for flow in traffic:
            flow.join()
        applied = applied_everything(scenario, database)
        wait_until(lambda: revive() or applied(), 240, "every id to be applied")
        revive()
        assert replicas.end_all() == [0, 0, 0]
    rows = database.rows()
    published = scenario.published()
    distinct, _ = scenario.outputs()
    assert distinct == {f"{id}:0" for id in published}  # no output missing
    lost = len(published - rows.keys())
    doubled = sum(1 for count in rows.values() if count > 1)
    dead = sum(message_ids(scenario.bootstrap, scenario.dlq).values())
    row = Row(name, sum(flow.messages for flow in traffic), f"{kills} SIGKILL", lost, doubled, dead)
    report(row)
    return row


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.chaos
def test_a_sigkill_storm_doubles_business_rows_without_the_inbox_and_none_with_it(
    kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path, postgres_url
):
    rows = {}
    for handler in ("plain_row", "inbox_row"):
        logs = tmp_path / handler
        logs.mkdir()
        scenario = Scenario(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, logs)
        database = Database(postgres_url, f"business_{uuid.uuid4().hex[:12]}")
        scenario.handler = f"{HANDLERS}:{handler}"
        scenario.extra.update(database.env)
        # Each completion written at once, and 10 ms of work after the commit: most kills
        # land between a commit and its completion, the window the inbox closes.
        scenario.extra["WORKER_DEDUP__COMPLETE_LINGER_MS"] = "0"
        scenario.extra["AFTER_COMMIT_SECONDS"] = "0.01"
        # And three orders (the first of rounds 2-4) kill their replica right after
        # their commit, so that the window is met whatever the random kills hit: under
        # `make test`'s load 40 random kills once doubled nothing, landing in rebalances.
        crash = [f"order-{os.getpid()}-{round}-0000000" for round in (2, 3, 4)]
        scenario.extra["CRASH_IDS"] = ",".join(crash)
        scenario.extra["CRASH_MARKERS"] = str(logs)
        scenario.extra["WORKER_INBOX__URL"] = postgres_url
        with_inbox = "with" if handler == "inbox_row" else "without"
        name = f"SIGKILL storm, rows {with_inbox} the inbox"
        rows[handler] = storm(scenario, database, name, until_doubled=handler == "plain_row")
    print(f"\nbusiness rows doubled: {rows['plain_row'].run_twice} without the inbox, ", end="")
    print(f"{rows['inbox_row'].run_twice} with it")
    assert (
        rows["inbox_row"].lost,
        rows["inbox_row"].run_twice,
        rows["inbox_row"].dead_lettered,
    ) == (0, 0, 0)
    assert rows["plain_row"].lost == 0
    assert rows["plain_row"].run_twice > 0  # the same storm without the inbox does double rows


def counted(port: int, name: str, **labels: str) -> float:
    """A replica's metric, 0 until its HTTP server answers."""
    try:
        return metric_sum([scrape(port)], f"idempotent_worker_{name}", **labels)
    except OSError:
        return 0


def advisory_lock_held(url: str, key: int) -> bool:
    unsigned = key & (2**64 - 1)
    with psycopg.connect(url) as conn:
        found = conn.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 "
            "AND classid = %s::oid AND objid = %s::oid",
            (unsigned >> 32, unsigned & 0xFFFFFFFF),
        )
        return found.fetchone() is not None


@pytest.mark.integration
@pytest.mark.e2e
@pytest.mark.chaos
def test_a_replica_frozen_mid_transaction_past_its_lease_applies_nothing_twice(scenario, database):
    scenario.handler = f"{HANDLERS}:inbox_stall"
    scenario.extra.update(
        {
            "WORKER_DEDUP__LEASE_SECONDS": "2",
            "WORKER_INBOX__LOCK_TIMEOUT_MS": "300",
            "WORKER_RETRY__MAX_ATTEMPTS": "40",
            "WORKER_RETRY__BACKOFF_MAX_SECONDS": "0.5",
        }
    )
    with scenario.replicas(2) as replicas:
        replicas.start(0)
        replicas.settle(PARTITIONS)
        produce(scenario.bootstrap, scenario.input, [with_id("z", value=b"3")])
        key = lock_key(scenario.group, "z")
        wait_until(lambda: advisory_lock_held(database.url, key), 30, "the transaction to open")
        replicas.send(0, signal.SIGSTOP)  # frozen inside the inbox, its transaction open
        replicas.start(1)
        successor = replicas.ports[1]
        wait_until(
            lambda: counted(successor, "messages_processed_total", outcome="failed") >= 2,
            60,
            "the successor to wait out the held id, twice",
        )
        assert database.rows() == {}  # the successor's body never ran
        replicas.send(0, signal.SIGCONT)  # the zombie commits first: its effects stand
        wait_until(lambda: scenario.lag() == 0, 60, "the group to commit")

        def settled() -> bool:
            # Either the successor held the id when the zombie woke (the zombie's
            # outputs and completion are refused; the successor's run finds the row
            # and produces the stored output), or nobody held it (the zombie takes the
            # expired claim again, produces and completes; the successor then skips
            # the id as a duplicate).
            refused = replicas.metric("idempotent_worker_lease_lost_total")
            replayed = counted(successor, "duplicates_skipped_total", reason="inbox")
            skipped = counted(successor, "duplicates_skipped_total")
            return (refused, replayed) == (1, 1) or (refused == 0 and skipped >= 1)

        wait_until(settled, 30, "the zombie refused, or the successor to skip its id")
        assert replicas.end_all() == [0, 0]
    assert database.rows() == {"z": 1}
    assert scenario.outputs() == ({"z:0"}, 0)
    dead = sum(message_ids(scenario.bootstrap, scenario.dlq).values())
    report(Row("zombie frozen mid-transaction (inbox)", 1, "SIGSTOP+SIGCONT", 0, 0, dead))
    assert dead == 0
