"""Job classes that misbehave, for the resilience tests (workers import tests.jobs_faults:Name).

Each one leaves a trace in a file when asked to, so a test can count how often it really ran.
"""

import asyncio
import os
import signal
import sys
import time

from elric import Job


def append_line(path, text):
    """Append one line atomically (O_APPEND), so concurrent runs never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{text}\n".encode())
    finally:
        os.close(fd)


def count_lines(path):
    try:
        with open(path, encoding="utf-8") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


class Crash(Job):
    """Kills its own pool process, as a segfault in native code would."""

    def run(self, path=None):
        if path:
            append_line(path, self.job_id)
        os._exit(1)


class IgnoreAlarm(Job):
    """Ignores SIGALRM (like code stuck in C that never returns to Python), then sleeps."""

    def run(self, seconds, path=None):
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        if path:
            append_line(path, self.job_id)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        return "survived"


class Flaky(Job):
    """Fails its first ``failures`` runs (counted in ``path``), then succeeds."""

    def run(self, path, failures):
        append_line(path, f"{self.job_id} attempt {self.attempt}")
        n = count_lines(path)
        if n <= failures:
            raise RuntimeError(f"flaky failure number {n}")
        return {"runs": n, "attempt": self.attempt}


class Touch(Job):
    """Creates ``path``: proof that it ran."""

    def run(self, path):
        append_line(path, self.job_id)
        return "touched"


class Mark(Job):
    """Appends its id to ``path`` (one line per run) after sleeping ``seconds``."""

    def run(self, path, seconds=0.0):
        if seconds:
            time.sleep(seconds)
        append_line(path, self.job_id)
        return self.job_id


class _Unprintable:
    """A value whose str() raises, as a broken __str__ of some library's object may."""

    def __str__(self):
        raise RuntimeError("this value has no text")

    __repr__ = __str__


class ExitUnprintable(Job):
    """Calls sys.exit with a value whose str() raises."""

    def run(self):
        sys.exit(_Unprintable())


class AsyncExitUnprintable(Job):
    async def run(self):
        sys.exit(_Unprintable())


class _BadRetryAfter(Exception):
    @property
    def retry_after(self):
        raise RuntimeError("retry_after is broken")


class FailBadRetryAfter(Job):
    """Fails with an exception whose retry_after property raises."""

    def run(self):
        raise _BadRetryAfter("failed")


class _AskedToWait(Exception):
    retry_after = 0.1


class FailAskingToWait(Job):
    """Fails as a call to a server that answered Retry-After: its limit key is held."""

    def run(self):
        raise _AskedToWait("the server asked to wait")


class ForkReturns(Job):
    """Forks, and the child returns from run() too, as code that forgets os._exit does;
    each writes its pid and role to ``path``."""

    def run(self, path):
        role = "parent" if os.fork() else "child"
        append_line(path, f"{os.getpid()} {role}")
        return role


class AsyncForkReturns(Job):
    async def run(self, path):
        role = "parent" if os.fork() else "child"
        append_line(path, f"{os.getpid()} {role}")
        await asyncio.sleep(0.05)
        return role


class ForkThenCrash(Job):
    """Leaves a forked child running, which holds its process's pipe open, and kills its
    process; the child's pid goes to ``path``. ``half_message``: dies part-way through
    sending a message to the worker, as a process killed in a big result's send does."""

    def run(self, path, seconds, half_message=False):
        pid = os.fork()
        if pid == 0:
            time.sleep(seconds)
            os._exit(0)
        append_line(path, str(pid))
        if half_message:
            import gc
            import struct
            [runner] = [o for o in gc.get_objects() if type(o).__name__ == "_Runner"]
            with runner.send_lock:   # not inside one of its own messages
                os.write(runner.conn.fileno(), struct.pack("!i", 1000) + b"\x93\x01")
        os._exit(1)


