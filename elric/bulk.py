"""Operations on many jobs chosen by a filter: rerun, copy, cancel, delete, or find (ids).

A call walks the status indexes (queued jobs: their queues) with ZSCAN a step at a time,
and returns a cursor to go on from. ZSCAN may return a job twice: each action is safe to
repeat (a copy's id derives from its source's and the operation's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from elric.contract import MIN_MESSAGE, STATUSES, NotFound, Refused, SpecError, Status
from elric.rpc import packed_size

ACTIONS = ("rerun", "copy", "cancel", "delete", "find")   # find: only list the ids
STEP = 2000   # jobs looked at per call
SCAN = 500    # per ZSCAN round trip
# bytes of ids a find step answers: what any master and client take (2,000 ids of 200
# characters are ~400 kB), less room for the rest of the reply (a cursor naming a limit key)
FOUND_ROOM = MIN_MESSAGE - 4096
_FIELDS = ("status", "queue", "func", "batch", "worker", "enqueued_at")
# statuses with an index of their own (queued jobs are indexed by their queue)
_INDEXED = [s for s in STATUSES if s not in (Status.QUEUED, Status.SCHEDULED, Status.FILTERED)]
YEAR_10000 = 253402300800   # epoch seconds: a since or until past it was given in ms


@dataclass(frozen=True)
class JobFilter:
    """Which jobs an operation touches; every given field must match."""

    status: str | None = None
    queue: str | None = None
    func: str | None = None
    batch: str | None = None
    worker: str | None = None
    since: float | None = None    # submitted at or after (epoch seconds)
    until: float | None = None    # submitted before
    ids: list[str] = field(default_factory=list)
    STATUSES = (Status.QUEUED, *_INDEXED)   # those a walk finds (queued: in their queues)

    @classmethod
    def parse(cls, raw: dict) -> JobFilter:
        """A filter whose keys, names and status the master has checked (master._filter)."""
        for key in ("since", "until"):
            if raw.get(key) is not None and (isinstance(raw[key], bool)
                                             or not isinstance(raw[key], (int, float))):
                raise SpecError(f"filter {key} must be epoch seconds")
            if raw.get(key) is not None and raw[key] >= YEAR_10000:   # (then no job matched)
                raise SpecError(f"filter {key} {raw[key]!r} is after the year 9999: give epoch "
                                "seconds, not milliseconds")
        if raw.get("since") is not None and raw.get("until") is not None \
                and raw["until"] <= raw["since"]:   # (it matched no job: "0 jobs done")
            raise SpecError(f"filter until {raw['until']!r} is not after since "
                            f"{raw['since']!r}: no job was submitted between them; swap them, "
                            "or leave one out")
        ids = raw.get("ids") or []
        if not isinstance(ids, list) or not all(isinstance(i, str) and i for i in ids):
            raise SpecError("filter ids must be an array of job ids")
        ids = list(dict.fromkeys(ids))   # an id given twice is one job: done and counted once
        if not ids and not any(raw.get(k) is not None for k in _FIELDS[:5] + ("since", "until")):
            raise SpecError("an empty filter would touch every job: give at least one of "
                            "status, queue, func, batch, worker, since, until or ids")
        return cls(**{**raw, "ids": ids})

    @property
    def wanted(self) -> dict:
        """The job fields asked for (the first five of _FIELDS), by name."""
        return {name: getattr(self, name) for name in _FIELDS[:5]
                if getattr(self, name) is not None}

    def matches(self, values: list) -> bool:
        have = dict(zip(_FIELDS, values))
        return all(have[name] == want for name, want in self.wanted.items()) and \
            self.submitted_in(have["enqueued_at"])

    def submitted_in(self, enqueued) -> bool:
        """Whether a job's ``enqueued_at`` (ms; None when unset) is within since and until."""
        at = float(enqueued) / 1000 if enqueued else None
        return (self.since is None or (at is not None and at >= self.since)) and \
            (self.until is None or (at is not None and at < self.until))


