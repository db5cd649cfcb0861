-- Forget the queues of one page of the queues set that hold no job (none in line, none
-- parked by a limit key) and whose last activity (a job submitted or recorded) is older
-- than a retention period: their member, their per-queue counters, wake list and parked
-- count. A queue with no `last_at` yet (kept by an older elric) starts its clock now.
-- KEYS: queues, counters, parked counts
-- ARGV: queue prefix, wake prefix, retention (s), the SSCAN cursor to go on from ('0':
--       the start)
-- Returns the next cursor ('0': the whole set was walked).
-- Invariant: a queue's member and counters go together, in the step that found it empty.
-- A job of it that outlived all that (running or retrying the whole time) lists it again
-- when it is recorded (finish.lua), put back in line (requeue_fn.lua) or cancelled
-- (cancel.lua, cancel_end_fn.lua).
local qp, wp, now = ARGV[1], ARGV[2], now_ms()
local cutoff = now - tonumber(ARGV[3]) * 1000
local page = redis.call('SSCAN', KEYS[1], ARGV[4], 'COUNT', 100)
for _, q in ipairs(page[2]) do
  local c = 'queue:' .. q .. ':'
  local last = redis.call('HGET', KEYS[2], c .. 'last_at')
  local parked = tonumber(redis.call('HGET', KEYS[3], q) or 0) or 0
  if not last then
    redis.call('HSET', KEYS[2], c .. 'last_at', now)
  -- (no number, an operator's: left alone; it failed the walk, stuck on this page)
  elseif (tonumber(last) or cutoff) < cutoff and parked <= 0
      and redis.call('EXISTS', qp .. q) == 0 then
    redis.call('HDEL', KEYS[2], c .. 'submitted', c .. 'succeeded', c .. 'failed',
               c .. 'retrying', c .. 'cancelled', c .. 'last_at')
    redis.call('HDEL', KEYS[3], q)
    redis.call('DEL', wp .. q)
    redis.call('SREM', KEYS[1], q)
  end
end
return page[1]
