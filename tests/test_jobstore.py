"""The Redis job store: add/get/replace/remove/pause/resume/modify/list, restarts, wake-ups."""

from __future__ import annotations

import asyncio
import math

import pytest
import redis.asyncio as aioredis

from elric.codec import pack
from elric.jobstore import FINISHED_TTL, Coalesce, Options, RedisJobStore, ScheduleError, fire_id
from elric.keys import Keys
from elric.triggers import TriggerError

T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def spec(job_id="site", trigger=None, **extra):
    return {"func": "tests.jobs:Crawl", "args": ["https://example.org"], "kwargs": {}, "job_id": job_id,
            "queue": "default", "priority": 0, "trigger": trigger or {"type": "interval", "minutes": 15}, **extra}


def run(redis_url, body):
    """Run ``body(store, redis, keys, clock)`` on a fresh client in its own event loop."""
    async def main():
        r = aioredis.Redis.from_url(redis_url)
        keys, clock = Keys("elrictest"), Clock()
        try:
            return await body(RedisJobStore(r, keys, clock=clock), r, keys, clock)
        finally:
            await r.aclose()
    return asyncio.run(main())


def test_add_and_get(redis_url):
    async def body(store, r, keys, clock):
        out = await store.add(spec(max_instances=2, coalesce="all", misfire_grace_time=None))
        assert out == {"job_id": "site", "status": "scheduled", "next_run_time": T0 + 900}
        job = await store.get("site")
        assert job["func"] == "tests.jobs:Crawl" and job["args"] == ["https://example.org"]
        assert job["trigger"]["type"] == "interval" and job["trigger"]["minutes"] == 15
        assert job["next_run_time"] == T0 + 900 and job["paused"] is False and job["status"] == "scheduled"
        assert (job["max_instances"], job["coalesce"], job["misfire_grace_time"]) == (2, "all", None)
        assert job["runs"] == []
        assert "trigger" not in (await store.get("site"))["runs"]
        # readable from redis-cli; the index holds ms
        h = await r.hgetall(keys.schedule("site"))
        assert h[b"func"] == b"tests.jobs:Crawl" and h[b"trigger_text"].startswith(b"interval[")
        assert h[b"next_run_iso"] == b"2026-05-28T20:41:40+00:00"
        assert await r.zscore(keys.schedules, "site") == (T0 + 900) * 1000
        assert await store.get("nope") is None
        assert await store.count() == 1
    run(redis_url, body)


def test_defaults_and_option_errors(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec())
        job = await store.get("site")
        assert (job["misfire_grace_time"], job["coalesce"], job["max_instances"]) == (60.0, "latest", 1)
        for bad, word in [({"misfire_grace_time": 0}, "misfire_grace_time"), ({"coalesce": "some"}, "coalesce"),
                          ({"max_instances": 0}, "max_instances"), ({"max_instances": True}, "max_instances")]:
            with pytest.raises(ScheduleError, match=word):
                await store.add(spec("other", **bad))
        with pytest.raises(TriggerError, match="trigger.minute"):
            await store.add(spec("other", {"type": "cron", "minute": 99}))
        with pytest.raises(TriggerError, match="trigger"):
            await store.add({"func": "a:B", "job_id": "x"})
        with pytest.raises(ScheduleError, match="job_id"):
            await store.add(spec(job_id=""))
        assert await store.add(spec("enum", coalesce=Coalesce.SKIP))
        assert (await store.get("enum"))["coalesce"] == "skip"
        assert await store.count() == 2
    run(redis_url, body)


