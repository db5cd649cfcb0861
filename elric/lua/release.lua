-- Give back jobs a worker claimed but will not run, without using an attempt: at once to
-- their place in line (it is stopping, or they were prefetched), or, with a delay, as
-- retrying with the reason on the job (it does not load their module: another may). A job
-- cancel.lua asked to stop ends cancelled instead (end_run), using its attempt: it
-- must not run again.
-- KEYS: inflight, running index, seq, delayed, retrying index, counters, cancelled index,
--       limits due, queues
-- ARGV: job prefix, queue prefix, wake prefix, worker id, delay (ms; '' = at once),
--       reason, failed ttl (s), limit running prefix, limit parked prefix, round prefix,
--       batch stats prefix, func stats prefix, then Claim.run triples: job_id, attempt, member
-- Returns {how many jobs went back (those cancelled do not count), keys of another type
--   (or job keys, with why) passed over...}; with a delay they count in the counters'
--   `handed_back`.
-- Invariant: only the worker holding that run and attempt gives a job back, and its limit key's
-- slot with it; a job handed back with a reason keeps it (`not_run`), so a job no worker
-- can run is visible. A job whose queue (or delayed set, or limit key's running set) is of
-- another type, or (put back at once, not cancelled) with no `queue` field, stays claimed
-- with its lease, named: put back, it would be in no queue. A job key of another type is
-- passed over, named; the other jobs of the call go back. The queues set or counters of
-- another type: they go back, not listed or counted, named.
local jp, qp, wp, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local delay, reason, now = tonumber(ARGV[5]), ARGV[6], now_ms()
local ends = {cancelled = KEYS[7], counters = KEYS[6], queues = KEYS[9], due = KEYS[8],
              ttl = tonumber(ARGV[7]), jp = jp, rp = ARGV[8], pp = ARGV[9], wp = wp,
              roundp = ARGV[10], bp = ARGV[11], fp = ARGV[12]}
-- Keys of another type are looked for before a job's first write: a write to one fails
-- the script, the job out of inflight and in no queue, never put back.
local whole = mistyped(KEYS[1], 'zset') and KEYS[1] or mistyped(KEYS[2], 'zset') and KEYS[2]
              or delay and mistyped(KEYS[4], 'zset') and KEYS[4]
if whole then return {0, whole} end
local n, broken = 0, {}
local queues = not mistyped(KEYS[9], 'set') and KEYS[9]   -- (else not listed again, named)
if not queues then broken[1] = KEYS[9] end
for i = 13, #ARGV, 3 do
  local id = ARGV[i]
  local jk = jp .. id
  local read, f = pcall(redis.call, 'HMGET', jk, 'status', 'attempts', 'worker', 'cancel',
                        'limit_key', 'queue', 'member')
  if not read then broken[#broken + 1], f = jk, {} end   -- not ours to touch: named
  local ours = f[2] == ARGV[i + 1] and f[7] == ARGV[i + 2] and f[3] == worker
  local bad = f[1] == 'running' and ours and
              (not delay and f[6] and mistyped(qp .. f[6], 'zset') and qp .. f[6] or
               not delay and not f[6] and not f[4] and jk .. ': its `queue` field is missing' or
               f[5] and mistyped(ends.rp .. f[5], 'set') and ends.rp .. f[5])
  if bad then   -- it stays claimed: its lease running out puts it back once the key is fixed
    broken[#broken + 1] = bad
  elseif f[1] == 'running' and ours and f[4] then
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    end_run(jk, id, 'cancelled', 'Cancelled: its worker ' .. worker .. ' gave it back ' ..
            '(stopping, or not running it) before it stopped the job', ends)
  elseif f[1] == 'running' and ours then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('ZREM', KEYS[1], id)
    redis.call('ZREM', KEYS[2], id)
    free_slot(id, f[5], ends)
    if delay then
      redis.call('HSET', jk, 'status', 'retrying', 'retry_at', now + delay, 'not_run',
                 worker .. ': ' .. reason)
      redis.call('ZADD', KEYS[4], now + delay, id)
      redis.call('ZADD', KEYS[5], now, id)
    else
      requeue(jk, id, qp, wp, KEYS[3], true, queues)
    end
    n = n + 1
  end
end
if delay and n > 0 and not pcall(redis.call, 'HINCRBY', KEYS[6], 'handed_back', n) then
  broken[#broken + 1] = KEYS[6]   -- (of another type: not counted, named)
end
table.insert(broken, 1, n)
return broken
