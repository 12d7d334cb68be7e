"""How a message's end is logged and counted, shared by the parts that end messages."""

from __future__ import annotations

from typing import Any

from structlog.typing import FilteringBoundLogger

from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.processing.items import Item


class Outcomes:
    def __init__(self, metrics: Metrics, log: FilteringBoundLogger, debug: bool) -> None:
        self._metrics = metrics
        self._log = log
        self.debug = debug
        """Log successes and duplicates too (``log.level = "DEBUG"``)."""

    def lease_lost(self, item: Item, attempt: int, seconds: float) -> None:
        self._metrics.lease_lost.labels(item.route.topic).inc()
        self.log(item, "lease_lost", attempt=attempt, duration_seconds=round(seconds, 6))
        item.finish("lease_lost", attempt=attempt)

    def log(self, item: Item, outcome: str, **fields: Any) -> None:
        self._log.info("message", **fields_of(item), outcome=outcome, **fields)


def fields_of(item: Item) -> dict[str, Any]:
    return {
        "topic": item.record.topic(),
        "partition": item.record.partition(),
        "offset": item.record.offset(),
        "id": item.message.id if item.message else None,
        "handler": item.route.handler_path,
    }
