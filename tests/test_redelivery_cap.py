"""A job whose worker is lost over and over (a poison job: it runs its worker out of memory,
kills it, hangs its host) fails once MAX_REDELIVERIES is passed instead of going back in
line for good, taking down one worker after another.

In-process against the private redis-server, driving the queue as a fake worker would, and
a master in-process: a real worker's loss costs a lease and two process starts.
"""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import redis.asyncio as aredis

from elric.clock import redis_now
from elric.config import SettingsError, load_settings
from elric.contract import normalize_spec
from elric.keys import Keys
from elric.master import Master
from elric.queue import RedisQueue
from elric.redis_server import free_port
from tests.conftest import outcome, wait_for
from tests.jobs import Sleep
from tests.jobs_faults import KillWorker

KEYS = Keys("elrictest")
FUNC = "tests.jobs:Echo"


async def lose_its_run(q, r, worker, claims=None):
    """``worker`` claims job p and is lost: its lease runs out; then a recover pass. The
    claim goes in ``claims``."""
    [claim] = (await q.fetch(worker, ["default"], 1, 30)).claims
    assert claim.job_id == "p"
    if claims is not None:
        claims.append(claim)
    await r.zadd(KEYS.inflight, {"p": 0}, xx=True)
    return await q.recover()


def test_a_job_whose_worker_is_lost_past_max_redeliveries_fails(redis_url):
    """Each loss put the job back, for good: it failed only if it failed by itself. Past the
    cap it fails as a failed attempt does: status, error saying what to do, the failed
    index and TTL, the counters (total, its queue, its func, batch, minute), its round ends,
    its dedupe key given back (DEDUPE_RELEASE_ON_FAILURE); a rerun counts from 0 again."""
    async def body():
        r = aredis.Redis.from_url(redis_url)
        try:
            q = RedisQueue(r, KEYS, release_keys_on_failure=True, max_redeliveries=2,
                           failed_ttl=3600)
            await r.sadd(KEYS.dedupe_set("global"), "k")   # taken by its submit
            await q.enqueue([normalize_spec({"func": FUNC, "job_id": "p", "batch": "b",
                                             "round": "r", "dedupe_key": "k",
                                             "dedupe_scope": "global"})])
            for worker in ("w1", "w2"):
                assert await lose_its_run(q, r, worker) == (["p"], [], [])
            claims = []
            assert await lose_its_run(q, r, "w3", claims) == ([], [], ["p"])
            job = await q.get_job("p")
            assert (job["status"], job["attempts"], job["redelivered"], job["worker"]) == \
                ("failed", 3, 2, None)
            assert "worker holding it was lost 3 times (the last, w3," in job["error"]
            assert "MAX_REDELIVERIES (2)" in job["error"] and "`elric rerun p`" in job["error"]
            assert job["error"].startswith("--- attempt 3 ---\n")
            assert 3500 < await r.ttl(KEYS.job("p")) <= 3600
            assert await r.zscore(KEYS.status("failed"), "p") is not None
            assert not await r.zcard(KEYS.inflight) and not await r.zcard(KEYS.status("running"))
            assert not await r.zcard(KEYS.queue("default"))
            counters = {a.decode(): int(b) for a, b in (await r.hgetall(KEYS.counters)).items()
                        if not a.endswith(b"last_at")}
            assert (counters["failed"], counters["queue:default:failed"],
                    counters["redelivered"]) == (1, 1, 2)
            stats = await q.stats()
            assert stats["by_status"]["failed"] == 1
            assert stats["funcs"][FUNC]["failed"] == stats["batches"]["b"]["failed"] == 1
            assert stats["funcs"][FUNC]["live"] == 0
            assert sum(row["failed"] for row in stats["throughput"]) == 1
            assert await r.hmget(KEYS.round("r"), "submitted", "failed") == [b"1", b"1"]
            assert not await r.sismember(KEYS.dedupe_set("global"), "k")   # given back
            # w3 was only cut off: what it says of its run is not recorded (as it is not
            # of a run redelivered), nor answered as if it were
            assert await q.finish("w3", [outcome(claims[0])]) == ["stale"]
            assert (await q.get_job("p"))["status"] == "failed"
            # a rerun counts its redeliveries from 0 again
            assert await q.rerun("p") == "failed"
            for worker in ("w4", "w5"):
                assert await lose_its_run(q, r, worker) == (["p"], [], [])
            assert (await q.get_job("p"))["status"] == "queued"
        finally:
            await r.aclose()
    asyncio.run(body())


