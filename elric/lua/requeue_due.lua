-- Put back in line the jobs whose time in a sorted set has come: running jobs whose lease
-- ran out (their worker died or stalled), or retrying jobs whose backoff is over.
-- KEYS: the due set (inflight or delayed), the status index of those jobs, seq, counters
-- ARGV: job prefix, queue prefix, wake prefix, limit, the status the jobs must
--       still have, keep place ('1': a redelivered job keeps its place in line; '0': a
--       retry waits behind its priority, like a new job), counter to count them in ('' none)
-- Returns the ids of the jobs put back.
-- Invariant: a job leaves the due set once, and is queued only if it still has the status.
local jp, qp, wp, now, limit = ARGV[1], ARGV[2], ARGV[3], now_ms(), ARGV[4]
local status, keep, counter = ARGV[5], ARGV[6] == '1', ARGV[7]
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  local jk = jp .. id
  if redis.call('HGET', jk, 'status') == status then
    requeue(jk, id, qp, wp, KEYS[3], keep)
    if counter ~= '' then redis.call('HINCRBY', KEYS[4], counter, 1) end
    out[#out + 1] = id
  end
end
return out
