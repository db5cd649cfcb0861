-- Claim up to `limit` jobs for a worker: highest priority first across its queues, FIFO
-- within a priority, within the limits of each job's limit key.
-- KEYS: inflight, running index, limits, limits due, parked counts, counters
-- ARGV: job prefix, queue prefix, wake prefix, limit running prefix, limit next-start
--       prefix, limit parked prefix, limit hold prefix, lease (ms), worker id, limit, start
--       (how many of them it can start now: a job of a limited key is claimed only within
--       that, so a claim waiting behind others holds no slot), holds a suspect ('1': it
--       takes no other, below), n, then n triples of
--       job_id, attempt, member (Claim.run: claims of this worker whose run has ended),
--       then queues...
-- Returns {jobs, wait}: per job {job_id, attempt, func, args, kwargs, timeout, max_retries,
--   queue, dedupe_scope, batch, round, limit_key, enqueued_at (set by a submit or rerun
--   alone: it names the children), member (its queue member: with the attempt, it
--   names the run), unreadable ('' or the attempts field, if not a count: the worker
--   fails the job), suspect ('' or '1': below)}; wait: ms until
--   parked jobs are looked at again (-1: none parked; 0: more in line than one call
--   looks at, and it moved some out of it); then the keys passed
--   over for holding another type (a queue: its jobs wait, or stay parked; a job's hash:
--   out of its line, or a running one's keeps its limit slot; inflight: nothing claimed;
--   its limit key's running, parked, hold or next-start key, the parked counts its parking
--   or put-back writes, or limits due (any limited job's): it waits; the counters: starts
--   not counted; the running index: claims not indexed).
-- Invariant: a claimed job is running under this worker, with a lease in inflight that
-- the worker renews; its attempt counter counts the claim. A job whose limit key is at its
-- limit is parked (out of its queue, still queued) so it never holds back other keys; its
-- key is then in limits-due, and parked jobs go back to their queue's line in their old
-- place when the key has room. A job holds its key's slot while its code runs: an ended
-- run frees it here, before its outcome is recorded (children go through the master
-- first). Limit times use Redis's clock: workers' clocks disagree. A job's own
-- limit_interval lengthens its key's least time between starts (or is its only rule). A
-- key's hold (finish.lua: a server asked to wait) parks its jobs until then, rule or none.
-- A job's first claim adds its wait since it was queued to the counters' start latency.
-- A suspect (requeue_due.lua: lost with its worker twice, or once more would fail it) goes
-- to a worker holding none that can start it now, one at a time: the jobs lost with a
-- poison job, fetched together again from their kept places, were lost with it at each
-- worker and reached MAX_REDELIVERIES with it; apart, a poison job takes none of them down
-- again. The other jobs of the line go on as ever (a worker passes over such a suspect).
local jp, qp, wp, rp, np, pp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local hp = ARGV[7]
local clock = now_ms()
local deadline, worker, limit = clock + tonumber(ARGV[8]), ARGV[9], tonumber(ARGV[10])
local start_now, holds_suspect = tonumber(ARGV[11]), ARGV[12] == '1'
local RECHECK_MS, SCAN_BUDGET, DUE_BATCH = 1000, 1000, 100
-- inflight of another type (expect_fn): a claim, already out of its queue and running, would
-- fail there with no lease, so no redelivery would find it. Claim nothing, named.
if mistyped(KEYS[1], 'zset') then return {{}, RECHECK_MS, KEYS[1]} end
local broken = {}   -- keys of another type (an operator overwrote them): named in the reply
-- limits due of another type: every limited job waits (its claim, parking or end writes it)
local due_bad = mistyped(KEYS[4], 'zset') and KEYS[4]
if due_bad then broken[due_bad] = true end
local FIRST_QUEUE = 14 + 3 * tonumber(ARGV[13])
local started, waited = 0, 0   -- first attempts claimed, and their summed wait (ms)
local mine = {}   -- the queues of this worker
for i = FIRST_QUEUE, #ARGV do mine[ARGV[i]] = true end

local rules = {}   -- limit key (or '*') -> {concurrency or nil, interval ms or nil}
-- The longest interval between starts, in ms: contract.MAX_TIMEOUT, what a submit and
-- LIMITS allow. One longer (a hash edited by hand) is none: a PX Redis refuses (from 1e14
-- s) failed every fetch that met its job, and each worker exited on it in turn.
local MOST_MS = 2147483648000
local function bounded(ms) return ms and ms <= MOST_MS and ms or nil end
local function interval(seconds)   -- a job's limit_interval field, in ms (nil: none)
  seconds = tonumber(seconds or '')
  return bounded(seconds and math.max(1, math.floor(seconds * 1000 + 0.5)))
end
local limited = redis.call('EXISTS', KEYS[3]) == 1
if limited then
  local read, h = pcall(redis.call, 'HGETALL', KEYS[3])
  -- of another type: claim nothing, named; a master publishes the rules over it
  if not read then return {{}, RECHECK_MS, KEYS[3]} end
  for i = 1, #h, 2 do
    local c, iv = string.match(h[i + 1], '^(%d*),(%d*)$')
    rules[h[i]] = {tonumber(c), bounded(tonumber(iv))}
  end
end

-- A key's rule: a job's own least interval between starts (ms: its limit_interval, a
-- crawler's Crawl-delay) lengthens the rule's, or is the rule of a key LIMITS leaves free.
local function rule(lk, iv)
  local r = rules[lk] or rules['*']
  if iv and not (r and r[2] and r[2] >= iv) then return {r and r[1], iv} end
  return r
end

-- limit key -> {free = slots, hold, at = earliest start (ms; read once needed)}, this
-- call. A job's room is its key's, with its rule in m.rule and m.next: its own interval
-- counts, whichever job of the key this call met first (nil: the job is not limited).
local rooms = {}
local function room(lk, iv)
  local m = rooms[lk]
  if not m then
    -- (m.bad) a key of it of another type would fail every fetch meeting it: its jobs wait
    local bad = mistyped(rp .. lk, 'set') and rp .. lk or mistyped(hp .. lk, 'string')
      and hp .. lk or mistyped(np .. lk, 'string') and np .. lk
    local c = (rules[lk] or rules['*'] or {})[1]
    -- a hold or next start that is no number (SET by hand) is none: as nil it failed the
    -- fetch, and each worker meeting the key's jobs exited on it in turn
    m = bad and {bad = bad} or {free = c and c - redis.call('SCARD', rp .. lk) or math.huge,
                               hold = tonumber(redis.call('GET', hp .. lk) or '0') or 0}
    rooms[lk] = m
  end
  if m.bad then return m end
  local r = rule(lk, iv)
  if not r and m.hold <= clock then return nil end
  m.rule, m.next = r or {}, m.hold
  if r and r[2] then
    m.at = m.at or tonumber(redis.call('GET', np .. lk) or '0') or 0
    -- set under a longer rule (LIMITS changed since): one interval of this rule instead
    if m.at > clock + r[2] then
      m.at = clock + r[2]
      redis.call('SET', np .. lk, m.at, 'PX', r[2])
    end
    m.next = math.max(m.at, m.hold)
  end
  return m
end

-- A job's field; a hash of another type (an operator's) reads as false, named: a parked
-- job with no hash leaves its key's line as a removed one does.
local function field(id, name)
  local read, v = pcall(redis.call, 'HGET', jp .. id, name)
  if read then return v end
  broken[jp .. id] = true
  return false
end

-- Jobs in a key's running set that no longer run there (their lease ran out, they were
-- given back or removed) leave it; finish.lua removes the jobs that end. One whose hash
-- is of another type keeps its slot until that key is deleted (it may still run).
local function prune(lk)
  for _, id in ipairs(redis.call('SMEMBERS', rp .. lk)) do
    local status = field(id, 'status')
    if status ~= 'running' and status ~= false then
      redis.call('SREM', rp .. lk, id)
    end
  end
