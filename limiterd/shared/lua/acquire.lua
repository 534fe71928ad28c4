-- Acquire: grant now (all buckets or none), or take/keep a place in the FIFO queue.
-- ARGV[4..]: id, request_id, scope, model, user, input, output, lease_s, ticket (0: new),
--   try_once, queue_ttl_s, max_waiters, known (this sidecar saw the bucket before),
--   the scope x budget caps (rpm, itpm, otpm, max_concurrent; '' = none),
--   the user bucket's ub ('' = users are not limited), the user caps (same four),
--   the budget's name, the refill allowance in seconds, marks_sent ('1': the caller marks).
-- Replies: {'G', replayed, id, reservation..., mark_sent_wanted ('1' or '')} granted;
--   {'W', ticket, since, refill_s, eta_s, position, depth, waited_s} waiting; {'R', eta_s}
--   try-once refused; {'E', why, detail} refused; {'S'} a newer Acquire with the same
--   request_id took this caller's place.
local id, rid, scope, model, user = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
local amounts = {1, tonumber(ARGV[9]), tonumber(ARGV[10])}
local lease_s, ticket, try_once = tonumber(ARGV[11]), tonumber(ARGV[12]), ARGV[13] == '1'
local queue_ttl, max_waiters, known = tonumber(ARGV[14]), tonumber(ARGV[15]), ARGV[16] == '1'
local has_user = ARGV[21] ~= ''
local ub = has_user and ARGV[21] or nil
local budget = ARGV[26]
local allowance = tonumber(ARGV[27])
local holder = ARGV[28] == '1' and id or ''
local caps = {parse_caps(ARGV[17], ARGV[18], ARGV[19], ARGV[20])}
-- A capacity the provider said is higher (learn_limits, lua/settle.lua) wins over the config.
local learned = hash(BASE .. 'ln')
for d = 1, 3 do
  local v = tonumber(learned[CAPF[d]] or '')
  if v and caps[1][d] and v > caps[1][d] then caps[1][d] = v end
end
if has_user then table.insert(caps, parse_caps(ARGV[22], ARGV[23], ARGV[24], ARGV[25])) end

local now = now_s()
sweep_lapsed(now, 20)

-- The same call again (the client library retried after a lost reply): the same answer.
local mine = hash(BASE .. 'r:' .. id)
if mine.st ~= nil then return res_reply('G', id, mine, false) end

-- A caller that re-attached by its request_id (on any sidecar) owns this place now.
-- (Its entry may be gone, too: a try-once call by the request_id ended the wait.)
if ticket > 0 then
  local e = entry(tostring(ticket))
  if e ~= nil and e.owner ~= id then return {'S'} end
  local held = rid ~= '' and redis.call('GET', BASE .. 'rw:' .. rid)
  if e == nil and held and held ~= ticket .. '|' .. id then return {'S'} end
end

-- A repeated request_id gets the original grant back (or is refused if it asks otherwise).
if rid ~= '' then
  local prior = redis.call('GET', BASE .. 'rq:' .. rid)
  if prior then
    local r = hash(BASE .. 'r:' .. prior)
    if r.st ~= nil then
      if r.m ~= model or r.u ~= user or tonumber(r.ri) ~= amounts[2]
          or tonumber(r.ro) ~= amounts[3] then
        return {'E', 'request_id', 'already used for a different request'}
      end
      if ticket > 0 then leave_owned(tostring(ticket), ub, id, rid) end
      return res_reply('G', prior, r, true)
    end
  end
end

