"""The consumer loop: poll a batch, claim its ids, handle, complete, store offsets, commit.

It reads like SPEC section 5, a poll batch at a time:

1. every id of the batch is claimed in one Redis round trip (ids this replica completed
   recently are skipped without one, from a bounded local cache);
2. the batch's messages are split into lanes: messages sharing a Kafka key, or an id
   (whichever routes read it), are one lane and run in order; a route with
   ``max_in_flight`` above 1 runs that many lanes at once on a thread pool (what a
   handler returns is awaited on an event loop if it is awaitable), otherwise the
   route's messages run one at a time, in partition order, on the loop's thread;
   each message goes through the state machine of idempotent_worker/processing/handling.py;
3. handled messages are completed together, in one round trip (processing/completions.py),
   once the oldest has waited ``dedup.complete_linger_ms``, and at the end of the batch;
4. once every lane is done and every completion written, each partition's offset is
   stored up to its first unfinished message, and committed on an interval, on revoke
   and at shutdown.

Only the loop's thread touches the consumer, so rebalance callbacks (which librdkafka
runs inside ``consume``/``poll``) never race the loop; handlers on other threads check
that their partition is still owned before each message.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import uuid
from collections import Counter, deque
from collections.abc import Mapping, Sequence
from concurrent.futures import Future

from confluent_kafka import KafkaError
from confluent_kafka import Message as KafkaMessage

from idempotent_worker.config.registry import ResolvedRoute
from idempotent_worker.config.settings import Settings, client_config
from idempotent_worker.dedup.base import Claim, ClaimStatus, DedupStore
from idempotent_worker.errors import StoreUnavailable
from idempotent_worker.inbox.cleanup import InboxCleanup
from idempotent_worker.kafka.consumer import GroupConsumer
from idempotent_worker.kafka.outputs import DELIVERY_TIMEOUT, SERVE_AFTER, Outputs
from idempotent_worker.observe.logs import get_logger
from idempotent_worker.observe.metrics import Metrics
from idempotent_worker.observe.server import Health
from idempotent_worker.observe.tracing import start_tracing
from idempotent_worker.parts import SYSTEM, Parts
from idempotent_worker.processing.aio import EventLoopThread
from idempotent_worker.processing.cache import CompletedIds
from idempotent_worker.processing.claimbook import ClaimBook
from idempotent_worker.processing.guard import GuardedStore
from idempotent_worker.processing.handling import assemble
from idempotent_worker.processing.items import Item, prepare
from idempotent_worker.processing.lanes import LaneRunner, lanes
from idempotent_worker.processing.leases import EXIT_HANDLER_TIMEOUT, LeaseKeeper
from idempotent_worker.processing.startup import check_eviction_policy, warn_missing_topics


class Worker:
    """One replica's consumer loop. ``run()`` blocks until ``stop()`` or a bound is reached."""

    def __init__(
        self,
        settings: Settings,
        routes: Mapping[str, ResolvedRoute],
        store: DedupStore,
        metrics: Metrics,
        health: Health,
        *,
        max_messages: int | None = None,
        idle_timeout: float | None = None,
        parts: Parts = SYSTEM,
    ) -> None:
        self._clock = parts.clock
        self._settings = settings
        self._routes = routes
        self._metrics = metrics
        self._health = health
        self._max_messages = max_messages
        self._idle_timeout = idle_timeout
        self._worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tokens = itertools.count()
        self._log = get_logger(group=settings.kafka.group_id, worker=self._worker_id)
        self._consumer = GroupConsumer(
            settings, metrics, health, self._log, self._on_kafka_error, parts
        )
        self._outputs = Outputs(
            client_config(settings, {**settings.kafka.producer, "error_cb": self._on_kafka_error}),
            parts,
        )
        self._tracing = start_tracing(settings.tracing, settings.kafka.group_id)
        self._stopping = False
        self._loop_thread: int | None = None
        dedup = settings.dedup
        self._store = GuardedStore(
            store,
            self._consumer,
            metrics,
            health,
            self._log,
            lambda: self._stopping,
            dedup.lease_seconds,
            self._on_loop_thread,
            self._clock,
        )
        self._completed = CompletedIds(dedup.local_cache_size, dedup.ttl_seconds)
        self._leases = LeaseKeeper(
            store,
            dedup.lease_seconds,
            metrics,
            health,
            self._log,
            on_timeout=lambda: parts.exit(EXIT_HANDLER_TIMEOUT),
            on_forgotten=self._completed.clear,
            parts=parts,
        )
        metrics.in_flight.set_function(self._leases.running)
        health.working = self._leases.running
        self._pools = {
            topic: parts.pool(route.max_in_flight, f"lanes-{topic}")
            for topic, route in routes.items()
            if route.max_in_flight > 1
        }
        self._event_loop = EventLoopThread()
        self._handling = assemble(
            settings,
            routes,
            self._store,
            self._leases,
            self._outputs,
            self._completed,
            self._event_loop,
            metrics,
            self._log,
            self._sleep,
            self._new_token,
            self._on_loop_thread,
            self._clock,
        )
        self._completions = self._handling.completions
        modes = self._handling.modes
        self._uncached = {topic for topic, mode in modes.items() if not mode.uses_cache}
        """Routes whose duplicates the local cache may not answer (see worker/modes)."""
        self._lanes = LaneRunner(
            self._handling, self._completed, self._uncached, self._consumer.owns,
            lambda: self._stopping, self._new_token,
        )  # fmt: skip
        self._cleanup = (
            InboxCleanup(settings, metrics, self._log) if settings.inbox.url is not None else None
        )
        self._idle_since = 0.0
        self._lane_wait = min(0.2, max(dedup.complete_linger_ms / 1000, 0.005))
        """How often the loop looks at its lanes while they run (and completes what they
        handled)."""
        self.finished = 0
        self.fatal_error: KafkaError | None = None

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop after the messages in hand. Safe from a signal handler."""
        self._stopping = True

    def run(self) -> None:
        try:
            self.start()
            while self.step():
                pass
        except StoreUnavailable:
            self._log.warning("stopping while the dedup store is unavailable")
        finally:
            self.close()

    def start(self) -> None:
        """Check the store, join the group and start the background work: what ``run``
        does before its first poll."""
        self._loop_thread = threading.get_ident()
        self._idle_since = self._clock.monotonic()
        self._store.ping()
        check_eviction_policy(self._store.eviction_policy(), self._settings.redis, self._log)
        warn_missing_topics(self._routes, self._consumer, self._log)
        self._consumer.subscribe(list(self._routes))
        self._leases.start()
        if self._cleanup is not None:
            self._cleanup.start()

    def step(self) -> bool:
        """One turn of the loop: poll, handle the batch, commit if due. False once the
        loop should end (stopping, a bound reached, idle past the idle timeout)."""
        if self._stopping or self._bound_reached():
            return False
        self._health.beat()
        # Held still by a batch that ended before the store was seen back (the lease
        # keeper's check may say so first): paused partitions bring no record, so no
        # call of the loop's would ever find the store back and resume them.
        self._store.resume_if_held()
        records = self._consumer.consume()
        if records:
            self._idle_since = self._clock.monotonic()
            self._process_batch(records)
        elif (
            self._idle_timeout is not None
            and self._clock.monotonic() - self._idle_since >= self._idle_timeout
        ):
            return False
        self._outputs.poll()
        if self._health.store_ok:  # no commit advances while the store is away
            self._consumer.commit_if_due()
        return True

    def _bound_reached(self) -> bool:
        return self._max_messages is not None and self.finished >= self._max_messages

    def close(self) -> None:
        self._stopping = True
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        self._event_loop.close()
        self._leases.close()
        if self._cleanup is not None:
            self._cleanup.close()
        self._health.joined = False
        undelivered = self._outputs.close(DELIVERY_TIMEOUT)
        if undelivered:
            self._log.error("outputs not delivered at shutdown", count=undelivered)
        self._consumer.close()
        if self._tracing is not None:
            self._tracing.close()
        self._log.info("consumer closed", finished=self.finished)

    # -- one batch -------------------------------------------------------------------

    def _process_batch(self, records: Sequence[KafkaMessage]) -> None:
        items = [item for record in records if (item := self._prepare(record)) is not None]
        for topic, count in Counter(item.route.topic for item in items).items():
            self._metrics.topic(topic).consumed.inc(count)
        receive = None
        if self._tracing is not None:
            receive = self._tracing.receive(len(records))
            for item in items:
                if (message := item.message) is not None:
                    item.span = self._tracing.message(
                        receive, message.topic, message.partition, message.offset, item.id,
                        message.headers,
                    )  # fmt: skip
        token = self._new_token()
        firsts: dict[str, Item] = {}  # the first message with each id (or entity)
        for item in items:
            if item.message is not None:
                firsts.setdefault(item.key, item)
        # Ids this replica saw completed lately need no round trip: they are duplicates
        # (except on routes whose mode needs the store's record, e.g. a kept reply).
        cached = firsts
        if self._uncached:
            cached = {k: i for k, i in firsts.items() if i.route.topic not in self._uncached}
        claims = self._completed.get_each(cached)
        if claims:
            # Ids forgotten since the cache learned them must not be skipped: read the
            # forget counter first (which drops the cache if it moved), then look again.
            claims = self._completed.get_each(claims) if self._leases.learn_forgets() else {}
        claiming = [i for k, i in firsts.items() if k not in claims]
        started = time.time_ns()
        claims.update(self._claim(claiming, token))
        if self._tracing is not None and claiming:
            self._tracing.timed(receive, "claim", started, time.time_ns(), ids=len(claiming))
            for item in claiming:
                if item.span is not None:
                    item.span.set(claim=claims[item.key].status.value)
        book = ClaimBook(claims, token, self._give_back)
        # Lanes are built over the whole batch: routes share one id space, so an id read
        # from two topics is in one lane and runs once. A lane that touches a route with
        # max_in_flight 1 runs here, one message at a time, in batch order, with the rest
        # of those routes' messages; the others run on the pool of their first route,
        # whose max_in_flight threads take the lanes from one queue (a task per thread,
        # not per lane: a lane is often a single message).
        queues: dict[str, deque[list[Item]]] = {}
        pooled: set[int] = set()
        for lane in lanes(items) if self._pools else ():  # (none: every lane runs here)
            if all(item.route.topic in self._pools for item in lane):
                queues.setdefault(lane[0].route.topic, deque()).append(lane)
                pooled.update(id(item) for item in lane)
        futures: list[Future[None]] = [
            self._pools[topic].submit(self._lanes.run_all, queue, book)
            for topic, queue in queues.items()
            for _ in range(min(len(queue), self._routes[topic].max_in_flight))
        ]
        self._lanes.run([i for i in items if id(i) not in pooled], book)
        self._wait_for(futures)
        self._store.resume_if_held()  # held still by a wait on the loop's thread
        self._completions.flush()
        finished = self._consumer.store_offsets(
            (item.record for item in items if item.done),
            (item.record for item in items if not item.done),
        )
        if receive is not None:
            for item in items:
                if item.span is not None and not item.done:
                    item.span.end("released")  # not finished here: read again later
            receive.end()
        if finished:
            self.finished += finished
            self._health.progressed()

    def _prepare(self, record: KafkaMessage) -> Item | None:
        error = record.error()
        if error is not None:
            self._on_kafka_error(error)
            return None
        return prepare(record, self._routes, self._settings.kafka.max_payload_bytes)

    def _wait_for(self, futures: Sequence[Future[None]]) -> None:
        """Wait for the lanes on other threads. After ``SERVE_AFTER`` (or at once while
        the dedup store is away) the partitions are held still and the group protocol
        served, so that a long batch neither passes ``max.poll.interval.ms`` nor keeps a
        rebalance waiting."""
        pending = set(futures)
        started = self._clock.monotonic()
        while pending:
            finished, pending = self._clock.wait_futures(pending, self._lane_wait)
            for lane in finished:
                lane.result()  # a lane's exception (a bug, or stopping in an outage) is ours
            self._health.beat()
            # What finished lanes handled is completed within the linger, not at the end
            # of the batch: a crash re-runs no more than the linger promises, and a
            # replica waiting on one of those ids is not kept waiting.
            self._completions.flush_if_lingered()
            if pending and (
                not self._health.store_ok or self._clock.monotonic() - started >= SERVE_AFTER
            ):
                self._store.hold_still(0.05)
        self._store.resume_if_held()

    def _claim(self, items: Sequence[Item], token: str) -> dict[str, Claim]:
        """Claim the ids (or entities) of ``items``, each with its own; the lease keeper
        renews those we got until they are finished."""
        if not items:
            return {}
        ids = [item.key for item in items if item.sequence is None]
        claims = self._store.claim(ids, token) if ids else {}
        entities = [(item.key, item.sequence) for item in items if item.sequence is not None]
        if entities:
            claims.update(self._store.claim_positions(entities, token))
        self._leases.hold(token, (i for i, c in claims.items() if c.status is ClaimStatus.CLAIMED))
        return claims

    def _give_back(self, token: str, claims: list[tuple[str, int]], wait_out_outage: bool) -> None:
        """Release ``token``'s ``(id, attempt)`` claims whose messages did not start; a
        run their claim counted is uncounted again. Without ``wait_out_outage`` it is
        best effort: leases expire."""
        ids = [id for id, _ in claims]
        self._leases.drop(token, ids)
        release = self._store.release if wait_out_outage else self._store.release_if_reachable
        release([id for id, attempt in claims if attempt], token, "clear")
        release([id for id, attempt in claims if not attempt], token, "keep")

    # -- helpers -----------------------------------------------------------------------

    def _on_kafka_error(self, error: KafkaError) -> None:
        self._log.warning("kafka client error", code=error.name(), reason=error.str())
        if error.fatal():
            self.fatal_error = error
            self._stopping = True

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _new_token(self) -> str:
        return f"{self._worker_id}:{next(self._tokens)}"

    def _sleep(self, seconds: float) -> bool:
        """Sleep in short slices; False if asked to stop meanwhile. On the loop's thread
        the partitions are held still and the group protocol served meanwhile (they are
        resumed at the end of the batch)."""
        deadline = self._clock.monotonic() + seconds
        while (remaining := deadline - self._clock.monotonic()) > 0:
            if self._stopping:
                return False
            self._health.beat()
            if self._on_loop_thread():
                self._store.hold_still(min(remaining, 0.1))
            else:
                self._clock.sleep(min(remaining, 0.1))
        return not self._stopping
