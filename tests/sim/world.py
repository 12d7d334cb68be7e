"""One simulated run: a configuration drawn from a seed, replicas of the real loop on
in-memory parts, faults, and the checks of the product's promises afterwards.

    world = World(seed); world.run(); world.violations  # [] when every promise held

What a seed draws: 1 to 4 routes (each a topic with 1 to 4 partitions, a dedup mode,
``on_duplicate``, ``max_in_flight`` 1 to 16, a handler shape, a batch handler or not),
ids shared across
routes, partitions and copies; on ``sequence`` routes, entities whose numbered
messages come in order on their partition, with copies and gaps; 1 to 3 replicas;
handlers that fail, fail for good, take long, or kill their replica; replicas killed
and started again; the dedup store unavailable for a while, or answering with an error
after applying a write; output deliveries late, failed or never answered; rebalances at
any time.

The checks (``check``): no id's handler (no entity's, on a sequence route) ran twice at
the same time; every message was handled once, skipped as a duplicate (or as stale)
or dead-lettered (never lost); an id ran twice
only in a window the README names (its first run's replica died, or the store was
away past the lease); no offset was ever committed past a message that was not
finished; the outputs of every completed id were delivered; the store's final records
match the outcomes.
"""

from __future__ import annotations

import itertools
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import structlog.testing
from confluent_kafka import Message as KafkaMessage
from prometheus_client import CollectorRegistry

from idempotent_worker.config.ids import SEPARATOR
from idempotent_worker.config.registry import resolve_routes
from idempotent_worker.dedup.base import State
from idempotent_worker.dedup.memory import MemoryDedupStore
from idempotent_worker.errors import PermanentFailure, RetryLater, StoreUnavailable
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.parts import Parts
from idempotent_worker.processing.loop import Worker
from tests.sim.broker import TP, Broker, SimConsumer, SimProducer
from tests.sim.handlers import BATCH_SHAPES, SHAPES
from tests.sim.sched import Scheduler, SimClock, SimPool
from tests.support.harness import make_settings

LEASE = 6.0
TIME_LIMIT = 900.0
"""Virtual seconds a run has to finish every message."""

_CURRENT: World | None = None


def current() -> World:
    assert _CURRENT is not None, "no simulated run in progress"
    return _CURRENT


@dataclass
class Run:
    id: str
    replica: str
    started: float
    ended: float | None = None
    ok: bool = False


@dataclass
class Replica:
    name: str
    worker: Worker
    consumer: SimConsumer | None = None
    killed_at: float | None = None
    stopped: bool = False


@dataclass
class Config:
    routes: list[dict[str, Any]]
    partitions: dict[str, int]
    replicas: int
    ids: int
    copies: int
    kills: int
    outages: list[tuple[float, float]]
    ambiguous: float
    failures: float
    slow: float
    crashes: float
    delivery_failures: float
    lost_deliveries: float
    rebalances: int
    linger_ms: float
    sequences: dict[str, list[tuple[str, int, int]]] = field(default_factory=dict)
    """Per sequence route, its messages in the order published: (entity, sequence,
    partition)."""
    cuts: list[tuple[str, str, float, float]] = field(default_factory=list)
    """A replica cut from the network for a while: (replica, what from, start, end); what
    from is ``redis``, ``broker`` (fetches, group coordinator, produce), ``coordinator``
    (the group's only: fetches work) or ``both``."""
    summary: str = ""


