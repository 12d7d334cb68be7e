"""The Redis Cluster store's calls: each a script on the keys of one slot, sent in one
pipeline per primary, and retried while the cluster redirects or fails over (see
idempotent_worker/dedup/cluster.py)."""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)

from idempotent_worker.dedup.redis import Durability, redis_call
from idempotent_worker.errors import StoreUnavailable


@dataclass(slots=True)
class Call:
    """One script call, on the keys of one slot."""

    script: str
    slot: int
    keys: list[str]
    args: list[Any]


_REDIRECTS = (MovedError, AskError, TryAgainError, ClusterDownError, NoScriptError)
_UNREACHABLE = (redis.ConnectionError, redis.TimeoutError, SlotNotCoveredError)
_TOPOLOGY_CHANGED = (*_UNREACHABLE, ClusterDownError)


class ClusterCalls:
    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        scripts: Iterable[str],
        durable: Iterable[str],
        timeout: float,
        durability: Durability,
    ) -> None:
        """``connect`` builds the client, which asks a node for the cluster's layout: it
        is called at first use (and again after a failure), so that a worker started
        while the cluster is down holds and retries like any store outage. Calls of the
        ``durable`` scripts wait for ``redis.min_replicas`` replicas."""
        self._connect = connect
        self._connected: RedisCluster | None = None
        self._connecting = threading.Lock()
        self._scripts = {text: hashlib.sha1(text.encode()).hexdigest() for text in scripts}
        self._durable = frozenset(durable)
        self._timeout = timeout
        self._durability = durability

    @property
    def client(self) -> RedisCluster:
        if self._connected is None:
            with self._connecting:
                if self._connected is None:
                    try:
                        self._connected = redis_call(self._connect)
                    except RedisClusterException as exc:  # no node answered
                        raise StoreUnavailable(f"redis cluster: {exc}") from exc
        return self._connected

    def close(self) -> None:
        if self._connected is None:
            return
        # RedisCluster.close() leaves the pools it was given open (redis-py 8.1).
        client: Any = self._connected
        for node in client.get_nodes():
            if node.redis_connection is not None:
                node.redis_connection.connection_pool.disconnect()
        self._connected.close()

    def execute(self, calls: list[Call]) -> list[Any]:
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
        calls: list[Call],
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
                    self.client.nodes_manager.move_slot(result)
                elif isinstance(result, AskError):
                    asking[index] = self._node(result.host, result.port)
                elif isinstance(result, NoScriptError):
                    self._load(node, calls[index].script)
        return retry, error

    def _send(self, node: ClusterNode, calls: list[tuple[Call, bool]]) -> list[Any]:
        """The calls' replies from ``node``; a call marked True follows an ASK redirect,
        so it goes after an ASKING (whose reply is dropped)."""
        pipe: Any = self.client.get_redis_connection(node).pipeline(transaction=False)
        for call, after_ask in calls:
            if after_ask:
                pipe.execute_command("ASKING")
            sha = self._scripts[call.script]
            pipe.execute_command("EVALSHA", sha, len(call.keys), *call.keys, *call.args)
        durable = self._durability.min_replicas and any(c.script in self._durable for c, _ in calls)
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

    def primary_connections(self) -> list[redis.Redis]:
        client: Any = self.client
        return [client.get_redis_connection(node) for node in client.get_primaries()]

    def _primary(self, slot: int) -> ClusterNode:
        return self.client.nodes_manager.get_node_from_slot(slot)

    def _node(self, host: str, port: int) -> ClusterNode:
        client: Any = self.client
        node: ClusterNode | None = client.get_node(host=host, port=port)
        return node if node is not None else ClusterNode(host, port)  # type: ignore[no-untyped-call]

    def _load(self, node: ClusterNode, script: str) -> None:
        self.client.get_redis_connection(node).script_load(script)

    def _refresh(self) -> None:
        # No node answering is not an error here: the next round tries again, then the guard.
        with contextlib.suppress(redis.RedisError, RedisClusterException):
            self.client.nodes_manager.initialize()
