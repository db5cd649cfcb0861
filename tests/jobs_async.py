"""Async job classes the tests submit (workers import them by path: tests.jobs_async:Name)."""

import asyncio
import os
import time

from elric import Job
from tests.jobs_faults import append_line, count_lines


class AsyncSleep(Job):
    """Sleeps without blocking its loop; says where and when it ran."""

    async def run(self, seconds, path=None):
        if path:
            append_line(path, self.job_id)
        start = time.time()
        await asyncio.sleep(seconds)
        return {"pid": os.getpid(), "start": start, "end": time.time()}


class SyncSpan(Job):
    """The sync twin of AsyncSleep, to check the two kinds never share a process."""

    def run(self, seconds):
        start = time.time()
        time.sleep(seconds)
        return {"pid": os.getpid(), "start": start, "end": time.time()}


class AsyncFail(Job):
    async def run(self, message):
        await asyncio.sleep(0)
        raise ValueError(message)


class AsyncFlaky(Job):
    """Fails its first ``failures`` runs (counted in ``path``), then succeeds."""

    async def run(self, path, failures):
        append_line(path, f"{self.job_id} attempt {self.attempt}")
        await asyncio.sleep(0.01)
        if count_lines(path) <= failures:
            raise RuntimeError(f"flaky failure at attempt {self.attempt}")
        return {"attempt": self.attempt}


class AsyncSpawn(Job):
    """Submits ``n`` AsyncAdd children after awaiting."""

    async def run(self, n):
        await asyncio.sleep(0.05)
        return {"children": [AsyncAdd.submit(i, i) for i in range(n)]}


class AsyncAdd(Job):
    async def run(self, a, b):
        await asyncio.sleep(0.01)
        return {"sum": a + b, "scope": self.dedupe_scope}


class AsyncBlock(Job):
    """Blocks its event loop with time.sleep: what an async job must not do."""

    async def run(self, seconds, path=None):
        if path:
            append_line(path, self.job_id)
        time.sleep(seconds)
        return "blocked"


class AsyncCrash(Job):
    """Kills its own pool process after a moment, as a crash in native code would."""

    async def run(self, path=None):
        if path:
            append_line(path, self.job_id)
        await asyncio.sleep(0.3)
        os._exit(1)


class AsyncCrashAtGate(Job):
    """Says it started, then kills its own pool process once the file ``gate`` exists (at
    most a minute on): a crash in native code a test sets off when it needs one."""

    async def run(self, path, gate):
        append_line(path, self.job_id)
        deadline = time.monotonic() + 60
        while not os.path.exists(gate) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        os._exit(1)


class AsyncHostPage(Job):
    """A page of a host: the host is its limit key. Says when it ran."""

    @classmethod
    def limit_key_for(cls, host, n, seconds=0.3):
        return host

    async def run(self, host, n, seconds=0.3):
        start = time.time()
        await asyncio.sleep(seconds)
        return {"host": host, "start": start, "end": time.time()}


class RoundRoot(Job):
    """A periodic fire that submits ``n`` slow children: one crawl round in small."""

    async def run(self, n, seconds):
        for _ in range(n):
            RoundLeaf.submit(seconds)
        return n


class RoundLeaf(Job):
    async def run(self, seconds):
        await asyncio.sleep(seconds)
        return seconds


class RoundSomeFail(Job):
    """A crawl round in small whose ``bad`` pages fail (their site went down mid-round)."""

    async def run(self, ok, bad):
        for _ in range(ok):
            RoundLeaf.submit(0)
        for i in range(bad):
            AsyncFail.submit(f"page {i} is down")
        return ok + bad


class AsyncStubborn(Job):
    """Ignores being cancelled: sleeps on through a CancelledError."""

    async def run(self, seconds, path=None):
        if path:
            append_line(path, self.job_id)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                await asyncio.sleep(deadline - time.monotonic())
            except asyncio.CancelledError:
                pass
        return "outlasted"


