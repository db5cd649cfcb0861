"""Periodic jobs end to end: real redis-server, real master and worker processes, RPC only.

Every wait is a condition with a deadline. Where a test must show that something does NOT
happen (a paused or removed job does not fire), it waits for fires of a second periodic
"witness" job instead of sleeping, so the window is measured in scheduler passes.
"""

from __future__ import annotations

import math
import signal
import time

import pytest

from elric.client import MasterClient, set_default_client
from elric.redis_server import free_port
from elric.rpc import RemoteError
from tests.conftest import wait_for
from tests.jobs import Echo, Sleep
from tests.test_cli import elric

EVERY_SECOND = {"type": "interval", "seconds": 1}


def fires(client, schedule: str) -> list[dict]:
    """The fired jobs of one periodic job (any status), oldest fire first."""
    jobs = [client.get_job(j["job_id"]) for j in client.list_jobs(limit=1000)
            if j.get("schedule") == schedule]
    return sorted((j for j in jobs if j), key=lambda j: j["fire_time"])


def fired_after(client, schedule: str, t: float) -> list[dict]:
    return [j for j in fires(client, schedule) if j["fire_time"] > t]


def wait_fires(client, schedule: str, n: int, *, after: float = -math.inf,
               status=None, timeout: float = 15.0) -> list[dict]:
    """Wait until ``n`` fires with fire_time > ``after`` exist (in ``status`` if given)."""
    def enough():
        got = [j for j in fired_after(client, schedule, after)
               if status is None or j["status"] in status]
        return got if len(got) >= n else None
    return wait_for(enough, timeout=timeout, what=f"{n} fire(s) of {schedule}")


def aligned_start(lead: float = 1.0) -> float:
    """A whole second at least ``lead`` s ahead: fire ids and times are then exact."""
    return float(math.ceil(time.time() + lead))


