-- now_ms(): Redis's clock, in ms. Leases, backoffs and enqueue times are judged by it
-- alone, so a master or worker whose own clock is off neither steals nor delays jobs.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
