"""An in-memory Kafka for the simulator: topics, a consumer group, an idempotent producer.

The consumer and producer answer the calls kafka/consumer.py and kafka/outputs.py
make of confluent-kafka's clients, on the scheduler's virtual time:

- the group assigns partitions eagerly: on a change every member is revoked first
  (in its next ``consume``/``poll``), then assigned; a member that does not poll
  within ``max_poll_interval`` of a rebalance, or at all within ``session_timeout``,
  is expelled (its partitions lost, told so when it polls again);
- positions start at the committed offset; a commit from a member that no longer
  owns the partition is refused, as Kafka refuses a fenced member's;
- the broker records every commit, so the checker can tell whether an offset ever
  passed a message that was not finished (``on_commit``);
- the producer delivers after a latency, or fails, or never answers, as the run's
  faults say (``deliveries``).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition
from confluent_kafka import Message as KafkaMessage

from tests.sim.sched import Scheduler

TP = tuple[str, int]


@dataclass
class Member:
    consumer: SimConsumer
    topics: list[str]
    last_poll: float
    last_heartbeat: float = 0.0
    owned: set[TP] = field(default_factory=set)
    """What the group gives the member now (nothing while its callbacks are pending)."""
    told: set[TP] = field(default_factory=set)
    """What the member's client was told it owns (by the callbacks it ran)."""
    pending: list[tuple[str, list[TP]]] = field(default_factory=list)
    """Callbacks due at the member's next poll: ("revoke" | "lost" | "assign", partitions)."""
    rebalance_since: float | None = None


