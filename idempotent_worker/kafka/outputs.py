"""The worker's one idempotent producer, for handler outputs and dead letters.

Produce calls are asynchronous: :meth:`Outputs.send` returns a :class:`Delivery`,
:meth:`Outputs.wait` waits until the given deliveries are answered by the broker and
:meth:`Outputs.confirm` also raises if any failed. The worker has a message's outputs
acknowledged before it completes the message's id or stores its offset, but goes on to
the next message meanwhile (processing/completions.py waits once per completion group).
Handlers running concurrently share the producer; each waits only for its own
deliveries.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message

from idempotent_worker.errors import KafkaOperationError
from idempotent_worker.parts import SYSTEM, Parts

DELIVERY_TIMEOUT = 60.0
"""How long the worker waits for the broker to acknowledge what it produced."""

CONFIRM_POLL = 0.005
"""Longest wait of one poll while confirming deliveries (seconds)."""

SERVE_AFTER = 1.0
SERVE_EVERY = 0.2
"""A wait of the loop's longer than ``SERVE_AFTER`` (for acknowledgements here, for its
lanes in processing/loop.py) serves the group every ``SERVE_EVERY`` seconds or so: the loop
keeps its membership, learns of lost partitions and reports its group's state."""

HeaderValue = bytes | str
Headers = Sequence[tuple[str, HeaderValue]]


class Delivery:
    """One produced message: ``done`` once the broker answered, ``error`` if it refused."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = False
        self.error: KafkaError | None = None

    def __call__(self, error: KafkaError | None, message: Message) -> None:
        self.error = error
        self.done = True


class Outputs:
    def __init__(self, config: dict[str, Any], parts: Parts = SYSTEM) -> None:
        self._clock = parts.clock
        self._producer = parts.producer(
            {
                "linger.ms": 2,
                "socket.keepalive.enable": True,  # see idempotent_worker/kafka/consumer.py
                **config,
                "enable.idempotence": True,
                "acks": "all",
            }
        )

    def send(
        self,
        topic: str,
        value: bytes | str | None,
        *,
        key: bytes | str | None = None,
        headers: Headers = (),
    ) -> Delivery:
        delivery = Delivery()

        def produce() -> None:
            self._producer.produce(
                topic, value=value, key=key, headers=list(headers), on_delivery=delivery
            )

        try:
            try:
                produce()
            except BufferError:
                # The local queue is full: serve delivery reports to make room, then retry.
                self._producer.poll(1.0)
                produce()
        except Exception as exc:
            raise _wrap("produce", exc) from exc
        return delivery

    def confirm(
        self,
        deliveries: Sequence[Delivery],
        timeout: float,
        serve: Callable[[], object] | None = None,
    ) -> None:
        """Wait for ``deliveries`` to be acknowledged; raise if any was not. A long wait
        calls ``serve`` now and then (see ``SERVE_AFTER``)."""
        self.wait(deliveries, timeout, serve)
        if error := failure(deliveries):
            raise error

    def wait(
        self,
        deliveries: Sequence[Delivery],
        timeout: float,
        serve: Callable[[], object] | None = None,
    ) -> None:
        """Wait until the broker answered each of ``deliveries``, or ``timeout`` passed."""
        waiting = [delivery for delivery in deliveries if not delivery.done]
        started = self._clock.monotonic()
        deadline = started + timeout
        served = started + SERVE_AFTER
        while waiting and (remaining := deadline - self._clock.monotonic()) > 0:
            # poll, not flush: flush waits for every lane's outputs. Another lane's poll
            # may serve our callbacks, so the wait is short and looked at again.
            self._producer.poll(min(remaining, CONFIRM_POLL))
            waiting = [delivery for delivery in waiting if not delivery.done]
            if serve is not None and waiting and self._clock.monotonic() >= served:
                serve()
                served = self._clock.monotonic() + SERVE_EVERY

    def poll(self) -> None:
        """Serve delivery callbacks without waiting."""
        self._producer.poll(0)

    def close(self, timeout: float) -> int:
        """Flush what is queued; the number of messages still undelivered."""
        return int(self._producer.flush(timeout))


def failure(deliveries: Sequence[Delivery]) -> KafkaOperationError | None:
    """Why ``deliveries`` are not all acknowledged (None if they are)."""
    if waiting := sum(not delivery.done for delivery in deliveries):
        return KafkaOperationError("produce", f"{waiting} deliveries not confirmed in time")
    for delivery in deliveries:
        if delivery.error is not None:
            return KafkaOperationError("produce", delivery.error.str(), delivery.error.code())
    return None


def _wrap(operation: str, exc: Exception) -> KafkaOperationError:
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError):
        return KafkaOperationError(operation, error.str(), error.code())
    return KafkaOperationError(operation, exc)