def test_duplicate_and_replace_existing(redis_url):
    async def body(store, r, keys, clock):
        first = await store.add(spec())
        # the same job again (a retried call) is answered as stored; another one is refused
        clock.t += 10
        assert await store.add(spec()) == first
        with pytest.raises(ScheduleError) as err:
            await store.add(spec(args=["https://other.example"]))
        assert str(err.value) == "job 'site' already exists; pass replace_existing=True to replace its schedule"
        clock.t -= 10
        # the same script run again later: same trigger keeps its phase, new args are taken
        clock.t += 100
        out = await store.add(spec(args=["https://example.com"]), replace_existing=True)
        assert out["next_run_time"] == T0 + 900
        assert (await store.get("site"))["args"] == ["https://example.com"]
        # replace_existing inside the spec works too (as the wire sends it); a new trigger reschedules
        out = await store.add(spec(trigger={"type": "interval", "minutes": 5}, replace_existing=True))
        assert out["next_run_time"] == clock.t + 300
        assert await store.count() == 1
        assert await r.zcard(keys.schedules) == 1
    run(redis_url, body)


def test_remove(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec())
        await r.lpush(keys.schedule_runs("site"), pack({"outcome": "missed"}))
        assert await store.remove("site") is True
        assert await store.remove("site") is False
        assert await store.get("site") is None and await store.count() == 0
        assert not await r.exists(keys.schedule("site"), keys.schedule_runs("site"))
        await store.add(spec())  # can be added again
    run(redis_url, body)


def test_pause_resume(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec())
        assert await store.pause("site") is True
        job = await store.get("site")
        assert job["paused"] is True and job["status"] == "paused" and job["next_run_time"] is None
        assert math.isinf(await r.zscore(keys.schedules, "site"))  # listed, never due
        assert (await store.list())[0]["paused"] is True
        # a replace by a re-run script keeps the operator's pause
        await store.add(spec(), replace_existing=True)
        assert (await store.get("site"))["paused"] is True
        clock.t += 3000  # fires due while paused are dropped; it resumes on the grid from now
        assert await store.resume("site") is True
        job = await store.get("site")
        assert job["paused"] is False and job["next_run_time"] == T0 + 900 * 4
        assert await store.pause("nope") is False and await store.resume("nope") is False
        # a date job's one fire is kept: misfire_grace_time then judges it, as a late fire
        await store.add(spec("once", trigger={"type": "date", "run_date": T0 + 3600}))
        assert await store.pause("once") is True
        clock.t = T0 + 7200
        assert await store.resume("once") is True
        assert (await store.get("once"))["next_run_time"] == T0 + 3600
    run(redis_url, body)


def test_a_change_racing_between_its_read_and_its_write_is_not_lost_nor_resurrects(redis_url):
    """pause and resume read the job, then write it: a remove, or another change, landing in
    between must neither be undone nor bring a removed job back (the write is a
    compare-and-set on the version read, retried on a fresh read)."""
    async def body(store, r, keys, clock):
        load, meddle = store._load, []

        async def racing_load(job_id):   # each read is followed by a meddler's change
            job = await load(job_id)
            if meddle:
                await meddle.pop(0)()
            return job
        store._load = racing_load
        await store.add(spec())
        await store.pause("site")
        meddle.append(lambda: store.remove("site"))
        assert await store.resume("site") is False   # removed meanwhile: no such job now
        assert not await r.exists(keys.schedule("site")) and await store.count() == 0
        await store.add(spec())
        meddle.append(lambda: store.pause("site"))   # after a resume read it not paused:
        assert await store.resume("site") is True    # the pause came last, and holds
        assert (await store.get("site"))["paused"] is True
        meddle.append(lambda: store.resume("site"))  # after a resume read it paused: one
        assert await store.resume("site") is True    # resume, not a write of a stale read
        assert (await store.get("site"))["paused"] is False
        meddle.append(lambda: store.remove("site"))
        assert await store.pause("site") is False
        assert not await r.exists(keys.schedule("site")) and await store.count() == 0
    run(redis_url, body)


