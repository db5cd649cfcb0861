-- Give back jobs a worker claimed but will not run (it is stopping, or they were
-- prefetched): they go back to their place in line at once.
-- KEYS: inflight, running index, seq
-- ARGV: job prefix, queue prefix, wake prefix, worker id, then pairs job_id, attempt
-- Returns how many jobs went back.
-- Invariant: only the worker holding that attempt gives a job back; the claim does not
-- count as an attempt.
local jp, qp, wp, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local n = 0
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local jk = jp .. id
  local f = redis.call('HMGET', jk, 'status', 'attempts', 'worker')
  if f[1] == 'running' and f[2] == ARGV[i + 1] and f[3] == worker then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    requeue(jk, id, qp, wp, KEYS[3], true)
    n = n + 1
  end
end
return n
