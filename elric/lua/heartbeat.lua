-- Extend the leases of the jobs a worker still holds, and mark the worker seen.
-- KEYS: inflight, workers
-- ARGV: job prefix, lease (ms), worker id, job ids...
-- Returns how many leases were extended.
-- Invariant: a lease is extended only for the worker that holds the job.
local now = now_ms()
local jp, deadline, worker = ARGV[1], now + tonumber(ARGV[2]), ARGV[3]
local n = 0
for i = 4, #ARGV do
  local f = redis.call('HMGET', jp .. ARGV[i], 'status', 'worker')
  if f[1] == 'running' and f[2] == worker then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    n = n + 1
  end
end
redis.call('ZADD', KEYS[2], now, worker)
return n
