"""The shared dedup store: the record of which message ids are in progress or completed."""

from worker.dedup.base import Claim, ClaimStatus, DedupStore, State

__all__ = ["Claim", "ClaimStatus", "DedupStore", "State"]
