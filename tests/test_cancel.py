"""cancel_job: a queued or retrying job is cancelled and never runs, a running one is
stopped by its worker and recorded cancelled, a finished one is left alone; remove_job
refuses a running job; cancelling a fire keeps its schedule."""

from __future__ import annotations

import re
import time

import psutil
import pytest

from elric.rpc import RemoteError
from tests.conftest import batches_form, wait_for
from tests.jobs import Echo, Fail, MarkSleep, Sleep, Stubborn
from tests.jobs_async import AsyncSleep, AsyncStubborn


def test_a_queued_or_retrying_job_is_cancelled_and_never_runs(cluster, tmp_path):
    c = cluster.client
    marks = tmp_path / "marks"
    c.submit_jobs([MarkSleep.spec([str(marks), 0], job_id="waiting"),
                   Fail.spec(job_id="flaky", max_retries=5)])
    assert c.cancel_job("waiting") == {"job_id": "waiting", "was": "queued",
                                       "status": "cancelled"}
    cluster.start_worker("--concurrency", "1", RETRY_BACKOFF=30)
    cluster.wait_job("flaky", statuses=("retrying",))
    assert c.cancel_job("flaky") == {"job_id": "flaky", "was": "retrying",
                                     "status": "cancelled"}
    c.submit_job(Echo.spec(["after"], job_id="after"))
    assert cluster.wait_job("after")["status"] == "succeeded"   # the worker went past them
    waiting, flaky = c.get_job("waiting"), c.get_job("flaky")
    assert (waiting["status"], waiting["attempts"], flaky["status"], flaky["attempts"]) == \
        ("cancelled", 0, "cancelled", 1)
    assert not marks.exists()
    assert {j["job_id"] for j in c.list_jobs(status="cancelled")} == {"waiting", "flaky"}
    # a finished job is left alone, and the answer says what it is
    assert c.cancel_job("after") == {"job_id": "after", "was": "succeeded",
                                     "status": "succeeded"}
    with pytest.raises(RemoteError) as info:
        c.cancel_job("no-such")
    assert info.value.code == "not_found"


def test_a_running_job_is_stopped_and_recorded_cancelled(cluster):
    c = cluster.client
    worker = cluster.start_worker("--concurrency", "2")
    c.submit_jobs([Sleep.spec([60], job_id="long"), Sleep.spec([1], job_id="beside")])
    wait_for(lambda: c.get_job("long")["status"] == "running", what="long started")
    with pytest.raises(RemoteError) as info:
        c.remove_job("long")
    assert info.value.code == "bad_request" and "is running; cancel it" in str(info.value)
    with pytest.raises(RemoteError) as info:
        c.rerun_job("long")
    assert info.value.code == "bad_request" and "only a finished job" in str(info.value)
    asked = time.monotonic()
    assert c.cancel_job("long") == {"job_id": "long", "was": "running",
                                    "status": "cancelling"}
    long = cluster.wait_job("long", statuses=("cancelled",))
    assert time.monotonic() - asked < 30, "stopped long before its 60 s"
    assert long["attempts"] == 1 and "Cancelled: cancel_job stopped it" in long["error"]
    assert cluster.wait_job("beside")["status"] == "succeeded"
    assert worker.alive(), worker.log()
    assert c.remove_job("long") is True and c.get_job("long") is None


def test_cancelling_a_fire_keeps_its_schedule(cluster):
    c = cluster.client
    # (a short grace: at the end it gives its 60 s fire back rather than wait for it)
    cluster.start_worker("--concurrency", "2", SHUTDOWN_GRACE=1)
    c.submit_job(Sleep.spec([60], job_id="tick", max_instances=1,
                            trigger={"type": "interval", "seconds": 1}))
    def first_fire():
        runs = c.get_job("tick")["runs"]
        fired = [r["job_id"] for r in runs if r.get("outcome") == "running"]
        return fired and fired[0]
    fire = wait_for(first_fire, what="a fire running")
    c.cancel_job(fire)
    cluster.wait_job(fire, statuses=("cancelled",))
    # its round ended: max_instances lets the next fire run, and the schedule goes on
    wait_for(lambda: any(r["job_id"] != fire and r.get("outcome") == "running"
                         for r in c.get_job("tick")["runs"]), what="a later fire running")
    assert c.get_job("tick")["status"] == "scheduled"


