"""The periodic-job store: schedules kept in Redis so they survive master restarts.

One hash per periodic job (``keys.schedule(job_id)``) holds the job spec and the trigger as
msgpack blobs, the exact next run time, the misfire options and a ``version`` that every
write bumps, plus plain fields (func, queue, trigger_text, next_run_iso, paused) for
redis-cli. ``keys.schedules`` indexes job_id -> next run time (ms); the scheduler reads only
its due head, so the cost of a fire does not grow with the number of stored jobs. Paused
jobs stay in the index with score +inf (never due, still listed); finished jobs (no next
fire) leave it and their hash expires after ``FINISHED_TTL`` so ``get`` still shows their
last runs for a while.

Writes are compare-and-set on ``version`` in one Lua script (retried on conflict), so a
store operation and the scheduler's fire script never overwrite each other.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import msgpack

from elric.contract import SPEC_KEYS
from elric.triggers import TriggerError, parse_trigger

UTC = timezone.utc
FINISHED_TTL = 86400            # seconds a finished job (no next fire) stays visible to get()
DEFAULT_MISFIRE_GRACE_TIME = 60.0
DEFAULT_MAX_INSTANCES = 1
WRITE_RETRIES = 20
# Spec keys that configure the schedule rather than each fired job.
SCHEDULE_OPTIONS = ("trigger", "replace_existing", "misfire_grace_time", "coalesce", "max_instances")
# Fields of the fired job's hash (keys.job, written by queue.py) read to show a run's
# outcome and duration; times there are in ms.
JOB_STATUS_FIELDS = (b"status", b"duration_ms", b"started_at", b"finished_at")


class Coalesce(str, Enum):
    """What to do when several fires of one job are due at once (the scheduler missed some)."""

    LATEST = "latest"  # run once, for the latest due fire
    ALL = "all"        # run every due fire
    SKIP = "skip"      # run none of them; wait for the next future fire


class ScheduleError(ValueError):
    """A refused job-store operation; the message says what to change."""


# KEYS: hash, runs, schedules, wake.
# ARGV: job_id, expected version ("" = must not exist), score ("+inf" paused, "" finished,
#       else ms), fresh ("1": drop old runs), finished_ttl, field, value, ...
# Returns the new version, or -1 when the version moved (or the job exists and must not).
_PUT = """
local cur = redis.call('HGET', KEYS[1], 'version') or ''
if cur ~= ARGV[2] then return -1 end
redis.call('DEL', KEYS[1])
if ARGV[4] == '1' then redis.call('DEL', KEYS[2]) end
local version = (tonumber(cur) or 0) + 1
redis.call('HSET', KEYS[1], 'version', version, unpack(ARGV, 6))
if ARGV[3] == '' then
  redis.call('ZREM', KEYS[3], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[5])
  redis.call('EXPIRE', KEYS[2], ARGV[5])
  return version
