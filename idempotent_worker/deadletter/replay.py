"""``idempotent-worker dlq replay``: re-publish dead-lettered records to the topic they
came from, once each, after the cause was fixed.

Each selected record goes back to its ``dlq-original-topic`` with its original key,
value and headers (the ``dlq-*`` headers removed), plus ``replay-of:
<dlq topic>/<partition>/<offset>`` and an incremented ``replay-count``. The message id
is unchanged, so the worker dedups the replay like any message (a dead-lettered id was
released: it runs).

Once per dead-letter record across runs: each replay is claimed and completed in the
dedup store under its dead-letter position (prefix ``<key_prefix>:dlq-replay``), so
a record replayed before is not replayed again even when filters made the earlier run
skip records before it; and a consumer group of its own on the dead-letter topic
(``<group_id>.dlq-replay``) commits, per partition, past the records finished
(replayed, replayed before, or refused for good: no original topic, value dropped),
only once the re-published records are acknowledged. Records not selected, those
refused for their ``replay-count`` and those another run is replaying now are not
passed: a later run may select them.

A dedup store that stops answering is waited for (``STORE_PATIENCE``), as the worker
holds still: a replay whose records went out is recorded once the store is back, not
left to be replayed again. Past that wait the run fails, saying how many records went
out unrecorded (a later run re-publishes them; the worker skips the copies by id).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition
from confluent_kafka import Message as KafkaMessage

from idempotent_worker.config.settings import Settings, client_config
from idempotent_worker.dedup import open_store
from idempotent_worker.dedup.base import ClaimStatus, Completion, DedupStore, State
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.kafka.outputs import DELIVERY_TIMEOUT, Delivery, Outputs
from idempotent_worker.kafka.records import coordinates, header_pairs

T = TypeVar("T")

LISTED = 50
"""Records listed one per line in the text summary."""

IDLE_SECONDS = 2.0
"""The dead-letter topic is read until nothing new arrives for this long."""

STORE_PATIENCE = 60.0
"""How long a run waits for an unavailable dedup store before it gives up."""


@dataclass
class Selection:
    reasons: Sequence[str] = ()
    ids: Sequence[str] = ()
    limit: int | None = None
    max_replays: int = 3


@dataclass
class Report:
    selected: int = 0
    replayed: list[str] = field(default_factory=list)
    """Dead-letter positions replayed (or that would be, with --dry-run)."""
    before: list[str] = field(default_factory=list)
    """Selected, and replayed by an earlier run."""
    busy: list[str] = field(default_factory=list)
    """Selected, and being replayed by another run now: left for a later run."""
    refused: dict[str, list[str]] = field(default_factory=dict)
    """Positions refused, by reason."""


def replay(
    settings: Settings,
    topic: str,
    selection: Selection,
    dry_run: bool,
    as_json: bool,
) -> int:
    group = f"{settings.kafka.group_id}.dlq-replay"
    consumer = Consumer(
        client_config(
            settings,
            {**settings.kafka.consumer, "group.id": group, "enable.auto.commit": False},
            {"auto.offset.reset": "earliest"},
        )
    )
    store = open_store(
        settings.redis,
        f"{settings.key_prefix}:dlq-replay",
        ttl_seconds=settings.dedup.ttl_seconds,
    )
    producer = Outputs(client_config(settings, dict(settings.kafka.producer)))
    try:
        run = _Run(settings, topic, selection, dry_run, consumer, store, producer, sys.stderr)
        report = run.read()
    finally:
        producer.close(DELIVERY_TIMEOUT)
        consumer.close()
        store.close()
    _print(report, dry_run, as_json, sys.stdout)
    return 0


class _Run:
    def __init__(
        self,
        settings: Settings,
        topic: str,
        selection: Selection,
        dry_run: bool,
        consumer: Consumer,
        store: DedupStore,
        producer: Outputs,
        progress: TextIO,
    ) -> None:
        self._topic = topic
        self._selection = selection
        self._dry_run = dry_run
        self._consumer = consumer
        self._store = store
        self._producer = producer
        self._lease = settings.dedup.lease_seconds
        self._ttl = settings.dedup.ttl_seconds
        self._token = f"dlq-replay-{uuid.uuid4().hex}"
        self._progress = _Progress(progress)
        self.report = Report()
        self._deliveries: list[Delivery] = []
        self._claimed: list[str] = []
        self._first: dict[int, int] = {}  # partition -> first offset read
        self._finished: dict[int, set[int]] = {}  # partition -> offsets done with
        self._waiting = False  # said so once

    def read(self) -> Report:
        metadata = self._consumer.list_topics(self._topic, timeout=10).topics[self._topic]
        if metadata.error is not None:
            raise SystemExit(f"idempotent-worker: dlq replay: {self._topic}: {metadata.error}")
        partitions = [TopicPartition(self._topic, p) for p in metadata.partitions]
        committed = self._consumer.committed(partitions, timeout=10)
        for tp in committed:
            low, high = self._consumer.get_watermark_offsets(tp, timeout=10)
            self._progress.total += max(0, high - max(tp.offset, low))
        self._consumer.assign(
            [TopicPartition(self._topic, tp.partition, max(tp.offset, OFFSET_BEGINNING))
             for tp in committed]
        )  # fmt: skip
        last_seen = time.monotonic()
        while time.monotonic() - last_seen < IDLE_SECONDS:
            for record in self._consumer.consume(500, 0.2):
                if record.error() is None:
                    self._one(record)
                    last_seen = time.monotonic()
        self._progress.done(self.report)
        if not self._dry_run:
            self._producer.confirm(self._deliveries, DELIVERY_TIMEOUT)
            completions = [Completion(p, self._token, p) for p in self._claimed]
            try:
                self._patiently(lambda: self._store.complete(completions, self._ttl))
            except StoreUnavailable as exc:
                raise StoreUnavailable(
                    f"{exc}; {len(completions)} records were re-published and not recorded "
                    "as replayed: a later run re-publishes them (the worker skips the copies "
                    "by their message id)"
                ) from exc
            self._commit()
        return self.report

    def _patiently(self, call: Callable[[], T]) -> T:
        """``call()``, retried while the dedup store is unavailable, for at most
        ``STORE_PATIENCE`` seconds."""
        deadline = time.monotonic() + STORE_PATIENCE
        delay = 0.1
        while True:
            try:
                return call()
            except StoreUnavailable as exc:
                if time.monotonic() + delay > deadline:
                    raise
                if not self._waiting:
                    self._waiting = True
                    print(
                        f"dedup store unavailable ({exc}); waiting up to {STORE_PATIENCE:g} s",
                        file=self._progress.stream,
                        flush=True,
                    )
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def _one(self, record: KafkaMessage) -> None:
        topic, partition, offset = coordinates(record)
        self._first.setdefault(partition, offset)
        position = f"{topic}/{partition}/{offset}"
        headers = header_pairs(record)
        named = dict(headers)
        self._progress.read(self.report)
        if not self._selected(named):
            return
        self.report.selected += 1
        refusal = self._refusal(named)
        if refusal is not None:
            self.report.refused.setdefault(refusal, []).append(position)
            if refusal == "max_replays":
                return  # not passed: a later run with a higher --max-replays may want it
        elif (claim := self._claim(position)) is ClaimStatus.BUSY:
            self.report.busy.append(position)
            return  # not passed: its run may yet fail
        elif claim is ClaimStatus.COMPLETED:
            self.report.before.append(position)
        else:
            self.report.replayed.append(position)
            if not self._dry_run:
                self._publish(record, headers, named, position)
        self._finished.setdefault(partition, set()).add(offset)

    def _selected(self, headers: dict[str, bytes]) -> bool:
        s = self._selection
        if s.limit is not None and len(self.report.replayed) >= s.limit:
            return False
        reason = headers.get("dlq-reason", b"").decode(errors="replace")
        id = headers.get("dlq-message-id", headers.get("message-id", b"")).decode(errors="replace")
        return (not s.reasons or reason in s.reasons) and (not s.ids or id in s.ids)

    def _refusal(self, headers: dict[str, bytes]) -> str | None:
        if not headers.get("dlq-original-topic"):
            return "no_original_topic"
        if headers.get("dlq-value-dropped") == b"true":
            return "value_dropped"
        if _replay_count(headers) >= self._selection.max_replays:
            return "max_replays"
        return None

    def _claim(self, position: str) -> ClaimStatus:
        """COMPLETED if replayed by an earlier run, BUSY if another run is on it now, else
        CLAIMED (by this run; with --dry-run, nothing is claimed)."""
        if self._dry_run:
            state = self._patiently(lambda: self._store.state(position))
            if state is State.COMPLETED:
                return ClaimStatus.COMPLETED
            return ClaimStatus.BUSY if state is State.IN_PROGRESS else ClaimStatus.CLAIMED
        claim = self._patiently(lambda: self._store.claim([position], self._token, self._lease)[0])
        if claim.status is ClaimStatus.CLAIMED:
            self._claimed.append(position)
        return claim.status

    def _publish(
        self,
        record: KafkaMessage,
        headers: list[tuple[str, bytes]],
        named: dict[str, bytes],
        position: str,
    ) -> None:
        kept = [
            (name, value)
            for name, value in headers
            if not name.startswith("dlq-") and name not in ("replay-of", "replay-count")
        ]
        kept += [
            ("replay-of", position.encode()),
            ("replay-count", str(_replay_count(named) + 1).encode()),
        ]
        original = named["dlq-original-topic"].decode()
        delivery = self._producer.send(original, record.value(), key=record.key(), headers=kept)
        self._deliveries.append(delivery)

    def _commit(self) -> None:
        """Per partition, past the records finished from the first one read onwards."""
        offsets = []
        for partition, first in self._first.items():
            done = self._finished.get(partition, set())
            end = first
            while end in done:
                end += 1
            if end > first:
                offsets.append(TopicPartition(self._topic, partition, end))
        if offsets:
            self._consumer.commit(offsets=offsets, asynchronous=False)


def _replay_count(headers: dict[str, bytes]) -> int:
    try:
        return int(headers.get("replay-count", b"0"))
    except ValueError:
        return 0


class _Progress:
    """A line redrawn in place on a terminal; a plain line every 1,000 records otherwise."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._tty = stream.isatty()
        self._read = 0
        self.total = 0
        """Records to read, from the partitions' ends when the run started (about)."""

    def read(self, report: Report) -> None:
        self._read += 1
        if self._tty and self._read % 50 == 0:
            self.stream.write(f"\r{self._line(report)}")
            self.stream.flush()
        elif not self._tty and self._read % 1000 == 0:
            print(self._line(report), file=self.stream, flush=True)

    def done(self, report: Report) -> None:
        print(("\r" if self._tty else "") + self._line(report), file=self.stream, flush=True)

    def _line(self, report: Report) -> str:
        width = 30
        share = min(1.0, self._read / self.total) if self.total else 1.0
        bar = "#" * round(width * share) + "-" * (width - round(width * share))
        refused = sum(len(p) for p in report.refused.values())
        return (
            f"[{bar}] read {self._read}, selected {report.selected}, "
            f"replayed {len(report.replayed)}, refused {refused}"
        )


