-- Extend the scheduler lease.
-- KEYS: lease, fence.  ARGV: master id, lease ms, fence token.
-- Returns 1 when renewed, 0 when the lease or the token is no longer this master's (a
-- lease or fence key of another type, an operator's write, is no master's: taken again,
-- it is replaced).
-- Invariant: only the holder of the current token extends the lease.
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1]
    and redis.call('TYPE', KEYS[2]).ok == 'string' and redis.call('GET', KEYS[2]) == ARGV[3] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
