"""Cron means what crontab(5) says: croniter agrees away from DST edges, crontab forms and
macros are accepted, day fields are ORed, and triggers that can never fire are refused."""

from __future__ import annotations

import asyncio
import random
from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
import redis.asyncio as aioredis
from croniter import croniter

from elric.jobstore import RedisJobStore
from elric.keys import Keys
from elric.triggers import TriggerError, next_fire, parse_trigger

UTC = timezone.utc
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kolkata"]
T0 = 1_780_000_000.0  # 2026-05-28T20:26:40Z


def fires(expr: str, zone: str, start: datetime, n: int) -> list[datetime]:
    trigger, _ = parse_trigger({"type": "cron", "crontab": expr, "timezone": zone}, now=0)
    out, t = [], start.timestamp()
    while len(out) < n and (t := next_fire(trigger, t)) is not None:
        out.append(datetime.fromtimestamp(t, ZoneInfo(zone)))
    return out


# --- (a) croniter, an independent implementation, away from DST edges ----------------------

def _item(rng: random.Random, lo: int, hi: int, names=()) -> str:
    a, b = sorted(rng.sample(range(lo, hi + 1), 2))
    name = (lambda v: names[v - (1 if len(names) == 12 else 0)]) if names else str
    return rng.choice([
        str(a), f"{a},{b}", f"{a}-{b}", f"{a}-{b}/{rng.randint(1, 4)}", f"*/{rng.randint(2, 9)}",
        f"{a}/{rng.randint(2, 5)}", *((f"{name(a)}-{name(b)}", name(b)) if names else ())])


def _expressions(count: int) -> list[str]:
    rng, out = random.Random(16), []
    months = ("jan feb mar apr may jun jul aug sep oct nov dec").split()
    days = ("sun mon tue wed thu fri sat").split()
    while len(out) < count:
        minute = rng.choice(["*", "0", _item(rng, 0, 59)])
        hour = rng.choice(["*", _item(rng, 0, 23)])
        # day fields: "*" or a form not starting with "*" (where croniter and Vixie agree)
        dom = rng.choice(["*", str(rng.randint(1, 28)), "1,15",
                          f"{rng.randint(1, 9)}-{rng.randint(10, 28)}",
                          f"{rng.randint(1, 5)}-31/{rng.randint(2, 7)}"])
        month = rng.choice(["*", "*", _item(rng, 1, 12, months)])
        dow = rng.choice(["*", "*", _item(rng, 0, 6, days), "1-5", "0,6", "7", "sun-wed"])
        dow = "1-5" if dow.startswith("*/") else dow
        out.append(f"{minute} {hour} {dom} {month} {dow}")
    return out


def _near_dst(when: datetime) -> bool:
    day = timedelta(days=1)
    return (when - day).utcoffset() != (when + day).utcoffset()


@pytest.mark.parametrize("zone", ZONES)
def test_next_fire_times_agree_with_croniter(zone):
    tz, compared = ZoneInfo(zone), 0
    for i, expr in enumerate(_expressions(300)):
        start = datetime(2027, 1 + i % 12, 3 + i % 20, i % 24, 7, 30, tzinfo=tz)
        if _near_dst(start):
            continue
        ours, theirs = fires(expr, zone, start, 5), []
        it = croniter(expr, start)
        for _ in ours:
            theirs.append(it.get_next(datetime))
        for a, b in zip(ours, theirs):
            if _near_dst(a) or _near_dst(b):
                break  # DST edges are pinned in test_dst.py instead
            assert a == b, (expr, zone, start, ours, theirs)
            compared += 1
    assert compared > 600


# --- crontab(5) rules ------------------------------------------------------------------------

def local(zone: str, got: list[datetime]) -> list[str]:
    return [d.astimezone(ZoneInfo(zone)).strftime("%Y-%m-%d %H:%M %a") for d in got]


def test_day_of_month_or_day_of_week_when_both_restricted():
    got = local("UTC", fires("0 0 13 * 5", "UTC", datetime(2027, 8, 1, tzinfo=UTC), 6))
    assert got == ["2027-08-06 00:00 Fri", "2027-08-13 00:00 Fri", "2027-08-20 00:00 Fri",
                   "2027-08-27 00:00 Fri", "2027-09-03 00:00 Fri", "2027-09-10 00:00 Fri"]
    got = local("UTC", fires("0 0 13 * 1", "UTC", datetime(2027, 9, 8, tzinfo=UTC), 3))
    assert got == ["2027-09-13 00:00 Mon", "2027-09-20 00:00 Mon", "2027-09-27 00:00 Mon"]
    got = local("UTC", fires("0 0 13 * 2", "UTC", datetime(2027, 9, 8, tzinfo=UTC), 2))
    assert got == ["2027-09-13 00:00 Mon", "2027-09-14 00:00 Tue"]  # the 13th, then Tuesday
    # either field starting with "*" means AND, as Vixie cron: odd days that are Mondays
    got = local("UTC", fires("0 0 */2 * 1", "UTC", datetime(2027, 9, 1, tzinfo=UTC), 2))
    assert got == ["2027-09-13 00:00 Mon", "2027-09-27 00:00 Mon"]