def test_a_job_cancelled_while_running_runs_when_rerun(cluster, tmp_path):
    """The request to stop a running job stayed on it after it was recorded cancelled, so
    `elric rerun` queued it with the request still there: its next worker stopped it again
    at the first heartbeat, and the job could never run again."""
    c = cluster.client
    marks = tmp_path / "marks"
    cluster.start_worker("--concurrency", "1")
    c.submit_job(MarkSleep.spec([str(marks), 3], job_id="again"))
    wait_for(marks.exists, what="the first run started")
    c.cancel_job("again")
    cluster.wait_job("again", statuses=("cancelled",))
    assert c.rerun_job("again") == {"job_id": "again", "status": "queued"}
    job = cluster.wait_job("again", statuses=("succeeded", "failed", "cancelled"))
    assert (job["status"], job["attempts"]) == ("succeeded", 1), job["error"]
    assert marks.read_text().split() == ["again", "again"]


def test_cancelling_an_async_job_spares_the_jobs_beside_it(cluster, tmp_path):
    """Async jobs share a pool process, up to ASYNC_CONCURRENCY of them. Cancelling one
    killed that process: every job beside it was stopped half-way and ran again."""
    c = cluster.client
    marks = tmp_path / "marks"
    worker = cluster.start_worker("--concurrency", "1")
    c.submit_jobs([AsyncSleep.spec([60, str(marks)], job_id="victim"),
                   AsyncSleep.spec([3, str(marks)], job_id="beside")])
    wait_for(lambda: marks.exists() and len(marks.read_text().split()) == 2,
             what="both started")
    c.cancel_job("victim")
    victim = cluster.wait_job("victim", statuses=("cancelled",))
    assert "Cancelled: cancel_job stopped it" in victim["error"], victim["error"]
    beside = cluster.wait_job("beside")
    assert (beside["status"], beside["attempts"]) == ("succeeded", 1)
    assert sorted(marks.read_text().split()) == ["beside", "victim"], "beside ran again"
    assert worker.alive(), worker.log()


def test_an_async_job_ignoring_its_cancellation_loses_its_process(cluster, tmp_path):
    c = cluster.client
    marks = tmp_path / "marks"
    worker = cluster.start_worker("--concurrency", "1")
    c.submit_job(AsyncStubborn.spec([60, str(marks)], job_id="stubborn"))
    wait_for(marks.exists, what="it started")
    c.cancel_job("stubborn")
    job = cluster.wait_job("stubborn", statuses=("cancelled",), timeout=30)
    assert "process was killed" in job["error"], job["error"]
    assert "ignored its cancellation" in worker.log()
    c.submit_job(Echo.spec(["after"], job_id="after"))
    assert cluster.wait_job("after")["status"] == "succeeded"


def test_cancelling_a_sync_job_spares_the_jobs_of_its_batch(cluster, tmp_path):
    """Sync jobs reach a pool process in batches. Cancelling one killed that process: the
    jobs of its batch that had ended but not reported yet, and the ones waiting, ran again;
    a waiting job cancelled behind a long one killed the long one."""
    c = cluster.client
    marks = tmp_path / "marks"
    worker = cluster.start_worker("--concurrency", "1")
    batches_form(cluster)
    before = [f"before-{i}" for i in range(5)]
    after = [f"after-{i}" for i in range(3)]
    c.submit_jobs([MarkSleep.spec([str(marks), 0], job_id=j) for j in before]
                  + [MarkSleep.spec([str(marks), 60], job_id="victim"),
                     MarkSleep.spec([str(marks), 0], job_id="waiting")]
                  + [MarkSleep.spec([str(marks), 0], job_id=j) for j in after])
    wait_for(lambda: marks.exists() and "victim" in marks.read_text().split(),
             what="the victim started")
    c.cancel_job("waiting")
    # (stopped in its process, or given back by its worker first, seeing the victim run on)
    assert re.search(r"Cancelled: (cancel_job stopped it|its worker \S+ gave it back)",
                    cluster.wait_job("waiting", statuses=("cancelled",))["error"])
    assert c.get_job("victim")["status"] == "running", "the job before it was spared"
    c.cancel_job("victim")
    victim = cluster.wait_job("victim", statuses=("cancelled",))
    assert "Cancelled: cancel_job stopped it" in victim["error"], victim["error"]
    assert "process was killed" not in victim["error"]
    pids = set()
    for job_id in before + after:
        job = cluster.wait_job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
        pids.add(job["result"]["pid"])
    assert len(pids) == 1, "the pool process was killed"
    assert sorted(marks.read_text().split()) == sorted(before + after + ["victim"]), \
        "a job ran twice, or the cancelled waiting one ran"
    assert worker.alive(), worker.log()


