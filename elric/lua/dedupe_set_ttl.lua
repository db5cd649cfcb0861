-- Exact dedupe with expiry (DEDUPE_TTL): a key is new again ttl ms after it was let
-- through; seeing it again as a duplicate does not extend that.
-- KEYS[1] the scope's zset (key -> ms let through), KEYS[2] its stats hash,
-- KEYS[3] the scope registry (zset: scope -> ms it expires)
-- ARGV[1] the scope, ARGV[2] the prefix of the keys that name the job taking a key ('':
--   none), ARGV[3] ttl in ms, ARGV[4] after how long (ms) a key whose job was never queued
--   goes to the next job (dedupe_taker_fn.lua), ARGV[5..] the dedupe keys, then (with a
--   prefix) as many job ids, one per key
-- Returns per key 1 (new, now added) or 0 (seen within ttl, or earlier in this batch);
--   error 'BACKEND <name>' if another backend filled the scope.
-- Invariants: "now" is the server's TIME, so every master agrees; expired members,
-- idle scopes and their registry entries go, so memory stays bounded. A job that takes a
-- key is recorded as its taker for ttl, as in dedupe_set.lua; nothing counted `filtered`.
local other = redis.call('HGET', KEYS[2], 'backend')
if other and other ~= 'set' then return redis.error_reply('BACKEND ' .. other) end
local now = now_ms()
local scope, tp, ttl, grace = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local n = tp == '' and #ARGV - 4 or (#ARGV - 4) / 2
local cutoff = now - ttl
local nows = string.format('%d', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', cutoff))
local out = {}
for i = 1, n do
  local key = ARGV[4 + i]
  local s = redis.call('ZSCORE', KEYS[1], key)
  if s and tonumber(s) > cutoff and not orphaned(tp, scope, key, ttl, grace) then
    out[i] = 0
  else
    redis.call('ZADD', KEYS[1], nows, key)
    out[i] = 1
    note_taker(tp, scope, key, ARGV[4 + n + i], ttl)
  end
end
redis.call('HSET', KEYS[2], 'backend', 'set')
redis.call('ZADD', KEYS[3], string.format('%d', now + ttl), scope)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', nows)
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('PEXPIRE', KEYS[2], ttl)
return out
