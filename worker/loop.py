"""The consumer loop: poll a batch, claim its ids, handle, complete, store offsets, commit.

It reads like SPEC section 5. Everything runs on one thread, so a rebalance
callback (which librdkafka runs inside ``consume``/``poll``) never races a handler.
Offsets are stored one message at a time, in partition order, only once the
message is finished (processed, skipped as a duplicate or dead-lettered), and
committed on an interval, on revoke and at shutdown.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import socket
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from confluent_kafka import KafkaError
from confluent_kafka import Message as KafkaMessage

from worker.consumer import GroupConsumer
from worker.context import HandlerContext
from worker.deadletter import DeadLetter, dead_letter_headers
from worker.dedup.base import Attempts, Claim, ClaimStatus, DedupStore
from worker.errors import (
    ConfigError,
    KafkaOperationError,
    MessageIdError,
    PermanentFailure,
    RetryLater,
    StoreUnavailable,
)
from worker.guard import GuardedStore
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
        self._consumer = GroupConsumer(settings, metrics, health, self._log, self._on_kafka_error)
        self._outputs = Outputs(
            client_config(settings, {**settings.kafka.producer, "error_cb": self._on_kafka_error})
        )
        self._stopping = False
        self._store = GuardedStore(
            store,
            self._consumer,
            metrics,
            health,
            self._log,
            lambda: self._stopping,
            settings.dedup.lease_seconds,
        )
        self._leases = LeaseKeeper(store, settings.dedup.lease_seconds, metrics, self._log)
        self.finished = 0
        self.fatal_error: KafkaError | None = None

    # -- lifecycle -------------------------------------------------------------------

    def stop(self) -> None:
        """Ask the loop to stop after the message in hand. Safe to call from a signal handler."""
        self._stopping = True

    def run(self) -> None:
        idle_since = time.monotonic()
        try:
            self._store.ping()
            self._check_eviction_policy()
            self._warn_missing_topics()
            self._consumer.subscribe(list(self._routes))
            self._leases.start()
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
        self._leases.close()
        self._health.joined = False
        undelivered = self._outputs.close(DELIVERY_TIMEOUT)
        if undelivered:
            self._log.error("outputs not delivered at shutdown", count=undelivered)
        self._consumer.close()
        self._log.info("consumer closed", finished=self.finished)

    # -- one batch -------------------------------------------------------------------

    def _process_batch(self, records: Sequence[KafkaMessage]) -> None:
        items = [item for record in records if (item := self._prepare(record)) is not None]
        token = self._new_token()
        ids = list(dict.fromkeys(i.message.id for i in items if i.message is not None))
        claims = self._claim(ids, token)
        seen: set[str] = set()

        def held() -> list[str]:
            """The ids of this batch we hold and have not started yet."""
            return [i for i in ids if i not in seen and claims[i].status is ClaimStatus.CLAIMED]

        for index, item in enumerate(items):
            if self._stopping:
                self._release_unstarted(items[index:], claims, token, seen)
                return
            if not self._consumer.owns(item.record):
                # Revoked while the batch was in hand: the new owner reads it again.
                self._release_unstarted([item], claims, token, seen)
                continue
            if item.message is None:
                assert item.rejection is not None
                self._dead_letter(item, item.rejection)
                continue
            id = item.message.id
            if id in seen:
                # An earlier record of this batch carried the same id and is finished by
                # now: claim again to learn whether it completed or was released.
                own_token = self._new_token()
                self._handle(item, self._acquire(item, own_token), own_token)
                continue
            seen.add(id)
            claim: Claim | None = claims[id]
            if claims[id].status is ClaimStatus.BUSY:
                # Another replica holds this id. Keeping our claims on later ids while we
                # wait could leave two replicas waiting for each other until a lease
                # expires: let them go, and claim them again after the wait.
                later = held()
                self._release(later, token, "keep")
                claim = self._acquire(item, token)
                claims.update(self._claim(later, token))
            self._handle(item, claim, token)

    def _claim(self, ids: Sequence[str], token: str) -> dict[str, Claim]:
        """Claim ``ids``; the lease keeper renews those we got until they are finished."""
        claims = self._store.claim(ids, token)
        self._leases.hold(token, (i for i, c in claims.items() if c.status is ClaimStatus.CLAIMED))
        return claims

    def _release(self, ids: Sequence[str], token: str, attempts: Attempts) -> None:
        self._leases.drop(token, ids)
        self._store.release(ids, token, attempts)

    def _prepare(self, record: KafkaMessage) -> _Item | None:
        error = record.error()
        if error is not None:
            self._on_kafka_error(error)
            return None
        topic, partition, offset = coordinates(record)
        route = self._routes[topic]
        self._metrics.consumed.labels(topic).inc()
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
        """Give up this batch's claims of ``items`` (best effort: leases expire anyway)."""
        ids = {
            item.message.id
            for item in items
            if item.message is not None
            and item.message.id not in seen
            and claims[item.message.id].status is ClaimStatus.CLAIMED
        }
        seen.update(ids)
        self._leases.drop(token, ids)
        self._store.release_if_reachable(list(ids), token)

    # -- one message: the state machine ------------------------------------------------

    def _acquire(self, item: _Item, token: str) -> Claim | None:
        """Claim one id, waiting while another claim holds it. None if stopping meanwhile."""
        assert item.message is not None
        id = item.message.id
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
            self._run(item, token)

    def _skip(self, item: _Item, claim: Claim) -> None:
        assert item.message is not None
        if claim.fingerprint is None or claim.fingerprint == item.fingerprint:
            reason = "redelivery" if claim.origin == item.origin else "duplicate"
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
        self._log_outcome(item, "duplicate", reason=reason, first_seen=claim.origin)
        self._finish(item)

    def _run(self, item: _Item, token: str) -> None:
        message = item.message
        assert message is not None
        settings = self._settings
        while True:
            attempt = self._store.begin(message.id, token)
            if attempt == 0:
                # The claim expired before the run (a long wait on Redis): claim afresh.
                token = self._new_token()
                if not self._reclaim(item, token):
                    return
                continue
            if attempt > settings.retry.max_attempts:
                # Earlier runs started and never finished: their worker died or timed out.
                detail = f"{attempt - 1} runs started and none finished (crash or timeout?)"
                letter = DeadLetter(
                    "attempts_exhausted", "AttemptsExhausted", detail, attempt - 1, message.id
                )
                self._give_up(item, token, letter)
                return
            started = time.perf_counter()
            failure = self._attempt(item, attempt, token)
            elapsed = time.perf_counter() - started
            if failure is None or isinstance(failure, LeaseLost):
                ttl, origin = settings.dedup.ttl_seconds, item.origin
                self._leases.drop(token, [message.id])
                if failure is None and self._store.complete(
                    message.id, token, ttl, origin, item.fingerprint
                ):
                    outcome = "success"
                    self._metrics.processed.labels(item.route.topic, outcome).inc()
                else:
                    outcome = "lease_lost"
                    self._metrics.lease_lost.labels(item.route.topic).inc()
                self._log_outcome(
                    item, outcome, attempt=attempt, duration_seconds=round(elapsed, 6)
                )
                self._finish(item)
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
            self._release([message.id], token, "keep")
            if not self._sleep(self._backoff(attempt, failure)):
                return
            token = self._new_token()
            if not self._reclaim(item, token):
                return

    def _reclaim(self, item: _Item, token: str) -> bool:
        """Claim the message's id again; False if it was finished meanwhile or stopping."""
        claim = self._acquire(item, token)
        if claim is not None and claim.status is ClaimStatus.COMPLETED:
            self._skip(item, claim)
            return False
        return claim is not None

    def _give_up(self, item: _Item, token: str, letter: DeadLetter) -> None:
        """Dead-letter a claimed message, then drop its claim and its attempt count."""
        assert item.message is not None
        self._dead_letter(item, letter)
        self._release([item.message.id], token, "clear")

    def _attempt(self, item: _Item, attempt: int, token: str) -> Exception | None:
        """Run the handler once and confirm its outputs; the exception if either failed."""
        assert item.message is not None
        route = item.route
        ctx = HandlerContext(
            item.message,
            attempt,
            lambda: self._log.bind(**self._fields(item), attempt=attempt),
            route.output_topic,
        )
        self._metrics.in_flight.inc()
        self._leases.handler_started(route.timeout_seconds, item.origin, item.message.id)
        started = time.perf_counter()
        try:
            route.handler(item.message, ctx)
            if ctx.outputs:
                if not self._store.renew([item.message.id], token)[0]:
                    return LeaseLost("the claim was lost while the handler ran")
                for output in ctx.outputs:
                    self._outputs.send(
                        output.topic, output.value, key=output.key, headers=output.headers
                    )
                self._outputs.confirm(DELIVERY_TIMEOUT)
        except Exception as exc:  # a handler may raise anything: that is its way to fail
            return exc
        finally:
            self._leases.handler_finished()
            self._metrics.handler_duration.labels(route.topic).observe(
                time.perf_counter() - started
            )
            self._metrics.in_flight.dec()
        for output in ctx.outputs:
            self._metrics.outputs.labels(output.topic).inc()
        return None

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
                self._outputs.send(
                    item.route.dlq_topic,
                    None if letter.drop_value else item.record.value(),
                    key=item.record.key(),
                    headers=headers,
                )
                self._outputs.confirm(DELIVERY_TIMEOUT)
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
        self._finish(item)

    def _finish(self, item: _Item) -> None:
        """The message is done: store its offset so the next commit moves past it."""
        if self._consumer.finish(item.record):
            self.finished += 1

    def _on_kafka_error(self, error: KafkaError) -> None:
        self._log.warning("kafka client error", code=error.name(), reason=error.str())
        if error.fatal():
            self.fatal_error = error
            self._stopping = True

    # -- helpers -----------------------------------------------------------------------

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