def draw(rng: random.Random) -> Config:
    routes = []
    partitions = {}
    for index in range(rng.randint(1, 4)):
        topic = f"in{index}"
        dedup = rng.choice(["id", "id", "id", "shadow"])
        routes.append(
            {
                "topic": topic,
                "handler": f"tests.sim.handlers:{rng.choice(SHAPES)}",
                "output_topic": "out",
                "dlq_topic": f"{topic}.dlq",
                "max_in_flight": rng.choice([1, 1, 2, 4, 16]),
                "dedup": dedup,
                "on_duplicate": "skip" if dedup == "shadow" else rng.choice(["skip", "replay"]),
            }
        )
        partitions[topic] = rng.randint(1, 4)
    outages = []
    for _ in range(rng.choice([0, 0, 1, 2])):
        start = rng.uniform(1, 30)
        outages.append((start, start + rng.choice([0.5, 2.0, LEASE * 1.5])))
    config = Config(
        routes=routes,
        partitions=partitions,
        replicas=rng.randint(1, 3),
        ids=rng.randint(5, 60),
        copies=rng.randint(1, 4),
        kills=rng.choice([0, 0, 1, 2]),
        outages=outages,
        ambiguous=rng.choice([0.0, 0.0, 0.05]),
        failures=rng.choice([0.0, 0.1, 0.3]),
        slow=rng.choice([0.0, 0.05]),
        crashes=rng.choice([0.0, 0.0, 0.02]),
        delivery_failures=rng.choice([0.0, 0.0, 0.1]),
        lost_deliveries=rng.choice([0.0, 0.0, 0.0, 0.005]),
        rebalances=rng.choice([0, 1, 3]),
        linger_ms=rng.choice([0.0, 5.0, 50.0]),
    )
    for _ in range(rng.choice([0, 0, 1, 2])):
        start = rng.uniform(1, 30)
        config.cuts.append(
            (
                f"r{rng.randint(1, config.replicas)}",
                rng.choice(["redis", "broker", "coordinator", "both"]),
                start,
                start + rng.choice([2.0, LEASE * 1.5, 20.0]),
            )
        )
    return config


def _summary(config: Config) -> str:
    routes, partitions = config.routes, config.partitions
    return (
        f"{len(routes)} route(s) "
        + ", ".join(
            f"{r['topic']}[{partitions[r['topic']]}] {r['dedup']}/"
            f"{r.get('on_gap', r['on_duplicate'])} "
            f"x{r['max_in_flight']} {r['handler'].rsplit(':', 1)[1]}"
            + (" batch" if r.get("batch") else "")
            for r in routes
        )
        + f"; {config.replicas} replica(s), {config.ids} ids x{config.copies}, "
        f"kills {config.kills}, outages {config.outages}, ambiguous {config.ambiguous}, "
        f"failures {config.failures}, slow {config.slow}, crashes {config.crashes}, "
        f"delivery failures {config.delivery_failures}, lost {config.lost_deliveries}, "
        f"rebalances {config.rebalances}, linger {config.linger_ms} ms, cuts {config.cuts}"
    )


def _draw_batches(rng: random.Random, config: Config) -> None:
    """Make some routes batch routes (from an rng of their own, as sequences)."""
    for route in config.routes:
        if rng.random() < 0.3:
            route.update(batch=True, handler=f"tests.sim.handlers:{rng.choice(BATCH_SHAPES)}")


def _draw_sequences(rng: random.Random, config: Config) -> None:
    """Make some routes ``sequence`` routes (from an rng of their own, so that a seed
    without one draws what it drew before they existed), and draw their messages."""
    for route in config.routes:
        if rng.random() >= 0.2:
            continue
        topic = route["topic"]
        gaps = rng.choice(["process", "dead_letter"])
        route.update(
            dedup="sequence", on_duplicate="skip", entity="key", sequence="header:seq", on_gap=gaps
        )
        streams = []
        for number in range(rng.randint(1, 6)):
            entity = f"{topic}-e{number}"
            partition = zlib.crc32(entity.encode()) % config.partitions[topic]
            firsts, sequence = [], rng.randint(0, 3)
            for _ in range(rng.randint(1, 8)):
                sequence += 2 if rng.random() < 0.1 else 1  # now and then a gap
                firsts.append((entity, sequence, partition))
            stream = list(firsts)
            for first in firsts:  # copies come after their first, maybe after later ones
                for _ in range(rng.randint(0, config.copies - 1)):
                    stream.insert(rng.randint(stream.index(first) + 1, len(stream)), first)
            streams.append(stream)
        ordered = config.sequences[topic] = []
        while any(streams):
            ordered.append(rng.choice([s for s in streams if s]).pop(0))


