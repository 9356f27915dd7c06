"""The Lua scripts behind the cluster's shared state (redisstore.py runs them).

Each script is one atomic step, timed by the Redis server's clock (TIME), so a limit is one
limit however many nodes ask at once and whatever their clocks say. Their rules are those of
`nodestate.NodeState` (the same budgets, lock-outs and leases; a test runs both side by side
on random sequences), plus what only a cluster needs: leases owned by a worker that expire
with its heartbeat, and user affinity.

Keys (B is "{prefix}:", a hash tag: every key is in one Redis Cluster slot):

    B t:<ip:..|user:..>     hash ws, f, lu: window start, failures, locked till (ms)
    B ti:<same>             zset ticket -> deadline: attempts in flight (a dead node's expire)
    B tu:<ip:..>            set: hashes of the users an address failed as (spraying)
    B trecent               zset key -> last failure: what `throttle show` lists
    B mv:<user>             a directory move is under way: logins get a temporary failure
    B kr:<id>               list: the nodes' answers to a kick or an invalidation
    B l                     hash lease -> the cluster's count ("u:alice", "ui:alice|ip",
                            "i:ip", "a|pool|alice": alice's sessions on an affinity pool)
    B o:<owner>             hash lease -> count: what one worker holds (reaped when it dies)
    B live                  zset owner -> heartbeat deadline
    B s:<owner>             hash session id -> JSON: the registry behind `mailgate who`
    B a:<pool>:<user>       hash m (member), mv (moving till), mt (the move's token)
    B ap:<pool>:<user>      zset ticket -> deadline: logins of the user on their way there
    B am:<pool>:<member>    zset user -> last seen: who is assigned there (drains)
    B admin                 hash pool/member -> up|down|drain: the operator's word, cluster-wide

Times are integer milliseconds. A script may be given "now" (tests); otherwise it asks TIME.
"""

from __future__ import annotations