class Broker:
    def __init__(
        self,
        scheduler: Scheduler,
        *,
        session_timeout: float = 6.0,
        max_poll_interval: float = 30.0,
    ) -> None:
        self.scheduler = scheduler
        self.topics: dict[str, list[list[KafkaMessage]]] = {}
        self.committed: dict[TP, int] = {}
        self.members: list[Member] = []
        self.session_timeout = session_timeout
        self.max_poll_interval = max_poll_interval
        self.on_commit: list[Callable[[SimConsumer, TP, int], None]] = []
        self.fetch_fails: Callable[[SimConsumer], bool] = lambda consumer: False
        """The member's fetches fail (cut from the partitions' leaders)."""
        self.coordinator_fails: Callable[[SimConsumer], bool] = lambda consumer: False
        """The member cannot reach the group coordinator (no heartbeat, no commit)."""
        self.alive: Callable[[SimConsumer], bool] = lambda consumer: True
        """The member's process runs (librdkafka heartbeats from a thread of its own)."""

    def create(self, topic: str, partitions: int) -> None:
        self.topics.setdefault(topic, [[] for _ in range(partitions)])

    def append(
        self,
        topic: str,
        partition: int | None,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> KafkaMessage:
        partitions = self.topics.setdefault(topic, [[]])
        if partition is None:
            partition = zlib.crc32(key) % len(partitions) if key is not None else 0
        log = partitions[partition]
        record = KafkaMessage(
            topic=topic,
            partition=partition,
            offset=len(log),
            key=key,
            value=value,
            headers=headers,
            timestamp=(1, int(self.scheduler.now * 1000)),
        )
        log.append(record)
        return record

    def end(self, tp: TP) -> int:
        return len(self.topics[tp[0]][tp[1]])

    # -- the group ------------------------------------------------------------------------

    def join(self, consumer: SimConsumer, topics: list[str]) -> None:
        now = self.scheduler.now
        self.members.append(Member(consumer, topics, now, now))
        self.rebalance()

    def leave(self, consumer: SimConsumer) -> None:
        member = self.member(consumer)
        if member is not None:
            self.members.remove(member)
            self.rebalance()

    def member(self, consumer: SimConsumer) -> Member | None:
        return next((m for m in self.members if m.consumer is consumer), None)

    def rebalance(self, shuffle: bool = False) -> None:
        """A new generation: every member gives its partitions back, then each gets its
        share (round robin over the members; in a random order if ``shuffle``)."""
        members = list(self.members)
        if shuffle:
            self.scheduler.rng.shuffle(members)
        everything = sorted(
            (topic, p)
            for topic, partitions in self.topics.items()
            if any(topic in m.topics for m in members)
            for p in range(len(partitions))
        )
        shares: dict[int, list[TP]] = {id(m): [] for m in members}
        for index, tp in enumerate(everything):
            wanting = [m for m in members if tp[0] in m.topics]
            if wanting:
                shares[id(wanting[index % len(wanting)])].append(tp)
        for member in self.members:
            # A new generation replaces what the member has not been told yet: it gives
            # back what its client holds, then takes its share.
            revoke = [("revoke", sorted(member.told))] if member.told else []
            member.pending = [*revoke, ("assign", shares[id(member)])]
            member.owned = set()
            member.rebalance_since = self.scheduler.now

    def expel_stale(self) -> None:
        """Members whose heartbeats stopped (``session_timeout``), or that did not poll
        for ``max_poll_interval``, lose their partitions to the others."""
        now = self.scheduler.now
        for member in self.members:
            if self.alive(member.consumer) and not self.coordinator_fails(member.consumer):
                member.last_heartbeat = now
        stale = [
            m
            for m in self.members
            if now - m.last_heartbeat > self.session_timeout
            or now - m.last_poll > self.max_poll_interval
        ]
        for member in stale:
            self.members.remove(member)
            member.consumer.expelled = sorted(member.told)
            member.owned = set()
            member.told = set()
        if stale:
            self.rebalance()

    def owner(self, tp: TP) -> SimConsumer | None:
        return next((m.consumer for m in self.members if tp in m.owned), None)


class SimConsumer:
    """confluent-kafka's ``Consumer``, as far as idempotent_worker/kafka/consumer.py uses it."""

    def __init__(self, broker: Broker, config: dict[str, Any]) -> None:
        self.broker = broker
        self.config = config
        self.name = ""
        self.callbacks: dict[str, Callable[..., None]] = {}
        self.topics: list[str] = []
        self.positions: dict[TP, int] = {}
        self.paused: set[TP] = set()
        self.stored: dict[TP, int] = {}
        self.expelled: list[TP] | None = None
        self.closed = False
        self.answers: list[KafkaError | None] = []
        """Asynchronous commits' answers, for the next poll's ``on_commit`` calls."""

    def subscribe(self, topics: list[str], **callbacks: Callable[..., None]) -> None:
        self.callbacks = callbacks
        self.topics = topics
        self.broker.join(self, topics)

    def _serve(self) -> None:
        """What librdkafka does inside a poll: heartbeats, commits' answers and
        rebalance callbacks."""
        broker = self.broker
        while self.answers:
            self.config["on_commit"](self.answers.pop(0), [])
        if broker.coordinator_fails(self):
            return
        member = broker.member(self)
        if member is None:
            if self.expelled is not None:
                lost, self.expelled = self.expelled, None
                self._forget(lost)
                self.callbacks["on_lost"](self, [TopicPartition(*tp) for tp in lost])
                broker.join(self, self.topics)
            return
        member.last_poll = broker.scheduler.now
        while member.pending:
            event, tps = member.pending.pop(0)
            partitions = [TopicPartition(*tp) for tp in tps]
            if event == "revoke":
                member.told.difference_update(tps)
                self.callbacks["on_revoke"](self, partitions)
                self._forget(tps)
            else:
                member.owned = set(tps)
                member.told = set(tps)
                for tp in tps:
                    self.positions[tp] = broker.committed.get(tp, 0)
                self.callbacks["on_assign"](self, partitions)
            if broker.member(self) is not member:
                return
        member.rebalance_since = None

    def _forget(self, tps: list[TP]) -> None:
        for tp in tps:
            self.positions.pop(tp, None)
            self.stored.pop(tp, None)

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[KafkaMessage]:
        self._serve()
        records = self._fetch(num_messages)
        if not records:
            self.broker.scheduler.sleep(timeout)
            self._serve()
            records = self._fetch(num_messages)
        return records

    def poll(self, timeout: float | None = None) -> KafkaMessage | None:
        self._serve()
        records = self._fetch(1)
        if not records:
            self.broker.scheduler.sleep(timeout or 0)
            return None
        return records[0]

    def _fetch(self, limit: int) -> list[KafkaMessage]:
        member = self.broker.member(self)
        if member is None or self.broker.fetch_fails(self):
            return []
        records: list[KafkaMessage] = []
        for tp in sorted(member.owned):
            if tp in self.paused:
                continue
            log = self.broker.topics[tp[0]][tp[1]]
            position = self.positions.get(tp, 0)
            taken = log[position : position + limit - len(records)]
            records.extend(taken)
            self.positions[tp] = position + len(taken)
            if len(records) >= limit:
                break
        return records

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused.update((p.topic, p.partition) for p in partitions)

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused.difference_update((p.topic, p.partition) for p in partitions)

    def seek(self, partition: TopicPartition) -> None:
        self.positions[(partition.topic, partition.partition)] = partition.offset

    def store_offsets(self, offsets: list[TopicPartition]) -> None:
        member = self.broker.member(self)
        for p in offsets:
            tp = (p.topic, p.partition)
            if member is None or tp not in member.owned:
                raise KafkaException(KafkaError(KafkaError._STATE, "partition not assigned"))
            self.stored[tp] = p.offset

    def commit(self, asynchronous: bool = True) -> None:
        """Synchronous: done or raised at once. Asynchronous: done at once too, and its
        answer (``on_commit``) delivered by the next poll, as librdkafka does."""
        if not asynchronous:
            self._commit()
            return
        try:
            self._commit()
        except KafkaException as exc:
            self.answers.append(exc.args[0])
        else:
            self.answers.append(None)

    def _commit(self) -> None:
        broker = self.broker
        member = broker.member(self)
        if broker.coordinator_fails(self):
            raise KafkaException(KafkaError(KafkaError._TRANSPORT, "coordinator unreachable"))
        if member is None:
            raise KafkaException(KafkaError(KafkaError.UNKNOWN_MEMBER_ID, "not a member"))
        if not self.stored:
            raise KafkaException(KafkaError(KafkaError._NO_OFFSET, "nothing to commit"))
        for tp in self.stored:
            if tp not in member.owned:
                raise KafkaException(KafkaError(KafkaError.ILLEGAL_GENERATION, "fenced"))
        for tp, offset in self.stored.items():
            for check in broker.on_commit:
                check(self, tp, offset)
            broker.committed[tp] = max(broker.committed.get(tp, 0), offset)
        self.stored = {}

    def list_topics(self, timeout: float = -1) -> Any:
        return _Topics(self.broker.topics)

    def close(self) -> None:
        self.closed = True
        self.broker.leave(self)


class _Topics:
    def __init__(self, topics: dict[str, Any]) -> None:
        self.topics = topics


@dataclass
class _Pending:
    due: float
    topic: str
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str, bytes]]
    callback: Callable[[KafkaError | None, Any], None]
    fails: bool


