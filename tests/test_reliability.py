"""Semantics under trouble, on a real broker and Redis: long handlers keep their claim,
crash loops end in the dead-letter topic, conflicting payloads and bad input are
dead-lettered with their reason, and an evicting Redis is refused at start-up."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from idempotent_worker.dedup import ClaimStatus, State
from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.local import embedded
from idempotent_worker.local.demo import read_all, spawn_worker, worker_env
from tests.support.harness import Run, make_settings
from tests.support.kafka import Record, group_lag, produce, with_id

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parent.parent


def dlq_reasons(env):
    return {
        headers.get("dlq-message-id", b"?").decode(): headers["dlq-reason"].decode()
        for headers, _ in read_all(env.bootstrap, env.dlq)
    }


@pytest.fixture
def env(kafka_bootstrap, redis_url, unique_name, make_topics, ledger):
    topic = unique_name("in")

    class Env:
        bootstrap = kafka_bootstrap
        redis = redis_url
        group = unique_name("group")
        input = topic
        dlq = f"{topic}.dlq"
        runs = ledger.runs
        ledger_path = ledger.path

        def settings(self, handler="ledger", **sections):
            route = {"topic": topic, "handler": f"tests.support.handlers:{handler}"}
            route.update(sections.pop("route", {}))
            return make_settings(kafka_bootstrap, redis_url, self.group, [route], **sections)

        def produce(self, records):
            return produce(kafka_bootstrap, topic, records)

    make_topics({topic: 3, f"{topic}.dlq": 1})
    return Env()


def test_same_id_with_another_payload_is_a_conflict_not_a_duplicate(env):
    env.produce(
        [with_id("a", value=b"first"), with_id("a", value=b"first"), with_id("a", value=b"edited")]
    )
    run = Run(env.settings(), max_messages=3)
    run.run()
    assert env.runs() == {"a": 1}
    assert run.value("duplicates_skipped_total", topic=env.input, reason="duplicate") == 1
    assert run.value("dead_lettered_total", topic=env.input, reason="id_conflict") == 1
    ((headers, value),) = read_all(env.bootstrap, env.dlq)
    assert value == b"edited"
    assert b"different payload" in headers["dlq-error-message"]


def test_conflicts_can_be_skipped_and_are_counted_apart(env):
    env.produce([with_id("a", value=b"first"), with_id("a", value=b"edited")])
    run = Run(env.settings(dedup={"on_payload_conflict": "skip"}), max_messages=2)
    run.run()
    assert env.runs() == {"a": 1}
    assert run.value("duplicates_skipped_total", topic=env.input, reason="conflict") == 1
    assert read_all(env.bootstrap, env.dlq) == []


def test_bad_input_mix_each_dead_lettered_with_its_reason(env):
    env.produce(
        [
            Record(value=b"{}", headers={}),  # no message-id header
            Record(value=b"{}", headers={"message-id": b"\xff\xfe"}),  # not UTF-8
            Record(value=b"{}", headers={"message-id": "x" * 600}),  # too long an id
            with_id("big", value=b"v" * 5000),  # over max_payload_bytes
            with_id("ok", value=b"one"),
            with_id("ok", value=b"two"),  # a conflict
            with_id("fine"),
        ]
    )
    run = Run(env.settings(kafka={"max_payload_bytes": 4000}), max_messages=7)
    run.run()
    assert env.runs() == {"ok": 1, "fine": 1}
    records = read_all(env.bootstrap, env.dlq)
    reasons = sorted(headers["dlq-reason"].decode() for headers, _ in records)
    assert reasons == sorted(
        ["id_missing", "id_not_utf8", "id_invalid", "payload_too_large", "id_conflict"]
    )
    (big,) = [(h, v) for h, v in records if h["dlq-reason"] == b"payload_too_large"]
    assert big[1] is None and big[0]["dlq-value-dropped"] == b"true"
    assert group_lag(env.bootstrap, env.group, env.input) == 0


def test_json_id_of_a_non_json_value_is_dead_lettered(env):
    env.produce([Record(value=b"not json"), Record(value=b'{"order": {"id": "o-1"}}')])
    run = Run(env.settings(route={"id": "json:order.id"}), max_messages=2)
    run.run()
    assert env.runs() == {"o-1": 1}
    assert [h["dlq-reason"] for h, _ in read_all(env.bootstrap, env.dlq)] == [b"value_not_json"]


def test_a_handler_slower_than_its_lease_keeps_the_claim(env):
    env.produce([with_id("slow", value=b"4")])  # the handler sleeps 4 s; the lease is 1.5 s
    settings = env.settings("slow", dedup={"lease_seconds": 1.5})
    run = Run(settings, max_messages=1)
    thread = run.thread()
    rival = RedisDedupStore.from_url(env.redis, settings.key_prefix)
    try:
        deadline = time.monotonic() + 20
        while rival.state("slow") is not State.IN_PROGRESS:  # the handler started
            assert time.monotonic() < deadline
            time.sleep(0.05)
        time.sleep(3)  # two lease periods into the handler
        assert rival.claim(["slow"], "rival", 1.5)[0].status is ClaimStatus.BUSY
        thread.join(30)
        assert rival.claim(["slow"], "rival", 1.5)[0].status is ClaimStatus.COMPLETED
    finally:
        rival.close()
    assert env.runs() == {"slow": 1}
    assert run.value("lease_lost_total", topic=env.input) == 0


def replica_env(env, port, **extra):
    routes = [{"topic": env.input, "handler": "tests.support.handlers:crashes_on_poison"}]
    return worker_env(
        env.bootstrap,
        env.redis,
        env.group,
        port,
        routes,
        LEDGER_PATH=str(env.ledger_path),
        WORKER_DEDUP__LEASE_SECONDS="1.5",
        WORKER_REDIS__SOCKET_TIMEOUT_SECONDS="0.5",
        WORKER_RETRY__MAX_ATTEMPTS="3",
        WORKER_LOG__LEVEL="WARNING",
        **extra,
    )


def test_a_crash_looping_message_is_dead_lettered_after_k_attempts(env, tmp_path):
    env.produce([with_id(f"m-{n}", partition=n % 3) for n in range(10)])
    env.produce([with_id("poison", partition=1)])
    env.produce([with_id(f"n-{n}", partition=n % 3) for n in range(10)])
    port = embedded.free_port()
    environment = replica_env(env, port, POISON_ID="poison")
    normal = {f"{prefix}-{n}" for prefix in "mn" for n in range(10)}
    exits = []
    deadline = time.monotonic() + 120
    process = spawn_worker(environment, tmp_path / "replica-0.log", cwd=REPO)
    # A supervisor, as an orchestrator would be: restart the replica whenever it dies.
    while not (normal <= env.runs().keys() and "poison" in dlq_reasons(env)):
        assert time.monotonic() < deadline, f"exits so far: {exits}"
        if (code := process.poll()) is not None:
            exits.append(code)
            log = tmp_path / f"replica-{len(exits)}.log"
            process = spawn_worker(environment, log, cwd=REPO)
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    exits.append(process.wait(30))
    runs = env.runs()
    assert runs["poison"] == 3  # K attempts, each killed the process
    assert exits[:3] == [70, 70, 70] and exits[-1] == 0
    others = {id: n for id, n in runs.items() if id != "poison"}
    assert others.keys() == {f"{prefix}-{n}" for prefix in "mn" for n in range(10)}
    # Handled within dedup.complete_linger_ms before the first crash, and not completed
    # yet: those run once more. Later crashes re-run nothing: a message whose runs
    # began before (the poison) runs only after everything handled is completed.
    assert set(others.values()) <= {1, 2}
    assert dlq_reasons(env) == {"poison": "attempts_exhausted"}
    assert group_lag(env.bootstrap, env.group, env.input) == 0


def test_a_handler_past_its_timeout_ends_the_process(env, tmp_path):
    env.produce([with_id("stuck", value=b"30")])
    routes = [{"topic": env.input, "handler": "tests.support.handlers:slow", "timeout_seconds": 1}]
    process = spawn_worker(
        worker_env(
            env.bootstrap,
            env.redis,
            env.group,
            embedded.free_port(),
            routes,
            LEDGER_PATH=str(env.ledger_path),
        ),
        tmp_path / "worker.log",
        cwd=REPO,
    )
    assert process.wait(timeout=60) == 3
    log = (tmp_path / "worker.log").read_text()
    assert "handler timed out" in log and '"id": "stuck"' in log
    assert group_lag(env.bootstrap, env.group, env.input) == 1  # not committed: retried later


@pytest.mark.parametrize("allow", [False, True])
def test_an_evicting_redis_is_refused_unless_allowed(env, tmp_path, allow):
    with embedded.redis(tmp_path, eviction_policy="allkeys-lru") as server:
        routes = [{"topic": env.input, "handler": "tests.support.handlers:ledger"}]
        port = embedded.free_port()
        environment = worker_env(
            env.bootstrap,
            f"redis://127.0.0.1:{server.port}/0",
            env.group,
            port,
            routes,
            LEDGER_PATH=str(env.ledger_path),
            WORKER_REDIS__ALLOW_EVICTION=json.dumps(allow),
        )
        process = spawn_worker(environment, tmp_path / "worker.log", cwd=REPO)
        if not allow:
            assert process.wait(timeout=60) == 2
            log = (tmp_path / "worker.log").read_text()
            assert "redis.allow_eviction" in log and "allkeys-lru" in log
            assert "partitions assign" not in log  # refused before joining the group
        else:
            env.produce([with_id("a")])
            deadline = time.monotonic() + 30
            while env.runs() != {"a": 1}:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
