"""Per-key limits (setting LIMITS, a job's limit_key) with real workers and Redis: a key at
its limit never exceeds it across workers, never holds back other keys, never burns a
retry; bad limits are refused with a clear error."""

from __future__ import annotations

import asyncio
import json
import time
from types import SimpleNamespace

import pytest
import redis
import redis.asyncio as aredis

from elric import limits
from elric.config import SettingsError, load_settings
from elric.contract import SpecError, normalize_spec
from elric.keys import Keys
from elric.queue import RedisQueue
from tests.conftest import outcome, redis_clock_past, wait_for
from tests.jobs_async import AsyncHostPage
from tests.test_async_jobs import most_at_once

SLOW = {"concurrency": 2, "rate": 5}


async def _close(worker) -> None:
    """Close a worker a test built in its own process (no run: no stop to do it)."""
    if worker._waiting is not None:
        worker._waiting.cancel()
    await worker.redis.aclose()
    await worker.blocking_redis.aclose()


def test_a_limited_host_keeps_its_limits_across_workers_while_others_run_at_full_speed(
        make_cluster):
    c = make_cluster(LIMITS=json.dumps({"slow.test": SLOW}))
    c.start_master()
    c.start_worker("--concurrency", "1")
    c.start_worker("--concurrency", "1")
    # 30: at 5 starts a second both workers get some, even one slowed by a busy machine
    slow = [AsyncHostPage.spec(["slow.test", i], job_id=f"slow-{i}") for i in range(30)]
    fast = [AsyncHostPage.spec(["fast.test", i], job_id=f"fast-{i}") for i in range(150)]
    c.client.submit_jobs(slow + fast)   # the slow host's jobs are first in line
    jobs = {s["job_id"]: c.wait_job(s["job_id"], timeout=60) for s in slow + fast}
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs.values()), \
        c.logs()
    assert {j["limit_key"] for j in jobs.values()} == {"slow.test", "fast.test"}
    slow_jobs = [jobs[s["job_id"]] for s in slow]
    fast_jobs = [jobs[s["job_id"]] for s in fast]

    # at most 2 of the slow host's jobs at once, over both workers
    assert most_at_once([(j["result"]["start"], j["result"]["end"]) for j in slow_jobs]) <= 2
    # at most 5 claims in any second (claimed at least 200 ms apart on Redis's clock; the
    # worker's clock stamps started_at, hence a little slack)
    claims = sorted(j["started_at"] for j in slow_jobs)
    assert all(b - a >= 0.15 for a, b in zip(claims, claims[1:])), claims
    assert all(claims[i + 5] - claims[i] >= 0.95 for i in range(len(claims) - 5)), claims
    assert len({j["worker"] for j in slow_jobs}) == 2, "both workers took the slow host's jobs"

    # the fast host was not held back behind the slow one
    assert most_at_once([(j["result"]["start"], j["result"]["end"]) for j in fast_jobs]) >= 40
    assert max(j["result"]["end"] for j in fast_jobs) < max(j["result"]["end"]
                                                            for j in slow_jobs) - 1.0


def test_limits_hold_again_after_redis_lost_them(make_cluster, redis_url):
    """A Redis restarted without persistence, or flushed, loses the rules the master
    published at start: it publishes them again, so no host is crawled without its limit
    while that master runs."""
    c = make_cluster(LIMITS=json.dumps({"slow.test": {"concurrency": 1}}))
    c.start_master()
    c.start_worker("--concurrency", "1")
    r = redis.Redis.from_url(redis_url)
    published = r.hgetall(Keys("elric").limits)
    assert published == {b"slow.test": b"1,"}
    r.flushdb()   # this test's own Redis, keeping nothing, as after such a restart
    wait_for(lambda: r.hgetall(Keys("elric").limits) == published,
             what="the rules published again")
    r.close()
    specs = [AsyncHostPage.spec(["slow.test", i, 0.2], job_id=f"slow-{i}") for i in range(6)]
    c.client.submit_jobs(specs)
    jobs = [c.wait_job(s["job_id"]) for s in specs]
    assert all(j["status"] == "succeeded" for j in jobs), c.logs()
    assert most_at_once([(j["result"]["start"], j["result"]["end"]) for j in jobs]) == 1
    assert "LIMITS were gone from Redis" in c.procs[0].log()


