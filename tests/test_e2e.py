"""End to end: three real ``idempotent-worker run`` processes share one topic and one
Redis, or one Redis Cluster."""

import signal
from pathlib import Path

import pytest

from idempotent_worker.local import embedded
from idempotent_worker.local.demo import (
    follow_progress,
    publish_with_duplicates,
    read_all,
    scrape,
    spawn_worker,
    wait_for_group,
    worker_env,
)
from tests.support.kafka import group_lag

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent
MESSAGES, REPEATS, PARTITIONS, REPLICAS = 10_000, 3_000, 6, 3


def start_replicas(count, env_for, logdir):
    return [spawn_worker(env_for(n), logdir / f"replica-{n}.log", cwd=REPO) for n in range(count)]


@pytest.mark.parametrize("store", ["redis", "cluster"])
def test_three_replicas_handle_every_id_exactly_once(
    store, kafka_bootstrap, unique_name, make_topics, ledger, tmp_path, request
):
    redis_url = request.getfixturevalue("redis_url" if store == "redis" else "redis_cluster_url")
    topic, group = unique_name("orders"), unique_name("group")
    output = f"{topic}.out"
    make_topics({topic: PARTITIONS, output: PARTITIONS, f"{topic}.dlq": 1})
    routes = [
        {
            "topic": topic,
            "handler": "tests.support.handlers:ledger_and_emit",
            "output_topic": output,
        }
    ]
    ports = [embedded.free_port() for _ in range(REPLICAS)]

    def env_for(number):
        return worker_env(
            kafka_bootstrap,
            redis_url,
            group,
            ports[number],
            routes,
            LEDGER_PATH=str(ledger.path),
            WORKER_LOG__LEVEL="WARNING",
            WORKER_REDIS__CLUSTER=str(store == "cluster").lower(),
        )

    processes = start_replicas(REPLICAS, env_for, tmp_path)
    try:
        wait_for_group(ports, PARTITIONS)
        unique, repeats = publish_with_duplicates(
            kafka_bootstrap, topic, MESSAGES, REPEATS / MESSAGES, PARTITIONS
        )
        assert (unique, repeats) == (MESSAGES - REPEATS, REPEATS)
        totals = follow_progress(ports, MESSAGES, timeout=240)
        per_replica = [scrape(port) for port in ports]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        codes = [process.wait(60) for process in processes]

    assert codes == [0] * REPLICAS
    runs = ledger.runs()
    assert len(runs) == unique
    assert [id for id, count in runs.items() if count > 1] == []
    assert totals["skipped"] == REPEATS
    assert totals["processed"] == unique
    assert totals["dead_lettered"] == 0
    # every replica took part
    assert all(
        any(
            k.startswith("idempotent_worker_messages_consumed_total") and v > 0
            for k, v in r.items()
        )
        for r in per_replica
    )
    assert group_lag(kafka_bootstrap, group, topic) == 0
    outputs = [headers["message-id"].decode() for headers, _ in read_all(kafka_bootstrap, output)]
    assert len(outputs) == unique
    assert sorted(outputs) == sorted(f"{id}:0" for id in runs)
