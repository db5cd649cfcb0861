"""What runs inside a worker's pool process: an event loop that runs jobs sent over a pipe.

An ``async def run`` runs as a task of the loop, many at once; a sync ``run`` blocks the
loop, so the worker sends sync jobs only to a process that holds no async ones. Job classes
are looked up among the modules loaded at start (``elric.loading``), never imported: Redis
may have been written by someone other than a master. cancel_job cancels an async job's
task; the pipe's reader thread drops a waiting sync job, or interrupts a running one with
SIGUSR1. Waiting sync jobs the worker asks back (``withdraw``) are reported withdrawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import logging
import _signal
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import warnings
from collections import deque
from dataclasses import dataclass, field
from functools import partial

from elric import codec, logs
from elric import job as job_module
from elric.contract import MAX_NESTING, SpecError
from elric.loading import JobModules, ModuleBroken

log = logging.getLogger("elric.runner")

FLUSH_SECONDS = 0.02  # an outcome waits at most about this long while sync jobs run
MAIN_ONLY = {signal.SIGALRM, signal.SIGUSR1}   # a job's alarm and cancel: they interrupt it
IGNORED = (signal.SIGINT, signal.SIGTERM)   # sent to the worker's whole process group
# a job's change to these would reach the next jobs: SIGPIPE's default kills the process at
# a write to a closed socket, and SIGCHLD ignored makes every subprocess seem to exit 0
SHARED = (signal.SIGPIPE, signal.SIGCHLD)


class JobTimeout(Exception):
    """Raised inside a sync job that ran past its timeout."""


class JobCancelled(BaseException):
    """Raised inside a sync job that cancel_job stopped. A BaseException, as
    KeyboardInterrupt is, so that a job's ``except Exception`` does not swallow it."""


CANCELLED = "Cancelled: cancel_job stopped it"


def past_timeout(timeout: float) -> str:
    return f"JobTimeout: ran past its timeout of {timeout:g}s"


@dataclass(slots=True)
class Ran:
    """How one attempt ended in a pool process; crosses back to the worker as a msgpack
    array (``row``). ``final``: no retry, whatever max_retries says; ``retry_after``: the
    failing exception's, the least seconds to wait before the retry (a Retry-After)."""

    job_id: str
    attempt: int
    ok: bool
    payload: bytes | str            # the packed result, or the error text
    children: list = field(default_factory=list)
    started_at: float = 0.0     # time.monotonic(): for the duration only, which a step of
    finished_at: float = 0.0    # the wall clock (NTP) must not bend
    final: bool = False
    is_async: bool = False
    retry_after: float = 0.0
    withdrawn: bool = False     # not started: the worker asked for it back
    member: str = ""

    @property
    def key(self) -> tuple[str, int, str]:
        """The run it is (Claim.run): a rerun counts its attempts from 1 again."""
        return self.job_id, self.attempt, self.member

    def row(self) -> list:
        return [getattr(self, name) for name in self.__slots__]

    def fail(self, why: str) -> None:   # ended too late, or too big: no result, no children
        self.ok, self.children, self.payload = False, [], why

    @classmethod
    def failure(cls, run: tuple[str, int, str], why: str, is_async: bool = False) -> "Ran":
        """``run`` (Claim.run, Ran.key) failed, now."""
        (job_id, attempt, member), now = run, time.monotonic()
        return cls(job_id, attempt, False, why, [], now, now, is_async=is_async, member=member)


@dataclass(slots=True)
class _SyncJob:
    run: partial   # the job's run, with its arguments
    ctx: job_module._RunContext
    out: Ran
    timeout: float | None


def _key(item: dict) -> tuple[str, int, str]:
    """A job sent by the worker, or a cancel or withdraw request: the run (Claim.run)."""
    return (item.get("job_id") or item.get("cancel") or item["withdraw"], item["attempt"],
            item["member"])


