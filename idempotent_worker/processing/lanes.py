"""Which messages of a batch may run at the same time."""

from __future__ import annotations

from collections.abc import Sequence

from idempotent_worker.processing.items import Item


def lanes(items: Sequence[Item]) -> list[list[Item]]:
    """Split ``items`` into lanes that may run concurrently, each in its original order:
    two messages with the same Kafka key, or the same id (or entity), share a lane."""
    parent: dict[object, object] = {}

    def root(node: object) -> object:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for index, item in enumerate(items):
        key = item.record.key()
        if key is not None:
            parent[root(("key", item.route.topic, key))] = root(index)
        if item.message is not None:
            parent[root(("id", item.key))] = root(index)
    grouped: dict[object, list[Item]] = {}
    for index, item in enumerate(items):
        grouped.setdefault(root(index), []).append(item)
    return list(grouped.values())
