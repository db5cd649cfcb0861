"""The periodic-job store: schedules kept in Redis so they survive master restarts.

One hash per periodic job (``keys.schedule(job_id)``, laid out by ``StoredJob.to_hash``).
``keys.schedules`` indexes job_id -> next run time (ms); the scheduler reads only its due
head, so a fire costs the same however many jobs are stored. Paused jobs score +inf (never
due, still listed); finished ones leave the index and their hash expires after
``FINISHED_TTL``. Every write bumps the hash's ``version`` and is compare-and-set on it
(lua/jobstore_put.lua), so the store and the scheduler's fire script never overwrite each other.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum

from redis.exceptions import ResponseError

from elric import lua
from elric.backoff import Backoff
from elric.codec import pack, unpack
from elric.contract import SPEC_KEYS, Status
from elric.retry import error_code, is_outage
from elric.triggers import TriggerError, build_trigger, next_fire, parse_trigger

FINISHED_TTL = 86400            # seconds a finished job (no next fire) stays visible to get()
# seconds a removed job's rounds still count against max_instances if its id is added again
ROUNDS_LEFT_TTL = 7 * 86400
WRITE_RETRIES = 20
RUNS_KEPT = 20                  # run records kept per periodic job (scheduler_fire.lua trims)
# Spec keys that configure the schedule rather than each fired job.
SCHEDULE_OPTIONS = ("trigger", "replace_existing", "misfire_grace_time", "coalesce",
                    "max_instances")
# The fired job's hash fields (keys.job; times in ms) read to show a run's outcome and duration.
JOB_STATUS_FIELDS = (b"status", b"duration_ms", b"started_at", b"finished_at")
# The schedule hash fields ``list`` reads.
LIST_FIELDS = (b"func", b"queue", b"trigger", b"trigger_text", b"next_run_time", b"paused")


def round_progress(counts: dict) -> dict:
    """A round's counters (a Redis hash) as jobs queued or running, succeeded, failed."""
    n = {k.decode(): int(v) for k, v in counts.items()}
    ended = n.get("succeeded", 0) + n.get("failed", 0) + n.get("removed", 0)
    # (a hash that expired and came back holds only later counts: never below 0 live)
    return {"submitted": n.get("submitted", 0), "live": max(0, n.get("submitted", 0) - ended),
            "succeeded": n.get("succeeded", 0), "failed": n.get("failed", 0)}


class Coalesce(StrEnum):
    """What to do when several fires of one job are due at once (the scheduler missed some)."""

    LATEST = "latest"  # run once, for the latest due fire
    ALL = "all"        # run every due fire
    SKIP = "skip"      # run none of them; wait for the next future fire


class Outcome(StrEnum):
    """What the scheduler did with one fire time, as the job's runs history records it."""

    ENQUEUED = "enqueued"  # marked and queued; get() shows the queued job's status instead
    MISSED = "missed"      # later than the misfire grace time
    SKIPPED = "skipped"    # coalesced away (coalesce "skip") or over max_instances
    FILTERED = "filtered"  # marked, then dropped by the dedupe filter: its key was seen


class ScheduleError(ValueError):
    """A refused job-store operation; the message says what to change."""


class UnreadableSchedule(ScheduleError):
    """A periodic job whose stored data cannot be read (``exc``: what reading it raised); the
    message names the job and what to do, so one bad schedule does not hide the others."""

    def __init__(self, job_id: str, exc: Exception) -> None:
        self.job_id, self.why = job_id, _why(exc)
        super().__init__(f"periodic job {job_id!r}: its stored data cannot be read ({self.why}"
                         f"): remove it (elric schedules remove {job_id}) and add it again")

    def view(self) -> dict:
        """Its ``get`` map, named unreadable with what to do: it fails no other job's read."""
        return {"job_id": self.job_id, "status": Status.SCHEDULED, "trigger": None,
                "trigger_text": "", "next_run_time": None, "next_run_iso": "", "runs": [],
                "unreadable": self.why, "error": str(self)}


class IdTaken(Exception):
    """A one-off job has the id a new periodic job was given: nothing is stored, and the
    id is answered with that job's ``status``, as for any id that exists."""

    def __init__(self, status: str) -> None:
        super().__init__(status)
        self.status = status


def iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def fire_id(job_id: str, fire_time: float) -> str:
    """``site@2026-03-29T00:30:00Z``: one id per periodic job and fire time."""
    return f"{job_id}@{iso(fire_time).removesuffix('+00:00')}Z"


