-- In-master `bloom` dedupe: note the job taking each key a check found new, before the
-- master adds the keys to its filter in memory.
-- KEYS: none (the notes' names are the prefix, the scope and the key, as in dedupe_set.lua)
-- ARGV[1] the prefix of the keys that name the job taking a key, ARGV[2] how long those are
--   kept (ms), ARGV[3] the scope, ARGV[4..] the keys, then as many job ids, one per key
-- Returns the number of keys noted.
-- Invariant: a key goes into a `bloom` filter, and so into its snapshots, only once its
--   taker is noted (dedupe_taker_fn.lua), so a master that dies before queueing the job
--   leaves the key to a resend of that job, as the filters in Redis do.
local tp, kept, scope = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local n = (#ARGV - 3) / 2
for i = 1, n do note_taker(tp, scope, ARGV[3 + i], ARGV[3 + n + i], kept) end
return n
