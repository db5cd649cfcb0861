"""The whole path with real processes: submit over RPC, a worker runs it, the result is kept."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap

import msgpack
import pytest

from elric.jobstats import COUNTERS
from elric.rpc import RemoteError
from tests.conftest import ROOT, wait_for
from tests.jobs import (Add, Crash, Die, Echo, FailUnlessFile, FailWide, MarkSleep, MarkUntilGate,
                        Nested, OnQueueB, PadLength, Record, Sized, Sleep, Spawn, SpawnFromThread,
                        SpawnThenFailOnce, TupleKeys)
from tests.jobs_async import AsyncAdd
from tests.jobs_faults import AsyncSpawnLate, SpawnInBatches
from tests.legacy import SCRIPT_PRELUDE, legacy_python


def test_submit_runs_and_records_result(cluster):
    cluster.start_worker("--concurrency", "2")
    reply = cluster.client.submit_job(Add.spec([2, 3], job_id="add-1", batch="b1"))
    assert reply == {"job_id": "add-1", "status": "queued"}
    job = cluster.wait_job("add-1")
    assert job["status"] == "succeeded", cluster.logs()
    assert job["result"] == 5
    assert job["attempts"] == 1
    assert job["func"] == "tests.jobs:Add"
    assert job["enqueued_at"] <= job["started_at"] <= job["finished_at"]
    assert job["worker"]


def test_a_job_submitted_with_timeout_none_runs_without_one(cluster):
    """Job.spec(timeout=None), or the same key nil from another client, was refused: a
    spec key must be a number, though None is how a class says "no timeout"."""
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_jobs([Add.spec([2, 3], job_id="none", timeout=None),
                                {"func": "tests.jobs:Add", "args": [1, 1], "job_id": "nil",
                                 "timeout": None, "max_retries": None}])
    for job_id, result in (("none", 5), ("nil", 2)):
        job = cluster.wait_job(job_id)
        assert (job["status"], job["result"]) == ("succeeded", result), job
        assert job.get("timeout") is None, job


def test_a_job_submitted_with_job_id_none_gets_one(cluster):
    """Add.submit_with(args, job_id=None) from a script was refused ("'job_id' must be
    string, got nil"), though in a running job and as "" it meant "choose one for me"."""
    cluster.start_worker("--concurrency", "1")
    reply = cluster.client.submit_job(Add.spec([2, 3], job_id=None))
    assert re.fullmatch(r"[0-9a-f]{32}", reply["job_id"]), reply
    assert cluster.wait_job(reply["job_id"])["result"] == 5


def test_maps_with_integer_keys_go_through_every_step(cluster):
    """The contract accepts integer map keys in arguments: the worker unpacks them, the
    result keeps them, and get_job shows them, for a job and a periodic one (each step
    used msgpack's default, which refuses them: an internal error, or a failed job)."""
    cluster.start_worker("--concurrency", "1")
    args, kwargs = [{1: "one", "k": [2]}], {"m": {-3: None}}
    assert cluster.client.submit_job(Echo.spec(args, kwargs, job_id="int-keys"))["status"] \
        == "queued"
    job = cluster.wait_job("int-keys")
    assert job["status"] == "succeeded", (job.get("error"), cluster.logs())
    assert job["result"] == {"args": args, "kwargs": kwargs}
    assert (job["args"], job["kwargs"]) == (args, kwargs)
    periodic = Echo.spec(args, kwargs, job_id="int-keys-p",
                         trigger={"type": "interval", "hours": 1})
    assert cluster.client.submit_job(periodic)["status"] == "scheduled"
    assert cluster.client.submit_job(periodic)["status"] == "scheduled"   # the same again
    assert cluster.client.get_job("int-keys-p")["kwargs"] == kwargs


def test_a_job_class_named_with_a_letter_outside_ascii_runs(cluster):
    from tests.jobs import Écrire

    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Écrire.spec(["é"], job_id="écrit"))
    assert cluster.wait_job("écrit")["result"] == "é"
    assert cluster.client.stats()["funcs"]["tests.jobs:Écrire"]["succeeded"] == 1


def test_child_jobs_reach_the_master_and_run(cluster):
    cluster.start_worker("--concurrency", "2")
    cluster.client.submit_job(Spawn.spec([5], job_id="parent"))
    parent = cluster.wait_job("parent")
    assert parent["status"] == "succeeded", parent["error"]
    children = parent["result"]["children"]
    assert len(children) == 5
    for i, child_id in enumerate(children):
        child = cluster.wait_job(child_id)
        assert child["status"] == "succeeded"
        assert child["result"] == 2 * i
        assert child["parent"] == "parent"
    wait_for(lambda: cluster.client.stats()["totals"]["succeeded"] == 6)



def test_a_child_gets_its_arguments_as_they_were_at_its_submit(cluster):
    """A child's spec kept the very list the job passed to submit, packed only when the job
    ended: a job that submitted a buffer and then cleared it to fill it again sent every
    child the buffer's last state (here, each an empty list)."""
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(SpawnInBatches.spec([4, 2], job_id="batches"))
    ids = cluster.wait_job("batches")["result"]
    assert [cluster.wait_job(i)["result"]["args"] for i in ids] == [[[0, 1]], [[2, 3]]]


