-- Exact dedupe: check-and-add a batch of keys in one scope's set.
-- KEYS[1] the scope's set, KEYS[2] its stats hash, KEYS[3] the scope registry (zset)
-- ARGV[1] the scope, ARGV[2..] the dedupe keys
-- Returns per key 1 (new, now added) or 0 (seen before, or earlier in this batch).
-- Invariant: a key is new exactly once; the scope is registered with its stats hash.
-- SADD per key rather than one unpack: a batch of any size fits in the Lua stack.
local out = {}
local filtered = 0
for i = 2, #ARGV do
  local r = redis.call('SADD', KEYS[1], ARGV[i])
  out[i - 1] = r
  if r == 0 then filtered = filtered + 1 end
end
redis.call('HSET', KEYS[2], 'backend', 'set')
redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
if filtered > 0 then redis.call('HINCRBY', KEYS[2], 'filtered', filtered) end
return out
