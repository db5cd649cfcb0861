"""The scheduler: fire times and ids, misfires, max_instances, DST, two masters, wake-ups.

Time-dependent logic runs against an injected clock and ``tick()``; only the wake-up and
takeover tests use the real clock, with deadline-based waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections import Counter
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis

from elric.clock import RedisClock
from elric.codec import unpack
from elric.jobstore import RedisJobStore, ScheduleError
from elric.keys import Keys
from elric.queue import Fenced, Submitted
from elric.scheduler import Scheduler, fire_id

T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z
UTC = timezone.utc


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    async def sync(self) -> float:
        return self.t


class Recorder:
    """A fake enqueue: records specs, sets each job hash status like the master would, and
    refuses a stale fence token and clears pending fires like the real queue."""

    def __init__(self, redis, keys, status="succeeded") -> None:
        self.redis, self.keys, self.status = redis, keys, status
        self.specs: list[dict] = []
        self.tokens: list[int] = []
        self.before = None  # optional hook run before the fence check

    async def __call__(self, specs, token, recovered=False):
        if self.before:
            await self.before()
        if int(await self.redis.get(self.keys.scheduler_fence)) != token:
            raise Fenced(f"token {token} is stale")
        for s in specs:
            await self.redis.hset(self.keys.job(s["job_id"]), "status", self.status)
            await self.redis.hdel(self.keys.fires_pending, s["job_id"])
        self.specs += specs
        self.tokens.append(token)
        return [Submitted(s["job_id"], "queued") for s in specs]

    @property
    def times(self) -> list[float]:
        return [s["fire_time"] for s in self.specs]


def spec(job_id="site", trigger=None, **extra):
    return {"func": "tests.jobs:Crawl", "args": ["https://example.org"], "kwargs": {}, "job_id": job_id,
            "queue": "default", "priority": 0, "trigger": trigger or {"type": "interval", "minutes": 1}, **extra}


def run(redis_url, body, t=T0, status="succeeded"):
    """Run ``body(env)`` with one store + scheduler on a fresh client and its own loop
    (``t=None``: the real clock)."""
    async def main():
        r = aioredis.Redis.from_url(redis_url)
        env = Env(r, Keys("elrictest"), RedisClock(r) if t is None else Clock(t), status)
        try:
            return await body(env)
        finally:
            await r.aclose()
    return asyncio.run(main())


class Env:
    def __init__(self, r, keys, clock, status="succeeded"):
        self.r, self.keys, self.clock = r, keys, clock
        self.store = RedisJobStore(r, keys, clock=clock)
        self.rec = Recorder(r, keys, status)
        self.sched = self.scheduler("m1", self.rec)

    def scheduler(self, master_id, enqueue, **kw):
        return Scheduler(self.r, self.keys, self.store, enqueue, master_id=master_id, clock=self.clock, **kw)

    async def runs(self, job_id="site"):
        return [unpack(b) for b in await self.r.lrange(self.keys.schedule_runs(job_id), 0, -1)][::-1]


def test_fires_at_the_right_times_with_fire_ids(redis_url):
    async def body(env):
        await env.store.add(spec())
        assert await env.sched.tick() == 0 and env.sched.is_leader
        env.clock.t = T0 + 59.9
        assert await env.sched.tick() == 0
        env.clock.t = T0 + 60.02
        assert await env.sched.tick() == 1
        (s,) = env.rec.specs
        assert s["job_id"] == "site@2026-05-28T20:27:40Z" == fire_id("site", T0 + 60)
        assert (s["schedule"], s["fire_time"], s["args"], s["queue"]) == ("site", T0 + 60, ["https://example.org"], "default")
        assert not {"trigger", "misfire_grace_time", "coalesce", "max_instances", "replace_existing"} & set(s)
        assert await env.sched.tick() == 0  # not twice
        assert (await env.store.get("site"))["next_run_time"] == T0 + 120
        for i in range(2, 6):
            env.clock.t = T0 + 60 * i + 0.5
            assert await env.sched.tick() == 1
        assert env.rec.times == [T0 + 60 * i for i in range(1, 6)]
        runs = (await env.store.get("site"))["runs"]
        assert [r["outcome"] for r in runs] == ["succeeded"] * 5 and runs[0]["fire_time"] == T0 + 300
    run(redis_url, body)


def test_cron_fire_times_over_a_day(redis_url):
    async def body(env):
        env.clock.t = datetime(2026, 6, 1, tzinfo=UTC).timestamp()
        await env.store.add(spec(trigger={"type": "cron", "crontab": "*/15 9-10 * * 1-5"}))  # Monday
        for _ in range(24 * 60):
            env.clock.t += 60
            await env.sched.tick()
        assert [datetime.fromtimestamp(t, UTC).strftime("%H:%M") for t in env.rec.times] == [
            "09:00", "09:15", "09:30", "09:45", "10:00", "10:15", "10:30", "10:45"]
    run(redis_url, body)


def test_fire_ids_are_exact_for_fractional_times():
    assert fire_id("a", 0.25) == "a@1970-01-01T00:00:00.250000Z"
    assert fire_id("a", T0) == "a@2026-05-28T20:26:40Z"


@pytest.mark.parametrize("berlin_day", ["2026-03-29", "2026-10-25"])
def test_dst_days_fire_once(redis_url, berlin_day):
    async def body(env):
        start = datetime.fromisoformat(berlin_day).replace(tzinfo=ZoneInfo("Europe/Berlin")).timestamp()
        end = start + 86400 + 3600  # the next local midnight, whichever way the clocks turned
        env.clock.t = start - 3600
        await env.store.add(spec(trigger={"type": "cron", "crontab": "30 2 * * *", "timezone": "Europe/Berlin"}))
        while env.clock.t < end - 300:
            env.clock.t += 300  # the scheduler wakes at least every 5 minutes
            await env.sched.tick()
        assert len(env.rec.specs) == 1
        fired = datetime.fromtimestamp(env.rec.times[0], UTC)
        assert fired.strftime("%Y-%m-%d %H:%M") in (f"{berlin_day} 01:00", f"{berlin_day} 00:30")
    run(redis_url, body)


def _missed_setup(coalesce, grace, **extra):
    """Interval 60 s, master down 5 minutes: fires T0+60 .. T0+300 are due at T0+310."""
    async def setup(env):
        await env.store.add(spec(coalesce=coalesce, misfire_grace_time=grace, **extra))
        env.clock.t = T0 + 310
        return await env.sched.tick()
    return setup


def test_misfire_latest_runs_once(redis_url):
    async def body(env):
        assert await _missed_setup("latest", 1000)(env) == 1
        assert env.rec.times == [T0 + 300]
        (run_,) = await env.runs()
        assert run_["outcome"] == "enqueued" and run_["coalesced"] == 4
        assert (await env.store.get("site"))["next_run_time"] == T0 + 360
    run(redis_url, body)


def test_misfire_all_runs_every_one(redis_url):
    async def body(env):
        assert await _missed_setup("all", 1000, max_instances=5)(env) == 5
        assert env.rec.times == [T0 + 60 * i for i in range(1, 6)]
        assert len({s["job_id"] for s in env.rec.specs}) == 5
    run(redis_url, body)


def test_misfire_skip_runs_none_and_waits_for_the_next(redis_url):
    async def body(env):
        assert await _missed_setup("skip", 1000)(env) == 0
        runs = await env.runs()
        assert [(r["outcome"], r["reason"]) for r in runs] == [("skipped", "coalesce")] * 5
        assert (await env.store.fire_stats())["skipped"] == 5
        assert (await env.store.get("site"))["next_run_time"] == T0 + 360
        env.clock.t = T0 + 360.01  # the next on-time fire runs
        assert await env.sched.tick() == 1 and env.rec.times == [T0 + 360]
    run(redis_url, body)


def test_misfire_grace_time_default_records_missed(redis_url):
    async def body(env):
        assert await _missed_setup("latest", 60)(env) == 1  # only T0+300 is within 60 s
        assert env.rec.times == [T0 + 300]
        runs = await env.runs()
        assert [r["outcome"] for r in runs] == ["missed"] * 4 + ["enqueued"]
        assert [r["fire_time"] for r in runs[:4]] == [T0 + 60 * i for i in range(1, 5)]
        assert runs[0]["job_id"] == fire_id("site", T0 + 60)
        # counted for metrics: the one fired was queued 10 s after its time
        assert await env.store.fire_stats() == {"fired": 1, "filtered": 0, "missed": 4, "skipped": 0,
                                                "lateness_ms": 10_000}
    run(redis_url, body)


def test_a_fire_is_counted_with_its_lateness_when_its_leader_dies_before_queueing(redis_url):
    """The leader counted a pass's lateness after queueing its fires: one that died between
    marking and queueing left fired counted (as the fire script marks) but not how late,
    so the mean lateness shown came out too low."""
    async def body(env):
        async def dies(specs, token, recovered=False):
            raise asyncio.CancelledError   # the process is gone
        await env.store.add(spec())
        env.clock.t = T0 + 65
        with pytest.raises(asyncio.CancelledError):
            await env.scheduler("m1", dies).tick()
        assert await env.store.fire_stats() == {"fired": 1, "filtered": 0, "missed": 0, "skipped": 0,
                                                "lateness_ms": 5_000}
    run(redis_url, body)


def test_misfire_outside_grace_runs_nothing(redis_url):
    async def body(env):
        await env.store.add(spec(trigger={"type": "date", "run_date": T0 + 10}))
        env.clock.t = T0 + 100  # 90 s late, grace 60
        assert await env.sched.tick() == 0
        assert [r["outcome"] for r in await env.runs()] == ["missed"]
        job = await env.store.get("site")
        assert job["status"] == "finished" and await env.store.count() == 0
        # a finished job keeps its id for a day; replacing it schedules it again
        assert 0 < await env.r.ttl(env.keys.schedule("site")) <= 86400
        again = spec(trigger={"type": "date", "run_date": T0 + 1000})
        with pytest.raises(ScheduleError, match="already exists"):
            await env.store.add(again)
        await env.store.add(again, replace_existing=True)
        assert await env.r.ttl(env.keys.schedule("site")) == -1
        assert await env.store.count() == 1
    run(redis_url, body)


def test_no_grace_long_backlog_all_is_caught_up_in_bounded_passes(redis_url):
    async def body(env):
        await env.store.add(spec(trigger={"type": "interval", "seconds": 1}, coalesce="all",
                                 misfire_grace_time=None, max_instances=10_000))
        env.clock.t = T0 + 1500.5
        assert await env.sched.tick() == 1000  # CATCHUP_LIMIT per job and pass
        assert await env.sched.tick() == 500
        assert await env.sched.tick() == 0
        assert env.rec.times == [T0 + i for i in range(1, 1501)]
    run(redis_url, body)


def test_long_outage_records_capped_missed_and_jumps_to_the_grace_window(redis_url):
    async def body(env):
        await env.store.add(spec(trigger={"type": "interval", "seconds": 1}))  # grace 60, latest
        env.clock.t = T0 + 100_000.5
        assert await env.sched.tick() == 1
        assert env.rec.times == [T0 + 100_000]
        runs = await env.runs()
        assert len(runs) == 20 and [r["outcome"] for r in runs[:19]] == ["missed"] * 19
        assert runs[-1]["outcome"] == "enqueued" and runs[-1]["coalesced"] == 59  # T0+99941 .. +99999
        assert (await env.store.get("site"))["next_run_time"] == T0 + 100_001
    run(redis_url, body)


@pytest.mark.parametrize("grace", [60, None])
@pytest.mark.parametrize("coalesce", ["latest", "all", "skip"])
def test_an_every_minute_cron_after_three_hours_down(redis_url, coalesce, grace):
    """180 fires due at once (more than the runs kept, and than a cron's jitter is checked
    against): with the default grace the 179 late ones are missed, all counted (the
    metric; 20 recorded: the runs kept; it counted only those) and the one in the grace
    window runs whatever the policy; with no grace, latest
    runs the last with the rest coalesced, all runs each, skip none. Each in one pass, and
    the schedule goes on from the next minute."""
    async def body(env):
        await env.store.add(spec(trigger={"type": "cron", "crontab": "* * * * *"},
                                 coalesce=coalesce, misfire_grace_time=grace,
                                 max_instances=1000))
        first = (await env.store.get("site"))["next_run_time"]
        env.clock.t = first + 179 * 60 + 5
        fired = await env.sched.tick()
        last = first + 179 * 60
        runs = await env.runs()
        if grace is not None:
            assert (fired, env.rec.times) == (1, [last])
            assert [r["outcome"] for r in runs] == ["missed"] * 19 + ["enqueued"]
            assert (await env.store.fire_stats())["missed"] == 179
        elif coalesce == "latest":
            assert (fired, env.rec.times, runs[-1]["coalesced"]) == (1, [last], 179)
        elif coalesce == "all":
            assert env.rec.times == [first + 60 * i for i in range(180)]
        else:
            assert fired == 0 and (await env.store.fire_stats())["skipped"] == 180
        assert await env.sched.tick() == 0
        assert (await env.store.get("site"))["next_run_time"] == last + 60
    run(redis_url, body)


def test_no_grace_long_backlog_latest_runs_once(redis_url):
    async def body(env):
        await env.store.add(spec(trigger={"type": "interval", "seconds": 1}, misfire_grace_time=None))
        env.clock.t = T0 + 5000.5
        assert await env.sched.tick() == 1
        assert env.rec.times == [T0 + 5000]
        assert (await env.store.get("site"))["next_run_time"] == T0 + 5001
    run(redis_url, body)


def test_max_instances_skips_while_a_previous_fire_is_queued(redis_url):
    async def body(env):
        await env.store.add(spec())
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1  # its job hash now says "queued"
        env.clock.t = T0 + 120
        assert await env.sched.tick() == 0
        runs = await env.runs()
        assert [(r["outcome"], r.get("reason")) for r in runs] == [("enqueued", None), ("skipped", "max_instances")]
        assert runs[1]["job_id"] == fire_id("site", T0 + 120)
        await env.r.hset(env.keys.job(fire_id("site", T0 + 60)), "status", "running")
        env.clock.t = T0 + 180
        assert await env.sched.tick() == 0
        await env.r.hset(env.keys.job(fire_id("site", T0 + 60)), "status", "succeeded")
        env.clock.t = T0 + 240
        assert await env.sched.tick() == 1
        assert env.rec.times == [T0 + 60, T0 + 240]
        view = await env.store.get("site")
        assert [r["outcome"] for r in view["runs"]] == ["queued", "skipped", "skipped", "succeeded"]
    run(redis_url, body, status="queued")



def test_fires_max_instances_skips_are_logged_once_an_hour_naming_the_rounds_in_the_way(
        redis_url, caplog):
    """A fire queued where no worker takes it (a queue no worker serves, a module none
    loads) held max_instances for good: every later fire was skipped, and the master's log
    said nothing, so nothing named the fire to delete."""
    async def body(env):
        await env.store.add(spec())
        for minute in (1, 2, 3):
            env.clock.t = T0 + 60 * minute
            await env.sched.tick()
        assert [r["outcome"] for r in await env.runs()] == ["enqueued", "skipped", "skipped"]
    run(redis_url, body, status="queued")
    warned = [r.getMessage() for r in caplog.records if "max_instances" in r.getMessage()]
    assert len(warned) == 1, warned   # not at every fire
    assert "periodic job site" in warned[0] and fire_id("site", T0 + 60) in warned[0]

def test_a_backlog_past_the_catchup_limit_that_ends_coalesces_into_one_fire(redis_url):
    """1,500 fires of a schedule that has ended are due, more than one pass takes fire by
    fire: "latest" runs the last of them, once, and the schedule is finished."""
    async def body(env):
        await env.store.add(spec(trigger={"type": "interval", "seconds": 1,
                                          "end_date": T0 + 1500},
                                 misfire_grace_time=None, coalesce="latest"))
        env.clock.t = T0 + 5000
        assert await env.sched.tick() == 1
        assert await env.sched.tick() == 0
        assert env.rec.times == [T0 + 1500]
        assert (await env.store.get("site"))["status"] == "finished"
    run(redis_url, body)


def test_max_instances_two_and_all(redis_url):
    async def body(env):
        await env.store.add(spec(max_instances=2, coalesce="all", misfire_grace_time=None))
        env.clock.t = T0 + 180  # three due at once, room for two
        assert await env.sched.tick() == 2
        assert env.rec.times == [T0 + 60, T0 + 120]
        assert [r["outcome"] for r in await env.runs()] == ["enqueued", "enqueued", "skipped"]
        await env.r.hset(env.keys.job(fire_id("site", T0 + 60)), "status", "failed")
        env.clock.t = T0 + 240
        assert await env.sched.tick() == 1  # one slot free again
    run(redis_url, body, status="retrying")


def test_fires_planned_while_redis_clock_ran_ahead_come_on_time_once_it_steps_back(
        redis_url, caplog):
    """Redis's clock an hour ahead (a VM's, a failover to a host without NTP), then stepped
    back: the next fires planned by the clock ahead were an hour off, and no periodic job
    fired until the clock caught up (a day ahead: a day without fires). The leader sees
    the step and moves each next run time back to its trigger's next fire from now; a
    fire that ran while the clock was ahead does not run again."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(env):
        await env.store.add(spec())   # every minute from T0 + 60
        await env.store.add(spec("once", {"type": "date", "run_date": T0 + 7200}))
        await env.store.add(spec("held", {"type": "interval", "minutes": 1}))
        await env.store.pause("held")
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1
        env.clock.t = T0 + 3660   # an hour ahead: one fire, coalesced
        assert await env.sched.tick() == 1
        await env.store.add(spec("bad"))   # one that cannot be read stops no other
        await env.r.hset(env.keys.schedule("bad"), "trigger", b"\xc1")
        env.clock.t = T0 + 120    # stepped back
        replan = env.store.replan

        async def away(*args):   # Redis away mid-look: looked at again by the next pass
            env.store.replan = replan
            raise RedisConnectionError("Connection refused")
        env.store.replan = away
        with pytest.raises(RedisConnectionError):
            await env.sched.tick()
        assert await env.sched.tick() == 1
        assert env.rec.times == [T0 + 60, T0 + 3660, T0 + 120]
        assert (await env.store.get("site"))["next_run_time"] == T0 + 180
        assert (await env.store.get("once"))["next_run_time"] == T0 + 7200
        assert (await env.store.get("held"))["paused"]
        assert "stepped back" in caplog.text
        env.clock.t = T0 + 3660   # the fire that ran ahead: not again
        await env.sched.tick()
        assert env.rec.times.count(T0 + 3660) == 1
    run(redis_url, body)