def test_parked_jobs_count_as_queued_and_can_be_removed(make_cluster):
    c = make_cluster(LIMITS=json.dumps({"*": {"concurrency": 1}}), SHUTDOWN_GRACE=1)
    c.start_master()
    c.start_worker("--concurrency", "1")
    c.client.submit_jobs([AsyncHostPage.spec(["one.test", i, 30.0], job_id=f"p{i}")
                          for i in range(4)])
    wait_for(lambda: c.client.stats()["by_status"]["running"] == 1, what="one running")
    r = redis.Redis.from_url(c.redis_url)
    keys = Keys("elric")
    wait_for(lambda: r.zcard(keys.limit_parked("one.test")) == 3, what="three parked")
    stats = c.client.stats()
    assert stats["by_status"]["queued"] == 3 and stats["by_queue"]["default"]["queued"] == 3
    parked = [m.decode()[17:] for m in r.zrange(keys.limit_parked("one.test"), 0, -1)]
    # listed as the counts count them (elric jobs --status queued, the dashboard)
    for f in ({"status": "queued"}, {"status": "queued", "queue": "default"}, {}):
        listed = [j["job_id"] for j in c.client.list_jobs(**f) if j["status"] == "queued"]
        assert sorted(listed) == sorted(parked), (f, listed)
    assert c.client.remove_job(parked[0])
    stats = c.client.stats()
    assert stats["by_status"]["queued"] == 2 and r.zcard(keys.limit_parked("one.test")) == 2
    r.close()


@pytest.mark.parametrize("value, message", [
    ({"h": {"concurrency": -1}}, "concurrency must be a positive number"),
    ({"h": {"concurrency": 1.5}}, "concurrency must be a whole number"),
    ({"h": {"rate": 0}}, "rate must be a positive number"),
    ({"h": {"burst": 3}}, "unknown burst"),
    ({"h": {"rate": 2, "interval": 0.5}}, "not both"),
    ({"h": 3}, "expected a map"),
    ({"": {"rate": 1}}, "non-empty string"),
    # more than limit_interval allows: Redis could not set the time, and every fetch that
    # met the key failed, its job taken out of line for good
    ({"h": {"rate": 1e-20}}, "at most 2147483648 seconds between starts"),
    ({"h": {"interval": 1e15}}, "at most 2147483648 seconds between starts"),
    # keys no job's limit_key can be: their rule never applied, unsaid
    ({"h" * 201: {"rate": 1}}, "201 characters, and a job's limit_key has at most 200"),
    ({"h\udc80": {"rate": 1}}, "not UTF-8 text, as a job's limit_key is"),
])
def test_bad_limits_are_refused_at_start(tmp_path, value, message):
    path = tmp_path / "settings.py"
    path.write_text(f"LIMITS = {value!r}\n")
    with pytest.raises(SettingsError, match=message) as info:
        load_settings(str(path), env={})
    assert "LIMITS" in str(info.value)


def test_limits_from_the_environment_are_json():
    settings = load_settings(env={"ELRIC_LIMITS": '{"*": {"concurrency": 8}}'})
    assert settings.LIMITS == {"*": {"concurrency": 8}}
    with pytest.raises(SettingsError, match="ELRIC_LIMITS.*expected JSON"):
        load_settings(env={"ELRIC_LIMITS": "*=8"})


def test_a_limit_key_must_be_a_non_empty_string():
    base = AsyncHostPage.spec(["h", 1])
    assert normalize_spec(base)["limit_key"] == "h"   # from limit_key_for
    assert normalize_spec({**base, "limit_key": "other"})["limit_key"] == "other"
    with pytest.raises(SpecError, match="limit_key.*must be string"):
        normalize_spec({**base, "limit_key": 3})
    with pytest.raises(SpecError, match="limit_key '': 1-200 characters"):
        normalize_spec({**base, "limit_key": ""})
    with pytest.raises(SpecError, match="limit_key_for must return a string"):
        AsyncHostPage.spec([7, 1])


async def with_redis(url, body):
    """Run ``body(r)`` with a client of the Redis at ``url``, closing it after."""
    r = aredis.Redis.from_url(url)
    try:
        return await body(r)
    finally:
        await r.aclose()


async def one_at_a_time(r, keys: Keys, queue: str, job_ids: list[str]) -> RedisQueue:
    """A queue holding ``job_ids`` in ``queue``, all of limit key k, which runs one at once."""
    return await one_at_a_time_key(r, keys, [(j, queue) for j in job_ids])