class SimProducer:
    """confluent-kafka's ``Producer``, as far as kafka/outputs.py uses it. What each
    delivery does is ``deliveries()``'s answer: (latency, fails) or None (never
    answered: the delivery is dropped once its timeout passes)."""

    def __init__(
        self,
        broker: Broker,
        deliveries: Callable[[], tuple[float, bool] | None],
        on_delivered: Callable[[KafkaMessage], None],
    ) -> None:
        self.broker = broker
        self.deliveries = deliveries
        self.on_delivered = on_delivered
        self.queue: list[_Pending] = []

    def produce(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        headers: list[tuple[str, bytes]] | None = None,
        on_delivery: Callable[[KafkaError | None, Any], None] | None = None,
    ) -> None:
        fate = self.deliveries()
        scheduler = self.broker.scheduler
        due, fails = (
            (scheduler.now + 3600, True) if fate is None else (scheduler.now + fate[0], fate[1])
        )
        self.queue.append(
            _Pending(due, topic, key, value, list(headers or []), on_delivery or _ignore, fails)
        )

    def poll(self, timeout: float | None = None) -> int:
        served = self._serve()
        if not served and timeout:
            # Wake at the next answer if it comes first; a short poll with nothing due
            # soon waits a little longer (librdkafka's would return early only with an
            # answer, and the simulated run is cheaper with fewer turns).
            scheduler = self.broker.scheduler
            next_due = min((p.due for p in self.queue), default=scheduler.now + timeout)
            scheduler.sleep(max(min(next_due - scheduler.now, max(timeout, 0.02)), 0))
            served = self._serve()
        return served

    def _serve(self) -> int:
        now = self.broker.scheduler.now
        due = [p for p in self.queue if p.due <= now]
        self.queue = [p for p in self.queue if p.due > now]
        for pending in due:
            if pending.fails:
                error = KafkaError(KafkaError._MSG_TIMED_OUT, "delivery failed")
                pending.callback(error, None)
                continue
            value = pending.value.encode() if isinstance(pending.value, str) else pending.value
            key = pending.key.encode() if isinstance(pending.key, str) else pending.key
            headers = [
                (name, v.encode() if isinstance(v, str) else v) for name, v in pending.headers
            ]
            record = self.broker.append(pending.topic, None, key, value, headers)
            self.on_delivered(record)
            pending.callback(None, record)
        return len(due)

    def flush(self, timeout: float | None = None) -> int:
        deadline = self.broker.scheduler.now + (timeout or 0)
        while self.queue and self.broker.scheduler.now < deadline:
            self.poll(deadline - self.broker.scheduler.now)
        return len(self.queue)


def _ignore(error: KafkaError | None, record: Any) -> None:
    """A delivery nobody asked to hear about."""
