"""Resilience with real processes: workers killed, jobs that hang or crash, retries, SIGTERM,
Redis and the master going away and coming back, auth, Redis passwords, JOB_MODULES.

No fixed sleeps: every wait polls a condition against a deadline. A Redis outage lasts
ELRICTEST_REDIS_OUTAGE seconds (default 5; the issue's scenario is 30).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from types import SimpleNamespace

import msgpack
import psutil
import pytest
import redis

from elric.client import MasterClient
from elric.contract import normalize_spec
from elric.keys import Keys
from elric.queue import Claim
from elric.launch import Proc, elric_env, wait_for_master
from elric.redis_server import RedisServer, find_redis_server, free_port
from elric.rpc import AUTH_FAILED, AUTH_REQUIRED, Client, RemoteError, RPCConnectionError, RPCError, RPCTimeoutError
from tests.conftest import ROOT, Cluster, batches_form, lost_run_and_next, wait_for
from tests.jobs import (Add, Fail, FailNamingFile, FailUnlessFile, MarkSleep, MarkUntilGate,
                        PadLength, SelfAlarm, Sleep, SpawnPadded, SpawnWhenGateOpens)
from tests.jobs_async import AsyncCrashAtGate
from tests.jobs_numpy import FirstDraw
from tests.jobs_faults import (AsyncExitUnprintable, CommandUntilGate, AsyncForkReturns, Crash, ExitUnprintable,
                               FailBadRetryAfter, Flaky, ForkReturns, ForkThenCrash, IgnoreAlarm,
                               Mark, ResetSignals, WhereAmI, count_lines, BlockSignals,
                               ChildAndPipe, HoldGil, LooseSignals, ProcessState,
                               AsyncProcessState, AsyncExitInTask, SayThenCrash,
                               Stdio, StopCommand, StopProcesses, StopFork, ReadStdin,
                               ProcessSettings, AsyncProcessSettings, Seventh,
                               WarningState, AsyncWarningState, LeaveAsyncGenerator,
                               RunLoopOnce, FailAskingToWait)
from tests.procs import group
from tests.silent_proxy import SilentProxy

KEYS = Keys("elric")


def worker_pid(job: dict) -> int:
    return int(job["worker"].split(":")[1])  # worker ids are host:pid:random


def lines(path) -> list[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().split()
    except FileNotFoundError:
        return []


def watch(client, job_id, final=("succeeded", "failed"), timeout=30.0):
    """Poll a job until it reaches a final status; returns (job, statuses seen in order)."""
    seen: list[str] = []

    def check():
        job = client.get_job(job_id)
        if job and (not seen or seen[-1] != job["status"]):
            seen.append(job["status"])
        return job if job and job["status"] in final else None

    job = wait_for(check, timeout=timeout, interval=0.01, what=f"{job_id} in {final}")
    return job, seen


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def gone(procs: list[psutil.Process]) -> bool:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


def reap(procs: list[psutil.Process]) -> None:
    """Kill, by PID, what is left of processes a worker we started had started."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


@contextlib.contextmanager
def one_worker(make_cluster, concurrency: int, **settings):
    """A master and a worker of ``concurrency`` processes: (cluster, worker, its pool
    processes), the last killed after (a killed worker's may outlive it)."""
    c = make_cluster(**settings)
    c.start_master()
    worker = c.start_worker("--concurrency", str(concurrency))
    pool = descendants(worker.pid)
    try:
        yield c, worker, pool
    finally:
        reap(pool)


def statuses(url: str, ids) -> dict[str, str | None]:
    r = redis.Redis.from_url(url)
    try:
        with r.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(KEYS.job(job_id), "status")
            got = pipe.execute()
    finally:
        r.close()
    return {job_id: s.decode() if s else None for job_id, s in zip(ids, got)}


# --- 1. a worker SIGKILLed under load: its jobs are redelivered after the lease -------------

def test_sigkill_worker_under_load_every_job_succeeds(make_cluster):
    c = make_cluster(LEASE_SECONDS=2)
    c.start_master()
    victim = c.start_worker("--concurrency", "2")
    pool = descendants(victim.pid)
    assert pool, "the worker has no pool processes"
    n = 200
    ids = [f"k{i:03d}" for i in range(n)]
    c.client.submit_jobs([Sleep.spec([0.05], job_id=job_id) for job_id in ids])
    wait_for(lambda: c.client.stats()["by_status"]["succeeded"] >= 20, timeout=60,
             what="the first worker is busy")
    victim.kill()
    try:
        # what it held stays "running" under its name until the lease runs out
        held = {j["job_id"] for j in c.client.list_jobs(status="running", limit=1000)
                if worker_pid(j) == victim.pid}
        assert held, "the killed worker held no job"
        c.start_worker("--concurrency", "2")
        wait_for(lambda: c.client.stats()["by_status"]["succeeded"] == n, timeout=90,
                 what="all 200 jobs succeeded")
        jobs = {j["job_id"]: c.client.get_job(j["job_id"])
                for j in c.client.list_jobs(status="succeeded", limit=1000)}
        assert set(jobs) == set(ids)
        assert all(j["result"]["tag"] is None for j in jobs.values())
        again = {j for j, job in jobs.items() if job["attempts"] == 2}
        assert held <= again, (held, again)
        assert all(job["attempts"] in (1, 2) for job in jobs.values())
        assert all(worker_pid(jobs[j]) != victim.pid for j in held)
        # each job run again says so, naming the worker lost (attempts 2, max_retries 0)
        assert {j: (job.get("redelivered"), job.get("lost_worker", "").split(":")[1:2])
                for j, job in jobs.items()} == {
            j: (1, [str(victim.pid)]) if j in again else (None, []) for j in ids}
        stats = c.client.stats()
        assert stats["totals"]["redelivered"] == len(again) >= 1
        assert stats["by_status"]["running"] == 0 and stats["by_status"]["queued"] == 0
        assert "redelivered" in c.procs[0].log()
    finally:
        reap(pool)  # see the next test: they outlive the worker


def test_a_killed_workers_pool_processes_do_not_outlive_it(make_cluster):
    c = make_cluster(LEASE_SECONDS=2)
    c.start_master()
    # the worker's temp files, to look for (short: the fork server's socket is in there)
    tmp = tempfile.TemporaryDirectory(prefix="elric-test-")
    c.env["TMPDIR"] = tmp.name
    victim = c.start_worker("--concurrency", "2")
    pool = descendants(victim.pid)
    try:
        assert len(pool) >= 2
        c.client.submit_jobs([Sleep.spec([0.05], job_id=f"o{i}") for i in range(20)])
        wait_for(lambda: c.client.stats()["by_status"]["succeeded"] >= 2, what="busy")
        victim.kill()
        wait_for(lambda: gone(pool), timeout=10, what="the dead worker's pool processes exit")
        # nor elric's temp folder: the fork server's empty one piled up, one per killed
        # worker (multiprocessing's own pymp-* is its to clean, at a clean exit)
        assert [f for f in os.listdir(tmp.name) if f.startswith("elric")] == []
    finally:
        reap(pool)
        tmp.cleanup()


# --- 2. heartbeats: a job three times longer than the lease runs once ----------------------

def test_long_job_with_heartbeats_runs_once(make_cluster, tmp_path):
    c = make_cluster(LEASE_SECONDS=2)
    c.start_master()
    marks = tmp_path / "runs.txt"
    c.start_worker("--concurrency", "1")
    c.client.submit_job(MarkSleep.spec([str(marks), 6.5], job_id="long"))
    wait_for(lambda: lines(marks), what="the long job started")
    c.start_worker("--concurrency", "1")  # idle, and would take the job if its lease lapsed
    job = c.wait_job("long", timeout=60)
    assert job["status"] == "succeeded", (job["error"], c.logs())
    assert job["attempts"] == 1
    assert lines(marks) == ["long"]
    assert job["duration"] >= 6
    assert c.client.stats()["totals"]["redelivered"] == 0


# --- 3. timeouts: SIGALRM first, a hard kill for a job that ignores it ----------------------

def test_job_timeout_fails_the_job_and_the_worker_goes_on(make_cluster):
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    worker = c.start_worker("--concurrency", "1")
    c.client.submit_job(Sleep.spec([10], job_id="slow", timeout=1))
    job = c.wait_job("slow", timeout=30)
    assert job["status"] == "failed", c.logs()
    assert "JobTimeout" in job["error"] and "1s" in job["error"], job["error"]
    assert job["attempts"] == 1 and job["duration"] < 10
    c.client.submit_job(Add.spec([2, 3], job_id="next"))
    job = c.wait_job("next")
    assert (job["status"], job["result"]) == ("succeeded", 5), c.logs()
    assert worker.alive() and worker_pid(job) == worker.pid


def test_job_ignoring_its_alarm_is_killed_after_the_grace(make_cluster, tmp_path):
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    worker = c.start_worker("--concurrency", "1")
    marks = tmp_path / "stuck.txt"
    c.client.submit_job(IgnoreAlarm.spec([60, str(marks)], job_id="stuck", timeout=1))
    wait_for(lambda: lines(marks), what="the stuck job started")
    started = time.monotonic()
    job = c.wait_job("stuck", timeout=40)
    assert time.monotonic() - started >= 5  # timeout 1 s + 5 s of grace, not sooner
    assert job["status"] == "failed", c.logs()
    assert job["result"] is None
    assert "JobTimeout" in job["error"] and "killed" in job["error"], job["error"]
    # it ran until its process was killed: no duration of 0 (shown as none) in its record
    assert job["duration"] is not None and job["duration"] >= 5, job["duration"]
    assert "ignored its timeout" in worker.log()
    c.client.submit_job(Add.spec([4, 5], job_id="after"))
    job = c.wait_job("after")
    assert (job["status"], job["result"]) == ("succeeded", 9), c.logs()
    assert worker.alive() and worker_pid(job) == worker.pid


@pytest.mark.parametrize("culprit", ["ignores its timeout", "crashes"])
def test_the_jobs_running_beside_a_killed_one_are_spared(make_cluster, tmp_path, culprit):
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    worker = c.start_worker("--concurrency", "2")
    marks = tmp_path / "innocent.txt"
    c.client.submit_job(MarkSleep.spec([str(marks), 10], job_id="innocent"))
    wait_for(lambda: lines(marks), what="the innocent job started")
    if culprit == "crashes":
        c.client.submit_job(Crash.spec([], job_id="culprit"))
    else:
        c.client.submit_job(IgnoreAlarm.spec([60], job_id="culprit", timeout=1))
    assert c.wait_job("culprit", timeout=40)["status"] == "failed"
    job = c.wait_job("innocent", timeout=40)
    assert job["status"] == "succeeded", c.logs()
    assert worker.alive()
    assert lines(marks) == ["innocent"], "the innocent job was killed and run again"


# --- 4. a job that kills its own process ---------------------------------------------------

def test_crashing_job_fails_alone_and_the_worker_survives(make_cluster, tmp_path):
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    worker = c.start_worker("--concurrency", "2")
    marks = tmp_path / "marks.txt"
    specs = [Mark.spec([str(marks)], job_id=f"ok{i:02d}") for i in range(15)]
    specs.append(Crash.spec([], job_id="crash", max_retries=0))
    specs += [Mark.spec([str(marks)], job_id=f"ok{i:02d}") for i in range(15, 30)]
    c.client.submit_jobs(specs)
    job = c.wait_job("crash")
    assert job["status"] == "failed", c.logs()
    assert "process died" in job["error"], job["error"]
    assert job["attempts"] == 1
    for i in range(30):
        ok = c.wait_job(f"ok{i:02d}")
        assert ok["status"] == "succeeded", (ok["error"], c.logs())
    assert set(lines(marks)) == {f"ok{i:02d}" for i in range(30)}
    assert worker.alive(), worker.log()
    c.client.submit_job(Add.spec([1, 1], job_id="later"))
    assert c.wait_job("later")["result"] == 2
    stats = c.client.stats()
    assert stats["totals"]["failed"] == 1 and stats["totals"]["redelivered"] == 0


def test_what_a_job_printed_before_its_process_died_is_in_the_worker_log(cluster):
    """A pool process's stdout was block-buffered when the worker's output went to a file or
    a pipe (a service's log): the lines a job printed before a crash, or before a kill past
    its timeout, were lost with the process, just when they would tell what happened."""
    cluster.env.pop("PYTHONUNBUFFERED", None)   # as a service runs: not set
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(SayThenCrash.spec(["step 3 of 5: parsing"], job_id="says"))
    assert cluster.wait_job("says")["status"] == "failed"
    wait_for(lambda: "step 3 of 5: parsing" in worker.log(), timeout=5,
             what="the job's line in the worker log")
    assert worker.alive()


def test_crashing_job_with_a_retry_is_retried_then_failed(make_cluster):
    c = make_cluster(LEASE_SECONDS=3, RETRY_BACKOFF=0.8)
    c.start_master()
    worker = c.start_worker("--concurrency", "2")
    c.client.submit_job(Crash.spec([], job_id="crash2", max_retries=1))
    job, seen = watch(c.client, "crash2")
    assert job["status"] == "failed", c.logs()
    assert "retrying" in seen, seen
    assert job["attempts"] == 2
    err = job["error"]
    assert "--- attempt 1 ---" in err and "--- attempt 2 ---" in err, err
    assert err.count("process died") == 2, err
    assert worker.alive(), worker.log()


# --- 5. retries with backoff, the failed registry, rerun ------------------------------------

def test_retries_then_success_and_failed_registry_and_rerun(make_cluster, tmp_path):
    c = make_cluster(LEASE_SECONDS=3, RETRY_BACKOFF=0.6)
    c.start_master()
    c.start_worker("--concurrency", "2")
    runs = tmp_path / "flaky.txt"
    c.client.submit_job(Flaky.spec([str(runs), 2], job_id="flaky", max_retries=2))
    job, seen = watch(c.client, "flaky")
    assert job["status"] == "succeeded", (job["error"], c.logs())
    assert job["attempts"] == 3 and job["result"] == {"runs": 3, "attempt": 3}
    assert "retrying" in seen, seen
    assert count_lines(runs) == 3

    missing = tmp_path / "fixed.txt"
    c.client.submit_job(FailUnlessFile.spec([str(missing)], job_id="doomed", max_retries=2))
    job, seen = watch(c.client, "doomed")
    assert job["status"] == "failed"
    assert "retrying" in seen, seen
    assert job["attempts"] == 3
    err = job["error"]
    for attempt in (1, 2, 3):
        assert f"--- attempt {attempt} ---" in err, err
    assert err.count("Traceback (most recent call last)") == 3, err
    assert err.count("\nFileNotFoundError: ") == 3, err
    failed = c.client.list_jobs(status="failed")
    assert [j["job_id"] for j in failed] == ["doomed"]

    missing.write_text("here\n")
    assert c.client.rerun_job("doomed") == {"job_id": "doomed", "status": "queued"}
    job = c.wait_job("doomed")
    assert (job["status"], job["result"], job["attempts"]) == ("succeeded", "found", 1)
    assert c.client.list_jobs(status="failed") == []


# --- 6. SIGTERM gives prefetched jobs back at once; SHUTDOWN_GRACE bounds the wait ----------

def test_sigterm_requeues_prefetched_jobs_before_the_running_one_ends(make_cluster, tmp_path):
    c = make_cluster()  # 30 s leases: nothing below can be a lease running out
    c.start_master()
    marks = tmp_path / "runs.txt"
    worker = c.start_worker("--concurrency", "1")
    c.client.submit_jobs([MarkSleep.spec([str(marks), 6], job_id=f"p{i}") for i in range(3)])
    wait_for(lambda: lines(marks), what="the first job started")
    first = lines(marks)[0]
    wait_for(lambda: len([j for j in c.client.list_jobs(status="running")
                          if worker_pid(j) == worker.pid]) == 2,
             what="one job running and one prefetched")
    prefetched = [j["job_id"] for j in c.client.list_jobs(status="running")
                  if j["job_id"] != first]
    assert len(prefetched) == 1
    worker.signal(signal.SIGTERM)
    wait_for(lambda: c.client.get_job(prefetched[0])["status"] == "queued", timeout=5,
             what="the prefetched job back in line")
    # ... while the running job is still running
    assert c.client.get_job(first)["status"] == "running"
    assert lines(marks) == [first]
    assert worker.wait(timeout=40) == 0, worker.log()
    done = c.client.get_job(first)
    assert done["status"] == "succeeded" and done["attempts"] == 1
    for job_id in {"p0", "p1", "p2"} - {first}:
        job = c.client.get_job(job_id)
        assert (job["status"], job["attempts"], job["worker"]) == ("queued", 0, None), job
    assert lines(marks) == [first]
    assert c.client.stats()["totals"]["redelivered"] == 0