def test_a_child_submitted_after_its_parent_ended_is_refused_not_lost(cluster, tmp_path):
    """A task an async job left behind (or a thread holding its context) could submit a
    child after the job had ended: the child went into a list no one would send again, and
    was lost without a word."""
    cluster.start_worker("--concurrency", "1")
    path = tmp_path / "late"
    cluster.client.submit_job(AsyncSpawnLate.spec([0.3, str(path)], job_id="late"))
    assert cluster.wait_job("late")["result"] == "returned"
    said = wait_for(lambda: path.exists() and path.read_text(), what="the late submit")
    assert said.startswith("refused: Add.submit after job late ended"), said


def test_a_parent_rerun_runs_its_children_again(cluster):
    # Child ids are deterministic so that a parent run again after a crash does not double
    # them; a rerun asked for is a new run, and its children must run too.
    cluster.start_worker("--concurrency", "2")
    c = cluster.client
    c.submit_job(Spawn.spec([3], job_id="rerun-parent"))
    first = cluster.wait_job("rerun-parent")
    for child_id in first["result"]["children"]:
        assert cluster.wait_job(child_id)["status"] == "succeeded"
    c.rerun_job("rerun-parent")
    again = wait_for(lambda: (lambda j: j if j["status"] == "succeeded"
                              and j["finished_at"] != first["finished_at"] else None)(
        c.get_job("rerun-parent")), what="the parent run again")
    assert not set(again["result"]["children"]) & set(first["result"]["children"])
    for i, child_id in enumerate(again["result"]["children"]):
        child = cluster.wait_job(child_id)
        assert (child["status"], child["result"], child["parent"]) == (
            "succeeded", 2 * i, "rerun-parent")
    wait_for(lambda: c.stats()["totals"]["succeeded"] == 8, what="eight jobs succeeded")


def test_a_job_id_submitted_again_after_its_delete_runs_its_children_again(cluster):
    """Child ids came from the parent id alone: a chosen id submitted again after its job
    was deleted gave its children the old children's ids, still kept (RESULT_TTL), so they
    were answered "existed" and never ran."""
    cluster.start_worker("--concurrency", "2")
    c = cluster.client
    c.submit_job(Spawn.spec([3], job_id="crawl"))
    first = cluster.wait_job("crawl")["result"]["children"]
    for child_id in first:
        assert cluster.wait_job(child_id)["status"] == "succeeded"
    assert c.remove_job("crawl")
    c.submit_job(Spawn.spec([3], job_id="crawl"))
    again = cluster.wait_job("crawl")["result"]["children"]
    assert not set(again) & set(first)
    for i, child_id in enumerate(again):
        assert (cluster.wait_job(child_id)["result"], c.get_job(child_id)["parent"]) == (
            2 * i, "crawl")


def test_a_retried_parent_sends_the_same_child_ids_again(cluster, tmp_path):
    # A parent run again after a failure (or a crash after its children were sent) must
    # not double its children: every attempt names them alike.
    cluster.start_worker("--concurrency", "2")
    seen = tmp_path / "ids"
    cluster.client.submit_job(SpawnThenFailOnce.spec([3, str(seen)], job_id="p",
                                                     max_retries=1))
    parent = cluster.wait_job("p")
    assert (parent["status"], parent["attempts"]) == ("succeeded", 2), parent
    first, second = seen.read_text().splitlines()
    assert first == second == " ".join(parent["result"]["children"])
    wait_for(lambda: cluster.client.stats()["totals"]["succeeded"] == 4, what="4 jobs ran")


def test_a_child_submitted_from_a_thread_the_job_started_is_refused_there(cluster):
    """A thread the job starts has not its context: its submit went to the master the
    pool process's settings named, as a job of its own, with no parent, scope or round
    and a random id, so every retry of the parent queued it again."""
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(SpawnFromThread.spec(job_id="threaded"))
    job = cluster.wait_job("threaded")
    assert job["status"] == "failed", job
    assert "submit child jobs from the job's own thread" in job["error"]
    assert [j["job_id"] for j in cluster.client.list_jobs()] == ["threaded"]


# --- helpers for subprocess scripts -----------------------------------------------------

def script_env(**elric) -> dict:
    """The environment of a user's script: no ELRIC_* from outside, the repo importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELRIC_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update({f"ELRIC_{k}": str(v) for k, v in elric.items()})
    return env


def run_script(source: str, env: dict, cwd, python: str = sys.executable, args=()) -> dict:
    proc = subprocess.run([python, "-c", textwrap.dedent(source), *map(str, args)], env=env,
                          cwd=str(cwd), capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_pid(job: dict) -> int:
    return int(job["worker"].split(":")[1])  # worker ids are host:pid:random


# --- 1. submitting from a separate script ---------------------------------------------------

SUBMIT_SCRIPT = """
    import json
    from elric import Job, SpecError
    from tests.jobs import Add, Echo

    out = {"submit": Add.submit(2, 3),
           "submit_with": Echo.submit_with(args=[1], kwargs={"k": "v"}, job_id="sw-1",
                                           priority=5, batch="script")}

    class Local(Job):  # defined in __main__: no worker could import it
        def run(self):
            return 1

    try:
        Local.submit()
    except SpecError as exc:
        out["main_error"] = str(exc)
    print(json.dumps(out))
