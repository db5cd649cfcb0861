"""The worker's pool of processes: a ``concurrent.futures.Executor`` fed over one pipe each.

Each pool process runs an event loop (``elric.runner``). Jobs go out and outcomes come back
as msgpack batches, at most one message per process per turn of the worker's loop, so a
fast job costs no round trip of its own. A process that dies settles the jobs it held with
``ProcessDied``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import signal
import struct
import sys
import tempfile
import time
from concurrent.futures import CancelledError, Executor, Future
from dataclasses import dataclass, field
from multiprocessing import forkserver, resource_tracker
from typing import Callable

from elric import codec, runner
from elric.queue import Claim

log = logging.getLogger("elric.pool")

KILL_GRACE = 5.0  # seconds past its timeout before a job's process is killed
READ_CHUNK = 1 << 16


@dataclass(slots=True)
class _Settle:
    """``submit``'s callback for ``start``: settles its future (``shutdown`` may cancel it)."""
    future: Future

    def __call__(self, outcome) -> None:
        if isinstance(outcome, ProcessDied):
            self.future.set_exception(outcome)
        else:
            self.future.set_result(outcome)


class ProcessDied(Exception):
    """The pool process that ran a job died before reporting it. ``held``: every job it had,
    ``sent_at`` when each was sent (time.monotonic()); ``culprits``: those killed for running
    past their timeout ("") or for blocking the loop that held others past theirs (why)."""

    def __init__(self, exitcode, held: list[str], culprits: dict[str, str],
                 sent_at: dict[str, float]) -> None:
        super().__init__(f"pool process died (exit code {exitcode})")
        self.exitcode = exitcode
        self.held, self.culprits, self.sent_at = held, culprits, sent_at

    def how(self) -> str:
        """How the process ended: "exit status 3", "killed by SIGKILL"."""
        code = self.exitcode
        if code is None or code >= 0:
            return f"exit status {code}"
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"


def _messages(buffer: bytearray) -> list[bytes]:
    """Take the whole messages out of ``buffer``, leaving the start of the next in it. The
    framing is multiprocessing's, as the pool process sends with ``send_bytes``: a 4-byte
    big-endian length, or -1 and then an 8-byte one."""
    messages = []
    while len(buffer) >= 4:
        (size,), start = struct.unpack_from("!i", buffer), 4
        if size == -1:
            if len(buffer) < 12:
                break
            (size,), start = struct.unpack_from("!Q", buffer, 4), 12
        if len(buffer) < start + size:
            break
        messages.append(bytes(buffer[start:start + size]))
        del buffer[:start + size]
    return messages


@dataclass(slots=True)
class _Held:
    claim: Claim
    done: Callable[[runner.Ran | ProcessDied], None]   # called once, on the worker's loop
    is_async: bool
    sent_at: float
    suspect: bool = False   # of a crash: keeps its process to itself whatever its kind
    cancelled_at: float | None = None   # when cancel_job asked its process to stop it
    withdrawing: bool = False   # the worker asked its process for it back, if not started


@dataclass(eq=False)
class _Process:
    slot: int
    process: multiprocessing.process.BaseProcess
    conn: object
    held: dict[str, _Held] = field(default_factory=dict)
    outbox: list[dict] = field(default_factory=list)
    alone: bool = False        # runs a job that must have the process to itself
    timed_out: dict[str, str] = field(default_factory=dict)   # culprit -> why ("": overdue)
    blocking: str | None = None   # the async job its process says blocks its loop now
    n_async: int = 0
    outbox_sync: bool = False  # its outbox holds sync jobs: fill it up in this turn
    received: bytearray = field(default_factory=bytearray)   # read, not yet a whole message
    unsent: bytearray = field(default_factory=bytearray)   # framed, not yet taken by the pipe
    reported_at: float = 0.0   # time.monotonic() of its last outcome

    @property
    def n_sync(self) -> int:
        return len(self.held) - self.n_async