end

local function park(lk, m, score, member, queue)
  redis.call('ZADD', pp .. lk, score, member)
  redis.call('HINCRBY', KEYS[5], queue, 1)
  local when = clock + RECHECK_MS   -- a slot frees: finish.lua makes the key due at once
  if m.next > clock then when = m.next end
  redis.call('ZADD', KEYS[4], 'LT', when, lk)
end

-- Runs that ended free their slots; their keys' parked jobs are due at once. A run is its
-- attempt and member: a lost run may end here while this worker holds the job's next run.
if limited then
  for i = 14, FIRST_QUEUE - 1, 3 do
    local id = ARGV[i]
    local read, f = pcall(redis.call, 'HMGET', jp .. id, 'status', 'attempts', 'worker',
                          'limit_key', 'queue', 'member')
    if not read then broken[jp .. id], f = true, {} end   -- (its slot is kept: prune)
    if f[1] == 'running' and f[2] == ARGV[i + 1] and f[6] == ARGV[i + 2]
        and f[3] == worker and f[4] and not mistyped(rp .. f[4], 'set')
        and redis.call('SREM', rp .. f[4], id) == 1
        and not due_bad and redis.call('ZSCORE', KEYS[4], f[4]) then
      redis.call('ZADD', KEYS[4], 0, f[4])
      if limit == 0 then   -- this worker takes none: wake one that may
        redis.call('LPUSH', wp .. f[5], '1')
        redis.call('LTRIM', wp .. f[5], 0, 15)
      end
    end
  end