"""


def test_submit_and_submit_with_from_a_script(cluster, tmp_path):
    cluster.start_worker("--concurrency", "2")
    out = run_script(SUBMIT_SCRIPT, script_env(MASTER_ADDRESS=cluster.address), tmp_path)
    assert len(out["submit"]) == 32 and int(out["submit"], 16) >= 0  # a generated id
    assert out["submit_with"] == "sw-1"
    assert "Local is defined in __main__" in out["main_error"]
    assert "move the class into a module" in out["main_error"]
    add = cluster.wait_job(out["submit"])
    assert (add["status"], add["result"]) == ("succeeded", 5), cluster.logs()
    echo = cluster.wait_job("sw-1")
    assert echo["status"] == "succeeded", cluster.logs()
    assert echo["result"] == {"args": [1], "kwargs": {"k": "v"}}
    assert (echo["priority"], echo["batch"]) == (5, "script")
    # nothing from __main__ reached the master
    assert cluster.client.stats()["totals"]["submitted"] == 2


# --- 2. priority order ----------------------------------------------------------------------

def test_a_list_longer_than_one_call_takes_goes_in_batches_and_says_what_was_queued(cluster):
    """Over 10,000 specs, submit_jobs splits the list (two calls in flight). Every spec is
    answered in its place; when the master refuses a batch, the others are queued and
    SubmitError names the bad spec by its index in the whole list."""
    from elric.client import SPLIT_BATCH, SubmitError

    c = cluster.client
    specs = [Echo.spec([n], job_id=f"many-{n}") for n in range(12_500)]
    replies = c.submit_jobs(specs)
    assert [r["job_id"] for r in replies] == [s["job_id"] for s in specs]
    assert {r["status"] for r in replies} == {"queued"}
    assert c.stats()["by_status"]["queued"] == 12_500

    specs = [Echo.spec([n], job_id=f"more-{n}") for n in range(10_001)]
    specs[3_456]["priority"] = "high"
    specs[10_000]["queue"] = "no spaces allowed"   # alone in the last batch
    with pytest.raises(SubmitError) as refused:
        c.submit_jobs(specs)
    assert refused.value.code == "bad_request"
    assert str(refused.value).startswith("spec 3456: job spec key 'priority' must be"), \
        str(refused.value)
    assert "refused 2 batch(es)" in str(refused.value)
    assert "queued the other 9000 of 10001 specs" in str(refused.value)
    got = refused.value.replies
    bad = set(range(3_000, 3_000 + SPLIT_BATCH)) | {10_000}
    assert [n for n, r in enumerate(got) if r is None] == sorted(bad)
    assert all(r["job_id"] == f"more-{n}" and r["status"] == "queued"
               for n, r in enumerate(got) if n not in bad)
    assert c.stats()["by_status"]["queued"] == 12_500 + 9_000


def test_a_split_list_with_a_batch_that_cannot_be_sent_says_what_was_queued(cluster):
    """A batch msgpack cannot carry (a set among its arguments) raised TypeError from
    the middle of the list: the batches before it were queued, with ids the master made
    up, and nothing said which, so sending the list again doubled them."""
    from elric.client import SubmitError

    specs = [Echo.spec([n]) for n in range(10_001)]
    specs[5_678]["args"] = [{1, 2}]
    with pytest.raises(SubmitError, match=r"^spec 5678: cannot send 'submit_jobs' arguments: "
                                          r"args\[0\]: set is not a msgpack value; .*refused 1 "
                                          "batch.es. of 1000 and queued the other 9001 of "
                                          "10001 specs") as info:
        cluster.client.submit_jobs(specs)
    got = info.value.replies
    assert [n for n, r in enumerate(got) if r is None] == list(range(5_000, 6_000))
    assert cluster.client.stats()["by_status"]["queued"] == 9_001


def test_a_spec_msgpack_cannot_carry_is_named_by_its_place_and_what_in_it(cluster):
    """The error named neither the spec nor the argument: "cannot send 'submit_jobs'
    arguments: can not serialize 'datetime.datetime' object", for one spec of 10,000."""
    from datetime import datetime

    from elric.rpc import RPCArgumentError

    c = cluster.client
    specs = [Echo.spec([n]) for n in range(100)]
    specs[77]["args"] = [1, {"when": datetime(2026, 1, 1)}]
    with pytest.raises(RPCArgumentError, match=r"^spec 77: cannot send 'submit_jobs' arguments: "
                                               r"args\[1\]\['when'\]: datetime is not a msgpack "
                                               r"value; pass plain data"):
        c.submit_jobs(specs)
    with pytest.raises(RPCArgumentError, match=r"^spec 1: cannot send 'submit_jobs' arguments: "
                                               "batch: can not serialize 'datetime.datetime'"):
        c.submit_jobs([Echo.spec([1]), Echo.spec([2], batch=datetime(2026, 1, 1))])
    with pytest.raises(RPCArgumentError, match=r"^cannot send 'submit_job' arguments: "
                                               r"kwargs\['n'\]: integer 1180591620717411303424 does not fit"):
        c.submit_job(Echo.spec(kwargs={"n": 2 ** 70}))
    assert c.stats()["by_status"]["queued"] == 0