def test_sigterm_past_shutdown_grace_returns_the_running_job(make_cluster, tmp_path):
    marks = tmp_path / "runs.txt"
    with one_worker(make_cluster, 1, SHUTDOWN_GRACE=1) as (c, worker, pool):
        c.client.submit_job(MarkSleep.spec([str(marks), 120], job_id="endless"))
        wait_for(lambda: lines(marks), what="the job started")
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=40) == 0, worker.log()
        job = c.client.get_job("endless")
        assert (job["status"], job["attempts"]) == ("queued", 0), job
        assert "still running after SHUTDOWN_GRACE" in worker.log()
        wait_for(lambda: gone(pool), timeout=20, what="the pool processes exit")
    c.start_worker("--concurrency", "1")
    wait_for(lambda: len(lines(marks)) == 2, timeout=30, what="another worker ran it again")


def test_jobs_whose_process_died_in_shutdown_grace_go_back_at_once(make_cluster, tmp_path):
    """A stopping worker's pool process died in SHUTDOWN_GRACE with two jobs (a crash in
    native code, the OOM killer): run one by one no more, they waited unstarted, held and
    renewed, until the worker's other running job ended or the grace ran out. They go back
    to the queue at once, as prefetched jobs do."""
    marks, crash, end = tmp_path / "runs.txt", tmp_path / "crash", tmp_path / "end"
    with one_worker(make_cluster, 2, SHUTDOWN_GRACE=600) as (c, worker, pool):
        c.client.submit_job(MarkUntilGate.spec([str(marks), str(end)], job_id="long"))
        wait_for(lambda: lines(marks) == ["long"], what="the long job started")
        # (the second joins the first in the other process once it told they are async)
        c.client.submit_jobs([AsyncCrashAtGate.spec([str(marks), str(crash)], job_id=j)
                              for j in ("a", "b")])
        wait_for(lambda: sorted(lines(marks)) == ["a", "b", "long"], what="all three started")
        worker.signal(signal.SIGTERM)
        wait_for(lambda: "running jobs may finish" in worker.log(), what="the worker stopping")
        crash.touch()
        wait_for(lambda: statuses(c.redis_url, ["a", "b"]) == {"a": "queued", "b": "queued"},
                 what="the jobs of the process that died back in line")
        assert c.client.get_job("long")["status"] == "running"
        end.touch()
        assert worker.wait(timeout=60) == 0, worker.log()
        for job_id in ("a", "b"):
            job = c.client.get_job(job_id)
            assert (job["status"], job["attempts"], job["worker"]) == ("queued", 0, None), job
        assert c.client.get_job("long")["status"] == "succeeded"


def test_a_stop_whose_give_back_redis_refuses_lets_the_running_job_finish(make_cluster,
                                                                         tmp_path):
    """A prefetched job's hash was overwritten with a string (an operator's mistake): at a
    SIGTERM, Redis refused to give the jobs back (WRONGTYPE), and the stop ended there. The
    running job was neither waited for nor recorded, its pool process went on, and the
    worker never exited: its job's lease ran out and it ran a second time elsewhere. The
    stop goes on; the overwritten key is named and passed over (release.lua)."""
    marks, end = tmp_path / "runs.txt", tmp_path / "end"
    with one_worker(make_cluster, 1, SHUTDOWN_GRACE=600) as (c, worker, pool):
        c.client.submit_jobs([MarkUntilGate.spec([str(marks), str(end)], job_id="long"),
                              Add.spec([1, 2], job_id="held")])
        wait_for(lambda: lines(marks) == ["long"], what="the long job started")
        wait_for(lambda: statuses(c.redis_url, ["held"]) == {"held": "running"},
                 what="the other job prefetched")
        r = redis.Redis.from_url(c.redis_url)
        try:
            r.delete(KEYS.job("held"))
            r.set(KEYS.job("held"), "overwritten")
        finally:
            r.close()
        worker.signal(signal.SIGTERM)
        wait_for(lambda: f"passed over, left as they are: {KEYS.job('held')}" in worker.log(),
                 what="the overwritten job named")
        end.touch()
        assert worker.wait(timeout=60) == 0, worker.log()
        job = c.client.get_job("long")
        assert (job["status"], job["attempts"]) == ("succeeded", 1), job
        assert lines(marks) == ["long"]


def test_a_second_ctrl_c_stops_the_running_jobs_now_and_returns_them(make_cluster, tmp_path):
    """A user at a terminal who presses Ctrl-C twice is not kept waiting SHUTDOWN_GRACE
    (the second was ignored); the running job goes back to the queue with no attempt used."""
    marks = tmp_path / "runs.txt"
    with one_worker(make_cluster, 2, SHUTDOWN_GRACE=600) as (c, worker, pool):
        c.client.submit_jobs([MarkSleep.spec([str(marks), 120], job_id="endless"),
                              MarkSleep.spec([str(marks), 0], job_id="quick")])
        wait_for(lambda: len(lines(marks)) == 2, what="both jobs started")
        wait_for(lambda: c.client.get_job("quick")["status"] == "succeeded", what="quick done")
        worker.signal(signal.SIGINT)
        wait_for(lambda: "Ctrl-C again" in worker.log(), what="the worker says it stops")
        assert worker.alive()
        worker.signal(signal.SIGINT)
        assert worker.wait(timeout=60) == 0, worker.log()
        job = c.client.get_job("endless")
        assert (job["status"], job["attempts"]) == ("queued", 0), job
        assert c.client.get_job("quick")["attempts"] == 1
        assert "still running at a second Ctrl-C" in worker.log()
        wait_for(lambda: gone(pool), timeout=20, what="the pool processes exit")


def test_sigterm_while_redis_is_away_stops_the_worker_and_loses_no_job(tmp_path):
    """A stopping worker gives back its prefetched jobs, then those still running past
    SHUTDOWN_GRACE. With Redis away it retried that for as long as Redis stayed away: a
    SIGTERM did not stop it. It gives up after a few seconds; the jobs' leases run out and
    they are redelivered once Redis is back."""
    server = RedisServer(appendonly=True).start()   # ours alone: it is stopped
    c = Cluster(server.url, tmp_path, SHUTDOWN_GRACE=1, LEASE_SECONDS=3)
    marks, gate, pool = tmp_path / "runs.txt", tmp_path / "gate", []
    try:
        c.start_master()
        worker = c.start_worker("--concurrency", "1")
        pool = descendants(worker.pid)
        # the jobs run until the gate opens, once the worker is gone: the first outlasts
        # SHUTDOWN_GRACE however slow the machine, and the redelivered runs end at once
        c.client.submit_jobs([MarkUntilGate.spec([str(marks), str(gate)], job_id=f"p{i}")
                              for i in range(3)])
        wait_for(lambda: lines(marks), what="the first job started")
        wait_for(lambda: len([j for j in c.client.list_jobs(status="running")
                              if worker_pid(j) == worker.pid]) == 2,
                 what="one job running and one prefetched")
        server.stop()
        worker.signal(signal.SIGTERM)
        try:
            # SHUTDOWN_GRACE + the bound config.py states (before: until Redis came back,
            # then ~13 s: the give-back tries came before the grace and after it)
            code = worker.wait(timeout=1 + 10)
        except subprocess.TimeoutExpired:
            raise AssertionError("the worker did not stop in time:\n" + worker.log()) from None
        # the running job is stopped when the grace ends, counted from the SIGTERM (the
        # give-back tries no longer come first, outlasting it), and given back: in vain
        assert code == 0, worker.log()
        assert "still running after SHUTDOWN_GRACE" in worker.log()
        assert "could not give" in worker.log()
        wait_for(lambda: gone(pool), timeout=20, what="the pool processes exit")
        gate.touch()
        server.start()
        c.start_worker("--concurrency", "3")
        for i in range(3):
            job = c.wait_job(f"p{i}", timeout=60)
            assert job["status"] == "succeeded", job
    finally:
        reap(pool)
        c.close()
        server.cleanup()


def test_a_master_says_when_redis_comes_back_without_its_data(tmp_path):
    """Redis restarted without persistence: the queued job was gone, and nothing said so
    (a worker holding jobs logged only that it had been 'paused or cut off')."""
    server = RedisServer(appendonly=False).start()   # ours alone: it is restarted empty
    c = Cluster(server.url, tmp_path)
    try:
        master = c.start_master()
        c.client.submit_job(Add.spec([1, 2], job_id="before"))
        # housekeeping has seen elric's data (its passes are at least once a second)
        wait_for(lambda: redis.Redis.from_url(server.url).exists(Keys("elric").data_since),
                 what="the data marked")
        assert "lost elric's data" not in master.log(), master.log()
        server.stop(kill=True)
        server.start()
        wait_for(lambda: "lost elric's data" in master.log(), what="the loss said")
        assert ("Redis lost elric's data (restarted without persistence, flushed, or its keys "
                "evicted): jobs, results and periodic jobs from before are gone; run Redis "
                "with appendonly yes and maxmemory-policy noeviction") in master.log()
        assert c.client.get_job("before") is None
    finally:
        c.close()
        server.cleanup()


def test_a_master_says_when_redis_comes_back_from_an_older_snapshot(tmp_path):
    """Redis restarted from an RDB snapshot older than its last writes: a job accepted after
    the snapshot was gone, and nothing said so, since the snapshot still held the
    data_since marker. The master notes a counter it raises each pass; Redis holding less
    than it last wrote is data gone back in time."""
    server = RedisServer(appendonly=False).start()   # ours alone: it is restarted
    c = Cluster(server.url, tmp_path)
    r = redis.Redis.from_url(server.url)
    try:
        master = c.start_master()
        c.client.submit_job(Add.spec([1, 2], job_id="before"))
        wait_for(lambda: r.exists(Keys("elric").data_since), what="the data marked")
        r.save()                                          # the older snapshot
        assert c.client.submit_job(Add.spec([3, 4], job_id="after"))["status"] == "queued"
        saved_at = time.time()
        wait_for(lambda: (c.client.health()["tasks"]["housekeeping"]["progress_at"] or 0)
                 > saved_at, what="a housekeeping pass after the snapshot")
        r.close()
        server.stop(kill=True)                             # no save at exit: the snapshot
        server.start()
        wait_for(lambda: "older data" in master.log(), what="the rollback said")
        assert "lost elric's data" not in master.log()
        assert c.client.get_job("before") is not None
        assert c.client.get_job("after") is None           # what the message warns of
    finally:
        r.close()
        c.close()
        server.cleanup()


def test_a_job_running_through_a_redis_outage_past_its_lease_is_not_run_again(tmp_path):
    """Redis away past a job's lease: neither its worker's heartbeat nor the master's
    redelivery could reach it, and the lease ran out. When Redis came back, whichever came
    first won: the master's first pass took the job away from its live worker and it ran
    twice. After a gap, housekeeping gives workers a heartbeat's time to renew first."""
    server = RedisServer(appendonly=True).start()   # ours alone: it is stopped
    c = Cluster(server.url, tmp_path, LEASE_SECONDS=2)
    marks = tmp_path / "runs.txt"
    r = redis.Redis.from_url(server.url)
    try:
        master = c.start_master()
        worker = c.start_worker("--concurrency", "1")
        c.client.submit_job(MarkSleep.spec([str(marks), 6], job_id="long"))
        wait_for(lambda: lines(marks), what="the job started")
        lease_end = r.zscore(KEYS.inflight, "long") / 1000
        r.close()
        server.stop()
        worker.signal(signal.SIGSTOP)   # the race's worst order: the master comes back first
        try:
            wait_for(lambda: time.time() > lease_end + 1, what="the lease run out")
            server.start()
            wait_for(lambda: "housekeeping failed: works again" in master.log(),
                     what="the master's first pass with Redis back")
        finally:
            worker.signal(signal.SIGCONT)
        assert c.wait_job("long")["status"] == "succeeded", c.logs()
        assert lines(marks) == ["long"], c.logs()   # it ran once
        assert c.client.get_job("long")["attempts"] == 1, c.logs()
    finally:
        c.close()
        server.cleanup()


def test_a_step_failing_every_pass_does_not_hold_redelivery_for_good(make_cluster, tmp_path):
    """A key of another type (an operator's) fails a housekeeping step at every pass, and
    the loop backs off up to 5 s between passes: that gap, taken for Redis away, held
    redelivery again at every pass, so a dead worker's job stayed running for good."""
    # SHUTDOWN_GRACE: at teardown the second worker still runs the 30 s job; the default 30 s
    # grace had the fixture wait out its 20 s stop timeout, then SIGKILL the worker
    c = make_cluster(LEASE_SECONDS=2, SHUTDOWN_GRACE=1)
    r = redis.Redis.from_url(c.redis_url)
    r.set(KEYS.dedupe_rounds, "not a zset")   # dropping old rounds fails each pass
    r.close()
    marks = tmp_path / "runs.txt"
    master = c.start_master()
    victim = c.start_worker("--concurrency", "1")
    pool = descendants(victim.pid)

    def passes():   # every pass ends with _check_data, which counts it in data_epoch
        with redis.Redis.from_url(c.redis_url) as rc:
            return int(rc.get(KEYS.data_epoch) or 0)
    try:
        c.client.submit_job(MarkSleep.spec([str(marks), 30], job_id="held"))
        wait_for(lambda: lines(marks), what="the job started")
        # five failed passes: backing off 0.5, 1, 2, then 4 s, the fifth came 4 s after the
        # fourth, a gap past the lease
        first = passes()
        wait_for(lambda: passes() >= first + 5, timeout=30, what="five failed passes")
        victim.kill()
        assert "WRONGTYPE" in master.log(), c.logs()
        c.start_worker("--concurrency", "1")
        wait_for(lambda: len(lines(marks)) == 2, timeout=30, what="the job redelivered")
        assert c.client.get_job("held")["attempts"] == 2, c.logs()
    finally:
        reap(pool)


# --- 7. Redis stopped and started again under load ----------------------------------------

class Submitter(threading.Thread):
    """Submits a job every few milliseconds until stopped; records every outcome."""

    def __init__(self, address: str) -> None:
        super().__init__(daemon=True)
        self.client = MasterClient(address, timeout=20)
        self.stop = threading.Event()
        self.accepted: list[str] = []
        self.errors: list[tuple[float, str, str]] = []
        self.lock = threading.Lock()

    def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            job_id = f"o{i:05d}"
            i += 1
            try:
                reply = self.client.submit_job(Add.spec([i, i], job_id=job_id))
            except RPCError as exc:
                with self.lock:
                    self.errors.append((time.monotonic(), type(exc).__name__, str(exc)))
            else:
                with self.lock:
                    if reply == {"job_id": job_id, "status": "queued"}:
                        self.accepted.append(job_id)
                    else:
                        self.errors.append((time.monotonic(), "reply", repr(reply)))
            self.stop.wait(0.02)  # pacing, not a wait for anything
        self.client.close()


