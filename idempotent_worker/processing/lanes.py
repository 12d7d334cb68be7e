"""Which messages of a batch may run at the same time, and how one lane runs."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Collection, Sequence

from confluent_kafka import Message as KafkaMessage

from idempotent_worker.dedup.base import Claim, ClaimStatus
from idempotent_worker.processing.cache import CompletedIds
from idempotent_worker.processing.claimbook import ClaimBook
from idempotent_worker.processing.handling import Handling
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


class LaneRunner:
    """Runs lanes: each one's messages in order, with the batch's claims."""

    def __init__(
        self,
        handling: Handling,
        completed: CompletedIds,
        uncached: Collection[str],
        owns: Callable[[KafkaMessage], bool],
        stopping: Callable[[], bool],
        new_token: Callable[[], str],
    ) -> None:
        self._handling = handling
        self._completed = completed
        self._uncached = uncached
        """Routes whose duplicates the local cache may not answer."""
        self._owns = owns
        self._stopping = stopping
        self._new_token = new_token

    def run_all(self, queue: deque[list[Item]], book: ClaimBook) -> None:
        """Run lanes from ``queue`` until it is empty (one of a pool's threads)."""
        while True:
            try:
                lane = queue.popleft()
            except IndexError:
                return
            self.run(lane, book)

    def run(self, lane: Sequence[Item], book: ClaimBook) -> None:
        """Handle ``lane``'s messages in order, with the batch's claims from ``book``."""
        seen: set[str] = set()
        claim: Claim | None
        for index, item in enumerate(lane):
            if self._stopping():
                book.give_up(lane[index:])
                return
            if not self._owns(item.record):
                # Revoked while the batch was in hand: the new owner reads it again.
                book.give_up([item])
                continue
            if item.message is None:
                assert item.rejection is not None
                self._handling.dead_letters.write(item, item.rejection)
                continue
            key = item.key
            if key in seen:
                # An earlier record of this lane carried the same id (or entity) and is
                # finished by now: look up how it ended (locally if it completed), its
                # completion written first (its claim may have expired meanwhile, and
                # this copy would take the id over and refuse that completion).
                token = self._new_token()
                cache = item.route.topic not in self._uncached
                claim = self._completed.get(key) if cache else None
                if claim is None:
                    self._handling.completions.flush()
                    claim = self._handling.acquire(item, token, before_wait=book.let_go)
            else:
                seen.add(key)
                token, claim = book.token, book.start(key)
                if claim.status is ClaimStatus.BUSY:
                    # Held elsewhere, or let go by this batch: claimed under a token of its
                    # own, which the batch's release (maybe still under way, on another
                    # lane) cannot take from it.
                    token = self._new_token()
                    claim = self._handling.acquire(item, token, before_wait=book.let_go)
            self._handling.handle(item, claim, token, book.let_go)
