"""The scheduler: turns due periodic jobs into queued jobs, on exactly one master at a time.

Every master runs a ``Scheduler``; they compete for a lease in Redis (``keys.scheduler_lease``,
renewed every lease/3) and only the holder fires. Taking the lease INCRs
``keys.scheduler_fence``; that token guards every write, so a master that lost the lease
(paused, partitioned) cannot fire anything afterwards.

The leader sleeps until the next due time with BLPOP on ``keys.scheduler_wake`` (the job
store pushes a token there when a job becomes the soonest, from any master). Each pass
reads at most ``batch_size`` due jobs from the head of ``keys.schedules``, their hashes and
the status of their recent fires in one script, works out in Python which fires to enqueue
(misfire grace, coalescing, max_instances), then one Lua script per batch checks lease +
fence, marks each fire once (``SET keys.fire(fire_id) NX``), records runs, moves the next
run times and returns the new head of the index (so no extra read is needed to know how long
to sleep). Only the fires that script accepted are handed to the ``enqueue`` callback.

Ordering (at-most-once): a fire is marked before it is enqueued. A master that dies between
the script and the callback loses those fires (they are never enqueued twice); enqueueing
first would instead risk a duplicate run whenever the marking step failed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from datetime import datetime, timezone

from elric.contract import LIVE_STATUSES
from elric.jobstore import FINISHED_TTL, Coalesce, RedisJobStore, iso, pack, unpack
from elric.triggers import build_trigger

UTC = timezone.utc
CATCHUP_LIMIT = 1000        # fires of one job handled per pass when catching up a backlog
FIRE_MARK_MARGIN = 600      # fire marks outlive the grace window by this (clock skew, slow masters)
FIRE_MARK_TTL_NO_GRACE = 86400
SHORT_WAIT = 0.25           # Redis times out BLPOP only ~10x/s: shorter waits use asyncio.sleep
_FIRE_FIELDS = (b"spec", b"trigger", b"next_run_time", b"version", b"misfire_grace_time",
                b"coalesce", b"max_instances", b"recent")
_LIVE = frozenset(s.encode() for s in LIVE_STATUSES)

# KEYS: schedules. ARGV: now (ms), limit, schedule hash prefix, job hash prefix, fields...
# The due head of the index with each job's fields and the status of each fire in its
# "recent" list (for max_instances), in one round trip.
# -> {head score (only when nothing is due; false when the index is empty), then per due
#     job: job_id, {field values}, {fire id, status ('' when gone), ...}}
_DUE = """
local limit = tonumber(ARGV[2])
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit)
if #ids == 0 then
  local head = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {head[2] or false}