def test_a_job_of_unreadable_fields_fails_alone(cluster, redis_url):
    """A field elric does not write in a queued job's hash (an operator's HSET, a bad
    restore) failed the fetch that claimed it and the worker exited; the job went to the
    next worker when its lease ran out and stopped it too. Now that job alone fails, for
    good and once, naming the field; the others run, the worker stays up, and get_job
    shows the job instead of an internal error (a job's key of another type is passed
    over by the fetch, named in the log)."""
    bad = {"max_retries": "abc", "timeout": "soon", "attempts": "x", "enqueued_at": "1.5e9"}
    specs = []
    for i, field in enumerate([*bad, "func", "type"]):   # among good jobs, fetched with them
        specs += [Add.spec([i, 1], job_id=f"good-{i}"), Add.spec([i, 2], job_id=f"bad-{field}")]
    cluster.client.submit_jobs(specs)
    with redis.Redis.from_url(redis_url) as r:
        for field, value in bad.items():
            r.hset(KEYS.job(f"bad-{field}"), field, value)
        r.hdel(KEYS.job("bad-func"), "func")
        r.delete(KEYS.job("bad-type"))
        r.set(KEYS.job("bad-type"), "a string")
    shown = cluster.client.get_job("bad-max_retries")
    assert shown["status"] == "queued" and shown["max_retries"] is None, shown
    assert "max_retries 'abc'" in shown["unreadable"], shown

    worker = cluster.start_worker("--concurrency", "2")
    for i in range(len(specs) // 2):
        job = cluster.wait_job(f"good-{i}")
        assert (job["status"], job["result"]) == ("succeeded", i + 1), cluster.logs()
    for field, value in [*bad.items(), ("func", None)]:
        job = cluster.wait_job(f"bad-{field}")
        assert job["status"] == "failed" and job["attempts"] == 1, (job, cluster.logs())
        assert f"{field} '{value}'" in job["error"] if value else "no func" in job["error"]
    assert worker.alive(), worker.log()
    totals = cluster.client.stats()["totals"]
    assert (totals["succeeded"], totals["failed"]) == (len(specs) // 2, len(bad) + 1), totals
    assert "another type" in worker.log() and KEYS.job("bad-type") in worker.log()



def test_a_limit_interval_edited_past_what_redis_takes_does_not_stop_the_worker(cluster,
                                                                              redis_url):
    """A queued job's limit_interval set by hand past what a submit allows (1e999, 1e14)
    became a PX that Redis refuses: every fetch that met the job failed and its worker
    exited, then the next one. Such an interval is ignored, as one that is no number is;
    so is one of LIMITS's edited so (ms in the limits hash)."""
    specs = [{**Add.spec([1, 1], job_id=f"far-{i}"), "limit_key": "far", "limit_interval": 1}
             for i in range(2)]
    ruled = {**Add.spec([3, 3], job_id="ruled"), "limit_key": "ruled"}
    cluster.client.submit_jobs([*specs, ruled, Add.spec([2, 2], job_id="plain")])
    with redis.Redis.from_url(redis_url) as r:
        r.hset(KEYS.job("far-0"), "limit_interval", "1e999")
        r.hset(KEYS.job("far-1"), "limit_interval", "1e14")
        r.hset(KEYS.limits, "ruled", ",99999999999999999999")
    worker = cluster.start_worker("--concurrency", "2")
    for job_id in ("far-0", "far-1", "ruled", "plain"):
        wait_for(lambda: not worker.alive() or
                 cluster.client.get_job(job_id)["status"] == "succeeded",
                 what=f"{job_id} run, or the worker gone")
        assert worker.alive(), worker.log()


@pytest.mark.parametrize("key", [KEYS.limit_next, KEYS.limit_hold])
def test_a_limit_keys_time_overwritten_with_no_number_does_not_stop_the_worker(cluster,
                                                                             redis_url, key):
    """A limit key's next start or hold (a string of ms) SET by hand to no number failed
    every fetch that met one of its jobs with a Lua error (and the hold, the record of a
    failure that asks to wait): each worker exited on it in turn. It reads as none."""
    cluster.client.submit_jobs([
        {**Add.spec([1, 1], job_id="spaced"), "limit_key": "host", "limit_interval": 1},
        {**FailAskingToWait.spec(job_id="asks"), "limit_key": "host"},
        Add.spec([2, 2], job_id="plain")])
    with redis.Redis.from_url(redis_url) as r:
        r.set(key("host"), "soon")
    worker = cluster.start_worker()
    for job_id, status in (("spaced", "succeeded"), ("asks", "failed"),
                           ("plain", "succeeded")):
        wait_for(lambda: not worker.alive() or
                 cluster.client.get_job(job_id)["status"] == status,
                 what=f"{job_id} {status}, or the worker gone")
        assert worker.alive(), worker.log()


@pytest.mark.parametrize("key", [KEYS.workers, KEYS.inflight])
def test_a_worker_whose_workers_or_leases_key_an_operator_overwrote_hears_a_cancel(
        cluster, redis_url, key):
    """The workers index (or inflight) SET to a string failed every heartbeat: the worker
    ran on, but heard no cancel, pause or stop, and dropped no lost claim, for good. The
    heartbeat now passes over that key, named, and does the rest."""
    worker = cluster.start_worker()
    cluster.client.submit_job(Sleep.spec([60], job_id="long"))
    wait_for(lambda: cluster.client.get_job("long")["status"] == "running",
             what="the job running")
    with redis.Redis.from_url(redis_url) as r:
        r.delete(key)
        r.set(key, "overwritten")
    assert cluster.client.cancel_job("long")["status"] == "cancelling"
    wait_for(lambda: cluster.client.get_job("long")["status"] == "cancelled", timeout=20,
             what="the running job cancelled")
    assert worker.alive(), worker.log()
    wait_for(lambda: key in worker.log(), what="the key named")

def test_redis_outage_under_load_master_and_worker_carry_on(tmp_path):
    outage = float(os.environ.get("ELRICTEST_REDIS_OUTAGE", "5"))
    server = RedisServer(appendonly=True).start()
    c = Cluster(server.url, tmp_path, LEASE_SECONDS=3)
    submitter = None
    try:
        master = c.start_master()
        worker = c.start_worker("--concurrency", "2")
        submitter = Submitter(c.address)
        submitter.start()
        wait_for(lambda: c.client.stats()["by_status"]["succeeded"] >= 20, timeout=30,
                 what="jobs flowing")
        server.stop()
        down = time.monotonic()
        wait_for(lambda: any(t > down for t, _, _ in submitter.errors), timeout=30,
                 what="a submission refused during the outage")
        # the outage itself: its length is what is tested, not a wait for something
        wait_for(lambda: time.monotonic() - down >= outage, timeout=outage + 30,
                 interval=0.1, what="the end of the outage")
        with submitter.lock:
            refused = len(submitter.errors)
        server.start()
        with submitter.lock:
            before = len(submitter.accepted)
        wait_for(lambda: len(submitter.accepted) >= before + 20, timeout=60,
                 what="submissions accepted again")
        submitter.stop.set()
        submitter.join(30)
        accepted = list(submitter.accepted)

        def all_done():
            st = statuses(server.url, accepted)
            return all(s == "succeeded" for s in st.values())

        wait_for(all_done, timeout=90, interval=0.2, what="every accepted job succeeded")
        r = redis.Redis.from_url(server.url)
        try:
            for job_id in accepted[:: max(1, len(accepted) // 50)]:
                i = int(job_id[1:]) + 1
                assert msgpack.unpackb(r.hget(KEYS.job(job_id), "result")) == 2 * i
        finally:
            r.close()
        assert master.alive() and worker.alive(), c.logs()
        errors = submitter.errors
        assert refused >= 1 and errors, "no submission was refused during the outage"
        for _, kind, message in errors:
            assert kind == "RemoteError", (kind, message)  # an answer, not a timeout or a drop
            # Redis away, or back and still loading its data (a submit may meet either)
            assert message.startswith(("master cannot reach Redis right now",
                                       "Redis is loading its data")), message
        assert "Redis unreachable" in worker.log()
        assert "Redis unreachable" in master.log()
    finally:
        if submitter is not None:
            submitter.stop.set()
            submitter.join(30)
        c.close()
        server.cleanup()


# --- 8. the master SIGKILLed and started again -------------------------------------------

def test_master_sigkill_and_restart_loses_nothing_and_submit_is_idempotent(make_cluster,
                                                                            redis_url, tmp_path):
    c = make_cluster(LEASE_SECONDS=3)
    master = c.start_master()
    marks = tmp_path / "runs.txt"
    n = 30
    ids = [f"m{i:02d}" for i in range(n)]
    c.client.submit_jobs([Mark.spec([str(marks)], job_id=j) for j in ids])
    master.kill()
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.zcard(KEYS.queue("default")) == n
        assert set(statuses(redis_url, ids).values()) == {"queued"}
        host, port = c.address.rsplit(":", 1)
        with Client(host, int(port), timeout=10) as client:
            with pytest.raises(RPCConnectionError) as info:
                client.call("submit_job", Mark.spec([str(marks)], job_id="m05"))
        assert not isinstance(info.value, RPCTimeoutError), info.value
        assert f"cannot reach elric master at {c.address}" in str(info.value)
        c.client.close()  # its connection died with the master

        c.start_master()
        assert c.client.submit_job(Mark.spec([str(marks)], job_id="m05")) == {
            "job_id": "m05", "status": "queued"}
        again = c.client.submit_jobs([Mark.spec([str(marks)], job_id=j) for j in ids])
        assert [a["status"] for a in again] == ["queued"] * n
        assert r.zcard(KEYS.queue("default")) == n
        assert c.client.stats()["totals"]["submitted"] == n
        c.start_worker("--concurrency", "2")
        wait_for(lambda: c.client.stats()["by_status"]["succeeded"] == n, timeout=60,
                 what="all jobs ran")
        assert sorted(lines(marks)) == ids  # each exactly once
        assert c.client.submit_job(Mark.spec([str(marks)], job_id="m05")) == {
            "job_id": "m05", "status": "succeeded"}
        assert r.zcard(KEYS.queue("default")) == 0  # nothing was queued by it
        assert c.client.get_job("m05")["attempts"] == 1
    finally:
        r.close()


# --- 9. RPC_TOKEN -------------------------------------------------------------------------

def raw_call(port: int, frames: list) -> list:
    """Send frames on a fresh socket; return what came back before the server closed it."""
    unpacker = msgpack.Unpacker(raw=False)
    got = []
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        for frame in frames:
            s.sendall(msgpack.packb(frame))
        while True:
            data = s.recv(65536)  # a timeout here (socket.timeout) means it stayed open
            if not data:
                return got
            unpacker.feed(data)
            got.extend(unpacker)


def test_rpc_token(make_cluster, tmp_path):
    token = "s3cret-token"
    c = make_cluster(RPC_TOKEN=token, LEASE_SECONDS=3)
    c.start_master()
    c._client = MasterClient(c.address, token=token)
    host, port = c.address.rsplit(":", 1)
    port = int(port)

    with Client(host, port, timeout=10) as anon:
        with pytest.raises(RemoteError, match=f"^{re.escape(AUTH_REQUIRED)}$"):
            anon.call("submit_job", Add.spec([1, 2], job_id="sneaky"))
    with Client(host, port, timeout=10, token="wrong") as wrong:
        with pytest.raises(RemoteError, match=f"^{re.escape(AUTH_FAILED)}$"):
            wrong.call("ping")
    # the server answers once, then closes the connection (the recv sees EOF, no timeout)
    assert raw_call(port, [[0, 1, "submit_job", [Add.spec([1, 2], job_id="sneaky")]],
                           [0, 2, "ping", []]]) == [[1, 1, {"code": "unauthorized", "message": AUTH_REQUIRED}, None]]
    assert raw_call(port, [[0, 7, "auth", ["nope"]], [0, 8, "ping", []]]) == [
        [1, 7, {"code": "unauthorized", "message": AUTH_FAILED}, None]]
    assert c.client.get_job("sneaky") is None

    assert c.client.ping() == "pong"
    c.start_worker("--concurrency", "1")
    c.client.submit_job(Add.spec([20, 22], job_id="authed"))
    job = c.wait_job("authed")
    assert (job["status"], job["result"]) == ("succeeded", 42), c.logs()

    bad = subprocess.run([sys.executable, "-m", "elric", "worker"], cwd=ROOT,
                         env=dict(c.env, ELRIC_RPC_TOKEN="wrong"), capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == (
        f"elric: MASTER_ADDRESS {c.address}: {AUTH_FAILED}"), bad.stderr
    # it said "authentication required", and not what to set
    anon = subprocess.run([sys.executable, "-m", "elric", "ping"], cwd=ROOT,
                          env={k: v for k, v in c.env.items() if k != "ELRIC_RPC_TOKEN"},
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert (anon.returncode, anon.stderr) == (2, f"elric: {AUTH_REQUIRED}\n")
    assert "ELRIC_RPC_TOKEN" in AUTH_REQUIRED


def test_master_on_all_interfaces_without_token_warns_loudly(redis_url, tmp_path):
    port = free_port()
    env = elric_env(redis_url, f"0.0.0.0:{port}", LOG_LEVEL="INFO")
    env.pop("ELRIC_RPC_TOKEN", None)
    master = Proc(["master"], env, str(tmp_path / "master.log"), cwd=ROOT)
    try:
        wait_for_master(f"127.0.0.1:{port}", master)
        log = master.log()
        assert "without RPC_TOKEN" in log and "0.0.0.0" in log and "!!!" in log, log
    finally:
        assert master.stop(timeout=20) == 0


@pytest.mark.parametrize("host,token", [("127.0.0.1", None), ("0.0.0.0", "t0ken")])
def test_master_on_loopback_or_with_a_token_does_not_warn(redis_url, tmp_path, host, token):
    port = free_port()
    env = elric_env(redis_url, f"{host}:{port}", LOG_LEVEL="INFO", RPC_TOKEN=token)
    if token is None:
        env.pop("ELRIC_RPC_TOKEN")
    master = Proc(["master"], env, str(tmp_path / "master.log"), cwd=ROOT)
    try:
        wait_for_master(f"127.0.0.1:{port}", master, token=token)
        assert "listening on" in master.log()
        assert "without RPC_TOKEN" not in master.log(), master.log()
    finally:
        assert master.stop(timeout=20) == 0


# --- 10. Redis with a password ------------------------------------------------------------

class PasswordRedis:
    """A redis-server of this test's own with requirepass; stopped by its PID."""

    def __init__(self, password: str) -> None:
        self.password = password
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="elric-redis-pw-")
        self.proc = subprocess.Popen(
            [find_redis_server(), "--bind", "127.0.0.1", "--port", str(self.port),
             "--requirepass", password, "--save", "", "--appendonly", "no",
             "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning",
             "--logfile", os.path.join(self.dir, "redis.log")],
            stdin=subprocess.DEVNULL)

        def answers():
            assert self.proc.poll() is None, f"redis-server exited, see {self.dir}/redis.log"
            try:
                r = redis.Redis(host="127.0.0.1", port=self.port, password=password)
                try:
                    return r.ping()
                finally:
                    r.close()
            except redis.exceptions.ConnectionError:
                return False

        wait_for(answers, timeout=20, what="redis-server with a password")

    def url(self, password: str | None) -> str:
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def password_redis():
    server = PasswordRedis("pw-Zx81")
    yield server
    server.stop()


def run_elric(args, **elric) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELRIC_")}
    env.update({f"ELRIC_{k}": str(v) for k, v in elric.items()})
    return subprocess.run([sys.executable, "-m", "elric", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_redis_password_in_the_url(password_redis, tmp_path):
    c = Cluster(password_redis.url(password_redis.password), tmp_path, LEASE_SECONDS=3)
    try:
        c.start_master()
        c.start_worker("--concurrency", "1")
        c.client.submit_job(Add.spec([3, 4], job_id="pw"))
        job = c.wait_job("pw")
        assert (job["status"], job["result"]) == ("succeeded", 7), c.logs()
    finally:
        c.close()


def test_a_redis_password_changed_under_a_running_worker_is_named_not_unreachable(
        password_redis, tmp_path):
    """Redis's password changed (CONFIG SET requirepass, ACL) while a worker ran: each loop
    that opened a connection then said "Redis unreachable", sending an operator to the
    network. It names the password; the worker goes on when the password is back."""
    c = Cluster(password_redis.url(password_redis.password), tmp_path)
    r = redis.Redis(host="127.0.0.1", port=password_redis.port,
                    password=password_redis.password)
    try:
        c.start_master()
        worker = c.start_worker("--concurrency", "1")
        c.client.submit_job(Add.spec([3, 4], job_id="before"))
        assert c.wait_job("before")["result"] == 7
        r.config_set("requirepass", "rotated")
        r.client_kill_filter(_type="normal", skipme=True)   # new connections need it
        wait_for(lambda: "worker: heartbeat failed" in worker.log(), what="a heartbeat refused")
        failed = [line for line in worker.log().splitlines() if "username-password" in line]
        assert failed and all("REDIS_URL" in line and "password" in line
                              and "unreachable" not in line for line in failed), worker.log()
        r.config_set("requirepass", password_redis.password)
        wait_for(lambda: "worker: heartbeat failed: works again" in worker.log(),
                 what="the worker back")
        c.client.submit_job(Add.spec([1, 1], job_id="after"))
        assert c.wait_job("after")["result"] == 2, c.logs()
        assert worker.alive(), worker.log()
    finally:
        r.config_set("requirepass", password_redis.password)
        r.close()
        c.close()


@pytest.mark.parametrize("role", ["master", "worker"])
@pytest.mark.parametrize("password", ["wrong-pw", None])
def test_wrong_redis_password_exits_2_with_one_clear_line(password_redis, role, password):
    url = password_redis.url(password)
    modules = ["tests.jobs"] if role == "worker" else []
    proc = run_elric([role, *modules], REDIS_URL=url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines_ = proc.stderr.strip().splitlines()
    assert len(lines_) == 1 and proc.stdout == "", proc.stderr
    line = lines_[0]
    assert line.startswith("elric: REDIS_URL ") and "cannot connect" in line, line
    assert "Traceback" not in proc.stderr
    assert ("invalid" in line.lower() or "auth" in line.lower()), line


def test_an_unreadable_bloom_snapshot_stops_a_master_with_one_clear_line(redis_url):
    """It exited 1 with a traceback; the line that ended it says which key to delete."""
    r, keys = redis.Redis.from_url(redis_url), Keys("elric")
    r.set(keys.dedupe_bloom("global"), b"not a snapshot")
    r.hset(keys.dedupe_stats("global"), "backend", "bloom")
    r.zadd(keys.dedupe_scopes, {"global": "+inf"})
    r.close()
    proc = run_elric(["master"], REDIS_URL=redis_url, FILTER_BACKEND="bloom",
                     MASTER_ADDRESS=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("elric: FILTER_BACKEND bloom: ") and "delete that key" in last, last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("role", ["master"])  # a worker waits: tests/test_startup.py
def test_redis_password_is_not_echoed_in_errors(role, tmp_path):
    url = f"redis://:pw-Zx81@127.0.0.1:{free_port()}/0"  # nobody listens: cannot connect
    proc = run_elric([role], REDIS_URL=url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}")
    assert proc.returncode == 3, proc.stderr   # unreachable: try again
    assert "pw-Zx81" not in proc.stderr, proc.stderr


# --- 11. JOB_MODULES: refused at submit; a worker imports only its own job modules --------

def enqueue_raw(url: str, job_id: str, func: str, args: list, **fields) -> None:
    """Write a job into Redis as elric/lua/enqueue.lua does, bypassing the master."""
    r = redis.Redis.from_url(url)
    try:
        seq = r.incr(f"{KEYS.prefix}:seq")
        member = f"{seq:016x}:{job_id}"
        now = int(time.time() * 1000)
        r.hset(KEYS.job(job_id), mapping={
            "status": "queued", "queue": "default", "enqueued_at": now, "member": member,
            "func": func, "args": msgpack.packb(args), **fields})
        r.zadd(KEYS.queue("default"), {member: 0})
        r.sadd(KEYS.queues, "default")
        r.lpush(KEYS.wake("default"), "1")
    finally:
        r.close()


def test_job_modules_refuse_at_submit_and_a_worker_never_imports_what_a_job_names(
        make_cluster, redis_url, tmp_path):
    c = make_cluster(JOB_MODULES="tests.jobs", LEASE_SECONDS=3)
    c.start_master()
    proof = tmp_path / "pwned"
    refused = {
        "os:system": [f"touch {proof}"],
        "subprocess:call": [["touch", str(proof)]],
        "tests.jobs_faults:Touch": [str(proof)],
        "this:x": [],   # importing `this` prints the Zen of Python: importing runs code
    }
    for func, args in refused.items():
        with pytest.raises(RemoteError) as info:
            c.client.submit_job({"func": func, "args": args, "job_id": "x"})
        message = str(info.value)
        assert "not allowed by JOB_MODULES (tests.jobs)" in message, message
        assert func.split(":")[0] in message, message
    assert c.client.get_job("x") is None
    assert c.client.stats()["totals"]["submitted"] == 0

    # written into Redis by someone else: the worker hands them back, unrun, unimported
    for i, (func, args) in enumerate(refused.items()):
        enqueue_raw(redis_url, f"raw{i}", func, args)
    enqueue_raw(redis_url, "raw-ok", "tests.jobs:Add", [1, 2])
    worker = c.start_worker("--concurrency", "1")
    assert c.wait_job("raw-ok")["result"] == 3, c.logs()
    for i, func in enumerate(refused):
        job = wait_for(lambda: (lambda j: j if j.get("not_run") else None)(
            c.client.get_job(f"raw{i}")), what=f"raw{i} handed back")
        assert job["status"] in ("retrying", "queued") and job["attempts"] == 0, job
        assert f"does not load module {func.split(':')[0]!r}" in job["not_run"], job
        assert f"job raw{i}: does not load module" in worker.log()
    assert c.client.stats()["totals"]["handed_back"] >= len(refused)
    # claimed again after their wait: the start latency counts each job's first claim only
    wait_for(lambda: c.client.stats()["totals"]["handed_back"] >= 2 * len(refused),
             what="a second hand-back of each")
    assert c.client.stats()["totals"]["started"] == len(refused) + 1   # and raw-ok
    assert not proof.exists(), "a refused job ran"
    assert "Beautiful is better than ugly" not in worker.log(), "a job made it import `this`"
    assert worker.alive()


def test_a_job_module_not_found_says_where_to_start_the_worker(tmp_path, monkeypatch, caplog):
    """`elric worker jobs` from a folder without jobs.py logged "No module named 'jobs'...
    its jobs fail until it imports", as if it would retry: it says how it comes to import,
    and where to start when the module itself was not found."""
    from elric.loading import JobModules

    (tmp_path / "needs_more.py").write_text("import no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level("ERROR", logger="elric.worker"):
        modules = JobModules.load(["no_such_jobs", "no_such_pkg.jobs", "needs_more"])
        modules.log_broken()   # the worker's lines (when one module imports: else it exits 2)
    assert modules.clean() == []
    said = {r.args[0]: r.getMessage() for r in caplog.records}
    for name in ("no_such_jobs", "no_such_pkg.jobs"):
        assert "until it is started again where the module imports (from the folder that " \
               "holds it, or with that folder on PYTHONPATH)" in said[name], said[name]
    assert "No module named 'no_such_dependency'" in said["needs_more"]
    assert "PYTHONPATH" not in said["needs_more"]   # found; what it imports is missing


def test_a_job_module_that_defines_no_job_class_is_named_at_start(caplog):
    """`elric worker json`, or examples.crawler (its Crawl runs as elric.demo.crawler:Crawl),
    started a worker that ran none of their jobs, without a word."""
    from elric.loading import JobModules

    with caplog.at_level("WARNING", logger="elric.worker"):
        modules = JobModules.load(["json", "examples.crawler", "tests.jobs", "elric.demo"])
        modules.log_broken()
    said = {r.args[0]: r.getMessage() for r in caplog.records}
    assert set(said) == {"json", "examples.crawler"}, said   # a package: its submodules' count
    assert said["json"] == ("job module json defines no Job class, so this worker runs none "
                            "of its jobs (a class imported into it runs under its own "
                            "module's name: load that module)")


def test_a_worker_whose_job_classes_all_send_to_other_queues_says_so_at_start(caplog):
    """`elric worker elric.demo.crawler` without --queues crawl sat idle, without a word,
    while every Crawl job waited in queue crawl; a worker that takes one of its classes'
    queues says nothing (workers per queue, loading one module, are a normal setup)."""
    from elric.loading import JobModules

    modules = JobModules.load(["elric.demo.crawler"])
    with caplog.at_level("WARNING", logger="elric.worker"):
        modules.log_other_queues(["default"])
    assert [r.getMessage() for r in caplog.records] == [
        "this worker takes queue(s) default, and its Job classes send their jobs to crawl "
        "(Crawl): start it with --queues crawl, or their jobs wait for another worker"]
    caplog.clear()
    with caplog.at_level("WARNING", logger="elric.worker"):
        modules.log_other_queues(["default", "crawl"])
        JobModules.load(["tests.jobs"]).log_other_queues(["b"])   # OnQueueB's
    assert caplog.records == []


def test_a_rerun_is_refused_for_a_job_whose_module_job_modules_no_longer_allows(
        make_cluster):
    """A copy of such a job was refused, but a rerun queued it: every worker (each loading
    JOB_MODULES) then handed it back, every few seconds, for good."""
    from tests.test_cli import elric

    c = make_cluster(JOB_MODULES="tests.jobs")
    master = c.start_master()
    c.client.submit_job(Add.spec([1, 2], job_id="old", queue="nobody"))
    c.client.cancel_job("old")   # finished: a rerun may queue it again
    master.stop(timeout=20)
    c.start_master(JOB_MODULES="tests.jobs_async")
    for args in (("old",), ("--status", "cancelled")):
        out = elric(c, "rerun", *args)
        assert out.returncode == 1, (out.stdout, out.stderr)
        assert "module 'tests.jobs' is not allowed by JOB_MODULES (tests.jobs_async)" in \
            out.stdout + out.stderr, (out.stdout, out.stderr)
    assert c.client.get_job("old")["status"] == "cancelled"


def test_a_job_module_that_fails_to_import_fails_its_jobs_attempt_by_attempt(
        make_cluster, redis_url):
    c = make_cluster(JOB_MODULES="tests.jobs,tests.no_such_jobs", RETRY_BACKOFF=0.05)
    c.start_master()
    worker = c.start_worker("--concurrency", "1")
    assert "cannot import job module tests.no_such_jobs (ModuleNotFoundError" in worker.log()
    # queued by a master that has the module
    enqueue_raw(redis_url, "broken", "tests.no_such_jobs:Job", [], max_retries="2")
    job = c.wait_job("broken")
    assert (job["status"], job["attempts"]) == ("failed", 3), job
    assert "ModuleBroken: job module tests.no_such_jobs failed to import on this worker: " \
           "ModuleNotFoundError" in job["error"], job["error"]
    assert "ERROR elric.runner" in worker.log() and "job broken: job module" in worker.log()
    assert c.client.submit_job(Add.spec([1, 2], job_id="fine"))
    assert c.wait_job("fine")["result"] == 3   # its other job modules run on


SHOP_JOBS = """
from elric import Job


class Ship(Job):
    queue = "ships"
    max_retries = 1

    @classmethod
    def dedupe_key_for(cls, order):
        return f"order-{order}"

    def run(self, order):
        return f"shipped {order}"
"""


def test_the_master_checks_job_names_and_needs_no_project_code(make_cluster, tmp_path,
                                                                monkeypatch):
    """Project code lives with the workers and the submitting script; the master has only
    the names in JOB_MODULES. It used to import a job's module at submit and refuse it."""
    project = tmp_path / "project"
    (project / "shop").mkdir(parents=True)
    (project / "shop" / "__init__.py").write_text("")
    (project / "shop" / "jobs.py").write_text(SHOP_JOBS)
    c = make_cluster(JOB_MODULES="shop.jobs")
    master = c.start_master()      # its sys.path has no `shop`
    c.env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(project),
                                                        c.env.get("PYTHONPATH"))))
    worker = c.start_worker("--concurrency", "1", "--queues", "ships")
    monkeypatch.syspath_prepend(str(project))   # the submitting script has the project
    from shop.jobs import Ship

    assert c.client.submit_job(Ship.spec(["o-1"], job_id="ship-1"))["status"] == "queued"
    assert c.client.submit_job(Ship.spec(["o-1"], job_id="ship-again"))["status"] == "filtered"
    job = c.wait_job("ship-1")
    assert (job["status"], job["result"], job["queue"]) == ("succeeded", "shipped o-1",
                                                           "ships"), c.logs()
    assert job["max_retries"] == 1      # the class's default, sent by Job.spec
    # a name the master cannot check further: the worker that loads the module refuses it
    c.client.submit_job({"func": "shop.jobs:Nope", "job_id": "nope", "queue": "ships",
                         "max_retries": 3})
    nope = c.wait_job("nope")
    assert (nope["status"], nope["attempts"]) == ("failed", 1), nope
    assert "refused: func 'shop.jobs:Nope': module 'shop.jobs' has no 'Nope'" in nope["error"]
    assert "job nope: func 'shop.jobs:Nope'" in worker.log()
    assert "No module named 'shop'" not in master.log() and master.alive()


# --- 12. fenced starts: a worker paused past its lease does not start what it prefetched --

def test_a_worker_paused_past_its_lease_does_not_start_the_jobs_it_prefetched(
        make_cluster, tmp_path):
    c = make_cluster(LEASE_SECONDS=2)
    c.start_master()
    paused = c.start_worker("--concurrency", "1")
    marks, first_marks = tmp_path / "marks", tmp_path / "first"
    c.client.submit_jobs([MarkSleep.spec([str(first_marks), 3], job_id="first"),
                          MarkSleep.spec([str(marks), 0], job_id="second")])
    # one process: "first" runs, "second" waits in the worker's buffer under its lease
    wait_for(lambda: set(statuses(c.redis_url, ["first", "second"]).values()) == {"running"}
             and first_marks.exists(), what="both claimed by the first worker, first started")
    os.kill(paused.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: c.client.stats()["totals"]["redelivered"] == 2,
                 what="both redelivered after the lease")
        other = c.start_worker("--concurrency", "1")
        second = c.wait_job("second")
        assert second["status"] == "succeeded" and worker_pid(second) == other.pid
    finally:
        os.kill(paused.pid, signal.SIGCONT)
        resumed = time.time()

    def seen_since(t):   # its heartbeats (at most 1 s apart) say it is back at work
        return any(w.get("pid") == paused.pid and w["last_seen"] > t
                   for w in c.client.stats()["workers"])
    # it would start a buffered job in its first turn after waking; two heartbeats later
    # it has had every chance (it may also have lost "second" with a fetch cut by the pause)
    wait_for(lambda: seen_since(resumed + 2.5), what="the paused worker back at work")
    assert marks.read_text().split() == ["second"], c.logs()   # it ran once, on `other`
    first = c.wait_job("first")
    assert first["status"] == "succeeded"
    assert paused.alive(), paused.log()
    # its own run of "first" ended after the lease was lost: neither recorded nor counted
    assert "job first tests.jobs:MarkSleep: attempt 1 ended after its lease was lost" in \
        paused.log()

    def counted():   # as its last heartbeat told
        return [(w["done"], w["failed"]) for w in c.client.stats()["workers"]
                if w.get("pid") == paused.pid]
    ran_again_here = worker_pid(first) == paused.pid
    wait_for(lambda: counted() == [(int(ran_again_here), 0)],
             what="its counts leaving out the outcome Redis dropped")


def test_a_job_claimed_again_while_its_lost_attempt_runs_here_runs_twice_not_thrice(
        make_cluster, tmp_path):
    """A worker stopped past its lease (SIGSTOP here; a VM paused, Redis cut off) while a job
    ran, then claimed the job again, redelivered, while that lost attempt still ran in its
    pool: the pool kept one entry per job id, so the new attempt took the old one's place,
    the old one's end was recorded for it (stale, dropped), and the new one's end for
    nothing. Its lease then ran out, and the job ran a third time."""
    c = make_cluster(LEASE_SECONDS=2)
    c.start_master()
    worker = c.start_worker("--concurrency", "1")
    batches_form(c)   # its one process then takes sync jobs in batches
    marks = tmp_path / "marks"
    c.client.submit_job(MarkSleep.spec([str(marks), 6], job_id="long"))
    wait_for(lambda: marks.exists(), what="long started")
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        wait_for(lambda: c.client.stats()["totals"]["redelivered"] == 1,
                 what="long redelivered after the lease")
    finally:
        os.kill(worker.pid, signal.SIGCONT)
    long = c.wait_job("long", timeout=40)
    assert long["status"] == "succeeded", long
    assert marks.read_text().split() == ["long", "long"], c.logs()   # the lost run, one more
    assert long["attempts"] == 2, (long, c.logs())
    c.client.submit_job(Add.spec([1, 2], job_id="after"))
    assert c.wait_job("after")["result"] == 3
    assert worker.alive()


def test_a_job_holding_its_gil_does_not_stop_its_workers_heartbeats(make_cluster, tmp_path):
    """A job held its process's GIL in native code (a long regex match, a C extension) while
    the worker sent that process more jobs than the pipe holds: the process's reader thread
    could not read, and the worker's send waited, its loop and heartbeats with it, until
    the job ended. Past the lease every job of the worker was redelivered and ran again."""
    c = make_cluster(LEASE_SECONDS=3)
    c.start_master()
    worker = c.start_worker("--concurrency", "1")
    c.client.submit_jobs([HoldGil.spec([0], job_id="kind"),   # their kinds known: they
                          PadLength.spec(["x"], job_id="kind-too")])   # are not sent alone
    c.wait_job("kind")
    c.wait_job("kind-too")
    batches_form(c)   # its one process then takes sync jobs in batches
    marks = tmp_path / "marks"
    c.client.submit_job(HoldGil.spec([8, str(marks)], job_id="hog"))
    wait_for(marks.exists, what="hog started")
    c.client.submit_job(PadLength.spec(["x" * 2_000_000], job_id="big"))   # behind it
    assert c.wait_job("big", timeout=40)["result"] == 2_000_000
    hog = c.wait_job("hog")
    assert (hog["status"], hog["attempts"]) == ("succeeded", 1), c.logs()
    assert c.client.stats()["totals"]["redelivered"] == 0, c.logs()
    assert worker.alive()


def test_shutdown_with_cancel_futures_settles_the_futures_of_jobs_still_running():
    """Pool is a concurrent.futures.Executor: a caller of submit must not wait forever for
    a job that shutdown stopped."""
    from concurrent.futures import CancelledError

    from elric.pool import Pool
    from elric.queue import Claim

    async def main():
        pool = Pool(1, async_slots=1, sync_batch=lambda: 1, job_modules=["tests.jobs"])
        pool.kinds["tests.jobs:Sleep"] = False
        future = pool.submit(Claim("slow", 1, "tests.jobs:Sleep", msgpack.packb([30]),
                                   msgpack.packb({}), None, 0, "default", None))
        pool.flush()
        pool.shutdown(wait=True, cancel_futures=True)
        assert future.done()
        with pytest.raises(CancelledError):
            future.result()
    asyncio.run(main())


def test_a_cancel_of_a_run_that_had_ended_does_not_stop_its_jobs_rerun(tmp_path):
    """cancel_job reached a pool process just after a job's run there had ended (its report
    on its way), while a long sync job held the process's loop; the job's rerun, at attempt
    1 again, came to the same process: the request, named by (job_id, attempt), was taken
    as the rerun's, and the rerun failed "Cancelled" though no one cancelled it. A run is
    named by its queue member too, new at each enqueue."""
    from elric.pool import Pool

    marks, gate = tmp_path / "marks", tmp_path / "gate"

    def claim(job_id, func, args, member=""):
        return Claim(job_id, 1, func, msgpack.packb(args), msgpack.packb({}), None, 0,
                     "default", None, member=member)

    async def main():
        pool = Pool(1, async_slots=1, sync_batch=lambda: 10,
                    job_modules=["tests.jobs", "tests.jobs_faults"])
        mark, hold = "tests.jobs_faults:Mark", "tests.jobs:MarkUntilGate"
        pool.kinds.update({mark: False, hold: False})   # known sync: sent in one batch
        outcomes, came = {}, asyncio.Event()

        def done(name):
            def settle(outcome):
                outcomes[name] = outcome
                came.set()
            return settle

        async def outcome(name):
            while name not in outcomes:
                came.clear()
                await asyncio.wait_for(came.wait(), 30)
            return outcomes[name]
        try:
            lost = claim("x", mark, [str(marks)])
            pool.start(lost, done("lost"))
            pool.start(claim("y", hold, [str(marks), str(gate)]), done("y"))
            pool.start(claim("z", mark, [str(marks)]), done("z"))
            pool.flush()
            # (this loop waits unturned: the process's report of x stays unread)
            wait_for(lambda: marks.exists() and marks.read_text().split() == ["x", "y"],
                     what="x ran, y holds the process")
            assert pool.cancel(lost)   # the worker has not read x's report yet
            assert (await outcome("lost")).ok
            rerun = claim("x", mark, [str(marks)], member="0000000000000002:x")
            pool.withdraw_waiting()   # z, sent with the rerun: once z is back, the rerun is
            pool.start(rerun, done("rerun"))   # in the process, behind y
            pool.flush()
            assert (await outcome("z")).withdrawn
            gate.write_text("open")
            ran = await outcome("rerun")
            assert ran.ok and msgpack.unpackb(ran.payload) == "x", ran
        finally:
            pool.kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
    asyncio.run(main())


def test_a_claim_waiting_for_its_lease_check_stays_in_the_buffer_once(redis_url):
    """A buffered claim whose lease is not surely held waits for the heartbeat's answer.
    Each pass of the loop used to add it to the buffer again (1, 2, 4, 8 copies while
    Redis was away), and once renewed every copy was started."""
    from elric.config import load_settings
    from elric.pool import Pool
    from elric.queue import Claim
    from elric.worker import Worker

    def claim(job_id: str, held_until: float) -> Claim:
        return Claim(job_id, 1, "tests.jobs:Add", msgpack.packb([1, 2]), msgpack.packb({}),
                     None, 0, "default", None, held_until=held_until)

    async def main():
        w = Worker(load_settings(env={"ELRIC_REDIS_URL": redis_url,
                                      "ELRIC_JOB_MODULES": "tests.jobs"}))
        w.pool = Pool(1, async_slots=1, sync_batch=lambda: 1, job_modules=["tests.jobs"])
        try:
            w.pool.kinds["tests.jobs:Add"] = False
            waiting, held = claim("waiting", 0.0), claim("held", time.monotonic() + 60)
            w.buffer.extend([waiting, held])
            for _ in range(4):
                w._dispatch()
            assert list(w.buffer) == [waiting], w.buffer
            assert w._renew_now.is_set()    # the heartbeat is asked to check it now
            assert [c.job_id for c in w.pool.claims()] == ["held"]
        finally:
            w.pool.shutdown(wait=True, cancel_futures=True)
    asyncio.run(main())


# --- 13. child jobs bigger than one RPC message ---------------------------------------------

@pytest.mark.parametrize("worker_limit", [64 * 1024, 8 * 1024 * 1024],
                         ids=["same-limit", "worker-limit-bigger"])
def test_children_too_big_for_one_message_are_sent_in_several_and_the_worker_goes_on(
        make_cluster, worker_limit):
    """A chunk's children go to the master in one submit_jobs call. When they did not fit
    in RPC_MAX_MESSAGE the call raised before it was sent, which ended the task that
    records outcomes: the worker went on taking jobs, recorded none, and renewed their
    leases forever. Children that fit one by one are sent in several calls; a child too big
    for any call fails its parent for good, and the worker goes on.

    A worker with a bigger limit than the master's split by its own; the master closed the
    connection on such a call, and the worker sent it again forever. The master answers
    too_large with its limit, and the worker splits to fit it."""
    c = make_cluster()
    c.start_master(RPC_MAX_MESSAGE=64 * 1024)
    worker = c.start_worker("--concurrency", "1", RPC_MAX_MESSAGE=worker_limit)
    c.client.submit_job(SpawnPadded.spec([4, 20_000], job_id="many"))   # 80 kB of children
    job = c.wait_job("many")
    assert job["status"] == "succeeded", (job["error"], c.logs())
    for child in job["result"]:
        assert c.wait_job(child)["result"] == 20_000
    if worker_limit > 64 * 1024:
        assert "the master takes RPC messages of at most 65536 bytes" in worker.log()
    c.client.submit_job(SpawnPadded.spec([1, 100_000], job_id="huge", max_retries=2))
    job = c.wait_job("huge")
    assert (job["status"], job["attempts"]) == ("failed", 1), c.logs()
    assert "65,536 bytes" in job["error"] and "RPC_MAX_MESSAGE" in job["error"], job["error"]
    c.client.submit_job(Add.spec([1, 2], job_id="after"))
    assert c.wait_job("after")["result"] == 3, c.logs()
    assert worker.alive()


def test_a_worker_forgets_a_masters_smaller_limit_when_the_master_starts_again(make_cluster):
    """A worker kept the limit a master's too_large told it for good: after the master
    started again with a bigger RPC_MAX_MESSAGE, children that fit it still failed their
    parent ("over the RPC message limit (65,536 bytes"). The limit holds while the
    connection it came on does."""
    c = make_cluster()
    master = c.start_master(RPC_MAX_MESSAGE=64 * 1024)
    worker = c.start_worker("--concurrency", "1", RPC_MAX_MESSAGE=8 * 1024 * 1024)
    c.client.submit_job(SpawnPadded.spec([4, 20_000], job_id="learn"))
    assert c.wait_job("learn")["status"] == "succeeded", c.logs()
    assert "the master takes RPC messages of at most 65536 bytes" in worker.log()
    assert master.stop() == 0, master.log()
    c.client.close()   # its connection died with the master
    c.start_master()   # RPC_MAX_MESSAGE back to its default, 8 MiB
    for big in ("big", "big-on-the-new-connection"):
        c.client.submit_job(SpawnPadded.spec([1, 100_000], job_id=big, max_retries=0))
        job = c.wait_job(big)
        assert job["status"] == "succeeded", (job["error"], c.logs())
        assert c.wait_job(job["result"][0])["result"] == 100_000


# --- 14. a submission sent again: its handle waits for the job that has the id ------------

def test_the_handle_of_a_submission_sent_again_waits_for_the_job(cluster):
    """Sending a job_id that exists changes nothing and answers that job's status, so a
    submission can be retried safely; but the handle it returned refused to wait ("job
    was running: it has no result") for any status other than queued."""
    from elric.client import set_default_client

    cluster.start_worker("--concurrency", "1")
    set_default_client(cluster.client)
    try:
        first = Sleep.submit_with(args=[2, "once"], job_id="report")
        wait_for(lambda: cluster.client.get_job("report")["status"] == "running",
                 what="it runs")
        again = Sleep.submit_with(args=[2, "once"], job_id="report")
        assert again == first and again.submitted == "running"
        assert again.result(timeout=30)["tag"] == "once"
        assert Sleep.submit_with(args=[2, "once"], job_id="report").result()["tag"] == "once"
    finally:
        set_default_client(None)


def test_a_handles_wait_lasts_its_whole_timeout(cluster):
    """result(timeout=T) gave up as soon as its next poll (up to a second away) would have
    come after T: a job that ended in that last second raised TimeoutError, "still queued
    after 3s", when less than that had passed."""
    from elric.client import set_default_client

    set_default_client(cluster.client)
    try:
        handle = Sleep.submit_with(args=[1], job_id="waits")   # no worker: it stays queued
        began = time.monotonic()
        with pytest.raises(TimeoutError, match="job waits still queued after 3s"):
            handle.result(timeout=3)
        assert 3.0 <= time.monotonic() - began < 4.5
    finally:
        set_default_client(None)


def test_a_pool_process_that_cannot_be_replaced_still_settles_its_jobs():
    """A pool process killed under memory pressure (the OOM killer) is replaced at once,
    and that fork may fail too. The failure was raised before the dead process's jobs were
    settled: they were never run again nor failed, renewed under lease forever, and the
    dead process stayed in the pool, taking jobs that went nowhere."""
    import errno

    from elric.pool import Pool, ProcessDied
    from elric.queue import Claim

    async def main():
        pool = Pool(2, async_slots=1, sync_batch=lambda: 1, job_modules=["tests.jobs"])
        try:
            pool.kinds["tests.jobs:Sleep"] = False
            outcomes = []
            pool.start(Claim("held", 1, "tests.jobs:Sleep", msgpack.packb([30]),
                             msgpack.packb({}), None, 0, "default", None), outcomes.append)
            pool.flush()
            [victim] = [p for p in pool.processes if p.held]
            start = pool._start

            def no_memory(slot):
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            pool._start = no_memory
            victim.process.kill()
            deadline = time.monotonic() + 20
            while not outcomes:
                assert time.monotonic() < deadline, "the dead process's job never settled"
                await asyncio.sleep(0.02)
            assert isinstance(outcomes[0], ProcessDied)
            assert victim not in pool.processes and pool.claims() == []
            pool._start = start
            pool.kill_overdue()   # each turn of the worker's loop: the pool fills up again
            assert len(pool.processes) == 2 and all(p.process.is_alive() for p in pool.processes)
        finally:
            pool.kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
    asyncio.run(main())


def test_a_pool_grown_while_a_fork_fails_names_each_process_once_and_fills_up_later():
    """Growing the pool started processes numbered by their count: after a failed
    replacement left a gap, two processes had one name; a fork failing while growing was
    raised to the heartbeat and the new size forgotten."""
    import errno

    from elric.pool import Pool

    async def main():
        pool = Pool(3, async_slots=1, sync_batch=lambda: 1, job_modules=["tests.jobs"])
        start = pool._start
        try:
            def no_memory(slot):
                raise OSError(errno.ENOMEM, "Cannot allocate memory")
            pool._start = no_memory
            [middle] = [p for p in pool.processes if p.slot == 1]
            middle.process.kill()
            deadline = time.monotonic() + 20
            while middle in pool.processes:   # died and could not be replaced
                assert time.monotonic() < deadline, "the dead process was never noticed"
                await asyncio.sleep(0.02)
            pool.resize(5)   # every fork fails: kept as the size to fill up to
            assert sorted(p.slot for p in pool.processes) == [0, 2] and pool.size == 5
            pool._start = start
            pool.kill_overdue()   # the next turn of the worker's loop
            assert sorted(p.slot for p in pool.processes) == [0, 1, 2, 3, 4]
            pool.resize(2)
            assert sorted(p.slot for p in pool.processes) == [0, 1]
        finally:
            pool._start = start
            pool.kill_all()
            pool.shutdown(wait=True, cancel_futures=True)
    asyncio.run(main())


# --- 14. a recorder that fails stops the worker ---------------------------------------------

def test_a_worker_whose_recorder_fails_stops_and_exits_non_zero(cluster, caplog):
    """Outcomes that cannot be recorded would leave jobs running under lease forever while
    the worker went on taking more: a worker whose recorder fails for a reason it does not
    know stops, exit status 1, and its job is redelivered to the next worker."""
    from elric.config import load_settings
    from elric.worker import Worker

    async def boom(batch):
        raise RuntimeError("a bug in recording")

    async def main():
        w = Worker(load_settings(env={
            "ELRIC_REDIS_URL": cluster.redis_url, "ELRIC_MASTER_ADDRESS": cluster.address,
            "ELRIC_JOB_MODULES": "tests.jobs", "ELRIC_CONCURRENCY": "1",
            "ELRIC_LEASE_SECONDS": "2", "ELRIC_SHUTDOWN_GRACE": "1"}))
        w._record = boom
        run = asyncio.create_task(w.run())
        await asyncio.to_thread(cluster.client.submit_job, Add.spec([1, 2], job_id="lost"))
        return await asyncio.wait_for(run, 30)   # before the fix it ran on, recording nothing

    assert asyncio.run(main()) == 1
    assert "recording outcomes failed; stopping" in caplog.text
    cluster.start_worker("--concurrency", "1")
    assert cluster.wait_job("lost")["result"] == 3


def marked(mark: str) -> list[psutil.Process]:
    """The processes whose environment holds ELRICTEST_MARK=``mark``."""
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get("ELRICTEST_MARK") == mark and \
                    p.status() != psutil.STATUS_ZOMBIE:
                found.append(p)
    return found


def exit_status(proc, timeout: float) -> int | None:
    """``proc``'s exit status, or None if it still runs after ``timeout`` seconds."""
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def test_a_worker_whose_loop_and_stop_both_fail_exits_non_zero_and_ends_its_pool(
        make_cluster):
    """The worker's own wake list and the index of running jobs overwritten with strings
    (an operator's mistake) while the worker waited for work: its next wait was refused,
    then the look for the claims of the fetch behind it, in its loop and again in its
    stop. The stop ended there: its pool processes were never ended, and the worker never
    exited (Python waits for them), registered, taking no work. It logs the error and
    exits 1 with its pool gone."""
    with one_worker(make_cluster, 2) as (c, worker, pool):
        def waiting() -> bool:
            mine = {f"{a.laddr.ip}:{a.laddr.port}"
                    for a in psutil.Process(worker.pid).net_connections("tcp")}
            return any(x["cmd"] == "blpop" and x["addr"] in mine for x in r.client_list())
        r = redis.Redis.from_url(c.redis_url)
        try:
            wait_for(waiting, what="the worker waiting for work")
            [wid] = [w["worker_id"] for w in c.client.stats()["workers"]]
            for key in (KEYS.status("running"), KEYS.worker_wake(wid)):
                r.delete(key)
                r.set(key, "overwritten")
        finally:
            r.close()
        c.client.submit_jobs([Add.spec([1, 2], job_id="woken")])
        assert exit_status(worker, 30) == 1, worker.log()
        wait_for(lambda: gone(pool), timeout=10, what="its pool processes end")
        assert "WRONGTYPE" in worker.log()


def test_a_worker_that_cannot_register_exits_non_zero_and_ends_its_pool(make_cluster):
    """Registering refused for good (here: its Redis user may not run scripts), after the
    pool had started: the worker never exited, as Python waits for the pool processes,
    which nothing ended. It logs the error and exits 1 with its pool gone. (The list of
    workers overwritten with a string once refused it; the heartbeat passes over that.)"""
    c = make_cluster()
    c.start_master()
    user = f"noscripts{uuid.uuid4().hex[:8]}"
    r = redis.Redis.from_url(c.redis_url)
    r.acl_setuser(user, enabled=True, nopass=True, keys=["*"], channels=["*"],
                  commands=["+@all", "-evalsha", "-eval"])
    # (its pool processes may outlive it, orphaned: told by this mark in their environment)
    c.env["ELRICTEST_MARK"] = mark = uuid.uuid4().hex
    c.env["ELRIC_REDIS_URL"] = c.redis_url.replace("redis://", f"redis://{user}@")
    worker = c.start_worker("--concurrency", "2", wait=False)
    try:
        assert exit_status(worker, 30) == 1, worker.log()
        wait_for(lambda: not marked(mark), timeout=10, what="its pool processes end")
        assert "NOPERM" in worker.log() or "no permissions" in worker.log(), worker.log()
    finally:
        reap(marked(mark))
        r.acl_deluser(user)
        r.close()


def test_jobs_that_end_before_a_long_one_of_their_batch_are_recorded_while_it_runs(
        cluster, tmp_path):
    """A pool process reported a batch's outcomes between jobs: those that ended before a
    long job waited for its end, unrecorded, and ran again when a stopping worker gave
    the long one back."""
    marks = tmp_path / "marks"
    worker = cluster.start_worker("--concurrency", "1", SHUTDOWN_GRACE=1)
    batches_form(cluster)
    quick = [f"quick-{i}" for i in range(5)]
    cluster.client.submit_jobs([MarkSleep.spec([str(marks), 0], job_id=j) for j in quick]
                               + [MarkSleep.spec([str(marks), 60], job_id="long")])
    for job_id in quick:
        assert cluster.wait_job(job_id)["status"] == "succeeded"
    assert cluster.client.get_job("long")["status"] == "running"
    assert worker.stop() == 0, worker.log()
    assert cluster.client.get_job("long")["status"] == "queued"   # given back
    assert sorted(marks.read_text().split()) == sorted(quick + ["long"])


def test_a_job_whose_error_text_is_not_unicode_is_recorded_and_its_batch_too(cluster, tmp_path):
    """An error naming a file whose name is not UTF-8 holds a lone surrogate, which msgpack
    cannot pack: the outcomes sent with it were lost and the pool process sent no more."""
    worker = cluster.start_worker("--concurrency", "1")
    batches_form(cluster)
    missing = os.fsencode(tmp_path / "missing-") + b"\xff"
    cluster.client.submit_jobs([Add.spec([1, 1], job_id="before"),
                                FailNamingFile.spec([missing], job_id="odd"),
                                Add.spec([1, 2], job_id="after")])
    odd = cluster.wait_job("odd")
    assert odd["status"] == "failed" and "FileNotFoundError" in odd["error"], odd
    assert "missing-\\udcff" in odd["error"], odd["error"]
    assert cluster.wait_job("before")["result"] == 2
    assert cluster.wait_job("after")["result"] == 3
    cluster.client.submit_job(Add.spec([2, 2], job_id="later"))
    assert cluster.wait_job("later")["result"] == 4, cluster.logs()
    assert worker.alive()


def test_the_errors_of_many_big_failed_attempts_stay_small_enough_to_show(make_cluster):
    """Each attempt's error is cut to RESULT_MAX_BYTES, but a job's record kept every
    attempt's: a job retried with long errors (an exception naming a big response) grew
    past RPC_MAX_MESSAGE, and get_job (elric job, the dashboard, a handle's result()) then
    failed with an internal error for it, for good."""
    cluster = make_cluster(RPC_MAX_MESSAGE=1 << 20, RETRY_BACKOFF=0.01,
                           RETRY_BACKOFF_MAX=0.02)   # RESULT_MAX_BYTES: 128 KiB
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Fail.spec(["x" * 120_000 + " the end"], job_id="big",
                                        max_retries=9))
    big = cluster.wait_job("big", timeout=60)
    assert (big["status"], big["attempts"]) == ("failed", 10), big["status"]
    assert len(big["error"].encode()) <= 128 * 1024, len(big["error"])
    assert big["error"].startswith("[... cut ...]\n--- attempt "), big["error"][:100]
    assert big["error"].rstrip().endswith("ValueError: " + "x" * 120_000 + " the end")
    assert "--- attempt 10 ---" in big["error"]


@pytest.mark.parametrize("func, named", [(ExitUnprintable, "SystemExit: <exception str() failed>"),
                                         (AsyncExitUnprintable, "SystemExit: <exception str("),
                                         (FailBadRetryAfter, "_BadRetryAfter: failed")])
def test_a_job_whose_exception_cannot_be_described_fails_and_its_process_goes_on(cluster,
                                                                                  func, named):
    """sys.exit(value) whose str() raises, or an exception whose retry_after raises: the
    error was raised again while the failure was being written, so the job was never
    reported (running under lease forever) and its process ran no other job."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(func.spec([], job_id="odd"))
    odd = cluster.wait_job("odd")
    assert odd["status"] == "failed" and named in odd["error"], odd
    cluster.client.submit_job(func.spec([], job_id="again"))
    cluster.client.submit_job(Add.spec([1, 2], job_id="after"))
    assert cluster.wait_job("again")["status"] == "failed"
    assert cluster.wait_job("after")["result"] == 3, cluster.logs()
    assert worker.alive()


@pytest.mark.parametrize("func", [ForkReturns, AsyncForkReturns])
def test_a_forked_child_returning_from_run_exits_and_its_parent_goes_on(cluster, tmp_path,
                                                                        func):
    """A job's os.fork() whose child returned from run() (no os._exit) went on as a second
    runner on its process's pipe and event loop: the child's outcome could be recorded as
    the job's, the parent's loop lost its wake-ups to the child's, so no job sent to the
    process after it ran, and the child lived on after the worker."""
    path = tmp_path / "forked"
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(func.spec([str(path)], job_id="forks"))
    roles = {role: int(pid) for pid, role in (line.split() for line in wait_for(
        lambda: count_lines(path) == 2 and path.read_text().splitlines(), what="both ran"))}
    child = psutil.Process(roles["child"])
    try:
        job = cluster.wait_job("forks")
        assert (job["status"], job["result"]) == ("succeeded", "parent"), job
        cluster.client.submit_jobs([Add.spec([1, i], job_id=f"after-{i}") for i in range(5)])
        for i in range(5):
            assert cluster.wait_job(f"after-{i}")["result"] == 1 + i, cluster.logs()
        wait_for(lambda: gone([child]), what="the forked child exited")
        assert worker.alive()
    finally:
        reap([child])


@pytest.mark.parametrize("half_message", [False, True], ids=["between-messages", "mid-message"])
def test_a_pool_process_whose_pipe_a_forked_child_holds_open_is_seen_to_die(cluster, tmp_path,
                                                                           half_message):
    """The worker learnt that a pool process died only from the end of its pipe. A child
    the job forked (a daemon, a multiprocessing helper) holds the pipe open: the job stayed
    running under lease forever and the dead process kept its place in the pool.

    mid-message: the process died part-way through a message. The worker's recv_bytes
    waited for the rest, which the child holding the pipe never sends: the whole worker
    hung (no heartbeat, no job started) until the child exited."""
    path = tmp_path / "forked"
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(ForkThenCrash.spec([str(path), 120, half_message],
                                                 job_id="crashes"))
    child = psutil.Process(int(wait_for(lambda: path.exists() and path.read_text().strip())))
    try:
        job = cluster.wait_job("crashes")
        assert job["status"] == "failed" and "process died" in job["error"], job
        cluster.client.submit_job(Add.spec([1, 2], job_id="after"))
        assert cluster.wait_job("after")["result"] == 3, cluster.logs()
        assert worker.alive()
    finally:
        reap([child])


def test_signal_handlers_a_job_changed_are_put_back_for_the_jobs_after_it(cluster, tmp_path):
    """A job (or a library it calls) that set SIGALRM, SIGUSR1 or SIGTERM back to their
    defaults left them so for the next jobs of its process: a timeout killed the process
    instead of stopping the job, and a SIGTERM to the worker's process group killed the
    running jobs it should let finish."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(ResetSignals.spec([], job_id="resets"))
    assert cluster.wait_job("resets")["result"] == "reset"
    cluster.client.submit_job(Sleep.spec([30], job_id="slow", timeout=1))
    slow = cluster.wait_job("slow")
    assert slow["status"] == "failed", slow
    assert "JobTimeout: ran past its timeout of 1s\n" in slow["error"], slow["error"]
    cluster.client.submit_job(ResetSignals.spec([], job_id="resets-again"))
    assert cluster.wait_job("resets-again")["result"] == "reset"
    marks = tmp_path / "marks"
    cluster.client.submit_job(MarkSleep.spec([str(marks), 2], job_id="calm"))
    wait_for(lambda: cluster.client.get_job("calm")["status"] == "running")
    for p in descendants(worker.pid):
        p.send_signal(signal.SIGTERM)
    assert cluster.wait_job("calm")["status"] == "succeeded", cluster.logs()
    assert worker.alive()


def test_a_command_a_job_starts_can_be_stopped_with_sigterm_and_sigint(cluster):
    """Pool processes ignore SIGTERM and SIGINT (a stop sent to the worker's process group
    lets their jobs finish), and an ignored signal stays ignored across exec: every command
    a job started ignored them too, so its Popen.terminate() did nothing and the command
    ran on (the job's wait hung, or it left the command behind)."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(StopCommand.spec([], job_id="stops"))
    stops = cluster.wait_job("stops", timeout=60)
    assert stops["result"] == [-signal.SIGTERM, -signal.SIGINT], stops
    assert worker.alive()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_ctrl_c_lets_the_commands_a_job_runs_finish(cluster, tmp_path, sig):
    """Ctrl-C reaches the terminal's whole process group: the commands a job ran were in it
    and stopped at once (the job failed), though the first Ctrl-C lets running jobs finish.
    Pool processes have a group of their own; the worker stops them itself. A SIGTERM to
    the group (systemd, docker) spares the fork server too: had it died, the worker would
    have taken its pool processes for dead."""
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    # its own group, as in a terminal; on a failure the job's command in it goes too
    with open(tmp_path / "worker.log", "ab") as log, \
            group([sys.executable, "-m", "elric", "worker", "--concurrency", "1"],
                  env=cluster.env, cwd=ROOT, stdout=log, stderr=log,
                  stdin=subprocess.DEVNULL) as worker:
        cluster.client.submit_job(CommandUntilGate.spec([str(gate), str(marks)], job_id="tool"))
        wait_for(lambda: count_lines(marks) == 1, what="the job's command running")
        os.killpg(worker.pid, sig)   # Ctrl-C, or a supervisor's stop
        wait_for(lambda: "stopping" in (tmp_path / "worker.log").read_text(),
                 what="the worker stopping")
        gate.touch()
        assert cluster.wait_job("tool", timeout=60)["result"] == 0
        assert worker.wait(timeout=60) == 0


@pytest.mark.parametrize("job_class, stopped", [(StopProcesses, [-signal.SIGTERM, [1, 2]]),
                                               (StopFork, signal.SIGTERM)],
                         ids=["multiprocessing", "fork"])
def test_the_processes_a_job_starts_can_be_terminated(cluster, job_class, stopped):
    """The processes a job started ignored SIGTERM as their pool process does (inherited
    through fork, and through exec by the fork server of its own that multiprocessing
    starts): Process.terminate() did nothing, and a ``with multiprocessing.Pool()`` block,
    which terminates its workers, never ended (its workers were left behind, stuck)."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(job_class.spec([], job_id="stops", timeout=30))
    stops = cluster.wait_job("stops", timeout=60)
    assert stops["result"] == stopped, stops.get("error")
    assert worker.alive()


def test_pool_processes_draw_different_numbers_from_numpys_global_random_state(
        make_cluster):
    """The fork server imports the job modules, so a module that imported numpy.random
    (directly, or through pandas or scikit-learn) had it seeded once, there: every pool
    process it forked, the replacements of those that died too, drew the same "random"
    numbers from numpy's global state (Python's own random is seeded again at fork)."""
    c = make_cluster(JOB_MODULES="tests.jobs_numpy")
    c.start_master()
    c.start_worker("--concurrency", "2")
    draws: dict[int, int] = {}

    def two_processes() -> bool:
        handles = [c.client.submit_job(FirstDraw.spec([])) for _ in range(4)]
        draws.update(c.wait_job(h["job_id"])["result"] for h in handles)
        return len(draws) == 2
    wait_for(two_processes, what="jobs run in both pool processes")
    assert len(set(draws.values())) == 2, draws


def test_a_command_a_job_runs_reads_nothing_from_its_workers_stdin(cluster, tmp_path):
    """Pool processes kept their worker's standard input (a terminal, or a supervisor's
    pipe), and so did each command a job ran: one that reads stdin, or asks a question
    there, waited for what was typed at the worker, while under systemd or docker it read
    an empty /dev/null at once."""
    with open(tmp_path / "worker.log", "ab") as log:
        worker = subprocess.Popen([sys.executable, "-m", "elric", "worker", "--concurrency", "1"],
                                  env=cluster.env, cwd=ROOT, stdin=subprocess.PIPE, stdout=log,
                                  stderr=subprocess.STDOUT)
    try:
        cluster.client.submit_job(ReadStdin.spec([], job_id="reads"))
        reads = cluster.wait_job("reads", timeout=60)
        assert (reads["status"], reads["result"]) == ("succeeded", "''"), reads
    finally:
        worker.terminate()
        worker.wait(timeout=30)
        worker.stdin.close()


def test_sigpipe_and_sigchld_a_job_changed_are_put_back_for_the_jobs_after_it(cluster):
    """A job that set SIGPIPE to its default (a script's idiom) or ignored SIGCHLD (against
    zombies) left it so for the next jobs of its process: a write to a closed socket then
    killed the process (the job failed as a crash, the jobs beside it ran again), and every
    subprocess exited 0 whatever it returned, as its status could not be waited for."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(LooseSignals.spec([], job_id="loosens"))
    assert cluster.wait_job("loosens")["result"] == "loosened"
    cluster.client.submit_job(ChildAndPipe.spec([], job_id="after"))
    after = cluster.wait_job("after")
    assert (after["status"], after["result"]) == ("succeeded", [3, "BrokenPipeError"]), after
    assert worker.alive()


def test_signals_a_job_left_blocked_are_unblocked_for_the_jobs_after_it(cluster):
    """A job that left SIGALRM and SIGUSR1 blocked (pthread_sigmask) left its process deaf to
    the next jobs' timeouts and cancels: each ran on for KILL_GRACE and then lost its
    process, recorded as killed."""
    c = cluster.client
    worker = cluster.start_worker("--concurrency", "1")
    c.submit_job(BlockSignals.spec([], job_id="blocks"))
    assert cluster.wait_job("blocks")["result"] == "blocked"
    c.submit_job(Sleep.spec([30], job_id="slow", timeout=1))
    slow = cluster.wait_job("slow")
    assert slow["status"] == "failed", slow
    assert "JobTimeout: ran past its timeout of 1s\n" in slow["error"], slow["error"]
    assert "killed" not in slow["error"], slow["error"]
    c.submit_job(Sleep.spec([30], job_id="stopped"))
    wait_for(lambda: c.get_job("stopped")["status"] == "running", what="stopped started")
    c.cancel_job("stopped")
    stopped = cluster.wait_job("stopped", statuses=("cancelled",))
    assert "killed" not in stopped["error"], stopped["error"]
    assert worker.alive()


def test_jobs_run_in_the_directory_their_worker_was_started_in(cluster):
    """Pool processes are forked by the fork server, which runs in an empty directory of
    its own: every job ran there, so a relative path (a config file, an output folder)
    named nothing of the project's, and what a job wrote there was left in /tmp."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(WhereAmI.spec([], job_id="where"))
    assert cluster.wait_job("where")["result"] == os.path.realpath(ROOT)
    assert worker.alive()


def test_a_jobs_chdir_does_not_move_the_jobs_after_it(cluster, tmp_path):
    """A job's os.chdir moved every later job of its pool process: their relative paths
    then depended on which jobs that process had run before."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(WhereAmI.spec([str(tmp_path)], job_id="moves"))
    assert cluster.wait_job("moves")["result"] == os.path.realpath(tmp_path)
    cluster.client.submit_job(WhereAmI.spec([], job_id="after"))
    assert cluster.wait_job("after")["result"] == os.path.realpath(ROOT)
    assert worker.alive()


@pytest.mark.parametrize("job_class", [ProcessState, AsyncProcessState])
def test_a_jobs_environment_and_umask_are_not_left_to_the_jobs_after_it(cluster, job_class):
    """A job's os.environ changes (a variable set or removed, TZ) and its os.umask stayed
    for every later job of its pool process: what those jobs read, the files they made
    and the times they printed depended on which jobs that process had run before."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(job_class.spec([], job_id="before"))
    before = cluster.wait_job("before")["result"]
    assert before["log_level"] == "INFO" and before["left"] is None, before
    cluster.client.submit_job(job_class.spec([True], job_id="leaves"))
    leaves = cluster.wait_job("leaves")["result"]
    assert leaves["pid"] == before["pid"] and leaves["umask"] == 0o077, leaves
    cluster.client.submit_job(job_class.spec([], job_id="after"))
    after = cluster.wait_job("after")["result"]
    assert after == before, (before, after)
    assert worker.alive()


@pytest.mark.parametrize("job_class", [ProcessSettings, AsyncProcessSettings])
def test_a_jobs_socket_timeout_recursion_limit_and_logging_are_not_left_to_the_next_jobs(
        cluster, job_class):
    """A job's socket.setdefaulttimeout, sys.setrecursionlimit and logging setup
    (basicConfig(force=True), the root logger's level, logging.disable) stayed for every
    later job of its pool process: their sockets timed out (a long download, a blocking
    Redis read), a runaway recursion crashed the process instead of failing its job, their
    log lines and the process's own took another format, or a level that flooded or
    silenced them."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(job_class.spec([], job_id="before"))
    before = cluster.wait_job("before")["result"]
    assert before["socket_timeout"] is None and before["disabled"] == 0, before
    cluster.client.submit_job(job_class.spec([True], job_id="leaves"))
    leaves = cluster.wait_job("leaves")["result"]
    assert leaves["pid"] == before["pid"] and leaves["formats"] == ["%(message)s"], leaves
    assert leaves["recursion_limit"] == 100_000, leaves
    cluster.client.submit_job(job_class.spec([], job_id="after"))
    after = cluster.wait_job("after")["result"]
    assert after == before, (before, after)
    assert worker.alive()


@pytest.mark.parametrize("job_class", [WarningState, AsyncWarningState])
def test_a_jobs_warnings_filters_are_not_left_to_the_next_jobs(cluster, job_class):
    """A job's warnings.simplefilter("error") stayed for every later job of its pool
    process: a deprecation warning deep in a library failed those jobs, depending on which
    jobs that process had run before. So did its warnings.showwarning and formatwarning
    (logging.captureWarnings(True) sent the next jobs' warnings to logging, and kept their
    own captureWarnings from taking)."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(job_class.spec([], job_id="before"))
    before = cluster.wait_job("before")["result"]
    assert before["raises"] is False and before["captures"] is True, before
    cluster.client.submit_job(job_class.spec([True], job_id="leaves"))
    leaves = cluster.wait_job("leaves")["result"]
    assert leaves["pid"] == before["pid"] and leaves["raises"] is True, leaves
    assert leaves["hooks"] == before["hooks"] and leaves["captures"] is True, leaves
    cluster.client.submit_job(job_class.spec([], job_id="after"))
    after = cluster.wait_job("after")
    assert (after["status"], after["result"]) == ("succeeded", before), after
    assert worker.alive()


@pytest.mark.parametrize("fail", [False, True])
def test_an_async_generator_a_sync_job_left_is_closed_when_that_job_ends(cluster, tmp_path,
                                                                        fail):
    """An async generator a sync job left unfinished on its loop was closed only when a
    later job ran that loop: its ``finally`` (closing a connection, releasing a lock) ran
    inside that other job, or never, if no later job ran the loop."""
    path = str(tmp_path / "closed")
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(LeaveAsyncGenerator.spec([path, fail], job_id="leaves",
                                                        max_retries=0))
    leaves = cluster.wait_job("leaves")
    assert leaves["status"] == ("failed" if fail else "succeeded"), leaves
    cluster.client.submit_job(RunLoopOnce.spec([path], job_id="after"))
    after = cluster.wait_job("after")["result"]
    assert after == {"before": ["closed"], "after": ["closed"]}, after
    assert worker.alive()


def test_context_variables_a_job_set_are_not_left_to_the_jobs_after_it(cluster):
    """Sync jobs sent to a process together ran in one context: a context variable one set
    stayed for those after it (decimal's precision, numpy's errstate, structlog's fields
    bound to a job id, an OpenTelemetry span), so their sums were rounded as it rounded and
    their log lines named its job, depending on how the worker batched them. Each runs in
    a copy of the context, as a task does."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Seventh.spec([], job_id="before"))
    before = cluster.wait_job("before")["result"]
    assert len(before) == 30, before   # 0. and 28 digits: decimal's default
    batches_form(cluster)
    cluster.client.submit_jobs([Seventh.spec([6], job_id="leaves"),
                                *(Seventh.spec([], job_id=f"after-{i}") for i in range(5))])
    assert cluster.wait_job("leaves")["result"] == "0.142857"
    for i in range(5):
        assert cluster.wait_job(f"after-{i}")["result"] == before, i
    assert worker.alive()


@pytest.mark.parametrize("how, error", [("exit", "SystemExit: 3"),
                                         ("interrupt", "KeyboardInterrupt")])
def test_sys_exit_in_a_task_an_async_job_awaits_fails_that_job_alone(cluster, how, error):
    """SystemExit or KeyboardInterrupt raised in a task an async job started went through
    its pool process's event loop (asyncio re-raises both from a task's step): the process
    ended, the job was recorded as a crash ("pool process died"), and every async job
    beside it was stopped and run again."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(AsyncProcessState.spec([], job_id="before"))
    before = cluster.wait_job("before")["result"]
    cluster.client.submit_job(AsyncExitInTask.spec([how], job_id="exits"))
    exits = cluster.wait_job("exits")
    assert exits["status"] == "failed", exits
    assert f"\n{error}" in exits["error"] and "died" not in exits["error"], exits["error"]
    cluster.client.submit_job(AsyncProcessState.spec([], job_id="after"))
    assert cluster.wait_job("after")["result"]["pid"] == before["pid"], cluster.logs()
    assert worker.alive()


@pytest.mark.parametrize("log_format", ["text", "json"])   # json: fds 1 and 2 are pipes
def test_a_job_that_closes_stdout_and_stderr_leaves_them_open_for_the_jobs_after_it(
        cluster, log_format):
    """A job that closed sys.stdout or sys.stderr left them closed for every later job of
    its pool process: each print there failed its job (ValueError: I/O operation on closed
    file), and the process's own log lines were lost."""
    worker = cluster.start_worker("--concurrency", "1", "--log-format", log_format)
    cluster.client.submit_job(Stdio.spec(["said-before", True], job_id="closes"))
    pid = cluster.wait_job("closes")["result"]
    cluster.client.submit_job(Stdio.spec(["said-after"], job_id="after"))
    after = cluster.wait_job("after")
    assert (after["status"], after["result"]) == ("succeeded", pid), after
    wait_for(lambda: worker.log().count("said-after") == 2, what="both lines in the log")
    cluster.client.submit_job({"func": "tests.jobs:NoSuchClass", "job_id": "nosuch"})
    assert cluster.wait_job("nosuch")["error"].startswith("--- attempt 1 ---\nrefused")
    own = f"[{pid}]: job nosuch: " if log_format == "text" else '"message": "job nosuch: '
    wait_for(lambda: own in worker.log(), what="the process's own line")
    assert worker.alive()


def test_a_sync_jobs_duration_is_its_run_not_its_wait_behind_its_batch(cluster):
    """Sync jobs reach a pool process in batches, and each one's start was taken as its
    batch arrived: a fast job behind a slow one was recorded as running as long as both
    (its duration, and its func's mean and histogram), and the worker sized its next
    batches by those times."""
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Sleep.spec([0], job_id="known"))   # (a new class goes alone)
    cluster.wait_job("known")
    batches_form(cluster)
    fast = [f"fast-{i}" for i in range(5)]
    cluster.client.submit_jobs([Sleep.spec([1.0], job_id="slow")]
                               + [Sleep.spec([0], job_id=j) for j in fast])
    slow = cluster.wait_job("slow")
    assert slow["duration"] >= 1.0, slow
    for job in map(cluster.wait_job, fast):
        assert job["result"]["at"] >= slow["result"]["at"], "it waited behind the slow one"
        assert (job["duration"] or 0) < 0.5, job


def test_a_stray_alarm_in_a_job_without_a_timeout_leaves_its_process_working(cluster):
    """SIGALRM is how a sync job's timeout stops it. One from elsewhere (here the job's own)
    during a job with no timeout was taken for a timeout it could not describe: the error
    stopped the process's sync loop, and no sync job sent to it was reported again."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(SelfAlarm.spec([], job_id="alarmed"))
    alarmed = cluster.wait_job("alarmed")
    assert (alarmed["status"], alarmed["result"]) == ("succeeded", "ok"), alarmed
    cluster.client.submit_job(Add.spec([1, 2], job_id="after"))
    assert cluster.wait_job("after")["result"] == 3, cluster.logs()
    assert worker.alive()


def test_a_stopping_worker_records_a_job_that_ended_while_its_master_was_slow(
        make_cluster, tmp_path):
    """A job ended, and its worker was sending its children to a master that did not answer
    (stopped here; busy or far away in life) when a SIGTERM's SHUTDOWN_GRACE ran out: the
    outcome was dropped unrecorded, and the job ran again once its lease ran out."""
    gate, marks = tmp_path / "gate", tmp_path / "marks"
    c = make_cluster(SHUTDOWN_GRACE=1, LEASE_SECONDS=5)
    master = c.start_master()
    worker = c.start_worker("--concurrency", "1")
    c.client.submit_job(SpawnWhenGateOpens.spec([str(gate), str(marks)], job_id="parent"))
    wait_for(lambda: c.client.get_job("parent")["status"] == "running", what="parent runs")
    os.kill(master.pid, signal.SIGSTOP)
    try:
        gate.write_text("")
        wait_for(lambda: marks.exists(), what="the parent's run ended")
        worker.signal(signal.SIGTERM)
        wait_for(lambda: "still recording" in worker.log() or not worker.alive(),
                 what="the worker waits for its recording, or stops")
    finally:
        os.kill(master.pid, signal.SIGCONT)
    assert worker.wait(timeout=30) == 0, worker.log()
    c.start_worker("--concurrency", "1")
    parent = c.wait_job("parent", timeout=60)
    assert (parent["status"], parent["attempts"]) == ("succeeded", 1), parent
    wait_for(lambda: c.client.stats()["by_status"]["succeeded"] == 2, what="the child ran")
    assert marks.read_text() == "ended\n"   # it ran once


def test_outcomes_without_children_are_recorded_while_a_parents_children_wait(
        make_cluster, tmp_path):
    """A parent ended while its master was away (stopped here): its children wait for the
    master, and so did every outcome that ended after it, children or not. The worker then
    had no room to fetch, and a SIGTERM in the outage ran those finished jobs again."""
    gate, marks, plain_gate = tmp_path / "gate", tmp_path / "marks", tmp_path / "plain"
    c = make_cluster(LEASE_SECONDS=5)
    master = c.start_master()
    c.start_worker("--concurrency", "2")
    c.client.submit_job(SpawnWhenGateOpens.spec([str(gate), str(marks)], job_id="parent"))
    c.client.submit_job(MarkUntilGate.spec([str(tmp_path / "m"), str(plain_gate)],
                                           job_id="plain"))
    wait_for(lambda: statuses(c.redis_url, ["parent", "plain"]) ==
             {"parent": "running", "plain": "running"}, what="both run")
    os.kill(master.pid, signal.SIGSTOP)
    try:
        gate.write_text("")
        wait_for(lambda: marks.exists(), what="the parent's run ended")
        plain_gate.write_text("")
        wait_for(lambda: statuses(c.redis_url, ["plain"])["plain"] == "succeeded",
                 what="the plain job recorded while the master is away")
        assert statuses(c.redis_url, ["parent"])["parent"] == "running"   # children first
    finally:
        os.kill(master.pid, signal.SIGCONT)
    assert c.wait_job("parent")["status"] == "succeeded"
    wait_for(lambda: c.client.stats()["by_status"]["succeeded"] == 3, what="the child ran")


def test_claims_woken_while_a_foreign_job_is_handed_back_reach_the_buffer():
    """A woken fetch brought a job of a module this worker does not load and one it runs.
    While the foreign one was handed back (a Redis call), the loop's ``_dispatch`` put a
    new buffer in place: the claim it runs went into the old one, and sat unstarted and
    unrenewed until its lease ran out."""
    from elric.queue import Fetched

    def claim(job_id: str, func: str) -> Claim:
        return Claim(job_id, 1, func, msgpack.packb([]), msgpack.packb({}), None, 0,
                     "default", None)

    async def main():
        w = _in_process_worker()
        handing_back, go_on = asyncio.Event(), asyncio.Event()

        async def release(*args, **kwargs):
            handing_back.set()
            await go_on.wait()
            return 1
        w.queue = SimpleNamespace(release=release)
        mine, foreign = claim("mine", "tests.jobs:Add"), claim("foreign", "elsewhere:Job")
        w._waiting = asyncio.get_running_loop().create_future()
        w._waiting.set_result(Fetched([mine, foreign], None))
        taking = asyncio.create_task(w._take_woken())
        await asyncio.wait_for(handing_back.wait(), 5)
        w._dispatch()   # the loop runs meanwhile
        go_on.set()
        await asyncio.wait_for(taking, 5)
        assert list(w.buffer) == [mine]
    asyncio.run(main())


def test_a_foreign_job_that_cannot_be_handed_back_does_not_hold_up_the_loop(redis_url):
    """Redis went away right after a fetch that brought a job of a module this worker does
    not load: handing it back was retried until Redis returned, and the loop (dispatch,
    timeouts, a SIGTERM) waited with it. It is tried once; the claim, unknown to the worker,
    is given back without using an attempt once Redis answers."""
    import redis.asyncio as aredis

    from elric.queue import RedisQueue

    async def body(w, r):
        gone = aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}")   # Redis away
        try:
            queue = RedisQueue(r, KEYS)
            await queue.enqueue([normalize_spec({"func": "elsewhere:Job", "job_id": "far"}),
                                 normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                                 "job_id": "mine"})])
            asked = time.monotonic()
            fetched = await queue.fetch(w.worker_id, ["default"], 10, 30)
            w.queue = RedisQueue(gone, KEYS)
            mine = await asyncio.wait_for(w._hand_back_others(fetched.claims, asked), 15)
            assert [c.job_id for c in mine] == ["mine"]
            w.buffer.extend(mine)
            w.queue = queue   # Redis is back
            await w._release_unknown()
            job = await queue.get_job("far")
            assert (job["status"], job["attempts"]) == ("queued", 0), job
            assert (await queue.get_job("mine"))["status"] == "running"
        finally:
            await gone.aclose()
    _run_in_process_worker(redis_url, body)


def _in_process_worker():
    """A Worker whose loop the test drives itself, with no pool processes."""
    from elric.config import load_settings
    from elric.loading import JobModules
    from elric.worker import Worker

    w = Worker(load_settings(env={"ELRIC_JOB_MODULES": "tests.jobs"}), concurrency=1)
    w.modules = JobModules.load(["tests.jobs"])
    w.pool = SimpleNamespace(claims=lambda: [], last_async=False, flush=lambda: None,
                             pids=lambda: [], how=lambda claim: (False, False))
    return w


def _run_in_process_worker(redis_url, body) -> None:
    """``await body(w, r)``: an in-process worker (``_in_process_worker``) and a client of
    the test's Redis, closed after."""
    import redis.asyncio as aredis

    async def main():
        r = aredis.Redis.from_url(redis_url)
        try:
            await body(_in_process_worker(), r)
        finally:
            await r.aclose()
    asyncio.run(main())


AGAIN_BY = pytest.mark.parametrize("again_by", ["rerun", "resubmit"])


@AGAIN_BY
def test_a_first_attempt_waits_while_a_lost_run_of_its_job_id_runs_here(redis_url, again_by):
    """A lost attempt 1 of a job still ran in this worker's pool when the worker fetched
    the job's rerun, or a job submitted since under its id, at attempt 1 again: "a first
    attempt has no earlier run here" sent it to the pool, which holds one run per job, and
    the old run's entry was overwritten."""
    from elric.queue import RedisQueue

    async def body(w, r):
        lost, again = await lost_run_and_next(RedisQueue(r, KEYS), r, again_by,
                                              w.worker_id, w.worker_id)
        started = []
        w.pool.holds = lambda job_id: job_id == "x"   # the lost run
        w.pool.start = lambda claim, done, suspect=False: started.append(claim)
        again.held_until = time.monotonic() + 30
        w.buffer.append(again)
        w._dispatch()
        assert (started, list(w.buffer)) == ([], [again])
        # its heartbeat renews the new run's claim, which then starts, not the lost run's
        w.pool.claims = lambda: [lost]
        sent, beaten = [], asyncio.Event()

        async def heartbeat(worker_id, claims, *args):
            sent.append(claims)
            beaten.set()
            raise ConnectionError("one beat is enough")
        await _beat_until(w, heartbeat, beaten)
        assert sent[0] == [again]
        w.pool.holds = lambda job_id: False   # the lost run ended
        w._dispatch()
        assert (started, list(w.buffer)) == ([again], [])
    _run_in_process_worker(redis_url, body)


@AGAIN_BY
def test_a_claim_a_lost_fetch_made_is_given_back_beside_a_lost_run_of_its_id(redis_url,
                                                                            again_by):
    """A lost run of a job still ran here when a fetch whose reply was lost claimed the job's
    rerun, or a job submitted since under its id, at attempt 1 again: taken as the lost
    run's claim, it was known, and waited out its lease to run as a second attempt."""
    from elric.queue import RedisQueue

    async def body(w, r):
        w.queue = RedisQueue(r, KEYS)
        lost, _ = await lost_run_and_next(w.queue, r, again_by, w.worker_id, w.worker_id)
        w.pool.claims = lambda: [lost]   # the lost run goes on in the pool
        w._unsure_since = time.monotonic()   # the fetch's reply was lost
        await w._release_unknown()
        job = await w.queue.get_job("x")
        assert (job["status"], job["attempts"]) == ("queued", 0), job
    _run_in_process_worker(redis_url, body)


@AGAIN_BY
def test_a_claim_its_jobs_next_run_took_over_is_lost_to_the_heartbeat(redis_url, again_by):
    """A claim waited here past its lease (the worker cut off): its job ran elsewhere and
    was rerun, or deleted and submitted again under its id, and a fetch whose reply was lost
    claimed the new run here, at attempt 1 again. The heartbeat, which named the claim by
    (job_id, attempt), renewed the new run's lease in the old claim's name: the old claim,
    lost, started, beside the new run given back."""
    from elric.queue import RedisQueue

    async def body(w, r):
        q = w.queue = RedisQueue(r, KEYS)
        old, _ = await lost_run_and_next(q, r, again_by, w.worker_id, w.worker_id)
        w.buffer.append(old)   # waited here; its lease ran out
        w._unsure_since = time.monotonic()   # the new run's fetch reply was lost
        calls = await _two_beats(w, q)
        assert calls[0] == [old] and list(w.buffer) == [], (calls, w.buffer)
        started = []
        w.pool.holds = lambda job_id: False
        w.pool.start = lambda claim, done, suspect=False: started.append(claim)
        w._dispatch()
        assert started == []
    _run_in_process_worker(redis_url, body)


def test_the_claims_of_a_fetch_behind_a_failed_wait_are_given_back(redis_url):
    """A wake list of another type (an operator's WRONGTYPE) failed the BLPOP a waiting fetch
    was sent behind; the fetch ran all the same, and its claims were thrown away unknown:
    the job waited out its lease and ran as a second attempt."""
    from elric.queue import RedisQueue

    async def body(w, r):
        w.queue, w.blocking_redis = RedisQueue(r, KEYS), r
        await w.queue.fetch(w.worker_id, w.queues, 1, 30)   # loads the script
        await w.queue.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                               "job_id": "woken"})])
        await r.delete(KEYS.wake("default"))
        await r.set(KEYS.wake("default"), "not a list")
        await w._wait(1.0, for_work=True)
        await asyncio.wait([w._waiting], timeout=10)
        await w._take_woken()
        assert w._wait_refused is not None and not w.buffer
        if w._unsure_since:
            await w._release_unknown()
        job = await w.queue.get_job("woken")
        assert (job["status"], job["attempts"]) == ("queued", 0), job
    _run_in_process_worker(redis_url, body)


