-- The claims a worker holds in Redis: those of a fetch whose reply it never read (its
-- connection broke after the script ran) are among them, unknown to it.
-- KEYS: running index
-- ARGV: job prefix, worker id, window (ms): claims made this long ago or since
-- Returns job_id, attempt, member, ... (Claim.run) of every job claimed within the window
--   and still in flight under that worker id.
-- Invariant: reads only the claims made in the window, not every job in flight (the
-- index's score is the claim's time); a job's key of another type, or its attempts no
-- count (an operator's mistake: no attempt of it to give back), is passed over.
local out = {}
local since = now_ms() - tonumber(ARGV[3])
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], since, '+inf')) do
  local read, f = pcall(redis.call, 'HMGET', ARGV[1] .. id, 'status', 'worker', 'attempts',
                        'member')
  if read and f[1] == 'running' and f[2] == ARGV[2]
      and string.match(f[3] or '', '^%d+$') then
    out[#out + 1] = id
    out[#out + 1] = f[3]
    out[#out + 1] = f[4] or ''
  end
end
return out
