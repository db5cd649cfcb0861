-- Unregister dedupe scopes whose stats hash is gone (expired, or deleted by hand).
-- KEYS[1] the scope registry (zset), KEYS[2..] the stats hash of each scope to check
-- ARGV[i] the scope whose stats hash is KEYS[i + 1]
-- Returns nothing.
-- Invariant: checked and removed in one step, so a scope written meanwhile stays listed.
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
