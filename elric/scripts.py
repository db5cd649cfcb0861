"""Every multi-step state change of the queue, each one atomic Lua script named for what it does.

Key names are built from the prefix passed as ARGV[1]; their layout is documented in
keys.py. Times are integer milliseconds since the epoch. A job's queue member is
``{seq:016x}:{job_id}`` (kept in the job hash as ``member``) so a requeued job keeps its
place in line.
"""

# Shared by the scripts that put a job back in line.
_REQUEUE_FN = """
local function requeue(prefix, id, jk, keep_member)
  local f = redis.call('HMGET', jk, 'queue', 'priority', 'member')
  local member = f[3]
  if not keep_member or not member then
    local seq = redis.call('INCR', prefix .. ':seq')
    member = string.format('%016x', seq) .. ':' .. id
  end
  redis.call('HSET', jk, 'status', 'queued', 'member', member, 'worker', '')
  redis.call('ZADD', prefix .. ':queue:' .. f[1], -(tonumber(f[2]) or 0), member)
  redis.call('LPUSH', prefix .. ':wake:' .. f[1], '1')
  redis.call('LTRIM', prefix .. ':wake:' .. f[1], 0, 15)
end
"""


# Shared by the scripts that look a job up by id: a job is its hash, or it waits in a
# pack (keys.py) when its id is {pack}{index:08x}, the pack has not handed that index out
# yet (index >= next) and it was not removed (g{index}). in_pack returns the pack's key,
# its info key, the index and the pack's size, or nothing. pack_fields reads the fields
# of `count` jobs from index k: the pack is a string, a table of little-endian uint32
# end offsets, one per job, then the jobs' msgpack arrays back to back. A job's array is
# positional, PACK_FIELDS, nil where the field is at its
# default; the fields its whole pack shares are in the pack's info (job_fields).
# A pack's member in its queue's `packs` zset is {seq of its first job left}:{pack}, so it
# keeps its place in line against single jobs as it is taken. Once no job waits in it,
# it leaves the line (pack_done) but its info stays for PACK_KEEP seconds, so that an
# ENQUEUE sent again after a lost reply still finds the pack it stored.
PACK_KEEP = 3600    # s; also the expiry queue.py SETs a pack's string with
# a packed job's fields, by position (queue.py gathers every job's fields in this order)
PACK_FIELDS = ("func", "args", "kwargs", "max_retries", "timeout", "parent", "schedule",
               "fire_time", "dedupe_key", "dedupe_scope")
_PACKED_FN = f"""
local PACK_KEEP = {PACK_KEEP}
local PACK_FIELDS = {{{", ".join(repr(n) for n in PACK_FIELDS)}}}
""" + """local function pack_member(seq, pid, first_left)
  return string.format('%016x', tonumber(seq, 16) + first_left) .. ':' .. pid
end
local function pack_done(prefix, pk, info, queue, member)
  redis.call('DEL', pk)
  redis.call('ZREM', prefix .. ':packs:' .. queue, member)
  redis.call('HSET', info, 'gone', 0, 'next', redis.call('HGET', info, 'n') or 0)
  redis.call('EXPIRE', info, PACK_KEEP)
end
local function in_pack(prefix, id)
  if #id ~= 32 or string.find(id, '[^0-9a-f]') then return nil end
  local pid, k = string.sub(id, 1, 24), tonumber(string.sub(id, 25), 16)
  local pk = prefix .. ':pack:' .. pid
  local info = pk .. ':info'
  local f = redis.call('HMGET', info, 'n', 'next', 'g' .. k)
  if not f[1] or f[3] or k < tonumber(f[2]) or k >= tonumber(f[1])
     or redis.call('STRLEN', pk) < 4 * tonumber(f[1]) then   -- (a string lost: none)
    return nil
  end
  return pk, info, k, tonumber(f[1])
end
local function pack_fields(pk, size, k, count)
  local first = math.max(k - 1, 0)
  local head = redis.call('GETRANGE', pk, 4 * first, 4 * (k + count) - 1)
  local ends, pos = {}, 1
  for i = first, k + count - 1 do ends[i], pos = struct.unpack('<I4', head, pos) end
  local from = k > 0 and ends[k - 1] or 0
  local body = redis.call('GETRANGE', pk, 4 * size + from, 4 * size + ends[k + count - 1] - 1)
  local out = {}
  for i = 0, count - 1 do
    local a = (i > 0 and ends[k + i - 1] or from) - from
    out[i + 1] = cmsgpack.unpack(string.sub(body, a + 1, ends[k + i] - from))
  end
  return out
end
-- the job hash fields of a packed job: its own (positional, nil where at the default)
-- and its pack's (info: queue, priority, enqueued_at, batch), appended to `out`
local function job_fields(f, g, out)
  out[#out + 1] = 'queue'; out[#out + 1] = g[1]
  out[#out + 1] = 'priority'; out[#out + 1] = g[2]
  out[#out + 1] = 'enqueued_at'; out[#out + 1] = g[3]
  if g[4] ~= '' then out[#out + 1] = 'batch'; out[#out + 1] = g[4] end
  for x = 1, 10 do
    if f[x] then out[#out + 1] = PACK_FIELDS[x]; out[#out + 1] = f[x] end
  end
  return out
end
local function status_of(prefix, id)
  return redis.call('HGET', prefix .. ':job:' .. id, 'status')
    or (in_pack(prefix, id) and 'queued')
end
"""

