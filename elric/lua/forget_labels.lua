-- Forget the labels (batches or funcs) of one page of their set whose jobs have all ended
-- and whose last activity is older than a retention period.
-- KEYS: the labels' set (batches or funcs)
-- ARGV: their stats prefix, retention (s), the SSCAN cursor to go on from ('0': the start)
-- Returns the next cursor ('0': the whole set was walked).
-- Invariant: a label's hash and member go together, in the step that read them, so a job
-- of that label submitted at the same moment finds either both or neither.
local bp, cutoff = ARGV[1], now_ms() - tonumber(ARGV[2]) * 1000
local function counts(h)   -- a label's fields as numbers; nil if one is no number
  local n = {}
  for i = 1, 6 do
    n[i] = tonumber(h[i] or 0)
    if not n[i] then return nil end
  end
  return n
end
local page = redis.call('SSCAN', KEYS[1], ARGV[3], 'COUNT', 100)
for _, name in ipairs(page[2]) do
  local read, h = pcall(redis.call, 'HMGET', bp .. name, 'last_at', 'submitted', 'succeeded',
                        'failed', 'cancelled', 'removed')
  -- a key of another type, or a field that is no number (an operator's), is left alone:
  -- it failed the walk, stuck on this page for good
  local n = read and counts(h)
  if n and n[2] - n[3] - n[4] - n[5] - n[6] <= 0 and n[1] < cutoff then
    redis.call('DEL', bp .. name)
    redis.call('SREM', KEYS[1], name)
  end
end
return page[1]
