-- Take back ARGV[1] of a dedupe scope's "filtered" count: keys found seen that were the
-- same job sent again, not duplicates dropped.
-- KEYS[1] the scope's stats hash
-- Returns nothing.
-- Invariant: checked and counted in one step, so a scope dropped meanwhile stays gone
-- (HINCRBY alone would make a stray hash of it, with no backend, no expiry, no registry).
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'filtered', -tonumber(ARGV[1]))
end
