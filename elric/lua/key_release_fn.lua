-- A function shared by the scripts that record a job failed for good (finish, and
-- requeue_due's end_run for a job past MAX_REDELIVERIES); lua.load prepends it to them.
-- release_failed_key(jk, dp, key, scope, enqueued_at): the failed job jk gives its dedupe
-- key back to its scope's exact filter (dedupe set prefix dp; scope nil: 'global') if the
-- master that queued it said so (its `release_key`: DEDUPE_RELEASE_ON_FAILURE), once: a job
-- run again (rerun) does not take its key again. With DEDUPE_TTL the key stays if it was let
-- through after this job was queued (another job's). A filter of another type (an
-- operator's, or a Bloom filter's) keeps the key.
local function release_failed_key(jk, dp, key, scope, enqueued_at)
  redis.call('HDEL', jk, 'release_key')
  local fk = dp .. (scope or 'global')
  local kind = redis.call('TYPE', fk)['ok']
  if kind == 'set' then redis.call('SREM', fk, key)
  elseif kind == 'zset' then
    local at = redis.call('ZSCORE', fk, key)
    -- (an enqueued_at that is not a time, an operator's: unknown, the key is kept)
    if at and tonumber(at) <= (tonumber(enqueued_at) or 0) then
      redis.call('ZREM', fk, key)
    end
  end
end
