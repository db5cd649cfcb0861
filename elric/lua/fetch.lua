-- Claim up to `limit` jobs for a worker: highest priority first across its queues, FIFO
-- within a priority.
-- KEYS: inflight, running index
-- ARGV: job prefix, queue prefix, now (ms), lease deadline (ms), worker id, limit, queues...
-- Returns per job: {job_id, attempt, func, args, kwargs, timeout, max_retries, queue,
--                   dedupe_scope}
-- Invariant: a claimed job is running under this worker, with a lease in inflight that
-- the worker renews; its attempt counter counts the claim.
local jp, qp, now, deadline, worker, limit =
  ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], tonumber(ARGV[6])
local cands = {}
for i = 7, #ARGV do
  local qk = qp .. ARGV[i]
  local r = redis.call('ZRANGE', qk, 0, limit - 1, 'WITHSCORES')
  for j = 1, #r, 2 do cands[#cands + 1] = {tonumber(r[j + 1]), r[j], qk} end
end
if #ARGV > 7 then
  table.sort(cands, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
end
local out = {}
for _, c in ipairs(cands) do
  if #out >= limit then break end
  redis.call('ZREM', c[3], c[2])
  local id = string.sub(c[2], 18)   -- member: {seq:016x}:{job_id}
  local jk = jp .. id
  if redis.call('EXISTS', jk) == 1 then
    local attempt = redis.call('HINCRBY', jk, 'attempts', 1)
    redis.call('HSET', jk, 'status', 'running', 'worker', worker, 'started_at', now)
    redis.call('ZADD', KEYS[1], deadline, id)
    redis.call('ZADD', KEYS[2], now, id)
    local f = redis.call('HMGET', jk, 'func', 'args', 'kwargs', 'timeout', 'max_retries',
                         'queue', 'dedupe_scope')
    out[#out + 1] = {id, attempt, f[1], f[2] or '', f[3] or '', f[4] or '', f[5] or '0',
                     f[6], f[7] or ''}
  end
end
return out