def test_pausing_a_finished_job_leaves_it_finished(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec("once", {"type": "date", "run_date": T0 + 30}))
        # as the scheduler leaves it after its one fire: out of the index, expiring
        await r.hset(keys.schedule("once"), "next_run_time", "")
        await r.zrem(keys.schedules, "once")
        await r.expire(keys.schedule("once"), FINISHED_TTL)
        # refused, as run_now refuses it: answered True, a caller read it as paused
        with pytest.raises(ScheduleError, match="'once' has finished: no fires are left"):
            await store.pause("once")
        assert (await store.get("once"))["status"] == "finished"
        # not listed, counted nor kept forever as a paused job with no fire left
        assert await store.count() == 0 and await store.list() == []
        assert 0 < await r.ttl(keys.schedule("once")) <= FINISHED_TTL
    run(redis_url, body)


def test_modify(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec())
        job = await store.modify("site", {"args": [1], "kwargs": {"depth": 2}, "queue": "slow", "priority": 5})
        assert (job["args"], job["kwargs"], job["queue"], job["priority"]) == ([1], {"depth": 2}, "slow", 5)
        assert job["next_run_time"] == T0 + 900  # unchanged schedule
        assert (await r.hget(keys.schedule("site"), "queue")) == b"slow"
        clock.t += 10
        job = await store.modify("site", {"trigger": {"type": "cron", "crontab": "0 * * * *"},
                                          "coalesce": "all", "max_instances": 3})
        assert job["trigger"] == {"type": "cron", "crontab": "0 * * * *", "timezone": "UTC"}
        assert job["next_run_time"] == 1_780_002_000.0  # the next full hour
        assert (job["coalesce"], job["max_instances"], job["misfire_grace_time"]) == ("all", 3, 60.0)
        job = await store.modify("site", {"misfire_grace_time": None})
        assert job["misfire_grace_time"] is None
        with pytest.raises(ScheduleError, match="unknown key"):
            await store.modify("site", {"colour": "red"})
        with pytest.raises(ScheduleError, match="job_id cannot be modified"):
            await store.modify("site", {"job_id": "other"})
        with pytest.raises(TriggerError, match="trigger.hour"):
            await store.modify("site", {"trigger": {"type": "cron", "hour": 24}})
        with pytest.raises(ScheduleError, match="coalesce"):
            await store.modify("site", {"coalesce": "never"})
        with pytest.raises(ScheduleError, match="no periodic job 'nope'"):
            await store.modify("nope", {"args": []})
        assert (await store.get("site"))["coalesce"] == "all"  # failed changes left it alone
    run(redis_url, body)


def test_list_paged_by_next_run(redis_url):
    async def body(store, r, keys, clock):
        for i in range(25):
            await store.add(spec(f"job{i:02d}", {"type": "interval", "seconds": 100 - i}))
        await store.pause("job24")
        page1 = await store.list(offset=0, limit=10)
        page3 = await store.list(offset=20, limit=10)
        assert [j["job_id"] for j in page1] == [f"job{i:02d}" for i in range(23, 13, -1)]
        assert [j["job_id"] for j in page3] == ["job03", "job02", "job01", "job00", "job24"]
        assert page1[0]["next_run_time"] == T0 + 77 and page1[0]["func"] == "tests.jobs:Crawl"
        assert page3[-1]["paused"] is True and page3[-1]["next_run_time"] is None
        assert await store.list(offset=30) == []
        assert await store.count() == 25
    run(redis_url, body)


@pytest.mark.parametrize("field, bad", [("trigger", b"\xc1"), ("next_run_time", b"soon"),
                                        ("func", None), ("trigger", None)])
def test_one_unreadable_schedule_is_listed_as_such_and_the_others_too(redis_url, field, bad):
    """One schedule hash holding a field that cannot be read (written by hand, a bad
    restore) failed the whole listing, with a bare msgpack FormatError: no periodic job
    showed in elric schedules or the dashboard. One without its trigger was left out, as
    if removed, while the scheduler logged it each minute. It is listed, saying what to do."""
    async def body(store, r, keys, clock):
        for job_id in ("bad", "good"):
            await store.add(spec(job_id))
        if bad is None:
            await r.hdel(keys.schedule("bad"), field)
        else:
            await r.hset(keys.schedule("bad"), field, bad)
        rows = {j["job_id"]: j for j in await store.list()}
        assert rows["good"]["trigger"] == {"type": "interval", "minutes": 15,
                                           "start_date": "2026-05-28T20:41:40+00:00",
                                           "timezone": "UTC"}
        assert "cannot be read" in rows["bad"]["trigger_text"]
        assert "remove it and add it again" in rows["bad"]["trigger_text"]
    run(redis_url, body)