async def _fired_an_hour_ahead(env) -> str:
    """An every-minute job fired at T0 + 60, then by a clock an hour ahead at T0 + 3660
    (one fire, coalesced): that fire's id."""
    await env.store.add(spec())
    env.clock.t = T0 + 60
    assert await env.sched.tick() == 1
    env.clock.t = T0 + 3660
    assert await env.sched.tick() == 1
    return fire_id("site", T0 + 3660)


async def _back_at_the_fire(env, gone: list[str], times: list[float]) -> None:
    """With ``gone`` deleted (expired), the clock back at the fire that ran ahead, then past
    it: that fire does not run again, the fires run are ``times``."""
    await env.r.delete(*gone)
    env.clock.t = T0 + 3660
    await env.sched.tick()
    env.clock.t = T0 + 3720
    await env.sched.tick()
    assert env.rec.times == times


def test_a_fire_that_ran_while_redis_clock_ran_ahead_is_not_planned_again_by_the_step_back(
        redis_url):
    """The clock ran ahead past a fire, then stepped back to before it: the step back
    moved the next run time to that fire again, and only its mark (gone after grace +
    600 s) or its job hash (gone after RESULT_TTL, or deleted) kept it from running
    twice. Its runs record says it fired: the step back moves past it."""
    async def body(env):
        fired = await _fired_an_hour_ahead(env)
        env.clock.t = T0 + 3640   # stepped back 20 s, to before that fire
        assert await env.sched.tick() == 0
        await _back_at_the_fire(env, [env.keys.fire(fired), env.keys.job(fired)],
                                [T0 + 60, T0 + 3660, T0 + 3720])
    run(redis_url, body)