@dataclass
class Step:
    """What one call did, and where the next one starts ("" when the walk is over)."""

    touched: int = 0
    skipped: int = 0      # matched but could not be done (a running job cannot be deleted)
    cursor: str = ""
    errors: list[str] = field(default_factory=list)   # the first few reasons for skips
    ids: list[str] = field(default_factory=list)      # what "find" found
    not_found: list[str] = field(default_factory=list)   # ids given that are no job

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.errors) < 5:
            self.errors.append(reason)


@dataclass
class Walked:
    """What one step's walk met: the ids its filter picks, the cursor to go on from ("":
    over), the ids given that are no job, and the jobs whose key holds another type (an
    operator's): their fields cannot be told, so they are named, not picked."""

    chosen: list[str]
    cursor: str
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)


# what does to a periodic job what an action would: it has no job record of its own
_PERIODIC = {"cancel": "pause|remove {} stops it", "delete": "remove {} removes it",
             "rerun": "run-now {} fires it now", "copy": "run-now {} fires it now"}


def left_alone(job_id: str, was: str | None, action: str = "cancel") -> str:
    """Why a cancel (of one job or many), or a bulk delete, rerun or copy, left a job alone."""
    if was == Status.SCHEDULED:
        return f"job {job_id!r} is periodic: elric schedules " + \
            _PERIODIC[action].format(job_id)
    return f"job {job_id!r} had ended ({was}): left alone" if was else f"no job {job_id!r}"


def schedule_left_alone(job: dict | None, action: str) -> str | None:
    """Why pause or resume leaves a periodic job, as job_kind showed it just before, as it
    is (resume_job answers only whether it exists; pause_job refuses a finished one);
    None: it changes it."""
    if not job or action not in ("pause", "resume"):
        return None
    if job.get("status") == "finished":
        return f"has finished: no fires are left to {action}"
    if job.get("paused") == (action == "pause"):
        return "already paused" if action == "pause" else "was not paused"
    return None


def not_run(reply: dict, wait: float) -> str | None:
    """Why a run-now (run_job's reply, having waited ``wait`` seconds) ran nothing, or was
    not seen to; None: it queued a job."""
    run, fire = reply["run"], reply["fire_id"]
    if run is None:   # asked, but not seen to happen: no success
        return (f"{fire} asked for; not fired within {wait:g}s (is a master scheduling? see "
                "elric health)")
    if run["outcome"] in ("skipped", "missed", "filtered"):   # it ran no job
        return f"{fire} {run['outcome']} ({run.get('reason', '')})"
    return None