def test_a_wait_that_times_out_says_why_no_worker_ran_the_job(cluster):
    """JobHandle.result(timeout=5) said "still retrying after 5s" of a job no worker had
    tried (each handed it back: it does not load its module); elric submit --wait said why."""
    from elric.handle import wait

    cluster.start_worker("--concurrency", "1", JOB_MODULES="tests.jobs")
    job_id = cluster.client.submit_job(AsyncAdd.spec([1, 2]))["job_id"]
    wait_for(lambda: cluster.client.get_job(job_id).get("not_run"), what="handed back")
    with pytest.raises(TimeoutError, match=rf"^job {job_id} still \w+ after 0.5s; not run: "
                                           r".*does not load module 'tests.jobs_async'"):
        wait(cluster.client, job_id, timeout=0.5)


def test_a_split_list_over_the_masters_message_limit_is_told_that_limit(make_cluster):
    """SubmitError said too_large but dropped the limit the master's answer carried
    (max_message None), which a caller needs to send the batches again in calls that fit."""
    from elric.client import SubmitError

    c = make_cluster()
    c.start_master(RPC_MAX_MESSAGE=64 * 1024)
    with pytest.raises(SubmitError) as info:
        c.client.submit_jobs([Echo.spec(["x" * 100]) for _ in range(10_001)])
    assert (info.value.code, info.value.max_message) == ("too_large", 64 * 1024)
    replies = info.value.replies   # the last batch, one spec, fits
    assert replies[:10_000] == [None] * 10_000 and replies[10_000]["status"] == "queued"


def test_priority_order_then_fifo_within_a_priority(cluster):
    priorities = [0, 5, 0, 10, 5, -1, 10, 0, 5, 3, -1, 10]
    specs = [Record.spec([i], job_id=f"r{i}", priority=p) for i, p in enumerate(priorities)]
    assert all(r["status"] == "queued" for r in cluster.client.submit_jobs(specs))
    cluster.start_worker("--concurrency", "1", WORKER_CHUNK=1)  # one job at a time
    jobs = [cluster.wait_job(f"r{i}") for i in range(len(priorities))]
    assert all(j["status"] == "succeeded" for j in jobs), cluster.logs()
    ran = [j["result"]["tag"] for j in sorted(jobs, key=lambda j: j["result"]["started"])]
    expected = sorted(range(len(priorities)), key=lambda i: (-priorities[i], i))
    assert ran == expected


# --- 3. queue routing -----------------------------------------------------------------------

def test_queue_routing(cluster):
    c = cluster.client
    worker_a = cluster.start_worker("--queues", "a", "--concurrency", "1")
    c.submit_jobs([Echo.spec(["b"], job_id="b1", queue="b"),
                   OnQueueB.spec(["class"], job_id="cls-b"),        # the class says "b"
                   OnQueueB.spec(["override"], job_id="cls-a", queue="a"),  # the spec wins
                   Echo.spec(["a"], job_id="a1", queue="a"),
                   Echo.spec(["a"], job_id="a2", queue="a")])
    for job_id in ("a1", "a2", "cls-a"):
        job = cluster.wait_job(job_id)
        assert job["status"] == "succeeded", cluster.logs()
        assert (job["queue"], worker_pid(job)) == ("a", worker_a.pid)
    # the a-worker is idle now and never took a b job
    for job_id in ("b1", "cls-b"):
        job = c.get_job(job_id)
        assert (job["status"], job["queue"], job["attempts"]) == ("queued", "b", 0)
    assert c.stats()["by_queue"]["b"]["queued"] == 2
    worker_b = cluster.start_worker("--queues", "b", "--concurrency", "1")
    for job_id in ("b1", "cls-b"):
        job = cluster.wait_job(job_id)
        assert job["status"] == "succeeded", cluster.logs()
        assert worker_pid(job) == worker_b.pid
    assert c.get_job("cls-b")["result"]["tag"] == "class"


# --- 4. queries: get_job, list_jobs, remove_job, stats, rerun_job -------------------------

