"""The Lua scripts of the Redis broker: every step that must see and change keys atomically.

A script runs alone on the server, so a publish that fans an event out to the groups of its
topic, a new group that copies the events it replays, and a consumer that claims, acknowledges
or hands back only what it holds never interleave with one another. The scripts name their keys
from the broker's prefix (``ARGV``), which ties the broker to one Redis server (not a cluster).

Keys under the prefix ``P:``: ``P:log`` every event in publish order (the retention window and
the source of replays), ``P:routes`` group -> its patterns (one per line), ``P:owners`` and
``P:lost`` group -> owner and events lost to retention, ``P:q:<group>`` the group's own stream
(its consumer group ``cb``), ``P:dl:<group>`` its dead letters, ``P:d:...`` a delivery id seen.
"""

from __future__ import annotations

#: The consumer group of every group stream (a stream per subscription id holds one group).
GROUP = "cb"
#: The pseudo-consumer holding handed-back entries, idle since the epoch so the next claim
#: takes them at once, oldest first.
RELEASED = "released"

_MATCH = """
local function segments(text)
  local out, start = {}, 1
  while true do
    local i = string.find(text, '.', start, true)
    if not i then out[#out + 1] = string.sub(text, start); return out end
    out[#out + 1] = string.sub(text, start, i - 1)
    start = i + 1
  end
end
local function matches_one(topic, parts, pattern)
  if pattern == topic then return true end
  local ps = segments(pattern)
  if string.sub(parts[1], 1, 1) == '$' and (ps[1] == '*' or ps[1] == '>') then return false end
  for i, s in ipairs(ps) do
    if s == '>' then return #parts >= i end
    if i > #parts then return false end
    if s ~= '*' and s ~= parts[i] then return false end
  end
  return #parts == #ps
end
local function matches(topic, parts, patterns)
  for pattern in string.gmatch(patterns, '[^\\n]+') do
    if matches_one(topic, parts, pattern) then return true end
  end
  return false
end
"""

#: ARGV: prefix, dedupe key ('' for none), dedupe ttl ms, target group ('' for every group of
#: the topic), topic, the event (``e``). The log's entry keeps the topic (``t``) for replays and
#: retention; a group's entry holds the event alone. Returns the entry id, or false for a
#: redelivery, or the error 'NOGROUP' for a target group that does not exist.
PUBLISH = (
    _MATCH
    + """
local p, dk, ttl, target, topic, e = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local fields = {'t', topic, 'e', e}
if target ~= '' then
  if redis.call('HEXISTS', p .. 'routes', target) == 0 then return redis.error_reply('NOGROUP') end
  fields[#fields + 1] = 'g'; fields[#fields + 1] = target
end
if dk ~= '' then
  if redis.call('EXISTS', dk) == 1 then return false end
  fields[#fields + 1] = 'd'; fields[#fields + 1] = dk
end
local id = redis.call('XADD', p .. 'log', '*', unpack(fields))
if dk ~= '' then redis.call('SET', dk, id, 'PX', ttl) end
if target ~= '' then
  redis.call('XADD', p .. 'q:' .. target, id, 'e', e)
  return id
end
local parts = segments(topic)
local routes = redis.call('HGETALL', p .. 'routes')
for i = 1, #routes, 2 do
  if matches(topic, parts, routes[i + 1]) then
    redis.call('XADD', p .. 'q:' .. routes[i], id, 'e', e)
  end
end
return id
"""
)

#: ARGV: prefix, group, patterns (one per line), owner ('' for none), start ('end' or the
#: first stream id to replay). Returns the group's patterns (the given ones for a new group).
CONSUME = (
    _MATCH
    + """
local p, g, patterns, owner, start = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local existing = redis.call('HGET', p .. 'routes', g)
if existing then
  if existing ~= patterns then return existing end
else
  local q = p .. 'q:' .. g
  redis.call('DEL', q)
  redis.call('XGROUP', 'CREATE', q, '"""
    + GROUP
    + """', '0', 'MKSTREAM')
  redis.call('HSET', p .. 'routes', g, patterns)
  if start ~= 'end' then
    local cursor = start
    while true do
      local batch = redis.call('XRANGE', p .. 'log', cursor, '+', 'COUNT', 1000)
      if #batch == 0 then break end
      for _, entry in ipairs(batch) do
        local f, topic, e, targeted = entry[2], nil, nil, false
        for i = 1, #f, 2 do
          if f[i] == 't' then topic = f[i + 1]
          elseif f[i] == 'e' then e = f[i + 1]
          elseif f[i] == 'g' then targeted = true end
        end
        if not targeted and matches(topic, segments(topic), patterns) then
          redis.call('XADD', q, entry[1], 'e', e)
        end
      end
      cursor = '(' .. batch[#batch][1]
    end
  end
end
if owner ~= '' then redis.call('HSETNX', p .. 'owners', g, owner) end
return patterns
"""
)