def _print(report: Report, dry_run: bool, as_json: bool, out: TextIO) -> None:
    refused = {reason: len(positions) for reason, positions in report.refused.items()}
    if as_json:
        summary = {
            "dry_run": dry_run,
            "selected": report.selected,
            "replayed": report.replayed,
            "replayed_before": report.before,
            "busy": report.busy,
            "refused": report.refused,
        }
        print(json.dumps(summary, indent=2), file=out)
        return
    verb = "would replay" if dry_run else "replayed"
    lines = [f"{verb} {position}" for position in report.replayed]
    lines += [f"busy {position}: another run is replaying it" for position in report.busy]
    lines += [
        f"refused {position}: {reason}"
        for reason, positions in sorted(report.refused.items())
        for position in positions
    ]
    for line in lines[:LISTED]:
        print(line, file=out)
    if len(lines) > LISTED:
        print(f"... and {len(lines) - LISTED} more (--json lists them all)", file=out)
    counts = ", ".join(f"{reason} {count}" for reason, count in sorted(Counter(refused).items()))
    print(
        f"selected {report.selected}, {verb} {len(report.replayed)}, replayed before "
        f"{len(report.before)}, refused {sum(refused.values())}"
        + (f" ({counts})" if counts else "")
        + (f", busy {len(report.busy)} (run again later)" if report.busy else ""),
        file=out,
    )
