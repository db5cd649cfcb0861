"""The master: its lifecycle, and RPC handlers that check their arguments and hand the
work on (to ``Admission``, the job store or the queue); errors leave with an ``ErrorCode``."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
import os
import resource
import signal
import socket
import time
import uuid

import redis.asyncio as aioredis
from redis.exceptions import (AuthenticationError, ConnectionError as RedisConnectionError,
                              ResponseError, TimeoutError as RedisTimeoutError)

from elric import contract, limits, lua
from elric.admission import Admission
from elric.bulk import Bulk, JobFilter, left_alone
from elric.clock import RedisClock
from elric.config import (Settings, SettingsError, Unreachable, is_loopback, parse_address,
                          redact_url)
from elric.contract import ErrorCode, NotFound, Refused, SpecError, Status, check_text
from elric.dedupe import DedupeError, DedupeFilter, make_filter
from elric.housekeeping import Housekeeping
from elric.jobstore import RedisJobStore, ScheduleError
from elric.keys import Keys
from elric.queue import RedisQueue, Unreadable
from elric.reservation import DedupeGate, ScopeRefused
from elric.retry import REDIS_CLIENT_OPTIONS, REDIS_ERRORS, redis_refusal, retry
from elric.rpc import MAX_CONNECTIONS, RequestError, Server, packed_size
from elric.scheduler import Scheduler, fire_id

log = logging.getLogger("elric.master")

SNAPSHOT_SHARE = 0.5   # of MASTER_STOP_TIMEOUT, kept for the 'bloom' backend's last snapshot
MAX_PAGE = 1000
MAX_REDIS_CONNECTIONS = 128
SPARE_FILES = 64   # the listeners, logs, Bloom snapshots, the dashboard's connections
LIST_FILTERS = ("status", "queue", "func", "batch", "offset", "limit", "scan_limit", "cursor")
MAX_SCAN = 100_000   # jobs list_jobs looks at, at most, to fill a page
REPLY_FRAME = 64    # bytes of a reply besides its result: its msgid, error and headers
MAX_RUN_WAIT = 20.0  # seconds run_job may wait for its fire: well inside a client's timeout


def _connections_that_fit(wanted: int) -> int:
    """RPC connections the open-file limit leaves room for beside the Redis pool, raised
    toward the hard limit first: at the limit, Redis got no file and every call failed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + MAX_REDIS_CONNECTIONS + SPARE_FILES
    if soft != resource.RLIM_INFINITY and soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft == resource.RLIM_INFINITY or soft >= need:
        return wanted
    fit = max(soft - MAX_REDIS_CONNECTIONS - SPARE_FILES, 1)
    log.warning("RLIMIT_NOFILE's hard limit is %d: the master takes %d RPC connections, "
                "not %d; raise it (ulimit -Hn) for more", hard, fit, wanted)
    return fit


# RPC handlers that only read
_READS = ("ping", "health", "get_job", "get_jobs", "list_jobs", "stats", "job_kind")


def _rpc(handler):
    """An RPC handler: what it raises becomes the RPC error a caller can act on."""
    changed = "queued" if handler.__name__.startswith("submit_") else "changed"

    @functools.wraps(handler)
    async def call(*params, **options):   # options: the dashboard's; the RPC sends none
        try:
            return await handler(*params, **options)
        # (ScheduleError: a periodic job refused, or whose stored data cannot be read)
        except (SpecError, Refused, ScopeRefused, ScheduleError) as exc:
            raise RequestError(str(exc), ErrorCode.BAD_REQUEST) from None
        except NotFound as exc:   # (a KeyError from a bug is internal: not a missing job)
            raise RequestError(str(exc), ErrorCode.NOT_FOUND) from None
        except REDIS_ERRORS + (ResponseError,) as exc:
            refusal = redis_refusal(exc)
            if refusal is not None:
                raise RequestError(f"{refusal}: nothing was {changed}, try again",
                                   ErrorCode.REDIS_UNAVAILABLE) from None
            if isinstance(exc, ResponseError):
                raise  # a command Redis found wrong: a bug, answered as an internal error
            outcome = (f"it may have been {changed}: send it again" if
                       isinstance(exc, RedisTimeoutError)   # its reply was lost, not its call
                       else f"nothing was {changed}, try again")
            if handler.__name__ in _READS:   # changes nothing, whatever became of it
                outcome = "try again"
            raise RequestError(f"master cannot reach Redis right now ({exc}); {outcome}",
                               ErrorCode.REDIS_UNAVAILABLE) from None
    return call