# ARGV: prefix, now, fence_key, fence_token, jobs: ONE msgpack array (packed without the
# bin type: Redis's cmsgpack predates it) [n, run1, run2, ...], n the number of jobs. A
# run is consecutive jobs sharing queue, priority, batch and freshness, flattened into
# the array: queue, priority, batch, fresh, body. (One blob instead of ~30 arguments per
# job: parsing them cost the master more Python time than Redis spends queueing. Runs
# instead of one array per job: cmsgpack makes a Lua table per array and a Lua string
# per value, which cost Redis ~1 us per job, half of it gone this way.)
#
# `fresh` ('1') marks a run of jobs the master makes ids for, which cannot exist. Such a
# run is queued as a PACK (keys.py): body = [pack, n], the job ids are {pack}{index:08x}
# (queue.py assigns them). Its info holds what its jobs share (queue, priority,
# enqueued_at, batch). Its string (n end offsets, then per job the msgpack array of its
# PACK_FIELDS, nil where at the default: no field names stored per job) is not an
# argument: queue.py sends it just before, in
# the same pipeline, as SET {pack key} data EX PACK_KEEP, and this script PERSISTs the
# packs it takes (one whose script never ran expires). Data passed through a script
# costs Redis ~1 ns a byte each time Lua copies it, ~0.5 us per job here; a plain SET
# takes it from the request as it is. A pack is one string and one member for the
# whole run in the queue's `packs` zset; FETCH writes the job hash when it takes the
# job, and nothing indexes its id: the id names the pack. (A job hash plus a queue
# member per job cost Redis ~3.4 us of the ~5.6 us this script spent per new job, an
# index of ids ~1 more; a pack costs next to nothing per job. That is what lets a
# crawler's new links through the master at 200,000/s.) Other runs (job ids the caller chose): body = [job_id1, m1, field, value,
# ... (m1 strings), job_id2, m2, ...], a job hash and a queue member each.
#
# A job id that exists already, as a hash or in a pack, is left alone and its status
# returned: resubmitting with the same job_id is idempotent. Packs are not looked up,
# unless the first pack of the batch exists already (its info, or its first job's hash).
# That is this very call run a second time (redis-py re-sends a command whose reply was
# lost): then each pack that exists is reported job by job, and nothing is queued twice
# (a job removed in between is reported 'cancelled'). A pack's info outlives its jobs
# by an hour (PACK_KEEP): a resend later than that would queue it again, as it would a
# chosen id whose job has expired; FETCH then runs none of it twice (it skips a job that
# has a hash already). With a fence key,
# the whole call is refused unless it holds the token (the scheduler's lease), so a master
# that lost its lease cannot enqueue fires. Returns the exceptions only, as a flat array
# [position (1-based), status, ...] of the jobs that existed already; every other job was
# queued (rather than 1,000 'queued' strings to parse).
# Per job hash: fields at their default (no batch, attempts 0) are not written, a
# missing field reads as its default (each field costs Redis ~0.35 us). priority is
# always written: the requeue of earlier versions, still running in workers during an
# upgrade, needs it (and those workers, which know no packs, leave packs alone). The
# queue's sorted sets are the only index of queued jobs (no status:queued); they, the
# counters and the wake-ups are written once per queue (variadic ZADD), not once per job.
ENQUEUE = _PACKED_FN + """
local prefix, now = ARGV[1], ARGV[2]
if ARGV[3] ~= '' and redis.call('GET', ARGV[3]) ~= ARGV[4] then
  return redis.error_reply('FENCED lease token is stale')
end
local function sliced(cmd, key, t, from, to, step)  -- unpack() is limited to ~8000 values
  for s = from, to, step do redis.call(cmd, key, unpack(t, s, math.min(to, s + step - 1))) end
end
local runs = cmsgpack.unpack(ARGV[5])
for r = 2, #runs, 5 do   -- before any write: the packs' strings came (SET can fail: OOM)
  if runs[r + 3] == '1' and redis.call('EXISTS', prefix .. ':pack:' .. runs[r + 4][1]) == 0 then
    return redis.error_reply('NOPACK the string of pack ' .. runs[r + 4][1] .. ' is missing')
  end
end
local n = runs[1]
local base = redis.call('INCRBY', prefix .. ':seq', n) - n
local out, byq, counts, queues, batches, added = {}, {}, {}, {}, {}, 0
local function stored(pid)  -- a pack this call's first run stored (see the replay note)
  return redis.call('EXISTS', prefix .. ':pack:' .. pid .. ':info',
                    prefix .. ':job:' .. pid .. '00000000') > 0
end
local replay = false
for r = 2, #runs, 5 do
  if runs[r + 3] == '1' then
    replay = stored(runs[r + 4][1])
    break
  end
end
local pos = 0
for r = 2, #runs, 5 do
  local q, prio, batch, body = runs[r], runs[r + 1], runs[r + 2], runs[r + 4]
  local score = tostring(-tonumber(prio))
  local z = byq[q]
  if not z then z = {}; byq[q] = z; counts[q] = 0; queues[#queues + 1] = q end
  local queued = 0
  local last = #body
  if runs[r + 3] == '1' then
    local pid, size = body[1], body[2]
    local pk = prefix .. ':pack:' .. pid
    if replay and stored(pid) then
      -- stored by the first run of this call: report each job as it is now (one
      -- removed since then stays removed); the string sent again is the same bytes,
      -- kept while jobs wait in it, else dropped
      for k = 0, size - 1 do
        pos = pos + 1
        out[#out + 1] = pos
        out[#out + 1] = status_of(prefix, pid .. string.format('%08x', k)) or 'cancelled'
      end
      local f = redis.call('HMGET', pk .. ':info', 'n', 'next')
      if f[1] and tonumber(f[2]) < tonumber(f[1]) then
        redis.call('PERSIST', pk)
      else
        redis.call('DEL', pk)
      end
    else
      local seq = string.format('%016x', base + pos + 1)
      redis.call('PERSIST', pk)
      redis.call('HSET', pk .. ':info', 'n', size, 'next', 0, 'seq', seq, 'queue', q,
                 'priority', prio, 'enqueued_at', now, 'batch', batch)
      redis.call('ZADD', prefix .. ':packs:' .. q, score, seq .. ':' .. pid)
      redis.call('HINCRBY', prefix .. ':packed:counts', q, size)
      pos = pos + size
      queued = size
    end
  else
    local p = 1
    while p <= last do
      local id, m = body[p], body[p + 1]
      pos = pos + 1
      local jk = prefix .. ':job:' .. id
      local existing = status_of(prefix, id)
      if existing then
        out[#out + 1] = pos; out[#out + 1] = existing
      else
        local member = string.format('%016x', base + pos) .. ':' .. id
        if batch == '' then
          redis.call('HSET', jk, 'status', 'queued', 'queue', q, 'priority', prio,
                     'enqueued_at', now, 'member', member, unpack(body, p + 2, p + 1 + m))
        else
          redis.call('HSET', jk, 'status', 'queued', 'queue', q, 'priority', prio,
                     'enqueued_at', now, 'member', member, 'batch', batch,
                     unpack(body, p + 2, p + 1 + m))
        end
        z[#z + 1] = score; z[#z + 1] = member
        queued = queued + 1
      end
      p = p + 2 + m
    end
  end
  counts[q] = counts[q] + queued
  if batch ~= '' and queued > 0 then batches[batch] = (batches[batch] or 0) + queued end
  added = added + queued
end
for _, q in ipairs(queues) do
  local z, c = byq[q], counts[q]
  if #z > 0 then sliced('ZADD', prefix .. ':queue:' .. q, z, 1, #z, 4000) end
  if c > 0 then
    redis.call('SADD', prefix .. ':queues', q)
    redis.call('HINCRBY', prefix .. ':stats:counters', 'queue:' .. q .. ':submitted', c)
    local wk = prefix .. ':wake:' .. q
    for _ = 1, math.min(c, 16) do redis.call('LPUSH', wk, '1') end
    redis.call('LTRIM', wk, 0, 15)
  end
end
for batch, c in pairs(batches) do
  redis.call('HINCRBY', prefix .. ':stats:batch:' .. batch, 'submitted', c)
  redis.call('SADD', prefix .. ':batches', batch)
end
if added > 0 then redis.call('HINCRBY', prefix .. ':stats:counters', 'submitted', added) end
return out
"""