end

-- Keys whose parked jobs are due: as many as may start go back in line.
local refilled = {}   -- this worker's queues that parked jobs went back to
local due = due_bad and {} or
  redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', clock, 'LIMIT', 0, DUE_BATCH)
for _, lk in ipairs(due) do
  local n, when = SCAN_BUDGET, clock + RECHECK_MS   -- no limit any more: all go back
  local bad = mistyped(pp .. lk, 'zset') and pp .. lk   -- (or room's m.bad): none go back
  local first = not bad and redis.call('ZRANGE', pp .. lk, 0, 0)[1]   -- its own interval
  local iv = first and interval(field(string.sub(first, 18), 'limit_interval'))
  local m = room(lk, iv)
  bad = bad or m and m.bad
  if bad then broken[bad], n, m = true, 0, nil end
  if m then
    local r = m.rule
    if m.free <= 0 and r[1] then   -- full: unless some of its running jobs ended unseen
      prune(lk)
      m.free = r[1] - redis.call('SCARD', rp .. lk)
    end
    if m.next > clock then n, when = 0, m.next
    elseif r[2] then n = math.min(1, m.free)
    elseif r[1] then n = math.max(0, m.free) end
  end
  if n > 0 then
    local back = redis.call('ZRANGE', pp .. lk, 0, n - 1, 'WITHSCORES')
    for i = 1, #back, 2 do
      local member, score = back[i], back[i + 1]
      local queue = field(string.sub(member, 18), 'queue')
      -- its queue or the parked counts of another type (expect_fn) would fail the call
      -- with it out of both, lost: it stays parked in its place, named
      local bad = queue and (mistyped(qp .. queue, 'zset') and qp .. queue
                             or mistyped(KEYS[5], 'hash') and KEYS[5])
      if bad then broken[bad] = true else redis.call('ZREM', pp .. lk, member) end
      if queue and not bad then
        redis.call('ZADD', qp .. queue, score, member)
        redis.call('HINCRBY', KEYS[5], queue, -1)
        if not mine[queue] then   -- back in a line this worker does not serve: wake one
          redis.call('LPUSH', wp .. queue, '1')
          redis.call('LTRIM', wp .. queue, 0, 15)
        else
          refilled[queue] = true
        end
      end
    end
  end
  if redis.call('EXISTS', pp .. lk) == 1 then redis.call('ZADD', KEYS[4], when, lk)
  else redis.call('ZREM', KEYS[4], lk) end
end

local out, budget = {}, SCAN_BUDGET
local moved = 0   -- jobs out of their line (claimed, parked, removed): a call now sees others
local stop = false   -- a limited job the worker cannot start now: it takes no more
local skip = {}   -- queue -> jobs passed over at the head of its line (each is looked at once)
while #out < limit and budget > 0 and not stop do
  local cands = {}
  for i = FIRST_QUEUE, #ARGV do
    local s = skip[ARGV[i]] or 0
    local read, r = pcall(redis.call, 'ZRANGE', qp .. ARGV[i], s, s + limit - #out - 1,
                          'WITHSCORES')
    if not read then broken[qp .. ARGV[i]], r = true, {} end
    for j = 1, #r, 2 do cands[#cands + 1] = {tonumber(r[j + 1]), r[j], ARGV[i]} end
  end
  if #cands == 0 then break end
  if #ARGV > FIRST_QUEUE then
    table.sort(cands, function(a, b)
      if a[1] ~= b[1] then return a[1] < b[1] end
      return a[2] < b[2]
    end)
  end
  for _, c in ipairs(cands) do
    if #out >= limit or budget == 0 then break end
    budget = budget - 1
    local score, member, queue = c[1], c[2], c[3]
    local id = string.sub(member, 18)   -- member: {seq:016x}:{job_id}
    local jk = jp .. id
    local read, f = pcall(redis.call, 'HMGET', jk, 'func', 'args', 'kwargs', 'timeout',
                          'max_retries', 'queue', 'dedupe_scope', 'batch', 'round',
                          'enqueued_at', 'limit_key', 'attempts', 'started_at', 'limit_interval',
                          'suspect')
    if not read then broken[jk], f = true, {} end   -- gone from its line, like a removed job
    local iv = interval(f[14])
    local lk = f[6] and f[11]
    -- a key its claim, parking or end writes of another type (expect_fn) would fail the
    -- call with the job out of its line, lost: it waits in its place, named
    local m = lk and room(lk, iv)
    local bad = lk and (due_bad or m and m.bad)
    if bad then m = nil end
    local parks = m and (m.free <= 0 or m.next > clock)
    bad = bad or parks and (mistyped(pp .. lk, 'zset') and pp .. lk
                            or mistyped(KEYS[5], 'hash') and KEYS[5])
    if bad then
      broken[bad], skip[queue] = true, (skip[queue] or 0) + 1
    elseif m and #out >= start_now and m.free > 0 and m.next <= clock then
      stop = true   -- it stays in line for a worker that can start it (its slot with it)
      break
    elseif f[15] and not parks and (holds_suspect or #out >= start_now) then
      -- a second suspect, or one it could not start now (lost unstarted, it would count
      -- again): it waits for another worker, or another fetch
      skip[queue] = (skip[queue] or 0) + 1
    elseif not f[6] then   -- every job hash has its queue; with no hash, the job was removed
      redis.call('ZREM', qp .. queue, member)
      moved = moved + 1
    else
      redis.call('ZREM', qp .. queue, member)
      moved = moved + 1
      if parks then
        park(lk, m, score, member, queue)
      else
        -- a run holds its key's slot whatever the rules say now: a rule given to the
        -- key while it runs must count it
        if f[11] then redis.call('SADD', rp .. f[11], id) end
        if m then
          m.free = m.free - 1
          if m.rule[2] then
            m.at = clock + m.rule[2]
            redis.call('SET', np .. lk, m.at, 'PX', m.rule[2])
            -- its parked jobs may start from then: looked at again then, not at a recheck
            redis.call('ZADD', KEYS[4], 'XX', 'LT', m.at, lk)
          end
        end
        -- a field elric did not write (an operator's edit) is named, for the worker to
        -- fail the job with: an error here would fail every fetch that meets it
        local done = tonumber(string.match(f[12] or '0', '^%d+$'))
        local bad = done and '' or "attempts '" .. f[12] .. "'"
        local attempt = (done or 0) + 1
        -- its first claim ever (a job handed back comes to attempt 1 again, but has started)
        local first = attempt == 1 and not f[13]
        redis.call('HSET', jk, 'status', 'running', 'worker', worker, 'started_at', clock,
                   'attempts', attempt)
        redis.call('ZADD', KEYS[1], deadline, id)
        -- (of another type: not indexed, named; the lease in inflight is what counts)
        if not pcall(redis.call, 'ZADD', KEYS[2], clock, id) then broken[KEYS[2]] = true end
        if first and tonumber(f[10]) then
          started, waited = started + 1, waited + math.max(0, clock - tonumber(f[10]))
        end
        out[#out + 1] = {id, attempt, f[1] or '', f[2] or '', f[3] or '', f[4] or '',
                         f[5] or '0', f[6], f[7] or '', f[8] or '', f[9] or '', f[11] or '',
                         f[10] or '0', member, bad, f[15] or ''}
        if f[15] then holds_suspect = true end   -- one suspect a worker
      end
    end
  end
end

-- Wake tokens follow the lines. One this call emptied needs none: left there, each would
-- wake a worker to find nothing (an enqueue of n jobs pushes up to 16). One that parked
-- jobs went back to and still holds jobs gets a token, for the workers that wait on it
-- (this one may have taken none: a fetch of limit 0 frees slots only).
for i = FIRST_QUEUE, #ARGV do
  local q = ARGV[i]
  if redis.call('EXISTS', qp .. q) == 0 then redis.call('DEL', wp .. q)
  elseif refilled[q] and redis.call('EXISTS', wp .. q) == 0 then
    redis.call('LPUSH', wp .. q, '1')
  end
end

-- (counters of another type, after the claims were written: left out, named)
if started > 0 and mistyped(KEYS[6], 'hash') then broken[KEYS[6]] = true
elseif started > 0 then
  redis.call('HINCRBY', KEYS[6], 'started', started)
  redis.call('HINCRBY', KEYS[6], 'start_latency_ms', waited)
end
local wait = -1
if budget == 0 and moved > 0 then wait = 0   -- more in line than one call looks at
-- all it looked at stays in line (passed over, named): a call now would look at them again,
-- and its worker asked again at once, for good
elseif budget == 0 then wait = RECHECK_MS
elseif not due_bad then
  local first = redis.call('ZRANGE', KEYS[4], 0, 0, 'WITHSCORES')
  if #first > 0 then wait = math.max(0, tonumber(first[2]) - clock) end
end
local reply = {out, wait}
for key in pairs(broken) do reply[#reply + 1] = key end
return reply
