-- Take (or take again) the scheduler lease.
-- KEYS: lease, fence.  ARGV: master id, lease ms.
-- Returns {1, new fence token} when this master holds the lease now, else {0, lease pttl}.
-- Invariant: every taking of the lease hands out a larger token, so a master that lost it
-- can be told apart by its older token; a lease always runs out unless renewed: one
-- without an expiry (keys restored without their TTLs, a PERSIST) gets one, and a key of
-- another type (an operator's write) is no master's lease and is replaced. A fence INCR
-- fails on (another type, no integer: an operator's write) matches no master's token; it
-- is replaced by Redis's clock in microseconds: above every token counted up from 0, and
-- above every token counted from an earlier such replacement (each taking is a call of its
-- own, longer than a microsecond), unless Redis's clock went back meanwhile.
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then redis.call('DEL', KEYS[1]) end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  local counted, token = pcall(redis.call, 'INCR', KEYS[2])
  if counted then return {1, token} end
  local t = redis.call('TIME')
  redis.call('SET', KEYS[2], t[1] .. string.format('%06d', tonumber(t[2])))
  return {1, redis.call('INCR', KEYS[2])}
end
if redis.call('PTTL', KEYS[1]) == -1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return {0, redis.call('PTTL', KEYS[1])}
