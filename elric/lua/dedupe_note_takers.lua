-- In-master `bloom` dedupe: note the job taking each key a check found new, before the
-- master adds the keys to its filter in memory, and take over the keys it found seen whose
-- taker was never queued.
-- KEYS: none (the notes' names are the prefix, the scope and the key, as in dedupe_set.lua)
-- ARGV[1] the prefix of the keys that name the job taking a key, ARGV[2] how long those are
--   kept (ms), ARGV[3] after how long (ms) a key whose job was never queued goes to the
--   next job (dedupe_taker_fn.lua), ARGV[4] the scope, ARGV[5] one byte per key, '1' new
--   or '0' seen, ARGV[6..] the keys, then as many job ids, one per key
-- Returns one byte per key: '1' its job takes it (new, or taken over), '0' seen.
-- Invariant: a key goes into a `bloom` filter, and so into its snapshots, only once its
--   taker is noted (dedupe_taker_fn.lua), so a master that dies before queueing the job
--   leaves the key to a resend of that job, and to any job once the note is orphaned, as
--   the filters in Redis do.
local tp, kept, grace, scope, new = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4], ARGV[5]
local n = #new
local out = {}
for i = 1, n do
  local key = ARGV[5 + i]
  if new:byte(i) == 49 or orphaned(tp, scope, key, kept, grace) then
    note_taker(tp, scope, key, ARGV[5 + n + i], kept)
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out)
