-- Record the outcomes of jobs a worker ran.
-- KEYS: inflight, running index, succeeded index, failed index, delayed, counters,
--       retrying index, limits due, cancelled index, queues
-- ARGV: job prefix, batch stats prefix, dedupe set prefix, result ttl (s),
--       failed ttl (s), limit running prefix, wake prefix,
--       round prefix, func stats prefix, minute stats prefix, minute ttl (s), worker id,
--       limit parked prefix, the most bytes of a job's error (RESULT_MAX_BYTES), limit hold
--       prefix, then per job: job_id, attempt, outcome ('ok' | 'err' | 'cancel': stopped
--       by cancel.lua's request), payload (result bytes | traceback),
--       duration (ms), the histogram field that duration counts in ('le:{ms}', from
--       elric/jobstats.py), retry delay (ms; -1: no retry), the job's run (the queue
--       member it was fetched as), hold (ms its server asked to wait: Retry-After; 0: none)
-- Returns per job its new status, or 'stale' for a job this worker no longer holds (it was
-- redelivered elsewhere or removed): that outcome is dropped; then the keys it left alone
-- for holding another type (a job's hash: its outcome is dropped; a stats or round hash,
-- inflight or a status index: not written; its limit key's hold: not held; the delayed
-- set: a job to retry fails instead, its error naming the key). A write Redis refuses
-- for a while (READONLY, MISCONF, OOM) fails the call, writing nothing: no key is to blame.
-- A call sent again (its reply was lost) answers the status its first run recorded, but
-- `stale` for one it cancelled.
-- Invariant: only the worker, run and attempt that hold the job record it (a rerun, or a job
-- of a reused id, counts its attempts from 1 again: a lost earlier run has the same attempt,
-- maybe on the same worker, not the same queue member). A job that failed for good
-- gives its dedupe key back to an exact filter in the same step if the master that queued
-- it said so (`release_key`: DEDUPE_RELEASE_ON_FAILURE), once (with DEDUPE_TTL, unless the
-- key expired and a later job took it). A job with a limit
-- key frees its slot (slot_fn.lua); a failed one's hold holds back the key's jobs (fetch.lua)
-- that long, unless one ends later. A job of a round that ends counts in the round's hash
-- (succeeded, failed; cancelled as `removed`). A recorded attempt counts, by the status it
-- led to, in the counters (also per queue), its func's and its batch's stats hashes (with
-- its duration in their sum and histogram, and `last_at`) and, unless cancelled, the hash
-- of the current minute; its queue's `last_at` is now, and the queue is listed (it may
-- have been forgotten while the job ran: forget_queues.lua). A job cancel.lua asked to stop that failed is cancelled, not
-- retried, and a recorded job keeps no such request (a rerun of it must run). A field that
-- is not what elric writes (an operator's edit) fails no other job's outcome; a job whose
-- `queue` is gone is not retried and counts in no queue.
local jp, bp, dp, now = ARGV[1], ARGV[2], ARGV[3], now_ms()
local result_ttl, failed_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local rp, wp, roundp, fp = ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local minute, minute_ttl = ARGV[10] .. math.floor(now / 60000), ARGV[11]
local worker = ARGV[12]
local slots = {jp = jp, rp = rp, pp = ARGV[13], due = KEYS[8], wp = wp}
local error_max, hp = tonumber(ARGV[14]), ARGV[15]
local out = {}
local delayed_bad = mistyped(KEYS[5], 'zset')   -- (read before any write)
-- increments summed per hash and field, written once per call (a call holds a chunk of
-- jobs, mostly of one func and batch)
local sums, touched, queues = {}, {}, {}
local broken = {}   -- keys of another type (an operator overwrote them): named in the reply
local function write(...)   -- must not stop the other jobs' outcomes
  local ok, err = pcall(redis.call, ...)
  if not ok then
    -- (a refusal comes only at a call's first write: nothing was written before it)
    if refused(err) then redis.call(...) end
    broken[select(2, ...)] = true
  end
end
local function add(key, field, n)
  local h = sums[key]
  if not h then h = {}; sums[key] = h end
  h[field] = (h[field] or 0) + n
end
local function add_timed(key, status, duration, bucket)
  add(key, status, 1)
  add(key, 'duration_ms', duration)
  add(key, bucket, 1)
  touched[key] = true
end
for i = 16, #ARGV, 9 do
  local id, attempt, outcome, payload = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local run, hold = ARGV[i + 7], tonumber(ARGV[i + 8])
  local duration, bucket, retry = tonumber(ARGV[i + 4]), ARGV[i + 5], tonumber(ARGV[i + 6])
  local jk = jp .. id
  local read, f = pcall(redis.call, 'HMGET', jk, 'status', 'attempts', 'queue', 'batch',
                       'max_retries', 'error', 'dedupe_key', 'dedupe_scope', 'limit_key',
                       'round', 'func', 'cancel', 'worker', 'enqueued_at', 'release_key',
                       'member')
  if not read then broken[jk], f = true, {} end
  local ours = f[2] == attempt and f[13] == worker and f[16] == run
  if f[1] ~= 'running' or not ours then
    -- recorded by this call's first run (a requeued job has no worker; one that
    -- requeue_due ended cancelled keeps its worker, who recorded nothing)
    local replay = ours and (f[1] == 'succeeded' or f[1] == 'failed' or f[1] == 'retrying')
    out[#out + 1] = replay and f[1] or 'stale'
  else
    if f[12] then
      redis.call('HDEL', jk, 'cancel')
      if outcome == 'err' then outcome = 'cancel' end   -- it ended before its worker heard
    end
    write('ZREM', KEYS[1], id)   -- (of another type: it holds no entry; named)
    write('ZREM', KEYS[2], id)
    free_slot(id, f[9], slots)
    if outcome == 'err' and hold > 0 and f[9] then
      local read, held = pcall(redis.call, 'GET', hp .. f[9])   -- (another type: named)
      if not read then broken[hp .. f[9]] = true
      elseif now + hold > (tonumber(held or '0') or 0) then   -- (no number: as none)
        redis.call('SET', hp .. f[9], now + hold, 'PX', hold)
      end
    end
    local status, index
    if outcome == 'ok' then
      status, index = 'succeeded', KEYS[3]
      redis.call('HSET', jk, 'status', status, 'result', payload, 'finished_at', now,
                 'duration_ms', duration)
      redis.call('EXPIRE', jk, result_ttl)
    else
      local before, this = f[6] or '', '--- attempt ' .. attempt .. ' ---\n' .. payload .. '\n'
      if before ~= '' and #before + #this > error_max then
        -- every attempt's error adds up (each is cut to about error_max): keep this one and
        -- the latest before it that fit, from an attempt's start, or the record outgrows
        -- what get_job can send
        local kept = string.sub(before, math.max(1, #before - (error_max - #this) + 1))
        local at = #this < error_max and string.find(kept, '--- attempt ', 1, true)
        before = '[... cut ...]\n' .. (at and string.sub(kept, at) or '')
      end
      local err = before .. this
      -- (a `queue` deleted while it ran, an operator's: it has no line to go back to)
      if not f[3] then err = err .. 'Not retried: its `queue` field is gone\n' end
      local retries = outcome ~= 'cancel' and retry >= 0 and f[3]
                      and tonumber(attempt) <= (tonumber(f[5]) or 0)
      -- (the delayed set of another type, an operator's: failed, naming it, not held to run
      -- again with this failure unrecorded; `elric rerun` runs it once the key is fixed)
      if retries and delayed_bad then
        retries, broken[KEYS[5]] = false, true
        err = err .. 'Not retried: ' .. KEYS[5] .. ' holds another type (overwritten ' ..
              'outside elric?): delete it, then `elric rerun` this job\n'
      end
      if retries then
        status, index = 'retrying', KEYS[7]
        redis.call('HSET', jk, 'status', status, 'error', err, 'duration_ms', duration,
                   'retry_at', now + retry)
        redis.call('ZADD', KEYS[5], now + retry, id)
      else   -- ended: failed, or cancelled (never retried)
        status, index = 'failed', KEYS[4]
        if outcome == 'cancel' then status, index = 'cancelled', KEYS[9] end
        redis.call('HSET', jk, 'status', status, 'error', err, 'finished_at', now,
                   'duration_ms', duration)
        redis.call('EXPIRE', jk, failed_ttl)
        if status == 'failed' and f[15] and f[7] then
          release_failed_key(jk, dp, f[7], f[8], f[14])
        end
      end
    end
    write('ZADD', index, now, id)   -- (of another type: not indexed, named)
    add(KEYS[6], status, 1)
    if f[3] then
      add(KEYS[6], 'queue:' .. f[3] .. ':' .. status, 1)
      queues[f[3]] = true
    end
    if status ~= 'cancelled' then add(minute, status, 1) end
    if f[4] and f[4] ~= '' then add_timed(bp .. f[4], status, duration, bucket) end
    if f[11] then add_timed(fp .. f[11], status, duration, bucket) end
    if f[10] and status ~= 'retrying' then
      write('HINCRBY', roundp .. f[10], status == 'cancelled' and 'removed' or status, 1)
      redis.call('EXPIRE', roundp .. f[10], failed_ttl)
    end
    out[#out + 1] = status
  end
end
for key, h in pairs(sums) do
  for field, n in pairs(h) do write('HINCRBY', key, field, n) end
end
for key in pairs(touched) do write('HSET', key, 'last_at', now) end
for q in pairs(queues) do
  write('HSET', KEYS[6], 'queue:' .. q .. ':last_at', now)
  write('SADD', KEYS[10], q)
end
if sums[minute] then redis.call('EXPIRE', minute, minute_ttl) end
-- finished jobs' hashes expire; their index entries go on the same schedule
write('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - result_ttl * 1000)
write('ZREMRANGEBYSCORE', KEYS[4], '-inf', now - failed_ttl * 1000)
write('ZREMRANGEBYSCORE', KEYS[9], '-inf', now - failed_ttl * 1000)
for key in pairs(broken) do out[#out + 1] = key end
return out
