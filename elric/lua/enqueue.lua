-- Queue new jobs. A job_id that exists already is left as it is and its status returned, so
-- a resubmitted (or resent) call queues nothing twice.
-- KEYS: seq, queues, counters, batches, fence
-- ARGV: job prefix, queue prefix, wake prefix, batch stats prefix, now (ms),
--       fence token ('' = no fence), jobs: one msgpack array of
--       [job_id, queue, priority, batch, field, value, field, value, ...]
-- Returns: [position (1-based), status, ...] of the jobs that existed already.
-- Invariant: a queued job is its hash (status queued, `member`) plus that member in its
-- queue's sorted set (score -priority; members sort FIFO by sequence number). With a fence
-- token nothing is written unless the token is current (the scheduler's lease).
local jp, qp, wp, bp, now, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
if token ~= '' and redis.call('GET', KEYS[5]) ~= token then
  return redis.error_reply('FENCED the scheduler lease token is stale')
end
local jobs = cmsgpack.unpack(ARGV[7])
local base = redis.call('INCRBY', KEYS[1], #jobs) - #jobs
local out, per_queue, per_batch, added = {}, {}, {}, 0
for i, job in ipairs(jobs) do
  local id, q, prio, batch = job[1], job[2], job[3], job[4]
  local jk = jp .. id
  local status = redis.call('HGET', jk, 'status')
  if status then
    out[#out + 1] = i
    out[#out + 1] = status
  else
    local member = string.format('%016x', base + i) .. ':' .. id
    redis.call('HSET', jk, 'status', 'queued', 'queue', q, 'priority', prio,
               'enqueued_at', now, 'member', member, unpack(job, 5))
    redis.call('ZADD', qp .. q, -tonumber(prio), member)
    per_queue[q] = (per_queue[q] or 0) + 1
    if batch ~= '' then per_batch[batch] = (per_batch[batch] or 0) + 1 end
    added = added + 1
  end
end
for q, n in pairs(per_queue) do
  redis.call('SADD', KEYS[2], q)
  redis.call('HINCRBY', KEYS[3], 'queue:' .. q .. ':submitted', n)
  for _ = 1, math.min(n, 16) do redis.call('LPUSH', wp .. q, '1') end
  redis.call('LTRIM', wp .. q, 0, 15)
end
for batch, n in pairs(per_batch) do
  redis.call('HINCRBY', bp .. batch, 'submitted', n)
  redis.call('SADD', KEYS[4], batch)
end
if added > 0 then redis.call('HINCRBY', KEYS[3], 'submitted', added) end
return out