-- Re-attach: a caller whose stream broke calls again with its request_id, here or on another
-- sidecar, while its place is kept (the old call's sidecar renews it for the grace). It takes
-- the place over: same ticket, same since; the old call hears 'S' on its next try. A try-once
-- call (the client abandons the wait) takes it over to end it.
if rid ~= '' and ticket == 0 then
  local held = redis.call('GET', BASE .. 'rw:' .. rid)
  if held then
    local t, owner = string.match(held, '^(%d+)|(.*)$')
    local e = t and entry(t)
    if e and e.owner == owner and e.exp >= now then
      if e.ub ~= (ub or '') or e.amounts[2] ~= amounts[2] or e.amounts[3] ~= amounts[3] then
        return {'E', 'request_id', 'already used for a different request'}
      end
      ticket = tonumber(t)
    end
  end
end

local buckets = {}
for i, k in ipairs(bucket_keys(ub)) do
  -- Only the scope x budget bucket is remembered by sidecars; a user's bucket under it starts
  -- full (the scope x budget bucket bounds it anyway).
  buckets[i] = load_bucket(k[1], k[2], caps[i], now, known and i == 1)
end
local pause = tonumber(redis.call('GET', BASE .. 'pause') or '0')
local paused = pause > now

local zkeys = claim_keys(ub)
local myseq = ticket > 0 and ticket or math.huge
local lacking, blocked, any = {}, {}, paused
for i, b in ipairs(buckets) do
  lacking[i] = not fits(b, amounts)
  local h = head(zkeys[i], now)
  blocked[i] = h ~= nil and h < myseq
  any = any or lacking[i] or blocked[i]
end

-- What the caller would wait for: refill of the demand queued ahead of it and its own.
local function estimate()
  local worst = 0
  for i, b in ipairs(buckets) do
    local demand = {amounts[1], amounts[2], amounts[3]}
    local ahead = redis.call('ZRANGEBYSCORE', zkeys[i], '-inf', '(' .. myseq, 'LIMIT', 0, 200)
    for _, t in ipairs(ahead) do
      local e = entry(t)
      if e ~= nil and e.exp >= now then
        for d = 1, 3 do demand[d] = demand[d] + e.amounts[d] end
      end
    end
    worst = math.max(worst, seconds_until(b, demand, now))
    if b.mc and b.n + #ahead >= b.mc then worst = math.max(worst, 1.0) end
  end
  if paused then worst = math.max(worst, pause - now) end
  return worst
end

if not any then
  local e = entry(tostring(ticket))
  local since = (ticket > 0 and e ~= nil) and e.since or now
  local expires = now + lease_s
  local holds = {}  -- the holds this reservation's mark may end (MarkSent)
  for i, b in ipairs(buckets) do
    take(b, amounts, now, allowance, holder)
    if holder ~= '' and b.hold then holds[i] = b.hold end
    b.le = math.max(b.le, expires)
    save_bucket(b, now)
  end
  if has_user then  -- for reads (limiterd buckets): which user buckets exist under the tag
    redis.call('SADD', BASE .. 'users', ub)
    redis.call('PEXPIRE', BASE .. 'users', ms(lease_s + IDLE_TTL))
  end
  local r = {s = scope, m = model, u = user, q = rid, ri = ARGV[9], ro = ARGV[10],
             g = fmt(now), e = fmt(expires), w = fmt(math.max(0, now - since)), st = 'open',
             bu = ARGV[21], bn = budget, hk = holds[1], hu = holds[2]}
  local flat = {}
  for k, v in pairs(r) do table.insert(flat, k); table.insert(flat, v) end
  local rkey = BASE .. 'r:' .. id
  redis.call('HSET', rkey, unpack(flat))
  redis.call('PEXPIRE', rkey, ms(lease_s + RETENTION))
  redis.call('ZADD', BASE .. 'l', fmt(expires), id)
  redis.call('PEXPIRE', BASE .. 'l', ms(lease_s + IDLE_TTL))
  if rid ~= '' then redis.call('SET', BASE .. 'rq:' .. rid, id, 'PX', ms(lease_s + RETENTION)) end
  if ticket > 0 then leave(tostring(ticket), ub) end
  if rid ~= '' then redis.call('DEL', BASE .. 'rw:' .. rid) end
  local reply = res_reply('G', id, r, false)
  table.insert(reply, (holds[1] or holds[2]) and '1' or '')
  return reply
end

if try_once then
  local eta = estimate()
  if ticket > 0 then  -- it took a kept place over: the place ends, the old call hears 'S'
    leave(tostring(ticket), ub)
    redis.call('SET', BASE .. 'rw:' .. rid, ticket .. '|' .. id, 'PX', ms(queue_ttl + IDLE_TTL))
  end
  return {'R', fmt(eta)}
end

local since = now
if ticket == 0 then
  local depth = redis.call('ZCARD', zkeys[1])
  if depth >= max_waiters then return {'E', 'queue_full', depth, fmt(estimate())} end
  ticket = redis.call('INCR', BASE .. 'seq')
  myseq = ticket
else
  local e = entry(tostring(ticket))
  if e ~= nil then since = e.since end
end
-- Claim what it lacks or is queued behind; a pause alone claims the scope x budget bucket.
local claimed = false
for i, z in ipairs(zkeys) do
  if lacking[i] or blocked[i] then
    redis.call('ZADD', z, ticket, ticket)
    claimed = true
  else
    redis.call('ZREM', z, ticket)
  end
end
if not claimed then redis.call('ZADD', zkeys[1], ticket, ticket) end
local qttl = ms(queue_ttl + IDLE_TTL)
for _, z in ipairs(zkeys) do redis.call('PEXPIRE', z, qttl) end
redis.call('HSET', BASE .. 'qx', ticket, table.concat({fmt(now + queue_ttl), fmt(since),
  amounts[1], amounts[2], amounts[3], id, ub or ''}, '|'))
redis.call('PEXPIRE', BASE .. 'qx', qttl)
redis.call('PEXPIRE', BASE .. 'seq', qttl)
if rid ~= '' then redis.call('SET', BASE .. 'rw:' .. rid, ticket .. '|' .. id, 'PX', qttl) end

local refill_s = paused and (pause - now) or 0
for _, b in ipairs(buckets) do refill_s = math.max(refill_s, seconds_until(b, amounts, now)) end
local position, depth = 1, 0
for _, z in ipairs(zkeys) do
  position = position + redis.call('ZCOUNT', z, '-inf', '(' .. ticket)
  depth = depth + redis.call('ZCARD', z)
end
return {'W', ticket, fmt(since), fmt(refill_s), fmt(estimate()), position, depth,
        fmt(math.max(0, now - since))}