def _float_or_none(raw: bytes | None) -> float | None:
    return None if raw in (None, b"") else float(raw)


def _status(paused: bool, next_run_time: float | None) -> str:
    """A periodic job's status: paused, scheduled, or finished (no fire is left)."""
    return "paused" if paused else (Status.SCHEDULED if next_run_time is not None
                                    else "finished")


@dataclass
class Options:
    """How a periodic job's fires are run when some are late or still running (checked)."""

    misfire_grace_time: float | None = 60.0  # None: run late fires however late
    coalesce: Coalesce = Coalesce.LATEST
    max_instances: int = 1

    def __post_init__(self) -> None:
        grace, n = self.misfire_grace_time, self.max_instances
        if grace is not None and (isinstance(grace, bool) or not isinstance(grace, (int, float))
                                  or not 0 < grace <= sys.float_info.max):
            raise ScheduleError(f"misfire_grace_time {grace!r}: must be a positive number of "
                                "seconds, or nil to always run late fires")
        self.misfire_grace_time = None if grace is None else float(grace)
        try:
            self.coalesce = Coalesce(self.coalesce)
        except ValueError:
            raise ScheduleError(f"coalesce {self.coalesce!r}: must be one of "
                                f"{', '.join(Coalesce)}") from None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ScheduleError(f"max_instances {n!r}: must be an integer of 1 or more")

    @classmethod
    def from_hash(cls, h: dict) -> Options:
        """Read from a schedule hash (str names, bytes values), as the store and scheduler do."""
        return cls(_float_or_none(h["misfire_grace_time"]), h["coalesce"].decode(),
                   int(h["max_instances"]))

    def to_hash(self) -> dict:
        grace = self.misfire_grace_time
        return {"misfire_grace_time": "" if grace is None else repr(grace),
                "coalesce": self.coalesce.value, "max_instances": str(self.max_instances)}


@dataclass
class StoredJob:
    """A periodic job as its schedule hash holds it."""

    job_id: str
    spec: dict                  # what every fire is queued with (schedule options taken out)
    options: Options
    trigger_input: dict | None = None   # the trigger as sent: sent again, the phase is kept
    trigger: dict | None = None         # normalized by parse_trigger
    next_run_time: float | None = None  # None: finished
    paused: bool = False
    version: str = ""           # as read; "" for a job not stored yet

    @classmethod
    def from_hash(cls, job_id: str, raw: dict) -> StoredJob:
        h = {k.decode(): v for k, v in raw.items()}
        return cls(job_id, unpack(h["spec"]), Options.from_hash(h), unpack(h["trigger_input"]),
                   unpack(h["trigger"]), _float_or_none(h["next_run_time"]), h["paused"] == b"1",
                   h["version"].decode())

    def to_hash(self, now: float) -> dict:
        nrt = self.next_run_time
        return {"job_id": self.job_id, "func": str(self.spec.get("func", "")),
                "queue": str(self.spec.get("queue", "default")), "spec": pack(self.spec),
                "trigger": pack(self.trigger), "trigger_input": pack(self.trigger_input),
                "trigger_text": str(build_trigger(self.trigger)),
                "next_run_time": "" if nrt is None else repr(nrt), "next_run_iso": iso(nrt),
                "paused": "1" if self.paused else "0", **self.options.to_hash(),
                "updated_at": repr(now), **({} if self.version else {"created_at": repr(now)})}


def schedule_options(spec: dict, base: Options | None = None) -> Options:
    """The misfire options ``spec`` sets, the others from ``base`` (default: the defaults)."""
    given = {f.name: spec[f.name] for f in dataclasses.fields(Options) if f.name in spec}
    return dataclasses.replace(base or Options(), **given)


def _why(exc: Exception) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# What reading a hand-written or badly restored field raises (msgpack's errors are ValueErrors)
UNREADABLE = (ValueError, TypeError, KeyError, AttributeError, TriggerError)


def _not_a_hash(exc: Exception) -> ValueError:
    """What reading a schedule key an operator overwrote raised (WRONGTYPE), as a field that
    cannot be read; any other error (an outage, a refusal) is raised as it came."""
    if isinstance(exc, ResponseError) and error_code(exc) == "WRONGTYPE":
        return ValueError("its key is not a hash (overwritten?)")
    raise exc