async def _beat_until(w, heartbeat, done: asyncio.Event) -> None:
    """Run ``w``'s heartbeat loop, its queue's heartbeat replaced by ``heartbeat``, until
    ``done`` is set."""
    w.queue = SimpleNamespace(heartbeat=heartbeat)
    beating = asyncio.create_task(w._heartbeat_loop())
    try:
        await asyncio.wait_for(done.wait(), 10)
    finally:
        beating.cancel()


async def _two_beats(w, q) -> list:
    """Run ``w``'s heartbeat loop against ``q`` until its second beat (the first one's
    reply applied); returns the claims each beat sent."""
    calls, twice = [], asyncio.Event()

    async def heartbeat(worker_id, claims, *args):
        calls.append(claims)
        if len(calls) == 2:
            twice.set()
        return await q.heartbeat(worker_id, claims, *args)
    await _beat_until(w, heartbeat, twice)
    return calls


def test_a_claim_fetched_again_after_a_give_back_is_not_dropped_as_lost(redis_url):
    """A heartbeat was on its way with a claim when the worker gave the job back (a slow run
    shed it) and fetched it again, at the same attempt: the heartbeat's "lost" for the claim
    it sent dropped the new one, which was then never started, nor renewed."""
    from elric.queue import RedisQueue

    async def body(w, r):
        queue = RedisQueue(r, KEYS)
        await queue.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                             "job_id": "again"})])
        w.buffer.extend((await queue.fetch(w.worker_id, w.queues, 1, 30)).claims)
        calls, twice = [], asyncio.Event()

        async def heartbeat(worker_id, claims, *args):
            calls.append(claims)
            if len(calls) == 2:   # the first reply was applied
                twice.set()
            if len(calls) > 1:
                return await queue.heartbeat(worker_id, claims, *args)
            # the loop ran meanwhile: gave the claim back before Redis saw the heartbeat,
            # and fetched the job again before its reply was read
            gone = w.buffer.popleft()
            await queue.release(worker_id, [gone.run])
            renewed = await queue.heartbeat(worker_id, claims, *args)
            w.buffer.extend((await queue.fetch(worker_id, w.queues, 1, 30)).claims)
            return renewed
        await _beat_until(w, heartbeat, twice)
        assert [(c.job_id, c.attempt) for c in w.buffer] == [("again", 1)]
    _run_in_process_worker(redis_url, body)


