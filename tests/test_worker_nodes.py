"""Workers as nodes: each registers what it is and heartbeats its load (CPU, memory, jobs in
flight, done, failed), and an operator changes its number of pool processes while it runs.
Real master, worker and Redis; the elric command runs as a process."""

from __future__ import annotations

import json
import socket
import time
import urllib.request

import psutil
import pytest

import elric
from elric.redis_server import free_port
from tests.conftest import wait_for
from elric.client import MasterClient
from tests.jobs import Add, Fail, MarkSleep, Sleep, Spawn, Spin
from tests.test_cli import elric as run_elric, one_line_error

MIB = 2**20


def _me(cluster, wid: str) -> dict:
    return next(w for w in cluster.client.stats()["workers"] if w["worker_id"] == wid)


def _pool_pids(worker_pid: int) -> set[int]:
    """The worker's pool processes: forked by its fork server, so its grandchildren."""
    return {p.pid for child in psutil.Process(worker_pid).children()
            for p in child.children()}


def test_a_worker_registers_and_heartbeats_its_load(cluster):
    before = time.time()
    worker = cluster.start_worker("--concurrency", "2")
    [w] = cluster.client.stats()["workers"]
    wid = w["worker_id"]
    assert (w["host"], w["pid"], w["queues"]) == (socket.gethostname(), worker.pid, "default")
    assert (w["concurrency"], w["async_concurrency"]) == (2, 100)
    assert w["version"] == elric.__version__
    assert before - 1 < w["started_at"] <= w["last_seen"] < time.time() + 1   # epoch seconds
    assert w["alive"] is True and w["state"] == "running" and w["trouble"] == ""

    # memory of the worker and its two pool processes, as psutil sees them
    w = wait_for(lambda: (lambda w: w if "rss_bytes" in w else None)(_me(cluster, wid)),
                 what="a heartbeat with load")
    assert isinstance(w["rss_bytes"], int) and w["rss_bytes"] > 10 * MIB
    assert isinstance(w["cpu_percent"], float)
    assert 0 <= w["cpu_percent"] <= 100 * psutil.cpu_count() + 20   # 100 = one core
    pids = wait_for(lambda: (lambda p: p if len(p) == 2 else None)(_pool_pids(worker.pid)),
                    what="two pool processes")
    expected = sum(psutil.Process(pid).memory_info().rss for pid in (worker.pid, *pids))
    assert 0.7 * expected < _me(cluster, wid)["rss_bytes"] < 1.3 * expected, expected

    # a job keeping a pool process busy shows in the CPU % (the worker itself idles); it
    # spins until seen, since on a loaded machine it gets a fraction of a CPU
    spun = cluster.tmp_path / "spun"
    spin = cluster.client.submit_job(Spin.spec([30, str(spun)]))["job_id"]
    wait_for(lambda: _me(cluster, wid)["cpu_percent"] >= 15, what="a busy pool process")
    assert cluster.client.get_job(spin)["status"] == "running"
    spun.touch()
    cluster.wait_job(spin)

    # jobs in flight while two run
    marks = cluster.tmp_path / "started"
    slow = [cluster.client.submit_job(MarkSleep.spec([str(marks), 4]))["job_id"]
            for _ in range(2)]
    wait_for(lambda: _me(cluster, wid)["in_flight"] == 2, what="two jobs in flight")
    assert all(cluster.client.get_job(j)["status"] == "running" for j in slow)
    for job_id in slow:
        cluster.wait_job(job_id)
    wait_for(lambda: _me(cluster, wid)["in_flight"] == 0, what="none in flight")

    # done and failed since it started: 3 succeeded, 2 failed (no retries)
    ids = [cluster.client.submit_job(Add.spec([i, i]))["job_id"] for i in range(3)]
    ids += [cluster.client.submit_job(Fail.spec(["no"]))["job_id"] for _ in range(2)]
    for job_id in ids:
        cluster.wait_job(job_id)
    w = wait_for(lambda: (lambda w: w if w["done"] == 6 else None)(_me(cluster, wid)),
                 what="six jobs done")   # Spin, the two MarkSleep jobs and three Adds
    assert (w["failed"], w["processed"]) == (2, 8)
    assert "succeeded" not in w   # the worker's counts come from the worker alone

    shown = run_elric(cluster, "workers")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()[:2]
    for column in ("CPU %", "RSS MiB", "in flight", "done", "failed attempts"):
        assert column in header
    # worker, host, pid, queues, processes, CPU %, RSS MiB, in flight, done, failed, ...
    assert row.split()[7:10] == ["0", "6", "2"], row
    [listed] = json.loads(run_elric(cluster, "workers", "--json").stdout)
    assert all(isinstance(listed[k], int) for k in ("in_flight", "done", "failed", "rss_bytes"))


