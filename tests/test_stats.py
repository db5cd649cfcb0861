"""Statistics per func and per batch, and throughput per minute (stats()), with real
processes; the bucket and percentile maths on their own."""

from __future__ import annotations

import math
import time

import redis

from elric.jobstats import BUCKETS, MINUTE_TTL, JobStats, bucket
from elric.keys import Keys
from tests.conftest import wait_for
from tests.jobs import Add, Fail, MarkSleep, Sleep

KEYS = Keys("elric")   # the clusters here keep the default KEY_PREFIX


def test_a_duration_falls_in_the_first_bucket_whose_bound_holds_it():
    assert [bucket(ms) for ms in (0, 1, 2, 3, 200, 201, 300000, 300001)] == \
        ["le:1", "le:1", "le:2", "le:5", "le:200", "le:500", "le:300000", "le:inf"]


def test_mean_p95_and_live_from_a_hash():
    def stats(**fields):
        return JobStats.from_hash({k.encode(): str(v).encode() for k, v in fields.items()})

    empty = stats(submitted=3)
    assert (empty.live, empty.mean_ms, empty.p95_ms, empty.first_at) == (3, None, None, None)
    s = stats(**{"submitted": 100, "succeeded": 90, "failed": 4, "cancelled": 1,
                 "duration_ms": 5000, "le:1": 94, "le:500": 6, "first_at": 1500})
    assert (s.live, s.mean_ms, s.p95_ms, s.first_at) == (5, 50.0, 500, 1.5)
    assert stats(**{"le:1": 95, "le:500": 5}).p95_ms == 1
    assert stats(**{"le:inf": 1}).p95_ms == math.inf
    assert stats(submitted=1, succeeded=3).live == 0   # never below 0
    assert len(BUCKETS) == 17