def test_a_step_back_whose_read_of_the_runs_redis_refuses_looks_again(redis_url):
    """The step back read a runs list it could not read as recording no fire, to pass
    over one of another type (an operator's write); a refusal of Redis's (BUSY: a long
    script, LOADING) was read the same way, and the next run time went back to the fire
    that had run while the clock was ahead: it ran twice. The look waits for Redis."""
    from redis.exceptions import ResponseError

    async def body(env):
        fired = await _fired_an_hour_ahead(env)
        env.clock.t = T0 + 3640   # stepped back 20 s, to before that fire
        lrange = env.r.lrange

        async def busy(*args, **kwargs):   # a long script ran meanwhile: refused once
            env.r.lrange = lrange
            raise ResponseError("BUSY Redis is busy running a script. You can only call "
                                "SCRIPT KILL or SHUTDOWN NOSAVE.")
        env.r.lrange = busy
        with contextlib.suppress(ResponseError):   # (looked at again by the next pass)
            await env.sched.tick()
        assert await env.sched.tick() == 0
        await _back_at_the_fire(env, [env.keys.fire(fired), env.keys.job(fired)],
                                [T0 + 60, T0 + 3660, T0 + 3720])
    run(redis_url, body)


def test_a_fire_that_ran_while_redis_clock_ran_ahead_does_not_run_again_when_the_clock_is_back(
        redis_url):
    """The clock ran an hour ahead past a fire, then stepped back an hour: the next fires
    come on time again, and the clock comes back to that fire an hour later. Its mark was
    set for grace + 600 s, and its job hash kept for RESULT_TTL: both gone by then, it ran
    twice. The step back keeps the mark of each fire its runs record as fired ahead until
    the clock is past it."""
    async def body(env):
        fired = await _fired_an_hour_ahead(env)
        await env.r.delete(env.keys.fire(fired))   # expired while the clock was ahead
        env.clock.t = T0 + 120    # stepped back
        assert await env.sched.tick() == 1
        await _back_at_the_fire(env, [env.keys.job(fired)],   # (past RESULT_TTL)
                                [T0 + 60, T0 + 3660, T0 + 120, T0 + 3720])
    run(redis_url, body)


def test_a_step_back_whose_read_to_keep_marks_redis_refuses_looks_again(redis_url):
    """The same for the read of the runs that keeps the marks of fires that ran ahead: a
    refusal of Redis's, read as a key of another type, kept none, and the fire ran again
    when the clock was back at it."""
    from redis.exceptions import ResponseError

    async def body(env):
        fired = await _fired_an_hour_ahead(env)
        await env.r.delete(env.keys.fire(fired))   # expired while the clock was ahead
        env.clock.t = T0 + 120    # stepped back
        pipeline = env.r.pipeline

        def refusing(*args, **kwargs):   # the first read after the step: refused once
            env.r.pipeline = pipeline
            pipe = pipeline(*args, **kwargs)

            async def execute(raise_on_error=True):
                return [ResponseError("BUSY Redis is busy running a script.")] * 2
            pipe.execute = execute
            return pipe
        env.r.pipeline = refusing
        with contextlib.suppress(ResponseError):   # (looked at again by the next pass)
            await env.sched.tick()
        await env.sched.tick()
        await _back_at_the_fire(env, [env.keys.job(fired)],   # (past RESULT_TTL)
                                [T0 + 60, T0 + 3660, T0 + 120, T0 + 3720])
    run(redis_url, body)


def test_a_leader_whose_lease_ran_out_says_so_not_that_another_master_holds_it(
        redis_url, caplog):
    """A lease not renewed in time (Redis refusing writes: OOM, MISCONF, a replica, a
    long script) made the lone master log "another master holds the lease"."""
    async def body(env):
        await env.store.add(spec())
        assert await env.sched.tick() == 0 and env.sched.is_leader
        await env.r.delete(env.keys.scheduler_lease)   # not renewed in time: it ran out
        env.clock.t = T0 + 60
        with caplog.at_level(logging.INFO, logger="elric.scheduler"):
            assert await env.sched.tick() == 0
        assert not env.sched.is_leader
        assert "stops scheduling: its lease ran out" in caplog.text, caplog.text
        assert "another master" not in caplog.text, caplog.text
        assert await env.sched.tick() == 1   # it takes the lease again, and fires
    run(redis_url, body)


def test_paused_job_does_not_fire(redis_url):
    async def body(env):
        await env.store.add(spec())
        await env.store.pause("site")
        env.clock.t = T0 + 600
        assert await env.sched.tick() == 0
        await env.store.resume("site")
        env.clock.t = T0 + 660
        assert await env.sched.tick() == 1 and env.rec.times == [T0 + 660]
    run(redis_url, body)


def test_run_now_before_start_date_keeps_the_cron_from_firing_before_it(redis_url):
    async def body(env):
        start = T0 + 86400  # tomorrow; hourly from then on
        await env.store.add(spec(trigger={"type": "cron", "crontab": "0 * * * *", "start_date": start}))
        first = (await env.store.get("site"))["next_run_time"]
        assert first == datetime(2026, 5, 29, 21, tzinfo=UTC).timestamp()  # start is 20:26:40
        await env.store.run_now("site")
        assert await env.sched.tick() == 1 and env.rec.times == [T0]
        # the run asked for does not start the calendar early: the next fire is still that
        assert (await env.store.get("site"))["next_run_time"] == first
    run(redis_url, body)


@pytest.mark.parametrize("jitter", [None, 10])
def test_run_now_before_an_intervals_start_date_keeps_its_start_and_anchor(redis_url, jitter):
    """The fire after a run asked for was the run's time plus the interval (jittered: a point
    of its grid before start_date): the schedule began a day early, anchored on the run."""
    async def body(env):
        start = T0 + 86400
        trigger = {"type": "interval", "hours": 1, "start_date": start, "jitter": jitter}
        await env.store.add(spec(trigger={k: v for k, v in trigger.items() if v is not None}))
        assert await env.store.run_now("site") == T0
        assert await env.sched.tick() == 1 and env.rec.times == [T0]
        assert start <= (await env.store.get("site"))["next_run_time"] <= start + (jitter or 0)
        env.clock.t = start + 3600 * 2 + 60   # its usual fires, on the grid from start_date
        await env.sched.tick()
        assert env.rec.times[-1] == pytest.approx(start + 7200, abs=jitter or 0)
        if not jitter:   # after its start, a run asked for restarts it, as documented
            await env.store.run_now("site")
            assert await env.sched.tick() == 1
            assert (await env.store.get("site"))["next_run_time"] == env.clock.t + 3600
    run(redis_url, body)


def test_a_date_job_added_again_after_it_fired_fires_once_more(redis_url):
    """A fire's id is its job's id and fire time: a date job removed after its fire and
    added again with that run_date (within its misfire grace time) met the old fire's mark
    (and job) under that id, and finished without a run. A new run date fired already."""
    async def body(env):
        date = {"type": "date", "run_date": T0 + 30}
        await env.store.add(spec(trigger=date))
        env.clock.t = T0 + 30
        assert await env.sched.tick() == 1 and await env.sched.tick() == 0
        await env.store.remove("site")
        env.clock.t = T0 + 40
        await env.store.add(spec(trigger=date))
        assert await env.sched.tick() == 1 and await env.sched.tick() == 0
        assert env.rec.times == [T0 + 30, T0 + 40]   # at once, under an id of its own
        [again] = (await env.store.get("site"))["runs"]
        assert again["job_id"] == fire_id("site", T0 + 40)
        await env.store.add(spec(trigger={"type": "date", "run_date": T0 + 90}),
                            replace_existing=True)   # a new date: fires then, once
        env.clock.t = T0 + 90
        assert await env.sched.tick() == 1 and await env.sched.tick() == 0
        assert env.rec.times == [T0 + 30, T0 + 40, T0 + 90]
        await env.store.remove("site")
        env.clock.t = T0 + 91   # past its grace time: refused, as any past date
        with pytest.raises(ValueError, match="in the past"):
            await env.store.add(spec(trigger=date))
    run(redis_url, body)


def test_modify_between_read_and_fire_is_not_overwritten(redis_url):
    async def body(env):
        await env.store.add(spec())
        env.clock.t = T0 + 60
        real = env.sched._fire_s

        async def modify_first(keys, args):  # a user changes the job mid-pass
            await env.store.modify("site", {"args": ["changed"]})
            env.sched._fire_s = real
            return await real(keys=keys, args=args)
        env.sched._fire_s = modify_first
        assert await env.sched.tick() == 0  # the stale plan is dropped...
        assert (await env.store.get("site"))["args"] == ["changed"]
        assert await env.sched.tick() == 1  # ...and the job re-read on the next pass
        assert env.rec.specs[0]["args"] == ["changed"]
    run(redis_url, body)


def test_remove_and_add_again_between_read_and_fire_is_not_overwritten(redis_url):
    """A job added anew got version 1 again: a plan read from the removed job (also at
    version 1) was applied to the new one, queueing a fire with the old spec and moving
    the new job's next run time by the old trigger."""
    async def body(env):
        await env.store.add(spec())
        env.clock.t = T0 + 60
        real = env.sched._fire_s

        async def replace_first(keys, args):  # a user removes the job and adds it again
            await env.store.remove("site")
            await env.store.add(spec(args=["new"], trigger={"type": "interval", "minutes": 7}))
            env.sched._fire_s = real
            return await real(keys=keys, args=args)
        env.sched._fire_s = replace_first
        assert await env.sched.tick() == 0 and env.rec.specs == []  # the stale plan is dropped
        job = await env.store.get("site")
        assert job["next_run_time"] == T0 + 60 + 420 and job["runs"] == []
    run(redis_url, body)


def test_a_version_stored_before_the_counter_is_never_given_again(redis_url):
    """A job stored when versions counted up per job may hold one the counter has not
    reached: a modify must still write a new one, or the stale plan is applied over it."""
    async def body(env):
        await env.store.add(spec())
        await env.r.hset(env.keys.schedule("site"), "version", "7")
        await env.r.set(env.keys.seq, 6)
        env.clock.t = T0 + 60
        real = env.sched._fire_s

        async def modify_first(keys, args):
            await env.store.modify("site", {"args": ["changed"]})
            env.sched._fire_s = real
            return await real(keys=keys, args=args)
        env.sched._fire_s = modify_first
        assert await env.sched.tick() == 0
        assert await env.sched.tick() == 1 and env.rec.specs[0]["args"] == ["changed"]
    run(redis_url, body)


def test_orphan_index_entries_are_dropped(redis_url):
    async def body(env):
        await env.store.add(spec())
        await env.r.zadd(env.keys.schedules, {"ghost": (T0 + 30) * 1000})  # no hash behind it
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1 and env.rec.times == [T0 + 60]
        assert await env.r.zscore(env.keys.schedules, "ghost") is None
        assert await env.store.count() == 1
    run(redis_url, body)


