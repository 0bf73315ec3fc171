"""The Redis store: quotas and rate windows shared by every replica that talks to one Redis.

Open it with ``store_from_url("redis://host:6379/0", prefix="myapp")`` (``rediss://`` for TLS);
every other keyword is passed to the connection pool (``socket_timeout``, ``retry``, ...).

Durability: what the application must configure
-----------------------------------------------

Usage history, violations, suspensions and identifier maps live only in Redis, so Redis must be
run as a database, not as a cache:

- ``appendonly yes`` (AOF). ``appendfsync everysec`` loses at most about a second of writes on a
  power cut; ``appendfsync always`` loses none, at a throughput cost. RDB snapshots alone lose
  everything written since the last snapshot.
- ``maxmemory-policy noeviction``. Under any LRU/LFU/random policy Redis may silently evict
  usage history or a quota window when memory runs short, which under-counts usage and lets a
  customer past a budget. With ``noeviction`` a full Redis refuses writes instead; the library
  raises :class:`~safe_openai.StoreError` and the client can spool usage locally
  (:class:`~safe_openai.stores._spool.Spool`).
- Replication is asynchronous: a failover may lose the last writes acknowledged by the old
  primary. Quota windows recover within a minute; spool replays are idempotent by record id.

Key layout
----------

Every key starts with the ``prefix`` (default ``safe_openai``). All keys of one customer carry
the hash tag ``{<customer>}`` so they fall in one cluster slot, and each Lua script touches the
keys of a single customer only. In the tag, ``%``, ``{`` and ``}`` are percent-encoded and the
anonymous customer ``""`` is written ``%``, since an empty tag would not pin a slot::

    P:{C}:rec            hash   record key -> usage record JSON             durable
    P:{C}:recs           zset   record key, scored by created_at (us)       durable
    P:{C}:sums           hash   "<YYYYMMDD>:<column>" -> daily report sums  durable
    P:{C}:viol           zset   strike JSON, scored by created_at (us)      durable
    P:{C}:viol:other     zset   violation that is no strike, same form      durable
    P:{C}:violids        set    violation ids stored (a replay adds none)   durable
    P:{C}:susp           hash   since / until / reason                      durable
    P:{C}:q:seconds      hash   "<second>" -> "<requests>|<tokens>|<us>"   TTL 5 min
                                the minute buckets (us: latest entry)
    P:{C}:q:holds        hash   "<minute>" -> "<n>|<tokens>|<cost>|<us>"   TTL 13 min
                                pending holds for the day and month
    P:{C}:hold:<id>      string one hold: "<at us>|<tokens>|<cost>"       TTL 11 min
    P:{C}:day:<YYYYMMDD> string tokens of that UTC day                      TTL to day end + 1 day
    P:{C}:month:<YYYYMM> string cost of that UTC month                      TTL to month end + 1 day
    P:customers          set    every customer id seen                      durable
    P:suspended          set    customers with a suspension record          durable
    P:ident:<identifier> string customer id                                 durable
    P:request:<id>       string customer id                                 durable
    P:event:<id>         string webhook event: "L|<token>|<lease end us>"   TTL 7 days
                                while claimed, "done" once handled

Quota decisions follow :func:`~safe_openai.stores._types.decide` exactly, in one Lua script
that reads O(1) state (about 130 second buckets at most) on the Redis server's clock (``TIME``)
unless the caller passes ``now``: times travel as integer microseconds since the epoch (exact in
a Lua double), so the ``retry_after`` values are the same floats the reference computes. Keys of
the layout before buckets (``P:{C}:win``, ``P:{C}:pending``) are read once into the buckets by
the customer's next reservation and deleted; ``quota_usage`` counts them as that reservation
will, without moving them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import threading
import uuid
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
import redis.asyncio.cluster
import redis.cluster
import redis.exceptions

from ..errors import ConfigurationError, StoreError
from ..policy import Quota
from ..usage import UsageRecord
from ._redis_topology import (
    is_cluster,
    is_sentinel,
    open_async_client,
    open_client,
    parse_redis_url,
)
from ._types import (
    EVENT_KEEP,
    KEEP_HOLD_MINUTES,
    KEEP_SECONDS,
    RESERVATION_TTL,
    SKEW_US,
    TTL_US,
    CallStart,
    CustomerReport,
    EventClaim,
    LimitUsage,
    QuotaDemand,
    Reservation,
    Suspension,
    Violation,
    WindowSums,
    add_to_report,
    day_of,
    day_start,
    finish_report,
    from_us,
    month_start,
    next_month,
    usage_of,
)

__all__ = [
    "DEFAULT_MAX_CONNECTIONS",
    "DEFAULT_POOL_TIMEOUT",
    "DEFAULT_PREFIX",
    "DEFAULT_WAIT_TIMEOUT",
    "AsyncRedisStore",
    "RedisStore",
]

T = TypeVar("T")

#: The key prefix used when none is given.
DEFAULT_PREFIX = "safe_openai"
#: Connections a store's pool may open; more concurrent calls wait for one.
DEFAULT_MAX_CONNECTIONS = 50
#: Seconds a call waits for a pooled connection before failing with StoreError.
DEFAULT_POOL_TIMEOUT = 10.0
#: Seconds a write waits for its replicas when ``wait_replicas`` is set.
DEFAULT_WAIT_TIMEOUT = 0.5

_US = 1_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
#: A customer's second buckets expire this long after their last write (they matter 2 minutes).
_SECONDS_TTL_S = 300
#: A hold expires a minute after its TTL; its customer's buckets of holds two after that.
_HOLD_TTL_S = int(RESERVATION_TTL.total_seconds()) + 60
_HOLDS_TTL_S = _HOLD_TTL_S + 120
#: A claim's key, live, lapsed or finished, expires EVENT_KEEP after it was last written.
_EVENT_CLAIM_TTL_S = int(EVENT_KEEP.total_seconds())
_BUCKET_GRACE = timedelta(days=1)
#: Customers handled per pipelined round trip when a call spans every customer.
_SCAN_BATCH = 500

# --------------------------------------------------------------------------------------------
# Lua. Every script reads and writes the keys of one customer only (one cluster slot).

_LUA_HMGET_ALL = """
local function hmget_all(key, ids)
  local out = {}
  -- unpack() of a long list overflows the Lua stack, so fetch in chunks
  for i = 1, #ids, 500 do
    local chunk = redis.call('HMGET', key, unpack(ids, i, math.min(i + 499, #ids)))
    for _, v in ipairs(chunk) do out[#out + 1] = v end
  end
  return out
end
"""

# The quota state of one customer (see _types): seconds of the minute windows and minutes of
# pending holds, as hash fields "<index>" -> "<requests>|<tokens>|<last us>" (holds:
# "<requests>|<tokens>|<cost>|<last us>"), day and month counters, and one key per hold.
# _LUA_READ only reads (a script made of it alone needs no WAIT); _LUA_BUCKETS writes.
_LUA_READ = (
    f"""
local SKEW = {SKEW_US}
local TTL = {TTL_US}
local KEEP_SECONDS = {KEEP_SECONDS}
local KEEP_MINUTES = {KEEP_HOLD_MINUTES}
local SECONDS_TTL = {_SECONDS_TTL_S}
local HOLDS_TTL = {_HOLDS_TTL_S}
"""
    + """
local DAY = 86400000000
local MINUTE = 60000000
local function int(x) return string.format('%d', x) end
local function server_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function read_seconds(key)
  local out = {}
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local r, t, l = string.match(flat[i + 1], '^(-?%d+)|(-?%d+)|(-?%d+)$')
    out[#out + 1] = {tonumber(flat[i]), tonumber(r), tonumber(t), 0, tonumber(l)}
  end
  return out
end
local function read_holds(key)
  local out = {}
  local flat = redis.call('HGETALL', key)
  for i = 1, #flat, 2 do
    local r, t, c, l = string.match(flat[i + 1], '^(-?%d+)|(-?%d+)|([^|]*)|(-?%d+)$')
    out[#out + 1] = {tonumber(flat[i]), tonumber(r), tonumber(t), tonumber(c), tonumber(l)}
  end
  return out
end
-- KEYS[1] seconds, KEYS[2] holds, KEYS[4..7] day[-1..+2], KEYS[8..11] month[-1..+2];
-- ARGV[1] now ('' = this server's TIME), ARGV[2] first day (days since the epoch of day[-1]),
-- ARGV[3..7] starts of month[-1..+2] and of the month after (us).
-- The calendar around `now`: today, which day and month counters are its, the month starts.
local function calendar(now)
  local cal = {today = math.floor(now / DAY), starts = {}}
  cal.di = cal.today - tonumber(ARGV[2])
  for i = 0, 4 do cal.starts[i] = tonumber(ARGV[3 + i]) end
  for i = 0, 2 do
    if now >= cal.starts[i] and now < cal.starts[i + 1] then cal.mi = i end
  end
  if cal.di < 0 or cal.di > 2 or cal.mi == nil then
    return nil, 'safe_openai: the Redis clock is more than a day from this host'
  end
  return cal
end
-- What the keys of the layout before buckets hold that still counts at `now`, as the entries
-- a reservation moves into the buckets ({index, requests, tokens, cost, last us}): committed
-- calls of the minute window (seconds), and pending holds (their second, and their minute in
-- holds). Reads only.
local function old_layout(now, win_key, pending_key)
  local seconds, holds = {}, {}
  local old = redis.call('ZRANGEBYSCORE', win_key, now - 2 * MINUTE, '+inf', 'WITHSCORES')
  for i = 1, #old, 2 do
    local at = tonumber(old[i + 1])
    local tokens = tonumber(string.match(old[i], '^(%d+)|'))
    seconds[#seconds + 1] = {math.floor(at / 1000000), 1, tokens, 0, at}
  end
  for _, raw in ipairs(redis.call('HVALS', pending_key)) do
    local at, tokens, cost = string.match(raw, '^([^|]*)|([^|]*)|(.*)$')
    at = tonumber(at)
    if at > now - TTL then
      seconds[#seconds + 1] = {math.floor(at / 1000000), 1, tonumber(tokens), 0, at}
      holds[#holds + 1] = {math.floor(at / MINUTE), 1, tonumber(tokens), tonumber(cost), at}
    end
  end
  return {seconds = seconds, holds = holds}
end
-- `buckets` with `extra` entries added in, as a reservation adds them (same index: summed,
-- the later last us kept)
local function merged(buckets, extra)
  local at = {}
  for _, b in ipairs(buckets) do at[b[1]] = b end
  for _, e in ipairs(extra or {}) do
    local b = at[e[1]]
    if not b then
      b = {e[1], 0, 0, 0, e[5]}
      at[e[1]] = b
      buckets[#buckets + 1] = b
    end
    b[2], b[3], b[4] = b[2] + e[2], b[3] + e[3], b[4] + e[4]
    if e[5] > b[5] then b[5] = e[5] end
  end
  return buckets
end
-- What counts in every window at `now`, before new demand (see _types._counted): the minute
-- buckets that count, oldest first, and the sums. `drop(key, index)`, when given, is called
-- for buckets no `now` from `clock` on can count, which are skipped. `old`, when given, is
-- what old_layout found, counted as if it were in the buckets.
local function windows(now, cal, clock, drop, old)
  local horizon = now + SKEW
  local minute_from = now - MINUTE
  local w = {minute = {}, requests = 0, tokens = 0, requests_since = -1, tokens_since = -1}
  local oldest_second = math.floor(clock / 1000000) - KEEP_SECONDS
  for _, b in ipairs(merged(read_seconds(KEYS[1]), old and old.seconds)) do
    if drop and b[1] < oldest_second then
      drop(KEYS[1], b[1])
    elseif b[5] > minute_from and b[1] * 1000000 <= horizon and (b[2] > 0 or b[3] > 0) then
      w.minute[#w.minute + 1] = b
    end
  end
  table.sort(w.minute, function(a, b)
    if a[5] ~= b[5] then return a[5] < b[5] end
    return a[1] < b[1]
  end)
  for _, b in ipairs(w.minute) do
    w.requests = w.requests + b[2]
    w.tokens = w.tokens + b[3]
    if w.requests_since < 0 and b[2] > 0 then w.requests_since = b[5] end
    if w.tokens_since < 0 and b[3] > 0 then w.tokens_since = b[5] end
  end
  -- committed totals of today (and tomorrow, once now + skew reaches it) and of the month
  local di, mi = cal.di, cal.mi
  w.day_tokens = tonumber(redis.call('GET', KEYS[4 + di]) or '0')
  if math.floor(horizon / DAY) > cal.today then
    w.day_tokens = w.day_tokens + tonumber(redis.call('GET', KEYS[5 + di]) or '0')
  end
  w.month_cost = tonumber(redis.call('GET', KEYS[8 + mi]) or '0')
  if horizon >= cal.starts[mi + 1] then
    w.month_cost = w.month_cost + tonumber(redis.call('GET', KEYS[9 + mi]) or '0')
  end
  local holds = {}
  local oldest_minute = math.floor(clock / MINUTE) - KEEP_MINUTES
  for _, b in ipairs(merged(read_holds(KEYS[2]), old and old.holds)) do
    if drop and b[1] < oldest_minute then
      drop(KEYS[2], b[1])
    else
      holds[#holds + 1] = b
    end
  end
  table.sort(holds, function(a, b) return a[1] < b[1] end)
  local stale = now - TTL
  for _, b in ipairs(holds) do
    local start = b[1] * MINUTE
    if b[2] > 0 and b[5] > stale and start <= horizon then
      if start >= cal.today * DAY then w.day_tokens = w.day_tokens + b[3] end
      if start >= cal.starts[mi] then w.month_cost = w.month_cost + b[4] end
    end
  end
  return w
end
-- The sums as a reply (see _sums_from_reply): integers, and the cost with every bit.
local function sums_reply(w)
  return {int(w.requests), int(w.tokens), int(w.requests_since), int(w.tokens_since),
    int(w.day_tokens), string.format('%.17g', w.month_cost)}
end
"""
)

_LUA_BUCKETS = (
    _LUA_READ
    + """
local function get_second(key, index)
  local raw = redis.call('HGET', key, int(index))
  if not raw then return nil end
  local r, t, l = string.match(raw, '^(-?%d+)|(-?%d+)|(-?%d+)$')
  return {tonumber(r), tonumber(t), tonumber(l)}
end
local function put_second(key, index, b)
  redis.call('HSET', key, int(index), int(b[1]) .. '|' .. int(b[2]) .. '|' .. int(b[3]))
end
local function add_second(key, index, tokens, at)
  local b = get_second(key, index) or {0, 0, at}
  b[1] = b[1] + 1
  b[2] = b[2] + tokens
  if at > b[3] then b[3] = at end
  put_second(key, index, b)
  redis.call('EXPIRE', key, SECONDS_TTL)
end
local function get_hold(key, index)
  local raw = redis.call('HGET', key, int(index))
  if not raw then return nil end
  local r, t, c, l = string.match(raw, '^(-?%d+)|(-?%d+)|([^|]*)|(-?%d+)$')
  return {tonumber(r), tonumber(t), tonumber(c), tonumber(l)}
end
local function put_hold(key, index, b)
  redis.call('HSET', key, int(index),
    int(b[1]) .. '|' .. int(b[2]) .. '|' .. string.format('%.17g', b[3]) .. '|' .. int(b[4]))
end
-- a hold leaves its buckets: replaced in its second by `settled` tokens, or taken out
local function unhold(seconds_key, holds_key, raw, settled)
  local at, tokens, cost = string.match(raw, '^(-?%d+)|(-?%d+)|(.*)$')
  at = tonumber(at)
  tokens = tonumber(tokens)
  cost = tonumber(cost)
  local minute = math.floor(at / 60000000)
  local h = get_hold(holds_key, minute)
  if h then
    if h[1] <= 1 then
      h[1], h[2], h[3] = 0, 0, 0
    else
      h[1], h[2], h[3] = h[1] - 1, h[2] - tokens, h[3] - cost
    end
    put_hold(holds_key, minute, h)
  end
  local second = math.floor(at / 1000000)
  local b = get_second(seconds_key, second)
  if b then
    if settled then
      b[2] = math.max(b[2] - tokens + settled, 0)
    else
      b[1] = math.max(b[1] - 1, 0)
      b[2] = math.max(b[2] - tokens, 0)
    end
    put_second(seconds_key, second, b)
  end
  return at
end
local function add_float(key, amount, ttl)
  -- summed as doubles in call order; %.17g keeps every bit (INCRBYFLOAT would round through
  -- long double and a 17-digit string)
  local total = tonumber(redis.call('GET', key) or '0') + amount
  redis.call('SET', key, string.format('%.17g', total), 'EX', ttl)
end
"""
)

# KEYS: seconds, holds, hold, day[-1..+2], month[-1..+2] (around the caller's clock), and the
#       minute window and pending holds of the layout before buckets
# ARGV: now ('' = this server's TIME), first day (days since the epoch of day[-1]), starts
#       of month[-1..+2] and of the month after (us), rpm, tpm, tpd, usd ('' = unlimited),
#       demand tokens, demand cost, hold TTL (s), decide ('1' = check the limits)
# Reply: admitted (1/0), refusing limit, retry after (us, -1: never), now (us), then the sums
#       found before this demand (sums_reply)
_RESERVE_LUA = (
    _LUA_BUCKETS
    + """
local now
if ARGV[1] == '' then now = server_now() else now = tonumber(ARGV[1]) end
local cal, err = calendar(now)
if not cal then return redis.error_reply(err) end
local rpm = tonumber(ARGV[8])
local tpm = tonumber(ARGV[9])
local tpd = tonumber(ARGV[10])
local usd = tonumber(ARGV[11])
local demand_tokens = tonumber(ARGV[12])
local demand_cost = tonumber(ARGV[13])

-- keys of the layout before buckets are read once into the buckets and dropped: committed
-- calls of the minute window, and holds (counted until they age out: their commits by an
-- older replica are counted again, which only ever refuses earlier)
-- (old_layout reads them; the usage script counts them the same way without moving them)
if redis.call('EXISTS', KEYS[12], KEYS[13]) > 0 then
  local old = old_layout(now, KEYS[12], KEYS[13])
  for _, e in ipairs(old.seconds) do add_second(KEYS[1], e[1], e[3], e[5]) end
  for _, e in ipairs(old.holds) do
    local h = get_hold(KEYS[2], e[1]) or {0, 0, 0, e[5]}
    h[1], h[2], h[3] = h[1] + 1, h[2] + e[3], h[3] + e[4]
    if e[5] > h[4] then h[4] = e[5] end
    put_hold(KEYS[2], e[1], h)
    redis.call('EXPIRE', KEYS[2], HOLDS_TTL)
  end
  redis.call('DEL', KEYS[12], KEYS[13])
end

-- never prune past this server's clock: a caller's `now` far ahead would drop what still
-- counts for everyone else
local clock = now
if ARGV[1] ~= '' then clock = math.min(now, server_now()) end
local function drop(key, index) redis.call('HDEL', key, int(index)) end
local w = windows(now, cal, clock, drop)
local minute = w.minute

local function refuse(limit, wait)
  local reply = {0, limit, int(wait), int(now)}
  for _, v in ipairs(sums_reply(w)) do reply[#reply + 1] = v end
  return reply
end
local function frees(excess, field)
  local freed = 0
  local frees_at = now
  for _, b in ipairs(minute) do
    freed = freed + b[field]
    frees_at = b[5] + MINUTE
    if freed >= excess then break end
  end
  return math.max(0, frees_at - now)
end

if ARGV[15] == '1' then
  if rpm and w.requests + 1 > rpm then
    if rpm < 1 then return refuse('requests_per_minute', -1) end
    return refuse('requests_per_minute', frees(w.requests + 1 - rpm, 2))
  end
  if tpm and w.tokens + demand_tokens > tpm then
    if demand_tokens > tpm then return refuse('tokens_per_minute', -1) end
    return refuse('tokens_per_minute', frees(w.tokens + demand_tokens - tpm, 3))
  end
  if tpd and w.day_tokens + demand_tokens > tpd then
    if demand_tokens > tpd then return refuse('tokens_per_day', -1) end
    return refuse('tokens_per_day', (cal.today + 1) * DAY - now)
  end
  -- compared at the report's precision, as the reference does
  if usd and tonumber(string.format('%.9f', w.month_cost + demand_cost)) > usd then
    if demand_cost > usd then return refuse('usd_per_month', -1) end
    return refuse('usd_per_month', cal.starts[cal.mi + 1] - now)
  end
end

add_second(KEYS[1], math.floor(now / 1000000), demand_tokens, now)
local m = math.floor(now / MINUTE)
local h = get_hold(KEYS[2], m) or {0, 0, 0, now}
h[1] = h[1] + 1
h[2] = h[2] + demand_tokens
h[3] = h[3] + demand_cost
if now > h[4] then h[4] = now end
put_hold(KEYS[2], m, h)
redis.call('EXPIRE', KEYS[2], HOLDS_TTL)
redis.call('SET', KEYS[3], int(now) .. '|' .. ARGV[12] .. '|' .. ARGV[13], 'EX', ARGV[14])
local reply = {1, '', 0, int(now)}
for _, v in ipairs(sums_reply(w)) do reply[#reply + 1] = v end
return reply
"""
)

# KEYS and ARGV[1..7]: those of _RESERVE_LUA (the hold key is not read).
# Reply: now (us), then the sums (sums_reply). Reads only: nothing is pruned or held; keys of
# the layout before buckets count as the next reservation counts them, and stay where they are
# (that reservation moves them in).
_USAGE_LUA = (
    _LUA_READ
    + """
local now
if ARGV[1] == '' then now = server_now() else now = tonumber(ARGV[1]) end
local cal, err = calendar(now)
if not cal then return redis.error_reply(err) end
local old = old_layout(now, KEYS[12], KEYS[13])
local reply = {int(now)}
for _, v in ipairs(sums_reply(windows(now, cal, now, nil, old))) do reply[#reply + 1] = v end
return reply
"""
)

# KEYS: seconds, holds, hold, rec, recs, day, month, sums
# ARGV: record key, record JSON, created_at (us), counts (1/0), tokens, cost, day TTL,
#       month TTL, day label, quota time (us: where a record without a hold counts), then
#       (column, increment) pairs
_RECORD_LUA = (
    _LUA_BUCKETS
    + """
local hold = redis.call('GET', KEYS[3])
if hold then redis.call('DEL', KEYS[3]) end
if redis.call('HSETNX', KEYS[4], ARGV[1], ARGV[2]) == 0 then
  -- already stored: the counters moved the first time; only the hold goes
  if hold then unhold(KEYS[1], KEYS[2], hold, nil) end
  return 0
end
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
for i = 11, #ARGV, 2 do
  local column = ARGV[9] .. ':' .. ARGV[i]
  local total = tonumber(redis.call('HGET', KEYS[8], column) or '0') + tonumber(ARGV[i + 1])
  redis.call('HSET', KEYS[8], column, string.format('%.17g', total))
end
local counts = ARGV[4] == '1'
local tokens = tonumber(ARGV[5])
if hold then
  unhold(KEYS[1], KEYS[2], hold, counts and tokens or nil)
elseif counts then
  local at = tonumber(ARGV[10])
  add_second(KEYS[1], math.floor(at / 1000000), tokens, at)
end
if counts then
  redis.call('INCRBY', KEYS[6], ARGV[5])
  redis.call('EXPIRE', KEYS[6], ARGV[7])
  add_float(KEYS[7], tonumber(ARGV[6]), ARGV[8])
end
return 1
"""
)

# KEYS: seconds, holds, hold
_RELEASE_LUA = (
    _LUA_BUCKETS
    + """
local hold = redis.call('GET', KEYS[3])
if not hold then return 0 end
redis.call('DEL', KEYS[3])
unhold(KEYS[1], KEYS[2], hold, nil)
return 1
"""
)

# KEYS: sums, recs, rec, viol, susp, viol:other
# ARGV: since day label ('' = everything), since (us), end of since's day (us), violations from
_REPORT_LUA = (
    _LUA_HMGET_ALL
    + """
local since_day = tonumber(ARGV[1])
local totals, columns = {}, {}
local flat = redis.call('HGETALL', KEYS[1])
for i = 1, #flat, 2 do
  local day, column = string.match(flat[i], '^(%d+):(.+)$')
  -- whole days after the day of `since` come from the daily sums
  if since_day == nil or tonumber(day) > since_day then
    if totals[column] == nil then
      totals[column] = 0
      columns[#columns + 1] = column
    end
    totals[column] = totals[column] + tonumber(flat[i + 1])
  end
end
local sums = {}
for _, column in ipairs(columns) do
  sums[#sums + 1] = column
  sums[#sums + 1] = string.format('%.17g', totals[column])
end
-- the day of `since` itself is summed record by record
local partial = {}
if since_day ~= nil then
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[2], '(' .. ARGV[3])
  partial = hmget_all(KEYS[3], ids)
end
local violations = redis.call('ZCOUNT', KEYS[4], ARGV[4], '+inf')
local susp = redis.call('HMGET', KEYS[5], 'since', 'until')
local others = redis.call('ZCOUNT', KEYS[6], ARGV[4], '+inf')
return {sums, partial, violations, susp, others}
"""
)

# KEYS: recs, rec. ARGV: since score ('-inf' = everything), limit
_RECORDS_LUA = (
    _LUA_HMGET_ALL
    + """
local ids = redis.call('ZREVRANGEBYSCORE', KEYS[1], '+inf', ARGV[1], 'LIMIT', 0, ARGV[2])
return hmget_all(KEYS[2], ids)
"""
)


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha", hashlib.sha1(self.source.encode()).hexdigest())


# KEYS: viol, violids. ARGV: violation id ('' = none), member, score (us).
# Returns 1 when stored, 0 when that violation id was stored before.
_VIOLATION_LUA = """
if ARGV[1] ~= '' and redis.call('SADD', KEYS[2], ARGV[1]) == 0 then
  return 0
end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[2])
return 1
"""

# One key per event, so each script touches one slot. KEYS: event.
# ARGV: token, now (us), lease end (us), TTL (s). Returns claimed / held / done.
_CLAIM_EVENT_LUA = """
local state = redis.call('GET', KEYS[1])
if state == 'done' or state == '1' then
  return 'done'
end
if state then
  local lease_end = tonumber(string.match(state, '|(%d+)$'))
  if lease_end and lease_end > tonumber(ARGV[2]) then
    return 'held'
  end
end
redis.call('SET', KEYS[1], 'L|' .. ARGV[1] .. '|' .. ARGV[3], 'EX', ARGV[4])
return 'claimed'
"""

# KEYS: event. ARGV: token, TTL (s), what to do with it ('finish' or 'release').
# Returns 1 when the token held the claim.
_SETTLE_EVENT_LUA = """
local state = redis.call('GET', KEYS[1])
local mine = 'L|' .. ARGV[1] .. '|'
if not state or string.sub(state, 1, #mine) ~= mine then
  return 0
end
if ARGV[3] == 'finish' then
  redis.call('SET', KEYS[1], 'done', 'EX', ARGV[2])
else
  redis.call('DEL', KEYS[1])
end
return 1
"""

_RESERVE = _Script(_RESERVE_LUA)
_USAGE = _Script(_USAGE_LUA)
_RECORD = _Script(_RECORD_LUA)
_RELEASE = _Script(_RELEASE_LUA)
_REPORT = _Script(_REPORT_LUA)
_RECORDS = _Script(_RECORDS_LUA)
_VIOLATION = _Script(_VIOLATION_LUA)
_CLAIM_EVENT = _Script(_CLAIM_EVENT_LUA)
_SETTLE_EVENT = _Script(_SETTLE_EVENT_LUA)

# --------------------------------------------------------------------------------------------
# Commands. An operation is a generator that yields batches of commands (one pipelined round
# trip each) and receives their replies, so the sync and async stores share every decision and
# differ only in how they send a batch. A batch holding a script must be safe to send twice:
# after NOSCRIPT the driver loads the scripts and resends the batch.


@dataclass(frozen=True)
class _Cmd:
    """A redis-py client method call: ``getattr(pipeline, name)(*args, **kwargs)``."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class _Eval:
    script: _Script
    keys: tuple[str, ...]
    args: tuple[str | int, ...]


_Batch = list[_Cmd | _Eval]
_Op = Generator[_Batch, list[Any], T]


def _cmd(name: str, *args: Any, **kwargs: Any) -> _Cmd:
    return _Cmd(name, args, kwargs)


def _queue(
    pipe: Any, batch: _Batch, *, cluster: bool = False, wait: tuple[int, int] | None = None
) -> None:
    """Queue ``batch`` on ``pipe``, then ``WAIT replicas timeout_ms`` when ``wait`` is given.

    A cluster pipeline refuses EVALSHA (redis-py cannot load a missing script on the right
    node mid-pipeline), so on a cluster scripts travel as EVAL with their source: the server
    still runs them from its script cache, and the pipeline still groups the batch by node.
    """
    for item in batch:
        if isinstance(item, _Eval):
            if cluster:
                pipe.execute_command(
                    "EVAL", item.script.source, len(item.keys), *item.keys, *item.args
                )
            else:
                pipe.evalsha(item.script.sha, len(item.keys), *item.keys, *item.args)
        else:
            getattr(pipe, item.name)(*item.args, **item.kwargs)
    if wait is not None:
        pipe.execute_command("WAIT", *wait)


#: Commands that write nothing: a batch of only these (and read-only scripts) needs no WAIT.
_READ_COMMANDS = frozenset(
    {
        "get",
        "hget",
        "hmget",
        "hgetall",
        "zcount",
        "zrange",
        "zrangebyscore",
        "zrevrangebyscore",
        "zscore",
        "sscan",
        "smembers",
        "sismember",
        "scard",
        "exists",
        "ttl",
    }
)
#: What a script may call and still count as a read (a batch of reads needs no WAIT).
_LUA_READS = _READ_COMMANDS | {
    "time",
    "hexists",
    "hlen",
    "hvals",
    "zcard",
    "zrevrange",
    "llen",
    "pttl",
}
_LUA_CALL = re.compile(r"redis\.p?call\(\s*(['\"]?)(\w*)")
_SCRIPT_WRITES: dict[str, bool] = {}


def _script_writes(script: _Script) -> bool:
    """Whether a script may write: any command it calls that is not a known read, or a
    command name that is not a literal, counts as a write."""
    found = _SCRIPT_WRITES.get(script.sha)
    if found is None:
        found = any(
            not quote or name.lower() not in _LUA_READS
            for quote, name in _LUA_CALL.findall(script.source)
        )
        _SCRIPT_WRITES[script.sha] = found
    return found


def _writes(batch: _Batch) -> bool:
    """Whether ``batch`` may write (anything not known to be a read counts as a write)."""
    for item in batch:
        if isinstance(item, _Eval):
            if _script_writes(item.script):
                return True
        elif item.name not in _READ_COMMANDS:
            return True
    return False


def _check_wait(replies: list[Any], wait: tuple[int, int] | None) -> list[Any]:
    """Strip the WAIT reply; raise when fewer replicas than asked confirmed the writes."""
    if wait is None:
        return replies
    confirmed = int(replies[-1])
    if confirmed < wait[0]:
        # The writes may be lost by a failover (the replica that takes over never saw them),
        # so the caller must not count on them: a usage record goes to the spool and is
        # written again (idempotently, by record id) once a primary confirms it.
        raise StoreError(
            f"The Redis usage store's write was confirmed by {confirmed} of {wait[0]} "
            f"replica(s) within {wait[1]} ms; it may not survive a failover."
        )
    return replies[:-1]


def _scripts_in(batch: _Batch) -> list[_Script]:
    return list(
        {item.script.sha: item.script for item in batch if isinstance(item, _Eval)}.values()
    )


def _wait_for(
    client: Any, cluster: bool, replicas: int | None, timeout: float
) -> tuple[int, int] | None:
    """``(replicas, timeout ms)`` for WAIT after writes, or ``None`` not to wait."""
    if replicas is None:
        replicas = 1 if is_sentinel(client) else 0
    valid = isinstance(replicas, int) and not isinstance(replicas, bool)
    if not valid or replicas < 0 or not isinstance(timeout, (int, float)) or timeout <= 0:
        raise ConfigurationError("wait_replicas must be >= 0 and wait_timeout > 0 seconds.")
    if replicas and cluster:
        raise ConfigurationError(
            "wait_replicas is not supported on a Redis Cluster client; leave it at 0."
        )
    return (replicas, max(1, round(timeout * 1000))) if replicas else None


@contextmanager
def _store_errors() -> Iterator[None]:
    try:
        yield
    except redis.exceptions.RedisError as exc:
        raise StoreError(f"The Redis usage store failed: {type(exc).__name__}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Serialisation


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        return moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def _us(moment: datetime) -> int:
    """Microseconds since the epoch: exact in a Lua double and in a sorted-set score."""
    return (_utc(moment) - _EPOCH) // timedelta(microseconds=1)


def _day_label(moment: datetime) -> str:
    return _utc(moment).strftime("%Y%m%d")


def _month_label(moment: datetime) -> str:
    return _utc(moment).strftime("%Y%m")


def _ttl_seconds(until: datetime, moment: datetime) -> int:
    """Seconds from ``moment`` to ``until`` plus a day's grace, at least one second.

    Measured from the record's own time rather than the wall clock, so a record replayed late
    or written with a test clock still gets a window that outlives its bucket.
    """
    return max(1, int((until - _utc(moment) + _BUCKET_GRACE).total_seconds()) + 1)


def _float(value: float | int | None) -> str:
    return repr(float(value or 0.0))


def _limit(value: float | int | None) -> str:
    return "" if value is None else repr(value)


def _violation_json(violation: Violation) -> str:
    return json.dumps(
        {
            # makes two otherwise identical violations two sorted-set members
            "id": violation.violation_id or uuid.uuid4().hex,
            "violation_id": violation.violation_id,
            "customer_id": violation.customer_id,
            "created_at": violation.created_at.isoformat(),
            "source": violation.source,
            "categories": list(violation.categories),
            "top_score": violation.top_score,
            "endpoint": violation.endpoint,
            "detail": violation.detail,
            "strike": violation.strike,
        },
        separators=(",", ":"),
    )


def _violation_from_json(raw: Any) -> Violation:
    data = json.loads(_text(raw))
    return Violation(
        customer_id=data["customer_id"],
        created_at=datetime.fromisoformat(data["created_at"]),
        source=data["source"],
        categories=tuple(data["categories"]),
        top_score=data["top_score"],
        endpoint=data["endpoint"],
        detail=data["detail"],
        violation_id=data.get("violation_id") or "",
        strike=bool(data.get("strike", True)),
    )


def _suspension(customer_id: str, since: Any, until: Any, reason: Any) -> Suspension | None:
    if since is None:
        return None
    until_text = _text(until) if until is not None else ""
    return Suspension(
        customer_id=customer_id,
        since=datetime.fromisoformat(_text(since)),
        until=datetime.fromisoformat(until_text) if until_text else None,
        reason=_text(reason) if reason is not None else "",
    )


# --------------------------------------------------------------------------------------------
# Key layout


def _tag(customer_id: str) -> str:
    escaped = customer_id.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")
    return escaped or "%"


@dataclass(frozen=True)
class _Keys:
    prefix: str

    def of(self, customer_id: str, name: str) -> str:
        return f"{self.prefix}:{{{_tag(customer_id)}}}:{name}"

    @property
    def customers(self) -> str:
        return f"{self.prefix}:customers"

    @property
    def suspended(self) -> str:
        return f"{self.prefix}:suspended"

    def identifier(self, identifier: str) -> str:
        return f"{self.prefix}:ident:{identifier}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}:request:{request_id}"

    def event(self, event_id: str) -> str:
        return f"{self.prefix}:event:{event_id}"


def _identity(client: Any, prefix: str) -> str:
    """Where the data lives: server (or Sentinel service, or cluster), database and prefix,
    never the user or password."""
    pool = getattr(client, "connection_pool", None)
    options: dict[str, Any] = getattr(pool, "connection_kwargs", None) or {}
    service = getattr(pool, "service_name", None)
    nodes = getattr(getattr(client, "nodes_manager", None), "startup_nodes", None)
    if isinstance(service, str):
        where = f"sentinel:{service}"
    elif "path" in options:
        where = f"unix:{options['path']}"
    elif "host" in options:
        where = f"{options['host']}:{options.get('port', 6379)}"
    elif nodes:
        where = "cluster:" + ",".join(sorted(str(name) for name in nodes))
    else:
        where = type(client).__qualname__
    return f"redis://{where}/{options.get('db', 0)}#prefix={prefix}"


def _pool_options(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A blocking pool (a call waits for a free connection instead of failing), sized by the
    ``max_connections`` and ``pool_timeout`` keywords or URL query parameters."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    given = {name: value for name, value in query if name in ("max_connections", "pool_timeout")}
    kept = [(name, value) for name, value in query if name not in given]
    url = urlunsplit(parts._replace(query=urlencode(kept)))
    options = dict(options)
    try:
        size = int(
            options.pop("max_connections", given.get("max_connections", DEFAULT_MAX_CONNECTIONS))
        )
        wait = float(options.pop("pool_timeout", given.get("pool_timeout", DEFAULT_POOL_TIMEOUT)))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError("max_connections and pool_timeout must be numbers.") from exc
    if size < 1 or not wait > 0 or wait == float("inf"):
        raise ConfigurationError("max_connections must be >= 1 and pool_timeout > 0 seconds.")
    return url, {**options, "max_connections": size, "timeout": wait}


def _gate_limits(connection: dict[str, Any]) -> tuple[int, float]:
    """The pool size and wait of a cluster or Sentinel client opened from a URL, taken out of
    its connection options.

    redis-py's cluster and Sentinel pools raise ``MaxConnectionsError`` when every connection is
    busy instead of waiting, so the store itself admits at most ``max_connections`` exchanges
    at a time and makes the others wait up to ``pool_timeout`` (then :class:`StoreError`).
    """
    _, options = _pool_options("redis://gate", connection)
    size, wait = int(options["max_connections"]), float(options.pop("timeout"))
    # The client's own bound leaves room for what it does besides the store's exchanges
    # (topology discovery, script loads on every primary), so only the gate ever waits.
    options["max_connections"] = 2 * size + 8
    connection.clear()
    connection.update(options)
    return size, wait


def _gate_timeout(wait: float) -> StoreError:
    return StoreError(
        f"The Redis usage store failed: every pooled connection stayed busy for {wait:g} s "
        "(raise max_connections or pool_timeout)."
    )


def _check_prefix(prefix: str) -> str:
    if not prefix or "{" in prefix or "}" in prefix:
        raise ConfigurationError(
            "The Redis key prefix must be non-empty and free of '{' and '}' (they would move "
            "every key into one cluster slot)."
        )
    return prefix


# --------------------------------------------------------------------------------------------
# Operations (shared by both stores)


def _quota_keys(keys: _Keys, customer_id: str, reservation_id: str) -> tuple[str, str, str]:
    """The customer's second buckets, buckets of holds, and the key of one hold."""
    return (
        keys.of(customer_id, "q:seconds"),
        keys.of(customer_id, "q:holds"),
        keys.of(customer_id, f"hold:{reservation_id}"),
    )


def _counter_keys_and_args(
    keys: _Keys, customer_id: str, now: datetime | None
) -> tuple[tuple[str, ...], tuple[str | int, ...]]:
    """KEYS[4..11] and ARGV[1..7] of the quota scripts: the day and month counters around the
    caller's clock (or the given ``now``), and where those days and months start."""
    # The caller's clock (or the given now) only picks the day and month counters around it;
    # with now=None the script decides on the Redis server's clock.
    local = _utc(now) if now is not None else datetime.now(timezone.utc)
    today = day_start(local)
    days = [today + timedelta(days=offset) for offset in (-1, 0, 1, 2)]
    this_month = month_start(local)
    months = [month_start(this_month - timedelta(days=1)), this_month]
    while len(months) < 5:
        months.append(next_month(months[-1]))
    return (
        (
            *(keys.of(customer_id, f"day:{_day_label(day)}") for day in days),
            *(keys.of(customer_id, f"month:{_month_label(month)}") for month in months[:4]),
        ),
        (
            "" if now is None else _us(local),
            day_of(_us(days[0])),
            *(_us(month) for month in months),
        ),
    )


def _reserve_eval(
    keys: _Keys, customer_id: str, quota: Quota, demand: QuotaDemand, now: datetime | None
) -> tuple[_Eval, str]:
    """The reservation script for one call, and the id its hold gets."""
    counter_keys, counter_args = _counter_keys_and_args(keys, customer_id, now)
    reservation_id = uuid.uuid4().hex
    script = _Eval(
        _RESERVE,
        (
            *_quota_keys(keys, customer_id, reservation_id),
            *counter_keys,
            keys.of(customer_id, "win"),
            keys.of(customer_id, "pending"),
        ),
        (
            *counter_args,
            _limit(quota.requests_per_minute),
            _limit(quota.tokens_per_minute),
            _limit(quota.tokens_per_day),
            _limit(quota.usd_per_month),
            int(demand.tokens),
            _float(demand.cost_usd),
            _HOLD_TTL_S,
            "0" if quota.is_unlimited else "1",
        ),
    )
    return script, reservation_id


def _sums_from_reply(reply: Sequence[Any]) -> WindowSums:
    """The window sums a quota script returned (its ``sums_reply``)."""
    requests, tokens, requests_since, tokens_since, day_tokens = (int(v) for v in reply[:5])
    return WindowSums(
        requests=requests,
        tokens=tokens,
        requests_since_us=None if requests_since < 0 else requests_since,
        tokens_since_us=None if tokens_since < 0 else tokens_since,
        day_tokens=day_tokens,
        month_cost=float(reply[5]),
    )


def _reservation(reply: Any, reservation_id: str, customer_id: str, quota: Quota) -> Reservation:
    now_us = int(reply[3])
    usage = usage_of(quota, _sums_from_reply(reply[4:]), now_us)
    if int(reply[0]) == 1:
        return Reservation(reservation_id, customer_id, True, at=from_us(now_us), usage=usage)
    retry_us = int(reply[2])
    # integer microseconds / 10**6 is exactly how the reference rounds
    retry_after = None if retry_us < 0 else retry_us / _US
    return Reservation("", customer_id, False, _text(reply[1]), retry_after, usage=usage)


def _reserve(
    keys: _Keys, customer_id: str, quota: Quota, demand: QuotaDemand, now: datetime | None
) -> _Op[Reservation]:
    script, reservation_id = _reserve_eval(keys, customer_id, quota, demand, now)
    (reply,) = yield [script]
    return _reservation(reply, reservation_id, customer_id, quota)


def _quota_usage(
    keys: _Keys, customer_id: str, quota: Quota, now: datetime | None
) -> _Op[tuple[LimitUsage, ...]]:
    """A customer's usage of each limit, read by one read-only script."""
    if quota.is_unlimited:
        return ()
    counter_keys, counter_args = _counter_keys_and_args(keys, customer_id, now)
    old = (keys.of(customer_id, "win"), keys.of(customer_id, "pending"))
    (reply,) = yield [
        _Eval(_USAGE, (*_quota_keys(keys, customer_id, ""), *counter_keys, *old), counter_args)
    ]
    return usage_of(quota, _sums_from_reply(reply[1:]), int(reply[0]))


def _begin_call(
    keys: _Keys,
    customer_id: str,
    quota: Quota | None,
    demand: QuotaDemand,
    identifier: str | None,
) -> _Op[CallStart]:
    """Standing, reservation and identifier map in one pipelined round trip (the identifier
    map lives in another slot, so it is its own command). A suspended customer's hold, if the
    script placed one, is released in a second trip: suspended customers are refused anyway."""
    batch: _Batch = [_cmd("hmget", keys.of(customer_id, "susp"), list(_SUSPENSION_FIELDS))]
    reservation_id = ""
    if quota is not None:
        script, reservation_id = _reserve_eval(keys, customer_id, quota, demand, None)
        batch.append(script)
    if identifier is not None:
        batch.append(_cmd("set", keys.identifier(identifier), customer_id))
    replies = yield batch
    reservation = (
        None if quota is None else _reservation(replies[1], reservation_id, customer_id, quota)
    )
    now = reservation.at if reservation is not None and reservation.at else None
    suspension = _suspension(customer_id, *replies[0])
    if suspension is not None and suspension.active_at(now or datetime.now(timezone.utc)):
        if reservation is not None and reservation.admitted:
            yield from _release(keys, reservation)
        return CallStart(suspension, None)
    return CallStart(None, reservation)


def _record(keys: _Keys, record: UsageRecord, reservation: Reservation | None) -> _Op[None]:
    yield _record_batch(keys, record, reservation)


def _record_batch(keys: _Keys, record: UsageRecord, reservation: Reservation | None) -> _Batch:
    customer = record.customer_id
    at = _utc(record.created_at)
    # where the record counts when it settles no hold: at its reservation's time, else its own
    quota_at = _utc(reservation.at) if reservation is not None and reservation.at else at
    # a record without an id gets one, as in the SQL stores, and is read back with it
    key = record.record_id or uuid.uuid4().hex
    sums: dict[str, dict[str, float | int]] = {}
    add_to_report(sums, record)
    columns = [(name, value) for name, value in sums[customer].items() if value]
    columns.append(("records", 1))
    reservation_id = reservation.id if reservation is not None else ""
    return [
        # the set of customers lives in another slot, so it is kept outside the script; a
        # customer listed with nothing written yet shows in no report
        _cmd("sadd", keys.customers, customer),
        _Eval(
            _RECORD,
            (
                *_quota_keys(keys, customer, reservation_id),
                keys.of(customer, "rec"),
                keys.of(customer, "recs"),
                keys.of(customer, f"day:{_day_label(quota_at)}"),
                keys.of(customer, f"month:{_month_label(quota_at)}"),
                keys.of(customer, "sums"),
            ),
            (
                key,
                json.dumps({**record.to_dict(), "record_id": key}, separators=(",", ":")),
                _us(at),
                "1" if record.counts_as_request else "0",
                record.tokens.total_tokens,
                _float(record.cost_usd),
                _ttl_seconds(day_start(quota_at) + timedelta(days=1), quota_at),
                _ttl_seconds(next_month(quota_at), quota_at),
                _day_label(at),
                _us(quota_at),
                *(part for name, value in columns for part in (name, _float(value))),
            ),
        ),
    ]


def _commit(
    keys: _Keys, reservation: Reservation | None, record: UsageRecord, request_id: str | None = None
) -> _Op[None]:
    if reservation is not None and reservation.id and reservation.customer_id != record.customer_id:
        # two customers are two slots: drop the hold first, then write the record
        yield from _release(keys, reservation)
        reservation = None
    batch = _record_batch(keys, record, reservation)
    if request_id:
        # the request map lives in another slot: its own command, in the same round trip
        batch.append(_cmd("set", keys.request(request_id), record.customer_id))
    yield batch


def _release(keys: _Keys, reservation: Reservation) -> _Op[None]:
    if reservation.id:
        yield [_Eval(_RELEASE, _quota_keys(keys, reservation.customer_id, reservation.id), ())]


def _customers(keys: _Keys, only: str | None) -> Generator[_Batch, list[Any], list[list[str]]]:
    """Every known customer (or just ``only``), in batches for pipelining."""
    if only is not None:
        return [[only]]
    seen: set[str] = set()
    cursor: int = 0
    while True:
        ((cursor, members),) = yield [_cmd("sscan", keys.customers, cursor, count=_SCAN_BATCH)]
        seen.update(_text(m) for m in members)
        if int(cursor) == 0:
            break
    ordered = sorted(seen)
    return [ordered[i : i + _SCAN_BATCH] for i in range(0, len(ordered), _SCAN_BATCH)]


def _usage_records(
    keys: _Keys, customer_id: str | None, since: datetime | None, limit: int
) -> _Op[list[UsageRecord]]:
    if limit <= 0:
        return []
    since_score = "-inf" if since is None else str(_us(since))
    found: list[UsageRecord] = []
    for batch in (yield from _customers(keys, customer_id)):
        replies = yield [
            _Eval(_RECORDS, (keys.of(c, "recs"), keys.of(c, "rec")), (since_score, limit))
            for c in batch
        ]
        for reply in replies:
            found += (UsageRecord.from_dict(json.loads(_text(raw))) for raw in reply if raw)
        found.sort(key=lambda r: r.created_at, reverse=True)
        del found[limit:]
    return found


def _usage_report(
    keys: _Keys, since: datetime | None, customer_id: str | None
) -> _Op[list[CustomerReport]]:
    if since is None:
        args: tuple[str | int, ...] = ("", 0, 0, "-inf")
    else:
        since_day = day_start(since)
        args = (_day_label(since), _us(since), _us(since_day + timedelta(days=1)), _us(since))
    sums: dict[str, dict[str, float | int]] = {}
    violations: dict[str, int] = {}
    strikes: dict[str, int] = {}
    suspended: set[str] = set()
    now = datetime.now(timezone.utc)
    for batch in (yield from _customers(keys, customer_id)):
        replies = yield [
            _Eval(
                _REPORT,
                tuple(
                    keys.of(c, name)
                    for name in ("sums", "recs", "rec", "viol", "susp", "viol:other")
                ),
                args,
            )
            for c in batch
        ]
        for customer, (flat, partial, strike_count, susp, others) in zip(
            batch, replies, strict=True
        ):
            columns = {_text(flat[i]): float(_text(flat[i + 1])) for i in range(0, len(flat), 2)}
            if columns.pop("records", 0) or partial:
                row = sums.setdefault(customer, {})
                for name, value in columns.items():
                    row[name] = value if name == "cost_usd" else int(value)
                if partial:
                    # add_to_report only adds to columns that exist, so give it every one
                    scratch: dict[str, dict[str, float | int]] = {}
                    for raw in partial:
                        if raw:
                            add_to_report(scratch, UsageRecord.from_dict(json.loads(_text(raw))))
                    for name, value in scratch.get(customer, {}).items():
                        row[name] = row.get(name, 0) + value
            if int(strike_count) or int(others):
                violations[customer] = int(strike_count) + int(others)
                strikes[customer] = int(strike_count)
            suspension = _suspension(customer, susp[0], susp[1], "")
            if suspension is not None and suspension.active_at(now):
                suspended.add(customer)
    return finish_report(sums, violations, suspended, strikes)


def _record_violation(keys: _Keys, violation: Violation) -> _Op[bool]:
    customer_id = violation.customer_id
    _, stored = yield [
        _cmd("sadd", keys.customers, customer_id),
        _Eval(
            _VIOLATION,
            (
                keys.of(customer_id, "viol" if violation.strike else "viol:other"),
                keys.of(customer_id, "violids"),
            ),
            (violation.violation_id, _violation_json(violation), _us(violation.created_at)),
        ),
    ]
    return bool(int(stored))


def _count_violations(keys: _Keys, customer_id: str, since: datetime) -> _Op[int]:
    (count,) = yield [_cmd("zcount", keys.of(customer_id, "viol"), _us(since), "+inf")]
    return int(count)


def _violations(
    keys: _Keys, customer_id: str | None, since: datetime | None, limit: int
) -> _Op[list[Violation]]:
    if limit <= 0:
        return []
    low = "-inf" if since is None else _us(since)
    found: list[Violation] = []
    for batch in (yield from _customers(keys, customer_id)):
        replies = yield [
            _cmd("zrevrangebyscore", keys.of(c, name), "+inf", low, start=0, num=limit)
            for c in batch
            for name in ("viol", "viol:other")
        ]
        for reply in replies:
            found += (_violation_from_json(raw) for raw in reply)
        found.sort(key=lambda v: v.created_at, reverse=True)
        del found[limit:]
    return found


def _suspend(
    keys: _Keys, customer_id: str, reason: str, until: datetime | None, now: datetime
) -> _Op[None]:
    # the listing sets first: a listed customer without a suspension hash is skipped, while a
    # suspension missing from the listing would hide from `suspensions()`
    yield [
        _cmd("sadd", keys.customers, customer_id),
        _cmd("sadd", keys.suspended, customer_id),
        _cmd(
            "hset",
            keys.of(customer_id, "susp"),
            mapping={
                "since": now.isoformat(),
                "until": until.isoformat() if until is not None else "",
                "reason": reason,
            },
        ),
    ]


def _unsuspend(keys: _Keys, customer_id: str) -> _Op[bool]:
    deleted, _ = yield [
        _cmd("delete", keys.of(customer_id, "susp")),
        _cmd("srem", keys.suspended, customer_id),
    ]
    return int(deleted) > 0


_SUSPENSION_FIELDS = ("since", "until", "reason")


def _get_suspension(keys: _Keys, customer_id: str, now: datetime) -> _Op[Suspension | None]:
    (fields,) = yield [_cmd("hmget", keys.of(customer_id, "susp"), list(_SUSPENSION_FIELDS))]
    found = _suspension(customer_id, *fields)
    return found if found is not None and found.active_at(now) else None


def _suspensions(keys: _Keys, now: datetime) -> _Op[list[Suspension]]:
    (members,) = yield [_cmd("smembers", keys.suspended)]
    customers = sorted(_text(m) for m in members)
    found: list[Suspension] = []
    for start in range(0, len(customers), _SCAN_BATCH):
        batch = customers[start : start + _SCAN_BATCH]
        replies = yield [_cmd("hmget", keys.of(c, "susp"), list(_SUSPENSION_FIELDS)) for c in batch]
        for customer, fields in zip(batch, replies, strict=True):
            suspension = _suspension(customer, *fields)
            if suspension is not None and suspension.active_at(now):
                found.append(suspension)
    return found


def _set(key: str, value: str) -> _Op[None]:
    yield [_cmd("set", key, value)]


def _get(key: str) -> _Op[str | None]:
    (value,) = yield [_cmd("get", key)]
    return None if value is None else _text(value)


def _claim_event(
    keys: _Keys, event_id: str, token: str, now: datetime, lease: timedelta
) -> _Op[EventClaim]:
    (state,) = yield [
        _Eval(
            _CLAIM_EVENT,
            (keys.event(event_id),),
            # a live lease never expires first
            (
                token,
                _us(now),
                _us(now + lease),
                max(_EVENT_CLAIM_TTL_S, int(lease.total_seconds()) + 1),
            ),
        )
    ]
    found = _text(state)
    return "claimed" if found == "claimed" else "held" if found == "held" else "done"


def _settle_event(keys: _Keys, event_id: str, token: str, how: str) -> _Op[bool]:
    (mine,) = yield [
        _Eval(_SETTLE_EVENT, (keys.event(event_id),), (token, _EVENT_CLAIM_TTL_S, how))
    ]
    return bool(int(mine))


# --------------------------------------------------------------------------------------------
# The stores


class RedisStore:
    """A usage store in Redis, shared by every process and host that uses the same Redis.

    Quota reservations are one atomic Lua script each, so concurrent requests on any number of
    replicas never overshoot a limit. See the module documentation for the persistence Redis
    needs and the key layout.

    Args:
        client: A ``redis.Redis`` client (one server, or ``Sentinel.master_for``) or a
            ``redis.cluster.RedisCluster`` (``decode_responses`` either way).
        prefix: Namespace of every key, so several applications can share one Redis.
        owns_client: Whether :meth:`close` closes ``client``.
        wait_replicas: After each batch of writes, wait until this many replicas confirmed
            them (``WAIT``), and raise :class:`~safe_openai.StoreError` when fewer did: a write
            a failover could lose is then spooled and written again instead of trusted.
            Default: 1 on a Sentinel-managed primary, 0 (do not wait) otherwise. Not
            supported on a cluster client.
        wait_timeout: Seconds ``WAIT`` waits for the replicas (default 0.5).
    """

    def __init__(
        self,
        client: redis.Redis | redis.cluster.RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = False,
        wait_replicas: int | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        self.client = client
        self.prefix = _check_prefix(prefix)
        self._keys = _Keys(self.prefix)
        #: Names this store's data (the spool is kept per identity).
        self.identity = _identity(client, self.prefix)
        self._owns_client = owns_client
        self._cluster = is_cluster(client)
        self._wait = _wait_for(client, self._cluster, wait_replicas, wait_timeout)
        self._also_close: list[Any] = []
        #: At most this many exchanges at a time (cluster and Sentinel clients opened from a
        #: URL, whose pools fail instead of waiting); ``None``: the client's pool waits itself.
        self._gate: threading.BoundedSemaphore | None = None
        self._gate_wait = DEFAULT_POOL_TIMEOUT

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStore:
        """Open a store from a Redis URL: one server, a cluster or a Sentinel-managed primary.

        Args:
            url: ``redis://localhost:6379/0``, ``redis+cluster://h1:6379,h2:6379``,
                ``redis+sentinel://s1:26379,s2:26379/service`` (``rediss`` for TLS); see
                :mod:`safe_openai.stores._redis_topology` for every form and option.
            **options: ``prefix``, ``wait_replicas``, ``wait_timeout``, the topology's options,
                and connection options for redis-py (``socket_timeout``, ``retry``, ...); each
                may be given in the URL's query string instead. On one server, also
                ``max_connections`` (the pool's size, default :data:`DEFAULT_MAX_CONNECTIONS`)
                and ``pool_timeout`` (seconds a call waits for a pooled connection before
                :class:`~safe_openai.StoreError`, default :data:`DEFAULT_POOL_TIMEOUT`).

        Raises:
            ConfigurationError: The URL or an option is invalid.
        """
        parsed = parse_redis_url(url, options)
        _check_prefix(parsed.store.get("prefix", DEFAULT_PREFIX))
        if parsed.topology == "server":
            pool_url, pool_options = _pool_options(parsed.url, parsed.connection)
            with _store_errors():
                client = redis.Redis(
                    connection_pool=redis.BlockingConnectionPool.from_url(pool_url, **pool_options)
                )
            client.auto_close_connection_pool = True
            return cls(client, owns_client=True, **parsed.store)
        size, wait = _gate_limits(parsed.connection)
        opened = open_client(parsed)
        store = cls(opened.client, owns_client=True, **parsed.store)
        store._also_close = opened.also_close
        store._gate, store._gate_wait = threading.BoundedSemaphore(size), wait
        return store

    def _send(self, batch: _Batch) -> list[Any]:
        if self._gate is None:
            return self._exchange(batch)
        if not self._gate.acquire(timeout=self._gate_wait):
            raise _gate_timeout(self._gate_wait)
        try:
            return self._exchange(batch)
        finally:
            self._gate.release()

    def _exchange(self, batch: _Batch) -> list[Any]:
        if self._cluster:
            if len(batch) == 1 and isinstance(batch[0], _Eval):
                # one script (a reservation, a release): EVALSHA, routed by its keys' slot,
                # rather than the script's source in a pipeline
                return [self._cluster_script(batch[0])]
            pipe = self.client.pipeline(transaction=False)
            _queue(pipe, batch, cluster=True)
            return pipe.execute()
        wait = self._wait if self._wait is not None and _writes(batch) else None
        pipe = self.client.pipeline(transaction=False)
        _queue(pipe, batch, wait=wait)
        try:
            return _check_wait(pipe.execute(), wait)
        except redis.exceptions.NoScriptError:
            # first use on this server, or its script cache was flushed
            for script in _scripts_in(batch):
                self.client.script_load(script.source)
            pipe = self.client.pipeline(transaction=False)
            _queue(pipe, batch, wait=wait)
            return _check_wait(pipe.execute(), wait)

    def _cluster_script(self, item: _Eval) -> Any:
        client: Any = self.client
        args = (*item.keys, *item.args)
        try:
            return client.evalsha(item.script.sha, len(item.keys), *args)
        except redis.exceptions.NoScriptError:
            client.script_load(item.script.source)  # on every primary
            return client.evalsha(item.script.sha, len(item.keys), *args)

    def _run(self, op: _Op[T]) -> T:
        with _store_errors():
            try:
                batch = next(op)
                while True:
                    batch = op.send(self._send(batch))
            except StopIteration as done:
                result: T = done.value
                return result

    def reserve(
        self,
        customer_id: str,
        quota: Quota,
        demand: QuotaDemand,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending.

        ``now`` defaults to the Redis server's clock (``TIME``), shared by every replica.
        """
        return self._run(_reserve(self._keys, customer_id, quota, demand, now))

    def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        """What the customer has used of each limit ``quota`` sets at ``now`` (default: the
        Redis server's clock), pending holds included. One read-only script: nothing held."""
        return self._run(_quota_usage(self._keys, customer_id, quota, now))

    def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        """Standing, reservation (on the server's clock) and identifier map of a call about to
        be sent, in one round trip. A suspended customer gets no reservation."""
        return self._run(_begin_call(self._keys, customer_id, quota, demand, identifier))

    def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        """Settle a call in one round trip: commit (or record) its usage, map its request id."""
        self._run(_commit(self._keys, reservation, record, request_id))

    def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        self._run(_commit(self._keys, reservation, record))

    def release(self, reservation: Reservation) -> None:
        self._run(_release(self._keys, reservation))

    def record_usage(self, record: UsageRecord) -> None:
        self._run(_record(self._keys, record, None))

    def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        return self._run(_usage_records(self._keys, customer_id, since, limit))

    def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        return self._run(_usage_report(self._keys, since, customer_id))

    def record_violation(self, violation: Violation) -> bool:
        return self._run(_record_violation(self._keys, violation))

    def count_violations(self, customer_id: str, *, since: datetime) -> int:
        return self._run(_count_violations(self._keys, customer_id, since))

    def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        return self._run(_violations(self._keys, customer_id, since, limit))

    def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        self._run(_suspend(self._keys, customer_id, reason, until, now))

    def unsuspend(self, customer_id: str) -> bool:
        return self._run(_unsuspend(self._keys, customer_id))

    def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        return self._run(_get_suspension(self._keys, customer_id, now))

    def suspensions(self, *, now: datetime) -> list[Suspension]:
        return self._run(_suspensions(self._keys, now))

    def remember_identifier(self, identifier: str, customer_id: str) -> None:
        self._run(_set(self._keys.identifier(identifier), customer_id))

    def customer_for_identifier(self, identifier: str) -> str | None:
        return self._run(_get(self._keys.identifier(identifier)))

    def remember_request(self, request_id: str, customer_id: str) -> None:
        self._run(_set(self._keys.request(request_id), customer_id))

    def customer_for_request(self, request_id: str) -> str | None:
        return self._run(_get(self._keys.request(request_id)))

    def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        return self._run(_claim_event(self._keys, event_id, token, now, lease))

    def finish_event(self, event_id: str, *, token: str) -> bool:
        return self._run(_settle_event(self._keys, event_id, token, "finish"))

    def release_event(self, event_id: str, *, token: str) -> None:
        self._run(_settle_event(self._keys, event_id, token, "release"))

    def close(self) -> None:
        """Close the client (and its Sentinel connections) when this store opened it."""
        if self._owns_client:
            with _store_errors():
                self.client.close()
                for other in self._also_close:
                    other.close()


class AsyncRedisStore:
    """The asyncio twin of :class:`RedisStore` (``redis.asyncio``), same keys and scripts.

    Args:
        client: A ``redis.asyncio.Redis`` client (one server, or ``Sentinel.master_for``) or
            a ``redis.asyncio.cluster.RedisCluster``.
        prefix: Namespace of every key.
        owns_client: Whether :meth:`close` closes ``client``.
        wait_replicas: As for :class:`RedisStore`.
        wait_timeout: As for :class:`RedisStore`.
    """

    def __init__(
        self,
        client: redis.asyncio.Redis | redis.asyncio.cluster.RedisCluster,
        *,
        prefix: str = DEFAULT_PREFIX,
        owns_client: bool = False,
        wait_replicas: int | None = None,
        wait_timeout: float = DEFAULT_WAIT_TIMEOUT,
    ) -> None:
        self.client = client
        self.prefix = _check_prefix(prefix)
        self._keys = _Keys(self.prefix)
        #: Names this store's data (the spool is kept per identity).
        self.identity = _identity(client, self.prefix)
        self._owns_client = owns_client
        self._cluster = is_cluster(client)
        self._wait = _wait_for(client, self._cluster, wait_replicas, wait_timeout)
        self._also_close: list[Any] = []
        #: As :attr:`RedisStore._gate`, for asyncio.
        self._gate: asyncio.Semaphore | None = None
        self._gate_wait = DEFAULT_POOL_TIMEOUT

    @classmethod
    def from_url(cls, url: str, **options: Any) -> AsyncRedisStore:
        """Open a store from a Redis URL (connects on first use); as :meth:`RedisStore.from_url`.

        Raises:
            ConfigurationError: The URL or an option is invalid.
        """
        parsed = parse_redis_url(url, options)
        _check_prefix(parsed.store.get("prefix", DEFAULT_PREFIX))
        if parsed.topology == "server":
            pool_url, pool_options = _pool_options(parsed.url, parsed.connection)
            with _store_errors():
                pool = redis.asyncio.BlockingConnectionPool.from_url(pool_url, **pool_options)
                client = redis.asyncio.Redis(connection_pool=pool)
            client.auto_close_connection_pool = True
            return cls(client, owns_client=True, **parsed.store)
        size, wait = _gate_limits(parsed.connection)
        opened = open_async_client(parsed)
        store = cls(opened.client, owns_client=True, **parsed.store)
        store._also_close = opened.also_close
        store._gate, store._gate_wait = asyncio.Semaphore(size), wait
        return store

    async def _send(self, batch: _Batch) -> list[Any]:
        if self._gate is None:
            return await self._exchange(batch)
        try:
            await asyncio.wait_for(self._gate.acquire(), self._gate_wait)
        except asyncio.TimeoutError:
            raise _gate_timeout(self._gate_wait) from None
        try:
            return await self._exchange(batch)
        finally:
            self._gate.release()

    async def _exchange(self, batch: _Batch) -> list[Any]:
        if self._cluster:
            # redis-py's asyncio cluster client breaks connections when commands race its
            # first topology discovery; initialising first (a flag check afterwards) avoids it
            await self.client.initialize()
            if len(batch) == 1 and isinstance(batch[0], _Eval):
                return [await self._cluster_script(batch[0])]
            pipe = self.client.pipeline(transaction=False)
            _queue(pipe, batch, cluster=True)
            return await pipe.execute()
        wait = self._wait if self._wait is not None and _writes(batch) else None
        pipe = self.client.pipeline(transaction=False)
        _queue(pipe, batch, wait=wait)
        try:
            return _check_wait(await pipe.execute(), wait)
        except redis.exceptions.NoScriptError:
            for script in _scripts_in(batch):
                await self.client.script_load(script.source)
            pipe = self.client.pipeline(transaction=False)
            _queue(pipe, batch, wait=wait)
            return _check_wait(await pipe.execute(), wait)

    async def _cluster_script(self, item: _Eval) -> Any:
        client: Any = self.client
        args = (*item.keys, *item.args)
        try:
            return await client.evalsha(item.script.sha, len(item.keys), *args)
        except redis.exceptions.NoScriptError:
            await client.script_load(item.script.source)  # on every primary
            return await client.evalsha(item.script.sha, len(item.keys), *args)

    async def _run(self, op: _Op[T]) -> T:
        with _store_errors():
            try:
                batch = next(op)
                while True:
                    batch = op.send(await self._send(batch))
            except StopIteration as done:
                result: T = done.value
                return result

    async def reserve(
        self,
        customer_id: str,
        quota: Quota,
        demand: QuotaDemand,
        *,
        now: datetime | None = None,
    ) -> Reservation:
        """Atomically check ``demand`` against ``quota`` and, if admitted, hold it as pending.

        ``now`` defaults to the Redis server's clock (``TIME``), shared by every replica.
        """
        return await self._run(_reserve(self._keys, customer_id, quota, demand, now))

    async def quota_usage(
        self, customer_id: str, quota: Quota, *, now: datetime | None = None
    ) -> tuple[LimitUsage, ...]:
        """What the customer has used of each limit ``quota`` sets at ``now`` (default: the
        Redis server's clock), pending holds included. One read-only script: nothing held."""
        return await self._run(_quota_usage(self._keys, customer_id, quota, now))

    async def begin_call(
        self,
        customer_id: str,
        quota: Quota | None,
        demand: QuotaDemand,
        *,
        identifier: str | None = None,
    ) -> CallStart:
        """Standing, reservation (on the server's clock) and identifier map of a call about to
        be sent, in one round trip. A suspended customer gets no reservation."""
        return await self._run(_begin_call(self._keys, customer_id, quota, demand, identifier))

    async def finish_call(
        self, reservation: Reservation | None, record: UsageRecord, *, request_id: str | None = None
    ) -> None:
        """Settle a call in one round trip: commit (or record) its usage, map its request id."""
        await self._run(_commit(self._keys, reservation, record, request_id))

    async def commit(self, reservation: Reservation, record: UsageRecord) -> None:
        await self._run(_commit(self._keys, reservation, record))

    async def release(self, reservation: Reservation) -> None:
        await self._run(_release(self._keys, reservation))

    async def record_usage(self, record: UsageRecord) -> None:
        await self._run(_record(self._keys, record, None))

    async def usage_records(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[UsageRecord]:
        return await self._run(_usage_records(self._keys, customer_id, since, limit))

    async def usage_report(
        self, *, since: datetime | None = None, customer_id: str | None = None
    ) -> list[CustomerReport]:
        return await self._run(_usage_report(self._keys, since, customer_id))

    async def record_violation(self, violation: Violation) -> bool:
        return await self._run(_record_violation(self._keys, violation))

    async def count_violations(self, customer_id: str, *, since: datetime) -> int:
        return await self._run(_count_violations(self._keys, customer_id, since))

    async def violations(
        self, *, customer_id: str | None = None, since: datetime | None = None, limit: int = 1000
    ) -> list[Violation]:
        return await self._run(_violations(self._keys, customer_id, since, limit))

    async def suspend(
        self, customer_id: str, *, reason: str, until: datetime | None, now: datetime
    ) -> None:
        await self._run(_suspend(self._keys, customer_id, reason, until, now))

    async def unsuspend(self, customer_id: str) -> bool:
        return await self._run(_unsuspend(self._keys, customer_id))

    async def suspension(self, customer_id: str, *, now: datetime) -> Suspension | None:
        return await self._run(_get_suspension(self._keys, customer_id, now))

    async def suspensions(self, *, now: datetime) -> list[Suspension]:
        return await self._run(_suspensions(self._keys, now))

    async def remember_identifier(self, identifier: str, customer_id: str) -> None:
        await self._run(_set(self._keys.identifier(identifier), customer_id))

    async def customer_for_identifier(self, identifier: str) -> str | None:
        return await self._run(_get(self._keys.identifier(identifier)))

    async def remember_request(self, request_id: str, customer_id: str) -> None:
        await self._run(_set(self._keys.request(request_id), customer_id))

    async def customer_for_request(self, request_id: str) -> str | None:
        return await self._run(_get(self._keys.request(request_id)))

    async def claim_event(
        self, event_id: str, *, token: str, now: datetime, lease: timedelta
    ) -> EventClaim:
        return await self._run(_claim_event(self._keys, event_id, token, now, lease))

    async def finish_event(self, event_id: str, *, token: str) -> bool:
        return await self._run(_settle_event(self._keys, event_id, token, "finish"))

    async def release_event(self, event_id: str, *, token: str) -> None:
        await self._run(_settle_event(self._keys, event_id, token, "release"))

    async def close(self) -> None:
        """Close the client (and its Sentinel connections) when this store opened it."""
        if self._owns_client:
            with _store_errors():
                await self.client.aclose()
                for other in self._also_close:
                    await other.aclose()
