-- Extend the leases of the jobs a worker still holds, and mark the worker seen.
-- KEYS: inflight, workers, the worker's hash
-- ARGV: job prefix, lease (ms), worker id, jobs processed so far, its state (running,
--       paused), then per job: job id, attempt
-- Returns {lost, cancel, control}: the ids of the jobs the worker no longer holds at that
--   attempt (redelivered, removed, finished), which it must not start; of those it holds
--   that cancel.lua asked to stop; and what an operator asked of the worker (the hash's
--   paused, stop and set_queues fields, as control_worker wrote them).
-- Invariant: a lease is extended only for the worker, and attempt, that holds the job.
local now = now_ms()
local jp, deadline, worker = ARGV[1], now + tonumber(ARGV[2]), ARGV[3]
local lost, cancel = {}, {}
for i = 6, #ARGV, 2 do
  local f = redis.call('HMGET', jp .. ARGV[i], 'status', 'worker', 'attempts', 'cancel')
  if f[1] == 'running' and f[2] == worker and f[3] == ARGV[i + 1] then
    redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i])
    if f[4] then cancel[#cancel + 1] = ARGV[i] end
  else
    lost[#lost + 1] = ARGV[i]
  end
end
redis.call('ZADD', KEYS[2], now, worker)
redis.call('HSET', KEYS[3], 'processed', ARGV[4], 'state', ARGV[5])
redis.call('EXPIRE', KEYS[3], 86400)
local control = redis.call('HMGET', KEYS[3], 'paused', 'stop', 'set_queues')
return {lost, cancel, {control[1] or '', control[2] or '', control[3] or ''}}
