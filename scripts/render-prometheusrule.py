#!/usr/bin/env python3
"""Write deploy/k8s/prometheusrule.yaml from deploy/prometheus/rules.yml (the one source).

Run it after editing the rules; tests/test_deploy.py fails while the two differ.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = """\
# Generated from deploy/prometheus/rules.yml by scripts/render-prometheusrule.py; edit that.
# Prometheus Operator: the recording rules and alerts of idempotent-worker.
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: idempotent-worker
spec:
"""


def main() -> None:
    lines = (ROOT / "deploy/prometheus/rules.yml").read_text().splitlines()
    body = [f"  {line}" if line else "" for line in lines if not line.startswith("#")]
    (ROOT / "deploy/k8s/prometheusrule.yaml").write_text(HEADER + "\n".join(body) + "\n")


if __name__ == "__main__":
    main()
