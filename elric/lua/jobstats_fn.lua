-- Count one event of a job in its batch's and its func's stats hashes (elric/jobstats.py),
-- given their key prefixes; with `now` (ms) it is their last activity too (`last_at`).
local function count_in_stats(bp, fp, batch, func, field, now)
  if batch and batch ~= '' then
    redis.call('HINCRBY', bp .. batch, field, 1)
    if now then redis.call('HSET', bp .. batch, 'last_at', now) end
  end
  if func then
    redis.call('HINCRBY', fp .. func, field, 1)
    if now then redis.call('HSET', fp .. func, 'last_at', now) end
  end
end