def _checkout() -> str | None:
    """The folder this process's elric came from when it is first on sys.path, else None.
    The fork server would import another elric installed on the path (Python 3.11's drops
    the sys.path it is given), and its pool processes ran that one's code."""
    home = os.path.dirname(os.path.dirname(os.path.abspath(runner.__file__)))
    try:
        return home if sys.path and sys.path[0] and os.path.samefile(sys.path[0], home) else None
    except OSError:   # (sys.path[0] gone, or not a folder)
        return None


class Pool(Executor):
    def __init__(self, size: int, *, async_slots: int, sync_batch, on_news=lambda: None,
                 job_modules=(), preload=(), log_level: str = "INFO",
                 lag_warn: float = 1.0, result_max: int = 1024 * 1024,
                 log_format: str = "text") -> None:
        """``sync_batch()``: how many sync jobs a process may hold now; ``on_news()``:
        called after a process reported, so the caller can place more jobs; ``preload``:
        job modules known to import cleanly (a preload that raises kills the fork server)."""
        self.size, self.async_slots, self.sync_batch = size, async_slots, sync_batch
        self._args = (tuple(job_modules), os.getpid(), os.getcwd(), log_level, lag_warn,
                      result_max, log_format)
        # imported once by the fork server, so each process it forks has them already
        self._preload = ["elric.fork_server", "elric.runner", *preload]   # (in order)
        self._loop = asyncio.get_running_loop()
        self._flush_soon = False
        self._closed = False
        self.kinds: dict[str, bool] = {}   # func -> its run is async, as a process found
        self.last_async = False            # the kind a process reported last
        self._on_news = on_news
        self.processes = [self._start(slot) for slot in range(size)]   # take new jobs
        self.retiring: list[_Process] = []   # shrunk away: finish their jobs, then exit

    def _every(self) -> list[_Process]:
        return [*self.processes, *self.retiring]

    # --- processes --------------------------------------------------------------------
    def _start(self, slot: int) -> _Process:
        empty = self._ensure_fork_server()
        try:
            ctx = multiprocessing.get_context("forkserver")
            ours, theirs = ctx.Pipe(duplex=True)
            process = ctx.Process(target=runner.serve, args=(theirs, *self._args),
                                  name=f"elric-pool-{slot}", daemon=False)
            process.start()   # returns once the fork server forked it: it is up
        finally:
            os.rmdir(empty)   # a killed worker leaves none behind
        theirs.close()
        os.set_blocking(ours.fileno(), False)   # see _write
        proc = _Process(slot, process, ours)
        self._loop.add_reader(ours.fileno(), self._readable, proc)
        # its exit, too: a child a job forked may hold the pipe open after it has died
        self._loop.add_reader(process.sentinel, self._exited, proc)
        return proc

    def _ensure_fork_server(self) -> str:
        """Start the fork server unless it runs, in an empty folder (returned, to remove once a
        process started): as `python -c`, its sys.path starts with its directory, where a folder
        named elric/ would stand in for the package. The processes it forks move to ours. A
        worker whose elric is its sys.path[0]'s (a checkout) starts it there instead."""
        resource_tracker.ensure_running()
        here, empty = os.getcwd(), tempfile.mkdtemp(prefix="elric-forkserver-")
        try:
            os.chdir(_checkout() or empty)
            forkserver.set_forkserver_preload(self._preload)
            forkserver.ensure_running()   # (at once if it runs)
        finally:
            os.chdir(here)
        return empty

    def _exited(self, proc: _Process) -> None:
        """Read what the process sent before it exited, then settle the jobs it held."""
        while not proc.conn.closed and proc.conn.poll():
            self._readable(proc)   # (at the end of the pipe, it settles them itself)
        if not proc.conn.closed:
            self._died(proc)

    def _readable(self, proc: _Process) -> None:
        """Read what the pipe holds now, and handle the messages it completes. Never more
        than that: a process that died part-way through a message, while a child it forked
        holds the pipe open, would block the worker's loop for good in a recv_bytes."""
        try:
            data = os.read(proc.conn.fileno(), READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            return self._died(proc)
        proc.received += data
        for message in _messages(proc.received):
            if proc.conn.closed:   # retired by the message before: the rest is moot
                return
            self._handle(proc, codec.unpack(message))

    def _handle(self, proc: _Process, message: dict) -> None:
        proc.blocking = message["blocking"]
        for func, is_async in message["kinds"].items():
            self.kinds[func] = self.last_async = is_async
            if is_async:  # its job was sent alone, as of an unknown kind: others may join
                for held in proc.held.values():
                    if held.claim.func == func and not held.is_async:
                        held.is_async = True
                        proc.n_async += 1
                if proc.n_async == len(proc.held) and \
                        not any(h.suspect for h in proc.held.values()):
                    proc.alone = False
        if message["ran"]:
            proc.reported_at = time.monotonic()
        for row in message["ran"]:
            ran = runner.Ran(*row)
            held = proc.held.pop(ran.job_id, None)
            if held is None:
                continue
            if held.is_async:
                proc.n_async -= 1
            self.last_async = ran.is_async
            held.done(ran)
        if not proc.held:
            proc.alone = False
            if proc in self.retiring:
                self._retire(proc)
        self._on_news()

    def _close(self, proc: _Process) -> None:
        """Stop watching a process and close its pipe: it exits when it reads the end."""
        with contextlib.suppress(OSError, ValueError):   # (closed already: shut down twice)
            self._loop.remove_reader(proc.conn.fileno())
            self._loop.remove_writer(proc.conn.fileno())
            self._loop.remove_reader(proc.process.sentinel)
        proc.conn.close()

    def _died(self, proc: _Process) -> None:
        self._close(proc)
        proc.process.kill()
        proc.process.join()
        if proc in self.retiring:
            self.retiring.remove(proc)   # shrunk away: not started again
        else:
            self.processes.remove(proc)   # replaced below, or by _refill if that fails
        error = ProcessDied(proc.process.exitcode, list(proc.held), dict(proc.timed_out),
                            {job_id: h.sent_at for job_id, h in proc.held.items()})
        held, proc.held = list(proc.held.values()), {}
        for h in held:
            h.done(error)
        self._refill()

    def _refill(self) -> None:
        """Start processes up to the pool's size. A fork can fail (memory short, as when
        the OOM killer took a process): logged, and tried again at the next turn."""
        while not self._closed and len(self.processes) < self.size:
            slot = min(set(range(self.size)) - {p.slot for p in self.processes})
            try:
                self.processes.insert(slot, self._start(slot))
            except Exception as exc:
                log.error("worker: cannot start pool process %d (%s); trying again soon",
                          slot, exc)
                return

    def resize(self, size: int) -> None:
        """Grow or shrink to ``size`` processes while jobs run. Those beyond it take no more
        jobs and exit once they have reported those they hold: none is stopped or run twice."""
        shrunk = [p for p in self.processes if p.slot >= size]
        self.processes = [p for p in self.processes if p.slot < size]
        self.size = size
        for proc in shrunk:
            self.retiring.append(proc)
            if not proc.held:
                self._retire(proc)
        self._refill()

    def _retire(self, proc: _Process) -> None:
        """Let an idle process beyond the pool's size go: it exits when its pipe closes."""
        self.retiring.remove(proc)
        self._close(proc)
        sentinel = proc.process.sentinel   # reaped once it exits, not waited for here

        def reap() -> None:
            self._loop.remove_reader(sentinel)
            proc.process.join()
        self._loop.add_reader(sentinel, reap)
        self._loop.call_later(1.0, lambda: proc.process.is_alive() and proc.process.kill())

    # --- placing and sending jobs -----------------------------------------------------
    def place(self, is_async: bool, alone: bool) -> _Process | None:
        """The process a job of this kind would go to now, or None when none has room.

        ``alone``: the job must have a process to itself (a sync job with a timeout, whose
        overrun kills its process; a job of a class not seen yet; a suspect of a crash)."""
        best, sync_batch = None, 0 if is_async else self.sync_batch()
        for p in self.processes:
            if p.alone or (alone and p.held):
                continue
            if alone:
                return p
            if is_async:
                if p.n_sync or p.n_async >= self.async_slots:
                    continue
                load = p.n_async
            else:
                if p.n_async or p.n_sync >= sync_batch:
                    continue
                if p.n_sync > sync_batch // 2 and not p.outbox_sync:
                    continue   # busy: refill it in big batches, not a job at a time
                load = p.n_sync
            if best is None or load < best[0]:
                best = (load, p)
        return best[1] if best else None

    def how(self, claim: Claim, suspect: bool = False) -> tuple[bool, bool]:
        """(is_async, alone) for a job: see ``place`` for who goes alone."""
        kind = self.kinds.get(claim.func)
        alone = suspect or kind is None or (kind is False and claim.timeout is not None)
        return kind is True, alone

    def submit(self, claim: Claim, /, *, suspect: bool = False) -> Future:
        """``start`` as an Executor does it: a future of the job's ``runner.Ran``, or of
        ``ProcessDied``."""
        future: Future = Future()
        future.set_running_or_notify_cancel()
        self.start(claim, _Settle(future), suspect=suspect)
        return future

    def start(self, claim: Claim, done: Callable[[runner.Ran | ProcessDied], None], *,
              suspect: bool = False) -> None:
        """Send a job to a process with room (``place``); ``done`` gets its ``runner.Ran``,
        or ``ProcessDied``, on this event loop. Raises LookupError when no process has room.
        The worker's way: no Future (a lock and a condition) per job."""
        if self._closed:
            raise RuntimeError("the pool is shut down")
        is_async, alone = self.how(claim, suspect)
        proc = self.place(is_async, alone)
        if proc is None:
            raise LookupError("no pool process has room for this job")
        proc.held[claim.job_id] = _Held(claim, done, is_async, time.monotonic(), suspect)
        proc.n_async += is_async
        proc.outbox_sync = not is_async
        proc.alone = alone
        proc.outbox.append({"job_id": claim.job_id, "attempt": claim.attempt,
                            "max_retries": claim.max_retries, "func": claim.func,
                            "args": claim.args, "kwargs": claim.kwargs,
                            "timeout": claim.timeout, "dedupe_scope": claim.dedupe_scope,
                            "batch": claim.batch, "round": claim.round,
                            "enqueued_at": claim.enqueued_at, "member": claim.member})
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_soon:
            self._flush_soon = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send the jobs ``start`` queued (batched per process). The worker calls it once it
        has handed out a fetch's jobs, so they do not wait for its next Redis call."""
        self._flush_soon = False
        for proc in self._every():
            if proc.outbox:
                data, proc.outbox, proc.outbox_sync = codec.pack(proc.outbox), [], False
                n = len(data)   # framed as Connection.send_bytes does, for its recv_bytes
                proc.unsent += struct.pack("!i", n) if n <= 0x7FFFFFFF else \
                    struct.pack("!iQ", -1, n)
                proc.unsent += data
                self._write(proc)

    def _write(self, proc: _Process) -> None:
        """Send what the pipe takes now, the rest once it takes more. Never wait: a job holding
        its process's GIL in native code stops the pipe's reader there, and a blocking send
        would hold up the worker's heartbeats until it ends (past the lease: all redelivered)."""
        if proc.conn.closed:   # shut down: it takes nothing more
            proc.unsent.clear()
            return
        fd = proc.conn.fileno()
        try:
            sent = os.write(fd, proc.unsent)
        except BlockingIOError:
            sent = 0
        except OSError:   # it died: its reader sees the end of the pipe and settles its jobs
            sent = len(proc.unsent)
        del proc.unsent[:sent]
        if proc.unsent:
            self._loop.add_writer(fd, self._write, proc)
        else:
            self._loop.remove_writer(fd)

    # --- what the worker sees and steers ----------------------------------------------
    def claims(self) -> list[Claim]:
        return [h.claim for p in self._every() for h in p.held.values()]

    def holds(self, job_id: str) -> bool:
        return any(job_id in p.held for p in self._every())

    def pids(self) -> list[int]:
        return [p.process.pid for p in self._every()]

    def kill_overdue(self) -> None:
        """Kill the process of a job past its timeout and KILL_GRACE: a sync job that
        ignored its alarm (stuck in native code), or an async job blocking its loop. Also
        starts the processes that could not be started when theirs died."""
        self._refill()
        now = time.monotonic()
        for p in self._every():
            for job_id, h in p.held.items():
                if h.claim.timeout and now > h.sent_at + h.claim.timeout + KILL_GRACE:
                    ignored = "timeout"
                elif h.cancelled_at and now > h.cancelled_at + KILL_GRACE:
                    ignored = "cancellation"
                else:
                    continue
                # a job that blocks the loop held this one up: it is to blame, this one runs again
                blocker = p.blocking if p.blocking in p.held else job_id
                if blocker in p.timed_out:
                    continue
                p.timed_out[blocker] = "" if blocker == job_id else (
                    f"JobTimeout: blocked its event loop, so that job {job_id} could not end "
                    f"by its {ignored}; its process was killed")
                log.warning("worker: job %s ignored its %s%s; killing its process", job_id,
                            ignored, "" if blocker == job_id else f", held up by job {blocker}")
            if p.timed_out:
                p.process.kill()

    def longest_sync_run(self) -> float:
        """How long the longest sync run going on has run, in seconds (0: none): a process
        runs its sync jobs in order, the oldest since it was sent or the last report."""
        now, longest = time.monotonic(), 0.0
        for p in self._every():
            if p.held and not p.n_async:
                oldest = next(iter(p.held.values()))
                longest = max(longest, now - max(oldest.sent_at, p.reported_at))
        return longest

    def withdraw_waiting(self) -> None:
        """Ask each process for the sync jobs it holds behind the one it runs: those not
        started yet come back to ``done`` as a ``runner.Ran`` marked withdrawn."""
        for p in self._every():
            if p.n_async:
                continue
            for h in list(p.held.values())[1:]:
                if not h.withdrawing:
                    h.withdrawing = True
                    self._ask(p, "withdraw", h.claim)

    def cancel(self, claim: Claim) -> bool:
        """Stop a claim's run, sparing the jobs beside it; False when no process holds it. The
        process is killed only if the job ignores that for KILL_GRACE."""
        for p in self._every():
            h = p.held.get(claim.job_id)
            if h is None or h.claim is not claim:
                continue
            h.cancelled_at = time.monotonic()
            self._ask(p, "cancel", claim)
            return True
        return False

    def _ask(self, proc: _Process, request: str, claim: Claim) -> None:
        """Named by its run: one of the job's that ended here may be cancelled too late."""
        proc.outbox.append({request: claim.job_id, "attempt": claim.attempt,
                            "member": claim.member})
        self._schedule_flush()

    def kill_all(self) -> None:
        for p in self._every():
            p.process.kill()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Close the pipes: the processes exit, and jobs still held never report. With
        ``cancel_futures``, ``submit``'s futures of those raise CancelledError (running,
        ``Future.cancel`` would refuse); ``start``'s callers give their claims back."""
        self._closed = True
        for p in self._every():
            if cancel_futures:
                for h in p.held.values():
                    if isinstance(h.done, _Settle):
                        h.done.future.set_exception(CancelledError("the pool shut down"))
            self._close(p)
        if wait:
            for p in self._every():
                p.process.join()