# Shared by every script: the clock, argument reading, counters and leases.
PRELUDE = r"""
local B = ARGV[1]
local now
if ARGV[2] ~= '' then now = tonumber(ARGV[2]) else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local cursor = 2
local function arg() cursor = cursor + 1; return ARGV[cursor] end
local function num() return tonumber(arg()) end

local function counter(k, window)
  local h = redis.call('HMGET', B .. 't:' .. k, 'ws', 'f', 'lu')
  local c = {k = k, ws = tonumber(h[1]), f = tonumber(h[2]) or 0, lu = tonumber(h[3]) or 0}
  c.inflight = redis.call('ZCOUNT', B .. 'ti:' .. k, '(' .. now, '+inf')
  if not c.ws then
    c.ws, c.f, c.lu, c.dirty = now, 0, 0, true
  elseif now - c.ws >= window then
    -- The window ended: failures start again (a running lock-out stays).
    c.ws, c.f, c.dirty = now, 0, true
    if not (c.lu > now or c.inflight > 0) then c.lu = 0 end
    redis.call('DEL', B .. 'tu:' .. k)
  end
  return c
end

-- Attempts in flight live at most this long (a login's whole time, with room to spare): the
-- in-flight set of a counter is kept that much longer than its window.
local INFLIGHT_MS = 300000

local function save(c, window)
  local key = B .. 't:' .. c.k
  redis.call('HSET', key, 'ws', c.ws, 'f', c.f, 'lu', c.lu)
  local keep = math.max(math.max(c.ws + window, c.lu) - now, 1000)
  redis.call('PEXPIRE', key, keep)
  -- Saved at least once a window while it is used; tickets settled leave an empty set
  -- (Redis deletes it), those of a dead node go with the set at the latest.
  redis.call('PEXPIRE', B .. 'ti:' .. c.k, keep + INFLIGHT_MS)
end

local function spraying(ip, limit)
  return limit > 0 and redis.call('SCARD', B .. 'tu:' .. ip.k) > limit
end

local LEASES = B .. 'l'

local function lease_total(lk)
  return tonumber(redis.call('HGET', LEASES, lk) or '0')
end

local function lease_add(owner, lk, n)
  redis.call('HINCRBY', LEASES, lk, n)
  redis.call('HINCRBY', B .. 'o:' .. owner, lk, n)
end

local function lease_sub(lk, n)
  if redis.call('HINCRBY', LEASES, lk, -n) <= 0 then redis.call('HDEL', LEASES, lk) end
end

local function lease_drop(owner, lk)
  local ok = B .. 'o:' .. owner
  local held = tonumber(redis.call('HGET', ok, lk) or '0')
  if held <= 0 then return 0 end  -- never ours, or reaped while we were away
  if held == 1 then redis.call('HDEL', ok, lk) else redis.call('HINCRBY', ok, lk, -1) end
  lease_sub(lk, 1)
  return 1
end

-- Everything an owner holds goes (it died, or writes it all again); how many leases.
local function lease_forget(owner)
  local ok = B .. 'o:' .. owner
  local held = redis.call('HGETALL', ok)
  local n = 0
  for i = 1, #held, 2 do
    n = n + tonumber(held[i + 1])
    lease_sub(held[i], tonumber(held[i + 1]))
  end
  redis.call('DEL', ok)
  return n
end

local function present(...)
  local out = {}
  for i = 1, select('#', ...) do
    local v = select(i, ...)
    if v then out[#out + 1] = v end
  end
  return out
end

local function contains(list, value)
  for _, v in ipairs(list) do if v == value then return true end end
  return false
end

local function list(n)
  local out = {}
  for _ = 1, n do out[#out + 1] = arg() end
  return out
end

local function others(pool, user)
  local pending = redis.call('ZCOUNT', B .. 'ap:' .. pool .. ':' .. user, '(' .. now, '+inf')
  return pending + lease_total('a|' .. pool .. '|' .. user)
end

-- The member's index of its users (what a drain moves) is kept fresh by logins, sessions
-- and their holders' heartbeats; `prune` drops entries none of them refreshed for a while.
local function touch(pool, user, member, expire, prune)
  local index = B .. 'am:' .. pool .. ':' .. member
  redis.call('ZADD', index, now, user)
  if prune then redis.call('ZREMRANGEBYSCORE', index, '-inf', now - 2 * expire) end
end

local function settle_quick(ticket, ipk, user, reset)
  redis.call('ZREM', B .. 'ti:ip:' .. ipk, ticket)
  if user ~= '' then
    local uk = B .. 't:user:' .. user
    redis.call('ZREM', B .. 'ti:user:' .. user, ticket)
    if reset then
      local f = redis.call('HGET', uk, 'f')
      if f and f ~= '0' then redis.call('HSET', uk, 'f', 0) end
    end
  end
end

local function session_start(owner, ticket, pool, user, member, expire)
  redis.call('ZREM', B .. 'ap:' .. pool .. ':' .. user, ticket)
  lease_add(owner, 'a|' .. pool .. '|' .. user, 1)
  local rk = B .. 'a:' .. pool .. ':' .. user
  local m = redis.call('HGET', rk, 'm')
  if not m then redis.call('HSET', rk, 'm', member); m = member end
  redis.call('PEXPIRE', rk, expire)
  touch(pool, user, member, expire, false)
  return m
end

local function session_end(owner, pool, user, member, expire)
  lease_drop(owner, 'a|' .. pool .. '|' .. user)
  local rk = B .. 'a:' .. pool .. ':' .. user
  if redis.call('HGET', rk, 'm') == member then
    redis.call('PEXPIRE', rk, expire)
    touch(pool, user, member, expire, false)
  end
end
"""

