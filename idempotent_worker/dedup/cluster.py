"""The Redis Cluster dedup store: the same records and scripts as on one Redis, spread
over the cluster's primaries.

A script may only touch keys of one hash slot, so ids are spread over ``BUCKETS``
buckets, each a hash tag: a bucket's windows are ``<prefix>:{<tag>}/<expiry>``, listed
in ``<prefix>:{<tag>}#windows``, an id's bucket chosen by a CRC-32 of the id. The tags
are picked so that the buckets' slots are evenly spaced over the 16384 slots, and so
over the primaries however the slots are split. A batch costs one script call per
primary (its buckets' calls grouped: dedup/cluster_calls.py), one round trip per
primary, not per id.

The scripts declare the bucket's index (and a sequence route's position keys); the
windows they read share its slot. While a slot migrates, the index and the windows can
sit on different nodes for a moment: Redis refuses a call whose index has left (ASK,
TRYAGAIN) and a script that reaches for a key that has left ("non local key"), and a
script that finds a listed window missing answers TRYAGAIN itself (idempotent_worker/dedup/lua.py),
rather than take a migrated record for an absent one.

Redirects (MOVED, ASK), TRYAGAIN, CLUSTERDOWN, an empty script cache on a promoted
replica (NOSCRIPT) and connection errors while a primary fails over are retried for
about one client timeout (idempotent_worker/dedup/cluster_calls.py), following the new slot
owners; past that the call fails with ``StoreUnavailable``, and the worker holds still
as it does for a standalone outage. A repeated script is safe: each re-reads its records
and checks the owner token.

Changing ``BUCKETS`` or the tag algorithm moves every id to another key, which forgets
the dedup window: like a new key prefix.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from redis.cluster import RedisCluster
from redis.crc import key_slot

from idempotent_worker.dedup.base import Attempts, Claim, Completion, Forgotten, Inspection, State
from idempotent_worker.dedup.cluster_calls import Call, ClusterCalls
from idempotent_worker.dedup.encoding import RecordCodec, parse_position_claim
from idempotent_worker.dedup.lua import pack
from idempotent_worker.dedup.redis import (
    NOT_DURABLE,
    Durability,
    client_options,
    read_eviction_policy,
    redis_call,
)
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


class RedisClusterDedupStore:
    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        key_prefix: str,
        *,
        timeout: float = 2.0,
        durability: Durability = NOT_DURABLE,
        ttl_seconds: int = DEFAULT_TTL_SECONDS,
    ) -> None:
        """``connect`` builds the cluster client (see ``ClusterCalls``); ``ttl_seconds``
        as for ``RedisDedupStore``."""
        self._prefix = key_prefix
        self._ttl = ttl_seconds
        self._codec = RecordCodec(self._topics)
        self._tags = bucket_tags()
        self._slots = [key_slot(tag.encode()) for tag in self._tags]
        self._bases = [f"{key_prefix}:{{{tag}}}" for tag in self._tags]
        self._position_prefixes = [f"{key_prefix}={{{tag}}}:" for tag in self._tags]
        scripts = [
            CLAIM, BEGIN, COMPLETE, RELEASE, RENEW, EPOCH, INSPECT, FORGET, FORGETS, TOPICS,
            SEQUENCE_CLAIM, SEQUENCE_COMPLETE,
        ]  # fmt: skip
        # The writes the worker relies on, and the epoch check that tells /readyz whether
        # the store can take them, wait for redis.min_replicas replicas.
        durable = [CLAIM, COMPLETE, EPOCH, SEQUENCE_CLAIM, SEQUENCE_COMPLETE]
        # The scripts on a bucket's index go grouped by primary (see cluster_calls.py).
        groupable = [
            CLAIM, COMPLETE, RELEASE, RENEW, FORGET, SEQUENCE_CLAIM, SEQUENCE_COMPLETE
        ]  # fmt: skip
        self._calls_to = ClusterCalls(connect, scripts, durable, timeout, durability, groupable)

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
    ) -> RedisClusterDedupStore:
        def connect() -> RedisCluster:
            return RedisCluster.from_url(url, **client_options(timeout, tls_ca_file))

        return cls(
            connect, key_prefix, timeout=timeout, durability=durability, ttl_seconds=ttl_seconds
        )

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
        def args(indexes: list[int], base: str) -> list[Any]:
            return [base, token, ms(lease_seconds), self._ttl, pack([ids[i] for i in indexes])]

        return self._codec.claims(self._per_id(CLAIM, ids, args))

    def claim_positions(
        self, entities: Sequence[tuple[str, int]], token: str, lease_seconds: float
    ) -> list[Claim]:
        def args(indexes: list[int], base: str) -> list[Any]:
            fields = [f for i in indexes for f in (entities[i][0], str(entities[i][1]))]
            return [base, token, ms(lease_seconds), self._ttl, *fields]

        names = [entity for entity, _ in entities]
        replies = self._per_id(SEQUENCE_CLAIM, names, args, positions=True)
        return [parse_position_claim(reply) for reply in replies]

    def begin(self, id: str, token: str) -> int:
        return int(self._one(BEGIN, id, lambda base: [base, id, token]))

    def complete(
        self,
        completions: Sequence[Completion],
        ttl_seconds: int,
        position_ttl_seconds: int | None = None,
    ) -> list[bool]:
        ids, entities = split_completions(completions)
        completed = [completions[i] for i in ids]
        records = self._codec.records(completed) if ids else []

        def args(indexes: list[int], base: str) -> list[Any]:
            fields = [f for i in indexes for f in (completed[i].id, completed[i].token, records[i])]
            return [base, ttl_seconds, pack(fields)]

        def position_args(indexes: list[int], base: str) -> list[Any]:
            raised = (completions[entities[i]] for i in indexes)
            fields = [f for c in raised for f in (c.id, c.token, str(c.sequence))]
            return [base, position_ttl_seconds or "", *fields]

        done: dict[int, bool] = {}
        if ids:
            replies = self._per_id(COMPLETE, [c.id for c in completed], args)
            done.update(zip(ids, map(bool, replies), strict=True))
        if entities:
            names = [completions[i].id for i in entities]
            replies = self._per_id(SEQUENCE_COMPLETE, names, position_args, positions=True)
            done.update(zip(entities, map(bool, replies), strict=True))
        return [done[i] for i in range(len(completions))]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        def args(indexes: list[int], base: str) -> list[Any]:
            return [base, token, attempts, *(ids[i] for i in indexes)]

        _, calls = self._calls(RELEASE, ids, args)
        return sum(int(reply) for reply in self._calls_to.execute(calls))

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        def args(indexes: list[int], base: str) -> list[Any]:
            return [base, token, ms(lease_seconds), *(ids[i] for i in indexes)]

        return [bool(reply) for reply in self._per_id(RENEW, ids, args)]

    def epoch(self, candidate: str) -> str:
        """Every bucket has a marker, so that a primary that lost its records (an empty
        replica promoted, a restart without persistence) shows as a changed epoch."""
        calls = [
            Call(
                EPOCH,
                slot,
                [f"{self._prefix}#epoch:{{{tag}}}", f"{base}#windows"],
                [candidate, legacy_horizon_ms(self._ttl)],
            )
            for tag, slot, base in zip(self._tags, self._slots, self._bases, strict=True)
        ]
        markers = [str(marker) for marker in self._calls_to.execute(calls)]
        return markers[0] if len(set(markers)) == 1 else ",".join(markers)

    def state(self, id: str) -> State:
        return self.inspect(id).state

    def inspect(self, id: str) -> Inspection:
        return self._codec.inspection(self._one(INSPECT, id, lambda base: [base, id]))

    def forget(self, ids: Sequence[str], force: bool) -> list[Forgotten]:
        def args(indexes: list[int], base: str) -> list[Any]:
            return [base, "force" if force else "", *(ids[i] for i in indexes)]

        found = self._per_id(FORGET, ids, args)
        self._calls_to.execute([self._first_bucket_call(FORGETS, "#forgets", ["incr"])])
        return [str(state) for state in found]  # type: ignore[misc]

    def forgets(self) -> int:
        return int(self._calls_to.execute([self._first_bucket_call(FORGETS, "#forgets", [""])])[0])

    def _topics(self, new: Mapping[str, str]) -> dict[str, str]:
        """As ``RedisDedupStore._topics``."""
        args = [f for pair in new.items() for f in pair]
        [known] = self._calls_to.execute([self._first_bucket_call(TOPICS, "#topics", args)])
        return dict(zip(known[::2], known[1::2], strict=True))

    def _first_bucket_call(self, script: str, name: str, args: list[Any]) -> Call:
        """The forget counter and the topic names live beside the first bucket's epoch
        marker."""
        return Call(script, self._slots[0], [f"{self._prefix}{name}:{{{self._tags[0]}}}"], args)

    def eviction_policy(self) -> str | None:
        """The first primary's policy that is not ``noeviction``, else ``noeviction``;
        None if a primary's cannot be read."""
        policies = [
            redis_call(partial(read_eviction_policy, connection))
            for connection in self._calls_to.primary_connections()
        ]
        if None in policies:
            return None
        return next((p for p in policies if p != "noeviction"), "noeviction")

    def ping(self) -> None:
        for connection in self._calls_to.primary_connections():
            redis_call(connection.ping)

    def close(self) -> None:
        self._calls_to.close()

    # -- calls spread over the primaries ---------------------------------------------

    def _one(self, script: str, id: str, args: Callable[[str], list[Any]]) -> Any:
        return self._calls_to.execute(self._calls(script, [id], lambda _, b: args(b))[1])[0]

    def _calls(
        self,
        script: str,
        ids: Sequence[str],
        args: Callable[[list[int], str], list[Any]],
        positions: bool = False,
    ) -> tuple[list[list[int]], list[Call]]:
        """``script`` once per bucket over its ids (with ``positions``, the entities'
        position keys too), ``args(indexes, base)`` its ARGV; with each call, the
        indexes in ``ids`` of its names."""
        groups = list(self._by_bucket(ids).items())
        calls = []
        for bucket, indexes in groups:
            base = self._bases[bucket]
            keys = [f"{base}#windows"]
            if positions:
                keys += [self._position_prefixes[bucket] + ids[i] for i in indexes]
            calls.append(Call(script, self._slots[bucket], keys, args(indexes, base)))
        return [ix for _, ix in groups], calls

    def _per_id(
        self,
        script: str,
        ids: Sequence[str],
        args: Callable[[list[int], str], list[Any]],
        positions: bool = False,
    ) -> list[Any]:
        """The per-id replies of ``script`` over ``ids`` (see ``_calls``), in their order."""
        indexes, calls = self._calls(script, ids, args, positions)
        replies: list[Any] = [None] * len(ids)
        for call_indexes, reply in zip(indexes, self._calls_to.execute(calls), strict=True):
            for index, value in zip(call_indexes, reply, strict=True):
                replies[index] = value
        return replies
