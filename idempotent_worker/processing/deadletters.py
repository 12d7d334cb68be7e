"""The loop's dead-letter writer: a message it gives up goes to its route's dead-letter
topic with the reason (see deadletter/letter.py), retried until the broker takes it."""

from __future__ import annotations

from collections.abc import Callable

from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.settings import RetrySettings
from idempotent_worker.deadletter.letter import DeadLetter, dead_letter_headers
from idempotent_worker.errors import KafkaOperationError
from idempotent_worker.kafka.outputs import DELIVERY_TIMEOUT, Outputs
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.processing.items import Item
from idempotent_worker.processing.outcomes import Outcomes


class DeadLetterWriter:
    """Writes records to their route's dead-letter topic; a record is finished only
    once the broker acknowledged its dead letter (until then its offset stays)."""

    def __init__(
        self,
        outputs: Outputs,
        metrics: Metrics,
        outcomes: Outcomes,
        log: FilteringBoundLogger,
        retry: RetrySettings,
        sleep: Callable[[float], bool],
    ) -> None:
        self._outputs = outputs
        self._metrics = metrics
        self._outcomes = outcomes
        self._log = log
        self._retry = retry
        self._sleep = sleep

    def write(self, item: Item, letter: DeadLetter) -> bool:
        """Write ``letter``, retrying until it is confirmed: False if the worker stops first
        (the message is not finished)."""
        from idempotent_worker.processing.outcomes import fields_of

        headers = dead_letter_headers(item.record, letter)
        delay = self._retry.backoff_initial_seconds
        while True:
            try:
                delivery = self._outputs.send(
                    item.route.dlq_topic,
                    None if letter.drop_value else item.record.value(),
                    key=item.record.key(),
                    headers=headers,
                )
                self._outputs.confirm([delivery], DELIVERY_TIMEOUT, lambda: self._sleep(0.01))
                break
            except KafkaOperationError as exc:
                self._metrics.dead_letter_failures.labels(item.route.topic).inc()
                self._log.error(
                    "dead-letter write failed; the offset stays uncommitted until it succeeds",
                    **fields_of(item),
                    dlq_topic=item.route.dlq_topic,
                    error=str(exc),
                    code=exc.code,
                )
                if not self._sleep(delay):
                    return False
                delay = min(max(delay * 2, 0.1), self._retry.backoff_max_seconds)
        self._metrics.processed.labels(item.route.topic, "dead_lettered").inc()
        self._metrics.dead_lettered.labels(item.route.topic, letter.reason).inc()
        self._outcomes.log(
            item,
            "dead_lettered",
            reason=letter.reason,
            error=letter.error_message,
            attempts=letter.attempts,
        )
        item.finish("dead_lettered", reason=letter.reason, error=letter.error_message)
        return True