class FaultyStore:
    """The memory store on the virtual clock, unavailable during the run's outages, and
    now and then answering with an error after applying a write (an ambiguous timeout)."""

    TIMEOUT = 0.5

    def __init__(self, world: World) -> None:
        self._world = world
        self.store = MemoryDedupStore(clock=lambda: world.scheduler.now)

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.store, name)
        if not callable(target):
            return target

        def call(*args: Any) -> Any:
            world = self._world
            running = world.scheduler.running
            if world.store_down() or (
                running is not None and world.cut(running.group, "redis", "both")
            ):
                world.scheduler.sleep(self.TIMEOUT)
                raise StoreUnavailable(f"{name}: timed out")
            result = target(*args)
            if name in WRITES and world.rng.random() < world.config.ambiguous:
                world.scheduler.sleep(self.TIMEOUT)
                raise StoreUnavailable(f"{name}: timed out (applied)")
            return result

        return call


WRITES = {"claim", "claim_positions", "begin", "complete", "release", "renew"}


class World:
    def __init__(self, seed: int, *, sequences: bool = True) -> None:
        """``sequences=False`` draws no sequence route: what a seed drew before the
        simulator had them (its regression seeds were found then)."""
        self.seed = seed
        self._replay_flag = "" if sequences else " SIM_SEQUENCES=0"
        self.rng = random.Random(seed)
        self.config = draw(self.rng)
        if sequences:
            _draw_sequences(random.Random(f"sequences-{seed}"), self.config)
            _draw_batches(random.Random(f"batches-{seed}"), self.config)
        self.config.summary = _summary(self.config)
        self.scheduler = Scheduler(random.Random(seed * 7919 + 1))
        self.clock = SimClock(self.scheduler)
        self.broker = Broker(self.scheduler, session_timeout=6.0, max_poll_interval=30.0)
        self.store = FaultyStore(self)
        self.settings = make_settings(
            "sim:9092", "redis://sim:6379", f"sim-{seed}", self.config.routes,
            kafka={"consumer": {"max.poll.interval.ms": 30_000}},
            dedup={"lease_seconds": LEASE, "complete_linger_ms": self.config.linger_ms},
            retry={"max_attempts": 4, "backoff_initial_seconds": 0.05,
                   "backoff_max_seconds": 0.5},
        )  # fmt: skip
        self.routes = resolve_routes(self.settings)
        self.replicas: list[Replica] = []
        self.runs: dict[str, list[Run]] = defaultdict(list)
        self.inputs: list[KafkaMessage] = []
        self.delivered: list[KafkaMessage] = []
        self.violations: list[str] = []
        self.kills: list[tuple[str, float]] = []
        self._names = 0
        self._stopping = False
        self._livelocked = False
        self.logs: list[dict[str, Any]] = []

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> None:
        global _CURRENT
        _CURRENT = self
        config = self.config
        for topic, count in config.partitions.items():
            self.broker.create(topic, count)
            self.broker.create(f"{topic}.dlq", 1)
        self.broker.create("out", 1)
        self._publish()
        self._ends = {
            (r.topic(), r.partition()): self.broker.end((r.topic(), r.partition()))
            for r in self.inputs
        }
        self.broker.on_commit.append(self._check_commit)
        self.broker.alive = self._alive
        self.broker.fetch_fails = lambda c: self.cut(self._replica_of(c), "broker", "both")
        self.broker.coordinator_fails = lambda c: self.cut(
            self._replica_of(c), "broker", "coordinator", "both"
        )
        events = self._events()
        self.scheduler.on_tick.append(lambda: self._tick(events))
        try:
            with structlog.testing.capture_logs([self._stamp]) as self.logs:
                for _ in range(config.replicas):
                    self._start_replica()
                self.scheduler.run(TIME_LIMIT, self._drained)
                if not self._drained():
                    self._stuck()
                self._stopping = True
                for replica in self.replicas:
                    replica.worker.stop()
                self.scheduler.run(TIME_LIMIT + 120, self._all_stopped)
        finally:
            self.scheduler.close()
            _CURRENT = None
        self.check()

    def _publish(self) -> None:
        config, rng = self.config, self.rng
        for topic, messages in config.sequences.items():
            for entity, sequence, partition in messages:
                id = f"{entity}@{sequence}"
                record = self.broker.append(
                    topic, partition, entity.encode(), f"payload-{id}".encode(),
                    [("seq", str(sequence).encode()), ("message-id", id.encode())],
                )  # fmt: skip
                self.inputs.append(record)
        topics = [t for t in config.partitions if t not in config.sequences]
        for number in range(config.ids if topics else 0):
            id = f"id{number}"
            for _ in range(rng.randint(1, config.copies)):
                topic = rng.choice(topics)
                partition = rng.randrange(config.partitions[topic])
                record = self.broker.append(
                    topic, partition, rng.choice([None, id.encode()]),
                    f"payload-{id}".encode(), [("message-id", id.encode())],
                )  # fmt: skip
                self.inputs.append(record)

    def _events(self) -> list[tuple[float, str]]:
        config, rng = self.config, self.rng
        events = [(rng.uniform(0.5, 40), "kill") for _ in range(config.kills)]
        events += [(rng.uniform(0.5, 40), "rebalance") for _ in range(config.rebalances)]
        return sorted(events, reverse=True)

    def _tick(self, events: list[tuple[float, str]]) -> None:
        self.broker.expel_stale()
        while events and events[-1][0] <= self.scheduler.now:
            _, event = events.pop()
            live = [r for r in self.replicas if r.killed_at is None]
            if event == "kill" and live:
                self._kill(self.rng.choice(live))
            elif event == "rebalance":
                self.broker.rebalance(shuffle=True)

    def _stamp(self, logger: Any, method: str, event: Any) -> Any:
        event["at"] = round(self.scheduler.now, 3)
        return event

    def _start_replica(self, delay: float = 0.0) -> None:
        self._names += 1
        name = f"r{self._names}"
        scheduler = self.scheduler
        made: list[SimConsumer] = []

        def consumer(config: dict[str, Any]) -> SimConsumer:
            made.append(SimConsumer(self.broker, config))
            return made[0]

        parts = Parts(
            consumer=consumer,
            producer=lambda config: SimProducer(
                self.broker, lambda: self._delivery(name), self._on_delivered
            ),
            clock=self.clock,
            pool=lambda workers, pool_name: SimPool(scheduler, workers, pool_name),
            thread=lambda target, thread_name: scheduler.spawn(target, thread_name, name),
            exit=lambda code: self._exit(),
        )
        worker = Worker(
            self.settings, self.routes, self.store, Metrics(CollectorRegistry()),  # type: ignore[arg-type]
            Health(60, clock=self.clock.monotonic), parts=parts,
        )  # fmt: skip
        replica = Replica(name, worker, made[0])
        self.replicas.append(replica)
        if self._stopping:  # started again after a kill while the run winds down
            worker.stop()

        def main() -> None:
            if delay:
                scheduler.sleep(delay)
            try:
                worker.start()
                while worker.step():
                    pass
            except StoreUnavailable:
                pass  # asked to stop during an outage, as Worker.run does
            worker.close()
            replica.stopped = True

        scheduler.spawn(main, f"{name}-loop", group=name).start()

    def _alive(self, consumer: SimConsumer) -> bool:
        return any(r.consumer is consumer and r.killed_at is None for r in self.replicas)

    def _kill(self, replica: Replica) -> None:
        """The replica's process dies; its orchestrator starts another a little later."""
        replica.killed_at = self.scheduler.now
        self.kills.append((replica.name, self.scheduler.now))
        self.scheduler.kill(replica.name)
        self._start_replica(delay=self.rng.uniform(0.5, 10))

    def _exit(self) -> None:
        """A handler past its timeout ends its process."""
        name = self.scheduler.current().group
        self._kill(next(r for r in self.replicas if r.name == name))
        self.scheduler.park()

    def _delivery(self, replica: str) -> tuple[float, bool] | None:
        rng, config = self.rng, self.config
        if rng.random() < config.lost_deliveries:
            return None
        latency = rng.uniform(0.001, 0.05)
        now = self.scheduler.now
        for name, kind, start, end in config.cuts:  # answered once the link is back
            if name == replica and kind in ("broker", "both") and start <= now < end:
                latency += end - now
        return latency, rng.random() < config.delivery_failures

    def cut(self, replica: str, *kinds: str) -> bool:
        """Whether ``replica`` is cut now from what any of ``kinds`` names."""
        now = self.scheduler.now
        return any(
            name == replica and kind in kinds and start <= now < end
            for name, kind, start, end in self.config.cuts
        )

    def _replica_of(self, consumer: SimConsumer) -> str:
        return next((r.name for r in self.replicas if r.consumer is consumer), "")

    def _on_delivered(self, record: KafkaMessage) -> None:
        self.delivered.append(record)

    def store_down(self) -> bool:
        now = self.scheduler.now
        return any(start <= now < end for start, end in self.config.outages)

    # -- what handlers do ------------------------------------------------------------------

    def run_handler(self, message: Any, ctx: Any, *, blocking: bool) -> None:
        rng, config = self.rng, self.config
        name = self.scheduler.current().group if blocking else self._async_replica()
        run = Run(message.id, name, self.scheduler.now)
        self.runs[message.id].append(run)
        if blocking and rng.random() < config.slow:
            self.scheduler.sleep(rng.uniform(0.1, LEASE * 1.5))
        if blocking and rng.random() < config.crashes:
            self._kill(next(r for r in self.replicas if r.name == name))
            self.scheduler.park()
        roll = rng.random()
        if roll < config.failures / 10:
            run.ended = self.scheduler.now
            raise PermanentFailure("simulated permanent failure")
        if roll < config.failures:
            run.ended = self.scheduler.now
            raise RetryLater("simulated transient failure", delay=0.05)
        for index in range(outputs_of(message.id)):
            ctx.emit(f"{message.id}:{index}".encode(), key=message.id.encode())
        run.ended = self.scheduler.now
        run.ok = True

    def run_batch(self, batch: list[tuple[Any, Any]], *, blocking: bool) -> list[Any] | None:
        """A batch handler's call: each message as ``run_handler`` decides, its failure in
        the result; now and then the whole call fails before any runs."""
        if self.rng.random() < self.config.failures / 3:
            name = self.scheduler.current().group if blocking else self._async_replica()
            now = self.scheduler.now
            for message, _ in batch:
                self.runs[message.id].append(Run(message.id, name, now, now))
            raise RetryLater("simulated failure of a whole call", delay=0.05)
        failures: list[Exception | None] = []
        for message, ctx in batch:
            try:
                self.run_handler(message, ctx, blocking=blocking)
                failures.append(None)
            except (RetryLater, PermanentFailure) as exc:
                failures.append(exc)
        return failures if any(failures) else None

    def _async_replica(self) -> str:
        # An async handler runs on the event loop's thread while its lane waits: the
        # lane's simulated thread is the one that holds the turn.
        running = self.scheduler.running
        assert running is not None
        return running.group

    # -- end of the run ----------------------------------------------------------------------

    def _drained(self) -> bool:
        committed = self.broker.committed
        return all(committed.get(tp, 0) >= end for tp, end in self._ends.items())

    def _all_stopped(self) -> bool:
        return all(r.stopped or r.killed_at is not None for r in self.replicas)

    def _stuck(self) -> None:
        left = [
            r for r in self.inputs
            if self.broker.committed.get((r.topic(), r.partition()), 0) <= r.offset()
        ]  # fmt: skip
        if self.config.crashes and {r.topic() for r in left} & self._shadow_topics():
            # The documented limit of shadow routes (docs/guarantees.md): a replica that
            # dies more often than it finishes a batch makes no progress there, nor on
            # the other routes of its batches (whose messages the check still sees
            # finished: not lost, only not committed).
            self._livelocked = True
            return
        waiting = sorted({f"{r.topic()}[{r.partition()}]@{r.offset()}" for r in left})
        self.violations.append(
            f"stuck: {len(waiting)} message(s) not committed after {TIME_LIMIT:.0f} s: "
            f"{waiting[:5]}"
        )

    def _finished(self, record: KafkaMessage, committer: str = "") -> bool:
        """Completed or dead-lettered; or, for a replica committing past it, its id held
        by another replica's claim (its completion was refused: the holder finishes it,
        and the final check sees that it did)."""
        topic, partition, offset = record.topic(), record.partition(), record.offset()
        if (topic, partition, offset) in self._dead_lettered():
            return True
        id = _key_of(record)
        if (sequence := _sequence_of(record)) is not None:
            position = self.store.store.position(id)
            if position is not None and position >= sequence:
                return True
        state = self.store.store.state(id)
        if state is State.COMPLETED:
            return True
        if state is State.IN_PROGRESS and committer:
            holder = self.store.store.inspect(id).owner or ""
            return not holder.startswith(committer + ":")
        return False

    def _dead_lettered(self) -> set[tuple[str, int, int]]:
        letters = set()
        for record in self.delivered:
            headers = dict(record.headers() or [])
            if "dlq-original-topic" in headers:
                letters.add(
                    (
                        headers["dlq-original-topic"].decode(),
                        int(headers["dlq-original-partition"]),
                        int(headers["dlq-original-offset"]),
                    )
                )
        return letters

    def _check_commit(self, consumer: SimConsumer, tp: TP, offset: int) -> None:
        start = self.broker.committed.get(tp, 0)
        replica = next((r for r in self.replicas if r.consumer is consumer), None)
        committer = replica.worker._worker_id if replica else ""
        for record in self.broker.topics[tp[0]][tp[1]][start:offset]:
            if not self._finished(record, committer):
                self.violations.append(
                    f"offset {offset} of {tp[0]}[{tp[1]}] committed past "
                    f"{record.offset()} (id {_id_of(record)}), which is not finished"
                )

    def check(self) -> None:
        shadow = self._shadow_topics()
        ids_by_route: dict[str, set[str]] = defaultdict(set)
        for record in self.inputs:
            ids_by_route[_id_of(record)].add(record.topic())
        by_entity: dict[str, list[Run]] = defaultdict(list)
        for id, runs in self.runs.items():
            if ids_by_route[id] & shadow:
                continue  # shadow routes run duplicates on purpose
            by_entity[id.rpartition("@")[0] or id] += runs
            ok = [r for r in runs if r.ok]
            for earlier, later in itertools.pairwise(ok):
                if not self._excused(earlier, later):
                    self.violations.append(
                        f"id {id} ran twice: on {earlier.replica} at {earlier.started:.3f} "
                        f"and on {later.replica} at {later.started:.3f}"
                    )
        for entity, runs in by_entity.items():
            self._check_overlap(entity, sorted(runs, key=lambda run: run.started))
        letters = self._dead_lettered()
        outputs = {r.value() for r in self.delivered if r.topic() == "out"}
        for record in self.inputs:
            id = _id_of(record)
            coordinates = (record.topic(), record.partition(), record.offset())
            state = self.store.store.state(id)
            if coordinates in letters or (self._livelocked and record.topic() in shadow):
                continue
            if (sequence := _sequence_of(record)) is not None:
                self._check_position(record, sequence, letters)
                continue
            if state is not State.COMPLETED:
                self.violations.append(
                    f"lost: {coordinates} (id {id}) neither completed nor dead-lettered"
                )
                continue
            if not any(r.ok for r in self.runs[id]):
                self.violations.append(
                    f"lost: id {id} completed but its handler never ran to its end"
                )
            self._check_outputs(id, outputs)

    def _shadow_topics(self) -> set[str]:
        return {r["topic"] for r in self.config.routes if r["dedup"] == "shadow"}

    def _check_position(
        self, record: KafkaMessage, sequence: int, letters: set[tuple[str, int, int]]
    ) -> None:
        """A message of a sequence route not dead-lettered: its entity's position reached
        it, and it ran (or a copy of it was dead-lettered, e.g. a gap)."""
        id, coordinates = _id_of(record), (record.topic(), record.partition(), record.offset())
        position = self.store.store.position(_key_of(record))
        if position is None or position < sequence:
            self.violations.append(
                f"lost: {coordinates} ({id}) not dead-lettered, its entity at {position}"
            )
            return
        copies = {(r.topic(), r.partition(), r.offset()) for r in self.inputs if _id_of(r) == id}
        if copies & letters:
            return
        if not any(r.ok for r in self.runs[id]):
            self.violations.append(f"lost: {coordinates} ({id}) stale but never ran")
            return
        self._check_outputs(id, {r.value() for r in self.delivered if r.topic() == "out"})

    def _check_outputs(self, id: str, outputs: set[bytes]) -> None:
        missing = [i for i in range(outputs_of(id)) if f"{id}:{i}".encode() not in outputs]
        if missing:
            self.violations.append(f"lost: id {id} completed without outputs {missing}")

    def _check_overlap(self, id: str, runs: list[Run]) -> None:
        for index, run in enumerate(runs):
            for other in runs[index + 1 :]:
                if other.started < (run.ended if run.ended is not None else float("inf")) and (
                    run.replica != other.replica or run.ended is None
                ):
                    if self._excused(run, other):
                        continue
                    self.violations.append(
                        f"id {id} ran on {run.replica} and {other.replica} at the same time "
                        f"({run.started:.3f}, {other.started:.3f})"
                    )

    def _died(self, run: Run) -> bool:
        return any(name == run.replica and at >= run.started for name, at in self.kills)

    def _excused(self, earlier: Run, later: Run) -> bool:
        """A second run is within the README's limits if the first run's replica died
        before completing it, or the store was away from it (outages, or that replica
        cut from Redis) for long enough that its claim may have lapsed: two thirds of
        the lease less a store timeout and the lease keeper's pause (docs/guarantees.md);
        outages closer together than that are one to the keeper."""
        if self._died(earlier):
            return True
        outages = [(start, end) for start, end in self.config.outages]
        outages += [
            (start, end)
            for name, kind, start, end in self.config.cuts
            if name == earlier.replica and kind in ("redis", "both")
        ]
        slack = FaultyStore.TIMEOUT + 0.2
        merged: list[list[float]] = []
        for start, end in sorted(outages):
            if merged and start - merged[-1][1] < slack:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        return any(
            end - start >= LEASE * 2 / 3 - slack
            and start < later.started
            and end > earlier.started - LEASE
            for start, end in merged
        )

    def report(self) -> str:
        return (
            f"seed {self.seed}: {self.config.summary}\n  "
            + "\n  ".join(self.violations[:10])
            + f"\n  replay: SIM_SEED={self.seed}{self._replay_flag} pytest tests/test_simulation.py"
        )


def report_of(seed: int) -> str:
    """Run ``seed``: its report if a promise broke, else ""."""
    world = World(seed)
    world.run()
    return world.report() if world.violations else ""


def outputs_of(id: str) -> int:
    if id.startswith("id"):
        return int(id.removeprefix("id")) % 3
    return zlib.crc32(id.encode()) % 3


def _sequence_of(record: KafkaMessage) -> int | None:
    sequence = dict(record.headers() or []).get("seq")
    return None if sequence is None else int(sequence)


def _key_of(record: KafkaMessage) -> str:
    """What the message claims: its id, or on a sequence route its entity."""
    if _sequence_of(record) is None:
        return _id_of(record)
    return f"{record.topic()}{SEPARATOR}{record.key().decode()}"


def _id_of(record: KafkaMessage) -> str:
    return str(dict(record.headers() or [])["message-id"].decode())