def test_parked_jobs_going_back_to_another_workers_queue_wake_that_worker(redis_url):
    """A fetch on queue qa unparks a job of queue qb (its key has room again): it goes back
    in qb's line with a wake token, so qb's idle workers start it at once."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time(r, keys, "qb", ["j1", "j2"])
        first = (await q.fetch("wB", ["qb"], 10, 30)).claims
        assert [c.job_id for c in first] == ["j1"]      # j2 is parked: k is full
        assert await r.zcard(keys.limit_parked("k")) == 1
        await q.finish("wB", [outcome(first[0])])
        await r.delete(keys.wake("qb"))
        other = await q.fetch("wA", ["qa"], 10, 30)     # a worker of another queue
        assert other.claims == []
        assert await r.zcard(keys.limit_parked("k")) == 0
        assert await r.zcard(keys.queue("qb")) == 1
        assert await r.llen(keys.wake("qb")) == 1       # qb's workers are woken
        assert [c.job_id for c in (await q.fetch("wB", ["qb"], 10, 30)).claims] == ["j2"]
    asyncio.run(with_redis(redis_url, body))


async def one_at_a_time_key(r, keys, jobs) -> RedisQueue:
    """A queue whose key k runs one job at a time, with ``jobs`` (id, queue) of key k."""
    q = RedisQueue(r, keys)
    await limits.publish(r, keys, limits.parse_rules({"k": {"concurrency": 1}}))
    await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "queue": queue,
                                     "limit_key": "k", "job_id": j}) for j, queue in jobs])
    return q


def test_parked_jobs_going_back_to_another_of_the_workers_queues_wake_it(redis_url):
    """A worker of queues qa and qb: a run of key k in qa ends, and k's parked job of qb goes
    back in line. A fetch that takes no jobs (the worker has no room) leaves a token on
    qb, not on qa, whose line is empty: a worker waiting on qb takes the job at once."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time_key(r, keys, (("j1", "qa"), ("j2", "qb")))
        first = (await q.fetch("w", ["qa", "qb"], 10, 30)).claims
        assert [c.job_id for c in first] == ["j1"]      # j2 is parked: k is full
        await r.delete(keys.wake("qa"), keys.wake("qb"))
        freed = await q.fetch("w", ["qa", "qb"], 0, 30, [first[0].run])
        assert freed.claims == [] and await r.zcard(keys.queue("qb")) == 1
        assert (await r.llen(keys.wake("qa")), await r.llen(keys.wake("qb"))) == (0, 1)
        again = await q.fetch("w", ["qa", "qb"], 10, 30)
        assert [c.job_id for c in again.claims] == ["j2"]
        assert await r.llen(keys.wake("qb")) == 0          # its line is empty again
    asyncio.run(with_redis(redis_url, body))


def test_a_freed_slot_wakes_the_queue_its_keys_parked_job_goes_back_to(redis_url):
    """A run of key k that is recorded or given back frees k's slot and wakes a worker to
    put k's parked jobs back in line. The token went to the queue of the run that ended:
    with k's parked job in another queue, a worker there found nothing, and the parked
    job's workers waited for the next recheck. It goes to the parked job's queue."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time_key(r, keys, (("j1", "qa"), ("j2", "qb"), ("j3", "qa")))
        [j1] = (await q.fetch("wA", ["qa"], 10, 30)).claims   # j3 is parked
        assert (await q.fetch("wB", ["qb"], 10, 30)).claims == []   # so is j2, first
        wakes = (keys.wake("qa"), keys.wake("qb"))
        await r.delete(*wakes)
        await q.finish("wA", [outcome(j1)])
        assert [await r.llen(w) for w in wakes] == [0, 1]
        [j2] = (await q.fetch("wB", ["qb"], 10, 30)).claims
        assert j2.job_id == "j2"
        await r.delete(*wakes)
        assert await q.release("wB", [j2.run]) == 1   # j2 back in qb, j3 due in qa
        assert [await r.llen(w) for w in wakes] == [1, 1]
    asyncio.run(with_redis(redis_url, body))


def test_a_run_that_ended_frees_its_slot_before_its_outcome_is_recorded(redis_url):
    """A crawl job's children go through the master before its outcome is recorded; its
    host's slot is free from the end of its run: the worker's next fetch names the run and
    claims the parked job in the same call. Only the claim that holds the job frees it."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time(r, keys, "q", ["j1", "j2", "j3"])
        [j1] = (await q.fetch("w1", ["q"], 10, 30)).claims
        assert (j1.job_id, j1.limit_key) == ("j1", "k")
        # not the holder, or not its attempt: the slot stays taken
        assert (await q.fetch("w2", ["q"], 10, 30, ended=[j1.run])).claims == []
        assert (await q.fetch("w1", ["q"], 10, 30, ended=[("j1", 2, j1.member)])).claims == []
        [j2] = (await q.fetch("w1", ["q"], 10, 30, ended=[j1.run])).claims
        assert j2.job_id == "j2"
        assert (await r.hget(keys.job("j1"), "status")) == b"running"   # not recorded
        assert await r.smembers(keys.limit_running("k")) == {b"j2"}
        # recorded later: its slot is not freed twice
        await q.finish("w1", [outcome(j1)])
        assert (await q.fetch("w1", ["q"], 10, 30)).claims == []
        # a worker with no room frees the slot and wakes another worker of the queue
        await r.delete(keys.wake("q"))
        assert (await q.fetch("w1", ["q"], 0, 30, ended=[j2.run])).claims == []
        assert await r.llen(keys.wake("q")) == 1
        assert [c.job_id for c in (await q.fetch("w2", ["q"], 10, 30)).claims] == ["j3"]
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("again_by", ["rerun", "resubmit"])
def test_a_lost_run_ending_beside_its_jobs_next_run_frees_no_slot(redis_url, again_by):
    """A rerun counts its attempts from 1 again, and so does a job submitted under an id
    freed meanwhile. A lost run of a job ended on the worker that held the job's next run,
    at the same attempt: it freed the slot the new run held, and one more job of the key
    ran at once than its limit."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time(r, keys, "q", ["j1"])
        [lost] = (await q.fetch("w1", ["q"], 10, 30)).claims
        await q.finish("w1", [outcome(lost)])   # (as if run elsewhere)
        if again_by == "rerun":
            await q.rerun("j1")
        else:
            await q.remove("j1")
            await one_at_a_time(r, keys, "q", ["j1"])
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "queue": "q",
                                         "limit_key": "k", "job_id": "j2"})])
        [again] = (await q.fetch("w1", ["q"], 10, 30)).claims   # j2 is parked
        assert (again.job_id, again.attempt) == ("j1", 1)
        assert (await q.fetch("w1", ["q"], 10, 30, ended=[lost.run])).claims == []
        [j2] = (await q.fetch("w1", ["q"], 10, 30, ended=[again.run])).claims
        assert j2.job_id == "j2"
    asyncio.run(with_redis(redis_url, body))


def test_a_run_given_back_or_redelivered_frees_its_slot_at_once(redis_url):
    """A stopping worker gives back the jobs it holds; a job whose worker died is queued
    again when its lease runs out. Either way its run leaves its key's running set, so
    the key's next job starts at the next fetch, not after the parked jobs' recheck."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time(r, keys, "q", ["j1", "j2"])
        [j1] = (await q.fetch("w1", ["q"], 10, 30)).claims   # j2 is parked
        assert await q.release("w1", [j1.run]) == 1
        assert await r.smembers(keys.limit_running("k")) == set()
        [again] = (await q.fetch("w2", ["q"], 10, 0.05)).claims   # a 50 ms lease
        assert again.job_id == "j1"   # back in its old place, ahead of j2
        deadline = time.monotonic() + 10
        while not (await q.recover())[0]:   # w2 died: its lease runs out
            assert time.monotonic() < deadline, "the lease never ran out"
            await asyncio.sleep(0.01)
        assert await r.smembers(keys.limit_running("k")) == set()
        assert [c.job_id for c in (await q.fetch("w3", ["q"], 10, 30)).claims] == ["j1"]
    asyncio.run(with_redis(redis_url, body))