class ResetSignals(Job):
    """Sets SIGALRM, SIGUSR1, SIGTERM and SIGINT back to their defaults, as a library that
    installs handlers of its own and "restores" SIG_DFL may."""

    def run(self):
        for sig in (signal.SIGALRM, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        return "reset"


class WhereAmI(Job):
    """Its working directory; with ``chdir``, it moves there first."""

    def run(self, chdir=None):
        if chdir:
            os.chdir(chdir)
        return os.getcwd()


class SwallowTimeout(Job):
    """Catches every Exception, its timeout's JobTimeout too, as a retry loop may, and
    sleeps on."""

    def run(self, seconds):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                time.sleep(max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
        return "outlasted"


class BlockSignals(Job):
    """Blocks SIGALRM and SIGUSR1 in its thread and leaves them blocked, as a library that
    masks signals around a critical section and forgets to unmask may."""

    def run(self):
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM, signal.SIGUSR1})
        return "blocked"


class LooseSignals(Job):
    """Sets SIGPIPE back to its default (a script's idiom against BrokenPipeError) and
    ignores SIGCHLD (a library's against zombies)."""

    def run(self):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_IGN)
        return "loosened"


class ChildAndPipe(Job):
    """The exit status of a command that fails, and what writing to a closed socket raises."""

    def run(self):
        import socket
        import subprocess
        status = subprocess.run([sys.executable, "-c", "raise SystemExit(3)"]).returncode
        ours, theirs = socket.socketpair()
        theirs.close()
        try:
            ours.sendall(b"x" * 100_000)
            wrote = "wrote"
        except OSError as exc:
            wrote = type(exc).__name__
        finally:
            ours.close()
        return [status, wrote]


class SayThenCrash(Job):
    """Prints a line, as a job tells its progress, then its process dies."""

    def run(self, text):
        print(text)
        os._exit(1)


class HoldGil(Job):
    """Holds the GIL for ``seconds`` in native code, as a long regex match, a sort of a big
    list or a C extension that never releases it does."""

    def run(self, seconds, path=None):
        import ctypes
        if path:
            append_line(path, self.job_id)
        ctypes.PyDLL(None).sleep(int(seconds))
        return "held"


def process_state(leave):
    """What a job sees of its process: its pid, an environment variable the worker was
    started with and one it was not, its umask and its time zone. With ``leave``, it
    changes them first and leaves them so, as code that exports a variable for a library,
    tightens the umask for its files or sets TZ for its dates may, and puts a dict of its
    own in os.environ."""
    if leave:
        os.environ.pop("ELRIC_LOG_LEVEL", None)
        os.environ["ELRIC_TEST_LEFT"] = "left"
        os.umask(0o077)
        os.environ["TZ"] = "UTC+05"
        time.tzset()
        os.environ = dict(os.environ, ELRIC_TEST_LEFT="in a dict")   # a mapping of its own
    umask = os.umask(0o022)
    os.umask(umask)
    return {"pid": os.getpid(), "log_level": os.environ.get("ELRIC_LOG_LEVEL"),
            "left": os.environ.get("ELRIC_TEST_LEFT"), "umask": umask,
            "zone": time.strftime("%z", time.localtime(0))}


class ProcessState(Job):
    def run(self, leave=False):
        return process_state(leave)


class AsyncProcessState(Job):
    async def run(self, leave=False):
        return process_state(leave)


def process_settings(leave):
    """What a job sees of its process's settings: the default socket timeout, the recursion
    limit and the root logger (its level, handlers and logging.disable). With ``leave``, it
    changes them first and leaves them so, as code that sets a timeout for its HTTP calls,
    raises the limit for a deep recursion or sets up logging for itself (basicConfig(force=
    True), a level to debug with, logging.disable) may."""
    import logging
    import socket
    root = logging.getLogger()
    if leave:
        socket.setdefaulttimeout(3)
        sys.setrecursionlimit(100_000)
        logging.basicConfig(level=logging.DEBUG, format="%(message)s", force=True)
        logging.disable(logging.WARNING)
    return {"pid": os.getpid(), "socket_timeout": socket.getdefaulttimeout(),
            "recursion_limit": sys.getrecursionlimit(),
            "level": root.level, "formats": [h.formatter._fmt for h in root.handlers],
            "disabled": root.manager.disable}


