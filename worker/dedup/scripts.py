"""The dedup records' Lua scripts, shared by the Redis and the Redis Cluster stores, and
the packing of their arguments. The layout is described in ``worker/dedup/redis.py``;
the records' values in ``worker/dedup/encoding.py``. Every script checks the claim's
owner token.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.dedup.base import Completion

RUNS_TTL_SECONDS = 24 * 3600
"""How long a record of the previous layout outlived its last claim: with the dedup TTL,
how long the scripts still look for such records after an upgrade."""

DEFAULT_TTL_SECONDS = 7 * 24 * 3600
"""``dedup.ttl_seconds``'s default."""


def legacy_horizon_ms(ttl_seconds: int) -> int:
    """How long after an upgrade records of the previous layout may still exist."""
    return max(ttl_seconds, RUNS_TTL_SECONDS) * 1000


# Shared by every script but FORGETS, EPOCH and TOPICS. KEYS[1] is the index of the
# windows (a sorted set: each window's key scored by its expiry in ms, and "layout:<ms>"
# scored +inf, until when records of the previous layout may still exist). ARGV[1] is
# the base every key is named from: "<prefix>" on one Redis, "<prefix>:{<tag>}" on a
# Cluster, where the windows and the previous layout's keys share the index's slot.
#
# CLAIM and COMPLETE, which every message costs, take their ids (and per-id fields)
# packed into one argument, each field followed by the byte 0x1f (which no id, token,
# record or JSON reply contains): one argument instead of thousands is most of what a
# batch costs on the client, and Lua splits it with one pattern. The scripts that may
# be given an entity's name, which holds 0x1f, take one argument per field.
_COMMON = """
local spread = unpack

local function unpack(packed)
  local out = {}
  for field in string.gmatch(packed, '([^\\31]*)\\31') do
    out[#out + 1] = field
  end
  return out
end

-- ARGV[first] and those after it, as a list: names that may hold 0x1f (an entity's).
local function args_from(first)
  local out = {}
  for i = first, #ARGV do
    out[#out + 1] = ARGV[i]
  end
  return out
end

local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- command(key, ...list...) in slices, so that no call passes Lua's stack limit; the
-- replies joined.
local function each_slice(command, key, list)
  if #list <= 4000 then
    return redis.call(command, key, spread(list))
  end
  local out = {}
  for first = 1, #list, 4000 do
    local reply = redis.call(command, key, spread(list, first, math.min(first + 3999, #list)))
    if type(reply) == 'table' then
      for _, value in ipairs(reply) do
        out[#out + 1] = value
      end
    end
  end
  return out
end

-- The live windows, newest first, and whether the previous layout may still be read:
-- until the time the epoch check set, or always if it never ran on this index. A live
-- window always exists (it keeps a sentinel field until it expires); one missing here
-- is on its way to or from another node while its slot migrates (the index already
-- moved, or not yet): the call is refused with TRYAGAIN rather than read it as empty.
local function live_windows(now)
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
  local windows = {keys = {}, expiries = {}, created = {}, legacy = true}
  for i = #live - 1, 1, -2 do
    local until_ms = string.match(live[i], '^layout:(%d+)$')
    if until_ms then
      windows.legacy = tonumber(until_ms) > now
    else
      if redis.call('EXISTS', live[i]) == 0 then
        error({err = 'TRYAGAIN the windows of this slot are moving'})
      end
      windows.keys[#windows.keys + 1] = live[i]
      windows.expiries[live[i]] = tonumber(live[i + 1])
    end
  end
  return windows
end

-- Each name's record, and where it is: a window, or its key of the previous layout. The
-- names not in the newest window are looked for in every older one at once.
local function find(names, windows, base)
  local values, at = {}, {}
  local open = names
  for w, window in ipairs(windows.keys) do
    if #open == 0 then
      break
    end
    local found = each_slice('HMGET', window, open)
    local missing = {}
    for j, name in ipairs(open) do
      if found[j] then
        if not values[name] then
          values[name], at[name] = found[j], window
        end
      elseif w == 1 then
        missing[#missing + 1] = name
      end
    end
    if w == 1 then
      open = missing
    end
  end
  if windows.legacy then
    for _, name in ipairs(names) do
      if not values[name] then
        local key = base .. ':' .. name
        local value = redis.call('GET', key)
        if value then
          values[name], at[name] = value, key
        end
      end
    end
  end
  return values, at
end

-- The window for records that must live until need (ms): one expiring between need
-- and need + span, else a new one expiring at need + span.
local function window_for(windows, base, need, span)
  for _, window in ipairs(windows.keys) do
    local expiry = windows.expiries[window]
    if expiry >= need and expiry <= need + span then
      return window
    end
  end
  local expiry = need + span
  local window = base .. '/' .. expiry
  table.insert(windows.keys, 1, window)
  windows.expiries[window] = expiry
  windows.created[window] = true
  return window
end

-- Write the field/value pairs into window. A new window is opened first: its sentinel
-- field, its expiry, its index entry.
local function put(window, pairs, windows)
  if #pairs == 0 then
    return
  end
  if windows.created[window] then
    redis.call('HSET', window, '\\31', '')
    redis.call('PEXPIREAT', window, windows.expiries[window])
    redis.call('ZADD', KEYS[1], windows.expiries[window], window)
    windows.created[window] = nil
  end
  each_slice('HSET', window, pairs)
end

-- Delete name's record where it is (a window's field, or a key of the previous layout).
local function remove(name, where, base)
  if where == base .. ':' .. name then
    redis.call('DEL', where)
  else
    redis.call('HDEL', where, name)
  end
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

-- Whether a completion under token may write over value (a record, or nil): the
-- token's claim (even with its lease over), a claim nobody holds any more, or nothing.
local claim_prefixes = {}
local function completable(value, token, now)
  if not value then
    return true
  end
  local prefix = claim_prefixes[token]
  if not prefix then
    prefix = 'p|' .. token .. '|'
    claim_prefixes[token] = prefix
  end
  if string.find(value, prefix, 1, true) == 1 then
    return true
  end
  local owner, ends = progress(value)
  return owner ~= nil and ends <= now
end

local function is_completed(value)
  return value ~= nil and string.sub(value, 1, 2) ~= 'p|'
end

-- Take the claims of names for token (their records in values, found at at): each
-- reply is "+1" if it was free (one run counted), "?" if the caller held it or its lease
-- ended (runs counted before), else the record that stops it. Claims written go to
-- target; a claim taken over elsewhere moves there.
local function take(names, values, at, token, lease, now, target, windows, base)
  local out, writes, moved = {}, {}, {}
  local first = in_progress(token, lease, 1)
  for i, name in ipairs(names) do
    local value = values[name]
    local owner, ends, runs
    if value then
      owner, ends, runs = progress(value)
    end
    if not value then
      writes[#writes + 1] = name
      writes[#writes + 1] = first
      out[i] = '+1'
    elseif owner and (owner == token or ends <= now) then
      writes[#writes + 1] = name
      writes[#writes + 1] = in_progress(token, lease, runs)
      if at[name] ~= target then
        moved[#moved + 1] = name
      end
      out[i] = '?'
    else
      out[i] = value
    end
  end
  put(target, writes, windows)
  for _, name in ipairs(moved) do
    remove(name, at[name], base)
  end
  return out
end
"""

