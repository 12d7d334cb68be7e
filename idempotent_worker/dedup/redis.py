"""The Redis dedup store: records kept as fields of a few hashes, every transition one
Lua script.

A record is named by its message id (a sequence route's claim by ``<topic>\x1f<entity>``)
and lives in a *window*: a hash ``<prefix>/<expiry in ms>`` that takes the records
written during a quarter of the dedup TTL and expires as a whole, 1.25 TTLs after it was
opened, so every record lives between one and 1.25 TTLs. ``<prefix>#windows`` indexes
the live windows by expiry (about five); a window keeps a sentinel field (0x1f) until it
expires, so that one missing while listed is on its way to another Cluster node (the
scripts answer TRYAGAIN), or, on one Redis, was evicted or deleted: it leaves the index
and the epoch key is deleted with it, so that every replica counts a store reset. A
claim looks for its ids in each window, newest first, with one ``HMGET`` per window;
claims and completions are written with one variadic ``HSET``. A completion overwrites
its claim in place. What the values hold is described in ``idempotent_worker/dedup/encoding.py``;
a completed record takes about 108 bytes of Redis memory with 18-character ids, against
246 for the previous layout's key per id.

The previous layout (one key ``<prefix>:<id>`` per record) is read for as long as its
records may live after the first epoch check of this layout on the store (see EPOCH in
idempotent_worker/dedup/scripts.py), so a rolling upgrade honours what the old version completed or
holds; the new version never writes it. A sequence route's positions are keys of their
own, ``<prefix>=<topic>\x1f<entity>``.

A whole poll batch is claimed in one script call, and completions are written in groups,
so dedup costs two round trips per group of messages.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from idempotent_worker.dedup.base import Attempts, Claim, Completion, Forgotten, Inspection, State
from idempotent_worker.dedup.encoding import RecordCodec, parse_position_claim
from idempotent_worker.dedup.lua import pack
from idempotent_worker.dedup.scripts import (
    BEGIN,
    CLAIM,
    COMPLETE,
    DEFAULT_TTL_SECONDS,
    EPOCH,
    FORGET,
    FORGETS,
    INSPECT,
    RELEASE,
    RENEW,
    SEQUENCE_CLAIM,
    SEQUENCE_COMPLETE,
    TOPICS,
    legacy_horizon_ms,
    ms,
    split_completions,
)
from idempotent_worker.errors import StoreUnavailable


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
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
    ) -> None:
        """``ttl_seconds`` is the dedup TTL the worker completes with: claims are written
        into the windows its completions will use."""
        self._client = client
        self._also_close = also_close
        self._durability = durability
        self._ttl = ttl_seconds
        self._base = key_prefix
        self._index = [key_prefix + "#windows"]
        self._epoch_key = key_prefix + "#epoch"
        self._forgets_key = key_prefix + "#forgets"
        self._topics_key = key_prefix + "#topics"
        self._positions = key_prefix + "="
        self._codec = RecordCodec(self._topics)
        self._scripts = {
            name: client.register_script(text)
            for name, text in [
                ("claim", CLAIM), ("complete", COMPLETE), ("release", RELEASE),
                ("renew", RENEW), ("begin", BEGIN), ("epoch", EPOCH), ("inspect", INSPECT),
                ("forget", FORGET), ("forgets", FORGETS), ("topics", TOPICS),
                ("claim_positions", SEQUENCE_CLAIM), ("complete_positions", SEQUENCE_COMPLETE),
            ]
        }  # fmt: skip

    @classmethod
    def from_url(
        cls,
        url: str,
        key_prefix: str,
        *,
        timeout: float = 2.0,
        tls_ca_file: str | None = None,
        durability: Durability = NOT_DURABLE,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
    ) -> RedisDedupStore:
        client = redis.Redis.from_url(url, **client_options(timeout, tls_ca_file))
        return cls(client, key_prefix, durability, ttl_seconds=ttl_seconds)

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
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
    ) -> RedisDedupStore:
        """A store on the primary the Sentinels know as ``master``; ``url`` gives only the
        scheme, the credentials and the database. A connection to the primary that fails
        asks the Sentinels again, so the store follows a failover by itself (meanwhile
        its calls fail, and the guard holds as for any outage)."""
        parts = urlsplit(url)
        tls = parts.scheme == "rediss"
        sentinel_options = client_options(timeout, tls_ca_file if sentinel_tls else None)
        del sentinel_options["decode_responses"]  # redis-py parses the Sentinels' replies
        sentinel: Any = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
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
        master_client = sentinel.master_for(master)
        return cls(master_client, key_prefix, durability, sentinel.sentinels, ttl_seconds)

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        if not ids:
            return []
        args = [self._base, token, ms(lease_seconds), self._ttl, pack(ids)]
        replies: list[str] = self._durable("claim", args)
        return self._codec.claims(replies)

    def claim_positions(
        self, entities: Sequence[tuple[str, int]], token: str, lease_seconds: float
    ) -> list[Claim]:
        if not entities:
            return []
        keys = self._index + [self._positions + entity for entity, _ in entities]
        fields = [f for entity, sequence in entities for f in (entity, str(sequence))]
        args = [self._base, token, ms(lease_seconds), self._ttl, *fields]
        replies: list[str] = self._durable("claim_positions", args, keys)
        return [parse_position_claim(reply) for reply in replies]

    def _durable(self, script: str, args: list[Any], keys: list[str] | None = None) -> Any:
        """``script``'s reply, once ``redis.min_replicas`` replicas have its writes."""
        run, keys = self._scripts[script], keys or self._index
        if not self._durability.min_replicas:
            return redis_call(lambda: run(keys=keys, args=args))

        def write_and_wait() -> list[Any]:
            pipe: Any = self._client.pipeline(transaction=False)
            run(keys=keys, args=args, client=pipe)
            pipe.execute_command("WAIT", self._durability.min_replicas, self._durability.timeout_ms)
            return list(pipe.execute())

        reply, acknowledged = redis_call(write_and_wait)
        self._durability.check(int(acknowledged))
        return reply

    def _call(self, script: str, args: list[Any], keys: list[str] | None = None) -> Any:
        run = self._scripts[script]
        return redis_call(lambda: run(keys=keys or self._index, args=args))

    def _topics(self, new: Mapping[str, str]) -> dict[str, str]:
        """Register ``new`` topics by short hash (unless taken); every one the store names."""
        args = [f for pair in new.items() for f in pair]
        known = self._call("topics", args, [self._topics_key])
        return dict(zip(known[::2], known[1::2], strict=True))

    def begin(self, id: str, token: str) -> int:
        return int(self._call("begin", [self._base, id, token]))

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        ids, entities = split_completions(completions)
        done: dict[int, bool] = {}
        if ids:
            completed = [completions[i] for i in ids]
            records = self._codec.records(completed)
            fields = [
                f for c, r in zip(completed, records, strict=True) for f in (c.id, c.token, r)
            ]
            args: list[Any] = [self._base, ttl_seconds, pack(fields)]
            done.update(zip(ids, map(bool, self._durable("complete", args)), strict=True))
        if entities:
            raised = [completions[i] for i in entities]
            keys = self._index + [self._positions + c.id for c in raised]
            fields = [f for c in raised for f in (c.id, c.token, str(c.sequence))]
            args = [self._base, position_ttl_seconds or "", *fields]
            replies = self._durable("complete_positions", args, keys)
            done.update(zip(entities, map(bool, replies), strict=True))
        return [done[i] for i in range(len(completions))]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        if not ids:
            return 0
        return int(self._call("release", [self._base, token, attempts, *ids]))

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        if not ids:
            return []
        replies = self._call("renew", [self._base, token, ms(lease_seconds), *ids])
        return [bool(reply) for reply in replies]

    def epoch(self, candidate: str) -> str:
        """Waits for ``redis.min_replicas`` too: the check also tells ``/readyz`` whether
        the store can take the worker's writes, and without its replicas it cannot."""
        keys = [self._epoch_key, *self._index]
        return str(self._durable("epoch", [candidate, legacy_horizon_ms(self._ttl)], keys))

    def state(self, id: str) -> State:
        return self.inspect(id).state

    def inspect(self, id: str) -> Inspection:
        return self._codec.inspection(self._call("inspect", [self._base, id]))

    def forget(self, ids: Sequence[str], force: bool) -> list[Forgotten]:
        found = self._call("forget", [self._base, "force" if force else "", *ids])
        self._call("forgets", ["incr"], [self._forgets_key])
        return [str(state) for state in found]  # type: ignore[misc]

    def forgets(self) -> int:
        return int(self._call("forgets", [""], [self._forgets_key]))

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
        "socket_keepalive": True,  # a half-open connection is found by the kernel too
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
