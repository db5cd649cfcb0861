-- Extend the leases of the jobs a worker still holds, and mark the worker seen.
-- KEYS: inflight, workers, the worker's hash
-- ARGV: job prefix, lease (ms), worker id, jobs processed so far, then per job: job id,
--       attempt
-- Returns {lost, cancel}: the ids of the jobs the worker no longer holds at that attempt
--   (redelivered, removed, finished), which it must not start, and of those it holds that
--   cancel.lua asked to stop.
-- Invariant: a lease is extended only for the worker, and attempt, that holds the job.
local now = now_ms()
local jp, deadline, worker = ARGV[1], now + tonumber(ARGV[2]), ARGV[3]
local lost, cancel = {}, {}
for i = 5, #ARGV, 2 do
  local f = redis.call('HMGET', jp .. ARGV[i], 'status', 'worker', 'attempts', 'cancel')
  if f[1] == 'running' and f[2] == worker and f[3] == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    if f[4] then cancel[#cancel + 1] = ARGV[i] end
  else
    lost[#lost + 1] = ARGV[i]
  end
end
redis.call('ZADD', KEYS[2], now, worker)
redis.call('HSET', KEYS[3], 'processed', ARGV[4])
redis.call('EXPIRE', KEYS[3], 86400)
return {lost, cancel}