def test_get_list_remove_stats_and_rerun(cluster, tmp_path):
    c = cluster.client
    flag = tmp_path / "fixed"
    c.submit_jobs([Echo.spec([i], job_id=f"e{i}", queue="q1", batch="B1") for i in range(6)]
                  + [Record.spec([i], job_id=f"r{i}", queue="q2", batch="B2") for i in range(3)]
                  + [FailUnlessFile.spec([str(flag)], job_id="flaky", queue="q2", batch="B2")])
    assert c.get_job("no-such-job") is None
    e0 = c.get_job("e0")
    assert {k: e0[k] for k in ("status", "queue", "batch", "func", "args", "attempts",
                               "result", "priority")} == {
        "status": "queued", "queue": "q1", "batch": "B1", "func": "tests.jobs:Echo",
        "args": [0], "attempts": 0, "result": None, "priority": 0}

    def ids(**filter):
        return {j["job_id"] for j in c.list_jobs(**filter)}

    everything = {f"e{i}" for i in range(6)} | {f"r{i}" for i in range(3)} | {"flaky"}
    assert ids() == ids(status="queued") == everything
    assert ids(status="running") == set()
    assert ids(queue="q1") == {f"e{i}" for i in range(6)}
    assert ids(func="tests.jobs:Record") == {"r0", "r1", "r2"}
    assert ids(batch="B2") == {"r0", "r1", "r2", "flaky"}
    assert ids(queue="q2", func="tests.jobs:Echo") == set()
    pages = [c.list_jobs(queue="q1", offset=o, limit=4) for o in (0, 4, 8)]
    assert [len(p) for p in pages] == [4, 2, 0]
    paged = [j["job_id"] for p in pages for j in p]
    assert sorted(paged) == sorted(ids(queue="q1"))  # no job twice, none left out

    assert c.remove_job("e5") is True
    assert c.get_job("e5") is None
    assert c.remove_job("e5") is False
    assert c.remove_job("no-such-job") is False
    stats = c.stats()
    assert stats["by_status"]["queued"] == 9
    assert stats["by_queue"]["q1"]["queued"] == 5 and stats["by_queue"]["q2"]["queued"] == 4
    assert stats["totals"]["submitted"] == 10
    def counters(row):   # a batch's counters, without its timings (tests/test_stats.py)
        return {name: n for name, n in row.items() if name in COUNTERS}

    assert counters(stats["batches"]["B1"]) == {"submitted": 6, "removed": 1}   # e5
    assert stats["workers"] == []

    worker = cluster.start_worker("--queues", "q1,q2", "--concurrency", "2")
    wait_for(lambda: c.stats()["by_status"]["queued"] == 0
             and c.stats()["by_status"]["running"] == 0, what="queues drained")
    flaky = cluster.wait_job("flaky")
    assert flaky["status"] == "failed" and "FileNotFoundError" in flaky["error"]
    stats = c.stats()
    assert stats["by_status"]["succeeded"] == 8 and stats["by_status"]["failed"] == 1
    assert stats["totals"]["succeeded"] == 8 and stats["totals"]["failed"] == 1
    assert counters(stats["batches"]["B1"]) == {"submitted": 6, "succeeded": 5, "removed": 1}
    assert stats["batches"]["B1"]["live"] == 0   # e5 never ran: it was removed
    assert counters(stats["batches"]["B2"]) == {"submitted": 4, "succeeded": 3, "failed": 1}
    assert stats["by_queue"]["q1"]["succeeded"] == 5
    q2 = stats["by_queue"]["q2"]
    assert (q2["queued"], q2["submitted"], q2["succeeded"], q2["failed"]) == (0, 4, 3, 1)
    [w] = stats["workers"]
    assert (w["pid"], w["queues"], w["alive"]) == (worker.pid, "q1,q2", True)
    assert ids(status="failed") == {"flaky"}
    assert ids(status="succeeded", batch="B1") == {f"e{i}" for i in range(5)}

    with pytest.raises(RemoteError, match="no job 'no-such-job'"):
        c.rerun_job("no-such-job")
    flag.write_text("")
    assert c.rerun_job("flaky") == {"job_id": "flaky", "status": "queued"}
    flaky = cluster.wait_job("flaky")
    assert (flaky["status"], flaky["result"], flaky["attempts"]) == ("succeeded", "found", 1)
    assert ids(status="failed") == set()
    assert c.stats()["totals"]["succeeded"] == 9


# --- 5. bad requests: an error that says what to fix; master and connection stay up ---------

BAD_REQUESTS = [
    (("no_such_method",), "'no_such_method' method not found"),
    (("submit_job",), "submit_job takes 1 argument (spec), got 0"),
    (("submit_job", "tests.jobs:Add"), "submit_job takes a job spec map, got str"),
    (("submit_jobs", {"func": "tests.jobs:Add"}), "submit_jobs takes an array of job specs"),
    (("submit_job", {"func": "tests.jobs:Add", "args": "2, 3"}),
     "job spec key 'args' must be array, got string"),
    (("submit_job", {"func": "tests.jobs:Add", "args": [1, 2], "priority": "high"}),
     "job spec key 'priority' must be integer or nil, got string"),
    (("submit_job", {"args": [1, 2]}), "job spec is missing 'func'"),
    (("submit_job", {"func": "tests.nowhere:Add"}),
     "module 'tests.nowhere' is not allowed by JOB_MODULES"),
    (("submit_job", {"func": "tests.jobs.Add"}), '"package.module:ClassName"'),
    (("submit_job", {"func": "os:system", "args": ["touch /tmp/elric-pwned"]}),
     "module 'os' is not allowed by JOB_MODULES"),
    (("submit_job", {"func": "__main__:Local"}), "defined in __main__ cannot be imported"),
    (("submit_job", {"func": "tests.jobs:Add", "colour": "red"}),
     "unknown job spec key(s) 'colour'; known keys: func, args"),
    (("submit_job", {"func": "tests.jobs:Echo", "args": [msgpack.ExtType(42, b"\x00\x01")]}),
     "args[0]: a msgpack extension type"),
    (("submit_job", {"func": "tests.jobs:Echo", "args": msgpack.ExtType(42, b"xy")}),
     "job spec key 'args' must be array, got msgpack extension type"),
    (("submit_job", {"func": "tests.jobs:Echo", "kwargs": {"when": msgpack.ExtType(1, b"")}}),
     "kwargs['when']: a msgpack extension type"),
    (("submit_job", {"func": "tests.jobs:Echo", "queue": "no spaces"}), "queue 'no spaces'"),
    (("submit_job", {"func": "tests.jobs:Echo", "timeout": 0}), "timeout 0"),
    (("submit_job", {"func": "tests.jobs:Echo", "timeout": float("nan")}), "timeout nan"),
    (("submit_jobs", [Echo.spec([1], job_id="ok-0"), {"func": "tests.jobs:Add", "oops": 1},
                      Echo.spec([2], job_id="ok-2")]), "spec 1: unknown job spec key(s) 'oops'"),
    (("submit_jobs", [Echo.spec([1], job_id="dup"), Echo.spec([2], job_id="dup")]),
     "spec 1: job_id 'dup' appears twice in one batch (spec 0 has it too)"),
    (("get_job", 42), "job_id must be a non-empty string"),
    (("get_job", "\udcff"), "job_id '\\udcff' is not valid UTF-8"),   # b"\xff" from a shell
    (("list_jobs", {"status": "done"}), "unknown status 'done'"),
    (("list_jobs", {"colour": "red"}), "unknown filter key(s)"),
    (("list_jobs", {"limit": 0}), "limit 1..1000"),
    (("list_jobs", {"status": "scheduled", "func": "tests.jobs:Echo"}),
     "periodic jobs (status 'scheduled') are listed whole"),
    (("rerun_job", "no-such-job"), "no job 'no-such-job'"),
]