# Reserve a login attempt, take its session's leases, and find (or choose) the user's member
# in every affinity pool: everything a login needs from Redis, in one round trip.
LOGIN = (
    PRELUDE
    + r"""
local owner, ticket, deadline = arg(), arg(), now + num()
local do_throttle = arg() == '1'
local lockout_after, lockout, window = num(), num(), num()
local per_user_inflight, per_ip_inflight, per_ip_users = num(), num(), num()
local ipk, user, trusted = arg(), arg(), arg() == '1'
local do_lease = arg() == '1'
local per_user, per_user_ip, per_ip = num(), num(), num()
local lease_user = arg()

local verdict, ip_f, user_f, spray, locked_for = 'allowed', 0, 0, 0, 0
if do_throttle then
  if user ~= '' and redis.call('EXISTS', B .. 'mv:' .. user) == 1 then
    return {'moving', 0, 0, 0, 0, ''}
  end
  local ip = counter('ip:' .. ipk, window)
  local u = nil
  if user ~= '' then u = counter('user:' .. user, window) end
  local counted = {}
  if not trusted then counted[#counted + 1] = ip end
  if u then counted[#counted + 1] = u end
  for _, c in ipairs(counted) do
    if c.lu > now then verdict, locked_for = 'locked', c.lu - now; break end
  end
  if verdict == 'allowed' and lockout_after > 0 then
    for _, c in ipairs(counted) do
      if c.f >= lockout_after then
        if c.inflight > 0 then verdict = 'budget'; break end
      elseif c.f + c.inflight >= lockout_after then verdict = 'budget'; break end
    end
  end
  if verdict == 'allowed' and ((u and u.inflight >= per_user_inflight)
      or (not trusted and ip.inflight >= per_ip_inflight)) then
    verdict = 'concurrent'
  end
  if verdict == 'allowed' then
    for _, c in ipairs(present(ip, u)) do
      if redis.call('ZADD', B .. 'ti:' .. c.k, deadline, ticket) == 1 and c.inflight == 0 then
        c.dirty = true  -- a new set: save() gives it its time to live
      end
    end
  end
  for _, c in ipairs(present(ip, u)) do if c.dirty then save(c, window) end end
  ip_f = ip.f
  if u then user_f = u.f end
  if spraying(ip, per_ip_users) then spray = 1 end
end
local out = {verdict, ip_f, user_f, spray, locked_for, ''}
if verdict ~= 'allowed' then return out end

if do_lease then
  local checks = {}
  if lease_user ~= '' then
    checks[#checks + 1] = {'u:' .. lease_user, per_user, 'per_user'}
    checks[#checks + 1] = {'ui:' .. lease_user .. '|' .. ipk, per_user_ip, 'per_user_ip'}
  end
  if not trusted then checks[#checks + 1] = {'i:' .. ipk, per_ip, 'per_ip'} end
  local names = {}
  for i, check in ipairs(checks) do names[i] = check[1] end
  local totals = #names > 0 and redis.call('HMGET', LEASES, unpack(names)) or {}
  local refusal = ''
  for i, check in ipairs(checks) do
    if check[2] > 0 and (tonumber(totals[i]) or 0) >= check[2] then refusal = check[3]; break end
  end
  if refusal == '' then
    for _, check in ipairs(checks) do lease_add(owner, check[1], 1) end
    out[6] = 'ok'
  else
    out[6] = refusal
  end
end

for _ = 1, num() do
  local pool, expire, who = arg(), num(), arg()
  local assignable = list(num())
  local serving = list(num())
  local rk = B .. 'a:' .. pool .. ':' .. who
  local r = redis.call('HMGET', rk, 'm', 'mv')
  local m, mv = r[1] or nil, tonumber(r[2])
  local status, chosen = 'ok', m
  if mv and mv > now then
    status = 'moving'
  else
    local busy = others(pool, who)
    local first = assignable[1]
    if not m then
      chosen = first
    elseif not contains(serving, m) then
      if busy == 0 then chosen = first else status = 'busy' end
    elseif busy == 0 and first and not contains(assignable, m) then
      chosen = first
    end
    if status == 'ok' and not chosen then status = 'none' end
  end
  if status == 'ok' then
    if chosen ~= m then  -- (a kept assignment is refreshed when its session starts)
      redis.call('HSET', rk, 'm', chosen)
      if m then redis.call('ZREM', B .. 'am:' .. pool .. ':' .. m, who) end
      redis.call('PEXPIRE', rk, expire)
      touch(pool, who, chosen, expire, true)
    end
    local pk = B .. 'ap:' .. pool .. ':' .. who
    redis.call('ZADD', pk, deadline, ticket)
    redis.call('PEXPIRE', pk, deadline - now + 1000)
  end
  out[#out + 1] = chosen or ''
  out[#out + 1] = status
end
return out
"""
)

