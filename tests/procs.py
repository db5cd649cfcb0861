"""Commands that start a tree of processes (the demo's redis-server, master and worker,
chaos.py's cluster) run in a session of their own: a test that fails or times out kills
the whole group. Killing the top process alone left the rest running on the machine."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to whatever is left of ``proc``'s process group, then reap ``proc``."""
    with contextlib.suppress(ProcessLookupError):   # (the group is gone: all ended)
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def group(args, **popen):
    """``subprocess.Popen(args, **popen)`` as the leader of a new session; however the
    block ends, nothing of the group is left running."""
    proc = subprocess.Popen(args, start_new_session=True, **popen)
    try:
        yield proc
    finally:
        kill_group(proc)


def run_group(args, timeout: float, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run(args, capture_output=True, text=True, stdin=DEVNULL, timeout=...)``
    in a group of its own; on a timeout the whole group is killed and the test fails."""
    with group(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
               stderr=subprocess.PIPE, text=True, **popen) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{args} timed out after {timeout}s:\n{out}\n{err}") from None
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
