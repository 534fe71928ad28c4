-- Prepended to every script at load time. One tag = one scope x budget (the matched rule's
-- name, shared by every model id of the class): every key below starts with the same
-- "<prefix>:{<n>:<scope>:<budget>}:" base, so a script touches one Cluster slot.
-- A user's bucket under it is named by its user budget and user: ub = "<n>:<budget>:<user>".
--   base..'b'          hash  the scope x budget bucket (levels r,i,o; caps cr,ci,co,cm; t; n; le;
--                            h, ha, hd while dimensions are held: holder id, allowance, '010')
--   base..'u:'..ub     hash  a user's bucket under it (same fields)
--   base..'seen'       string  this bucket existed (tells an idle expiry from lost data)
--   base..'pause'      string  a provider 429 pauses grants until this time (PX = the pause)
--   base..'l'          zset  open reservation id -> lease expiry
--   base..'r:'..id     hash  a reservation (open, then settled and kept for the retention;
--                            hk, hu: the holds of its buckets its mark may end)
--   base..'rq:'..rid   string  request_id -> reservation id (idempotency)
--   base..'seq'        string  ticket counter of the wait queue
--   base..'q', base..'uq:'..ub  zset  waiters claiming that bucket, by ticket (FIFO)
--   base..'qx'         hash  ticket -> "expiry|since|requests|input|output|owner|ub"
--   base..'rw:'..rid   string  request_id -> "ticket|owner" of its waiter (re-attach by it)
--   base..'users'      set   the ub of every user bucket under the tag (for reads only)
--   base..'ln'         hash  capacities learned from the provider's headers (cr,ci,co), above
--                            the configured ones (learn_limits); PX: renewed while it says so
-- Times are the Redis server's (TIME), in seconds; no sidecar clock is ever used here.
--
-- Every script: KEYS[1] = base..'b'; ARGV[1] = the wake channel, ARGV[2] = how long settled
-- reservations are kept (s), ARGV[3] = the idle TTL of a bucket (s); its own ARGV from 4 on.
local BASE = string.sub(KEYS[1], 1, -2)
local CHANNEL = ARGV[1]
local RETENTION = tonumber(ARGV[2])
local IDLE_TTL = tonumber(ARGV[3])

local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local function fmt(x)
  return string.format('%.17g', x)
end

local function ms(seconds)
  return math.max(1, math.ceil(seconds * 1000))
end

local EPS = 1e-6
local SEEN_TTL_MS = 7 * 86400 * 1000

local function hash(key)
  local flat = redis.call('HGETALL', key)
  local h = {}
  for i = 1, #flat, 2 do h[flat[i]] = flat[i + 1] end
  return h
end

-- caps: {r, i, o, mc} with false for "no limit"; nil = keep what the bucket stored.
local function parse_caps(a, b, c, d)
  local function one(x) if x == nil or x == '' then return false end return tonumber(x) end
  return {one(a), one(b), one(c), one(d)}
end

local DIM = {'r', 'i', 'o'}
local CAPF = {'cr', 'ci', 'co'}

-- A held dimension (b.hd: see take) accrues nothing until its hold ends.
local function refill(b, now)
  local elapsed = now - b.t
  if elapsed <= 0 then return end
  b.t = now
  for d = 1, 3 do
    local cap = b.cap[d]
    if cap and b.lv[d] < cap and not (b.hold and b.hd[d]) then b.lv[d] = math.min(cap, b.lv[d] + cap * elapsed / 60) end
  end
end

-- Load a bucket, refilled to now. A missing bucket starts full, unless it was never seen here
-- but the caller remembers it (`known`): then Redis lost its data, and it starts empty.
local function load_bucket(key, seen_key, caps, now, known)
  local h = hash(key)
  local b = {key = key, seen = seen_key, lv = {0, 0, 0}, cap = {false, false, false}, mc = false,
             t = now, n = 0, le = 0}
  if h.t == nil then
    if caps == nil then return nil end
    local empty = known and redis.call('EXISTS', seen_key) == 0
    for d = 1, 3 do
      b.cap[d] = caps[d]
      if caps[d] and not empty then b.lv[d] = caps[d] end
    end
    b.mc = caps[4]
    b.fresh = true
    return b
  end
  b.t = tonumber(h.t); b.n = tonumber(h.n or '0'); b.le = tonumber(h.le or '0')
  if h.h then
    b.hold = h.h; b.ha = tonumber(h.ha)
    b.hd = {h.hd:sub(1, 1) == '1', h.hd:sub(2, 2) == '1', h.hd:sub(3, 3) == '1'}
  end
  for d = 1, 3 do
    b.lv[d] = tonumber(h[DIM[d]] or '0')
    b.cap[d] = h[CAPF[d]] and tonumber(h[CAPF[d]]) or false
  end
  b.mc = h.cm and tonumber(h.cm) or false
  refill(b, now)
  if caps ~= nil then  -- the caller's config wins (a reload): never above the new capacity
    for d = 1, 3 do
      if (h[CAPF[d]] ~= nil) ~= (caps[d] ~= false) then b.reshaped = true end
    end
    if (h.cm ~= nil) ~= (caps[4] ~= false) then b.reshaped = true end
    for d = 1, 3 do
      b.cap[d] = caps[d]
      if not caps[d] then b.lv[d] = 0 elseif b.lv[d] > caps[d] then b.lv[d] = caps[d] end
    end
    b.mc = caps[4]
  end
  return b