@pytest.mark.parametrize("cap", [0, None])
def test_max_redeliveries_0_fails_at_the_first_loss_and_none_never(redis_url, cap):
    async def body():
        r = aredis.Redis.from_url(redis_url)
        try:
            q = RedisQueue(r, KEYS, max_redeliveries=cap)
            await q.enqueue([normalize_spec({"func": FUNC, "job_id": "p"})])
            if cap == 0:
                assert await lose_its_run(q, r, "w1") == ([], [], ["p"])
                assert "worker holding it was lost once" in \
                    (await q.get_job("p"))["error"]
            else:
                for i in range(8):
                    assert await lose_its_run(q, r, f"w{i}") == (["p"], [], [])
        finally:
            await r.aclose()
    asyncio.run(body())


def test_the_master_fails_such_a_job_and_logs_it_as_an_error(redis_url, caplog):
    """A master's MAX_REDELIVERIES reaches its housekeeping, which names the job."""
    async def body():
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}",
            MAX_REDELIVERIES=0)))
        await m.start()
        try:
            await m.submit_jobs([{"func": FUNC, "job_id": "p"}])
            await m.queue.fetch("w1", ["default"], 1, 0)   # w1 is lost at once
            hk = m.housekeeping
            hk._redelivered_at, hk._hold_until = await redis_now(m.redis), 0   # no hold
            await hk._redeliver()
            assert (await m.queue.get_job("p"))["status"] == "failed"
        finally:
            await m.close()
    with caplog.at_level(logging.ERROR, logger="elric.master"):
        asyncio.run(body())
    [record] = [rec for rec in caplog.records if rec.levelno == logging.ERROR]
    assert "MAX_REDELIVERIES (0)" in record.getMessage() and ": p;" in record.getMessage()


def test_max_redeliveries_defaults_to_5_none_is_no_cap(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)   # no ./settings.py here
    assert load_settings(env={}).MAX_REDELIVERIES == 5
    assert load_settings(env={"ELRIC_MAX_REDELIVERIES": "none"}).MAX_REDELIVERIES is None
    assert load_settings(env={"ELRIC_MAX_REDELIVERIES": "0"}).MAX_REDELIVERIES == 0
    with pytest.raises(SettingsError, match="MAX_REDELIVERIES"):
        load_settings(env={"ELRIC_MAX_REDELIVERIES": "-1"})



def test_jobs_fetched_with_a_poison_job_survive_it(make_cluster):
    """Real workers: a job that SIGKILLs its worker, fetched with innocent ones. Lost with
    it, they kept their place and were fetched with it again by each next worker, and
    reached the cap with it, never run. A job lost twice is a suspect now, and a worker holds
    one at a time: the poison job alone is lost again, and fails; the others run."""
    c = make_cluster(LEASE_SECONDS=2, MAX_REDELIVERIES=3)
    c.start_master()
    innocents = [f"i{n}" for n in range(4)]
    # (they outlast the poison job's start in a process of their own: lost with it)
    c.client.submit_jobs([KillWorker.spec(job_id="p"),
                          *(Sleep.spec([0.3], job_id=i) for i in innocents)])
    ids = ["p", *innocents]

    def ended():
        return all(c.client.get_job(i)["status"] in ("succeeded", "failed") for i in ids)
    deadline = time.monotonic() + 120
    while not ended():   # a fresh worker each time the last one was lost
        assert time.monotonic() < deadline, c.logs()
        worker = c.start_worker("--concurrency", "4", wait=False)
        wait_for(lambda: not worker.alive() or ended(), timeout=60, backoff=True,
                 what="the worker lost, or every job ended")
    jobs = {i: c.client.get_job(i) for i in ids}
    assert {i: jobs[i]["status"] for i in innocents} == dict.fromkeys(innocents, "succeeded")
    assert jobs["p"]["status"] == "failed"
    assert "worker holding it was lost 4 times" in jobs["p"]["error"]
    assert "MAX_REDELIVERIES (3)" in jobs["p"]["error"]
    # lost with the first two workers at most: never again with the poison job
    assert all(jobs[i].get("redelivered", 0) <= 2 for i in innocents), jobs