@pytest.mark.parametrize("expr, same", [
    ("@hourly", "0 * * * *"), ("@daily", "0 0 * * *"), ("@midnight", "0 0 * * *"),
    ("@weekly", "0 0 * * 0"), ("@monthly", "0 0 1 * *"), ("@yearly", "0 0 1 1 *"),
    ("@annually", "0 0 1 1 *"),
    ("0 14-15/2 * * *", "0 14 * * *"),      # a step larger than its range: its first value
    ("0 0 * * sun-wed", "0 0 * * 0-3"),     # a day-name range from Sunday
    ("0 0 * * 7", "0 0 * * 0"),             # 0 and 7 are Sunday
    ("0 0 * * fri-sun", "0 0 * * 5-7"),
    ("0 0 * jan-mar/2 *", "0 0 * 1,3 *"),
])
def test_crontab_forms_and_macros(expr, same):
    start = datetime(2027, 1, 1, tzinfo=UTC)
    assert fires(expr, "Europe/Berlin", start, 12) == fires(same, "Europe/Berlin", start, 12)
    _, data = parse_trigger({"type": "cron", "crontab": expr})
    assert data["crontab"] == expr  # stored as written


@pytest.mark.parametrize("expr", ["@reboot", "@every", "0 0 * * 8", "0 0 0 * *", "0 0 * 13 *",
                                  "0 0 * * wed-mon", "5-1 * * * *", "*/0 * * * *", "*-5 * * * *"])
def test_bad_crontabs_are_refused(expr):
    with pytest.raises(TriggerError) as err:
        parse_trigger({"type": "cron", "crontab": expr})
    assert err.value.field == "trigger.crontab"


def test_a_crontab_digit_int_cannot_read_is_refused_naming_its_range():
    with pytest.raises(TriggerError, match=r"minute '²': '²' is not in 0-59"):
        parse_trigger({"type": "cron", "crontab": "² * * * *"})


# --- triggers that can never fire -----------------------------------------------------------

@pytest.mark.parametrize("data, field, message", [
    ({"crontab": "0 0 30 2 *"}, "trigger.day", "February has no day 30; this cron never fires"),
    ({"crontab": "0 0 31 4 *"}, "trigger.day", "April has no day 31; this cron never fires"),
    ({"day": 31, "month": "2,4"}, "trigger.day", "February or April have no day 31"),
    ({"year": 2020}, "trigger.year", "2020 is in the past"),
    ({"hour": 1, "end_date": "2020-01-01"}, "trigger.end_date", "is in the past"),
    ({"day": "30", "month": 2, "day_of_week": "fri"}, "trigger.day", "February has no day 30"),
    # the fields fire, but not between start_date and end_date: the date is named, not them
    ({"crontab": "0 0 29 2 *", "end_date": "2027-12-31"}, "trigger.end_date",
     "comes before the next fire (2028-02-29T00:00:00+00:00)"),
    ({"crontab": "0 0 1 1 *", "start_date": "2027-02-01", "end_date": "2027-12-31"},
     "trigger.end_date", "comes before the next fire (2028-01-01T00:00:00+00:00)"),
    ({"year": 2027, "start_date": "2028-01-01"}, "trigger.start_date", "comes after the last fire"),
])
def test_crons_that_never_fire_are_refused_naming_the_field(data, field, message):
    with pytest.raises(TriggerError) as err:
        parse_trigger({"type": "cron", **data}, now=T0)
    assert err.value.field == field and message in str(err.value)
    assert str(err.value).startswith(field + ": ")


def test_feb_30_on_a_weekday_fires_on_that_weekday():
    # crontab ORs the day fields, so this is every Monday in February (not never)
    got = local("UTC", fires("0 0 30 2 mon", "UTC", datetime(2027, 1, 1, tzinfo=UTC), 2))
    assert got == ["2027-02-01 00:00 Mon", "2027-02-08 00:00 Mon"]


