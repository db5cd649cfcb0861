-- One ZSCAN page of a job index, and the jobs of it whose hash holds every value a bulk
-- filter asks for, picked in Redis: a walk by func or batch read each job it passed over
-- into the master (a round trip's share and a decode each, seconds for a big store).
-- KEYS: the index (a status index, a queue, or a parked set)
-- ARGV: job prefix, '1' when members are queue members (`{seq:016x}:{id}`) else job ids,
--       the ZSCAN cursor, its COUNT, then field, value pairs (status, queue, func, batch,
--       worker)
-- Returns {next cursor ('0': the index was walked), entries looked at, then per matching
--   job its id and its enqueued_at (nil when unset)}
-- Invariant: reads only; a gone job is passed over; a job key of another type fails the
--   call (WRONGTYPE), as reading it in the master did.
local jp, in_line = ARGV[1], ARGV[2] == '1'
local fields, values = {'enqueued_at', 'status'}, {}   -- no status: the job is gone
for a = 5, #ARGV, 2 do
  fields[#fields + 1] = ARGV[a]
  values[#values + 1] = ARGV[a + 1]
end
local page = redis.call('ZSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local out = {page[1], #page[2] / 2}
for i = 1, #page[2], 2 do
  local id = page[2][i]
  if in_line then id = string.sub(id, 18) end
  local h = redis.call('HMGET', jp .. id, unpack(fields))
  local match = h[2] ~= false
  for f = 1, #values do
    if h[f + 2] ~= values[f] then match = false; break end
  end
  if match then
    out[#out + 1] = id
    out[#out + 1] = h[1]
  end
end
return out
