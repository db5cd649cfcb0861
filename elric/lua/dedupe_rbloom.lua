-- redis-bloom dedupe: check-and-add a batch of hashed keys in one scope's staged Bloom filter.
-- KEYS[1] the scope's stats hash, KEYS[2] the scope registry (zset)
-- ARGV[1] the scope, ARGV[2] the master's parameters, ARGV[3] the backend name,
--      ARGV[4] the shard key prefix (a shard's key is the prefix and its number),
--      ARGV[5] the prefix of the keys that name the job taking a key ('': none), ARGV[6]
--      how long those are kept (ms), ARGV[7] after how long (ms) a key whose job was never
--      queued goes to the next job (dedupe_taker_fn.lua), ARGV[8] the number of stages
--      sent, then per stage
--      s = 0, 1, ... that the master sent, six items: cumulative capacity (items of
--      stage s and every earlier one), k, first shard, shards, shard bytes, and
--      the keys' records: per key 1 + k little-endian uint32s, its shard's number then
--      its k bit offsets in that shard (elric.rbloom.records); then (with a prefix) the
--      keys, and as many job ids, one per key.
-- Returns {verdicts, items}: one byte per key decided, in order, '1' new (now added) or
--      '0' seen; and the scope's item count after. Fewer verdicts than keys when the
--      filter needs a stage that was not sent: the master sends the rest with more stages.
--      Error 'PARAMS <theirs>' if the scope was created with other parameters, 'BACKEND
--      <name>' if another backend filled it, 'WRONGTYPE <key> ...' if a shard or the
--      registry is of another type (expect_fn.lua), with nothing written.
-- Invariant: a key is added to the current stage (the first whose cumulative capacity is
--      above items) only if no older stage holds all its bits; items counts keys added, so
--      no stage takes more than its capacity. Shards are created at full size (SETRANGE
--      of their last byte, never a Bloom bit) before a key goes in. A key seen is not
--      counted `filtered` here: the caller counts the jobs it drops (dedupe_count.lua).
--      A job that takes a key is noted as its taker in the same step (dedupe_taker_fn.lua):
--      a master that dies before queueing it leaves the key to a resend of that job, and to
--      any job once the note is orphaned (taken over: its bits are set, nothing counted).
local stats, registry = KEYS[1], KEYS[2]
local scope, params, backend, prefix = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local tp, kept, grace, sent = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local other = redis.call('HGET', stats, 'backend')
if other and other ~= backend then return redis.error_reply('BACKEND ' .. other) end
local theirs = redis.call('HGET', stats, 'params')
if theirs and theirs ~= params then return redis.error_reply('PARAMS ' .. theirs) end
local items = tonumber(redis.call('HGET', stats, 'items') or 0)

local cum, first, shards, size, blob, fmt, width, get, set = {}, {}, {}, {}, {}, {}, {}, {}, {}
for s = 0, sent - 1 do
  local a = 8 + 6 * s
  local k = tonumber(ARGV[a + 2])
  cum[s], first[s], shards[s] = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  size[s], blob[s] = tonumber(ARGV[a + 5]), ARGV[a + 6]
  fmt[s], width[s] = '<' .. string.rep('I4', k + 1), 4 * (k + 1)
  get[s], set[s] = {}, {}           -- BITFIELD arguments; the offsets are filled in per key
  for i = 1, k do
    get[s][3 * i - 2], get[s][3 * i - 1] = 'GET', 'u1'
    set[s][4 * i - 3], set[s][4 * i - 2], set[s][4 * i] = 'SET', 'u1', '1'
  end
end
local cur = 0
while cur < sent and items >= cum[cur] do cur = cur + 1 end
if cur == sent then return {'', items} end
-- every shard a key may be read or set in, or a stage created in, is a string before any
-- bit is set: bits set by a call that then fails filter the resend of jobs never queued
for g = 0, first[sent - 1] + shards[sent - 1] - 1 do expect(prefix .. g, 'string') end
expect(registry, 'zset')

local function create(s)
  for g = first[s], first[s] + shards[s] - 1 do
    redis.call('SETRANGE', prefix .. g, size[s] - 1, '\0')
  end
end
if items == (cur > 0 and cum[cur - 1] or 0) then create(cur) end   -- a stage not used yet

-- fill a stage's argument list with key j's offsets; returns the key's shard name
local names = {}
local function load(s, j, args, step, at)
  local r = {struct.unpack(fmt[s], blob[s], j * width[s] + 1)}
  for i = 2, #r - 1 do args[step * (i - 2) + at] = r[i] end
  local name = names[r[1]]
  if not name then name = prefix .. r[1]; names[r[1]] = name end
  return name
end

local out = {}
local n = #blob[0] / width[0]
local taken = 9 + 6 * sent   -- the first key's index, its job id's n later
for j = 0, n - 1 do
  local seen = false
  for s = cur - 1, 0, -1 do          -- read the older stages, the largest first
    local bits = redis.call('BITFIELD_RO', load(s, j, get[s], 3, 3), unpack(get[s]))
    seen = true
    for i = 1, #bits do if bits[i] == 0 then seen = false break end end
    if seen then break end
  end
  if not seen then                   -- test-and-set in the current stage
    local old = redis.call('BITFIELD', load(cur, j, set[cur], 4, 3), unpack(set[cur]))
    seen = true
    for i = 1, #old do if old[i] == 0 then seen = false break end end
  end
  if seen and orphaned(tp, scope, ARGV[taken + j], kept, grace) then
    out[j + 1] = '1'
    note_taker(tp, scope, ARGV[taken + j], ARGV[taken + n + j], kept)
  elseif seen then
    out[j + 1] = '0'
  else
    out[j + 1] = '1'
    items = items + 1
    if tp ~= '' then note_taker(tp, scope, ARGV[taken + j], ARGV[taken + n + j], kept) end
    if items >= cum[cur] then        -- the stage is full: the next key goes to the next
      cur = cur + 1
      if cur == sent then break end
      create(cur)
    end
  end
end

redis.call('HSET', stats, 'items', items)
redis.call('HSETNX', stats, 'params', params)
redis.call('HSETNX', stats, 'backend', backend)
redis.call('ZADD', registry, '+inf', scope)
return {table.concat(out), items}
