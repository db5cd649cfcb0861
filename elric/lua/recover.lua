-- Put back in line the jobs whose lease ran out (their worker died or stalled).
-- KEYS: inflight, running index, seq, counters
-- ARGV: job prefix, queue prefix, wake prefix, now (ms), limit
-- Returns the ids of the jobs put back.
-- Invariant: a running job whose lease expired is queued again in its old place; the
-- attempt it used stays counted.
local jp, qp, wp, now, limit = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local jk = jp .. id
  if redis.call('HGET', jk, 'status') == 'running' then
    requeue(jk, id, qp, wp, KEYS[3], true)
    redis.call('HINCRBY', KEYS[4], 'redelivered', 1)
    out[#out + 1] = id
  end
end
return out