def test_unreadable_job_is_retried_later_without_stalling_the_others(redis_url):
    async def body(env):
        await env.store.add(spec("bad"))
        await env.store.add(spec("good"))
        await env.r.hset(env.keys.schedule("bad"), "coalesce", "sometimes")
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1 and env.rec.specs[0]["schedule"] == "good"
        assert await env.r.zscore(env.keys.schedules, "bad") == (T0 + 120) * 1000
    run(redis_url, body)


def test_a_job_that_cannot_be_planned_keeps_its_fire_times_when_it_can_again(redis_url):
    """Its retry time, 60 s on, was written as its next run time: once readable again (its
    data fixed, or read by a master that can) it fired then, off its schedule, and an
    interval kept that shifted phase for good."""
    async def body(env):
        await env.store.add(spec(trigger={"type": "interval", "hours": 1}))
        await env.r.hset(env.keys.schedule("site"), "coalesce", "sometimes")
        env.clock.t = T0 + 3600
        assert await env.sched.tick() == 0
        assert await env.r.zscore(env.keys.schedules, "site") == (T0 + 3660) * 1000
        assert float(await env.r.hget(env.keys.schedule("site"), "next_run_time")) == T0 + 3600
        await env.r.hset(env.keys.schedule("site"), "coalesce", "latest")
        env.clock.t = T0 + 3660
        assert await env.sched.tick() == 1 and env.rec.times == [T0 + 3600]
        assert (await env.store.get("site"))["next_run_time"] == T0 + 7200
        # a next run time that is no number is the one thing the retry time replaces
        await env.r.hset(env.keys.schedule("site"), "next_run_time", "soon")
        await env.r.zadd(env.keys.schedules, {"site": (T0 + 3660) * 1000})
        assert await env.sched.tick() == 0
        env.clock.t = T0 + 3720
        assert await env.sched.tick() == 1 and env.rec.times[-1] == T0 + 3720
    run(redis_url, body)


async def good_fires_bad_waits(env, field: str, bad) -> None:
    """Jobs "bad" (``field`` stored as ``bad``) and "good", due: "good" fires, and "bad" is
    tried again in a minute (as one whose next run time is no number)."""
    await env.store.add(spec("bad"))
    await env.store.add(spec("good"))
    await env.r.hset(env.keys.schedule("bad"), field, bad)
    env.clock.t = T0 + 60
    assert await env.sched.tick() == 1 and env.rec.specs[0]["schedule"] == "good"
    assert await env.r.zscore(env.keys.schedules, "bad") == (T0 + 120) * 1000


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "1e300", "-1e300"])
def test_a_next_run_time_that_is_no_date_does_not_stall_the_others(redis_url, bad):
    """A stored next run time that is a number but no date (written by hand, or a bad
    restore) raised while the fire script's arguments were built, outside the guard for
    bad stored data: every pass failed, and no periodic job fired any more."""
    async def body(env):
        await good_fires_bad_waits(env, "next_run_time", bad)   # the retry time replaces it
        env.clock.t = T0 + 120
        assert await env.sched.tick() == 2
        assert sorted(s["schedule"] for s in env.rec.specs[1:]) == ["bad", "good"]
    run(redis_url, body)


def test_a_pending_fire_that_cannot_be_read_does_not_stall_the_others(redis_url, caplog):
    """A leader queues the fires marked but not queued before each pass (fires:pending):
    one entry there that is not msgpack raised before any fire was planned, every pass,
    and one that is no fire spec failed the enqueue of every fire pending beside it. No
    periodic job fired any more. Such an entry is dropped, naming it, and the rest go on."""
    from elric.codec import pack

    async def body(env):
        await env.store.add(spec("good"))
        marked = fire_id("good", T0 - 30)   # a leader marked it, then died
        await env.r.hset(env.keys.fires_pending, mapping={
            marked: pack({**spec("good"), "job_id": marked, "schedule": "good",
                          "fire_time": T0 - 30}),
            "junk@2026-01-01T00:00:00Z": b"\xc1", "five@2026-01-01T00:00:00Z": b"\x05",
            "other@2026-01-01T00:00:00Z": pack({"job_id": "not-this"})})
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 2
        assert [s["job_id"] for s in env.rec.specs] == [marked, fire_id("good", T0 + 60)]
        assert await env.r.hlen(env.keys.fires_pending) == 0
        for junk in ("junk", "five", "other"):
            assert any(f"{junk}@2026-01-01T00:00:00Z" in r.message and r.levelname == "ERROR"
                       for r in caplog.records), junk
    run(redis_url, body)


def test_pending_fires_overwritten_with_another_type_lose_no_fire(redis_url, caplog):
    """fires:pending SET to a string: the leader's look at it raised each pass and no
    periodic job fired any more; and the fire script marked a fire before failing to keep
    it pending, so the pass after that skipped the marked fire: it never ran. The script
    now writes nothing then, and the leader deletes the key (it holds no fire of elric's)."""
    from redis.exceptions import ResponseError

    async def body(env):
        await env.store.add(spec("good"))
        await env.r.set(env.keys.fires_pending, "overwritten")   # before it leads
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1
        await env.r.set(env.keys.fires_pending, "overwritten")   # while it leads
        env.clock.t = T0 + 120
        with pytest.raises(ResponseError, match=env.keys.fires_pending):
            await env.sched.tick()
        assert await env.sched.tick() == 1
        assert env.rec.times == [T0 + 60, T0 + 120]
        assert [r.levelname for r in caplog.records
                if "was overwritten with another type" in r.message] == ["ERROR"] * 2
    run(redis_url, body)


def test_the_schedules_index_overwritten_with_another_type_is_rebuilt(redis_url, caplog):
    """The schedules index SET to a string: every pass raised WRONGTYPE and no periodic
    job fired any more. The index holds only what each job's hash holds (next run time,
    paused): the leader rebuilds it from them, naming the key, and firing goes on, for a
    job added meanwhile too (its hash was written before the index refused it)."""
    from redis.exceptions import ResponseError

    async def body(env):
        for job_id in ("good", "paused"):
            await env.store.add(spec(job_id))
        await env.store.add(spec("once", {"type": "date", "run_date": T0 + 30}))
        await env.store.pause("paused")
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 2   # "once" fired: finished, not indexed
        await env.r.delete(env.keys.schedules)
        await env.r.set(env.keys.schedules, "overwritten")
        with pytest.raises(ResponseError):
            await env.store.add(spec("late"))   # first fire at T0 + 120
        env.clock.t = T0 + 120
        assert await env.sched.tick() == 2 and env.sched.is_leader
        assert sorted(s["schedule"] for s in env.rec.specs[2:]) == ["good", "late"]
        index = dict(await env.r.zrange(env.keys.schedules, 0, -1, withscores=True))
        assert index == {b"good": (T0 + 180) * 1000, b"late": (T0 + 180) * 1000,
                         b"paused": math.inf}
        assert [r.levelname for r in caplog.records
                if env.keys.schedules in r.getMessage()] == ["ERROR"]
    run(redis_url, body)


def test_a_rebuild_of_the_schedules_index_cut_short_is_done_again(redis_url):
    """The rebuild deleted the index first and added the jobs a SCAN page at a time: cut
    short (Redis away, the master killed), it left a zset short of jobs, which no pass
    rebuilt again (it is of the right type), so the jobs left out never fired again."""
    from redis.exceptions import ConnectionError

    async def body(env):
        for job_id in ("a", "b", "c"):
            await env.store.add(spec(job_id))
        await env.r.delete(env.keys.schedules)
        await env.r.set(env.keys.schedules, "overwritten")
        env.sched.batch_size = 1   # a SCAN page per job (COUNT is a hint: at most 3 pages)
        scan, pages = env.r.scan, []

        async def cut_short(*args, **kwargs):
            pages.append(1)
            if len(pages) == 2:
                raise ConnectionError("Redis went away")
            return await scan(*args, **kwargs)
        env.r.scan = cut_short
        env.clock.t = T0 + 60
        with pytest.raises(ConnectionError):
            await env.sched.tick()
        del env.r.scan
        env.clock.t = T0 + 120
        await env.sched.tick()
        assert sorted(s["schedule"] for s in env.rec.specs) == ["a", "b", "c"]
    run(redis_url, body)


@pytest.mark.parametrize("bad", [b"\xc1", b"\x05"])  # not msgpack; not a map
def test_a_job_spec_that_cannot_be_read_does_not_stall_the_others(redis_url, bad):
    """The spec was read only while the fires' arguments were built, outside the guard
    for bad stored data: every pass raised, and no periodic job fired any more."""
    run(redis_url, lambda env: good_fires_bad_waits(env, "spec", bad))


@pytest.mark.parametrize("field", ["version", "spec", "trigger", "coalesce"])
def test_a_job_hash_missing_a_field_does_not_stall_the_others(redis_url, caplog, field):
    """A schedule hash without its version (HDEL, a partial restore) failed the fire
    script's arguments (None) of every job in the pass: no periodic job fired any more.
    One without its spec was taken for a hash that is gone and left due as it was: the
    leader read it again at once, pass after pass (a busy loop), and named it nowhere."""
    async def body(env):
        await env.store.add(spec("bad"))
        await env.store.add(spec("good"))
        await env.r.hdel(env.keys.schedule("bad"), field)
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1 and env.rec.specs[0]["schedule"] == "good"
        assert await env.r.zscore(env.keys.schedules, "bad") == (T0 + 120) * 1000
        assert "periodic job bad: cannot compute its fires" in caplog.text
    run(redis_url, body)


