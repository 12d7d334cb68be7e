"""The consumer loop: poll a batch, claim its ids, handle, complete, store offsets, commit.

It reads like SPEC section 5, a poll batch at a time:

1. every id of the batch is claimed in one Redis round trip (ids this replica completed
   recently are skipped without one, from a bounded local cache);
2. the batch's messages are split into lanes: messages sharing a Kafka key (or an id)
   are one lane and run in order; a route with ``max_in_flight`` above 1 runs that many
   lanes at once on a thread pool (``async def`` handlers on an event loop), otherwise
   the route's messages run one at a time, in partition order, on the loop's thread;
3. handled messages are completed together, in one round trip, once the oldest has
   waited ``dedup.complete_linger_ms`` (a handler that itself takes that long completes
   its predecessors first), and at the end of the batch;
4. once every lane is done and every completion written, each partition's offset is
   stored up to its first unfinished message, and committed on an interval, on revoke
   and at shutdown.

Only the loop's thread touches the consumer, so rebalance callbacks (which librdkafka
runs inside ``consume``/``poll``) never race the loop; handlers on other threads check
that their partition is still owned before each message.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError
from confluent_kafka import Message as KafkaMessage

from worker.aio import EventLoopThread
from worker.cache import CompletedIds
from worker.consumer import GroupConsumer
from worker.context import HandlerContext
from worker.deadletter import DeadLetter, dead_letter_headers
from worker.dedup.base import Claim, ClaimStatus, Completion, DedupStore
from worker.errors import (
    ConfigError,
    KafkaOperationError,
    MessageIdError,
    PermanentFailure,
    RetryLater,
    StoreUnavailable,
)
from worker.guard import GuardedStore
from worker.inbox import AlreadyApplied, Applied, Inbox
from worker.inbox.cleanup import InboxCleanup
from worker.leases import LeaseKeeper
from worker.logs import get_logger
from worker.metrics import Metrics
from worker.outputs import Outputs
from worker.records import coordinates, header_pairs
from worker.registry import ResolvedRoute
from worker.server import Health
from worker.settings import Settings, client_config
from worker.types import Message

CLAIM_WAIT_INTERVAL = 0.05
DELIVERY_TIMEOUT = 60.0


class LeaseLost(Exception):
    """Another replica took the message's claim while this one ran the handler."""


@dataclass(slots=True)
class _Item:
    record: KafkaMessage
    route: ResolvedRoute
    origin: str
    """``topic/partition/offset``: what a completed record remembers, to tell redeliveries."""
    message: Message | None
    fingerprint: str
    """Of the value: a completed id remembers it, to tell a true duplicate from a conflict."""
    rejection: DeadLetter | None = None
    """Why the record goes straight to the dead-letter topic (no usable id, too large)."""
    applied: bool = False
    """The inbox found the id's effects committed by an earlier run (a duplicate)."""
    done: bool = False
    """Finished (completed, skipped or dead-lettered): its offset may be committed."""


