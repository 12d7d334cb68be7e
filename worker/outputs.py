"""The worker's one idempotent producer, for handler outputs and dead letters.

Produce calls are asynchronous; :meth:`Outputs.confirm` waits until everything
produced so far is acknowledged by the broker and raises if any delivery failed.
The worker calls it before it completes a message id or stores its offset.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from worker.errors import KafkaOperationError

HeaderValue = bytes | str
Headers = Sequence[tuple[str, HeaderValue]]


class Outputs:
    def __init__(self, config: Mapping[str, Any]) -> None:
        self._producer = Producer(
            {**config, "enable.idempotence": True, "acks": "all", "linger.ms": 2}
        )
        self._failures: list[KafkaError] = []
        self.pending = 0

    def _on_delivery(self, error: KafkaError | None, message: Message) -> None:
        self.pending -= 1
        if error is not None:
            self._failures.append(error)

    def send(
        self,
        topic: str,
        value: bytes | str | None,
        *,
        key: bytes | str | None = None,
        headers: Headers = (),
    ) -> None:
        def produce() -> None:
            self._producer.produce(
                topic, value=value, key=key, headers=list(headers), on_delivery=self._on_delivery
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
        self.pending += 1

    def confirm(self, timeout: float) -> None:
        """Wait for every produced message to be acknowledged; raise if any was not."""
        if self.pending:
            self._producer.flush(timeout)
        failures, self._failures = self._failures, []
        if failures:
            first = failures[0]
            raise KafkaOperationError("produce", first.str(), first.code())
        if self.pending:
            raise KafkaOperationError("produce", f"{self.pending} deliveries not confirmed in time")

    def poll(self) -> None:
        """Serve delivery callbacks without waiting."""
        self._producer.poll(0)

    def close(self, timeout: float) -> int:
        """Flush what is queued; the number of messages still undelivered."""
        return int(self._producer.flush(timeout))


def _wrap(operation: str, exc: Exception) -> KafkaOperationError:
    error = exc.args[0] if exc.args else None
    if isinstance(error, KafkaError):
        return KafkaOperationError(operation, error.str(), error.code())
    return KafkaOperationError(operation, exc)
