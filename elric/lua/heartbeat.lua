-- Extend the leases of the jobs a worker still holds, and mark the worker seen.
-- KEYS: inflight, workers
-- ARGV: job prefix, lease (ms), worker id, then per job: job id, attempt
-- Returns the ids of the jobs the worker no longer holds at that attempt (redelivered,
-- removed, finished): it must not start them.
-- Invariant: a lease is extended only for the worker, and attempt, that holds the job.
local now = now_ms()
local jp, deadline, worker = ARGV[1], now + tonumber(ARGV[2]), ARGV[3]
local lost = {}
for i = 4, #ARGV, 2 do
  local f = redis.call('HMGET', jp .. ARGV[i], 'status', 'worker', 'attempts')
  if f[1] == 'running' and f[2] == worker and f[3] == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
  else
    lost[#lost + 1] = ARGV[i]
  end
end
redis.call('ZADD', KEYS[2], now, worker)
return lost
