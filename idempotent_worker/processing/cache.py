"""A bounded local memory of ids this replica saw completed.

A redelivered or duplicated id found here is skipped without a Redis round trip. Only
completed ids are kept, never claims in progress, and each for at most the store's
TTL from when this replica first learned it (a duplicate seen again does not extend
it), so the cache can only say what Redis said before. When it is full, the id seen
least recently is forgotten (and asked of Redis again next time).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from idempotent_worker.dedup.base import Claim


class CompletedIds:
    def __init__(
        self, size: int, ttl_seconds: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._size = size
        self._ttl = ttl_seconds
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, Claim]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, id: str) -> Claim | None:
        """The completed record seen for ``id``, if it is remembered and not expired."""
        return self.get_each([id]).get(id)

    def get_each(self, ids: Iterable[str]) -> dict[str, Claim]:
        """The completed records remembered for those of ``ids`` that have one."""
        found: dict[str, Claim] = {}
        if self._size == 0:
            return found
        now = self._clock()
        with self._lock:
            for id in ids:
                entry = self._entries.get(id)
                if entry is None:
                    continue
                seen, claim = entry
                if now - seen >= self._ttl:
                    del self._entries[id]
                    continue
                self._entries.move_to_end(id)
                found[id] = claim
        return found

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def put(self, id: str, claim: Claim) -> None:
        self.put_each([(id, claim)])

    def put_each(self, claims: Iterable[tuple[str, Claim]]) -> None:
        if self._size == 0:
            return
        now = self._clock()
        with self._lock:
            for id, claim in claims:
                entry = self._entries.get(id)
                # Seen again is not completed again: the entry keeps its first time.
                self._entries[id] = (now if entry is None else entry[0], claim)
                self._entries.move_to_end(id)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
