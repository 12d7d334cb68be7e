import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from idempotent_worker.kafka.consumer import group_problem
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import STUCK_SECONDS, Health, HttpServer


@pytest.fixture
def served():
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    health = Health(stall_seconds=60)
    metrics.ready.set_function(lambda: float(health.ready))
    server = HttpServer("127.0.0.1", 0, registry, health)
    server.start()
    yield server, health, metrics
    server.stop()


def get(server, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_openmetrics_with_exemplars_when_the_scraper_asks(served):
    """The handler-duration histogram's exemplars (a sampled message's trace id) are
    in the OpenMetrics exposition, which a scraper asks for (Prometheus with exemplar
    storage); the classic text format is served otherwise."""
    server, _, metrics = served
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    metrics.handler_duration.labels("orders").observe(0.003, {"trace_id": trace_id})
    request = urllib.request.Request(
        f"http://127.0.0.1:{server.port}/metrics",
        headers={"Accept": "application/openmetrics-text; version=1.0.0"},
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        body = response.read().decode()
    [bucket] = [line for line in body.splitlines() if f'trace_id="{trace_id}"' in line]
    assert bucket.startswith("idempotent_worker_handler_duration_seconds_bucket{")
    assert body.rstrip().endswith("# EOF")
    status, classic = get(server, "/metrics")
    assert status == 200 and trace_id not in classic


def test_probes_follow_the_loop(served):
    server, health, _ = served
    assert get(server, "/healthz")[0] == 200
    assert get(server, "/readyz")[0] == 503  # not in the group yet
    health.joined = True
    assert get(server, "/readyz")[0] == 503  # store not confirmed yet
    health.store_ok = True
    assert get(server, "/readyz")[0] == 200
    health.store_ok = False  # the store went away: fail closed, not ready
    health.store_error = "redis: 0 of 1 replicas acknowledged the write within 500 ms"
    assert get(server, "/readyz") == (
        503,
        "not ready: dedup store: redis: 0 of 1 replicas acknowledged the write within 500 ms\n",
    )
    health.last_beat -= 61  # the loop is stuck
    assert get(server, "/healthz")[0] == 503
    assert get(server, "/nope")[0] == 404


def test_metrics_page_has_the_contract_names(served):
    server, _, metrics = served
    metrics.consumed.labels("orders").inc()
    metrics.processed.labels("orders", "success").inc()
    metrics.duplicates.labels("orders", "duplicate").inc(2)
    metrics.handler_duration.labels("orders").observe(0.01)
    metrics.store_errors.labels("claim").inc()
    status, body = get(server, "/metrics")
    assert status == 200
    for line in [
        'idempotent_worker_messages_consumed_total{topic="orders"} 1.0',
        'idempotent_worker_messages_processed_total{outcome="success",topic="orders"} 1.0',
        'idempotent_worker_duplicates_skipped_total{reason="duplicate",topic="orders"} 2.0',
        'idempotent_worker_handler_duration_seconds_count{topic="orders"} 1.0',
        'idempotent_worker_dedup_store_errors_total{operation="claim"} 1.0',
        "idempotent_worker_ready 0.0",
    ]:
        assert line in body


class Clock:
    now = 100.0

    def __call__(self):
        return self.now


def ready_health(clock):
    health = Health(stall_seconds=300, clock=clock)
    health.joined = health.store_ok = True
    return health


def test_partitions_with_records_waiting_and_no_progress_make_the_replica_unready_then_dead():
    clock = Clock()
    health = ready_health(clock)
    health.records_waiting = 12
    clock.now += STUCK_SECONDS - 1
    assert health.ready
    clock.now += 2
    assert not health.ready and health.alive
    assert health.not_ready_because() == "no progress for 31 s with 12 records waiting"
    health.progressed()
    assert health.ready
    clock.now += 300
    assert not health.alive  # /healthz fails: the orchestrator restarts it
    health.beat()
    assert not health.alive


def test_a_long_handler_or_nothing_waiting_is_not_a_stuck_partition():
    clock = Clock()
    health = ready_health(clock)
    clock.now += 1000
    health.beat()
    assert health.ready  # nothing waiting
    health.records_waiting = 5
    health.working = lambda: 1
    assert health.ready  # a handler runs


def test_the_group_state_from_librdkafkas_statistics():
    assert group_problem({"state": "up", "join_state": "steady"}) == ""
    assert group_problem({"state": "wait-coord", "join_state": "steady"}) == (
        "group coordinator not reached (state wait-coord)"
    )
    assert group_problem({"state": "up", "join_state": "wait-join"}) == (
        "not joined (join state wait-join)"
    )
    health = ready_health(Clock())
    health.group_error = group_problem({"state": "query-coord", "join_state": "init"})
    assert health.not_ready_because() == (
        "consumer group: group coordinator not reached (state query-coord)"
    )
