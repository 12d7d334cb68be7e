"""A bounded local memory of ids this replica saw completed.

A redelivered or duplicated id found here is skipped without a Redis round trip. Only
completed ids are kept, never claims in progress, and each for at most the store's
TTL, so the cache can only say what Redis said before. When it is full, the id seen
least recently is forgotten (and asked of Redis again next time).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from worker.dedup.base import Claim


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
        with self._lock:
            entry = self._entries.get(id)
            if entry is None:
                return None
            seen, claim = entry
            if self._clock() - seen >= self._ttl:
                del self._entries[id]
                return None
            self._entries.move_to_end(id)
            return claim

    def put(self, id: str, claim: Claim) -> None:
        if self._size == 0:
            return
        with self._lock:
            self._entries[id] = (self._clock(), claim)
            self._entries.move_to_end(id)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
