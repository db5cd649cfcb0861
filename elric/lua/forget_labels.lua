-- Forget the labels (batches or funcs) of one page of their set whose jobs have all ended
-- and whose last activity is older than a retention period.
-- KEYS: the labels' set (batches or funcs)
-- ARGV: their stats prefix, retention (s), the SSCAN cursor to go on from ('0': the start)
-- Returns the next cursor ('0': the whole set was walked).
-- Invariant: a label's hash and member go together, in the step that read them, so a job
-- of that label submitted at the same moment finds either both or neither.
local bp, cutoff = ARGV[1], now_ms() - tonumber(ARGV[2]) * 1000
local page = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', 100)
for _, name in ipairs(page[2]) do
  local read, h = pcall(redis.call, 'HMGET', bp .. name, 'last_at', 'submitted', 'succeeded',
                        'failed', 'cancelled', 'removed')
  if read then   -- (a key of another type is left alone)
    local live = tonumber(h[2] or 0)
    for i = 3, 6 do live = live - tonumber(h[i] or 0) end
    if live <= 0 and tonumber(h[1] or 0) < cutoff then
      redis.call('DEL', bp .. name)
      redis.call('SREM', KEYS[1], name)
    end
  end
end
return page[1]