end

-- Kept until its last lease ends plus the idle TTL (long enough to refill from full debt).
local function save_bucket(b, now)
  local fields = {'t', fmt(b.t), 'n', b.n, 'le', fmt(b.le)}
  local gone = {}  -- limits a config reload removed
  for d = 1, 3 do
    if b.cap[d] then
      table.insert(fields, DIM[d]); table.insert(fields, fmt(b.lv[d]))
      table.insert(fields, CAPF[d]); table.insert(fields, b.cap[d])
    else
      table.insert(gone, CAPF[d])
    end
  end
  if b.mc then table.insert(fields, 'cm'); table.insert(fields, b.mc) else table.insert(gone, 'cm') end
  if b.hold then
    local hd = ''
    for d = 1, 3 do hd = hd .. (b.hd[d] and '1' or '0') end
    for _, v in ipairs({'h', b.hold, 'ha', fmt(b.ha), 'hd', hd}) do table.insert(fields, v) end
  elseif b.unheld then
    redis.call('HDEL', b.key, 'h', 'ha', 'hd')
  end
  redis.call('HSET', b.key, unpack(fields))
  if b.reshaped and #gone > 0 then redis.call('HDEL', b.key, unpack(gone)) end
  redis.call('PEXPIRE', b.key, ms(math.max(b.le - now, 0) + IDLE_TTL))
  if b.fresh then redis.call('SET', b.seen, '1', 'PX', SEEN_TTL_MS) end
end

local function fits(b, amounts)
  for d = 1, 3 do
    if b.cap[d] and b.lv[d] + EPS < amounts[d] then return false end
  end
  return not b.mc or b.n < b.mc
end

-- Seconds from `now` until `demand` fits on the rate dimensions (0: it fits now), counting
-- a refill clock in the future (a bucket saved by a version that held refill back), and a
-- held dimension as resuming one allowance from now (its mark may come any moment).
local function seconds_until(b, demand, now)
  local worst = 0
  local later = math.max(0, b.t - now)
  for d = 1, 3 do
    local cap = b.cap[d]
    if cap then
      local deficit = demand[d] - b.lv[d]
      local held = (b.hold and b.hd[d]) and math.max(later, b.ha) or later
      if deficit > EPS then worst = math.max(worst, held + deficit * 60 / cap) end
    end
  end
  return worst
end

-- Take `amounts`. The provider starts refilling when a request reaches it, a little after
-- the grant: a dimension taken from full is also charged `allowance` seconds of its refill
-- (that dimension only), as the local ledger does (limiterd/ledger/buckets.py). For a
-- `holder` (the reservation of a caller that marks when it sends) the dimension is held
-- instead, until the first mark from a reservation granted during the hold (then charged)
-- or the holder's settlement (uncharged): end_hold.
local function take(b, amounts, now, allowance, holder)
  for d = 1, 3 do
    local cap = b.cap[d]
    if cap then
      if amounts[d] > 0 and b.lv[d] >= cap then
        if holder ~= '' and allowance > 0 then
          if not b.hold then b.hold = holder; b.ha = allowance; b.hd = {false, false, false} end
          b.hd[d] = true  -- one hold per bucket: its first mark ends it for every dimension
        else
          b.lv[d] = b.lv[d] - cap * allowance / 60
        end
      end
      b.lv[d] = b.lv[d] - amounts[d]
    end
  end
  b.n = b.n + 1
end

-- The held dimensions refill again from now (the bucket was loaded, so refilled, at now);
-- `charge`: the caller just marked its send, so they are charged the allowance as well.
local function end_hold(b, charge)
  if charge then
    for d = 1, 3 do
      if b.hd[d] and b.cap[d] then b.lv[d] = b.lv[d] - b.cap[d] * b.ha / 60 end
    end
  end
  b.hold = false
  b.unheld = true
end

-- Give back (positive) or charge as debt (negative). A refund never fills past capacity;
-- debt never goes below minus one capacity, so one bad Report cannot lock a bucket for long.
local function give(b, amounts)
  for d = 1, 3 do
    local cap = b.cap[d]
    if cap and amounts[d] ~= 0 then
      b.lv[d] = math.max(-cap, math.min(cap, b.lv[d] + amounts[d]))
    end
  end
end

