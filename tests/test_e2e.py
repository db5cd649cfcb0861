"""The whole path with real processes: submit over RPC, a worker runs it, the result is kept."""

from tests.conftest import wait_for
from tests.jobs import Add, Spawn


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
