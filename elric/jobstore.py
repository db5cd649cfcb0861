"""The periodic-job store: schedules kept in Redis so they survive master restarts.

One hash per periodic job (``keys.schedule(job_id)``) holds the job spec and the trigger as
msgpack blobs, the exact next run time, the misfire options and a ``version`` that every
write bumps, plus plain fields (func, queue, trigger_text, next_run_iso, paused) for
redis-cli. ``keys.schedules`` indexes job_id -> next run time (ms); the scheduler reads only
its due head, so the cost of a fire does not grow with the number of stored jobs. Paused
jobs stay in the index with score +inf (never due, still listed); finished jobs (no next
fire) leave it and their hash expires after ``FINISHED_TTL`` so ``get`` still shows their
last runs for a while.

Writes are compare-and-set on ``version`` (lua/jobstore_put.lua, retried on conflict), so a
store operation and the scheduler's fire script never overwrite each other.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import StrEnum
from typing import Any

from elric import lua
from elric.codec import pack, unpack
from elric.contract import SPEC_KEYS, Status
from elric.triggers import TriggerError, next_fire, parse_trigger

FINISHED_TTL = 86400            # seconds a finished job (no next fire) stays visible to get()
DEFAULT_MISFIRE_GRACE_TIME = 60.0
DEFAULT_MAX_INSTANCES = 1
WRITE_RETRIES = 20
# Spec keys that configure the schedule rather than each fired job.
SCHEDULE_OPTIONS = ("trigger", "replace_existing", "misfire_grace_time", "coalesce", "max_instances")
# Fields of the fired job's hash (keys.job, written by queue.py) read to show a run's
# outcome and duration; times there are in ms.
JOB_STATUS_FIELDS = (b"status", b"duration_ms", b"started_at", b"finished_at")
NO_RECENT = pack([])


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


class ScheduleError(ValueError):
    """A refused job-store operation; the message says what to change."""


@dataclass
class Options:
    """How a periodic job's fires are run when some are late or still running."""

    misfire_grace_time: float | None = DEFAULT_MISFIRE_GRACE_TIME  # None: run late fires however late
    coalesce: Coalesce = Coalesce.LATEST
    max_instances: int = DEFAULT_MAX_INSTANCES


@dataclass
class StoredJob:
    """A periodic job as its schedule hash holds it."""

    job_id: str
    spec: dict                  # what every fire is queued with (schedule options taken out)
    trigger_input: dict         # the trigger as sent: sent again unchanged, the phase is kept
    trigger: dict               # normalized by parse_trigger
    options: Options
    next_run_time: float | None  # None: finished
    paused: bool = False
    version: str = ""           # as read; "" for a job not stored yet
    recent: bytes = NO_RECENT   # the scheduler's ids of its last fires (msgpack)
    created_at: float | None = None


def iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat()


def _float_or_none(raw: bytes | str | None) -> float | None:
    return None if raw in (None, b"", "") else float(raw)


def _as_stored(value: Any) -> Any:
    """``value`` as it reads back from Redis (tuples become lists, and so on)."""
    return unpack(pack(value))


