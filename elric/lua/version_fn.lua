-- next_version(seq, cur): a periodic job's next "version", one never given before: drawn
-- from the counter ``seq``, and above ``cur`` (a version stored before versions came from it).
local function next_version(seq, cur)
  local v, c = redis.call('INCR', seq), tonumber(cur) or 0
  if v <= c then
    v = c + 1
    redis.call('SET', seq, v)
  end
  return v
end
