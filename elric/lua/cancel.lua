-- Cancel a job: a queued or retrying one at once, a running one by asking its worker.
-- KEYS: the job's hash, delayed, parked counts, cancelled index, counters, queues
-- ARGV: queue prefix, status index prefix, job_id, limit parked prefix, round prefix,
--       failed ttl (s), batch stats prefix, func stats prefix
-- Returns {the status the job had, then the keys of another type its counts were left
--   out of} ({}: no such job); an error 'UNREADABLE' when its key holds another type (an
--   operator's: only a delete, remove.lua, clears it). A queued or retrying job is now
--   cancelled; a running one gets `cancel` set, and its worker stops it and records it
--   cancelled (finish.lua); a finished job is left alone.
-- Invariant: a cancelled job is in no queue, parked set or delayed set, so it never runs;
-- its round no longer waits for it, and its func and batch no longer count it live; their
-- last_at is now, so the batch's stats outlive the cancelled job (forget_labels.lua), and
-- so is its queue's, listed again (forget_queues.lua may have forgotten it meanwhile).
local now, id, ttl = now_ms(), ARGV[3], tonumber(ARGV[6])
local read, f = pcall(redis.call, 'HMGET', KEYS[1], 'status', 'queue', 'member',
                      'limit_key', 'round', 'batch', 'func')
if not read then return redis.error_reply('UNREADABLE') end
if not f[1] then return {} end
if f[1] == 'running' then
  redis.call('HSET', KEYS[1], 'cancel', '1')
  return {f[1]}
end
if f[1] ~= 'queued' and f[1] ~= 'retrying' then return {f[1]} end
local broken = {f[1]}
local write = writer(broken)
out_of_line(f, ARGV[1], ARGV[4], KEYS[3], write)
redis.call('ZREM', KEYS[2], id)
redis.call('ZREM', ARGV[2] .. f[1], id)
if f[5] then
  write('HINCRBY', ARGV[5] .. f[5], 'removed', 1)
  redis.call('EXPIRE', ARGV[5] .. f[5], ttl)   -- FAILED_TTL after its last change
end
redis.call('HSET', KEYS[1], 'status', 'cancelled', 'finished_at', now)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('ZADD', KEYS[4], now, id)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - ttl * 1000)
write('HINCRBY', KEYS[5], 'cancelled', 1)
write('HINCRBY', KEYS[5], 'queue:' .. f[2] .. ':cancelled', 1)
write('HSET', KEYS[5], 'queue:' .. f[2] .. ':last_at', now)
write('SADD', KEYS[6], f[2])
count_in_stats(ARGV[7], ARGV[8], f[6], f[7], 'cancelled', now, write)
return broken