# ARGV: prefix, now, lease_deadline, worker_id, limit, queue1, queue2, ...
# Takes up to `limit` jobs, highest priority first across the given queues (FIFO within a
# priority; a pack's jobs share its place in line), marks them running under this worker
# with a lease, returns for each:
# {job_id, attempt, func, args, kwargs, timeout, max_retries, queue, dedupe_scope}.
# A job taken from a pack gets its job hash here, as ENQUEUE would have written it, with
# `member` = {its own seq}:{job_id}, so that a requeue puts it back in its place. A job
# removed while it waited (g{index}) is skipped, and so is one that has a hash already
# (queued twice by an ENQUEUE resent too late: it runs once). The pack's member moves to
# its first job left; an emptied pack leaves the line (pack_done).
FETCH = _PACKED_FN + """
local prefix, now, deadline, worker, limit =
  ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
local cands = {}
for i = 6, #ARGV do
  local qk = prefix .. ':queue:' .. ARGV[i]
  local r = redis.call('ZRANGE', qk, 0, limit - 1, 'WITHSCORES')
  for j = 1, #r, 2 do cands[#cands+1] = {tonumber(r[j+1]), r[j], qk} end
  local pk = prefix .. ':packs:' .. ARGV[i]
  r = redis.call('ZRANGE', pk, 0, limit - 1, 'WITHSCORES')
  for j = 1, #r, 2 do cands[#cands+1] = {tonumber(r[j+1]), r[j], pk, ARGV[i]} end
end
if #cands > 1 then
  table.sort(cands, function(a, b)
    if a[1] ~= b[1] then return a[1] < b[1] end
    return a[2] < b[2]
  end)
end
local out = {}
local function running(id)
  redis.call('ZADD', prefix .. ':inflight', deadline, id)
  redis.call('ZADD', prefix .. ':status:running', now, id)
end
for _, c in ipairs(cands) do
  if #out >= limit then break end
  if not c[4] then
    redis.call('ZREM', c[3], c[2])
    local id = string.sub(c[2], 18)
    local jk = prefix .. ':job:' .. id
    if redis.call('EXISTS', jk) == 1 then
      local attempt = redis.call('HINCRBY', jk, 'attempts', 1)
      redis.call('HSET', jk, 'status', 'running', 'worker', worker, 'started_at', now)
      running(id)
      local f = redis.call('HMGET', jk, 'func', 'args', 'kwargs', 'timeout', 'max_retries',
                           'queue', 'dedupe_scope')
      out[#out+1] = {id, attempt, f[1], f[2], f[3], f[4] or '', f[5] or '0', f[6], f[7] or ''}
    end
  else
    local pid = string.sub(c[2], 18)
    local pk = prefix .. ':pack:' .. pid
    local info = pk .. ':info'
    local f = redis.call('HMGET', info, 'n', 'next', 'gone', 'seq',
                         'queue', 'priority', 'enqueued_at', 'batch')
    local size, nxt, gone = tonumber(f[1] or 0), tonumber(f[2] or 0), tonumber(f[3] or 0)
    local seq0 = tonumber(f[4] or 0, 16)
    local g = {f[5], f[6], f[7], f[8]}
    local got, dropped = 0, 0   -- dropped: leave the count without running
    if not (f[1] and f[4] and g[1] and g[2] and g[3] and g[4])
       or redis.call('STRLEN', pk) < 4 * size then
      -- its string or info is lost (evicted: Redis must not evict, or deleted by hand):
      -- its jobs are gone; it leaves the line rather than fail every fetch of the queue
      redis.log(redis.LOG_WARNING, 'elric: pack ' .. pid .. ' of queue ' .. c[4] ..
                ' lost its data; its waiting jobs are dropped')
      pack_done(prefix, pk, info, c[4], c[2])
      dropped = math.max(0, size - nxt - gone)
      nxt = size
    end
    while #out < limit and nxt < size do
      local count = math.min(limit - #out, size - nxt)
      local jobs = pack_fields(pk, size, nxt, count)
      for j = 1, count do
        local k = nxt + j - 1
        local id = pid .. string.format('%08x', k)
        local jk = prefix .. ':job:' .. id
        if gone > 0 and redis.call('HEXISTS', info, 'g' .. k) == 1 then
          gone = gone - 1
        elseif redis.call('EXISTS', jk) == 1 then
          dropped = dropped + 1
        else
          local f = jobs[j]
          redis.call('HSET', jk, unpack(job_fields(f, g, {
            'status', 'running', 'worker', worker, 'started_at', now, 'attempts', 1,
            'member', string.format('%016x', seq0 + k) .. ':' .. id})))
          running(id)
          out[#out+1] = {id, 1, f[1], f[2] or false, f[3] or false, f[5] or '', f[4] or '0',
                         g[1], f[10] or ''}
          got = got + 1
        end
      end
      nxt = nxt + count
    end
    if gone >= size - nxt then
      pack_done(prefix, pk, info, c[4], c[2])
    else
      redis.call('HSET', info, 'next', nxt, 'gone', gone)
      redis.call('ZREM', c[3], c[2])
      redis.call('ZADD', c[3], c[1], pack_member(f[4], pid, nxt))
    end
    if got + dropped > 0 then
      redis.call('HINCRBY', prefix .. ':packed:counts', c[4], -(got + dropped))
    end
  end
end
return out
"""