def _listed(job_id: str, row: list | Exception) -> dict:
    """A schedule as ``list`` shows it, from its hash fields; one whose fields cannot be
    read (written by hand, a bad restore) is shown saying so: it must not hide the others."""
    not_a_hash = _not_a_hash(row) if isinstance(row, Exception) else None
    func, queue, trigger, text, nrt, paused = row = [None] * 6 if not_a_hash else row
    try:
        if not_a_hash:
            raise not_a_hash
        if missing := [f.decode() for f, v in zip(LIST_FIELDS, row) if v is None]:
            raise ValueError(f"its hash has no {', '.join(missing)}")
        nrt = None if paused == b"1" else _float_or_none(nrt)
        return {"job_id": job_id, "func": func.decode(), "queue": queue.decode(),
                "trigger": unpack(trigger), "trigger_text": text.decode(),
                "paused": paused == b"1", "next_run_time": nrt, "next_run_iso": iso(nrt)}
    except Exception as exc:
        return {"job_id": job_id, "func": (func or b"").decode(errors="replace"),
                "queue": (queue or b"").decode(errors="replace"), "trigger": None,
                "trigger_text": f"its stored data cannot be read ({_why(exc)}); it does not fire: "
                                "remove it and add it again",
                "paused": paused == b"1", "next_run_time": None, "next_run_iso": ""}


def _run(record) -> dict:
    """One record of a job's runs, checked as ``get`` reads it (a fired one names its job)."""
    if not isinstance(record, dict) or (record.get("outcome") == Outcome.ENQUEUED
                                        and not isinstance(record.get("job_id"), str)):
        raise ValueError(f"a run record {str(record)[:80]!r} is no run")
    return record


def fired_times(raw_runs: list[bytes]) -> set[float]:
    """The fire times a job's runs list records as fired (marked: queued or filtered); a
    record that cannot be read is passed over, as it records no fire to keep."""
    times = set()
    for raw in raw_runs:
        try:
            record = unpack(raw)
            if record.get("outcome") in (Outcome.ENQUEUED, Outcome.FILTERED):
                times.add(float(record["fire_time"]))
        except UNREADABLE:
            continue
    return times


