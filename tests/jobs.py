"""Job classes the tests submit (workers import them by path: tests.jobs:Name)."""

import os
import time

from elric import Job


class Echo(Job):
    def run(self, *args, **kwargs):
        return {"args": list(args), "kwargs": kwargs}


class Add(Job):
    def run(self, a, b):
        return a + b


class Sleep(Job):
    def run(self, seconds, tag=None):
        time.sleep(seconds)
        return {"tag": tag, "pid": os.getpid(), "at": time.time()}


class Record(Job):
    """Returns when it started, for ordering tests."""

    def run(self, tag):
        return {"tag": tag, "started": time.time()}


class Fail(Job):
    def run(self, message="boom"):
        raise ValueError(message)


class FailWide(Job):
    """Fails with a message of ``n`` two-byte characters: twice as many bytes as characters."""

    def run(self, n):
        raise ValueError("\u00e9" * n)


class FailNamingFile(Job):
    """Fails naming a file whose name is not UTF-8: os.fsdecode gives it a lone surrogate,
    as it does to every such name read from a directory."""

    def run(self, name: bytes):
        raise FileNotFoundError(f"no page saved at {os.fsdecode(name)}")


class SelfAlarm(Job):
    """Sends itself SIGALRM, as code using signal.alarm for its own deadline may."""

    def run(self):
        import signal
        os.kill(os.getpid(), signal.SIGALRM)
        return "ok"


class Spawn(Job):
    """Submits `n` child Add jobs."""

    def run(self, n):
        ids = [Add.submit(i, i) for i in range(n)]
        return {"children": ids}


class SpawnThenFailOnce(Job):
    """Submits `n` child Add jobs, writes their ids to ``path`` (a line per attempt), and
    fails its first attempt."""

    def run(self, n, path):
        ids = [Add.submit(i, i) for i in range(n)]
        with open(path, "a") as f:
            f.write(" ".join(ids) + "\n")
        if self.attempt == 1:
            raise RuntimeError("first attempt fails after its submits")
        return {"children": ids}


class SpawnWhenGateOpens(Job):
    """Waits for the file `gate`, submits one child, then notes its end in `marks` (a line
    per run)."""

    def run(self, gate, marks):
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        Add.submit(1, 1)
        with open(marks, "a") as f:
            f.write("ended\n")
        return "spawned"


class SpawnKeyedWhenGateOpens(Job):
    """Waits for the file `gate`, then submits one child with dedupe key `key` in `scope`."""

    def run(self, gate, scope, key):
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return str(Add.submit_with(args=[1, 1], dedupe_scope=scope, dedupe_key=key))


class NotAJob:
    def run(self):
        return 1


class OnQueueB(Job):
    """Routed by its class attribute: queue "b" unless the submission names another."""

    queue = "b"

    def run(self, tag=None):
        return {"tag": tag, "pid": os.getpid()}


class MarkSleep(Job):
    """Appends its job id to ``path`` when it starts (one line per run), then sleeps."""

    def run(self, path, seconds):
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{self.job_id}\n".encode())
        finally:
            os.close(fd)
        time.sleep(seconds)
        return {"pid": os.getpid(), "at": time.time()}


class Stubborn(Job):
    """Appends its job id to ``path`` when it starts, then sleeps ``seconds`` through any
    exception: a sync job that ignores being cancelled."""

    def run(self, path, seconds):
        MarkSleep.run(self, path, 0)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                time.sleep(0.05)
            except BaseException:
                pass
        return "outlasted"


class FailUnlessFile(Job):
    """Fails until ``path`` exists: a job that succeeds when rerun after a fix."""

    def run(self, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} is missing")
        return "found"


class Crash(Job):
    """Kills its own pool process after ``delay`` seconds, as a crash in native code would."""

    def run(self, delay=0.0):
        time.sleep(delay)
        os._exit(3)


class Die(Job):
    """Ends its own pool process: ``how`` an exit status, or a signal's name."""

    def run(self, how):
        import signal
        if isinstance(how, int):
            os._exit(how)
        os.kill(os.getpid(), getattr(signal, how))
        time.sleep(10)


class KeyFromBytes(Job):
    """Derives its dedupe key from bytes as they come (a hook that can make text that
    is not valid UTF-8)."""

    @classmethod
    def dedupe_key_for(cls, data=b"", *args, **kwargs):
        return data.decode("utf-8", "surrogateescape")

    def run(self, data=b""):
        return len(data)


class Sized(Job):
    """Returns ``n`` bytes of text."""

    def run(self, n):
        return "x" * n


class Spin(Job):
    """Keeps a CPU busy for ``seconds``, or until ``until_path`` exists: load a worker's
    CPU % shows."""

    def run(self, seconds, until_path=None):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not (until_path and os.path.exists(until_path)):
            pass
        return "spun"


class PadLength(Job):
    """Returns the length of its padding: a child job with big arguments."""

    def run(self, pad):
        return len(pad)


class SpawnPadded(Job):
    """Submits ``n`` PadLength children with ``size`` bytes of arguments each."""

    def run(self, n, size):
        return [PadLength.submit("x" * size) for _ in range(n)]


class TupleKeys(Job):
    """Returns a map whose key is a tuple: msgpack packs it as an array, which no map key
    can be when it is read back."""

    def run(self, nested=False):
        value = {(1, 2): "pair"}
        return {"deep": [value]} if nested else value


class Nested(Job):
    """Returns ``depth`` lists, each inside the one before."""

    def run(self, depth):
        value = []
        for _ in range(depth - 1):
            value = [value]
        return value


class SpawnFromThread(Job):
    """Submits a child Add job from a thread it starts, which has not the job's context."""

    def run(self):
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(Add.submit, 1, 1).result()


class Écrire(Job):
    """A class named as Python allows: a letter outside ASCII first."""

    def run(self, text):
        return text


class LogLine(Job):
    """Logs ``text`` with the logging module, as a project's job does."""

    def run(self, text):
        import logging
        logging.getLogger("myproject.jobs").warning(text)
        return "logged"


class MarkUntilGate(Job):
    """Appends its job id to ``path`` when it starts (one line per run), then waits for the
    file ``gate`` (at most a minute): a slow job that holds its process as long as a test
    needs."""

    def run(self, path, gate):
        MarkSleep.run(self, path, 0)
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.01)
        return "passed"


class Prints(Job):
    """Writes ``text`` to stdout, to stderr, and through a command it runs (fd 1)."""

    def run(self, text):
        import subprocess
        import sys
        print(f"{text} printed")
        sys.stderr.write(f"{text} on stderr\n")
        subprocess.run(["echo", f"{text} echoed"], check=True)
        return "printed"