def test_jobs_a_slow_run_gave_back_whose_reply_was_lost_wait_for_the_heartbeat(redis_url):
    """A slow run shed the buffer's surplus: Redis gave the jobs back, and the reply was
    lost (its connection broke). Kept in the buffer as if still held, a job another worker
    had fetched meanwhile, at the same attempt, started here too: two runs at once."""
    from elric.queue import RedisQueue
    from elric.worker import SLOW_RUN

    async def body(w, r):
        queue = RedisQueue(r, KEYS)
        await queue.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                             "job_id": j}) for j in ("kept", "shed")])
        asked = time.monotonic()
        w.buffer.extend(await w._hand_back_others(
            (await queue.fetch(w.worker_id, w.queues, 2, 30)).claims, asked))

        async def release(*args, **kwargs):   # Redis ran it; the reply never came
            await queue.release(*args, **kwargs)
            raise redis.exceptions.ConnectionError("connection lost")
        w.queue = SimpleNamespace(release=release)
        w.pool.kinds, w.pool.withdraw_waiting = {}, lambda: None
        await w._shed_slow(SLOW_RUN + 1)
        other = (await queue.fetch("other", w.queues, 1, 30)).claims
        assert [(c.job_id, c.attempt) for c in other] == [("shed", 1)]
        assert [c.job_id for c in w.buffer if w._held(c)] == ["kept"], w.buffer
        beaten = asyncio.Event()   # the heartbeat asks Redis, which says it is lost

        async def heartbeat(*args):
            try:
                return await queue.heartbeat(*args)
            finally:
                beaten.set()
        await _beat_until(w, heartbeat, beaten)
        assert [c.job_id for c in w.buffer] == ["kept"], w.buffer
    _run_in_process_worker(redis_url, body)