class SyncRunsAsyncio(Job):
    """A sync job that runs a coroutine with asyncio.run, as a sync wrapper of an async
    library does."""

    def run(self, x):
        async def double():
            await asyncio.sleep(0)
            return 2 * x
        return asyncio.run(double())


def _sync_wrapper(fn):
    """A decorator that is not async itself: it hides the async def it wraps."""
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)
    return wrapper


class HiddenAsync(Job):
    @_sync_wrapper
    async def run(self, x):
        return x


class AsyncGroupFail(Job):
    """Fails in an asyncio.TaskGroup, as a page job fetching many links at once does."""

    async def run(self, message):
        async def fetch():
            raise ValueError(message)

        async with asyncio.TaskGroup() as group:
            group.create_task(fetch())


class SyncGetsEventLoop(Job):
    """A sync job that runs a coroutine the pre-asyncio.run way: the thread's event loop
    from get_event_loop, closed at the end, as older libraries and scripts do."""

    def run(self, x):
        async def double():
            await asyncio.sleep(0)
            return 2 * x
        loop = asyncio.get_event_loop()
        try:
            return loop.run_until_complete(double())
        finally:
            loop.close()


class SyncLeavesTask(Job):
    """Runs a coroutine on asyncio.get_event_loop(), as code written before asyncio.run
    does, for ``seconds``; with ``leave``, the coroutine starts a task it does not await
    (fire and forget), which writes to ``path`` whether it ran or was cancelled."""

    def run(self, path, seconds, leave=False):
        async def later():
            try:
                await asyncio.sleep(0.1)
                append_line(path, "ran")
            except asyncio.CancelledError:
                append_line(path, "cancelled")
                raise

        async def main():
            if leave:
                asyncio.get_running_loop().create_task(later())
            await asyncio.sleep(seconds)
        asyncio.get_event_loop().run_until_complete(main())
        return os.getpid()


class AsyncNestedGroupFail(Job):
    """Fails in a TaskGroup inside a task of another: a crawl of sites, each of many pages."""

    async def run(self, message):
        async def fetch():
            raise ValueError(message)

        async def site():
            async with asyncio.TaskGroup() as pages:
                pages.create_task(fetch())

        async with asyncio.TaskGroup() as sites:
            sites.create_task(site())


_WROTE: set[str] = set()   # AsyncPrints' steps done, in this pool process


async def _after(step: str) -> None:
    deadline = time.monotonic() + 20   # (not forever: a test that fails ends)
    while step not in _WROTE and time.monotonic() < deadline:
        await asyncio.sleep(0.005)


class AsyncPrints(Job):
    """Writes to stdout and stderr every way a job does, its lines in pieces, after
    ``other`` (an AsyncPrints beside it) has written a piece of its own."""

    async def run(self, name, other):
        import logging
        import sys
        import threading
        import traceback
        print(f"{name} one", end="")
        _WROTE.add(f"{name} began")
        await _after(f"{other} began")
        print(" two")
        sys.stderr.write(f"{name} on stderr\n")
        try:
            raise ValueError(f"{name} traced")
        except ValueError:
            traceback.print_exc()
        handler = logging.StreamHandler()   # to sys.stderr
        logger = logging.getLogger(f"tests.prints.{name}")
        logger.addHandler(handler)
        logger.propagate = False
        logger.warning("%s logged", name)
        logger.removeHandler(handler)
        print(f"{name} long " + "x" * 100_000)
        print(f"{name} not UTF-8 \udcff")
        await asyncio.to_thread(print, f"{name} from to_thread")
        thread = threading.Thread(target=print, args=(f"{name} from a thread",))
        thread.start()
        thread.join()
        os.write(1, f"{name} on fd 1\n".encode())
        print(f"{name} unfinished", end="")
        _WROTE.add(f"{name} ended")
        await _after(f"{other} ended")
        return name
