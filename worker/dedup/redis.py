"""The Redis dedup store: one key per message id, every transition one Lua script.

A record is a string value: ``p|<token>`` while in progress (with a millisecond
expiry, the lease) and ``c|<token>|<origin>|<fingerprint>`` once completed (with the
TTL). Beside it, ``<prefix>#attempts:<id>`` counts the runs begun, so a message that
crashes its worker is noticed by whichever replica claims it next.
A whole poll batch is claimed in one script call, and completions are written in
groups, so dedup costs two round trips per group of messages rather than per message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
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

# The batch scripts take their ids (and per-id fields) packed into one argument as
# "<byte length>:<field>" repeated: one argument instead of thousands is most of what
# a batch costs on the client. They build the keys from the prefixes they are given,
# which is fine on a standalone Redis (or a primary with replicas), not on a Cluster.
_UNPACK = """
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
"""

# ARGV: record-key prefix, attempt-count-key prefix, token, lease in ms, attempt-count
# TTL in s, packed ids. Per id: "+1" when the caller holds the claim now and this claim
# counted the id's first run; "?" when it holds the claim and runs were counted before;
# else the record that stops it.
_CLAIM = (
    _UNPACK
    + """
local mine = 'p|' .. ARGV[3]
local out = {}
for i, id in ipairs(unpack(ARGV[6])) do
  local key = ARGV[1] .. id
  local held = redis.call('SET', key, mine, 'NX', 'PX', ARGV[4])
  if not held then
    local value = redis.call('GET', key)
    if value == mine then
      redis.call('PEXPIRE', key, ARGV[4])
      held = true
    else
      out[i] = value
    end
  end
  if held then
    if redis.call('SET', ARGV[2] .. id, 1, 'NX', 'EX', ARGV[5]) then
      out[i] = '+1'
    else
      out[i] = '?'
    end
  end
end
return out
"""
)

# KEYS: the id's record key, its attempt-count key. ARGV: token, attempt-count TTL in s.
# The number of this run (1 for the first, over every replica) if the caller holds the
# claim, else 0.
_BEGIN = """
if redis.call('GET', KEYS[1]) ~= 'p|' .. ARGV[1] then
  return 0
end
local count = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return count
"""

# ARGV: record-key prefix, attempt-count-key prefix, ttl in s, then packed per id: the
# id, its token, origin and fingerprint. Per id, 1 if completed under its token; an
# absent record (our lease expired, nobody else claimed the id) is completed too.
_COMPLETE = (
    _UNPACK
    + """
local fields = unpack(ARGV[4])
local out = {}
for i = 1, #fields / 4 do
  local id, token = fields[4 * i - 3], fields[4 * i - 2]
  local key = ARGV[1] .. id
  local done = 'c|' .. token .. '|'
  local value = redis.call('GET', key)
  if not value or value == 'p|' .. token then
    redis.call('SET', key, done .. fields[4 * i - 1] .. '|' .. fields[4 * i], 'EX', ARGV[3])
    redis.call('DEL', ARGV[2] .. id)
    out[i] = 1
  elseif string.sub(value, 1, string.len(done)) == done then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: the ids' record keys, then their attempt-count keys. ARGV: token, "clear" to
# forget the attempt counts too. Returns how many of the caller's claims it deleted.
_RELEASE = """
local n = #KEYS / 2
local released = 0
for i = 1, n do
  if redis.call('GET', KEYS[i]) == 'p|' .. ARGV[1] then
    released = released + redis.call('DEL', KEYS[i])
  end
  if ARGV[2] == 'clear' then
    redis.call('DEL', KEYS[n + i])
  end
end
return released
"""

# KEYS: the ids' record keys. ARGV: token, lease in ms. Per id, 1 if the caller still
# held the claim (its lease now runs from now), else 0.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == 'p|' .. ARGV[1] then
    out[i] = redis.call('PEXPIRE', key, ARGV[2])
  else
    out[i] = 0
  end
end
return out
"""

# KEYS: the epoch marker's key. ARGV: a new epoch. The marker, set to ARGV[1] if missing.
_EPOCH = """
local value = redis.call('GET', KEYS[1])
if value then
  return value
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