# ARGV: prefix, now, worker_id, result_ttl, failed_ttl, release_keys ('1' | '0'), then per
# job: job_id, attempt, outcome ('ok' | 'err'), payload (result bytes | traceback),
#   duration_ms, retry_delay_ms (-1: no retry)
# Records outcomes of jobs this worker still holds; a job that was redelivered elsewhere
# meanwhile (another attempt number) or removed is reported 'stale' and left alone. With
# release_keys, a job that failed for good gives its dedupe key back to an exact (set)
# filter, in the same step, so it can be submitted again.
FINISH = """
local prefix, now, worker = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local result_ttl, failed_ttl = tonumber(ARGV[4]), tonumber(ARGV[5])
local release_keys = ARGV[6] == '1'
local counters = prefix .. ':stats:counters'
local out = {}
local done, failed = 0, 0
for i = 7, #ARGV, 6 do
  local id, attempt, outcome, payload = ARGV[i], ARGV[i+1], ARGV[i+2], ARGV[i+3]
  local duration, retry = ARGV[i+4], tonumber(ARGV[i+5])
  local jk = prefix .. ':job:' .. id
  local f = redis.call('HMGET', jk, 'status', 'attempts', 'queue', 'batch', 'max_retries', 'error')
  if f[1] ~= 'running' or f[2] ~= attempt then
    out[#out+1] = 'stale'
  else
    redis.call('ZREM', prefix .. ':inflight', id)
    redis.call('ZREM', prefix .. ':status:running', id)
    local q, batch = f[3], f[4]
    local status
    if outcome == 'ok' then
      status = 'succeeded'
      redis.call('HSET', jk, 'status', status, 'result', payload, 'finished_at', now,
                 'duration_ms', duration)
      redis.call('EXPIRE', jk, result_ttl)
      done = done + 1
    else
      local err = (f[6] or '') .. '--- attempt ' .. attempt .. ' ---\\n' .. payload .. '\\n'
      if retry >= 0 and tonumber(attempt) <= tonumber(f[5] or '0') then
        status = 'retrying'
        redis.call('HSET', jk, 'status', status, 'error', err, 'duration_ms', duration,
                   'retry_at', now + retry)
        redis.call('ZADD', prefix .. ':delayed', now + retry, id)
      else
        status = 'failed'
        redis.call('HSET', jk, 'status', status, 'error', err, 'finished_at', now,
                   'duration_ms', duration)
        redis.call('EXPIRE', jk, failed_ttl)
        failed = failed + 1
        if release_keys then
          local d = redis.call('HMGET', jk, 'dedupe_key', 'dedupe_scope')
          if d[1] then
            local fk = prefix .. ':dedupe:set:' .. (d[2] or 'global')
            local kind = redis.call('TYPE', fk)['ok']
            if kind == 'set' then redis.call('SREM', fk, d[1])
            elseif kind == 'zset' then redis.call('ZREM', fk, d[1]) end
          end
        end
      end
    end
    redis.call('ZADD', prefix .. ':status:' .. status, now, id)
    redis.call('HINCRBY', counters, status, 1)
    redis.call('HINCRBY', counters, 'queue:' .. q .. ':' .. status, 1)
    if batch and batch ~= '' then
      redis.call('HINCRBY', prefix .. ':stats:batch:' .. batch, status, 1)
    end
    out[#out+1] = status
  end
end
local wk = prefix .. ':worker:' .. worker
if done > 0 then redis.call('HINCRBY', wk, 'succeeded', done) end
if failed > 0 then redis.call('HINCRBY', wk, 'failed', failed) end
-- finished jobs' hashes expire; drop their index entries on the same schedule
redis.call('ZREMRANGEBYSCORE', prefix .. ':status:succeeded', '-inf', now - result_ttl * 1000)
redis.call('ZREMRANGEBYSCORE', prefix .. ':status:failed', '-inf', now - failed_ttl * 1000)
return out
"""