def test_an_idle_workers_fetch_claims_a_job_the_moment_it_is_queued(redis_url):
    """An idle worker's fetch waits in Redis behind its BLPOP: the wake token of a new job
    lets it claim the job without another call from the worker. The claims of a fetch that
    came back while the loop was busy join the buffer, and a fetch still waiting is ended
    at once when the worker is told something (pause, new queues, stop)."""
    from elric.loading import JobModules
    from elric.worker import Worker

    async def main():
        w = Worker(load_settings(env={"ELRIC_REDIS_URL": redis_url}))
        w.redis = aredis.Redis.from_url(redis_url)
        w.blocking_redis = aredis.Redis.from_url(redis_url)
        w.queue, w.modules = RedisQueue(w.redis, w.keys), JobModules.load(["tests.jobs"])
        w.pool = SimpleNamespace(last_async=False, claims=list,   # an idle pool
                                 longest_sync_run=lambda: 0.0)
        try:
            assert (await w.queue.fetch(w.worker_id, ["default"], 5, 30)).claims == []
            w._changed.set()                 # something else ends this wait...
            await w._wait(4, for_work=True)
            assert w._waiting is not None and not w._waiting.done()
            await w.queue.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "j"})])
            # ...the job's token lets the waiting fetch claim it, with the loop away
            await asyncio.wait_for(asyncio.shield(w._waiting), 10)
            job = await w.redis.hmget(w.keys.job("j"), "status", "worker")
            assert job == [b"running", w.worker_id.encode()]
            await w._take_woken()
            assert [c.job_id for c in w.buffer] == ["j"] and w._waiting is None
            # told to pause (say): the wait ends now, not at its 4 s timeout
            await w._wait(4, for_work=True)
            await asyncio.wait_for(w._end_wait(), 2)
            assert w._waiting is None
        finally:
            await _close(w)
    asyncio.run(main())


@pytest.mark.parametrize("rules", [{}, {"*": {"interval": 0.05}}, {"*": {"concurrency": 8}}],
                         ids=["no-rule", "short-interval", "concurrency"])
