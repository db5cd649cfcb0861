-- The claims a worker holds in Redis: those of a fetch whose reply it never read (its
-- connection broke after the script ran) are among them, unknown to it.
-- KEYS: inflight
-- ARGV: job prefix, worker id
-- Returns job_id, attempt, ... of every job in flight under that worker id.
-- Invariant: reads only; a job's key of another type (an operator's mistake) is passed over.
local out = {}
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local read, f = pcall(redis.call, 'HMGET', ARGV[1] .. id, 'status', 'worker', 'attempts')
  if read and f[1] == 'running' and f[2] == ARGV[2] then
    out[#out + 1] = id
    out[#out + 1] = f[3]
  end
end
return out
