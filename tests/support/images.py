"""The project's container image, built and run with podman: the image tier's parts.

Image registries are not reachable on the machines the suite runs on, so the base the
Dockerfile names (``ARG PYTHON_IMAGE``) is stood in for by a local build: Debian
bookworm's minimal base (debootstrap) with Debian's Python 3.11, ``venv`` and CA
certificates, and ``python`` on the PATH as in the official image, tagged under the
Dockerfile's reference. It is built once and found again by its recipe's hash (a label);
an image under that reference without the label (the real one, pulled where registries
are reachable) is used as it is. The Dockerfile itself is built unchanged.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
"""crun fails on this machine's hybrid cgroups; runc works."""
LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024"]
"""The sandbox refuses to raise rlimits above these."""
RECIPE_LABEL = "org.idempotent-worker.stand-in-recipe"
MIRROR = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian")
STAND_IN = [
    "debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
    "bookworm",
]  # fmt: skip
"""The stand-in's recipe (the rootfs and the mirror follow): its hash names the build."""
BUILD_CA = "/etc/pip-build-ca.crt"


def podman(
    *args: str, check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} failed: {result.stderr.strip()[-2000:]}")
    return result


def unavailable() -> str | None:
    """Why the image tier cannot run here, or None."""
    for tool in ("podman", "runc"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/setup.sh installs it with apt-get)"
    info = podman("info", check=False, timeout=120)
    if info.returncode != 0:
        return f"podman cannot run here: {info.stderr.strip()[-500:]}"
    return None


def base_reference() -> str:
    """The Dockerfile's base image, fully qualified as podman stores it."""
    match = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (REPO / "Dockerfile").read_text(), re.M)
    assert match, "the Dockerfile names its base in ARG PYTHON_IMAGE"
    reference = match.group(1)
    return reference if "/" in reference else f"docker.io/library/{reference}"


@dataclass(frozen=True)
class Base:
    reference: str
    seconds: float
    """Spent building it; 0 if found."""
    origin: str
    """``stand-in built``, ``stand-in found`` or ``found`` (not a stand-in)."""


def ensure_base() -> Base:
    reference = base_reference()
    recipe = hashlib.sha256(" ".join([*STAND_IN, MIRROR]).encode()).hexdigest()[:16]
    label = "{{index .Labels " + f'"{RECIPE_LABEL}"' + "}}"
    found = podman("image", "inspect", "--format", label, reference, check=False)
    if found.returncode == 0:
        stored = found.stdout.strip()
        if stored == recipe:
            return Base(reference, 0.0, "stand-in found")
        if stored in ("", "<no value>"):
            return Base(reference, 0.0, "found")
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (scripts/setup.sh installs it)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="stand-in-") as workdir:
        rootfs = Path(workdir) / "rootfs"
        subprocess.run(
            [*STAND_IN, str(rootfs), MIRROR], check=True, capture_output=True, timeout=900
        )
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / cache).glob("*"):
                if path.is_file():
                    path.unlink()
        (rootfs / "usr/local/bin/python").symlink_to("/usr/bin/python3")
        changes = ["ENV LANG=C.UTF-8", 'CMD ["python3"]', f"LABEL {RECIPE_LABEL}={recipe}"]
        with subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE) as tar:
            imported = subprocess.run(
                [*PODMAN, "import", *(f"--change={c}" for c in changes), "-", reference],
                stdin=tar.stdout, capture_output=True, text=True, timeout=600, check=False,
            )  # fmt: skip
        if imported.returncode != 0:
            raise RuntimeError(f"podman import failed: {imported.stderr.strip()[-2000:]}")
    return Base(reference, time.monotonic() - started, "stand-in built")


def cannot_run(reference: str) -> str | None:
    """Why podman cannot start a container here, or None."""
    probe = podman("run", "--rm", *LIMITS, "--network", "host", reference, "true", check=False)
    if probe.returncode != 0:
        return f"podman cannot run containers here: {probe.stderr.strip()[-500:]}"
    return None


def pip_config(workdir: Path) -> list[str]:
    """``--volume`` options giving the build's pip this machine's index and certificate
    (a pip.conf and the CA bundle, mounted in RUN steps only: nothing is baked in)."""
    lines = ["[global]"]
    index = os.environ.get("PIP_INDEX_URL") or subprocess.run(
        ["python3", "-m", "pip", "config", "get", "global.index-url"],
        capture_output=True, text=True, check=False,
    ).stdout.strip()  # fmt: skip
    if index:
        lines.append(f"index-url = {index}")
    volumes = []
    ca = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    ca = ca or "/etc/ssl/certs/ca-certificates.crt"
    if Path(ca).is_file():
        lines.append(f"cert = {BUILD_CA}")
        volumes += ["--volume", f"{ca}:{BUILD_CA}:ro"]
    conf = workdir / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    return ["--volume", f"{conf}:/etc/pip.conf:ro", *volumes]


def build(tag: str, workdir: Path) -> float:
    """Build the Dockerfile as ``tag``; the seconds it took."""
    started = time.monotonic()
    podman(
        "build", "--format", "docker", "--isolation", "chroot", "--network", "host",
        *pip_config(workdir), "--tag", tag, str(REPO),
    )  # fmt: skip
    return time.monotonic() - started


def size_mb(tag: str) -> float:
    return int(podman("image", "inspect", "--format", "{{.Size}}", tag).stdout) / 1e6
