"""The Redis dedup store: one key per message id, every transition one Lua script.

A record is a string value. In progress it is ``p|<token>|<lease end>|<runs>``: the
claim's owner, the end of its lease in Redis's own clock (milliseconds), and how many
runs of the handler began, over every replica; the key lives ``RUNS_TTL_SECONDS``
after its last claim, so that a message that crashes its worker is noticed by
whichever replica claims it next. A claim whose lease ended is free to take. Completed,
it is ``c|<token>|<origin>|<fingerprint>`` with the dedup TTL.

One key and, for a message seen once, three commands: a SET NX at claim, a GET and a
SET at completion. A whole poll batch is claimed in one script call, and completions
are written in groups, so dedup costs two round trips per group of messages.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from worker.dedup.base import (
    BUSY,
    CLAIMED,
    FIRST_CLAIM,
    Attempts,
    Claim,
    ClaimStatus,
    Completion,
    State,
)
from worker.errors import StoreUnavailable

# Shared by every script. The batch scripts take their ids (and per-id fields) packed
# into one argument as "<byte length>:<field>" repeated: one argument instead of
# thousands is most of what a batch costs on the client. On a standalone Redis (or a
# primary with replicas) they build the keys from the prefix they are given; on a
# Cluster the caller declares the keys (KEYS), as Redis must see them to route the call
# and to refuse it while a slot migrates (see worker/dedup/cluster.py).
_COMMON = """
local function unpack(packed)
  local out, pos = {}, 1
  while pos <= #packed do
    local colon = string.find(packed, ':', pos, true)
    local length = tonumber(string.sub(packed, pos, colon - 1))
    out[#out + 1] = string.sub(packed, colon + 1, colon + length)
    pos = colon + length + 1
  end
  return out
end

-- KEYS if the caller declared them, else the prefix joined to each id.
local function record_keys(prefix, ids)
  if #KEYS > 0 then
    return KEYS
  end
  local keys = {}
  for i, id in ipairs(ids) do
    keys[i] = prefix .. id
  end
  return keys
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- An in-progress record's token, lease end and runs; nil for anything else.
local function progress(value)
  if not value then
    return nil
  end
  local token, lease, runs = string.match(value, '^p|([^|]*)|(%d+)|(%d+)$')
  if not token then
    return nil
  end
  return token, tonumber(lease), tonumber(runs)
end

local function in_progress(token, lease, runs)
  return 'p|' .. token .. '|' .. lease .. '|' .. runs
end
"""

# KEYS: the record keys, or none. ARGV: record-key prefix, token, lease in ms, runs TTL
# in s, packed ids (empty with KEYS). Per id: "+1"
# when the caller holds the claim now and this claim counted the id's first run; "?"
# when it holds the claim and runs were counted before; else the record that stops it.
_CLAIM = (
    _COMMON
    + """
local now = now_ms()
local lease = now + tonumber(ARGV[3])
local first = in_progress(ARGV[2], lease, 1)
local out = {}
for i, key in ipairs(record_keys(ARGV[1], unpack(ARGV[5]))) do
  if redis.call('SET', key, first, 'NX', 'EX', ARGV[4]) then
    out[i] = '+1'
  else
    local value = redis.call('GET', key)
    local token, ends, runs = progress(value)
    if token and (token == ARGV[2] or ends <= now) then
      redis.call('SET', key, in_progress(ARGV[2], lease, runs), 'EX', ARGV[4])
      out[i] = '?'
    else
      out[i] = value
    end
  end
end
return out
"""
)

# KEYS: the id's record key. ARGV: token, runs TTL in s. The number of this run (1 for
# the first, over every replica) if the caller holds the claim, else 0.
_BEGIN = (
    _COMMON
    + """
local token, ends, runs = progress(redis.call('GET', KEYS[1]))
if token ~= ARGV[1] or ends <= now_ms() then
  return 0
end
redis.call('SET', KEYS[1], in_progress(token, ends, runs + 1), 'EX', ARGV[2])
return runs + 1
"""
)

# KEYS: the record keys, or none. ARGV: record-key prefix, ttl in s, then packed per id:
# the id, its token, origin and fingerprint. Per id, 1 if completed under its token: the
# token's claim (even with its lease over), a claim nobody holds any more and an absent
# record are completed.
_COMPLETE = (
    _COMMON
    + """
local now = now_ms()
local fields = unpack(ARGV[3])
local ids = {}
for i = 1, #fields / 4 do
  ids[i] = fields[4 * i - 3]
end
local out = {}
for i, key in ipairs(record_keys(ARGV[1], ids)) do
  local token = fields[4 * i - 2]
  local done = 'c|' .. token .. '|'
  local value = redis.call('GET', key)
  local owner, ends = progress(value)
  if not value or owner == token or (owner and ends <= now) then
    redis.call('SET', key, done .. fields[4 * i - 1] .. '|' .. fields[4 * i], 'EX', ARGV[2])
    out[i] = 1
  elseif string.sub(value, 1, #done) == done then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: the ids' record keys. ARGV: token, "clear" to forget the runs counted too,
# runs TTL in s. Ends each claim the caller holds; a claim nobody holds (its lease
# ended) is cleared too, another's is left alone. How many of the caller's it ended.
_RELEASE = (
    _COMMON
    + """
local now = now_ms()
local released = 0
for _, key in ipairs(KEYS) do
  local token, ends, runs = progress(redis.call('GET', key))
  if token then
    local mine = token == ARGV[1] and ends > now
    if mine then
      released = released + 1
    end
    if ARGV[2] == 'clear' and (mine or ends <= now) then
      redis.call('DEL', key)
    elseif mine then
      redis.call('SET', key, in_progress('', 0, runs), 'EX', ARGV[3])
    end
  end
end
return released
"""
)

# KEYS: the ids' record keys. ARGV: token, lease in ms, runs TTL in s. Per id, 1 if
# the caller still held the claim (its lease now runs from now), else 0.
_RENEW = (
    _COMMON
    + """
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local token, ends, runs = progress(redis.call('GET', key))
  if token == ARGV[1] and ends > now then
    redis.call('SET', key, in_progress(token, now + tonumber(ARGV[2]), runs), 'EX', ARGV[3])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: the id's record key. "absent", "in_progress" or "completed".
_STATE = (
    _COMMON
    + """
local value = redis.call('GET', KEYS[1])
if not value then
  return 'absent'
elseif string.sub(value, 1, 2) == 'c|' then
  return 'completed'
end
local token, ends = progress(value)
if token and ends <= now_ms() then
  return 'absent'
end
return 'in_progress'
"""
)

# KEYS: the epoch marker's key. ARGV: a new epoch. The marker, set to ARGV[1] if missing.
_EPOCH = """
local value = redis.call('GET', KEYS[1])
if value then
  return value
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""


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

RUNS_TTL_SECONDS = 24 * 3600
"""How long an in-progress record, and with it the runs counted, outlives its last claim."""

T = TypeVar("T")


class RedisDedupStore:
    def __init__(
        self, client: redis.Redis, key_prefix: str, durability: Durability = NOT_DURABLE
    ) -> None:
        self._client = client
        self._durability = durability
        self._prefix = key_prefix + ":"
        self._epoch_key = key_prefix + "#epoch"
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._begin = client.register_script(_BEGIN)
        self._epoch = client.register_script(_EPOCH)
        self._state = client.register_script(_STATE)

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

    def _record_keys(self, ids: Sequence[str]) -> list[str]:
        return [self._prefix + id for id in ids]

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        if not ids:
            return []
        args: list[Any] = [
            self._prefix, token, _ms(lease_seconds), RUNS_TTL_SECONDS, _pack(ids),
        ]  # fmt: skip
        replies: list[str] = self._durable(self._claim, args)
        return [_parse_claim(reply) for reply in replies]

    def _durable(self, script: Script, args: list[Any]) -> Any:
        """``script``'s reply, once ``redis.min_replicas`` replicas have its writes."""
        if not self._durability.min_replicas:
            return redis_call(lambda: script(args=args))

        def write_and_wait() -> list[Any]:
            pipe: Any = self._client.pipeline(transaction=False)
            script(args=args, client=pipe)
            pipe.execute_command("WAIT", self._durability.min_replicas, self._durability.timeout_ms)
            return list(pipe.execute())

        reply, acknowledged = redis_call(write_and_wait)
        self._durability.check(int(acknowledged))
        return reply

    def begin(self, id: str, token: str) -> int:
        keys, args = self._record_keys([id]), [token, str(RUNS_TTL_SECONDS)]
        return int(redis_call(lambda: self._begin(keys=keys, args=args)))

    def complete(self, completions: Sequence[Completion], ttl_seconds: int) -> list[bool]:
        if not completions:
            return []
        fields = [f for c in completions for f in (c.id, c.token, c.origin, c.fingerprint)]
        args: list[Any] = [self._prefix, ttl_seconds, _pack(fields)]
        replies = self._durable(self._complete, args)
        return [bool(reply) for reply in replies]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        if not ids:
            return 0
        keys, args = self._record_keys(ids), [token, attempts, str(RUNS_TTL_SECONDS)]
        return int(redis_call(lambda: self._release(keys=keys, args=args)))

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        if not ids:
            return []
        keys = self._record_keys(ids)
        args: list[Any] = [token, _ms(lease_seconds), RUNS_TTL_SECONDS]
        replies = redis_call(lambda: self._renew(keys=keys, args=args))
        return [bool(reply) for reply in replies]

    def epoch(self, candidate: str) -> str:
        return str(redis_call(lambda: self._epoch(keys=[self._epoch_key], args=[candidate])))

    def state(self, id: str) -> State:
        return _parse_state(redis_call(lambda: self._state(keys=[self._prefix + id])))

    def eviction_policy(self) -> str | None:
        return redis_call(lambda: read_eviction_policy(self._client))

    def ping(self) -> None:
        redis_call(self._client.ping)

    def close(self) -> None:
        self._client.close()


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


def _pack(fields: Sequence[str]) -> bytes:
    """``fields`` as one argument for the batch scripts: ``<byte length>:<field>`` each."""
    encoded = [field.encode() for field in fields]
    return b"".join(b"%d:%s" % (len(field), field) for field in encoded)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parse_state(name: str) -> State:
    return {"absent": State.ABSENT, "completed": State.COMPLETED}.get(name, State.IN_PROGRESS)


def _parse_claim(reply: str) -> Claim:
    if reply == "+1":
        return FIRST_CLAIM
    if reply == "?":
        return CLAIMED
    if reply.startswith("c|"):
        _, _, origin, fingerprint = [*reply.split("|", 3), "", ""][:4]
        return Claim(ClaimStatus.COMPLETED, origin or None, fingerprint=fingerprint or None)
    return BUSY
