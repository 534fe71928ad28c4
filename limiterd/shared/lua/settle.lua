-- Report, Release, KeepAlive or MarkSent of one reservation (ARGV[4] names which).
-- ARGV[4..]: op ('report'|'release'|'keepalive'|'mark'), id, then
--   report: input, output, outcome, retry_after_s, remaining requests/input/output from the
--     provider's headers ('' = not sent), tolerance in tokens, the limits from the headers
--     (same three), learn_limits ('1'/'0'), how long a learned capacity is kept (s);
--   keepalive: lease_s.
-- Replies: {'S', replayed, id, reservation...}; {'X', '0', id, reservation...} when it was
--   settled another way; {'E', 'not_found'}. A Report's 'S' may end with what the headers
--   lowered ("dim:was:now,...") and raised ("capfield:was:now,...").
local op, id = ARGV[4], ARGV[5]
local now = now_s()
sweep_lapsed(now, 20)
local rkey = BASE .. 'r:' .. id
local r = hash(rkey)
if r.st == nil then return {'E', 'not_found'} end

if op == 'keepalive' then
  if r.st ~= 'open' then return res_reply('X', id, r, false) end
  local expires = now + tonumber(ARGV[6])
  r.e = fmt(expires)
  redis.call('HSET', rkey, 'e', r.e)
  redis.call('PEXPIRE', rkey, ms(tonumber(ARGV[6]) + RETENTION))
  redis.call('ZADD', BASE .. 'l', r.e, id)
  redis.call('PEXPIRE', BASE .. 'l', ms(tonumber(ARGV[6]) + IDLE_TTL))
  for _, k in ipairs(bucket_keys(r.bu)) do
    local b = load_bucket(k[1], k[2], nil, now, false)
    if b ~= nil then
      b.le = math.max(b.le, expires)
      save_bucket(b, now)
    end
  end
  return res_reply('S', id, r, false)
end

if op == 'mark' then
  -- The caller sends now: the first mark of a reservation granted during a hold ends it, and
  -- the held dimensions refill again, charged one allowance. Again, late, or after the hold
  -- ended: nothing.
  if r.st == 'open' and ((r.hk or '') ~= '' or (r.hu or '') ~= '') then
    local holds = {r.hk, r.hu}
    for i, k in ipairs(bucket_keys(r.bu)) do
      local b = load_bucket(k[1], k[2], nil, now, false)
      if b ~= nil and holds[i] ~= nil and b.hold == holds[i] then
        end_hold(b, true)
        save_bucket(b, now)
      end
    end
    redis.call('HDEL', rkey, 'hk', 'hu')
    wake()
  end
  return res_reply('S', id, r, false)
end

local state = op == 'report' and 'reported' or 'released'
if r.st ~= 'open' then
  if r.st == state then return res_reply('S', id, r, true) end
  return res_reply('X', id, r, false)
end

if op == 'release' then
  settle(id, r, 'released', {1, tonumber(r.ri), tonumber(r.ro)},
         {'fr', '1', 'fi', r.ri, 'fo', r.ro}, now)
  return res_reply('S', id, r, false)
end

local d_in = tonumber(r.ri) - tonumber(ARGV[6])
local d_out = tonumber(r.ro) - tonumber(ARGV[7])
local outcome, retry_after = ARGV[8], tonumber(ARGV[9])
settle(id, r, 'reported', {0, d_in, d_out},
       {'fi', math.max(0, d_in), 'fo', math.max(0, d_out), 'oi', math.max(0, -d_in),
        'oo', math.max(0, -d_out), 'oc', outcome}, now)
if outcome == 'rate_limited' and retry_after > 0 then
  local until_ = now + retry_after
  if until_ > tonumber(redis.call('GET', BASE .. 'pause') or '0') then
    redis.call('SET', BASE .. 'pause', fmt(until_), 'PX', ms(retry_after))
  end
end
-- Header sync: the provider says less remains than we believe (beyond its rounding): lower.
-- With learn_limits, a limit above the bucket's capacity raises it (a tier upgrade): kept in
-- base..'ln' for every sidecar, renewed while the provider's headers still say so.
local remaining = {ARGV[10], ARGV[11], ARGV[12]}
local tolerance = {1, tonumber(ARGV[13]), tonumber(ARGV[13])}
local learn = ARGV[17] == '1'
local limits = {}
for d = 1, 3 do limits[d] = learn and tonumber(ARGV[13 + d]) or nil end
local told = remaining[1] ~= '' or remaining[2] ~= '' or remaining[3] ~= ''
  or limits[1] ~= nil or limits[2] ~= nil or limits[3] ~= nil
if told then
  local b = load_bucket(BASE .. 'b', BASE .. 'seen', nil, now, false)
  if b ~= nil then
    local changed, raised = {}, {}
    local lkey, keep_ms = BASE .. 'ln', ms(tonumber(ARGV[18]))
    for d = 1, 3 do
      local limit = limits[d]
      if limit ~= nil and b.cap[d] then
        local had = tonumber(redis.call('HGET', lkey, CAPF[d]) or '')
        if limit > b.cap[d] then
          table.insert(raised, CAPF[d] .. ':' .. b.cap[d] .. ':' .. limit)
          b.cap[d] = limit
          redis.call('HSET', lkey, CAPF[d], string.format('%d', limit))
          redis.call('PEXPIRE', lkey, keep_ms)
        elseif had ~= nil and limit >= had then
          redis.call('PEXPIRE', lkey, keep_ms)  -- still so: keep it
        end
      end
      local left = tonumber(remaining[d])
      if left ~= nil and b.cap[d] and left + tolerance[d] < b.lv[d] then
        table.insert(changed, DIM[d] .. ':' .. fmt(b.lv[d]) .. ':' .. left)
        b.lv[d] = left
      end
    end
    if #changed > 0 or #raised > 0 then save_bucket(b, now) end
    if #raised > 0 then wake() end  -- a waiter may fit the larger bucket
    local reply = res_reply('S', id, r, false)
    table.insert(reply, table.concat(changed, ','))
    table.insert(reply, table.concat(raised, ','))
    return reply
  end
end
return res_reply('S', id, r, false)
