-- Housekeeping of one tag, run by any sidecar; running it twice changes nothing.
-- Settles lapsed leases, drops queue entries whose sidecar stopped renewing them.
-- Replies: {next lease expiry or '', whether anything of the tag is left (1/0)}.
local now = now_s()
while sweep_lapsed(now, 100) == 100 do end
local qx = hash(BASE .. 'qx')
for ticket, _ in pairs(qx) do
  local e = entry(ticket)
  if e ~= nil and e.exp < now then leave(ticket, e.ub) end
end
local nxt = redis.call('ZRANGE', BASE .. 'l', 0, 0, 'WITHSCORES')
local alive = redis.call('EXISTS', BASE .. 'b', BASE .. 'l', BASE .. 'qx')
return {nxt[2] or '', alive > 0 and 1 or 0}
