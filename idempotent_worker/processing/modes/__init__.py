"""What a route does with an id its store already holds completed: one small class per
mode, in a file of its own, chosen by the route's ``dedup`` and ``on_duplicate``
options. The state machine (processing/handling.py) calls the route's mode and does not
change when a mode is added. The modes see the state machine through ``base.Host``.
"""

from __future__ import annotations

from idempotent_worker.config.registry import ResolvedRoute
from idempotent_worker.processing.modes.base import DedupMode
from idempotent_worker.processing.modes.replay import ReplayReplies
from idempotent_worker.processing.modes.sequence import Positions
from idempotent_worker.processing.modes.shadow import Shadow
from idempotent_worker.processing.modes.skip import SkipDuplicates


def mode_for(route: ResolvedRoute, max_stored_reply_bytes: int) -> DedupMode:
    if route.dedup == "sequence":
        return Positions(route.on_gap)
    if route.dedup == "shadow":
        return Shadow()
    if route.on_duplicate == "replay":
        return ReplayReplies(max_stored_reply_bytes)
    return SkipDuplicates()