def test_a_silent_worker_shows_as_lost(cluster):
    import redis

    worker = cluster.start_worker("--concurrency", "1")
    [w] = cluster.client.stats()["workers"]
    worker.kill()   # no goodbye: its heartbeats stop
    # 60 s of silence is lost: put its last heartbeat that far back instead of waiting
    r = redis.Redis.from_url(cluster.redis_url)
    r.zadd("elric:workers", {w["worker_id"]: (time.time() - 61) * 1000})
    r.close()
    [w] = cluster.client.stats()["workers"]
    assert w["alive"] is False
    assert "lost" in run_elric(cluster, "workers").stdout


def test_concurrency_grows_and_shrinks_without_a_restart(cluster):
    worker = cluster.start_worker("--concurrency", "1")
    [w] = cluster.client.stats()["workers"]
    wid = w["worker_id"]

    set3 = run_elric(cluster, "worker", "set", wid, "--concurrency", "3")
    assert set3.returncode == 0, set3.stderr
    wait_for(lambda: _me(cluster, wid)["concurrency"] == 3, what="the worker at 3 processes")
    wait_for(lambda: len(_pool_pids(worker.pid)) == 3, what="three pool processes")

    # three sleeps run at once: in three processes, ending together
    ids = [cluster.client.submit_job(Sleep.spec([2, i]))["job_id"] for i in range(3)]
    wait_for(lambda: _me(cluster, wid)["in_flight"] == 3, what="three jobs in flight")
    results = [cluster.wait_job(j)["result"] for j in ids]
    assert len({r["pid"] for r in results}) == 3
    ends = sorted(r["at"] for r in results)
    assert ends[-1] - ends[0] < 1.5, ends   # one at a time they would end 2 s apart

    # shrink to 1 while three long jobs run: each finishes, once; then one at a time
    marks = cluster.tmp_path / "started"
    long = [cluster.client.submit_job(MarkSleep.spec([str(marks), 5]))["job_id"]
            for _ in range(3)]
    wait_for(lambda: marks.exists() and len(marks.read_text().split()) == 3,
             what="three long jobs started")
    set1 = run_elric(cluster, "worker", "set", wid, "--concurrency", "1")
    assert set1.returncode == 0, set1.stderr
    wait_for(lambda: _me(cluster, wid)["concurrency"] == 1, what="the worker at 1 process")
    assert all(cluster.client.get_job(j)["status"] == "running" for j in long)
    after = [cluster.client.submit_job(Sleep.spec([1, i]))["job_id"] for i in range(3)]

    finished = [cluster.wait_job(j) for j in long]
    assert [(j["status"], j["attempts"]) for j in finished] == [("succeeded", 1)] * 3
    assert sorted(marks.read_text().split()) == sorted(long)   # each ran once
    # the processes beyond the new size exit after their jobs (not at once: waited for)
    wait_for(lambda: len(_pool_pids(worker.pid)) == 1, what="one pool process")
    assert len({j["result"]["pid"] for j in finished} - _pool_pids(worker.pid)) == 2

    results = [cluster.wait_job(j)["result"] for j in after]
    assert len({r["pid"] for r in results}) == 1
    ends = sorted(r["at"] for r in results)
    assert all(b - a >= 0.9 for a, b in zip(ends, ends[1:])), ends   # one after another
    w = wait_for(lambda: (lambda w: w if w["done"] == 9 else None)(_me(cluster, wid)),
                 what="nine jobs done")
    assert (w["failed"], w["concurrency"], w["in_flight"]) == (0, 1, 0)


