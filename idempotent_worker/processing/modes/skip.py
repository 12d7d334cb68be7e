"""The default mode: a duplicate is skipped and counted."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from idempotent_worker.dedup.base import Claim
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.modes.base import Host
from idempotent_worker.replies import Kept


class SkipDuplicates:
    uses_cache = True
    quiet = True

    def admit(self, handling: Host, item: Item, claim: Claim, token: str) -> bool:
        return True

    def duplicate(self, handling: Host, item: Item, claim: Claim) -> None:
        handling.skip(item, claim)

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        return ""