def schedule_options(spec: dict, base: Options | None = None) -> Options:
    """Validated misfire_grace_time / coalesce / max_instances (``base``: current values)."""
    out = dataclasses.replace(base or Options())
    if "misfire_grace_time" in spec:
        grace = spec["misfire_grace_time"]
        if grace is not None and (
            isinstance(grace, bool) or not isinstance(grace, (int, float))
            or not math.isfinite(grace) or grace <= 0
        ):
            raise ScheduleError(
                f"misfire_grace_time {grace!r}: must be a positive number of seconds, or nil to always run late fires"
            )
        out.misfire_grace_time = None if grace is None else float(grace)
    if "coalesce" in spec:
        try:
            out.coalesce = Coalesce(spec["coalesce"])
        except ValueError:
            raise ScheduleError(
                f"coalesce {spec['coalesce']!r}: must be one of {', '.join(Coalesce)}"
            ) from None
    if "max_instances" in spec:
        n = spec["max_instances"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ScheduleError(f"max_instances {n!r}: must be an integer of 1 or more")
        out.max_instances = n
    return out


class RedisJobStore:
    """Periodic jobs in Redis. ``redis`` is a ``redis.asyncio.Redis`` (decode_responses=False)."""

    def __init__(self, redis, keys, *, clock=time.time, runs_kept: int = 20) -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock
        self.runs_kept = runs_kept
        self._put = lua.load(redis, "jobstore_put")

    # --- reading -------------------------------------------------------------------------
    async def _load(self, job_id: str) -> StoredJob | None:
        raw = await self.redis.hgetall(self.keys.schedule(job_id))
        if not raw:
            return None
        h = {k.decode(): v for k, v in raw.items()}
        options = Options(misfire_grace_time=_float_or_none(h.get("misfire_grace_time")),
                          coalesce=Coalesce(h["coalesce"].decode()), max_instances=int(h["max_instances"]))
        return StoredJob(job_id=job_id, spec=unpack(h["spec"]), trigger_input=unpack(h["trigger_input"]),
                         trigger=unpack(h["trigger"]), options=options,
                         next_run_time=_float_or_none(h.get("next_run_time")), paused=h.get("paused") == b"1",
                         version=h["version"].decode(), recent=h.get("recent", NO_RECENT),
                         created_at=float(h["created_at"]))

    async def get(self, job_id: str) -> dict | None:
        """The job spec plus trigger, next_run_time, paused, status and its last runs."""
        job = await self._load(job_id)
        if job is None:
            return None
        runs = [unpack(b) for b in await self.redis.lrange(self.keys.schedule_runs(job_id), 0, -1)]
        fired = [r for r in runs if r.get("outcome") == Outcome.ENQUEUED]
        if fired:  # show what became of each fired job while its hash lives
            pipe = self.redis.pipeline(transaction=False)
            for r in fired:
                pipe.hmget(self.keys.job(r["job_id"]), *JOB_STATUS_FIELDS)
            for r, (status, duration_ms, started, finished) in zip(fired, await pipe.execute()):
                if status:
                    r["outcome"] = status.decode()
                if duration_ms:
                    r["duration"] = float(duration_ms) / 1000.0
                elif started and finished:
                    r["duration"] = (float(finished) - float(started)) / 1000.0
        nrt = None if job.paused else job.next_run_time
        status = "paused" if job.paused else (Status.SCHEDULED if nrt is not None else "finished")
        return {**job.spec, "trigger": job.trigger, "trigger_text": str(parse_trigger(job.trigger)[0]),
                "status": status, "paused": job.paused, "next_run_time": nrt, "next_run_iso": iso(nrt),
                **dataclasses.asdict(job.options), "runs": runs}

    async def list(self, *, offset: int = 0, limit: int = 100) -> list[dict]:
        """A page of periodic jobs, soonest next run first (paused ones last)."""
        offset, limit = max(0, int(offset)), max(1, min(int(limit), 1000))
        rows = await self.redis.zrange(self.keys.schedules, offset, offset + limit - 1)
        pipe = self.redis.pipeline(transaction=False)
        fields = (b"func", b"queue", b"trigger", b"trigger_text", b"next_run_time", b"paused")
        for job_id in rows:
            pipe.hmget(self.keys.schedule(job_id.decode()), *fields)
        out = []
        for job_id, (func, queue, trigger, text, nrt, paused) in zip(rows, await pipe.execute()):
            if trigger is None:  # removed between the two reads
                continue
            nrt = None if paused == b"1" else _float_or_none(nrt)
            out.append({"job_id": job_id.decode(), "func": func.decode(), "queue": queue.decode(),
                        "trigger": unpack(trigger), "trigger_text": text.decode(), "paused": paused == b"1",
                        "next_run_time": nrt, "next_run_iso": iso(nrt)})
        return out

    async def count(self) -> int:
        """Scheduled and paused periodic jobs (finished ones are not counted)."""
        return await self.redis.zcard(self.keys.schedules)

    # --- writing -------------------------------------------------------------------------
    async def _write(self, job: StoredJob, *, fresh: bool = False) -> bool:
        """Store ``job`` if its stored version is still ``job.version``; False when it moved."""
        nrt, grace, now = job.next_run_time, job.options.misfire_grace_time, self.clock()
        fields = {
            "job_id": job.job_id,
            "func": str(job.spec.get("func", "")),
            "queue": str(job.spec.get("queue", "default")),
            "spec": pack(job.spec),
            "trigger": pack(job.trigger),
            "trigger_input": pack(job.trigger_input),
            "trigger_text": str(parse_trigger(job.trigger)[0]),
            "next_run_time": "" if nrt is None else repr(nrt),
            "next_run_iso": iso(nrt),
            "paused": "1" if job.paused else "0",
            "misfire_grace_time": "" if grace is None else repr(grace),
            "coalesce": job.options.coalesce.value,
            "max_instances": str(job.options.max_instances),
            "recent": job.recent,
            "created_at": repr(now if job.created_at is None else job.created_at),
            "updated_at": repr(now),
        }
        score = "+inf" if job.paused else ("" if nrt is None else repr(nrt * 1000.0))
        argv = [job.job_id, job.version, score, "1" if fresh else "0", FINISHED_TTL]
        for k, v in fields.items():
            argv += [k, v]
        keys = [self.keys.schedule(job.job_id), self.keys.schedule_runs(job.job_id),
                self.keys.schedules, self.keys.scheduler_wake]
        return await self._put(keys=keys, args=argv) != -1

    def _first_run(self, trigger: dict) -> float | None:
        return next_fire(parse_trigger(trigger)[0], self.clock(), first=True)

    @staticmethod
    def _result(job: StoredJob) -> dict:
        return {"job_id": job.job_id, "status": Status.SCHEDULED,
                "next_run_time": None if job.paused else job.next_run_time}

    async def add(self, spec: dict, *, replace_existing: bool = False) -> dict:
        """Store a periodic job; ``spec`` holds "trigger" (raw dict) and "job_id".

        The same job sent again (a call retried after an error) is answered as stored.
        With replace_existing an existing job gets the new spec; when its trigger is the same
        as before, its next run time (the phase of an interval) is kept, so re-running a
        submitting script neither doubles nor shifts the schedule. Its runs history and a
        pause by an operator are kept too.
        """
        replace = bool(replace_existing or spec.get("replace_existing"))
        job_id = spec.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ScheduleError("job_id: a periodic job needs a job_id (a non-empty string)")
        if spec.get("trigger") is None:
            raise TriggerError("trigger", "required for a periodic job")
        raw = _as_stored(spec["trigger"])
        options = schedule_options(spec)
        job_spec = {k: v for k, v in spec.items() if k not in SCHEDULE_OPTIONS}
        normalized = parse_trigger(raw, now=self.clock())[1]
        for _ in range(WRITE_RETRIES):
            cur = await self._load(job_id)
            if cur is None:
                job = StoredJob(job_id, job_spec, raw, normalized, options, self._first_run(normalized))
            elif not replace:
                if (cur.spec, cur.options, cur.trigger_input) == (job_spec, options, raw):
                    return self._result(cur)   # the same job sent again (a retried call)
                raise ScheduleError(
                    f"job {job_id!r} already exists; pass replace_existing=True to replace its schedule"
                )
            elif cur.trigger_input == raw:  # same trigger: keep its phase
                job = dataclasses.replace(cur, spec=job_spec, options=options)
            else:
                job = dataclasses.replace(cur, spec=job_spec, options=options, trigger_input=raw,
                                          trigger=normalized, next_run_time=self._first_run(normalized))
            if await self._write(job, fresh=cur is None):
                return self._result(job)
        raise ScheduleError(f"job {job_id!r} is being changed concurrently; try again")

    async def _update(self, job_id: str, change) -> StoredJob | None:
        """Load, apply ``change(job)`` (mutates it) and write back, retrying on conflicts."""
        for _ in range(WRITE_RETRIES):
            job = await self._load(job_id)
            if job is None:
                return None
            change(job)
            if await self._write(job):
                return job
        raise ScheduleError(f"job {job_id!r} is being changed concurrently; try again")

    async def remove(self, job_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.schedule(job_id), self.keys.schedule_runs(job_id))
        pipe.zrem(self.keys.schedules, job_id)
        deleted, _ = await pipe.execute()
        return deleted > 0

    async def pause(self, job_id: str) -> bool:
        """Stop firing until resumed; True if the job exists."""
        def change(job: StoredJob):
            job.paused = True
        return await self._update(job_id, change) is not None

    async def resume(self, job_id: str) -> bool:
        """Fire again from now on (fires due while paused are dropped); True if it exists."""
        def change(job: StoredJob):
            if job.paused:
                job.paused = False
                if job.next_run_time is not None:  # a finished job stays finished
                    job.next_run_time = self._first_run(job.trigger)
        return await self._update(job_id, change) is not None

    async def modify(self, job_id: str, changes: dict) -> dict:
        """Change the trigger, misfire options or job spec fields (args, kwargs, queue, ...).

        A new trigger restarts the schedule from now; other changes keep the next run time.
        Returns the job as ``get`` shows it.
        """
        if not isinstance(changes, dict):
            raise ScheduleError("changes must be a map of job spec keys to new values")
        changes = {k: v for k, v in changes.items() if k != "replace_existing"}
        unknown = sorted(str(k) for k in changes if k not in SPEC_KEYS)
        if unknown:
            raise ScheduleError(f"cannot modify unknown key(s) {', '.join(map(repr, unknown))}")
        if changes.get("job_id", job_id) != job_id:
            raise ScheduleError("job_id cannot be modified; remove the job and add it again")
        if "trigger" in changes:
            raw = _as_stored(changes["trigger"])
            normalized = parse_trigger(raw, now=self.clock())[1]

        def change(job: StoredJob):
            job.options = schedule_options(changes, job.options)
            job.spec.update({k: v for k, v in changes.items() if k not in SCHEDULE_OPTIONS})
            if "trigger" in changes:
                job.trigger_input, job.trigger = raw, normalized
                job.next_run_time = self._first_run(normalized)

        if await self._update(job_id, change) is None:
            raise ScheduleError(f"no periodic job {job_id!r}")
        return await self.get(job_id)
