"""Signals on a real ``idempotent-worker run`` process."""

import signal
import time
from pathlib import Path

import pytest

from idempotent_worker.local import embedded
from idempotent_worker.local.demo import metric_sum, probe, scrape, spawn_worker, worker_env
from tests.support.kafka import Record, group_lag, produce

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def start(kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path):
    topic, group = unique_name("slow"), unique_name("group")
    make_topics({topic: 1, f"{topic}.dlq": 1})
    routes = [{"topic": topic, "handler": "tests.support.handlers:slow"}]

    def start_worker(number, **env):
        port = embedded.free_port()
        process = spawn_worker(
            worker_env(
                kafka_bootstrap, redis_url, group, port, routes, LEDGER_PATH=str(ledger.path), **env
            ),
            tmp_path / f"worker-{number}.log",
            cwd=REPO,
        )
        deadline = time.monotonic() + 30
        while not probe(port, "/readyz"):
            assert time.monotonic() < deadline, "worker did not become ready"
            time.sleep(0.1)
        process.port = port
        return process

    start_worker.topic, start_worker.group = topic, group
    return start_worker


def wait_for_runs(ledger, count, timeout=30):
    deadline = time.monotonic() + timeout
    while sum(ledger.runs().values()) < count:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_sigterm_drains_commits_and_a_restart_redoes_nothing(start, kafka_bootstrap, ledger):
    worker = start(0)
    ids = [f"slow-{n}" for n in range(12)]
    produce(
        kafka_bootstrap,
        start.topic,
        [Record(b"0.2", key=i, headers={"message-id": i}) for i in ids],
    )
    wait_for_runs(ledger, 3)

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    done_before_restart = sum(ledger.runs().values())
    assert 3 <= done_before_restart < len(ids)
    assert group_lag(kafka_bootstrap, start.group, start.topic) == len(ids) - done_before_restart

    worker = start(1)
    wait_for_runs(ledger, len(ids))
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0
    assert ledger.runs() == {i: 1 for i in ids}
    assert group_lag(kafka_bootstrap, start.group, start.topic) == 0


def test_second_sigint_exits_at_once(start, kafka_bootstrap, ledger):
    worker = start(0, WORKER_SHUTDOWN__GRACE_SECONDS="60")
    produce(kafka_bootstrap, start.topic, [Record(b"30", key="k", headers={"message-id": "long"})])
    handler_running(worker)  # sleeping for 30 s

    worker.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert worker.poll() is None  # still draining the message in hand
    started = time.monotonic()
    worker.send_signal(signal.SIGINT)
    assert worker.wait(10) == 128 + signal.SIGINT
    assert time.monotonic() - started < 5


def test_grace_period_expiry_exits_non_zero(start, kafka_bootstrap):
    worker = start(0, WORKER_SHUTDOWN__GRACE_SECONDS="1")
    produce(kafka_bootstrap, start.topic, [Record(b"30", key="k", headers={"message-id": "long"})])
    handler_running(worker)

    worker.send_signal(signal.SIGTERM)
    assert worker.wait(10) == 1


def handler_running(worker):
    """Wait until the worker's handler is running (its in-flight gauge says so)."""
    deadline = time.monotonic() + 30
    while metric_sum([scrape(worker.port)], "idempotent_worker_in_flight") < 1:
        assert time.monotonic() < deadline, "the handler did not start"
        time.sleep(0.05)