# Settle an attempt: "ok", "failed" or "tempfail"; a failure counts and may lock out. The
# attempt's lease and affinity claims go back unless it logged in.
SETTLE = (
    PRELUDE
    + r"""
local owner, ticket = arg(), arg()
local lockout_after, lockout, window, per_ip_users = num(), num(), num(), num()
local ipk, user, trusted, outcome, identity = arg(), arg(), arg() == '1', arg(), arg()
local lease_user, lease_ip, lease_trusted = arg(), arg(), arg()
local claims = list(2 * num())

local ip = counter('ip:' .. ipk, window)
local u = nil
if user ~= '' then u = counter('user:' .. user, window) end
for _, c in ipairs(present(ip, u)) do redis.call('ZREM', B .. 'ti:' .. c.k, ticket) end
local matched = nil
if identity ~= '' then matched = counter('user:' .. identity, window) end
local identity_locked = matched ~= nil and matched.lu > now
local locked = {}
local function lock_if_spent(c)
  if lockout_after <= 0 or c.f < lockout_after or c.lu > now then return false end
  c.lu, c.dirty = now + lockout, true
  return true
end
if outcome == 'failed' then
  if not trusted then
    ip.f, ip.dirty = ip.f + 1, true
    local uk = B .. 'tu:' .. ip.k
    if user ~= '' and redis.call('SCARD', uk) < 256 then
      redis.call('SADD', uk, string.sub(redis.sha1hex(user), 1, 16))
      redis.call('PEXPIRE', uk, window)
    end
  end
  for _, c in ipairs(present(u, matched)) do c.f, c.dirty = c.f + 1, true end
  if not trusted and lock_if_spent(ip) then locked[#locked + 1] = 'ip' end
  if u and lock_if_spent(u) then locked[#locked + 1] = 'user' end
  if matched and lock_if_spent(matched) then identity_locked = true end
  local recent = B .. 'trecent'
  for _, c in ipairs(present(not trusted and ip, u, matched)) do
    redis.call('ZADD', recent, now, c.k)
  end
  redis.call('ZREMRANGEBYRANK', recent, 0, -1001)
elseif outcome == 'ok' then
  for _, c in ipairs(present(u, matched)) do
    if c.f ~= 0 then c.f, c.dirty = 0, true end
  end
end
for _, c in ipairs(present(ip, u, matched)) do if c.dirty then save(c, window) end end
if outcome ~= 'ok' then
  if lease_user ~= '' or lease_ip ~= '' then
    if lease_user ~= '' then
      lease_drop(owner, 'u:' .. lease_user)
      lease_drop(owner, 'ui:' .. lease_user .. '|' .. lease_ip)
    end
    if lease_trusted ~= '1' then lease_drop(owner, 'i:' .. lease_ip) end
  end
  for i = 1, #claims, 2 do
    redis.call('ZREM', B .. 'ap:' .. claims[i] .. ':' .. claims[i + 1], ticket)
  end
end
local user_f = 0
if u then user_f = u.f end
if matched then user_f = math.max(user_f, matched.f) end
local spray = 0
if spraying(ip, per_ip_users) then spray = 1 end
return {ip.f, user_f, table.concat(locked, ','), spray, identity_locked and 1 or 0}
"""
)

