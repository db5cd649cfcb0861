"""The worker: pull jobs with a lease, run them in a process pool (``elric.pool``), record
outcomes. One asyncio loop does the Redis and RPC work; its heartbeat renews leases, records
the worker's load and picks up what an operator asked (pause, resume, stop, set).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Callable
from functools import partial

import redis.asyncio as aioredis
from redis.exceptions import (AuthenticationError as RedisAuthenticationError, NoScriptError,
                              ResponseError)

import elric
from elric import codec, lua, runner
from elric.backoff import Backoff
from elric.clock import redis_now
from elric.config import Settings, SettingsError, redact_url
from elric.contract import MAX_BATCH, ErrorCode, Status
from elric.keys import Keys
from elric.loading import JobModules
from elric.pool import Pool, ProcessDied
from elric.queue import STALE, Claim, Outcome, RedisQueue, WakeOn, WorkerControl
from elric.retry import (REDIS_CLIENT_OPTIONS, Outage, cancel_pending, is_outage, redis_refusal,
                         reply_text, retry, unblocked, until)
from elric.rpc import AsyncClient, RemoteError, RPCConnectionError, RPCError
from elric.usage import LoadMeter

log = logging.getLogger("elric.worker")
job_log = logging.getLogger("elric.jobs")   # one line per job event; tune it on its own


def _job_fields(claim: Claim) -> dict:
    return {"job_id": claim.job_id, "func": claim.func, "attempt": claim.attempt}


def _log_outcome(claim: Claim, record: Outcome) -> None:
    """How an attempt ended, once recorded: a failure with its traceback."""
    fields = _job_fields(claim)
    if record.ok:
        job_log.info("job %s %s: succeeded in %.3fs", claim.job_id, claim.func,
                     record.duration_ms / 1000, extra=fields)
    elif record.cancelled:
        job_log.warning("job %s %s: cancelled", claim.job_id, claim.func, extra=fields)
    elif record.retry_ms >= 0:
        last = (str(record.payload).strip().splitlines() or [""])[-1]
        job_log.warning("job %s %s: attempt %d failed, retrying in %.1fs: %s", claim.job_id,
                        claim.func, claim.attempt, record.retry_ms / 1000, last, extra=fields)
    else:
        job_log.error("job %s %s: failed at attempt %d\n%s", claim.job_id, claim.func,
                      claim.attempt, str(record.payload).rstrip(), extra=fields)


def _begets(ran: runner.Ran) -> bool:
    """Whether an outcome waits on the master: its children go there before it is recorded."""
    return ran.ok and bool(ran.children)


class ChildTooBig(Exception):
    """A child job's spec does not fit in one RPC message: no call can send it."""


CHUNK_SECONDS = 0.02  # fast sync jobs go to a pool process in batches about this long
SLOW_RUN = 10 * CHUNK_SECONDS   # a sync run this long (past any report's delay): slow jobs
WARN_EVERY = 5.0  # seconds between warnings while waiting for Redis or the master
GIVE_BACK_SECONDS = 5.0  # how long past its grace a stopping worker gives jobs back, records them
STOP_HEARD = 1.0   # how long a stop lets the loop's Redis call run before cutting it short


