"""The job the fault run (bench/chaos.py) submits: it writes a line to a log file when it
starts and when it ends. The log is a file, not Redis, so it records runs even while the
fault run has Redis down or full."""

import os
import time

from elric import Job

RUN_LOG = "CHAOS_RUN_LOG"   # environment variable: the file every worker appends to


def _log(line: str) -> None:
    # one write() of a short line in O_APPEND mode: lines from many processes never mix
    fd = os.open(os.environ[RUN_LOG], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode() + b"\n")
    finally:
        os.close(fd)


class Logged(Job):
    max_retries = 20   # SIGKILLs and pauses cost attempts; the run is about losing jobs

    def run(self, seconds: float = 0.0):
        _log(f"start {self.job_id} {self.attempt} {os.getpid()} {time.time():.3f}")
        time.sleep(seconds)
        _log(f"end {self.job_id} {self.attempt} {os.getpid()} {time.time():.3f}")
        return self.attempt