def test_bad_concurrency_values_are_refused_with_one_line(cluster):
    cluster.start_worker("--concurrency", "1")
    [w] = cluster.client.stats()["workers"]
    wid = w["worker_id"]
    for bad in ("0", "1025", "-3"):
        one_line_error(run_elric(cluster, "worker", "set", wid, "--concurrency", bad), 2,
                       f"concurrency {bad}: an integer from 1 to 1024")
    one_line_error(run_elric(cluster, "worker", "set", wid), 2,
                   "takes --queues a,b, --concurrency N or both")
    one_line_error(run_elric(cluster, "worker", "set", "nope", "--concurrency", "2"), 1,
                   "no worker 'nope'")
    # both at once; the hash shows what the worker does
    both = run_elric(cluster, "worker", "set", wid, "--queues", "a,b", "--concurrency", "2")
    assert both.returncode == 0, both.stderr
    wait_for(lambda: (lambda w: (w["queues"], w["concurrency"]) == ("a,b", 2))(
        _me(cluster, wid)), what="queues and concurrency changed")


def test_the_dashboard_shows_each_workers_load(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    worker = cluster.start_worker("--concurrency", "1")
    [w] = cluster.client.stats()["workers"]
    cluster.wait_job(cluster.client.submit_job(Add.spec([1, 2]))["job_id"])
    wait_for(lambda: _me(cluster, w["worker_id"])["done"] == 1, what="one job done")

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=10) as reply:
        page = reply.read().decode()
    for column in ("CPU %", "RSS (MiB)", "in flight", "done", "failed attempts"):
        assert f">{column}</th>" in page
    row = page[page.index(f'data-id="{w["worker_id"]}"'):]
    row = row[:row.index("</tr>")]
    assert '<td class="n done">1</td>' in row and '<td class="n failed">0</td>' in row
    assert '<td class="n in-flight">0</td>' in row and str(worker.pid) in row
    rss = float(row.split('<td class="n rss">')[1].split("<")[0])
    assert rss > 10