@pytest.mark.parametrize("key, bad", [
    ("schedule", b"\xc1"), ("schedule", pack({"type": "no such trigger"})),
    ("runs", b"\xc1"), ("runs", pack(5)), ("runs", pack({"outcome": "enqueued"}))])
def test_get_and_run_now_of_an_unreadable_schedule_say_which_and_what_to_do(redis_url, key, bad):
    """get() raised a bare msgpack FormatError (or TypeError, KeyError) on a trigger or a
    run record written by hand or badly restored: the dashboard's schedules page, which gets
    every row, failed for all of them, and run-now's wait failed. It names the job now."""
    async def body(store, r, keys, clock):
        for job_id in ("bad", "good"):
            await store.add(spec(job_id))
        if key == "schedule":
            await r.hset(keys.schedule("bad"), "trigger", bad)
        else:
            await r.lpush(keys.schedule_runs("bad"), bad)
        with pytest.raises(ScheduleError, match=r"^periodic job 'bad': its stored data cannot "
                                                r"be read \(.+\): remove it \(elric schedules "
                                                r"remove bad\) and add it again$"):
            await store.get("bad")
        view = await store.view("bad")   # get_job's: named, with the same what-to-do
        assert view["status"] == "scheduled" and view["error"].startswith(
            "periodic job 'bad': its stored data cannot be read (") and view["unreadable"]
        if key == "schedule":   # (with its runs unreadable, the fire is made: get says so)
            with pytest.raises(ScheduleError, match="periodic job 'bad': its stored data"):
                await store.run_now("bad")
        assert (await store.get("good"))["status"] == "scheduled"
        assert await store.run_now("good") == T0   # due now
        assert await store.remove("bad") and await store.get("bad") is None   # as it says
    run(redis_url, body)


def test_survives_a_new_store_instance(redis_url):
    run(redis_url, lambda store, r, k, c: store.add(spec(trigger={"type": "cron", "crontab": "30 2 * * *",
                                                                 "timezone": "Europe/Berlin"})))

    async def body(store, r, keys, clock):  # a restarted master: new client, new store
        job = await store.get("site")
        assert job["trigger"]["crontab"] == "30 2 * * *" and job["next_run_time"] == 1_780_014_600.0
        with pytest.raises(ScheduleError, match="already exists"):
            await store.add(spec(args=["https://other.example"]))
    run(redis_url, body)


def test_add_wakes_the_scheduler_only_for_a_sooner_job(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec("a", {"type": "interval", "minutes": 10}))
        assert await r.lrange(keys.scheduler_wake, 0, -1) == [b"1"]
        await r.delete(keys.scheduler_wake)
        await store.add(spec("b", {"type": "interval", "minutes": 20}))  # later than the head
        assert await r.llen(keys.scheduler_wake) == 0
        for i in range(5):  # sooner each time; the list stays one token long
            await store.add(spec(f"c{i}", {"type": "interval", "minutes": 9 - i}))
        assert await r.llen(keys.scheduler_wake) == 1
    run(redis_url, body)


