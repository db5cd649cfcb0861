-- Functions shared by the scripts that must write nothing unless every key they write is
-- of its type (enqueue, dedupe_rbloom, scheduler_fire, requeue_due, fetch, rerun, release,
-- finish): a script that fails halfway keeps what it wrote (a job hash read as queued by
-- every resend, bits marking keys of jobs never queued, a fire marked and never kept to be
-- queued, a job out of its due set or queue that nothing puts back). lua.load prepends it
-- to them.
-- mistyped(key, kind): key holds another type (written outside elric).
local function mistyped(key, kind)
  local t = redis.call('TYPE', key).ok
  return t ~= 'none' and t ~= kind
end
-- not_integer(key): key holds what INCR fails on (read only: a check on each housekeeping
-- pass must not write).
local function not_integer(key)
  local t = redis.call('TYPE', key).ok
  if t == 'none' then return false end
  local v = t == 'string' and redis.call('GET', key)
  return not (v and #v < 19 and string.match(v, '^-?%d+$'))
end
-- expect(key, kind): a key overwritten outside elric fails the call, named.
local function expect(key, kind)
  if mistyped(key, kind) then
    -- (a string, level 0: Redis 6.2 fails on an error_reply table raised with error())
    error('WRONGTYPE ' .. key .. ' is a ' .. redis.call('TYPE', key).ok ..
          ' where elric keeps a ' .. kind .. ': it was written outside elric; delete or ' ..
          'rename it. Nothing was queued', 0)
  end
end
-- refused(err): the error of a write a pcall caught is Redis refusing writes for a while
-- (a replica, a failed snapshot, maxmemory): the whole call's, not its key's. The caller
-- makes the call again without pcall, which raises it as Redis words it. (Redis 6.2 gives
-- "=[C]: -1: -READONLY ...", 7 "READONLY ...".)
local function refused(err)
  local msg = type(err) == 'table' and err.err or err
  if type(msg) ~= 'string' then return false end
  for _, code in ipairs({'READONLY', 'MISCONF', 'OOM', 'NOREPLICAS', 'MASTERDOWN'}) do
    if string.find(' ' .. msg, '[%s%-]' .. code .. ' ') then return true end
  end
  return false
end
