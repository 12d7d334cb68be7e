"""Replicated Redis topologies on local ``redis-server`` processes, for the tests and the
benchmark: a Redis Cluster, and a primary with a replica under Sentinels."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

from idempotent_worker.local.embedded import (
    LocalService,
    ServiceError,
    free_port,
    redis,
    redis_binary,
)


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
