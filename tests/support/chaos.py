"""Worker replicas as real processes that a test can kill, stop and restart, and the
ground truth the fault scenarios check against: what was published, what ran, what
came out."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from idempotent_worker.local import embedded
from idempotent_worker.local.demo import (
    generate_traffic,
    metric_sum,
    probe,
    read_all,
    scrape,
    spawn_worker,
    wait_for_group,
    worker_env,
)
from tests.support import netns
from tests.support.kafka import group_lag
from tests.support.netns import Network

REPO = Path(__file__).resolve().parent.parent.parent
PARTITIONS = 6


@dataclass
class Row:
    """One line of the fault table printed at the end of the session."""

    scenario: str
    messages: int
    faults: str
    lost: int
    run_twice: int
    dead_lettered: int


REPORT_FILE = "FAULT_REPORT_FILE"
"""The environment variable naming the file the rows go to: the scenarios may run in
pytest-xdist's worker processes, and the controller prints the table."""


def report(row: Row) -> None:
    with Path(os.environ[REPORT_FILE]).open("a") as file:
        file.write(json.dumps(asdict(row)) + "\n")


def report_table() -> list[str]:
    """The rows reported so far, as a Markdown table; empty if there are none."""
    path = Path(os.environ.get(REPORT_FILE, "/nonexistent"))
    if not path.exists() or not path.read_text().strip():
        return []
    header = "| scenario | messages | faults injected | lost | run twice | dead-lettered |"
    lines = [header, "|---|---:|---|---:|---:|---:|"]
    for line in path.read_text().splitlines():
        row = Row(**json.loads(line))
        lines.append(
            f"| {row.scenario} | {row.messages} | {row.faults} | {row.lost} "
            f"| {row.run_twice} | {row.dead_lettered} |"
        )
    return lines


class Replicas:
    """``count`` slots, each running at most one ``idempotent-worker run`` process."""

    def __init__(
        self,
        count: int,
        env_for: Callable[[int], dict[str, str]],
        logdir: Path,
        network: Network | None = None,
    ):
        self.network = network
        """Each slot in a network namespace of its own (tests/support/netns.py)."""
        self.ports = (
            [netns.HTTP_PORT] * count if network else [embedded.free_port() for _ in range(count)]
        )
        self.hosts = [network.host(k) if network else "127.0.0.1" for k in range(count)]
        self._env_for = env_for
        self._logdir = logdir
        self._processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self._starts = [0] * count
        self.exit_codes: list[int] = []  # of every process that ended, in order

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, *exc_info: object) -> None:
        for process in self._processes:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    def start(self, slot: int) -> None:
        self._starts[slot] += 1
        log = self._logdir / f"replica-{slot}-{self._starts[slot]}.log"
        prefix = self.network.command(slot, []) if self.network else []
        self._processes[slot] = spawn_worker(
            self._env_for(self.ports[slot]), log, cwd=REPO, prefix=prefix
        )

    def start_all(self, partitions: int) -> None:
        """Start every slot and wait until they share the ``partitions`` between them."""
        for slot in range(len(self.ports)):
            self.start(slot)
        self.settle(partitions)

    def running(self) -> list[int]:
        return [s for s, p in enumerate(self._processes) if p is not None and p.poll() is None]

    def send(self, slot: int, sig: signal.Signals) -> None:
        process = self._processes[slot]
        assert process is not None
        process.send_signal(sig)

    def poll(self, slot: int) -> int | None:
        """The exit code of the slot's process if it ended by itself (recorded), else None."""
        process = self._processes[slot]
        if process is None or (code := process.poll()) is None:
            return None
        self.exit_codes.append(code)
        self._processes[slot] = None
        return code

    def end(self, slot: int, sig: signal.Signals = signal.SIGTERM, timeout: float = 60) -> int:
        """Send ``sig`` to the slot's process and wait for it to exit; its exit code."""
        process = self._processes[slot]
        assert process is not None
        process.send_signal(sig)
        code = process.wait(timeout)
        self.exit_codes.append(code)
        self._processes[slot] = None
        return code

    def end_all(self) -> list[int]:
        return [self.end(slot) for slot in self.running()]

    def settle(self, partitions: int, timeout: float = 60) -> None:
        """Wait until the running replicas are ready and own every partition between them.

        The scenarios change membership only in a settled group: Tansu 0.6 (the local
        broker) loses a LeaveGroup sent while the group is rebalancing, keeps the
        departed member as its leader, and never completes a rebalance again."""
        running = self.running()
        wait_for_group(
            [self.ports[s] for s in running], partitions, timeout, [self.hosts[s] for s in running]
        )

    def logs(self) -> str:
        return "".join(path.read_text() for path in sorted(self._logdir.glob("replica-*.log")))

    def metric(self, name: str, **labels: str) -> float:
        """``name`` summed over the running replicas."""
        running = self.running()
        return metric_sum([scrape(self.ports[s], self.hosts[s]) for s in running], name, **labels)

    def ready(self, slot: int) -> bool:
        return probe(self.ports[slot], "/readyz", self.hosts[slot])


