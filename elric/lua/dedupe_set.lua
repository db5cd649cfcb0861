-- Exact dedupe: check-and-add a batch of keys in one scope's set.
-- KEYS[1] the scope's set, KEYS[2] its stats hash, KEYS[3] the scope registry (zset)
-- ARGV[1] the scope, ARGV[2] the prefix of the keys that name the job taking a key ('':
--   none), ARGV[3] how long those are kept (ms), ARGV[4] after how long (ms) a key whose job
--   was never queued goes to the next job (dedupe_taker_fn.lua), ARGV[5..] the dedupe keys,
--   then (with a prefix) as many job ids, one per key
-- Returns per key 1 (new, now added) or 0 (seen before, or earlier in this batch); error
--   'BACKEND <name>' if another backend filled the scope.
-- Invariant: a key is new exactly once; the scope is registered with its stats hash; a
-- job that takes a key is recorded as its taker in the same step, so a master that dies
-- before queueing it leaves the key claimable by a resend of that job, and by any job once
-- the note is orphaned. A key seen is not counted `filtered` here: the caller counts the
-- jobs it drops (dedupe_count.lua), once it knows a resend from a duplicate.
-- SADD per key rather than one unpack: a batch of any size fits in the Lua stack.
local scope, tp, tttl, grace = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local other = redis.call('HGET', KEYS[2], 'backend')
if other and other ~= 'set' then return redis.error_reply('BACKEND ' .. other) end
local n = tp == '' and #ARGV - 4 or (#ARGV - 4) / 2
local out = {}
for i = 1, n do
  local key = ARGV[4 + i]
  local r = redis.call('SADD', KEYS[1], key)
  if r == 0 and orphaned(tp, scope, key, tttl, grace) then r = 1 end
  out[i] = r
  if r == 1 then note_taker(tp, scope, key, ARGV[4 + n + i], tttl) end
end
redis.call('HSET', KEYS[2], 'backend', 'set')
redis.call('ZADD', KEYS[3], '+inf', scope)
return out
