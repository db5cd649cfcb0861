-- Functions shared by the scripts that take a job out of line and count it; lua.load
-- prepends this file to them.
-- count_in_stats: one event of a job in its batch's and its func's stats hashes
-- (elric/jobstats.py), given their key prefixes; with `now` (ms) it is their last activity too (`last_at`).
-- `call` (default redis.call) makes the writes (a caller's that leaves a bad key alone).
local function count_in_stats(bp, fp, batch, func, field, now, call)
  call = call or redis.call
  if batch and batch ~= '' then
    call('HINCRBY', bp .. batch, field, 1)
    if now then call('HSET', bp .. batch, 'last_at', now) end
  end
  if func then
    call('HINCRBY', fp .. func, field, 1)
    if now then call('HSET', fp .. func, 'last_at', now) end
  end
end
-- writer(broken): a redis.call that leaves a key of another type (an operator's) alone and
-- adds its name to `broken`: a count must not fail the operation (finish.lua's rule).
local function writer(broken)
  return function(...)
    if not pcall(redis.call, ...) then broken[#broken + 1] = (select(2, ...)) end
  end
end
-- out_of_line(f, qp, lpp, parked, write): the job whose fields f are {status, queue, member,
-- limit_key} leaves its queue (prefix qp) and, if its limit key parked it, that key's parked
-- set (prefix lpp) and its count in the parked counts hash.
local function out_of_line(f, qp, lpp, parked, write)
  if f[2] and f[3] then redis.call('ZREM', qp .. f[2], f[3]) end
  if f[4] and f[3] and redis.call('ZREM', lpp .. f[4], f[3]) == 1 then
    write('HINCRBY', parked, f[2], -1)
  end
end
