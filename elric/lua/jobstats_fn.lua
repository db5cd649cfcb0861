-- Count one event of a job in its batch's and its func's stats hashes (elric/jobstats.py),
-- given their key prefixes.
local function count_in_stats(bp, fp, batch, func, field)
  if batch and batch ~= '' then redis.call('HINCRBY', bp .. batch, field, 1) end
  if func then redis.call('HINCRBY', fp .. func, field, 1) end
end