@dataclass(slots=True)
class _Handled:
    """A message whose handler succeeded and whose completion is not written yet."""

    item: _Item
    completion: Completion
    attempt: int
    seconds: float


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
    ) -> None:
        self._settings = settings
        self._routes = routes
        self._metrics = metrics
        self._health = health
        self._max_messages = max_messages
        self._idle_timeout = idle_timeout
        self._worker_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._tokens = itertools.count()
        self._log = get_logger(group=settings.kafka.group_id, worker=self._worker_id)
        self._debug = settings.log.level == "DEBUG"
        self._consumer = GroupConsumer(settings, metrics, health, self._log, self._on_kafka_error)
        self._outputs = Outputs(
            client_config(settings, {**settings.kafka.producer, "error_cb": self._on_kafka_error})
        )
        self._stopping = False
        self._loop_thread: int | None = None
        self._store = GuardedStore(
            store,
            self._consumer,
            metrics,
            health,
            self._log,
            lambda: self._stopping,
            settings.dedup.lease_seconds,
            self._on_loop_thread,
        )
        self._leases = LeaseKeeper(store, settings.dedup.lease_seconds, metrics, health, self._log)
        metrics.in_flight.set_function(self._leases.running)
        self._completed = CompletedIds(settings.dedup.local_cache_size, settings.dedup.ttl_seconds)
        self._linger = settings.dedup.complete_linger_ms / 1000
        self._handled: list[_Handled] = []
        self._handled_since = 0.0
        self._handled_lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pools = {
            topic: ThreadPoolExecutor(route.max_in_flight, thread_name_prefix=f"lanes-{topic}")
            for topic, route in routes.items()
            if route.max_in_flight > 1
        }
        self._event_loop = EventLoopThread() if any(r.is_async for r in routes.values()) else None
        self._inbox = Inbox(settings.inbox, settings.kafka.group_id, self._log)
        self._cleanup = (
            InboxCleanup(settings, metrics, self._log) if settings.inbox.url is not None else None
        )
        self.finished = 0
        self.fatal_error: KafkaError | None = None

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop after the messages in hand. Safe from a signal handler."""
        self._stopping = True

    def run(self) -> None:
        self._loop_thread = threading.get_ident()
        idle_since = time.monotonic()
        try:
            self._store.ping()
            self._check_eviction_policy()
            self._warn_missing_topics()
            self._consumer.subscribe(list(self._routes))
            self._leases.start()
            if self._cleanup is not None:
                self._cleanup.start()
            while not self._stopping and not self._bound_reached():
                self._health.beat()
                records = self._consumer.consume()
                if records:
                    idle_since = time.monotonic()
                    self._process_batch(records)
                elif (
                    self._idle_timeout is not None
                    and time.monotonic() - idle_since >= self._idle_timeout
                ):
                    break
                self._outputs.poll()
                if self._health.store_ok:  # no commit advances while the store is away
                    self._consumer.commit_if_due()
        except StoreUnavailable:
            self._log.warning("stopping while the dedup store is unavailable")
        finally:
            self._close()

    def _bound_reached(self) -> bool:
        return self._max_messages is not None and self.finished >= self._max_messages

    def _check_eviction_policy(self) -> None:
        policy = self._store.eviction_policy()
        if policy is None:
            self._log.warning(
                "could not read the dedup store's maxmemory-policy; make sure it is noeviction"
            )
        elif policy != "noeviction" and not self._settings.redis.allow_eviction:
            raise ConfigError(
                "redis.allow_eviction",
                f"Redis runs with maxmemory-policy {policy}: when full it evicts keys, and an "
                "evicted dedup record is a forgotten id whose duplicates would run again. "
                "Set maxmemory-policy noeviction, or set redis.allow_eviction = true to "
                "accept that risk",
            )

    def _close(self) -> None:
        self._stopping = True
        for pool in self._pools.values():
            pool.shutdown(wait=True)
        if self._event_loop is not None:
            self._event_loop.close()
        self._leases.close()
        if self._cleanup is not None:
            self._cleanup.close()
        self._health.joined = False
        undelivered = self._outputs.close(DELIVERY_TIMEOUT)
        if undelivered:
            self._log.error("outputs not delivered at shutdown", count=undelivered)
        self._consumer.close()
        self._log.info("consumer closed", finished=self.finished)

    # -- one batch -------------------------------------------------------------------

    def _process_batch(self, records: Sequence[KafkaMessage]) -> None:
        items = [item for record in records if (item := self._prepare(record)) is not None]
        for topic, count in Counter(item.route.topic for item in items).items():
            self._metrics.topic(topic).consumed.inc(count)
        token = self._new_token()
        ids = dict.fromkeys(i.message.id for i in items if i.message is not None)
        # Ids this replica saw completed lately need no round trip: they are duplicates.
        claims = self._completed.get_each(ids)
        claims.update(self._claim([id for id in ids if id not in claims], token))
        lanes = [
            pool.submit(self._run_lane, lane, claims, token)
            for topic, pool in self._pools.items()
            for lane in _lanes([item for item in items if item.route.topic == topic])
        ]
        # Routes with max_in_flight 1 run here, one message at a time, in batch order.
        self._run_lane([i for i in items if i.route.topic not in self._pools], claims, token)
        self._wait_for(lanes)
        self._flush()
        self.finished += self._consumer.store_offsets(
            (item.record for item in items if item.done),
            (item.record for item in items if not item.done),
        )

    def _wait_for(self, lanes: Sequence[Future[None]]) -> None:
        """Wait for the lanes on other threads, serving the group protocol meanwhile and
        holding the partitions still while the dedup store is away."""
        pending = set(lanes)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for lane in finished:
                lane.result()  # a lane's exception (a bug, or stopping in an outage) is ours
            self._health.beat()
            if not self._health.store_ok:
                self._store.hold_still(0.2)
        self._store.resume_if_held()

    def _run_lane(self, lane: Sequence[_Item], claims: dict[str, Claim], token: str) -> None:
        """Handle ``lane``'s messages in order; ``claims`` are the batch's claims."""
        seen: set[str] = set()
        claim: Claim | None
        for index, item in enumerate(lane):
            if self._stopping:
                self._release_unstarted(lane[index:], claims, token, seen)
                return
            if not self._consumer.owns(item.record):
                # Revoked while the batch was in hand: the new owner reads it again.
                self._release_unstarted([item], claims, token, seen)
                continue
            message = item.message
            if message is None:
                assert item.rejection is not None
                self._dead_letter(item, item.rejection)
                continue
            id = message.id
            if id in seen:
                # An earlier record of this lane carried the same id and is finished by
                # now: look up how it ended (locally if it completed).
                own_token = self._new_token()
                claim = self._completed.get(id) or self._acquire(item, own_token)
                self._handle(item, claim, own_token)
                continue
            seen.add(id)
            claim = claims[id]
            if claim.status is ClaimStatus.BUSY:
                # Another replica holds this id. Keeping our claims on this lane's later
                # ids while we wait could leave two replicas waiting for each other:
                # let them go, and claim them again after the wait.
                later = _unstarted(lane[index + 1 :], claims, seen)
                self._give_back(later, claims, token, wait_out_outage=True)
                claim = self._acquire(item, token)
                claims.update(self._claim(later, token))
            self._handle(item, claim, token)

    def _claim(self, ids: Sequence[str], token: str) -> dict[str, Claim]:
        """Claim ``ids``; the lease keeper renews those we got until they are finished."""
        if not ids:
            return {}
        claims = self._store.claim(ids, token)
        self._leases.hold(token, (i for i, c in claims.items() if c.status is ClaimStatus.CLAIMED))
        return claims

    def _give_back(
        self, ids: Sequence[str], claims: Mapping[str, Claim], token: str, *, wait_out_outage: bool
    ) -> None:
        """Release claims whose messages did not start; a run their claim counted is
        uncounted again. Without ``wait_out_outage`` it is best effort: leases expire."""
        self._leases.drop(token, ids)
        release = self._store.release if wait_out_outage else self._store.release_if_reachable
        release([id for id in ids if claims[id].attempt], token, "clear")
        release([id for id in ids if not claims[id].attempt], token, "keep")

    def _prepare(self, record: KafkaMessage) -> _Item | None:
        error = record.error()
        if error is not None:
            self._on_kafka_error(error)
            return None
        topic, partition, offset = coordinates(record)
        route = self._routes[topic]
        headers = dict(header_pairs(record))
        key, value = record.key(), record.value()
        origin = f"{topic}/{partition}/{offset}"
        fingerprint = hashlib.blake2b(value or b"", digest_size=8).hexdigest()
        limit = self._settings.kafka.max_payload_bytes
        size = len(key or b"") + len(value or b"")
        size += sum(len(name) + len(header or b"") for name, header in headers.items())
        if size > limit:
            detail = f"key, value and headers: {size} bytes, over kafka.max_payload_bytes ({limit})"
            letter = DeadLetter("payload_too_large", "PayloadTooLarge", detail, 0, drop_value=True)
            return _Item(record, route, origin, None, fingerprint, letter)
        try:
            id = route.extract_id(topic, partition, offset, key, value, headers)
        except MessageIdError as exc:
            letter = DeadLetter(exc.reason, "MessageIdError", exc.detail, 0)
            return _Item(record, route, origin, None, fingerprint, letter)
        kind, timestamp = record.timestamp()
        message = Message(
            id, topic, partition, offset, key, value, headers, timestamp if kind else None
        )
        return _Item(record, route, origin, message, fingerprint)

    def _release_unstarted(
        self, items: Sequence[_Item], claims: Mapping[str, Claim], token: str, seen: set[str]
    ) -> None:
        """Give up this batch's claims of ``items``, which will not run here."""
        ids = _unstarted(items, claims, seen)
        seen.update(ids)
        self._give_back(ids, claims, token, wait_out_outage=False)

    # -- one message: the state machine ------------------------------------------------

    def _acquire(self, item: _Item, token: str) -> Claim | None:
        """Claim one id, waiting while another claim holds it. None if stopping meanwhile."""
        assert item.message is not None
        id = item.message.id
        claim = self._store.claim([id], token)[id]
        if claim.status is ClaimStatus.BUSY:
            # Perhaps our own completion, not written yet: write it, then look again.
            self._flush()
            claim = self._store.claim([id], token)[id]
        if claim.status is ClaimStatus.BUSY:
            self._metrics.claim_waits.labels(item.route.topic).inc()
            self._log.info("waiting for another claim", id=item.message.id, origin=item.origin)
        while claim.status is ClaimStatus.BUSY:
            if not self._sleep(CLAIM_WAIT_INTERVAL):
                return None
            claim = self._store.claim([id], token)[id]
        if claim.status is ClaimStatus.CLAIMED:
            self._leases.hold(token, [id])
        return claim

    def _handle(self, item: _Item, claim: Claim | None, token: str) -> None:
        if claim is None:
            return
        if claim.status is ClaimStatus.COMPLETED:
            self._skip(item, claim)
        else:
            self._run(item, token, claim.attempt)

    def _skip(self, item: _Item, claim: Claim) -> None:
        assert item.message is not None
        if claim.fingerprint is None or claim.fingerprint == item.fingerprint:
            reason = "redelivery" if claim.origin == item.origin else "duplicate"
            self._completed.put(item.message.id, claim)
        elif self._settings.dedup.on_payload_conflict == "dead_letter":
            detail = (
                f"id {item.message.id!r} was already processed from {claim.origin} "
                "with a different payload"
            )
            letter = DeadLetter("id_conflict", "PayloadConflict", detail, 0, item.message.id)
            self._dead_letter(item, letter)
            return
        else:
            reason = "conflict"
        self._metrics.duplicates.labels(item.route.topic, reason).inc()
        if self._debug:
            self._log_outcome(item, "duplicate", reason=reason, first_seen=claim.origin)
        item.done = True

    def _run(self, item: _Item, token: str, attempt: int) -> None:
        """Run the handler until it succeeds or the message is given up.

        ``attempt`` is the run number the claim already counted (a fresh claim counts
        run 1), or 0 when the run must be counted first: earlier runs began and did
        not finish (a crash, a timeout) or failed."""
        message = item.message
        assert message is not None
        settings = self._settings
        while True:
            if attempt == 0:
                # Runs of this id began before and did not finish: it may be the message
                # that kills its worker. Complete what was handled before it runs.
                self._flush()
                attempt = self._store.begin(message.id, token)
            if attempt == 0:
                # The claim expired before the run (a long wait on Redis): claim afresh.
                token = self._new_token()
                claim = self._reclaim(item, token)
                if claim is None:
                    return
                attempt = claim.attempt
                continue
            if attempt > settings.retry.max_attempts:
                # Earlier runs started and never finished: their worker died or timed out.
                detail = f"{attempt - 1} runs started and none finished (crash or timeout?)"
                letter = DeadLetter(
                    "attempts_exhausted", "AttemptsExhausted", detail, attempt - 1, message.id
                )
                self._give_up(item, token, letter)
                return
            self._flush_if_lingered()
            started = time.perf_counter()
            failure = self._attempt(item, attempt, token)
            elapsed = time.perf_counter() - started
            if isinstance(failure, Applied):
                # The inbox's row is the first run's: remember its payload and origin.
                completion = Completion(message.id, token, failure.origin, failure.fingerprint)
                self._handled_ok(_Handled(item, completion, attempt, elapsed))
                return
            if failure is None:
                completion = Completion(message.id, token, item.origin, item.fingerprint)
                self._handled_ok(_Handled(item, completion, attempt, elapsed))
                return
            if isinstance(failure, LeaseLost):
                self._leases.drop(token, [message.id])
                self._lease_lost(item, attempt, elapsed)
                return
            self._metrics.processed.labels(item.route.topic, "failed").inc()
            self._log.warning(
                "handler failed",
                **self._fields(item),
                attempt=attempt,
                error_type=type(failure).__name__,
                error=str(failure),
            )
            permanent = isinstance(failure, PermanentFailure)
            if permanent or attempt >= settings.retry.max_attempts:
                reason = "permanent_failure" if permanent else "handler_failed"
                letter = DeadLetter(
                    reason, type(failure).__name__, str(failure), attempt, message.id
                )
                self._give_up(item, token, letter)
                return
            self._leases.drop(token, [message.id])
            self._store.release([message.id], token, "keep")
            if not self._sleep(self._backoff(attempt, failure)):
                return
            token = self._new_token()
            claim = self._reclaim(item, token)
            if claim is None:
                return
            attempt = claim.attempt

    def _reclaim(self, item: _Item, token: str) -> Claim | None:
        """Claim the message's id again: the claim, or None if it was finished meanwhile
        (then handled here) or the worker is stopping."""
        claim = self._acquire(item, token)
        if claim is not None and claim.status is ClaimStatus.COMPLETED:
            self._skip(item, claim)
            return None
        return claim

    def _give_up(self, item: _Item, token: str, letter: DeadLetter) -> None:
        """Dead-letter a claimed message, then drop its claim and its attempt count."""
        assert item.message is not None
        self._dead_letter(item, letter)
        self._leases.drop(token, [item.message.id])
        self._store.release([item.message.id], token, "clear")

    def _attempt(self, item: _Item, attempt: int, token: str) -> Exception | Applied | None:
        """Run the handler once and confirm its outputs: None, the exception if either
        failed, or the inbox's row if an earlier run had committed (its stored outputs
        confirmed instead)."""
        assert item.message is not None
        route = item.route
        ctx = HandlerContext(
            item.message,
            attempt,
            lambda: self._log.bind(**self._fields(item), attempt=attempt),
            route.output_topic,
            self._inbox,
            item.fingerprint,
            item.origin,
        )
        running = self._leases.handler_started(route.timeout_seconds, item.origin, item.message.id)
        started = time.perf_counter()
        try:
            try:
                result = route.handler(item.message, ctx)
                if route.is_async:
                    assert self._event_loop is not None and result is not None
                    self._event_loop.run(result)
            except (Exception, AlreadyApplied):
                if ctx.applied is None:
                    raise
                # The inbox found the effects applied: whatever the handler made of that,
                # the message is done once the first run's outputs are out.
            outputs = ctx.outputs if ctx.applied is None else ctx.applied.outputs
            if outputs:
                if not self._store.renew([item.message.id], token)[0]:
                    return LeaseLost("the claim was lost while the handler ran")
                deliveries = [
                    self._outputs.send(o.topic, o.value, key=o.key, headers=o.headers)
                    for o in outputs
                ]
                self._outputs.confirm(deliveries, DELIVERY_TIMEOUT)
        except Exception as exc:  # a handler may raise anything: that is its way to fail
            return exc
        finally:
            self._leases.handler_finished(running)
            self._metrics.topic(route.topic).handler_duration.observe(time.perf_counter() - started)
        for output in outputs:
            self._metrics.outputs.labels(output.topic).inc()
        if ctx.applied is not None:
            item.applied = True
            if ctx.applied.fingerprint != item.fingerprint:
                self._log.warning(
                    "the inbox holds this id applied from a different payload",
                    **self._fields(item),
                    applied_from=ctx.applied.origin,
                )
        return ctx.applied

    def _lease_lost(self, item: _Item, attempt: int, seconds: float) -> None:
        self._metrics.lease_lost.labels(item.route.topic).inc()
        self._log_outcome(item, "lease_lost", attempt=attempt, duration_seconds=round(seconds, 6))
        item.done = True

    # -- completions, written in groups ----------------------------------------------

    def _handled_ok(self, handled: _Handled) -> None:
        with self._handled_lock:
            if not self._handled:
                self._handled_since = time.monotonic()
            self._handled.append(handled)
        if handled.seconds >= self._linger and self._on_loop_thread():
            # One at a time and slow: no company worth waiting for. (Lanes running
            # concurrently share one write every linger instead.)
            self._flush()

    def _flush_if_lingered(self) -> None:
        if self._handled and time.monotonic() - self._handled_since >= self._linger:
            self._flush()

    def _flush(self) -> None:
        """Write the completions of every message handled so far, in one round trip."""
        with self._flush_lock:
            with self._handled_lock:
                handled, self._handled = self._handled, []
            if not handled:
                return
            completions = [h.completion for h in handled]
            results = self._store.complete(completions, self._settings.dedup.ttl_seconds)
            self._leases.drop_each((c.token, c.id) for c in completions)
            remembered: list[tuple[str, Claim]] = []
            succeeded: Counter[str] = Counter()
            for h, completion, completed in zip(handled, completions, results, strict=True):
                if not completed:
                    self._lease_lost(h.item, h.attempt, h.seconds)
                    continue
                claim = Claim(ClaimStatus.COMPLETED, completion.origin, completion.fingerprint)
                remembered.append((completion.id, claim))
                if h.item.applied:
                    self._metrics.duplicates.labels(h.item.route.topic, "inbox").inc()
                    self._log_outcome(h.item, "duplicate", reason="inbox", attempt=h.attempt)
                else:
                    succeeded[h.item.route.topic] += 1
                    if self._debug:
                        self._log_outcome(
                            h.item,
                            "success",
                            attempt=h.attempt,
                            duration_seconds=round(h.seconds, 6),
                        )
                h.item.done = True
            self._completed.put_each(remembered)
            for topic, count in succeeded.items():
                self._metrics.topic(topic).succeeded.inc(count)

    def _backoff(self, attempt: int, failure: Exception) -> float:
        retry = self._settings.retry
        if isinstance(failure, RetryLater) and failure.delay is not None:
            return min(failure.delay, retry.backoff_max_seconds)
        return float(
            min(retry.backoff_initial_seconds * 2 ** (attempt - 1), retry.backoff_max_seconds)
        )

    def _dead_letter(self, item: _Item, letter: DeadLetter) -> None:
        """Write the record to the route's dead-letter topic; finish it only once confirmed."""
        headers = dead_letter_headers(item.record, letter)
        delay = self._settings.retry.backoff_initial_seconds
        while True:
            try:
                delivery = self._outputs.send(
                    item.route.dlq_topic,
                    None if letter.drop_value else item.record.value(),
                    key=item.record.key(),
                    headers=headers,
                )
                self._outputs.confirm([delivery], DELIVERY_TIMEOUT)
                break
            except KafkaOperationError as exc:
                self._log.error(
                    "dead-letter write failed; the offset stays uncommitted until it succeeds",
                    **self._fields(item),
                    dlq_topic=item.route.dlq_topic,
                    error=str(exc),
                    code=exc.code,
                )
                if not self._sleep(delay):
                    return
                delay = min(max(delay * 2, 0.1), self._settings.retry.backoff_max_seconds)
        self._metrics.processed.labels(item.route.topic, "dead_lettered").inc()
        self._metrics.dead_lettered.labels(item.route.topic, letter.reason).inc()
        self._log_outcome(
            item,
            "dead_lettered",
            reason=letter.reason,
            error=letter.error_message,
            attempts=letter.attempts,
        )
        item.done = True

    def _on_kafka_error(self, error: KafkaError) -> None:
        self._log.warning("kafka client error", code=error.name(), reason=error.str())
        if error.fatal():
            self.fatal_error = error
            self._stopping = True

    # -- helpers -----------------------------------------------------------------------

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _new_token(self) -> str:
        return f"{self._worker_id}:{next(self._tokens)}"

    def _sleep(self, seconds: float) -> bool:
        """Sleep in short slices; False if asked to stop meanwhile."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            if self._stopping:
                return False
            self._health.beat()
            time.sleep(min(remaining, 0.1))
        return not self._stopping

    def _warn_missing_topics(self) -> None:
        for route in self._routes.values():
            topics = {route.topic, route.dlq_topic, route.output_topic or route.topic}
            for topic in sorted(self._consumer.missing_topics(topics)):
                self._log.warning("topic does not exist (yet)", topic=topic, route=route.topic)

    @staticmethod
    def _fields(item: _Item) -> dict[str, Any]:
        return {
            "topic": item.record.topic(),
            "partition": item.record.partition(),
            "offset": item.record.offset(),
            "id": item.message.id if item.message else None,
            "handler": item.route.handler_path,
        }

    def _log_outcome(self, item: _Item, outcome: str, **fields: Any) -> None:
        self._log.info("message", **self._fields(item), outcome=outcome, **fields)


def _unstarted(items: Iterable[_Item], claims: Mapping[str, Claim], seen: set[str]) -> list[str]:
    """Ids of ``items`` that the batch claimed and that have not started."""
    return list(
        dict.fromkeys(
            item.message.id
            for item in items
            if item.message is not None
            and item.message.id not in seen
            and (claim := claims.get(item.message.id)) is not None
            and claim.status is ClaimStatus.CLAIMED
        )
    )


def _lanes(items: Sequence[_Item]) -> list[list[_Item]]:
    """Split ``items`` into lanes that may run concurrently, each in its original order:
    two messages with the same Kafka key, or the same id, share a lane."""
    parent: dict[object, object] = {}

    def root(node: object) -> object:
        while parent.setdefault(node, node) != node:
            parent[node] = parent[parent[node]]
            node = parent[node]
        return node

    for index, item in enumerate(items):
        key = item.record.key()
        if key is not None:
            parent[root(("key", item.route.topic, key))] = root(index)
        if item.message is not None:
            parent[root(("id", item.message.id))] = root(index)
    lanes: dict[object, list[_Item]] = {}
    for index, item in enumerate(items):
        lanes.setdefault(root(index), []).append(item)
    return list(lanes.values())
