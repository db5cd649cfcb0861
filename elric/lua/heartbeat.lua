-- Extend the leases of the jobs a worker still holds.
-- KEYS: inflight
-- ARGV: job prefix, lease deadline (ms), worker id, job ids...
-- Returns how many leases were extended.
-- Invariant: a lease is extended only for the worker that holds the job.
local jp, deadline, worker = ARGV[1], ARGV[2], ARGV[3]
local n = 0
for i = 4, #ARGV do
  local f = redis.call('HMGET', jp .. ARGV[i], 'status', 'worker')
  if f[1] == 'running' and f[2] == worker then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    n = n + 1
  end
end
return n