def test_a_result_over_result_max_bytes_fails_its_attempt_and_every_job_stays_readable(
        cluster):
    """A 10 MB result used to be stored, and then get_job and any list_jobs page holding
    it failed (the reply over RPC_MAX_MESSAGE)."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_jobs([Sized.spec([10_000_000], job_id="huge", max_retries=1),
                   Sized.spec([900_000], job_id="fits")])
    huge, fits = cluster.wait_job("huge"), cluster.wait_job("fits")
    assert (huge["status"], huge["attempts"], huge["result"]) == ("failed", 2, None)
    assert "the result is 10,000,005 bytes, over RESULT_MAX_BYTES (1,048,576)" in huge["error"]
    assert fits["status"] == "succeeded" and fits["result"] == "x" * 900_000
    # a page of summaries carries sizes, never results
    listed = {j["job_id"]: j for j in c.list_jobs(limit=1000)}
    assert "result" not in listed["fits"] and listed["fits"]["result_bytes"] == 900_005
    assert listed["huge"]["result_bytes"] == 0
    assert listed["huge"]["error"].startswith("ResultTooLarge: the result is 10,000,005 bytes")


def test_a_result_with_a_tuple_map_key_fails_its_attempt_and_the_job_stays_readable(cluster):
    """msgpack packs a tuple key as an array, which no map key can be when read back: the
    job was recorded succeeded, and then every get_job of it (its handle's result, elric
    job, the dashboard) failed with an internal error until the record expired."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_jobs([TupleKeys.spec([], job_id="tuple-key"),
                   TupleKeys.spec([True], job_id="tuple-key-deep")])
    for job_id in ("tuple-key", "tuple-key-deep"):
        job = cluster.wait_job(job_id)
        assert (job["status"], job["result"]) == ("failed", None), job
        assert "TypeError: the job returned dict, which is not a msgpack value" in job["error"]
        assert "a map key is an array" in job["error"]


def test_a_result_nested_deeper_than_arguments_may_fails_its_attempt(cluster):
    """A result of 600 nested lists was recorded succeeded, and then `elric job`, `elric
    results` and the dashboard failed on it (RecursionError); a job could not take it as an
    argument either. Results nest at most 64 levels, as arguments do."""
    from elric import views

    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_jobs([Nested.spec([600], job_id="deep"), Nested.spec([64], job_id="fits")])
    deep, fits = cluster.wait_job("deep"), cluster.wait_job("fits")
    assert (deep["status"], deep["result"]) == ("failed", None), deep
    assert "the result nests deeper than 64 levels" in deep["error"], deep["error"]
    assert fits["status"] == "succeeded", fits["error"]
    assert "[" * 64 + "]" * 64 in views.json_text(fits)   # shown as any result
    c.submit_job(PadLength.spec([fits["result"]], job_id="passed-on"))   # and passed on
    assert cluster.wait_job("passed-on")["result"] == 1


