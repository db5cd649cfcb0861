"""Crawl rounds with real processes: a periodic fire and every job descending from it are
one round; max_instances counts rounds still running, so a round that outlasts its
interval does not overlap the next one; the schedule shows each round's progress."""

from __future__ import annotations

from tests.conftest import wait_for
from tests.jobs_async import RoundRoot, RoundSomeFail


def rounds_of(c, schedule: str) -> dict[str, list[dict]]:
    jobs = [j for st in ("succeeded", "queued", "running", "failed")
            for j in c.list_jobs(status=st, limit=1000)]
    out: dict[str, list[dict]] = {}
    for j in jobs:
        if j.get("round"):
            out.setdefault(j["round"], []).append(j)
    return out


def test_a_round_that_outlasts_its_interval_does_not_overlap_the_next(cluster):
    cluster.start_worker("--concurrency", "1")
    c = cluster.client
    c.submit_job(RoundRoot.spec([3, 2.5], job_id="crawl", batch="site", max_instances=1,
                                trigger={"type": "interval", "seconds": 1}))

    def three_rounds_done():
        done = [r for r in rounds_of(c, "crawl").values()
                if len(r) == 4 and all(j["status"] == "succeeded" for j in r)]
        return len(done) >= 3

    wait_for(three_rounds_done, timeout=60, what="three rounds done")
    assert c.call("pause_job", "crawl") is True
    rounds = sorted(rounds_of(c, "crawl").values(),
                    key=lambda r: min(j["started_at"] for j in r))
    for jobs in rounds:
        fire = [j for j in jobs if j["job_id"] == j["round"]]
        assert len(fire) == 1 and fire[0]["schedule"] == "crawl"
        children = [j for j in jobs if j is not fire[0]]
        # children inherit the round and the batch of their fire
        assert all(j["parent"] == fire[0]["job_id"] and j["batch"] == "site"
                   for j in children), jobs
    # each round ends (its last child recorded) before the next round's fire is claimed:
    # its children run 2.5 s of a 1 s interval, and max_instances=1 counts the whole round
    for earlier, later in zip(rounds, rounds[1:]):
        if all(j["status"] == "succeeded" for j in earlier):
            assert max(j["finished_at"] for j in earlier) <= \
                min(j["started_at"] for j in later) + 0.01, (earlier, later)
    schedule = c.get_job("crawl")
    skipped = [r for r in schedule["runs"] if r.get("reason") == "max_instances"]
    assert skipped, schedule["runs"]   # fires that came while a round ran were skipped
    finished = [r["round"] for r in schedule["runs"] if "round" in r and r["round"]["live"] == 0
                and r["round"]["submitted"]]
    assert finished and all(p == {"submitted": 4, "live": 0, "succeeded": 4, "failed": 0}
                            for p in finished), schedule["runs"]


def test_a_cancelled_job_does_not_keep_its_round_running_forever(make_cluster):
    cluster = make_cluster(SHUTDOWN_GRACE=1)   # its children would run for 10 minutes
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    c = cluster.client
    c.submit_job(RoundRoot.spec([2, 600], job_id="stuck", max_instances=1,
                                trigger={"type": "interval", "seconds": 1}))
    leaves = wait_for(lambda: [j for r in rounds_of(c, "stuck").values() for j in r
                               if j["job_id"] != j["round"] and j["status"] == "running"
                               ] if len(rounds_of(c, "stuck")) == 1 else None,
                      timeout=30, what="the first round's children running")
    wait_for(lambda: len([j for r in rounds_of(c, "stuck").values() for j in r
                          if j["status"] == "running"]) == 2, what="both children running")
    first = next(iter(rounds_of(c, "stuck")))
    for leaf in rounds_of(c, "stuck")[first]:
        if leaf["job_id"] != first:
            assert c.cancel_job(leaf["job_id"])["status"] == "cancelling"
    assert leaves
    # the round has ended: the next fire starts a round of its own
    wait_for(lambda: len(rounds_of(c, "stuck")) >= 2, timeout=30, what="a second round")
    progress = [r["round"] for r in c.get_job("stuck")["runs"] if r.get("job_id") == first]
    assert progress == [{"submitted": 3, "live": 0, "succeeded": 1, "failed": 0}], \
        c.get_job("stuck")["runs"]
    assert c.call("pause_job", "stuck") is True


