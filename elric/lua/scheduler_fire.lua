-- Apply one batch of fire plans: mark fires, record runs, move next run times.
-- KEYS: lease, fence, schedules index, pending fires, fire stats, sequence counter (new
--       versions, as jobstore_put.lua draws them), then per job: its hash,
--       its runs list, then one fire key per "f" entry of that job.
-- ARGV: master id, fence token, runs kept, finished ttl, job count, then per job: job_id,
--       version read, index score ("" = finished), next_run_time, next_run_iso, recent
--       (msgpack fire ids), missed fires counted but not recorded (past the runs kept),
--       entry count, then per entry: kind ("f" fire; record only: "m"
--       missed, "s" skipped; each counted in the fire stats, a fire with its lateness as
--       it is marked, so once whichever master queues it),
--       fire id, fire mark ttl, run record (msgpack), fire spec (msgpack; "" for "m", "s").
-- Returns {0} when the lease or the fence is not this master's (nothing written; one of
--   another type is no master's), else
--   {1, head score of the index afterwards (false: empty), fire ids accepted for
--   enqueueing...}.
-- Invariants: only the current lease holder writes; each fire is marked once (SET NX), so
-- it is accepted at most once by any master, and an accepted fire's spec stays in the
-- pending fires until enqueue.lua queues it, so a master dying in between loses nothing;
-- a job whose version moved since it was read is left alone (re-read next pass); an
-- index entry whose hash is gone is dropped; one whose keys could not be read (version "")
-- gets only its new score (none if paused or removed meanwhile: +inf or gone); a runs
-- list or fire stats of another type are not recorded to, not an error that stops every
-- job's fires; pending fires of another type fail the call
-- before anything is written (a fire marked and not kept would never run).
if mistyped(KEYS[1], 'string') or mistyped(KEYS[2], 'string')   -- (an operator's write)
    or redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then
  return {0}
end
expect(KEYS[4], 'hash')
local out, a, k, keep = {1, false}, 6, 7, tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[5]) do
  local job_id, version, score = ARGV[a], ARGV[a+1], ARGV[a+2]
  local nrt, nri, recent, n = ARGV[a+3], ARGV[a+4], ARGV[a+5], tonumber(ARGV[a+7])
  local unrecorded = tonumber(ARGV[a+6])
  local hash, runs = KEYS[k], KEYS[k+1]
  a, k = a + 8, k + 2
  local cur = false
  if version == '' and score ~= '' then  -- a key of it could not be read: look again later
    local was = redis.call('ZSCORE', KEYS[3], job_id)   -- (unless paused or removed since)
    if was and was ~= 'inf' then redis.call('ZADD', KEYS[3], score, job_id) end
  else
    cur = redis.call('HGET', hash, 'version')
    if not cur then redis.call('ZREM', KEYS[3], job_id) end
  end
  local ok = cur == version
  local pushed = false
  for _ = 1, n do
    if ARGV[a] == 'f' then
      if ok and redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[a+2]) then
        out[#out+1] = ARGV[a+1]
        redis.call('HSET', KEYS[4], ARGV[a+1], ARGV[a+4])
        pcall(redis.call, 'LPUSH', runs, ARGV[a+3])
        pcall(redis.call, 'HINCRBY', KEYS[5], 'fired', 1)
        local r = cmsgpack.unpack(ARGV[a+3])  -- how late: what a user of a schedule waits for
        pcall(redis.call, 'HINCRBY', KEYS[5], 'lateness_ms',
              math.floor(math.max(0, r.at - r.fire_time) * 1000 + 0.5))
        pushed = true
      end
      k = k + 1
    elseif ok then
      pcall(redis.call, 'LPUSH', runs, ARGV[a+3])
      pcall(redis.call, 'HINCRBY', KEYS[5], ARGV[a] == 'm' and 'missed' or 'skipped', 1)
      pushed = true
    end
    a = a + 5
  end
  if ok then
    if unrecorded > 0 then pcall(redis.call, 'HINCRBY', KEYS[5], 'missed', unrecorded) end
    if pushed then pcall(redis.call, 'LTRIM', runs, 0, keep - 1) end
    redis.call('HSET', hash, 'next_run_time', nrt, 'next_run_iso', nri, 'recent', recent,
               'version', next_version(KEYS[6], cur))
    if score == '' then
      redis.call('ZREM', KEYS[3], job_id)
      redis.call('EXPIRE', hash, ARGV[4])
      redis.call('EXPIRE', runs, ARGV[4])
    else
      redis.call('ZADD', KEYS[3], score, job_id)
    end
  end
end
out[2] = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2] or false
return out