def store_run(redis_url, body, **kw):
    async def main():
        r = aioredis.Redis.from_url(redis_url)
        clock = type("Clock", (), {"t": T0, "__call__": lambda self: self.t})()
        try:
            return await body(RedisJobStore(r, Keys("elrictest"), clock=clock, **kw), clock)
        finally:
            await r.aclose()
    return asyncio.run(main())


def spec(job_id, trigger, **extra):
    return {"func": "tests.jobs:Echo", "args": [], "kwargs": {}, "job_id": job_id,
            "queue": "default", "priority": 0, "trigger": trigger, **extra}


def test_store_refuses_past_dates_but_answers_a_resend(redis_url):
    async def body(store, clock):
        with pytest.raises(TriggerError, match=r"^trigger.run_date: 2020-01-01T00:00:00\+00:00 "
                                               "is in the past"):
            await store.add(spec("old", {"type": "date", "run_date": "2020-01-01T00:00:00Z"}))
        # within the misfire grace (default 60 s) it still runs; grace None: always runs
        await store.add(spec("late", {"type": "date", "run_date": T0 - 30}))
        await store.add(spec("any", {"type": "date", "run_date": 0}, misfire_grace_time=None))
        await store.add(spec("soon", {"type": "date", "run_date": T0 + 10}))
        clock.t = T0 + 600  # "soon" fired long ago; the same submit again is answered as stored
        out = await store.add(spec("soon", {"type": "date", "run_date": T0 + 10}))
        assert out["job_id"] == "soon" and out["status"] == "scheduled"
        with pytest.raises(TriggerError, match="trigger.run_date"):  # a new job, though
            await store.add(spec("soon2", {"type": "date", "run_date": T0 + 10}))
        with pytest.raises(TriggerError, match="trigger.run_date"):  # or a replacement
            await store.add(spec("soon", {"type": "date", "run_date": T0 + 20}),
                            replace_existing=True)
        with pytest.raises(TriggerError, match="trigger.run_date"):
            await store.modify("soon", {"trigger": {"type": "date", "run_date": T0}})
        with pytest.raises(TriggerError, match="trigger.day"):
            await store.add(spec("feb30", {"type": "cron", "crontab": "0 0 30 2 *"}))
    store_run(redis_url, body)


def test_store_refuses_intervals_under_min_interval(redis_url):
    async def body(store, clock):
        with pytest.raises(TriggerError, match=r"^trigger.interval: 0.001s is shorter than "
                                               r"MIN_INTERVAL \(1s\)"):
            await store.add(spec("fast", {"type": "interval", "seconds": 0.001}))
        await store.add(spec("ok", {"type": "interval", "seconds": 1}))
    store_run(redis_url, body)

    async def lower(store, clock):
        await store.add(spec("fast", {"type": "interval", "seconds": 0.25}))
    store_run(redis_url, lower, min_interval=0.1)


def test_master_refuses_at_submit_naming_the_field(cluster):
    from elric.rpc import RemoteError
    from tests.jobs import Echo

    c = cluster.client
    for trigger, field in [({"type": "cron", "crontab": "0 0 30 2 *"}, "trigger.day"),
                           ({"type": "cron", "crontab": "0 0 31 4 *"}, "trigger.day"),
                           ({"type": "date", "run_date": "2020-01-01T00:00:00Z"},
                            "trigger.run_date"),
                           ({"type": "interval", "seconds": 0.001}, "trigger.interval")]:
        with pytest.raises(RemoteError, match=f"{field}:"):
            c.submit_job(Echo.spec([], job_id="never", trigger=trigger))
    assert c.get_job("never") is None
    for i, expr in enumerate(("0 0 13 * 5", "0 14-15/2 * * *", "0 0 * * sun-wed", "@daily")):
        reply = c.submit_job(Echo.spec([], job_id=f"ok{i}", trigger={
            "type": "cron", "crontab": expr, "timezone": "Europe/Berlin"}))
        assert reply["status"] == "scheduled"


def test_a_cron_that_never_fires_is_searched_400_years_at_most(monkeypatch):
    # week 2 never holds a 31st: refused after the calendar's 400-year cycle, without
    # looking at every day up to the year 9999 (seconds of a master's loop, twice per submit)
    from elric.triggers import _CronTrigger
    seen, day_ok = [], _CronTrigger._day_ok
    monkeypatch.setattr(_CronTrigger, "_day_ok", lambda self, w: seen.append(w) or day_ok(self, w))
    with pytest.raises(TriggerError) as err:
        parse_trigger({"type": "cron", "week": 2, "day": 31}, now=T0)
    assert err.value.field == "trigger"
    assert seen and seen[-1].year <= 2026 + 401 and len(seen) <= 401 * 12
