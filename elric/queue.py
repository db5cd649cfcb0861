"""The Redis queue: enqueue, fetch with a lease, finish, release, recover; job records.

Masters and workers share this one class. Each state change is one Lua script from
``elric/lua/``; reads (get_job, list_jobs, stats) are pipelined. A job is one hash
(``keys.job``) plus, while it waits, a member of its queue's sorted set. Values are msgpack;
nothing is pickled.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from redis.exceptions import ResponseError

from elric import codec, jobstats, lua
from elric.clock import redis_now
from elric.contract import STATUSES, NotFound, Refused, SpecError, Status
from elric.keys import Keys
from elric.retry import each, error_code

log = logging.getLogger("elric.queue")

HAND_BACK_SECONDS = 5.0   # a job no worker here can run waits this long between tries
STALE = "stale"   # finish's answer for an outcome that is no longer its worker's to record
MAX_RUNNING_SPLIT = 10_000   # running jobs stats() reads to split live jobs into running/queued
ENQUEUE_STEP = 1000   # jobs an enqueue call queues: a bigger one holds every fetch and finish
DUE_STEP = 1000   # due jobs (lease ran out, backoff over) one requeue_due call takes
MATCH_STEP = 1000   # index entries list_match looks at per call: a few ms of Redis's time
STATS_ROWS = 100   # batches, and funcs, stats() holds: a label per run is tens of thousands
WORKER_KEPT = 86400   # s a silent worker stays listed: heartbeat.lua's expiry of its hash
LOST_AFTER = 60.0   # s of silence that make a worker lost when its hash names no lease
_ORDERS = {b"paused", b"stop", b"set_queues", b"set_concurrency"}   # worker_order's fields


def _lost(seen_ms: float, lease_ms, now: float) -> bool:
    """A worker silent past its lease is lost: its claims are redelivered by then, so it
    is shown running no longer, nor told what to do (it would never obey)."""
    after = int(lease_ms) / 1000.0 if str(lease_ms or "").isdigit() else LOST_AFTER
    return now - seen_ms / 1000.0 >= after


class Fenced(Exception):
    """An enqueue guarded by a scheduler lease token that is no longer current."""


class Unreadable(Refused):
    """A job whose key an operator overwrote with another type: it can only be deleted."""

    def __init__(self, job_id: str, key: str) -> None:
        super().__init__(f"job {job_id!r} cannot be read: {key} is not a hash (overwritten?); "
                         f"delete it (elric delete {job_id})")
        self.job_id = job_id


@dataclass(slots=True)
class Submitted:
    """What became of one submitted job: queued now, stored as a periodic job, or the
    status of the job that already had its id (``existed``)."""

    job_id: str
    status: str
    existed: bool = False
    next_run_time: float | None = None   # a periodic job's first fire (None: paused)

    def as_dict(self) -> dict:
        out = {"job_id": self.job_id, "status": self.status}
        if self.status == Status.SCHEDULED:
            out["next_run_time"] = self.next_run_time
        return out


@dataclass(slots=True)
class Claim:
    """A job a worker fetched and holds under a lease; args and kwargs still packed."""

    job_id: str
    attempt: int
    func: str
    args: bytes
    kwargs: bytes
    timeout: float | None
    max_retries: int
    queue: str
    dedupe_scope: str | None
    batch: str = ""
    round: str | None = None
    limit_key: str | None = None
    enqueued_at: int = 0   # ms; set by a submit or rerun alone: it names their children
    member: str = ""   # its queue member, new at each enqueue (submit, rerun, retry)
    held_until: float = 0.0   # time.monotonic() its lease surely lasts to (set by the worker)
    cancelling: bool = False   # cancel_job asked to stop this run (a heartbeat told)
    unreadable: str = ""   # fields elric did not write (an edit?): failed, never run
    suspect: bool = False   # lost with workers twice (requeue_due.lua): one a worker

    @property
    def run(self) -> tuple[str, int, str]:
        """What names this run to the scripts: a rerun (or a reused id) counts from 1 again."""
        return self.job_id, self.attempt, self.member


@dataclass(slots=True)
class Fetched:
    """What one fetch claimed, and when jobs held back by their limit key may start
    (seconds from now; None: none is held back)."""

    claims: list[Claim]
    limited_wait: float | None


@dataclass(slots=True)
class WakeOn:
    """Where an idle worker's fetch waits: a BLPOP on ``lists`` (for up to ``timeout``
    seconds) sent on ``conn``, a connection of its own, just ahead of the fetch."""

    conn: Any
    lists: list[str]
    timeout: float


@dataclass(slots=True)
class Outcome:
    """How one attempt ended, as the worker records it (``retry_ms`` -1: no retry)."""

    job_id: str
    attempt: int
    ok: bool
    payload: bytes | str
    duration_ms: int
    retry_ms: int = -1
    cancelled: bool = False   # stopped because cancel_job asked: recorded cancelled
    member: str = ""   # the job's run (Claim.member): a lost run of an earlier one is stale
    hold_ms: int = 0   # its limit key's other jobs wait this long (a server's Retry-After)


@dataclass(slots=True)
class WorkerControl:
    """What an operator asked of a worker (``elric worker pause|resume|stop|set``)."""

    paused: bool = False
    stop: bool = False
    queues: list[str] = field(default_factory=list)   # empty: keep its own
    concurrency: int = 0   # pool processes; 0: keep its own


@dataclass(slots=True)
class Renewed:
    """What a heartbeat learnt: the claims the worker lost, and those to stop (cancelled)."""

    lost: set[str]
    cancel: set[str]
    control: WorkerControl = field(default_factory=WorkerControl)


@dataclass(slots=True)
class Hold:
    """Whether a job holds a dedupe key: its status and its key and scope, if any."""

    status: str
    dedupe_key: str | None
    dedupe_scope: str | None


def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _read(name: str, read, value: bytes, bad: list[str], default: Any = None) -> Any:
    """``read(value)``, or ``default`` with the field named in ``bad``: a field elric did
    not write (an operator's edit, a bad restore) must not stop a worker or a read."""
    try:
        return read(value)
    except (ValueError, TypeError):
        bad.append(f"{name} {_s(value)!r}")
        return default


def raised(outcome):
    """A ``..._many`` method's outcome for one job, its error raised."""
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _rerun_outcome(job_id: str, reply) -> str | NotFound | Refused:
    if not isinstance(reply, ResponseError):
        return _s(reply)
    if error_code(reply) == "NOJOB":
        return NotFound(f"no job {job_id!r}")
    if error_code(reply) == "LIVE":
        return Refused(f"job {job_id!r} is {str(reply).split()[-1]}; only a finished job can "
                       "be rerun")
    if error_code(reply) == "NOQUEUE":
        return Refused(f"job {job_id!r} has no `queue` field (deleted outside elric): set it "
                       "to rerun the job")
    raise reply


def _claim(r: list) -> Claim:
    """The claim of a fetch.lua row; what cannot be read is named in ``unreadable``."""
    bad = [_s(r[14])] if r[14] else []
    if not r[2]:
        bad.append("no func")
    return Claim(_s(r[0]), int(r[1]), _s(r[2]), r[3], r[4],
                 _read("timeout", float, r[5], bad) if r[5] else None,
                 _read("max_retries", int, r[6], bad, 0), _s(r[7]), _s(r[8]) or None,
                 _s(r[9]) or "", _s(r[10]) or None, _s(r[11]) or None,
                 _read("enqueued_at", int, r[12], bad, 0), _s(r[13]),
                 unreadable=", ".join(bad), suspect=bool(r[15]))


# How each field of a job's hash reads in get_job; a missing field reads as _EMPTY's value
_VIEW = {"func": _s, "args": codec.unpack, "kwargs": codec.unpack, "queue": _s,
         "priority": int, "status": _s, "result": codec.unpack, "error": _s, "attempts": int,
         "max_retries": int, "timeout": float, "worker": _s, "batch": _s, "parent": _s,
         **dict.fromkeys(("enqueued_at", "started_at", "finished_at", "retry_at"),
                         jobstats.ms_to_s), "duration_ms": int}
_EMPTY = {"args": [], "kwargs": {}, "priority": 0, "attempts": 0, "max_retries": 0}
_OPTIONAL_VIEW = {"schedule": _s, "dedupe_key": _s, "dedupe_scope": _s, "limit_key": _s,
                  "limit_interval": float, "round": _s, "fire_time": float, "not_run": _s,
                  "redelivered": int, "redelivered_at": jobstats.ms_to_s, "lost_worker": _s}
_TRACEBACKS = ("Traceback (most recent call last):",
               "  + Exception Group Traceback (most recent call last):")


def _exception(error: str) -> str:
    """A traceback's last exception on one line, its message whole (its last line may be a
    message's tail, or a group's frame: a group's first sub-exception follows it)."""
    lines = error.rstrip().split("\n")
    start = max((i for i, line in enumerate(lines) if line in _TRACEBACKS), default=None)
    if start is None:
        return lines[-1]
    body, sub = lines[start + 1:], []
    if lines[start] != _TRACEBACKS[0]:   # a group: "  | " lines, then "  +-+---" and its first
        own = [line[4:] for line in body if line.startswith("  | ")]
        # its first ends at "    +---" (a group inside it opens its own with "    +-+---")
        sub = [line[4:] for line in itertools.takewhile(
            lambda line: not line.startswith("    +") or line.startswith("    +-+"),
            body[len(own) + 1:])]
        if any(line.startswith("+-+") for line in sub):   # a group: as one at the top
            sub = sub[1:] if sub[0] == "| " + _TRACEBACKS[1][4:] else sub   # (if raised)
            sub = [_TRACEBACKS[1], *(f"  {line}" for line in sub)]
        else:
            sub = [line[2:] for line in sub]
        body = own
    # frames are indented; the exception starts at the first line that is not
    text = " ".join(line.strip() for line in itertools.dropwhile(
        lambda line: line.startswith(" "), body))
    return f"{text}: {_exception(chr(10).join(sub))}" if sub else text


# What list_jobs reads of a job: all but its result, so a page of jobs stays small
_SUMMARY_FIELDS = [name for name in (*_VIEW, *_OPTIONAL_VIEW) if name != "result"]

# Spec keys kept in a job's hash besides those enqueue.lua writes itself, and how each is
# written. A field at its default is not written: a missing field reads as its default.
_WRITE = {**dict.fromkeys(("func", "parent", "schedule", "dedupe_key", "dedupe_scope", "batch",
                           "limit_key", "round")),   # text, as it is
          "args": codec.pack, "kwargs": codec.pack,
          **dict.fromkeys(("priority", "max_retries", "timeout", "fire_time", "limit_interval"),
                          repr)}


def _fields(spec: dict) -> list:
    out: list = []
    for name, write in _WRITE.items():
        if value := spec.get(name):
            out += (name, value if write is None else write(value))
    return out


class RedisQueue:
    def __init__(self, redis, keys: Keys, *, result_ttl: int = 86400,
                 failed_ttl: int = 7 * 86400, release_keys_on_failure: bool = False,
                 error_max: int = 1 << 20, max_redeliveries: int | None = 5) -> None:
        self.redis, self.keys = redis, keys
        self.error_max = error_max   # (a worker's RESULT_MAX_BYTES) the most of a job's error
        self.result_ttl, self.failed_ttl = result_ttl, failed_ttl
        # (a master's) the jobs it queues with a dedupe key give it back if they fail for
        # good: finish.lua reads that on the job, so a worker's settings have no say
        self.release_keys_on_failure = release_keys_on_failure
        # (a master's: its housekeeping recovers) a job whose worker is lost more often fails
        self.max_redeliveries = max_redeliveries
        self._told_broken: set[str] = set()   # keys of another type a script passed over, logged
        self._enqueue = lua.load(redis, "enqueue", "clock_fn", "expect_fn")
        self._fetch = lua.load(redis, "fetch", "clock_fn", "expect_fn")
        self._finish = lua.load(redis, "finish", "clock_fn", "slot_fn", "expect_fn",
                                "key_release_fn")
        self._heartbeat = lua.load(redis, "heartbeat", "clock_fn")
        self._remove = lua.load(redis, "remove", "jobstats_fn")
        self._cancel = lua.load(redis, "cancel", "clock_fn", "jobstats_fn")
        self._claimed = lua.load(redis, "claimed", "clock_fn")
        ends = ("jobstats_fn", "slot_fn", "key_release_fn", "cancel_end_fn")
        self._release = lua.load(redis, "release", "clock_fn", "expect_fn", "requeue_fn", *ends)
        self._requeue_due = lua.load(redis, "requeue_due", "clock_fn", "expect_fn",
                                     "requeue_fn", *ends)
        self._rerun = lua.load(redis, "rerun", "clock_fn", "expect_fn", "requeue_fn", "jobstats_fn")
        self._worker_order = lua.load(redis, "worker_order")
        self._forget_labels = lua.load(redis, "forget_labels", "clock_fn")
        self._forget_queues = lua.load(redis, "forget_queues", "clock_fn")
        self._list_match = lua.load(redis, "list_match")
        # where each walk of forget_old_names goes on: batches, funcs, queues
        self._cursors = {"batches": 0, "funcs": 0, "queues": 0}

    @property
    def _line(self) -> list[str]:
        """The prefixes the scripts that put jobs in line need: job, queue, wake."""
        k = self.keys
        return [k.job(""), k.queue(""), k.wake("")]

    @property
    def _cancel_end(self) -> list:
        """What end_run (cancel_end_fn.lua) needs besides KEYS."""
        k = self.keys
        return [self.failed_ttl, k.limit_running(""), k.limit_parked(""), k.round(""),
                k.batch(""), k.func("")]

    # --- writes ----------------------------------------------------------------------
    async def enqueue(self, specs: list[dict], *, fence: int | None = None) -> list[Submitted]:
        """Queue normalized specs; a job_id that exists already is left as it is.

        ``fence``: the scheduler's lease token, for its fires (Fenced unless it is current);
        they leave ``keys.fires_pending`` as they are queued. A failed call leaves the
        ENQUEUE_STEPs before it queued: a resend finds them as it finds any job.
        """
        out: list[Submitted] = []
        for i in range(0, len(specs), ENQUEUE_STEP):
            out += await self._enqueue_step(specs[i:i + ENQUEUE_STEP], fence)
        k = self.keys
        periodic = [row for row in out if row.status == Status.SCHEDULED]
        if periodic:   # periodic jobs have these ids: their next fires, as the store has them
            async with self.redis.pipeline(transaction=False) as pipe:
                for row in periodic:
                    pipe.hmget(k.schedule(row.job_id), "next_run_time", "paused")
                for row, (nrt, paused) in zip(periodic, await pipe.execute()):
                    row.next_run_time = float(nrt) if nrt and paused != b"1" else None
        return out

    async def _enqueue_step(self, specs: list[dict], fence: int | None) -> list[Submitted]:
        k = self.keys
        jobs: list = [len(specs)]   # flat: one Lua table for the whole step
        for s in specs:
            fields = _fields(s)
            if self.release_keys_on_failure and s.get("dedupe_key") is not None:
                fields += ("release_key", "1")
            jobs += (s["job_id"], s["queue"], s["priority"], s.get("batch") or "",
                     s.get("round") or "", s.get("func") or "", len(fields), *fields)
        try:
            existing = await self._enqueue(
                keys=[k.seq, k.queues, k.counters, k.batches, k.scheduler_fence,
                      k.fires_pending, k.funcs],
                args=[*self._line, k.batch(""), k.func(""), k.round(""), self.failed_ttl,
                      "" if fence is None else fence, codec.pack_for_lua(jobs),
                      k.dedupe_taking(""), k.schedule(""),
                      # (only jobs with a key: an argument per job cost every call)
                      *(x for i, s in enumerate(specs, 1) if s.get("dedupe_key") is not None
                        for x in (i, k.taker_note(s["dedupe_scope"], s["dedupe_key"])))])
        except ResponseError as exc:
            if error_code(exc) == "FENCED":
                raise Fenced(str(exc)) from None
            raise
        out = [Submitted(s["job_id"], Status.QUEUED) for s in specs]
        for i in range(0, len(existing), 2):
            row = out[int(existing[i]) - 1]
            row.status, row.existed = _s(existing[i + 1]), True
        return out

    async def fetch(self, worker_id: str, queues: Iterable[str], limit: int,
                    lease_seconds: float, ended: Iterable[tuple[str, int, str]] = (),
                    wake_on: WakeOn | None = None, start: int | None = None,
                    holds_suspect: bool = False) -> Fetched:
        """Claim up to ``limit`` jobs; ``ended``: the ``Claim.run`` of claims whose run
        ended, which free their limit keys' slots first; ``start``: how many the worker can
        start now (None: all), the most that may be of a limited key; ``holds_suspect``: it
        holds one already, and may take no other. With ``wake_on`` the fetch waits behind a
        BLPOP on the same connection: a woken worker gets its jobs in one round trip."""
        k = self.keys
        ended = [x for run in ended for x in run]
        keys = [k.inflight, k.status(Status.RUNNING), k.limits, k.limits_due, k.limits_parked,
                k.counters]
        args = [*self._line, k.limit_running(""), k.limit_next(""), k.limit_parked(""),
                k.limit_hold(""), int(lease_seconds * 1000), worker_id, limit,
                limit if start is None else start, "1" if holds_suspect else "0", len(ended) // 3,
                *ended, *queues]
        if wake_on is None:
            reply = await self._fetch(keys=keys, args=args)
        else:   # the script was loaded by this worker's first fetch, which never waits
            pipe = wake_on.conn.pipeline(transaction=False)
            pipe.blpop(wake_on.lists, wake_on.timeout)
            pipe.evalsha(self._fetch.sha, len(keys), *keys, *args)
            # errors as Redis sent them: a pipeline prefixes their text, which hides the
            # code a refusal is told by (NOREPLICAS, MISCONF, BUSY)
            replies = await pipe.execute(raise_on_error=False)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            reply = replies[1]
        rows, wait_ms = reply[:2]
        self._tell_broken("fetch", reply[2:])
        return Fetched([_claim(r) for r in rows], None if wait_ms < 0 else wait_ms / 1000.0)

    async def finish(self, worker_id: str, outcomes: list[Outcome]) -> list[str]:
        """Record outcomes; returns each job's new status (STALE: no longer ours)."""
        k = self.keys
        argv: list[Any] = [k.job(""), k.batch(""), k.dedupe_set(""), self.result_ttl,
                           self.failed_ttl, k.limit_running(""), k.wake(""), k.round(""),
                           k.func(""), k.minute(""), jobstats.MINUTE_TTL, worker_id,
                           k.limit_parked(""), self.error_max, k.limit_hold("")]
        for o in outcomes:
            argv += [o.job_id, o.attempt,
                     "ok" if o.ok else "cancel" if o.cancelled else "err", o.payload,
                     int(o.duration_ms), jobstats.bucket(o.duration_ms), int(o.retry_ms),
                     o.member, int(o.hold_ms)]
        keys = [k.inflight, k.status(Status.RUNNING), k.status(Status.SUCCEEDED),
                k.status(Status.FAILED), k.delayed, k.counters, k.status(Status.RETRYING),
                k.limits_due, k.status(Status.CANCELLED), k.queues]
        reply = await self._finish(keys=keys, args=argv)
        self._tell_broken("finish", reply[len(outcomes):])
        return [_s(s) for s in reply[:len(outcomes)]]

    def _tell_broken(self, what: str, keys: list) -> None:
        """Log, once each, the keys a script left alone for holding another type (or a job
        key with why): an operator's mistake must not stop the work on every other key."""
        if broken := {_s(k) for k in keys} - self._told_broken:
            self._told_broken |= broken   # every fetch, every outcome of a batch meets it
            log.warning("%s: passed over, left as they are: %s (a key named alone holds "
                        "another type than elric writes, overwritten?: delete it)", what,
                        ", ".join(sorted(broken)))

    async def release(self, worker_id: str, claims: list[tuple[str, int, str]], *,
                      reason: str | None = None) -> int:
        """Give back claims (their ``Claim.run``) without using an attempt: to their place in
        line at once, or with a ``reason`` (this worker cannot run them) as retrying in
        HAND_BACK_SECONDS. A claim being cancelled ends cancelled instead (not counted)."""
        if not claims:
            return 0
        k = self.keys
        argv: list[Any] = [*self._line, worker_id,
                           "" if reason is None else int(HAND_BACK_SECONDS * 1000), reason or "",
                           *self._cancel_end]
        argv += [x for claim in claims for x in claim]
        reply = await self._release(
            keys=[k.inflight, k.status(Status.RUNNING), k.seq, k.delayed,
                  k.status(Status.RETRYING), k.counters, k.status(Status.CANCELLED),
                  k.limits_due, k.queues], args=argv)
        self._tell_broken("release", reply[1:])
        return int(reply[0])

    async def claimed(self, worker_id: str, within: float) -> list[tuple[str, int, str]]:
        """The claims (``Claim.run``) Redis holds for this worker, made ``within`` s ago."""
        flat = await self._claimed(keys=[self.keys.status(Status.RUNNING)],
                                   args=[self.keys.job(""), worker_id, int(within * 1000)])
        return [(_s(flat[i]), int(flat[i + 1]), _s(flat[i + 2])) for i in range(0, len(flat), 3)]

    async def heartbeat(self, worker_id: str, claims: list[Claim], lease_seconds: float,
                        fields: dict | None = None) -> Renewed:
        """Renew the leases of ``claims`` and mark the worker seen, on Redis's clock; write
        ``fields`` (its state and load) into its hash; learn what an operator asked of it."""
        held = [x for c in claims for x in c.run]
        if fields is not None:   # how long its silence may last before it is lost (_lost)
            fields = {**fields, "lease_ms": int(lease_seconds * 1000)}
        pairs = [x for item in (fields or {}).items() for x in item]
        k = self.keys
        reply = await self._heartbeat(
            keys=[k.inflight, k.workers, k.worker(worker_id)],
            args=[k.job(""), int(lease_seconds * 1000), worker_id, len(pairs) // 2, *pairs,
                  *held])
        self._tell_broken("heartbeat", reply[3:])
        lost, cancel, (paused, stop, queues, concurrency) = reply[:3]
        return Renewed({_s(i) for i in lost}, {_s(i) for i in cancel},
                       WorkerControl(paused == b"1", stop == b"1",
                                     [q for q in _s(queues).split(",") if q],
                                     int(concurrency) if concurrency.isdigit() else 0))

    async def control_worker(self, worker_id: str, **fields: str) -> str:
        """Ask a worker, through its hash, to pause, resume, stop or change queues or
        processes (its next heartbeat reads it). 'ok'; not asked: 'gone', 'lost', 'stopped'
        or 'stopping' (any order but stop); 'unchanged': an order it was already given."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zscore(self.keys.workers, worker_id)
            pipe.hmget(self.keys.worker(worker_id), "lease_ms", "state")
            pipe.time()
            seen, (lease_ms, state), (seconds, micros) = await pipe.execute()
        # one that stopped is silent too: it is said stopped (worker_order), as listed
        if seen is not None and state != b"stopped" and \
                _lost(seen, _s(lease_ms), seconds + micros / 1e6):
            return "lost"
        args = [worker_id, *(x for pair in fields.items() for x in pair)]
        return _s(await self._worker_order(keys=[self.keys.workers, self.keys.worker(worker_id)],
                                          args=args))

    async def forget_old_workers(self) -> None:
        """A worker silent past its hash's life leaves the list: every start has a new id."""
        cutoff = (await redis_now(self.redis) - WORKER_KEPT) * 1000
        await self.redis.zremrangebyscore(self.keys.workers, "-inf", f"({cutoff:.0f}")

    async def forget_old_names(self) -> None:
        """A batch or func whose jobs have all ended, and a queue that holds none, leave
        stats once their last jobs have surely expired: names per run else add rows for
        good. A page of each set a call."""
        k, kept = self.keys, max(self.result_ttl, self.failed_ttl)
        walks = {"batches": (self._forget_labels, [k.batches], [k.batch(""), kept]),
                 "funcs": (self._forget_labels, [k.funcs], [k.func(""), kept]),
                 "queues": (self._forget_queues, [k.queues, k.counters, k.limits_parked],
                            [k.queue(""), k.wake(""), kept])}

        async def walk(name: str) -> None:
            script, keys, args = walks[name]
            self._cursors[name] = int(await script(keys=keys,
                                                   args=[*args, self._cursors[name]]))
        await each(walks, walk)   # one set of another type must not stop the others

    async def recover(self) -> tuple[list[str], list[str], list[str]]:
        """Queue again, in their old place, the jobs whose lease ran out (being cancelled:
        cancelled; lost over ``max_redeliveries`` times: failed). Returns the ids of each."""
        back, cancelled, failed, _ = await self._due(self.keys.inflight, Status.RUNNING,
                                                     True, "redelivered")
        return back, cancelled, failed

    async def promote(self) -> tuple[int, int]:
        """Queue again the retrying jobs whose backoff is over. Returns (jobs queued again,
        due entries handled): DUE_STEP handled means more may be due, however few queued."""
        back, _, _, handled = await self._due(self.keys.delayed, Status.RETRYING, False, "")
        return len(back), handled

    async def _due(self, due_set: str, status: Status, keep_place: bool,
                   counter: str) -> tuple[list[str], list[str], list[str], int]:
        k = self.keys
        cap = "" if self.max_redeliveries is None else self.max_redeliveries
        back, cancelled, broken, failed, handled = await self._requeue_due(
            keys=[due_set, k.status(status), k.seq, k.counters, k.status(Status.CANCELLED),
                  k.limits_due, k.queues, k.status(Status.FAILED)],
            args=[*self._line, DUE_STEP, status, "1" if keep_place else "0", counter,
                  *self._cancel_end, cap, k.dedupe_set(""), k.minute(""), jobstats.MINUTE_TTL])
        self._tell_broken("redeliver" if keep_place else "retry", broken)
        return ([_s(i) for i in back], [_s(i) for i in cancelled], [_s(i) for i in failed],
                int(handled))

    async def next_delayed(self) -> float | None:
        """Seconds until the next retry is due, or None if none waits."""
        first = await self.redis.zrange(self.keys.delayed, 0, 0, withscores=True)
        if not first:
            return None
        return max(0.0, first[0][1] / 1000.0 - await redis_now(self.redis))

    async def _per_job(self, script, job_ids: list[str], keys_args) -> list:
        """``script`` once per job, with ``keys_args(job_id)``, all in one round trip (a
        bulk step's 2,000 calls one by one cost the master far more than Redis): each
        reply, or the error Redis answered for that job."""
        if len(job_ids) == 1:   # (a pipeline asks SCRIPT EXISTS first: a second round trip)
            keys, args = keys_args(job_ids[0])
            try:
                return [await script(keys=keys, args=args)]
            except ResponseError as exc:
                return [exc]
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                keys, args = keys_args(job_id)
                await script(keys=keys, args=args, client=pipe)
            return await pipe.execute(raise_on_error=False)

    async def remove(self, job_id: str) -> bool:
        """Delete a job that is not running; raises Refused for a running one."""
        return raised((await self.remove_many([job_id]))[0])

    async def remove_many(self, job_ids: list[str]) -> list[bool | Refused]:
        """remove of each job; a running one's Refused in its place."""
        k = self.keys
        replies = await self._per_job(self._remove, job_ids, lambda job_id: (
            [k.job(job_id), k.inflight, k.delayed, k.limits_parked],
            [k.queue(""), k.status(""), job_id, k.limit_parked(""), k.round(""), k.batch(""),
             k.func(""), self.failed_ttl]))
        return [self._removed(job_id, reply) for job_id, reply in zip(job_ids, replies)]

    def _removed(self, job_id: str, reply) -> bool | Refused:
        if isinstance(reply, ResponseError):
            if error_code(reply) == "RUNNING":
                return Refused(f"job {job_id!r} is running; cancel it (cancel_job, elric "
                               "cancel ID) and remove it once it has stopped")
            raise reply
        self._tell_broken("remove", reply[1:])
        return bool(reply)

    async def cancel(self, job_id: str) -> str | None:
        """Cancel a job (cancel.lua); returns the status it had, None when there is none;
        raises Unreadable when its key holds another type."""
        return raised((await self.cancel_many([job_id]))[0])

    async def cancel_many(self, job_ids: list[str]) -> list[str | None | Unreadable]:
        """cancel of each job; Unreadable in the place of one whose key holds another type."""
        k = self.keys
        replies = await self._per_job(self._cancel, job_ids, lambda job_id: (
            [k.job(job_id), k.delayed, k.limits_parked, k.status(Status.CANCELLED), k.counters,
             k.queues],
            [k.queue(""), k.status(""), job_id, k.limit_parked(""), k.round(""),
             self.failed_ttl, k.batch(""), k.func("")]))
        return [self._cancelled(job_id, reply) for job_id, reply in zip(job_ids, replies)]

    def _cancelled(self, job_id: str, reply) -> str | None | Unreadable:
        if isinstance(reply, ResponseError):
            if error_code(reply) == "UNREADABLE":
                return Unreadable(job_id, self.keys.job(job_id))
            raise reply
        self._tell_broken("cancel", reply[1:])
        return _s(reply[0]) if reply else None

    async def rerun(self, job_id: str) -> str:
        """Queue a finished job again; raises NotFound / Refused with the reason."""
        return raised((await self.rerun_many([job_id]))[0])

    async def rerun_many(self, job_ids: list[str]) -> list[str | NotFound | Refused]:
        """rerun of each job; the NotFound or Refused that says why not in its place."""
        k = self.keys
        replies = await self._per_job(self._rerun, job_ids, lambda job_id: (
            [k.job(job_id), k.seq, k.counters, k.queues],
            [k.queue(""), k.wake(""), k.status(""), job_id, k.round(""), self.failed_ttl,
             k.batch(""), k.func("")]))
        return [_rerun_outcome(job_id, reply) for job_id, reply in zip(job_ids, replies)]

    # --- reads -----------------------------------------------------------------------
    @staticmethod
    def job_view(job_id: str, h: dict[bytes, bytes]) -> dict:
        """The ``get_job`` map of one job hash: each field read as _VIEW says; the
        optional ones only when set; those it cannot read are None, named in "unreadable"."""
        view: dict = {"job_id": job_id}
        bad: list[str] = []
        for name, read in _VIEW.items():
            value = h.get(name.encode())
            view[name] = _read(name, read, value, bad) if value else _EMPTY.get(name)
        # no attempt runs while queued: the last one's start (a lost run's) is not its start
        if view["status"] == "queued":
            view["started_at"] = None
        duration = view.pop("duration_ms")
        # 0: a job done within its first millisecond (it ran: not None, as if it had not)
        view["duration"] = None if duration is None else duration / 1000.0
        for name, read in _OPTIONAL_VIEW.items():
            if h.get(name.encode()):
                view[name] = _read(name, read, h[name.encode()], bad)
        if bad:
            view["unreadable"] = ", ".join(bad)
        return view

    async def _summaries(self, job_ids: list[str]) -> list[tuple[dict, int]]:
        """Per job: its hash without the result (empty: no such job; None: its key holds
        another type, an operator's), and the result's size."""
        rows = await self.read_jobs(job_ids, ("hmget", _SUMMARY_FIELDS), ("hstrlen", "result"))
        return [(None, 0) if isinstance(size, ResponseError) else
                ({name.encode(): v for name, v in zip(_SUMMARY_FIELDS, values) if v is not None},
                 size) for values, size in zip(rows[::2], rows[1::2])]

    def summary_view(self, job_id: str, h: dict[bytes, bytes], result_bytes: int) -> dict:
        """A list_jobs row: the get_job map with the result's size, the error's last exception."""
        view = self.job_view(job_id, h)
        del view["result"]
        view["result_bytes"] = result_bytes
        if view["error"]:
            view["error"] = _exception(view["error"])
        return view

    async def get_job(self, job_id: str) -> dict | None:
        return (await self.get_jobs([job_id]))[0]

    async def get_jobs(self, job_ids: list[str]) -> list[dict | None]:
        """Per job: its get_job map, or None when there is no such job (one round trip)."""
        hashes = await self.read_jobs(job_ids, ("hgetall",))
        return [self._view_or_none(job_id, h) for job_id, h in zip(job_ids, hashes)]

    def _view_or_none(self, job_id: str, h: dict | Exception) -> dict | None:
        if isinstance(h, Exception):   # its key holds another type (an operator's): named
            return self._not_a_hash(self.job_view(job_id, {}))
        return self.job_view(job_id, h) if h else None

    async def read_jobs(self, job_ids: list[str], *reads: tuple) -> list:
        """Each of ``reads`` (a command's name and its arguments past the key) on each job's
        key, in one round trip: the replies, the WRONGTYPE error of a key of another type (an
        operator's) in its place; any other error (an outage, a refusal) raised as it came."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                for command, *args in reads:
                    getattr(pipe, command)(self.keys.job(job_id), *args)
            replies = await pipe.execute(raise_on_error=False)
        for reply in replies:
            if isinstance(reply, Exception) and error_code(reply) != "WRONGTYPE":
                raise reply
        return replies

    def _not_a_hash(self, view: dict) -> dict:
        view["unreadable"] = view["error"] = \
            f"{self.keys.job(view['job_id'])} is not a hash (overwritten?)"
        return view

    async def get_holds(self, job_ids: list[str]) -> list[Hold | None]:
        """Per job: its status and dedupe key and scope, or None when there is no such job;
        raises Unreadable naming the first job whose key holds another type."""
        rows = await self.read_jobs(job_ids, ("hmget", "status", "dedupe_key", "dedupe_scope"))
        for job_id, row in zip(job_ids, rows):
            if isinstance(row, Exception):
                raise Unreadable(job_id, self.keys.job(job_id))
        return [None if row[0] is None else Hold(*map(_s, row)) for row in rows]

    async def lines(self, queue: str | None = None) -> list[tuple[int, str, str]]:
        """Where queued jobs wait, in a stable order: (0, name, its sorted set) for ``queue``
        or every queue, then (1, limit key, its parked set) for each key holding jobs back."""
        k = self.keys
        names = [queue] if queue else sorted(map(_s, await self.redis.smembers(k.queues)))
        keys = sorted(map(_s, await self.redis.zrange(k.limits_due, 0, -1)))
        return [(0, q, k.queue(q)) for q in names] + [(1, lk, k.limit_parked(lk)) for lk in keys]

    async def list_jobs(self, **filters) -> list[dict]:
        return (await self.list_page(**filters))[0]

    async def list_page(self, *, status: str | None = None, queue: str | None = None,
                        func: str | None = None, batch: str | None = None, offset: int = 0,
                        limit: int = 100, scan_limit: int = 100_000,
                        cursor: str = "") -> tuple[list[dict], str]:
        """Newest first within each status (queued jobs: per queue, the last in line
        first); filters on queue, func and batch. Also the cursor to go on from when
        ``scan_limit`` stopped the page before it filled ("" otherwise): a page by a rare
        func or batch is not empty merely because other jobs came first. ``offset`` counts
        from the ``cursor``."""
        order = [s for s in STATUSES if s not in (Status.SCHEDULED, Status.FILTERED)]
        statuses = [status] if status else order
        wanted = {"queue": queue, "func": func, "batch": batch}
        places = []   # ((status's place, kind, name), index, members carry a sequence, status)
        for st in statuses:
            n = order.index(st) if st in order else len(order)
            if st == Status.QUEUED:
                places += [((n, kind, name), key, True, st)
                           for kind, name, key in await self.lines(queue)]
            else:
                places.append(((n, 2, ""), self.keys.status(st), False, st))
        at, skip = (0, None, 0), offset   # skip: matching jobs still to pass over
        after = b""   # the last entry the cursor's page looked at
        if cursor:   # "matches to skip:status's place:kind:rank:last entry (hex):name"
            try:
                more, n, kind, rank, last, name = cursor.split(":", 5)
                skip, at = skip + int(more), (int(n), int(kind), name, int(rank))
                after = bytes.fromhex(last)
                if min(skip, at[3]) < 0:
                    raise ValueError
            except ValueError:
                raise SpecError(f"bad cursor {cursor!r}: pass back the one a page "
                                "answered, or none to begin") from None
            places = [p for p in places if p[0] >= at[:3]]
        out: list[dict] = []
        listed: set[str] = set()   # a job that moves on while we read shows up once
        scanned, went_on = 0, ""
        for place, index, in_line, st in places:
            start, last = (at[3], after) if place == at[:3] else (0, b"")
            if len(out) >= limit:
                break
            if scanned >= scan_limit:   # stopped before this index's end (or start)
                went_on = f"{skip}:{place[0]}:{place[1]}:{start}::{place[2]}"
                break
            if last:   # after it, wherever it is now: jobs before it may have left, or come
                rank = await self.redis.zrevrank(index, last)
                start = start if rank is None else rank + 1
            if func is not None or batch is not None or (
                    queue is not None and index != self.keys.queue(queue)):
                # Redis picks out the matches: only those are read here
                pairs = [x for f, v in wanted.items() if v is not None for x in (f, v)]
                while len(out) < limit and scanned < scan_limit and start >= 0:
                    start, looked, seen, *ids = await self._list_match(keys=[index], args=[
                        self.keys.job(""), int(in_line), start,
                        min(MATCH_STEP, scan_limit - scanned), skip + limit - len(out),
                        st, *pairs])
                    scanned, last = scanned + looked, seen or last
                    ids = [i for i in dict.fromkeys(map(_s, ids)) if i not in listed]
                    listed.update(ids[:skip])   # matched in Redis just now: passed over unread
                    out += (await self._views(ids[skip:], st, wanted, listed))[0]
                    skip = max(0, skip - len(ids))
            else:
                if skip:   # every job it holds matches: pass over them unread (reading them
                    # all made a deep page take seconds, and empty past scan_limit)
                    first, start = start, min(start + skip, await self.redis.zcard(index))
                    skip, last = skip - (start - first), b""   # (passed over: by rank)
                while len(out) < limit and scanned < scan_limit and start >= 0:
                    members = await self.redis.zrevrange(index, start, start + 499)
                    if not members:
                        start = -1   # the index ended
                        break
                    start, last = start + len(members), members[-1]
                    scanned += len(members)
                    ids = [_s(m[17:] if in_line else m) for m in members]  # {seq:016x}:{id}
                    rows, gone = await self._views(ids, st, wanted, listed)
                    out += rows[skip:]
                    skip = max(0, skip - len(rows))
                    if gone and not in_line:  # expired results: their entries go too
                        await self.redis.zrem(index, *(members[i] for i in gone))
                        start -= len(gone)
            if start >= 0 and len(out) < limit:   # the scan limit stopped it in this index
                went_on = f"{skip}:{place[0]}:{place[1]}:{start}:{last.hex()}:{place[2]}"
                break
        return out[:limit], went_on

    async def _views(self, ids: list[str], status: str, wanted: dict,
                     listed: set[str]) -> tuple[list[dict], list[int]]:
        """The rows of ``ids`` still in ``status`` (else an index lagging) that match
        ``wanted``, not ``listed`` yet (now they are); and where in ``ids`` jobs are gone."""
        rows, gone = [], []
        for i, (job_id, (h, size)) in enumerate(zip(ids, await self._summaries(ids))):
            unread = h is None   # listed as its index has it, named
            if unread:
                h = {b"status": status.encode()}
            if not h:
                gone.append(i)
            elif h.get(b"status") == status.encode() and job_id not in listed:
                view = self.summary_view(job_id, h, size)
                if unread:
                    self._not_a_hash(view)
                if all(v is None or view[n] == v for n, v in wanted.items()):
                    rows.append(view)
                    listed.add(job_id)
        return rows, gone

    async def stats(self, *, for_metrics: bool = False) -> dict:
        """``for_metrics``: every func's row, not the STATS_ROWS last active (a counter must
        not leave a scrape and come back), and no batch or minute row (/metrics shows none)."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smembers(k.queues)
            pipe.smembers(k.funcs)
            pipe.time()
            if not for_metrics:
                pipe.smembers(k.batches)
            queues, every_func, (seconds, micros), *every_batch = await pipe.execute()
        queues, every_func = sorted(map(_s, queues)), [_s(f) for f in every_func]
        every_batch = [_s(b) for group in every_batch for b in group]
        batches = await self._latest(every_batch, k.batch)
        funcs = sorted(every_func) if for_metrics else await self._latest(every_func, k.func)
        now = seconds + micros / 1e6   # Redis's clock, as the scripts'
        last = int(now // 60)
        minutes = () if for_metrics else range(last - jobstats.THROUGHPUT_MINUTES + 1, last + 1)
        # one snapshot (MULTI): the running jobs split per func and batch are the ones the
        # counts call running, however many start or end meanwhile
        async with self.redis.pipeline(transaction=True) as pipe:
            for st in STATUSES:
                pipe.zcard(k.status(st))
            for q in queues:
                pipe.zcard(k.queue(q))
            pipe.hgetall(k.counters)
            for b in batches:
                pipe.hgetall(k.batch(b))
            for f in funcs:
                pipe.hgetall(k.func(f))
            for m in minutes:
                pipe.hgetall(k.minute(m))
            pipe.hgetall(k.limits_parked)
            pipe.zrange(k.status(Status.RUNNING), 0, MAX_RUNNING_SPLIT - 1)
            res = iter(await pipe.execute())
        # each zip takes as many replies as it has names (zip reads its first argument first)
        by_status = dict(zip(STATUSES, res))
        queue_sizes = dict(zip(queues, res))
        counters = {_s(a): int(b) for a, b in next(res).items()}
        batch_rows, func_rows = dict(zip(batches, res)), dict(zip(funcs, res))
        minute_rows = dict(zip(minutes, res))
        parked = {_s(q): int(n) for q, n in next(res).items()}
        # what runs now, per func and batch (a job's func and batch never change): the rest
        # of their live jobs wait
        async with self.redis.pipeline(transaction=False) as pipe:
            for job_id in next(res):
                pipe.hmget(k.job(_s(job_id)), "func", "batch")
            running_jobs = await pipe.execute()
        running_funcs = Counter(_s(func) for func, _ in running_jobs if func)
        running_batches = Counter(_s(batch) for _, batch in running_jobs if batch)
        # a queued job waits in its queue, or parked while its limit key is at its limit
        waiting = {q: n + parked.get(q, 0) for q, n in queue_sizes.items()}
        by_status[Status.QUEUED] = sum(waiting.values())  # queued jobs are indexed per queue
        by_queue = {q: {"queued": waiting[q], **{
            st: counters.get(f"queue:{q}:{st}", 0)
            for st in ("submitted", "succeeded", "failed", "retrying")}} for q in queues}
        return {
            "by_status": by_status,
            "by_queue": by_queue,
            "batches": {b: jobstats.JobStats.from_hash(row).batch_view(running_batches[b])
                        for b, row in batch_rows.items()},
            "funcs": {f: jobstats.JobStats.from_hash(row).func_view(running_funcs[f])
                      for f, row in func_rows.items()},
            "throughput": [jobstats.throughput_row(m, row) for m, row in minute_rows.items()],
            "totals": {name: counters.get(name, 0) for name in
                       ("submitted", "succeeded", "failed", "retrying", "redelivered",
                        "handed_back", "cancelled", "started", "start_latency_ms")},
            "more": {"batches": len(every_batch) - len(batches),
                     "funcs": len(every_func) - len(funcs)},
            "workers": await self.workers(),
            "now": now,   # for "ago": the caller's clock may be off
        }

    async def _latest(self, names: list[str], stats_key) -> list[str]:
        """The STATS_ROWS of ``names`` (batches or funcs) whose stats hash ``stats_key(name)``
        was last active, in name order."""
        if len(names) > STATS_ROWS:
            async with self.redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hget(stats_key(name), "last_at")
                last = [int(at or 0) for at in await pipe.execute()]
            names = [name for _, name in heapq.nlargest(STATS_ROWS, zip(last, names))]
        return sorted(names)

    async def workers(self) -> list[dict]:
        """Every worker's last heartbeat, alive or not, those at work first (the workers page
        reads only this)."""
        k = self.keys
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrange(k.workers, 0, -1, withscores=True)
            pipe.time()
            workers_seen, (seconds, micros) = await pipe.execute()
        now = seconds + micros / 1e6
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, _ in workers_seen:
                pipe.hgetall(k.worker(_s(wid)))
            infos = await pipe.execute()
        workers = []
        for (wid, seen), info in zip(workers_seen, infos):
            # (not what was asked of it: "state", "queues" and "concurrency" are what it does)
            row = {_s(a): _s(b) for a, b in info.items() if a not in _ORDERS}
            for key in ("pid", "concurrency", "async_concurrency", "processed", "done",
                        "failed", "in_flight", "rss_bytes", "started_at", "lease_ms"):
                if str(row.get(key, "")).isdigit():   # numbers are numbers (a bad value stays)
                    row[key] = int(row[key])
            with contextlib.suppress(KeyError, ValueError):
                row["cpu_percent"] = float(row["cpu_percent"])
            if isinstance(row.get("started_at"), int):   # times are epoch seconds
                row["started_at"] /= 1000.0
            row.update(worker_id=_s(wid), last_seen=seen / 1000.0,
                       alive=bool(info) and not _lost(seen, row.get("lease_ms"), now))
            if not row["alive"] or row.get("state") == "stopped":
                # trouble is what a running worker's work is stuck on: a stopped or lost
                # one's last heartbeat told of a wait that is over
                row["trouble"] = ""
            workers.append(row)
        # those at work first, the latest heartbeat first: a list cut short cuts the gone ones
        return sorted(workers, key=lambda w: (not w["alive"] or w.get("state") == "stopped",
                                              -w["last_seen"]))
