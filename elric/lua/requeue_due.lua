-- Put back in line the jobs whose time in a sorted set has come: running jobs whose lease
-- ran out (their worker died or stalled), or retrying jobs whose backoff is over. A job
-- cancel.lua asked to stop ends cancelled instead (end_run): its worker never will. A
-- redelivery past the cap (MAX_REDELIVERIES) ends the job failed instead (end_run): one
-- that kills or stalls its worker would else take down one worker after another, for good.
-- KEYS: the due set (inflight or delayed), the status index of those jobs, seq, counters,
--       cancelled index, limits due, queues, failed index
-- ARGV: job prefix, queue prefix, wake prefix, limit, the status the jobs must
--       still have, keep place ('1': a redelivered job keeps its place in line; '0': a
--       retry waits behind its priority, like a new job), counter to count them in ('' none),
--       failed ttl (s), limit running prefix, limit parked prefix, round prefix, batch
--       stats prefix, func stats prefix, the most redeliveries of a job ('': no cap),
--       dedupe set prefix, minute stats prefix, minute stats ttl (s)
-- Returns {ids put back, ids cancelled, keys of another type (or job keys, with why)
--   passed over (the counters or queues: jobs go back, not counted or listed), ids failed
--   for their worker lost past the cap, due entries handled: queued or not (at most
--   limit; a full step means more may be due)}.
-- Invariant: a job leaves the due set once, and is queued only if it still has the status
-- and no request to cancel it; a run whose lease ran out gives up its limit key's slot. A
-- redelivered job (keep place '1') counts it on its hash: `redelivered` (runs lost with
-- their worker, each an attempt used), `redelivered_at` (ms) and `lost_worker` (the last),
-- up to the cap: a run lost beyond it (counted since the job's submit or last rerun, which
-- clears `redelivered`) ends the job failed, recorded as a failed attempt is (but with no
-- worker: the lost one's outcome, if it comes, is stale). One lost twice, or whose next
-- loss would fail it, is marked `suspect`: fetch.lua gives a worker one at a time. A
-- job key of another type (an operator's) leaves the due set too: at its head it held back
-- every job after it, at each pass. A job whose queue or limit key's running set is of
-- another type, or (not to be cancelled) with no `queue` field, stays in it, due a minute
-- later, named: put back, it would be in no queue. With the due set or the status index
-- of another type, or (retries: each takes a new place in line) seq that INCR fails on,
-- a pass writes nothing and handles no entry. An entry handled leaves the due set or is due
-- a minute later: a caller passing again at once after a full step never spins on one.
local jp, qp, wp, now, limit = ARGV[1], ARGV[2], ARGV[3], now_ms(), ARGV[4]
local status, keep, counter = ARGV[5], ARGV[6] == '1', ARGV[7]
local ends = {cancelled = KEYS[5], counters = KEYS[4], queues = KEYS[7], due = KEYS[6],
              ttl = tonumber(ARGV[8]), jp = jp, rp = ARGV[9], pp = ARGV[10], wp = wp,
              roundp = ARGV[11], bp = ARGV[12], fp = ARGV[13], failed = KEYS[8],
              dp = ARGV[15], mp = ARGV[16], mttl = tonumber(ARGV[17])}
local cap = keep and tonumber(ARGV[14])
-- Keys of another type are looked for before a job's first write: a write to one fails
-- the script, the job out of the due set and in no queue, never put back.
local whole = mistyped(KEYS[1], 'zset') and KEYS[1] or mistyped(KEYS[2], 'zset') and KEYS[2]
              or not keep and not_integer(KEYS[3]) and KEYS[3]
if whole then return {{}, {}, {whole}, {}, 0} end
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, limit)
local out, cancelled, broken, failed = {}, {}, {}, {}
ends.broken = broken
-- counters or queues of another type failed every pass: jobs go back uncounted, unlisted
if counter ~= '' and mistyped(KEYS[4], 'hash') then broken[1], counter = KEYS[4], '' end
local queues = not mistyped(KEYS[7], 'set') and KEYS[7]
if not queues then broken[#broken + 1] = KEYS[7] end
for _, id in ipairs(ids) do
  local jk = jp .. id
  local read, f = pcall(redis.call, 'HMGET', jk, 'status', 'cancel', 'limit_key', 'queue',
                        'worker', 'redelivered')
  if not read then broken[#broken + 1] = jk; f = {} end
  local bad = f[1] == status and
              (f[4] and mistyped(qp .. f[4], 'zset') and qp .. f[4] or
               not f[4] and not f[2] and jk .. ': its `queue` field is missing' or
               f[3] and mistyped(ends.rp .. f[3], 'set') and ends.rp .. f[3])
  if bad then   -- it stays, due again in a minute: it holds back no other job meanwhile
    broken[#broken + 1] = bad
    redis.call('ZADD', KEYS[1], 'XX', now + 60000, id)
  else
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
  end
  if not bad and f[1] == status and f[2] then
    end_run(jk, id, 'cancelled', 'Cancelled: its worker stopped renewing its lease (it ' ..
            'died or was cut off) before it stopped the job', ends)
    cancelled[#cancelled + 1] = id
  elseif not bad and f[1] == status and cap and (tonumber(f[6]) or 0) >= cap then
    local lost = (tonumber(f[6]) or 0) + 1
    -- (held: running, or claimed to run next; a worker's lost claims all count alike)
    end_run(jk, id, 'failed', 'Failed: the worker holding it was lost ' ..
            (lost == 1 and 'once' or lost .. ' times') .. ' (the last, ' .. (f[5] or '?') ..
            ', stopped renewing its lease: killed, hung or cut off), more than ' ..
            'MAX_REDELIVERIES (' .. cap .. ') allows: does the job kill or stall its ' ..
            'worker, or did it share one with a job that does? `elric rerun ' .. id ..
            '` runs it again', ends)
    -- not its worker's to record: if that one was only cut off, its outcome is `stale`
    redis.call('HSET', jk, 'worker', '')
    failed[#failed + 1] = id
  elseif not bad and f[1] == status then
    free_slot(id, f[3], ends)
    -- said by get_job: else a job run twice (attempts 2, max_retries 0) looked like a bug
    if keep then
      local lost = (tonumber(f[6]) or 0) + 1
      redis.call('HSET', jk, 'redelivered', lost, 'redelivered_at', now,
                 'lost_worker', f[5] or '')
      -- lost twice, or once more would fail it: a suspect, one a worker (fetch.lua), so
      -- the jobs fetched with a poison job stop being lost with it (once is most often a
      -- worker's death that no job caused: all its jobs run on as before)
      if lost >= 2 or cap and lost >= cap then redis.call('HSET', jk, 'suspect', 1) end
    end
    requeue(jk, id, qp, wp, KEYS[3], keep, queues)
    if counter ~= '' then redis.call('HINCRBY', KEYS[4], counter, 1) end
    out[#out + 1] = id
  end
end
return {out, cancelled, broken, failed, #ids}
