"""The package as a user receives it: the wheel and sdist built and checked, the wheel
installed into a fresh virtualenv outside the checkout, and the README's handler steps
run there, from a directory of the user's own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.package

REPO = Path(__file__).resolve().parent.parent


def run(argv: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    result = subprocess.run(
        [str(a) for a in argv], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{argv}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend of this environment, no download.
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, REPO], REPO)
    return out


def test_the_wheel_and_sdist_pass_twine_and_install_one_top_level_package(dist):
    files = sorted(dist.iterdir())
    assert sorted(f.suffix for f in files) == [".gz", ".whl"]
    run([sys.executable, "-m", "twine", "check", "--strict", *files], dist)
    names = zipfile.ZipFile(next(dist.glob("*.whl"))).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"idempotent_worker"}
    assert "idempotent_worker/py.typed" in names
    assert "idempotent_worker/dedup/scripts.py" in names  # subpackages found


def test_the_readme_steps_work_from_a_plain_pip_install(dist, tmp_path):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    python = venv / "bin" / "python"
    wheel = next(dist.glob("*.whl"))
    run([python, "-m", "pip", "install", "-q", "--disable-pip-version-check", wheel], tmp_path)
    project = tmp_path / "my-service"  # the user's directory: no checkout in sight
    (project / "handlers").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "worker.toml", project)
    shutil.copy(REPO / "examples" / "handlers" / "payments.py", project / "handlers")

    out = run(
        [venv / "bin" / "idempotent-worker", "check-config", "--config", "worker.toml"], project
    )
    assert out.strip() == "configuration OK: 1 route(s): payments"
    assert "usage: idempotent-worker" in run([python, "-m", "idempotent_worker", "--help"], project)
    api = "from idempotent_worker import Context, Message, PermanentFailure, RetryLater"
    run([python, "-c", api], project)
    where = run(
        [python, "-c", "import idempotent_worker; print(idempotent_worker.__file__)"], project
    )
    assert where.startswith(str(venv))  # the installed package, not the checkout
