"""Sequence mode against id mode, in one run (``bench/run.py --sequence-only``).

One topic of entity histories: ``entities`` entities, ``versions`` events each,
published version by version (so a poll batch holds many entities, as an interleaved
stream does), keyed by entity, each with a unique ``message-id`` header. The worker
with a no-op handler reads it twice: as an id route (``d``) and as a sequence route
(``q``, entity and sequence from the JSON value). For each, msg/s and the Redis memory
its records take (INFO's used_memory before and after): per id for ``d``, per entity
for ``q``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis
from confluent_kafka import Producer

from idempotent_worker.local.demo import create_topics

SEQUENCE_ROUTE = {"dedup": "sequence", "entity": "json:entity", "sequence": "json:version"}


def publish_histories(bootstrap: str, topic: str, entities: int, versions: int) -> None:
    create_topics(bootstrap, {topic: 6})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for version in range(1, versions + 1):
        for entity in range(entities):
            value = json.dumps({"entity": f"e-{entity}", "version": version, "p": "x" * 120})
            while True:
                try:
                    producer.produce(
                        topic, value=value, key=f"e-{entity}",
                        headers=[("message-id", f"b-{entity * versions + version - 1}")],
                    )  # fmt: skip
                    break
                except BufferError:
                    producer.poll(0.1)
    if producer.flush(120):
        raise RuntimeError("publishing did not finish")


def sequence_cost(
    bootstrap: str,
    url: str,
    entities: int,
    versions: int,
    run: Callable[..., float],
) -> None:
    """``run(bootstrap, url, topic, count, handler, route=...)`` is the benchmark's
    worker variant: msg/s, having checked that every message ran exactly once."""
    from bench import handlers

    topic = f"bench-seq-{entities}x{versions}"
    count = entities * versions
    publish_histories(bootstrap, topic, entities, versions)
    handlers.Sequence.versions = versions
    client = redis.Redis.from_url(url)
    print(f"\nsequence mode: {entities:,} entities x {versions} versions, {count:,} messages")
    results: dict[str, tuple[float, int]] = {}
    variants: list[tuple[str, str, str, dict[str, Any]]] = [
        ("d", "id mode, no-op handler", "noop", {}),
        ("q", "sequence mode, no-op handler", "noop_sequence", SEQUENCE_ROUTE),
    ]
    for name, what, handler, route in variants:
        before = int(client.info("memory")["used_memory"])
        rate = run(bootstrap, url, topic, count, handler, route=route)
        grown = int(client.info("memory")["used_memory"]) - before
        results[name] = rate, grown
        print(f"{name:>4}  {what:<42} {rate:>10,.0f} msg/s", flush=True)
    client.close()
    (d_rate, d_bytes), (q_rate, q_bytes) = results["d"], results["q"]
    print(f"  q/d = {q_rate / d_rate:.2f} (sequence mode's msg/s against id mode's)")
    print(
        f"  Redis memory: {d_bytes / count:,.0f} B per completed id (d, {count:,} ids), "
        f"{q_bytes / entities:,.0f} B per entity (q, {entities:,} entities, "
        f"{q_bytes / count:,.1f} B per message)"
    )