def test_a_sync_job_ignoring_its_cancellation_loses_its_process_not_its_batch(cluster,
                                                                            tmp_path):
    c = cluster.client
    marks = tmp_path / "marks"
    worker = cluster.start_worker("--concurrency", "1")
    batches_form(cluster)
    before = [f"before-{i}" for i in range(5)]
    c.submit_jobs([MarkSleep.spec([str(marks), 0], job_id=j) for j in before]
                  + [Stubborn.spec([str(marks), 60], job_id="stubborn"),
                     MarkSleep.spec([str(marks), 0], job_id="waiting")])
    wait_for(lambda: marks.exists() and "stubborn" in marks.read_text().split(),
             what="the stubborn job started")
    c.cancel_job("stubborn")
    job = cluster.wait_job("stubborn", statuses=("cancelled",), timeout=30)
    assert "process was killed" in job["error"], job["error"]
    assert "ignored its cancellation" in worker.log()
    for job_id in before + ["waiting"]:
        job = cluster.wait_job(job_id)
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
    # the ended ones had reported before the kill: only the waiting one, never started, ran
    # in the new process
    assert sorted(marks.read_text().split()) == sorted(before + ["stubborn", "waiting"])


def _reap(pids: list[int]) -> None:
    """Kill, by PID, pool processes of a worker we killed that may still run a job."""
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def test_a_job_cancelled_while_its_worker_dies_is_not_run_again(make_cluster, tmp_path):
    """A job being cancelled whose worker died went back in line when its lease ran out,
    cancel request and all: another worker ran it again until a heartbeat stopped it."""
    # (a lease long enough that the job is still running, not yet redelivered, when the
    # cancel comes just after the kill)
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    marks = tmp_path / "marks"
    victim = c.start_worker("--concurrency", "1")
    pool = [p.pid for p in psutil.Process(victim.pid).children(recursive=True)]
    try:
        c.client.submit_job(MarkSleep.spec([str(marks), 60], job_id="doomed", batch="b1"))
        wait_for(marks.exists, what="it started")
        victim.kill()
        assert c.client.cancel_job("doomed")["status"] == "cancelling"
        c.start_worker("--concurrency", "1")   # would run it again if it went back in line
        job = c.wait_job("doomed", statuses=("cancelled", "succeeded", "failed"))
        assert job["status"] == "cancelled", job
        assert "stopped renewing its lease" in job["error"], job["error"]
        assert job["attempts"] == 1 and job["finished_at"]
        c.client.submit_job(Echo.spec(["after"], job_id="after"))
        assert c.wait_job("after")["status"] == "succeeded"
        assert marks.read_text().split() == ["doomed"], "it ran again"
        stats = c.client.stats()
        assert (stats["totals"]["cancelled"], stats["totals"]["redelivered"]) == (1, 0)
        assert stats["batches"]["b1"]["cancelled"] == 1
        assert stats["funcs"]["tests.jobs:MarkSleep"]["cancelled"] == 1
        assert stats["by_status"]["running"] == stats["by_status"]["queued"] == 0
        assert [j["job_id"] for j in c.client.list_jobs(status="cancelled")] == ["doomed"]
    finally:
        _reap(pool)


def test_a_job_ignoring_its_cancel_is_not_given_back_by_a_stopping_worker(make_cluster,
                                                                          tmp_path):
    """A worker stopped (SIGTERM) while a job ignored its cancellation gave the job back
    after SHUTDOWN_GRACE, cancel request and all: it was queued and ran again."""
    c = make_cluster()
    c.start_master()
    marks = tmp_path / "marks"
    # its grace ends long before the pool kills a job that ignores its cancellation
    first = c.start_worker("--concurrency", "1", SHUTDOWN_GRACE=1)
    c.client.submit_job(AsyncStubborn.spec([60, str(marks)], job_id="stubborn"))
    wait_for(marks.exists, what="it started")
    assert c.client.cancel_job("stubborn")["status"] == "cancelling"
    assert first.stop() == 0, first.log()
    assert "returning them to the queue" in first.log()
    c.start_worker("--concurrency", "1")   # would run it again if it went back in line
    job = c.wait_job("stubborn", statuses=("cancelled", "succeeded", "failed"), timeout=30)
    assert job["status"] == "cancelled", job
    assert "gave it back" in job["error"], job["error"]
    c.client.submit_job(Echo.spec(["after"], job_id="after"))
    assert c.wait_job("after")["status"] == "succeeded"
    assert marks.read_text().split() == ["stubborn"], "it ran again"
    assert c.client.stats()["totals"]["cancelled"] == 1


