"""Network namespaces for the partition scenarios: replicas that a test can cut from
Redis, from the broker, or from both, with packets dropped silently (half-open TCP
connections, as a real partition leaves them), then heal.

    services (namespace "<p>-svc"): the broker and Redis on 10.N.0.1
      |-- veth -- replica k (namespace "<p>-wk"): 10.N.k.2, default route via 10.N.k.1
      |-- veth -- this process (the root namespace): 10.N.250.2, a route to 10.N.0.0/16

With ``redis_replica``, one more namespace like a replica's ("<p>-w<replicas>") runs a
Redis replica of that Redis, which ``cut`` can cut from its primary like a worker.

The services' namespace forwards between its links, so the test reaches each replica's
HTTP port at 10.N.k.2 without crossing the rules that cut the replica from the
services (they match only the broker's and Redis's address and ports). Traffic goes only
to addresses inside the namespaces made here. Every namespace (and with it its links)
and the root namespace's route and link are removed on exit, also on failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from idempotent_worker.local import embedded

BROKER_PORT = 9092
REDIS_PORT = 6379
HTTP_PORT = 8080


def unavailable() -> str | None:
    """Why namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "partition scenarios need root (ip netns, iptables)"
    for tool in ("ip", "iptables"):
        if shutil.which(tool) is None:
            return f"partition scenarios need {tool} (Debian: iproute2, iptables)"
    return None


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


def _try(*argv: str) -> None:
    """Run it; whether it worked does not matter (removing what may not exist)."""
    subprocess.run(argv, check=False, capture_output=True, timeout=30)


