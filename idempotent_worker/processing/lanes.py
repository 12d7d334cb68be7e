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
    two messages with the same Kafka key, or the same id (or entity), share a lane, and
    a batch route's messages of one partition too (they are one call)."""
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
        if item.route.batch:
            parent[root(("batch", item.route.topic, item.record.partition()))] = root(index)
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
        """Handle ``lane``'s messages in order, with the batch's claims from ``book``.

        A batch route's messages are gathered by partition and called together when the
        lane comes to a message that runs on its own (which may need them finished),
        and at its end."""
        seen: set[str] = set()
        gathered = Gathered()
        claim: Claim | None
        for index, item in enumerate(lane):
            if self._stopping():
                book.give_up([*gathered.take_all(), *lane[index:]])
                return
            key = item.key
            gathers = item.message is not None and item.route.batch and key not in seen
            if gathers and gathered.fits(item):
                seen.add(key)
                gathered.add(item)
                continue
            if item.message is not None and not self._run_gathered(gathered, book):
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
            if gathers:
                seen.add(key)
                gathered.add(item)  # (it did not fit: a key gathered from another partition)
                continue
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
                self._handling.handle(item, claim, token, book.let_go)
            else:
                seen.add(key)
                self._handle(item, book.token, book.start(key), book)
        self._run_gathered(gathered, book)

    def _run_gathered(self, gathered: Gathered, book: ClaimBook) -> bool:
        """Run each partition's gathered messages in order: those that may, in one call;
        one that must wait (its claim held elsewhere or let go, earlier runs unfinished)
        after the call of those before it, on its own. False if the worker is stopping
        (what did not start given up)."""
        batches = gathered.take()
        for number, batch in enumerate(batches):
            together: list[tuple[Item, Claim]] = []
            for index, item in enumerate(batch):
                if self._stopping():
                    self._handling.run_together(together, book.token, book.let_go)
                    book.give_up([*batch[index:], *(i for b in batches[number + 1 :] for i in b)])
                    return False
                if not self._owns(item.record):
                    book.give_up([item])
                    continue
                token, claim = book.token, book.start(item.key)
                if self._handling.joins_call(item, claim, token):
                    together.append((item, claim))
                    continue
                self._handling.run_together(together, token, book.let_go)
                together = []
                self._handle(item, token, claim, book)
            self._handling.run_together(together, book.token, book.let_go)
        return True

    def _handle(self, item: Item, token: str, claim: Claim | None, book: ClaimBook) -> None:
        """Take ``item`` to its end from the batch's ``claim`` of it."""
        if claim is not None and claim.status is ClaimStatus.BUSY:
            # Held elsewhere, or let go by this batch: claimed under a token of its own,
            # which the batch's release (maybe still under way, on another lane) cannot
            # take from it.
            token = self._new_token()
            claim = self._handling.acquire(item, token, before_wait=book.let_go)
        self._handling.handle(item, claim, token, book.let_go)


class Gathered:
    """A lane's batch-route messages waiting for their partition's call."""

    def __init__(self) -> None:
        self._batches: dict[tuple[str, int], list[Item]] = {}
        self._keys: dict[tuple[str, bytes], int] = {}
        """The partition of each Kafka key gathered (a key's messages run in order)."""

    def fits(self, item: Item) -> bool:
        """Whether ``item`` may join: not if its key was gathered from another partition."""
        assert item.message is not None
        key, partition = item.message.key, item.message.partition
        return key is None or self._keys.get((item.route.topic, key), partition) == partition

    def add(self, item: Item) -> None:
        assert item.message is not None
        topic, partition, key = item.route.topic, item.message.partition, item.message.key
        self._batches.setdefault((topic, partition), []).append(item)
        if key is not None:
            self._keys[(topic, key)] = partition

    def take(self) -> list[list[Item]]:
        """Each partition's messages, in the order the partitions were first gathered."""
        batches = list(self._batches.values())
        self._batches.clear()
        self._keys.clear()
        return batches

    def take_all(self) -> list[Item]:
        return [item for batch in self.take() for item in batch]
