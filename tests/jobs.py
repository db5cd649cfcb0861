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


class Spawn(Job):
    """Submits `n` child Add jobs."""

    def run(self, n):
        ids = [Add.submit(i, i) for i in range(n)]
        return {"children": ids}


class NotAJob:
    def run(self):
        return 1
