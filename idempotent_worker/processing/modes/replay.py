"""``on_duplicate = "replay"``: the same request gets the same response.

A completion keeps the outputs its run emitted (up to ``dedup.max_stored_reply_bytes``),
and a duplicate produces them again, byte for byte with the same ``message-id``s, to
its own reply topic and with its own correlation id. A redelivery of the same record
(its reply went out already), a conflicting payload and an id completed without a kept
reply are skipped as by default; a reply too large to keep is skipped and counted as
``reply_not_kept``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from idempotent_worker.dedup.base import Claim
from idempotent_worker.errors import Interrupted
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.modes.base import Host
from idempotent_worker.replies import NOT_KEPT, Kept, decode, encode, resolve, size


class ReplayReplies:
    uses_cache = False  # the local cache does not hold replies
    quiet = False

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes

    def admit(self, handling: Host, item: Item, claim: Claim, token: str) -> bool:
        return True

    def duplicate(self, handling: Host, item: Item, claim: Claim) -> None:
        same_payload = claim.fingerprint is None or claim.fingerprint == item.fingerprint
        if claim.reply is None or not same_payload or claim.origin == item.origin:
            handling.skip(item, claim)
        elif claim.reply == NOT_KEPT:
            handling.skip(item, claim, reason="reply_not_kept")
        else:
            self._replay(handling, item, claim.reply, claim.origin)

    def reply(self, outputs: Callable[[], Sequence[Kept]]) -> str:
        kept = outputs()
        return encode(kept) if size(kept) <= self._max_bytes else NOT_KEPT

    def _replay(self, handling: Host, item: Item, reply: str, origin: str | None) -> None:
        """Produce the kept outputs; a failed produce is retried with backoff, the offset
        held until it succeeds (or the worker stops)."""
        assert item.message is not None
        headers, route = item.message.headers, item.route
        outputs = resolve(decode(reply), route.default_topic(headers), route.correlation(headers))
        try:
            handling.delivery.produce(outputs, item, None)  # until delivered
        except Interrupted:
            return
        handling.metrics.replies_replayed.labels(route.topic).inc()
        handling.metrics.duplicates.labels(route.topic, "replayed").inc()
        if handling.outcomes.debug:
            handling.outcomes.log(item, "duplicate", reason="replayed", outputs=len(outputs))
        item.finish("replayed", first_origin=origin)
