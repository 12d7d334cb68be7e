"""A poll batch's claims, in one place: the loop claims the batch's ids in one round
trip, and its lanes (threads, or the loop's own thread) take them from here.

A lane that must wait on another replica's claim first lets go of every claim of the
batch whose message has not started, in any lane: a claim kept while waiting could be
the one the other replica waits for, and two replicas would wait on each other (a
queued lane's claims as much as the waiting lane's own later ones). A message whose
claim was let go is claimed again when its lane reaches it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

from idempotent_worker.dedup.base import BUSY, Claim, ClaimStatus
from idempotent_worker.processing.items import Item

GiveBack = Callable[[str, list[tuple[str, int]], bool], None]
"""Releases a token's ``(id, attempt)`` claims; waits out an outage if asked."""


class ClaimBook:
    def __init__(self, claims: dict[str, Claim], token: str, give_back: GiveBack) -> None:
        self.token = token
        self._claims = claims
        self._give_back = give_back
        self._started: set[str] = set()
        self._lock = threading.Lock()

    def start(self, key: str) -> Claim:
        """The batch's claim of ``key`` for the message that starts now (BUSY if it was let
        go meanwhile: claim it again)."""
        with self._lock:
            self._started.add(key)
            return self._claims[key]

    def let_go(self) -> None:
        """Release every claim whose message has not started (a lane is about to wait on
        another replica's claim)."""
        self._release(None, wait_out_outage=True)

    def give_up(self, items: Iterable[Item]) -> None:
        """Release the claims of ``items`` that did not start: they will not run here
        (revoked, or stopping). Best effort: a lease left behind expires."""
        self._release({item.key for item in items if item.message is not None}, False)

    def _release(self, keys: set[str] | None, wait_out_outage: bool) -> None:
        with self._lock:
            released = [
                (key, claim.attempt)
                for key, claim in self._claims.items()
                if claim.status is ClaimStatus.CLAIMED
                and key not in self._started
                and (keys is None or key in keys)
            ]
            for key, _ in released:
                self._claims[key] = BUSY
        if released:
            self._give_back(self.token, released, wait_out_outage)
