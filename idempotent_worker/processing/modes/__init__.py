"""What a route does with an id its store already holds completed: one small class per
mode, in a file of its own, chosen by the route's ``dedup`` and ``on_duplicate``
options. The state machine (processing/handling.py) calls the route's mode and does not
change when a mode is added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

from idempotent_worker.config.registry import ResolvedRoute
from idempotent_worker.dedup.base import Claim
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.replies import Kept

if TYPE_CHECKING:
    from idempotent_worker.processing.handling import Handling


class DedupMode(Protocol):
    uses_cache: bool
    """Whether the replica's local cache of completed ids may answer for this route."""

    def duplicate(self, handling: Handling, item: Item, claim: Claim) -> None:
        """Finish ``item``, whose id ``claim`` found completed."""

    def admit(self, handling: Handling, item: Item, claim: Claim, token: str) -> bool:
        """Whether ``item``, claimed under ``token``, runs; if not, the mode finished it."""

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        """What a completion keeps for later duplicates ("" for nothing)."""


def duplicate_reason(item: Item, claim: Claim) -> str:
    """``conflict`` (another payload), ``redelivery`` (the same record) or ``duplicate``."""
    if claim.fingerprint is not None and claim.fingerprint != item.fingerprint:
        return "conflict"
    return "redelivery" if claim.origin == item.origin else "duplicate"


def mode_for(route: ResolvedRoute, max_stored_reply_bytes: int) -> DedupMode:
    from idempotent_worker.processing.modes.replay import ReplayReplies
    from idempotent_worker.processing.modes.sequence import Positions
    from idempotent_worker.processing.modes.shadow import Shadow
    from idempotent_worker.processing.modes.skip import SkipDuplicates

    if route.dedup == "sequence":
        return Positions(route.on_gap)
    if route.dedup == "shadow":
        return Shadow()
    if route.on_duplicate == "replay":
        return ReplayReplies(max_stored_reply_bytes)
    return SkipDuplicates()