def message_ids(bootstrap: str, topic: str) -> Counter[str]:
    """How many records of ``topic`` carry each ``message-id`` header."""
    return Counter(
        headers["message-id"].decode()
        for headers, _ in read_all(bootstrap, topic)
        if "message-id" in headers
    )


class Traffic:
    """Orders published in the background: ``batch`` every ``interval`` s, ``rounds`` times,
    with ``duplicate_share`` of them repeating an earlier id of their round."""

    def __init__(
        self,
        bootstrap: str,
        topic: str,
        *,
        batch: int,
        rounds: int,
        interval: float,
        partitions: int,
        duplicate_share: float = 0.3,
    ) -> None:
        self.messages = batch * rounds
        self._thread = threading.Thread(
            target=generate_traffic,
            args=(bootstrap, topic, batch, duplicate_share, partitions, interval, rounds),
            daemon=True,
        )
        self._thread.start()

    def flowing(self) -> bool:
        return self._thread.is_alive()

    def join(self, timeout: float = 120) -> None:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the publisher did not finish"


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def during(seconds: float, step: float = 0.5) -> Iterator[float]:
    """Yield every ``step`` s for ``seconds``: the time left."""
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        yield left
        time.sleep(min(step, left))


class Scenario:
    """Topics, group and replica environment of one scenario, and its final accounting."""

    def __init__(self, kafka_bootstrap, redis_url, unique_name, make_topics, ledger, tmp_path):
        self.bootstrap = kafka_bootstrap
        self.redis_url = redis_url
        self.input = unique_name("in")
        self.output = f"{self.input}.out"
        self.dlq = f"{self.input}.dlq"
        self.group = unique_name("group")
        self.ledger = ledger
        self.logdir = tmp_path
        self.handler = "ledger_and_emit"
        """A function of tests.support.handlers, or a full ``module:function`` path."""
        self.route: dict[str, object] = {}  # more route keys, e.g. max_in_flight
        self.extra: dict[str, str] = {
            "WORKER_DEDUP__LEASE_SECONDS": "3",
            "WORKER_REDIS__SOCKET_TIMEOUT_SECONDS": "0.5",
            "WORKER_LOG__LEVEL": "WARNING",
        }
        make_topics({self.input: PARTITIONS, self.output: PARTITIONS, self.dlq: 1})

    def env_for(self, port: int) -> dict[str, str]:
        handler = self.handler if ":" in self.handler else f"tests.support.handlers:{self.handler}"
        route = {
            "topic": self.input,
            "handler": handler,
            "output_topic": self.output,
            **self.route,
        }
        return worker_env(
            self.bootstrap,
            self.redis_url,
            self.group,
            port,
            [route],
            LEDGER_PATH=str(self.ledger.path),
            **self.extra,
        )

    def replicas(self, count: int, network: Network | None = None) -> Replicas:
        return Replicas(count, self.env_for, self.logdir, network)

    def traffic(self, batch: int, rounds: int, interval: float) -> Traffic:
        """Orders with 30% duplicate ids, published to the input in the background."""
        return Traffic(
            self.bootstrap, self.input, batch=batch, rounds=rounds, interval=interval,
            partitions=PARTITIONS,
        )  # fmt: skip

    def published(self) -> set[str]:
        return set(message_ids(self.bootstrap, self.input))

    def finished(self) -> bool:
        """Every published id ran and the group committed everything (the lag first:
        reading what was published takes a second and a half of quiet)."""
        return self.lag() == 0 and self.published() <= self.ledger.runs().keys()

    def lag(self) -> int:
        return group_lag(self.bootstrap, self.group, self.input)

    def account(self, scenario: str, messages: int, faults: str) -> tuple[int, int, int]:
        """(lost, ids run more than once, dead-lettered), recorded in the report."""
        runs = self.ledger.runs()
        lost = len(self.published() - runs.keys())
        twice = sum(1 for count in runs.values() if count > 1)
        dead = sum(message_ids(self.bootstrap, self.dlq).values())
        report(Row(scenario, messages, faults, lost, twice, dead))
        return lost, twice, dead

    def outputs(self) -> tuple[set[str], int]:
        """(distinct output message ids, output records repeating one already seen)."""
        outputs = message_ids(self.bootstrap, self.output)
        return set(outputs), sum(outputs.values()) - len(outputs)
