import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from worker.metrics import Metrics
from worker.server import Health, HttpServer


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