@pytest.mark.parametrize("change", [{"priority": "high"}, {"queue": None}])
def test_a_job_spec_that_cannot_be_queued_does_not_stall_the_others(redis_url, caplog, change):
    """A stored spec that is a map but no job spec (written by hand, a bad restore) was
    marked and then failed the enqueue of every fire queued with it, and of every fire
    pending beside it at each pass after: those stayed pending for good, and max_instances
    skipped every later fire of their jobs. It is checked where its fires are planned, as
    at submit: a key left out is its default (queue "default"), a bad one waits, logged."""
    from elric.codec import pack
    from elric.queue import RedisQueue

    async def body(env):
        queue = RedisQueue(env.r, env.keys)
        env.sched.enqueue = lambda specs, token, recovered=False: queue.enqueue(specs, fence=token)
        await env.store.add(spec("bad"))
        await env.store.add(spec("good"))
        bad = unpack(await env.r.hget(env.keys.schedule("bad"), "spec"))
        bad = {k: v for k, v in {**bad, **change}.items() if v is not None}
        await env.r.hset(env.keys.schedule("bad"), "spec", pack(bad))
        env.clock.t = T0 + 60
        await env.sched.tick()
        assert (await queue.get_job(fire_id("good", T0 + 60)))["status"] == "queued"
        assert await env.r.hlen(env.keys.fires_pending) == 0
        if "queue" in change:
            assert (await queue.get_job(fire_id("bad", T0 + 60)))["queue"] == "default"
            return
        assert await env.r.zscore(env.keys.schedules, "bad") == (T0 + 120) * 1000
        assert "periodic job bad: cannot compute its fires" in caplog.text
    run(redis_url, body)


def test_a_pending_fire_that_cannot_be_queued_does_not_stall_the_others(redis_url, caplog):
    """A fire pending (marked by a leader that died) whose spec is a map but no job spec
    (written by hand, or marked before its job's spec was checked) failed the enqueue of
    every fire pending beside it, pass after pass: none of them ran. It is dropped, named."""
    from elric.codec import pack
    from elric.queue import RedisQueue

    async def body(env):
        queue = RedisQueue(env.r, env.keys)
        env.sched.enqueue = lambda specs, token, recovered=False: queue.enqueue(specs, fence=token)
        await env.store.add(spec("good"))
        good, bad = fire_id("good", T0 - 30), fire_id("bad", T0 - 30)
        await env.r.hset(env.keys.fires_pending, mapping={
            f: pack({**spec(f.split("@")[0]), "job_id": f, "schedule": f.split("@")[0],
                     "fire_time": T0 - 30, **({"priority": "high"} if f == bad else {})})
            for f in (good, bad)})
        await env.sched.tick()
        assert (await queue.get_job(good))["status"] == "queued"
        assert await queue.get_job(bad) is None
        assert await env.r.hlen(env.keys.fires_pending) == 0
        assert f"fire {bad} pending in" in caplog.text
    run(redis_url, body)


@pytest.mark.parametrize("pending", [False, True])  # marked by this pass; by a leader that died
def test_a_fire_whose_queue_is_of_another_type_holds_back_no_other_fire(redis_url, caplog,
                                                                       pending):
    """An operator SET one queue's key: enqueue.lua refused every fire queued in one call
    with that queue's, pass after pass, and max_instances then skipped each later fire of
    their jobs (pending, they count as queued): no periodic job ran until the key went.
    A call refused so is tried fire by fire; the one refused waits pending, named."""
    from elric.queue import RedisQueue

    async def body(env):
        queue = RedisQueue(env.r, env.keys)
        env.sched.enqueue = lambda specs, token, recovered=False: queue.enqueue(specs, fence=token)
        await env.store.add(spec("bad", queue="a"))
        await env.store.add(spec("good", queue="b"))
        await env.r.set(env.keys.queue("a"), "overwritten")
        env.clock.t = T0 + 60
        if pending:   # marked, then its leader died
            env.sched.enqueue, enqueue = Recorder(env.r, env.keys), env.sched.enqueue
            env.sched.enqueue.before = lambda: env.r.incr(env.keys.scheduler_fence)
            assert await env.sched.tick() == 0
            env.sched.enqueue, env.sched.is_leader = enqueue, False
            await env.r.delete(env.keys.scheduler_lease)
        assert await env.sched.tick() == 1
        good, bad = fire_id("good", T0 + 60), fire_id("bad", T0 + 60)
        assert (await queue.get_job(good))["status"] == "queued"
        assert await env.r.hkeys(env.keys.fires_pending) == [bad.encode()]
        assert f"fire {bad} cannot be queued" in caplog.text
        await env.r.delete(env.keys.queue("a"))   # fixed: the fire left pending runs
        assert await env.sched.tick() == 1
        assert (await queue.get_job(bad))["status"] == "queued"
    run(redis_url, body)


def test_a_job_paused_while_a_pass_could_not_read_it_stays_paused(redis_url):
    """A job a pass could not read (a key of it of another type) has only its index entry
    moved to a retry a minute on, whatever its version: paused meanwhile, its +inf there
    was overwritten, and once it could be read again it fired while paused."""
    async def body(env):
        await env.store.add(spec())
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 1
        broken = env.keys.job(fire_id("site", T0 + 60))
        await env.r.delete(broken)
        await env.r.set(broken, "overwritten")
        fire = env.sched._fire_s

        async def paused_meanwhile(**kw):
            assert await env.store.pause("site")
            return await fire(**kw)
        env.sched._fire_s = paused_meanwhile
        env.clock.t = T0 + 120
        assert await env.sched.tick() == 0
        env.sched._fire_s = fire
        assert await env.r.zscore(env.keys.schedules, "site") == math.inf
        await env.r.delete(broken)   # readable again
        env.clock.t = T0 + 240
        assert await env.sched.tick() == 0 and len(env.rec.specs) == 1
    run(redis_url, body)


@pytest.mark.parametrize("overwritten", ["hash", "fire_job", "fire_round", "runs"])
def test_a_key_of_one_job_overwritten_with_another_type_does_not_stall_the_others(
        redis_url, caplog, overwritten):
    """An operator SET one job's key: each pass met WRONGTYPE and no periodic job fired any
    more. Its keys are named in the log and it is looked at again in 60 s; a runs list of
    another type only goes without its history."""
    async def body(env):
        for job_id in ("bad", "good"):
            await env.store.add(spec(job_id))
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 2
        fid = fire_id("bad", T0 + 60)
        key = {"hash": env.keys.schedule("bad"), "runs": env.keys.schedule_runs("bad"),
               "fire_job": env.keys.job(fid), "fire_round": env.keys.round(fid)}[overwritten]
        await env.r.delete(key)
        await env.r.set(key, "overwritten")
        env.clock.t = T0 + 120
        if overwritten == "runs":
            assert await env.sched.tick() == 2
            assert await env.r.zscore(env.keys.schedules, "bad") == (T0 + 180) * 1000
            return
        assert await env.sched.tick() == 1 and env.rec.specs[2]["schedule"] == "good"
        assert await env.r.zscore(env.keys.schedules, "bad") == (T0 + 180) * 1000
        assert f"{key}: WRONGTYPE" in caplog.text
    run(redis_url, body)


def test_fire_stats_overwritten_with_another_type_do_not_stall_the_scheduler(redis_url):
    """Counting a skipped fire in the fire stats SET to a string failed the fire script
    mid-batch, each pass again: that job and every one after it never moved on."""
    async def body(env):
        await env.r.set(env.keys.fire_stats, "overwritten")
        assert await _missed_setup("skip", 1000)(env) == 0
        assert (await env.store.get("site"))["next_run_time"] == T0 + 360
    run(redis_url, body)


def test_a_huge_misfire_grace_time_does_not_stall_the_scheduler(redis_url):
    """The fire mark's ttl grows with the grace: 1e300 s (accepted at submit) made Redis
    refuse the fire script's SET EX, so every pass failed and no periodic job fired."""
    async def body(env):
        await env.store.add(spec("patient", misfire_grace_time=1e300))
        await env.store.add(spec("good"))
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 2
        assert sorted(s["schedule"] for s in env.rec.specs) == ["good", "patient"]
        assert await env.r.ttl(env.keys.fire(fire_id("patient", T0 + 60))) > 86400
    run(redis_url, body)


def test_batches_fire_every_due_job_in_one_tick(redis_url):
    async def body(env):
        env.sched.batch_size = 100
        for i in range(250):
            await env.store.add(spec(f"j{i}"))
        for i in range(50):
            await env.store.add(spec(f"later{i}", {"type": "interval", "hours": 1}))
        env.clock.t = T0 + 60
        assert await env.sched.tick() == 250
        assert {s["schedule"] for s in env.rec.specs} == {f"j{i}" for i in range(250)}
    run(redis_url, body)


def test_two_masters_one_leader_no_double_fire_and_handover(redis_url):
    async def body(env):
        rec_b = Recorder(env.r, env.keys)
        a, b = env.sched, env.scheduler("m2", rec_b)
        rnd = random.Random(7)
        for i in range(40):
            await env.store.add(spec(f"job{i}", {"type": "interval", "seconds": 5 + i}, coalesce="all",
                                     misfire_grace_time=None, max_instances=100))
        await a.tick()
        assert a.is_leader and not b.is_leader and a.token == 1
        assert await env.r.get(env.keys.scheduler_lease) == b"m1"
        handovers = 0
        for step in range(300):
            env.clock.t += rnd.uniform(0.5, 4)
            if step % 50 == 49:  # the leader's lease runs out (it stalled): the other takes over
                await env.r.delete(env.keys.scheduler_lease)
                handovers += 1
            await asyncio.gather(a.tick(), b.tick())
            holder = (await env.r.get(env.keys.scheduler_lease)).decode()
            fence = int(await env.r.get(env.keys.scheduler_fence))
            # one holds the lease and the current token; a stale believer has an old token
            current = [s for s in (a, b) if s.is_leader and s.token == fence]
            assert len(current) == 1 and current[0].master_id == holder
        assert handovers == 6 and int(await env.r.get(env.keys.scheduler_fence)) >= 4
        fired = Counter(s["job_id"] for s in env.rec.specs + rec_b.specs)
        assert fired and max(fired.values()) == 1
        # and nothing was lost: every fire time up to now, exactly once
        expected = set()
        for i in range(40):
            t = T0 + 5 + i
            while t <= env.clock.t:
                expected.add(fire_id(f"job{i}", t))
                t += 5 + i
        assert set(fired) == expected
        assert env.rec.specs and rec_b.specs  # both led at some point
    run(redis_url, body)


@pytest.mark.parametrize("where", ["fire script", "enqueue"])
def test_a_pass_fenced_by_this_masters_own_new_token_keeps_it_leading(redis_url, where):
    """The lease ran out mid-pass (a stall) and the lease loop took it again, with a new
    token: the pass, fenced under its old token, stepped the master down though it held
    the lease, and nobody scheduled until its lease loop looked again."""
    async def body(env):
        a = env.sched
        await fired_once(env)
        real = a._fire_s

        async def take_again():
            await env.r.delete(env.keys.scheduler_lease)
            assert await a._acquire()       # what _lease_loop does after a failed renew

        async def lease_taken_again(keys, args):
            a._fire_s = real
            await take_again()
            return await real(keys=keys, args=args)

        async def once():
            env.rec.before = None
            await take_again()
        if where == "enqueue":
            env.rec.before = once
        else:
            a._fire_s = lease_taken_again
        old = a.token
        assert await a.tick() == 0
        assert a.is_leader and a.token == old + 1
        assert await a.tick() == 1 and env.rec.tokens == [old + 1]
        assert env.rec.times == [T0 + 60]
    run(redis_url, body)


