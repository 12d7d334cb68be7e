"""An in-process dedup store, for unit tests and single-process experiments.

It implements the same transitions as the Redis store under a lock, with an
injectable clock so tests can expire leases without sleeping.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from idempotent_worker.dedup.base import (
    BUSY,
    CLAIMED,
    FIRST_CLAIM,
    Attempts,
    Claim,
    ClaimStatus,
    Completion,
    Forgotten,
    Inspection,
    State,
)


@dataclass(slots=True)
class _Record:
    state: State
    token: str
    expires_at: float
    origin: str = ""
    fingerprint: str = ""
    reply: str = ""
    begun: bool = False
    """A run was counted under this claim (by ``begin``)."""


class MemoryDedupStore:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._records: dict[str, _Record] = {}
        self._attempts: dict[str, int] = {}
        self._positions: dict[str, tuple[int, float]] = {}  # entity -> (position, expiry)
        self._epoch: str | None = None
        self._forgets = 0
        self._lock = threading.RLock()

    def _live(self, id: str) -> _Record | None:
        record = self._records.get(id)
        if record is not None and record.expires_at <= self._clock():
            del self._records[id]
            return None
        return record

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        with self._lock:
            now = self._clock()
            claims = []
            for id in ids:
                record = self._live(id)
                if record is None or (record.state is State.IN_PROGRESS and record.token == token):
                    begun = record is not None and record.begun
                    self._records[id] = _Record(
                        State.IN_PROGRESS, token, now + lease_seconds, begun=begun
                    )
                    if record is not None and self._attempts.get(id) == 1:
                        claims.append(FIRST_CLAIM)  # its own first claim, sent again
                    elif id in self._attempts:
                        claims.append(CLAIMED)
                    else:
                        self._attempts[id] = 1
                        claims.append(FIRST_CLAIM)
                elif record.state is State.COMPLETED:
                    fingerprint = record.fingerprint or None
                    reply = record.reply or None
                    claims.append(
                        Claim(ClaimStatus.COMPLETED, record.origin, fingerprint, reply=reply)
                    )
                else:
                    claims.append(BUSY)
            return claims

    def claim_positions(
        self, entities: Sequence[tuple[str, int]], token: str, lease_seconds: float
    ) -> list[Claim]:
        claims = []
        with self._lock:  # reentrant: each entity's claim is taken with its position read
            for entity, sequence in entities:
                position = self.position(entity)
                if position is not None and sequence <= position:
                    claims.append(Claim(ClaimStatus.COMPLETED, position=position))
                    continue
                (claim,) = self.claim([entity], token, lease_seconds)
                claims.append(dataclasses.replace(claim, position=position))
        return claims

    def position(self, entity: str) -> int | None:
        position, expires_at = self._positions.get(entity, (None, math.inf))
        return position if expires_at > self._clock() else None

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        with self._lock:
            return [self._complete(c, ttl_seconds, position_ttl_seconds) for c in completions]

    def _complete(
        self, completion: Completion, ttl_seconds: int, position_ttl_seconds: int | None
    ) -> bool:
        record = self._live(completion.id)
        if completion.sequence is not None:
            return self._raise(completion, completion.sequence, record, position_ttl_seconds)
        if record is not None and record.token != completion.token:
            return False
        if record is None or record.state is State.IN_PROGRESS:
            expires_at = self._clock() + ttl_seconds
            self._records[completion.id] = _Record(
                State.COMPLETED, completion.token, expires_at, completion.origin,
                completion.fingerprint, completion.reply,
            )  # fmt: skip
            self._attempts.pop(completion.id, None)
        return True

    def _raise(
        self, completion: Completion, sequence: int, record: _Record | None, ttl: int | None
    ) -> bool:
        position = self.position(completion.id)
        if record is not None and record.token != completion.token:
            return position is not None and sequence <= position
        if position is None or sequence > position:
            expires_at = math.inf if ttl is None else self._clock() + ttl
            self._positions[completion.id] = (sequence, expires_at)
        self._records.pop(completion.id, None)
        self._attempts.pop(completion.id, None)
        return True

    def begin(self, id: str, token: str) -> int:
        with self._lock:
            record = self._live(id)
            if not (record and record.state is State.IN_PROGRESS and record.token == token):
                return 0
            if not record.begun:  # sent again (its reply lost): the same run
                record.begun = True
                self._attempts[id] = self._attempts.get(id, 0) + 1
            return self._attempts[id]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        with self._lock:
            released = 0
            for id in ids:
                stored = self._records.get(id)
                ours = (
                    stored is not None
                    and stored.state is State.IN_PROGRESS
                    and stored.token == token
                )
                record = self._live(id)
                if record is not None and ours:
                    del self._records[id]
                    released += 1
                if attempts == "clear" and ours:  # never another owner's runs, even expired
                    self._attempts.pop(id, None)
            return released

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        with self._lock:
            renewed = []
            for id in ids:
                record = self._live(id)
                held = bool(record and record.state is State.IN_PROGRESS and record.token == token)
                if record and held:
                    record.expires_at = self._clock() + lease_seconds
                renewed.append(held)
            return renewed

    def epoch(self, candidate: str) -> str:
        with self._lock:
            if self._epoch is None:
                self._epoch = candidate
            return self._epoch

    def flush(self) -> None:
        """Forget everything, as FLUSHALL does to Redis."""
        with self._lock:
            self._records.clear()
            self._attempts.clear()
            self._positions.clear()
            self._epoch = None

    def state(self, id: str) -> State:
        with self._lock:
            record = self._live(id)
            return State.ABSENT if record is None else record.state

    def inspect(self, id: str) -> Inspection:
        with self._lock:
            record = self._live(id)
            runs = self._attempts.get(id)
            if record is None:
                return Inspection(State.ABSENT, runs=runs)
            left = int((record.expires_at - self._clock()) * 1000)
            if record.state is State.COMPLETED:
                fingerprint = record.fingerprint or None
                return Inspection(
                    State.COMPLETED, None, None, None, record.origin, fingerprint, left
                )
            return Inspection(State.IN_PROGRESS, runs, record.token, left)

    def forget(self, ids: Sequence[str], force: bool) -> list[Forgotten]:
        found: list[Forgotten] = []
        with self._lock:
            for id in ids:
                record = self._live(id)
                if record is not None and record.state is State.IN_PROGRESS and not force:
                    found.append("refused")
                    continue
                found.append("absent" if record is None else record.state.value)
                self._records.pop(id, None)
                self._attempts.pop(id, None)
            self._forgets += 1
        return found

    def forgets(self) -> int:
        return self._forgets

    def eviction_policy(self) -> str | None:
        return "noeviction"

    def ping(self) -> None:
        return None

    def close(self) -> None:
        return None
