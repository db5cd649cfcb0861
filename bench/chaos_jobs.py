"""The job the fault run (bench/chaos.py) submits: it writes a line to a log file when it
starts and when it ends. The log is a file, not Redis, so it records runs even while the
fault run has Redis down or full."""

import asyncio
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


# --- the mix (bench/chaos.py --mix): async jobs under a limit key, and parents of children.
# Their lines add the monotonic time (one clock for every process, skewed wall clocks or
# not) and a tag: L=<limit key> or D=<dedupe key> ("-": none).

def _log_run(kind: str, job: Job, tag: str) -> None:
    _log(f"{kind} {job.job_id} {job.attempt} {os.getpid()} {time.time():.3f} "
         f"{time.monotonic():.4f} {tag}")


class Limited(Job):
    """An async job of a limit key, which LIMITS gives a small concurrency."""
    max_retries = 20

    @classmethod
    def limit_key_for(cls, key, seconds):
        return key

    async def run(self, key, seconds):
        _log_run("start", self, f"L={key}")
        await asyncio.sleep(seconds)
        _log_run("end", self, f"L={key}")


class Parent(Job):
    """Submits its children (specs made by the load: which dedupe key each has)."""
    max_retries = 20

    async def run(self, children):
        _log_run("start", self, "-")
        await asyncio.sleep(0.02)
        for key in children:
            Child.submit_with(args=[key], **({"dedupe_key": key} if key else {}))
        _log_run("end", self, "-")


class Child(Job):
    max_retries = 20

    def run(self, key):
        _log_run("start", self, f"D={key or '-'}")
        time.sleep(0.02)
        _log_run("end", self, f"D={key or '-'}")
