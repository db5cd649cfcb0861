-- Give the scheduler lease up (a master stopping), so another takes it without waiting.
-- KEYS: lease, fence.  ARGV: master id, fence token.
-- Returns 1 when released, 0 when it was not this master's (current) lease (a lease or
-- fence of another type, an operator's write, is no master's).
-- Invariant: a master never deletes a lease another master holds.
if redis.call('TYPE', KEYS[1]).ok == 'string' and redis.call('GET', KEYS[1]) == ARGV[1]
    and redis.call('TYPE', KEYS[2]).ok == 'string' and redis.call('GET', KEYS[2]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
