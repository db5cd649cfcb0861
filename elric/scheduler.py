"""The scheduler: turns due periodic jobs into queued jobs, on exactly one master at a time.

Every master runs a ``Scheduler``; they compete for a lease in Redis (``keys.scheduler_lease``)
and only the holder fires. Taking the lease INCRs ``keys.scheduler_fence``; that token guards
every write, so a master that lost the lease (paused, partitioned) cannot fire anything
afterwards. A fire is marked once, then waits in ``keys.fires_pending`` until queued; a new
leader queues what is pending first, so each fire is queued exactly once. The steps of a
pass: docs/ARCHITECTURE.md, "Periodic jobs".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from functools import lru_cache

from redis.exceptions import ResponseError

from elric import lua
from elric.backoff import Backoff
from elric.clock import RedisClock
from elric.codec import pack, unpack
from elric.health import TaskHealth
from elric.contract import Status, normalize_spec
from elric.jobstore import (FINISHED_TTL, RUNS_KEPT, Coalesce, Options, Outcome, RedisJobStore,
                            fire_id, fired_times, iso)
from elric.logs import Hourly
from elric.queue import Fenced
from elric.retry import Outage, cancel_pending, described, is_outage, unblocked, until
from elric.triggers import build_trigger, next_fire

CATCHUP_LIMIT = 1000        # fires of one job handled (or missed counted) per pass in a backlog
FIRE_MARK_MARGIN = 600      # fire marks outlive the grace window by this (clock skew, slow masters)
FIRE_MARK_TTL_NO_GRACE = 86400
FIRE_MARK_TTL_MAX = 366 * 86400  # a huge grace must not make Redis refuse the mark's ttl
SHORT_WAIT = 0.25           # Redis times out BLPOP only ~10x/s: shorter waits use asyncio.sleep
LONGEST_BLOCK = 2.0         # a BLPOP must answer well inside the clients' socket_timeout (5 s)
FIRE_FIELDS = ("spec", "trigger", "next_run_time", "version", "misfire_grace_time", "coalesce",
               "max_instances")  # the schedule hash fields a pass reads
LIVE = frozenset(s.encode() for s in Status if s.live)
CLOCK_STEP_BACK = 10.0  # a step back of Redis's clock past this (far over latency): _replan
RETRY_LATER = 60.0  # seconds until a job it cannot read, or a scope the filter refused, is retried


@dataclass
class FirePlan:
    """What one pass does with one due periodic job."""

    job_id: str
    version: bytes              # as read; scheduler_fire.lua applies the plan only if unchanged
    next: float | None          # its next run time after this pass (None: finished)
    options: Options = field(default_factory=Options)
    spec: dict = field(default_factory=dict)  # the job spec every fire gets
    # (fire time, outcome, runs record extras), oldest first; max_instances may skip ENQUEUED
    fires: list[tuple[float, Outcome, dict]] = field(default_factory=list)
    retry_at: float | None = None  # not planned: due again then; its next run time is kept
    unrecorded: int = 0  # missed fires past the runs kept: counted in the fire stats only


def _mark_ttl(t: float, grace: float | None, now: float) -> int:
    """Seconds a fire at ``t`` stays marked, marked at ``now``: the grace window and a
    margin past it; a fire ahead of now (it ran while the clock was ahead) until then."""
    if grace is None:
        return min(FIRE_MARK_TTL_MAX, FIRE_MARK_TTL_NO_GRACE + max(0, math.ceil(t - now)))
    return max(60, min(FIRE_MARK_TTL_MAX, math.ceil(t + grace + FIRE_MARK_MARGIN - now)))


def _score(raw) -> float:
    """A zset score as a script returns it (a string; None: the index is empty)."""
    return math.inf if raw is None else float(raw)


def _fire_time(raw) -> float:
    """A stored next run time; ValueError if it is no date (nan, inf, past 9999: it would
    fail the fire script's arguments of every job in the pass)."""
    t = float(raw)
    try:
        iso(t)   # (ValueError for nan)
    except (OverflowError, OSError):
        raise ValueError(f"next_run_time {t!r} is no date") from None
    return t


@lru_cache(maxsize=10_000)  # stored triggers are few and rarely change: parse each once
def _trigger(blob: bytes):
    return build_trigger(unpack(blob))


def _last_until(trigger, after: float, now: float) -> float | None:
    """The last fire time in (after, now], probed back from now in doubling steps."""
    end = getattr(trigger, "end_date", None)   # no fire after it: probe back from there
    now = now if end is None else min(now, end.timestamp())
    span = 1.0
    while True:
        start = max(after, now - span)
        # from `after` itself, the fire after it: a first fire from there is `after`
        probe = next_fire(trigger, after) if start <= after else \
            next_fire(trigger, start, first=True)
        if probe is not None and after < probe <= now:
            while (nxt := next_fire(trigger, probe)) is not None and nxt <= now:
                probe = nxt  # few steps: nothing fires in the last span/2
            return probe
        if start <= after:
            return None
        span *= 2


class Scheduler:
    """Fires due periodic jobs while this master holds the scheduler lease."""

    batch_size = 500  # due jobs read, planned and marked per Lua call

    def __init__(self, redis, keys, store: RedisJobStore, enqueue, *, master_id: str,
                 lease_seconds: float = 10.0, clock: RedisClock | None = None) -> None:
        self.redis, self.keys, self.store, self.enqueue = redis, keys, store, enqueue
        self.master_id, self.log = master_id, logging.getLogger("elric.scheduler")
        self.clock = clock or RedisClock(redis)  # what is due is judged by Redis's clock
        self.lease_seconds = lease_seconds
        self._lease_ms = max(1, int(lease_seconds * 1000))
        self.is_leader, self.token = False, None  # token: the fence token while leading
        self._lease_keys = [keys.scheduler_lease, keys.scheduler_fence]
        self._acquire_s, self._renew_s, self._release_s, self._due_s = (
            lua.load(redis, f"scheduler_{name}") for name in ("acquire", "renew", "release", "due"))
        self._fire_s = lua.load(redis, "scheduler_fire", "version_fn", "expect_fn")
        self._filtered_s = lua.load(redis, "scheduler_filtered")
        self._warn_hourly = Hourly(self.log)   # (key: a job, and why)
        self._stop, self._leader, self._done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._done.set()  # run() is not running (each run makes fresh events)
        self._lease_wait = lease_seconds / 3  # shorter when the holder's lease runs out sooner
        self.passes = 0  # due-reads so far: a spinning scheduler shows here and in the debug log
        self.health = TaskHealth(stale_after=2 * lease_seconds + 5)
        self._pending = True  # fires marked but maybe not queued: look on taking the lease
        # (monotonic) when to look again at fires left pending by a scope the filter refused
        self._retry_pending = math.inf
        self._queueing = Outage(self.log, "queueing fires failed; they stay pending and are "
                                     "tried again")
        self._synced: tuple[float, float] | None = None  # Redis's time and monotonic's
        self._stepped_back = 0.0   # seconds Redis's clock stepped back, not yet replanned

    # --- lease ---------------------------------------------------------------------------
    async def _acquire(self, again: bool = False) -> bool:
        got, value = await self._acquire_s(keys=self._lease_keys,
                                           args=[self.master_id, self._lease_ms])
        if not got:  # retry right when the holder's lease runs out, at the latest
            self._lease_wait = min(self.lease_seconds / 3, max(value, 1) / 1000 + 0.005)
            return False
        self.is_leader, self.token = True, int(value)
        self._pending = True   # the last leader may have died between marking and queueing
        self._lease_wait = self.lease_seconds / 3
        self._leader.set()
        self.log.info("master %s %s (fence token %s)", self.master_id,
                      "re-acquired its own scheduler lease, which Redis had lost (restarted?) "
                      "or let run out" if again else "schedules now", self.token)
        return True

    async def _renew(self) -> bool:
        return bool(await self._renew_s(keys=self._lease_keys,
                                        args=[self.master_id, self._lease_ms, self.token]))

    def _step_down(self, why: str, level: int = logging.WARNING) -> None:
        if self.is_leader:
            self.log.log(level, "master %s stops scheduling: %s", self.master_id, why)
        self.is_leader, self.token = False, None
        self._leader.clear()

    async def _release(self) -> None:
        if self.token is not None:
            await self._release_s(keys=self._lease_keys, args=[self.master_id, self.token])
        self._step_down("released the lease", logging.INFO)

    async def _lease_loop(self) -> None:
        outage = Outage(self.log, "scheduler lease: renew/acquire failed")
        while not self._stop.is_set():
            _raise_if_cancelled()
            try:
                # not renewed: another master holds it, or nobody does (lost, ran out): take it
                if self.is_leader and not await self._renew() \
                        and not await self._acquire(again=True):
                    self._step_down("lease taken over by another master")
                if not self.is_leader:
                    await self._acquire()
                await self._now()   # this machine's clock may have jumped; Redis's too
                outage.passed()
                if not self.is_leader:
                    self.health.progress("following: another master schedules")
            except Exception as exc:  # Redis hiccup: the fence still guards every fire
                self.health.trouble(f"lease: {described(exc)}; retrying")
                outage.failed(exc)
            await until(self._stop, self._lease_wait)

    # --- firing --------------------------------------------------------------------------
    async def tick(self) -> int:
        """One pass: take the lease if free, fire everything due now; returns fires enqueued."""
        if not self.is_leader and not await self._acquire():
            return 0
        return (await self._fire_due())[0]

    async def _fire_due(self) -> tuple[int, float]:
        """Fire everything due; returns (fires enqueued, index head score in ms)."""
        total, head = 0, math.inf
        if (self._pending or time.monotonic() >= self._retry_pending) and self.is_leader:
            total += await self._queue_pending()
        while self.is_leader:
            now = await self._now()
            if self._stepped_back:
                await self._replan(now)
            self.passes += 1
            self.log.debug("scheduler pass %d at %s", self.passes, iso(now))
            args = [repr(now * 1000.0), self.batch_size, self.keys.schedule(""), self.keys.job(""),
                    self.keys.round(""), *FIRE_FIELDS]
            try:
                reply = await self._due_s(keys=[self.keys.schedules, self.keys.fires_pending],
                                          args=args)
            except ResponseError as exc:   # (its reads of one job's keys are guarded)
                if "WRONGTYPE" not in str(exc) or not await self._reindex():
                    raise
                continue
            if len(reply) == 1:  # nothing due: the reply is the head score
                return total, _score(reply[0])
            rows = [reply[i:i + 3] for i in range(1, len(reply), 3)]
            fired, head = await self._fire_batch(rows, now)
            total += fired
            if len(rows) < self.batch_size:
                break
        return total, head

    async def _now(self) -> float:
        """Redis's time now (synced); a step back of it (NTP correcting a clock that ran
        ahead, a failover to a host behind) is noted for ``_replan``."""
        now, at = await self.clock.sync(), time.monotonic()
        if self._synced is not None:
            back = self._synced[0] + (at - self._synced[1]) - now
            if back > CLOCK_STEP_BACK:
                self._stepped_back = max(self._stepped_back, back)
        self._synced = (now, at)
        return now

    async def _replan(self, now: float) -> None:
        """After Redis's clock stepped back, next run times planned while it ran ahead would
        fire nothing until it caught up: move each back to its trigger's next fire, past the
        fires that ran meanwhile (``_keep_marks`` keeps them marked, so none runs twice)."""
        # (a step the lease loop sees meanwhile is looked at by the next pass)
        back, self._stepped_back, moved, cursor = self._stepped_back, 0.0, 0, 0
        try:
            while True:
                cursor, rows = await self.redis.zscan(self.keys.schedules, cursor,
                                                      count=self.batch_size)
                for job_id, score in rows:
                    if not now * 1000.0 < score < math.inf:   # due anyway, or paused
                        continue
                    try:
                        await self._keep_marks(job_id.decode(), now)
                        moved += await self.store.replan(job_id.decode(), now)
                    except Exception as exc:
                        if is_outage(exc):
                            raise
                        # stored data it cannot read: a pass names it when it is due
                if cursor == 0:
                    break
        except Exception:   # (Redis away) the whole look again, at the next pass
            self._stepped_back = max(self._stepped_back, back)
            raise
        self.log.warning("scheduler: Redis's clock stepped back %.0fs; moved the next run "
                         "times of %d periodic job(s) planned while it ran ahead back to "
                         "their triggers' next fires", back, moved)

    async def _keep_marks(self, job_id: str, now: float) -> None:
        """Mark again, until the clock is past them, the fires its runs record as fired ahead
        of ``now``: their marks (for the grace window) expire before the clock is back."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.lrange(self.keys.schedule_runs(job_id), 0, -1)
        pipe.hget(self.keys.schedule(job_id), "misfire_grace_time")
        runs, grace = await pipe.execute(raise_on_error=False)
        for reply in (runs, grace):
            if isinstance(reply, Exception) and is_outage(reply):
                raise reply   # a refusal (BUSY, LOADING): the look waits for Redis
        if isinstance(runs, Exception) or isinstance(grace, Exception):
            return   # (a key of another type, an operator's write: replan names none)
        grace = None if grace in (None, b"") else float(grace)
        ahead = [t for t in fired_times(runs) if t >= now]
        for t in ahead:
            pipe.set(self.keys.fire(fire_id(job_id, t)), "1", ex=_mark_ttl(t, grace, now))
        if ahead:
            await pipe.execute()

    def _plan(self, job_id: str, row: list, now: float) -> FirePlan:
        """Which due fire times of one job are missed, run, coalesced or skipped."""
        if not isinstance(row, list):  # scheduler_due.lua could not read a key of it
            raise ValueError(row.decode(errors="replace"))
        h = dict(zip(FIRE_FIELDS, row))
        if all(v is None for v in row):  # an index entry without its hash: the script drops it
            return FirePlan(job_id, b"", None)
        if missing := [name for name, v in h.items() if v is None]:  # HDEL, a partial restore
            raise ValueError(f"its hash has no {', '.join(missing)}")
        # checked here, where bad stored data is caught: else it fails every fire queued with it
        spec = normalize_spec(unpack(h["spec"]))
        options, trigger = Options.from_hash(h), _trigger(h["trigger"])
        grace, policy = options.misfire_grace_time, options.coalesce
        horizon = -math.inf if grace is None else now - grace
        t, more, late = _fire_time(h["next_run_time"]), "", []
        while t is not None and t < horizon:  # too late to run: missed
            if len(late) == CATCHUP_LIMIT:  # counted enough; jump to the grace window
                more = "more than "
                t = next_fire(trigger, horizon, first=True)
                t = None if t is not None and t < horizon else t  # a date trigger's one fire
                break
            late.append(t)
            t = next_fire(trigger, t)
        # those past the runs kept are counted (the metric of missed fires), not recorded
        missed, unrecorded = late[:RUNS_KEPT], max(0, len(late) - RUNS_KEPT)
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
        if missed:
            self.log.warning("periodic job %s: %s%d fire(s) missed the %ss misfire grace time",
                             job_id, more, len(late), grace)
        fires = [(m, Outcome.MISSED, {"reason": "late"}) for m in missed]
        if len(due) > 1 and policy is Coalesce.SKIP:
            fires += [(d, Outcome.SKIPPED, {"reason": "coalesce"}) for d in due]
        elif len(due) > 1 and policy is Coalesce.LATEST:
            fires.append((due[-1], Outcome.ENQUEUED, {"coalesced": len(due) - 1}))
        else:
            fires += [(d, Outcome.ENQUEUED, {}) for d in due]
        return FirePlan(job_id, h["version"], t, options, spec, fires, unrecorded=unrecorded)

    def _job_args(self, plan: FirePlan, live: list[str], now: float, specs: dict):
        """The keys and argv scheduler_fire.lua takes for one plan (see its header). A fire
        that max_instances leaves room for gets its spec put in ``specs``, its id in ``live``."""
        job_id, nxt, grace = plan.job_id, plan.next, plan.options.misfire_grace_time
        keys, entries = [self.keys.schedule(job_id), self.keys.schedule_runs(job_id)], []
        for t, outcome, extra in plan.fires:
            fid, ttl = fire_id(job_id, t), 0
            if outcome is Outcome.ENQUEUED and len(live) >= plan.options.max_instances:
                outcome, extra = Outcome.SKIPPED, {"reason": "max_instances"}
                # a round no worker takes (its queue or module served by none) holds it
                self._warn_hourly(f"{job_id} max_instances", "periodic job %s: fire %s "
                                  "skipped: max_instances is %d, and these rounds are still "
                                  "queued or running: %s", job_id, fid,
                                  plan.options.max_instances, ", ".join(live))
            elif outcome is Outcome.ENQUEUED:
                ttl = _mark_ttl(t, grace, now)
                live.append(fid)
                keys.append(self.keys.fire(fid))
                specs[fid] = {**plan.spec, "job_id": fid, "schedule": job_id,
                              "fire_time": t}
            record = {"fire_time": t, "job_id": fid, "outcome": outcome, "at": now, **extra}
            kind = {Outcome.ENQUEUED: "f", Outcome.MISSED: "m", Outcome.SKIPPED: "s"}[outcome]
            entries += [kind, fid, ttl, pack(record),
                        pack(specs[fid]) if outcome is Outcome.ENQUEUED else ""]
        due = nxt if plan.retry_at is None else plan.retry_at
        return keys, [job_id, plan.version, "" if due is None else repr(due * 1000.0),
                      "" if nxt is None else repr(nxt), iso(nxt), pack(live), plan.unrecorded,
                      len(plan.fires), *entries]

    async def _fire_batch(self, rows: list[list], now: float) -> tuple[int, float]:
        """Plan, mark and enqueue the fires of ``rows`` (job_id, hash fields, its recent fires
        with their statuses); returns (fires enqueued, index head score in ms)."""
        keys = [*self._lease_keys, self.keys.schedules, self.keys.fires_pending,
                self.keys.fire_stats, self.keys.seq]
        token = self.token   # the lease may be lost while this pass awaits Redis
        if token is None:
            return 0, math.inf
        argv: list = [self.master_id, token, RUNS_KEPT, FINISHED_TTL, len(rows)]
        specs: dict[str, dict] = {}
        for job_id, row, statuses in rows:
            await asyncio.sleep(0)  # a backlog's plans take long: the lease renews meanwhile
            job_id = job_id.decode()
            # its recent rounds with a job still queued or running: what max_instances counts
            live = [statuses[i].decode() for i in range(0, len(statuses), 2)
                    if statuses[i + 1] in LIVE]
            try:
                plan = self._plan(job_id, row, now)
            except Exception:  # bad stored data must not stall every other job
                self.log.exception("periodic job %s: cannot compute its fires; retrying in "
                                   "%gs", job_id, RETRY_LATER)
                # the retry moves the index only: its next run time, if a number, is kept
                version, kept = b"", now + RETRY_LATER
                with contextlib.suppress(KeyError, TypeError, ValueError):
                    h = dict(zip(FIRE_FIELDS, row)) if isinstance(row, list) else {}
                    version = h["version"] or b""   # (none: as a key it could not read)
                    kept = _fire_time(h["next_run_time"])
                plan = FirePlan(job_id, version, kept, retry_at=now + RETRY_LATER)
            job_keys, job_argv = self._job_args(plan, live, now, specs)
            keys += job_keys
            argv += job_argv
        try:
            result = await self._fire_s(keys=keys, args=argv)
        except Exception:  # it may have run with its reply lost: its fires wait in pending
            self._pending = True
            raise
        if result[0] == 0:
            why = await self._why_not_leader() if self.token == token else ""
            if self.token != token:  # took again by this master (look again now), or lost
                return 0, 0.0
            self._step_down(why)
            return 0, math.inf
        head, accepted = _score(result[1]), [specs[f.decode()] for f in result[2:]]
        return await self._queue_fires(accepted, token), head

    async def _why_not_leader(self) -> str:
        """Why the fire script found the lease or the fence not this master's: a lone
        master whose renewals Redis refused (full, a replica) was told another held it."""
        try:
            # (at most a second: a master no longer leader must not think itself one longer)
            holder = await asyncio.wait_for(self.redis.get(self.keys.scheduler_lease), 1.0)
        except Exception:   # (Redis away again, a key of another type: the short reason)
            return "fence moved on: the lease is no longer its own"
        if holder is None:
            return ("its lease ran out (not renewed within SCHEDULER_LEASE: Redis away or "
                    "refusing writes?); it takes it again when it can")
        if holder.decode(errors="replace") == self.master_id:
            return "fence moved on: another master held the lease meanwhile"
        return f"master {holder.decode(errors='replace')} holds the lease"

    async def _queue_fires(self, fires: list[dict], token: int | None,
                           recovered: bool = False) -> int:
        """Queue fires marked under the fence ``token``; those not queued stay pending."""
        if not fires or token is None:
            return 0
        try:
            queued = await self._enqueue_apart(fires, token, recovered)
        except Fenced:  # they stay pending; a token of this master's own queues them
            if self.token == token:
                self._step_down("enqueue refused the fence token")
            return 0
        except Exception as exc:  # Redis away past retries: the next pass queues them
            self._pending = True
            self._queueing.failed(exc)
            return 0
        self._queueing.passed()
        if len(queued) < len(fires):   # a scope the filter refused: pending, tried again
            self._retry_pending = min(self._retry_pending, time.monotonic() + RETRY_LATER)
        if dropped := {s.job_id for s in queued if s.status == Status.FILTERED}:
            try:
                await self._filtered([f for f in fires if f["job_id"] in dropped])
            except Exception:   # still pending (max_instances counts them): look again
                self._pending = True
                raise
        return len(queued) - len(dropped)

    async def _enqueue_apart(self, fires: list[dict], token: int, recovered: bool) -> list:
        """``self.enqueue`` of ``fires``; refused for a key of one (an operator's write), each
        fire alone, so that one stays pending, named, and holds back no other."""
        try:
            return await self.enqueue(fires, token, recovered=recovered)
        except Exception as exc:
            if len(fires) == 1 or isinstance(exc, Fenced) or is_outage(exc):
                raise
        queued = []
        for fire in fires:   # (recovered: the call refused may have taken their dedupe keys)
            try:
                queued += await self.enqueue([fire], token, recovered=True)
            except Exception as exc:
                if isinstance(exc, Fenced) or is_outage(exc):
                    raise
                self._pending = True
                self._warn_hourly(f"{fire['schedule']} unqueued", "periodic job %s: fire %s "
                                  "cannot be queued (%s); it stays pending and is tried again "
                                  "each pass", fire["schedule"], fire["job_id"], exc,
                                  level=logging.ERROR)
        return queued

    async def _filtered(self, fires: list[dict]) -> None:
        """Fires the dedupe filter dropped: no longer pending, recorded ``filtered``, and
        logged (a dedupe key its fires share drops every fire after the first)."""
        pipe = self.redis.pipeline(transaction=False)
        for f in fires:
            pipe.lrange(self.keys.schedule_runs(f["schedule"]), 0, -1)
        keys, argv = [self.keys.fires_pending, self.keys.fire_stats], []
        for f, runs in zip(fires, await pipe.execute(raise_on_error=False)):
            old = next((r for r in runs if _run_of(r) == f["job_id"]), b"") \
                if isinstance(runs, list) else b""   # (an error: a key of another type)
            keys.append(self.keys.schedule_runs(f["schedule"]))
            argv += [f["job_id"], old, pack({**unpack(old), "outcome": Outcome.FILTERED,
                                             "reason": "dedupe_key"}) if old else b""]
        taken = {f.decode() for f in await self._filtered_s(keys=keys, args=argv)}
        for f in (f for f in fires if f["job_id"] in taken):   # (else: another master's)
            self._warn_hourly(f["schedule"], "periodic job %s: fire %s filtered, not run: its "
                              "dedupe_key %r was seen in scope %r; a key every fire shares "
                              "drops them all (dedupe_scope \"@fire\" gives each fire a scope "
                              "of its own)", f["schedule"], f["job_id"], f.get("dedupe_key"),
                              f.get("dedupe_scope"))

    async def _reindex(self) -> bool:
        """Rebuild the schedules index, overwritten with another type, from the periodic
        jobs' hashes (else none would fire again); False if its type is right."""
        kind = (await self.redis.type(self.keys.schedules)).decode()
        if kind in ("zset", "none"):
            return False
        prefix, index = self.keys.schedule(""), {}
        match = "".join("\\" + c if c in "*?[]\\" else c for c in prefix) + "*"
        found = [key async for key in self.redis.scan_iter(match=match, count=self.batch_size,
                                                            _type="hash")]
        pipe = self.redis.pipeline(transaction=False)
        for key in found:
            pipe.hmget(key, "paused", "next_run_time")
        for key, row in zip(found, await pipe.execute()):
            if not row[1]:   # gone, or finished
                continue
            try:
                score = math.inf if row[0] == b"1" else _fire_time(row[1]) * 1000.0
            except ValueError:   # no date: due now, where the pass names it
                score = 0.0
            index[key[len(prefix.encode()):]] = score
        # in one step: a rebuild cut short leaves the old key (rebuilt later), not a short zset
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.schedules)
            if index:
                pipe.zadd(self.keys.schedules, index)
            await pipe.execute()
        self.log.error("scheduler: %s was overwritten with a %s (elric keeps a zset there: "
                       "find what wrote it); deleted it and rebuilt it from the %d periodic "
                       "jobs' hashes", self.keys.schedules, kind, len(index))
        return True

    async def _queue_pending(self) -> int:
        """Queue the fires marked by a leader that died or failed before queueing them."""
        # a look again at fires a refused scope holds: their refusal was said (hourly)
        said, self._pending, self._retry_pending = self._pending, False, math.inf
        total, cursor = 0, 0
        try:
            while self.is_leader:
                try:
                    cursor, found = await self.redis.hscan(self.keys.fires_pending, cursor,
                                                           count=self.batch_size)
                except ResponseError as exc:
                    if "WRONGTYPE" not in str(exc):
                        raise
                    # no fire of elric's is there, and none is marked while it is: all would stop
                    self.log.error("scheduler: %s was overwritten with another type; deleted "
                                   "it", self.keys.fires_pending)
                    await self.redis.delete(self.keys.fires_pending)
                    break
                if found:
                    if said and self._queueing.kind is None:   # (else: its trouble's)
                        self.log.warning("queueing %d fire(s) marked but not queued before",
                                         len(found))
                    total += await self._queue_fires(await self._readable(found),
                                                     self.token, recovered=True)
                if cursor == 0:
                    break
        except Exception:  # not all were looked at: look again next pass
            self._pending = True
            raise
        return total

    async def _readable(self, found: dict) -> list[dict]:
        """The fire specs among pending entries; one that is none (written by hand) is
        dropped, named: else it fails the enqueue of every fire beside it, pass after pass."""
        specs, bad = [], []
        for fid, raw in found.items():
            try:
                spec = unpack(raw)
                if not isinstance(spec, dict) or spec.get("job_id") != fid.decode():
                    raise ValueError("not the spec of this fire")
                # a job spec (as _plan checks it) plus what _job_args adds for the fire
                spec |= normalize_spec({k: v for k, v in spec.items()
                                        if k not in ("schedule", "fire_time")})
            except Exception as exc:
                self.log.error("fire %s pending in %s cannot be read (%s); dropped, it does "
                               "not run", fid.decode(errors="replace"), self.keys.fires_pending,
                               exc or type(exc).__name__)
                bad.append(fid)
                continue
            specs.append(spec)
        if bad:
            await self.redis.hdel(self.keys.fires_pending, *bad)
        return specs

    # --- loop ----------------------------------------------------------------------------
    async def _sleep(self, timeout: float) -> None:
        """Until ``timeout`` passes or a wake token arrives (a sooner job was added)."""
        if timeout < SHORT_WAIT:
            await asyncio.sleep(timeout)  # cheaper than waiting on the stop event; short anyway
            return
        # end early: Redis may time a BLPOP out ~100 ms late; a longer wait is several BLPOPs
        timeout = min(timeout - 0.15, LONGEST_BLOCK)
        try:
            woke = await self.redis.blpop([self.keys.scheduler_wake], timeout=timeout)
        except ResponseError as exc:   # it holds only tokens: one of another type is replaced
            if unblocked(exc):   # (a failover: the pass that follows meets the refusal)
                return
            if "WRONGTYPE" not in str(exc):
                raise
            self.log.warning("scheduler: %s was overwritten with another type; deleted it",
                             self.keys.scheduler_wake)
            woke = True
        if woke:
            await self.redis.delete(self.keys.scheduler_wake)  # tokens pushed later stay

    async def run(self) -> None:
        """Until ``stop()``: hold or wait for the lease; while leader, fire due jobs on time."""
        self._stop, self._leader, self._done = asyncio.Event(), asyncio.Event(), asyncio.Event()
        lease_task = asyncio.create_task(self._lease_loop())
        backoff = Backoff(0.1, max(0.1, self.lease_seconds / 3))
        outage = Outage(self.log, "scheduler pass failed")
        try:
            while not self._stop.is_set():
                _raise_if_cancelled()
                if not self.is_leader:
                    await until(self._leader, self.lease_seconds / 3)
                    continue
                try:
                    _, head = await self._fire_due()
                    self.health.progress(f"scheduling (fence token {self.token})")
                    delay = head / 1000.0 - self.clock()
                    if delay > 0 and not self._stop.is_set() and self.is_leader:
                        await self._sleep(min(delay, self.lease_seconds / 3))
                    backoff.reset()
                    outage.passed()   # after the wait too: a pass and its wait are one try
                except Exception as exc:  # Redis away: try again soon, less often meanwhile
                    self.health.trouble(f"pass: {described(exc)}; retrying")
                    outage.failed(exc)
                    await until(self._stop, backoff.next())
        finally:
            lease_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await lease_task
            with contextlib.suppress(Exception):
                await self._release()
            self._done.set()

    async def stop(self) -> None:
        """Stop ``run()`` and release the lease if held."""
        if self._done.is_set():  # not running
            await self._release()
            return
        self._stop.set()
        self._leader.set()  # a follower waiting for leadership looks at the stop flag now
        if self.is_leader:  # our own BLPOP is the one waiting: end it now
            await self.redis.lpush(self.keys.scheduler_wake, b"stop")
        await until(self._done, self.lease_seconds)


def _run_of(record: bytes) -> str | None:
    """The fire id a runs list entry records; None for one that is no run record (written
    by hand, a bad restore): it must not fail the recording of every fire after it."""
    try:
        run = unpack(record)
    except Exception:   # (msgpack: ValueErrors; a map with a list for a key: TypeError)
        return None
    return run.get("job_id") if isinstance(run, dict) else None


def _raise_if_cancelled() -> None:
    """End a loop whose task's cancel a redis-py call swallowed (it ended the call normally):
    it would run for good, and its master never exit."""
    if cancel_pending():
        raise asyncio.CancelledError
