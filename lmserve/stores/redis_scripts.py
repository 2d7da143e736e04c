"""Lua scripts that make each Redis store operation atomic.

Key layout under the prefix P, for a kind with item keys K (e.g. P"stream:"id, P"frames:"id):
  P<kind>s         sorted set: ids by a counter (insertion order, or last use for sessions)
  P<kind>s:expiry  sorted set: ids by expiry time; an id not in it never expires
  P"seq"           the counter
The expiry set is the truth about expiry (checked against the store's clock); PEXPIRE on the
item keys is a backstop that frees memory even if no lmserve process purges. Stream frames
live in a Redis stream with entry ids "<frame id>-0"; every append or finish publishes the
stream id on P"streams:changed" so followers in every process wake up.
"""

from __future__ import annotations

_PRELUDE = """
local function live(key, expiry, id, now)
  if redis.call('EXISTS', key) == 0 then return false end
  local at = redis.call('ZSCORE', expiry, id)
  return not (at and tonumber(at) <= tonumber(now))
end
local function set_expiry(expiry, id, at, ms, keys)
  if at == '' then
    redis.call('ZREM', expiry, id)
    for _, k in ipairs(keys) do redis.call('PERSIST', k) end
  else
    redis.call('ZADD', expiry, at, id)
    for _, k in ipairs(keys) do redis.call('PEXPIRE', k, ms) end
  end
end
local function drop(order, expiry, id, prefixes)
  for _, p in ipairs(prefixes) do redis.call('DEL', p .. id) end
  redis.call('ZREM', order, id)
  redis.call('ZREM', expiry, id)
end
"""

# KEYS: order, expiry. ARGV: now, cap ('' = none), item key prefixes...
# Drops expired ids, then the oldest beyond the cap; returns the dropped ids.
EVICT = _PRELUDE + """
local prefixes = {unpack(ARGV, 3)}
local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
for _, id in ipairs(gone) do drop(KEYS[1], KEYS[2], id, prefixes) end
if ARGV[2] ~= '' then
  local over = redis.call('ZCARD', KEYS[1]) - tonumber(ARGV[2])
  if over > 0 then
    for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, over - 1)) do
      drop(KEYS[1], KEYS[2], id, prefixes)
      table.insert(gone, id)
    end
  end
end
return gone
"""

# KEYS: first item key, order, expiry. ARGV: id, now, item key prefixes...
# Returns 1 if the item was live, then deletes it either way.
DELETE = _PRELUDE + """
local was = live(KEYS[1], KEYS[3], ARGV[1], ARGV[2])
drop(KEYS[2], KEYS[3], ARGV[1], {unpack(ARGV, 3)})
return was and 1 or 0
"""

# KEYS: hash, order, expiry, seq. ARGV: id, expires_at, ttl_ms, field, value, ...
# Creates a hash-backed item (a stream or a session); 0 if the key exists.
CREATE = _PRELUDE + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
set_expiry(KEYS[3], ARGV[1], ARGV[2], ARGV[3], {KEYS[1]})
return 1
"""

# KEYS: hash, frames, expiry. ARGV: id, now, event, data, channel.
# Returns the new frame id, -1 if the stream is unknown or expired, -2 if finished.
APPEND_FRAME = _PRELUDE + """
if not live(KEYS[1], KEYS[3], ARGV[1], ARGV[2]) then return -1 end
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return -2 end
local id = redis.call('HINCRBY', KEYS[1], 'last_id', 1)
redis.call('XADD', KEYS[2], id .. '-0', 'event', ARGV[3], 'data', ARGV[4])
if id == 1 then
  local ms = redis.call('PTTL', KEYS[1])
  if ms > 0 then redis.call('PEXPIRE', KEYS[2], ms) end
end
redis.call('PUBLISH', ARGV[5], ARGV[1])
return id
"""

# KEYS: hash, frames, expiry. ARGV: id, now, state, expires_at, ttl_ms, channel.
# 1 if finished now, 0 if it already was, -1 if unknown or expired.
FINISH = _PRELUDE + """
if not live(KEYS[1], KEYS[3], ARGV[1], ARGV[2]) then return -1 end
if redis.call('HGET', KEYS[1], 'state') ~= 'open' then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[3], 'finished_at', ARGV[2])
set_expiry(KEYS[3], ARGV[1], ARGV[4], ARGV[5], {KEYS[1], KEYS[2]})
redis.call('PUBLISH', ARGV[6], ARGV[1])
return 1
"""

# KEYS: record, order, expiry, seq. ARGV: id, now, json, expires_at, ttl_ms.
# Replaces a live record in place (same position and expiry) or inserts a new one.
PUT_RECORD = _PRELUDE + """
if live(KEYS[1], KEYS[3], ARGV[1], ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3], 'KEEPTTL')
  return 0
end
redis.call('SET', KEYS[1], ARGV[3])
redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[4]), ARGV[1])
set_expiry(KEYS[3], ARGV[1], ARGV[4], ARGV[5], {KEYS[1]})
return 1
"""

# KEYS: hash, messages, order, expiry, seq. ARGV: id, now, expires_at, ttl_ms, message...
# Appends all messages at once and makes the session the most recently used; returns
# {new message count, the session hash as a flat list}, or {-1} if unknown or expired.
APPEND_MESSAGES = _PRELUDE + """
if not live(KEYS[1], KEYS[4], ARGV[1], ARGV[2]) then return {-1} end
local n = redis.call('RPUSH', KEYS[2], unpack(ARGV, 5))
redis.call('HSET', KEYS[1], 'updated_at', ARGV[2])
redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[5]), ARGV[1])
set_expiry(KEYS[4], ARGV[1], ARGV[3], ARGV[4], {KEYS[1], KEYS[2]})
return {n, redis.call('HGETALL', KEYS[1])}
"""
