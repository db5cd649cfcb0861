"""The scheduler: turns due periodic jobs into queued jobs, on exactly one master at a time.

Every master runs a ``Scheduler``; they compete for a lease in Redis (``keys.scheduler_lease``,
renewed every lease/3) and only the holder fires. Taking the lease INCRs
``keys.scheduler_fence``; that token guards every write, so a master that lost the lease
(paused, partitioned) cannot fire anything afterwards.

The leader sleeps until the next due time with BLPOP on ``keys.scheduler_wake`` (the job
store pushes a token there when a job becomes the soonest, from any master). Each pass
reads at most ``batch_size`` due jobs (lua/scheduler_due.lua), works out in Python which
fires to enqueue (misfire grace, coalescing, max_instances: a ``FirePlan`` per job), then
lua/scheduler_fire.lua checks lease and fence, marks each fire once (SET NX), records runs,
moves next run times and returns the new head of the index (how long to sleep). Only the
fires that script accepted are handed to the ``enqueue`` callback.

At most once: a fire is marked before it is enqueued. A master that dies between the script
and the callback loses those fires; enqueueing first would instead risk a duplicate run
whenever the marking failed afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import lru_cache

from elric import lua
from elric.codec import pack, unpack
from elric.contract import Status
from elric.jobstore import FINISHED_TTL, Coalesce, Outcome, RedisJobStore, iso
from elric.queue import Fenced
from elric.retry import Backoff
from elric.triggers import build_trigger, next_fire

CATCHUP_LIMIT = 1000        # fires of one job handled per pass when catching up a backlog
FIRE_MARK_MARGIN = 600      # fire marks outlive the grace window by this (clock skew, slow masters)
FIRE_MARK_TTL_NO_GRACE = 86400
SHORT_WAIT = 0.25           # Redis times out BLPOP only ~10x/s: shorter waits use asyncio.sleep
# The schedule hash fields a pass reads, in the order _plan unpacks them ("recent" last:
# scheduler_due.lua reads the statuses of the fires it lists).
FIRE_FIELDS = (b"spec", b"trigger", b"next_run_time", b"version", b"misfire_grace_time",
               b"coalesce", b"max_instances", b"recent")
LIVE = frozenset(s.encode() for s in Status if s.live)


@dataclass
class FirePlan:
    """What one pass does with one due periodic job."""

    job_id: str
    version: bytes              # as read; scheduler_fire.lua applies the plan only if unchanged
    recent: list[str]           # ids of its last fires; the live ones count for max_instances
    next: float | None          # its next run time after this pass (None: finished)
    spec_b: bytes = b""         # the job spec (msgpack) every fire gets
    grace: float | None = None
    max_instances: int = 1
    missed: list[float] = field(default_factory=list)   # too late for the grace time
    run: list[float] = field(default_factory=list)      # to enqueue if max_instances allows
    dropped: list[float] = field(default_factory=list)  # not run: coalesce "skip"
    coalesced: int = 0                                   # due fires folded into those run


def _score(raw) -> float:
    """A zset score as a script returns it (a string; false/None: the index is empty)."""
    return math.inf if raw is None or raw is False else float(raw)


def fire_id(job_id: str, fire_time: float) -> str:
    """``site@2026-03-29T00:30:00Z``: one id per periodic job and fire time."""
    dt = datetime.fromtimestamp(fire_time, timezone.utc)
    frac = f".{dt.microsecond:06d}" if dt.microsecond else ""
    return f"{job_id}@{dt:%Y-%m-%dT%H:%M:%S}{frac}Z"


@lru_cache(maxsize=10_000)
def _trigger(blob: bytes):
    # stored triggers are few and rarely change: parse each once, not once per fire
    return build_trigger(unpack(blob))


def _last_until(trigger, after: float, now: float) -> float | None:
    """The last fire time in (after, now], found by probing back from now in doubling steps
    (O(log backlog)) instead of stepping through the whole backlog."""
    span = 1.0
    while True:
        start = max(after, now - span)
        probe = next_fire(trigger, start, first=True)
        if probe is not None and after < probe <= now:
            while (nxt := next_fire(trigger, probe)) is not None and nxt <= now:
                probe = nxt  # few steps: nothing fires in the last span/2
            return probe
        if start <= after:
            return None
        span *= 2


async def _wait(event: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, timeout))


class Scheduler:
    """Fires due periodic jobs while this master holds the scheduler lease."""

    batch_size = 500  # due jobs read, planned and marked per Lua call

    def __init__(self, redis, keys, store: RedisJobStore, enqueue, *, master_id: str,
                 lease_seconds: float = 10.0, clock=time.time,
                 log=logging.getLogger("elric.scheduler")) -> None:
        self.redis, self.keys, self.store, self.enqueue = redis, keys, store, enqueue
        self.master_id = master_id
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self.clock = clock
        self.log = log
        self.is_leader = False
        self.token: int | None = None
        self._lease_keys = [keys.scheduler_lease, keys.scheduler_fence]
        self._acquire_s = lua.load(redis, "scheduler_acquire")
        self._renew_s = lua.load(redis, "scheduler_renew")
        self._release_s = lua.load(redis, "scheduler_release")
        self._due_s = lua.load(redis, "scheduler_due")
        self._fire_s = lua.load(redis, "scheduler_fire")
        self._stop: asyncio.Event | None = None
        self._leader: asyncio.Event | None = None
        self._done: asyncio.Event | None = None
        self._lease_wait = lease_seconds / 3

    # --- lease ---------------------------------------------------------------------------
    async def _acquire(self) -> bool:
        got, value = await self._acquire_s(keys=self._lease_keys, args=[self.master_id, self._lease_ms])
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
        return bool(await self._renew_s(keys=self._lease_keys,
                                        args=[self.master_id, self._lease_ms, self.token]))

    def _step_down(self, why: str, level: int = logging.WARNING) -> None:
        if self.is_leader:
            self.log.log(level, "master %s stops scheduling: %s", self.master_id, why)
        self.is_leader, self.token = False, None
        if self._leader:
            self._leader.clear()

    async def _release(self) -> None:
        if self.token is not None:
            await self._release_s(keys=self._lease_keys, args=[self.master_id, self.token])
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
            await _wait(self._stop, self._lease_wait if not self.is_leader else self.lease_seconds / 3)

    # --- firing --------------------------------------------------------------------------
    async def tick(self) -> int:
        """One pass: take the lease if free, fire everything due now; returns fires enqueued."""
        if not self.is_leader and not await self._acquire():
            return 0
        return (await self._fire_due())[0]

    async def _fire_due(self) -> tuple[int, float]:
        """Fire everything due; returns (fires enqueued, index head score in ms)."""
        total, head = 0, math.inf
        while self.is_leader:
            now = self.clock()
            reply = await self._due_s(keys=[self.keys.schedules],
                                      args=[repr(now * 1000.0), self.batch_size,
                                            self.keys.schedule(""), self.keys.job(""), *FIRE_FIELDS])
            if len(reply) == 1:  # nothing due: the reply is the head score
                return total, _score(reply[0])
            rows = [(reply[i].decode(), reply[i + 1], reply[i + 2]) for i in range(1, len(reply), 3)]
            fired, head = await self._fire_batch(rows, now)
            total += fired
            if len(rows) < self.batch_size:
                break
        return total, head

    def _plan(self, job_id: str, row: list, now: float) -> FirePlan:
        """Which due fire times of one job are missed, run, coalesced or skipped."""
        spec_b, trig_b, nrt, version, grace_b, coalesce_b, max_b, recent_b = row
        if spec_b is None:  # an index entry without its hash: scheduler_fire.lua drops it
            return FirePlan(job_id, b"", [], None)
        trigger, policy = _trigger(trig_b), Coalesce(coalesce_b.decode())
        plan = FirePlan(job_id, version, unpack(recent_b) or [], None, spec_b,
                        None if grace_b in (None, b"") else float(grace_b), int(max_b))
        horizon = -math.inf if plan.grace is None else now - plan.grace
        t, more = float(nrt), ""
        while t is not None and t < horizon:  # too late to run: recorded as missed
            if len(plan.missed) == self.store.runs_kept:  # enough to show; jump to the grace window
                more = "more than "
                t = next_fire(trigger, horizon, first=True)
                t = None if t is not None and t < horizon else t  # a date trigger's one fire
                break
            plan.missed.append(t)
            t = next_fire(trigger, t)
        due: list[float] = []
        while t is not None and t <= now and len(due) < CATCHUP_LIMIT:
            due.append(t)
            t = next_fire(trigger, t)
        if t is not None and t <= now and policy is not Coalesce.ALL:
            # a longer backlog (large or no grace): only its end matters for latest/skip
            last = _last_until(trigger, due[-1], now)
            if last is not None:
                due.append(last)
                t = next_fire(trigger, last)
        if plan.missed:
            self.log.warning("periodic job %s: %s%d fire(s) missed the %ss misfire grace time",
                             job_id, more, len(plan.missed), plan.grace)
        if len(due) <= 1 or policy is Coalesce.ALL:
            plan.run = due
        elif policy is Coalesce.LATEST:
            plan.run = due[-1:]
        else:
            plan.dropped = due
        plan.coalesced = len(due) - len(plan.run) - len(plan.dropped)
        plan.next = t
        return plan

    def _entries(self, plan: FirePlan, live: list[str], now: float):
        """The plan's run records, oldest first, as (kind, fire id, mark ttl, record) with kind
        "f" for a fire to mark and enqueue; plus the specs of those fires and the new recent."""
        entries, specs = [], {}
        room = plan.max_instances - len(live)

        def record(t, outcome, ttl=0, **extra):
            fid = fire_id(plan.job_id, t)
            kind = "f" if outcome is Outcome.ENQUEUED else "r"
            entries.append((kind, fid, ttl, pack({"fire_time": t, "job_id": fid, "outcome": outcome,
                                                  "at": now, **extra})))
            return fid

        for t in plan.missed:
            record(t, Outcome.MISSED, reason="late")
        for t in plan.dropped:
            record(t, Outcome.SKIPPED, reason="coalesce")
        for t in plan.run:
            if room <= 0:
                record(t, Outcome.SKIPPED, reason="max_instances")
                continue
            room -= 1
            ttl = (FIRE_MARK_TTL_NO_GRACE if plan.grace is None
                   else max(60, math.ceil(t + plan.grace + FIRE_MARK_MARGIN - now)))
            extra = {"coalesced": plan.coalesced} if plan.coalesced else {}
            fid = record(t, Outcome.ENQUEUED, ttl, **extra)
            live = [*live, fid]
            specs[fid] = {**unpack(plan.spec_b), "job_id": fid, "schedule": plan.job_id, "fire_time": t}
        return entries, specs, live

    async def _fire_batch(self, rows: list[tuple[str, list, list]], now: float) -> tuple[int, float]:
        """Plan, mark and enqueue the fires of ``rows`` (job_id, hash fields, recent fire
        statuses); returns (fires enqueued, index head score in ms)."""
        plans, status = [], {}
        for job_id, row, statuses in rows:
            status.update((statuses[i].decode(), statuses[i + 1]) for i in range(0, len(statuses), 2))
            try:
                plans.append(self._plan(job_id, row, now))
            except Exception:  # bad stored data must not stall every other job
                self.log.exception("periodic job %s: cannot compute its fires; retrying in 60s", job_id)
                plans.append(FirePlan(job_id, row[3], unpack(row[7]) or [], now + 60))

        keys = [*self._lease_keys, self.keys.schedules]
        argv: list = [self.master_id, self.token, self.store.runs_kept, FINISHED_TTL, len(plans)]
        specs: dict[str, dict] = {}
        for p in plans:
            live = [fid for fid in p.recent if status.get(fid) in LIVE] if p.run else p.recent
            entries, job_specs, recent = self._entries(p, live, now)
            specs.update(job_specs)
            keys += [self.keys.schedule(p.job_id), self.keys.schedule_runs(p.job_id)]
            keys += [self.keys.fire(e[1]) for e in entries if e[0] == "f"]
            nxt = p.next
            argv += [p.job_id, p.version, "" if nxt is None else repr(nxt * 1000.0),
                     "" if nxt is None else repr(nxt), iso(nxt), pack(recent), len(entries)]
            for e in entries:
                argv += e
        result = await self._fire_s(keys=keys, args=argv)
        if not result or result[0] == 0:
            self._step_down("fence moved on: another master holds the lease")
            return 0, math.inf
        head = _score(result[1])
        accepted = [specs[f.decode()] for f in result[2:]]
        if not accepted:
            return 0, head
        lost = ", ".join(s["job_id"] for s in accepted)  # marked, so never enqueued again
        try:
            await self.enqueue(accepted, self.token)
        except Fenced:
            self._step_down("enqueue refused the fence token")
            self.log.error("fires lost (fenced while enqueueing): %s", lost)
        except Exception:
            self.log.exception("enqueue failed; fires lost: %s", lost)
        else:
            return len(accepted), head
        return 0, head

    # --- loop ----------------------------------------------------------------------------
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
        backoff = Backoff(0.1, max(0.1, self.lease_seconds / 3))
        try:
            while not self._stop.is_set():
                if not self.is_leader:
                    await _wait(self._leader, self.lease_seconds / 3)
                    continue
                try:
                    _, head = await self._fire_due()
                    delay = head / 1000.0 - self.clock()
                    if delay > 0 and not self._stop.is_set() and self.is_leader:
                        await self._sleep(min(delay, self.lease_seconds / 3))
                    backoff.reset()
                except Exception:  # Redis away: try again soon, less often while it stays away
                    self.log.exception("scheduler pass failed")
                    await _wait(self._stop, backoff.next())
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
        await _wait(self._done, self.lease_seconds)
