"""One clock: leases, retry backoffs and due times are judged by Redis's clock, so a master
whose own clock runs 2 minutes ahead (libfaketime, as a VM after a suspend) beside a worker
on real time neither steals running jobs nor drops or shifts fires."""

from __future__ import annotations

import time

import pytest

from elric.launch import faketime_lib
from tests.conftest import wait_for
from tests.jobs import Echo, Sleep


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
