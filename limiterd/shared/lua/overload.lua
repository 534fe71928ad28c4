-- An OVERLOADED report on a model budget (limiterd/ledger/overload.py, the same rule): this
-- many within the window mark the budget overloaded for the cooldown, on every sidecar. A
-- provider's overload is not a key's, so the tag is the budget's alone ("{ov:<budget>}"):
--   base..'oe'  zset  the reports' reservation ids by time (PEXPIRE: the window)
--   base..'o'   string  the mark: when it lifts (PX: the cooldown)
-- ARGV[4..]: the reservation id, window_s, threshold, cooldown_s.
-- Replies: {when the mark lifts, or '' when the budget is not marked}.
local id, window, threshold, cooldown = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]),
  tonumber(ARGV[7])
local now = now_s()
local events = BASE .. 'oe'
redis.call('ZADD', events, fmt(now), id)
redis.call('ZREMRANGEBYSCORE', events, '-inf', fmt(now - window))
redis.call('PEXPIRE', events, ms(window))
local mark = BASE .. 'o'
if redis.call('ZCARD', events) >= threshold then
  local until_ = now + cooldown
  if until_ > tonumber(redis.call('GET', mark) or '0') then
    redis.call('SET', mark, fmt(until_), 'PX', ms(cooldown))
  end
end
return {redis.call('GET', mark) or ''}
