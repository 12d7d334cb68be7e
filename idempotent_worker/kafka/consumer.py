"""The Kafka side of the loop: group membership, owned partitions, offsets and commits.

Offsets are stored one finished record at a time (``enable.auto.offset.store`` is
off) and committed on an interval, on revoke and at close; auto commit is off. The
interval's commits are asynchronous: a commit sent as the coordinator becomes
unreachable would block a synchronous caller until ``socket.timeout.ms`` (60 s by
default), and with it the polls that serve the group protocol and report the group's
state to the probes. librdkafka runs the rebalance, commit and statistics callbacks
inside ``consume``/``poll``, so they never race the loop's own thread.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage
from structlog.typing import FilteringBoundLogger

from idempotent_worker.config.settings import Settings, client_config
from idempotent_worker.kafka.records import coordinates
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import SYSTEM, Parts

CONSUMER_DEFAULTS = {
    "auto.offset.reset": "earliest",
    "statistics.interval.ms": 5000,  # consumer lag
    # librdkafka prefetches up to 64 MiB by default, seconds of work for a worker
    # that runs a Python handler per message; 16 MiB keeps it fed and the RSS lower.
    "queued.max.messages.kbytes": 16384,
    # A connection whose peer vanished (a partition that drops packets) is noticed by the
    # kernel's keepalive, not only by the next request's timeout (socket.timeout.ms).
    "socket.keepalive.enable": True,
}


class GroupConsumer:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        health: Health,
        log: FilteringBoundLogger,
        on_error: Callable[[KafkaError], None],
        parts: Parts = SYSTEM,
    ) -> None:
        kafka = settings.kafka
        self._clock = parts.clock
        self._consumer = parts.consumer(
            client_config(
                settings,
                {
                    **kafka.consumer,
                    "group.id": kafka.group_id,
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "error_cb": on_error,
                    "stats_cb": self._on_stats,
                    "on_commit": self._on_commit,
                },
                CONSUMER_DEFAULTS,
            )
        )
        self._batch_size = kafka.poll_batch_size
        self._poll_timeout = kafka.poll_timeout_seconds
        self._commit_interval = kafka.commit_interval_seconds
        self._metrics = metrics
        self._health = health
        self._log = log
        self._owned: set[tuple[str, int]] = set()
        self._floor: dict[tuple[str, int], int] = {}
        """Per partition, the lowest offset of a message left unfinished by any batch:
        no offset is stored past it until the partition is assigned again."""
        self._epochs: dict[tuple[str, int], int] = {}
        """Per partition, how often it was assigned or taken away: a batch's records of a
        partition that changed hands since they were read store nothing and set no floor
        (the partition is read again from its committed offset; what finished is found
        done then)."""
        self._read_epochs: dict[tuple[str, int], int] = {}
        self._fresh: set[tuple[str, int]] = set()
        """Assigned since the last consume: resumed before it, unless holding still."""
        self._dirty = False
        """Offsets stored since the last commit was sent (or a commit failed)."""
        self._committing = False
        """An asynchronous commit is on its way: no second one is sent behind it."""
        self._last_commit = self._clock.monotonic()
        self.paused = False

    def subscribe(self, topics: list[str]) -> None:
        self._consumer.subscribe(
            topics, on_assign=self._on_assign, on_revoke=self._on_revoke, on_lost=self._on_lost
        )

    def consume(self) -> list[KafkaMessage]:
        if self._fresh and not self.paused:
            # librdkafka keeps a partition's pause flag across a reassignment: partitions
            # lost while held (a session that timed out) come back still paused.
            self._consumer.resume(self._fresh_partitions())
        # Wait for the first record only, then take what else is queued: librdkafka's
        # consume waits for a whole batch (or the timeout), so at a moderate rate every
        # message would wait for the batch to fill (200 ms at 2,000 msg/s).
        first: KafkaMessage | None = self._consumer.poll(self._poll_timeout)
        records = [] if first is None else [first, *self._consumer.consume(self._batch_size - 1, 0)]
        self._read_epochs = dict(self._epochs)
        return records

    def owns(self, record: KafkaMessage) -> bool:
        """Whether ``record``, of the last batch read, is still this replica's: its
        partition assigned, and not taken away (and given back) since the batch was read."""
        tp = (record.topic(), record.partition())
        return tp in self._owned and self._epochs.get(tp) == self._read_epochs.get(tp)

    def missing_topics(self, topics: set[str]) -> set[str]:
        return topics - set(self._consumer.list_topics(timeout=10).topics)

    # -- offsets -----------------------------------------------------------------------

    def store_offsets(
        self, finished: Iterable[KafkaMessage], unfinished: Iterable[KafkaMessage]
    ) -> int:
        """Store each partition's offset past its finished records, but never past an
        unfinished one, of this batch or an earlier one (nothing for a partition that
        changed hands since the batch was read); how many finished records were in
        partitions still ours."""
        ends: dict[tuple[str, int], int] = {}
        counts: dict[tuple[str, int], int] = {}
        floor = self._floor
        changed = {tp for tp, epoch in self._read_epochs.items() if self._epochs.get(tp) != epoch}
        for record in finished:
            topic, partition, offset = coordinates(record)
            tp = (topic, partition)
            if tp in changed:
                continue
            ends[tp] = max(ends.get(tp, 0), offset + 1)
            counts[tp] = counts.get(tp, 0) + 1
            if floor.get(tp) == offset:  # read again (rewound) and finished this time
                del floor[tp]
        for record in unfinished:
            topic, partition, offset = coordinates(record)
            tp = (topic, partition)
            if tp not in changed:
                floor[tp] = min(floor.get(tp, offset), offset)
        for tp, lowest in floor.items():
            if tp in ends:
                ends[tp] = min(ends[tp], lowest)
        stored = 0
        for (topic, partition), end in ends.items():
            try:
                self._consumer.store_offsets(offsets=[TopicPartition(topic, partition, end)])
            except KafkaException as exc:
                # Revoked meanwhile: the new owner reads the records again and finds
                # their ids done.
                self._log.warning(
                    "offset not stored", topic=topic, partition=partition, error=str(exc)
                )
                continue
            stored += counts[(topic, partition)]
            self._dirty = True
        return stored

    def commit_if_due(self) -> None:
        """Send the stored offsets, without waiting for the answer (``_on_commit``),
        once the interval has passed since the last commit was sent."""
        now = self._clock.monotonic()
        if not self._dirty or self._committing or now - self._last_commit < self._commit_interval:
            return
        self._dirty = False
        self._last_commit = now
        try:
            self._consumer.commit(asynchronous=True)
        except KafkaException as exc:  # refused before it was sent (not a member, ...)
            self._commit_failed(exc.args[0])
            return
        self._committing = True

    def commit(self) -> None:
        """Commit the stored offsets and wait for the answer: before partitions are
        given away and at close (also sending again what a commit on its way sends)."""
        if not self._dirty and not self._committing:
            return
        try:
            self._consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:  # (nothing new to commit)
                self._commit_failed(exc.args[0])
                return
        self._dirty = False
        self._last_commit = self._clock.monotonic()
        self._metrics.commits.labels("ok").inc()

    def _on_commit(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """The answer to an asynchronous commit (librdkafka calls this for those only)."""
        self._committing = False
        error = error or next((p.error for p in partitions if p.error is not None), None)
        if error is None or error.code() == KafkaError._NO_OFFSET:
            self._metrics.commits.labels("ok").inc()
        else:
            self._commit_failed(error)

    def _commit_failed(self, error: KafkaError) -> None:
        self._dirty = True  # sent again with the next commit
        self._metrics.commits.labels("error").inc()
        self._log.warning("commit failed", code=error.name(), reason=error.str())

    def close(self) -> None:
        self.commit()
        self._consumer.close()

    # -- holding still while the dedup store is away -----------------------------------

    def hold(self) -> None:
        """Pause every owned partition; the group membership is kept by polling."""
        self._consumer.pause(self._assignment())
        self.paused = True

    def resume(self) -> None:
        self._consumer.resume(self._assignment())
        self._fresh.clear()
        self.paused = False

    def poll_while_holding(self, seconds: float, stopping: Callable[[], bool]) -> None:
        """Serve the group protocol for ``seconds`` without taking any record."""
        deadline = self._clock.monotonic() + seconds
        while not stopping() and (remaining := deadline - self._clock.monotonic()) > 0:
            self._health.beat()
            record = self._consumer.poll(min(remaining, 0.5))
            if record is not None and record.error() is None:
                # Fetched before the pause took effect, or from a partition assigned
                # meanwhile: hold that one too, and rewind so that it is read again once
                # the partitions are resumed (unpaused, it would be fetched again at once).
                partition = TopicPartition(*coordinates(record))
                self._consumer.pause([partition])
                self._consumer.seek(partition)

    def _assignment(self) -> list[TopicPartition]:
        return [TopicPartition(topic, partition) for topic, partition in self._owned]

    def _fresh_partitions(self) -> list[TopicPartition]:
        fresh = [TopicPartition(t, p) for t, p in self._fresh if (t, p) in self._owned]
        self._fresh.clear()
        return fresh

    # -- callbacks ---------------------------------------------------------------------

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        assigned = {(p.topic, p.partition) for p in partitions}
        for tp in assigned:  # read again from its committed offset
            self._floor.pop(tp, None)
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
        self._owned.update(assigned)
        self._fresh.update(assigned)
        self._health.joined = True
        self._health.group_error = ""
        self._health.progressed()
        self._rebalanced("assign", partitions)

    def _on_revoke(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.commit()
        self._disown("revoke", partitions)

    def _on_lost(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        # The session timed out (the coordinator was unreachable): already someone
        # else's, a commit would fail. Not ready until the group assigns partitions again.
        self._health.joined = False
        self._disown("lost", partitions)

    def _disown(self, event: str, partitions: list[TopicPartition]) -> None:
        for p in partitions:
            tp = (p.topic, p.partition)
            self._owned.discard(tp)
            self._floor.pop(tp, None)
            self._epochs[tp] = self._epochs.get(tp, 0) + 1
            with contextlib.suppress(KeyError):  # no lag was reported for it yet
                self._metrics.consumer_lag.remove(p.topic, str(p.partition))
        self._rebalanced(event, partitions)

    def _rebalanced(self, event: str, partitions: list[TopicPartition]) -> None:
        self._metrics.rebalances.labels(event).inc()
        self._metrics.assigned_partitions.set(len(self._owned))
        names = sorted(f"{p.topic}[{p.partition}]" for p in partitions)
        self._log.info(f"partitions {event}", partitions=names)

    def _on_stats(self, stats_json: str) -> None:
        stats: dict[str, Any] = json.loads(stats_json)
        waiting = 0
        for topic, topic_stats in stats.get("topics", {}).items():
            for partition, partition_stats in topic_stats.get("partitions", {}).items():
                lag = partition_stats.get("consumer_lag", -1)
                if (topic, int(partition)) in self._owned and lag >= 0:
                    self._metrics.consumer_lag.labels(topic, partition).set(lag)
                    waiting += lag
        self._health.records_waiting = waiting
        group = stats.get("cgrp")
        if group is not None:
            self._health.group_error = group_problem(group)


def group_problem(group: dict[str, Any]) -> str:
    """What keeps the consumer from its group, from librdkafka's ``cgrp`` statistics
    ("" when it is in the group): the coordinator not reached, or the group not joined."""
    state, join_state = group.get("state"), group.get("join_state")
    if state != "up":
        return f"group coordinator not reached (state {state})"
    if join_state in ("init", "wait-join"):
        return f"not joined (join state {join_state})"
    return ""