def test_an_error_text_over_result_max_bytes_is_cut_to_it_in_bytes(cluster):
    """The cut counted characters: 700,000 two-byte ones (1.4 MB) passed a 1 MiB limit."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_job(FailWide.spec([700_000], job_id="wide"))
    error = cluster.wait_job("wide")["error"]
    assert error.startswith("--- attempt 1 ---\n[... cut ...]\n")
    assert error.rstrip("\n").endswith("\u00e9" * 1000)   # the end, where the exception is
    assert len(error.encode()) <= 100 + 1_048_576


def test_result_max_bytes_must_fit_an_rpc_message():
    from elric.config import SettingsError, load_settings

    with pytest.raises(SettingsError, match=r"RESULT_MAX_BYTES \(5000000\) must be at most half "
                                            r"of RPC_MAX_MESSAGE \(8388608\)"):
        load_settings(env={"ELRIC_RESULT_MAX_BYTES": "5000000"})


def test_bad_requests_get_clear_errors_and_the_connection_stays_up(cluster):
    rpc = cluster.client.rpc
    assert rpc.call("ping") == "pong"
    sock = rpc._sock
    master = cluster.procs[0]
    for call, message in BAD_REQUESTS:
        try:
            reply = rpc.call(*call)
        except RemoteError as exc:
            error = str(exc)
        else:
            raise AssertionError(f"{call} was accepted: {reply!r}")
        assert message in error, (call, error)
        assert "Traceback" not in error and "internal error" not in error, error
        assert rpc.call("ping") == "pong", call
        assert rpc._sock is sock, f"the connection was dropped after {call}"
    assert master.alive()
    # nothing was queued by any of them, not even the good specs of the refused batch
    assert cluster.client.get_job("ok-0") is None and cluster.client.get_job("dup") is None
    stats = cluster.client.stats()
    assert stats["totals"]["submitted"] == 0 and stats["by_status"]["queued"] == 0
    assert not os.path.exists("/tmp/elric-pwned")


# --- 6. the legacy msgpack-rpc-python client ------------------------------------------------

LEGACY_SUBMIT = SCRIPT_PRELUDE + textwrap.dedent("""
    client = msgpackrpc.Client(msgpackrpc.Address("127.0.0.1", int(sys.argv[1])), timeout=30)
    out = {"ping": norm(client.call("ping")),
           "submit": norm(client.call("submit_job", {"func": "tests.jobs:Echo",
                                                     "args": ["legacy", 7],
                                                     "kwargs": {"k": "v"},
                                                     "job_id": "legacy-1",
                                                     "priority": 3}))}
    try:
        client.call("submit_job", {"func": "os:system"})
    except msgpackrpc.error.RPCError as exc:
        out["refused"] = norm(exc.args[0])
    client.close()
    print(json.dumps(out))
""")


def test_legacy_msgpack_rpc_python_client_round_trip(cluster, tmp_path):
    python = legacy_python()
    cluster.start_worker("--concurrency", "1")
    port = cluster.address.rpartition(":")[2]
    out = run_script(LEGACY_SUBMIT, script_env(), tmp_path, python=python, args=[port])
    assert out["ping"] == "pong"
    assert out["submit"] == {"job_id": "legacy-1", "status": "queued"}
    assert out["refused"]["code"] == "bad_request"
    assert "module 'os' is not allowed by JOB_MODULES" in out["refused"]["message"]
    job = cluster.wait_job("legacy-1")
    assert job["status"] == "succeeded", cluster.logs()
    assert job["result"] == {"args": ["legacy", 7], "kwargs": {"k": "v"}}
    assert (job["func"], job["priority"]) == ("tests.jobs:Echo", 3)


# --- 8. SIGTERM on a busy worker loses nothing ----------------------------------------------

def test_sigterm_on_a_busy_worker_loses_nothing(cluster, tmp_path):
    c = cluster.client
    marks = tmp_path / "runs.txt"
    n = 40
    worker = cluster.start_worker("--concurrency", "2")
    c.submit_jobs([MarkSleep.spec([str(marks), 0.3], job_id=f"s{i:02d}") for i in range(n)])
    # busy: some done, two running and more prefetched
    wait_for(lambda: c.stats()["by_status"]["succeeded"] >= 4, what="a few jobs done")
    held = {j["job_id"] for j in c.list_jobs(status="running")}
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, worker.log()
    # it finished what it was running and gave back what it had prefetched, at once (the
    # lease is 30 s: nothing here waited for one to expire)
    jobs = {j["job_id"]: j for j in c.list_jobs(limit=1000)}
    assert len(jobs) == n
    statuses = {j["status"] for j in jobs.values()}
    assert statuses <= {"succeeded", "queued"}, (statuses, worker.log())
    queued = [j for j in jobs.values() if j["status"] == "queued"]
    assert queued, "the worker ran everything before it was told to stop"
    assert all(j["attempts"] == 0 and not j["worker"] for j in queued)
    # the jobs it held beyond the two it ran are back in line, not left "running"
    assert held - {j for j in held if jobs[j]["status"] == "succeeded"} <= {
        j["job_id"] for j in queued}
    given = re.search(r"gave (\d+) prefetched job\(s\) back to the queue", worker.log())
    assert given and int(given.group(1)) >= 1, worker.log()
    assert c.stats()["totals"]["redelivered"] == 0
    done_before = {j for j, job in jobs.items() if job["status"] == "succeeded"}

    cluster.start_worker("--concurrency", "2")
    wait_for(lambda: c.stats()["by_status"]["succeeded"] == n, timeout=60,
             what="all jobs succeeded")
    jobs = {j["job_id"]: j for j in c.list_jobs(status="succeeded", limit=1000)}
    assert all(j["attempts"] == 1 for j in jobs.values())
    assert {j for j, job in jobs.items() if worker_pid(job) == worker.pid} == done_before
    runs = marks.read_text().split()
    assert sorted(runs) == sorted(jobs), "a job ran twice or not at all"


# --- a job that kills its process fails alone; the jobs beside it are not blamed -----------

def test_a_crashing_job_fails_alone(cluster):
    c = cluster.client
    cluster.start_worker("--concurrency", "2")
    c.submit_job(Crash.spec([1.0], job_id="crash"))  # started first, dies while the other runs
    wait_for(lambda: c.get_job("crash")["status"] == "running", what="crash running")
    c.submit_job(Sleep.spec([1.5, "innocent"], job_id="innocent"))
    crash = cluster.wait_job("crash")
    assert crash["status"] == "failed" and "process died" in crash["error"], crash
    innocent = cluster.wait_job("innocent")
    assert innocent["status"] == "succeeded", (innocent["error"], cluster.logs())
    assert innocent["result"]["tag"] == "innocent"


def test_a_job_that_ends_its_process_fails_saying_how_it_ended(cluster):
    """Its error said "the job's process died" for an os._exit(3), an OOM killer's SIGKILL
    and a segfault alike: the exit status and the signal, which tell them apart, went
    unsaid."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_jobs([Die.spec([3], job_id="exit3"), Die.spec(["SIGKILL"], job_id="killed"),
                   Die.spec(["SIGSEGV"], job_id="segv")])
    for job_id, how in (("exit3", "exit status 3"), ("killed", "killed by SIGKILL"),
                        ("segv", "killed by SIGSEGV")):
        job = cluster.wait_job(job_id)
        assert job["status"] == "failed", job
        assert f"the job's process died ({how}:" in job["error"], job["error"]