def test_a_periodic_job_shows_how_far_each_round_is(make_cluster):
    """A run showed only its fire's status, in `elric job` and on the dashboard:
    "succeeded" the moment a crawl's start page was fetched, its pages still to come."""
    from elric.redis_server import free_port
    from elric.triggers import every
    from tests.test_cli import elric
    from tests.test_dashboard import get

    port = free_port()
    cluster = make_cluster(SHUTDOWN_GRACE=1, DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    c = cluster.client
    run = _fired_now(cluster, RoundRoot.spec([2, 600], job_id="crawl", trigger=every(hours=1)))
    cluster.wait_job(run["job_id"])
    leaves = wait_for(lambda: [j for j in c.list_jobs(status="running")
                               if j.get("round") == run["job_id"]], what="the round's pages")
    out = elric(cluster, "job", "crawl")
    assert out.returncode == 0, out.stderr
    line = next(x for x in out.stdout.splitlines() if run["job_id"] in x)
    assert "succeeded" in line and "round: 2 live, 1 succeeded, 0 failed" in line, out.stdout
    assert "succeeded (2 live)" in get(f"http://127.0.0.1:{port}/schedules")[1]
    for leaf in leaves:
        c.cancel_job(leaf["job_id"])
    wait_for(lambda: c.get_job("crawl")["runs"][0]["round"]["live"] == 0, what="round ended")
    assert "round: 0 live, 1 succeeded, 0 failed" in elric(cluster, "job", "crawl").stdout
    # (no "live" left; the run links to its job)
    assert "succeeded</a>" in get(f"http://127.0.0.1:{port}/schedules")[1]


def test_the_schedules_page_says_a_round_had_failed_pages(make_cluster):
    """A round whose fire succeeded but whose pages failed (the site went down mid-round)
    showed as a grey "succeeded" on the dashboard's schedules page: nothing said a page
    failed but each periodic job's own page (or `elric job`)."""
    from elric.redis_server import free_port
    from elric.triggers import every
    from tests.test_cli import elric
    from tests.test_dashboard import get

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    c = cluster.client
    c.submit_job(RoundSomeFail.spec([1, 2], job_id="crawl", trigger=every(hours=1)))
    assert elric(cluster, "schedules", "run-now", "crawl").returncode == 0
    wait_for(lambda: (c.get_job("crawl")["runs"][0].get("round") or {}).get("failed") == 2
             and c.get_job("crawl")["runs"][0]["round"]["live"] == 0, what="the round ended")
    html = get(f"http://127.0.0.1:{port}/schedules")[1]
    run = next(line for line in html.splitlines() if "/jobs/crawl%40" in line)
    assert "succeeded (2 failed)</a>" in run and 'class="bad"' in run, run


def test_a_round_given_as_a_batch_is_named_a_round(cluster):
    """`elric jobs --batch ROUND`, a round's id taken for a batch, said "no job of it was
    submitted lately", of a round whose pages were just crawled."""
    from elric.triggers import every
    from tests.test_cli import elric, one_line_error

    cluster.start_worker("--concurrency", "1")
    run = _fired_now(cluster, RoundRoot.spec([1, 0], job_id="crawl", trigger=every(hours=1)))
    cluster.wait_job(run["job_id"])
    one_line_error(elric(cluster, "jobs", "--batch", run["job_id"]), 1,
                   f"{run['job_id']!r} is a round of periodic job 'crawl', not a batch")
    one_line_error(elric(cluster, "jobs", "--batch", "typo"), 1, "no batch 'typo': no job")


def _fired_now(cluster, spec: dict) -> dict:
    """Store ``spec``, a periodic job, and fire it now as an operator does: its one run."""
    from tests.test_cli import elric

    cluster.client.submit_job(spec)
    assert elric(cluster, "schedules", "run-now", spec["job_id"]).returncode == 0
    [run] = cluster.client.get_job(spec["job_id"])["runs"]
    return run