def test_a_failed_runs_retry_after_holds_back_every_job_of_its_key(redis_url, rules):
    """A 429's Retry-After delayed that page's retry only: the host's other pages went on
    at full rate while it asked to slow down. Now the failed run holds its key's jobs back
    that long, whatever the key's rule (a shorter interval does not cut it short), and
    jobs of other keys pass; when the hold ends, the key's parked jobs start."""
    keys = Keys("elrictest")

    async def body(r):
        q = RedisQueue(r, keys)
        await limits.publish(r, keys, limits.parse_rules(rules))
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "limit_key": key,
                                         "job_id": key + n, "max_retries": 1})
                         for n in "12" for key in ("host", "short")] +
                        [normalize_spec({"func": "tests.jobs:Echo", "limit_key": "other",
                                         "job_id": "other"})])
        claims = (await q.fetch("w", ["default"], 2, 30)).claims
        assert [c.job_id for c in claims] == ["host1", "short1"]
        assert await q.finish("w", [outcome(c, False, "HTTP 429", retry_ms=60_000,
                                             hold_ms=hold)
                                    for c, hold in zip(claims, (60_000, 300))]) \
            == ["retrying", "retrying"]
        assert [c.job_id for c in (await q.fetch("w", ["default"], 10, 30)).claims] \
            == ["other"]   # host2 and short2 wait
        assert 59_000 < await r.pttl(keys.limit_hold("host")) <= 60_000
        await redis_clock_past(r, int(await r.get(keys.limit_hold("short"))) / 1000)
        assert [c.job_id for c in (await q.fetch("w", ["default"], 10, 30)).claims] \
            == ["short2"]
    asyncio.run(with_redis(redis_url, body))


def test_jobs_running_before_their_key_got_a_limit_count_against_it(redis_url):
    """LIMITS given a rule for a key while jobs of that key run (a master restarted with
    it, or the rules published again): those runs hold its slots, so no more start than
    the rule allows."""
    keys = Keys("elrictest")

    async def body(r):
        q = RedisQueue(r, keys)
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "limit_key": "k",
                                         "job_id": j}) for j in ("j1", "j2", "j3")])
        j1, _ = (await q.fetch("w1", ["default"], 2, 30)).claims   # no rule yet
        await limits.publish(r, keys, limits.parse_rules({"k": {"concurrency": 2}}))
        assert (await q.fetch("w2", ["default"], 10, 30)).claims == []   # j3 waits
        await q.finish("w1", [outcome(j1)])
        assert [c.job_id for c in (await q.fetch("w2", ["default"], 10, 30)).claims] \
            == ["j3"]
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("new_limits", [{"slow.test": {"interval": 0.1}}, {}])
def test_parked_jobs_follow_limits_changed_at_a_master_restart(make_cluster, new_limits):
    """A key given a long interval by mistake: its parked jobs wait out that interval. The
    master restarted with a shorter one (or none) must let them start under the new rule,
    not after the old interval (they waited an hour for an hour's rule)."""
    c = make_cluster(LIMITS=json.dumps({"slow.test": {"interval": 3600}}))
    master = c.start_master()
    c.start_worker("--concurrency", "1")
    specs = [AsyncHostPage.spec(["slow.test", i, 0.01], job_id=f"slow-{i}") for i in range(3)]
    c.client.submit_jobs(specs)
    c.wait_job("slow-0")
    r = redis.Redis.from_url(c.redis_url)
    wait_for(lambda: r.zcard(Keys("elric").limit_parked("slow.test")) == 2, what="two parked")
    r.close()
    master.stop()
    c.start_master(LIMITS=json.dumps(new_limits))
    jobs = [c.wait_job(s["job_id"], timeout=20) for s in specs]
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs), c.logs()


def test_a_keys_parked_jobs_start_at_its_rate_not_once_a_second(make_cluster):
    """A rate above one a second, pages slower than its interval: the key's jobs park behind
    the first, and go back in line one at a time. Each went back only at the parked jobs'
    one-second recheck (or when a run ended), so a host allowed 10 pages a second got one."""
    c = make_cluster(LIMITS=json.dumps({"fast.test": {"rate": 10}}))
    c.start_master()
    c.start_worker("--concurrency", "1")
    specs = [AsyncHostPage.spec(["fast.test", i, 4.0], job_id=f"p{i}") for i in range(20)]
    c.client.submit_jobs(specs)
    jobs = [c.wait_job(s["job_id"], timeout=60) for s in specs]
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs), c.logs()
    claims = sorted(j["started_at"] for j in jobs)
    assert all(b - a >= 0.09 for a, b in zip(claims, claims[1:])), claims
    assert claims[-1] - claims[0] < 19 * 0.1 + 2.0, claims   # one a second took 19 s


