"""The Redis Cluster store's calls: each a script on the keys of one slot, sent in one
pipeline per primary, and retried while the cluster redirects or fails over (see
idempotent_worker/dedup/cluster.py).

A primary's calls of one script on several buckets go as one call of the script's
grouped form (dedup/lua.py: one script run per primary, not per bucket, which is most
of what a bucket costs the cluster). A grouped call refused for any reason (a slot
moving or moved, a window on its way, a script cache emptied by a failover) is sent
again as its buckets' own calls at once, whose redirects are followed one by one as
before; a cluster that cannot run it at all (before Redis 7) gets those from then on."""

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

from idempotent_worker.dedup.lua import grouped
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


def sha1(script: str) -> str:
    return hashlib.sha1(script.encode()).hexdigest()


class ClusterCalls:
    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        scripts: Iterable[str],
        durable: Iterable[str],
        timeout: float,
        durability: Durability,
        groupable: Iterable[str] = (),
    ) -> None:
        """``connect`` builds the client, which asks a node for the cluster's layout: it
        is called at first use (and again after a failure), so that a worker started
        while the cluster is down holds and retries like any store outage. Calls of the
        ``durable`` scripts wait for ``redis.min_replicas`` replicas; those of the
        ``groupable`` ones (scripts on a bucket's index) go grouped by primary."""
        self._connect = connect
        self._connected: RedisCluster | None = None
        self._connecting = threading.Lock()
        self._scripts = {text: sha1(text) for text in scripts}
        self._grouped = {text: grouped(text) for text in groupable}
        """Each groupable script's grouped form (one call for several buckets)."""
        self._scripts.update((text, sha1(text)) for text in self._grouped.values())
        self._grouped_shas = {self._scripts[text] for text in self._grouped.values()}
        self._grouping = bool(self._grouped)
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
        so it goes after an ASKING (whose reply is dropped). A script's calls on several
        buckets go as one grouped call; if that is refused, as their own calls."""
        durable = bool(self._durability.min_replicas) and any(
            call.script in self._durable for call, _ in calls
        )
        commands = self._commands(calls)
        results = self._pipeline(node, [(args, ask) for args, ask, _ in commands], durable)
        replies: list[Any] = [None] * len(calls)
        refused: list[int] = []
        for (args, _, indexes), result in zip(commands, results, strict=True):
            if args[1] not in self._grouped_shas:
                replies[indexes[0]] = result
            elif not isinstance(result, Exception):
                for index, reply in zip(indexes, result, strict=True):
                    replies[index] = reply
            else:
                refused += indexes
                if isinstance(result, NoScriptError):
                    self._load(node, self._grouped[calls[indexes[0]][0].script])
                elif "compiling script" in str(result):  # before Redis 7: no script flags
                    self._grouping = False
        if refused:
            alone = [(self._command(calls[index][0]), False) for index in refused]
            for index, reply in zip(refused, self._pipeline(node, alone, durable), strict=True):
                replies[index] = reply
        return replies

    def _commands(self, calls: list[tuple[Call, bool]]) -> list[tuple[list[Any], bool, list[int]]]:
        """The commands that carry ``calls``: each with whether it follows an ASK, and
        the indexes of its calls. A groupable script's calls not following an ASK go in
        one grouped command (if more than one)."""
        commands: list[tuple[list[Any], bool, list[int]]] = []
        groups: dict[str, list[int]] = defaultdict(list)
        for index, (call, after_ask) in enumerate(calls):
            if self._grouping and call.script in self._grouped and not after_ask:
                groups[call.script].append(index)
            else:
                commands.append((self._command(call), after_ask, [index]))
        for script, indexes in groups.items():
            if len(indexes) == 1:
                commands.append((self._command(calls[indexes[0]][0]), False, indexes))
                continue
            args: list[Any] = [len(indexes)]
            for index in indexes:
                call = calls[index][0]
                args += [len(call.keys), len(call.args), *call.keys, *call.args]
            sha = self._scripts[self._grouped[script]]
            first_index = calls[indexes[0]][0].keys[0]  # routes the call
            commands.append((["EVALSHA", sha, 1, first_index, *args], False, indexes))
        return commands

    def _command(self, call: Call) -> list[Any]:
        return ["EVALSHA", self._scripts[call.script], len(call.keys), *call.keys, *call.args]

    def _pipeline(
        self, node: ClusterNode, commands: list[tuple[list[Any], bool]], durable: bool
    ) -> list[Any]:
        """Each command's reply from ``node`` (an ASKING first for those marked True);
        with ``durable``, then WAIT for ``redis.min_replicas`` replicas."""
        pipe: Any = self.client.get_redis_connection(node).pipeline(transaction=False)
        for args, after_ask in commands:
            if after_ask:
                pipe.execute_command("ASKING")
            pipe.execute_command(*args)
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
        for _, after_ask in commands:
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
