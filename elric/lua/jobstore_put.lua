-- Store a periodic job's hash if its version is still the one the caller read.
-- KEYS: schedule hash, its runs list, the schedules index, the scheduler wake list, the
--       sequence counter (versions are drawn from it), the hash of a one-off job of that id,
--       the rounds a removed job of that id left behind (jobstore_remove).
-- ARGV: job_id, expected version ("" = must not exist yet), index score ("+inf" paused,
--       "" finished, else ms), fresh ("1": drop old runs), finished ttl, field, value, ...
-- Returns the new version, or -1 when the version moved (or the job exists and must not);
-- a new periodic job whose id a one-off job has gets that job's status, and is not stored.
-- Invariant: every write gives "version" a value never used before (compare-and-set with
-- the scheduler's fire script; a job added anew must not match a plan read from the job
-- removed before it);
-- a job is in the index exactly while it has a next fire or is paused; fields a write does
-- not name (the scheduler's "recent", "created_at") are kept; a job added anew takes back
-- the rounds a removed one left, so max_instances counts those still running.
local cur = redis.call('HGET', KEYS[1], 'version') or ''
if cur ~= ARGV[2] then return -1 end
local taken = cur == '' and redis.call('HGET', KEYS[6], 'status')
if taken then return taken end
redis.call('PERSIST', KEYS[1])
if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
if cur == '' then
  local left = redis.call('GET', KEYS[7])
  if left then
    redis.call('HSET', KEYS[1], 'recent', left)
    redis.call('DEL', KEYS[7])
  end
end
local version = next_version(KEYS[5], cur)
redis.call('HSET', KEYS[1], 'version', version, unpack(ARGV, 6))
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return version
end
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
if ARGV[3] ~= '+inf' and redis.call('ZRANGE', KEYS[3], 0, 0)[1] == ARGV[1] then
  -- this job is now the soonest: wake the scheduling master, whichever it is
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, 0)
end
return version
