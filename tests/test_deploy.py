"""The shipping files: Dockerfile, docker-compose.yml, deploy/ (Kubernetes, Prometheus, Grafana).

Checked offline (hadolint, the Compose and Kubernetes schemas, promtool), then live: a real
Prometheus server scrapes a real worker and every dashboard query, recording rule and alert
is evaluated through its HTTP API.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import time
import tomllib
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from confluent_kafka import Producer

from idempotent_worker.local import embedded
from idempotent_worker.local.demo import (
    metric_sum,
    publish_with_duplicates,
    scrape,
    spawn_worker,
    worker_env,
)

pytestmark = pytest.mark.deploy

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
RULES = DEPLOY / "prometheus" / "rules.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "idempotent-worker.json"
KUBERNETES_VERSION = "1.30.0"
CONSUMED = "idempotent_worker_messages_consumed_total"
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule"}
ALERT_SHAPE = re.compile(r"^(?P<series>[a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:[<>]=?|==|!=)\s*[0-9.]+$")


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def manifests() -> dict[str, dict[str, Any]]:
    """Every Kubernetes resource of deploy/k8s by kind."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "kustomization.yaml":
            for doc in load_all(path):
                found[doc["kind"]] = doc
    return found


def rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard_queries() -> list[tuple[str, str]]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [
        (panel["title"], target["expr"])
        for panel in panels
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


# -- Dockerfile --------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    result = subprocess.run(
        [str(hadolint), "Dockerfile"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_final_stage_is_non_root_with_exec_entrypoint_and_healthcheck():
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
    assert len(stages) >= 2, "multi-stage: build, then a final stage"
    final = stages[-1]
    assert "COPY --from=build" in final
    assert not re.search(r"apt-get|gcc|build-essential", final), "no compilers in the final stage"
    user = re.search(r"^USER (\S+)", final, flags=re.MULTILINE)
    assert user and user.group(1).split(":")[0] not in ("root", "0")
    assert '\nENTRYPOINT ["idempotent-worker", "run"]' in final
    assert re.search(r"HEALTHCHECK .*\n?.*CMD \[.*/healthz", final)
    assert "PYTHONDONTWRITEBYTECODE=1" in final, "a read-only root filesystem: no .pyc writes"


# -- docker-compose.yml ------------------------------------------------------------------


def compose_errors(document: dict[str, Any]) -> list[str]:
    schema = json.loads((Path(sys.prefix) / "share" / "compose-spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    return [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_follows_the_compose_specification():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert compose_errors(compose) == []

    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["replica"] = 3  # a typo the schema must catch
    assert compose_errors(broken)


def test_compose_stack_is_set_up_as_documented():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"kafka", "redis", "worker", "prometheus", "grafana", "traffic"} <= services.keys()
    assert services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    redis_args = services["redis"]["command"]
    assert redis_args[redis_args.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis_args[redis_args.index("--appendonly") + 1] == "yes"
    worker = services["worker"]
    assert worker["deploy"]["replicas"] == 3
    assert worker["read_only"] is True
    grace = tomllib.loads((REPO / "config" / "worker.toml").read_text())["shutdown"]
    assert int(worker["stop_grace_period"].rstrip("s")) > grace["grace_seconds"]
    assert services["traffic"]["profiles"] == ["traffic"]
    nodes = [services[f"redis-node-{n}"] for n in range(1, 7)]
    assert all(node["profiles"] == ["cluster"] for node in nodes)
    assert all("--cluster-enabled" in node["command"] for node in nodes)
    create = services["redis-cluster-init"]["command"][0]
    for node in nodes:
        assert f"{node['networks']['default']['ipv4_address']}:6379" in create
    assert services["worker-cluster"]["environment"]["WORKER_REDIS__CLUSTER"] == "true"
    sentinels = [services[f"sentinel-{n}"] for n in (1, 2, 3)]
    assert all("--sentinel" in s["command"][0] for s in sentinels)
    assert all("sentinel monitor dedup redis-primary 6379 2" in s["command"][0] for s in sentinels)
    env = services["worker-sentinel"]["environment"]
    assert env["WORKER_REDIS__SENTINEL_MASTER"] == "dedup"
    assert json.loads(env["WORKER_REDIS__SENTINELS"]) == [
        "sentinel-1:26379", "sentinel-2:26379", "sentinel-3:26379"
    ]  # fmt: skip
    assert "--replicaof" in services["redis-replica"]["command"]
    mounts = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    for path in ("prometheus/rules.yml", "grafana/provisioning", "grafana/dashboards"):
        assert f"./deploy/{path}" in mounts
        assert (DEPLOY / path).exists()


# -- Kubernetes --------------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_schemas():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files

    resources = manifests()
    for kind, resource in resources.items():
        if kind not in CUSTOM_KINDS:
            kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)

    broken = copy.deepcopy(resources["Deployment"])
    broken["spec"]["replicas"] = "three"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_deployment_is_locked_down_and_outlives_the_drain():
    resources = manifests()
    pod = resources["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    security = container["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["resources"]["requests"] and container["resources"]["limits"]

    config = tomllib.loads(resources["ConfigMap"]["data"]["worker.toml"])
    assert pod["terminationGracePeriodSeconds"] > config["shutdown"]["grace_seconds"]
    assert config["http"]["host"] == "0.0.0.0"  # the kubelet and Prometheus reach the pod
    assert {s["secretRef"]["name"] for s in container["envFrom"]} == {
        resources["Secret"]["metadata"]["name"]
    }
    mounted = {v["configMap"]["name"] for v in pod["volumes"] if "configMap" in v}
    assert mounted == {resources["ConfigMap"]["metadata"]["name"]}


def test_service_monitor_scrapes_the_service_port_that_serves_metrics():
    resources = manifests()
    service, monitor = resources["Service"], resources["ServiceMonitor"]
    labels = resources["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    # The Service carries the kustomize labels the monitor selects on.
    kustomize_labels = yaml.safe_load((K8S / "kustomization.yaml").read_text())["labels"][0]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= kustomize_labels["pairs"].items()
    ports = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    pdb = resources["PodDisruptionBudget"]["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()


# -- Prometheus rules and the dashboard --------------------------------------------------


def test_promtool_accepts_the_rules():
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_prometheus_config_is_valid(tmp_path):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]  # where compose mounts it
    config["rule_files"] = [str(RULES)]
    local = tmp_path / "prometheus.yml"
    local.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        ["promtool", "check", "config", str(local)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_is_generated_from_the_rules_file():
    rule = manifests()["PrometheusRule"]
    assert rule["spec"] == yaml.safe_load(RULES.read_text()), "run scripts/render-prometheusrule.py"


def test_alerts_compare_a_recorded_series_with_a_threshold():
    recorded = {r["record"] for r in rules() if "record" in r}
    alerts = [r for r in rules() if "alert" in r]
    assert {a["alert"] for a in alerts} >= {
        "IdempotentWorkerDuplicateRateHigh",
        "IdempotentWorkerConsumerLagGrowing",
        "IdempotentWorkerDedupStoreErrors",
        "IdempotentWorkerDeadLetters",
        "IdempotentWorkerNoReadyReplica",
    }
    for alert in alerts:
        shape = ALERT_SHAPE.match(alert["expr"].strip())
        assert shape and shape["series"] in recorded, alert["alert"]
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]


def test_dashboard_panels_are_described_and_cover_the_issue_list():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    assert all(p["description"] and p["targets"] for p in panels)
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for needle in (
        "duplicate_ratio",
        "duplicates_skipped",
        "messages_processed",
        "handler_duration_seconds_bucket",
        "dedup_store_duration_seconds_bucket",
        "dedup_store_errors",
        "consumer_lag",
        "dead_lettered",
        "in_flight",
        "ready_replicas",
    ):
        assert needle in exprs


# -- live: Prometheus scraping a worker ---------------------------------------------------


class PrometheusServer:
    def __init__(self, workdir: Path, target_port: int) -> None:
        self.port = embedded.free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(RULES)],
            "scrape_configs": [
                {
                    "job_name": "idempotent-worker",
                    "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
                }
            ],
        }
        config_path = workdir / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    shutil.which("prometheus") or "prometheus",
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.api("query", query=expr)["result"])

    def wait_for(self, expr: str, timeout: float = 60.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if result := self.query(expr):
                    return result
            except OSError:
                pass  # not listening yet
            time.sleep(0.5)
        raise AssertionError(f"no data for {expr!r} after {timeout}s; see {self.log}")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


@pytest.mark.integration
def test_prometheus_evaluates_every_panel_rule_and_alert_on_a_live_worker(
    kafka_bootstrap, redis_url, unique_name, make_topics, tmp_path
):
    topic = unique_name("orders")
    make_topics({topic: 3, f"{topic}.accepted": 3, f"{topic}.dlq": 1})
    routes = [
        {
            "topic": topic,
            "handler": "idempotent_worker.examples.orders:handle",
            "output_topic": f"{topic}.accepted",
        }
    ]
    port = embedded.free_port()
    env = worker_env(kafka_bootstrap, redis_url, unique_name("group"), port, routes)
    env["WORKER_LOG__LEVEL"] = "WARNING"
    worker = spawn_worker(env, tmp_path / "worker.log", cwd=REPO)
    prometheus = PrometheusServer(tmp_path, port)
    try:
        # Prometheus holds the zeros before any message flows, so rate() sees every message.
        prometheus.wait_for("idempotent_worker_ready == 1")
        unique, repeats = publish_with_duplicates(kafka_bootstrap, topic, 2000, 0.3, 3)
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        producer.produce(topic, value=b'{"amount": 1}')  # no message-id: dead-lettered
        producer.flush(10)
        consumed = unique + repeats + 1

        deadline = time.monotonic() + 120
        while (seen := metric_sum([scrape(port)], CONSUMED)) < consumed:
            assert time.monotonic() < deadline, f"consumed {seen} of {consumed}"
            time.sleep(0.5)
        prometheus.wait_for(f"sum(idempotent_worker_messages_consumed_total) == {consumed}")
        prometheus.wait_for("idempotent_worker_consumer_lag")  # librdkafka stats, every 5 s

        published_share = repeats / consumed
        deadline = time.monotonic() + 30
        while True:  # the rule sees every message once its window holds the last scrape
            (ratio,) = prometheus.wait_for(
                f'idempotent_worker:duplicate_ratio:rate5m{{topic="{topic}"}}'
            )
            reported_share = float(ratio["value"][1])
            if abs(reported_share - published_share) <= 0.005 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        print(f"duplicate share published {published_share:.4f}, reported {reported_share:.4f}")
        assert reported_share == pytest.approx(published_share, abs=0.005)

        queries = [(title, expr) for title, expr in dashboard_queries()]
        for rule in rules():
            expr = (
                rule["record"]
                if "record" in rule
                else ALERT_SHAPE.match(rule["expr"].strip())["series"]
            )
            queries.append((rule.get("record") or rule["alert"], expr))
        # A series born late (the dead letter's) has a rate once two scrapes hold it.
        deadline = time.monotonic() + 30
        while empty := [
            f"{title}: {expr}" for title, expr in queries if not prometheus.query(expr)
        ]:
            if time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert empty == [], "queries without data"

        evaluated = prometheus.api("rules")["groups"]
        unhealthy = [
            (r["name"], r.get("lastError"))
            for g in evaluated
            for r in g["rules"]
            if r["health"] != "ok"
        ]
        assert unhealthy == []
        assert len([r for g in evaluated for r in g["rules"]]) == len(rules())
    finally:
        prometheus.stop()
        worker.terminate()
        worker.wait(timeout=30)