@pytest.mark.parametrize("back_refusing", [False, True])
def test_a_worker_whose_master_is_gone_shows_its_trouble_until_the_master_is_back(
        make_cluster, back_refusing):
    """A worker that could not send the child jobs of the jobs that ended (its master gone)
    showed as running and alive, and those jobs as running, for as long as it lasted: only
    its own log said why. Its heartbeat now tells, and every master shows it. A master
    back that refuses the children is reachable too: the trouble ends (it stayed)."""
    port = free_port()
    c = make_cluster()
    a = c.start_master()   # the worker's MASTER_ADDRESS
    b = f"127.0.0.1:{free_port()}"
    c.start_master(address=b, DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    c.start_worker("--concurrency", "1")
    via_b = MasterClient(b)
    [wid] = [w["worker_id"] for w in via_b.stats()["workers"]]
    a.kill()
    c.client.close()   # its connection died with the master

    def trouble() -> str:
        return next(w for w in via_b.stats()["workers"] if w["worker_id"] == wid)["trouble"]

    def metric() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        return text.split(f'elric_worker_trouble{{worker="{wid}"}} ')[1].split()[0]

    try:
        via_b.submit_job(Spawn.spec([3], job_id="parent"))
        said = wait_for(trouble, what="the worker's trouble, through master B")
        assert said.startswith(f"sending child jobs: master {c.address} unreachable for "), said
        assert via_b.get_job("parent")["status"] == "running"   # ended, not recorded
        assert metric() == "1.0"
        shown = run_elric(c, "workers", "--master", b)
        assert f"master {c.address} unreachable" in shown.stdout, shown.stdout + shown.stderr
        assert f"workers in trouble (elric workers says what): {wid}" in \
            run_elric(c, "status", "--master", b).stdout

        # at the worker's MASTER_ADDRESS again; refusing: it allows no tests.jobs children
        c.start_master(**({"JOB_MODULES": "examples"} if back_refusing else {}))
        wait_for(lambda: trouble() == "", timeout=30, what="the trouble cleared")
        if back_refusing:
            assert c.wait_job("parent")["status"] == "failed"
        else:
            wait_for(lambda: via_b.stats()["by_status"]["succeeded"] == 4,
                     what="the parent recorded, its three children queued and run")
        assert metric() == "0.0"
    finally:
        via_b.close()


@pytest.mark.parametrize("how", ["stopped", "lost"])
def test_a_worker_that_stopped_or_is_lost_shows_no_trouble(make_cluster, how):
    """A worker in trouble (its master gone) that then stopped, or went silent, kept showing
    its last trouble in stats, elric workers and status, the workers page and the metric:
    its work waits for nothing any more."""
    import redis

    port = free_port()
    c = make_cluster()
    a = c.start_master()   # the worker's MASTER_ADDRESS
    b = f"127.0.0.1:{free_port()}"
    c.start_master(address=b, DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    worker = c.start_worker("--concurrency", "1", SHUTDOWN_GRACE=1)
    via_b = MasterClient(b)
    [wid] = [w["worker_id"] for w in via_b.stats()["workers"]]
    a.kill()
    c.client.close()   # its connection died with the master

    def me() -> dict:
        return next(w for w in via_b.stats()["workers"] if w["worker_id"] == wid)

    try:
        via_b.submit_job(Spawn.spec([3], job_id="parent"))
        wait_for(lambda: me()["trouble"], what="the worker's trouble, through master B")
        if how == "stopped":
            # SIGTERM: it says goodbye (state "stopped"), and exits 1: the parent's outcome
            # waits on master A for its children, so it runs again once its lease ends
            assert worker.stop() == 1
        else:
            worker.kill()   # no goodbye; 60 s of silence is lost, without the wait
            with redis.Redis.from_url(c.redis_url) as r:
                r.zadd("elric:workers", {wid: (time.time() - 61) * 1000})
        w = me()
        assert (w["state"] if w["alive"] else "lost", w["trouble"]) == (how, ""), w
        assert "unreachable" not in run_elric(c, "workers", "--master", b).stdout
        assert "in trouble" not in run_elric(c, "status", "--master", b).stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/workers", timeout=10) as reply:
            assert "unreachable" not in reply.read().decode()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert f'elric_worker_trouble{{worker="{wid}"}} 1' not in reply.read().decode()
    finally:
        via_b.close()


def test_a_worker_that_stopped_shows_the_jobs_it_finished_while_stopping(cluster):
    """A worker told to stop while it ran a job finished the job (SHUTDOWN_GRACE), but its
    record kept its last heartbeat's figures: stopped, 1 job in flight, 0 done, on elric
    workers and the dashboard, for good."""
    worker = cluster.start_worker("--concurrency", "1")
    [wid] = [w["worker_id"] for w in cluster.client.stats()["workers"]]
    cluster.client.submit_job(Sleep.spec([1.5], job_id="nap"))
    wait_for(lambda: _me(cluster, wid)["in_flight"] == 1, what="the job running")
    assert worker.stop() == 0
    assert cluster.client.get_job("nap")["status"] == "succeeded"
    w = _me(cluster, wid)
    assert (w["state"], w["in_flight"], w["done"], w["processed"]) == ("stopped", 0, 1, 1), w


def test_the_master_log_names_the_jobs_redelivered(redis_url, caplog):
    """"redelivered 1 job(s) whose worker stopped renewing its lease" named none: an
    operator could not tell which jobs ran again after a worker died (cancelled ones were
    named)."""
    import asyncio
    import logging

    import redis.asyncio as aredis

    from elric.clock import redis_now
    from elric.contract import normalize_spec
    from elric.housekeeping import Housekeeping
    from elric.keys import Keys
    from elric.queue import RedisQueue

    async def main():
        r = aredis.Redis.from_url(redis_url)
        try:
            keys = Keys("elric")
            q = RedisQueue(r, keys)
            await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "held"})])
            assert (await q.fetch("dead", ["default"], 1, 30)).claims
            await r.zadd(keys.inflight, {"held": 0}, xx=True)   # its lease ran out
            hk = Housekeeping(q, None, r, keys, 60, {})
            hk._redelivered_at = await redis_now(r)   # no gap: no hold before redelivery
            with caplog.at_level(logging.WARNING, logger="elric.master"):
                await hk._redeliver()
        finally:
            await r.aclose()
    asyncio.run(main())
    assert "redelivered 1 job(s)" in caplog.text and "held" in caplog.text, caplog.text