def test_jobs_a_slow_run_was_giving_back_stay_known_when_a_stop_cuts_the_call(redis_url):
    """A stop cut the loop's turn short (Worker._loop) while a slow run's surplus was being
    given back: the jobs had left the buffer before the call, and a cancel (no outage) did
    not put them back. Still Redis's under this worker, unknown and unrenewed, they ran
    again once their leases ran out (each a redelivery, an attempt used); fetched over a
    lease ago, the stop's look for unknown claims did not find them either."""
    from elric.queue import RedisQueue
    from elric.worker import SLOW_RUN

    async def body(w, r):
        queue = RedisQueue(r, KEYS)
        await queue.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                             "job_id": j}) for j in ("kept", "shed")])
        w.buffer.extend(await w._hand_back_others(
            (await queue.fetch(w.worker_id, w.queues, 2, 30)).claims, time.monotonic()))
        asked = asyncio.Event()

        async def release(*args, **kwargs):   # Redis frozen: the stop cuts it short
            asked.set()
            await asyncio.Event().wait()
        w.queue = SimpleNamespace(release=release)
        w.pool.kinds, w.pool.withdraw_waiting = {}, lambda: None
        shedding = asyncio.create_task(w._shed_slow(SLOW_RUN + 1))
        await asyncio.wait_for(asked.wait(), 5)
        shedding.cancel()
        await asyncio.wait([shedding])
        assert sorted(c.job_id for c in w.buffer) == ["kept", "shed"], w.buffer
    _run_in_process_worker(redis_url, body)


