"""The dedup records' Lua scripts, shared by the Redis and the Redis Cluster stores,
built on the functions of ``idempotent_worker/dedup/lua.py``. The layout is described in
``dedup/redis.py``; the records' values in ``dedup/encoding.py``. Every
script checks the claim's owner token.
"""

from __future__ import annotations

from collections.abc import Sequence

from idempotent_worker.dedup.base import Completion
from idempotent_worker.dedup.lua import COMMON, POSITIONS

RUNS_TTL_SECONDS = 24 * 3600
"""How long a record of the previous layout outlived its last claim: with the dedup TTL,
how long the scripts still look for such records after an upgrade."""

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
"""``dedup.ttl_seconds``'s default."""


def legacy_horizon_ms(ttl_seconds: int) -> int:
    """How long after an upgrade records of the previous layout may still exist."""
    return max(ttl_seconds, RUNS_TTL_SECONDS) * 1000


# KEYS: the index. ARGV: base, token, lease in ms, dedup TTL in s, packed ids. Per id:
# "+1" when the caller holds the claim now and this claim counted the id's first run;
# "?" when it holds the claim and runs were counted before; else the record that stops
# it (completed, or another's claim).
CLAIM = (
    COMMON
    + """
local now = now_ms()
local base, ttl = ARGV[1], tonumber(ARGV[4]) * 1000
local windows = live_windows(now)
local ids = unpack(ARGV[5])
local values, at = find(ids, windows, base)
local target = window_for(windows, base, now + ttl, ttl / 4)
return take(ids, values, at, ARGV[2], now + tonumber(ARGV[3]), now, target, windows, base)
"""
)


# KEYS: the index, then each entity's position key. ARGV: base, token, lease in ms,
# dedup TTL in s, then per entity its name and sequence. Per entity: "s|<position>"
# if the sequence is at or below the position (stale: nothing claimed); "+1|<position>"
# or "?|<position>" if the caller holds the claim now, as CLAIM's "+1" and "?" (the
# position empty if the entity has none); else the claim record that stops it.
SEQUENCE_CLAIM = (
    COMMON
    + POSITIONS
    + """
local now = now_ms()
local base, ttl = ARGV[1], tonumber(ARGV[4]) * 1000
local windows = live_windows(now)
local fields = args_from(5)
local out, names, slots, positions = {}, {}, {}, {}
for i = 1, #fields / 2 do
  local position = redis.call('GET', KEYS[i + 1])
  if position and at_or_below(fields[2 * i], position) then
    out[i] = 's|' .. position
  else
    slots[#names + 1] = i
    names[#names + 1] = fields[2 * i - 1]
    positions[i] = position or ''
  end
end
local values, at = find(names, windows, base)
local target = window_for(windows, base, now + ttl, ttl / 4)
local taken = take(names, values, at, ARGV[2], now + tonumber(ARGV[3]), now, target, windows, base)
for j, reply in ipairs(taken) do
  local i = slots[j]
  out[i] = reply
  if reply == '+1' or reply == '?' then
    out[i] = reply .. '|' .. positions[i]
  end
end
return out
"""
)

