"""docs/PROTOCOL.md's methods table, as a client in another language reads it: each method's
reply shape and error codes, against an in-process master over real RPC."""

from __future__ import annotations

import os

import pytest

from elric.contract import STATUSES
from elric.rpc import RemoteError
from tests.test_master_errors import answer, with_master

ADD = "tests.jobs:Add"
HOURLY = {"type": "interval", "hours": 1}


def test_every_method_answers_the_shape_and_codes_the_protocol_gives(redis_url):
    async def body(m, client):
        call = client.call
        assert await call("ping") == "pong" and await call("auth", "any") is True
        assert await answer(client, "ping", 1) == "bad_request"   # arity
        assert await answer(client, "no_such_method") == "method_not_found"

        health = await call("health")
        assert set(health) == {"master_id", "pid", "ok", "tasks", "now"}
        assert health["pid"] == os.getpid()   # (a master in this process)
        assert set(health["tasks"]) == {"scheduler", "housekeeping"}
        assert all(set(t) == {"state", "progress_at", "ok"} for t in health["tasks"].values())

        # (in a queue of its own: p's fire below is queued too, whenever the scheduler runs)
        assert await call("submit_job", {"func": ADD, "job_id": "a", "queue": "qa"}) == {
            "job_id": "a", "status": "queued"}
        assert await call("submit_job", {"func": ADD, "job_id": "a", "args": [9]}) == {
            "job_id": "a", "status": "queued"}   # an id that exists: its status, no change
        assert (await call("get_job", "a"))["args"] == []
        periodic = await call("submit_job", {"func": ADD, "job_id": "p", "trigger": HOURLY})
        assert set(periodic) == {"job_id", "status", "next_run_time"}
        assert periodic["status"] == "scheduled"
        with pytest.raises(RemoteError, match="^spec 1: ") as info:
            await call("submit_jobs", [{"func": ADD, "job_id": "b"}, {"func": ADD, "x": 1}])
        assert info.value.code == "bad_request" and await call("get_job", "b") is None
        with pytest.raises(RemoteError, match="10001 specs in one call; at most 10000"):
            await call("submit_jobs", [{"func": ADD}] * 10_001)

        assert await call("cancel_job", "a") == {"job_id": "a", "was": "queued",
                                                 "status": "cancelled"}
        assert await call("cancel_job", "a") == {"job_id": "a", "was": "cancelled",
                                                 "status": "cancelled"}
        assert await call("cancel_job", "p") == {"job_id": "p", "was": "scheduled",
                                                 "status": "scheduled"}
        assert await call("rerun_job", "a") == {"job_id": "a", "status": "queued"}
        assert await answer(client, "rerun_job", "a") == "bad_request"   # live
        for method in ("cancel_job", "rerun_job", "run_job"):
            assert await answer(client, method, "nope") == "not_found", method
        assert await answer(client, "modify_job", "nope", {}) == "not_found"
        assert await answer(client, "modify_job", "a", {}) == "bad_request"   # not periodic
        assert await answer(client, "control_worker", "nope", "stop") == "not_found"
        assert await answer(client, "control_worker", "nope", "reboot") == "bad_request"
        for method in ("remove_job", "pause_job", "resume_job"):
            assert await call(method, "nope") is False, method

        fire = await call("run_job", "p")
        assert set(fire) == {"job_id", "fire_id", "fire_time", "run"} and fire["run"] is None
        for wait in (-1, 21, "1", True, float("nan")):
            assert await answer(client, "run_job", "p", wait) == "bad_request", wait
        assert fire["fire_id"].startswith("p@") and fire["fire_id"].endswith("Z")
        assert await call("pause_job", "p") is True
        assert await answer(client, "run_job", "p") == "bad_request"   # paused
        [listed] = await call("list_jobs", {"status": "scheduled"})
        assert set(listed) == {"job_id", "func", "queue", "trigger", "trigger_text", "paused",
                               "next_run_time", "next_run_iso"}
        assert await answer(client, "list_jobs", {"status": "scheduled", "queue": "q"}) == \
            "bad_request"
        assert await answer(client, "list_jobs", {"limit": 1001}) == "bad_request"
        [summary] = await call("list_jobs", {"status": "queued", "queue": "qa"})
        assert "result" not in summary and summary["result_bytes"] == 0

        step = await call("bulk_jobs", "find", {"status": "queued", "queue": "qa"})
        assert step == {"touched": 1, "skipped": 0, "cursor": "", "errors": [], "ids": ["a"],
                        "not_found": []}
        assert await answer(client, "bulk_jobs", "find", {}) == "bad_request"
        stats = await call("stats")
        assert {"by_status", "by_queue", "totals", "batches", "funcs", "more", "now", "throughput",
                "workers", "filters", "scheduler"} <= set(stats)
        assert set(stats["by_status"]) == set(STATUSES)
    with_master(redis_url, body)


def test_a_one_off_job_sent_with_a_periodic_jobs_id_changes_nothing(redis_url):
    """A one-off spec naming a periodic job's id was queued beside it: get_job then showed
    the one-off job and hid the periodic one, and remove_job deleted both. An id that
    exists changes nothing, whichever kind of job has it."""
    async def body(m, client):
        stored = await client.call("submit_job", {"func": ADD, "job_id": "site",
                                                  "trigger": HOURLY})
        assert await client.call("submit_job", {"func": ADD, "job_id": "site"}) == stored
        assert (await client.call("get_job", "site"))["status"] == "scheduled"
        assert (await client.call("stats"))["totals"]["submitted"] == 0
        # a time whose index score (ms) read back is not the same float: the reply's is
        # the stored one, not one digit off
        when = {"type": "date", "run_date": 1900119807.942459}
        stored = await client.call("submit_job", {"func": ADD, "job_id": "d", "trigger": when})
        assert stored["next_run_time"] == 1900119807.942459
        assert await client.call("submit_job", {"func": ADD, "job_id": "d"}) == stored
    with_master(redis_url, body)


def test_a_periodic_job_sent_with_a_one_off_jobs_id_changes_nothing(redis_url):
    """The other way round: the schedule was stored beside the queued job, and get_job
    showed the one-off job and hid it."""
    async def body(m, client):
        queued = await client.call("submit_job", {"func": ADD, "job_id": "once"})
        for replace in (False, True):
            again = await client.call("submit_job", {"func": ADD, "job_id": "once",
                                                     "trigger": HOURLY,
                                                     "replace_existing": replace})
            assert (again["job_id"], again["status"]) == ("once", queued["status"])
        assert await client.call("list_jobs", {"status": "scheduled"}) == []
        assert (await client.call("get_job", "once"))["status"] == "queued"
    with_master(redis_url, body)


def test_modify_job_refuses_a_new_job_id(redis_url):
    """modify_job answered OK to {"job_id": "other"} and kept the old id: the rename the
    caller asked for was dropped in silence."""
    async def body(m, client):
        await client.call("submit_job", {"func": ADD, "job_id": "p", "trigger": HOURLY})
        with pytest.raises(RemoteError, match="a job_id cannot change") as info:
            await client.call("modify_job", "p", {"job_id": "other", "args": [1]})
        assert info.value.code == "bad_request"
        assert (await client.call("get_job", "p"))["args"] == []
        assert (await client.call("modify_job", "p", {"job_id": "p", "args": [1]}))["args"] == [1]
    with_master(redis_url, body)