def serve(conn, job_modules: tuple[str, ...], worker_pid: int, cwd: str, log_level: str,
          lag_warn: float, result_max: int, log_format: str = "text") -> None:
    """A pool process's life: run the jobs that arrive on ``conn`` until the worker goes.
    ``cwd``: the worker's directory, where jobs run (not the fork server's empty one)."""
    with contextlib.suppress(OSError):   # gone since: the job's relative paths fail alone
        os.chdir(cwd)
    # (fds 1 and 2: pipes; sys.stdout and sys.stderr: JobStreams)
    output = logs.JobOutput(job_module._current) if log_format == "json" else None
    logs.configure(log_level, log_format, name="%(name)s[%(process)d]",   # as the worker's
                   stream=output.stderr if output else None)
    if output:   # from now: a module printing as it loads would fill the pipe and hang
        _start_thread(output.relay)
    _start_thread(_exit_with_worker, worker_pid)
    job_module.in_pool_process = True
    # the fork server imported the job modules: numpy's global random state, seeded there,
    # would give every pool process the same numbers (random's is seeded again at fork)
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()
    # stdin was the worker's (a terminal): the commands a job runs read /dev/null instead
    with contextlib.suppress(OSError), open(os.devnull) as null:
        os.dup2(null.fileno(), 0)
    # block-buffered to a file or pipe: what a job printed would be lost when its process dies
    with contextlib.suppress(AttributeError, ValueError):   # (replaced, or closed)
        sys.stdout.reconfigure(line_buffering=True)
    # a group of its own: Ctrl-C and `kill -- -PGID` to the worker's must not stop jobs, which
    # the worker stops itself. A SIGTERM may still come: a handler doing nothing (not SIG_IGN,
    # which exec keeps: a command's terminate() did nothing), SA_RESTART to spare reads EINTR.
    os.setpgid(0, 0)
    for sig in IGNORED:
        signal.signal(sig, lambda signum, frame: None)
        signal.siginterrupt(sig, False)
    try:
        import uvloop
        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _Runner(conn, loop, JobModules.load(job_modules), lag_warn, result_max, output).run()


def _start_thread(target, *args) -> None:
    """A daemon thread that never takes MAIN_ONLY signals (they must interrupt the main
    thread's blocking call). If it fails, the process exits rather than run half-alive."""
    def guarded() -> None:
        try:
            target(*args)
        except BaseException:
            log.exception("pool process: its %s thread failed; the process exits", name)
            os._exit(1)
    name = target.__name__.strip("_")
    old = signal.pthread_sigmask(signal.SIG_BLOCK, MAIN_ONLY)
    try:
        threading.Thread(target=guarded, daemon=True, name=f"elric-{name}").start()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _exit_with_worker(pid: int) -> None:
    """Exit as soon as the worker is gone (SIGKILL, OOM killer): forked by the fork server,
    not the worker, nothing else would stop this process."""
    with contextlib.suppress(AttributeError, OSError):
        select.select([os.pidfd_open(pid)], [], [])  # Linux 5.3+: readable once it has exited
        os._exit(1)
    while True:  # elsewhere: poll (a zombie still counts as alive until it is reaped)
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass


class _Runner:
    def __init__(self, conn, loop: asyncio.AbstractEventLoop, modules: JobModules,
                 lag_warn: float, result_max: int, output: logs.JobOutput | None = None) -> None:
        self.conn, self.loop, self.modules, self.lag_warn = conn, loop, modules, lag_warn
        self.output = output   # LOG_FORMAT json: what jobs write to fds 1 and 2, as records
        self.result_max = result_max   # RESULT_MAX_BYTES: what get_job can always send
        self.draining = False
        self.tasks: dict[asyncio.Task, Ran] = {}   # async jobs in flight
        # shared with the reader thread, under `inbox_lock`
        self.inbox_lock = threading.Lock()
        self.inbox: list[dict] = []               # jobs taken off the pipe, not started
        self.sync_jobs: deque[_SyncJob] = deque()   # started, waiting for the loop
        self.cancels: set[tuple[str, int, str]] = set()   # runs (Ran.key) asked to stop
        self.running: tuple[str, int, str] | None = None   # the sync job inside its run()
        self.timer_set = False   # its timeout is armed (SIGALRM)
        # outbox_lock is held only to swap outbox and new_kinds, never over a send that a
        # full pipe blocks; send_lock keeps the loop's and _send_waiting's messages whole
        self.outbox_lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.outbox: list[Ran] = []
        self.reported = threading.Event()     # the outbox has something: wakes _send_waiting
        self.kinds: dict[str, bool] = {}       # func -> its run is async, as resolved here
        self.new_kinds: dict[str, bool] = {}   # not yet told to the worker
        self.flushing = False
        self.blocking: str | None = None   # the async job _watch_lag found blocking the loop
        self.forked = False   # this is the child of a job's os.fork()
        self.cwd = os.open(".", os.O_RDONLY | os.O_DIRECTORY)   # where jobs start
        # the environment and umask jobs start with, which _report puts back: the bytes
        # dict (environb's too) compares without decoding a value
        self.env = os.environ
        self.environ = dict(self.env._data)
        self.umask = os.umask(0o022)
        os.umask(self.umask)
        self.stdout, self.stderr = sys.stdout, sys.stderr
        # process-wide settings a job may change, each (read, write, value now)
        root = logging.getLogger()
        self.settings = [(read, write, read()) for read, write in (
            (socket.getdefaulttimeout, socket.setdefaulttimeout),
            (sys.getrecursionlimit, sys.setrecursionlimit),   # (raised: a runaway crashes)
            (lambda: root.level, root.setLevel), (lambda: root.manager.disable, logging.disable),
            (lambda: list(root.handlers), lambda value: setattr(root, "handlers", list(value))))]
        # warnings filters (a copy: one is added in place), and who shows and formats
        # warnings, with logging's record of it (else captureWarnings no-ops after a job's)
        self.settings += [(lambda: warnings.filters, _set_warning_filters, list(warnings.filters)),
                          (_warning_hooks, _set_warning_hooks, _warning_hooks())]
        self.last_tick = time.monotonic()
        self.sync_loop: asyncio.AbstractEventLoop | None = None   # get_event_loop's in sync jobs
        self.sync_tasks: list[asyncio.Task] = []   # made on it by the sync job running

    def run(self) -> None:
        signal.signal(signal.SIGALRM, self._on_alarm)   # a sync job's timeout
        signal.signal(signal.SIGUSR1, self._on_cancel)
        self.handlers = {sig: _signal.getsignal(sig) for sig in (*MAIN_ONLY, *IGNORED, *SHARED)}
        os.register_at_fork(after_in_child=self._forked)
        _start_thread(self._read)
        _start_thread(self._send_waiting)
        if self.lag_warn:
            self.loop.call_soon(self._tick)
            _start_thread(self._watch_lag)
        while True:
            try:
                self.loop.run_forever()
                return   # stopped: in the child of a job's fork (_forked)
            except (SystemExit, KeyboardInterrupt):
                pass   # raised in a job's task: asyncio re-raises it here too; others go on

    def _forked(self) -> None:
        """In the child of a job's os.fork(): one that returns here must not run on as a second
        runner on this pipe; it exits at its report or when its loop next turns."""
        self.forked = True
        self.loop.stop()
        # it is the job's: it stops at SIGTERM and SIGINT (multiprocessing's terminate)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    # --- the pipe ---------------------------------------------------------------------
    def _read(self) -> None:
        """A thread that always drains the pipe, so the worker never waits on a full one
        while a sync job holds the loop. It never writes to the pipe: it could block there
        while the worker blocks sending to it."""
        main = threading.main_thread().ident
        while True:
            try:
                items = codec.unpack(self.conn.recv_bytes()) or []
            except (EOFError, OSError):
                os._exit(0)  # the worker closed its end: it is done with this process
            jobs = [i for i in items if "job_id" in i]
            cancels = {_key(i) for i in items if "cancel" in i}
            withdraws = {_key(i) for i in items if "withdraw" in i}
            with self.inbox_lock:
                self.inbox.extend(jobs)
                self.cancels |= cancels
                dropped = self._drop_waiting(cancels) if cancels else []
                for out in self._drop_waiting(withdraws) if withdraws else []:
                    out.payload, out.withdrawn = "withdrawn before it started", True
                    dropped.append(out)
            if dropped:
                self._queue(dropped)
            # after `cancels` grew: _run_sync sets `running` before it looks at them
            if self.running in cancels:
                signal.pthread_kill(main, signal.SIGUSR1)
            self.loop.call_soon_threadsafe(self._take)

    def _drop_waiting(self, cancels: set[tuple[str, int]]) -> list[Ran]:
        """Under inbox_lock: take the asked-for jobs that wait to start out of the inbox and
        the sync queue; their requests are answered. Returns their outcomes."""
        dropped = [cancelled_before_start(_key(i), is_async=self.kinds.get(i["func"], False))
                   for i in self.inbox if _key(i) in cancels]
        dropped += [cancelled_before_start(job.out.key) for job in self.sync_jobs
                    if job.out.key in cancels]
        self.inbox = [i for i in self.inbox if _key(i) not in cancels]
        self.sync_jobs = deque(job for job in self.sync_jobs if job.out.key not in cancels)
        self.cancels.difference_update(out.key for out in dropped)
        return dropped

    def _take(self) -> None:
        """Start the jobs the reader took; cancel the async ones asked to stop, and forget
        requests for jobs that have ended."""
        with self.inbox_lock:
            items, self.inbox = self.inbox, []
        waiting = [job for item in items if (job := self._start(item)) is not None]
        if waiting:
            with self.inbox_lock:
                self.sync_jobs.extend(waiting)
            if not self.draining:
                self.draining = True
                self.loop.call_soon(self._drain_sync)
        if self.outbox:   # what the reader dropped: the loop is free, send it now
            self._flush_soon()
        if not self.cancels:
            return
        with self.inbox_lock:
            asked = set(self.cancels)
            live = {job.out.key for job in self.sync_jobs}
        for task, out in self.tasks.items():
            live.add(out.key)
            if out.key in asked and not task.cancelling():
                task.cancel()
        with self.inbox_lock:
            self.cancels -= asked - live

    # The two signals raise only inside a sync job's run() (`running`): elsewhere they would
    # break the loop. They take no lock, which the main thread may hold when they come.
    def _on_cancel(self, signum, frame) -> None:
        if self.running is not None and self.running in self.cancels:
            raise JobCancelled(CANCELLED)

    def _on_alarm(self, signum, frame) -> None:
        if self.running is not None and self.timer_set:   # not an alarm of the job's own
            raise JobTimeout("job ran past its timeout")

    def _report(self, out: Ran) -> None:
        if self.forked:
            os._exit(0)
        # put back what the job changed for the whole process, which the next jobs would
        # have: signal handlers and mask (our alarm and cancel must still interrupt them)
        for sig, handler in self.handlers.items():
            # _signal's: signal.getsignal raises and catches a ValueError for our handlers
            if _signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, MAIN_ONLY)
        try:   # (no contextlib.suppress: per job, its object costs twice the call)
            os.fchdir(self.cwd)
        except OSError:
            pass
        os.umask(self.umask)
        if os.environ is not self.env or self.env._data != self.environ:
            self._restore_environ()
        for read, write, value in self.settings:
            if read() != value:
                write(value)
        if sys.stdout is not self.stdout or sys.stderr is not self.stderr or getattr(
                self.stdout, "closed", False) or getattr(self.stderr, "closed", False):
            self._restore_stdio()
        out.finished_at = time.monotonic()
        if isinstance(out.payload, str):   # a lone surrogate (surrogateescape): not msgpack
            out.payload = out.payload.encode("utf-8", "backslashreplace").decode("utf-8")
        size = len(out.payload.encode() if isinstance(out.payload, str) else out.payload)
        if size > self.result_max:   # in bytes, as stored: an error text's too
            if out.ok:
                out.fail(f"ResultTooLarge: the result is {size:,} bytes, over "
                         f"RESULT_MAX_BYTES ({self.result_max:,}); return less, or store it "
                         "elsewhere (a file, an object store) and return where it is")
            else:   # a traceback that big: keep its end, where the exception is
                tail = out.payload.encode()[-self.result_max:]
                out.payload = "[... cut ...]\n" + tail.decode("utf-8", "ignore")
        self._queue([out])
        self._flush_soon()

    def _drain_output(self) -> None:
        """What the sync job ending wrote is passed on with its id, not the next job's."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:   # closed or replaced by the job: _restore_stdio's to mend
                pass
        self.output.switch(None)

    def _restore_environ(self) -> None:
        os.environ = self.env   # (a job may have put a plain dict there)
        now = self.env._data
        zone = now.get(b"TZ")
        for key in now.keys() - self.environ.keys():
            del os.environb[key]   # (unsetenv too, for subprocesses and C libraries)
        for key, value in self.environ.items():
            if now.get(key) != value:
                os.environb[key] = value
        if zone != self.environ.get(b"TZ"):   # the C library reads TZ at tzset() only
            time.tzset()

    def _restore_stdio(self) -> None:
        for name, fd in (("stdout", 1), ("stderr", 2)):
            ours = getattr(self, name)
            if getattr(ours, "closed", False):   # its fd is open: Python's own are closefd=False
                with contextlib.suppress(OSError):
                    new = open(fd, "w", buffering=1, encoding=getattr(ours, "encoding", None),
                               errors=getattr(ours, "errors", None), closefd=False)
                    for handler in logging.getLogger().handlers:   # logs.configure's: this
                        if getattr(handler, "stream", None) is ours:   # process's own lines
                            handler.stream = new   # (not setStream: it flushes the closed one)
                    if isinstance(ours, logs.JobStream):   # json: kept, on the new stream
                        ours.stream = new
                    else:
                        setattr(self, name, new)
            setattr(sys, name, getattr(self, name))

    def _queue(self, outs: list[Ran]) -> None:
        with self.outbox_lock:
            first = not self.outbox
            self.outbox += outs
        if first:
            self.reported.set()

    def _flush_soon(self) -> None:
        if not self.flushing and not self.draining:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        self._send()

    def _send(self, force: bool = False) -> None:
        """Send the outcomes and the kinds of job classes learnt since the last send, and
        which job blocks the loop now, if one does."""
        with self.send_lock:
            with self.outbox_lock:
                if not self.outbox and not self.new_kinds and not force:
                    return
                outs, kinds = self.outbox, self.new_kinds
                self.outbox, self.new_kinds = [], {}
            message = codec.pack({"ran": [o.row() for o in outs], "kinds": kinds,
                                  "blocking": self.blocking})
            try:
                self.conn.send_bytes(message)
            except OSError:
                os._exit(0)  # the worker is gone

    def _send_waiting(self) -> None:
        """A thread: outcomes that waited FLUSH_SECONDS go out while sync jobs hold the loop;
        else one that ended before a long one would be run again if that one is stopped."""
        while True:
            self.reported.wait()
            time.sleep(FLUSH_SECONDS)
            with self.outbox_lock:
                if not self.outbox:
                    self.reported.clear()   # _queue sets it again, after this
                    continue
                oldest = self.outbox[0].finished_at
            if time.monotonic() - oldest >= FLUSH_SECONDS:
                self._send()

    # --- running jobs -----------------------------------------------------------------
    def _start(self, item: dict) -> _SyncJob | None:
        """Start an async job; a sync one is returned, to wait for the loop."""
        out = Ran(item["job_id"], item["attempt"], False, "", started_at=time.monotonic(),
                  member=item["member"])
        try:
            cls = self.modules.job_class(item["func"])
            args = codec.unpack(item["args"]) or []
            kwargs = codec.unpack(item["kwargs"]) or {}
            instance = cls()
            instance.job_id, instance.attempt = item["job_id"], item["attempt"]
            instance.max_retries = item["max_retries"]   # the claim's: its spec may say so
            instance.dedupe_scope = item.get("dedupe_scope") or None
        except (SpecError, ModuleBroken) as exc:
            log.error("job %s: %s", item["job_id"], exc)
            # no such Job class in a loaded module: no retry helps; a broken one may be fixed
            out.final = isinstance(exc, SpecError)
            out.payload = f"refused: {exc}" if out.final else f"ModuleBroken: {exc}"
            return self._report(out)
        except BaseException as exc:
            return self._report(_failed(out, exc))
        ctx = job_module._RunContext(item["job_id"], item)
        if item["func"] not in self.kinds:   # told now, not at its end: async jobs may join
            is_async = self.kinds[item["func"]] = inspect.iscoroutinefunction(cls.run)
            with self.outbox_lock:
                self.new_kinds[item["func"]] = is_async
            self._flush_soon()
        run = partial(instance.run, *args, **kwargs)
        if self.kinds[item["func"]]:
            out.is_async = True
            task = self.loop.create_task(self._run_async(run, ctx, out, item.get("timeout")))
            self.tasks[task] = out
            task.add_done_callback(self._task_done)
            return None
        return _SyncJob(run, ctx, out, item.get("timeout"))

    async def _run_async(self, run, ctx, out: Ran, timeout) -> None:
        job_module._current.set(ctx)  # this task's own context: one per job
        try:
            async with asyncio.timeout(timeout) as deadline:
                result = await run()
            _succeeded(out, result, ctx)
        except BaseException as exc:  # a job's SystemExit or CancelledError fails it too
            _failed(out, exc)
            if isinstance(exc, asyncio.CancelledError) and self._asked(out):
                out.payload = CANCELLED + "\n" + out.payload
        ctx.ended = True
        if self.output is not None:
            self.output.end(ctx)
        if timeout is not None and self.loop.time() >= deadline.when():
            # stopped by its timeout, or ended past it all the same: it swallowed the
            # cancellation, or blocked its loop without awaiting until it returned
            out.fail(past_timeout(timeout) + (" (cancelled)" if deadline.expired() else ""))
        self._report(out)

    def _task_done(self, task: asyncio.Task) -> None:
        out = self.tasks.pop(task)
        if task.cancelled():   # cancelled before its first step: _run_async never ran
            self._asked(out)
            self._report(cancelled_before_start(out.key, True))

    def _asked(self, out: Ran) -> bool:
        """Whether cancel_job asked to stop this attempt; the request is answered now."""
        if out.key not in self.cancels:   # most jobs, without the lock: a request that
            return False                  # comes after is stale, and _take forgets it
        with self.inbox_lock:
            asked = out.key in self.cancels
            self.cancels.discard(out.key)
        return asked

    def _drain_sync(self) -> None:
        """Run the sync jobs that arrived in turn (``_send_waiting`` reports them meanwhile)."""
        # a sync job may run a loop of its own (asyncio.run), refused inside a running one
        asyncio._set_running_loop(None)
        try:
            while True:
                with self.inbox_lock:
                    if not self.sync_jobs:
                        break
                    job = self.sync_jobs.popleft()
                self._run_sync(job)
                self._asked(job.out)   # answered: its request, if any, is forgotten
                self._report(job.out)
        finally:
            asyncio._set_running_loop(self.loop)
        self.draining = False
        self._flush()

    def _run_sync(self, job: _SyncJob) -> None:
        out, timeout = job.out, job.timeout
        # a context of its own, as a task's: what it sets there (decimal's precision, a
        # logger's bound fields) would stay for the jobs after it in its batch
        context = contextvars.copy_context()
        context.run(job_module._current.set, job.ctx)
        began = out.started_at = time.monotonic()   # not its batch's arrival
        late = False
        try:
            try:
                # get_event_loop() must not give the loop running the job, which refuses
                # run_until_complete (in the try: with no fd left, it fails the job alone)
                if self.sync_loop is None or self.sync_loop.is_closed():
                    self.sync_loop = asyncio.new_event_loop()
                    self.sync_loop.set_task_factory(self._sync_task)
                asyncio.set_event_loop(self.sync_loop)
                if self.output is not None:
                    self.output.switch(out.job_id)
                self.running = out.key   # from here on, the two signals may raise
                if timeout:
                    self.timer_set = True
                    signal.setitimer(signal.ITIMER_REAL, timeout)   # _on_alarm stops it
                if out.key in self.cancels:   # asked after it left the queue, unsignalled
                    raise JobCancelled(CANCELLED)
                try:
                    result = context.run(job.run)
                finally:   # (within its timeout: a task may hold out against its cancel)
                    loop = self.sync_loop
                    if self.sync_tasks or loop is not None and (loop._ready or loop._asyncgens):
                        self._end_tasks()
            finally:
                self.running, self.timer_set = None, False
                if timeout:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if self.output is not None and not self.forked:
                    self._drain_output()
            _succeeded(out, result, job.ctx)
        except JobTimeout:
            late = True
        except JobCancelled:
            out.payload = CANCELLED
        except BaseException as exc:
            _failed(out, exc)
        finally:
            job.ctx.ended = True
        # however it ended: a job whose `except Exception` caught its JobTimeout ran on
        if late or (timeout and time.monotonic() - began >= timeout):
            out.fail(past_timeout(timeout))

    def _sync_task(self, loop, coro, **kwargs) -> asyncio.Task:
        """The sync jobs' loop's task factory: notes each task (cheaper than all_tasks)."""
        task = asyncio.Task(coro, loop=loop, **kwargs)
        self.sync_tasks.append(task)
        return task

    def _end_tasks(self) -> None:
        """Cancel the tasks a sync job left on its loop and let them end, then close the async
        generators it left unfinished, as asyncio.run does: else they would run inside the
        next sync job that runs the loop (a generator's ``finally``, or never)."""
        tasks, loop = [t for t in self.sync_tasks if not t.done()], self.sync_loop
        self.sync_tasks.clear()
        if loop.is_running() or loop.is_closed():
            return
        if tasks:
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        # those still held (by a traceback) are closed here; those dropped already have
        # their aclose waiting in _ready (the loop's finalizer), made a task as this runs
        gens = list(loop._asyncgens)
        if gens or loop._ready:
            loop._asyncgens.difference_update(gens)
            loop.run_until_complete(asyncio.gather(*(g.aclose() for g in gens),
                                                   return_exceptions=True))
            closing = [t for t in self.sync_tasks if not t.done()]
            self.sync_tasks.clear()
            if closing:
                loop.run_until_complete(asyncio.gather(*closing, return_exceptions=True))

    # --- a blocked loop ---------------------------------------------------------------
    def _tick(self) -> None:
        self.last_tick = time.monotonic()
        self.loop.call_later(0.1, self._tick)

    def _watch_lag(self) -> None:
        """Name the async job that blocks the loop (time.sleep, a sync HTTP call): it holds
        back every other job of this process. Sync jobs block it by design. The worker is
        told too: if it must kill the process, that job is to blame, not those held up."""
        warned = 0.0
        while True:
            time.sleep(0.1)
            tick = self.last_tick   # read once: the loop may turn meanwhile
            stalled = time.monotonic() - tick
            if self.blocking is not None and tick != warned:   # it turns again
                self.blocking = None
                self._send(force=True)
            if stalled < self.lag_warn or tick == warned or self.draining \
                    or not self.tasks:   # no async job in flight: a sync job blocks it
                continue
            warned = tick
            task = getattr(asyncio.tasks, "_current_tasks", {}).get(self.loop)
            culprit = self.tasks.get(task) if task is not None else None
            if culprit and self.last_tick == tick:   # (still the same stall: it holds it)
                self.blocking = culprit.job_id
                self._send(force=True)
            who = f"job {culprit.job_id}" if culprit else \
                f"one of jobs {sorted(o.job_id for o in list(self.tasks.values()))}"
            log.warning("%s has blocked its event loop for %.1fs: an async run must not call "
                        "blocking code (time.sleep, a sync HTTP client); await instead, or "
                        "use asyncio.to_thread", who, stalled)


def _set_warning_filters(filters: list) -> None:
    warnings.filters = list(filters)
    warnings._filters_mutated()   # (as catch_warnings does: drops the cached decisions)


def _warning_hooks() -> tuple:
    return warnings.showwarning, warnings.formatwarning, logging._warnings_showwarning


def _set_warning_hooks(hooks: tuple) -> None:
    warnings.showwarning, warnings.formatwarning, logging._warnings_showwarning = hooks


def _succeeded(out: Ran, result, ctx) -> None:
    if inspect.iscoroutine(result):   # its code never ran: say why, not "not msgpack"
        result.close()   # (and no "never awaited" warning)
        out.payload = ("TypeError: run returned a coroutine, which nothing awaited: make run "
                       "itself `async def` (a decorator around it must be async too)")
        return
    try:
        out.payload = codec.pack_readable(result)
    except (TypeError, ValueError, OverflowError) as exc:
        out.payload = (f"TypeError: the job returned {type(result).__name__}, which is not a "
                       f"msgpack value ({exc}); return plain data (dict, list, str, numbers)")
        return
    if codec.nests_deeper(result, MAX_NESTING):   # as arguments: the dashboard shows no deeper
        out.payload = (f"TypeError: the result nests deeper than {MAX_NESTING} levels of lists "
                       "and maps, the most job arguments and results may; return a flatter "
                       "value")
        return
    out.ok, out.children = True, ctx.children


def cancelled_before_start(run: tuple[str, int, str], is_async: bool = False) -> Ran:
    """The outcome of a job cancel_job stopped before it started (here or in the worker)."""
    return Ran.failure(run, CANCELLED + " before it started", is_async)


def _failed(out: Ran, exc: BaseException) -> Ran:
    out.payload = "".join(traceback.format_exception(exc))
    if isinstance(exc, (SystemExit, KeyboardInterrupt, asyncio.CancelledError)):
        # format_exception_only survives a str() that raises (sys.exit(obj))
        out.payload = traceback.format_exception_only(exc)[-1] + out.payload
    try:   # the job's own code: raising here, it would leave the job never reported
        after = getattr(exc, "retry_after", None)
        if isinstance(after, (int, float)) and after > 0:   # seconds (NaN is not > 0)
            out.retry_after = float(min(after, 1e9))   # (an int past a float's range)
    except Exception as bad:
        out.payload += f"\n(its retry_after could not be read: {type(bad).__name__})"
    return out
