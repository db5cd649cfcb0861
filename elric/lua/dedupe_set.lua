-- Exact dedupe: check-and-add a batch of keys in one scope's set.
-- KEYS[1] the scope's set, KEYS[2] its stats hash, KEYS[3] the scope registry (zset)
-- ARGV[1] the scope, ARGV[2] the prefix of the keys that name the job taking a key ('':
--   none), ARGV[3] how long those are kept (ms), ARGV[4..] the dedupe keys, then (with a
--   prefix) as many job ids, one per key ('': that key's job is not named)
-- Returns per key 1 (new, now added) or 0 (seen before, or earlier in this batch); error
--   'BACKEND <name>' if another backend filled the scope.
-- Invariant: a key is new exactly once; the scope is registered with its stats hash; a
-- named job that takes a key is recorded as its taker (`{len(scope)}:{scope}{key}`) in
-- the same step, so a master that dies before queueing it leaves the key claimable by a
-- resend of that job.
-- SADD per key rather than one unpack: a batch of any size fits in the Lua stack.
local scope, tp, tttl = ARGV[1], ARGV[2], ARGV[3]
local other = redis.call('HGET', KEYS[2], 'backend')
if other and other ~= 'set' then return redis.error_reply('BACKEND ' .. other) end
local n = tp == '' and #ARGV - 3 or (#ARGV - 3) / 2
local out = {}
local filtered = 0
for i = 1, n do
  local key = ARGV[3 + i]
  local r = redis.call('SADD', KEYS[1], key)
  out[i] = r
  if r == 0 then
    filtered = filtered + 1
  elseif tp ~= '' and ARGV[3 + n + i] ~= '' then
    redis.call('SET', tp .. ARGV[3 + n + i], #scope .. ':' .. scope .. key, 'PX', tttl)
  end
end
redis.call('HSET', KEYS[2], 'backend', 'set')
redis.call('ZADD', KEYS[3], '+inf', scope)
if filtered > 0 then redis.call('HINCRBY', KEYS[2], 'filtered', filtered) end
return out
