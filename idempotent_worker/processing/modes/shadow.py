"""``dedup = "shadow"``: dedup watched, not applied. Claims and completions are recorded
as usual and duplicates are detected and counted (``duplicates_detected_total``), and
every message is handled all the same, so a team can see its duplicate rate before
letting the worker skip anything. Switching the route to ``id`` later uses the records
already stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from idempotent_worker.dedup.base import Claim
from idempotent_worker.errors import Interrupted
from idempotent_worker.processing.completions import Handled
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.modes.base import Host, duplicate_reason
from idempotent_worker.replies import Kept


class Shadow:
    uses_cache = True
    quiet = False

    def admit(self, handling: Host, item: Item, claim: Claim, token: str) -> bool:
        return True

    def duplicate(self, handling: Host, item: Item, claim: Claim) -> None:
        reason = duplicate_reason(item, claim)
        handling.metrics.duplicates_detected.labels(item.route.topic, reason).inc()
        if item.span is not None:
            item.span.set(reason=reason, first_origin=claim.origin)
        self._run_unclaimed(handling, item)

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        return ""

    @staticmethod
    def _run_unclaimed(handling: Host, item: Item) -> None:
        """Run the handler without a claim (the id is completed: there is nothing to
        claim or complete); retried with backoff, then dead-lettered, like any message."""
        attempt = 1
        while True:
            started = time.perf_counter()
            result = handling.attempt(item, attempt, None)
            if isinstance(result, Handled):
                try:
                    handling.delivery.confirm(result.sent, item, None)
                except Interrupted:
                    return
                handling.metrics.topic(item.route.topic).succeeded.inc()
                if handling.outcomes.debug:
                    seconds = round(time.perf_counter() - started, 6)
                    handling.outcomes.log(
                        item, "success", attempt=attempt, duration_seconds=seconds
                    )
                item.finish("shadow", attempt=attempt)
                return
            if isinstance(result, Interrupted):
                return
            letter = handling.failed(item, attempt, result)
            if letter is not None:
                handling.dead_letters.write(item, letter)
                return
            if not handling.sleep(handling.backoff(attempt, result)):
                return
            attempt += 1