class Bulk:
    def __init__(self, queue, admission, redis, keys, store) -> None:
        self.queue, self.admission, self.redis, self.keys = queue, admission, redis, keys
        self.store = store   # tells a periodic job's id (no job record) from a mistyped one
        from elric import lua   # here: the CLI imports this module, and lua imports redis-py
        self._match = lua.load(redis, "bulk_match")

    async def _indexes(self, f: JobFilter,
                       live_only: bool) -> list[tuple[tuple[int, str], str, bool]]:
        """The indexes to walk, in order: (place, key, whether members carry a sequence)."""
        lines = await self.queue.lines(f.queue) if f.status in (None, Status.QUEUED) else []
        out = [((kind, name), key, True) for kind, name, key in lines]
        out += [((2, f"{n}"), self.keys.status(s), False) for n, s in enumerate(_INDEXED)
                if f.status in (None, s) and (Status(s).live or not live_only)]
        return sorted(out)

    async def walk(self, f: JobFilter, cursor: str = "", fresh_only: bool = False,
                   live_only: bool = False, room: float = math.inf) -> Walked:
        """Look at up to STEP jobs from ``cursor`` on, and say what they were (Walked).
        ``fresh_only``: pass over jobs queued since the walk began (its rerun or copies).
        ``live_only``: skip ended jobs' indexes (a cancel would meet its own there again).
        ``room``: the ids picked take at most that many bytes packed: the step ends before
        a ZSCAN page that would pass them, and a first page that would is scanned again in
        fewer."""
        if not cursor:   # "began (ms):kind of index:scan cursor:index name"
            seconds, micros = await self.redis.time()
            cursor = f"{seconds * 1000 + micros // 1000}:0:0:"
        try:
            began, kind, scan, name = cursor.split(":", 3)
            began, kind, scan = int(began), int(kind), int(scan)
        except ValueError:
            raise SpecError(f"bad cursor {cursor!r}: pass back the one the last step "
                            "answered, or \"\" to begin") from None
        before = began if fresh_only else None
        if f.ids:   # the walk goes along the list; scan is the position in it
            walked = await self._matching(f, f.ids[scan:scan + STEP], before)
            walked.cursor = f"{began}:0:{scan + STEP}:" if scan + STEP < len(f.ids) else ""
            return walked
        place = (kind, name)
        indexes = [i for i in await self._indexes(f, live_only) if i[0] >= place]
        if indexes and indexes[0][0] != place:
            scan = 0   # that index is gone (a parked set emptied): the next one from its start
        looked, chosen, unreadable = 0, [], []
        pairs = [x for item in f.wanted.items() for x in item]
        count = SCAN
        while indexes and looked < STEP:
            key, prefixed = indexes[0][1:]
            # Redis picks out the jobs whose fields match (gone since: passed over)
            went_on, n, n_bad, *found = await self._match(keys=[key], args=[
                self.keys.job(""), int(prefixed), scan, count, *pairs])
            bad, found = [job_id.decode() for job_id in found[:n_bad]], found[n_bad:]
            picked = [job_id.decode() for job_id, at in zip(found[::2], found[1::2])
                      if f.submitted_in(at) and (before is None or int(at or 0) < before)]
            size = sum(map(packed_size, picked)) if room < math.inf else 0
            if size > room and chosen:   # the next step's page
                break
            if size > room and count > 1:   # alone: again, in fewer
                count = max(1, count // 4)
                continue
            chosen += picked
            unreadable += bad
            scan, looked, room = int(went_on), looked + n, room - size
            if scan == 0:
                indexes.pop(0)
        place = indexes[0][0] if indexes else ()
        return Walked(chosen, f"{began}:{place[0]}:{scan}:{place[1]}" if place else "",
                      unreadable=unreadable)

    async def _matching(self, f: JobFilter, ids: list[str], before: int | None) -> Walked:
        """Those of ``ids`` that ``f`` picks, that are no job, and that hold another type."""
        walked = Walked([], "")
        for job_id, row in zip(ids, await self.queue.read_jobs(ids, ("hmget", *_FIELDS))):
            if isinstance(row, Exception):
                walked.unreadable.append(job_id)
            elif row[0] is None:
                walked.missing.append(job_id)
            elif f.matches([v.decode() if v else None for v in row]) and \
                    (before is None or int(row[-1] or 0) < before):
                walked.chosen.append(job_id)
        return walked

    async def run(self, action: str, f: JobFilter, cursor: str = "", op: str = "") -> Step:
        if action not in ACTIONS:
            raise SpecError(f"unknown bulk action {action!r}; one of {', '.join(ACTIONS)}")
        if action == "copy" and not op:
            raise SpecError("copy needs an operation id (op) to name the copies by")
        for kind, name, known, plural in (
                ("queue", f.queue, self.keys.queues, "queues"),
                ("func", f.func, self.keys.funcs, "funcs"),
                ("batch", f.batch, self.keys.batches, "batches")):
            if not cursor and name is not None and not await self.redis.sismember(known, name):
                # (a mistyped name did nothing, and said "0 jobs done")
                names = sorted(n.decode() for n in await self.redis.smembers(known))
                periodic = name.rpartition("@")[0]   # a round's id is its fire's: "job@time"
                if kind == "batch" and periodic and await self.store.existing([periodic]):
                    raise NotFound(f"no batch {name!r}: {name!r} is a round of periodic job "
                                   f"{periodic!r}, not a batch (elric job {periodic} shows each "
                                   f"round's progress; give {periodic} a batch to list "
                                   "its rounds' jobs with --batch)")
                lately = "was queued there" if kind == "queue" else "of it was submitted"
                raise NotFound(f"no {kind} {name!r}: no job {lately} lately ({plural}: "
                               f"{', '.join(names[:10]) or 'none'}"
                               f"{', ...' if len(names) > 10 else ''})")
        walked = await self.walk(
            f, cursor, fresh_only=action in ("rerun", "copy"), live_only=action == "cancel",
            room=FOUND_ROOM if action == "find" else math.inf)
        chosen = list(dict.fromkeys(walked.chosen))   # an id met twice by ZSCAN: once
        step = Step(cursor=walked.cursor)
        from elric.queue import Unreadable   # (here, as lua: it imports redis-py)
        if action == "delete" and f.ids:
            # as its message says to do; one met in a walk is skipped: its fields cannot say
            # whether the filter picks it (a walk goes through other queues' jobs too)
            chosen = list(dict.fromkeys(chosen + walked.unreadable))
        else:
            for job_id in dict.fromkeys(walked.unreadable):   # one overwritten stops no other
                step.skip(str(Unreadable(job_id, self.keys.job(job_id))))
        # an id given that is no job is said not found, not counted as skipped; a periodic
        # job's says what does that to it (its schedule looked for, not read)
        periodic = await self.store.existing(walked.missing) if action in _PERIODIC else set()
        for job_id in walked.missing:
            if job_id in periodic:
                step.skip(left_alone(job_id, Status.SCHEDULED, action))
            else:
                step.not_found.append(job_id)
        if action == "find":
            step.ids, step.touched = chosen, len(chosen)
        elif action == "copy":
            await self._copy(chosen, op, step)
        else:
            await self._act(action, chosen, step)
        return step

    async def _act(self, action: str, chosen: list[str], step: Step) -> None:
        many = {"rerun": self.admission.rerun_many, "cancel": self.queue.cancel_many,
                "delete": self.queue.remove_many}[action]
        for job_id, was in zip(chosen, await many(chosen) if chosen else []):
            if isinstance(was, (Refused, NotFound)):   # e.g. running, or not finished
                step.skip(str(was))
            elif action == "cancel" and (was is None or not Status(was).live):
                step.skip(left_alone(job_id, was))
            elif action == "delete" and not was:   # gone meanwhile: not done by this one
                step.skip(f"no job {job_id!r}")
            else:
                step.touched += 1

    async def _copy(self, ids: list[str], op: str, step: Step) -> None:
        """New jobs with the sources' func, arguments and options (limit key too: a copy
        makes the same requests), ids ``{id}~{op}``; no dedupe key (a copy is asked for on
        purpose), but its scope: what a copy submits is deduped with its source's crawl."""
        specs, sources = [], []
        for job_id, job in zip(ids, await self.queue.get_jobs(ids)):
            if job is None:   # deleted, or its record expired, since the walk met it
                step.skip(f"no job {job_id!r}")
                continue
            if job.get("unreadable"):   # copied, those fields would take their defaults
                step.skip(f"job {job_id!r}: cannot read {job['unreadable']}")
                continue
            spec = {"func": job["func"], "args": job["args"], "kwargs": job["kwargs"],
                    "queue": job["queue"], "priority": job["priority"],
                    "max_retries": job["max_retries"], "job_id": f"{job_id}~{op}",
                    **{key: job[key] for key in ("batch", "timeout", "limit_key", "limit_interval",
                                                 "dedupe_scope") if job.get(key)},
                    # a fire's scope is its round's only: the copy joins it, as its child
                    **({"round": job["round"], "parent": job_id} if job.get("round") else {})}
            try:   # one refused copy (e.g. its id over 200 characters) must not stop the rest
                self.admission.normalize(spec)
            except SpecError as exc:
                step.skip(f"copy of {job_id}: {exc}")
                continue
            specs.append(spec)
            sources.append(job_id)
        try:
            submitted = await self.admission.submit(specs) if specs else []
        except SpecError:   # one copy refused refuses the batch (a round's copy whose source
            submitted = []  # was deleted since it was read): each alone, the others are made
            for job_id, spec in zip(sources, specs):
                try:
                    submitted += await self.admission.submit([spec])
                except SpecError as exc:
                    gone = not await self.redis.exists(self.keys.job(job_id))
                    step.skip(f"no job {job_id!r}" if gone else f"copy of {job_id}: {exc}")
        queued = sum(1 for one in submitted if one.status == Status.QUEUED)
        step.touched += queued
        step.skipped += len(submitted) - queued
