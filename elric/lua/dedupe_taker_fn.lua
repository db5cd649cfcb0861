-- The job taking a dedupe key is noted (`{prefix}{#scope}:{scope}{key}` -> job id, kept
-- `kept` ms) until it is queued (enqueue.lua) or the key given back. A note older than
-- `grace` ms names a job whose call failed and could not give the key back (no call takes
-- that long): the next job with the key takes it over, or nobody could get it queued.
local function taker_note(tp, scope, key) return tp .. #scope .. ':' .. scope .. key end
local function note_taker(tp, scope, key, job, kept)
  if tp ~= '' then redis.call('SET', taker_note(tp, scope, key), job, 'PX', kept) end
end
local function orphaned(tp, scope, key, kept, grace)
  if tp == '' then return false end
  local left = redis.call('PTTL', taker_note(tp, scope, key))
  return left > 0 and kept - left > grace
end