def descendants(pid: int) -> list[int]:
    """PIDs of the processes below ``pid`` (from /proc): the fork server and pool."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def test_sigterm_to_the_whole_process_group_lets_running_jobs_finish(cluster, tmp_path):
    # systemd, docker and `kill -- -PGID` signal every process of the worker, pool included
    c = cluster.client
    marks = tmp_path / "runs.txt"
    worker = cluster.start_worker("--concurrency", "2")
    c.submit_jobs([MarkSleep.spec([str(marks), 0.5], job_id=f"g{i}") for i in range(8)])
    wait_for(lambda: marks.exists() and len(marks.read_text().split()) >= 2,
             what="two jobs started")
    tree = descendants(worker.pid)
    assert len(tree) >= 3, tree  # the fork server and two pool processes at least
    for pid in [worker.pid, *tree]:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    assert worker.wait(timeout=60) == 0, worker.log()
    jobs = {j["job_id"]: j for j in c.list_jobs(limit=100)}
    started = set(marks.read_text().split())
    assert {j for j, job in jobs.items() if job["status"] == "succeeded"} == started, (
        jobs, worker.log())  # what had started ran to the end
    assert {job["status"] for j, job in jobs.items() if j not in started} == {"queued"}
    cluster.start_worker("--concurrency", "2")
    wait_for(lambda: c.stats()["by_status"]["succeeded"] == 8, what="all jobs succeeded")
    assert sorted(marks.read_text().split()) == sorted(jobs)  # each ran exactly once


def test_hundreds_of_concurrent_calls_wait_for_redis_instead_of_failing(cluster):
    # More calls in flight than redis-py's default pool of 100 connections.
    import asyncio

    from elric.rpc import AsyncClient

    host, port = cluster.address.rsplit(":", 1)

    async def main():
        clients = [await AsyncClient.connect(host, int(port)) for _ in range(3)]
        try:
            calls = [c.call("list_jobs", {"limit": 10}) for c in clients for _ in range(100)]
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            for c in clients:
                await c.close()

    results = asyncio.run(main())
    errors = [r for r in results if isinstance(r, Exception)]
    assert errors == []
    assert cluster.client.ping() == "pong"


# --- a worker that ran fast jobs holds no more slow ones than it can start ------------------

@pytest.mark.parametrize("fast", [Echo, AsyncAdd])
def test_slow_jobs_after_fast_ones_go_to_a_worker_started_later(cluster, tmp_path, fast):
    """Fast jobs grew the first worker's fetches (sync ones its batches, async ones its
    room for async jobs): it claimed every slow job queued next and held them, so a second
    worker got none and they ran two at a time. Once it sees a run go on, it gives back what
    it cannot start, without using an attempt; the second worker starts them while the first
    two still run."""
    c = cluster.client
    marks, gate = tmp_path / "started.txt", tmp_path / "gate"
    first = cluster.start_worker("--concurrency", "2")
    c.submit_jobs([fast.spec([i, i], job_id=f"fast-{i}") for i in range(300)])
    wait_for(lambda: c.stats()["by_status"]["succeeded"] == 300, what="the fast jobs done")
    n = 12
    c.submit_jobs([MarkUntilGate.spec([str(marks), str(gate)], job_id=f"slow-{i:02d}")
                   for i in range(n)])

    def started() -> list[str]:
        return marks.read_text().split() if marks.exists() else []
    wait_for(lambda: len(started()) == 2, what="the first worker running two slow jobs")
    cluster.start_worker("--concurrency", "2")
    # the first worker's two runs wait for the gate: any other start is the second's
    wait_for(lambda: len(started()) >= 4, timeout=15, what="the second worker starting slow jobs")
    gate.touch()
    wait_for(lambda: c.stats()["by_status"]["succeeded"] == 300 + n, timeout=60,
             what="every slow job done")
    assert sorted(started()) == [f"slow-{i:02d}" for i in range(n)]   # each ran once
    jobs = [c.get_job(f"slow-{i:02d}") for i in range(n)]
    assert all(j["attempts"] == 1 for j in jobs), jobs
    assert {worker_pid(j) for j in jobs} == {first.pid, cluster.procs[-1].pid}
    assert c.stats()["totals"]["redelivered"] == 0
