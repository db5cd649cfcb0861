-- Run a finished job again, from attempt 0.
-- KEYS: the job's hash, seq, counters, queues
-- ARGV: queue prefix, wake prefix, status index prefix, job_id, round prefix, round ttl (s),
--       batch stats prefix, func stats prefix
-- Returns the status the job had; an error 'NOJOB' when there is none, 'LIVE <status>'
-- when it has not finished, or 'NOQUEUE' when its `queue` field is missing; 'WRONGTYPE
-- <key> ...' (expect_fn), before any write, for its queue, its status index, the counters,
-- the queues set or seq.
-- Invariant: only a succeeded, failed or cancelled job is queued again; its result, error,
-- timings and redeliveries go. A job of a round counts in the round again (its round is
-- live again), and as submitted again in its func's and batch's stats (their last submit:
-- `last_at`) and in the counters (also its queue's, with its `last_at`; the queue is listed
-- again).
local qp, wp, sp, now, id = ARGV[1], ARGV[2], ARGV[3], now_ms(), ARGV[4]
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return redis.error_reply('NOJOB') end
if status ~= 'failed' and status ~= 'succeeded' and status ~= 'cancelled' then
  return redis.error_reply('LIVE ' .. status)
end
-- no queue, or a key written below of another type (or seq that INCR fails on), would
-- fail the rerun after some of the writes below (expect_fn)
local queue = redis.call('HGET', KEYS[1], 'queue')
if not queue then return redis.error_reply('NOQUEUE') end
expect(qp .. queue, 'zset'); expect(sp .. status, 'zset'); expect(KEYS[3], 'hash')
expect(KEYS[4], 'set')
if not_integer(KEYS[2]) then expect(KEYS[2], 'number') end
redis.call('ZREM', sp .. status, id)
local round = redis.call('HGET', KEYS[1], 'round')
if round then
  redis.call('HINCRBY', ARGV[5] .. round, 'submitted', 1)
  redis.call('EXPIRE', ARGV[5] .. round, ARGV[6])
end
local job = redis.call('HMGET', KEYS[1], 'batch', 'func', 'queue')
count_in_stats(ARGV[7], ARGV[8], job[1], job[2], 'submitted', now)
redis.call('HINCRBY', KEYS[3], 'submitted', 1)
redis.call('HINCRBY', KEYS[3], 'queue:' .. job[3] .. ':submitted', 1)
redis.call('HSET', KEYS[3], 'queue:' .. job[3] .. ':last_at', now)
redis.call('PERSIST', KEYS[1])
redis.call('HSET', KEYS[1], 'attempts', 0, 'enqueued_at', now)   -- new children (job.py)
redis.call('HDEL', KEYS[1], 'started_at', 'finished_at', 'result', 'error', 'retry_at',
           'duration_ms', 'redelivered', 'redelivered_at', 'lost_worker', 'suspect')
requeue(KEYS[1], id, qp, wp, KEYS[2], false, KEYS[4])
return status
