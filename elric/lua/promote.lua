-- Put back in line the retrying jobs whose backoff is over.
-- KEYS: delayed, retrying index, seq
-- ARGV: job prefix, queue prefix, wake prefix, now (ms), limit
-- Returns how many jobs were due.
-- Invariant: a retry waits at the back of its priority, like a new job.
local jp, qp, wp, now, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local jk = jp .. id
  if redis.call('HGET', jk, 'status') == 'retrying' then
    requeue(jk, id, qp, wp, KEYS[3], false)
  end
end
return #ids
