"""A handled message's outputs delivered, fenced by its claim: produced only while the
claim of its id holds (a replica that lost it to another publishes nothing), and
delivered again, the same outputs, until the broker takes them.

Outputs are pipelined: ``send`` hands them to the producer and the worker goes on to
the next message; their acknowledgements are awaited with the message's completion
group (processing/completions.py: ``wait`` once for the group, then ``settle`` each),
so a broker round trip is paid per group, not per message."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.settings import RetrySettings
from idempotent_worker.dedup.base import Claim, ClaimStatus
from idempotent_worker.errors import Interrupted, KafkaOperationError, LeaseLost
from idempotent_worker.kafka.outputs import DELIVERY_TIMEOUT, Delivery, Outputs, failure
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.processing.guard import GuardedStore
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.leases import LeaseKeeper
from idempotent_worker.processing.outcomes import fields_of
from idempotent_worker.replies import Output


def claim_item(store: GuardedStore, item: Item, token: str) -> Claim:
    """Claim one message's id, or on a sequence route its entity at its sequence."""
    if item.sequence is None:
        return store.claim([item.key], token)[item.key]
    return store.claim_positions([(item.key, item.sequence)], token)[item.key]


@dataclass(slots=True)
class Sent:
    """A message's outputs handed to the producer; their acknowledgements to come."""

    outputs: Sequence[Output]
    deliveries: list[Delivery]
    refused: KafkaOperationError | None = None
    """Why the producer did not take them all (its queue full past a wait, a fatal
    error): delivered again once the group is settled."""

    @property
    def answered(self) -> bool:
        return all(delivery.done for delivery in self.deliveries)

    def failure(self) -> KafkaOperationError | None:
        return self.refused or failure(self.deliveries)


class FencedDelivery:
    def __init__(
        self,
        outputs: Outputs,
        store: GuardedStore,
        leases: LeaseKeeper,
        retry: RetrySettings,
        metrics: Metrics,
        log: FilteringBoundLogger,
        sleep: Callable[[float], bool],
        new_token: Callable[[], str],
    ) -> None:
        self._outputs = outputs
        self._store = store
        self._leases = leases
        self._retry = retry
        self._metrics = metrics
        self._log = log
        self._sleep = sleep
        self._new_token = new_token

    def produce(self, outputs: Sequence[Output], item: Item, token: str | None) -> str | None:
        """Produce ``outputs`` and wait for the broker; with ``token``, only while a claim
        of the item's id holds (a replica that lost it to another publishes nothing): the
        token of that claim. A claim that expired with nobody taking the id over (a store
        outage longer than the lease) is taken again under a new token.

        A failed delivery is retried with backoff, the same outputs (their ``message-id``
        headers are the same, so a copy of one delivered late is a duplicate downstream).
        A long wait for the broker serves the group now and then (``serve``).
        Raises LeaseLost, or Interrupted if the worker stops before they are confirmed."""
        if not outputs:
            return token
        delay = self._retry.backoff_initial_seconds
        while True:
            if token is not None:
                token = self._fence(item, token)
            try:
                self._outputs.confirm(self._send(outputs), DELIVERY_TIMEOUT, self.serve)
                break
            except KafkaOperationError as exc:
                self._not_delivered(item, exc)
                if not self._sleep(delay):
                    raise Interrupted(token) from exc
                delay = min(max(delay * 2, 0.1), self._retry.backoff_max_seconds)
        self._count(outputs)
        return token

    def send(
        self, outputs: Sequence[Output], item: Item, token: str | None
    ) -> tuple[str | None, Sent | None]:
        """Hand ``outputs`` to the producer, without waiting for the broker, while the
        claim holds (as ``produce``): that claim's token, and what was sent (None if
        nothing: no outputs)."""
        if not outputs:
            return token, None
        if token is not None:
            token = self._fence(item, token)
        try:
            return token, Sent(outputs, self._send(outputs))
        except KafkaOperationError as exc:
            return token, Sent(outputs, [], exc)

    def wait(self, sent: Sequence[Sent]) -> None:
        """Wait until the broker answered every delivery of ``sent`` (or timed out)."""
        deliveries = [delivery for one in sent for delivery in one.deliveries]
        self._outputs.wait(deliveries, DELIVERY_TIMEOUT, self.serve)

    def settle(self, sent: Sent | None, item: Item, token: str | None) -> str | None:
        """Once ``sent`` was answered: the token of the claim its outputs went out under;
        if any was refused or not answered, all are delivered again (``produce``:
        fenced, with backoff, raising LeaseLost or Interrupted)."""
        if sent is None:
            return token
        error = sent.failure()
        if error is None:
            self._count(sent.outputs)
            return token
        self._not_delivered(item, error)
        if not self._sleep(self._retry.backoff_initial_seconds):
            raise Interrupted(token) from error
        return self.produce(sent.outputs, item, token)

    def confirm(self, sent: Sent | None, item: Item, token: str | None) -> str | None:
        """``wait`` for one message's outputs, then ``settle`` them."""
        self.wait([sent] if sent is not None else [])
        return self.settle(sent, item, token)

    def poll(self) -> None:
        """Serve the producer's delivery answers without waiting."""
        self._outputs.poll()

    def serve(self) -> None:
        """While a long wait on the broker goes on: on the loop's thread the partitions are
        held still and the group protocol served (lost partitions, the group's state),
        as during any other wait of the loop's."""
        self._sleep(0.01)

    def abandon(self, item: Item, token: str) -> None:
        """Its outputs may not be out (the worker stops): not finished. Another replica
        (or this one, restarted) runs it again; its run stays counted."""
        self._leases.drop(token, [item.key])
        self._store.release_if_reachable([item.key], token, "keep")

    def _send(self, outputs: Sequence[Output]) -> list[Delivery]:
        return [self._outputs.send(o.topic, o.value, key=o.key, headers=o.headers) for o in outputs]

    def _not_delivered(self, item: Item, error: KafkaOperationError) -> None:
        self._metrics.delivery_failures.labels(item.route.topic).inc()
        self._log.error(
            "outputs not delivered; delivering them again (the handler does not run again)",
            **fields_of(item),
            error=str(error),
            code=error.code,
        )

    def _count(self, outputs: Sequence[Output]) -> None:
        for output in outputs:
            self._metrics.outputs.labels(output.topic).inc()

    def holds(self, item: Item, token: str) -> bool:
        """Whether ``token``'s claim of the item's id holds now: the lease keeper
        confirmed it lately enough that a third of the lease is left (no other replica
        can take it before it expires: nothing to write), or the store renews it."""
        return self._leases.fresh(token, item.key) or self._store.renew([item.key], token)[0]

    def _fence(self, item: Item, token: str) -> str:
        """The token of a claim that holds the item's id now: ``token`` if its claim
        holds, else a new one if nobody else took the id meanwhile."""
        if self.holds(item, token):
            return token
        self._leases.drop(token, [item.key])
        retaken = self._new_token()
        claim = claim_item(self._store, item, retaken)
        if claim.status is not ClaimStatus.CLAIMED:
            raise LeaseLost("another replica took the claim while the handler ran")
        self._leases.hold(retaken, [item.key])
        self._log.warning("the claim expired while the handler ran; taken again", **fields_of(item))
        return retaken