class Seventh(Job):
    """1/7 in the job's decimal context; with ``precision``, it sets that context's precision
    first and leaves it so, as money or science code does (decimal's context, numpy's
    errstate, structlog's bound fields and OpenTelemetry's span are context variables)."""

    def run(self, precision=None):
        import decimal
        if precision:
            decimal.getcontext().prec = precision
        return str(decimal.Decimal(1) / decimal.Decimal(7))


class ProcessSettings(Job):
    def run(self, leave=False):
        return process_settings(leave)


class AsyncProcessSettings(Job):
    async def run(self, leave=False):
        return process_settings(leave)


class AsyncExitInTask(Job):
    """Awaits a task of its own that calls sys.exit (``how``: or raises KeyboardInterrupt),
    as a CLI entry point a job reuses does."""

    async def run(self, how="exit"):
        async def main():
            await asyncio.sleep(0)
            if how == "exit":
                sys.exit(3)
            raise KeyboardInterrupt
        return await asyncio.create_task(main())


class SpawnInBatches(Job):
    """Submits an Echo child per ``size`` numbers of range(n), filling one list, submitting
    it and clearing it, as a loop that batches its work through a buffer does."""

    def run(self, n, size):
        from tests.jobs import Echo
        batch, ids = [], []
        for i in range(n):
            batch.append(i)
            if len(batch) == size:
                ids.append(Echo.submit(batch))
                batch.clear()
        return ids


class AsyncSpawnLate(Job):
    """Returns at once and leaves a task of its own behind that submits a child after
    ``seconds``, as fire-and-forget code does; the task writes what its submit did."""

    tasks = set()

    async def run(self, seconds, path):
        from tests.jobs import Add

        async def later():
            await asyncio.sleep(seconds)
            try:
                Add.submit(1, 1)
                append_line(path, "submitted")
            except RuntimeError as exc:
                append_line(path, f"refused: {exc}")
        task = asyncio.create_task(later())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return "returned"


class Stdio(Job):
    """Prints ``text`` to stdout and stderr; with ``close``, closes sys.stdout and sys.stderr
    after, as code that wraps them in a ``with`` or a library's cleanup may."""

    def run(self, text, close=False):
        print(text)
        print(text, file=sys.stderr)
        if close:
            sys.stdout.close()
            sys.stderr.close()
        return os.getpid()


class StopCommand(Job):
    """Starts a command and stops it with SIGTERM, then another with SIGINT, as a job that
    runs a tool and stops it does; returns each one's return code (None: it ran on)."""

    def run(self):
        import subprocess
        codes = []
        for sig in (signal.SIGTERM, signal.SIGINT):
            command = subprocess.Popen(["sh", "-c", "echo up; exec sleep 30"],
                                       stdout=subprocess.PIPE)
            command.stdout.readline()   # it runs: the signal reaches it, not its fork
            command.send_signal(sig)
            try:
                codes.append(command.wait(timeout=10))
            except subprocess.TimeoutExpired:
                command.kill()
                command.wait()
                codes.append(None)
            command.stdout.close()
        return codes


def _say_up_then_sleep(conn):
    conn.send("up")
    time.sleep(30)


class StopProcesses(Job):
    """Starts a multiprocessing.Process and terminates it, then maps over a
    multiprocessing.Pool in a ``with`` block (which terminates its workers), as a job that
    spreads its work over cores does. Returns the Process's exit code (None: it ran on)
    and the map's result."""

    def run(self):
        import multiprocessing
        ours, theirs = multiprocessing.Pipe()
        child = multiprocessing.Process(target=_say_up_then_sleep, args=(theirs,))
        child.start()
        ours.recv()   # it runs: the signal reaches it, not the fork it starts from
        child.terminate()
        child.join(10)
        code = child.exitcode
        if code is None:
            child.kill()
            child.join()
        with multiprocessing.Pool(2) as pool:
            mapped = pool.map(abs, [-1, -2])
        return [code, mapped]


class StopFork(Job):
    """Forks a child that sleeps, as a job that does work in a child of its own does, and
    stops it with SIGTERM; returns the signal that ended it (None: it ran on)."""

    def run(self):
        up, say_up = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(say_up, b"up")
            time.sleep(30)
            os._exit(0)
        os.close(say_up)
        os.read(up, 2)
        os.close(up)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            time.sleep(0.05)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        return None