#: ARGV: group stream, consumer, lease ms, count. The entries this consumer may take now:
#: handed back or leased out too long (oldest first), then new ones; each as
#: ``{id, fields, attempt}``.
TAKE = (
    """
local q, me, lease, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local g = '"""
    + GROUP
    + """'
local out, cursor, rounds = {}, '0-0', 0
repeat
  local r = redis.call('XAUTOCLAIM', q, g, me, lease, cursor, 'COUNT', n - #out)
  cursor = r[1]
  for _, entry in ipairs(r[2]) do
    local pending = redis.call('XPENDING', q, g, entry[1], entry[1], 1)
    out[#out + 1] = {entry[1], entry[2], pending[1][4]}
  end
  if r[3] and #r[3] > 0 then redis.call('XACK', q, g, unpack(r[3])) end
  rounds = rounds + 1
until cursor == '0-0' or #out >= n or rounds >= 10
if #out < n then
  local r = redis.call('XREADGROUP', 'GROUP', g, me, 'COUNT', n - #out, 'STREAMS', q, '>')
  if r then
    for _, entry in ipairs(r[1][2]) do out[#out + 1] = {entry[1], entry[2], 1} end
  end
end
return out
"""
)

_HELD = (
    """
local q, me, g = ARGV[1], ARGV[2], '"""
    + GROUP
    + """'
local held = {}
for i = 3, #ARGV do
  local pending = redis.call('XPENDING', q, g, ARGV[i], ARGV[i], 1, me)
  if #pending > 0 then held[#held + 1] = ARGV[i] end
end
"""
)

#: ARGV: group stream, consumer, ids. Settles the ids this consumer holds (and drops them from
#: the group stream, which then holds only what is waiting or in flight).
ACK = (
    _HELD
    + """
-- In chunks: Lua unpacks at most a few thousand values into one call.
for i = 1, #held, 500 do
  local last = math.min(i + 499, #held)
  redis.call('XACK', q, g, unpack(held, i, last))
  redis.call('XDEL', q, unpack(held, i, last))
end
return #held
"""
)

_HAND_BACK = (
    """
local function hand_back(ids)
  for i = 1, #ids, 500 do
    local chunk = {unpack(ids, i, math.min(i + 499, #ids))}
    chunk[#chunk + 1] = 'TIME'; chunk[#chunk + 1] = '0'; chunk[#chunk + 1] = 'JUSTID'
    redis.call('XCLAIM', q, g, '"""
    + RELEASED
    + """', 0, unpack(chunk))
  end
end
"""
)

#: ARGV: group stream, consumer, ids. Hands the ids this consumer holds back to the group.
RELEASE = _HELD + _HAND_BACK + "hand_back(held)\nreturn #held\n"

_MINE = (
    """
local q, me, g = ARGV[1], ARGV[2], '"""
    + GROUP
    + """'
local mine = {}
local ok, pending = pcall(redis.call, 'XPENDING', q, g, '-', '+', 100000, me)
if not ok then return -1 end
for _, entry in ipairs(pending) do mine[#mine + 1] = entry[1] end
"""
)

#: ARGV: group stream, consumer. Leaves the group, handing back all it holds; -1: no group.
LEAVE = (
    _MINE
    + _HAND_BACK
    + """
hand_back(mine)
redis.call('XGROUP', 'DELCONSUMER', q, g, me)
return #mine
"""
)

#: ARGV: group stream, consumer, ids. Renews the lease of the ids this consumer holds (resets
#: their idle time without counting a delivery). Only the ids the consumer received: an entry
#: Redis handed to it whose reply was lost (the connection dropped) is pending under its name
#: too, and renewed it would never be delivered; left alone it idles out and is taken again.
RENEW = (
    _HELD
    + """
for i = 1, #held, 500 do
  local chunk = {unpack(held, i, math.min(i + 499, #held))}
  chunk[#chunk + 1] = 'JUSTID'
  redis.call('XCLAIM', q, g, me, 0, unpack(chunk))
end
return #held
"""
)