def _running(task: asyncio.Task | None) -> bool:
    return task is not None and not task.done()


def _id(value, name: str = "job_id") -> str:
    """A job's or a worker's id: a non-empty string of UTF-8 text."""
    if not isinstance(value, str) or not value:
        raise SpecError(f"{name} must be a non-empty string, got {value!r}")
    check_text(name, value)   # bytes that are not UTF-8: lone surrogates Redis cannot take
    return value


def _filter(raw, call: str, known, statuses) -> dict:
    """The rules list_jobs and bulk_jobs filters share, one message each: a map of known
    keys, whose names are strings of UTF-8 text and whose status is one the call walks."""
    if not isinstance(raw, dict):
        raise SpecError(f"{call}: filter must be a map, got {type(raw).__name__}")
    unknown = set(raw) - set(known)
    if unknown:
        raise SpecError(f"{call}: unknown filter key(s) {sorted(map(str, unknown))}; "
                        f"known: {', '.join(known)}")
    for key in ("status", "queue", "func", "batch", "worker"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise SpecError(f"{call}: filter {key} must be a string")
        check_text(f"{call}: {key}", raw.get(key) or "")
    if raw.get("status") == Status.SCHEDULED and Status.SCHEDULED not in statuses:
        raise SpecError(f"{call}: periodic jobs are not walked; pause_job or remove_job acts "
                        "on one (elric schedules pause|remove ID)")
    if raw.get("status") not in (None, *statuses):
        raise SpecError(f"{call}: unknown status {raw['status']!r}; "
                        f"known: {', '.join(statuses)}")
    return raw


class Master:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.address = settings.MASTER_ADDRESS
        self.keys = Keys(settings.KEY_PREFIX)
        self.master_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._stop = asyncio.Event()
        self._stops = 0   # SIGTERMs and Ctrl-Cs: a second one ends the stop now (_cut)
        self._cut = asyncio.Event()
        self.exit_code = 0   # 1: a background task ended by itself, or Bloom keys were lost
        # (None until start makes them: a health call can come once the RPC server listens)
        self._housekeeping: asyncio.Task | None = None
        self._scheduling: asyncio.Task | None = None

    # --- lifecycle --------------------------------------------------------------------
    async def start(self) -> tuple[str, int]:
        async with contextlib.AsyncExitStack() as made:   # closed if start fails partway
            bound = await self._start(made)
            made.pop_all()
        return bound

    async def _start(self, made: contextlib.AsyncExitStack) -> tuple[str, int]:
        s = self.settings
        # Many RPC calls run at once; a blocking pool makes them wait for a connection
        # instead of failing with "Too many connections". (from_pool: aclose closes it too)
        self.redis = aioredis.Redis.from_pool(aioredis.BlockingConnectionPool.from_url(
            s.REDIS_URL, max_connections=MAX_REDIS_CONNECTIONS, timeout=30,
            **REDIS_CLIENT_OPTIONS))
        made.push_async_callback(self.redis.aclose)
        try:   # a Redis loading its data or running a long script is waited for
            await retry(self.redis.ping, errors=(), log=log, what="master: starting")
        except Exception as exc:   # a refused password is a setting to fix, not to retry
            down = isinstance(exc, (RedisConnectionError, RedisTimeoutError)) and \
                not isinstance(exc, AuthenticationError)
            raise (Unreachable if down else SettingsError)(
                f"REDIS_URL {redact_url(s.REDIS_URL)}: cannot connect ({exc})") from None
        policy = await retry(lambda: lua.require_redis(self.redis, redact_url(s.REDIS_URL)),
                             log=log, what="master: starting")
        if policy != "noeviction":   # a full Redis then drops keys, jobs among them, unsaid
            log.warning("REDIS_URL %s: Redis evicts keys when it is full (maxmemory-policy "
                        "%s): jobs it accepted may vanish; set maxmemory-policy noeviction",
                        redact_url(s.REDIS_URL), policy)
        self.queue = RedisQueue(self.redis, self.keys, result_ttl=s.RESULT_TTL,
                                failed_ttl=s.FAILED_TTL,
                                release_keys_on_failure=s.DEDUPE_RELEASE_ON_FAILURE,
                                max_redeliveries=s.MAX_REDELIVERIES)
        clock = RedisClock(self.redis)
        await clock.sync()
        self.store = RedisJobStore(self.redis, self.keys, clock=clock, min_interval=s.MIN_INTERVAL)
        rules = limits.parse_rules(s.LIMITS)
        # a Redis that refuses writes for now (full, loading) is waited for, not a reason to
        # exit: a supervisor would restart the master into the same refusal
        await retry(lambda: limits.publish(self.redis, self.keys, rules), log=log,
                    what="master: publishing LIMITS")
        self.filters: dict[str, DedupeFilter] = {}
        for backend in {s.FILTER_BACKEND, *s.FILTER_SCOPES.values()}:
            f = make_filter(backend, self.redis, self.keys, capacity=s.BLOOM_CAPACITY,
                            error_rate=s.BLOOM_ERROR_RATE,
                            set_ttl=s.DEDUPE_TTL if backend == "set" else None,
                            snapshot_interval=s.BLOOM_SNAPSHOT_INTERVAL,
                            takeover_after=s.DEDUPE_TAKEOVER_AFTER)
            try:
                await f.start()
            except DedupeError as exc:   # e.g. an unreadable snapshot: the message says what to do
                raise SettingsError(f"FILTER_BACKEND {backend}: {exc}") from None
            self.filters[backend] = f
            made.push_async_callback(f.close)
        gate = DedupeGate(s, self.filters, self.queue)
        self.admission = Admission(s, self.queue, self.store, gate, self.redis, self.keys)
        self.bulk = Bulk(self.queue, self.admission, self.redis, self.keys, self.store)
        self.housekeeping = Housekeeping(self.queue, gate, self.redis, self.keys,
                                         s.DEDUPE_ROUND_TTL, rules)
        self.scheduler = Scheduler(self.redis, self.keys, self.store,
                                   self.admission.enqueue_fires, master_id=self.master_id,
                                   lease_seconds=s.SCHEDULER_LEASE, clock=clock)
        if not s.JOB_MODULES:
            log.warning("JOB_MODULES is empty: the master accepts jobs naming any module; "
                        "name the modules your jobs are in, e.g. JOB_MODULES = "
                        "[\"myproject.jobs\"] in settings.py")
        host, port = parse_address(self.address, "MASTER_ADDRESS")
        if not is_loopback(host) and not s.RPC_TOKEN:
            log.warning("!!! master listens on %s without RPC_TOKEN: anyone who can reach this "
                        "port can submit jobs. Set RPC_TOKEN. !!!", self.address)
        # the dashboard first: a master that answers RPC is started (launch.wait_for_master),
        # and one whose dashboard could not listen then exited
        self.dashboard = await self._start_dashboard() if s.DASHBOARD_ADDRESS else None
        if self.dashboard is not None:
            made.push_async_callback(self.dashboard.close)
        handlers = {name: getattr(self, name) for name in contract.METHODS if name != "auth"}
        self.server = Server(handlers, token=s.RPC_TOKEN, max_message=s.RPC_MAX_MESSAGE,
                             max_connections=_connections_that_fit(MAX_CONNECTIONS))
        try:
            bound = await self.server.start(host, port)
        except OSError as exc:
            raise SettingsError(f"MASTER_ADDRESS {self.address}: cannot listen "
                                f"({exc.strerror or exc})") from None
        made.push_async_callback(self.server.close)
        self._housekeeping = asyncio.create_task(self.housekeeping.run())
        self._scheduling = asyncio.create_task(self.scheduler.run())
        for task in (self._housekeeping, self._scheduling):
            task.add_done_callback(self._task_ended)
        log.info("master %s listening on %s:%d", self.master_id, *bound[:2])
        return bound

    async def _start_dashboard(self):
        from elric.dashboard import Dashboard

        s = self.settings
        host, port = parse_address(s.DASHBOARD_ADDRESS, "DASHBOARD_ADDRESS")
        password = s.DASHBOARD_PASSWORD or s.RPC_TOKEN
        if not password and not is_loopback(host):
            raise SettingsError(f"DASHBOARD_ADDRESS {s.DASHBOARD_ADDRESS}: the dashboard shows "
                                "jobs' arguments and results; off loopback it needs a login: "
                                "set DASHBOARD_PASSWORD")
        dashboard = Dashboard(self, password)
        try:
            host, port = await dashboard.start(host, port)
        except OSError as exc:
            raise SettingsError(f"DASHBOARD_ADDRESS {s.DASHBOARD_ADDRESS}: cannot listen "
                                f"({exc.strerror or exc})") from None
        log.info("dashboard on http://%s:%d/ (%s)", host, port,
                 "login required" if password else "read-only, no login")
        return dashboard

    async def run(self) -> int:
        await self.start()
        # A big submit_jobs allocates many short-lived objects: keep the objects that exist
        # now out of collections and run young collections less often.
        gc.freeze()
        gc.set_threshold(70_000, 20, 50)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop.wait()
        await self.close()
        return self.exit_code

    def request_stop(self) -> None:
        """A SIGTERM or Ctrl-C: stop within MASTER_STOP_TIMEOUT. A second one ends the stop
        now: what it was finishing is cut short, and said."""
        self._stops += 1
        if self._stops == 1:
            self._stop.set()
        elif not self._cut.is_set():
            log.warning("master %s: told again to stop: stopping now", self.master_id)
            self._cut.set()

    def _task_ended(self, task: asyncio.Task) -> None:
        """A background task never ends by itself: if one does, the master exits non-zero
        so that its supervisor starts it again, rather than answer ping and do nothing."""
        if self._stop.is_set() or task.cancelled():
            return
        log.critical("master %s: a background task ended (%r); exiting", self.master_id,
                     task.exception())
        self.exit_code = 1
        self._stop.set()

    async def close(self) -> None:
        """Stop within MASTER_STOP_TIMEOUT, Redis away or not: the steps take what is left in
        turn, but the last Bloom snapshot (its loss loses data) keeps SNAPSHOT_SHARE. A step
        cut short (all that is left, at a second stop) is cancelled and logged."""
        total = self.settings.MASTER_STOP_TIMEOUT
        end = time.monotonic() + total
        saving = [f for f in self.filters.values() if f.saves_on_close]
        others_end = end - total * SNAPSHOT_SHARE if saving else end
        log.info("master %s stopping (within %gs: MASTER_STOP_TIMEOUT; a second "
                 "SIGTERM or Ctrl-C ends it now)", self.master_id, total)
        self._stop.set()   # the tasks ending now is no fault (_task_ended)
        dashboard = self.dashboard and asyncio.ensure_future(self.dashboard.close())
        await self.server.close(grace=max(0.0, others_end - time.monotonic()), cut=self._cut)
        if dashboard and await self._until({dashboard}, others_end):
            log.warning("master %s: dashboard requests still running at the stop's cut: "
                        "ended unanswered", self.master_id)
        elif dashboard and (exc := dashboard.exception()) is not None:   # (else a stray
            log.warning("master %s: the dashboard did not close cleanly: %s",   # traceback)
                        self.master_id, exc)
        self._housekeeping.cancel()
        by = min(others_end, time.monotonic() + self.settings.SCHEDULER_LEASE)
        given, stopping = by - time.monotonic(), asyncio.ensure_future(self.scheduler.stop())
        cut = await self._until({stopping}, by)
        # (a leader's: only its wake of its own BLPOP can fail)
        if cut or stopping.exception() is not None:
            why = (self._cut_by(given, f"no answer from Redis within {given:.1f}s") if cut
                   else str(stopping.exception()) or type(stopping.exception()).__name__)
            log.warning("scheduler did not stop cleanly: %s; another master schedules once "
                        "its lease (SCHEDULER_LEASE) runs out", why)
        self._scheduling.cancel()
        # awaited, bounded: left running they would use the Redis client closed below
        given = others_end - time.monotonic()
        if running := await self._until({self._housekeeping, self._scheduling}, others_end):
            log.warning("master %s: %d background task(s) did not stop (%s): cancelled; "
                        "nothing is lost: another master, or this one started again, does "
                        "their work",
                        self.master_id, len(running), self._cut_by(given))
        given = others_end - time.monotonic()
        if cut := await self._until(self.admission.cleanups(), others_end):
            log.warning("master %s: %d clean-up(s) of failed calls cut short (%s): the "
                        "dedupe keys they were giving back stay taken; the filter notes "
                        "their jobs, whose resend (same job_id) gets its key back",
                        self.master_id, len(cut), self._cut_by(given))
        given = end - time.monotonic()
        closing = {f: asyncio.ensure_future(f.close(deadline=end)) for f in saving}
        cut = await self._until(set(closing.values()), end)
        for f, task in closing.items():   # the in-master Bloom filter's last snapshot
            if task in cut:
                why = self._cut_by(given)
            elif (exc := task.exception()) is not None:
                why = str(exc) or type(exc).__name__
            else:
                continue
            # its keys since the last one were only here: gone
            log.error("dedupe filter %s could not write its last snapshot (%s): the "
                      "dedupe keys it took since its previous snapshot are lost: a job "
                      "with one of them is accepted again", f.name, why)
            self.exit_code = 1
        for f in self.filters.values():
            if not f.saves_on_close:
                await f.close()   # (nothing to write: at once)
        # quick, unless a write Redis never read is still queued: the exit drops it
        closing = asyncio.ensure_future(self.redis.aclose())
        await asyncio.wait({closing}, timeout=max(0.0, end - time.monotonic()))
        closing.cancel()
        log.info("master %s stopped", self.master_id)

    async def _until(self, tasks, by: float) -> set:
        """Wait for ``tasks`` till ``by`` (``time.monotonic()``) or a second stop; those
        still running are cancelled and returned."""
        tasks = {t for t in tasks if not t.done()}
        if tasks:
            waits = {asyncio.ensure_future(asyncio.wait(tasks)),
                     asyncio.ensure_future(self._cut.wait())}
            await asyncio.wait(waits, timeout=max(0.0, by - time.monotonic()),
                               return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
        running = {t for t in tasks if not t.done()}
        for task in running:
            task.cancel()
        return running

    def _cut_by(self, given: float, late: str = "") -> str:
        """Why a step of the stop that was ``given`` seconds was cut short."""
        if self._cut.is_set():
            return "cut short by a second stop"
        if given < 0.05:   # the steps before it took its time
            return "MASTER_STOP_TIMEOUT had no time left for it"
        return late or (f"no answer from Redis within the {given:.1f}s the stop left it "
                        "(MASTER_STOP_TIMEOUT)")

    # --- RPC API: one handler per method of the contract (``auth`` is the RPC layer's) --
    @_rpc
    async def ping(self) -> str:
        return "pong"

    @_rpc
    async def health(self) -> dict:
        """What each background task is doing and when it last got something done."""
        now = self.store.clock()
        tasks = {"scheduler": self.scheduler.health.view(_running(self._scheduling), now),
                 "housekeeping": self.housekeeping.health.view(_running(self._housekeeping),
                                                               now)}
        for f in self.filters.values():
            if (view := f.health_view(now)) is not None:   # the 'bloom' backend's snapshots
                tasks["dedupe snapshots"] = view
        return {"master_id": self.master_id, "pid": os.getpid(),
                "ok": all(t["ok"] for t in tasks.values()), "tasks": tasks, "now": now}

    @_rpc
    async def submit_job(self, spec) -> dict:
        if not isinstance(spec, dict):
            raise SpecError(f"submit_job takes a job spec map, got {type(spec).__name__}")
        return (await self.submit_jobs([spec]))[0]

    @_rpc
    async def submit_jobs(self, specs) -> list[dict]:
        return [s.as_dict() for s in await self.admission.submit(specs)]

    @_rpc
    async def get_job(self, job_id) -> dict | None:
        job = await self.queue.get_job(_id(job_id))
        return job if job is not None else await self.store.view(job_id)

    @_rpc
    async def get_jobs(self, job_ids) -> list[dict | None]:
        """get_job of each of up to MAX_READ ids, in order: as many as fit in one reply (at
        least one); the caller asks again for the rest."""
        if not isinstance(job_ids, list) or len(job_ids) > contract.MAX_READ:
            raise SpecError(f"get_jobs takes an array of up to {contract.MAX_READ} job ids")
        jobs = await self.queue.get_jobs([_id(job_id) for job_id in job_ids])
        # an id that is no job may be a periodic job's: looked for together, not a read each
        periodic = await self.store.existing([i for i, job in zip(job_ids, jobs) if job is None])
        room = self.settings.RPC_MAX_MESSAGE - REPLY_FRAME
        reply = []
        for job_id, job in zip(job_ids, jobs):
            if job is None and job_id in periodic:
                job = await self.store.view(job_id)   # (one unreadable: named, in its place)
            room -= packed_size(job)
            if reply and room < 0:
                break
            reply.append(job)
        return reply

    @_rpc
    async def job_kind(self, job_id) -> dict | None:
        """What the dashboard and the CLI check before acting, without get_job's result or
        runs: ``{"periodic", "status"}`` (and ``"paused"`` if periodic), or None."""
        try:
            [hold] = await self.queue.get_holds([_id(job_id)])
        except Unreadable:   # its key overwritten (an operator's): a job to delete
            return {"periodic": False, "status": None}
        if hold is not None:   # as get_job: a one-off job before a periodic one
            return {"periodic": False, "status": hold.status}
        state = await self.store.state(job_id)
        return state and {"periodic": True, **state}

    @_rpc
    async def remove_job(self, job_id) -> bool:
        removed = await self.queue.remove(_id(job_id))
        return await self.store.remove(job_id) or removed

    @_rpc
    async def cancel_job(self, job_id) -> dict:
        """Stop a job: queued or retrying ones at once, a running one through its worker."""
        was = await self.queue.cancel(_id(job_id))
        if was is None and await self.store.get(job_id) is not None:
            was = Status.SCHEDULED   # a periodic job: left alone (pause or remove stops it)
        if was is None:
            raise NotFound(f"no job {job_id!r}")
        now = {Status.QUEUED: Status.CANCELLED, Status.RETRYING: Status.CANCELLED,
               Status.RUNNING: "cancelling"}.get(was, was)   # a finished job: left alone
        return {"job_id": job_id, "was": was, "status": now}

    @_rpc
    async def pause_job(self, job_id) -> bool:
        return await self.store.pause(_id(job_id))

    @_rpc
    async def resume_job(self, job_id) -> bool:
        return await self.store.resume(_id(job_id))

    @_rpc
    async def run_job(self, job_id, wait=0) -> dict:
        """Fire a periodic job now; the scheduler fires it, so its rules hold. ``wait``:
        seconds to wait for what it did with the fire (``run``: its record, or nil)."""
        if isinstance(wait, bool) or not isinstance(wait, (int, float)) or \
                not 0 <= wait <= MAX_RUN_WAIT:
            raise SpecError(f"run_job: wait must be 0..{MAX_RUN_WAIT:g} seconds")
        try:
            fire_time = await self.store.run_now(_id(job_id))
        except ValueError as exc:   # paused or finished
            raise SpecError(str(exc)) from None
        if fire_time is None:
            raise NotFound(f"no periodic job {job_id!r}")
        fire = fire_id(job_id, fire_time)
        return {"job_id": job_id, "fire_id": fire, "fire_time": fire_time,
                "run": await self.store.fire_run(job_id, fire, wait) if wait else None}

    @_rpc
    async def control_worker(self, worker_id, action, queues=None, concurrency=None) -> dict:
        """Pause, resume, stop a worker, or ``set`` its queues and/or concurrency (nil:
        unchanged); it obeys at its next heartbeat."""
        worker_id = _id(worker_id, "worker_id")
        if action not in contract.WORKER_ACTIONS:
            raise SpecError(f"control_worker: unknown action {action!r}; one of "
                            f"{', '.join(contract.WORKER_ACTIONS)}")
        if action == "set":
            fields = {}
            if queues is not None:
                if not isinstance(queues, list) or not queues or not all(
                        isinstance(q, str) and contract.QUEUE_NAME.fullmatch(q) for q in queues):
                    raise SpecError(f"control_worker set: queues {queues!r}: a non-empty "
                                    f"array of queue names, each {contract.QUEUE_RULE}")
                fields["set_queues"] = ",".join(queues)
            if concurrency is not None:
                if isinstance(concurrency, bool) or not isinstance(concurrency, int) or \
                        not 1 <= concurrency <= contract.MAX_CONCURRENCY:
                    raise SpecError(f"control_worker set: concurrency {concurrency!r}: an "
                                    f"integer from 1 to {contract.MAX_CONCURRENCY}")
                fields["set_concurrency"] = str(concurrency)
            if not fields:
                raise SpecError("control_worker set: give queues, concurrency or both")
        else:
            fields = {"pause": {"paused": "1"}, "resume": {"paused": "0"},
                      "stop": {"stop": "1"}}[action]
        asked = await self.queue.control_worker(worker_id, **fields)
        if asked == "stopped":   # it reads no more orders: "it obeys within a second" would lie
            raise NotFound(f"worker {worker_id!r} has stopped: it takes no orders (started "
                           "again, a worker has a new id: see elric workers)")
        if asked == "stopping":   # it ignores them: "it obeys within a second" would lie
            raise NotFound(f"worker {worker_id!r} is stopping (its running jobs finish, then "
                           f"it exits): it takes no order but stop; {action} the worker that "
                           "takes over (see elric workers)")
        if asked == "lost":   # killed, or its host down: "asked" it would never read
            raise NotFound(f"worker {worker_id!r} is lost: no heartbeat for longer than its "
                           "lease, so its jobs go to other workers (a worker started again "
                           "has a new id: see elric workers)")
        if asked == "gone":   # a pid or host given for the id: name the worker meant
            meant = [w["worker_id"] for w in await self.queue.workers() if w.get("alive") and
                     worker_id in (str(w.get("pid")), w.get("host"))]
            raise NotFound(f"no worker {worker_id!r}" + (
                f": a worker id is host:pid:suffix, e.g. {', '.join(meant[:3])}" if meant else
                " (or it is lost: it sent no heartbeat for so long that its state expired); "
                "elric workers lists the ids"))
        # already asked (a resume of a running worker): said, not "it obeys within a second"
        return {"worker_id": worker_id, "action": action, "unchanged": asked == "unchanged"}

    @_rpc
    async def modify_job(self, job_id, changes) -> dict:
        """Change a periodic job's trigger, args or other spec keys."""
        job_id = _id(job_id)
        if not isinstance(changes, dict):
            raise SpecError(f"modify_job takes a map of changes, got {type(changes).__name__}")
        if changes.get("job_id", job_id) != job_id:   # (the merge below would drop it silently)
            raise SpecError(f"modify_job {job_id!r}: a job_id cannot change; submit the job "
                            "under the new id and remove this one")
        current = await self.store.get(job_id)
        if current is None:   # a one-off job is there but the wrong kind; else nothing is
            if await self.queue.get_job(job_id) is None:
                raise NotFound(f"no periodic job {job_id!r}")
            raise SpecError(f"{job_id!r} is not a periodic job; only periodic jobs can be "
                            "modified")
        if ours := [k for k in contract.SET_BY_ELRIC if k in changes and
                    changes[k] != current.get(k)]:   # (sent back as it is: no change)
            raise SpecError(f"modify_job {job_id!r}: {ours[0]!r} is elric's to set "
                            f"({contract.SPEC_KEYS[ours[0]][1]}); leave it out")
        merged = {k: current[k] for k in contract.SPEC_KEYS if current.get(k) is not None}
        merged.update(changes, job_id=job_id)   # (timeout nil: the default's, as in a spec)
        try:
            checked = self.admission.normalize(merged)
        except SpecError as exc:
            raise SpecError(f"modify_job: {exc}") from None
        try:
            return await self.store.modify(job_id, {k: checked[k] for k in changes
                                                    if k in checked})
        except ValueError as exc:
            raise SpecError(f"modify_job {job_id!r}: {exc}") from None

    @_rpc
    async def rerun_job(self, job_id) -> dict:
        try:
            await self.admission.rerun(_id(job_id))
        except NotFound:   # a periodic job has no job record to run again
            if await self.store.get(job_id) is None:
                raise
            raise Refused(left_alone(job_id, Status.SCHEDULED, "rerun")) from None
        return {"job_id": job_id, "status": Status.QUEUED}

    @_rpc
    async def list_jobs(self, filter=None) -> list[dict] | dict:
        filter = _filter(filter or {}, "list_jobs", LIST_FILTERS, contract.STATUSES)
        offset, limit = filter.get("offset", 0), filter.get("limit", 100)
        scan = filter.get("scan_limit", MAX_SCAN)
        if not isinstance(offset, int) or not isinstance(limit, int) or offset < 0 \
                or not 0 < limit <= MAX_PAGE:
            raise SpecError(f"list_jobs: offset must be ≥ 0 and limit 1..{MAX_PAGE}")
        if not isinstance(scan, int) or not 0 < scan <= MAX_SCAN:
            raise SpecError(f"list_jobs: scan_limit must be 1..{MAX_SCAN}")
        status, cursor = filter.get("status"), filter.get("cursor")
        if cursor is not None and not isinstance(cursor, str):
            raise SpecError("list_jobs: cursor must be a string")
        if status == Status.SCHEDULED:
            if any(filter.get(key) is not None for key in ("queue", "func", "batch")):
                # else every schedule would be listed, as if they all matched
                raise SpecError("list_jobs: periodic jobs (status 'scheduled') are listed "
                                "whole, not by queue, func or batch; leave those out")
            rows, went_on = await self.store.list(offset=offset, limit=limit), ""
        else:
            rows, went_on = await self.queue.list_page(
                status=status, queue=filter.get("queue"), func=filter.get("func"),
                batch=filter.get("batch"), offset=offset, limit=limit, scan_limit=scan,
                cursor=cursor or "")
        # asked with a cursor: also where to look further when scan_limit stopped the
        # looking (a bare list could not tell "no more jobs" from "not looked at yet")
        return rows if cursor is None else {"jobs": rows, "cursor": went_on}

    @_rpc
    async def bulk_jobs(self, action, filter, cursor="", op="") -> dict:
        """One step of an operation on the jobs ``filter`` picks (elric/bulk.py)."""
        if not isinstance(cursor, str) or not isinstance(op, str):
            raise SpecError("bulk_jobs: cursor and op must be strings")
        f = JobFilter.parse(_filter(filter, "bulk_jobs", JobFilter.__dataclass_fields__,
                                   JobFilter.STATUSES))
        step = await self.bulk.run(action, f, cursor, op)
        return dataclasses.asdict(step)

    @_rpc
    async def stats(self, *, for_metrics: bool = False) -> dict:
        """``for_metrics`` (not for the RPC, whose reply stays bounded): /metrics's reading,
        every func's row and no batch or minute (it shows neither)."""
        stats = await self.queue.stats(for_metrics=for_metrics)
        stats["by_status"][Status.SCHEDULED] = await self.store.count()
        filters = {}
        for f in self.filters.values():
            filters.update(await f.stats())
        stats["filters"] = filters
        stats["by_status"][Status.FILTERED] = sum(v.get("filtered", 0) for v in filters.values())
        stats["scheduler"] = {"master_id": self.master_id,
                              "this_master_schedules": self.scheduler.is_leader,
                              **await self.store.fire_stats()}
        return stats
