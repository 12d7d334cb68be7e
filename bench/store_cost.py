"""What the dedup store costs per message (``bench/run.py --cost-only``): the figures
that size a Redis for a fleet.

- Redis CPU per message: variant d (no-op handler) over the benchmark's topic against a
  ``redis-server`` of its own with AOF fsynced at every write (the README's settings),
  from the server's ``INFO cpu``, and where it goes: ``INFO commandstats`` (the scripts,
  and the commands they run), AOF bytes written, and ``SLOWLOG`` (calls over 1 ms).
- Memory per completed id: 100,000 ids of 18 characters claimed and completed through
  the store under the default prefix, ``INFO memory``'s used_memory before and after.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import redis

from worker import embedded
from worker.dedup.base import Completion
from worker.dedup.redis import RedisDedupStore

MEMORY_IDS = 100_000


def store_cost(
    bootstrap: str, workdir: Path, topic: str, count: int, run: Callable[..., float]
) -> None:
    """``run(bootstrap, url, topic, count, handler)`` is the benchmark's worker variant."""
    with embedded.redis(workdir, appendonly=True) as server:
        url = f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis(port=server.port, decode_responses=True)
        client.config_set("slowlog-log-slower-than", 1000)
        client.config_set("slowlog-max-len", 100_000)
        client.config_resetstat()
        client.slowlog_reset()
        before = client.info("cpu")
        aof_before = int(client.info("persistence")["aof_current_size"])
        rate = run(bootstrap, url, topic, count, "noop")
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
        busiest = sorted(stats.items(), key=lambda item: -int(item[1]["usec"]))[:4]
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
        print(f"  memory per completed id: {memory_per_id(client, url):,.0f} B "
              f"({MEMORY_IDS:,} ids of 18 characters, the default prefix)")  # fmt: skip
        client.close()


def memory_per_id(client: redis.Redis, url: str) -> float:
    """Claimed and completed as the worker does, with a worker's token, an origin and a
    fingerprint of the usual sizes."""
    store = RedisDedupStore.from_url(url, "idempotent-worker:orders-worker")
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
            7 * 24 * 3600,
        )
    store.close()
    return (int(client.info("memory")["used_memory"]) - used) / MEMORY_IDS
