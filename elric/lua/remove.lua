-- Delete a job that is not running (a running one must be cancelled first).
-- KEYS: the job's hash, inflight, delayed, parked counts
-- ARGV: queue prefix, status index prefix, job_id, limit parked prefix, round prefix,
--       batch stats prefix, func stats prefix, round ttl (s)
-- Returns {the status the job had ('unreadable': its key held another type), then the keys
--   of another type its counts were left out of} ({}: there was none); an error 'RUNNING'
--   when it runs.
-- Invariant: no index keeps an entry for a job that is gone (one whose key held another
-- type: its line and index drop it where fetch or list_jobs meet it); a round no longer
-- waits for a job of its own that was removed before it ended, nor its func and batch
-- (`removed`).
local read, f = pcall(redis.call, 'HMGET', KEYS[1], 'status', 'queue', 'member',
                      'limit_key', 'round', 'batch', 'func')
if not read then   -- an operator's overwrite: no fields tell its lines; it leaves them
  redis.call('ZREM', KEYS[2], ARGV[3])   -- where they meet it, as a removed job does
  redis.call('ZREM', KEYS[3], ARGV[3])
  redis.call('DEL', KEYS[1])
  return {'unreadable'}
end
if not f[1] then return {} end
if f[1] == 'running' then return redis.error_reply('RUNNING') end
local broken = {f[1]}
local write = writer(broken)
out_of_line(f, ARGV[1], ARGV[4], KEYS[4], write)
if f[1] == 'queued' or f[1] == 'retrying' then   -- an ended job was counted when it ended
  if f[5] then
    write('HINCRBY', ARGV[5] .. f[5], 'removed', 1)
    redis.call('EXPIRE', ARGV[5] .. f[5], ARGV[8])   -- FAILED_TTL after its last change
  end
  count_in_stats(ARGV[6], ARGV[7], f[6], f[7], 'removed', nil, write)
end
redis.call('ZREM', KEYS[2], ARGV[3])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('ZREM', ARGV[2] .. f[1], ARGV[3])
redis.call('DEL', KEYS[1])
return broken
