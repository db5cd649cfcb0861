"""A worker's stop (SIGTERM): its running jobs' grace, outcomes it could not record, and
the claims it gives back. Real Redis, master and pool processes; the worker runs in this
process (``Worker.run``, its exit status returned) so a step of its stop can be made to fail.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from types import SimpleNamespace

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from elric.config import load_settings
from elric.queue import RedisQueue
from tests.jobs import MarkUntilGate


def _worker(cluster, **settings):
    from elric.worker import Worker

    env = {"ELRIC_REDIS_URL": cluster.redis_url, "ELRIC_MASTER_ADDRESS": cluster.address,
           "ELRIC_JOB_MODULES": "tests.jobs", "ELRIC_CONCURRENCY": "1"}
    env.update({f"ELRIC_{k}": str(v) for k, v in settings.items()})
    return Worker(load_settings(env=env))


async def _until(what: str, condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


def test_a_stop_whose_first_step_fails_still_gives_running_jobs_their_grace(
        cluster, tmp_path, monkeypatch, caplog):
    """A stop first looks for the claims of a fetch whose reply was lost. Redis refusing
    that look (an error no retry helps; a stand-in here) ended the stop there: the running
    job was killed at once, unrecorded, to run again once its lease ran out. The grace
    still applies; the worker exits non-zero."""
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    looked = []

    async def refused(self, *args):
        looked.append(args)
        raise ResponseError("NOPERM this user has no permissions to run the 'evalsha' command")
    monkeypatch.setattr(RedisQueue, "claimed", refused)

    async def main():
        w = _worker(cluster, SHUTDOWN_GRACE=600)
        run = asyncio.create_task(w.run())
        try:
            await asyncio.to_thread(cluster.client.submit_job, MarkUntilGate.spec(
                [str(marks), str(gate)], job_id="long"))
            await _until("the job started", lambda: marks.exists())
            w._unsure_since = time.monotonic()   # a fetch's reply was lost
            w.request_stop()   # as a SIGTERM does
            await _until("the look refused", lambda: looked)
            gate.touch()
            return await asyncio.wait_for(run, 30)
        finally:
            run.cancel()

    assert asyncio.run(main()) == 1
    job = cluster.client.get_job("long")
    assert (job["status"], job["attempts"], job["result"]) == ("succeeded", 1, "passed"), job
    assert "NOPERM" in caplog.text


def test_outcomes_not_recorded_by_the_end_of_a_stop_are_named_and_it_exits_non_zero(
        cluster, monkeypatch, caplog):
    """A job ended while Redis was away, and stayed away past the grace: the stop ended
    with its outcome unrecorded, said nothing of it and exited 0. Each such job is named
    (it runs again once its lease ends) and the worker exits non-zero."""
    import redis.exceptions

    import elric.worker
    from tests.jobs import Add

    tried = []

    async def away(self, *args):
        tried.append(args)
        raise redis.exceptions.ConnectionError("Connection refused")
    monkeypatch.setattr(RedisQueue, "finish", away)
    monkeypatch.setattr(elric.worker, "GIVE_BACK_SECONDS", 0.2)   # its wait past the grace

    async def main():
        w = _worker(cluster, SHUTDOWN_GRACE=0.2)
        run = asyncio.create_task(w.run())
        try:
            await asyncio.to_thread(cluster.client.submit_job, Add.spec([1, 2], job_id="ended"))
            await _until("its outcome tried", lambda: tried)
            w.request_stop()
            return await asyncio.wait_for(run, 30)
        finally:
            run.cancel()

    assert asyncio.run(main()) == 1
    named = [r for r in caplog.records if r.levelname == "ERROR" and "ended" in r.getMessage()]
    assert named and "lease" in named[0].getMessage(), caplog.text


def test_a_give_back_passes_over_a_job_key_of_another_type_and_releases_the_others(
        redis_url, caplog):
    """A claimed job's hash overwritten with a string (an operator's mistake) failed the
    whole give-back (WRONGTYPE): every other claim of that call, a stopping worker's
    prefetched jobs say, was held until its lease ran out. The bad one is named, passed
    over; the others go back to their place in line."""
    import redis.asyncio as aredis

    from elric.contract import normalize_spec
    from elric.keys import Keys

    keys = Keys("elrictest")

    async def main():
        r = aredis.Redis.from_url(redis_url)
        try:
            q = RedisQueue(r, keys)
            await q.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                             "job_id": j}) for j in "abc"])
            claims = (await q.fetch("w1", ["default"], 3, 30)).claims
            await r.delete(keys.job("b"))
            await r.set(keys.job("b"), "overwritten")
            assert await q.release("w1", [c.run for c in claims]) == 2
            for job_id in "ac":
                job = await q.get_job(job_id)
                assert (job["status"], job["attempts"]) == ("queued", 0), job
            assert keys.job("b") in caplog.text
        finally:
            await r.aclose()
    asyncio.run(main())


def test_a_retry_starts_no_try_past_its_deadline_and_its_last_pause_ends_there(monkeypatch):
    """``retry`` looked at its deadline only after a failed try, then paused a whole
    backoff: a try that failed just before the deadline was followed by one well past it
    (a 5 s deadline lasted ~6.3 s with Redis refusing). Its last pause ends at the
    deadline, with a last try there. (A clock of the test's: no time passes.)"""
    import elric.retry
    from elric.backoff import Backoff
    from elric.retry import retry

    now, tries = [100.0], []

    async def sleep(seconds):
        now[0] += seconds
    monkeypatch.setattr(elric.retry, "time", SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setattr(elric.retry.asyncio, "sleep", sleep)

    async def away():
        tries.append(now[0])
        raise RedisConnectionError("Connection refused")
    with pytest.raises(RedisConnectionError):
        asyncio.run(retry(away, what="test", log=logging.getLogger("test"),
                          backoff=Backoff(1.0, 8.0), deadline=102.5))
    assert tries == [100.0, 101.0, 102.5]


def test_a_stop_with_redis_frozen_ends_within_its_grace_and_a_fixed_bound(
        cluster, tmp_path, monkeypatch, caplog):
    """Redis frozen (SIGSTOP: each call waits out its socket timeout), a SIGTERM gave the
    prefetched job back before the running one's grace even began, gave the running one
    back after it, then marked the worker stopped: each a timeout, SHUTDOWN_GRACE + ~15 s
    in all, where a supervisor's stop timeout (Kubernetes' 30 s by default) SIGKILLs a
    worker before its running jobs had their grace. The grace counts from the SIGTERM,
    the give-backs run beside it, and what follows it is bounded: a stop takes at most
    SHUTDOWN_GRACE + 10 s (its description in config.py says so). No job is lost."""
    import redis.asyncio as aredis

    import elric.worker
    from elric.contract import normalize_spec
    from elric.redis_server import RedisServer
    from tests.jobs import Add

    monkeypatch.setattr(elric.worker, "GIVE_BACK_SECONDS", 0.5)   # (the test's time)
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    own = RedisServer().start()   # ours alone: it is frozen

    async def main():
        w = _worker(cluster, REDIS_URL=own.url, SHUTDOWN_GRACE=1)
        r = aredis.Redis.from_url(own.url)
        q = RedisQueue(r, w.keys)
        run = asyncio.create_task(w.run())
        try:
            await q.enqueue([normalize_spec(MarkUntilGate.spec([str(marks), str(gate)],
                                                               job_id="long"))])
            await _until("the long job started", lambda: marks.exists())
            await q.enqueue([normalize_spec(Add.spec([1, 2], job_id="held"))])
            await _until("the other job prefetched", lambda: w.buffer)
            os.kill(own.proc.pid, signal.SIGSTOP)
            try:
                asked = time.monotonic()
                w.request_stop()   # as a SIGTERM does
                code = await asyncio.wait_for(run, 60)
                took = time.monotonic() - asked
            finally:
                os.kill(own.proc.pid, signal.SIGCONT)
            assert took < 1 + 10, f"the stop took {took:.1f}s"
            assert code == 0
            assert "could not give" in caplog.text
            for job_id in ("long", "held"):   # back in line, or held under a lease
                job = await q.get_job(job_id)
                assert job["status"] == "queued" or (
                    job["status"] == "running" and
                    await r.zscore(w.keys.inflight, job_id) is not None), job
        finally:
            run.cancel()
            gate.touch()
            await r.aclose()
    try:
        asyncio.run(main())
    finally:
        own.cleanup()


def test_an_idle_worker_stopped_with_redis_frozen_leaves_no_traceback(cluster, monkeypatch):
    """An idle worker waits for work in a fetch of its own. Redis frozen, a SIGTERM's end of
    that wait was cut off at the stop's bound, the fetch left running: its timeout came
    after "stopped" as asyncio's "ERROR Task exception was never retrieved" and a
    traceback of redis-py's, where the stop had said all there was."""
    import gc

    import elric.worker
    from elric.redis_server import RedisServer

    monkeypatch.setattr(elric.worker, "GIVE_BACK_SECONDS", 0.5)   # (the test's time)
    own = RedisServer().start()   # ours alone: it is frozen
    errors = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(
            context["message"]))
        w = _worker(cluster, REDIS_URL=own.url)
        run = asyncio.create_task(w.run())
        await _until("the worker waits for work", lambda: w._waiting is not None)
        os.kill(own.proc.pid, signal.SIGSTOP)
        try:
            w.request_stop()   # as a SIGTERM does
            assert await asyncio.wait_for(run, 30) == 0
        finally:
            os.kill(own.proc.pid, signal.SIGCONT)
    try:
        asyncio.run(main())
    finally:
        own.cleanup()
    gc.collect()   # (a task's unretrieved error is logged when it is collected)
    assert errors == []


def test_a_sigterm_while_the_pool_starts_its_fork_server_is_not_lost(monkeypatch):
    """The worker ignored SIGTERM while it started its fork server (which inherited that, so
    a SIGTERM to the whole process group spared it): a supervisor's stop that came then
    was lost, and the worker ran on until killed. The fork server ignores it by itself now
    (elric.fork_server); the worker never does."""
    from multiprocessing import forkserver

    from elric.pool import Pool

    real, got = forkserver.ensure_running, []

    def stopped_meanwhile():
        real()
        os.kill(os.getpid(), signal.SIGTERM)   # a supervisor's stop, mid-start

    monkeypatch.setattr(forkserver, "ensure_running", stopped_meanwhile)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))

    async def main():
        pool = Pool(1, async_slots=1, sync_batch=lambda: 1, job_modules=["tests.jobs"])
        pool.shutdown(wait=True)
    try:
        asyncio.run(main())
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert got == [signal.SIGTERM]