def test_a_worker_busy_with_a_long_job_holds_no_slot_for_a_job_it_cannot_start(make_cluster):
    """A worker's prefetch took a job of a limited key behind a long one: the claim held the
    key's only slot while it waited in the buffer, and every job of the key waited for the
    long one, with another worker idle. A worker claims a limited job only when it can
    start it."""
    from tests.jobs import Sleep

    c = make_cluster(LIMITS=json.dumps({"k": {"concurrency": 1}}))
    c.start_master()
    c.start_worker("--concurrency", "1")
    c.client.submit_jobs([Sleep.spec([15], job_id="long")])
    wait_for(lambda: c.client.get_job("long")["status"] == "running", what="the long job")
    keyed = [Sleep.spec([0.05], job_id=f"k{i}", limit_key="k") for i in range(4)]
    c.client.submit_jobs(keyed)
    c.start_worker("--concurrency", "1")
    jobs = [c.wait_job(s["job_id"], timeout=30) for s in keyed]
    assert all(j["status"] == "succeeded" for j in jobs), c.logs()
    assert c.client.get_job("long")["status"] == "running", "the key's jobs waited for it"


def test_a_busy_workers_wait_leaves_a_limited_jobs_wake_token_to_an_idle_worker(redis_url):
    """A worker whose pool is full may claim no limited job; its wait for work took the new
    job's wake token all the same, claimed nothing, and an idle worker started the job
    only at its own wait's timeout, a second later. A busy worker waits without a token."""
    from elric.loading import JobModules
    from elric.worker import Worker

    async def main():
        w = Worker(load_settings(env={"ELRIC_REDIS_URL": redis_url, "ELRIC_CONCURRENCY": "1"}))
        w.redis = aredis.Redis.from_url(redis_url)
        w.blocking_redis = aredis.Redis.from_url(redis_url)
        w.queue, w.modules = RedisQueue(w.redis, w.keys), JobModules.load(["tests.jobs"])
        running = SimpleNamespace(job_id="long")   # its one process runs a long job
        w.pool = SimpleNamespace(last_async=False, claims=lambda: [running],
                                 longest_sync_run=lambda: 0.0)
        try:
            await limits.publish(w.redis, w.keys, limits.parse_rules({"k": {"concurrency": 5}}))
            assert w._sizes() == (1, 0)
            await w.queue.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "j",
                                                   "limit_key": "k"})])
            assert await w.redis.llen(w.keys.wake("default")) == 1
            await w._wait(0.2, for_work=True)
            await w._take_woken()
            assert not w.buffer
            # the token is still there for a worker that can start the job
            assert await w.redis.llen(w.keys.wake("default")) == 1
        finally:
            await _close(w)
    asyncio.run(main())


@pytest.mark.parametrize("rules", [{}, {"*": {"concurrency": 8}}], ids=["no-rule", "concurrency"])
def test_a_jobs_crawl_delay_holds_when_a_job_without_one_comes_first_in_a_fetch(redis_url,
                                                                                 rules):
    """One fetch met a host's job without a limit_interval (a start page, before robots.txt
    was read) and then pages of it with their Crawl-delay: the host's state was kept as the
    first job's, with no interval, so every page of it in that fetch started at once and
    none set the time the next may start. Each job's own interval counts."""
    keys = Keys("elrictest")

    async def body(r):
        q = RedisQueue(r, keys)
        await limits.publish(r, keys, limits.parse_rules(rules))
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "limit_key": "h",
                                         "job_id": j, **extra})
                         for j, extra in (("start", {}), ("p1", {"limit_interval": 60}),
                                          ("p2", {"limit_interval": 60}))])
        claims = (await q.fetch("w", ["default"], 10, 30)).claims
        assert [c.job_id for c in claims] == ["start", "p1"]   # p2 waits a minute
        assert (await q.fetch("w", ["default"], 10, 30)).claims == []
        assert await r.zcard(keys.limit_parked("h")) == 1
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("rules", [{}, {"k": {"concurrency": 2}}], ids=["no-rule", "concurrency"])
def test_a_job_whose_keys_running_set_an_operator_overwrote_waits_in_line_named(redis_url,
                                                                                caplog, rules):
    """Key k's running set SET to a string: fetch.lua took k's job out of its line, then
    failed adding it to that set (or failed every fetch reading it): in no queue, not
    claimed, not parked, the job was lost for good. It waits in its place, named, once in a
    fetch (no wait of 0: the scan budget is not spent on it), and holds back no job behind
    it; once the key is deleted it is claimed."""
    keys = Keys("elrictest")

    async def body(r):
        q = RedisQueue(r, keys)
        await limits.publish(r, keys, limits.parse_rules(rules))
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": j, **extra})
                         for j, extra in (("a", {"limit_key": "k"}), ("b", {}))])
        await r.set(keys.limit_running("k"), "overwritten")
        fetched = await q.fetch("w", ["default"], 10, 30)
        assert [c.job_id for c in fetched.claims] == ["b"]
        assert fetched.limited_wait is None
        assert [m[17:] for m in await r.zrange(keys.queue("default"), 0, -1)] == [b"a"]
        assert (await q.get_job("a"))["status"] == "queued"
        assert keys.limit_running("k") in caplog.text
        await r.delete(keys.limit_running("k"))
        assert [c.job_id for c in (await q.fetch("w", ["default"], 10, 30)).claims] \
            == ["a"]
    asyncio.run(with_redis(redis_url, body))


