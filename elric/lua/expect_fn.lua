-- A function shared by the scripts that must write nothing unless every key they write is
-- of its type (enqueue, dedupe_rbloom, scheduler_fire): a script that fails halfway keeps
-- what it wrote (a job hash read as queued by every resend, bits marking keys of jobs never
-- queued, a fire marked and never kept to be queued).
-- lua.load prepends it to them. A key overwritten outside elric fails the call, named.
local function expect(key, kind)
  local t = redis.call('TYPE', key).ok
  if t ~= 'none' and t ~= kind then
    error(redis.error_reply('WRONGTYPE ' .. key .. ' is a ' .. t .. ' where elric keeps a ' ..
          kind .. ': it was written outside elric; delete or rename it. Nothing was queued'))
  end
end
