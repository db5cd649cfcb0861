"""Admission: the only way into a queue from a master — check, dedupe, enqueue — for
``submit_job(s)`` (a batch is checked whole before anything is written) and the scheduler's
fires (``enqueue_fires``)."""

from __future__ import annotations

import asyncio
import logging
import time

from elric.backoff import Backoff
from elric.config import Settings
from elric.contract import (FIRE_ID, FIRE_ID_RULE, MAX_BATCH, Refused, SpecError, Status,
                            check_func, normalize_spec)
from elric.jobstore import IdTaken, RedisJobStore, schedule_options
from elric.logs import Hourly
from elric.queue import RedisQueue, Submitted, Unreadable, raised
from elric.reservation import DedupeGate, Reservation, ScopeRefused
from elric.retry import retry
from elric.scheduler import RETRY_LATER
from elric.triggers import parse_trigger

log = logging.getLogger("elric.master")

PER_FIRE = "@fire"     # dedupe_scope of a periodic job: a fresh scope for every fire
CLEANUP_WAIT = 10.0    # seconds a failed call (or a stopping master) waits for its clean-up


class Admission:
    def __init__(self, settings: Settings, queue: RedisQueue, store: RedisJobStore,
                 gate: DedupeGate, redis, keys) -> None:
        self.settings = settings
        self.queue, self.store, self.gate = queue, store, gate
        self.redis, self.keys = redis, keys
        self.defaults = {"max_retries": settings.MAX_RETRIES, "timeout": settings.JOB_TIMEOUT}
        self._cleanups: set[asyncio.Task] = set()   # keys being given back by failed calls
        self._admitting: dict[str, asyncio.Future] = {}   # job id -> done once its call ends
        self._warn_hourly = Hourly(log)   # fires refused, tried again every RETRY_LATER

    def normalize(self, spec) -> dict:
        return normalize_spec(spec, defaults=self.defaults,
                              allowed_modules=self.settings.JOB_MODULES)

    async def rerun(self, job_id: str) -> str:
        """queue.rerun of a job whose func JOB_MODULES still allows (workers refuse others)."""
        return raised((await self.rerun_many([job_id]))[0])

    async def rerun_many(self, job_ids: list[str]) -> list[str | Exception]:
        """rerun of each job; the NotFound or Refused that says why not in its place."""
        refused = {}
        if self.settings.JOB_MODULES:   # (empty: any module; no read)
            async with self.redis.pipeline(transaction=False) as pipe:
                for job_id in job_ids:
                    pipe.hget(self.keys.job(job_id), "func")
                funcs = await pipe.execute()
            for job_id, func in zip(job_ids, funcs):
                try:
                    if func:
                        check_func(func.decode(), self.settings.JOB_MODULES)
                except SpecError as exc:
                    refused[job_id] = Refused(f"rerun of {job_id}: {exc}")
        done = iter(await self.queue.rerun_many([j for j in job_ids if j not in refused]))
        return [refused[j] if j in refused else next(done) for j in job_ids]

    def _check_batch(self, specs) -> list[dict]:
        """The normalized batch, or SpecError naming the first bad spec (``spec 3: ...``)."""
        if not isinstance(specs, list):
            raise SpecError(f"submit_jobs takes an array of job specs, got "
                            f"{type(specs).__name__}")
        if len(specs) > MAX_BATCH:
            raise SpecError(f"submit_jobs: {len(specs)} specs in one call; at most {MAX_BATCH}")
        where, out = "" if len(specs) == 1 else "spec {}: ", []
        first: dict[str, int] = {}   # job id -> its first spec's index, named in the error
        try:
            for spec in specs:
                n = self.normalize(spec)
                job_id, scope = n["job_id"], n.get("dedupe_scope")
                if FIRE_ID.fullmatch(job_id):   # (modify_job keeps an id stored before)
                    raise SpecError(f"job_id {job_id!r}: {FIRE_ID_RULE}")
                if job_id in (".", ".."):   # a browser reads /jobs/.. as / (%2e too)
                    raise SpecError(f"job_id {job_id!r}: may not be '.' or '..' (no URL can "
                                    "name it)")
                if scope and FIRE_ID.fullmatch(scope) and n.get("round") != scope:
                    # a fire's "@fire" scope: a key taken there first drops the fire
                    raise SpecError(f"dedupe_scope {scope!r}: a periodic job's fire dedupes "
                                    "in a scope named by its id; only jobs of its round (its "
                                    "children: round the same) may use it")
                if first.setdefault(job_id, len(out)) != len(out):
                    raise SpecError(f"job_id {job_id!r} appears twice in one batch (spec "
                                    f"{first[job_id]} has it too)")
                if "trigger" in n:
                    try:
                        parse_trigger(n["trigger"], now=self.store.clock())  # Redis's clock
                        schedule_options(n)
                    except ValueError as exc:
                        raise SpecError(f"job {job_id!r}: {exc}") from None
                elif scope == PER_FIRE:
                    raise SpecError(f"dedupe_scope {PER_FIRE!r} is for periodic jobs (with a "
                                    "trigger); name a scope instead")
                out.append(n)
        except SpecError as exc:
            raise SpecError(f"{where.format(len(out))}{exc}") from None
        return out

    async def _check_rounds(self, specs: list[dict], where: str) -> None:
        """A round that is a fire id is counted by its schedule's max_instances while any
        job of it is live: a one-off job naming it would hold the schedule's fires back.
        Only a job whose parent is of that round (a fire's children, theirs) may name it."""
        claims = [(i, n) for i, n in enumerate(specs) if FIRE_ID.fullmatch(n.get("round", ""))]
        if not claims:
            return
        pipe = self.redis.pipeline(transaction=False)
        parents = list({n["parent"] for _, n in claims} - {""})
        for parent in parents:
            pipe.hget(self.keys.job(parent), "round")
        rounds = dict(zip(parents, await pipe.execute(raise_on_error=False)))
        for got in rounds.values():   # Redis refusing (BUSY, ...) tells nothing of the spec
            if isinstance(got, Exception) and "WRONGTYPE" not in str(got):
                raise got
        for i, n in claims:
            if rounds.get(n["parent"]) != n["round"].encode():
                raise SpecError(f"{where.format(i)}round {n['round']!r}: a periodic fire's "
                                "round, counted by its schedule's max_instances; only jobs "
                                "descending from that fire (their parent of its round) take "
                                "it. Leave it out, or name a round that is no fire id")

    async def submit(self, specs) -> list[Submitted]:
        normalized = self._check_batch(specs)
        chosen = {s["job_id"] for s in specs if isinstance(s, dict) and s.get("job_id")}
        results: dict[int, Submitted] = {}
        periodic = [i for i, n in enumerate(normalized) if "trigger" in n]
        where = "" if len(normalized) == 1 else "spec {}: "
        await self._check_rounds(normalized, where)

        async def schedule(check: bool) -> None:
            for start in range(0, len(periodic), 32):  # concurrently, in bounded slices
                chunk = periodic[start:start + 32]
                results.update(zip(chunk, await asyncio.gather(
                    *(self._schedule(normalized[i], check, where.format(i)) for i in chunk))))
        # checked first: what only the store tells (a past date, an id taken) refuses the
        # call before any write; stored after the filters: a refused scope stores none either
        await schedule(check=True)
        now = [i for i, n in enumerate(normalized) if "trigger" not in n]
        try:
            results.update(zip(now, await self._admit([normalized[i] for i in now], chosen,
                                                      before_enqueue=lambda: schedule(False))))
        except ScopeRefused as exc:   # named as any bad spec is, so a client can drop it
            i = next(i for i in now if normalized[i].get("dedupe_key") is not None
                     and normalized[i]["dedupe_scope"] == exc.scope)
            raise SpecError(f"{where.format(i)}job {normalized[i]['job_id']!r}: {exc}") from None
        except Unreadable as exc:   # a resend (its key seen) of a job an operator overwrote
            i = next(i for i in now if normalized[i]["job_id"] == exc.job_id)
            raise SpecError(f"{where.format(i)}{exc}") from None
        return [results[i] for i in range(len(normalized))]

    async def _schedule(self, spec: dict, check: bool, where: str) -> Submitted:
        try:   # (the store reads replace_existing from the spec)
            stored = await self.store.add(spec, check=check)
        except ValueError as exc:  # TriggerError, ScheduleError: they name the field
            raise SpecError(f"{where}job {spec['job_id']!r}: {exc}") from None
        except IdTaken as taken:   # a one-off job has the id: it changes nothing
            return Submitted(spec["job_id"], taken.status, existed=True)
        return Submitted(stored["job_id"], stored["status"],
                         next_run_time=stored["next_run_time"])

    async def _admit(self, specs: list[dict], chosen: set[str],
                     before_enqueue) -> list[Submitted]:
        """Dedupe and queue jobs; a call that fails gives back the keys it took.
        ``before_enqueue``: what else the call writes (its periodic jobs), once the
        filters passed it."""
        ids = [s["job_id"] for s in specs]
        # A resend of a call still running here (its reply lost) waits for it: run together,
        # the one failing gives back keys the other took or found seen, its jobs lost or doubled
        while busy := {self._admitting[i] for i in ids if i in self._admitting}:
            log.debug("job(s) %s wait for a call still admitting them", ", ".join(
                i for i in ids if i in self._admitting))
            await asyncio.wait(busy)
        over = asyncio.get_running_loop().create_future()
        self._admitting.update(dict.fromkeys(ids, over))

        def done(_=None) -> None:
            for i in set(ids):   # (an id twice in one call: refused at submit, not inside)
                del self._admitting[i]
            over.set_result(None)
        reservation = Reservation(self.gate, specs)
        try:
            await reservation.check()
            # a resend (same job_id and key) is no duplicate of itself: its job's status, or
            # if none (only chosen ids can exist), its key back if a dead master's call took it
            resent = [s for s in reservation.filtered if s["job_id"] in chosen]
            holds = await self.queue.get_holds([s["job_id"] for s in resent]) if resent else []
            statuses = {s["job_id"]: h and h.status for s, h in zip(resent, holds)}
            await reservation.reclaim([s for s, h in zip(resent, holds) if h is None])
            await before_enqueue()
            submitted = await self.queue.enqueue(reservation.passed)
        except BaseException as exc:
            await self._clean_up(reservation.cancel(CLEANUP_WAIT), exc, done)
            raise
        try:
            await reservation.settle(submitted)
        finally:
            done()
        out = {id(s): r for s, r in zip(reservation.passed, submitted)}
        for s in reservation.filtered:
            out[id(s)] = Submitted(s["job_id"], statuses.get(s["job_id"]) or Status.FILTERED)
        # counted once answered: a job that exists (answered with its status) or that
        # reclaimed its key was found seen, yet not dropped
        await self.gate.count([s for s in reservation.filtered
                               if out[id(s)].status == Status.FILTERED])
        return [out[id(s)] for s in specs]

    async def _clean_up(self, coro, exc: BaseException, then) -> None:
        """Run a failed call's clean-up to its end, then ``then``, even if the call is
        cancelled; waited for up to CLEANUP_WAIT, or not at all when cancelled (a stopping
        master waits): a Redis that does not answer hangs neither the call nor the shutdown."""
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        task.add_done_callback(then)
        if not isinstance(exc, asyncio.CancelledError):
            await asyncio.wait({task}, timeout=CLEANUP_WAIT)

    def cleanups(self) -> set[asyncio.Task]:
        """Clean-ups of failed calls still running: a stopping master waits for them."""
        return set(self._cleanups)

    async def enqueue_fires(self, specs: list[dict], fence_token: int,
                            recovered: bool = False) -> list[Submitted]:
        """The scheduler's callback: dedupe and queue marked fires under its lease token,
        retried through Redis errors until the lease would run out (idempotent per fire id).
        ``recovered``: fires a failed leader marked and may have checked; in a fire's own
        scope they skip the check (only its own key can be there), in another a key the
        filter notes that leader took for the fire is the fire's."""
        rounds, unchecked, checking = {}, [], []
        began = int(self.store.clock() * 1000)   # not its fire time: a late fire's is old
        for spec in specs:
            spec["round"] = spec["job_id"]   # the fire and its descendants: one round
            if spec.get("dedupe_scope") == PER_FIRE:
                spec["dedupe_scope"] = spec["job_id"]  # children inherit the fire's scope
                rounds[spec["job_id"]] = began
                if recovered:
                    unchecked.append(spec)
                    continue
            checking.append(spec)
        # kept across retries: see its `new`
        reservation = Reservation(self.gate, checking, unsure=checking if recovered else [])

        async def attempt() -> list[Submitted]:
            if rounds:
                await self.redis.zadd(self.keys.dedupe_rounds, rounds)
            # one periodic job's refused scope must not hold back the fires due with it
            await reservation.check(past_refusals=True)
            return await self.queue.enqueue(unchecked + reservation.passed, fence=fence_token)

        queued = await retry(attempt, what=f"queueing {len(specs)} fire(s)", log=log,
                             backoff=Backoff(0.1, 2.0),
                             deadline=time.monotonic() + self.settings.SCHEDULER_LEASE)
        for s in checking:
            if s.get("dedupe_key") is not None and s["dedupe_scope"] in reservation.refused:
                self._warn_hourly(
                    f"{s['schedule']} refused", "periodic job %s: fire %s not queued: %s. "
                    "It stays pending, and counts for max_instances (its later fires may be "
                    "skipped); the scheduler tries it again every %gs", s["schedule"], s["job_id"],
                    reservation.refused[s["dedupe_scope"]], RETRY_LATER, level=logging.ERROR)
        await self.gate.count(reservation.filtered)
        return queued + [Submitted(s["job_id"], Status.FILTERED) for s in reservation.filtered]