def test_funcs_batches_and_throughput(make_cluster, redis_url, tmp_path):
    cluster = make_cluster(RETRY_BACKOFF=0.05)
    cluster.start_master()
    c = cluster.client
    t0 = time.time()
    c.submit_jobs([*(Add.spec([i, i], job_id=f"add{i}", batch="fast") for i in range(3)),
                   *(Sleep.spec([0.2], job_id=f"sleep{i}", batch="slow") for i in range(2)),
                   Fail.spec(job_id="fail-once"),
                   Fail.spec(job_id="fail-thrice", max_retries=2),
                   MarkSleep.spec([str(tmp_path / "marks"), 60], job_id="long")])
    before = c.stats()
    add = before["funcs"]["tests.jobs:Add"]
    assert (add["submitted"], add["live"], add["succeeded"], add["mean_ms"], add["p95_ms"]) \
        == (3, 3, 0, None, None)   # nothing ran yet
    assert t0 - 5 < add["first_at"] == add["last_at"] < time.time() + 5
    slow = before["batches"]["slow"]
    assert (slow["submitted"], slow["live"], slow["p95_ms"]) == (2, 2, None)

    cluster.start_worker("--concurrency", "2")
    cluster.wait_job("long", statuses=("running",))
    assert c.cancel_job("long")["status"] == "cancelling"
    for job_id in ("add0", "add1", "add2", "sleep0", "sleep1", "fail-once", "fail-thrice",
                   "long"):
        cluster.wait_job(job_id, statuses=("succeeded", "failed", "cancelled"))
    stats = c.stats()
    funcs = stats["funcs"]
    counters = ("submitted", "succeeded", "failed", "retried", "cancelled", "live")
    assert {f: tuple(row[n] for n in counters) for f, row in funcs.items()} == {
        "tests.jobs:Add": (3, 3, 0, 0, 0, 0),
        "tests.jobs:Sleep": (2, 2, 0, 0, 0, 0),
        "tests.jobs:Fail": (2, 0, 2, 2, 0, 0),
        "tests.jobs:MarkSleep": (1, 0, 0, 0, 1, 0)}
    sleep = funcs["tests.jobs:Sleep"]
    assert 200 <= sleep["mean_ms"] < 5000 and 200 <= sleep["p95_ms"] <= 5000
    assert 0 <= funcs["tests.jobs:Add"]["mean_ms"] < 1000
    assert funcs["tests.jobs:Fail"]["p95_ms"] >= 1   # four attempts timed
    for row in funcs.values():
        assert t0 - 5 < row["first_at"] <= row["last_at"] < time.time() + 5
    assert funcs["tests.jobs:Add"]["last_at"] > add["last_at"]   # moved when they ran

    slow, fast = stats["batches"]["slow"], stats["batches"]["fast"]
    assert (slow["submitted"], slow["succeeded"], slow["live"]) == (2, 2, 0)
    assert 200 <= slow["mean_ms"] < 5000 and 200 <= slow["p95_ms"] <= 5000
    assert (fast["submitted"], fast["succeeded"], fast["live"]) == (3, 3, 0)
    assert fast["p95_ms"] >= 1 and fast["first_at"] <= fast["last_at"]

    # the last 60 minutes, oldest first, ending with the current one (Redis's clock)
    rows = stats["throughput"]
    r = redis.Redis.from_url(redis_url)
    now = r.time()[0]
    assert len(rows) == 60
    assert [b["minute"] - a["minute"] for a, b in zip(rows, rows[1:])] == [60] * 59
    assert rows[-1]["minute"] in (now // 60 * 60, now // 60 * 60 - 60)  # a minute may turn
    totals = {n: sum(row[n] for row in rows) for n in ("succeeded", "failed", "retried")}
    assert totals == {"succeeded": 5, "failed": 2, "retried": 2}
    assert all(row["minute"] >= t0 // 60 * 60 - 60 for row in rows
               if row["succeeded"] or row["failed"] or row["retried"])
    minute_keys = list(r.scan_iter(KEYS.minute("*")))
    assert minute_keys and all(0 < r.ttl(k) <= MINUTE_TTL for k in minute_keys)
    r.close()


def test_the_current_minute_counts_what_finished_in_it(cluster):
    """The minute's bucket holds the counts as they happen (read twice within a minute:
    retried when the minute turns in between)."""
    cluster.start_worker("--concurrency", "1")
    c = cluster.client

    def current_minute_after(job_id):
        c.submit_job(Add.spec([1, 2], job_id=job_id))
        cluster.wait_job(job_id)
        return c.stats()["throughput"][-1]

    def two_in_one_minute():
        first = current_minute_after(f"a{time.monotonic_ns()}")
        second = current_minute_after(f"b{time.monotonic_ns()}")
        return (first, second) if first["minute"] == second["minute"] else None

    first, second = wait_for(two_in_one_minute, timeout=60, what="two jobs in one minute")
    assert first["succeeded"] >= 1 and second["succeeded"] == first["succeeded"] + 1


def test_cancelled_removed_and_rerun_jobs_keep_live_counts_true(cluster):
    c = cluster.client
    c.submit_jobs([Add.spec([i, 1], job_id=f"w{i}", queue="nobody", batch="b") for i in range(3)])
    c.cancel_job("w0")   # queued: cancelled at once
    c.remove_job("w1")   # queued: gone
    row = c.stats()["funcs"]["tests.jobs:Add"]
    assert (row["submitted"], row["cancelled"], row["removed"], row["live"]) == (3, 1, 1, 1)
    assert c.stats()["batches"]["b"]["live"] == 1

    cluster.start_worker("--concurrency", "1")
    c.submit_job(Add.spec([1, 1], job_id="done"))
    cluster.wait_job("done")
    c.rerun_job("done")   # submitted again: live until it ends again
    assert c.stats()["funcs"]["tests.jobs:Add"]["submitted"] == 5
    wait_for(lambda: c.stats()["funcs"]["tests.jobs:Add"]["succeeded"] == 2,
             what="the rerun succeeded")
    assert c.stats()["funcs"]["tests.jobs:Add"]["live"] == 1   # w2 still waits


def test_a_funcs_live_jobs_split_into_running_and_queued(cluster):
    c = cluster.client
    cluster.start_worker("--concurrency", "1")
    c.submit_jobs([Sleep.spec([30], job_id=f"s{i}", batch="naps") for i in range(6)])
    # (a worker may claim more than it runs at once: claimed jobs count as running)
    stats = wait_for(lambda: (lambda s: s if 0 < s["by_status"]["running"] < 6 else None)(
        c.stats()), what="some of them running, some waiting")
    n = stats["by_status"]["running"]
    row, batch = stats["funcs"]["tests.jobs:Sleep"], stats["batches"]["naps"]
    assert (row["live"], row["running"], row["waiting"]) == (6, n, 6 - n)
    assert (batch["running"], batch["waiting"]) == (n, 6 - n)
    for i in range(6):   # (the running one is stopped by its worker)
        c.cancel_job(f"s{i}")
    wait_for(lambda: c.stats()["funcs"]["tests.jobs:Sleep"]["live"] == 0, what="all cancelled")


def test_housekeeping_forgets_a_batch_that_ended_past_its_jobs_life(cluster, redis_url):
    """A label per crawl round (96 a day) added a row to stats(), the dashboard and /metrics
    for good, each read by every stats(); a batch goes once its jobs have all ended and can
    have expired: the longer of RESULT_TTL and FAILED_TTL (7 days here) after its last_at."""
    c = cluster.client
    c.submit_jobs([Add.spec([1, 1], job_id=b, queue="nobody", batch=b)
                   for b in ("old", "old-live", "recent")])
    c.cancel_job("old")
    long_ago = int((time.time() - 8 * 86400) * 1000)
    with redis.Redis.from_url(redis_url) as r:
        for b in ("old", "old-live", "recent"):
            r.hset(KEYS.batch(b), "last_at", long_ago)
        c.cancel_job("recent")   # its last activity: now (it keeps the cancelled job's stats)
        # one script call judges every label of this small set: once one is gone, all were
        wait_for(lambda: not r.sismember(KEYS.batches, "old"),
                 what="housekeeping forgets the old batch")   # (a pass a second)
        assert not r.exists(KEYS.batch("old"))
    assert sorted(c.stats()["batches"]) == ["old-live", "recent"]
    c.submit_job(Add.spec([1, 1], queue="nobody", batch="old"))   # a new run of the label
    assert c.stats()["batches"]["old"]["submitted"] == 1


def test_housekeeping_forgets_funcs_and_queues_that_ended_past_their_jobs_life(cluster,
                                                                              redis_url):
    """Generated or mistyped queue and func names stayed in stats(), the dashboard, elric
    top and /metrics for good, each read by every stats() and scrape: a func goes as a
    batch does, and a queue once it holds no job, the longer TTL after its last activity;
    one of an older elric, with no last activity, starts its clock instead."""
    c = cluster.client
    c.submit_jobs([Add.spec([1, 1], job_id="old", queue="q-old"),
                   Sleep.spec([0], job_id="live", queue="q-live"),
                   Fail.spec([], job_id="recent", queue="q-recent"),
                   MarkSleep.spec([0], job_id="legacy", queue="q-legacy")])
    for job_id in ("old", "recent", "legacy"):
        c.cancel_job(job_id)
    long_ago = int((time.time() - 8 * 86400) * 1000)
    with redis.Redis.from_url(redis_url) as r:
        for q, func in (("q-old", "tests.jobs:Add"), ("q-live", "tests.jobs:Sleep")):
            r.hset(KEYS.func(func), "last_at", long_ago)
            r.hset(KEYS.counters, f"queue:{q}:last_at", long_ago)
        r.hdel(KEYS.counters, "queue:q-legacy:last_at")
        r.lpush(KEYS.wake("q-old"), "1")
        wait_for(lambda: not r.sismember(KEYS.queues, "q-old")
                 and not r.sismember(KEYS.funcs, "tests.jobs:Add"),
                 what="housekeeping forgets the old queue and func")   # (a pass a second)
        assert not r.exists(KEYS.func("tests.jobs:Add"), KEYS.wake("q-old"))
        assert not [f for f in r.hkeys(KEYS.counters) if b"q-old" in f]
        assert r.hget(KEYS.counters, "queue:q-legacy:last_at")
    stats = c.stats()
    assert sorted(stats["by_queue"]) == ["q-legacy", "q-live", "q-recent"]
    assert sorted(stats["funcs"]) == ["tests.jobs:Fail", "tests.jobs:MarkSleep",
                                      "tests.jobs:Sleep"]
    c.submit_job(Add.spec([1, 1], queue="q-old"))   # used again: from nothing
    stats = c.stats()
    assert stats["by_queue"]["q-old"]["submitted"] == 1
    assert stats["funcs"]["tests.jobs:Add"]["submitted"] == 1


def test_a_job_that_outlived_its_forgotten_queue_lists_it_again(cluster, redis_url):
    """A queue forgotten while a job of it ran (as if idle the whole TTL) is listed again,
    with its last activity, when the job is recorded: its counters are not left behind
    with no queue in stats to show or forget them."""
    cluster.start_worker("--concurrency", "1", "--queues", "q-run")
    c = cluster.client
    c.submit_job(Sleep.spec([1], job_id="long", queue="q-run"))
    wait_for(lambda: c.get_job("long")["status"] == "running", what="the job runs")
    with redis.Redis.from_url(redis_url) as r:
        r.srem(KEYS.queues, "q-run")   # what forget_queues.lua does to it
        r.hdel(KEYS.counters, *[f for f in r.hkeys(KEYS.counters) if b":q-run:" in f])
        cluster.wait_job("long")
        assert r.hget(KEYS.counters, "queue:q-run:last_at")
    assert c.stats()["by_queue"]["q-run"]["succeeded"] == 1



def test_stats_hold_the_latest_batches_and_funcs_however_many_there_are(make_cluster,
                                                                        redis_url):
    """A batch label per crawl round, kept a week, is tens of thousands of labels: stats()
    answered a row for each, over the 8 MiB RPC_MAX_MESSAGE, and `elric workers`, `status`,
    `top` and `stats` failed. It holds the most recently active of each, and counts the
    rest, which `elric top` and the dashboard name."""
    import json

    from elric.queue import STATS_ROWS
    from elric.redis_server import free_port
    from tests.test_cli import elric
    from tests.test_dashboard import get

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    labels, funcs = 30_000, STATS_ROWS + 50
    long_ago = int((time.time() - 86400) * 1000)
    with redis.Redis.from_url(redis_url) as r, r.pipeline(transaction=False) as pipe:
        for i in range(labels):
            name = f"round-{i:05d}-" + "x" * 300   # 300 bytes: a URL, say
            pipe.sadd(KEYS.batches, name)
            pipe.hset(KEYS.batch(name), mapping={"submitted": 1, "succeeded": 1,
                                                 "first_at": long_ago, "last_at": long_ago + i})
        for i in range(funcs):
            pipe.sadd(KEYS.funcs, f"gen.f{i}")
            pipe.hset(KEYS.func(f"gen.f{i}"), mapping={"submitted": 1, "last_at": long_ago + i})
        pipe.execute()
    cluster.client.submit_job(Add.spec([1, 1], queue="nobody", batch="now"))
    for command in (["workers"], ["status"], ["stats"]):
        shown = elric(cluster, *command)
        assert shown.returncode == 0, (command, shown.stderr)
    stats = json.loads(shown.stdout)
    latest = ["now"] + [f"round-{i:05d}-" + "x" * 300
                        for i in range(labels - 1, labels - STATS_ROWS, -1)]
    assert sorted(stats["batches"]) == sorted(latest)
    assert "tests.jobs:Add" in stats["funcs"] and "gen.f51" in stats["funcs"] and \
        "gen.f50" not in stats["funcs"]
    assert stats["more"] == {"batches": labels + 1 - STATS_ROWS, "funcs": funcs + 1 - STATS_ROWS}
    top = elric(cluster, "top", "--iterations", "1")
    assert top.returncode == 0 and f"and {funcs + 1 - 10} more funcs" in top.stdout, top.stderr
    html = get(f"http://127.0.0.1:{port}/stats")[1]
    assert f"and {labels + 1 - STATS_ROWS} more, less recently active" in html