# ARGV: prefix, now, worker_id, then pairs job_id, attempt.
# Gives back jobs a worker claimed but will not run (shutdown, prefetched): they go back to
# their place in line at once and the claim does not count as an attempt.
RELEASE = _REQUEUE_FN + """
local prefix, now, worker = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = 0
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local jk = prefix .. ':job:' .. id
  local f = redis.call('HMGET', jk, 'status', 'attempts', 'worker')
  if f[1] == 'running' and f[2] == ARGV[i+1] and f[3] == worker then
    redis.call('HINCRBY', jk, 'attempts', -1)
    redis.call('ZREM', prefix .. ':inflight', id)
    redis.call('ZREM', prefix .. ':status:running', id)
    requeue(prefix, id, jk, true)
    n = n + 1
  end
end
return n
"""

# ARGV: prefix, now, limit. Jobs whose lease ran out (their worker died) go back in line.
RECOVER = _REQUEUE_FN + """
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', prefix .. ':inflight', '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(ids) do
  redis.call('ZREM', prefix .. ':inflight', id)
  redis.call('ZREM', prefix .. ':status:running', id)
  local jk = prefix .. ':job:' .. id
  if redis.call('HGET', jk, 'status') == 'running' then
    requeue(prefix, id, jk, true)
    redis.call('HINCRBY', prefix .. ':stats:counters', 'redelivered', 1)
    out[#out+1] = id
  end
end
return out
"""

