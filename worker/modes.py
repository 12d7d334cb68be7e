"""What a route does with an id its store already holds completed, one small class per
mode, chosen by the route's ``dedup`` and ``on_duplicate`` options. A new mode is a
class here; the state machine in worker/handling.py calls it and does not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from worker.dedup.base import Claim
from worker.items import Item
from worker.registry import ResolvedRoute
from worker.replies import NOT_KEPT, Kept, encode, size

if TYPE_CHECKING:
    from worker.handling import Handling


class DedupMode(Protocol):
    uses_cache: bool
    """Whether the replica's local cache of completed ids may answer for this route."""

    def duplicate(self, handling: Handling, item: Item, claim: Claim) -> None:
        """Finish ``item``, whose id ``claim`` found completed."""

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        """What a completion keeps for later duplicates ("" for nothing)."""


class SkipDuplicates:
    """The default: a duplicate is skipped and counted."""

    uses_cache = True

    def duplicate(self, handling: Handling, item: Item, claim: Claim) -> None:
        handling.skip(item, claim)

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        return ""


class ReplayReplies:
    """``on_duplicate = "replay"``: a completion keeps the run's outputs, and a duplicate
    produces them again (to its own reply topic, with its own correlation id). A
    redelivery of the same record, a conflicting payload and an id completed without
    a kept reply are skipped as by default."""

    uses_cache = False  # the cache does not hold replies

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes

    def duplicate(self, handling: Handling, item: Item, claim: Claim) -> None:
        same_payload = claim.fingerprint is None or claim.fingerprint == item.fingerprint
        if claim.reply is None or not same_payload or claim.origin == item.origin:
            handling.skip(item, claim)
        elif claim.reply == NOT_KEPT:
            handling.skip(item, claim, reason="reply_not_kept")
        else:
            handling.replay(item, claim.reply)

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        kept = outputs()
        return encode(kept) if size(kept) <= self._max_bytes else NOT_KEPT


class Shadow:
    """``dedup = "shadow"``: claims and completions as usual, duplicates detected and
    counted, and handled all the same."""

    uses_cache = True

    def duplicate(self, handling: Handling, item: Item, claim: Claim) -> None:
        handling.detect(item, claim)
        handling.run_unclaimed(item)

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        return ""


def mode_for(route: ResolvedRoute, max_stored_reply_bytes: int) -> DedupMode:
    if route.dedup == "shadow":
        return Shadow()
    if route.on_duplicate == "replay":
        return ReplayReplies(max_stored_reply_bytes)
    return SkipDuplicates()