def test_a_worker_takes_one_suspect_at_a_time(redis_url):
    """fetch.lua: a suspect (here: lost once, and once more would fail it) goes to a worker
    holding none, one at a time; the jobs behind it go on as ever."""
    async def body():
        r = aredis.Redis.from_url(redis_url)
        try:
            q = RedisQueue(r, KEYS, max_redeliveries=1)
            await q.enqueue([normalize_spec({"func": FUNC, "job_id": i}) for i in "pxy"])
            claims = (await q.fetch("w1", ["default"], 10, 30)).claims
            assert [(c.job_id, c.suspect) for c in claims] == \
                [("p", False), ("x", False), ("y", False)]
            await r.zadd(KEYS.inflight, {"p": 0, "x": 0}, xx=True)   # w1 lost; y ended
            await q.finish("w1", [outcome(claims[2])])
            assert sorted((await q.recover())[0]) == ["p", "x"]
            await q.enqueue([normalize_spec({"func": FUNC, "job_id": i}) for i in "mn"])

            async def fetched(worker, **how):
                return [(c.job_id, c.suspect) for c in
                        (await q.fetch(worker, ["default"], 10, 30, **how)).claims]
            assert await fetched("w2") == [("p", True), ("m", False), ("n", False)]
            assert await fetched("w3", holds_suspect=True) == []   # x waits for another
            assert await fetched("w4") == [("x", True)]
        finally:
            await r.aclose()
    asyncio.run(body())


def test_a_job_is_a_suspect_once_lost_twice_not_once(redis_url):
    """Lost once is most often a worker's death no job caused (a machine gone): its jobs
    run on as before, fetched together. Lost twice, a job runs apart."""
    async def body():
        r = aredis.Redis.from_url(redis_url)
        try:
            q = RedisQueue(r, KEYS, max_redeliveries=5)
            await q.enqueue([normalize_spec({"func": FUNC, "job_id": i}) for i in "xy"])
            for worker in ("w1", "w2"):   # each fetches both, and is lost with them
                claims = (await q.fetch(worker, ["default"], 10, 30)).claims
                assert [(c.job_id, c.suspect) for c in claims] == [("x", False), ("y", False)]
                await r.zadd(KEYS.inflight, {"x": 0, "y": 0}, xx=True)
                assert sorted((await q.recover())[0]) == ["x", "y"]
            got = [[(c.job_id, c.suspect) for c in
                    (await q.fetch(worker, ["default"], 10, 30)).claims] for worker in "uv"]
            assert got == [[("x", True)], [("y", True)]]
            await r.zadd(KEYS.inflight, {"x": 0}, xx=True)   # u lost: x alone counts
            assert (await q.recover())[0] == ["x"]
            assert [int(await r.hget(KEYS.job(i), "redelivered")) for i in "xy"] == [3, 2]
            [claim] = (await q.fetch("z", ["default"], 10, 30)).claims
            await q.finish("z", [outcome(claim)])
            await q.rerun("x")   # a rerun starts its count again: no suspect
            assert await r.hget(KEYS.job("x"), "suspect") is None
        finally:
            await r.aclose()
    asyncio.run(body())
