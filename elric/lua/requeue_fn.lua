-- A function shared by the scripts that put a job back in line (release, requeue_due,
-- rerun); lua.load prepends it to them.
-- requeue(jk, id, qp, wp, seq_key, keep_member, queues): the job hash jk goes back to its
-- queue (queue prefix qp .. its queue), keeping its place in line when keep_member is true
-- and it has one, else behind every job of its priority; one idle worker of that queue is
-- woken (wake prefix wp). The queue is listed in `queues` again (unless false: of another
-- type): housekeeping may have forgotten it while the job ran or waited (forget_queues.lua).
local function requeue(jk, id, qp, wp, seq_key, keep_member, queues)
  local f = redis.call('HMGET', jk, 'queue', 'priority', 'member')
  local member = f[3]
  if not keep_member or not member then
    member = string.format('%016x', redis.call('INCR', seq_key)) .. ':' .. id
  end
  redis.call('HSET', jk, 'status', 'queued', 'member', member, 'worker', '')
  redis.call('ZADD', qp .. f[1], -(tonumber(f[2]) or 0), member)
  if queues then redis.call('SADD', queues, f[1]) end
  redis.call('LPUSH', wp .. f[1], '1')
  redis.call('LTRIM', wp .. f[1], 0, 15)
end
