"""Which messages of a batch may run at the same time, and which did not start."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from worker.dedup.base import Claim, ClaimStatus
from worker.items import Item


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


def unstarted(items: Iterable[Item], claims: Mapping[str, Claim], seen: set[str]) -> list[Item]:
    """The first of ``items`` with each id (or entity) that the batch claimed and that
    has not started."""
    found: dict[str, Item] = {}
    for item in items:
        if (
            item.message is not None
            and item.key not in seen
            and (claim := claims.get(item.key)) is not None
            and claim.status is ClaimStatus.CLAIMED
        ):
            found.setdefault(item.key, item)
    return list(found.values())
