"""The Redis Cluster dedup store: the same records and scripts as on one Redis, spread
over the cluster's primaries.

A script may only touch keys of one hash slot, so ids are spread over ``BUCKETS``
buckets, each a hash tag: an id's record key is ``<prefix>:{<tag>}:<id>``, its bucket
chosen by a CRC-32 of the id. The tags are picked so that the buckets' slots are evenly
spaced over the 16384 slots, and so over the primaries however the slots are split. A
batch costs one script call per bucket it touches, sent in one pipeline per primary:
one round trip per primary, not per id.

The scripts declare their keys. That is what lets Redis refuse a call while a slot
migrates (ASK, TRYAGAIN) rather than run it on a node where some of the records have
already left, which would take a migrated record for an absent one.

Redirects (MOVED, ASK), TRYAGAIN, CLUSTERDOWN, an empty script cache on a promoted
replica (NOSCRIPT) and connection errors while a primary fails over are retried here
for about one client timeout, following the new slot owners; past that the call fails
with ``StoreUnavailable``, and the worker holds still as it does for a standalone
outage. A repeated script is safe: each re-reads its records and checks the owner token.

Changing ``BUCKETS`` or the tag algorithm moves every id to another key, which forgets
the dedup window: like a new key prefix.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
import zlib
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from worker.dedup.base import Attempts, Claim, Completion, Forgotten, Inspection, State
from worker.dedup.redis import (
    NOT_DURABLE,
    Durability,
    client_options,
    read_eviction_policy,
    redis_call,
)
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

BUCKETS = 16
"""Hash-tag buckets: see the module's docstring and the README before changing it."""

SLOTS = 16384


def bucket_tags(buckets: int = BUCKETS) -> list[str]:
    """One hash tag per bucket, bucket ``b``'s in the ``b``-th of ``buckets`` equal
    slot ranges: the first ``b.<n>`` that lands there."""
    tags = []
    for bucket in range(buckets):
        low, high = bucket * SLOTS // buckets, (bucket + 1) * SLOTS // buckets
        tag = next(
            t for n in range(1_000_000) if low <= key_slot((t := f"{bucket}.{n}").encode()) < high
        )
        tags.append(tag)
    return tags


@dataclass(slots=True)
class _Call:
    """One script call, on the keys of one slot."""

    script: str
    slot: int
    keys: list[str]
    args: list[Any]


_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError, NoScriptError)
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, SlotNotCoveredError)
_TOPOLOGY_CHANGED = (*_UNREACHABLE, ClusterDownError)
_DURABLE = (CLAIM, COMPLETE, EPOCH, SEQUENCE_CLAIM, SEQUENCE_COMPLETE)
"""The calls that wait for ``redis.min_replicas`` replicas: the writes the worker relies
on, and the epoch check that tells ``/readyz`` whether the store can take them."""


