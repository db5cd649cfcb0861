"""A worker's load: CPU and memory of the worker and its pool processes, read from /proc.

psutil is not a dependency: what the heartbeat needs is three fields of ``/proc/PID/stat``.
Without /proc (not Linux) nothing is measured and the heartbeat leaves the fields out.
"""

from __future__ import annotations

import os
import time

_TICKS = os.sysconf("SC_CLK_TCK")    # /proc counts CPU time in these per second
_PAGE = os.sysconf("SC_PAGE_SIZE")   # and RSS in pages
MIN_INTERVAL = 0.5   # seconds; CPU time counts in ticks (10 ms): shorter spans are noise


def usage(pid: int) -> tuple[float, int] | None:
    """(CPU seconds so far, RSS bytes) of a process; None when it is gone or no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        # the command name (field 2) may hold spaces and ")": fields 3.. follow its last ")"
        fields = stat[stat.rindex(b")") + 2:].split()
        utime, stime, rss_pages = fields[11], fields[12], fields[21]   # fields 14, 15, 24
        return (int(utime) + int(stime)) / _TICKS, int(rss_pages) * _PAGE
    except (OSError, ValueError, IndexError):   # never a reason for a heartbeat to fail
        return None


class LoadMeter:
    """CPU % (100 = one core busy) and RSS of a set of processes, between two readings."""

    def __init__(self) -> None:
        self._cpu: dict[int, float] = {}   # pid -> its CPU seconds at the last reading
        self._at = time.monotonic()
        self._last: tuple[float, int] | None = None

    def read(self, pids: list[int]) -> tuple[float, int] | None:
        """(CPU % since the last reading, RSS bytes now), or None when nothing could be
        read. A new process counts from its first reading; within MIN_INTERVAL (a heartbeat
        hurried to renew leases) the last reading stands."""
        now = time.monotonic()
        if now - self._at < MIN_INTERVAL and self._last is not None:
            return self._last
        seen = {pid: measured for pid in pids if (measured := usage(pid)) is not None}
        cpu = sum(used - self._cpu.get(pid, used) for pid, (used, _) in seen.items())
        rss = sum(rss for _, rss in seen.values())
        elapsed, self._at = now - self._at, now
        self._cpu = {pid: used for pid, (used, _) in seen.items()}
        self._last = (round(100.0 * cpu / max(elapsed, 1e-3), 1), rss) if seen else None
        return self._last
