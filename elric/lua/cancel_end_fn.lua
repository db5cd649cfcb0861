-- A function shared by the scripts that take a running job from a worker that will record
-- no outcome for it (release, requeue_due); lua.load prepends it to them, after clock_fn,
-- jobstats_fn and slot_fn.
-- end_cancelled(jk, id, why, c): the job hash jk, which cancel.lua asked to stop (`cancel`
-- set), ends cancelled instead of going back in line, where it would run again until a
-- heartbeat stopped it. It is recorded as finish.lua records a cancel (status, error with
-- the attempt and `why`, finished_at on Redis's clock, expiry, cancelled index, counters,
-- func and batch stats with last_at, its queue's last_at and listing as forget_queues.lua
-- needs, its round's `removed`, its limit key's slot freed; its dedupe key kept), but with
-- no duration: no worker measured one, so the stats count it without a time, as cancel.lua
-- does. The caller has taken it out of inflight and its status index.
-- c: {cancelled = cancelled index, counters = counters, queues = queues, due = limits due,
--     ttl = failed ttl (s), and free_slot's jp, rp, pp, wp (slot_fn.lua), roundp = round prefix,
--     bp = batch stats prefix, fp = func stats prefix, broken = a list (or nil) it names
--     the keys of another type it left alone in}
local function end_cancelled(jk, id, why, c)
  local now = now_ms()
  local write = writer(c.broken or {})
  local f = redis.call('HMGET', jk, 'attempts', 'queue', 'batch', 'error', 'limit_key',
                       'round', 'func')
  redis.call('HDEL', jk, 'cancel')
  free_slot(id, f[5], c)
  local err = (f[4] or '') .. '--- attempt ' .. (f[1] or '0') .. ' ---\n' .. why .. '\n'
  redis.call('HSET', jk, 'status', 'cancelled', 'error', err, 'finished_at', now)
  redis.call('EXPIRE', jk, c.ttl)
  redis.call('ZADD', c.cancelled, now, id)
  redis.call('ZREMRANGEBYSCORE', c.cancelled, '-inf', now - c.ttl * 1000)
  write('HINCRBY', c.counters, 'cancelled', 1)
  if f[2] then   -- (its `queue` deleted while it ran, an operator's: it counts in none)
    write('HINCRBY', c.counters, 'queue:' .. f[2] .. ':cancelled', 1)
    write('HSET', c.counters, 'queue:' .. f[2] .. ':last_at', now)
    write('SADD', c.queues, f[2])
  end
  count_in_stats(c.bp, c.fp, f[3], f[7], 'cancelled', now, write)
  if f[6] then
    write('HINCRBY', c.roundp .. f[6], 'removed', 1)
    redis.call('EXPIRE', c.roundp .. f[6], c.ttl)
  end
end