# What logins and sessions tell Redis without waiting, queued and sent as one script per batch
# (redisstore.py), in order: `settle` (an attempt that logged in, or failed temporarily: its
# reservation goes; a temporary failure gives back its leases and claims too), `release` (a
# session's leases), `claims` (affinity claims a login did not use), `start` (a relayed
# session on an affinity member: its claim becomes a session; a record naming another member
# is a split, returned as {op number, pool, user, member, assigned}), `end` (that session
# ended: the user stays assigned for user_expire from now).
BATCH = (
    PRELUDE
    + r"""
local owner = arg()
local out = {}
local index = 0
while cursor < #ARGV do
  index = index + 1
  local op, n = arg(), num()
  local stop = cursor + n
  if op == 'settle' then
    local ticket, ipk, user, outcome = arg(), arg(), arg(), arg()
    settle_quick(ticket, ipk, user, outcome == 'ok')
    for _ = 1, num() do lease_drop(owner, arg()) end
    while cursor < stop do
      local pool, who = arg(), arg()
      redis.call('ZREM', B .. 'ap:' .. pool .. ':' .. who, ticket)
    end
  elseif op == 'release' then
    while cursor < stop do lease_drop(owner, arg()) end
  elseif op == 'claims' then
    local ticket = arg()
    while cursor < stop do
      local pool, who = arg(), arg()
      redis.call('ZREM', B .. 'ap:' .. pool .. ':' .. who, ticket)
    end
  elseif op == 'start' then
    local ticket, pool, user, member, expire = arg(), arg(), arg(), arg(), num()
    while cursor < stop do
      local p, who = arg(), arg()
      redis.call('ZREM', B .. 'ap:' .. p .. ':' .. who, ticket)
    end
    local m = session_start(owner, ticket, pool, user, member, expire)
    if m ~= member then
      for _, v in ipairs({index, pool, user, member, m}) do out[#out + 1] = v end
    end
  elseif op == 'end' then
    local pool, user, member, expire = arg(), arg(), arg(), num()
    session_end(owner, pool, user, member, expire)
  end
  cursor = stop
end
return out
"""
)

# A worker's heartbeat: it is alive for `lease` more; owners whose heartbeat stopped are
# reaped (their leases subtracted, their sessions dropped from the registry); the records of
# users it holds sessions of are kept alive. Returns {1 if this owner was unknown (Redis lost
# it: resync), owners reaped, leases they held}.
HEARTBEAT = (
    PRELUDE
    + r"""
local owner, lease = arg(), num()
local live = B .. 'live'
local added = redis.call('ZADD', live, now + lease, owner)
redis.call('PEXPIRE', B .. 's:' .. owner, lease)
for _ = 1, num() do
  local pool, user, member, expire = arg(), arg(), arg(), num()
  local rk = B .. 'a:' .. pool .. ':' .. user
  if redis.call('HGET', rk, 'm') == member then
    redis.call('PEXPIRE', rk, expire)
    touch(pool, user, member, expire, false)
  end
end
local dead = redis.call('ZRANGEBYSCORE', live, '-inf', now, 'LIMIT', 0, 20)
local leases = 0
for _, d in ipairs(dead) do
  leases = leases + lease_forget(d)
  redis.call('DEL', B .. 's:' .. d)
  redis.call('ZREM', live, d)
end
return {added, #dead, leases}
"""
)

# Reap one owner now (the supervisor saw its worker exit): as HEARTBEAT does for the dead.
REAP = (
    PRELUDE
    + r"""
local owner = arg()
local leases = lease_forget(owner)
redis.call('DEL', B .. 's:' .. owner)
redis.call('ZREM', B .. 'live', owner)
return leases
"""
)

# After Redis lost this owner (restarted empty, or reaped it during a partition): what it
# holds is written again, and the affinity records of its sessions are re-made; a record that
# now names another member is a conflict (the worker kicks those sessions).
RESYNC = (
    PRELUDE
    + r"""
local owner, lease = arg(), num()
lease_forget(owner)
for _ = 1, num() do
  local lk, n = arg(), num()
  if n > 0 then lease_add(owner, lk, n) end
end
redis.call('ZADD', B .. 'live', now + lease, owner)
local conflicts = {}
for _ = 1, num() do
  local pool, user, member, expire = arg(), arg(), arg(), num()
  local rk = B .. 'a:' .. pool .. ':' .. user
  local m = redis.call('HGET', rk, 'm')
  if not m then
    redis.call('HSET', rk, 'm', member)
    m = member
  end
  if m == member then
    redis.call('PEXPIRE', rk, expire)
    touch(pool, user, member, expire, false)
  else
    conflicts[#conflicts + 1] = pool
    conflicts[#conflicts + 1] = user
    conflicts[#conflicts + 1] = m
  end
end
return conflicts
"""
)

