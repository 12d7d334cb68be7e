"""The dedup store contract.

A record per message id moves through :class:`State`::

    ABSENT --claim--> IN_PROGRESS(token, lease) --complete--> COMPLETED(ttl)
                           |  \\--release / lease expiry--> ABSENT
                           \\--claim with the same token: lease refreshed

Every transition is atomic in the store and checks the claim token, so a worker
that lost its claim (lease expired, another worker took over) cannot complete or
release a record it no longer owns.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

Attempts = Literal["keep", "clear"]
"""What a release does to the id's count of runs begun: ``keep`` it (to be retried, or
never run) or ``clear`` it (given up: dead-lettered)."""


class State(enum.Enum):
    ABSENT = "absent"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class ClaimStatus(enum.Enum):
    CLAIMED = "claimed"
    """The caller now holds the claim (new, or its own claim with the lease refreshed)."""
    COMPLETED = "completed"
    """The id was already processed: a duplicate."""
    BUSY = "busy"
    """Another claim holds the id: wait for it to complete, be released or expire."""


@dataclass(frozen=True, slots=True)
class Claim:
    status: ClaimStatus
    origin: str | None = None
    """For COMPLETED: ``topic/partition/offset`` of the record whose processing completed it."""
    fingerprint: str | None = None
    """For COMPLETED: the fingerprint of the payload that was processed."""
    reply: str | None = None
    """For COMPLETED: what the completion stored for duplicates to replay (a route with
    ``on_duplicate = "replay"``; see replies.py), None if nothing was."""
    position: int | None = None
    """From ``claim_positions``: the entity's recorded position (None: no record yet). With
    COMPLETED, the message's sequence is at or below it (stale) and nothing was claimed."""
    attempt: int = 0
    """For CLAIMED: 1 when the id had no runs counted and this claim counted its first;
    0 when runs were counted before (they crashed, timed out or failed), so the caller
    counts its run with ``begin`` just before it starts."""


@dataclass(frozen=True, slots=True)
class Inspection:
    """What the store holds for one id, for operators (``idempotent-worker ids show``)."""

    state: State
    runs: int | None = None
    """Runs of the handler begun and not finished (in progress, or a claim let go)."""
    owner: str | None = None
    """IN_PROGRESS: the claim's token (``<host>-<pid>-<worker>:<n>``)."""
    lease_left_ms: int | None = None
    origin: str | None = None
    """COMPLETED: ``topic/partition/offset`` of the record that completed it."""
    fingerprint: str | None = None
    ttl_left_ms: int | None = None
    """How long the record lives on."""


Forgotten = Literal["completed", "in_progress", "absent", "refused"]
"""What ``forget`` found: ``refused`` is a claim in progress left alone (no force)."""


FIRST_CLAIM = Claim(ClaimStatus.CLAIMED, attempt=1)
CLAIMED = Claim(ClaimStatus.CLAIMED)
BUSY = Claim(ClaimStatus.BUSY)


@dataclass(frozen=True, slots=True)
class Completion:
    """What ``complete`` records for one id handled under ``token``'s claim."""

    id: str
    token: str
    origin: str
    fingerprint: str = ""
    reply: str = ""
    """Kept with the completed record for duplicates to replay; "" keeps nothing."""
    sequence: int | None = None
    """Set for an entity claimed with ``claim_positions``: completing raises the entity's
    position to it (never lowers it) and ends the claim; ``origin``, ``fingerprint`` and
    ``reply`` are not kept."""


class DedupStore(Protocol):
    """What the worker needs from a dedup store. Failures raise ``StoreUnavailable``."""

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        """Claim every id in one atomic step; one :class:`Claim` per id, in order.

        An id claimed with no runs counted gets its first run counted at once
        (``attempt`` 1), so the common case costs no ``begin`` round trip. Releasing such
        a claim unstarted should clear the count again (``attempts="clear"``)."""

    def claim_positions(
        self, entities: Sequence[tuple[str, int]], token: str, lease_seconds: float
    ) -> list[Claim]:
        """For each ``(entity, sequence)``, in one atomic step: COMPLETED (stale, nothing
        claimed) if ``sequence`` is at or below the entity's position, else the entity's
        claim as ``claim`` takes an id's (CLAIMED or BUSY), with the position in
        ``Claim.position``. The other operations take an entity's claim like an id's."""

    def begin(self, id: str, token: str) -> int:
        """Count a run of ``id``'s handler about to start under ``token``'s claim.

        Returns the number of this run over every replica and restart (a run whose worker
        died counts), or 0 if ``token`` no longer holds the claim."""

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        """Mark each claimed id completed for ``ttl_seconds``, remembering its origin and
        fingerprint, and forget its attempt count; all in one step. A completion with a
        ``sequence`` raises its entity's position instead (kept ``position_ttl_seconds``
        from then, or for good) and deletes the entity's claim. Per id:

        True if the record is now completed under the completion's token: also when it
        already was (an ambiguous earlier attempt can simply be repeated), and when the
        claim expired without anyone else claiming the id (the work is done; nobody
        else is on it). False if another token holds or completed the id: the lease
        was lost.
        """

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        """Delete each claim that ``token`` still holds, in one step; how many it deleted."""

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        """Restart the lease of each claim ``token`` still holds; per id, whether it did.

        Unlike ``claim`` it never takes an id, so a renewal racing a release cannot
        resurrect the released claim."""

    def epoch(self, candidate: str) -> str:
        """The store's epoch marker, first set to ``candidate`` if it is missing.

        The marker lives as long as the records do, so a marker that changed under a
        replica means the store lost its records (FLUSHALL, a restart without
        persistence, a failover to an empty replica)."""

    def state(self, id: str) -> State:
        """The current state of ``id`` (for tests and diagnostics)."""

    def inspect(self, id: str) -> Inspection:
        """Everything the store holds for ``id``."""

    def forget(self, ids: Sequence[str], force: bool) -> list[Forgotten]:
        """Delete each id's record, so that a later copy runs again: completed ones, and
        claims in progress only with ``force``; then count a forget (``forgets``)."""

    def forgets(self) -> int:
        """How many times ids were forgotten: replicas that see it change drop their
        local caches of completed ids."""

    def eviction_policy(self) -> str | None:
        """The store's policy for evicting keys when full; None if it cannot be read."""

    def ping(self) -> None:
        """Raise ``StoreUnavailable`` unless the store answers."""

    def close(self) -> None:
        """Release connections."""
