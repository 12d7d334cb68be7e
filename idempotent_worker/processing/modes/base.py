"""What a dedup mode is, and what it may ask of the per-message state machine
(processing/handling.py satisfies ``Host``): the modes import this module, never the
state machine, so the two do not import each other."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from structlog.typing import FilteringBoundLogger

from idempotent_worker.deadletter.letter import DeadLetter
from idempotent_worker.dedup.base import Claim
from idempotent_worker.errors import Interrupted, LeaseLost
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.processing.completions import Handled
from idempotent_worker.processing.deadletters import DeadLetterWriter
from idempotent_worker.processing.delivery import FencedDelivery
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.outcomes import Outcomes
from idempotent_worker.replies import Kept


class Host(Protocol):
    """The state machine, as the modes see it."""

    metrics: Metrics
    outcomes: Outcomes
    dead_letters: DeadLetterWriter
    log: FilteringBoundLogger
    sleep: Callable[[float], bool]
    delivery: FencedDelivery

    def skip(self, item: Item, claim: Claim, reason: str | None = None) -> None: ...

    def failed(self, item: Item, attempt: int, failure: Exception) -> DeadLetter | None: ...

    def give_up(self, item: Item, token: str, letter: DeadLetter) -> None: ...

    def backoff(self, attempt: int, failure: Exception) -> float: ...

    def attempt(
        self, item: Item, attempt: int, token: str | None
    ) -> Handled | LeaseLost | Interrupted | Exception: ...


class DedupMode(Protocol):
    uses_cache: bool
    """Whether the replica's local cache of completed ids may answer for this route."""
    quiet: bool
    """Whether finishing a duplicate produces nothing and runs nothing, so it need not
    wait for the messages before it (a batch route's call goes on around it)."""

    def duplicate(self, handling: Host, item: Item, claim: Claim) -> None:
        """Finish ``item``, whose id ``claim`` found completed."""

    def admit(self, handling: Host, item: Item, claim: Claim, token: str) -> bool:
        """Whether ``item``, claimed under ``token``, runs; if not, the mode finished it."""

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        """What a completion keeps for later duplicates ("" for nothing)."""


def duplicate_reason(item: Item, claim: Claim) -> str:
    """``conflict`` (another payload), ``redelivery`` (the same record) or ``duplicate``."""
    if claim.fingerprint is not None and claim.fingerprint != item.fingerprint:
        return "conflict"
    return "redelivery" if claim.origin == item.origin else "duplicate"
