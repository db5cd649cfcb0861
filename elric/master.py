"""The master: the RPC front door, and the housekeeping that keeps jobs moving.

It validates job specs against the wire contract, queues them through RedisQueue, answers
queries, and in the background gives the jobs of dead workers back to the queue and puts
retrying jobs back in line when their backoff is over. Any number of masters may run
against one Redis: every state change they make is an atomic script.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import uuid

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from elric import contract
from elric.config import Settings, SettingsError, redact_url
from elric.contract import SpecError
from elric.dedupe import DedupeError, DedupeFilter, make_filter
from elric.jobstore import RedisJobStore, schedule_options
from elric.keys import Keys
from elric.queue import RedisQueue
from elric.rpc import RequestError, Server
from elric.scheduler import Scheduler
from elric.triggers import parse_trigger

log = logging.getLogger("elric.master")

REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)
CLEANUP_WAIT = 10.0   # seconds a failed call (or a stopping master) waits for its clean-up
SHUTDOWN_GRACE = 10.0  # seconds a stopping master lets the calls in flight run
MAX_BATCH = 10_000
MAX_PAGE = 1000
MAX_REDIS_CONNECTIONS = 128
PER_FIRE = "@fire"  # dedupe_scope of a periodic job: a fresh scope for every fire
GLOBAL_SCOPE = "global"


def _split(positions, verdict: list[bool] | None) -> tuple[list[int], list[int]]:
    """(passed, filtered) of ``positions`` by ``_dedupe``'s verdict, one per position."""
    if verdict is None:
        return list(positions), []
    passed, filtered = [], []
    for i, ok in zip(positions, verdict):
        (passed if ok else filtered).append(i)
    return passed, filtered


