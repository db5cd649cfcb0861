"""Async jobs (``async def run``) in real workers: many at once per pool process, with
everything a sync job has: results, errors, retries, timeouts, children, SIGTERM grace,
SIGKILL redelivery, crashes; and mixed with sync jobs in one worker."""

from __future__ import annotations

import signal

import pytest

from tests.conftest import wait_for
from tests.jobs import Add
from tests.jobs_faults import SwallowTimeout, count_lines
from tests.jobs_async import (AsyncBlock, AsyncCrash, AsyncFail, AsyncFlaky,
                              AsyncNestedGroupFail, AsyncSleep, AsyncSpawn, AsyncStubborn,
                              HiddenAsync, SyncGetsEventLoop, SyncLeavesTask, SyncRunsAsyncio,
                              SyncSpan)
from tests.test_resilience import lines, one_worker, worker_pid


def most_at_once(spans) -> int:
    """The largest number of (start, end) spans that overlap at one moment."""
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans],
                    key=lambda ev: (ev[0], ev[1]))
    now = top = 0
    for _, step in events:
        now += step
        top = max(top, now)
    return top


def test_one_process_runs_many_async_jobs_at_once(cluster):
    cluster.start_worker("--concurrency", "1")
    ids = [f"a{i:02d}" for i in range(40)]
    cluster.client.submit_jobs([AsyncSleep.spec([1.0], job_id=i) for i in ids])
    jobs = [cluster.wait_job(i, timeout=60) for i in ids]
    assert all(j["status"] == "succeeded" for j in jobs), cluster.logs()
    assert len({j["result"]["pid"] for j in jobs}) == 1  # one pool process ran them all
    assert most_at_once([(j["result"]["start"], j["result"]["end"]) for j in jobs]) >= 20


def test_an_async_error_fails_with_its_traceback(cluster):
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(AsyncFail.spec(["no such page"], job_id="bad"))
    job = cluster.wait_job("bad")
    assert job["status"] == "failed" and job["attempts"] == 1
    assert "ValueError: no such page" in job["error"]
    assert "Traceback" in job["error"] and "in run" in job["error"], job["error"]


def test_a_job_list_names_the_error_of_a_task_group_inside_another(cluster):
    """A TaskGroup in a task of another: the list showed the two groups' headers and not
    the error inside ("ExceptionGroup: ... (1 sub-exception): ExceptionGroup: ...")."""
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(AsyncNestedGroupFail.spec(["gone\n  for good"], job_id="nest"))
    assert cluster.wait_job("nest")["status"] == "failed"
    [row] = cluster.client.list_jobs(status="failed")
    assert row["error"].endswith("(1 sub-exception): ValueError: gone for good"), row["error"]
    assert row["error"].count("ExceptionGroup: unhandled errors in a TaskGroup") == 2, row


def test_an_async_job_is_retried_with_backoff_until_it_succeeds(make_cluster, tmp_path):
    c = make_cluster(RETRY_BACKOFF=0.1)
    c.start_master()
    c.start_worker("--concurrency", "1")
    runs = tmp_path / "runs.txt"
    c.client.submit_job(AsyncFlaky.spec([str(runs), 2], job_id="flaky", max_retries=3))
    job = c.wait_job("flaky")
    assert (job["status"], job["attempts"], job["result"]) == \
        ("succeeded", 3, {"attempt": 3}), c.logs()
    assert count_lines(runs) == 3


def test_an_async_job_past_its_timeout_is_cancelled_and_its_neighbours_go_on(cluster):
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_jobs([AsyncSleep.spec([60], job_id="slow", timeout=1),
                                AsyncSleep.spec([3], job_id="beside")])
    slow = cluster.wait_job("slow", timeout=30)
    assert slow["status"] == "failed" and "JobTimeout" in slow["error"], slow["error"]
    assert "cancelled" in slow["error"] and slow["duration"] < 5
    beside = cluster.wait_job("beside", timeout=30)
    assert (beside["status"], beside["attempts"]) == ("succeeded", 1)
    assert beside["result"]["pid"] == worker_pid_of(cluster, "beside")
    assert worker.alive()


