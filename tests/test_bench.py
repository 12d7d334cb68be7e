"""The benchmark's short run, so that it cannot rot: every variant must run and handle
every id exactly once. Its speed figures are printed, not asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

REPO = Path(__file__).resolve().parent.parent


def test_the_quick_benchmark_runs_and_handles_every_id_once(
    kafka_bootstrap, redis_url, postgres_url
):
    # PATH: the store's scale starts its own redis-server processes (one Redis, a cluster).
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
        "REDIS_URL": redis_url,
        "POSTGRES_URL": postgres_url,
    }
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--quick"],
        cwd=REPO,
        env={**env, "PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    print(result.stdout)
    for figure in (
        "d/a",
        "d/b",
        "d/c",
        "e64/e1",
        "RSS over 100,000 messages",
        "cluster CPU/msg",
        "pi/p",
    ):
        assert figure in result.stdout
    assert "every variant handled every id exactly once" in result.stdout