class RedisJobStore:
    """Periodic jobs in Redis. ``redis`` is a ``redis.asyncio.Redis`` (decode_responses=False)."""

    def __init__(self, redis, keys, *, clock=time.time, min_interval: float = 1.0) -> None:
        self.redis, self.keys, self.clock = redis, keys, clock
        self.min_interval = min_interval  # settings.MIN_INTERVAL: shortest interval accepted
        self._put = lua.load(redis, "jobstore_put", "version_fn")
        self._remove = lua.load(redis, "jobstore_remove")

    # --- reading -------------------------------------------------------------------------
    async def _load(self, job_id: str) -> StoredJob | None:
        try:
            raw = await self.redis.hgetall(self.keys.schedule(job_id))
        except ResponseError as exc:
            raise UnreadableSchedule(job_id, _not_a_hash(exc)) from None
        if not raw:
            return None
        try:
            job = StoredJob.from_hash(job_id, raw)
            build_trigger(job.trigger)   # (every write and get builds it)
        except UNREADABLE as exc:
            raise UnreadableSchedule(job_id, exc) from None
        return job

    async def existing(self, job_ids: list[str]) -> set[str]:
        """Those of ``job_ids`` that are periodic jobs, looked for in one round trip."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.exists(self.keys.schedule(job_id))
            found = await pipe.execute()
        return {job_id for job_id, n in zip(job_ids, found) if n}

    async def state(self, job_id: str) -> dict | None:
        """A periodic job's ``status`` and ``paused`` as ``get`` answers them, read alone;
        None when there is no such job, no status when an operator overwrote its key."""
        try:
            nrt, paused = await self.redis.hmget(self.keys.schedule(job_id), "next_run_time",
                                                 "paused")
        except ResponseError as exc:
            _not_a_hash(exc)   # (else raised as it came)
            return {"status": None, "paused": False}
        if paused is None:
            return None
        return {"status": _status(paused == b"1", _float_or_none(nrt)),
                "paused": paused == b"1"}

    async def get(self, job_id: str) -> dict | None:
        """The job spec plus trigger, next_run_time, paused, status and its last runs, each
        fired one with the progress of its round (the fire and its descendants)."""
        job = await self._load(job_id)
        if job is None:
            return None
        try:
            runs = [_run(unpack(b)) for b in
                    await self.redis.lrange(self.keys.schedule_runs(job_id), 0, -1)]
        except UNREADABLE as exc:
            raise UnreadableSchedule(job_id, exc) from None
        fired = [r for r in runs if r.get("outcome") == Outcome.ENQUEUED]
        pipe = self.redis.pipeline(transaction=False)  # what became of each fired job
        for r in fired:
            pipe.hmget(self.keys.job(r["job_id"]), *JOB_STATUS_FIELDS)
            pipe.hgetall(self.keys.round(r["job_id"]))
        replies = await pipe.execute()
        for r, fields, counts in zip(fired, replies[0::2], replies[1::2]):
            status, duration_ms, started, finished = fields
            r["round"] = round_progress(counts)
            if status:
                r["outcome"] = status.decode()
            if duration_ms:
                r["duration"] = float(duration_ms) / 1000.0
            elif started and finished:
                r["duration"] = (float(finished) - float(started)) / 1000.0
        nrt = None if job.paused else job.next_run_time
        status = _status(job.paused, nrt)
        return {**job.spec, "trigger": job.trigger, "trigger_text": str(build_trigger(job.trigger)),
                "status": status, "paused": job.paused, "next_run_time": nrt,
                "next_run_iso": iso(nrt), **dataclasses.asdict(job.options), "runs": runs}

    async def view(self, job_id: str) -> dict | None:
        """``get``, or for a job whose stored data cannot be read its error's view (not raised)."""
        try:
            return await self.get(job_id)
        except UnreadableSchedule as exc:
            return exc.view()

    async def list(self, *, offset: int = 0, limit: int = 100) -> list[dict]:
        """A page of periodic jobs, soonest next run first (paused ones last)."""
        # ZRANGE takes signed 64-bit indexes: an offset beyond them lists none, as past the end
        offset, limit = min(max(0, int(offset)), 2**62), max(1, min(int(limit), 1000))
        rows = await self.redis.zrange(self.keys.schedules, offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        for job_id in rows:
            pipe.hmget(self.keys.schedule(job_id.decode()), *LIST_FIELDS)
        return [_listed(job_id.decode(errors="replace"), row)
                for job_id, row in zip(rows, await pipe.execute(raise_on_error=False))
                # (none: removed between the reads)
                if isinstance(row, Exception) or any(v is not None for v in row)]

    async def fire_stats(self) -> dict[str, int]:
        """Fires fired (of those, filtered: dropped by the dedupe filter), missed and skipped
        since the start, and the summed lateness (ms) of those fired (by the scheduler)."""
        h = await self.redis.hgetall(self.keys.fire_stats)
        return {name: int(h.get(name.encode(), 0))
                for name in ("fired", "filtered", "missed", "skipped", "lateness_ms")}

    async def count(self) -> int:
        """Scheduled and paused periodic jobs (finished ones are not counted)."""
        return await self.redis.zcard(self.keys.schedules)

    # --- writing -------------------------------------------------------------------------
    async def _update(self, job_id: str, change, new=None, write=True) -> StoredJob | None:
        """Write ``change(stored job)`` (None: write nothing), or ``new()`` when none is
        stored, retrying on conflicts; returns the job written (``write`` False: the one it
        would write, as checked), else the stored one (or None)."""
        for _ in range(WRITE_RETRIES):
            cur = await self._load(job_id)
            job = (new() if new else None) if cur is None else change(cur)
            if job is None or not write:
                return cur if job is None else job
            nrt = job.next_run_time
            score = "+inf" if job.paused else ("" if nrt is None else repr(nrt * 1000.0))
            argv = [job_id, job.version, score, "1" if cur is None else "0", FINISHED_TTL,
                    *itertools.chain.from_iterable(job.to_hash(self.clock()).items())]
            keys = [self.keys.schedule(job_id), self.keys.schedule_runs(job_id),
                    self.keys.schedules, self.keys.scheduler_wake, self.keys.seq,
                    self.keys.job(job_id), self.keys.schedule_rounds_left(job_id)]
            written = await self._put(keys=keys, args=argv)
            if isinstance(written, bytes):
                raise IdTaken(written.decode())
            if written != -1:
                return job
        raise ScheduleError(f"job {job_id!r} is being changed concurrently; try again")

    def _new_trigger(self, raw) -> dict:
        """The StoredJob fields for a trigger as sent: validated, its schedule starting now."""
        raw, now = unpack(pack(raw)), self.clock()  # as it will read back (tuples as lists...)
        trigger, normalized = parse_trigger(raw, now=now)
        length = getattr(trigger, "interval_length", None)  # None: not an interval
        if length is not None and length < self.min_interval:
            raise TriggerError("trigger.interval", f"{length:g}s is shorter than MIN_INTERVAL "
                                                   f"({self.min_interval:g}s)")
        return {"trigger_input": raw, "trigger": normalized,
                "next_run_time": next_fire(trigger, now, first=True)}

    async def _unfired(self, job_id: str, new_trigger: dict) -> dict:
        """``new_trigger``, but a run_date this id fired at already (removed or replaced
        since) fires now: that fire's id is marked, or a job, so a fire by it is skipped."""
        nrt = new_trigger["next_run_time"]
        if "run_date" not in new_trigger["trigger"] or nrt > self.clock():
            return new_trigger
        fired = fire_id(job_id, nrt)
        if not await self.redis.exists(self.keys.fire(fired), self.keys.job(fired)):
            return new_trigger
        return {**new_trigger, "next_run_time": self.clock()}

    def _check_not_past(self, new_trigger: dict, options: Options) -> None:
        """Refuse a date trigger whose run_date plus misfire grace is already past: it would
        be stored as scheduled and then finish without a run."""
        grace, run_date = options.misfire_grace_time, new_trigger["trigger"].get("run_date")
        if run_date is not None and grace is not None and \
                datetime.fromisoformat(run_date).timestamp() + grace < self.clock():
            raise TriggerError("trigger.run_date", f"{run_date} is in the past (more than "
                                                   f"misfire_grace_time {grace:g}s ago)")

    async def add(self, spec: dict, *, replace_existing: bool = False,
                  check: bool = False) -> dict:
        """Store the periodic job ``spec`` ("job_id", "trigger"); ``check``: only refuse it as
        storing would. The same job sent again is answered as stored; replace_existing keeps
        the runs, a pause and, for the same trigger, the next run time (a script run again
        neither doubles nor shifts the schedule)."""
        replace = bool(replace_existing or spec.get("replace_existing"))
        job_id = spec.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ScheduleError("job_id: a periodic job needs a job_id (a non-empty string)")
        if spec.get("trigger") is None:
            raise TriggerError("trigger", "required for a periodic job")
        options = schedule_options(spec)
        new_trigger = await self._unfired(job_id, self._new_trigger(spec["trigger"]))
        job_spec = {k: v for k, v in spec.items() if k not in SCHEDULE_OPTIONS}

        def change(cur: StoredJob) -> StoredJob | None:
            same_trigger = cur.trigger_input == new_trigger["trigger_input"]
            if not replace and same_trigger and (cur.spec, cur.options) == (job_spec, options):
                return None  # the same job sent again: answered as stored
            if not replace:
                raise ScheduleError(f"job {job_id!r} already exists; pass replace_existing=True "
                                    "to replace its schedule")
            if not same_trigger:
                self._check_not_past(new_trigger, options)
            # the same trigger keeps its next run time (an interval's phase)
            return dataclasses.replace(cur, spec=job_spec, options=options,
                                       **({} if same_trigger else new_trigger))

        def new() -> StoredJob:  # checked only when nothing is stored: a resend is answered
            self._check_not_past(new_trigger, options)
            return StoredJob(job_id, job_spec, options, **new_trigger)

        job = await self._update(job_id, change, new=new, write=not check)
        return {"job_id": job_id, "status": Status.SCHEDULED,
                "next_run_time": None if job.paused else job.next_run_time}

    async def remove(self, job_id: str) -> bool:
        k = self.keys
        return await self._remove(keys=[k.schedule(job_id), k.schedule_runs(job_id),
                                        k.schedules, k.schedule_rounds_left(job_id)],
                                  args=[job_id, ROUNDS_LEFT_TTL]) == 1

    async def pause(self, job_id: str) -> bool:
        """Stop firing until resumed; True if the job exists. A finished job (no fire left)
        is refused, as run_now refuses it: answered True, it read as paused."""
        def change(job: StoredJob) -> StoredJob | None:
            if job.next_run_time is None:  # paused, it would be listed and kept forever
                raise ScheduleError(f"periodic job {job_id!r} has finished: no fires are "
                                    "left to pause")
            return dataclasses.replace(job, paused=True)
        return await self._update(job_id, change) is not None

    async def resume(self, job_id: str) -> bool:
        """Fire again from now on (fires due while paused are dropped, but not a date job's
        one fire: misfire_grace_time judges it); True if it exists."""
        def change(job: StoredJob) -> StoredJob | None:
            if not job.paused:
                return None
            job.paused = False
            if job.next_run_time is not None:  # a finished job stays finished
                job.next_run_time = next_fire(build_trigger(job.trigger), self.clock(), first=True)
            return job
        return await self._update(job_id, change) is not None

    async def replan(self, job_id: str, now: float) -> bool:
        """Move the next run time, planned by a clock that ran ahead, back to the trigger's
        first fire from ``now`` its runs do not record as fired (neither their marks nor
        their jobs last: they must not run again), if sooner. A date job keeps its one fire
        time (one it fired already may be a time of its own, _unfired). True if moved."""
        try:
            fired = fired_times(await self.redis.lrange(self.keys.schedule_runs(job_id), 0, -1))
        except ResponseError as exc:   # a runs list of another type (an operator's write)
            if is_outage(exc):   # a refusal (BUSY, LOADING) tells nothing: the look waits
                raise
            fired = set()   # records none
        moved = False

        def change(job: StoredJob) -> StoredJob | None:
            nonlocal moved
            moved = False   # (as of the last read: a conflict reads it again)
            if job.paused or job.next_run_time is None or job.trigger.get("type") == "date":
                return None
            trigger = build_trigger(job.trigger)
            first = next_fire(trigger, now, first=True)
            while first is not None and first in fired and first < job.next_run_time:
                first = next_fire(trigger, first)
            if first is None or first >= job.next_run_time:
                return None
            moved = True
            return dataclasses.replace(job, next_run_time=first)
        await self._update(job_id, change)
        return moved

    async def run_now(self, job_id: str) -> float | None:
        """Make the job due now (Redis's clock); returns the fire time (None: no such job).
        A fire already due is the one answered: moved, it would never fire."""
        def change(job: StoredJob) -> StoredJob:
            if job.paused:
                raise ScheduleError(f"periodic job {job_id!r} is paused: resume it first")
            if job.next_run_time is None:
                raise ScheduleError(f"periodic job {job_id!r} is finished: no fires are left")
            now, grace = self.clock(), job.options.misfire_grace_time
            due = job.next_run_time <= now and (grace is None or job.next_run_time >= now - grace)
            return dataclasses.replace(job, next_run_time=job.next_run_time if due else now)
        job = await self._update(job_id, change)
        return None if job is None else job.next_run_time

    async def fire_run(self, job_id: str, fire: str, wait: float) -> dict | None:
        """The run record of ``fire`` as ``get`` shows it, once decided (not "enqueued": the
        dedupe filter may still drop it) or after ``wait`` seconds; None if not recorded."""
        deadline, backoff = time.monotonic() + wait, Backoff(0.05, 0.5)
        while True:
            runs = (await self.get(job_id) or {}).get("runs", [])
            run = next((r for r in runs if r.get("job_id") == fire), None)
            left = deadline - time.monotonic()
            if (run is not None and run["outcome"] != Outcome.ENQUEUED) or left <= 0:
                return run
            # polled: any master's fire script, enqueue or dedupe filter may decide it
            await asyncio.sleep(min(backoff.next(), left))

    async def modify(self, job_id: str, changes: dict) -> dict:
        """Change the trigger (restarting the schedule from now), misfire options or job spec
        fields (args, kwargs, queue, ...); returns the job as ``get`` shows it."""
        if unknown := sorted(str(k) for k in changes if k not in SPEC_KEYS):
            raise ScheduleError(f"cannot modify unknown key(s) {', '.join(map(repr, unknown))}")
        if changes.get("job_id", job_id) != job_id:
            raise ScheduleError("job_id cannot be modified; remove the job and add it again")
        new_trigger = await self._unfired(job_id, self._new_trigger(changes["trigger"])) \
            if "trigger" in changes else {}

        def change(job: StoredJob) -> StoredJob:
            spec = {**job.spec, **{k: v for k, v in changes.items() if k not in SCHEDULE_OPTIONS}}
            options = schedule_options(changes, job.options)
            # the trigger it has (as sent, or as get shows it) keeps its next run time: a
            # script modifying it on each run must not move every fire, or refire a date job
            same = bool(new_trigger) and (new_trigger["trigger_input"] == job.trigger_input
                                          or new_trigger["trigger"] == job.trigger)
            if new_trigger and not same:
                self._check_not_past(new_trigger, options)
            return dataclasses.replace(job, spec=spec, options=options,
                                       **({} if same else new_trigger))

        if await self._update(job_id, change) is None:
            raise ScheduleError(f"no periodic job {job_id!r}")
        return await self.get(job_id)
