-- An order to a worker, written into its hash for its next heartbeat to read.
-- KEYS: workers index, the worker's hash
-- ARGV: worker id, field, value, ...
-- Returns 'ok'; 'gone' for a worker not listed, or listed with its hash expired (lost);
--   'stopped' for one that stopped (it reads no more orders); 'stopping' for one finishing
--   its jobs before it exits, given any order but stop (it would ignore it); 'unchanged'
--   for a pause, resume or stop (one field) that the worker was already given.
-- Invariant: never makes a worker's hash: one made here would have no TTL, and stay.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('EXISTS', KEYS[2]) == 0 then
  return 'gone'
end
local state = redis.call('HGET', KEYS[2], 'state')
if state == 'stopped' then return 'stopped' end
local one = #ARGV == 3 and (ARGV[2] == 'paused' or ARGV[2] == 'stop')
if state == 'stopping' and not (one and ARGV[2] == 'stop') then return 'stopping' end
-- (never asked: not paused, not told to stop)
if one and (redis.call('HGET', KEYS[2], ARGV[2]) or '0') == ARGV[3] then return 'unchanged' end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 'ok'