@pytest.mark.parametrize("func", [AsyncBlock, AsyncStubborn, SwallowTimeout])
def test_a_job_that_ends_past_its_timeout_fails_with_it(cluster, func):
    """An async job that blocked its loop past its timeout without awaiting, or swallowed
    the cancellation its timeout sent, or a sync job whose `except Exception` caught the
    JobTimeout its alarm raised, and then returned (within the grace before its process is
    killed) was recorded succeeded."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(func.spec([2.5], job_id="late", timeout=1))
    late = cluster.wait_job("late")
    assert late["status"] == "failed", late
    assert "JobTimeout: ran past its timeout of 1s" in late["error"], late["error"]
    cluster.client.submit_job(func.spec([0], job_id="in-time", timeout=30))
    assert cluster.wait_job("in-time")["status"] == "succeeded"
    assert worker.alive()


def test_a_sync_job_may_run_its_own_event_loop(cluster):
    """A sync job runs on its pool process's loop thread, where that loop was seen as
    running: asyncio.run (or run_until_complete on a loop of its own) raised RuntimeError
    in every sync job that used an async library through a sync wrapper."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_jobs([SyncRunsAsyncio.spec([i], job_id=f"own-loop-{i}")
                                for i in range(3)] + [AsyncSleep.spec([0], job_id="async")])
    for i in range(3):
        job = cluster.wait_job(f"own-loop-{i}")
        assert (job["status"], job["result"]) == ("succeeded", 2 * i), job.get("error")
    assert cluster.wait_job("async")["status"] == "succeeded"
    assert worker.alive()


def test_a_sync_job_may_use_the_event_loop_get_event_loop_gives(cluster):
    """A sync job's asyncio.get_event_loop() was its pool process's own loop, which runs it:
    run_until_complete raised "this event loop is already running" in every sync job that
    ran a coroutine the pre-asyncio.run way, and a job that closed that loop had the next
    jobs find it closed."""
    worker = cluster.start_worker("--concurrency", "1")
    for i in range(3):   # one after another in one process: each closes its loop
        cluster.client.submit_job(SyncGetsEventLoop.spec([i], job_id=f"legacy-{i}"))
        job = cluster.wait_job(f"legacy-{i}")
        assert (job["status"], job["result"]) == ("succeeded", 2 * i), job.get("error")
    cluster.client.submit_job(AsyncSleep.spec([0], job_id="async"))
    assert cluster.wait_job("async")["status"] == "succeeded"
    assert worker.alive()


def test_tasks_a_sync_job_left_on_its_event_loop_do_not_run_in_the_next_job(cluster, tmp_path):
    """Sync jobs of a process share the loop asyncio.get_event_loop() gives them. A task
    one left pending there (fire and forget) ran inside the next job that ran that loop,
    in the middle of that job's work. They are cancelled as the job ends, as asyncio.run
    cancels its own."""
    path = tmp_path / "left"
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(SyncLeavesTask.spec([str(path), 0, True], job_id="leaves"))
    pid = cluster.wait_job("leaves")["result"]
    cluster.client.submit_job(SyncLeavesTask.spec([str(path), 0.5], job_id="after"))
    assert cluster.wait_job("after")["result"] == pid
    assert path.read_text().split() == ["cancelled"]
    assert worker.alive()