# KEYS: the index, then each entity's position key. ARGV: base, the positions' TTL in s
# ("" for none), then per entity its name, token and sequence. Per entity, 1 if its
# position is now at or above the sequence: raised (never lowered) and the claim deleted
# when the token's claim (even with its lease over), a claim nobody holds or no claim is
# found; also when another holds the claim and the position is already there (an
# ambiguous completion repeated). Else 0: the lease was lost.
SEQUENCE_COMPLETE = (
    COMMON
    + POSITIONS
    + """
local now = now_ms()
local base = ARGV[1]
local windows = live_windows(now)
local fields = args_from(3)
local n = #fields / 3
local names = {}
for i = 1, n do
  names[i] = fields[3 * i - 2]
end
local values, at = find(names, windows, base)
local out = {}
for i = 1, n do
  local name, token, sequence = names[i], fields[3 * i - 1], fields[3 * i]
  local position = redis.call('GET', KEYS[i + 1])
  if completable(values[name], token, now) then
    if not position or not at_or_below(sequence, position) then
      if ARGV[2] == '' then
        redis.call('SET', KEYS[i + 1], sequence)
      else
        redis.call('SET', KEYS[i + 1], sequence, 'EX', ARGV[2])
      end
    end
    if values[name] then
      remove(name, at[name], base)
    end
    out[i] = 1
  elseif position and at_or_below(sequence, position) then
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: the index. ARGV: base, name, token. The number of this run (1 for the first,
# over every replica) if the caller holds the claim, else 0. Counted once per claim:
# sent again, it answers the same number.
BEGIN = (
    COMMON
    + """
local now = now_ms()
local values, at = find({ARGV[2]}, live_windows(now), ARGV[1])
local token, ends, runs = progress(values[ARGV[2]])
if token ~= ARGV[3] or ends <= now then
  return 0
end
if ends % 2 == 1 then
  return runs
end
redis.call('HSET', at[ARGV[2]], ARGV[2], in_progress(token, ends + 1, runs + 1))
return runs + 1
"""
)

# KEYS: the index. ARGV: base, dedup TTL in s, packed per id: the id, its token and its
# completed record (idempotent_worker/dedup/encoding.py). Per id, 1 if completed under its token:
# the token's claim (even with its lease over), a claim nobody holds any more and an
# absent record are completed, and so is the same record written before (an ambiguous
# completion repeated).
COMPLETE = (
    COMMON
    + """
local now = now_ms()
local base, ttl = ARGV[1], tonumber(ARGV[2]) * 1000
local windows = live_windows(now)
local fields = unpack(ARGV[3])
local ids = {}
for i = 1, #fields / 3 do
  ids[i] = fields[3 * i - 2]
end
local values, at = find(ids, windows, base)
local target = window_for(windows, base, now + ttl, ttl / 4)
local out, writes, moved = {}, {}, {}
for i, id in ipairs(ids) do
  local record = fields[3 * i]
  local value = values[id]
  if value == record then
    out[i] = 1
  elseif completable(value, fields[3 * i - 1], now) then
    writes[#writes + 1] = id
    writes[#writes + 1] = record
    if value and at[id] ~= target then
      moved[#moved + 1] = id
    end
    out[i] = 1
  else
    out[i] = 0
  end
end
put(target, writes, windows)
for _, id in ipairs(moved) do
  remove(id, at[id], base)
end
return out
"""
)

# KEYS: the index. ARGV: base, token, "clear" to forget the runs counted too, then the
# names. Ends each claim the caller holds; a claim nobody holds (its lease ended) is
# cleared too, another's is left alone. How many of the caller's it ended.
RELEASE = (
    COMMON
    + """
local now = now_ms()
local names = args_from(4)
local values, at = find(names, live_windows(now), ARGV[1])
local released = 0
for i, name in ipairs(names) do
  local token, ends, runs = progress(values[name])
  if token then
    local ours = token == ARGV[2]
    local mine = ours and ends > now
    if mine then
      released = released + 1
    end
    if ARGV[3] == 'clear' and ours then -- never another owner's runs, even expired
      remove(name, at[name], ARGV[1])
    elseif mine then
      redis.call('HSET', at[name], name, in_progress('', 0, runs))
    end
  end
end
return released
"""
)

# KEYS: the index. ARGV: base, token, lease in ms, then the names. Per name, 1 if the
# caller still held the claim (its lease now runs from now), else 0.
RENEW = (
    COMMON
    + """
local now = now_ms()
local names = args_from(4)
local values, at = find(names, live_windows(now), ARGV[1])
local out = {}
for i, name in ipairs(names) do
  local token, ends, runs = progress(values[name])
  if token == ARGV[2] and ends > now then
    local lease = even(now + tonumber(ARGV[3])) + ends % 2
    redis.call('HSET', at[name], name, in_progress(token, lease, runs))
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
)

# KEYS: the index. ARGV: base, id. The record (or false), how long it lives on in ms
# (-1: for good), and the time in ms. The previous layout is always looked at.
INSPECT = (
    COMMON
    + """
local now = now_ms()
local windows = live_windows(now)
windows.legacy = true
local values, at = find({ARGV[2]}, windows, ARGV[1])
local value = values[ARGV[2]]
if not value then
  return {false, -2, now}
end
return {value, redis.call('PTTL', at[ARGV[2]]), now}
"""
)

# KEYS: the index. ARGV: base, "force" to delete claims in progress too, then the ids. Per
# id, what it was: completed, in_progress, absent, or refused (in progress, not forced).
FORGET = (
    COMMON
    + """
local now = now_ms()
local windows = live_windows(now)
windows.legacy = true
local ids = args_from(3)
local values, at = find(ids, windows, ARGV[1])
local out = {}
for i, id in ipairs(ids) do
  local value = values[id]
  local token, ends = progress(value)
  if not value then
    out[i] = 'absent'
  elseif is_completed(value) then
    out[i] = 'completed'
  elseif token and token ~= '' and ends > now then
    out[i] = ARGV[2] == 'force' and 'in_progress' or 'refused'
  else
    out[i] = 'absent'  -- a claim let go or expired: only its runs are counted
  end
  if value and out[i] ~= 'refused' then
    remove(id, at[id], ARGV[1])
  end
end
return out
"""
)

# KEYS: the forget counter's key. ARGV: "incr" to count one more. The count.
FORGETS = """
if ARGV[1] == 'incr' then
  return redis.call('INCR', KEYS[1])
end
return tonumber(redis.call('GET', KEYS[1]) or '0')
"""

# KEYS: the epoch marker's key, the index. ARGV: a new epoch, how long in ms records of
# the previous layout may live. The marker, set to ARGV[1] if missing. The first time
# it sees an index without a layout entry, it records until when the previous layout
# must still be read: never if the marker is missing too (a new store), else from now
# on for as long as those records live. It also drops the windows that expired from the
# index (every replica checks the epoch every third of a lease).
EPOCH = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local value = redis.call('GET', KEYS[1])
local layout = redis.call('ZRANGEBYSCORE', KEYS[2], '+inf', '+inf')
if #layout == 0 then
  local until_ms = 0
  if value then
    until_ms = now + tonumber(ARGV[2])
  end
  redis.call('ZADD', KEYS[2], '+inf', 'layout:' .. string.format('%d', until_ms))
end
if value then
  return value
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
"""

# KEYS: the topic names' hash. ARGV: pairs of a topic's short hash and its name, each
# set unless the hash is taken. Every hash and name known.
TOPICS = """
for i = 1, #ARGV, 2 do
  redis.call('HSETNX', KEYS[1], ARGV[i], ARGV[i + 1])
end
return redis.call('HGETALL', KEYS[1])
"""


def split_completions(completions: Sequence[Completion]) -> tuple[list[int], list[int]]:
    """The indexes of the completions of ids, and of those raising entities' positions."""
    ids: list[int] = []
    entities: list[int] = []
    for index, completion in enumerate(completions):
        (ids if completion.sequence is None else entities).append(index)
    return ids, entities


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