def test_stale_leader_is_fenced(redis_url):
    async def body(env):
        rec_b = Recorder(env.r, env.keys)
        a, b = env.sched, env.scheduler("m2", rec_b)
        await env.store.add(spec())
        await a.tick()
        await env.r.delete(env.keys.scheduler_lease)  # a stalls past its lease
        await b.tick()
        assert b.is_leader and b.token == 2
        env.clock.t = T0 + 60
        assert await a.tick() == 0  # the fire script refuses token 1
        assert not a.is_leader and a.token is None
        assert await b.tick() == 1 and rec_b.times == [T0 + 60] and env.rec.specs == []
        assert await a.tick() == 0 and not a.is_leader  # cannot take the held lease
    run(redis_url, body)


def test_fence_moving_between_script_and_enqueue_refuses_the_enqueue(redis_url):
    async def body(env):
        a, rec_b = env.sched, Recorder(env.r, env.keys)
        b = env.scheduler("m2", rec_b)
        await fired_once(env)

        async def takeover():  # another master takes the lease right after a's script ran
            env.rec.before = None
            await env.r.delete(env.keys.scheduler_lease)
            assert await b._acquire()
        env.rec.before = takeover
        assert await a.tick() == 0
        assert not a.is_leader and env.rec.specs == []
        # the fire was marked, so no master marks it again; the new leader queues it, once
        assert 0 < await env.r.ttl(env.keys.fire(fire_id("site", T0 + 60))) <= 60 + 600
        assert await b.tick() == 1 and rec_b.times == [T0 + 60]
        assert await b.tick() == 0 and rec_b.times == [T0 + 60]
        assert not await env.r.exists(env.keys.fires_pending)
    run(redis_url, body)


def test_a_lease_lost_while_a_pass_reads_what_is_due_ends_the_pass_quietly(redis_url):
    """The lease task steps down (token None) while the pass awaits Redis: the pass used
    to send the None token to Redis and fail with a DataError traceback (found by
    bench/chaos.py). The next leader fires the job."""
    async def body(env):
        a, rec_b = env.sched, Recorder(env.r, env.keys)
        b = env.scheduler("m2", rec_b)
        await fired_once(env)
        due = a._due_s

        async def due_then_lose_the_lease(**kw):
            reply = await due(**kw)
            a._step_down("lease lost while reading what is due")
            await env.r.delete(env.keys.scheduler_lease)
            return reply
        a._due_s = due_then_lose_the_lease
        assert await a.tick() == 0 and env.rec.specs == []
        assert await b.tick() == 1 and rec_b.times == [T0 + 60]
    run(redis_url, body)


def test_fires_a_failed_enqueue_left_marked_are_queued_by_the_next_pass(redis_url):
    """Redis gone past the enqueue's retries used to lose the marked fires for good."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(env):
        a = env.sched
        for n in range(3):
            await env.store.add(spec(f"site{n}"))
        await a.tick()
        env.clock.t = T0 + 60

        async def away():
            env.rec.before = None
            raise RedisConnectionError("Connection refused")
        env.rec.before = away
        assert await a.tick() == 0 and env.rec.specs == []
        assert await env.r.hlen(env.keys.fires_pending) == 3
        assert await a.tick() == 3
        assert sorted(s["job_id"] for s in env.rec.specs) == \
            sorted(fire_id(f"site{n}", T0 + 60) for n in range(3))
        assert await a.tick() == 0 and len(env.rec.specs) == 3
    run(redis_url, body)


def test_a_leader_dying_between_marking_and_queueing_loses_no_fire(redis_url):
    """The leader marks a batch of fires, then dies before queueing them; the master that
    takes over queues every one of them, once, and each is counted fired once (the dead
    leader never counted them, and recovering them counted nothing)."""
    async def body(env):
        died = asyncio.Event()

        async def dies(specs, token, recovered=False):
            died.set()
            await asyncio.Event().wait()   # never returns: the process is gone
        a = env.scheduler("m1", dies, lease_seconds=0.6)
        rec_b = Recorder(env.r, env.keys)
        b = env.scheduler("m2", rec_b, lease_seconds=0.6)
        for n in range(20):
            await env.store.add(spec(f"site{n}", trigger={"type": "date",
                                                          "run_date": time.time() + 0.2}))
        ta = asyncio.create_task(a.run())
        await asyncio.wait_for(died.wait(), 10)
        a._release = _nothing           # no release, no renewals: it is dead
        ta.cancel()
        tb = asyncio.create_task(b.run())
        try:
            await wait_async(lambda: _true(len(rec_b.specs) >= 20), 10, "b to queue them")
            assert sorted(s["job_id"] for s in rec_b.specs) == sorted(
                fire_id(f"site{n}", s["fire_time"]) for n, s in
                sorted((int(s["schedule"][4:]), s) for s in rec_b.specs))
            assert len({s["job_id"] for s in rec_b.specs}) == 20
            assert not await env.r.exists(env.keys.fires_pending)
            assert (await env.store.fire_stats())["fired"] == 20
        finally:
            await b.stop()
            await tb
            with contextlib.suppress(asyncio.CancelledError):
                await ta
    run(redis_url, body, t=None)


async def _nothing():
    pass


async def fired_once(env, sched=None) -> None:
    """spec()'s job added and fired by ``sched`` (env.sched); the clock then at its next fire."""
    await env.store.add(spec())
    await (sched or env.sched).tick()
    env.clock.t = T0 + 60


@pytest.mark.parametrize("left", ["no_ttl", "other_type"])
def test_a_lease_key_left_without_its_ttl_or_of_another_type_is_taken_in_time(redis_url, left):
    """A lease key without its expiry (keys restored without their TTLs, a PERSIST) was
    never free again: no master ever scheduled, none said why, and each asked again every
    6 ms. One of another type (an operator's write) failed every try: the same, logged."""
    async def body(env):
        await env.store.add(spec())
        if left == "no_ttl":
            await env.r.set(env.keys.scheduler_lease, "a-master-gone-for-good")
        else:
            await env.r.rpush(env.keys.scheduler_lease, "overwritten")
        env.clock.t = T0 + 60
        sched = env.scheduler("m1", env.rec, lease_seconds=0.2)
        deadline = time.monotonic() + 10
        while await sched.tick() == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert env.rec.times == [T0 + 60]
        if left == "other_type":   # overwritten under its holder: not renewed, taken again
            await env.r.delete(env.keys.scheduler_lease)
            await env.r.rpush(env.keys.scheduler_lease, "overwritten")
            assert not await sched._renew() and await sched._acquire(again=True)
    run(redis_url, body)


@pytest.mark.parametrize("fence", ["text", "hash"])
def test_a_fence_key_of_another_type_is_replaced_above_every_token_handed_out(redis_url, fence):
    """A fence INCR fails on (an operator's SET of text, a hash) stopped scheduling for
    good: every taking of the lease failed (a hash: every fire and renewal too), logged.
    The master taking the lease replaces it, above every token handed out, so scheduling
    resumes and no older token, a stale leader's, ever passes again."""
    from elric.queue import RedisQueue

    async def body(env):
        queue, key = RedisQueue(env.r, env.keys), env.keys.scheduler_fence
        def enqueue(specs, token, recovered=False):
            return queue.enqueue(specs, fence=token)
        a, stale = env.scheduler("m1", enqueue), env.scheduler("m2", enqueue)
        await env.store.add(spec(max_instances=3))   # (its queued fires are not run)
        await stale.tick()   # it leads, then stalls past its lease: a takes it
        await env.r.delete(env.keys.scheduler_lease)
        await a.tick()
        tokens = (stale.token, a.token)
        if fence == "hash":
            await env.r.delete(key)
            await env.r.hset(key, "token", "1")
        else:
            await env.r.set(key, "twelve")
        env.clock.t = T0 + 60
        fired = [await a.tick() for _ in range(2)]   # fenced out, then taken again
        assert fired == [0, 1] and int(await env.r.get(key)) == a.token > max(tokens)
        assert (await queue.get_job(fire_id("site", T0 + 60)))["status"] == "queued"
        for token in tokens:   # the stale leader's, and the one a held before
            stale.is_leader, stale.token = True, token
            assert not await stale._renew()
        env.clock.t = T0 + 120
        assert await stale.tick() == 0 and not stale.is_leader   # fenced, not fired
        assert await a.tick() == 1 and await a._renew()
        before = a.token   # replaced again: still above the token it replaced
        await env.r.set(key, "twelve")
        assert not await a._renew() and await a._acquire(again=True) and a.token > before
    run(redis_url, body)


def test_lease_release_and_renew_only_own(redis_url):
    async def body(env):
        a, b = env.sched, env.scheduler("m2", env.rec)
        await a.tick()
        b.token = a.token  # even with the current token, a lease held by m1 is not m2's
        assert not await b._renew()
        assert await a._renew()
        await b.stop()  # not the holder: the lease stays
        assert await env.r.get(env.keys.scheduler_lease) == b"m1"
        await a.stop()
        assert await env.r.get(env.keys.scheduler_lease) is None and not a.is_leader
        await b.tick()
        assert b.is_leader and b.token == 2
    run(redis_url, body)


def wait_async(predicate, timeout, what):
    async def waiter():
        deadline = time.monotonic() + timeout
        while not await predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.01)
    return waiter()


async def _blocked_clients(r) -> int:
    return (await r.info("clients"))["blocked_clients"]


def acquire_attempts(sched) -> list[bool]:
    """Record what each of ``sched``'s tries to take the lease got."""
    got, real = [], sched._acquire

    async def counting():
        got.append(await real())
        return got[-1]
    sched._acquire = counting
    return got


