"""What the dedup store costs per message (``bench/run.py --cost-only``): the figures
that size a Redis for a fleet.

- Redis CPU per message: variant d (no-op handler) over the benchmark's topic against a
  ``redis-server`` of its own with AOF fsynced at every write (the README's settings),
  from the server's ``INFO cpu``, and where it goes: ``INFO commandstats`` (the scripts,
  and the commands they run), AOF bytes written, and ``SLOWLOG`` (calls over 1 ms). The
  store is in its steady state first: four older windows of 100,000 completed ids each
  (a week's TTL has about five alive), which every claim looks in.
- Memory per completed id: 100,000 ids of 18 characters claimed and completed through
  the store under the default prefix, ``INFO memory``'s used_memory before and after.

``--cost-only --against REV`` runs this in a fresh process for this tree and for git
revision ``REV`` (a worktree of it, e.g. the commit before a layout change), alternately,
twice each, and prints both sets of figures and their ratios: before and after in one
run of the machine.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from idempotent_worker.dedup.base import Completion
from idempotent_worker.dedup.redis import RedisDedupStore
from idempotent_worker.dedup.scripts import DEFAULT_TTL_SECONDS
from idempotent_worker.local import embedded

MEMORY_IDS = 100_000
PREFIX = "idempotent-worker:orders-worker"
OLDER_WINDOWS = 4
IDS_PER_WINDOW = 100_000


def store_cost(
    bootstrap: str, workdir: Path, topic: str, count: int, run: Callable[..., float]
) -> None:
    """``run(bootstrap, url, topic, count, handler, dedup=...)`` is the benchmark's worker
    variant."""
    with embedded.redis(workdir, appendonly=True) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis(port=server.port, decode_responses=True)
        fill_older_windows(client, PREFIX)
        client.config_set("slowlog-log-slower-than", 1000)
        client.config_set("slowlog-max-len", 100_000)
        client.config_resetstat()
        client.slowlog_reset()
        before = client.info("cpu")
        aof_before = int(client.info("persistence")["aof_current_size"])
        rate = run(bootstrap, url, topic, count, "noop", dedup={"key_prefix": PREFIX})
        after = client.info("cpu")
        aof = (int(client.info("persistence")["aof_current_size"]) - aof_before) / count
        user, sys = (
            (float(after[k]) - float(before[k])) * 1e6 / count
            for k in ("used_cpu_user", "used_cpu_sys")
        )
        stats = client.info("commandstats")
        slow = client.slowlog_get(100_000)
        print(f"\nthe store's cost: variant d over {count:,} messages, one Redis, AOF fsync always")
        print(
            f"  d {rate:,.0f} msg/s; Redis CPU {user + sys:.1f} µs/msg (user {user:.1f}, sys "
            f"{sys:.1f}): one Redis process caps a fleet at {1e6 / (user + sys):,.0f} msg/s"
        )
        busiest = sorted(stats.items(), key=lambda item: -int(item[1]["usec"]))[:5]
        where = ", ".join(
            f"{name.removeprefix('cmdstat_')} {int(s['usec']) / count:.1f} "
            f"({int(s['calls']) / count:.2f} calls)"
            for name, s in busiest
        )
        print(
            f"  where it goes (commandstats, µs/msg; a script's time includes its calls): {where}"
        )
        longest = max((entry["duration"] for entry in slow), default=0) / 1000
        print(f"  AOF {aof:,.0f} B/msg; calls over 1 ms: {len(slow)}, longest {longest:.1f} ms")
        client.flushall()
        print(f"  memory per completed id: {memory_per_id(client, url):,.0f} B "
              f"({MEMORY_IDS:,} ids of 18 characters, the default prefix)")  # fmt: skip
        client.close()


def fill_older_windows(client: redis.Redis, prefix: str) -> None:
    """The windows a store has after a week at the default TTL, before this one: each
    a quarter TTL older, written as the store lays them out (idempotent_worker/dedup/redis.py)."""
    now_ms = int(time.time() * 1000)
    ttl_ms = DEFAULT_TTL_SECONDS * 1000
    for age in range(1, OLDER_WINDOWS + 1):
        expiry = now_ms + ttl_ms + ttl_ms // 4 - age * ttl_ms // 4
        window = f"{prefix}/{expiry}"
        pipe = client.pipeline(transaction=False)
        for start in range(0, IDS_PER_WINDOW, 5000):
            pipe.hset(
                window,
                mapping={
                    f"old{age}-{n:012d}": f"AbCdn4bQgYhMfWUXy9Z{n % 64}/{n:x}"
                    for n in range(start, start + 5000)
                },
            )
        pipe.pexpireat(window, expiry)
        pipe.zadd(f"{prefix}#windows", {window: expiry})
        pipe.execute()


def memory_per_id(client: redis.Redis, url: str) -> float:
    """Claimed and completed as the worker does, with a worker's token, an origin and a
    fingerprint of the usual sizes."""
    store = RedisDedupStore.from_url(url, PREFIX)
    store.epoch("memory")
    token = f"worker-7d9f8b6c5-x2x4z-1-{uuid.uuid4().hex[:8]}:1"
    used = int(client.info("memory")["used_memory"])
    for start in range(0, MEMORY_IDS, 1000):
        ids = [f"order-{n:012d}" for n in range(start, start + 1000)]
        store.claim(ids, token, 30)
        store.complete(
            [
                Completion(id, token, f"orders/3/{n}", "9f86d081884c7d65")
                for n, id in enumerate(ids)
            ],
            DEFAULT_TTL_SECONDS,
        )
    store.close()
    return (int(client.info("memory")["used_memory"]) - used) / MEMORY_IDS


FIGURES = {
    "d msg/s": r"\bd ([\d,]+) msg/s",
    "Redis CPU µs/msg": r"Redis CPU ([\d.]+) µs/msg",
    "AOF B/msg": r"AOF ([\d,]+) B/msg",
    "memory B/id": r"memory per completed id: ([\d,]+) B",
}


def compare_with(revision: str, messages: int, rounds: int = 2) -> None:
    """This tree's figures against ``revision``'s, alternately in fresh processes."""
    here = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as parent:
        there = Path(parent) / "baseline"
        git = ["git", "-C", str(here)]
        subprocess.run([*git, "worktree", "add", "--detach", str(there), revision], check=True)
        try:
            trees = {"before": there, "after": here}
            results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
            for round_ in range(rounds):
                for name, tree in trees.items():
                    print(f"round {round_ + 1}: {name} ({tree})", flush=True)
                    results[name].append(cost_figures(tree, messages))
        finally:
            subprocess.run([*git, "worktree", "remove", "--force", str(there)], check=True)
    print(f"\nthe store's cost, {revision} (before) against this tree (after), medians of "
          f"{rounds} alternating runs of {messages:,} messages each")  # fmt: skip
    print(f"  {'':<18}{'before':>10}{'after':>10}{'after/before':>14}")
    for figure in FIGURES:
        before = statistics.median(run[figure] for run in results["before"])
        after = statistics.median(run[figure] for run in results["after"])
        print(f"  {figure:<18}{before:>10,.1f}{after:>10,.1f}{after / before:>14.2f}")


def cost_figures(tree: Path, messages: int) -> dict[str, float]:
    """``bench/run.py --cost-only`` of the checkout at ``tree``, its figures read back."""
    result = subprocess.run(
        [sys.executable, "bench/run.py", "--cost-only", "--messages", str(messages)],
        cwd=tree,
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"{tree}: exit {result.returncode}\n{result.stderr[-3000:]}")
    figures = {}
    for figure, pattern in FIGURES.items():
        found = re.search(pattern, result.stdout)
        if found is None:
            raise RuntimeError(f"{tree}: no {figure!r} in\n{result.stdout}")
        figures[figure] = float(found[1].replace(",", ""))
    print("  " + ", ".join(f"{k} {v:,.1f}" for k, v in figures.items()), flush=True)
    return figures
