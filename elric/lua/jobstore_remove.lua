-- Remove a periodic job, leaving behind the ids of its recent rounds for a while: added
-- again under the same id, it counts those still running against max_instances.
-- KEYS: schedule hash, its runs list, the schedules index, the rounds left behind.
-- ARGV: job_id, how long the rounds left behind are kept (s).
-- Returns 1 if the job existed, else 0.
-- Invariant: a round a removed job fired is counted by the job added again in its place
-- (jobstore_put takes them back) while it runs, within the time kept; a schedule key an
-- operator overwrote with another type is removed too (it has no rounds to leave).
local recent = redis.call('TYPE', KEYS[1]).ok == 'hash' and redis.call('HGET', KEYS[1], 'recent')
local existed = redis.call('DEL', KEYS[1], KEYS[2]) > 0
redis.call('ZREM', KEYS[3], ARGV[1])
if recent and #recent > 1 then
  redis.call('SET', KEYS[4], recent, 'EX', ARGV[2])
end
return existed and 1 or 0