# KEYS: the index. ARGV: base, token, lease in ms, dedup TTL in s, packed ids. Per id:
# "+1" when the caller holds the claim now and this claim counted the id's first run;
# "?" when it holds the claim and runs were counted before; else the record that stops
# it (completed, or another's claim).
CLAIM = (
    _COMMON
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

# Sequence routes (worker/modes/sequence.py): an entity's claim is a record as an id's,
# named "<topic>\\31<entity>", that exists only while the entity is claimed (or its runs
# counted), and its position is a key of its own holding the highest sequence applied,
# in decimal digits. Sequences are compared as digit strings (no leading zeros), so any
# 64-bit one is exact.
_POSITIONS = """
local function at_or_below(sequence, position)
  if #sequence ~= #position then
    return #sequence < #position
  end
  return sequence <= position
end
"""

# KEYS: the index, then each entity's position key. ARGV: base, token, lease in ms,
# dedup TTL in s, then per entity its name and sequence. Per entity: "s|<position>"
# if the sequence is at or below the position (stale: nothing claimed); "+1|<position>"
# or "?|<position>" if the caller holds the claim now, as CLAIM's "+1" and "?" (the
# position empty if the entity has none); else the claim record that stops it.
SEQUENCE_CLAIM = (
    _COMMON
    + _POSITIONS
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
    _COMMON
    + _POSITIONS
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
# over every replica) if the caller holds the claim, else 0.
BEGIN = (
    _COMMON
    + """
local now = now_ms()
local values, at = find({ARGV[2]}, live_windows(now), ARGV[1])
local token, ends, runs = progress(values[ARGV[2]])
if token ~= ARGV[3] or ends <= now then
  return 0
end
redis.call('HSET', at[ARGV[2]], ARGV[2], in_progress(token, ends, runs + 1))
return runs + 1
"""
)

# KEYS: the index. ARGV: base, dedup TTL in s, packed per id: the id, its token and its
# completed record (worker/dedup/encoding.py). Per id, 1 if completed under its token:
# the token's claim (even with its lease over), a claim nobody holds any more and an
# absent record are completed, and so is the same record written before (an ambiguous
# completion repeated).
COMPLETE = (
    _COMMON
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
    _COMMON
    + """
local now = now_ms()
local names = args_from(4)
local values, at = find(names, live_windows(now), ARGV[1])
local released = 0
for i, name in ipairs(names) do
  local token, ends, runs = progress(values[name])
  if token then
    local mine = token == ARGV[2] and ends > now
    if mine then
      released = released + 1
    end
    if ARGV[3] == 'clear' and (mine or ends <= now) then
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
    _COMMON
    + """
local now = now_ms()
local names = args_from(4)
local values, at = find(names, live_windows(now), ARGV[1])
local out = {}
for i, name in ipairs(names) do
  local token, ends, runs = progress(values[name])
  if token == ARGV[2] and ends > now then
    redis.call('HSET', at[name], name, in_progress(token, now + tonumber(ARGV[3]), runs))
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
    _COMMON
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
    _COMMON
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


FIELD_END = "\x1f"


def pack(fields: Sequence[str]) -> bytes:
    """``fields`` as one argument for the batch scripts, each followed by ``FIELD_END``."""
    if not fields:
        return b""
    packed = FIELD_END.join(fields) + FIELD_END
    if packed.count(FIELD_END) != len(fields):
        raise ValueError("a dedup store field contains U+001F")
    return packed.encode()


def split_completions(completions: Sequence[Completion]) -> tuple[list[int], list[int]]:
    """The indexes of the completions of ids, and of those raising entities' positions."""
    ids: list[int] = []
    entities: list[int] = []
    for index, completion in enumerate(completions):
        (ids if completion.sequence is None else entities).append(index)
    return ids, entities


def ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))