def test_get_shows_runs_with_outcome_and_duration(redis_url):
    async def body(store, r, keys, clock):
        await store.add(spec())
        runs = keys.schedule_runs("site")
        await r.lpush(runs, pack({"fire_time": T0, "job_id": "site@a", "outcome": "enqueued"}))
        await r.lpush(runs, pack({"fire_time": T0 + 1, "job_id": "site@b", "outcome": "skipped",
                                           "reason": "max_instances"}))
        await r.lpush(runs, pack({"fire_time": T0 + 2, "job_id": "site@c", "outcome": "enqueued"}))
        # as queue.py writes them: times and duration in ms
        await r.hset(keys.job("site@a"), mapping={"status": "succeeded", "duration_ms": 2500})
        await r.hset(keys.job("site@c"), mapping={"status": "running", "started_at": 1000, "finished_at": 1750})
        c, b, a = (await store.get("site"))["runs"]
        assert b["outcome"] == "skipped" and b["reason"] == "max_instances"
        assert a["outcome"] == "succeeded" and a["duration"] == 2.5
        assert c["outcome"] == "running" and c["duration"] == 0.75
    run(redis_url, body)


def test_a_trigger_that_never_fires_is_refused_not_stored_finished(redis_url):
    """An interval whose end_date comes before its next fire was stored finished and
    answered as if scheduled: a schedule that silently never ran."""
    async def body(store, r, keys, clock):
        with pytest.raises(TriggerError, match="trigger.end_date: 2020-01-01T00:00:00"
                                               "[+]00:00 comes before the next fire"):
            await store.add(spec("once", {"type": "interval", "minutes": 1,
                                          "start_date": "2019-01-01T00:00:00Z",
                                          "end_date": "2020-01-01T00:00:00Z"}))
        # without a start_date too: its first fire, one interval from now, is after end_date
        # (it named a start_date the user never gave: "is before start_date ...")
        with pytest.raises(TriggerError, match="trigger.end_date: .* comes before the next fire"):
            await store.add(spec("once", {"type": "interval", "minutes": 1, "end_date": T0 + 30}))
        assert await store.get("once") is None and await store.count() == 0
    run(redis_url, body)


def test_a_rounds_progress_never_shows_fewer_than_0_jobs_live():
    """A round's hash expires FAILED_TTL after its last change; a job of it ending later
    writes a hash of that count alone, which read as -1 jobs live."""
    from elric.jobstore import round_progress
    assert round_progress({b"succeeded": b"1"}) == {"submitted": 0, "live": 0,
                                                    "succeeded": 1, "failed": 0}


@pytest.mark.parametrize("grace", [0, -1, math.nan, math.inf, 10**400, True, "60"])
def test_a_grace_that_is_no_positive_float_is_refused_naming_it(grace):
    # 10**400 (a Python caller's int past a float's range) raised a bare OverflowError
    with pytest.raises(ScheduleError, match="misfire_grace_time"):
        Options(misfire_grace_time=grace)
    assert Options(misfire_grace_time=2**70).misfire_grace_time == float(2**70)


def test_waiting_for_a_fire_no_master_decides_reads_it_a_few_times_not_every_50ms(redis_url):
    """run-now waits up to 15 s for what the scheduler did with its fire; with no master
    scheduling (one taking over) it read the whole job, runs and all, 20 times a second."""
    async def body(store, r, keys, clock):
        await store.add(spec())
        fire = fire_id("site", await store.run_now("site"))

        async def reads() -> int:   # each look reads its runs list once
            return (await r.info("commandstats")).get("cmdstat_lrange", {}).get("calls", 0)
        before = await reads()
        assert await store.fire_run("site", fire, 2.0) is None
        assert await reads() - before <= 12   # was 40
    run(redis_url, body)


def test_a_periodic_job_named_like_anothers_runs_key_is_its_own(redis_url):
    """Ids may hold ':' (a URL); the runs and rounds-left keys of "X" were
    schedule:X:runs and schedule:X:rounds_left, the hash of periodic jobs "X:runs" and
    "X:rounds_left": removing "X" deleted them."""
    async def body(store, r, keys, clock):
        for job_id in ("X", "X:runs", "X:rounds_left"):
            await store.add(spec(job_id))
        assert await store.remove("X") is True
        for job_id in ("X:runs", "X:rounds_left"):
            assert (await store.get(job_id))["status"] == "scheduled", job_id
    run(redis_url, body)