# ARGV: prefix, now, limit. Retrying jobs whose backoff is over go back in line.
PROMOTE = _REQUEUE_FN + """
local prefix, now, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local ids = redis.call('ZRANGEBYSCORE', prefix .. ':delayed', '-inf', now, 'LIMIT', 0, limit)
for _, id in ipairs(ids) do
  redis.call('ZREM', prefix .. ':delayed', id)
  redis.call('ZREM', prefix .. ':status:retrying', id)
  local jk = prefix .. ':job:' .. id
  if redis.call('HGET', jk, 'status') == 'retrying' then
    requeue(prefix, id, jk, false)
  end
end
return #ids
"""

# ARGV: prefix, now, deadline, worker_id, job ids... Extends the leases of the jobs this
# worker still holds; returns how many it extended.
HEARTBEAT = """
local prefix, deadline, worker = ARGV[1], tonumber(ARGV[3]), ARGV[4]
local n = 0
for i = 5, #ARGV do
  local jk = prefix .. ':job:' .. ARGV[i]
  local f = redis.call('HMGET', jk, 'status', 'worker')
  if f[1] == 'running' and f[2] == worker then
    redis.call('ZADD', prefix .. ':inflight', 'XX', deadline, ARGV[i])
    n = n + 1
  end
end
return n
"""