def iso_z(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


# --- 1. submit over RPC, fires, get/list, pause/resume, modify, remove ----------------------

def test_interval_job_fires_as_normal_jobs_and_is_inspectable(cluster):
    c = cluster.client
    cluster.start_worker("--concurrency", "2")
    reply = c.submit_job(Echo.spec(["v1"], job_id="tick", trigger=EVERY_SECOND))
    assert reply["job_id"] == "tick" and reply["status"] == "scheduled"
    assert reply["next_run_time"] > time.time() - 1

    done = wait_fires(c, "tick", 2, status=("succeeded",))
    for j in done:  # a fire is an ordinary job with a derived id, run by the worker
        assert j["job_id"].startswith("tick@") and j["job_id"].endswith("Z")
        assert j["func"] == "tests.jobs:Echo" and j["result"] == {"args": ["v1"], "kwargs": {}}
        assert j["enqueued_at"] >= j["fire_time"] - 0.01
        assert c.get_job(j["job_id"])["schedule"] == "tick"
    assert len({j["job_id"] for j in fires(c, "tick")}) == len(fires(c, "tick"))

    job = c.get_job("tick")
    assert job["status"] == "scheduled" and job["func"] == "tests.jobs:Echo"
    assert job["trigger"]["type"] == "interval" and job["trigger"]["seconds"] == 1
    assert job["trigger"]["timezone"] == "UTC" and job["trigger"]["start_date"]
    assert "interval" in job["trigger_text"]
    assert job["next_run_time"] > done[-1]["fire_time"] and job["next_run_iso"]
    by_id = {r["job_id"]: r for r in job["runs"]}
    for j in done:
        run = by_id[j["job_id"]]
        assert run["outcome"] == "succeeded" and run["fire_time"] == j["fire_time"]
        assert isinstance(run["duration"], float) and run["duration"] >= 0

    [listed] = c.list_jobs(status="scheduled")
    assert listed["job_id"] == "tick" and listed["paused"] is False
    assert listed["next_run_time"] > done[-1]["fire_time"] and listed["next_run_iso"]
    assert c.stats()["by_status"]["scheduled"] == 1

    # pause: no fire time after the pause; a witness job shows the scheduler kept running
    c.submit_job(Echo.spec(["w"], job_id="witness", trigger=EVERY_SECOND))
    assert c.call("pause_job", "tick") is True
    paused_at = time.time()
    assert c.get_job("tick")["status"] == "paused"
    assert c.list_jobs(status="scheduled")[-1]["paused"] is True  # paused ones list last
    wait_fires(c, "witness", 3, after=paused_at)
    assert fired_after(c, "tick", paused_at) == []

    assert c.call("resume_job", "tick") is True
    resumed_at = time.time()
    assert c.get_job("tick")["status"] == "scheduled"
    wait_fires(c, "tick", 2, after=resumed_at)
    assert c.call("pause_job", "no-such") is False
    assert c.call("resume_job", "no-such") is False


def test_modify_changes_args_and_trigger_and_remove_stops_it(cluster):
    c = cluster.client
    cluster.start_worker("--concurrency", "2")
    c.submit_job(Echo.spec(["v1"], job_id="tick", trigger=EVERY_SECOND))
    wait_fires(c, "tick", 1, status=("succeeded",))

    out = c.call("modify_job", "tick", {"args": ["v2"]})
    modified_at = time.time()
    assert out["args"] == ["v2"] and out["trigger"]["seconds"] == 1
    new = wait_fires(c, "tick", 2, after=modified_at, status=("succeeded",))
    assert all(j["result"]["args"] == ["v2"] for j in new)  # the next fires use the new args

    out = c.call("modify_job", "tick", {"trigger": {"type": "interval", "seconds": 2}})
    retriggered_at = time.time()
    assert out["trigger"]["seconds"] == 2 and out["args"] == ["v2"]
    assert c.get_job("tick")["trigger"]["seconds"] == 2
    a, b = wait_fires(c, "tick", 2, after=retriggered_at)[:2]
    assert b["fire_time"] - a["fire_time"] == pytest.approx(2.0, abs=1e-3)

    with pytest.raises(RemoteError, match="no periodic job 'no-such'") as info:
        c.call("modify_job", "no-such", {"args": []})
    assert info.value.code == "not_found"

    c.submit_job(Echo.spec(["w"], job_id="witness", trigger=EVERY_SECOND))
    assert c.remove_job("tick") is True
    removed_at = time.time()
    assert c.get_job("tick") is None
    assert [j["job_id"] for j in c.list_jobs(status="scheduled")] == ["witness"]
    wait_fires(c, "witness", 3, after=removed_at)
    assert fired_after(c, "tick", removed_at) == []
    assert c.remove_job("tick") is False


def test_modify_with_the_trigger_it_has_keeps_its_next_run_and_does_not_fire_again(cluster):
    """modify_job with the job's own trigger (a script sending its whole schedule with new
    args) restarted it: an interval's next fire moved away on every call, and a date job
    that had fired fired a second time."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    hourly = {"type": "interval", "hours": 1}
    planned = c.submit_job(Echo.spec(["v1"], job_id="hourly", trigger=hourly))["next_run_time"]
    for trigger in (hourly, c.get_job("hourly")["trigger"]):   # as sent, or as shown
        out = c.call("modify_job", "hourly", {"args": ["v2"], "trigger": trigger})
        assert (out["args"], out["next_run_time"]) == (["v2"], planned)

    date = {"type": "date", "run_date": time.time() + 1}
    c.submit_job(Echo.spec(["d1"], job_id="once", trigger=date))
    wait_for(lambda: c.get_job("once")["status"] == "finished", what="its one fire")
    [fired] = c.get_job("once")["runs"]
    out = c.call("modify_job", "once", {"args": ["d2"], "trigger": date})
    assert (out["status"], out["args"], out["next_run_time"]) == ("finished", ["d2"], None)
    assert [r["job_id"] for r in c.get_job("once")["runs"]] == [fired["job_id"]]
    # another trigger is new: it restarts from now
    out = c.call("modify_job", "hourly", {"trigger": {"type": "interval", "hours": 2}})
    assert out["next_run_time"] > planned


# --- 2. replace_existing -----------------------------------------------------------------

def test_replace_existing_does_not_double_the_schedule(cluster):
    c = cluster.client
    spec = Echo.spec(["x"], job_id="rep", trigger=EVERY_SECOND, replace_existing=True,
                     max_instances=1000)  # no worker: fires stay queued, none is skipped
    first = c.submit_job(spec)
    second = c.submit_job(spec)  # "running the submitting script again"
    assert first["status"] == second["status"] == "scheduled"
    shift = second["next_run_time"] - first["next_run_time"]  # 0, or 1 if a fire came between
    assert shift == pytest.approx(round(shift), abs=1e-3) and shift >= 0  # same phase
    assert [j["job_id"] for j in c.list_jobs(status="scheduled")] == ["rep"]

    got = wait_fires(c, "rep", 5)
    times = [j["fire_time"] for j in fires(c, "rep")]
    assert len(set(times)) == len(times)
    assert all(b - a == pytest.approx(1.0, abs=1e-3) for a, b in zip(times, times[1:])), times
    span = times[-1] - times[0]
    assert len(times) == round(span) + 1  # one fire per second over the window, not two
    assert got[0]["fire_time"] == pytest.approx(first["next_run_time"], abs=1e-3)

    plain = Echo.spec(["y"], job_id="rep", trigger=EVERY_SECOND)
    with pytest.raises(RemoteError) as err:
        c.submit_job(plain)
    assert "'rep'" in str(err.value) and "already exists" in str(err.value)
    assert "replace_existing" in str(err.value)
    assert c.get_job("rep")["args"] == ["x"]


def test_a_periodic_job_without_a_job_id_is_refused_not_scheduled_again_at_each_run(cluster):
    """Each run of a submitting script got a schedule of its own under a fresh id: a crawl
    every 15 minutes ran twice as often after the script ran twice."""
    c = cluster.client
    for _ in range(2):   # "running the submitting script again"
        with pytest.raises(RemoteError, match="a periodic job needs one of your choosing"):
            c.submit_job(Echo.spec(["x"], trigger=EVERY_SECOND))
    assert c.list_jobs(status="scheduled") == []


# --- 3. invalid triggers ------------------------------------------------------------------

BAD = [
    ({"type": "interval", "seconds": 1, "colour": "red"}, "trigger.colour"),
    ({"type": "cron", "crontab": "61 * * * *"}, "trigger.crontab"),
    ({"type": "cron", "crontab": "*/15 * * *"}, "trigger.crontab"),
    ({"type": "cron", "minute": "*/75"}, "trigger.minute"),
    ({"type": "interval", "seconds": 1, "start_date": "2030-01-02T00:00:00Z",
      "end_date": "2030-01-01T00:00:00Z"}, "trigger.end_date"),
    ({"type": "cron", "hour": 2, "timezone": "Mars/Olympus_Mons"}, "trigger.timezone"),
    ({"type": "hourly"}, "trigger.type"),
    ({"type": "interval"}, "trigger.interval"),
    ({"type": "date", "run_date": "soon"}, "trigger.run_date"),
]


def test_invalid_triggers_are_refused_naming_the_field_and_the_master_stays_up(cluster):
    c = cluster.client
    for trigger, field in BAD:
        with pytest.raises(RemoteError) as err:
            c.submit_job(Echo.spec([], job_id="bad", trigger=trigger))
        assert f"{field}:" in str(err.value) and "'bad'" in str(err.value), (trigger, err.value)
        assert c.ping() == "pong"
    for options, name in [({"coalesce": "sometimes"}, "coalesce"),
                          ({"max_instances": 0}, "max_instances"),
                          ({"misfire_grace_time": -1}, "misfire_grace_time")]:
        with pytest.raises(RemoteError, match=name):
            c.submit_job(Echo.spec([], job_id="bad", trigger=EVERY_SECOND, **options))
    with pytest.raises(RemoteError, match="'trigger' must be map"):
        c.submit_job(Echo.spec([], job_id="bad", trigger="every minute"))
    assert c.get_job("bad") is None and c.stats()["by_status"]["scheduled"] == 0

    # a good one next to it, and a bad modify leaves it as it was
    c.submit_job(Echo.spec([], job_id="good", trigger={"type": "cron", "crontab": "0 3 * * *",
                                                       "timezone": "Europe/Berlin"}))
    with pytest.raises(RemoteError, match="trigger.timezone"):
        c.call("modify_job", "good", {"trigger": {"type": "cron", "hour": 3,
                                                  "timezone": "Nowhere/Land"}})
    good = c.get_job("good")
    assert good["trigger"]["crontab"] == "0 3 * * *"
    assert good["trigger"]["timezone"] == "Europe/Berlin"
    assert cluster.procs[0].alive() and c.ping() == "pong"


# --- 4. the store survives a master restart ----------------------------------------------

def test_schedule_survives_a_master_restart(cluster):
    c = cluster.client
    c.submit_job(Echo.spec(["r"], job_id="keep", trigger=EVERY_SECOND, max_instances=1000))
    before = wait_fires(c, "keep", 2)
    phase = before[0]["fire_time"]
    old = cluster.procs[0]
    assert old.stop(timeout=20) == 0
    stopped_at = time.time()

    cluster.start_master()  # a new process on the same address and Redis
    job = c.get_job("keep")  # the client reconnects
    assert job["status"] == "scheduled" and job["args"] == ["r"]
    assert job["trigger"]["seconds"] == 1
    assert {r["job_id"] for r in job["runs"]} >= {j["job_id"] for j in before}
    after = wait_fires(c, "keep", 2, after=stopped_at)
    for j in after:  # same schedule, same phase
        assert (j["fire_time"] - phase) == pytest.approx(round(j["fire_time"] - phase), abs=1e-3)
    times = [j["fire_time"] for j in fires(c, "keep")]
    assert len(set(times)) == len(times)


# --- 5. two masters: one schedules; SIGKILL it and the other takes over ----------------------

LEASE = 3


def test_two_masters_fire_once_and_fail_over_with_coalescing(make_cluster):
    cl = make_cluster(SCHEDULER_LEASE=LEASE)
    cl.start_master()
    other_address = f"127.0.0.1:{free_port()}"
    cl.start_master(address=other_address)
    masters = [(cl.procs[0], MasterClient(cl.address)), (cl.procs[1], MasterClient(other_address))]
    try:
        n = 15
        start = aligned_start(1.5)
        trigger = {"type": "interval", "seconds": 1, "start_date": iso_z(start),
                   "end_date": iso_z(start + n - 1)}  # exactly n fire times
        c = masters[1][1]  # submit through the master that will not be the leader, mostly
        c.submit_job(Echo.spec([], job_id="ha", trigger=trigger, max_instances=1000))

        def leader():
            found = [(p, m) for p, m in masters
                     if m.stats()["scheduler"]["this_master_schedules"]]
            return found[0] if len(found) == 1 else None
        wait_fires(c, "ha", 5, timeout=20)
        wait_for(lambda: 0.3 < time.time() % 1 < 0.7, what="mid-second")  # not during a fire
        lead_proc, _ = wait_for(leader, what="exactly one scheduling master")
        [survivor] = [m for p, m in masters if p is not lead_proc]
        lead_proc.signal(signal.SIGKILL)
        killed_at = time.time()
        lead_proc.wait(timeout=10)
        wait_for(lambda: survivor.stats()["scheduler"]["this_master_schedules"],
                 timeout=LEASE + 5, what="the other master takes over")

        wait_for(lambda: survivor.get_job("ha")["status"] == "finished", timeout=n + 10,
                 what="the schedule to finish")
        got = fires(survivor, "ha")
        ids = [j["job_id"] for j in got]
        times = [j["fire_time"] for j in got]
        assert len(set(ids)) == len(ids) and len(set(times)) == len(times)  # none doubled
        steps = [round(t - start, 3) for t in times]
        assert all(s == int(s) and 0 <= s < n for s in steps), steps
        assert ids == [f"ha@{iso_z(t)}" for t in times]

        runs = survivor.get_job("ha")["runs"]
        assert sorted(r["job_id"] for r in runs) == sorted(ids)  # every fire recorded once
        coalesced = sum(r.get("coalesced", 0) for r in runs)
        assert len(got) + coalesced == n, (steps, runs)  # no fire lost, none doubled
        assert coalesced >= 1  # the kill lasted ≥ 2 intervals: caught up with one run

        # spaced by 1 s, except one gap: the fires coalesced into the catch-up run
        gaps = [b - a for a, b in zip(steps, steps[1:])]
        assert sorted(gaps)[:-1] == [1] * (len(gaps) - 1) and max(gaps) == 1 + coalesced
        catch_up = next(j for j in got if j["enqueued_at"] > killed_at)
        print(f"fires at +{steps}s; killed at +{killed_at - start:.2f}s; catch-up "
              f"{catch_up['job_id']} queued {catch_up['enqueued_at'] - killed_at:.2f}s after "
              f"the kill, coalescing {coalesced}")
        assert catch_up["enqueued_at"] - killed_at < LEASE + 2.0, catch_up
        assert catch_up["enqueued_at"] - catch_up["fire_time"] < LEASE + 2.0
        late_runs = [r for r in runs if r.get("coalesced")]
        assert [r["job_id"] for r in late_runs] == [catch_up["job_id"]]
        for j in got:
            if j is not catch_up:  # every other fire was queued on time
                assert j["enqueued_at"] - j["fire_time"] < 1.0, j
    finally:
        for _, m in masters:
            m.close()


# --- 6. max_instances --------------------------------------------------------------------

def test_max_instances_skips_a_fire_while_the_previous_one_runs(cluster):
    c = cluster.client
    cluster.start_worker("--concurrency", "2")  # room to run two at once, if it were allowed
    c.submit_job(Sleep.spec([2.2], job_id="slow", trigger=EVERY_SECOND))

    def enough():
        job = c.get_job("slow")
        skipped = [r for r in job["runs"] if r["outcome"] == "skipped"]
        done = [r for r in job["runs"] if r["outcome"] == "succeeded"]
        return job if len(done) >= 2 and skipped else None
    job = wait_for(enough, timeout=20, what="two runs and a skipped fire")
    skipped = [r for r in job["runs"] if r["outcome"] == "skipped"]
    assert all(r["reason"] == "max_instances" for r in skipped)
    ran = fires(c, "slow")
    assert not {r["job_id"] for r in skipped} & {j["job_id"] for j in ran}  # never queued
    started = sorted((j["started_at"], j["finished_at"]) for j in ran if j["started_at"])
    for (_, end), (begin, _) in zip(started, started[1:]):
        assert end is not None and begin >= end, started  # never two at once


def test_run_job_fires_now_a_cron_keeps_its_calendar_and_a_date_job_finishes(cluster):
    c = cluster.client
    c.submit_job(Echo.spec(job_id="yearly", trigger={"type": "cron", "crontab": "0 0 1 1 *"}))
    c.submit_job(Echo.spec(job_id="once", trigger={"type": "date",
                                                   "run_date": time.time() + 3600}))
    planned = c.get_job("yearly")["next_run_time"]
    for job_id in ("yearly", "once"):
        fire = c.call("run_job", job_id)["fire_id"]
        wait_for(lambda: any(r["job_id"] == fire for r in c.get_job(job_id)["runs"]),
                 what=f"{fire} recorded")
        assert c.get_job(fire)["status"] == "queued"   # no worker here
    assert c.get_job("yearly")["next_run_time"] == planned
    assert c.get_job("once")["status"] == "finished"
    with pytest.raises(RemoteError, match="finished") as info:
        c.call("run_job", "once")
    assert info.value.code == "bad_request"
    with pytest.raises(RemoteError, match="no periodic job 'nope'") as info:
        c.call("run_job", "nope")
    assert info.value.code == "not_found"



def test_pause_job_of_a_finished_periodic_job_is_refused_not_answered_true(cluster):
    """pause_job of a date job that had fired answered true (it exists) and changed nothing:
    a script, or the dashboard, read it as paused. It is refused as run_job refuses it."""
    c = cluster.client
    c.submit_job(Echo.spec(job_id="once", trigger={"type": "date",
                                                   "run_date": time.time() + 3600}))
    c.call("run_job", "once")
    wait_for(lambda: c.get_job("once")["status"] == "finished", what="its one fire")
    with pytest.raises(RemoteError) as info:
        c.call("pause_job", "once")
    assert (info.value.code, str(info.value)) == (
        "bad_request", "periodic job 'once' has finished: no fires are left to pause")
    assert c.get_job("once")["paused"] is False
    assert c.call("pause_job", "nope") is False

# --- 7. the periodic crawl example --------------------------------------------------------

def test_periodic_crawl_fetches_every_page_once_per_round(cluster):
    from examples.periodic_crawl import schedule
    from examples.site import DemoSite

    c = cluster.client
    cluster.start_worker("--queues", "crawl", "--concurrency", "2")
    with DemoSite(pages=25) as site:
        set_default_client(c)
        try:
            assert schedule(site.url, seconds=1) == "site"
            assert schedule(site.url, seconds=1) == "site"  # re-running replaces it
        finally:
            set_default_client(None)
        assert c.get_job("site")["trigger"]["seconds"] == 1
        assert [j["job_id"] for j in c.list_jobs(status="scheduled")] == ["site"]

        wait_fires(c, "site", 3, status=("succeeded",), timeout=20)
        assert c.call("pause_job", "site") is True  # no new round; let the last one finish
        wait_for(lambda: (lambda s: all(s[k] == 0 for k in ("queued", "running", "retrying")))(
            c.stats()["by_status"]), timeout=20, what="the crawl queue drained")

        rounds = fires(c, "site")
        assert len(rounds) >= 3 and all(j["status"] == "succeeded" for j in rounds)
        for j in rounds:  # each round its own dedupe scope, which its children inherit
            assert j["dedupe_scope"] == j["job_id"]
        hits = site.page_hits()
        assert sorted(hits) == sorted(site.paths())
        assert {path: n for path, n in hits.items() if n != len(rounds)} == {}, (
            len(rounds), site.hits)
        # robots.txt: read once per round in each pool process at most
        assert len(rounds) <= site.hits["/robots.txt"] <= 2 * len(rounds)
        assert c.stats()["totals"]["failed"] == 0


def test_a_batch_with_one_bad_trigger_stores_nothing(cluster):
    from elric.rpc import RemoteError
    from tests.jobs import Add

    good = Add.spec([1, 1], job_id="good", trigger={"type": "interval", "seconds": 5})
    bad = Add.spec([1, 1], job_id="bad", trigger={"type": "interval", "secs": 5})
    with pytest.raises(RemoteError, match=r"spec 1: job 'bad': trigger\.secs"):
        cluster.client.submit_jobs([good, bad])
    assert cluster.client.get_job("good") is None
    assert cluster.client.list_jobs(status="scheduled") == []


@pytest.mark.parametrize("bad, error", [
    ({"trigger": {"type": "date", "run_date": "2020-01-01T00:00:00Z"}}, "trigger.run_date"),
    ({"trigger": {"type": "interval", "seconds": 0.5}}, "MIN_INTERVAL"),
    ({"job_id": "kept", "args": [2, 2]}, "already exists"),
])
def test_a_batch_refused_by_the_job_store_stores_nothing_either(cluster, bad, error):
    """What only the job store checks (a past date, MIN_INTERVAL, an id taken) refused the
    call after the batch's other periodic jobs were stored: the caller, told nothing was
    done, left a schedule firing."""
    from elric.rpc import RemoteError
    from tests.jobs import Add

    hourly = {"type": "interval", "hours": 1}
    cluster.client.submit_job(Add.spec([1, 1], job_id="kept", trigger=hourly))
    good = Add.spec([1, 1], job_id="good", trigger=hourly)
    bad = {**Add.spec([1, 1], job_id="bad", trigger=hourly), **bad}
    with pytest.raises(RemoteError, match=rf"spec 1: job '{bad['job_id']}': .*{error}"):
        cluster.client.submit_jobs([good, bad])
    assert cluster.client.get_job("good") is None
    assert [j["job_id"] for j in cluster.client.list_jobs(status="scheduled")] == ["kept"]


def test_a_large_batch_of_periodic_jobs_is_stored_whole(cluster):
    # Stored concurrently: more at once than redis-py's default pool of 100 connections.
    from tests.jobs import Add

    specs = [Add.spec([i, i], job_id=f"many-{i}", trigger={"type": "interval", "hours": 1})
             for i in range(500)]
    replies = cluster.client.submit_jobs(specs)
    assert [r["status"] for r in replies] == ["scheduled"] * 500
    assert cluster.client.stats()["by_status"]["scheduled"] == 500


def test_a_job_removed_while_its_round_runs_and_added_again_does_not_overlap_it(cluster):
    """Removing a periodic job deleted the rounds it counted: added again under its id, it
    fired while the removed one's round still ran, two at once despite max_instances 1."""
    c = cluster.client
    cluster.start_worker("--concurrency", "2")
    spec = Sleep.spec([30], job_id="crawl", max_instances=1, trigger={"type": "interval",
                                                                      "hours": 1})
    c.submit_job(spec)
    first = c.run_job("crawl")["fire_id"]
    cluster.wait_job(first, statuses=("running",))
    assert c.remove_job("crawl") is True
    c.submit_job(spec)
    second = c.run_job("crawl")["fire_id"]
    runs = wait_for(lambda: c.get_job("crawl")["runs"] or None, what="the fire recorded")
    assert [(r["job_id"], r["outcome"], r.get("reason")) for r in runs] == [
        (second, "skipped", "max_instances")], runs
    assert c.get_job(first)["status"] == "running"
    assert c.remove_job("crawl") is True and c.remove_job("crawl") is False
    c.cancel_job(first)   # the worker's stop need not wait out its grace for it


def test_fires_the_dedupe_filter_drops_are_recorded_filtered_and_logged_once(cluster):
    """A dedupe key every fire shares (global scope, not "@fire") drops each fire after the
    first: each was recorded "enqueued" and counted fired, and nothing told the operator
    that nothing ran."""
    c = cluster.client
    # no worker: the first fire stays queued, holding the key (max_instances lets the
    # others through to the filter)
    c.submit_job(Echo.spec(job_id="tick", trigger=EVERY_SECOND, dedupe_key="same",
                           max_instances=5))

    def filtered():
        runs = c.get_job("tick")["runs"]
        return runs if sum(r["outcome"] == "filtered" for r in runs) >= 3 else None
    runs = wait_for(filtered, what="three fires recorded filtered")
    *later, first = runs   # newest first
    assert first["outcome"] == "queued", runs
    # (the newest may be marked and not through the filter yet)
    assert {r["outcome"] for r in later[1:]} == {"filtered"}, runs
    for r in later[1:]:
        assert r["reason"] == "dedupe_key" and c.get_job(r["job_id"]) is None
    fires = c.stats()["scheduler"]
    assert fires["filtered"] >= 3 and fires["fired"] >= fires["filtered"] + 1, fires
    # one warning names the job and its key, not one per fire
    warned = [line for line in cluster.logs().splitlines()
              if "periodic job tick: fire" in line and "filtered" in line]
    assert len(warned) == 1 and "WARNING" in warned[0] and "'same'" in warned[0], warned
    # run-now of it says the fire did not run
    proc = elric(cluster, "schedules", "run-now", "tick")
    assert proc.returncode == 1 and "filtered (dedupe_key)" in proc.stderr, proc


def test_modify_refuses_parent_and_round_and_nil_removes_a_timeout(cluster):
    """modify_job took `parent` and `round`, which only workers and masters set (every fire
    then claimed a parent it did not have), and refused nil for `timeout`, so a periodic
    job's timeout could not be removed but by removing the job."""
    c = cluster.client
    c.submit_job(Echo.spec(job_id="tick", trigger={"type": "interval", "hours": 1}, timeout=30))
    for key in ("parent", "round"):
        with pytest.raises(RemoteError) as err:
            c.modify_job("tick", {key: "other"})
        assert err.value.code == "bad_request" and f"{key!r} is elric's to set" in str(err.value)
    job = c.get_job("tick")
    assert job["parent"] == "" and "round" not in job and job["timeout"] == 30
    assert c.modify_job("tick", {"parent": ""})["parent"] == ""   # as it is: no change
    assert c.modify_job("tick", {"timeout": None})["timeout"] is None
    fire = c.run_job("tick")["fire_id"]
    assert cluster.wait_job(fire, statuses=("queued",))["timeout"] is None


def test_a_one_off_job_cannot_take_a_fires_id(cluster):
    """A one-off job submitted under an id shaped like a periodic job's fire id
    (``tick@<time>Z``) was accepted, and the fire at that time found the id taken: it never
    ran, and the job's runs showed the one-off's status as the fire's."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    at = aligned_start(3.0)
    fid = f"tick@{iso_z(at)}"
    for taker in (Echo.spec(["one-off"], job_id=fid),   # as a one-off, a periodic, a batch
                  Echo.spec(job_id=fid, trigger={"type": "interval", "hours": 1})):
        with pytest.raises(RemoteError) as err:
            c.submit_job(taker)
        assert err.value.code == "bad_request", err.value
        assert repr(fid) in str(err.value) and "reserved for the fires" in str(err.value)
    with pytest.raises(RemoteError, match="spec 1: job_id"):
        c.submit_jobs([Echo.spec(job_id="fine"), Echo.spec(job_id=f"x@{iso_z(at)}")])
    assert c.get_job("fine") is None   # the batch is refused whole
    c.submit_job(Echo.spec(["periodic"], job_id="tick", trigger={"type": "date",
                                                                 "run_date": at}))
    done = cluster.wait_job(fid)
    assert (done["status"], done["schedule"], done["result"]["args"]) == (
        "succeeded", "tick", ["periodic"])
    assert [(r["job_id"], r["outcome"]) for r in c.get_job("tick")["runs"]] == [
        (fid, "succeeded")]
    # an '@' alone is no fire id: such ids are taken as before
    for ok in ("digest@ops.example", "home@1", "a@2026-05-28", "a@2026-05-28T20:26:40"):
        assert c.submit_job(Echo.spec(job_id=ok))["status"] == "queued", ok


def test_every_fire_id_is_refused_as_a_submitted_job_id():
    from elric.contract import FIRE_ID
    from elric.jobstore import fire_id

    for t in (0.0, 1_780_000_000.0, 1_780_000_000.25, 1_780_000_000.000001, 253402300799.0):
        for job in ("tick", "a@b", "x@2026-01-01T00:00:00Z"):
            assert FIRE_ID.fullmatch(fire_id(job, t)), fire_id(job, t)
    for ok in ("tick", "digest@ops.example", "home@1", "@", "a@2026-05-28T20:26:40",
               "a@2026-05-28T20:26:40Zz"):
        assert not FIRE_ID.fullmatch(ok), ok


def test_a_one_off_job_cannot_take_a_key_in_a_fires_scope(cluster):
    """A fire with dedupe_scope "@fire" dedupes in a scope named by its fire id: a one-off
    job submitted into that scope (dedupe_scope 'tick@<time>Z') with the fire's key took
    it first, and the fire was dropped as a duplicate, never run. Jobs of the fire's round
    (its children inherit the scope and the round) still go in."""
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    at = aligned_start(3.0)
    fid = f"tick@{iso_z(at)}"
    with pytest.raises(RemoteError) as err:
        c.submit_job(Echo.spec(job_id="sneaky", dedupe_key="K", dedupe_scope=fid))
    assert err.value.code == "bad_request" and f"dedupe_scope {fid!r}" in str(err.value)
    assert c.get_job("sneaky") is None
    c.submit_job(Echo.spec(["periodic"], job_id="tick", dedupe_key="K", dedupe_scope="@fire",
                           trigger={"type": "date", "run_date": at}))
    done = cluster.wait_job(fid)
    assert (done["status"], done["result"]["args"]) == ("succeeded", ["periodic"]), done
    # one of its round (as its children are sent) may use the scope
    child = Echo.spec(job_id="child", dedupe_key="K2", dedupe_scope=fid, round=fid,
                      parent=fid)
    assert c.submit_job(child)["status"] == "queued"


def test_a_one_off_job_cannot_join_a_fires_round(cluster):
    """max_instances counts a fire's round while any job of it is live: a one-off job
    submitted with round 'tick@<time>Z' joined it, and held every later fire of that
    schedule back for as long as it waited or ran. Only a job whose parent is of the round
    (a fire's children, theirs) may name it; a round that is no fire id is counted by no
    schedule, and goes as before."""
    c = cluster.client   # no worker: the fire stays queued, its round live
    at = aligned_start(1.0)
    fid = f"tick@{iso_z(at)}"
    c.submit_job(Echo.spec(job_id="tick", trigger={"type": "date", "run_date": at}))
    wait_for(lambda: c.get_job(fid), what="the fire queued")
    for parent in ({}, {"parent": "nobody"}, {"parent": "tick"}):
        with pytest.raises(RemoteError) as err:
            c.submit_jobs([Echo.spec(job_id="fine"), Echo.spec(job_id="sneaky", round=fid,
                                                               **parent)])
        assert err.value.code == "bad_request" and f"spec 1: round {fid!r}" in str(err.value)
        assert c.get_job("sneaky") is None and c.get_job("fine") is None
    assert c.submit_job(Echo.spec(job_id="child", round=fid, parent=fid))["status"] == "queued"
    assert c.submit_job(Echo.spec(job_id="grandchild", round=fid,
                                  parent="child"))["status"] == "queued"
    assert c.submit_job(Echo.spec(job_id="mine", round="crawl-7"))["status"] == "queued"


def test_a_fires_child_sent_while_redis_is_busy_is_not_refused_for_good(cluster):
    """The round check read the parent's round with errors kept in place: Redis busy with a
    long script (BUSY) made a fire's child a bad_request, so its worker failed the parent
    for good ("a child job was refused") and its children were never queued. A refusal
    that passes is redis_unavailable, which the worker sends again."""
    import threading

    import redis

    c = cluster.client
    at = aligned_start(1.0)
    fid = f"tick@{iso_z(at)}"
    c.submit_job(Echo.spec(job_id="tick", trigger={"type": "date", "run_date": at}))
    wait_for(lambda: c.get_job(fid), what="the fire queued")
    r = redis.Redis.from_url(cluster.redis_url)
    threshold = r.config_get("lua-time-limit")["lua-time-limit"]
    r.config_set("lua-time-limit", 50)
    busy = threading.Thread(target=lambda: redis.Redis.from_url(cluster.redis_url).eval(
        "local t = redis.call('TIME')[1] + 3 "
        "while tonumber(redis.call('TIME')[1]) < t do end", 0))
    busy.start()
    try:
        def refused() -> bool:
            try:
                r.ping()
            except redis.exceptions.ResponseError as exc:
                return str(exc).startswith("BUSY")
            return False
        wait_for(refused, what="Redis busy")
        with pytest.raises(RemoteError) as err:
            c.submit_job(Echo.spec(job_id="child", round=fid, parent=fid))
        assert err.value.code == "redis_unavailable", str(err.value)
    finally:
        busy.join()
        r.config_set("lua-time-limit", threshold)
        r.close()
    assert c.submit_job(Echo.spec(job_id="child", round=fid, parent=fid))["status"] == "queued"
