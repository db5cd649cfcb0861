-- A function shared by the scripts that end a job's run (finish, release, requeue_due, and
-- end_run in cancel_end_fn); lua.load prepends it to them.
-- free_slot(id, lk, s): job id's run no longer holds a slot of its limit key lk (nil: it
-- has none). If the key has parked jobs, they are due at once and a worker of the queue
-- the first of them goes back to is woken to put them back in line and start one (a key's
-- jobs may be in other queues than the one that ended).
-- s: {jp = job prefix, rp = limit running prefix, pp = limit parked prefix, due = limits
--     due, wp = wake prefix}
local function free_slot(id, lk, s)
  -- (pcall) a key of these of another type, an operator's, must not fail the run's end
  -- halfway, its job out of inflight: what is left undone there, fetch.lua names the key
  pcall(function()
    if lk and redis.call('SREM', s.rp .. lk, id) == 1 and redis.call('ZSCORE', s.due, lk) then
      redis.call('ZADD', s.due, 0, lk)
      local first = redis.call('ZRANGE', s.pp .. lk, 0, 0)[1]   -- member {seq:016x}:{job_id}
      local queue = first and redis.call('HGET', s.jp .. string.sub(first, 18), 'queue')
      if queue then
        redis.call('LPUSH', s.wp .. queue, '1')
        redis.call('LTRIM', s.wp .. queue, 0, 15)
      end
    end
  end)
end