end
redis.call('PERSIST', KEYS[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
if ARGV[3] ~= '+inf' and redis.call('ZRANGE', KEYS[3], 0, 0)[1] == ARGV[1] then
  -- this job is now the soonest: wake the scheduling master, whichever it is
  redis.call('LPUSH', KEYS[4], '1')
  redis.call('LTRIM', KEYS[4], 0, 0)
end
return version
"""


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(blob: bytes | None) -> Any:
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


def iso(ts: float | None) -> str:
    return "" if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def _float_or_none(raw: bytes | str | None) -> float | None:
    return None if raw in (None, b"", "") else float(raw)


def schedule_options(spec: dict, base: dict | None = None) -> dict:
    """Validated misfire_grace_time / coalesce / max_instances (``base``: current values)."""
    base = base or {
        "misfire_grace_time": DEFAULT_MISFIRE_GRACE_TIME,
        "coalesce": Coalesce.LATEST.value,
        "max_instances": DEFAULT_MAX_INSTANCES,
    }
    out = dict(base)
    if "misfire_grace_time" in spec:
        grace = spec["misfire_grace_time"]
        if grace is not None and (
            isinstance(grace, bool) or not isinstance(grace, (int, float))
            or not math.isfinite(grace) or grace <= 0
        ):
            raise ScheduleError(
                f"misfire_grace_time {grace!r}: must be a positive number of seconds, or nil to always run late fires"
            )
        out["misfire_grace_time"] = None if grace is None else float(grace)
    if "coalesce" in spec:
        try:
            out["coalesce"] = Coalesce(spec["coalesce"]).value
        except ValueError:
            raise ScheduleError(
                f"coalesce {spec['coalesce']!r}: must be one of {', '.join(c.value for c in Coalesce)}"
            ) from None
    if "max_instances" in spec:
        n = spec["max_instances"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ScheduleError(f"max_instances {n!r}: must be an integer of 1 or more")
        out["max_instances"] = n
    return out


class RedisJobStore:
    """Periodic jobs in Redis. ``redis`` is a ``redis.asyncio.Redis`` (decode_responses=False)."""

    def __init__(self, redis, keys, *, clock=time.time, runs_kept: int = 20) -> None:
        self.redis = redis
        self.keys = keys
        self.clock = clock
        self.runs_kept = runs_kept
        self._put = redis.register_script(_PUT)

    # --- reading -------------------------------------------------------------------------
    async def _load(self, job_id: str) -> dict | None:
        raw = await self.redis.hgetall(self.keys.schedule(job_id))
        if not raw:
            return None
        h = {k.decode(): v for k, v in raw.items()}
        return {
            "job_id": job_id,
            "version": h["version"].decode(),
            "spec": unpack(h["spec"]),
            "trigger": unpack(h["trigger"]),
            "trigger_input": unpack(h["trigger_input"]),
            "next_run_time": _float_or_none(h.get("next_run_time")),
            "paused": h.get("paused") == b"1",
            "options": {
                "misfire_grace_time": _float_or_none(h.get("misfire_grace_time")),
                "coalesce": h["coalesce"].decode(),
                "max_instances": int(h["max_instances"]),
            },
            "recent": h.get("recent", pack([])),
            "created_at": float(h["created_at"]),
        }

    def _view(self, job: dict, runs: list[dict]) -> dict:
        paused, nrt = job["paused"], job["next_run_time"]
        status = "paused" if paused else ("scheduled" if nrt is not None else "finished")
        trigger, _ = parse_trigger(job["trigger"])
        return {
            **job["spec"],
            "trigger": job["trigger"],
            "trigger_text": str(trigger),
            "status": status,
            "paused": paused,
            "next_run_time": None if paused else nrt,
            "next_run_iso": "" if paused else iso(nrt),
            **job["options"],
            "runs": runs,
        }

    async def get(self, job_id: str) -> dict | None:
        """The job spec plus trigger, next_run_time, paused, status and its last runs."""
        job = await self._load(job_id)
        if job is None:
            return None
        runs = [unpack(b) for b in await self.redis.lrange(self.keys.schedule_runs(job_id), 0, -1)]
        fired = [r for r in runs if r.get("outcome") == "enqueued"]
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
        return self._view(job, runs)

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
            out.append({
                "job_id": job_id.decode(),
                "func": func.decode(),
                "queue": queue.decode(),
                "trigger": unpack(trigger),
                "trigger_text": text.decode(),
                "paused": paused == b"1",
                "next_run_time": nrt,
                "next_run_iso": iso(nrt),
            })
        return out

    async def count(self) -> int:
        """Scheduled and paused periodic jobs (finished ones are not counted)."""
        return await self.redis.zcard(self.keys.schedules)

    # --- writing -------------------------------------------------------------------------
    async def _write(self, job: dict, expected: str, *, fresh: bool = False) -> bool:
        """Store ``job`` if its version is still ``expected``; False when it moved."""
        job_id, nrt, paused = job["job_id"], job["next_run_time"], job["paused"]
        spec, opts = job["spec"], job["options"]
        trigger, _ = parse_trigger(job["trigger"])
        now = self.clock()
        grace = opts["misfire_grace_time"]
        fields = {
            "job_id": job_id,
            "func": str(spec.get("func", "")),
            "queue": str(spec.get("queue", "default")),
            "spec": pack(spec),
            "trigger": pack(job["trigger"]),
            "trigger_input": pack(job["trigger_input"]),
            "trigger_text": str(trigger),
            "next_run_time": "" if nrt is None else repr(nrt),
            "next_run_iso": iso(nrt),
            "paused": "1" if paused else "0",
            "misfire_grace_time": "" if grace is None else repr(grace),
            "coalesce": opts["coalesce"],
            "max_instances": str(opts["max_instances"]),
            "recent": job.get("recent", pack([])),
            "created_at": repr(job.get("created_at", now)),
            "updated_at": repr(now),
        }
        score = "+inf" if paused else ("" if nrt is None else repr(nrt * 1000.0))
        argv = [job_id, expected, score, "1" if fresh else "0", FINISHED_TTL]
        for k, v in fields.items():
            argv += [k, v]
        keys = [self.keys.schedule(job_id), self.keys.schedule_runs(job_id),
                self.keys.schedules, self.keys.scheduler_wake]
        return await self._put(keys=keys, args=argv) != -1

    def _first_run(self, trigger_data: dict) -> float | None:
        trigger, _ = parse_trigger(trigger_data)
        nxt = trigger.get_next_fire_time(None, datetime.fromtimestamp(self.clock(), UTC))
        return None if nxt is None else nxt.timestamp()

    def _result(self, job: dict) -> dict:
        return {"job_id": job["job_id"], "status": "scheduled",
                "next_run_time": None if job["paused"] else job["next_run_time"]}

    async def add(self, spec: dict, *, replace_existing: bool = False) -> dict:
        """Store a periodic job; ``spec`` holds "trigger" (raw dict) and "job_id".

        The same job sent again (a call retried after an error) is answered as stored.
        With replace_existing an existing job gets the new spec; when its trigger is the same
        as before, its next run time (the phase of an interval) is kept, so re-running a
        submitting script neither doubles nor shifts the schedule. Its runs history and a
        pause by an operator are kept too.
        """
        spec = dict(spec)
        replace = bool(replace_existing or spec.get("replace_existing"))
        job_id = spec.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise ScheduleError("job_id: a periodic job needs a job_id (a non-empty string)")
        if spec.get("trigger") is None:
            raise TriggerError("trigger", "required for a periodic job")
        # as it reads back from Redis
        raw = msgpack.unpackb(pack(spec["trigger"]), raw=False, strict_map_key=False)
        options = schedule_options(spec)
        job_spec = {k: v for k, v in spec.items() if k not in SCHEDULE_OPTIONS}
        _, normalized = parse_trigger(raw, now=self.clock())
        for _ in range(WRITE_RETRIES):
            cur = await self._load(job_id)
            if cur is not None and not replace:
                if (cur["spec"], cur["options"], cur["trigger_input"]) == (job_spec, options, raw):
                    return self._result(cur)   # the same job sent again (a retried call)
                raise ScheduleError(
                    f"job {job_id!r} already exists; pass replace_existing=True to replace its schedule"
                )
            job = {"job_id": job_id, "spec": job_spec, "options": options, "trigger_input": raw,
                   "trigger": normalized, "paused": False}
            if cur is not None:
                job.update(paused=cur["paused"], recent=cur["recent"], created_at=cur["created_at"])
            if cur is not None and cur["trigger_input"] == raw:
                job.update(trigger=cur["trigger"], next_run_time=cur["next_run_time"])
            else:
                job["next_run_time"] = self._first_run(normalized)
            if await self._write(job, cur["version"] if cur else "", fresh=cur is None):
                return self._result(job)
        raise ScheduleError(f"job {job_id!r} is being changed concurrently; try again")

    async def _update(self, job_id: str, change) -> dict | None:
        """Load, apply ``change(job)`` (mutates it) and write back, retrying on conflicts."""
        for _ in range(WRITE_RETRIES):
            job = await self._load(job_id)
            if job is None:
                return None
            expected = job["version"]
            change(job)
            if await self._write(job, expected):
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
        def change(job):
            job["paused"] = True
        return await self._update(job_id, change) is not None

    async def resume(self, job_id: str) -> bool:
        """Fire again from now on (fires due while paused are dropped); True if it exists."""
        def change(job):
            if job["paused"]:
                job["paused"] = False
                if job["next_run_time"] is not None:  # a finished job stays finished
                    job["next_run_time"] = self._first_run(job["trigger"])
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
        new_trigger = None
        if "trigger" in changes:
            raw = msgpack.unpackb(pack(changes["trigger"]), raw=False,
                                 strict_map_key=False)
            new_trigger = (raw, parse_trigger(raw, now=self.clock())[1])

        def change(job):
            job["options"] = schedule_options(changes, job["options"])
            job["spec"].update({k: v for k, v in changes.items() if k not in SCHEDULE_OPTIONS})
            if new_trigger is not None:
                job["trigger_input"], job["trigger"] = new_trigger
                job["next_run_time"] = self._first_run(job["trigger"])

        if await self._update(job_id, change) is None:
            raise ScheduleError(f"no periodic job {job_id!r}")
        return await self.get(job_id)
