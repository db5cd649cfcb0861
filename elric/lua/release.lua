-- Give back jobs a worker claimed but will not run, without using an attempt: at once to
-- their place in line (it is stopping, or they were prefetched), or, with a delay, as
-- retrying with the reason on the job (it does not load their module: another may).
-- KEYS: inflight, running index, seq, delayed, retrying index, counters
-- ARGV: job prefix, queue prefix, wake prefix, worker id, delay (ms; '' = at once),
--       reason, then pairs job_id, attempt
-- Returns how many jobs went back.
-- Invariant: only the worker holding that attempt gives a job back; a job handed back
-- with a reason keeps it (`not_run`), so a job no worker can run is visible.
local jp, qp, wp, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local delay, reason, now = tonumber(ARGV[5]), ARGV[6], now_ms()
local n = 0
for i = 7, #ARGV, 2 do
  local id = ARGV[i]
  local jk = jp .. id
  local f = redis.call('HMGET', jk, 'status', 'attempts', 'worker')
  if f[1] == 'running' and f[2] == ARGV[i + 1] and f[3] == worker then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    if delay then
      redis.call('HSET', jk, 'status', 'retrying', 'retry_at', now + delay, 'not_run',
                 worker .. ': ' .. reason)
      redis.call('ZADD', KEYS[4], now + delay, id)
      redis.call('ZADD', KEYS[5], now, id)
    else
      requeue(jk, id, qp, wp, KEYS[3], true)
    end
    n = n + 1
  end
end
if delay and n > 0 then redis.call('HINCRBY', KEYS[6], 'handed_back', n) end
return n
