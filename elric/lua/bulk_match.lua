-- One ZSCAN page of a job index, and the jobs of it whose hash holds every value a bulk
-- filter asks for, picked in Redis: a walk by func or batch read each job it passed over
-- into the master (a round trip's share and a decode each, seconds for a big store).
-- KEYS: the index (a status index, a queue, or a parked set)
-- ARGV: job prefix, '1' when members are queue members (`{seq:016x}:{id}`) else job ids,
--       the ZSCAN cursor, its COUNT, then field, value pairs (status, queue, func, batch,
--       worker)
-- Returns {next cursor ('0': the index was walked), entries looked at, the number of jobs
--   whose key holds another type, their ids, then per matching job its id and its
--   enqueued_at (nil when unset)}
-- Invariant: reads only; a gone job is passed over; a job key of another type (an
--   operator's) is named apart, never picked (its fields cannot be told), and stops no other.
local jp, in_line = ARGV[1], ARGV[2] == '1'
local fields, values = {'enqueued_at', 'status'}, {}   -- no status: the job is gone
for a = 5, #ARGV, 2 do
  fields[#fields + 1] = ARGV[a]
  values[#values + 1] = ARGV[a + 1]
end
local page = redis.call('ZSCAN', KEYS[1], ARGV[3], 'COUNT', ARGV[4])
local head, picked = {page[1], #page[2] / 2, 0}, {}
for i = 1, #page[2], 2 do
  local id = page[2][i]
  if in_line then id = string.sub(id, 18) end
  local h = redis.pcall('HMGET', jp .. id, unpack(fields))
  if h.err and string.sub(h.err, 1, 9) ~= 'WRONGTYPE' then return h end
  local match = not h.err and h[2] ~= false
  if h.err then
    head[3] = head[3] + 1
    head[#head + 1] = id
  end
  for f = 1, #values do
    if h[f + 2] ~= values[f] then match = false; break end
  end
  if match then
    picked[#picked + 1] = id
    picked[#picked + 1] = h[1]
  end
end
for i = 1, #picked do head[#head + 1] = picked[i] end
return head