def test_a_fetch_that_spent_its_scan_on_jobs_left_in_line_does_not_say_look_again_now(
        redis_url):
    """More jobs than a fetch looks at (SCAN_BUDGET), each passed over and left in its place
    (their key's running set of another type, an operator's SET): the fetch said 0, "more
    in line, look again now", and its worker fetched again at once, for good, each call
    scanning the same jobs. Only a fetch that moved jobs out of the line says 0."""
    keys = Keys("elrictest")

    async def body(r):
        q = RedisQueue(r, keys)
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": f"k{i}",
                                         "limit_key": "k"}) for i in range(1001)])
        await r.set(keys.limit_running("k"), "overwritten")
        fetched = await q.fetch("w", ["default"], 10, 30)
        assert fetched.claims == [] and fetched.limited_wait != 0, fetched.limited_wait
    asyncio.run(with_redis(redis_url, body))

@pytest.mark.parametrize("overwritten", ["parked", "counts"])
def test_a_job_parked_on_a_key_an_operator_overwrote_waits_in_line_named(redis_url, caplog,
                                                                        overwritten):
    """k runs one job at a time, so its second job is parked: with k's parked set (or the
    parked counts) SET to a string, fetch.lua took that job out of its line, then failed
    parking it: in no queue, not claimed, not parked, it was lost for good. It waits in its
    place, named, holding back no job behind it; once the key is deleted it is parked."""
    keys = Keys("elrictest")
    bad = keys.limit_parked("k") if overwritten == "parked" else keys.limits_parked

    async def body(r):
        q = await one_at_a_time(r, keys, "default", ["j1", "j2"])
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "b"})])
        await r.set(bad, "overwritten")
        fetched = await q.fetch("w", ["default"], 10, 30)
        assert [c.job_id for c in fetched.claims] == ["j1", "b"]
        assert [m[17:] for m in await r.zrange(keys.queue("default"), 0, -1)] == [b"j2"]
        assert (await q.get_job("j2"))["status"] == "queued"
        assert bad in caplog.text
        await r.delete(bad)
        assert (await q.fetch("w", ["default"], 10, 30)).claims == []
        assert await r.zcard(keys.limit_parked("k")) == 1
        assert await r.hget(keys.limits_parked, "default") == b"1"
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("overwritten", ["due", "hold", "next", "running"])
def test_a_limits_key_an_operator_overwrote_holds_back_only_the_jobs_it_limits(redis_url,
                                                                               caplog,
                                                                               overwritten):
    """The limits-due set, or key k's hold, next-start or running key, overwritten with
    another type: every fetch failed (WRONGTYPE), every worker of every queue stopped. Now
    only the jobs it limits wait (every limited job for the due set, which each one's end
    writes; k's for k's keys), in their place or parked, named; other jobs are claimed, and
    once the key is deleted k's jobs go on."""
    keys = Keys("elrictest")
    bad = {"due": keys.limits_due, "hold": keys.limit_hold("k"),
           "next": keys.limit_next("k"), "running": keys.limit_running("k")}[overwritten]

    async def body(r):
        q = RedisQueue(r, keys)
        await limits.publish(r, keys, limits.parse_rules({"k": {"interval": 60}}))
        spec = {"func": "tests.jobs:Echo", "limit_key": "k"}
        await q.enqueue([normalize_spec({**spec, "job_id": j}) for j in ("k1", "k2")])
        [k1] = (await q.fetch("w", ["default"], 10, 30)).claims   # k2 is parked
        await r.zadd(keys.limits_due, {"k": 0})   # k's parked job is looked at now
        await q.enqueue([normalize_spec({**spec, "job_id": "k3"}),
                         normalize_spec({**spec, "job_id": "o", "limit_key": "other"}),
                         normalize_spec({"func": "tests.jobs:Echo", "job_id": "b"})])
        await r.delete(bad)
        await r.rpush(bad, "overwritten")
        fetched = await q.fetch("w", ["default"], 10, 30, ended=[k1.run])
        assert [c.job_id for c in fetched.claims] == (["b"] if overwritten == "due"
                                                      else ["o", "b"])
        assert await r.zcard(keys.limit_parked("k")) == 1
        assert bad in caplog.text
        await r.delete(bad)
        await r.zadd(keys.limits_due, {"k": 0})
        await q.fetch("w", ["default"], 10, 30)
        assert await r.zcard(keys.queue("default")) == 0   # claimed or parked
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("overwritten", ["queue", "counts", "job"])
def test_a_parked_job_whose_queue_an_operator_overwrote_stays_parked_named(redis_url, caplog,
                                                                          overwritten):
    """k's slot frees and its parked job of queue qb goes back in line, with qb (or the
    parked counts) overwritten with another type: fetch.lua had popped the job from k's
    parked set, then failed writing it back (ZADD, HINCRBY): out of both, it was lost, and
    every fetch failed. It stays parked in its place, named; other jobs are claimed; once
    the key is deleted it goes back in line when k is looked at again. A parked job whose
    hash is of another type failed every fetch too: it leaves as a removed job, named."""
    keys = Keys("elrictest")
    bad = {"queue": keys.queue("qb"), "counts": keys.limits_parked,
           "job": keys.job("k2")}[overwritten]

    async def body(r):
        q = await one_at_a_time_key(r, keys, [("k1", "default"), ("k2", "qb")])
        [k1] = (await q.fetch("w", ["default", "qb"], 10, 30)).claims   # k2 is parked
        await q.finish("w", [outcome(k1)])   # k2 is due
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "b"})])
        counts = await r.hgetall(keys.limits_parked)
        await r.delete(bad)
        await r.set(bad, "overwritten")
        assert [c.job_id for c in (await q.fetch("w", ["default"], 10, 30)).claims] \
            == ["b"]
        assert bad in caplog.text
        if overwritten == "job":
            assert await r.zcard(keys.limit_parked("k")) == 0
            return
        assert await r.zcard(keys.limit_parked("k")) == 1
        await r.delete(bad)
        if counts and overwritten == "counts":
            await r.hset(keys.limits_parked, mapping=counts)
        await r.zadd(keys.limits_due, {"k": 0})   # (looked at again within a second)
        await q.fetch("w", ["default"], 10, 30)
        assert await r.zcard(keys.limit_parked("k")) == 0
        assert [c.job_id for c in (await q.fetch("w", ["qb"], 10, 30)).claims] == ["k2"]
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("overwritten", ["due", "running", "parked", "hold"])
def test_a_run_ending_while_its_keys_limits_key_is_overwritten_is_recorded(redis_url,
                                                                          overwritten):
    """k1 of key k (its next job parked) ends while the limits-due set, or k's running,
    parked or hold key, holds another type: finish.lua had taken k1 out of inflight and
    the running index, then failed freeing its slot (or holding k back for its
    Retry-After): left running with no lease, nothing redelivered or recorded it, and the
    batch's other outcomes failed with it. It is recorded; what it would write there is
    left out (fetch.lua names the key)."""
    keys = Keys("elrictest")
    bad = {"due": keys.limits_due, "running": keys.limit_running("k"),
           "parked": keys.limit_parked("k"), "hold": keys.limit_hold("k")}[overwritten]

    async def body(r):
        q = await one_at_a_time(r, keys, "default", ["k1", "k2"])
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "b"})])
        k1, b = (await q.fetch("w", ["default"], 10, 30)).claims   # k2 is parked
        await r.delete(bad)
        await r.rpush(bad, "overwritten")
        assert await q.finish("w", [outcome(k1, False, "HTTP 429", hold_ms=60_000),
                                    outcome(b)]) == ["failed", "succeeded"]
        assert await r.zscore(keys.inflight, "k1") is None
    asyncio.run(with_redis(redis_url, body))