# `mailgate throttle show KEY`: a counter as the throttle sees it now, without changing it.
SHOW = (
    PRELUDE
    + r"""
local k, window = arg(), num()
local h = redis.call('HMGET', B .. 't:' .. k, 'ws', 'f', 'lu')
local ws, f, lu = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
if not ws then return nil end
local zk = B .. 'ti:' .. k
local inflight = redis.call('ZCOUNT', zk, '(' .. now, '+inf')
local ended = now - ws >= window
if ended and lu <= now then return nil end
local users = 0
if ended then f = 0 else users = redis.call('SCARD', B .. 'tu:' .. k) end
return {f, inflight, math.max(0, lu - now), math.max(0, ws + window - now), users}
"""
)

# `mailgate throttle clear KEY`: its failures and lock-out are forgotten. Returns 1 if it had any.
CLEAR = (
    PRELUDE
    + r"""
local k = arg()
local key = B .. 't:' .. k
redis.call('ZREM', B .. 'trecent', k)
redis.call('DEL', B .. 'tu:' .. k)
if redis.call('EXISTS', key) == 0 then return 0 end
redis.call('HSET', key, 'f', 0, 'lu', 0)
return 1
"""
)

# The keys `throttle show` lists: recent failures whose counter still holds something.
RECENT = (
    PRELUDE
    + r"""
local window = num()
return redis.call('ZREVRANGEBYSCORE', B .. 'trecent', '+inf', now - window, 'LIMIT', 0, 1000)
"""
)

# A move begins: new logins of the user on this pool get a temporary failure till it ends.
# Returns {the member now, how many sessions and logins still hold the user there}.
MOVE_BEGIN = (
    PRELUDE
    + r"""
local pool, user, token, till = arg(), arg(), arg(), now + num()
local rk = B .. 'a:' .. pool .. ':' .. user
local r = redis.call('HMGET', rk, 'mv', 'mt')
if tonumber(r[1]) and tonumber(r[1]) > now and r[2] ~= token then
  return {'', -1}  -- another move of this user is under way
end
redis.call('HSET', rk, 'mv', till, 'mt', token)
redis.call('PEXPIRE', rk, math.max(redis.call('PTTL', rk), till - now + 1000))
return {redis.call('HGET', rk, 'm') or '', others(pool, user)}
"""
)

# How many sessions and logins still hold the user on the pool (a move waits for none).
MOVE_HOLDERS = (
    PRELUDE
    + r"""
local pool, user = arg(), arg()
return others(pool, user)
"""
)

# A move ends: the user is assigned to `to` ("" = to whatever their next login chooses), or
# with `abort` stays where they were; logins resume. Returns 0 when the move's token is gone
# (its time ran out and another move took over).
MOVE_END = (
    PRELUDE
    + r"""
local pool, user, token, to, expire, abort = arg(), arg(), arg(), arg(), num(), arg() == '1'
local rk = B .. 'a:' .. pool .. ':' .. user
if redis.call('HGET', rk, 'mt') ~= token then return 0 end
redis.call('HDEL', rk, 'mv', 'mt')
local m = redis.call('HGET', rk, 'm')
if not abort then
  if m then redis.call('ZREM', B .. 'am:' .. pool .. ':' .. m, user) end
  if to == '' then
    redis.call('HDEL', rk, 'm')
  else
    redis.call('HSET', rk, 'm', to)
    touch(pool, user, to, expire, true)
  end
  m = to ~= '' and to or nil
end
if m then redis.call('PEXPIRE', rk, expire) else redis.call('DEL', rk) end
return 1
"""
)

SCRIPTS = {
    "login": LOGIN,
    "settle": SETTLE,
    "batch": BATCH,
    "heartbeat": HEARTBEAT,
    "reap": REAP,
    "resync": RESYNC,
    "show": SHOW,
    "clear": CLEAR,
    "recent": RECENT,
    "move_begin": MOVE_BEGIN,
    "move_holders": MOVE_HOLDERS,
    "move_end": MOVE_END,
}