def test_a_run_that_returns_a_coroutine_fails_saying_run_must_be_async(cluster):
    """A sync decorator around `async def run` makes the class look sync: run returned a
    coroutine that nothing awaited, the job's code never ran, and the error spoke of a
    return value that is not msgpack."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(HiddenAsync.spec([1], job_id="hidden"))
    hidden = cluster.wait_job("hidden")
    assert hidden["status"] == "failed", hidden
    assert "returned a coroutine" in hidden["error"], hidden["error"]
    assert "msgpack" not in hidden["error"], hidden["error"]
    assert worker.alive()


def worker_pid_of(cluster, job_id) -> int:
    return cluster.client.get_job(job_id)["result"]["pid"]


def test_async_children_reach_the_master_and_inherit_the_scope(cluster):
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(AsyncSpawn.spec([5], job_id="parent", dedupe_scope="round-1"))
    parent = cluster.wait_job("parent")
    assert parent["status"] == "succeeded", cluster.logs()
    children = [cluster.wait_job(i) for i in parent["result"]["children"]]
    assert [c["result"] for c in children] == [{"sum": 2 * i, "scope": "round-1"}
                                              for i in range(5)]
    assert all(c["parent"] == "parent" for c in children)


def test_sigterm_lets_every_async_job_in_flight_finish(cluster, tmp_path):
    marks = tmp_path / "started.txt"
    worker = cluster.start_worker("--concurrency", "1")
    ids = [f"g{i}" for i in range(10)]
    cluster.client.submit_jobs([AsyncSleep.spec([3, str(marks)], job_id=i) for i in ids])
    wait_for(lambda: len(lines(marks)) == 10, what="all ten started")
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=40) == 0, worker.log()
    jobs = [cluster.client.get_job(i) for i in ids]
    assert [(j["status"], j["attempts"]) for j in jobs] == [("succeeded", 1)] * 10
    assert sorted(lines(marks)) == sorted(ids)


def test_sigkill_redelivers_every_async_job_in_flight(make_cluster, tmp_path):
    marks = tmp_path / "started.txt"
    with one_worker(make_cluster, 1, LEASE_SECONDS=2) as (c, victim, pool):
        ids = [f"k{i:02d}" for i in range(20)]
        c.client.submit_jobs([AsyncSleep.spec([30, str(marks)], job_id=i) for i in ids[:10]] +
                             [AsyncSleep.spec([0.5, str(marks)], job_id=i) for i in ids[10:]])
        wait_for(lambda: len(lines(marks)) == 20, what="all twenty started")
        victim.kill()
        # (a short grace: at the end it gives the long jobs back rather than wait 30 s)
        c.start_worker("--concurrency", "1", SHUTDOWN_GRACE=1)
        # the long ones would take 30 s more; what matters is that they run again
        wait_for(lambda: len(lines(marks)) >= 30, timeout=60, what="the ten long jobs rerun")
        again = [j for j in lines(marks)[20:]]
        assert sorted(again) == sorted(ids[:10]) or set(ids[:10]) <= set(again), again
        for i in ids[:10]:
            job = c.client.get_job(i)
            assert (job["status"], job["attempts"]) == ("running", 2), job
            assert worker_pid(job) != victim.pid


def test_sync_and_async_jobs_in_one_worker_never_share_a_process(cluster):
    cluster.start_worker("--concurrency", "2")
    specs = []
    for i in range(30):
        specs.append(AsyncSleep.spec([0.4], job_id=f"a{i:02d}"))
        if i % 3 == 0:
            specs.append(SyncSpan.spec([0.2], job_id=f"s{i:02d}"))
    cluster.client.submit_jobs(specs)
    jobs = [cluster.wait_job(s["job_id"], timeout=60) for s in specs]
    assert all(j["status"] == "succeeded" for j in jobs), cluster.logs()
    spans = {j["job_id"]: j["result"] for j in jobs}
    for sid, s in spans.items():
        if not sid.startswith("s"):
            continue
        for aid, a in spans.items():
            if aid.startswith("a") and a["pid"] == s["pid"]:
                assert a["end"] <= s["start"] or a["start"] >= s["end"], (sid, aid)


def test_an_async_job_blocking_its_loop_is_named_in_the_log(cluster):
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(AsyncBlock.spec([2.5], job_id="sleeper"))
    assert cluster.wait_job("sleeper")["status"] == "succeeded"
    wait_for(lambda: "job sleeper has blocked its event loop" in worker.log(),
             what="the warning naming the job")


def one_async_process(make_cluster):
    """(cluster, worker): one pool process that has run an AsyncBlock (a class the worker
    has not run yet gets a process to itself), and leases short enough to run out."""
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    worker = c.start_worker("--concurrency", "1")
    c.client.submit_job(AsyncBlock.spec([0], job_id="warm-up"))
    assert c.wait_job("warm-up")["status"] == "succeeded"
    return c, worker


def test_an_async_job_blocking_past_its_timeout_is_killed_and_its_neighbours_run_again(
        make_cluster, tmp_path):
    c, worker = one_async_process(make_cluster)
    marks = tmp_path / "started.txt"
    c.client.submit_job(AsyncSleep.spec([4, str(marks)], job_id="innocent"))
    wait_for(lambda: lines(marks) == ["innocent"], what="the innocent job started")
    c.client.submit_job(AsyncBlock.spec([60, str(marks)], job_id="culprit", timeout=1))
    culprit = c.wait_job("culprit", timeout=40)
    assert culprit["status"] == "failed", c.logs()
    assert "JobTimeout" in culprit["error"] and "killed" in culprit["error"]
    innocent = c.wait_job("innocent", timeout=40)
    # it ran again in a new process, under the same attempt
    assert (innocent["status"], innocent["attempts"]) == ("succeeded", 1), c.logs()
    assert lines(marks) == ["innocent", "culprit", "innocent"]
    assert worker.alive() and "ignored its timeout" in worker.log()


def test_a_job_held_up_past_its_timeout_by_a_blocked_loop_runs_again_and_the_blocker_fails(
        make_cluster, tmp_path):
    """The neighbour's deadline passes first: the process is killed for it, but the job the
    process names as blocking its loop takes the blame; before, the neighbour failed with
    JobTimeout, and the blocker ran again unblamed."""
    c, _ = one_async_process(make_cluster)
    marks = tmp_path / "started.txt"
    c.client.submit_job(AsyncSleep.spec([1, str(marks)], job_id="innocent", timeout=2))
    wait_for(lambda: lines(marks) == ["innocent"], what="the innocent job started")
    c.client.submit_job(AsyncBlock.spec([60, str(marks)], job_id="blocker", timeout=30))
    blocker = c.wait_job("blocker", timeout=40)
    assert blocker["status"] == "failed", c.logs()
    assert "blocked its event loop, so that job innocent could not end" in blocker["error"]
    innocent = c.wait_job("innocent", timeout=40)
    assert (innocent["status"], innocent["attempts"]) == ("succeeded", 1), c.logs()
    assert lines(marks) == ["innocent", "blocker", "innocent"]


def test_a_job_cancelled_while_a_blocked_loop_holds_it_ends_cancelled_not_run_again(
        make_cluster, tmp_path):
    """Its process is killed for it (it ignored the cancel for KILL_GRACE), but the blocker
    takes the blame: as a bystander it ran again, to the end, and succeeded."""
    c, _ = one_async_process(make_cluster)
    marks = tmp_path / "started.txt"
    c.client.submit_job(AsyncSleep.spec([6, str(marks)], job_id="asked"))
    wait_for(lambda: lines(marks) == ["asked"], what="the job to cancel started")
    c.client.submit_job(AsyncBlock.spec([40, str(marks)], job_id="blocker", timeout=60))
    wait_for(lambda: lines(marks) == ["asked", "blocker"], what="the blocker started")
    assert c.client.cancel_job("asked")["status"] == "cancelling"
    asked = c.wait_job("asked", statuses=("succeeded", "failed", "cancelled"), timeout=40)
    assert asked["status"] == "cancelled", (asked, lines(marks))
    assert lines(marks)[:2] == ["asked", "blocker"] and "asked" not in lines(marks)[2:]


def test_a_crash_among_async_jobs_is_found_by_running_the_suspects_apart(cluster, tmp_path):
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(AsyncCrash.spec([], job_id="first"))  # learn its kind
    assert cluster.wait_job("first", timeout=60)["status"] == "failed"
    marks = tmp_path / "started.txt"
    innocents = [f"i{n}" for n in range(4)]
    cluster.client.submit_jobs([AsyncSleep.spec([1, str(marks)], job_id=i) for i in innocents])
    wait_for(lambda: len(lines(marks)) == 4, what="the innocents started")
    cluster.client.submit_job(AsyncCrash.spec([str(marks)], job_id="crash"))
    crash = cluster.wait_job("crash", timeout=60)
    assert crash["status"] == "failed" and "process died" in crash["error"], crash["error"]
    jobs = [cluster.wait_job(i, timeout=60) for i in innocents]
    assert [(j["status"], j["attempts"]) for j in jobs] == [("succeeded", 1)] * 4
    assert "one by one" in worker.log() and worker.alive()
    # after the crash, each suspect ran in a process of its own
    cluster.client.submit_job(Add.spec([1, 2], job_id="after"))
    assert cluster.wait_job("after")["result"] == 3


def test_a_suspect_keeps_its_process_to_itself_once_its_kind_is_reported():
    """After a crash that names no culprit, each suspect runs in a process of its own. A
    fresh process reports the kind of each class it meets, and that report let other async
    jobs join a suspect: when it was the culprit they died with it, ran again, and with
    more jobs coming the culprit might never die alone."""
    import asyncio
    import time

    import msgpack

    from elric.pool import Pool
    from elric.queue import Claim

    async def main():
        news = asyncio.Event()
        pool = Pool(1, async_slots=10, sync_batch=lambda: 1, on_news=news.set,
                    job_modules=["tests.jobs_async"])
        try:
            pool.kinds["tests.jobs_async:AsyncSleep"] = True
            claim = Claim("suspect", 1, "tests.jobs_async:AsyncSleep", msgpack.packb([5]),
                          msgpack.packb({}), None, 0, "default", None)
            pool.start(claim, lambda outcome: None, suspect=True)
            pool.flush()
            assert pool.place(True, False) is None
            deadline = time.monotonic() + 20
            while not pool.last_async:   # the process has told its kind
                assert time.monotonic() < deadline, "no kind reported"
                news.clear()
                await asyncio.wait_for(news.wait(), 20)
            assert pool.place(True, False) is None, "an async job may join the suspect"
        finally:
            pool.kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
    asyncio.run(main())