# ARGV: prefix, job_id. Deletes a job wherever it is; a running job's worker will find it
# gone and drop its outcome. Returns the status it had, or false.
REMOVE = _PACKED_FN + """
local prefix, id = ARGV[1], ARGV[2]
local jk = prefix .. ':job:' .. id
local f = redis.call('HMGET', jk, 'status', 'queue', 'member')
if not f[1] then
  -- waiting in a pack: marked, FETCH skips it
  local pk, info, k, size = in_pack(prefix, id)
  if not pk then return false end
  redis.call('HSET', info, 'g' .. k, 1)
  local gone = redis.call('HINCRBY', info, 'gone', 1)
  local g = redis.call('HMGET', info, 'queue', 'next', 'seq')
  redis.call('HINCRBY', prefix .. ':packed:counts', g[1], -1)
  if gone >= size - tonumber(g[2]) then   -- no job waits in it any more
    pack_done(prefix, pk, info, g[1], pack_member(g[3], string.sub(id, 1, 24), tonumber(g[2])))
  end
  return 'queued'
end
if f[2] and f[3] then redis.call('ZREM', prefix .. ':queue:' .. f[2], f[3]) end
redis.call('ZREM', prefix .. ':inflight', id)
redis.call('ZREM', prefix .. ':delayed', id)
redis.call('ZREM', prefix .. ':status:' .. f[1], id)
redis.call('DEL', jk)
return f[1]
"""

# ARGV: prefix, now, job_id. Runs a finished job again from attempt 0; returns its old
# status, or an error naming why it cannot.
RERUN = _REQUEUE_FN + _PACKED_FN + """
local prefix, now, id = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local jk = prefix .. ':job:' .. id
local status = redis.call('HGET', jk, 'status')
if not status then
  if in_pack(prefix, id) then return redis.error_reply('LIVE queued') end
  return redis.error_reply('NOJOB')
end
if status ~= 'failed' and status ~= 'succeeded' and status ~= 'cancelled' then
  return redis.error_reply('LIVE ' .. status)
end
redis.call('ZREM', prefix .. ':status:' .. status, id)
redis.call('PERSIST', jk)
redis.call('HSET', jk, 'attempts', 0, 'enqueued_at', now)
redis.call('HDEL', jk, 'finished_at', 'result', 'error', 'retry_at', 'duration_ms')
requeue(prefix, id, jk, false)
return status
"""

# ARGV: prefix, n, field1 .. fieldn, job_id1, job_id2, ... Reads jobs by id, atomically
# (a job leaves its pack for its hash in one step, FETCH): per job, its hash as a flat
# [name, value, ...] (HGETALL, or with n > 0 those fields, false where missing), the
# same made from its packed fields for a job waiting in a pack (status queued), or an
# empty array when there is no such job.
LOOKUP = _PACKED_FN + """
local prefix, n = ARGV[1], tonumber(ARGV[2])
local out = {}
for i = 3 + n, #ARGV do
  local id = ARGV[i]
  local jk = prefix .. ':job:' .. id
  local h
  if redis.call('EXISTS', jk) == 1 then
    if n == 0 then
      h = redis.call('HGETALL', jk)
    else
      local v = redis.call('HMGET', jk, unpack(ARGV, 3, 2 + n))
      h = {}
      for x = 1, n do h[#h + 1] = ARGV[2 + x]; h[#h + 1] = v[x] end
    end
  else
    local pk, info, k, size = in_pack(prefix, id)
    h = {}
    if pk then
      local f = pack_fields(pk, size, k, 1)[1]
      local g = redis.call('HMGET', info, 'queue', 'priority', 'enqueued_at', 'batch', 'seq')
      local flat = job_fields(f, g, {'status', 'queued', 'member',
                                     string.format('%016x', tonumber(g[5], 16) + k) .. ':' .. id})
      local all = {}
      for x = 1, #flat, 2 do all[flat[x]] = flat[x + 1] end
      if n == 0 then
        for name, value in pairs(all) do h[#h + 1] = name; h[#h + 1] = value end
      else
        for x = 1, n do h[#h + 1] = ARGV[2 + x]; h[#h + 1] = all[ARGV[2 + x]] or false end
      end
    end
  end
  out[#out + 1] = h
end
return out
"""
