-- Record fires the dedupe filter dropped (Scheduler._filtered): they leave the pending
-- fires, count as `filtered` in the fire stats, and their run records say so.
-- KEYS: pending fires, fire stats, then per fire its periodic job's runs list
-- ARGV: per fire: fire id, its run record as read ("": not found), the record to put there
-- Returns: the fire ids it took out of the pending fires (counted and recorded).
-- Invariant: a fire is counted and recorded once, by the step that takes it out of the
-- pending fires; one no longer there was decided by whoever took it out (a later leader
-- queued it: its record stays); a record is replaced only where it still is as read (LPOS
-- finds it by value); a runs list or fire stats of another type are left alone.
local out = {}
for i = 1, #KEYS - 2 do
  local a = 3 * i - 2
  if redis.call('HDEL', KEYS[1], ARGV[a]) == 1 then
    out[#out + 1] = ARGV[a]
    pcall(redis.call, 'HINCRBY', KEYS[2], 'filtered', 1)
    if ARGV[a + 1] ~= '' then
      local ok, at = pcall(redis.call, 'LPOS', KEYS[i + 2], ARGV[a + 1])
      if ok and at then redis.call('LSET', KEYS[i + 2], at, ARGV[a + 2]) end
    end
  end
end
return out
