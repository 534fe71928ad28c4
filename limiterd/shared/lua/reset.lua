-- An operator forgives a bucket: full again, debt gone; waiters are woken.
-- ARGV[4]: the user bucket's ub, or '' for the scope x budget bucket.
-- Replies: {1} when the bucket exists, {0} when it does not (an idle one is full anyway).
local now = now_s()
local k = bucket_keys(ARGV[4] ~= '' and ARGV[4] or nil)
k = k[#k]
local b = load_bucket(k[1], k[2], nil, now, false)
if b == nil then return {0} end
for d = 1, 3 do
  if b.cap[d] then b.lv[d] = b.cap[d] end
end
save_bucket(b, now)
wake()
return {1}
