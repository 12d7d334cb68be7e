"""The dedup records' Lua scripts, shared by the Redis and the Redis Cluster stores, and
the packing of their arguments and replies. The record layout is described in
``worker/dedup/redis.py``; every script checks the claim's owner token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from worker.dedup.base import (
    BUSY,
    CLAIMED,
    FIRST_CLAIM,
    Claim,
    ClaimStatus,
    Completion,
    Inspection,
    State,
)

RUNS_TTL_SECONDS = 24 * 3600
"""How long an in-progress record, and with it the runs counted, outlives its last claim."""

# Shared by every script. The batch scripts take their ids (and per-id fields) packed
# into one argument, each field followed by the byte 0x1f (which no id, entity, token,
# origin, fingerprint or JSON reply contains): one argument instead of thousands is most
# of what a batch costs on the client, and Lua splits it with one pattern. On a
# standalone Redis (or a primary with replicas) they build the keys from the prefix they
# are given; on a Cluster the caller declares the keys (KEYS), as Redis must see them to
# route the call and to refuse it while a slot migrates (see worker/dedup/cluster.py).
_COMMON = """
local function unpack(packed)
  local out = {}
  for field in string.gmatch(packed, '([^\\31]*)\\31') do
    out[#out + 1] = field
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

-- Whether a completion under token may write over value (a record, or false): the
-- token's claim (even with its lease over), a claim nobody holds any more, or nothing.
local function completable(value, token, now)
  local owner, ends = progress(value)
  return not value or owner == token or (owner ~= nil and ends <= now)
end

-- Take the claim at key for token (first: its record with one run counted): "+1" if
-- it was free, "?" if the caller held it or its lease ended (runs counted before),
-- else the record that stops it.
local function take(key, token, lease, first, runs_ttl, now)
  if redis.call('SET', key, first, 'NX', 'EX', runs_ttl) then
    return '+1'
  end
  local value = redis.call('GET', key)
  local owner, ends, runs = progress(value)
  if owner and (owner == token or ends <= now) then
    redis.call('SET', key, in_progress(token, lease, runs), 'EX', runs_ttl)
    return '?'
  end
  return value
end
"""

# KEYS: the record keys, or none. ARGV: record-key prefix, token, lease in ms, runs TTL
# in s, packed ids (empty with KEYS). Per id: "+1"
# when the caller holds the claim now and this claim counted the id's first run; "?"
# when it holds the claim and runs were counted before; else the record that stops it.
CLAIM = (
    _COMMON
    + """
local now = now_ms()
local lease = now + tonumber(ARGV[3])
local first = in_progress(ARGV[2], lease, 1)
local out = {}
for i, key in ipairs(record_keys(ARGV[1], unpack(ARGV[5]))) do
  out[i] = take(key, ARGV[2], lease, first, ARGV[4], now)
end
return out
"""
)

# Sequence routes (worker/modes/sequence.py): an entity has a claim key, an in-progress
# record as above that exists only while the entity is claimed (or its runs counted),
# and a position key beside it holding the highest sequence applied, in decimal digits.
# Sequences are compared as digit strings (no leading zeros), so any 64-bit one is exact.
_POSITIONS = """
local function at_or_below(sequence, position)
  if #sequence ~= #position then
    return #sequence < #position
  end
  return sequence <= position
end
"""

# KEYS: each entity's claim key, then each entity's position key, in the same order.
# ARGV: token, lease in ms, runs TTL in s, packed sequences. Per entity: "s|<position>"
# if the sequence is at or below the position (stale: nothing claimed); "+1|<position>"
# or "?|<position>" if the caller holds the claim now, as CLAIM's "+1" and "?" (the
# position empty if the entity has none); else the claim record that stops it.
SEQUENCE_CLAIM = (
    _COMMON
    + _POSITIONS
    + """
local now = now_ms()
local lease = now + tonumber(ARGV[2])
local first = in_progress(ARGV[1], lease, 1)
local sequences = unpack(ARGV[4])
local n = #sequences
local out = {}
for i = 1, n do
  local position = redis.call('GET', KEYS[n + i])
  if position and at_or_below(sequences[i], position) then
    out[i] = 's|' .. position
  else
    out[i] = take(KEYS[i], ARGV[1], lease, first, ARGV[3], now)
    if out[i] == '+1' or out[i] == '?' then
      out[i] = out[i] .. '|' .. (position or '')
    end
  end
end
return out
"""
)

# KEYS: as SEQUENCE_CLAIM's. ARGV: the positions' TTL in s ("" for none), packed per
# entity: its token and sequence. Per entity, 1 if its position is now at or above the
# sequence: raised (never lowered) and the claim deleted when the token's claim (even
# with its lease over), a claim nobody holds or no claim is found; also when another
# holds the claim and the position is already there (an ambiguous completion repeated).
# Else 0: the lease was lost.
SEQUENCE_COMPLETE = (
    _COMMON
    + _POSITIONS
    + """
local now = now_ms()
local fields = unpack(ARGV[2])
local n = #fields / 2
local out = {}
for i = 1, n do
  local token, sequence = fields[2 * i - 1], fields[2 * i]
  local value = redis.call('GET', KEYS[i])
  local position = redis.call('GET', KEYS[n + i])
  if completable(value, token, now) then
    if not position or not at_or_below(sequence, position) then
      if ARGV[1] == '' then
        redis.call('SET', KEYS[n + i], sequence)
      else
        redis.call('SET', KEYS[n + i], sequence, 'EX', ARGV[1])
      end
    end
    if value then
      redis.call('DEL', KEYS[i])
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

# KEYS: the id's record key. ARGV: token, runs TTL in s. The number of this run (1 for
# the first, over every replica) if the caller holds the claim, else 0.
BEGIN = (
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
# the id, its token, origin, fingerprint and reply (kept after the fingerprint unless
# empty). Per id, 1 if completed under its token: the
# token's claim (even with its lease over), a claim nobody holds any more and an absent
# record are completed.
COMPLETE = (
    _COMMON
    + """
local now = now_ms()
local fields = unpack(ARGV[3])
local ids = {}
for i = 1, #fields / 5 do
  ids[i] = fields[5 * i - 4]
end
local out = {}
for i, key in ipairs(record_keys(ARGV[1], ids)) do
  local token = fields[5 * i - 3]
  local done = 'c|' .. token .. '|'
  local value = redis.call('GET', key)
  if completable(value, token, now) then
    local record = done .. fields[5 * i - 2] .. '|' .. fields[5 * i - 1]
    if fields[5 * i] ~= '' then
      record = record .. '|' .. fields[5 * i]
    end
    redis.call('SET', key, record, 'EX', ARGV[2])
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
RELEASE = (
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
RENEW = (
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
STATE = (
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

# KEYS: the id's record key. The record (or false), its TTL in ms, and the time in ms.
INSPECT = (
    _COMMON
    + """
return {redis.call('GET', KEYS[1]) or false, redis.call('PTTL', KEYS[1]), now_ms()}
"""
)

# KEYS: the ids' record keys. ARGV: "force" to delete claims in progress too. Per id,
# what it was: completed, in_progress, absent, or refused (in progress, not forced).
FORGET = (
    _COMMON
    + """
local now = now_ms()
local out = {}
for i, key in ipairs(KEYS) do
  local value = redis.call('GET', key)
  local token, ends = progress(value)
  if not value then
    out[i] = 'absent'
  elseif string.sub(value, 1, 2) == 'c|' then
    out[i] = 'completed'
  elseif token and token ~= '' and ends > now then
    out[i] = ARGV[1] == 'force' and 'in_progress' or 'refused'
  else
    out[i] = 'absent'  -- a claim let go or expired: only its runs are counted
  end
  if out[i] ~= 'refused' then
    redis.call('DEL', key)
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

# KEYS: the epoch marker's key. ARGV: a new epoch. The marker, set to ARGV[1] if missing.
EPOCH = """
local value = redis.call('GET', KEYS[1])
if value then
  return value
end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
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


def parse_state(name: str) -> State:
    return {"absent": State.ABSENT, "completed": State.COMPLETED}.get(name, State.IN_PROGRESS)


def parse_inspection(reply: list[Any]) -> Inspection:
    value, ttl, now = reply
    if not value:
        return Inspection(State.ABSENT)
    if value.startswith("c|"):
        claim = parse_claim(value)
        return Inspection(
            State.COMPLETED, origin=claim.origin, fingerprint=claim.fingerprint, ttl_left_ms=ttl
        )
    _, token, lease, runs = [*value.split("|"), "", "", ""][:4]
    left = int(lease or 0) - int(now)
    if not token or left <= 0:  # let go or expired: free to claim, its runs counted
        return Inspection(State.ABSENT, runs=int(runs or 0), ttl_left_ms=ttl)
    return Inspection(
        State.IN_PROGRESS, runs=int(runs or 0), owner=token, lease_left_ms=left, ttl_left_ms=ttl
    )


def parse_position_claim(reply: str) -> Claim:
    """A reply of SEQUENCE_CLAIM."""
    kind, _, position = reply.partition("|")
    known = int(position) if position.isdigit() else None
    if kind == "s":
        return Claim(ClaimStatus.COMPLETED, position=known)
    if kind == "+1":
        return Claim(ClaimStatus.CLAIMED, position=known, attempt=1)
    if kind == "?":
        return Claim(ClaimStatus.CLAIMED, position=known)
    return BUSY


def parse_claim(reply: str) -> Claim:
    if reply == "+1":
        return FIRST_CLAIM
    if reply == "?":
        return CLAIMED
    if reply.startswith("c|"):
        parts = reply.split("|", 4)  # c, token, origin, fingerprint, reply if kept
        parts += [""] * (4 - len(parts))
        return Claim(
            ClaimStatus.COMPLETED,
            parts[2] or None,
            fingerprint=parts[3] or None,
            reply=parts[4] if len(parts) > 4 else None,
        )
    return BUSY
