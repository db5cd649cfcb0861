"""The worker: pull jobs with a lease, run them in a process pool, record outcomes.

One asyncio loop does all the Redis and RPC work; jobs run in a
``concurrent.futures.ProcessPoolExecutor``. Fast jobs go to the pool in chunks so that
per-job overhead stays small; slow jobs go one by one. A worker holds at most one more
round of jobs than it runs (bounded prefetch), extends the leases of what it holds
(heartbeat), and gives prefetched jobs back at once when told to stop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import socket
import tempfile
import time
import uuid
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError as RedisAuthenticationError

from elric import codec, runner
from elric.config import Settings, SettingsError, redact_url
from elric.contract import ErrorCode
from elric.keys import Keys
from elric.queue import Claim, Outcome, RedisQueue, now_ms
from elric.retry import REDIS_ERRORS, REDIS_REFUSED, Backoff, retry
from elric.rpc import AsyncClient, RemoteError, RPCConnectionError, RPCError

log = logging.getLogger("elric.worker")

CHUNK_SECONDS = 0.02  # aim for chunks that run about this long
WARN_EVERY = 5.0  # seconds between warnings while waiting for Redis or the master


class _Chunk:
    __slots__ = ("jobs", "future", "started", "timeout", "timed_out", "pool", "slot")

    def __init__(self, jobs: list[Claim]) -> None:
        self.jobs = jobs
        self.future = None
        self.pool = None
        self.slot = -1  # index of the one-process pool that runs it
        self.started = time.monotonic()
        self.timeout = jobs[0].timeout if len(jobs) == 1 else None
        self.timed_out = False


class Worker:
    def __init__(self, settings: Settings, *, queues: list[str] | None = None,
                 concurrency: int | None = None, worker_id: str | None = None) -> None:
        self.settings = settings
        self.queues = list(queues or settings.QUEUES)
        self.concurrency = concurrency or settings.concurrency
        self.max_chunk = settings.WORKER_CHUNK
        self.lease = float(settings.LEASE_SECONDS)
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.keys = Keys(settings.KEY_PREFIX)
        self.buffer: deque[Claim] = deque()      # claimed, not yet handed to the pool
        self.suspects: deque[Claim] = deque()    # jobs of a chunk whose process died
        self.running: set[_Chunk] = set()
        self.pools: list[ProcessPoolExecutor] = []  # one single-process pool per slot
        self.stopping = False
        self.avg_job_seconds = CHUNK_SECONDS    # start with chunks of one
        self.processed = 0
        self._changed = asyncio.Event()
        self._wake_task: asyncio.Task | None = None
        self._tasks: set[asyncio.Task] = set()
        self._empty_dir: str | None = None   # the fork server's working directory
        self._connecting: asyncio.Task | None = None

    # --- setup ------------------------------------------------------------------------
    async def _connect(self) -> None:
        """Connect to Redis and the master, waiting for them as long as it takes: either may
        start after the worker. Settings that cannot work (a wrong password or RPC_TOKEN)
        are refused at once; ``request_stop`` cancels the wait."""
        s = self.settings
        self.redis = aioredis.Redis.from_url(s.REDIS_URL, socket_connect_timeout=5)
        self.blocking_redis = aioredis.Redis.from_url(s.REDIS_URL, socket_connect_timeout=5)
        backoff, next_warning = Backoff(0.2, 5.0), 0.0
        while True:
            what = f"Redis at {redact_url(s.REDIS_URL)}"
            try:
                await self.redis.ping()
                what = f"elric master at {s.MASTER_ADDRESS}"
                master = await self._connect_master()
                try:
                    await master.call("ping")
                except BaseException:
                    await master.close()
                    raise
                self.master = master
                break
            except RedisAuthenticationError as exc:  # before REDIS_ERRORS: it is one of them
                raise SettingsError(f"REDIS_URL {redact_url(s.REDIS_URL)}: cannot connect "
                                    f"({exc})") from None
            except RemoteError as exc:  # the master answered: no, e.g. a wrong RPC_TOKEN
                raise SettingsError(f"MASTER_ADDRESS {s.MASTER_ADDRESS}: {exc}") from None
            except REDIS_ERRORS + REDIS_REFUSED + (RPCConnectionError,) as exc:
                if time.monotonic() >= next_warning:
                    reason = str(exc).removeprefix(f"cannot reach {what}: ")
                    log.warning("worker: cannot reach %s; retrying (%s)", what, reason)
                    next_warning = time.monotonic() + WARN_EVERY
                await asyncio.sleep(backoff.next())
        self.queue = RedisQueue(self.redis, self.keys, result_ttl=s.RESULT_TTL,
                                failed_ttl=s.FAILED_TTL,
                                release_keys_on_failure=s.DEDUPE_RELEASE_ON_FAILURE)

    async def _connect_master(self) -> AsyncClient:
        s = self.settings
        host, port = s.master_host_port
        return await AsyncClient.connect(host, port, timeout=10, token=s.RPC_TOKEN,
                                         max_message=s.RPC_MAX_MESSAGE)

    def _new_pool(self) -> ProcessPoolExecutor:
        import multiprocessing
        from multiprocessing import forkserver

        # The fork server and the pool processes it forks ignore SIGTERM (ignoring is
        # inherited): a SIGTERM sent to the whole process group (systemd, docker,
        # kill -- -PGID) then stops only this process, which lets running jobs finish.
        # Otherwise the fork server dies and takes the pool, and its running jobs, with it.
        previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
        here = os.getcwd()
        try:
            # The fork server imports elric once for every pool process. It runs as
            # `python -c`, whose sys.path starts with its current directory, where a folder
            # named elric/ (even empty) would stand in for the installed package: so it
            # starts in an empty directory, which must outlive it (a Python started in a
            # directory that is gone fails). Pool processes still get ours and our sys.path.
            if self._empty_dir is None:
                self._empty_dir = tempfile.mkdtemp(prefix="elric-forkserver-")
            os.chdir(self._empty_dir)
            forkserver.set_forkserver_preload(["elric.runner"])
            forkserver.ensure_running()
        finally:
            os.chdir(here)
            signal.signal(signal.SIGTERM, previous)
        return ProcessPoolExecutor(
            max_workers=1,  # one pool per slot: a process that dies breaks no one else's
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=runner.init_process,
            initargs=(tuple(self.settings.JOB_MODULES), os.getpid()),
        )

    async def _warm_pool(self) -> None:
        empty = codec.pack([])
        loop = asyncio.get_running_loop()
        await asyncio.gather(*(loop.run_in_executor(pool, runner.run_chunk, empty)
                               for pool in self.pools))

    # --- main loop --------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        self._connecting = asyncio.create_task(self._connect())
        try:
            await self._connecting
        except asyncio.CancelledError:
            if not self.stopping:
                raise
            await self.redis.aclose()  # told to stop before Redis and the master were there
            await self.blocking_redis.aclose()
            return 0
        self.pools = [self._new_pool() for _ in range(self.concurrency)]
        await self._warm_pool()
        await self._register()
        heartbeat = asyncio.create_task(self._heartbeat_loop())
        log.info("worker %s: queues %s, %d processes", self.worker_id,
                 ",".join(self.queues), self.concurrency)
        try:
            await self._loop()
        finally:
            heartbeat.cancel()
            await self._shutdown()
        return 0

    def request_stop(self) -> None:
        if not self.stopping:
            log.info("worker %s: stopping; running jobs may finish", self.worker_id)
        self.stopping = True
        self._changed.set()
        if self._connecting is not None and not self._connecting.done():
            self._connecting.cancel()

    @property
    def held(self) -> int:
        return len(self.buffer) + len(self.suspects) + sum(len(c.jobs) for c in self.running)

    def _chunk_size(self) -> int:
        return max(1, min(self.max_chunk, int(CHUNK_SECONDS / max(self.avg_job_seconds, 1e-6))))

    async def _loop(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            self._changed.clear()
            self._dispatch()
            chunk = self._chunk_size()
            target = self.concurrency * chunk  # one round waiting beside the one running
            want = target * 2 - self.held
            if len(self.buffer) < target and want > 0 and not self.suspects:
                try:
                    jobs = await self.queue.fetch(self.worker_id, self.queues, want, self.lease)
                    backoff.reset()
                except REDIS_ERRORS as exc:
                    delay = backoff.next()
                    log.warning("worker: Redis unreachable (%s); retrying in %.1fs", exc, delay)
                    await self._wait(delay)
                    continue
                if jobs:
                    self.buffer.extend(jobs)
                    continue
            idle = not self.buffer and len(self.running) < self.concurrency
            await self._wait(1.0, wake=idle)

    async def _wait(self, timeout: float, wake: bool = False) -> None:
        """Until something changed (a chunk finished, stop), a wake token, or timeout."""
        waiters = [asyncio.ensure_future(self._changed.wait())]
        if wake:
            if self._wake_task is None or self._wake_task.done():
                self._wake_task = asyncio.create_task(self.blocking_redis.blpop(
                    [self.keys.wake(q) for q in self.queues], timeout=timeout))
            waiters.append(self._wake_task)
        try:
            await asyncio.wait(waiters, timeout=timeout + 0.5,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiters[0].cancel()
        if self._wake_task is not None and self._wake_task.done():
            exc = self._wake_task.exception()
            self._wake_task = None
            if exc is not None and not self.stopping:
                await asyncio.sleep(0.2)  # Redis gone: the fetch path logs and backs off

    def _dispatch(self) -> None:
        """Hand chunks to free pool processes."""
        while len(self.running) < self.concurrency and not self.stopping:
            if self.suspects:
                # After a process died we cannot tell which of its chunk's jobs killed it:
                # run them one per chunk, so the culprit is found and no one else pays.
                jobs = [self.suspects.popleft()]
            elif self.buffer:
                size = self._chunk_size()
                jobs = [self.buffer.popleft()]
                if jobs[0].timeout is None:
                    while len(jobs) < size and self.buffer and self.buffer[0].timeout is None:
                        jobs.append(self.buffer.popleft())
            else:
                return
            self._submit(_Chunk(jobs))

    def _submit(self, chunk: _Chunk) -> None:
        items = [{"job_id": j.job_id, "attempt": j.attempt, "func": j.func, "args": j.args,
                  "kwargs": j.kwargs, "timeout": j.timeout, "dedupe_scope": j.dedupe_scope}
                 for j in chunk.jobs]
        busy = {c.slot for c in self.running}
        chunk.slot = next(i for i in range(self.concurrency) if i not in busy)
        data = codec.pack(items)
        try:
            chunk.future = self.pools[chunk.slot].submit(runner.run_chunk, data)
        except BrokenProcessPool:
            self._replace_pool(chunk.slot)
            chunk.future = self.pools[chunk.slot].submit(runner.run_chunk, data)
        chunk.pool = self.pools[chunk.slot]
        self.running.add(chunk)
        task = asyncio.create_task(self._complete(chunk))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _complete(self, chunk: _Chunk) -> None:
        try:
            outcomes = [runner.Ran(*row) for row in codec.unpack(
                await asyncio.wrap_future(chunk.future))]
        except BrokenProcessPool:
            outcomes = self._crashed(chunk)
        except Exception as exc:  # the pool could not even run it
            log.exception("worker: chunk failed outside the job code")
            outcomes = [runner.Ran.failure(j.job_id, j.attempt, f"worker error: "
                                           f"{type(exc).__name__}: {exc}") for j in chunk.jobs]
        try:
            if outcomes:
                await self._record(chunk, outcomes)
        finally:
            self.running.discard(chunk)
            self._changed.set()

    def _crashed(self, chunk: _Chunk) -> list[runner.Ran]:
        """A pool process died. Return outcomes for jobs known to be at fault."""
        if self.pools[chunk.slot] is chunk.pool:
            self._replace_pool(chunk.slot)
        if chunk.timed_out or len(chunk.jobs) == 1:  # it ran nothing else: the culprit
            job = chunk.jobs[0]
            why = (f"JobTimeout: ran past its timeout of {job.timeout:g}s and its process "
                   "was killed") if chunk.timed_out else (
                   "the job's process died (os._exit, a signal or a crash in native code)")
            return [runner.Ran.failure(job.job_id, job.attempt, why)]
        self.suspects.extend(chunk.jobs)
        log.warning("worker: a pool process died; re-running %d job(s) one by one to find "
                    "which one killed it", len(chunk.jobs))
        return []

    async def _record(self, chunk: _Chunk, outcomes: list[runner.Ran]) -> None:
        by_id = {j.job_id: j for j in chunk.jobs}
        per_job = sum(o.finished_at - o.started_at for o in outcomes) / len(outcomes)
        self.avg_job_seconds = 0.7 * self.avg_job_seconds + 0.3 * per_job
        if any(o.ok and o.children for o in outcomes):
            refused = await self._send_children(outcomes)
            for o in outcomes:
                if o.job_id in refused:
                    o.ok, o.final = False, True
                    o.payload = f"a child job was refused by the master: {refused[o.job_id]}"
        records = []
        for o in outcomes:
            retry_ms = -1
            if not o.ok and not o.final and o.attempt <= by_id[o.job_id].max_retries:
                retry_ms = self._backoff_ms(o.attempt)
            records.append(Outcome(o.job_id, o.attempt, o.ok, o.payload,
                                   int((o.finished_at - o.started_at) * 1000), retry_ms))
        await self._retry_redis(self.queue.finish, self.worker_id, records)
        self.processed += len(records)

    def _backoff_ms(self, attempt: int) -> int:
        s = self.settings
        delay = min(s.RETRY_BACKOFF_MAX, s.RETRY_BACKOFF * 2 ** (attempt - 1))
        return int(delay * random.uniform(0.5, 1.0) * 1000)

    async def _send_children(self, outcomes: list[runner.Ran]) -> dict[str, str]:
        """Send child jobs to the master before their parents are acknowledged.

        Returns {parent_id: error} for parents whose children the master refused.
        """
        batch = [c for o in outcomes if o.ok for c in o.children]
        try:
            await self._call_master("submit_jobs", batch)
            return {}
        except RemoteError:
            pass  # one bad spec refuses the whole batch: find the parents at fault
        refused = {}
        for o in outcomes:
            if o.ok and o.children:
                try:
                    await self._call_master("submit_jobs", o.children)
                except RemoteError as exc:
                    refused[o.job_id] = str(exc)
        return refused

    async def _call_master(self, method: str, *params):
        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                return await self.master.call(method, *params)
            except RemoteError as exc:
                if exc.code != ErrorCode.REDIS_UNAVAILABLE:
                    raise
                # not a refusal of the children: the same call again, once Redis is back
                delay = backoff.next()
                log.warning("worker: %s; retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
            except RPCConnectionError as exc:
                delay = backoff.next()
                log.warning("worker: master unreachable (%s); retrying in %.1fs", exc, delay)
                await asyncio.sleep(delay)
                await self.master.close()
                try:
                    self.master = await self._connect_master()
                except RPCError:
                    continue

    async def _retry_redis(self, fn, *args):
        return await retry(lambda: fn(*args), what="worker: Redis unreachable", log=log)

    # --- heartbeat, registration ------------------------------------------------------
    async def _register(self) -> None:
        info = {"host": socket.gethostname(), "pid": os.getpid(), "queues": ",".join(self.queues),
                "concurrency": self.concurrency, "started_at": now_ms(), "state": "running"}
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(self.keys.worker(self.worker_id), mapping=info)
            pipe.expire(self.keys.worker(self.worker_id), 86400)
            pipe.zadd(self.keys.workers, {self.worker_id: now_ms()})
            await pipe.execute()

    def _held_ids(self) -> list[str]:
        ids = [j.job_id for j in self.buffer] + [j.job_id for j in self.suspects]
        for chunk in self.running:
            ids.extend(j.job_id for j in chunk.jobs)
        return ids

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                await self.queue.heartbeat(self.worker_id, self._held_ids(), self.lease)
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.zadd(self.keys.workers, {self.worker_id: now_ms()})
                    pipe.hset(self.keys.worker(self.worker_id), "processed", self.processed)
                    pipe.expire(self.keys.worker(self.worker_id), 86400)
                    await pipe.execute()
            except REDIS_ERRORS as exc:
                log.warning("worker: heartbeat failed (%s)", exc)
            self._kill_overdue()

    def _kill_overdue(self) -> None:
        """A job past its timeout that ignored the alarm (stuck in native code): kill it."""
        now = time.monotonic()
        for chunk in list(self.running):
            if chunk.timeout and not chunk.timed_out and now > chunk.started + chunk.timeout + 5:
                chunk.timed_out = True
                log.warning("worker: job %s ignored its timeout; killing its process",
                            chunk.jobs[0].job_id)
                self._kill_pool_processes(chunk.pool)  # its own process, no other

    def _replace_pool(self, slot: int) -> None:
        old, self.pools[slot] = self.pools[slot], self._new_pool()
        # pool processes ignore SIGTERM, so a broken pool's own terminate() does not stop
        # them: kill them
        self._kill_pool_processes(old)
        old.shutdown(wait=False, cancel_futures=True)

    def _kill_pool_processes(self, pool: ProcessPoolExecutor | None = None) -> None:
        for p in (self.pools if pool is None else [pool]):
            for proc in list((getattr(p, "_processes", None) or {}).values()):
                try:
                    proc.kill()
                except Exception:
                    pass

    # --- shutdown ---------------------------------------------------------------------
    async def _shutdown(self) -> None:
        self.stopping = True
        if self._wake_task is not None:
            self._wake_task.cancel()
        claims = [(j.job_id, j.attempt) for j in list(self.buffer) + list(self.suspects)]
        self.buffer.clear()
        self.suspects.clear()
        if claims:
            n = await self._retry_redis(self.queue.release, self.worker_id, claims)
            log.info("worker: gave %d prefetched job(s) back to the queue", n)
        if self._tasks:
            done, pending = await asyncio.wait(list(self._tasks),
                                               timeout=self.settings.SHUTDOWN_GRACE)
            if pending:
                left = [(j.job_id, j.attempt) for c in self.running for j in c.jobs]
                log.warning("worker: %d job(s) still running after SHUTDOWN_GRACE; stopping "
                            "them and returning them to the queue", len(left))
                for t in pending:
                    t.cancel()
                self._kill_pool_processes()
                await self._retry_redis(self.queue.release, self.worker_id, left)
        # jobs whose pool process died while we waited: back in line too, not left running
        late = [(j.job_id, j.attempt) for j in self.suspects]
        self.suspects.clear()
        if late:
            await self._retry_redis(self.queue.release, self.worker_id, late)
        for pool in self.pools:
            pool.shutdown(wait=True, cancel_futures=True)
        if self._empty_dir is not None:
            os.rmdir(self._empty_dir)   # the fork server, already running, keeps working
        try:
            await self.redis.hset(self.keys.worker(self.worker_id), "state", "stopped")
        except REDIS_ERRORS:
            pass
        await self.master.close()
        await self.redis.aclose()
        await self.blocking_redis.aclose()
        log.info("worker %s: stopped after %d job(s)", self.worker_id, self.processed)