def test_run_wakes_up_for_a_sooner_job(redis_url):
    async def body(env):
        # lease 30 s: with nothing due the leader would sleep 10 s before looking again
        sched = env.scheduler("m1", env.rec, lease_seconds=30.0)
        task = asyncio.create_task(sched.run())
        try:
            await wait_async(lambda: _true(sched.is_leader), 5, "leadership")
            await wait_async(lambda: _true_async(_blocked_clients(env.r)), 5, "its long BLPOP")
            added = time.time()
            await env.store.add(spec(trigger={"type": "date", "run_date": added + 0.3}))
            await wait_async(lambda: _true(env.rec.specs), 5, "the fire")
            took = time.time() - added
            assert 0.29 <= took < 3.0, took
            assert env.rec.times == [pytest.approx(added + 0.3, abs=1e-6)]
        finally:
            await sched.stop()
            await task
        assert await env.r.get(env.keys.scheduler_lease) is None  # released on stop
    run(redis_url, body, t=None)


def test_a_wake_list_of_another_type_is_replaced_while_fires_go_on(redis_url, caplog):
    """Its wait for a wake token failed after every pass that fired: each such pass was
    logged with a traceback, as a new trouble. The list holds only tokens: it is replaced."""
    async def body(env):
        await env.store.add(spec(trigger={"type": "interval", "seconds": 1}))
        await env.r.delete(env.keys.scheduler_wake)
        await env.r.set(env.keys.scheduler_wake, "overwritten")
        task = asyncio.create_task(env.sched.run())
        try:
            await wait_async(lambda: _true(len(env.rec.specs) >= 3), 30, "three fires")
        finally:   # (a cancel landing in a redis-py call may be swallowed: it hung once)
            await env.sched.stop()
            await task
        assert "scheduler pass failed" not in caplog.text, caplog.text
        assert caplog.text.count("overwritten with another type; deleted it") == 1
        assert await env.r.type(env.keys.scheduler_wake) in (b"none", b"list")
    run(redis_url, body, t=None)


def test_run_takeover_after_the_leader_dies(redis_url):
    """A leader that dies keeps its lease until it runs out: another master takes it then,
    and fires. Told by what the follower saw and how long it waited after each refusal
    (at most the lease left), not by a clock: a timed assert failed on a loaded machine."""
    async def body(env):
        a = env.scheduler("m1", env.rec, lease_seconds=0.6)
        b = env.scheduler("m2", env.rec, lease_seconds=0.6)
        left: list[int] = []   # the holder's lease left (ms) at each of b's refused tries
        script = b._acquire_s

        async def acquire_s(**kw):
            reply = await script(**kw)
            if not reply[0]:
                left.append(reply[1])
            return reply
        b._acquire_s = acquire_s
        tries, waits, acquire = [], [], b._acquire

        async def recording():   # what each try got, and b's wait before its next one
            tries.append(await acquire())
            waits.append(b._lease_wait)
            return tries[-1]
        b._acquire = recording
        ta, tb = asyncio.create_task(a.run()), None
        try:
            await wait_async(lambda: _true(a.is_leader), 30, "a to lead")
            tb = asyncio.create_task(b.run())
            await wait_async(lambda: _true(tries), 30, "b to try the lease")
            assert tries[0] is False and not b.is_leader
            a._release = _nothing  # a "dies": no release, no renewals

            async def a_ended() -> bool:   # a cancel landing in a redis-py call may be
                ta.cancel()                # swallowed (a led on, half the runs): again
                await asyncio.sleep(0)
                return ta.done()
            await wait_async(a_ended, 30, "a to end")
            await wait_async(lambda: _true(b.is_leader), 30, "b to take over")
            assert tries[-1] is True and not any(tries[:-1]), tries
            assert await env.r.get(env.keys.scheduler_lease) == b"m2"
            # refused only while a's lease ran, each time back when it runs out at the latest
            assert len(left) == len(tries) - 1 and all(n > 0 for n in left), left
            assert all(wait <= n / 1000 + 0.005 for wait, n in zip(waits, left)), (waits, left)
            await env.store.add(spec(trigger={"type": "date", "run_date": time.time() + 0.05}))
            await wait_async(lambda: _true(env.rec.specs), 30, "b to fire")
        finally:
            await b.stop()
            if tb is not None:
                await tb
            ta.cancel()
        with pytest.raises(asyncio.CancelledError):
            await ta
    run(redis_url, body, t=None)


def test_planning_a_pass_lets_the_lease_renew_between_jobs(redis_url):
    """Planning a pass's due jobs held the event loop: 200 every-minute crons 1000 fires
    behind with no grace took longer than a 3 s lease, which no renewal could extend
    meanwhile, so the fire script was refused, the lease taken again, the same pass planned
    again: no periodic job fired any more (a master's RPC calls waited all that time too).
    Other tasks now run between two jobs' plans."""
    async def body(env):
        for n in range(3):
            await env.store.add(spec(f"site{n}"))
        ran, seen = [0], []

        async def other_task():   # the lease loop, an RPC call
            while True:
                ran[0] += 1
                await asyncio.sleep(0)
        plan = env.sched._plan
        env.sched._plan = lambda *a: seen.append(ran[0]) or plan(*a)
        other = asyncio.create_task(other_task())
        env.clock.t = T0 + 60
        try:
            assert await env.sched.tick() == 3
        finally:
            other.cancel()
        assert len(seen) == 3 and seen[0] < seen[1] < seen[2]
    run(redis_url, body)


async def _true(value) -> bool:
    return bool(value)


async def _true_async(value) -> bool:
    return bool(await value)


def test_follower_stops_promptly(redis_url):
    async def body(env):
        lead = env.scheduler("m1", env.rec, lease_seconds=30.0)
        follower = env.scheduler("m2", env.rec, lease_seconds=30.0)  # would wait 10 s per look
        tasks = [asyncio.create_task(lead.run())]
        await wait_async(lambda: _true(lead.is_leader), 5, "leadership")
        tries = acquire_attempts(follower)
        tasks.append(asyncio.create_task(follower.run()))
        await wait_async(lambda: _true(tries), 5, "the follower to try the lease")
        started = time.monotonic()
        await follower.stop()
        await tasks[1]
        assert time.monotonic() - started < 2.0 and not follower.is_leader
        assert await env.r.get(env.keys.scheduler_lease) == b"m1"
        await lead.stop()
        await tasks[0]
    run(redis_url, body, t=None)


def test_fires_marked_by_a_fire_script_whose_reply_was_lost_are_queued_by_the_next_pass(redis_url):
    """The connection drops after Redis ran the fire script but before its reply came back:
    the fire is marked and pending, its next run time moved on. The leader's next pass used
    to see nothing due and leave that fire pending until another master took the lease."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(env):
        a = env.sched
        await fired_once(env)
        fire = a._fire_s

        async def reply_lost(**kw):
            a._fire_s = fire
            await fire(**kw)
            raise RedisConnectionError("Connection closed by server.")
        a._fire_s = reply_lost
        with pytest.raises(RedisConnectionError):
            await a.tick()
        assert await env.r.hlen(env.keys.fires_pending) == 1 and env.rec.specs == []
        assert a.is_leader
        assert await a.tick() == 1 and env.rec.times == [T0 + 60]
        assert not await env.r.exists(env.keys.fires_pending)
    run(redis_url, body)


def test_pending_fires_are_queued_after_a_redis_error_while_looking_for_them(redis_url):
    """A new leader looks for the fires its predecessor marked but did not queue; Redis
    failing that HSCAN (a restart, a dropped connection) used to end the looking for good
    while this master led, so those fires stayed pending."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(env):
        async def dies(specs, token, recovered=False):
            raise Fenced("the old leader is gone")
        old = env.scheduler("m0", dies)
        await fired_once(env, old)
        assert await old.tick() == 0
        assert await env.r.hlen(env.keys.fires_pending) == 1
        await env.r.delete(env.keys.scheduler_lease)

        a, hscan = env.sched, env.r.hscan

        async def fails_once(*args, **kw):
            env.r.hscan = hscan
            raise RedisConnectionError("Connection closed by server.")
        env.r.hscan = fails_once
        with pytest.raises(RedisConnectionError):
            await a.tick()
        assert a.is_leader and env.rec.specs == []
        assert await a.tick() == 1 and env.rec.times == [T0 + 60]
        assert not await env.r.exists(env.keys.fires_pending)
    run(redis_url, body)


def test_a_long_lease_does_not_make_the_idle_wait_outlast_the_socket_timeout(redis_url, caplog):
    """Masters connect with a 5 s socket timeout; with SCHEDULER_LEASE 30 the leader's idle
    BLPOP lasted up to 10 s, so it failed with TimeoutError on every idle wait: a warning
    each time, and a backoff of up to 10 s during which due fires waited."""
    from elric.retry import REDIS_CLIENT_OPTIONS

    async def body(env):
        r = aioredis.Redis.from_url(redis_url, **REDIS_CLIENT_OPTIONS)
        sched = Scheduler(r, env.keys, env.store, env.rec, master_id="m1", lease_seconds=30.0)
        due = time.time() + 6.5
        await env.store.add(spec(trigger={"type": "date", "run_date": due}))
        task = asyncio.create_task(sched.run())
        try:
            await wait_async(lambda: _true(env.rec.specs), 15, "the fire")
            assert env.rec.times == [pytest.approx(due, abs=1e-6)]
            assert "scheduler pass failed" not in caplog.text
            assert not sched.health.in_trouble
        finally:
            await sched.stop()
            await task
            await r.aclose()
    run(redis_url, body, t=None)


