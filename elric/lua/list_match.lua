-- The jobs of one stretch of an index that match a list_jobs filter, read in Redis: a
-- filter by func or batch has no index of its own, and reading every job it passes over
-- into the master (a round trip's share and a decode each) made a page take seconds.
-- KEYS: the index (a status index, a queue, or a parked set)
-- ARGV: job prefix, '1' when members are queue members (`{seq:016x}:{id}`) else job ids,
--       start (rank from the newest), entries to look at, matches wanted at most, the status
--       a job must have, then field, value pairs its hash must hold (queue, func, batch)
-- Returns {rank to go on from (-1: the index ended), entries looked at, the last entry
--   looked at ('' for none: a cursor goes on after it, wherever it has moved), matching
--   ids...}
-- Invariant: a job is returned only if its hash holds the status and every value asked
--   for; a status index (not a line) loses the entries of jobs that are gone (expired),
--   as list_jobs drops them where it meets them; a key of another type matches nothing.
local jp, in_line, start = ARGV[1], ARGV[2] == '1', tonumber(ARGV[3])
local count, want, status = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local fields, values = {'status'}, {status}
for a = 7, #ARGV, 2 do
  fields[#fields + 1] = ARGV[a]
  values[#values + 1] = ARGV[a + 1]
end
local members = redis.call('ZREVRANGE', KEYS[1], start, start + count - 1)
local out, looked, gone, last = {}, 0, 0, ''
for _, m in ipairs(members) do
  looked, last = looked + 1, m
  local id = in_line and string.sub(m, 18) or m
  local read, h = pcall(redis.call, 'HMGET', jp .. id, unpack(fields))
  if read then
    if not h[1] and not in_line then
      redis.call('ZREM', KEYS[1], m)
      gone = gone + 1
    else
      local match = true
      for i = 1, #fields do
        if h[i] ~= values[i] then match = false; break end
      end
      if match then
        out[#out + 1] = id
        if #out >= want then break end
      end
    end
  end
end
local nxt = start + looked - gone
if #out < want and #members < count then nxt = -1 end
table.insert(out, 1, last)
table.insert(out, 1, looked)
table.insert(out, 1, nxt)
return out