def test_a_suspect_whose_job_was_fetched_here_again_does_not_hold_up_the_worker(redis_url):
    """A lost run of job x (its lease ran out while the worker was cut off) was in a pool
    process that died: it went to the suspects, while x's redelivery, fetched here, waited
    in the buffer. The heartbeat sent only x's newest claim, so the suspect was never found
    lost; unrenewed, it was never started, and the suspects held up the buffer and every
    fetch: x stayed running here for good, and the worker took no other job."""
    from elric.queue import RedisQueue

    async def body(w, r):
        q = RedisQueue(r, KEYS)
        await q.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                         "job_id": "x"})])
        [lost] = (await q.fetch(w.worker_id, w.queues, 1, 30)).claims
        await r.zadd(KEYS.inflight, {"x": 0}, xx=True)   # its lease ran out
        assert (await q.recover())[0] == ["x"]
        [again] = await w._hand_back_others((await q.fetch(w.worker_id, w.queues, 1, 30)
                                             ).claims, time.monotonic())
        w.crash_suspects.append(lost)   # its process died beside another job
        w.buffer.append(again)
        await _two_beats(w, q)
        started = []
        w.pool.place = lambda is_async, alone: SimpleNamespace()
        w.pool.holds = lambda job_id: False
        w.pool.start = lambda claim, done, suspect=False: started.append(claim)
        w._dispatch()
        assert (started, list(w.crash_suspects)) == ([again], []), (started, w.crash_suspects)
    _run_in_process_worker(redis_url, body)


