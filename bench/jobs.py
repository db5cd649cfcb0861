"""Job classes the benchmarks submit (workers import them by path: bench.jobs:Name)."""

import time

from elric import Job


class Noop(Job):
    """Does nothing; returns the time it started (for enqueue->start latency)."""

    def run(self, *args, **kwargs):
        return time.time()
