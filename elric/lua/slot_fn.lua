-- A function shared by the scripts that end a job's run (finish, release, requeue_due, and
-- end_cancelled in cancel_end_fn); lua.load prepends it to them.
-- free_slot(id, lk, queue, rp, due, wp): job id's run no longer holds a slot of its limit
-- key lk (nil: it has none) in the key's running set (limit running prefix rp). If the
-- key has parked jobs, they are due at once (due: limits due) and a worker of the job's
-- queue is woken (wake prefix wp) to put them back in line and start one.
local function free_slot(id, lk, queue, rp, due, wp)
  if lk and redis.call('SREM', rp .. lk, id) == 1 and redis.call('ZSCORE', due, lk) then
    redis.call('ZADD', due, 0, lk)
    redis.call('LPUSH', wp .. queue, '1')
    redis.call('LTRIM', wp .. queue, 0, 15)
  end
end