def test_a_redelivered_job_says_so_in_get_job_elric_job_and_its_page(make_cluster):
    """A job whose worker was lost showed "queued, attempts 1" with the lost run's start,
    then "attempts 2" with max_retries 0, and nothing of the redelivery: an operator asked
    why it ran twice. The job counts it and names the worker lost."""
    import asyncio
    from html import unescape

    import redis.asyncio as aredis

    from elric.keys import Keys
    from elric.queue import RedisQueue
    from tests.conftest import outcome
    from tests.test_dashboard import get

    port = free_port()
    c = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    c.start_master()
    c.client.submit_job(Add.spec([1, 2], job_id="twice", queue="nobody"))
    lost, said = "host:4242:dead00", "1 (1 redelivered: worker host:4242:dead00 lost at "

    async def in_redis(step):
        r = aredis.Redis.from_url(c.redis_url)
        try:
            return await step(RedisQueue(r, Keys("elric")), r)
        finally:
            await r.aclose()

    async def lose(q, r):
        assert (await q.fetch(lost, ["nobody"], 1, 30)).claims
        await r.zadd(q.keys.inflight, {"twice": 0}, xx=True)   # its lease ran out
        await q.recover()   # (or the master's housekeeping did)
    asyncio.run(in_redis(lose))
    job = c.client.get_job("twice")
    assert (job["status"], job["attempts"], job["redelivered"], job["lost_worker"]) == (
        "queued", 1, 1, lost), job
    # no attempt runs while it waits: the lost one's start is not shown as its start
    assert job["started_at"] is None and job["redelivered_at"] >= job["enqueued_at"], job
    shown = run_elric(c, "job", "twice")
    assert said in shown.stdout and "started_at" not in shown.stdout, shown.stdout
    assert said in unescape(get(f"http://127.0.0.1:{port}/jobs/twice")[1])

    async def run_again(q, r):
        [claim] = (await q.fetch("host:4343:alive0", ["nobody"], 1, 30)).claims
        assert await q.finish("host:4343:alive0", [outcome(claim)]) == ["succeeded"]
    asyncio.run(in_redis(run_again))
    job = c.client.get_job("twice")
    assert (job["attempts"], job["redelivered"], job["max_retries"]) == (2, 1, 0), job
    assert job["started_at"] >= job["redelivered_at"], job
    assert "2 (1 redelivered: worker host:4242:dead00 lost at " in run_elric(
        c, "job", "twice").stdout
    c.client.rerun_job("twice")   # a rerun counts its attempts from 0 again, and these
    assert "redelivered" not in c.client.get_job("twice")


def test_an_order_to_a_worker_by_its_pid_names_the_id_meant(redis_url):
    """`elric worker pause 4242` (the pid, as ps shows it) said only "no worker '4242' (or it
    is lost ...)": nothing of the id it takes, nor which worker that pid is."""
    import asyncio

    from elric.rpc import RequestError
    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.queue.heartbeat("vm:4242:abcdef", [], 30, {"pid": 4242, "state": "running"})
            with pytest.raises(RequestError, match="vm:4242:abcdef") as refused:
                await m.control_worker("4242", "pause")
            with pytest.raises(RequestError, match="elric workers") as unknown:
                await m.control_worker("nosuch", "pause")
            return refused.value, unknown.value
    refused, unknown = asyncio.run(main())
    assert "vm:4242:abcdef" not in str(unknown)


def test_a_pause_of_a_paused_worker_says_it_changed_nothing(redis_url):
    """`elric worker resume ID` of a running worker said "resume asked; it obeys within a
    second", as if it would do something."""
    import asyncio

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.queue.heartbeat("w", [], 30, {"state": "running"})
            said = [await m.control_worker("w", action)
                    for action in ("resume", "pause", "pause", "resume", "stop", "stop")]
            return [reply.get("unchanged", False) for reply in said]
    assert asyncio.run(main()) == [True, False, True, False, False, True]
