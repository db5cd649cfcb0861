"""What runs inside a worker's pool process: import, check and run a chunk of jobs.

Jobs arrive and leave as msgpack bytes. The Job class is resolved again here, against
JOB_MODULES, because Redis may have been written by someone other than a master.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field

from elric import codec
from elric import job as job_module
from elric.contract import SpecError, resolve_job_class


class JobTimeout(Exception):
    """Raised inside a job that ran past its timeout."""


@dataclass(slots=True)
class Ran:
    """How one attempt ended in a pool process; crosses back to the worker as a msgpack
    array (``row``). ``final``: no retry, whatever max_retries says."""

    job_id: str
    attempt: int
    ok: bool
    payload: bytes | str            # the packed result, or the error text
    children: list = field(default_factory=list)
    started_at: float = 0.0
    finished_at: float = 0.0
    final: bool = False

    def row(self) -> list:
        return [getattr(self, name) for name in self.__slots__]

    @classmethod
    def failure(cls, job_id: str, attempt: int, why: str) -> "Ran":
        now = time.time()
        return cls(job_id, attempt, False, why, [], now, now)


_allowed_modules: tuple[str, ...] = ()


def init_process(allowed_modules: tuple[str, ...], worker_pid: int | None = None) -> None:
    """Pool initializer: the worker process decides about shutdown, not its children."""
    global _allowed_modules
    _allowed_modules = tuple(allowed_modules)
    if worker_pid:
        threading.Thread(target=_exit_with_worker, args=(worker_pid,), daemon=True,
                         name="elric-exit-with-worker").start()
    # Ctrl-C reaches the whole process group, and so does SIGTERM from systemd, docker or
    # `kill -- -PGID`: running jobs must be allowed to finish. The worker stops its pool
    # processes itself (shutdown, or SIGKILL past a timeout or SHUTDOWN_GRACE).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _exit_with_worker(pid: int) -> None:
    """Exit as soon as the worker is gone (SIGKILL, OOM killer). Pool processes are forked
    by the fork server, not the worker, and hold the call queue's write end and the fork
    server's alive fd themselves: nothing else would ever stop them, nor the fork server
    and the resource tracker they keep alive. Its job was redelivered after the lease."""
    try:
        fd = os.pidfd_open(pid)  # Linux 5.3+: readable once the process has exited
    except (AttributeError, OSError):
        fd = None
    if fd is not None:
        select.select([fd], [], [])
        os._exit(1)
    while True:  # elsewhere: poll (a zombie still counts as alive until it is reaped)
        time.sleep(1.0)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            os._exit(1)
        except PermissionError:
            pass


def _on_alarm(signum, frame):
    raise JobTimeout("job ran past its timeout")


def _run_one(item: dict) -> Ran:
    job_id = item["job_id"]
    out = Ran(job_id, item["attempt"], False, "", started_at=time.time())
    ctx = job_module._RunContext(job_id, item)
    timeout = item.get("timeout")
    try:
        cls = resolve_job_class(item["func"], _allowed_modules)
        args = codec.unpack(item["args"]) or []
        kwargs = codec.unpack(item["kwargs"]) or {}
        instance = cls()
        instance.job_id = job_id
        instance.attempt = item["attempt"]
        job_module._current = ctx
        if timeout:
            signal.signal(signal.SIGALRM, _on_alarm)
            signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            result = instance.run(*args, **kwargs)
        finally:
            if timeout:
                signal.setitimer(signal.ITIMER_REAL, 0)
            job_module._current = None
        try:
            out.payload = codec.pack(result)
        except (TypeError, ValueError, OverflowError) as exc:
            raise TypeError(f"the job returned {type(result).__name__}, which is not a msgpack "
                            f"value ({exc}); return plain data (dict, list, str, numbers)") from None
        out.ok, out.children = True, ctx.children
    except SpecError as exc:
        out.payload, out.final = f"refused: {exc}", True
    except JobTimeout:
        out.payload = f"JobTimeout: ran past its timeout of {timeout:g}s"
    except BaseException as exc:  # a job's SystemExit or KeyboardInterrupt fails it too
        out.payload = traceback.format_exc()
        if isinstance(exc, (SystemExit, KeyboardInterrupt)):
            out.payload = f"{type(exc).__name__}: {exc}\n" + out.payload
    out.finished_at = time.time()
    return out


def run_chunk(packed: bytes) -> bytes:
    """Run the jobs of one chunk in order; return their outcomes (msgpack)."""
    outcomes = [_run_one(item) for item in codec.unpack(packed) or []]
    try:
        return codec.pack([o.row() for o in outcomes])
    except (TypeError, ValueError) as exc:
        # a child spec with an unpackable argument fails its parent, not the chunk
        for o in outcomes:
            try:
                codec.pack(o.children)
            except (TypeError, ValueError):
                o.ok, o.children = False, []
                o.payload = f"a child job's arguments are not msgpack values: {exc}"
        return codec.pack([o.row() for o in outcomes])