class RedisClusterDedupStore:
    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        key_prefix: str,
        *,
        timeout: float = 2.0,
        durability: Durability = NOT_DURABLE,
    ) -> None:
        """``connect`` builds the client, which asks a node for the cluster's layout: it
        is called at first use (and again after a failure), so that a worker started
        while the cluster is down holds and retries like any store outage."""
        self._connect = connect
        self._connected: RedisCluster | None = None
        self._connecting = threading.Lock()
        self._durability = durability
        self._timeout = timeout
        self._prefix = key_prefix
        self._tags = bucket_tags()
        self._slots = [key_slot(tag.encode()) for tag in self._tags]
        self._bucket_prefixes = [f"{key_prefix}:{{{tag}}}:" for tag in self._tags]
        self._position_prefixes = [f"{key_prefix}={{{tag}}}:" for tag in self._tags]
        self._scripts = {
            text: hashlib.sha1(text.encode()).hexdigest()
            for text in (
                CLAIM,
                BEGIN,
                COMPLETE,
                RELEASE,
                RENEW,
                STATE,
                EPOCH,
                INSPECT,
                FORGET,
                FORGETS,
                SEQUENCE_CLAIM,
                SEQUENCE_COMPLETE,
            )
        }

    @classmethod
    def from_url(
        cls,
        url: str,
        key_prefix: str,
        *,
        timeout: float = 2.0,
        tls_ca_file: str | None = None,
        durability: Durability = NOT_DURABLE,
    ) -> RedisClusterDedupStore:
        def connect() -> RedisCluster:
            return RedisCluster.from_url(url, **client_options(timeout, tls_ca_file))

        return cls(connect, key_prefix, timeout=timeout, durability=durability)

    @property
    def _client(self) -> RedisCluster:
        if self._connected is None:
            with self._connecting:
                if self._connected is None:
                    try:
                        self._connected = redis_call(self._connect)
                    except RedisClusterException as exc:  # no node answered
                        raise StoreUnavailable(f"redis cluster: {exc}") from exc
        return self._connected

    def _bucket(self, id: str) -> int:
        return zlib.crc32(id.encode()) % len(self._tags)

    def _by_bucket(self, ids: Sequence[str]) -> dict[int, list[int]]:
        """Indexes of ``ids`` grouped by bucket."""
        buckets: dict[int, list[int]] = defaultdict(list)
        for index, id in enumerate(ids):
            buckets[self._bucket(id)].append(index)
        return buckets

    # -- the store -------------------------------------------------------------------

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        args = ["", token, ms(lease_seconds), RUNS_TTL_SECONDS, ""]
        replies = self._per_id(CLAIM, ids, lambda indexes: args)
        return [parse_claim(reply) for reply in replies]

    def claim_positions(
        self, entities: Sequence[tuple[str, int]], token: str, lease_seconds: float
    ) -> list[Claim]:
        def args(indexes: list[int]) -> list[Any]:
            sequences = pack([str(entities[i][1]) for i in indexes])
            return [token, ms(lease_seconds), RUNS_TTL_SECONDS, sequences]

        keys = [entity for entity, _ in entities]
        replies = self._per_id(SEQUENCE_CLAIM, keys, args, positions=True)
        return [parse_position_claim(reply) for reply in replies]

    def begin(self, id: str, token: str) -> int:
        return int(self._one(BEGIN, id, [token, RUNS_TTL_SECONDS]))

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        ids, entities = split_completions(completions)

        def args(indexes: list[int]) -> list[Any]:
            fields = [
                field
                for c in (completions[ids[i]] for i in indexes)
                for field in (c.id, c.token, c.origin, c.fingerprint, c.reply)
            ]
            return ["", ttl_seconds, pack(fields)]

        def position_args(indexes: list[int]) -> list[Any]:
            raised = (completions[entities[i]] for i in indexes)
            return [
                position_ttl_seconds or "",
                pack([f for c in raised for f in (c.token, str(c.sequence))]),
            ]

        done: dict[int, bool] = {}
        if ids:
            replies = self._per_id(COMPLETE, [completions[i].id for i in ids], args)
            done.update(zip(ids, map(bool, replies), strict=True))
        if entities:
            keys = [completions[i].id for i in entities]
            replies = self._per_id(SEQUENCE_COMPLETE, keys, position_args, positions=True)
            done.update(zip(entities, map(bool, replies), strict=True))
        return [done[i] for i in range(len(completions))]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        _, calls = self._calls(RELEASE, ids, lambda indexes: [token, attempts, RUNS_TTL_SECONDS])
        return sum(int(reply) for reply in self._execute(calls))

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        args = [token, ms(lease_seconds), RUNS_TTL_SECONDS]
        return [bool(reply) for reply in self._per_id(RENEW, ids, lambda indexes: args)]

    def epoch(self, candidate: str) -> str:
        """Every bucket has a marker, so that a primary that lost its records (an empty
        replica promoted, a restart without persistence) shows as a changed epoch."""
        calls = [
            _Call(EPOCH, slot, [f"{self._prefix}#epoch:{{{tag}}}"], [candidate])
            for tag, slot in zip(self._tags, self._slots, strict=True)
        ]
        markers = [str(marker) for marker in self._execute(calls)]
        return markers[0] if len(set(markers)) == 1 else ",".join(markers)

    def state(self, id: str) -> State:
        return parse_state(self._one(STATE, id, []))

    def inspect(self, id: str) -> Inspection:
        return parse_inspection(self._one(INSPECT, id, []))

    def forget(self, ids: Sequence[str], force: bool) -> list[Forgotten]:
        found = self._per_id(FORGET, ids, lambda indexes: ["force" if force else ""])
        self._execute([self._forgets_call("incr")])
        return [str(state) for state in found]  # type: ignore[misc]

    def forgets(self) -> int:
        return int(self._execute([self._forgets_call("")])[0])

    def _forgets_call(self, action: str) -> _Call:
        """The forget counter lives beside the first bucket's epoch marker."""
        key = f"{self._prefix}#forgets:{{{self._tags[0]}}}"
        return _Call(FORGETS, self._slots[0], [key], [action])

    def eviction_policy(self) -> str | None:
        """The first primary's policy that is not ``noeviction``, else ``noeviction``;
        None if a primary's cannot be read."""
        policies = [
            redis_call(partial(read_eviction_policy, connection))
            for connection in self._primary_connections()
        ]
        if None in policies:
            return None
        return next((p for p in policies if p != "noeviction"), "noeviction")

    def ping(self) -> None:
        for connection in self._primary_connections():
            redis_call(connection.ping)

    def close(self) -> None:
        if self._connected is None:
            return
        # RedisCluster.close() leaves the pools it was given open (redis-py 8.1).
        client: Any = self._connected
        for node in client.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
        self._connected.close()

    # -- calls spread over the primaries ---------------------------------------------

    def _one(self, script: str, id: str, args: list[Any]) -> Any:
        return self._execute(self._calls(script, [id], lambda indexes: args)[1])[0]

    def _calls(
        self,
        script: str,
        ids: Sequence[str],
        args: Callable[[list[int]], list[Any]],
        positions: bool = False,
    ) -> tuple[list[list[int]], list[_Call]]:
        """``script`` once per bucket over its ids' keys (with ``positions``, the
        entities' claim keys, then their position keys), ``args(indexes)`` its ARGV;
        with each call, the indexes in ``ids`` of its keys."""
        groups = list(self._by_bucket(ids).items())
        calls = []
        for bucket, indexes in groups:
            keys = [self._bucket_prefixes[bucket] + ids[i] for i in indexes]
            if positions:
                keys += [self._position_prefixes[bucket] + ids[i] for i in indexes]
            calls.append(_Call(script, self._slots[bucket], keys, args(indexes)))
        return [ix for _, ix in groups], calls

    def _per_id(
        self,
        script: str,
        ids: Sequence[str],
        args: Callable[[list[int]], list[Any]],
        positions: bool = False,
    ) -> list[Any]:
        """The per-id replies of ``script`` over ``ids`` (see ``_calls``), in their order."""
        indexes, calls = self._calls(script, ids, args, positions)
        replies: list[Any] = [None] * len(ids)
        for call_indexes, reply in zip(indexes, self._execute(calls), strict=True):
            for index, value in zip(call_indexes, reply, strict=True):
                replies[index] = value
        return replies

    def _execute(self, calls: list[_Call]) -> list[Any]:
        """Each call's reply, the calls sent in one pipeline per primary, and retried
        while the cluster redirects or fails over (see the module's docstring)."""
        replies: list[Any] = [None] * len(calls)
        asking: dict[int, ClusterNode] = {}  # call -> the node an ASK sent it to
        pending = list(range(len(calls)))
        deadline = time.monotonic() + self._timeout
        pause = 0.01
        while True:
            pending, error = self._round(calls, pending, asking, replies)
            if not pending:
                return replies
            if time.monotonic() > deadline:
                raise StoreUnavailable(f"redis cluster: {type(error).__name__}: {error}") from error
            if isinstance(error, _TOPOLOGY_CHANGED):
                self._refresh()
            if isinstance(error, (*_TOPOLOGY_CHANGED, TryAgainError)):
                time.sleep(pause)
                pause = min(pause * 2, 0.2)

    def _round(
        self,
        calls: list[_Call],
        pending: list[int],
        asking: dict[int, ClusterNode],
        replies: list[Any],
    ) -> tuple[list[int], Exception | None]:
        """Send the ``pending`` calls, one pipeline per node, and store their replies;
        the calls to send again, and the last error met."""
        retry: list[int] = []
        error: Exception | None = None
        by_node: dict[ClusterNode, list[int]] = defaultdict(list)
        asked = {index: asking.pop(index) for index in pending if index in asking}
        for index in pending:
            try:
                by_node[asked.get(index) or self._primary(calls[index].slot)].append(index)
            except SlotNotCoveredError as exc:
                error = exc
                retry.append(index)
        for node, indexes in by_node.items():
            try:
                results = self._send(node, [(calls[i], i in asked) for i in indexes])
            except _UNREACHABLE as exc:
                error = exc
                retry += indexes
                continue
            for index, result in zip(indexes, results, strict=True):
                if not isinstance(result, Exception):
                    replies[index] = result
                    continue
                if not isinstance(result, _REDIRECTS):
                    raise StoreUnavailable(f"redis cluster: {result}") from result
                error = result
                retry.append(index)
                if isinstance(result, MovedError):
                    self._client.nodes_manager.move_slot(result)
                elif isinstance(result, AskError):
                    asking[index] = self._node(result.host, result.port)
                elif isinstance(result, NoScriptError):
                    self._load(node, calls[index].script)
        return retry, error

    def _send(self, node: ClusterNode, calls: list[tuple[_Call, bool]]) -> list[Any]:
        """The calls' replies from ``node``; a call marked True follows an ASK redirect,
        so it goes after an ASKING (whose reply is dropped)."""
        pipe: Any = self._client.get_redis_connection(node).pipeline(transaction=False)
        for call, after_ask in calls:
            if after_ask:
                pipe.execute_command("ASKING")
            sha = self._scripts[call.script]
            pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
        durable = self._durability.min_replicas and any(c.script in _DURABLE for c, _ in calls)
        if durable:  # on this connection: WAIT covers the writes made through it
            pipe.execute_command("WAIT", self._durability.min_replicas, self._durability.timeout_ms)
        results = list(pipe.execute(raise_on_error=False))
        if durable:
            acknowledged = results.pop()
            # Only writes that went through need their replicas: a node that redirected
            # every call (a primary demoted meanwhile) may refuse WAIT, and that is fine.
            if any(not isinstance(result, Exception) for result in results):
                if isinstance(acknowledged, Exception):
                    raise StoreUnavailable(f"redis cluster: WAIT: {acknowledged}") from acknowledged
                self._durability.check(int(acknowledged))
        replies = []
        for _, after_ask in calls:
            if after_ask:
                results.pop(0)  # ASKING's OK
            replies.append(results.pop(0))
        return replies

    def _primary_connections(self) -> list[redis.Redis]:
        client: Any = self._client
        return [client.get_redis_connection(node) for node in client.get_primaries()]

    def _primary(self, slot: int) -> ClusterNode:
        return self._client.nodes_manager.get_node_from_slot(slot)

    def _node(self, host: str, port: int) -> ClusterNode:
        client: Any = self._client
        node: ClusterNode | None = client.get_node(host=host, port=port)
        return node if node is not None else ClusterNode(host, port)  # type: ignore[no-untyped-call]

    def _load(self, node: ClusterNode, script: str) -> None:
        self._client.get_redis_connection(node).script_load(script)

    def _refresh(self) -> None:
        # No node answering is not an error here: the next round tries again, then the guard.
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            self._client.nodes_manager.initialize()