class Network:
    def __init__(self, replicas: int, workdir: Path, *, redis_replica: bool = False) -> None:
        tag = os.getpid() % 10_000
        self.prefix = f"iw{tag}"
        self.net = 10 + tag % 200  # 10.N/16, N from the process: no two runs collide
        self.replicas = replicas
        self.redis_replica = replicas if redis_replica else None
        """The namespace slot of the Redis replica, if there is one."""
        self.workdir = workdir
        self.svc = f"{self.prefix}-svc"
        self.address = f"10.{self.net}.0.1"
        self.services: list[embedded.LocalService] = []
        self._made: list[str] = []
        self._route = False

    def namespace(self, replica: int) -> str:
        return f"{self.prefix}-w{replica}"

    def host(self, replica: int) -> str:
        return f"10.{self.net}.{replica + 1}.2"

    @property
    def bootstrap(self) -> str:
        return f"{self.address}:{BROKER_PORT}"

    @property
    def redis_url(self) -> str:
        return f"redis://{self.address}:{REDIS_PORT}/0"

    # -- set-up and tear-down ------------------------------------------------------------

    def __enter__(self) -> Network:
        try:
            self._build()
            self._start_services()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _build(self) -> None:
        net, svc = self.net, self.svc
        self._remove_leftovers()
        self._add_namespace(svc)
        _run("ip", "-n", svc, "link", "set", "lo", "up")
        _run("ip", "-n", svc, "addr", "add", f"{self.address}/32", "dev", "lo")
        _run("ip", "netns", "exec", svc, "sysctl", "-qw", "net.ipv4.ip_forward=1")
        for k in range(self._slots):
            ns = self.namespace(k)
            self._add_namespace(ns)
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            outer, inner = f"{self.prefix}-s{k}", f"{self.prefix}-w{k}"
            _run(
                "ip", "link", "add", outer, "netns", svc, "type", "veth", "peer", inner, "netns", ns
            )
            _run("ip", "-n", svc, "addr", "add", f"10.{net}.{k + 1}.1/24", "dev", outer)
            _run("ip", "-n", ns, "addr", "add", f"{self.host(k)}/24", "dev", inner)
            _run("ip", "-n", svc, "link", "set", outer, "up")
            _run("ip", "-n", ns, "link", "set", inner, "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", f"10.{net}.{k + 1}.1")
        here, there = f"{self.prefix}-r", f"{self.prefix}-h"
        _run("ip", "link", "add", here, "type", "veth", "peer", there, "netns", svc)
        self._made.append(f"link:{here}")
        _run("ip", "addr", "add", f"10.{net}.250.2/24", "dev", here)
        _run("ip", "-n", svc, "addr", "add", f"10.{net}.250.1/24", "dev", there)
        _run("ip", "link", "set", here, "up")
        _run("ip", "-n", svc, "link", "set", there, "up")
        _run("ip", "route", "add", f"10.{net}.0.0/16", "via", f"10.{net}.250.1")
        self._route = True

    def _remove_leftovers(self) -> None:
        """What a run killed before its clean-up left under these names (a SIGKILLed
        pytest): the names and the subnet come from the process id, which repeats."""
        _try("ip", "route", "del", f"10.{self.net}.0.0/16")
        _try("ip", "link", "del", f"{self.prefix}-r")
        for name in [self.svc, *(self.namespace(k) for k in range(self._slots))]:
            _try("ip", "netns", "del", name)

    @property
    def _slots(self) -> int:
        return self.replicas + (self.redis_replica is not None)

    def _add_namespace(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._made.append(f"netns:{name}")

    def _start_services(self) -> None:
        inside = ["ip", "netns", "exec", self.svc]
        url = f"tcp://{self.bootstrap}"
        broker = embedded.LocalService(
            "tansu",
            [*inside, embedded.tansu_binary(), "broker", "--listener-url", url,
             "--advertised-listener-url", url],
            BROKER_PORT, self.workdir / "tansu.log", host=self.address,
        )  # fmt: skip
        redis = embedded.LocalService(
            "redis",
            [*inside, embedded.redis_binary(), "--port", str(REDIS_PORT), "--bind", self.address,
             "--protected-mode", "no", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir)],
            REDIS_PORT, self.workdir / "redis.log", host=self.address,
        )  # fmt: skip
        services = [broker, redis]
        if (slot := self.redis_replica) is not None:
            data = self.workdir / "replica"
            data.mkdir(exist_ok=True)
            argv = [
                *self.command(slot, [embedded.redis_binary()]), "--port", str(REDIS_PORT),
                "--bind", self.host(slot), "--protected-mode", "no", "--save", "",
                "--appendonly", "no", "--dir", str(data),
                "--replicaof", self.address, str(REDIS_PORT),
            ]  # fmt: skip
            log = self.workdir / "redis-replica.log"
            services.append(
                embedded.LocalService("redis replica", argv, REDIS_PORT, log, host=self.host(slot))
            )
        for service in services:
            service.start()
            self.services.append(service)

    def close(self) -> None:
        for service in self.services:
            service.stop()
        self.services.clear()
        if self._route:
            _try("ip", "route", "del", f"10.{self.net}.0.0/16")
            self._route = False
        for made in reversed(self._made):
            kind, name = made.split(":", 1)
            _try("ip", kind, "del", name)
        self._made.clear()

    # -- faults ---------------------------------------------------------------------------

    def cut(self, replica: int, *, redis: bool = False, broker: bool = False) -> None:
        """Drop, silently and both ways, the replica's packets to and from Redis and/or
        the broker (its connections stay open, half-open, until their timeouts)."""
        ns = self.namespace(replica)
        ports = ([REDIS_PORT] if redis else []) + ([BROKER_PORT] if broker else [])
        for port in ports:
            rules = [
                ["OUTPUT", "-d", self.address, "-p", "tcp", "--dport", str(port)],
                ["INPUT", "-s", self.address, "-p", "tcp", "--sport", str(port)],
            ]
            for rule in rules:
                _run("ip", "netns", "exec", ns, "iptables", "-A", *rule, "-j", "DROP")

    def heal(self, replica: int) -> None:
        _run("ip", "netns", "exec", self.namespace(replica), "iptables", "-F")

    def command(self, replica: int, argv: list[str]) -> list[str]:
        """``argv`` run inside the replica's namespace."""
        return ["ip", "netns", "exec", self.namespace(replica), *argv]