class ReadStdin(Job):
    """What a command it runs reads from its standard input, as a tool that reads stdin
    when given no file, or asks a question there (overwrite? [y/N]), does."""

    def run(self):
        import subprocess
        return subprocess.run([sys.executable, "-c", "import sys; print(repr(sys.stdin.read()))"],
                              stdout=subprocess.PIPE, text=True, timeout=10).stdout.strip()


class CommandUntilGate(Job):
    """Runs a command that waits for the file ``gate`` (at most a minute) and returns its
    exit code, as a job running a tool does; ``marks`` gets a line once the command runs."""

    def run(self, gate, marks):
        import subprocess
        command = subprocess.Popen(
            ["sh", "-c", 'echo up; n=0; while [ ! -e "$1" ] && [ $n -lt 1200 ]; do '
                         'sleep 0.05; n=$((n+1)); done', "sh", gate], stdout=subprocess.PIPE)
        command.stdout.readline()
        append_line(marks, "running")
        code = command.wait()
        command.stdout.close()
        return code


def warning_state(leave):
    """What a job's warnings do: whether a UserWarning raises, who shows and formats them,
    and whether logging.captureWarnings takes them. With ``leave``, it first turns warnings
    into errors, sends them to logging and formats them its own way, and leaves them so, as
    a job that wants to catch every deprecation (warnings.simplefilter("error")) may."""
    import logging
    import warnings
    hooks = [warnings.showwarning.__qualname__, warnings.formatwarning.__qualname__]
    if leave:
        warnings.simplefilter("error")
        logging.captureWarnings(True)
        warnings.formatwarning = lambda *args, **kwargs: "a job's format\n"
    try:
        warnings.warn("a job's warning", UserWarning, stacklevel=1)
        raised = False
    except UserWarning:
        raised = True
    logging.captureWarnings(True)   # (a no-op if an earlier job's capture stayed in logging)
    captures = warnings.showwarning.__module__ == "logging"
    return {"pid": os.getpid(), "raises": raised, "hooks": hooks, "captures": captures}


class WarningState(Job):
    def run(self, leave=False):
        return warning_state(leave)


class AsyncWarningState(Job):
    async def run(self, leave=False):
        return warning_state(leave)


class LeaveAsyncGenerator(Job):
    """A sync job that reads an async stream (an async generator) an item at a time on its
    loop (get_event_loop), as sync code over an async client does, and stops after the
    first; the generator's ``finally`` (closing a connection, say) appends to ``path``.
    With ``fail``, it raises then, its traceback holding the generator."""

    def run(self, path, fail=False):
        async def stream():
            try:
                yield 1
                yield 2
            finally:
                append_line(path, "closed")

        async def next_item(items):
            return await items.__anext__()
        items = stream()
        first = asyncio.get_event_loop().run_until_complete(next_item(items))
        if fail:
            raise ValueError("failed after its first item")
        return first


class RunLoopOnce(Job):
    """A sync job that runs its loop (get_event_loop) for one step, and says what ``path``
    held before and after."""

    def run(self, path):
        def read():
            return open(path).read().split() if os.path.exists(path) else []
        before = read()
        asyncio.get_event_loop().run_until_complete(asyncio.sleep(0))
        return {"before": before, "after": read()}


class KillWorker(Job):
    """SIGKILLs its worker (its pool process's fork server's parent), as an OOM kill of the
    worker would: a poison job, lost with every worker that runs it."""

    def run(self, path=None):
        if path:
            append_line(path, self.job_id)
        with open(f"/proc/{os.getppid()}/stat", encoding="utf-8") as f:
            worker = int(f.read().rpartition(")")[2].split()[1])   # (fields after the name)
        os.kill(worker, signal.SIGKILL)
        # (this process ends once its worker is gone, not after a sleep as an orphan)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and os.path.exists(f"/proc/{worker}"):
            time.sleep(0.01)
        os._exit(1)
