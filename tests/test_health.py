"""health: what each background task of a master is doing and when it last got something
done; scheduling and work go on after a Redis restart and after their Redis connections
went silent; a task that ends takes its master down
with a non-zero exit, so a supervisor starts it again."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

from elric.redis_server import RedisServer, free_port
from elric.rpc import RemoteError
from tests.conftest import ROOT, Cluster, wait_for
from tests.jobs import Echo
from tests.silent_proxy import SilentProxy


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


def test_an_outage_is_logged_once_by_each_loop_not_at_each_retry(tmp_path):
    """Each loop logged every retry: a worker's heartbeat a line a second, housekeeping and
    the scheduler one per backoff, for as long as Redis was away. Now: a line when it
    starts, one when it is over."""
    server = RedisServer().start()
    c = Cluster(server.url, tmp_path)
    try:
        master = c.start_master()
        worker = c.start_worker("--concurrency", "1")
        server.stop()
        down = time.monotonic()   # 4 s down: what is tested, not a wait for something
        wait_for(lambda: time.monotonic() - down >= 4, interval=0.1, what="4 s of outage")
        server.start()
        wait_for(lambda: "heartbeat failed: works again" in worker.log()
                 and "housekeeping failed: works again" in master.log(), timeout=30,
                 what="the loops working again")
        c.client.submit_job(Echo.spec([1], job_id="after"))
        assert c.wait_job("after")["status"] == "succeeded"
        for proc, loops in ((worker, ("heartbeat failed", "fetching jobs failed",
                                     "waiting for work failed")),
                            (master, ("housekeeping failed", "scheduler pass failed",
                                      "scheduler lease: renew/acquire failed"))):
            text = proc.log()
            assert text.count("heartbeat failed: Redis unreachable") == (proc is worker)
            assert all(text.count(f"{loop}: Redis unreachable") <= 1 for loop in loops), text
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


def test_close_waits_for_its_background_tasks_to_end(redis_url, monkeypatch):
    """A closed master's housekeeping and scheduler have ended when close returns: they
    were cancelled and left running, on a Redis client close had shut (an embedding
    program's loop went on, or logged 'Task was destroyed but it is pending')."""
    from elric.config import load_settings
    from elric.housekeeping import Housekeeping
    from elric.master import Master

    async def pass_once(self):   # a step that ends what it does before it stops
        try:
            await asyncio.sleep(0.2)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise
    monkeypatch.setattr(Housekeeping, "pass_once", pass_once)

    async def main():
        m = Master(load_settings(env={"ELRIC_REDIS_URL": redis_url,
                                      "ELRIC_MASTER_ADDRESS": f"127.0.0.1:{free_port()}"}))
        await m.start()
        await asyncio.sleep(0)   # both tasks have started
        await m.close()
        return m._housekeeping.done(), m._scheduling.done(), m.exit_code
    # (and the scheduler's return on close is no background task ending: exit code 0)
    assert asyncio.run(asyncio.wait_for(main(), 60)) == (True, True, 0)


def test_master_and_worker_go_on_when_their_redis_connections_go_silent(redis_url, tmp_path):
    """A connection whose peer vanished without closing it (a host gone, a firewall that
    dropped it) never answers: a command waiting on it must fail in seconds, as an outage,
    and the next one go through a new connection. Hung, it stopped the schedule and the
    worker for good."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = SilentProxy(port)
    c = Cluster(proxy.url(), tmp_path)
    try:
        c.start_master()
        c.start_worker("--concurrency", "1")
        c.client.submit_job(Echo.spec([], job_id="tick", trigger={"type": "interval",
                                                                  "seconds": 1}))
        wait_for(lambda: len(fire_times(c.client, "tick")) >= 2, what="the schedule firing")
        assert proxy.silence() >= 3   # the master's and the worker's connections
        silenced = time.time()

        def submitted() -> bool:
            try:
                c.client.submit_job(Echo.spec(["after"], job_id="after"))
                return True
            except RemoteError as exc:   # the master's command timed out: nothing queued
                assert exc.code == "redis_unavailable", exc
                return False
        wait_for(submitted, timeout=60, interval=0.2, what="the master queueing again")
        assert c.wait_job("after", timeout=60)["status"] == "succeeded"
        wait_for(lambda: len([t for t in fire_times(c.client, "tick") if t > silenced]) >= 2,
                 timeout=60, what="the schedule firing again")
        assert all(p.alive() for p in c.procs), c.logs()
    finally:
        c.close()
        proxy.close()


def test_health_names_a_refusal_of_redis_as_the_worker_does(own_redis, tmp_path):
    """Housekeeping and the scheduler retrying on a MISCONF showed "failing (ResponseError:
    MISCONF ...)": a class name and Redis's raw text, where the worker's log says plainly
    what Redis refuses for."""
    from tests.test_redis_refuses import master_on_a_redis_refusing_writes

    with master_on_a_redis_refusing_writes(own_redis, tmp_path) as (c, r):
        tasks = ("housekeeping", "scheduler")
        states = wait_for(lambda: (lambda h: h if all(
            "retrying" in h["tasks"][t]["state"] for t in tasks) else None)(c.client.health()),
            what="health showing the refusal")["tasks"]
        for task in tasks:
            state = states[task]["state"]
            assert "Redis refuses writes because it cannot save its snapshot (MISCONF)" in state
            assert "ResponseError" not in state, state
        shown = elric_health(c)
        assert "cannot save its snapshot (MISCONF)" in shown.stdout, shown.stdout
        r.config_set("stop-writes-on-bgsave-error", "no")
        wait_for(lambda: c.client.health()["ok"], what="health ok again")
