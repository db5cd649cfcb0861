"""Start masters and workers as child processes, wait until they serve, stop them by PID:
for the demo, the benchmarks and the tests, which all need real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from elric.contract import ErrorCode
from elric.rpc import Client, RemoteError, RPCError, parse_address


def stop_process(popen: subprocess.Popen, sig: int, timeout: float | None) -> int:
    """Send ``sig`` and wait; SIGKILL if it does not exit in time. Returns the exit status."""
    popen.send_signal(sig)
    try:
        return popen.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        popen.kill()
        return popen.wait()


def faketime_lib() -> str | None:
    """The libfaketime library of the ``libfaketime`` wheel (the test extra), for starting a
    process under a wrong clock (LD_PRELOAD, FAKETIME); None when it is not installed."""
    try:
        import libfaketime
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(libfaketime.__file__), "vendor", "libfaketime", "src",
                        "libfaketime.so.1")
    return path if os.path.exists(path) else None


def elric_env(redis_url: str, master_address: str, **settings) -> dict:
    """Environment for a child process: settings as ELRIC_<KEY> variables."""
    env = {**os.environ, "ELRIC_REDIS_URL": redis_url, "ELRIC_MASTER_ADDRESS": master_address}
    for key, value in settings.items():
        if isinstance(value, (list, tuple)):
            value = ",".join(value)
        env[f"ELRIC_{key}"] = "" if value is None else str(value)
    return env


class Proc:
    """A master or worker process we started."""

    def __init__(self, args: list[str], env: dict, log_path: str | None = None,
                 cwd: str | None = None) -> None:
        self.args = args
        self.log_path = log_path
        with open(log_path or os.devnull, "ab") as out:  # the child keeps its own copy
            self.popen = subprocess.Popen([sys.executable, "-m", "elric", *args], env=env,
                                          cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)  # (does nothing once the process has exited)

    def stop(self, timeout: float = 30.0) -> int:
        return stop_process(self.popen, signal.SIGTERM, timeout)

    def kill(self) -> None:
        stop_process(self.popen, signal.SIGKILL, timeout=None)

    def wait(self, timeout: float | None = None) -> int:
        return self.popen.wait(timeout=timeout)

    def log(self) -> str:
        if not self.log_path or not os.path.exists(self.log_path):
            return ""
        with open(self.log_path, encoding="utf-8", errors="replace") as f:
            return f.read()


def wait_for_master(address: str, proc: Proc | None = None, timeout: float = 20.0,
                    token: str | None = None) -> None:
    """Until a master answers at ``address``: ``proc``, when given, and no other one."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and not proc.alive():
            raise RuntimeError(f"master exited with {proc.popen.returncode}:\n{proc.log()}")
        try:
            with Client(host, port, timeout=2, token=token) as client:
                pid = client.call("health").get("pid")
        except RemoteError as exc:
            # a refusal for want of the token is final: waiting out the timeout changes nothing
            if exc.code == ErrorCode.UNAUTHORIZED:
                raise RuntimeError(f"master at {address} refused the client: {exc}") from None
        except RPCError:
            pass
        else:
            if proc is None or pid == proc.pid:
                return
            raise RuntimeError(f"another master already listens at {address} (pid {pid}); "
                               f"the one started (pid {proc.pid}) cannot")
        if time.monotonic() > deadline:
            raise RuntimeError(f"master at {address} did not answer within {timeout}s")
        time.sleep(0.05)


def start_master(env: dict, log_path: str | None = None, cwd: str | None = None,
                 extra: list[str] | None = None) -> Proc:
    proc = Proc(["master", *(extra or [])], env, log_path, cwd)
    try:
        wait_for_master(env["ELRIC_MASTER_ADDRESS"], proc,
                        token=env.get("ELRIC_RPC_TOKEN") or None)
    except BaseException:   # never answered, or Ctrl-C: its caller has no handle to stop it
        proc.stop()
        raise
    return proc


def start_worker(env: dict, log_path: str | None = None, cwd: str | None = None,
                 extra: list[str] | None = None) -> Proc:
    return Proc(["worker", *(extra or [])], env, log_path, cwd)
