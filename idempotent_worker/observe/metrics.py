"""Every Prometheus metric the worker exports, defined on a registry that is passed in."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "idempotent_worker_"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_HANDLER_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


STORE_OPERATIONS = (
    "claim", "begin", "complete", "release", "renew", "epoch", "forgets", "ping",
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class TopicSeries:
    """The series the hot path touches for every message of one topic, resolved once."""

    consumed: Counter
    succeeded: Counter
    handler_duration: Histogram


class Metrics:
    def __init__(self, registry: CollectorRegistry, topics: Iterable[str] = ()) -> None:
        self.registry = registry
        self.consumed = Counter(
            PREFIX + "messages_consumed",
            "Messages read from Kafka, duplicates included.",
            ["topic"],
            registry=registry,
        )
        self.processed = Counter(
            PREFIX + "messages_processed",
            "Messages whose handling finished, by outcome (success, failed, dead_lettered). "
            "'failed' counts each failed attempt; the message is retried or dead-lettered.",
            ["topic", "outcome"],
            registry=registry,
        )
        self.duplicates = Counter(
            PREFIX + "duplicates_skipped",
            "Messages skipped because their id was already completed. reason=duplicate: "
            "another record carried the id; reason=redelivery: Kafka delivered the same "
            "record again (e.g. after a crash before commit); reason=inbox: the database "
            "inbox held the id applied by a run that died before completing it; "
            "reason=replayed: its kept reply was produced again; reason=reply_not_kept: "
            "its reply was too large to keep; reason=conflict: another payload, skipped; "
            "reason=stale: at or below its entity's position (sequence routes).",
            ["topic", "reason"],
            registry=registry,
        )
        self.duplicates_detected = Counter(
            PREFIX + "duplicates_detected",
            'Duplicates found on routes in shadow mode (dedup = "shadow"), which handle '
            "them all the same; reasons as for duplicates_skipped.",
            ["topic", "reason"],
            registry=registry,
        )
        self.sequence_gaps = Counter(
            PREFIX + "sequence_gaps",
            'Messages of sequence routes (dedup = "sequence") more than one above their '
            'entity\'s position: handled, or dead-lettered with on_gap = "dead_letter".',
            ["topic"],
            registry=registry,
        )
        self.replies_replayed = Counter(
            PREFIX + "replies_replayed",
            "Duplicates answered with the outputs kept from their id's first run "
            '(on_duplicate = "replay"); also in duplicates_skipped{reason="replayed"}.',
            ["topic"],
            registry=registry,
        )
        self.handler_duration = Histogram(
            PREFIX + "handler_duration_seconds",
            "Time spent in the handler per attempt, outputs' delivery included.",
            ["topic"],
            buckets=_HANDLER_BUCKETS,
            registry=registry,
        )
        self.store_errors = Counter(
            PREFIX + "dedup_store_errors",
            "Dedup store operations that failed (the worker fails closed and retries).",
            ["operation"],
            registry=registry,
        )
        self.store_duration = Histogram(
            PREFIX + "dedup_store_duration_seconds",
            "Latency of dedup store operations (one claim covers a whole poll batch).",
            ["operation"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.store_resets = Counter(
            PREFIX + "dedup_store_resets",
            "Times this replica found the dedup store emptied under it (FLUSHALL, a restart "
            "without persistence, a failover to an empty replica). Ids completed before a "
            "reset can run again when they are redelivered or duplicated.",
            registry=registry,
        )
        self.claim_waits = Counter(
            PREFIX + "claim_waits",
            "Times a message waited for another worker's in-progress claim of its id.",
            ["topic"],
            registry=registry,
        )
        self.lease_lost = Counter(
            PREFIX + "lease_lost",
            "Completions refused because the worker no longer held the claim.",
            ["topic"],
            registry=registry,
        )
        self.dead_lettered = Counter(
            PREFIX + "dead_lettered",
            "Messages written to a dead-letter topic, by reason.",
            ["topic", "reason"],
            registry=registry,
        )
        self.outputs = Counter(
            PREFIX + "outputs_produced",
            "Outputs emitted by handlers and confirmed delivered.",
            ["topic"],
            registry=registry,
        )
        self.delivery_failures = Counter(
            PREFIX + "output_delivery_failures",
            "Deliveries of a handled message's outputs that failed and were tried again.",
            ["topic"],
            registry=registry,
        )
        self.dead_letter_failures = Counter(
            PREFIX + "dead_letter_write_failures",
            "Dead-letter writes that failed and were tried again (the offset waits).",
            ["topic"],
            registry=registry,
        )
        self.inbox_rows_deleted = Counter(
            PREFIX + "inbox_rows_deleted",
            "Inbox rows older than dedup.ttl_seconds deleted by this replica's cleanup.",
            registry=registry,
        )
        self.commits = Counter(
            PREFIX + "commits",
            "Offset commits, by result.",
            ["result"],
            registry=registry,
        )
        self.rebalances = Counter(
            PREFIX + "rebalances",
            "Partition assignment changes, by event (assign, revoke, lost).",
            ["event"],
            registry=registry,
        )
        self.assigned_partitions = Gauge(
            PREFIX + "assigned_partitions",
            "Partitions currently assigned to this replica.",
            registry=registry,
        )
        self.consumer_lag = Gauge(
            PREFIX + "consumer_lag",
            "Messages between the committed offset and the end of the partition.",
            ["topic", "partition"],
            registry=registry,
        )
        self.in_flight = Gauge(
            PREFIX + "in_flight",
            "Handlers running now in this replica.",
            registry=registry,
        )
        self.ready = Gauge(
            PREFIX + "ready",
            "1 when the replica has joined its group and the dedup store answers.",
            registry=registry,
        )
        self._topics: dict[str, TopicSeries] = {}
        self._export_zeros(topics)

    def topic(self, topic: str) -> TopicSeries:
        series = self._topics.get(topic)
        if series is None:
            series = self._topics[topic] = TopicSeries(
                self.consumed.labels(topic),
                self.processed.labels(topic, "success"),
                self.handler_duration.labels(topic),
            )
        return series

    def _export_zeros(self, topics: Iterable[str]) -> None:
        """Export the series every dashboard and alert reads before their first event.

        A counter that appears only at its first increment hides that increment from
        ``rate()``, and a query over a series that does not exist yet returns nothing.
        """
        for topic in topics:
            self.consumed.labels(topic)
            for outcome in ("success", "failed", "dead_lettered"):
                self.processed.labels(topic, outcome)
            for reason in ("duplicate", "redelivery"):
                self.duplicates.labels(topic, reason)
            self.handler_duration.labels(topic)
            self.claim_waits.labels(topic)
            self.lease_lost.labels(topic)
            self.delivery_failures.labels(topic)
            self.replies_replayed.labels(topic)
            self.sequence_gaps.labels(topic)
            self.duplicates_detected.labels(topic, "duplicate")
        for operation in STORE_OPERATIONS:
            self.store_errors.labels(operation)
            self.store_duration.labels(operation)
        for result in ("ok", "error"):
            self.commits.labels(result)
