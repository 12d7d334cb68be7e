"""The README's first command: the embedded demo, as a newcomer runs it."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e]


def test_demo_ends_with_summary_and_no_double_processing():
    result = subprocess.run(
        [sys.executable, "-m", "idempotent_worker", "demo", "--messages", "1000"],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "duplicates skipped 300 (duplicate rate 30.0%)" in result.stdout
    assert "ids processed twice 0, ids missing 0" in result.stdout
    assert "demo OK" in result.stdout
