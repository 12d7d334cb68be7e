"""``dedup = "sequence"``: sequential idempotence. Every message carries its entity and
its position in that entity's history (``entity``, ``sequence``); the store keeps, per
entity, the highest sequence applied. A message at or below it is stale and skipped
(``duplicates_skipped{reason="stale"}``); above it, the entity is claimed (so two
replicas never run one entity at once), the handler runs with the same lease, fencing
and retries as an id's, and completing raises the position (never lowers it).

A message more than one above the position is a gap: handled and counted
(``sequence_gaps_total``), or dead-lettered with reason ``sequence_gap`` with
``on_gap = "dead_letter"``. An entity with no position yet has no gap: its first message
sets it, whatever its number.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from idempotent_worker.deadletter.letter import DeadLetter
from idempotent_worker.dedup.base import Claim
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.modes.base import Host
from idempotent_worker.replies import Kept


class Positions:
    uses_cache = False
    quiet = True

    def __init__(self, on_gap: str) -> None:
        self._dead_letter_gaps = on_gap == "dead_letter"

    def duplicate(self, handling: Host, item: Item, claim: Claim) -> None:
        """``claim`` found the entity's position at or above the message's sequence."""
        handling.metrics.duplicates.labels(item.route.topic, "stale").inc()
        if handling.outcomes.debug:
            handling.outcomes.log(item, "duplicate", reason="stale", position=claim.position)
        item.finish("stale", position=claim.position)

    def admit(self, handling: Host, item: Item, claim: Claim, token: str) -> bool:
        assert item.sequence is not None
        if claim.position is None or item.sequence <= claim.position + 1:
            return True
        handling.metrics.sequence_gaps.labels(item.route.topic).inc()
        if not self._dead_letter_gaps:
            return True
        detail = (
            f"sequence {item.sequence} follows position {claim.position}: "
            f"{item.sequence - claim.position - 1} missing"
        )
        handling.give_up(item, token, DeadLetter("sequence_gap", "SequenceGap", detail, 0, item.id))
        return False

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        return ""
