"""What the whole-deployment benchmarks share: an elric master and workers (real processes)
on a Redis (its own redis-server unless given one, never the one on 6379), their logs in a
temporary folder; ``close()`` stops each process by its PID."""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time

import redis

from elric.client import MasterClient
from elric.launch import elric_env, start_master, start_worker
from elric.redis_server import RedisServer, free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Timeout(TimeoutError):
    pass


def machine(r) -> list[str]:
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return [f"CPUs: {os.cpu_count()} ({model})",
            f"Python: {platform.python_version()} ({platform.python_implementation()}), "
            f"{platform.platform()}",
            f"Redis: {r.info('server')['redis_version']}"]


def header(title: str, r) -> None:
    """Print what a run's figures need beside them: its title, command line and machine."""
    print(title)
    print("command: " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    for line in machine(r):
        print(line)


def stop_on_sigterm() -> None:
    """A SIGTERM stops the run as Ctrl-C does: through its clean-up, which stops by PID
    what it started."""
    def on_signal(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, on_signal)


def wait_until(pred, timeout: float, what: str, procs=(), interval: float = 0.01):
    """``pred()``'s first true value; gives up at once if one of ``procs`` exited."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.args[0]} exited with {p.popen.returncode} while "
                                   f"waiting for {what}")
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Timeout(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """A master and workers started with ``settings`` (elric_env's), logs in a new folder;
    ``redis``: a client of its Redis."""

    def __init__(self, log_prefix: str, redis_url: str | None = None, **settings):
        self.server = self.client = None
        self.procs: list = []
        if redis_url is None:
            self.server = RedisServer().start()
            redis_url = self.server.url
        self.logdir = tempfile.mkdtemp(prefix=log_prefix)
        self.redis_url = redis_url
        self.redis = redis.Redis.from_url(redis_url)
        self.address = f"127.0.0.1:{free_port()}"
        self.env = elric_env(redis_url, self.address, **settings)

    def start_master(self):
        self.procs.append(start_master(self.env, os.path.join(self.logdir, "master.log"),
                                       cwd=ROOT))
        return self.procs[-1]

    def start_worker(self, name: str = "worker", extra=()):
        self.procs.append(start_worker(self.env, os.path.join(self.logdir, f"{name}.log"),
                                       cwd=ROOT, extra=list(extra)))
        return self.procs[-1]

    def connect(self, timeout: float = 60) -> MasterClient:
        self.client = MasterClient(self.address, timeout=timeout)
        return self.client

    def wait_until(self, pred, timeout: float, what: str, interval: float = 0.01):
        """``wait_until`` watching this cluster's processes."""
        return wait_until(pred, timeout, what, self.procs, interval)

    def failed(self, exc: BaseException) -> int:
        """Say why the run stopped, with each process's last log lines; exit status 1."""
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        for p in self.procs:
            print(f"--- {p.args[0]} (pid {p.pid}) log ---\n{p.log()[-3000:]}", file=sys.stderr)
        return 1

    def close(self, keep_logs: bool = False) -> None:
        """Stop what it started (by PID, workers first), then its Redis; the logs stay
        (and are named) if ``keep_logs``."""
        if self.client is not None:
            self.client.close()
        for p in reversed(self.procs):
            p.stop(timeout=20)
        self.redis.close()
        if self.server is not None:
            self.server.cleanup()
        if keep_logs:
            print(f"logs: {self.logdir}")
        else:
            shutil.rmtree(self.logdir, ignore_errors=True)
