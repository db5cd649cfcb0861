-- Read the due head of the schedules index, with what the scheduler needs to plan fires.
-- KEYS: the schedules index, the pending fires.
-- ARGV: now (ms), limit, schedule hash prefix (keys.schedule("")), job hash prefix
--       (keys.job("")), round prefix (keys.round("")), then the hash fields to read.
-- Returns {head score} when nothing is due (false: the index is empty), else
--   {false, then per due job: job_id, {field values}, {fire id, its round's status, ...}
--   for each fire id in its "recent" list (what max_instances counts)}. A round's status
--   is 'running' while any job of it (the fire or a descendant) has not ended, else its
--   fire job's status ('' when gone; 'queued' while the fire is marked but not yet queued:
--   it will run, so max_instances counts it). A job whose keys cannot be read (one holds
--   another type) has, instead of its field values, the error naming that key.
-- Invariant: reads only; hash keys are the given prefixes plus ids read from Redis.
local limit = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit)
if #ids == 0 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {head[2] or false}
end
local at  -- the key being read: named when reading it fails (an operator wrote another type)
local function read(id)
  at = ARGV[3] .. id
  local row = redis.call('HMGET', at, unpack(ARGV, 6))
  local statuses = {}
  local recent = redis.call('HGET', at, 'recent')
  if recent and #recent > 1 then
    local ok, fires = pcall(cmsgpack.unpack, recent)
    if ok and type(fires) == 'table' then
      for _, fid in ipairs(fires) do
        if type(fid) == 'string' then
          statuses[#statuses+1] = fid
          at = ARGV[4] .. fid
          local status = redis.call('HGET', at, 'status')
          if not status then
            status = redis.call('HEXISTS', KEYS[2], fid) == 1 and 'queued' or ''
          end
          at = ARGV[5] .. fid
          local n = redis.call('HMGET', at, 'submitted', 'succeeded', 'failed', 'removed')
          local live = (tonumber(n[1]) or 0) - (tonumber(n[2]) or 0) - (tonumber(n[3]) or 0)
                       - (tonumber(n[4]) or 0)
          if live > 0 then status = 'running' end
          statuses[#statuses+1] = status
        end
      end
    end
  end
  return row, statuses
end
local out = {false}
for _, id in ipairs(ids) do
  local ok, row, statuses = pcall(read, id)
  if not ok then  -- one job's unreadable key must not stop every other job
    row, statuses = at .. ': ' .. (type(row) == 'table' and row.err or tostring(row)), {}
  end
  out[#out+1] = id
  out[#out+1] = row
  out[#out+1] = statuses
end
return out