# --- 15. a fetch whose reply was lost costs no attempt ----------------------------------------

def test_a_fetch_whose_reply_was_lost_costs_its_job_no_attempt(make_cluster, redis_url):
    """The worker's connection to Redis went silent after its waiting fetch was sent: Redis
    ran it and claimed a job, and the reply never came. The claim, unknown to the worker,
    waited for its lease to run out and the job ran as a second attempt (redelivered). The
    worker now asks Redis which claims it holds unknown to it, and gives them back."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    c = make_cluster(LEASE_SECONDS=15)
    r = redis.Redis.from_url(redis_url)
    proxies = []
    try:
        c.start_master()

        def waiting():   # the worker's fetch, sent behind a BLPOP, waits in Redis
            return any(cl["cmd"] == "blpop" and "b" in cl["flags"] for cl in r.client_list())

        def claimed(job_id):
            return r.hget(KEYS.job(job_id), "started_at")
        for i in range(5):
            proxies.append(SilentProxy(port))
            worker = c.start_worker("--concurrency", "1", REDIS_URL=proxies[-1].url())
            wait_for(waiting, what="the worker's fetch waiting for work")
            # what Redis answers on its connections is thrown away, and nothing sent on them
            # reaches it any more
            silenced = proxies[-1].silence()
            lost = f"lost-{i}"
            if waiting():
                c.client.submit_job(Add.spec([1, 2], job_id=lost))
                wait_for(lambda: claimed(lost), timeout=30, what="the job claimed")
                if proxies[-1].connections == silenced:
                    break   # by the silenced fetch: no request on a new connection came before
            # its wait for work (a second) ended in Redis before the job came, and a fetch on
            # a new connection claimed it: again, with a worker as idle
            worker.stop(timeout=20)
        else:
            pytest.fail("no job was claimed by a silenced fetch in 5 tries\n" + c.logs())
        job = c.wait_job(lost, timeout=60)
        assert (job["status"], job["attempts"], job["result"]) == ("succeeded", 1, 3), \
            c.logs()
        assert c.client.stats()["totals"]["redelivered"] == 0
        logs = c.logs()
        assert "a fetch claimed whose reply was lost" in logs, logs
    finally:
        r.close()
        for proxy in proxies:
            proxy.close()


def test_a_stop_that_cannot_end_the_wait_for_work_gives_its_fetchs_claims_back(redis_url):
    """A worker told to stop could not push the token that ends its fetch's wait in Redis
    (its connection broke), while the fetch had claimed a job and its reply was not read
    yet. The fetch, cancelled, was still taken for the wait going on, so the stop did not
    ask Redis for the claims it knew nothing of: the job stayed running under a worker gone
    until its lease ran out, and ran as a second attempt."""
    import redis.asyncio as aredis

    from elric.queue import RedisQueue
    from elric.retry import REDIS_CLIENT_OPTIONS

    async def body(w, r):
        proxy = SilentProxy(int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        gone = aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}")   # Redis away
        w.queue = RedisQueue(r, KEYS)
        w.blocking_redis = aredis.Redis.from_url(proxy.url(), **REDIS_CLIENT_OPTIONS)

        async def until(what, condition):
            deadline = time.monotonic() + 10
            while not await condition():
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                await asyncio.sleep(0.02)

        async def waiting():
            return any(c["cmd"] == "blpop" and "b" in c["flags"] for c in await r.client_list())
        try:
            await w.queue.fetch(w.worker_id, w.queues, 1, 30)   # loads the script
            w._changed.set()   # (the loop goes on, the fetch waits)
            await w._wait(4.0, for_work=True)
            await until("the fetch waiting in Redis", waiting)
            proxy.silence()   # Redis runs the fetch; its reply never comes
            await w.queue.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                                   "job_id": "woken"})])

            async def claimed():
                return await r.hget(KEYS.job("woken"), "worker") == w.worker_id.encode()
            await until("the job claimed by the waiting fetch", claimed)
            assert not w._waiting.done()
            w.redis = gone   # the token that ends the wait cannot be pushed
            await _stop(w)
            job = await w.queue.get_job("woken")
            assert (job["status"], job["attempts"]) == ("queued", 0), job
        finally:
            if w._waiting is not None:
                w._waiting.cancel()
                await asyncio.wait([w._waiting])
            await w.blocking_redis.aclose()
            await gone.aclose()
            proxy.close()
    _run_in_process_worker(redis_url, body)


def test_a_stop_in_a_short_outage_gives_back_the_claims_of_a_lost_fetch(redis_url):
    """A fetch's reply was lost (Redis went away a moment) and the worker was told to stop
    before Redis answered again. Its prefetched jobs are tried for a few seconds, but the
    claims that fetch made, unknown to it, were asked of Redis once: the job waited out its
    lease under a worker gone, and ran as a second attempt."""
    from elric.queue import RedisQueue

    async def body(w, r):
        queue = RedisQueue(r, KEYS)
        await queue.enqueue([normalize_spec({"func": "tests.jobs:Add", "args": [1, 2],
                                             "job_id": "unknown"})])
        w._unsure_since = time.monotonic()
        await queue.fetch(w.worker_id, w.queues, 1, 30)   # its reply lost
        asked = []

        async def claimed(*args):
            asked.append(args)
            if len(asked) == 1:   # Redis is back at the next try
                raise redis.exceptions.ConnectionError("Connection refused")
            return await queue.claimed(*args)
        w.queue = SimpleNamespace(claimed=claimed, release=queue.release)
        await _stop(w)
        job = await queue.get_job("unknown")
        assert (job["status"], job["attempts"]) == ("queued", 0), job
    _run_in_process_worker(redis_url, body)


async def _stop(w) -> None:
    """Stop the in-process worker ``w`` (``_in_process_worker``) as a SIGTERM does, with no
    job running and its outcomes recorded."""
    w.pool.kill_all = w.pool.kill_overdue = lambda: None
    w.pool.shutdown = lambda **kwargs: None
    recorder = asyncio.get_running_loop().create_future()
    recorder.set_result(None)
    await asyncio.wait_for(w._shutdown(recorder), 30)
