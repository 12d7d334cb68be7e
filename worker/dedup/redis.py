"""The Redis dedup store: one key per message id, every transition one Lua script.

A record is a string value. In progress it is ``p|<token>|<lease end>|<runs>``: the
claim's owner, the end of its lease in Redis's own clock (milliseconds), and how many
runs of the handler began, over every replica; the key lives ``RUNS_TTL_SECONDS``
after its last claim, so that a message that crashes its worker is noticed by
whichever replica claims it next. A claim whose lease ended is free to take. Completed,
it is ``c|<token>|<origin>|<fingerprint>`` with the dedup TTL, followed by ``|<reply>``
when the completion kept one for duplicates to replay.

One key and, for a message seen once, three commands: a SET NX at claim, a GET and a
SET at completion. A whole poll batch is claimed in one script call, and completions
are written in groups, so dedup costs two round trips per group of messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry
from redis.sentinel import Sentinel

from worker.dedup.base import Attempts, Claim, Completion, Forgotten, Inspection, State
from worker.dedup.scripts import (
    BEGIN,
    CLAIM,
    COMPLETE,
    EPOCH,
    FORGET,
    FORGETS,
    INSPECT,
    RELEASE,
    RENEW,
    RUNS_TTL_SECONDS,
    SEQUENCE_CLAIM,
    SEQUENCE_COMPLETE,
    STATE,
    ms,
    pack,
    parse_claim,
    parse_inspection,
    parse_position_claim,
    parse_state,
    split_completions,
)
from worker.errors import StoreUnavailable


@dataclass(frozen=True, slots=True)
class Durability:
    """How many replicas must acknowledge a claim or a completion before it counts
    (``WAIT``, on the connection that wrote it), and how long to wait for them."""

    min_replicas: int = 0
    timeout_ms: int = 500

    def check(self, acknowledged: int) -> None:
        """Raise ``StoreUnavailable`` unless ``acknowledged`` replicas are enough: the
        write may be lost in a failover, so nothing may rely on it yet."""
        if acknowledged < self.min_replicas:
            raise StoreUnavailable(
                f"redis: {acknowledged} of {self.min_replicas} replicas acknowledged the write "
                f"within {self.timeout_ms} ms (redis.min_replicas)"
            )


NOT_DURABLE = Durability()
"""Writes count as soon as the primary has them (``redis.min_replicas`` 0)."""

T = TypeVar("T")


class RedisDedupStore:
    def __init__(
        self,
        client: redis.Redis,
        key_prefix: str,
        durability: Durability = NOT_DURABLE,
        also_close: Sequence[redis.Redis] = (),
    ) -> None:
        self._client = client
        self._also_close = also_close
        self._durability = durability
        self._prefix = key_prefix + ":"
        self._epoch_key = key_prefix + "#epoch"
        self._claim = client.register_script(CLAIM)
        self._complete = client.register_script(COMPLETE)
        self._release = client.register_script(RELEASE)
        self._renew = client.register_script(RENEW)
        self._begin = client.register_script(BEGIN)
        self._epoch = client.register_script(EPOCH)
        self._state = client.register_script(STATE)
        self._inspect = client.register_script(INSPECT)
        self._forget = client.register_script(FORGET)
        self._forgets = client.register_script(FORGETS)
        self._forgets_key = key_prefix + "#forgets"
        self._positions = key_prefix + "="
        self._claim_positions = client.register_script(SEQUENCE_CLAIM)
        self._complete_positions = client.register_script(SEQUENCE_COMPLETE)

    @classmethod
    def from_url(
        cls,
        url: str,
        key_prefix: str,
        *,
        timeout: float = 2.0,
        tls_ca_file: str | None = None,
        durability: Durability = NOT_DURABLE,
    ) -> RedisDedupStore:
        client = redis.Redis.from_url(url, **client_options(timeout, tls_ca_file))
        return cls(client, key_prefix, durability)

    @classmethod
    def from_sentinel(
        cls,
        url: str,
        master: str,
        sentinels: Sequence[tuple[str, int]],
        key_prefix: str,
        *,
        timeout: float = 2.0,
        tls_ca_file: str | None = None,
        durability: Durability = NOT_DURABLE,
        sentinel_username: str | None = None,
        sentinel_password: str | None = None,
        sentinel_tls: bool = False,
    ) -> RedisDedupStore:
        """A store on the primary the Sentinels know as ``master``; ``url`` gives only the
        scheme, the credentials and the database. A connection to the primary that fails
        asks the Sentinels again, so the store follows a failover by itself (meanwhile
        its calls fail, and the guard holds as for any outage)."""
        parts = urlsplit(url)
        tls = parts.scheme == "rediss"
        sentinel_options = client_options(timeout, tls_ca_file if sentinel_tls else None)
        del sentinel_options["decode_responses"]  # redis-py parses the Sentinels' replies
        sentinel: Any = Sentinel(  # type: ignore[no-untyped-call]
            sentinels,
            sentinel_kwargs={
                **sentinel_options,
                "username": sentinel_username,
                "password": sentinel_password,
                "ssl": sentinel_tls,
            },
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
            db=int(parts.path.strip("/") or 0),
            ssl=tls,
            **client_options(timeout, tls_ca_file if tls else None),
        )
        return cls(sentinel.master_for(master), key_prefix, durability, sentinel.sentinels)

    def _record_keys(self, ids: Sequence[str]) -> list[str]:
        return [self._prefix + id for id in ids]

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        if not ids:
            return []
        args: list[Any] = [
            self._prefix, token, ms(lease_seconds), RUNS_TTL_SECONDS, pack(ids),
        ]  # fmt: skip
        replies: list[str] = self._durable(self._claim, args)
        return [parse_claim(reply) for reply in replies]

    def claim_positions(
        self, entities: Sequence[tuple[str, int]], token: str, lease_seconds: float
    ) -> list[Claim]:
        if not entities:
            return []
        keys = self._entity_keys([entity for entity, _ in entities])
        sequences = pack([str(sequence) for _, sequence in entities])
        args: list[Any] = [token, ms(lease_seconds), RUNS_TTL_SECONDS, sequences]
        replies: list[str] = self._durable(self._claim_positions, args, keys)
        return [parse_position_claim(reply) for reply in replies]

    def _entity_keys(self, entities: Sequence[str]) -> list[str]:
        """Each entity's claim key, then each one's position key."""
        return [self._prefix + e for e in entities] + [self._positions + e for e in entities]

    def _durable(self, script: Script, args: list[Any], keys: list[str] | None = None) -> Any:
        """``script``'s reply, once ``redis.min_replicas`` replicas have its writes."""
        if not self._durability.min_replicas:
            return redis_call(lambda: script(keys=keys, args=args))

        def write_and_wait() -> list[Any]:
            pipe: Any = self._client.pipeline(transaction=False)
            script(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self._durability.min_replicas, self._durability.timeout_ms)
            return list(pipe.execute())

        reply, acknowledged = redis_call(write_and_wait)
        self._durability.check(int(acknowledged))
        return reply

    def begin(self, id: str, token: str) -> int:
        keys, args = self._record_keys([id]), [token, str(RUNS_TTL_SECONDS)]
        return int(redis_call(lambda: self._begin(keys=keys, args=args)))

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        ids, entities = split_completions(completions)
        done: dict[int, bool] = {}
        if ids:
            fields = [
                f
                for c in (completions[i] for i in ids)
                for f in (c.id, c.token, c.origin, c.fingerprint, c.reply)
            ]
            args: list[Any] = [self._prefix, ttl_seconds, pack(fields)]
            done.update(zip(ids, map(bool, self._durable(self._complete, args)), strict=True))
        if entities:
            raised = [completions[i] for i in entities]
            keys = self._entity_keys([c.id for c in raised])
            fields = [f for c in raised for f in (c.token, str(c.sequence))]
            args = [position_ttl_seconds or "", pack(fields)]
            replies = self._durable(self._complete_positions, args, keys)
            done.update(zip(entities, map(bool, replies), strict=True))
        return [done[i] for i in range(len(completions))]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        if not ids:
            return 0
        keys, args = self._record_keys(ids), [token, attempts, str(RUNS_TTL_SECONDS)]
        return int(redis_call(lambda: self._release(keys=keys, args=args)))

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        if not ids:
            return []
        keys = self._record_keys(ids)
        args: list[Any] = [token, ms(lease_seconds), RUNS_TTL_SECONDS]
        replies = redis_call(lambda: self._renew(keys=keys, args=args))
        return [bool(reply) for reply in replies]

    def epoch(self, candidate: str) -> str:
        """Waits for ``redis.min_replicas`` too: the check also tells ``/readyz`` whether
        the store can take the worker's writes, and without its replicas it cannot."""
        return str(self._durable(self._epoch, [candidate], [self._epoch_key]))

    def state(self, id: str) -> State:
        return parse_state(redis_call(lambda: self._state(keys=[self._prefix + id])))

    def inspect(self, id: str) -> Inspection:
        return parse_inspection(redis_call(lambda: self._inspect(keys=[self._prefix + id])))

    def forget(self, ids: Sequence[str], force: bool) -> list[Forgotten]:
        keys = self._record_keys(ids)
        found = redis_call(lambda: self._forget(keys=keys, args=["force" if force else ""]))
        redis_call(lambda: self._forgets(keys=[self._forgets_key], args=["incr"]))
        return [str(state) for state in found]  # type: ignore[misc]

    def forgets(self) -> int:
        return int(redis_call(lambda: self._forgets(keys=[self._forgets_key], args=[""])))

    def eviction_policy(self) -> str | None:
        return redis_call(lambda: read_eviction_policy(self._client))

    def ping(self) -> None:
        redis_call(self._client.ping)

    def close(self) -> None:
        self._client.close()
        for client in self._also_close:
            client.close()


def client_options(timeout: float, tls_ca_file: str | None) -> dict[str, Any]:
    """What every client of the store is built with, one server's or a cluster's."""
    return {
        "decode_responses": True,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "health_check_interval": 30,
        # No retries inside the client (redis-py's defaults differ between its
        # constructors and versions): the guard retries, counts and holds, and must learn
        # of an outage at once. The cluster store retries redirects itself.
        "retry": Retry(NoBackoff(), 0),
        **({"ssl_ca_certs": tls_ca_file} if tls_ca_file else {}),
    }


def redis_call(operation: Callable[[], T]) -> T:
    """``operation()``, its Redis errors raised as ``StoreUnavailable``."""
    try:
        return operation()
    except redis.RedisError as exc:
        raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc


def read_eviction_policy(client: redis.Redis) -> str | None:
    """The server's maxmemory-policy; None if CONFIG is disabled or not granted to this
    user (managed Redis)."""
    try:
        policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
    except redis.ResponseError:
        return None
    return None if policy is None else str(policy)
