-- The status of each job named, in one call (a batch of resent children can be large).
-- KEYS: none
-- ARGV: job prefix, then job ids
-- Returns per id its status, or false when there is no such job.
-- Invariant: reads only.
local out = {}
for i = 2, #ARGV do
  out[#out + 1] = redis.call('HGET', ARGV[1] .. ARGV[i], 'status')
end
return out
