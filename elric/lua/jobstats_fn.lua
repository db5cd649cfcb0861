-- Count one event of a job in its batch's and its func's stats hashes (elric/jobstats.py),
-- given their key prefixes; with `now` (ms) it is their last activity too (`last_at`).
-- `call` (default redis.call) makes the writes (a caller's that leaves a bad key alone).
local function count_in_stats(bp, fp, batch, func, field, now, call)
  call = call or redis.call
  if batch and batch ~= '' then
    call('HINCRBY', bp .. batch, field, 1)
    if now then call('HSET', bp .. batch, 'last_at', now) end
  end
  if func then
    call('HINCRBY', fp .. func, field, 1)
    if now then call('HSET', fp .. func, 'last_at', now) end
  end
end