end
local out = {false}
for _, id in ipairs(ids) do
  local row = redis.call('HMGET', ARGV[3] .. id, unpack(ARGV, 5))
  local statuses = {}
  local recent = row[#ARGV - 4]  -- the last field asked for is "recent"
  if recent and #recent > 1 then
    local ok, fires = pcall(cmsgpack.unpack, recent)
    if ok and type(fires) == 'table' then
      for _, fid in ipairs(fires) do
        if type(fid) == 'string' then
          statuses[#statuses+1] = fid
          statuses[#statuses+1] = redis.call('HGET', ARGV[4] .. fid, 'status') or ''
        end
      end
    end
  end
  out[#out+1] = id
  out[#out+1] = row
  out[#out+1] = statuses
end
return out
"""
# KEYS: lease, fence. ARGV: master id, lease ms. -> {1, fence token} or {0, lease pttl}
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) or redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {1, redis.call('INCR', KEYS[2])}
end
return {0, redis.call('PTTL', KEYS[1])}
"""
# KEYS: lease, fence. ARGV: master id, lease ms, token. Renew only our own, current lease.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[3] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] and redis.call('GET', KEYS[2]) == ARGV[2] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# KEYS: lease, fence, schedules, then per job: hash, runs, one fire key per fire entry.
# ARGV: master id, token, runs kept, finished ttl, job count, then per job: job_id, version,
#   score ("" = finished), next_run_time, next_run_iso, recent, entry count, then per entry:
#   kind ("f" fire / "r" record), fire id, mark ttl, run blob.
# A job whose version moved since it was read is left alone (re-read on the next pass).
# -> {0} when fenced, else {1, head score of the index afterwards (false: empty), accepted
#    fire ids...}
_FIRE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] or redis.call('GET', KEYS[2]) ~= ARGV[2] then return {0} end
local out, a, k, keep = {1, false}, 6, 4, tonumber(ARGV[3])
for _ = 1, tonumber(ARGV[5]) do
  local job_id, version, score = ARGV[a], ARGV[a+1], ARGV[a+2]
  local nrt, nri, recent, n = ARGV[a+3], ARGV[a+4], ARGV[a+5], tonumber(ARGV[a+6])
  local hash, runs = KEYS[k], KEYS[k+1]
  a, k = a + 7, k + 2
  local ok = redis.call('HGET', hash, 'version') == version
  local pushed = false
  for _ = 1, n do
    if ARGV[a] == 'f' then
      if ok and redis.call('SET', KEYS[k], '1', 'NX', 'EX', ARGV[a+2]) then
        out[#out+1] = ARGV[a+1]
        redis.call('LPUSH', runs, ARGV[a+3])
        pushed = true
      end
      k = k + 1
    elseif ok then
      redis.call('LPUSH', runs, ARGV[a+3])
      pushed = true
    end
    a = a + 4
  end
  if ok then
    if pushed then redis.call('LTRIM', runs, 0, keep - 1) end
    redis.call('HSET', hash, 'next_run_time', nrt, 'next_run_iso', nri, 'recent', recent,
               'version', tonumber(version) + 1)
    if score == '' then
      redis.call('ZREM', KEYS[3], job_id)
      redis.call('EXPIRE', hash, ARGV[4])
      redis.call('EXPIRE', runs, ARGV[4])
    else
      redis.call('ZADD', KEYS[3], score, job_id)
    end
  end
end
out[2] = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')[2] or false
return out
"""
_DROP_ORPHAN = """
if redis.call('EXISTS', KEYS[1]) == 0 then return redis.call('ZREM', KEYS[2], ARGV[1]) end
return 0
"""


class Fenced(RuntimeError):
    """The fencing token is stale: another master holds the scheduler lease now."""


def _is_fenced(exc: BaseException) -> bool:
    # The queue module may define its own Fenced; match by name to stay decoupled.
    return any(c.__name__ == "Fenced" for c in type(exc).__mro__)


def _score(raw) -> float:
    """A zset score as a script returns it (a string; false/None: the index is empty)."""
    if raw is None or raw is False:
        return math.inf
    return float(raw)


def fire_id(job_id: str, fire_time: float) -> str:
    """``site@2026-03-29T00:30:00Z``: one id per periodic job and fire time."""
    dt = datetime.fromtimestamp(fire_time, UTC)
    frac = f".{dt.microsecond:06d}" if dt.microsecond else ""
    return f"{job_id}@{dt:%Y-%m-%dT%H:%M:%S}{frac}Z"


def _next_after(trigger, t: float) -> float | None:
    dt = datetime.fromtimestamp(t, UTC)
    nxt = trigger.get_next_fire_time(dt, dt)
    return None if nxt is None else nxt.timestamp()


def _first_from(trigger, t: float) -> float | None:
    nxt = trigger.get_next_fire_time(None, datetime.fromtimestamp(t, UTC))
    return None if nxt is None else nxt.timestamp()


def _last_until(trigger, after: float, now: float) -> float | None:
    """The last fire time in (after, now], found by probing back from now in doubling steps
    (O(log backlog)) instead of stepping through the whole backlog."""
    span = 1.0
    while True:
        start = max(after, now - span)
        probe = _first_from(trigger, start)
        if probe is not None and after < probe <= now:
            while (nxt := _next_after(trigger, probe)) is not None and nxt <= now:
                probe = nxt  # few steps: nothing fires in the last span/2
            return probe
        if start <= after:
            return None
        span *= 2


class Scheduler:
    """Fires due periodic jobs while this master holds the scheduler lease."""

    batch_size = 500  # due jobs read, planned and marked per Lua call

    def __init__(self, redis, keys, store: RedisJobStore, enqueue, *, master_id: str,
                 lease_seconds: float = 10.0, clock=time.time,
                 log=logging.getLogger("elric.scheduler")) -> None:
        self.redis, self.keys, self.store, self.enqueue = redis, keys, store, enqueue
        self.master_id = master_id
        self.lease_seconds = lease_seconds
        self.clock = clock
        self.log = log
        self.is_leader = False
        self.token: int | None = None
        self._triggers: dict[bytes, object] = {}
        self._acquire_s = redis.register_script(_ACQUIRE)
        self._renew_s = redis.register_script(_RENEW)
        self._release_s = redis.register_script(_RELEASE)
        self._due_s = redis.register_script(_DUE)
        self._fire_s = redis.register_script(_FIRE)
        self._orphan_s = redis.register_script(_DROP_ORPHAN)
        self._stop: asyncio.Event | None = None
        self._leader: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._lease_wait = lease_seconds / 3
        self._head: float | None = None  # index head score (ms) the last pass saw; None: unknown

    # --- lease ---------------------------------------------------------------------------
    @property
    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    async def _acquire(self) -> bool:
        got, value = await self._acquire_s(keys=[self.keys.scheduler_lease, self.keys.scheduler_fence],
                                           args=[self.master_id, self._lease_ms])
        if not got:  # retry right when the holder's lease runs out, at the latest
            self._lease_wait = min(self.lease_seconds / 3, max(value, 1) / 1000 + 0.005)
            return False
        self.is_leader, self.token = True, int(value)
        self._lease_wait = self.lease_seconds / 3
        if self._leader:
            self._leader.set()
        self.log.info("master %s schedules now (fence token %s)", self.master_id, self.token)
        return True

    async def _renew(self) -> bool:
        return bool(await self._renew_s(keys=[self.keys.scheduler_lease, self.keys.scheduler_fence],
                                        args=[self.master_id, self._lease_ms, self.token]))

    def _step_down(self, why: str, level: int = logging.WARNING) -> None:
        if self.is_leader:
            self.log.log(level, "master %s stops scheduling: %s", self.master_id, why)
        self.is_leader, self.token = False, None
        if self._leader:
            self._leader.clear()

    async def _release(self) -> None:
        if self.token is not None:
            await self._release_s(keys=[self.keys.scheduler_lease, self.keys.scheduler_fence],
                                  args=[self.master_id, self.token])
        self._step_down("released the lease", logging.INFO)

    async def _lease_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.is_leader and not await self._renew():
                    self._step_down("lease taken over")
                if not self.is_leader:
                    await self._acquire()
            except Exception:  # Redis hiccup: the fence still guards every fire
                self.log.exception("scheduler lease: renew/acquire failed")
            await self._wait(self._stop, self._lease_wait if not self.is_leader else self.lease_seconds / 3)

    # --- firing --------------------------------------------------------------------------
    def _trigger(self, blob: bytes):
        trigger = self._triggers.get(blob)
        if trigger is None:
            if len(self._triggers) > 10000:
                self._triggers.clear()
            trigger = self._triggers[blob] = build_trigger(unpack(blob))
        return trigger

    async def tick(self) -> int:
        """One pass: take the lease if free, fire everything due now; returns fires enqueued."""
        if not self.is_leader and not await self._acquire():
            return 0
        return await self._fire_due()

    async def _fire_due(self) -> int:
        total = 0
        self._head = None
        while self.is_leader:
            now = self.clock()
            reply = await self._due_s(keys=[self.keys.schedules],
                                      args=[repr(now * 1000.0), self.batch_size,
                                            self.keys.schedule(""), self.keys.job(""), *_FIRE_FIELDS])
            if len(reply) == 1:  # nothing due: the reply is the head score
                self._head = _score(reply[0])
                break
            rows = [(reply[i].decode(), reply[i + 1], reply[i + 2]) for i in range(1, len(reply), 3)]
            total += await self._fire_batch(rows, now)
            if len(rows) < self.batch_size:
                break
        return total

    def _plan(self, job_id: str, row: list, now: float) -> dict:
        """Which due fire times of one job are missed, run, coalesced or skipped."""
        spec_b, trig_b, nrt, version, grace_b, coalesce_b, max_b, recent_b = row
        trigger = self._trigger(trig_b)
        grace = None if grace_b in (None, b"") else float(grace_b)
        policy = Coalesce(coalesce_b.decode())
        horizon = -math.inf if grace is None else now - grace
        t = float(nrt)
        missed: list[float] = []
        more = ""
        while t is not None and t < horizon:  # too late to run: recorded as missed
            if len(missed) == self.store.runs_kept:  # enough to show; jump to the grace window
                more = "more than "
                t = _first_from(trigger, horizon)
                t = None if t is not None and t < horizon else t
                break
            missed.append(t)
            t = _next_after(trigger, t)
        due: list[float] = []
        while t is not None and t <= now and len(due) < CATCHUP_LIMIT:
            due.append(t)
            t = _next_after(trigger, t)
        if t is not None and t <= now and policy is not Coalesce.ALL:
            # a longer backlog (large or no grace): only its end matters for latest/skip
            last = _last_until(trigger, due[-1], now)
            if last is not None:
                due.append(last)
                t = _next_after(trigger, last)
        if missed:
            self.log.warning("periodic job %s: %s%d fire(s) missed the %ss misfire grace time",
                             job_id, more, len(missed), grace)
        if len(due) <= 1 or policy is Coalesce.ALL:
            run, dropped = due, []
        elif policy is Coalesce.LATEST:
            run, dropped = due[-1:], []
        else:
            run, dropped = [], due
        return {"job_id": job_id, "version": version, "spec_b": spec_b, "grace": grace,
                "max_instances": int(max_b), "recent": unpack(recent_b) or [],
                "missed": missed, "run": run, "dropped": dropped, "coalesced": len(due) - len(run) - len(dropped),
                "next": t}

    def _entries(self, plan: dict, live: list[str], now: float):
        """Run records for one job, oldest first (missed < due); fires get an "f" entry and a spec."""
        job_id, grace = plan["job_id"], plan["grace"]
        entries, specs, fired = [], {}, []
        room = plan["max_instances"] - len(live)

        def record(kind, t, outcome, ttl=0, **extra):
            fid = fire_id(job_id, t)
            run = {"fire_time": t, "job_id": fid, "outcome": outcome, "at": now, **extra}
            entries.append((kind, fid, ttl, pack(run)))
            return fid

        for t in plan["missed"]:
            record("r", t, "missed", reason="late")
        for t in plan["dropped"]:
            record("r", t, "skipped", reason="coalesce")
        for t in plan["run"]:
            if room <= 0:
                record("r", t, "skipped", reason="max_instances")
                continue
            room -= 1
            ttl = FIRE_MARK_TTL_NO_GRACE if grace is None else max(60, math.ceil(t + grace + FIRE_MARK_MARGIN - now))
            extra = {"coalesced": plan["coalesced"]} if plan["coalesced"] else {}
            fid = record("f", t, "enqueued", ttl, **extra)
            fired.append(fid)
            specs[fid] = {**unpack(plan["spec_b"]), "job_id": fid, "schedule": job_id, "fire_time": t}
        return entries, specs, live + fired

    async def _fire_batch(self, rows: list[tuple[str, list, list]], now: float) -> int:
        """Plan, mark and enqueue the fires of ``rows`` (job_id, hash fields, recent fire statuses)."""
        self._head = None
        plans = []
        status: dict[str, bytes] = {}
        for job_id, row, statuses in rows:
            for i in range(0, len(statuses), 2):
                status[statuses[i].decode()] = statuses[i + 1]
            if row[0] is None:  # index entry without its hash: drop it
                await self._orphan_s(keys=[self.keys.schedule(job_id), self.keys.schedules], args=[job_id])
                continue
            try:
                plans.append(self._plan(job_id, row, now))
            except Exception:  # bad stored data must not stall every other job
                self.log.exception("periodic job %s: cannot compute its fires; retrying in 60s", job_id)
                plans.append({"job_id": job_id, "version": row[3], "missed": [], "run": [], "dropped": [],
                              "recent": unpack(row[7]) or [], "next": now + 60, "bad": True})

        keys = [self.keys.scheduler_lease, self.keys.scheduler_fence, self.keys.schedules]
        argv: list = [self.master_id, self.token, self.store.runs_kept, FINISHED_TTL, len(plans)]
        specs: dict[str, dict] = {}
        for p in plans:
            if p.get("bad"):
                entries, recent = [], p["recent"]
            else:
                live = [fid for fid in p["recent"] if status.get(fid) in _LIVE] if p["run"] else p["recent"]
                entries, job_specs, recent = self._entries(p, live, now)
                specs.update(job_specs)
            nxt = p["next"]
            keys += [self.keys.schedule(p["job_id"]), self.keys.schedule_runs(p["job_id"])]
            keys += [self.keys.fire(e[1]) for e in entries if e[0] == "f"]
            argv += [p["job_id"], p["version"], "" if nxt is None else repr(nxt * 1000.0),
                     "" if nxt is None else repr(nxt), iso(nxt), pack(recent), len(entries)]
            for e in entries:
                argv += list(e)
        result = await self._fire_s(keys=keys, args=argv)
        if not result or result[0] == 0:
            self._step_down("fence moved on: another master holds the lease")
            return 0
        self._head = _score(result[1])
        accepted = [specs[f.decode()] for f in result[2:]]
        if not accepted:
            return 0
        try:
            await self.enqueue(accepted, self.token)
        except Exception as exc:
            # Marked but not enqueued: lost (at-most-once), and said so.
            lost = ", ".join(s["job_id"] for s in accepted)
            if _is_fenced(exc):
                self._step_down("enqueue refused the fence token")
                self.log.error("fires lost (fenced while enqueueing): %s", lost)
                return 0
            self.log.exception("enqueue failed; fires lost: %s", lost)
            return 0
        return len(accepted)

    # --- loop ----------------------------------------------------------------------------
    @staticmethod
    async def _wait(event: asyncio.Event, timeout: float) -> None:
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, timeout))

    async def _next_delay(self) -> float:
        """Seconds until the soonest job is due: from the last pass, or read now."""
        head, self._head = self._head, None
        if head is None:
            rows = await self.redis.zrange(self.keys.schedules, 0, 0, withscores=True)
            head = rows[0][1] if rows else math.inf
        return math.inf if math.isinf(head) else head / 1000.0 - self.clock()

    async def _sleep(self, timeout: float) -> None:
        """Until ``timeout`` passes or a wake token arrives (a sooner job was added)."""
        if timeout < SHORT_WAIT:
            await asyncio.sleep(timeout)  # cheaper than waiting on the stop event; short anyway
            return
        # end the BLPOP a little early: Redis may time it out up to ~100 ms late
        if await self.redis.blpop([self.keys.scheduler_wake], timeout=timeout - 0.15):
            await self.redis.delete(self.keys.scheduler_wake)  # tokens pushed later stay

    async def run(self) -> None:
        """Until ``stop()``: hold or wait for the lease; while leader, fire due jobs on time."""
        self._stop, self._leader, self._done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        lease_task = asyncio.create_task(self._lease_loop())
        try:
            while not self._stop.is_set():
                if not self.is_leader:
                    await self._wait(self._leader, self.lease_seconds / 3)
                    continue
                try:
                    await self._fire_due()
                    delay = await self._next_delay()
                except Exception:
                    self.log.exception("scheduler pass failed")
                    await self._wait(self._stop, 1.0)
                    continue
                if delay > 0 and not self._stop.is_set() and self.is_leader:
                    await self._sleep(min(delay, self.lease_seconds / 3))
        finally:
            lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease_task
            with contextlib.suppress(Exception):
                await self._release()
            self._done.set()

    async def stop(self) -> None:
        """Stop ``run()`` and release the lease if held."""
        if self._stop is None or self._done.is_set():
            await self._release()
            return
        self._stop.set()
        self._leader.set()  # a follower waiting for leadership looks at the stop flag now
        if self.is_leader:  # our own BLPOP is the one waiting: end it now
            await self.redis.lpush(self.keys.scheduler_wake, b"stop")
        await self._wait(self._done, self.lease_seconds)
