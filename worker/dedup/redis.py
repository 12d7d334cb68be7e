"""The Redis dedup store: one key per message id, every transition one Lua script.

A record is a string value: ``p|<token>`` while in progress (with a millisecond
expiry, the lease) and ``c|<token>|<origin>`` once completed (with the TTL).
A whole poll batch is claimed in one script call, so dedup costs one round trip
per batch rather than one per message.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis

from worker.dedup.base import BUSY, CLAIMED, Claim, ClaimStatus, State
from worker.errors import StoreUnavailable

# KEYS: the ids' keys. ARGV: token, lease in ms. Returns, per key, "" when the caller
# holds the claim now, or the record that stops it.
_CLAIM = """
local mine = 'p|' .. ARGV[1]
local out = {}
for i, key in ipairs(KEYS) do
  if redis.call('SET', key, mine, 'NX', 'PX', ARGV[2]) then
    out[i] = ''
  else
    local value = redis.call('GET', key)
    if value == mine then
      redis.call('PEXPIRE', key, ARGV[2])
      out[i] = ''
    else
      out[i] = value
    end
  end
end
return out
"""

# KEYS[1]: the id's key. ARGV: token, ttl in seconds, origin. 1 if completed under token;
# an absent record (our lease expired, nobody else claimed the id) is completed too.
_COMPLETE = """
local value = redis.call('GET', KEYS[1])
if not value or value == 'p|' .. ARGV[1] then
  redis.call('SET', KEYS[1], 'c|' .. ARGV[1] .. '|' .. ARGV[3], 'EX', ARGV[2])
  return 1
end
if value and string.sub(value, 1, string.len(ARGV[1]) + 3) == 'c|' .. ARGV[1] .. '|' then
  return 1
end
return 0
"""

# KEYS: the ids' keys. ARGV[1]: token. Returns how many of the caller's claims it deleted.
_RELEASE = """
local released = 0
for _, key in ipairs(KEYS) do
  if redis.call('GET', key) == 'p|' .. ARGV[1] then
    released = released + redis.call('DEL', key)
  end
end
return released
"""

T = TypeVar("T")


class RedisDedupStore:
    def __init__(self, client: redis.Redis, key_prefix: str) -> None:
        self._client = client
        self._prefix = key_prefix + ":"
        self._claim = client.register_script(_CLAIM)
        self._complete = client.register_script(_COMPLETE)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(cls, url: str, key_prefix: str, *, timeout: float = 2.0) -> RedisDedupStore:
        client = redis.Redis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=30,
        )
        return cls(client, key_prefix)

    def _call(self, operation: Callable[[], T]) -> T:
        try:
            return operation()
        except redis.RedisError as exc:
            raise StoreUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    def claim(self, ids: Sequence[str], token: str, lease_seconds: float) -> list[Claim]:
        if not ids:
            return []
        keys = [self._prefix + id for id in ids]
        lease_ms = max(1, int(lease_seconds * 1000))
        replies: list[str] = self._call(lambda: self._claim(keys=keys, args=[token, lease_ms]))
        return [_parse_claim(reply) for reply in replies]

    def complete(self, id: str, token: str, ttl_seconds: int, origin: str) -> bool:
        args: list[Any] = [token, ttl_seconds, origin]
        return bool(self._call(lambda: self._complete(keys=[self._prefix + id], args=args)))

    def release(self, ids: Sequence[str], token: str) -> int:
        if not ids:
            return 0
        keys = [self._prefix + id for id in ids]
        return int(self._call(lambda: self._release(keys=keys, args=[token])))

    def state(self, id: str) -> State:
        value = self._call(lambda: self._client.get(self._prefix + id))
        if value is None:
            return State.ABSENT
        return State.COMPLETED if str(value).startswith("c|") else State.IN_PROGRESS

    def ping(self) -> None:
        self._call(self._client.ping)

    def close(self) -> None:
        self._client.close()


def _parse_claim(reply: str) -> Claim:
    if reply == "":
        return CLAIMED
    if reply.startswith("c|"):
        origin = reply.split("|", 2)[2] if reply.count("|") >= 2 else None
        return Claim(ClaimStatus.COMPLETED, origin)
    return BUSY