local function bucket_keys(ub)
  local keys = {{BASE .. 'b', BASE .. 'seen'}}
  if ub ~= nil and ub ~= '' then
    table.insert(keys, {BASE .. 'u:' .. ub, BASE .. 'seen:u:' .. ub})
  end
  return keys
end

-- The reservation as the sidecar reads it: a flat list in a fixed order.
local RES_FIELDS = {'s', 'm', 'u', 'q', 'ri', 'ro', 'g', 'e', 'w', 'st', 'sa',
                    'fr', 'fi', 'fo', 'oi', 'oo', 'oc', 'bu', 'bn'}
local function res_reply(tag, id, r, replayed)
  local out = {tag, replayed and '1' or '0', id}
  for _, f in ipairs(RES_FIELDS) do table.insert(out, r[f] or '') end
  return out
end

-- Tell the sidecars that this tag's queue may move; only when someone waits in it.
local function wake()
  if redis.call('EXISTS', BASE .. 'qx') == 1 then redis.call('PUBLISH', CHANNEL, BASE) end
end

-- Settle an open reservation: give `amounts` back to its buckets, free its slot, keep it
-- settled for the retention (idempotent replays and re-attach read it).
local function settle(id, r, state, back, fields, now)
  local ub = r.bu ~= '' and r.bu or nil
  for _, k in ipairs(bucket_keys(ub)) do
    local b = load_bucket(k[1], k[2], nil, now, false)
    if b ~= nil then
      if b.hold == id then end_hold(b, false) end  -- no mark came: over, or never sent
      give(b, back)
      b.n = math.max(0, b.n - 1)
      save_bucket(b, now)
    end
  end
  local rkey = BASE .. 'r:' .. id
  redis.call('HSET', rkey, 'st', state, 'sa', fmt(now), unpack(fields))
  redis.call('PEXPIRE', rkey, ms(RETENTION))
  if r.q ~= nil and r.q ~= '' then redis.call('PEXPIRE', BASE .. 'rq:' .. r.q, ms(RETENTION)) end
  redis.call('ZREM', BASE .. 'l', id)
  for k, v in pairs({st = state, sa = fmt(now)}) do r[k] = v end
  for i = 1, #fields, 2 do r[fields[i]] = fields[i + 1] end
  wake()
end

-- Leases that lapsed: settled as consumed (the provider most likely did the work).
local function sweep_lapsed(now, limit)
  local due = redis.call('ZRANGEBYSCORE', BASE .. 'l', '-inf', fmt(now), 'LIMIT', 0, limit)
  for _, id in ipairs(due) do
    local r = hash(BASE .. 'r:' .. id)
    if r.st == 'open' then
      settle(id, r, 'expired', {0, 0, 0}, {}, now)
    else
      redis.call('ZREM', BASE .. 'l', id)
    end
  end
  return #due
end

-- Queue entries: "expiry|since|requests|input|output|owner|ub". The owner is the id of the
-- Acquire call that holds the place (a re-attach by request_id takes it over).
local function entry(ticket)
  local v = redis.call('HGET', BASE .. 'qx', ticket)
  if not v then return nil end
  local exp, since, r, i, o, owner, ub = string.match(
    v, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  return {exp = tonumber(exp), since = tonumber(since), amounts = {tonumber(r), tonumber(i),
          tonumber(o)}, owner = owner, ub = ub}
end

local function claim_keys(ub)
  local z = {BASE .. 'q'}
  if ub ~= nil and ub ~= '' then table.insert(z, BASE .. 'uq:' .. ub) end
  return z
end

-- Remove a ticket from the queue (granted, gave up, or its sidecar stopped renewing it).
local function leave(ticket, ub)
  for _, z in ipairs(claim_keys(ub)) do redis.call('ZREM', z, ticket) end
  redis.call('HDEL', BASE .. 'qx', ticket)
  wake()
end

-- Leave, but only the place `owner` holds (a caller that re-attached elsewhere keeps it),
-- and forget the request_id's place if it still names this one.
local function leave_owned(ticket, ub, owner, rid)
  local e = entry(ticket)
  if e ~= nil and e.owner ~= owner then return end
  leave(ticket, ub)
  if rid ~= '' and redis.call('GET', BASE .. 'rw:' .. rid) == ticket .. '|' .. owner then
    redis.call('DEL', BASE .. 'rw:' .. rid)
  end
end

-- The oldest live claim on a bucket (dead entries at the head are dropped on the way).
local function head(z, now)
  for _ = 1, 100 do
    local h = redis.call('ZRANGE', z, 0, 0, 'WITHSCORES')
    if #h == 0 then return nil end
    local e = entry(h[1])
    if e ~= nil and e.exp >= now then return tonumber(h[2]) end
    redis.call('ZREM', z, h[1])
    if e ~= nil then leave(h[1], e.ub) end
  end
  return nil
end
