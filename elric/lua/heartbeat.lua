-- Extend the leases of the jobs a worker still holds, mark the worker seen and record its
-- state and load.
-- KEYS: inflight, workers, the worker's hash
-- ARGV: job prefix, lease (ms), worker id, n, then n field/value pairs for the worker's hash
--       (the whole of it: host, pid, queues, concurrency, version, state, counters, load),
--       then per job: job id, attempt, member (Claim.run)
-- Returns {lost, cancel, control}: the ids of the jobs the worker no longer holds in that
--   run (redelivered, removed, finished, rerun), which it must not start; of those it holds
--   that cancel.lua asked to stop; and what an operator asked of the worker (the hash's
--   paused, stop, set_queues and set_concurrency fields, as control_worker wrote them);
--   then the keys passed over for holding another type (a job's hash: that job is lost;
--   the worker's hash: nothing written to it, no control read; workers: not marked seen;
--   inflight: no lease renewed).
-- Invariant: a lease is extended only for the worker, and run, that holds the job: a rerun,
-- or a job of a reused id, counts its attempts from 1 again under a new queue member (each
-- enqueue writes one), so a claim of an earlier run never renews it.
local now = now_ms()
-- A registered worker's first write grows nothing (EXPIRE): Redis refuses a script under
-- maxmemory only at a first write that may. Else a full Redis refuses every lease renewal
-- while requeue_due.lua (a ZREM first) passes: running jobs are taken away, run again.
if redis.call('TYPE', KEYS[3])['ok'] == 'hash' then redis.call('EXPIRE', KEYS[3], 86400) end
local jp, deadline, worker = ARGV[1], now + tonumber(ARGV[2]), ARGV[3]
local n = tonumber(ARGV[4])
local lost, cancel = {}, {}
local broken = {}   -- keys of another type (an operator overwrote them): named in the reply
-- inflight or workers of another type (an operator's) failed every heartbeat, for good:
-- no cancel or lost claim was heard, nor what an operator asked. Passed over, named.
local function zset(key)
  local kind = redis.call('TYPE', key)['ok']
  if kind == 'zset' or kind == 'none' then return true end
  broken[#broken + 1] = key
  return false
end
local renew = zset(KEYS[1])
for i = 5 + 2 * n, #ARGV, 3 do
  local read, f = pcall(redis.call, 'HMGET', jp .. ARGV[i], 'status', 'worker', 'attempts',
                        'cancel', 'member')
  if not read then broken[#broken + 1], f = jp .. ARGV[i], {} end   -- lost, as if removed
  if f[1] == 'running' and f[2] == worker and f[3] == ARGV[i + 1] and f[5] == ARGV[i + 2] then
    if renew then redis.call('ZADD', KEYS[1], 'XX', deadline, ARGV[i]) end
    if f[4] then cancel[#cancel + 1] = ARGV[i] end
  else
    lost[#lost + 1] = ARGV[i]
  end
end
if zset(KEYS[2]) then redis.call('ZADD', KEYS[2], now, worker) end
local read, control = pcall(redis.call, 'HMGET', KEYS[3], 'paused', 'stop', 'set_queues',
                            'set_concurrency')
if read then
  if n > 0 then redis.call('HSET', KEYS[3], unpack(ARGV, 5, 4 + 2 * n)) end
  redis.call('EXPIRE', KEYS[3], 86400)
else
  broken[#broken + 1], control = KEYS[3], {}
end
return {lost, cancel, {control[1] or '', control[2] or '', control[3] or '', control[4] or ''},
        unpack(broken)}