#: ARGV: prefix. Every group: {name, patterns, owner or false, lost, length, pending, released}.
STATS = (
    """
local p = ARGV[1]
local routes = redis.call('HGETALL', p .. 'routes')
local out = {}
for i = 1, #routes, 2 do
  local g = routes[i]
  local q = p .. 'q:' .. g
  local pending, released = 0, 0
  local ok, summary = pcall(redis.call, 'XPENDING', q, '"""
    + GROUP
    + """')
  if ok then
    pending = summary[1]
    if summary[4] then
      for _, c in ipairs(summary[4]) do
        if c[1] == '"""
    + RELEASED
    + """' then released = tonumber(c[2]) end
      end
    end
  end
  out[#out + 1] = {g, routes[i + 1], redis.call('HGET', p .. 'owners', g),
                   redis.call('HGET', p .. 'lost', g) or '0', redis.call('XLEN', q),
                   pending, released}
end
return out
"""
)

#: ARGV: prefix, group. Forgets the group; the number of things forgotten.
DELETE = """
local p, g = ARGV[1], ARGV[2]
local n = redis.call('HDEL', p .. 'routes', g) + redis.call('HDEL', p .. 'owners', g)
n = n + redis.call('HDEL', p .. 'lost', g)
return n + redis.call('DEL', p .. 'q:' .. g, p .. 'dl:' .. g)
"""

#: ARGV: prefix, min age ms, max age ms, max count, batch size. Deletes one batch of the oldest
#: events the policy no longer keeps, with their delivery ids, and the entries of them that
#: groups had not received yet (counted as lost); events a consumer holds stay with it.
#: Returns the number of events deleted.
CLEAN = (
    """
local p = ARGV[1]
local min_age, max_age = tonumber(ARGV[2]), tonumber(ARGV[3])
local max_count, batch = tonumber(ARGV[4]), tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local log = p .. 'log'
local excess = redis.call('XLEN', log) - max_count
local doomed, last = {}, nil
for _, entry in ipairs(redis.call('XRANGE', log, '-', '+', 'COUNT', batch)) do
  local age = now - tonumber(string.match(entry[1], '^(%d+)'))
  if age < min_age then break end
  if excess <= 0 and age <= max_age then break end
  excess = excess - 1
  doomed[#doomed + 1] = entry[1]
  last = entry[1]
  local f = entry[2]
  for i = 1, #f, 2 do
    if f[i] == 'd' and redis.call('GET', f[i + 1]) == entry[1] then
      redis.call('DEL', f[i + 1])
    end
  end
end
if #doomed == 0 then return 0 end
for i = 1, #doomed, 500 do
  redis.call('XDEL', log, unpack(doomed, i, math.min(i + 499, #doomed)))
end
local routes = redis.call('HGETALL', p .. 'routes')
for i = 1, #routes, 2 do
  local q = p .. 'q:' .. routes[i]
  local cursor, lost = '-', 0
  while true do
    local entries = redis.call('XRANGE', q, cursor, last, 'COUNT', 500)
    if #entries == 0 then break end
    for _, entry in ipairs(entries) do
      local held = redis.call('XPENDING', q, '"""
    + GROUP
    + """', entry[1], entry[1], 1)
      if #held == 0 then
        redis.call('XDEL', q, entry[1])
        lost = lost + 1
      end
    end
    cursor = '(' .. entries[#entries][1]
  end
  if lost > 0 then redis.call('HINCRBY', p .. 'lost', routes[i], lost) end
end
return #doomed
"""
)

#: ARGV: prefix, idle ms. Forgets the consumers that hold nothing and were handed nothing for
#: ``idle`` ms (members of killed processes, whose events others claimed); the number forgotten.
#: A live member forgotten so loses nothing (it holds nothing) and its next read makes it again.
PRUNE = (
    """
local p, idle, n = ARGV[1], tonumber(ARGV[2]), 0
local routes = redis.call('HGETALL', p .. 'routes')
for i = 1, #routes, 2 do
  local q = p .. 'q:' .. routes[i]
  local ok, consumers = pcall(redis.call, 'XINFO', 'CONSUMERS', q, '"""
    + GROUP
    + """')
  if ok then
    for _, c in ipairs(consumers) do
      local f = {}
      for j = 1, #c, 2 do f[c[j]] = c[j + 1] end
      if f['name'] ~= '"""
    + RELEASED
    + """' and f['pending'] == 0 and f['idle'] > idle then
        redis.call('XGROUP', 'DELCONSUMER', q, '"""
    + GROUP
    + """', f['name'])
        n = n + 1
      end
    end
  end
end
return n
"""
)
