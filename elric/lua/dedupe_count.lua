-- Count ARGV[1] jobs a dedupe scope dropped in its "filtered": the caller counts them once
-- it knows them from resends of jobs that exist, so the count never goes down (a
-- Prometheus counter, elric_dedupe_hits_total).
-- KEYS[1] the scope's stats hash
-- Returns nothing.
-- Invariant: checked and counted in one step, so a scope dropped meanwhile stays gone
-- (HINCRBY alone would make a stray hash of it, with no backend, no expiry, no registry).
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'filtered', tonumber(ARGV[1]))
end
