-- Hand back jobs a worker holds but cannot run (it does not load their module): each
-- waits as retrying for a while, without using an attempt, for a worker that can.
-- KEYS: inflight, running index, delayed, retrying index, counters
-- ARGV: job prefix, worker id, delay (ms), reason, then pairs job_id, attempt
-- Returns how many jobs went back.
-- Invariant: only the worker holding that attempt hands a job back; the reason stays on
-- the job (`not_run`), so a job no worker can run is visible, never silently waiting.
local now = now_ms()
local jp, worker, delay, reason = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
local n = 0
for i = 5, #ARGV, 2 do
  local id = ARGV[i]
  local jk = jp .. id
  local f = redis.call('HMGET', jk, 'status', 'attempts', 'worker')
  if f[1] == 'running' and f[2] == ARGV[i + 1] and f[3] == worker then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    redis.call('HSET', jk, 'status', 'retrying', 'retry_at', now + delay, 'not_run',
               worker .. ': ' .. reason)
    redis.call('ZADD', KEYS[3], now + delay, id)
    redis.call('ZADD', KEYS[4], now, id)
    n = n + 1
  end
end
if n > 0 then redis.call('HINCRBY', KEYS[5], 'handed_back', n) end
return n