def test_a_failure_recorded_cancelled_counts_as_cancelled_in_its_workers_counts(redis_url):
    """A job asked to stop that fails before its worker heard is recorded cancelled
    (finish.lua): the worker's `failed` (in stats' workers) must not count it."""
    import asyncio

    import redis.asyncio as aredis

    from elric.config import load_settings
    from elric.contract import normalize_spec
    from elric.queue import RedisQueue
    from elric.runner import Ran
    from elric.worker import Worker

    async def main():
        w = Worker(load_settings(env={"ELRIC_REDIS_URL": redis_url}))
        w.redis = aredis.Redis.from_url(redis_url)
        w.queue = RedisQueue(w.redis, w.keys)
        try:
            await w.queue.enqueue([normalize_spec({"func": "tests.jobs:Fail", "job_id": "j",
                                                   "max_retries": 3})])
            claim, = (await w.queue.fetch(w.worker_id, ["default"], 1, 30)).claims
            assert await w.queue.cancel("j") == "running"   # before any heartbeat told it
            await w._record([(claim, Ran("j", claim.attempt, False, "boom"))])
            assert (await w.queue.get_job("j"))["status"] == "cancelled"
            assert (w.processed, w.done, w.failed) == (1, 0, 0)
        finally:
            await w.redis.aclose()
    asyncio.run(main())


def test_a_cancel_reply_that_came_after_the_job_ended_does_not_touch_its_rerun(redis_url):
    """The worker heard 'stop job x' in a heartbeat whose script ran just before x's
    outcome was recorded, and whose reply came after it: the worker's cancelling set kept x
    for good. A rerun of x on that worker then ended cancelled when it failed (not failed),
    and a real cancel of a rerun was never passed to its process. In process, against a
    real Redis: the heartbeat's reply is held back to make that order certain."""
    import asyncio
    from types import SimpleNamespace

    import redis.asyncio as aredis

    from elric.config import load_settings
    from elric.contract import normalize_spec
    from elric.queue import RedisQueue
    from elric.runner import Ran
    from elric.worker import Worker

    async def until(done, what):
        deadline = time.monotonic() + 10
        while not done():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.01)

    async def main():
        w = Worker(load_settings(env={"ELRIC_REDIS_URL": redis_url}))
        w.redis = aredis.Redis.from_url(redis_url)
        w.queue = q = RedisQueue(w.redis, w.keys)
        running, stopped = [], []   # the claims in the pool; what it was told to stop
        w.pool = SimpleNamespace(claims=lambda: list(running), pids=list,
                                 cancel=stopped.append)
        sent, reply = [], asyncio.Event()
        heartbeat = q.heartbeat

        async def late(*args, **kwargs):   # the script runs now; its reply comes later
            renewed = await heartbeat(*args, **kwargs)
            sent.append(renewed)
            await reply.wait()
            return renewed

        async def rerun():
            assert await q.rerun("x") in ("succeeded", "failed")
            claim, = (await q.fetch(w.worker_id, ["default"], 1, 30)).claims
            return claim

        q.heartbeat = late
        spec = normalize_spec({"func": "tests.jobs:Fail", "job_id": "x", "max_retries": 0})
        await q.enqueue([spec])
        running[:] = (await q.fetch(w.worker_id, ["default"], 1, 30)).claims
        assert await q.cancel("x") == "running"
        beat = asyncio.create_task(w._heartbeat_loop())
        try:
            await until(lambda: sent, "a heartbeat sent")
            assert sent[0].cancel == {"x"}
            first = running.pop()   # it ended well before its process heard
            await w._record([(first, Ran("x", first.attempt, True, b"\xc0"))])
            reply.set()
            await until(lambda: len(sent) > 1, "the late reply read")
            again = await rerun()   # its failure is a failure
            await w._record([(again, Ran.failure(again.run, "boom"))])
            assert await w.redis.hget(w.keys.job("x"), "status") == b"failed"
            running.append(await rerun())   # and a cancel stops it
            told = len(stopped)
            assert await q.cancel("x") == "running"
            await until(lambda: running[0] in stopped[told:], "the rerun never stopped")
        finally:
            beat.cancel()
            await w.redis.aclose()

    asyncio.run(main())