class Master:
    def __init__(self, settings: Settings, *, address: str | None = None) -> None:
        self.settings = settings
        self.address = address or settings.MASTER_ADDRESS
        self.keys = Keys(settings.KEY_PREFIX)
        self.master_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.defaults = {"max_retries": settings.MAX_RETRIES, "timeout": settings.JOB_TIMEOUT}
        self._stop = asyncio.Event()
        self.server: Server | None = None
        self._cleanups: set[asyncio.Task] = set()   # keys given back by failed calls

    # --- lifecycle --------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        s = self.settings
        # Many RPC calls run at once; a blocking pool makes them wait for a connection
        # instead of failing with "Too many connections" (redis-py's default pool: 100).
        self.redis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(
            s.REDIS_URL, max_connections=MAX_REDIS_CONNECTIONS, timeout=30,
            socket_connect_timeout=5))
        try:
            await self.redis.ping()
        except Exception as exc:
            raise SettingsError(f"REDIS_URL {redact_url(s.REDIS_URL)}: cannot connect ({exc})") from None
        self.queue = RedisQueue(self.redis, self.keys, result_ttl=s.RESULT_TTL,
                                failed_ttl=s.FAILED_TTL)
        # Queued jobs are indexed by their queues only; earlier versions also kept a
        # status:queued index, which nothing reads or prunes any more.
        await self.redis.unlink(self.keys.status("queued"))
        self.store = RedisJobStore(self.redis, self.keys)
        self.scheduler = Scheduler(self.redis, self.keys, self.store, self._enqueue_fires,
                                   master_id=self.master_id, lease_seconds=s.SCHEDULER_LEASE)
        self.filters: dict[str, DedupeFilter] = {}
        for backend in {s.FILTER_BACKEND, *s.FILTER_SCOPES.values()}:
            f = make_filter(backend, self.redis, self.keys, capacity=s.BLOOM_CAPACITY,
                            error_rate=s.BLOOM_ERROR_RATE,
                            set_ttl=s.DEDUPE_TTL if backend == "set" else None,
                            snapshot_interval=s.BLOOM_SNAPSHOT_INTERVAL)
            await f.start()
            self.filters[backend] = f
        from elric.config import parse_address

        host, port = parse_address(self.address, "MASTER_ADDRESS")
        if host not in ("127.0.0.1", "localhost", "::1") and not s.RPC_TOKEN:
            log.warning("!!! master listens on %s without RPC_TOKEN: anyone who can reach this "
                        "port can submit jobs. Set RPC_TOKEN. !!!", self.address)
        self.server = Server(self.handlers(), token=s.RPC_TOKEN, max_message=s.RPC_MAX_MESSAGE)
        try:
            bound = await self.server.start(host, port)
        except OSError as exc:
            raise SettingsError(f"MASTER_ADDRESS {self.address}: cannot listen "
                                f"({exc.strerror or exc})") from None
        self._housekeeping = asyncio.create_task(self._housekeeping_loop())
        self._scheduling = asyncio.create_task(self.scheduler.run())
        log.info("master %s listening on %s:%d", self.master_id, *bound[:2])
        return bound

    async def run(self) -> int:
        await self.start()
        # A submit_jobs of 1,000 specs allocates ~10,000 objects, so the cyclic garbage
        # collector would run a young collection every few hundred jobs and, every few
        # batches, walk every long-lived object: ~15 % of the master's CPU. Objects that
        # exist now are frozen out of collections, and young collections run 1/100 as
        # often (the master makes few reference cycles; they are still collected).
        gc.freeze()
        gc.set_threshold(70_000, 20, 50)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        await self._stop.wait()
        await self.close()
        return 0

    async def close(self) -> None:
        log.info("master %s stopping", self.master_id)
        if self.server is not None:
            await self.server.close(grace=SHUTDOWN_GRACE)
        self._housekeeping.cancel()
        try:
            await asyncio.wait_for(self.scheduler.stop(), self.settings.SCHEDULER_LEASE)
        except Exception as exc:
            log.warning("scheduler did not stop cleanly: %s", exc)
        self._scheduling.cancel()
        if self._cleanups:    # keys being given back by calls that failed or were cut
            await asyncio.wait(set(self._cleanups), timeout=CLEANUP_WAIT)
        for f in self.filters.values():
            try:
                await f.close()  # the in-master Bloom filter writes its last snapshot
            except Exception as exc:
                log.warning("dedupe filter %s did not close cleanly: %s", f.name, exc)
        await self.redis.aclose()

    async def _housekeeping_loop(self) -> None:
        """Redeliver the jobs of dead workers; queue retries whose backoff is over."""
        backoff = 0.5
        while True:
            try:
                recovered = await self.queue.recover()
                if recovered:
                    log.warning("redelivered %d job(s) whose worker stopped renewing its lease",
                                len(recovered))
                await self.queue.promote()
                await self._drop_old_rounds()
                due = await self.queue.next_delayed()
                backoff = 0.5
                await asyncio.sleep(min(1.0, due if due is not None else 1.0))
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as exc:
                log.warning("master: Redis unreachable (%s); retrying in %.1fs", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:   # a refused write (OOM, MISCONF), a bug: never stop for good
                log.exception("master: housekeeping failed; retrying in %.1fs", backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    # --- RPC API ----------------------------------------------------------------------
    def handlers(self) -> dict:
        return {
            "ping": self.ping,
            "submit_job": self.submit_job,
            "submit_jobs": self.submit_jobs,
            "get_job": self.get_job,
            "remove_job": self.remove_job,
            "list_jobs": self.list_jobs,
            "stats": self.stats,
            "rerun_job": self.rerun_job,
            "pause_job": self.pause_job,
            "resume_job": self.resume_job,
            "modify_job": self.modify_job,
        }

    async def ping(self) -> str:
        return "pong"

    def _normalize(self, spec, where: str = "") -> dict:
        try:
            return contract.normalize_spec(spec, defaults=self.defaults,
                                           allowed_modules=self.settings.JOB_MODULES)
        except SpecError as exc:
            raise RequestError(f"{where}{exc}") from None

    async def _redis_call(self, coro):
        try:
            return await coro
        except REDIS_ERRORS as exc:
            raise RequestError(f"{contract.REDIS_UNAVAILABLE} ({exc}); "
                               "nothing was changed, try again") from None

    async def submit_job(self, spec) -> dict:
        if not isinstance(spec, dict):
            raise RequestError(f"submit_job takes a job spec map, got {type(spec).__name__}")
        return (await self.submit_jobs([spec]))[0]

    async def submit_jobs(self, specs) -> list[dict]:
        if not isinstance(specs, list):
            raise RequestError(f"submit_jobs takes an array of job specs, got "
                               f"{type(specs).__name__}")
        if len(specs) > MAX_BATCH:
            raise RequestError(f"submit_jobs: {len(specs)} specs in one call; at most "
                               f"{MAX_BATCH}")
        prefix = "" if len(specs) == 1 else "spec {}: "
        try:
            chosen: set[str] = set()
            # keyed specs of the usual shape are only checked here, and built once they
            # pass the filter: most of a crawler's links do not
            defer: list = []
            normalized = contract.normalize_specs(specs, defaults=self.defaults,
                                                  allowed_modules=self.settings.JOB_MODULES,
                                                  chosen_ids=chosen, defer=defer)
        except SpecError as exc:
            raise RequestError(str(exc)) from None
        if chosen and sum(1 for n in normalized if n.get("job_id") in chosen) != len(chosen):
            raise RequestError("submit_jobs: the same job_id appears twice in one batch")
        periodic = [i for i, n in enumerate(normalized) if "trigger" in n]
        # Refuse a bad batch before any of it is written: nothing half-applied.
        for i, n in enumerate(normalized):
            if "trigger" not in n and n.get("dedupe_scope") != PER_FIRE:
                continue
            where = prefix.format(i)
            if "trigger" in n:
                try:
                    parse_trigger(n["trigger"])
                    schedule_options(n)
                except ValueError as exc:
                    raise RequestError(f"{where}job {n['job_id']!r}: {exc}") from None
            elif n.get("dedupe_scope") == PER_FIRE:
                raise RequestError(f"{where}dedupe_scope {PER_FIRE!r} is for periodic jobs "
                                   "(with a trigger); name a scope instead")
        results: list = [None] * len(normalized)
        for start in range(0, len(periodic), 32):  # concurrently, in bounded slices
            chunk = periodic[start:start + 32]
            for i, r in zip(chunk, await asyncio.gather(
                    *(self._schedule(normalized[i]) for i in chunk))):
                results[i] = r
        now = [i for i, n in enumerate(normalized) if "trigger" not in n] if periodic \
            else range(len(normalized))
        verdict = await self._redis_call(self._dedupe([normalized[i] for i in now]))
        passed, filtered = _split(now, verdict)
        jobs: list[dict] = []
        try:
            # a retried submission (same job_id, same key) is not a duplicate of itself:
            # report the status of the job it already is. Only a job_id the caller chose
            # can exist already; the master's own are new.
            retried = [normalized[i]["job_id"] for i in filtered
                       if normalized[i].get("job_id") in chosen] if chosen else ()
            existing = dict(zip(retried, await self._redis_call(
                self.queue.get_statuses(retried)))) if retried else {}
            for i in filtered:
                job_id = normalized[i].get("job_id") or contract.new_job_id()
                results[i] = {"job_id": job_id,
                              "status": existing.get(job_id) or contract.FILTERED}
            for i in passed:
                jobs.append(normalized[i] if defer[i] is None
                            else contract.build_deferred(normalized[i], defer[i]))
            existed: list[int] = []
            replies = await self._redis_call(self.queue.enqueue(jobs, may_exist=chosen,
                                                                existed=existed))
        except BaseException as exc:
            # The keys this call took must not outlive it without a job: give back those
            # of the jobs that do not exist (the enqueue may have run with its reply lost,
            # so each is looked up first); a cancelled call (shutdown) too.
            if any(normalized[i].get("dedupe_key") is not None for i in passed):
                await self._clean_up(self._release_unheld(
                    jobs if len(jobs) == len(passed) else [normalized[i] for i in passed],
                    if_unknown=True), exc)
            raise
        # A job_id that existed already: nothing was queued for it, so the key this call
        # took goes back unless that job holds it (see _not_held).
        if existed:
            await self._release_unheld([jobs[i] for i in existed], if_unknown=False)
        for i, r in zip(passed, replies):
            results[i] = r
        return results

    async def _clean_up(self, coro, exc: BaseException) -> None:
        """Run ``coro`` (a failed call's clean-up) to its end even if that call is being
        cancelled. The call waits for it up to CLEANUP_WAIT seconds, and not at all when
        it is cancelled (a stopping master: ``close`` waits for it, bounded too), so a
        Redis that does not answer cannot hang the call or the shutdown."""
        task = asyncio.ensure_future(coro)
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        if not isinstance(exc, asyncio.CancelledError):
            await asyncio.wait({task}, timeout=CLEANUP_WAIT)

    async def _release_unheld(self, jobs: list[dict], *, if_unknown: bool) -> None:
        """Give back the dedupe keys of ``jobs`` that no job holds (see _not_held); a job
        not built yet (no job_id) holds none. When Redis cannot be asked: all of them
        if ``if_unknown`` (a failed call: most likely nothing was written), else none."""
        keyed = [n for n in jobs if n.get("dedupe_key") is not None and n.get("job_id")]
        unbuilt = [n for n in jobs if n.get("dedupe_key") is not None and not n.get("job_id")]
        if not keyed and not unbuilt:
            return
        try:
            holds = await self.queue.get_dedupe_holds([n["job_id"] for n in keyed])
        except Exception as exc:
            log.warning("could not look up the jobs of %d dedupe key(s) (%s); %s", len(keyed),
                        exc, "giving them back" if if_unknown else "keeping them")
            if not if_unknown:
                return
            holds = [None] * len(keyed)
        await self._release_keys(unbuilt + self._not_held(keyed, holds))

    def _not_held(self, specs: list[dict], holds: list[tuple | None]) -> list[dict]:
        """The specs whose dedupe key no job holds, by what Redis has under their job_id
        (``get_dedupe_holds``): no job; a job with another key or scope (a resubmitted
        id); or a job that failed for good, when failed jobs give their keys back. A job
        with this very key and scope holds it: this call made it (its ENQUEUE replayed
        after a lost reply), or it is the same job sent again."""
        out = []
        release_failed = self.settings.DEDUPE_RELEASE_ON_FAILURE
        for n, hold in zip(specs, holds):
            if hold is None or (hold[1], hold[2]) != (n["dedupe_key"], n["dedupe_scope"]) \
                    or release_failed and hold[0] == contract.FAILED:
                out.append(n)
        return out

    async def _schedule(self, spec: dict) -> dict:
        job_spec = {k: v for k, v in spec.items() if k != "replace_existing"}
        try:
            return await self._redis_call(self.store.add(
                job_spec, replace_existing=bool(spec.get("replace_existing"))))
        except ValueError as exc:  # TriggerError, ScheduleError: they name the field
            raise RequestError(f"job {spec['job_id']!r}: {exc}") from None

    async def _enqueue_fires(self, specs: list[dict], fence_token: int) -> list[dict]:
        """The scheduler's callback: queue fires, guarded by its lease token."""
        rounds = {}
        for spec in specs:
            if spec.get("dedupe_scope") == PER_FIRE:
                spec["dedupe_scope"] = spec["job_id"]  # children inherit the fire's scope
                rounds[spec["job_id"]] = int(spec.get("fire_time", 0) * 1000)
        # Fires are marked before they are queued (at most once); a Redis hiccup here must
        # not lose them, and retrying is safe because enqueue is idempotent per fire id.
        backoff, deadline = 0.1, asyncio.get_running_loop().time() + self.settings.SCHEDULER_LEASE
        decided = None  # the filter's verdict is kept across retries: its keys are added
        checked: dict = {}   # per scope, for a retry after a part of the scopes was checked
        while True:
            try:
                if rounds:
                    await self.redis.zadd(self.keys.dedupe_rounds, rounds)
                # a fire's own key goes into its scope, so its children skip its page
                if decided is None:
                    passed, filtered = _split(range(len(specs)),
                                              await self._dedupe(specs, checked))
                    decided = [specs[i] for i in passed], [specs[i] for i in filtered]
                passed, filtered = decided
                queued = await self.queue.enqueue(passed,
                                                  fence=(self.keys.scheduler_fence, fence_token))
                return queued + [{"job_id": n["job_id"], "status": contract.FILTERED}
                                 for n in filtered]
            except REDIS_ERRORS as exc:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                log.warning("queueing %d fire(s): Redis unreachable (%s); retrying",
                            len(specs), exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    # --- dedupe -----------------------------------------------------------------------
    def _filter_for(self, scope: str) -> DedupeFilter:
        s = self.settings
        backend = s.FILTER_SCOPES.get(scope) or s.FILTER_SCOPES.get(scope.split("@", 1)[0]) \
            or s.FILTER_BACKEND
        return self.filters[backend]

    async def _dedupe(self, specs: list[dict], done: dict | None = None) -> list[bool] | None:
        """Per spec, whether it passes its scope's filter; None when no spec has a
        dedupe_key (all pass). One filter call per scope. ``done`` (scope -> verdicts)
        keeps the verdict of each scope checked, across the caller's retries: a scope
        checked once is not checked again (its keys are taken: a second check would
        call them seen)."""
        by_scope: dict[str, tuple[list[int], list[str]]] = {}
        for i, n in enumerate(specs):
            key = n.get("dedupe_key")
            if key is not None:
                scope = n.get("dedupe_scope")
                if scope is None:
                    scope = n["dedupe_scope"] = GLOBAL_SCOPE
                group = by_scope.get(scope)
                if group is None:
                    group = by_scope[scope] = ([], [])
                group[0].append(i)
                group[1].append(key)
        if not by_scope:
            return None
        verdict = None
        taken: list[dict] = []      # specs whose key an earlier scope of this call took
        for scope, (where, keys) in by_scope.items():
            new = done.get(scope) if done is not None else None
            if new is None:
                try:
                    new = await self._filter_for(scope).check_and_add(scope, keys)
                except BaseException as exc:
                    # nothing is queued: the keys of the scopes checked before go back
                    # (exact filters), so a retry is not answered "filtered". With
                    # ``done`` the caller keeps their verdicts for its retry instead.
                    if taken and done is None:
                        await self._clean_up(self._release_keys(taken), exc)
                    if isinstance(exc, DedupeError):
                        raise RequestError(f"dedupe_scope {scope!r}: {exc}") from None
                    raise
                if done is not None:
                    done[scope] = new
            if len(where) == len(specs):          # the usual batch: one scope, all keyed
                return new
            if verdict is None:
                verdict = [True] * len(specs)
            for i, ok in zip(where, new):
                if not ok:
                    verdict[i] = False
                else:
                    taken.append(specs[i])
        return verdict

    async def _release_keys(self, specs: list[dict]) -> None:
        by_scope: dict[str, list[str]] = {}
        for n in specs:
            if n.get("dedupe_key") is not None:
                by_scope.setdefault(n["dedupe_scope"], []).append(n["dedupe_key"])
        for scope, keys in by_scope.items():
            f = self._filter_for(scope)
            if f.can_release:
                try:
                    await f.release(scope, keys)
                except Exception as exc:
                    log.warning("could not release dedupe keys of scope %r: %s", scope, exc)

    async def _drop_old_rounds(self) -> None:
        """Per-fire dedupe scopes are kept DEDUPE_ROUND_TTL seconds, then dropped."""
        import time

        cutoff = (time.time() - self.settings.DEDUPE_ROUND_TTL) * 1000
        old = await self.redis.zrangebyscore(self.keys.dedupe_rounds, "-inf", cutoff,
                                             start=0, num=100)
        for raw in old:
            scope = raw.decode()
            await self._filter_for(scope).drop_scope(scope)
            await self.redis.zrem(self.keys.dedupe_rounds, raw)

    @staticmethod
    def _job_id(job_id) -> str:
        if not isinstance(job_id, str) or not job_id:
            raise RequestError(f"job_id must be a non-empty string, got {job_id!r}")
        return job_id

    async def get_job(self, job_id) -> dict | None:
        job = await self._redis_call(self.queue.get_job(self._job_id(job_id)))
        if job is None:
            job = await self._redis_call(self.store.get(job_id))
        return job

    async def remove_job(self, job_id) -> bool:
        removed = await self._redis_call(self.queue.remove(self._job_id(job_id)))
        return await self._redis_call(self.store.remove(job_id)) or removed

    async def pause_job(self, job_id) -> bool:
        return await self._redis_call(self.store.pause(self._job_id(job_id)))

    async def resume_job(self, job_id) -> bool:
        return await self._redis_call(self.store.resume(self._job_id(job_id)))

    async def modify_job(self, job_id, changes) -> dict:
        """Change a periodic job's trigger, args or other spec keys."""
        job_id = self._job_id(job_id)
        if not isinstance(changes, dict):
            raise RequestError(f"modify_job takes a map of changes, got {type(changes).__name__}")
        current = await self._redis_call(self.store.get(job_id))
        if current is None:
            raise RequestError(f"no periodic job {job_id!r}; only periodic jobs can be modified")
        merged = {k: current[k] for k in contract.SPEC_KEYS if current.get(k) is not None}
        merged.update(changes)
        merged["job_id"] = job_id
        checked = self._normalize(merged, "modify_job: ")
        update = {k: checked[k] for k in changes if k in checked}
        try:
            return await self._redis_call(self.store.modify(job_id, update))
        except ValueError as exc:
            raise RequestError(f"modify_job {job_id!r}: {exc}") from None

    async def rerun_job(self, job_id) -> dict:
        try:
            await self._redis_call(self.queue.rerun(self._job_id(job_id)))
        except (LookupError, ValueError) as exc:
            raise RequestError(str(exc)) from None
        return {"job_id": job_id, "status": contract.QUEUED}

    async def list_jobs(self, filter=None) -> list[dict]:
        filter = filter or {}
        if not isinstance(filter, dict):
            raise RequestError(f"list_jobs takes a map filter, got {type(filter).__name__}")
        known = {"status", "queue", "func", "batch", "offset", "limit"}
        unknown = set(filter) - known
        if unknown:
            raise RequestError(f"list_jobs: unknown filter key(s) {sorted(map(str, unknown))}; "
                               f"known: {sorted(known)}")
        offset, limit = filter.get("offset", 0), filter.get("limit", 100)
        if not isinstance(offset, int) or not isinstance(limit, int) or offset < 0 \
                or not 0 < limit <= MAX_PAGE:
            raise RequestError(f"list_jobs: offset must be ≥ 0 and limit 1..{MAX_PAGE}")
        status = filter.get("status")
        if status == contract.SCHEDULED:
            return await self._redis_call(self.store.list(offset=offset, limit=limit))
        if status is not None and status not in contract.STATUSES:
            raise RequestError(f"list_jobs: unknown status {status!r}; "
                               f"known: {', '.join(contract.STATUSES)}")
        for key in ("queue", "func", "batch"):
            if filter.get(key) is not None and not isinstance(filter[key], str):
                raise RequestError(f"list_jobs: {key} must be a string")
        return await self._redis_call(self.queue.list_jobs(
            status=status, queue=filter.get("queue"), func=filter.get("func"),
            batch=filter.get("batch"), offset=offset, limit=limit))

    async def stats(self) -> dict:
        stats = await self._redis_call(self.queue.stats())
        stats["by_status"][contract.SCHEDULED] = await self._redis_call(self.store.count())
        filters = {}
        for f in self.filters.values():
            filters.update(await self._redis_call(f.stats()))
        stats["filters"] = filters
        stats["by_status"][contract.FILTERED] = sum(v.get("filtered", 0)
                                                    for v in filters.values())
        stats["scheduler"] = {"master_id": self.master_id,
                              "this_master_schedules": self.scheduler.is_leader}
        return stats
