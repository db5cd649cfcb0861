-- An order to a worker, written into its hash for its next heartbeat to read.
-- KEYS: workers index, the worker's hash
-- ARGV: worker id, field, value, ...
-- Returns 'ok'; 'gone' for a worker not listed, or listed with its hash expired (lost);
--   'stopped' for one that stopped (it reads no more orders).
-- Invariant: never makes a worker's hash: one made here would have no TTL, and stay.
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('EXISTS', KEYS[2]) == 0 then
  return 'gone'
end
if redis.call('HGET', KEYS[2], 'state') == 'stopped' then return 'stopped' end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
return 'ok'