class Worker:
    def __init__(self, settings: Settings, *, concurrency: int | None = None) -> None:
        self.settings = settings
        self.queues = list(settings.QUEUES)
        self.concurrency = concurrency or settings.concurrency
        self.async_slots = settings.ASYNC_CONCURRENCY
        self.max_chunk = settings.WORKER_CHUNK
        self.lease = float(settings.LEASE_SECONDS)
        self.started_at = 0   # ms, on Redis's clock; set when the worker registers
        self.broken = False   # a task it cannot do without failed: exit non-zero
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.KEY_PREFIX)
        self.buffer: deque[Claim] = deque()      # claimed, not yet handed to the pool
        # jobs of a pool process that died, run alone to find its culprit (not Claim.suspect)
        self.crash_suspects: deque[Claim] = deque()
        self._suspect_came = False   # it may hold a Claim.suspect: _holds_suspect looks
        self.finished: list[tuple[Claim, runner.Ran]] = []   # ran, not yet recorded
        self.recording: list[tuple[Claim, runner.Ran]] = []
        self.ended: list[tuple[str, int, int]] = []   # runs ended that hold a limit key's slot
        self.pool: Pool | None = None
        self.stopping = False
        self._stop_at: float | None = None   # when (time.monotonic()) it was told to stop
        self._stopped = asyncio.Event()   # set by request_stop
        self._turn_at = 0.0   # when the loop's turn began: a fetch it cut was sent after
        self._giving: list[asyncio.Task] = []   # a stop's give-backs, beside its grace
        self.forced = False   # told twice to stop (Ctrl-C): running jobs are not waited for
        self.paused = False   # an operator paused fetching (elric worker pause)
        self.avg_job_seconds = CHUNK_SECONDS    # start with batches of one
        self.processed = 0   # attempts recorded since start: done, failed or cancelled
        self.done = 0        # of which succeeded
        self.failed = 0      # of which failed (retried or not)
        self.load = LoadMeter()
        self._changed = asyncio.Event()
        self._finished = asyncio.Event()
        self._waiting: asyncio.Task | None = None   # a fetch waiting in Redis for a wake token
        self._waiting_since = 0.0
        self._wait_refused: Exception | None = None   # what the last wait for work met
        self._wait_backoff = Backoff()
        # when the first fetch that failed or was cut off was sent: Redis may have run it, its
        # claims unknown here (_release_unknown); _taking guards claims on their way in
        self._unsure_since: float | None = None
        self._taking = asyncio.Lock()
        # each retrying loop's trouble, which the heartbeat publishes for operators
        self._outages = {doing: Outage(log, f"worker: {doing} failed") for doing in (
            "fetching jobs", "waiting for work", "heartbeat", "recording outcomes",
            "sending child jobs")}
        self._renew_now = asyncio.Event()   # a claim's lease may be over: ask Redis now
        self._margin = min(1.0, self.lease / 10)   # a lease this close to its end is not relied on
        self._starting: asyncio.Task | None = None   # a start-up step a stop cancels
        # (connection, limit) a master's too_large told: a master started again may take more
        self._told_limit: tuple[AsyncClient, int] | None = None

    # --- setup ------------------------------------------------------------------------
    async def _connect(self) -> None:
        """Connect to Redis and the master, waiting as long as it takes (either may start
        later). Settings that cannot work are refused at once; ``request_stop`` cancels."""
        s = self.settings
        self.redis = aioredis.Redis.from_url(s.REDIS_URL, **REDIS_CLIENT_OPTIONS)
        # (its waits for work last at most a second or two, well inside socket_timeout)
        self.blocking_redis = aioredis.Redis.from_url(s.REDIS_URL, **REDIS_CLIENT_OPTIONS)
        backoff, next_warning = Backoff(0.2, 5.0), 0.0
        while True:
            what = f"Redis at {redact_url(s.REDIS_URL)}"
            try:
                await self.redis.ping()
                await lua.require_redis(self.redis, redact_url(s.REDIS_URL))
                what = f"elric master at {s.MASTER_ADDRESS}"
                master = await self._connect_master()
                try:
                    await master.call("ping")
                except BaseException:
                    await master.close()
                    raise
                self.master = master
                break
            except SettingsError:   # a Redis too old
                raise
            except RemoteError as exc:  # the master answered: no, e.g. a wrong RPC_TOKEN
                raise SettingsError(f"MASTER_ADDRESS {s.MASTER_ADDRESS}: {exc}") from None
            except Exception as exc:   # Redis away or refusing (BUSY, LOADING), no master
                # a wrong password (a ConnectionError too), an answer but no Redis's (an HTTP
                # server there), an option redis-py does not take: a setting to fix
                if what.startswith("Redis") and (
                        isinstance(exc, RedisAuthenticationError) or not is_outage(exc)):
                    raise SettingsError(f"REDIS_URL {redact_url(s.REDIS_URL)}: cannot "
                                        f"connect ({exc})") from None
                if not is_outage(exc) and not isinstance(exc, RPCConnectionError):
                    raise
                if time.monotonic() >= next_warning:
                    # Redis answering MISCONF or LOADING (to PING too) is reachable: say
                    # what it answered, or an operator looks for a network fault
                    if (refusal := redis_refusal(exc)) is not None:
                        log.warning("worker: %s answers: %s (%s); retrying", what, refusal,
                                    reply_text(exc))
                    else:
                        reason = str(exc).removeprefix(f"cannot reach {what}: ")
                        log.warning("worker: cannot reach %s; retrying (%s)", what, reason)
                    next_warning = time.monotonic() + WARN_EVERY
                await asyncio.sleep(backoff.next())
        self.queue = RedisQueue(self.redis, self.keys, result_ttl=s.RESULT_TTL,
                                failed_ttl=s.FAILED_TTL, error_max=s.result_max_bytes)

    async def _connect_master(self) -> AsyncClient:
        s = self.settings
        host, port = s.master_host_port
        return await AsyncClient.connect(host, port, timeout=10, token=s.RPC_TOKEN,
                                         max_message=s.RPC_MAX_MESSAGE)

    # --- main loop --------------------------------------------------------------------
    async def run(self) -> int:
        if not self.settings.JOB_MODULES:
            raise SettingsError("no job modules: name the modules your Job classes are in, "
                                "e.g. `elric worker myproject.jobs`, or JOB_MODULES = "
                                "[\"myproject.jobs\"] in settings.py")
        self.modules = JobModules.load(self.settings.JOB_MODULES)
        if not self.modules.clean():
            raise SettingsError(
                "no job module imports (" + "; ".join(f"{n}: {e}" for n, e in
                                                     self.modules.broken.items()) +
                f"): check the names, and that they import from {os.getcwd()} (PYTHONPATH)")
        if nothing := self.modules.runs_nothing():
            raise SettingsError(nothing)   # (it warned, then waited for good)
        self.modules.log_broken()   # the others' jobs run
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop, True)
        if not await self._unless_stopped(self._connect()):
            await self.redis.aclose()  # told to stop before Redis and the master were there
            await self.blocking_redis.aclose()
            return 0
        s = self.settings
        self.pool = Pool(self.concurrency, async_slots=self.async_slots,
                         sync_batch=self._chunk_size, on_news=self._changed.set,
                         job_modules=s.JOB_MODULES, preload=self.modules.clean(),
                         log_level=s.LOG_LEVEL, log_format=s.LOG_FORMAT,
                         lag_warn=s.LOOP_LAG_WARN,
                         result_max=s.result_max_bytes)
        heartbeat = recorder = None
        try:
            if not await self._unless_stopped(self._retry_redis(self._register)):
                return 0
            heartbeat = asyncio.create_task(self._heartbeat_loop())
            recorder = asyncio.create_task(self._record_loop())
            recorder.add_done_callback(self._recorder_ended)
            log.info("worker %s: queues %s, %d processes, %d async jobs each", self.worker_id,
                     ",".join(self.queues), self.concurrency, self.async_slots)
            self.modules.log_other_queues(self.queues)   # (once it runs: a refusal says why)
            try:
                await self._loop()
            except Exception:   # (a refusal of Redis no retry helps, a bug)
                log.critical("worker %s: failed; stopping", self.worker_id, exc_info=True)
                self.broken = True
            finally:
                await self._shutdown(recorder)
        except Exception:   # registering or the stop failed: nothing more to do
            log.critical("worker %s: failed; exiting", self.worker_id, exc_info=True)
            self.broken = True
        finally:
            # (ended already, unless registering or the stop failed) else Python waits for
            # them at exit, the worker registered and idle for good
            self.pool.kill_all()
            self.pool.shutdown(wait=True, cancel_futures=True)
            for task in (heartbeat, recorder):
                if task is not None:
                    task.cancel()
            await self._close(registered=heartbeat is not None)
        return 1 if self.broken else 0

    def _recorder_ended(self, task: asyncio.Task) -> None:
        """Outcomes that cannot be recorded leave jobs running under lease forever: a worker
        whose recorder failed stops and exits non-zero; its jobs are redelivered."""
        if not task.cancelled() and task.exception() is not None:
            log.error("worker: recording outcomes failed; stopping", exc_info=task.exception())
            self.broken = True
            self.request_stop()

    async def _unless_stopped(self, step) -> bool:
        """Run a start-up step that may wait for Redis or the master for good; False if
        the worker was told to stop meanwhile (request_stop cancels it)."""
        self._starting = asyncio.create_task(step)
        try:
            await self._starting
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            return False
        return True

    def request_stop(self, interactive: bool = False) -> None:
        """Stop: running jobs may finish within SHUTDOWN_GRACE. A second Ctrl-C
        (``interactive``) stops them now; they go back to the queue."""
        if self.stopping and interactive and not self.forced:
            log.warning("worker %s: stopping its running jobs now; they go back to the queue",
                        self.worker_id)
            self.forced = True
        elif not self.stopping:
            log.info("worker %s: stopping; running jobs may finish within %gs (Ctrl-C again "
                     "to stop them now)", self.worker_id, self.settings.SHUTDOWN_GRACE)
            self._stop_at = time.monotonic()
        self.stopping = True
        self._stopped.set()
        self._changed.set()
        if self._starting is not None and not self._starting.done():
            self._starting.cancel()

    def _claims(self) -> list[Claim]:
        """Every job this worker holds a lease on."""
        return [*self.buffer, *self.crash_suspects, *self.pool.claims(),
                *(c for c, _ in self.finished), *(c for c, _ in self.recording)]

    def _chunk_size(self) -> int:
        return max(1, min(self.max_chunk, int(CHUNK_SECONDS / max(self.avg_job_seconds, 1e-6))))

    def _holds_suspect(self) -> bool:
        """Whether it holds a suspect (a job lost with workers twice, Claim.suspect): it
        then fetches no other (fetch.lua); looked for only once one came."""
        if self._suspect_came:
            self._suspect_came = any(c.suspect for c in self._claims())
        return self._suspect_came

    def _sizes(self) -> tuple[int, int]:
        """Room for jobs: the slots of the kind of job seen last plus a small prefetch, less
        what it holds; and of that, the jobs it could start now, the only ones that may be of
        a limited key (a claim waiting behind others would hold its key's slot idle)."""
        if self.paused:
            return 0, 0
        if self.pool.last_async:
            slots, prefetch = self.concurrency * self.async_slots, self.concurrency
        else:
            slots = prefetch = self.concurrency * self._chunk_size()
        held = len(self._claims())
        return slots + prefetch - held, max(0, slots - held)

    async def _loop(self) -> None:
        """``_turns`` till a stop. With Redis frozen each of a turn's calls waits out the
        socket timeout, past SHUTDOWN_GRACE: past STOP_HEARD the call is cut short."""
        turns = asyncio.create_task(self._turns())
        stopped = asyncio.ensure_future(self._stopped.wait())
        try:
            await asyncio.wait([turns, stopped], return_when=asyncio.FIRST_COMPLETED)
            if not turns.done():
                await asyncio.wait([turns], timeout=STOP_HEARD)
            if not turns.done():
                log.warning("worker: Redis did not answer within %gs of the stop; cutting "
                            "its call short", STOP_HEARD)
                # a fetch (or a give-back) cut may have run in Redis (_release_unknown)
                self._unsure_since = self._unsure_since or self._turn_at
                turns.cancel()
                await asyncio.wait([turns], timeout=STOP_HEARD)
        finally:
            stopped.cancel()
            turns.cancel()   # (run cancelled; or a redis-py call swallowed the cancel)
        if turns.done() and not turns.cancelled():
            turns.result()   # its error: the worker failed

    async def _turns(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            self._turn_at = time.monotonic()
            self._changed.clear()
            self.pool.kill_overdue()
            await self._take_woken()
            self._dispatch()
            run = self.pool.longest_sync_run()   # the same reading sheds and times the wait
            if self._unsure_since and self._wait_refused is None:
                await self._release_unknown()
            if self._wait_refused is not None:
                # back off here: a fetch without a wait may pass (it writes nothing when
                # there is no work), and the refused waits would follow each other at once
                exc, self._wait_refused = self._wait_refused, None
                self._outages["waiting for work"].failed(exc)
                await self._wait(self._wait_backoff.next(), run)
                continue
            await self._shed_slow(run)
            want, start = self._sizes()
            if self._waiting is not None:   # a fetch is out already: it brings the work
                await self._wait(1.0, run)
                continue
            if (want > 0 or self.ended) and not self.crash_suspects:
                try:
                    asked = time.monotonic()
                    ended, self.ended = self.ended, []
                    fetched = await self.queue.fetch(self.worker_id, self.queues,
                                                     max(want, 0), self.lease, ended,
                                                     start=start,
                                                     holds_suspect=self._holds_suspect())
                    backoff.reset()
                    self._outages["fetching jobs"].passed()
                    fetched.claims = await self._hand_back_others(fetched.claims, asked)
                except Exception as exc:   # Redis away, or full: wait it out, keep what we hold
                    if not is_outage(exc):
                        raise
                    self._unsure_since = self._unsure_since or asked
                    self.ended = ended + self.ended
                    self._outages["fetching jobs"].failed(exc)
                    await self._wait(backoff.next(), run)
                    continue
                if fetched.claims:
                    self.buffer.extend(fetched.claims)
                    continue
                if fetched.limited_wait is not None:
                    # jobs held back by their limit key: look again when they may start
                    if fetched.limited_wait > 0:
                        await self._wait(max(0.01, min(1.0, fetched.limited_wait)), run,
                                         for_work=True)
                    continue
            await self._wait(1.0, run, for_work=True)

    async def _wait(self, timeout: float, run: float = 0.0, for_work: bool = False) -> None:
        """Until something changed (a job finished, stop), the waiting fetch came back, or
        timeout. ``for_work``: first send a fetch that waits in Redis for a wake token, with
        no await before it, so that a pause or new queues told either apply to it or end it."""
        # none when it can start nothing now: the token it took may be a limited job's, which
        # it may not claim, and an idle worker would then wait its own timeout for the job
        fetch, start = (0, 0) if self.buffer or self.crash_suspects or not for_work else \
            self._sizes()
        if fetch > 0 and start > 0 and self._waiting is None:
            lists = [*(self.keys.wake(q) for q in self.queues),
                     self.keys.worker_wake(self.worker_id)]
            self._waiting_since = time.monotonic()
            self._waiting = asyncio.create_task(self.queue.fetch(
                self.worker_id, self.queues, fetch, self.lease, start=start,
                holds_suspect=self._holds_suspect(),
                wake_on=WakeOn(self.blocking_redis, lists, timeout)))
            # read its error, or one a stop left (Redis frozen) is logged as a traceback
            self._waiting.add_done_callback(lambda t: t.cancelled() or t.exception())
        waiters = [asyncio.ensure_future(self._changed.wait())]
        if self._waiting is not None:
            waiters.append(self._waiting)
        try:   # until the longest sync run (``run`` s so far) would be slow, if it runs on
            await asyncio.wait(waiters, timeout=SLOW_RUN - run if 0 < run < SLOW_RUN
                               else timeout + 0.5, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiters[0].cancel()

    async def _take_woken(self) -> None:
        """The claims of a waiting fetch that came back join the buffer. Redis away or
        refusing, or a wake list of another type, makes the loop back off; scripts flushed,
        or a wait Redis ended with an error, are left to the next fetch."""
        task = self._waiting
        if task is None or not task.done():
            return
        async with self._taking:   # (the heartbeat's _end_wait may take them too)
            if self._waiting is not task:
                return
            self._waiting = None
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                # the fetch behind a BLPOP that failed ran all the same (_release_unknown)
                self._unsure_since = self._unsure_since or self._waiting_since
                if isinstance(exc, NoScriptError) or unblocked(exc):
                    return
                if is_outage(exc) or isinstance(exc, ResponseError):
                    self._wait_refused = exc
                    return
                raise exc
            self._wait_backoff.reset()
            self._outages["waiting for work"].passed()
            mine = await self._hand_back_others(task.result().claims, self._waiting_since)
            # after the await: _dispatch may have put a new buffer in place
            self.buffer.extend(mine)

    async def _end_wait(self) -> None:
        """Make a waiting fetch run now, before what the worker was told (pause, new queues,
        stop) applies: its claims then come back instead of arriving later."""
        task = self._waiting
        if task is not None and not task.done():
            try:
                key = self.keys.worker_wake(self.worker_id)
                async with self.redis.pipeline(transaction=False) as pipe:
                    await pipe.lpush(key, 1).expire(key, 60).execute()
                await asyncio.wait_for(asyncio.shield(task), 10)
            except Exception as exc:   # Redis gone: its connection and fetch are gone too
                log.warning("worker: could not end its wait for work (%s)", exc)
                task.cancel()
                # it may have claimed jobs: once it ended, _take_woken clears the wait, or
                # _release_unknown would not look for them
                await asyncio.wait([task])
                self._unsure_since = self._unsure_since or self._waiting_since
        await self._take_woken()

    def _dispatch(self) -> None:
        """Hand jobs to pool processes with room for them."""
        if self.stopping:
            return
        while self.crash_suspects:
            # which of a dead process's jobs killed it is unknown: one per process
            if self.pool.place(False, alone=True) is None or not self._held(self.crash_suspects[0]):
                return
            self._send(self.crash_suspects.popleft(), suspect=True)
        kept: deque[Claim] = deque()
        full: set[tuple[bool, bool]] = set()   # kinds no process has room for now
        while self.buffer:
            claim = self.buffer.popleft()
            how = self.pool.how(claim)
            # not while a lost run of it (even of a rerun) runs here: the pool holds one a job
            if self._held(claim) and how not in full and not self.pool.holds(claim.job_id):
                try:
                    self._send(claim)
                    continue
                except LookupError:   # no process has room for this kind now
                    full.add(how)
            kept.append(claim)   # its lease is being checked, or no process has room
            if len(full) == 3:   # (async, alone) is never asked for
                break
        kept.extend(self.buffer)
        self.buffer = kept
        self.pool.flush()

    async def _shed_slow(self, run: float) -> None:
        """Once a sync run goes on past SLOW_RUN, the jobs held are slow: size for them now,
        not when one ends. Those waiting in pool processes come back (``_ran``); those beyond
        a prefetch go back to the queue, without using an attempt, for workers with room."""
        if run < SLOW_RUN:
            return
        self.avg_job_seconds = max(self.avg_job_seconds, run)
        if not any(self.pool.kinds.get(c.func) for c in self.pool.claims()):
            self.pool.last_async = False   # no async job runs: no room for them either
        self.pool.withdraw_waiting()
        # the prefetch _sizes allows for jobs this slow (batches of one); async ones stay
        waiting = [c for c in self.buffer if self.pool.kinds.get(c.func) is not True]
        gone = {id(c) for c in waiting[self.concurrency:]}
        surplus = self._unbuffer(lambda c: id(c) in gone)
        if not surplus:
            return
        try:
            n = await self.queue.release(self.worker_id, [c.run for c in surplus])
        except BaseException as exc:   # (a stop's cut too: the stop gives them back)
            if not is_outage(exc) and not isinstance(exc, asyncio.CancelledError):
                raise
            # kept, tried again next turn; Redis may have run it: none starts before the
            # heartbeat asked whether it still holds them
            for claim in surplus:
                claim.held_until = 0.0
            self.buffer.extend(surplus)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        log.info("worker: a job has run %.1fs: gave %d unstarted job(s) back to the queue, "
                 "for workers with free slots", run, n)

    async def _release_unknown(self, deadline: float | None = None) -> None:
        """Give back, without using an attempt, the claims Redis holds under this worker that
        it does not know (a fetch whose reply was lost made them), or they run again as a
        second attempt once their leases end. Tried once, or till ``deadline`` (a stop's)."""
        if self._taking.locked() or self._waiting is not None:
            return   # claims on their way in, or a fetch out that may bring some: later

        async def give_back() -> int:
            # a claim older than this has run out of its lease (none renewed it): it is
            # being redelivered, whatever Redis's clock did meanwhile
            held = await self.queue.claimed(
                self.worker_id, time.monotonic() - self._unsure_since + self.lease)
            known = {c.run for c in self._claims()}
            return await self.queue.release(self.worker_id,
                                            [claim for claim in held if claim not in known])
        async with self._taking:
            try:
                n = await self._retry_redis(give_back, deadline=deadline or time.monotonic())
            except Exception as exc:
                if not is_outage(exc):
                    raise
                return
        self._unsure_since = None
        if n:
            log.warning("worker: gave back %d job(s) a fetch claimed whose reply was lost "
                        "(its connection to Redis broke)", n)

    async def _hand_back_others(self, claims: list[Claim], asked: float) -> list[Claim]:
        """Give back, without using an attempt, the jobs whose module this worker does not
        load; a job with fields elric did not write fails for good, unrun. Returns the
        others, whose leases, asked for at ``asked``, last a lease from then."""
        mine: list[Claim] = []
        others: dict[str, list[Claim]] = {}
        for claim in claims:
            claim.held_until = asked + self.lease
            if claim.unreadable:
                ran = runner.Ran.failure(claim.run, f"unreadable job: {claim.unreadable} (not "
                                         "what elric writes: fix it, then rerun the job)")
                ran.final = True
                self._ran(claim, ran)
            elif self.modules.runs(claim.func):
                mine.append(claim)
                self._suspect_came = self._suspect_came or claim.suspect
            else:
                others.setdefault(claim.func.partition(":")[0], []).append(claim)
        for module, handed in others.items():
            reason = (f"does not load module {module!r} (it loads "
                      f"{', '.join(self.modules.names)}): start a worker that does")
            for claim in handed:
                log.warning("worker: job %s: %s; handing it back", claim.job_id, reason)
            try:   # once: the loop must not wait here for Redis (dispatch, timeouts, a stop)
                await self.queue.release(self.worker_id, [c.run for c in handed],
                                         reason=reason)
            except Exception as exc:   # unknown here, _release_unknown gives them back
                if not is_outage(exc):
                    raise
                self._unsure_since = self._unsure_since or asked
        return mine

    def _held(self, claim: Claim) -> bool:
        """Whether this worker surely still holds the claim's lease; if not, the heartbeat
        asks Redis now, and drops the claims lost, before anything starts."""
        if time.monotonic() < claim.held_until - self._margin:
            return True
        self._renew_now.set()
        return False

    def _send(self, claim: Claim, suspect: bool = False) -> None:
        # (a suspect, lost with workers twice, gets a process of its own too)
        self.pool.start(claim, partial(self._ran, claim), suspect=suspect or claim.suspect)
        if job_log.isEnabledFor(logging.DEBUG):
            job_log.debug("job %s %s: starting, attempt %d", claim.job_id, claim.func,
                          claim.attempt, extra=_job_fields(claim))

    def _ran(self, claim: Claim, outcome: runner.Ran | ProcessDied) -> None:
        """A job came back from the pool (on this loop)."""
        ran = self._crashed(claim, outcome) if isinstance(outcome, ProcessDied) else outcome
        if ran is not None and ran.withdrawn:   # unstarted: _shed_slow asked for it back
            if not claim.cancelling:
                self.buffer.appendleft(claim)   # first in line of what it holds
                self._changed.set()
                return
            ran = runner.cancelled_before_start(claim.run)
        if ran is not None:
            if claim.limit_key is not None:   # its slot frees at the next fetch
                self.ended.append(claim.run)
            self.finished.append((claim, ran))
            self._finished.set()
        self._changed.set()

    def _crashed(self, claim: Claim, exc: ProcessDied) -> runner.Ran | None:
        """A pool process died holding this job: a failure when the job is known to be at
        fault; otherwise the job runs again, same attempt, apart from others when the
        culprit is unknown. A job asked to stop ends cancelled, whoever was to blame."""
        if claim.cancelling:
            why = runner.CANCELLED + "; its process was killed"
        elif claim.job_id in exc.culprits:
            why = exc.culprits[claim.job_id] or \
                runner.past_timeout(claim.timeout) + " and its process was killed"
        elif len(exc.held) == 1:
            # (the status tells an os._exit from an OOM kill or a segfault)
            why = (f"the job's process died ({exc.how()}: os._exit, a signal or a crash "
                   "in native code)")
        elif exc.culprits:
            self.buffer.appendleft(claim)   # a bystander of a known culprit
            return None
        else:
            if claim.job_id == exc.held[0]:
                log.warning("worker: a pool process died; running its %d job(s) one by one "
                            "to find which one killed it", len(exc.held))
            self.crash_suspects.append(claim)
            return None
        ran = runner.Ran.failure(claim.run, why)
        # it ran until then (past its timeout, say): its record's duration says so
        ran.started_at = exc.sent_at.get(claim.job_id, ran.started_at)
        return ran

    # --- recording outcomes -------------------------------------------------------------
    async def _record_loop(self) -> None:
        """Record outcomes as they come; parents, which wait for the master to take their
        children, in a task of their own, so that others are recorded while it is away."""
        parents: asyncio.Task | None = None
        try:
            while True:
                await self._finished.wait()
                self._finished.clear()
                if parents is not None and parents.done():
                    parents.result()   # (its error ends the recorder)
                    parents = None
                if parents is None and any(_begets(r) for _, r in self.finished):
                    parents = asyncio.create_task(self._record_some(_begets))
                    parents.add_done_callback(lambda _: self._finished.set())
                await self._record_some(lambda r: not _begets(r))
        finally:
            if parents is not None:
                parents.cancel()

    async def _record_some(self, which: Callable[[runner.Ran], bool]) -> None:
        batch = [x for x in self.finished if which(x[1])]
        if not batch:
            return
        self.finished = [x for x in self.finished if not which(x[1])]
        self.recording += batch
        try:
            await self._record(batch)
        finally:
            taken = {id(x) for x in batch}
            self.recording = [x for x in self.recording if id(x) not in taken]
            self._changed.set()

    async def _record(self, batch: list[tuple[Claim, runner.Ran]]) -> None:
        # a cancelled job may have been dropped before it started: its time says nothing
        sync = [r for c, r in batch if not r.is_async and not c.cancelling]
        if sync:
            per_job = sum(r.finished_at - r.started_at for r in sync) / len(sync)
            self.avg_job_seconds = 0.7 * self.avg_job_seconds + 0.3 * per_job
        outcomes = [ran for _, ran in batch]
        if any(o.ok and o.children for o in outcomes):
            refused = await self._send_children(outcomes)
            for o in outcomes:
                if o.job_id in refused:
                    o.ok, o.final = False, True
                    o.payload = f"a child job was refused: {refused[o.job_id]}"
        records = []
        for claim, o in batch:
            retry_ms = -1
            if not o.ok and not o.final and o.attempt <= claim.max_retries:
                retry_ms = self._backoff_ms(o.attempt, o.retry_after)
            cancelled = not o.ok and claim.cancelling
            # a server that asked to wait (Retry-After) holds back its key's jobs (its host's)
            hold_ms = int(min(o.retry_after, self.settings.RETRY_BACKOFF_MAX) * 1000)
            records.append(Outcome(o.job_id, o.attempt, o.ok, o.payload,
                                   int((o.finished_at - o.started_at) * 1000), retry_ms,
                                   cancelled, claim.member, hold_ms))
        statuses = await self._retry_redis(self.queue.finish, self.worker_id, records,
                                           outage=self._outages["recording outcomes"])
        for (claim, _), record, status in zip(batch, records, statuses):
            if status == STALE:   # its lease ran out: queued again, or removed
                job_log.warning("job %s %s: attempt %d ended after its lease was lost; "
                                "its outcome is dropped", claim.job_id, claim.func,
                                claim.attempt, extra=_job_fields(claim))
                continue
            # asked to stop before this worker heard: finish.lua recorded the failure cancelled
            record.cancelled = record.cancelled or status == Status.CANCELLED
            self.processed += 1
            self.done += record.ok
            self.failed += not record.ok and not record.cancelled
            _log_outcome(claim, record)

    def _backoff_ms(self, attempt: int, at_least: float = 0.0) -> int:
        s = self.settings
        delay = min(s.RETRY_BACKOFF_MAX, s.RETRY_BACKOFF * 2 ** (attempt - 1))
        # a job's retry_after is a floor, capped as any backoff: a server may ask for days
        return int(max(delay * random.uniform(0.5, 1.0), min(at_least, s.RETRY_BACKOFF_MAX))
                   * 1000)

    async def _send_children(self, outcomes: list[runner.Ran]) -> dict[str, str]:
        """Send child jobs to the master before their parents are acknowledged. Returns
        {parent_id: error} for parents whose children the master refused."""
        parents = [o for o in outcomes if _begets(o)]
        try:
            await self._submit_children([c for o in parents for c in o.children])
            return {}
        except (RemoteError, ChildTooBig):
            pass  # one bad spec refuses the whole batch: find the parents at fault
        refused = {}
        for o in parents:
            try:
                await self._submit_children(o.children)
            except (RemoteError, ChildTooBig) as exc:
                refused[o.job_id] = str(exc)
        return refused

    async def _submit_children(self, specs: list[dict]) -> None:
        """``submit_jobs`` in calls of at most MAX_BATCH specs and RPC_MAX_MESSAGE bytes; a
        master whose limit is smaller answers too_large with it, and all are sent again in
        calls that fit (child ids are fixed: those sent twice are harmless)."""
        while True:
            told = self._told_limit
            limit = told[1] if told and told[0] is self.master and not self.master.closed \
                else self.settings.RPC_MAX_MESSAGE
            try:
                return await self._submit_children_in(specs, limit)
            except RemoteError as exc:
                # each round lowers the limit, unless the master changed: this ends
                if exc.code != ErrorCode.TOO_LARGE or not exc.max_message or \
                        exc.max_message >= limit:
                    raise
                log.warning("worker: the master takes RPC messages of at most %d bytes (this "
                            "worker's RPC_MAX_MESSAGE is %d); sending child jobs in smaller "
                            "calls", exc.max_message, self.settings.RPC_MAX_MESSAGE)
                await self._call_master("ping")   # on a new connection: too_large closed it
                self._told_limit = (self.master, exc.max_message)

    async def _submit_children_in(self, specs: list[dict], limit: int) -> None:
        most = limit - 64   # room for the request around the specs
        call: list[dict] = []
        size = 0
        for spec in specs:
            n = len(codec.pack(spec))
            if n > most:
                raise ChildTooBig(f"a child job is {n:,} bytes packed, over the RPC message "
                                  f"limit ({limit:,} bytes: RPC_MAX_MESSAGE of this worker "
                                  "or of its master); pass it less")
            if call and (len(call) == MAX_BATCH or size + n > most):
                await self._call_master("submit_jobs", call)
                call, size = [], 0
            call.append(spec)
            size += n
        if call:
            await self._call_master("submit_jobs", call)

    async def _call_master(self, method: str, *params):
        backoff, outage = Backoff(0.2, 5.0), self._outages["sending child jobs"]
        address = self.settings.MASTER_ADDRESS
        while True:
            try:
                result = await self.master.call(method, *params)
                outage.passed()
                return result
            except RemoteError as exc:
                if exc.code != ErrorCode.REDIS_UNAVAILABLE:
                    outage.passed()   # it answered: reachable, whatever it refused
                    raise
                # not a refusal of the children: the same call again, once Redis is back
                outage.failed(exc, f"master {address} cannot use Redis")
                await asyncio.sleep(backoff.next())
            except RPCConnectionError as exc:
                outage.failed(exc, f"master {address} unreachable")
                await asyncio.sleep(backoff.next())
                await self.master.close()
                with contextlib.suppress(RPCError):
                    self.master = await self._connect_master()

    async def _retry_redis(self, fn, *args, deadline: float | None = None,
                           outage: Outage | None = None):
        return await retry(lambda: fn(*args), what="worker", log=log,
                           deadline=deadline, outage=outage)

    # --- heartbeat, registration ------------------------------------------------------
    async def _register(self) -> None:
        self.started_at = int(await redis_now(self.redis) * 1000)
        await self.queue.heartbeat(self.worker_id, [], self.lease, self._hash_fields())

    def _hash_fields(self) -> dict:
        """The worker's hash, written whole by every heartbeat: a Redis which lost it (a
        restart without persistence, a failover) shows the worker again within a second."""
        fields = {"host": socket.gethostname(), "pid": os.getpid(),
                  "queues": ",".join(self.queues), "concurrency": self.concurrency,
                  "async_concurrency": self.async_slots, "version": elric.__version__,
                  "started_at": self.started_at,
                  "state": "stopping" if self.stopping else "paused" if self.paused
                  else "running",
                  "processed": self.processed, "done": self.done, "failed": self.failed,
                  "in_flight": len(self.pool.claims()),
                  # "" or what is stuck retrying: the worker is alive but its work waits
                  "trouble": "; ".join(f"{doing}: {o.trouble()}"
                                       for doing, o in self._outages.items() if o.kind)}
        measured = self.load.read([os.getpid(), *self.pool.pids()])
        if measured is not None:   # None: no /proc here
            fields["cpu_percent"], fields["rss_bytes"] = measured
        return fields

    async def _heartbeat_loop(self) -> None:
        outage = self._outages["heartbeat"]
        while not cancel_pending():
            # at least once a second: cancels, pauses and lost claims are heard soon
            await until(self._renew_now, min(1.0, self.lease / 3))
            self._renew_now.clear()
            try:
                # send only each job's newest claim: a lost attempt still running here
                # would have its job's new claim dropped too ("lost" is by job id)
                held = self._claims()
                newest = {c.job_id: c for c in sorted(held, key=lambda c: (c.member, c.attempt))}
                asked, claims = time.monotonic(), list(newest.values())
                renewed = await self.queue.heartbeat(self.worker_id, claims, self.lease,
                                                     self._hash_fields())
                for claim in claims:
                    if claim.job_id not in renewed.lost:
                        claim.held_until = asked + self.lease
                # of the claims sent: one fetched again since is not lost; one replaced is
                self._drop_lost([c for c in held if newest[c.job_id] is not c or
                                 c.job_id in renewed.lost])
                self._stop_cancelled([c for c in claims if c.job_id in renewed.cancel])
                await self._obey(renewed.control)
                outage.passed()
            except Exception as exc:   # never ends: leases are renewed again once Redis can
                outage.failed(exc)
        raise asyncio.CancelledError

    async def _obey(self, control: WorkerControl) -> None:
        """Do what an operator asked (elric worker pause|resume|stop|set), without a restart."""
        if control.paused != self.paused:
            self.paused = control.paused
            await self._end_wait()
            log.info("worker %s: %s", self.worker_id,
                     "paused: fetches no jobs, runs those it holds" if self.paused
                     else "resumed: fetching jobs again")
            self._changed.set()
        if control.queues and control.queues != self.queues:
            log.info("worker %s: now serves queues %s", self.worker_id,
                     ",".join(control.queues))
            self.queues = control.queues
            await self._end_wait()   # it waits on the old queues' wake lists
            self._changed.set()
        if control.concurrency and control.concurrency != self.concurrency \
                and not self.stopping:
            # a smaller pool lets the processes it drops finish their jobs first
            self.pool.resize(control.concurrency)
            log.info("worker %s: pool resized to %d processes (was %d)", self.worker_id,
                     control.concurrency, self.concurrency)
            self.concurrency = control.concurrency   # _sizes fetches for this many
            self._changed.set()
        if control.stop and not self.stopping:
            log.info("worker %s: asked to stop", self.worker_id)
            self.request_stop()

    def _unbuffer(self, which: Callable[[Claim], bool]) -> list[Claim]:
        """Take the claims ``which`` picks, not started yet, out of the buffer and suspects."""
        taken = [c for c in (*self.buffer, *self.crash_suspects) if which(c)]
        if taken:
            self.buffer = deque(c for c in self.buffer if not which(c))
            self.crash_suspects = deque(c for c in self.crash_suspects if not which(c))
        return taken

    def _drop_lost(self, lost: list[Claim]) -> None:
        """Claims whose lease went to another worker leave without running."""
        gone = {id(c) for c in lost}
        for claim in self._unbuffer(lambda c: id(c) in gone):
            log.warning("worker: job %s lost its lease before it started (this worker "
                        "was paused or cut off from Redis); not starting it", claim.job_id)
            self._changed.set()

    def _stop_cancelled(self, claims: list[Claim]) -> None:
        """cancel_job asked to stop these claims' runs: a waiting one leaves unstarted, a
        running one is stopped by the pool (``Pool.cancel``); either is recorded cancelled.
        The mark is the claim's: a reply read after its run ended touches no later run."""
        for claim in (c for c in claims if not c.cancelling):
            claim.cancelling = True
            log.info("worker: job %s cancelled; stopping it", claim.job_id)
            for waiting in self._unbuffer(lambda c: c is claim):
                self.finished.append((waiting, runner.cancelled_before_start(waiting.run)))
                self._finished.set()
            self.pool.cancel(claim)

    # --- shutdown ---------------------------------------------------------------------
    async def _give_back(self, claims: list[Claim], kind: str) -> None:
        """Give claims back to the queue, trying until the stop ends it (``_given``). No
        failure may end the stop: running jobs would go on unrecorded, the worker never exit."""
        try:
            n = await self._retry_redis(self.queue.release, self.worker_id,
                                        [c.run for c in claims])
        except (Exception, asyncio.CancelledError) as exc:
            outage = isinstance(exc, asyncio.CancelledError) or is_outage(exc)
            self.broken = self.broken or not outage   # no retry helps: exit non-zero
            log.log(logging.WARNING if outage else logging.ERROR,
                    "worker: could not give %d job(s) back (%s); they run again once "
                    "their leases run out", len(claims),
                    str(exc) or "Redis away till the stop's end")
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        log.info("worker: gave %d %s job(s) back to the queue", n, kind)

    async def _shutdown(self, recorder: asyncio.Task) -> None:
        """Let running jobs finish within SHUTDOWN_GRACE of the stop (a supervisor's SIGKILL
        timeout counts from SIGTERM too), giving prefetched jobs back; then stop the rest and
        give them back. Give-backs unfinished GIVE_BACK_SECONDS later are left to the leases."""
        self.stopping = True
        grace_end = (self._stop_at or time.monotonic()) + self.settings.SHUTDOWN_GRACE
        self._giving.append(asyncio.create_task(self._stop_fetching()))
        # (a second Ctrl-C ends this wait: the outcomes of jobs that ended are still recorded)
        await self._wait_while(lambda: not self.forced and (
            self.pool.claims() or self.finished or self.recording), grace_end, recorder)
        left = self.pool.claims()
        if left:
            log.warning("worker: %d job(s) still running %s; stopping them and returning "
                        "them to the queue", len(left),
                        "at a second Ctrl-C" if self.forced else "after SHUTDOWN_GRACE")
        self.pool.kill_all()
        self.pool.shutdown(wait=True, cancel_futures=True)
        end = time.monotonic() + GIVE_BACK_SECONDS
        # jobs still running, and those whose process died while we waited: back in line
        self._give_back_waiting(left)
        if (self.finished or self.recording) and not recorder.done():
            # jobs that ended: cut off now, they would run again once their leases end
            log.warning("worker: still recording the outcomes of %d job(s) after "
                        "SHUTDOWN_GRACE; waiting up to %gs more", len(self.finished)
                        + len(self.recording), GIVE_BACK_SECONDS)
            await self._wait_while(lambda: self.finished or self.recording, end, recorder)
        recorder.cancel()
        for claims, sent in ((self.finished, ""), (self.recording, "unless Redis recorded it "
                             "and only the reply was lost, ")):   # (the cancel has not landed)
            for claim, _ in claims:
                log.error("worker: job %s: could not record the outcome of its attempt %d "
                          "before stopping; %sit runs again once its lease ends", claim.job_id,
                          claim.attempt, sent, extra=_job_fields(claim))
                self.broken = True
        await self._given(end)

    async def _stop_fetching(self) -> None:
        """A stop's first steps, beside the grace: end the wait for work and look for the
        claims of a fetch whose reply was lost; then give back what they brought."""
        try:   # outages are retried inside; no other failure may cost running jobs the grace
            await self._end_wait()
            if self._unsure_since:
                await self._release_unknown(math.inf)   # (till it passes or the stop ends)
        except Exception:
            log.error("worker: could not look for the jobs a lost fetch may have claimed "
                      "(they run again once their leases run out); running jobs still get "
                      "SHUTDOWN_GRACE", exc_info=True)
            self.broken = True
        self._give_back_waiting()

    def _give_back_waiting(self, also: list[Claim] | None = None) -> None:
        """A stopping worker starts no job: those waiting here (and ``also``) go back."""
        waiting = [*(also or ()), *self.buffer, *self.crash_suspects]
        self.buffer.clear()
        self.crash_suspects.clear()
        if waiting:
            self._giving.append(asyncio.create_task(
                self._give_back(waiting, "stopped" if also else "prefetched")))

    async def _given(self, end: float) -> None:
        """Wait for the stop's give-backs till ``end``, then end them: leases do the rest."""
        while pending := [t for t in self._giving if not t.done()]:
            if time.monotonic() >= end:
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending, timeout=1)   # (they say what they gave up)
                return
            await asyncio.wait(pending, timeout=end - time.monotonic())

    async def _wait_while(self, busy, deadline: float, recorder: asyncio.Task) -> None:
        """While ``busy()``, till ``deadline`` (time.monotonic()), unless the recorder ended."""
        while busy() and time.monotonic() < deadline and not recorder.done():
            self._changed.clear()
            self.pool.kill_overdue()
            # jobs back unstarted meanwhile (a process died, withdrawn) go back at once
            self._give_back_waiting()
            await until(self._changed, min(0.5, deadline - time.monotonic()))

    async def _close(self, registered: bool = True) -> None:
        try:
            if registered:   # with the jobs finished after the last heartbeat, else in flight
                mark = self.redis.hset(self.keys.worker(self.worker_id), mapping={
                    "state": "stopped", "in_flight": 0, "processed": self.processed,
                    "done": self.done, "failed": self.failed})
                await asyncio.wait_for(mark, 1)   # (Redis frozen: a stop's time is bounded)
        except Exception as exc:   # Redis away or full: its heartbeats stop, which says it too
            log.warning("worker: could not record that it stopped (%s)",
                        str(exc) or "no answer within a second")
        await self.master.close()
        await self.redis.aclose()
        await self.blocking_redis.aclose()
        log.info("worker %s: stopped after %d job(s)", self.worker_id, self.processed)
