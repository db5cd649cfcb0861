-- A function shared by the scripts that take a running job from a worker that will record
-- no outcome for it (release, requeue_due); lua.load prepends it to them, after clock_fn,
-- jobstats_fn, slot_fn and key_release_fn.
-- end_run(jk, id, status, why, c): the job hash jk ends `cancelled` (cancel.lua asked to
-- stop it: back in line it would run again until a heartbeat stopped it) or `failed` (its
-- worker was lost too often: requeue_due, MAX_REDELIVERIES) instead of going back in line.
-- It is recorded as finish.lua records that outcome (status, error with the attempt and
-- `why`, finished_at on Redis's clock, expiry, status index, counters, func and batch stats
-- with last_at, its queue's last_at and listing as forget_queues.lua needs, its round's
-- `removed` or `failed`, its limit key's slot freed; a failed one in the minute's
-- throughput, its dedupe key given back if it says so; a cancelled one's kept), but with no
-- duration: no worker measured one, so the stats count it without a time, as cancel.lua
-- does. The caller has taken it out of inflight and its status index.
-- c: {cancelled = cancelled index, counters = counters, queues = queues, due = limits due,
--     ttl = failed ttl (s), and free_slot's jp, rp, pp, wp (slot_fn.lua), roundp = round prefix,
--     bp = batch stats prefix, fp = func stats prefix, broken = a list (or nil) it names
--     the keys of another type it left alone in; to end one failed also failed = failed
--     index, mp = minute stats prefix, mttl = their ttl (s), dp = dedupe set prefix}
local function end_run(jk, id, status, why, c)
  local now = now_ms()
  local write = writer(c.broken or {})
  local f = redis.call('HMGET', jk, 'attempts', 'queue', 'batch', 'error', 'limit_key',
                       'round', 'func', 'release_key', 'dedupe_key', 'dedupe_scope',
                       'enqueued_at')
  local failed = status == 'failed'
  local index = failed and c.failed or c.cancelled
  redis.call('HDEL', jk, 'cancel')
  free_slot(id, f[5], c)
  local err = (f[4] or '') .. '--- attempt ' .. (f[1] or '0') .. ' ---\n' .. why .. '\n'
  redis.call('HSET', jk, 'status', status, 'error', err, 'finished_at', now)
  redis.call('EXPIRE', jk, c.ttl)
  write('ZADD', index, now, id)
  write('ZREMRANGEBYSCORE', index, '-inf', now - c.ttl * 1000)
  write('HINCRBY', c.counters, status, 1)
  if f[2] then   -- (its `queue` deleted while it ran, an operator's: it counts in none)
    write('HINCRBY', c.counters, 'queue:' .. f[2] .. ':' .. status, 1)
    write('HSET', c.counters, 'queue:' .. f[2] .. ':last_at', now)
    write('SADD', c.queues, f[2])
  end
  count_in_stats(c.bp, c.fp, f[3], f[7], status, now, write)
  if failed then
    local minute = c.mp .. math.floor(now / 60000)
    write('HINCRBY', minute, 'failed', 1)
    write('EXPIRE', minute, c.mttl)
    if f[8] and f[9] then release_failed_key(jk, c.dp, f[9], f[10], f[11]) end
  end
  if f[6] then
    write('HINCRBY', c.roundp .. f[6], failed and 'failed' or 'removed', 1)
    redis.call('EXPIRE', c.roundp .. f[6], c.ttl)
  end
end