ATTEMPTS_TTL_SECONDS = 24 * 3600
"""How long a message id's attempt count outlives its last claim."""

T = TypeVar("T")


class RedisDedupStore:
    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix + ":"
        self._attempts_prefix = key_prefix + "#attempts:"  # never equal to a record key
        self._epoch_key = key_prefix + "#epoch"
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)
        self._renew = client.register_script(_RENEW)
        self._begin = client.register_script(_BEGIN)
        self._epoch = client.register_script(_EPOCH)

    @classmethod
    def from_url(
        cls, url: str, key_prefix: str, *, timeout: float = 2.0, tls_ca_file: str | None = None
    ) -> RedisDedupStore:
        tls: dict[str, Any] = {"ssl_ca_certs": tls_ca_file} if tls_ca_file else {}
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
            # No retries inside the client (redis-py's defaults differ between its
            # constructors and versions): the guard retries, counts and holds, and must
            # learn of an outage at once.
            retry=Retry(NoBackoff(), 0),
            **tls,
        )
        return cls(client, key_prefix)

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    def _record_keys(self, ids: Sequence[str]) -> list[str]:
        return [self._prefix + id for id in ids]

    def _keys(self, ids: Sequence[str]) -> list[str]:
        """The record keys, then the attempt-count keys."""
        return self._record_keys(ids) + [self._attempts_prefix + id for id in ids]

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        if not ids:
            return []
        args: list[Any] = [
            self._prefix, self._attempts_prefix, token, _ms(lease_seconds),
            ATTEMPTS_TTL_SECONDS, _pack(ids),
        ]  # fmt: skip
        replies: list[str] = self._call(lambda: self._claim(args=args))
        return [_parse_claim(reply) for reply in replies]

    def begin(self, id: str, token: str) -> int:
        args: list[Any] = [token, ATTEMPTS_TTL_SECONDS]
        return int(self._call(lambda: self._begin(keys=self._keys([id]), args=args)))

    def complete(self, completions: Sequence[Completion], ttl_seconds: int) -> list[bool]:
        if not completions:
            return []
        fields = [f for c in completions for f in (c.id, c.token, c.origin, c.fingerprint)]
        args: list[Any] = [self._prefix, self._attempts_prefix, ttl_seconds, _pack(fields)]
        replies = self._call(lambda: self._complete(args=args))
        return [bool(reply) for reply in replies]

    def release(self, ids: Sequence[str], token: str, attempts: Attempts = "keep") -> int:
        if not ids:
            return 0
        keys = self._keys(ids)
        return int(self._call(lambda: self._release(keys=keys, args=[token, attempts])))

    def renew(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[bool]:
        if not ids:
            return []
        keys = self._record_keys(ids)
        replies = self._call(lambda: self._renew(keys=keys, args=[token, _ms(lease_seconds)]))
        return [bool(reply) for reply in replies]

    def epoch(self, candidate: str) -> str:
        return str(self._call(lambda: self._epoch(keys=[self._epoch_key], args=[candidate])))

    def state(self, id: str) -> State:
        value = self._call(lambda: self._client.get(self._prefix + id))
        if value is None:
            return State.ABSENT
        return State.COMPLETED if str(value).startswith("c|") else State.IN_PROGRESS

    def eviction_policy(self) -> str | None:
        def read() -> Any:
            try:
                return self._client.config_get("maxmemory-policy")
            except redis.ResponseError:
                return {}  # CONFIG is disabled or not granted to this user (managed Redis)

        policy = self._call(read).get("maxmemory-policy")
        return None if policy is None else str(policy)

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        self._client.close()


def _pack(fields: Sequence[str]) -> bytes:
    """``fields`` as one argument for the batch scripts: ``<byte length>:<field>`` each."""
    encoded = [field.encode() for field in fields]
    return b"".join(b"%d:%s" % (len(field), field) for field in encoded)


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _parse_claim(reply: str) -> Claim:
    if reply == "+1":
        return FIRST_CLAIM
    if reply == "?":
        return CLAIMED
    if reply.startswith("c|"):
        _, _, origin, fingerprint = [*reply.split("|", 3), "", ""][:4]
        return Claim(ClaimStatus.COMPLETED, origin or None, fingerprint=fingerprint or None)
    return BUSY
