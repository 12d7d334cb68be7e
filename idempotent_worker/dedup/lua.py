"""The Lua every dedup script is built from, and the packing of the scripts' arguments:
finding records in the windows (the layout is described in ``idempotent_worker/dedup/redis.py``),
opening windows, taking claims and checking completions, and comparing a sequence route's
positions. The scripts themselves are in ``idempotent_worker/dedup/scripts.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

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
COMMON = """
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
-- window always exists (it keeps a sentinel field until it expires). On a Cluster (the
-- base holds a hash tag) one missing here is on its way to or from another node while
-- its slot migrates (the index already moved, or not yet): the call is refused with
-- TRYAGAIN rather than read it as empty. On one Redis nothing migrates: the window was
-- evicted or deleted and its records are lost. It leaves the index and the epoch key
-- goes with it, so that every replica's epoch check counts and logs a store reset;
-- the calls go on.
local function live_windows(now)
  local live = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. now, '+inf', 'WITHSCORES')
  local windows = {keys = {}, expiries = {}, created = {}, legacy = true}
  for i = #live - 1, 1, -2 do
    local until_ms = string.match(live[i], '^layout:(%d+)$')
    if until_ms then
      windows.legacy = tonumber(until_ms) > now
    else
      if redis.call('EXISTS', live[i]) == 1 then
        windows.keys[#windows.keys + 1] = live[i]
        windows.expiries[live[i]] = tonumber(live[i + 1])
      elseif string.find(ARGV[1], '{', 1, true) then
        error({err = 'TRYAGAIN the windows of this slot are moving'})
      else
        redis.call('ZREM', KEYS[1], live[i])
        redis.call('DEL', ARGV[1] .. '#epoch')
      end
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

-- A claim's lease end is even until BEGIN counts a run under it, then odd: a BEGIN sent
-- again (its reply lost) finds its run counted. (A mark in the lease keeps the record
-- readable by every version of these scripts.)
local function even(ms)
  return ms - ms % 2
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
  lease = even(lease)
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
      local mark = owner == token and ends > now and ends % 2 or 0
      writes[#writes + 1] = in_progress(token, lease + mark, runs)
      if at[name] ~= target then
        moved[#moved + 1] = name
      end
      -- The token's own live first claim, sent again (its reply was lost): the same run.
      if owner == token and ends > now and runs == 1 then
        out[i] = '+1'
      else
        out[i] = '?'
      end
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

# Sequence routes (processing/modes/sequence.py): an entity's claim is a record as an id's,
# named "<topic>\\31<entity>", that exists only while the entity is claimed (or its runs
# counted), and its position is a key of its own holding the highest sequence applied,
# in decimal digits. Sequences are compared as digit strings (no leading zeros), so any
# 64-bit one is exact.
POSITIONS = """
local function at_or_below(sequence, position)
  if #sequence ~= #position then
    return #sequence < #position
  end
  return sequence <= position
end
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


def grouped(script: str) -> str:
    """``script`` (one of the scripts on a bucket's index, ``KEYS[1]``) run for several
    buckets of one Redis Cluster primary in one call (dedup/cluster_calls.py). ARGV:
    the number of buckets, then per bucket its key count, its argument count, its keys
    and its arguments; the reply is the list of their replies. The call declares only
    the first bucket's index, by which the cluster routes it; the flag lets it reach
    the others' slots on the same node.

    Every bucket's index, its listed windows and its other keys are read before any
    bucket's script runs: a slot that left the node fails the call there ("non local
    key"), and a window on its way answers TRYAGAIN, with nothing written."""
    return (
        "#!lua flags=allow-cross-slot-keys\n"
        + "local function bucket(KEYS, ARGV)\n"
        + script
        + """
end

local buckets, at = {}, 2
for b = 1, tonumber(ARGV[1]) do
  local key_count, arg_count = tonumber(ARGV[at]), tonumber(ARGV[at + 1])
  local keys, args = {}, {}
  for i = 1, key_count do
    keys[i] = ARGV[at + 1 + i]
  end
  for i = 1, arg_count do
    args[i] = ARGV[at + 1 + key_count + i]
  end
  buckets[b] = {keys, args}
  at = at + 2 + key_count + arg_count
end

local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
for _, b in ipairs(buckets) do
  local keys = b[1]
  for _, window in ipairs(redis.call('ZRANGEBYSCORE', keys[1], '(' .. now, '+inf')) do
    if not string.find(window, '^layout:') and redis.call('EXISTS', window) == 0 then
      error({err = 'TRYAGAIN the windows of this slot are moving'})
    end
  end
  for i = 2, #keys do
    redis.call('EXISTS', keys[i])
  end
end

local replies = {}
for i, b in ipairs(buckets) do
  replies[i] = bucket(b[1], b[2])
end
return replies
"""
    )