def test_max_instances_counts_a_fire_marked_but_not_yet_queued(redis_url):
    """A fire whose enqueue failed waits in the pending fires with no job hash yet; the due
    read saw no status for it, so max_instances=1 let the next fire be queued as well, and
    the pending one queued after it: two runs at once."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(env):
        async def fails_twice():  # Redis refuses the first fire's enqueue and its retry
            if env.rec.fail:
                env.rec.fail -= 1
                raise RedisConnectionError("Connection refused")
        env.rec.fail, env.rec.before = 2, fails_twice
        await fired_once(env)
        assert await env.sched.tick() == 0      # marked, not queued
        env.clock.t = T0 + 120
        assert await env.sched.tick() == 0      # the retry fails too; T0+120 must not run
        env.clock.t = T0 + 121
        assert await env.sched.tick() == 1      # the pending fire, at last
        assert env.rec.times == [T0 + 60]
        runs = await env.runs()
        assert [(r["fire_time"], r["outcome"], r.get("reason")) for r in runs] == [
            (T0 + 60, "enqueued", None), (T0 + 120, "skipped", "max_instances")]
    run(redis_url, body, status="queued")


@pytest.mark.parametrize("trigger", [
    {"type": "cron", "crontab": "0 23 31 12 *", "timezone": "America/New_York"},
    {"type": "interval", "weeks": 53, "start_date": "9998-12-31T23:00:00-05:00"},
])
def test_a_schedule_whose_next_fire_is_past_the_year_9999_finishes(redis_url, caplog, trigger):
    """Its next fire after 9998-12-31 23:00 New York time is in the year 10000 in UTC: the
    pass raised OverflowError and retried the job every 60 s forever instead of finishing it."""
    last = datetime(9998, 12, 31, 23, tzinfo=ZoneInfo("America/New_York")).timestamp()

    async def body(env):
        await env.store.add(spec(trigger=trigger))
        env.clock.t = last + 1
        assert await env.sched.tick() == 1 and env.rec.times == [last]
        assert (await env.store.get("site"))["status"] == "finished"
        assert not await env.r.zscore(env.keys.schedules, "site")
    run(redis_url, body, t=last - 3600)
    assert "cannot compute its fires" not in caplog.text


def test_an_enqueue_failing_for_a_redis_outage_logs_one_line(redis_url, caplog):
    """Redis away is expected weather (one warning line, as for a failed pass); the fires'
    enqueue logged a full traceback for it, as for a bug."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def body(env):
        async def away():
            env.rec.before = None
            raise RedisConnectionError("Connection refused")
        await fired_once(env)
        env.rec.before = away
        assert await env.sched.tick() == 0
        assert await env.sched.tick() == 1    # queued by the next pass
    run(redis_url, body)
    [failed] = [r for r in caplog.records if "queueing fires failed" in r.getMessage()]
    assert failed.levelname == "WARNING" and failed.exc_info is None
    assert "Connection refused" in failed.getMessage()


def test_fires_that_cannot_be_queued_pass_after_pass_log_one_line(redis_url, caplog):
    """Redis refusing writes (full, read-only) while fires wait pending: each pass logged
    the fires found pending and their enqueue failing, two warnings every few seconds for
    as long as it lasted. Now one line when it starts, and one when it passes."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    caplog.set_level("INFO", "elric.scheduler")

    async def body(env):
        async def away():
            raise RedisConnectionError("Connection refused")
        await env.store.add(spec())
        env.clock.t = T0 + 60
        env.rec.before = away
        for _ in range(5):
            assert await env.sched.tick() == 0
        env.rec.before = None
        assert await env.sched.tick() == 1    # queued from the pending fires
    run(redis_url, body)
    warned = [r.getMessage() for r in caplog.records
              if r.levelname == "WARNING" and "queueing" in r.getMessage()]
    assert len(warned) == 1, warned
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_a_fire_the_dedupe_filter_drops_is_recorded_filtered_and_counted_once(redis_url, caplog):
    """A fire whose dedupe key was seen stayed recorded "enqueued" with nothing queued."""
    async def body(env):
        async def filtering(specs, token, recovered=False):
            return [Submitted(s["job_id"], "filtered") for s in specs]
        sched = env.scheduler("m1", filtering)
        await env.store.add(spec(dedupe_key="same"))
        for i in (1, 2):
            env.clock.t = T0 + 60 * i
            assert await sched.tick() == 0
        # dropped again when queued from the pending fires (a new leader): counted once
        await sched._filtered([{"job_id": fire_id("site", T0 + 60), "schedule": "site"}])
        runs = await env.runs()
        assert [(r["outcome"], r["reason"]) for r in runs] == [("filtered", "dedupe_key")] * 2
        assert runs[0]["fire_time"] == T0 + 60 and isinstance(runs[0]["fire_time"], float)
        assert await env.r.hlen(env.keys.fires_pending) == 0
        stats = await env.store.fire_stats()
        assert (stats["fired"], stats["filtered"]) == (2, 2)
    run(redis_url, body)
    warned = [r for r in caplog.records if "filtered, not run" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelname == "WARNING"   # once for the job
    assert "periodic job site" in warned[0].getMessage() and "'same'" in warned[0].getMessage()


@pytest.mark.parametrize("bad", [b"\xc1", b"\x05"])   # not msgpack; not a map
def test_a_filtered_fire_whose_runs_hold_an_unreadable_record_stops_no_other_fire(
        redis_url, bad):
    """Recording a filtered fire looks for its run record in its job's runs; one record
    there that was no run (written by hand, a bad restore) raised, the fire stayed
    pending, and each pass after failed on it before looking at what was due: no
    periodic job fired any more. Its record is looked for past the unreadable one."""
    async def body(env):
        async def filtering(specs, token, recovered=False):
            await env.rec([s for s in specs if s["schedule"] != "dup"], token)
            # while the fire waited (a refused scope), later runs pushed its record out,
            # and one there is no run record
            await env.r.delete(env.keys.schedule_runs("dup"))
            await env.r.rpush(env.keys.schedule_runs("dup"), bad)
            return [Submitted(s["job_id"], "filtered" if s["schedule"] == "dup" else "queued")
                    for s in specs]
        sched = env.scheduler("m1", filtering)
        await env.store.add(spec("dup", dedupe_key="same"))
        await env.store.add(spec("good"))
        for i in (1, 2):
            env.clock.t = T0 + 60 * i
            assert await sched.tick() == 1
        assert [s["fire_time"] for s in env.rec.specs] == [T0 + 60, T0 + 120]
        assert await env.r.hlen(env.keys.fires_pending) == 0
        assert (await env.store.fire_stats())["filtered"] == 2
    run(redis_url, body)


async def _absorbing_a_cancel(entered: asyncio.Event, result):
    """A Redis call as redis-py may end one its task's cancel landed in: normally."""
    entered.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(30)
    return result


@pytest.mark.parametrize("where", ["pass", "lease"])
def test_a_cancel_a_redis_call_swallowed_still_ends_the_scheduler(redis_url, where):
    """A master's stop cancels its scheduler; a cancel that a redis-py call swallowed (it
    ended the call normally) left the pass loop, or the lease loop run() waits for at its
    end, running for good: the master never exited, and led on meanwhile."""
    async def body(env):
        s = env.scheduler("m1", env.rec, lease_seconds=0.6)
        entered = asyncio.Event()
        if where == "pass":
            s._fire_due = lambda: _absorbing_a_cancel(entered, (0, math.inf))
        task = asyncio.create_task(s.run())
        await wait_async(lambda: _true(s.is_leader), 30, "the scheduler to lead")
        if where == "lease":
            s._renew = lambda: _absorbing_a_cancel(entered, True)
        await wait_async(lambda: _true(entered.is_set()), 30, "a call under way")
        task.cancel()
        try:
            await wait_async(lambda: _true(task.done()), 30, "the scheduler to end")
        finally:   # else asyncio.run would wait for it for good
            s._stop.set()

            async def ended() -> bool:
                task.cancel()
                await asyncio.sleep(0)
                return task.done()
            await wait_async(ended, 30, "the scheduler to end at last")
        assert task.cancelled()
    run(redis_url, body, t=None)


def test_a_stale_leader_does_not_record_filtered_a_fire_the_new_leader_queued(redis_url, caplog):
    """A leader paused past its lease between marking a fire and queueing it: the next
    leader queued the fire (its dedupe key taken for it), and the old one, resumed, found
    that key seen and recorded the fire "filtered, not run" (what get() and run_now's wait
    answered) and logged so, while it was queued and ran. A fire no longer pending was
    decided by whoever took it out: its record stays."""
    from elric.config import load_settings
    from elric.master import Master
    from elric.redis_server import free_port

    async def main():
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}")))
        await m.start()
        try:
            deadline = time.monotonic() + 10   # a and b below are the masters that schedule
            while not m.scheduler.is_leader:   # (a stop before its run began is not seen)
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            await m.scheduler.stop()
            await m.store.add(m.admission.normalize({
                "func": "tests.jobs:Echo", "job_id": "report", "dedupe_key": "report",
                "trigger": {"type": "interval", "hours": 1}}))
            fire = await m.store.run_now("report")
            b = Scheduler(m.redis, m.keys, m.store, m.admission.enqueue_fires, master_id="b",
                          clock=m.store.clock)

            async def paused_past_its_lease(specs, token, recovered=False):
                await m.redis.delete(m.keys.scheduler_lease)   # it ran out meanwhile
                assert await b.tick() == 1   # b leads, and queues the fire a marked
                return await m.admission.enqueue_fires(specs, token, recovered)
            a = Scheduler(m.redis, m.keys, m.store, paused_past_its_lease, master_id="a",
                          clock=m.store.clock)
            await a.tick()
            job = await m.queue.get_job(fire_id("report", fire))
            assert job is not None and job["status"] == "queued", job
            runs = (await m.store.get("report"))["runs"]
            assert [r["outcome"] for r in runs] == ["queued"]
            assert (await m.store.fire_stats())["filtered"] == 0
        finally:
            await m.close()
    asyncio.run(main())
    assert "filtered, not run" not in caplog.text


async def one_lease_pass(sched) -> None:
    """One pass of ``sched``'s lease loop: it stops at the pass's end."""
    sync = sched.clock.sync

    async def sync_then_stop():
        sched._stop.set()
        return await sync()
    sched.clock.sync = sync_then_stop
    try:
        await asyncio.wait_for(sched._lease_loop(), 10)
    finally:
        del sched.clock.sync
        sched._stop.clear()


def test_a_lease_redis_lost_is_logged_re_acquired_and_one_taken_by_another_master_taken_over(
        redis_url, caplog):
    """After a Redis restart the leader took its own lease again, and logged "stops
    scheduling: lease taken over": an operator looked for another master."""
    caplog.set_level(logging.INFO, logger="elric")

    async def body(env):
        a, b = env.sched, env.scheduler("m2", env.rec)
        await a.tick()
        assert a.is_leader
        await env.r.delete(env.keys.scheduler_lease, env.keys.scheduler_fence)   # restarted
        caplog.clear()
        await one_lease_pass(a)
        assert a.is_leader and "re-acquired its own scheduler lease" in caplog.text \
            and "taken over" not in caplog.text, caplog.text
        await env.r.delete(env.keys.scheduler_lease)   # a stalled past its lease: b takes it
        assert await b._acquire()
        caplog.clear()
        await one_lease_pass(a)
        assert not a.is_leader and "lease taken over by another master" in caplog.text \
            and "re-acquired" not in caplog.text, caplog.text
    run(redis_url, body)
