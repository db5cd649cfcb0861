"""health: what each background task of a master is doing and when it last got something
done; scheduling goes on after a Redis restart; a task that ends takes its master down
with a non-zero exit, so a supervisor starts it again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from elric.redis_server import RedisServer, free_port
from tests.conftest import ROOT, Cluster, wait_for
from tests.jobs import Echo


def fire_times(client, schedule):
    return [j["fire_time"] for j in client.list_jobs(limit=1000) if j.get("schedule") == schedule]


def elric_health(c: Cluster) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "elric", "health"], cwd=ROOT, env=c.env,
                          capture_output=True, text=True, timeout=60)


def test_health_and_scheduling_ride_out_a_redis_restart(tmp_path):
    server = RedisServer(appendonly=True).start()
    c = Cluster(server.url, tmp_path)
    try:
        master = c.start_master()
        c.start_worker("--concurrency", "1")
        c.client.submit_job(Echo.spec([], job_id="tick", trigger={"type": "interval",
                                                                  "seconds": 1}))
        wait_for(lambda: len(fire_times(c.client, "tick")) >= 2, what="the schedule firing")
        health = c.client.health()
        assert health["ok"] and set(health["tasks"]) == {"scheduler", "housekeeping"}, health
        assert health["tasks"]["scheduler"]["state"].startswith("scheduling"), health
        assert elric_health(c).returncode == 0

        server.stop()
        wait_for(lambda: "retrying" in c.client.health()["tasks"]["housekeeping"]["state"],
                 what="health showing the outage")
        # not ok at once, not only once the outage has lasted longer than a task's staleness
        assert c.client.health()["ok"] is False
        during = elric_health(c)
        assert during.returncode == 1 and "retrying" in during.stdout, during.stdout
        down = time.monotonic()   # 3 s down: what is tested, not a wait for something
        wait_for(lambda: time.monotonic() - down >= 3, interval=0.1, what="3 s of outage")
        server.start()
        up = time.time()
        wait_for(lambda: any(t > up for t in fire_times(c.client, "tick")), timeout=30,
                 what="a fire after the restart")
        wait_for(lambda: c.client.health()["tasks"]["housekeeping"]["state"].startswith(
            "redelivering"), what="housekeeping back at work")
        assert c.client.health()["ok"] and master.alive()
    finally:
        c.close()
        server.cleanup()


def test_a_background_task_that_ends_takes_its_master_down_non_zero(redis_url, monkeypatch):
    from elric.config import load_settings
    from elric.housekeeping import Housekeeping
    from elric.master import Master

    async def ends(self):   # a bug that makes the loop return
        return None
    monkeypatch.setattr(Housekeeping, "run", ends)
    settings = load_settings(env={"ELRIC_REDIS_URL": redis_url,
                                  "ELRIC_MASTER_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert asyncio.run(asyncio.wait_for(Master(settings).run(), 60)) == 1