@pytest.mark.parametrize("ended", [False, True], ids=["prune", "ended"])
def test_a_running_job_whose_hash_an_operator_overwrote_fails_no_fetch(redis_url, caplog,
                                                                       ended):
    """k runs one job at a time; its running job k1's hash SET to a string: a fetch told
    k1's run ended (HMGET), or one finding k full with k2 parked and looking which of its
    running jobs still run (HGET), failed, and so did every fetch after it, on every
    worker. k1 keeps its slot (k2 stays parked), named; other jobs are claimed."""
    keys = Keys("elrictest")

    async def body(r):
        q = await one_at_a_time(r, keys, "default", ["k1", "k2"])
        [k1] = (await q.fetch("w", ["default"], 10, 30)).claims   # k2 is parked
        await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "b"})])
        await r.delete(keys.job("k1"))
        await r.set(keys.job("k1"), "overwritten")
        await r.zadd(keys.limits_due, {"k": 0})   # k's parked job is looked at now
        fetched = await q.fetch("w", ["default"], 10, 30, ended=[k1.run] if ended else ())
        assert [c.job_id for c in fetched.claims] == ["b"]
        assert await r.zcard(keys.limit_parked("k")) == 1
        assert await r.sismember(keys.limit_running("k"), "k1")
        assert keys.job("k1") in caplog.text
    asyncio.run(with_redis(redis_url, body))
