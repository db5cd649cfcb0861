-- Queue new jobs. A job_id that exists already is left as it is and its status returned, so
-- a resubmitted (or resent) call queues nothing twice; a periodic job's id answers scheduled.
-- KEYS: seq, queues, counters, batches, fence, pending fires, funcs
-- ARGV: job prefix, queue prefix, wake prefix, batch stats prefix, func stats prefix,
--       round prefix, round ttl (s), fence token ('' = no fence), jobs: one flat msgpack
--       array [n, then per job: job_id, queue, priority, batch, round, func, m, then m
--       hash fields and values], the prefix of the keys naming the job that took a dedupe
--       key (dedupe_taker_fn.lua), the periodic jobs' prefix, then per job with a dedupe
--       key its position (1-based) and its key's suffix
-- Returns: [position (1-based), status, ...] of the jobs that existed already.
-- Invariant: a queued job is its hash (status queued, `member`) plus that member in its
-- queue's sorted set (score -priority; members sort FIFO by sequence number). With a fence
-- token nothing is written unless the token is current (the scheduler's lease; a fence of
-- another type holds no token), and each
-- job, queued or found, leaves the pending fires in the same step. A queued job counts in
-- its round's, its batch's and its func's `submitted` (and its queue's in the counters, with
-- its `last_at`), and the label is in `batches` / `funcs`. A job queued with a dedupe key,
-- or found holding it, is no longer recorded as the taker of its key. One found without it
-- stays its taker: if giving the key back fails, a takeover past the grace frees it.
local jp, qp, wp, bp, fp = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local rp, round_ttl, now, token = ARGV[6], ARGV[7], now_ms(), ARGV[8]
if token ~= '' and (mistyped(KEYS[5], 'string') or redis.call('GET', KEYS[5]) ~= token) then
  return redis.error_reply('FENCED the scheduler lease token is stale')
end
local jobs = cmsgpack.unpack(ARGV[9])
local notes = {}   -- position -> its dedupe key's suffix
for a = 12, #ARGV, 2 do notes[tonumber(ARGV[a])] = ARGV[a + 1] end
local n = jobs[1]
local base = redis.call('INCRBY', KEYS[1], n) - n
-- Nothing is written until every key the call writes is known to be of its type (expect_fn).
local out, new, taken, fired, lines, held = {}, {}, {}, {}, {}, {}
local per_batch, per_func, per_round = {}, {}, {}
local p = 2
for i = 1, n do
  local id, q, prio, batch, round = jobs[p], jobs[p + 1], jobs[p + 2], jobs[p + 3], jobs[p + 4]
  local func = jobs[p + 5]
  local jk = jp .. id
  if token ~= '' then fired[#fired + 1] = id end
  local read, status = pcall(redis.call, 'HGET', jk, 'status')
  if not read then expect(jk, 'hash'); error(status) end
  if taken[id] then status = 'queued' end   -- an id twice in one call: queued once
  if not status and redis.call('EXISTS', ARGV[11] .. id) == 1 then status = 'scheduled' end
  local note = notes[i]
  if status then
    out[#out + 1] = i
    out[#out + 1] = status
    if note then
      local own = redis.call('HMGET', jk, 'dedupe_key', 'dedupe_scope')
      if own[1] and own[2] and #own[2] .. ':' .. own[2] .. own[1] == note then
        held[#held + 1] = note
      end
    end
  else
    if note then held[#held + 1] = note end
    local member = string.format('%016x', base + i) .. ':' .. id
    new[#new + 1] = p
    new[#new + 1] = member
    taken[id] = true
    local line = lines[q]
    if not line then line = {}; lines[q] = line end
    line[#line + 1] = -tonumber(prio)
    line[#line + 1] = member
    if batch ~= '' then per_batch[batch] = (per_batch[batch] or 0) + 1 end
    if round ~= '' then per_round[round] = (per_round[round] or 0) + 1 end
    if func ~= '' then per_func[func] = (per_func[func] or 0) + 1 end
  end
  p = p + 7 + jobs[p + 6]
end
local added = #new / 2
if token ~= '' then expect(KEYS[6], 'hash') end
if added > 0 then
  expect(KEYS[2], 'set'); expect(KEYS[3], 'hash'); expect(KEYS[4], 'set'); expect(KEYS[7], 'set')
  for q in pairs(lines) do
    expect(qp .. q, 'zset')
    local t = redis.call('TYPE', wp .. q).ok   -- it holds only tokens: replaced, not refused
    if t ~= 'none' and t ~= 'list' then redis.call('DEL', wp .. q) end
  end
  for name in pairs(per_batch) do expect(bp .. name, 'hash') end
  for name in pairs(per_func) do expect(fp .. name, 'hash') end
  for name in pairs(per_round) do expect(rp .. name, 'hash') end
end
for _, id in ipairs(fired) do redis.call('HDEL', KEYS[6], id) end
for j = 1, #new, 2 do
  local at = new[j]
  redis.call('HSET', jp .. jobs[at], 'status', 'queued', 'queue', jobs[at + 1], 'enqueued_at',
             now, 'member', new[j + 1], unpack(jobs, at + 7, at + 6 + jobs[at + 6]))
end
for q, line in pairs(lines) do
  for s = 1, #line, 4000 do   -- unpack() takes at most ~8000 values
    redis.call('ZADD', qp .. q, unpack(line, s, math.min(#line, s + 3999)))
  end
  local queued = #line / 2
  redis.call('SADD', KEYS[2], q)
  redis.call('HINCRBY', KEYS[3], 'queue:' .. q .. ':submitted', queued)
  redis.call('HSET', KEYS[3], 'queue:' .. q .. ':last_at', now)   -- (forget_queues.lua)
  for _ = 1, math.min(queued, 16) do redis.call('LPUSH', wp .. q, '1') end
  redis.call('LTRIM', wp .. q, 0, 15)
end
-- a batch's and a func's stats hash: submitted, and when it began and was last touched
local function count_submitted(per, prefix, names)
  for name, count in pairs(per) do
    redis.call('HINCRBY', prefix .. name, 'submitted', count)
    redis.call('HSETNX', prefix .. name, 'first_at', now)
    redis.call('HSET', prefix .. name, 'last_at', now)
    redis.call('SADD', names, name)
  end
end
count_submitted(per_batch, bp, KEYS[4])
count_submitted(per_func, fp, KEYS[7])
for round, count in pairs(per_round) do
  redis.call('HINCRBY', rp .. round, 'submitted', count)
  redis.call('EXPIRE', rp .. round, round_ttl)
end
if added > 0 then redis.call('HINCRBY', KEYS[3], 'submitted', added) end
for _, note in ipairs(held) do redis.call('DEL', ARGV[10] .. note) end
return out
