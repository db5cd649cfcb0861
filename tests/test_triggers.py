"""Triggers: each type, crontab, field-naming validation errors, DST days, sugar."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st

from elric.codec import pack, unpack
from elric.triggers import TriggerError, at, build_trigger, cron, every, next_fire, parse_trigger

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def fires(trigger, start: datetime, end: datetime) -> list[datetime]:
    """Every fire time in [start, end) as UTC, iterating get_next_fire_time like the scheduler.

    (UTC because Python compares and subtracts datetimes of one zone by wall clock.)
    """
    out, prev = [], None
    nxt = trigger.get_next_fire_time(None, start)
    while nxt is not None and nxt.timestamp() < end.timestamp():
        out.append(nxt.astimezone(UTC))
        prev = nxt
        nxt = trigger.get_next_fire_time(prev, prev)
    return out


def utc(*args) -> datetime:
    return datetime(*args, tzinfo=timezone.utc)


def test_cron_fields():
    trigger, data = parse_trigger({"type": "cron", "hour": 2, "minute": "30", "timezone": "Europe/Berlin"})
    assert data == {"type": "cron", "hour": "2", "minute": "30", "timezone": "Europe/Berlin"}
    nxt = trigger.get_next_fire_time(None, utc(2026, 6, 1, 12))
    assert nxt.astimezone(BERLIN).replace(tzinfo=None) == datetime(2026, 6, 2, 2, 30)
    # the text operators see names the zone its times are in
    assert str(trigger) == "cron[hour='2', minute='30', timezone='Europe/Berlin']"


def test_crontab_and_default_timezone_utc():
    trigger, data = parse_trigger({"type": "cron", "crontab": "*/15 * * * *"})
    assert data == {"type": "cron", "crontab": "*/15 * * * *", "timezone": "UTC"}
    assert str(trigger) == "cron[crontab='*/15 * * * *', timezone='UTC']"
    got = fires(trigger, utc(2026, 1, 1, 10, 1), utc(2026, 1, 1, 11, 1))
    assert got == [utc(2026, 1, 1, 10, m) for m in (15, 30, 45)] + [utc(2026, 1, 1, 11, 0)]


@pytest.mark.parametrize("dow, days", [
    ("1-5", [0, 1, 2, 3, 4]),      # crontab Monday-Friday, whatever APScheduler 3 numbers mean
    ("0", [6]), ("7", [6]),        # both Sunday
    ("0-2", [6, 0, 1]),
    ("*/2", [6, 1, 3, 5]),         # from Sunday: sun, tue, thu, sat
    ("sat,sun", [5, 6]),
    ("*", list(range(7))),
])
def test_crontab_weekdays_count_from_sunday(dow, days):
    trigger, _ = parse_trigger({"type": "cron", "crontab": f"0 12 * * {dow}"})
    got = fires(trigger, utc(2026, 6, 1), utc(2026, 6, 8))  # 2026-06-01 is a Monday
    assert sorted(d.weekday() for d in got) == sorted(days)


def test_interval_start_is_fixed_at_parse_time():
    now = utc(2026, 1, 1, 0, 0).timestamp()
    trigger, data = parse_trigger({"type": "interval", "minutes": 15}, now=now)
    assert data == {"type": "interval", "minutes": 15, "start_date": "2026-01-01T00:15:00+00:00", "timezone": "UTC"}
    # the stored form gives the same fire times on any master, any time later
    again = build_trigger(data)
    later = utc(2026, 1, 1, 1, 7)
    assert trigger.get_next_fire_time(None, later) == again.get_next_fire_time(None, later) == utc(2026, 1, 1, 1, 15)


def test_interval_with_dates_and_jitter():
    _, data = parse_trigger({"type": "interval", "hours": 1, "start_date": "2026-01-01T00:00:00",
                             "end_date": "2026-01-02", "timezone": "Europe/Berlin", "jitter": 5},
                            now=utc(2025, 12, 31).timestamp())
    assert data["start_date"] == "2026-01-01T00:00:00+01:00"
    assert data["end_date"] == "2026-01-02T00:00:00+01:00"
    assert data["jitter"] == 5
    trigger = build_trigger(data)
    got = fires(trigger, utc(2025, 12, 31), utc(2026, 1, 3))
    assert len(got) == 25 and got[-1] == utc(2026, 1, 1, 23)  # as without jitter: end_date's
    assert all(0 <= (d - utc(2025, 12, 31, 23) - timedelta(hours=i)).total_seconds() <= 5 for i, d in enumerate(got))


def test_cron_jitter_keeps_fires_in_order_through_the_repeated_hour():
    """Jitter was added to the zone's wall clock: a fire in the second pass of a repeated
    hour became one in the first pass, an hour earlier, and the whole pass fired again."""
    trigger, _ = parse_trigger({"type": "cron", "crontab": "* * * * *",
                                "timezone": "Europe/Berlin", "jitter": 30})
    start = datetime(2027, 10, 31, 2, 55, tzinfo=BERLIN).timestamp()  # first pass, +02:00
    t = next_fire(trigger, start, first=True)
    for minute in range(70):  # 02:55 CEST to 03:04 CET: every real minute, once, in order
        assert 0 <= t - (start + 60 * minute) <= 30
        t = next_fire(trigger, t)


@pytest.mark.parametrize("kind", [{"type": "interval", "minutes": 1},
                                  {"type": "cron", "crontab": "* * * * *"}])
def test_jitter_neither_decides_whether_a_fire_exists_nor_moves_it_past_end_date(kind):
    """The fire before end_date was dropped when its jitter landed after it (interval), so the
    same trigger was refused or stored finished at random; a cron's fired after end_date."""
    now = utc(2026, 1, 1, 0, 0, 10)
    for _ in range(40):
        trigger, _ = parse_trigger({**kind, "jitter": 60, "start_date": "2026-01-01T00:01:00Z",
                                    "end_date": "2026-01-01T00:01:30Z"}, now=now.timestamp())
        got = fires(trigger, now, utc(2026, 1, 2))
        assert len(got) == 1 and utc(2026, 1, 1, 0, 1) <= got[0] <= utc(2026, 1, 1, 0, 1, 30)


def test_date():
    trigger, data = parse_trigger({"type": "date", "run_date": "2026-05-01T08:00:00+02:00"})
    assert data["run_date"] == "2026-05-01T08:00:00+02:00"
    first = trigger.get_next_fire_time(None, utc(2026, 1, 1))
    assert first == utc(2026, 5, 1, 6)
    assert trigger.get_next_fire_time(first, first) is None
    # naive run dates are read in the given zone; epoch seconds are accepted too
    assert parse_trigger({"type": "date", "run_date": "2026-05-01 08:00", "timezone": "Europe/Berlin"})[1][
        "run_date"] == "2026-05-01T08:00:00+02:00"
    assert parse_trigger({"type": "date", "run_date": 0})[1]["run_date"] == "1970-01-01T00:00:00+00:00"


@pytest.mark.parametrize("data, field", [
    ("cron", "trigger"),
    ({}, "trigger.type"),
    ({"type": "weekly"}, "trigger.type"),
    ({"type": ["cron"]}, "trigger.type"),
    ({"type": {"cron": 1}}, "trigger.type"),
    ({"type": "cron", "minutes": 5}, "trigger.minutes"),          # unknown field (typo)
    ({"type": "interval", "minute": 5}, "trigger.minute"),
    ({"type": "date", "run_date": "2026-01-01", "jitter": 1}, "trigger.jitter"),
    ({"type": "cron", "minute": 61}, "trigger.minute"),
    ({"type": "cron", "hour": "25"}, "trigger.hour"),
    ({"type": "cron", "day": "0"}, "trigger.day"),
    ({"type": "cron", "month": "foo"}, "trigger.month"),
    ({"type": "cron", "week": 54}, "trigger.week"),
    ({"type": "cron", "day_of_week": "funday"}, "trigger.day_of_week"),
    ({"type": "cron", "second": "*/0"}, "trigger.second"),
    ({"type": "cron", "year": 1900}, "trigger.year"),
    ({"type": "cron", "minute": [1, 2]}, "trigger.minute"),       # wrong type
    ({"type": "cron", "minute": True}, "trigger.minute"),
    ({"type": "cron", "crontab": "* * *"}, "trigger.crontab"),
    ({"type": "cron", "crontab": "99 * * * *"}, "trigger.crontab"),
    ({"type": "cron", "crontab": "* * * * 8"}, "trigger.crontab"),
    ({"type": "cron", "crontab": 5}, "trigger.crontab"),
    ({"type": "cron", "crontab": "* * * * *", "hour": 1}, "trigger.crontab"),
    ({"type": "cron", "timezone": "Mars/Olympus"}, "trigger.timezone"),
    ({"type": "cron", "timezone": 1}, "trigger.timezone"),
    ({"type": "cron", "start_date": "yesterday"}, "trigger.start_date"),
    ({"type": "cron", "end_date": []}, "trigger.end_date"),
    ({"type": "cron", "start_date": "2026-02-01", "end_date": "2026-01-01"}, "trigger.end_date"),
    ({"type": "cron", "jitter": -1}, "trigger.jitter"),
    ({"type": "interval"}, "trigger.interval"),                   # zero interval
    ({"type": "interval", "seconds": 0, "minutes": 0}, "trigger.interval"),
    ({"type": "interval", "minutes": "5"}, "trigger.minutes"),
    ({"type": "interval", "hours": -1}, "trigger.hours"),
    ({"type": "interval", "seconds": float("nan")}, "trigger.seconds"),
    ({"type": "interval", "days": 1, "start_date": "2026-02-01", "end_date": "2026-01-01"}, "trigger.end_date"),
    ({"type": "date"}, "trigger.run_date"),
    ({"type": "date", "run_date": "soon"}, "trigger.run_date"),
    # out of the calendar (years 1-9999): refused, not an OverflowError (an internal error)
    ({"type": "date", "run_date": 1e20}, "trigger.run_date"),
    ({"type": "date", "run_date": -1e12}, "trigger.run_date"),
    ({"type": "date", "run_date": "9999-12-31T23:00:00-05:00"}, "trigger.run_date"),
    ({"type": "cron", "start_date": 2**63}, "trigger.start_date"),
    ({"type": "interval", "seconds": 1e300}, "trigger.interval"),
    ({"type": "interval", "days": 10**9}, "trigger.interval"),
    ({"type": "interval", "weeks": 10**6}, "trigger.interval"),
    # ints past a float's range (a Python caller's; msgpack stops at 64 bits)
    ({"type": "date", "run_date": 10**400}, "trigger.run_date"),
    ({"type": "interval", "seconds": 10**400}, "trigger.interval"),
    ({"type": "cron", "jitter": 10**400}, "trigger.jitter"),
    ({"type": "cron", "jitter": 1e18}, "trigger.jitter"),
    ({"type": "interval", "minutes": 5, "jitter": 1e12}, "trigger.jitter"),
    # the first fire comes after the year 9999 in UTC (an internal error, no field named)
    ({"type": "interval", "seconds": 10, "start_date": "9999-12-31T23:59:59-05:00"}, "trigger.start_date"),
    ({"type": "interval", "seconds": 10, "start_date": "9999-12-31T23:59:59.999999+00:00",
      "jitter": 10}, "trigger.start_date"),  # (unless the jitter drawn is under 1 µs)
])
def test_invalid_triggers_name_the_field(data, field):
    with pytest.raises(TriggerError) as err:
        parse_trigger(data)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")
    assert isinstance(err.value, ValueError)



@pytest.mark.parametrize("data", [{"type": "cron"}, {"type": "cron", "timezone": "Europe/Berlin"},
                                  {"type": "cron", "minute": None}])
def test_a_cron_with_no_crontab_and_no_field_is_refused_not_fired_every_second(data):
    """cron() or {"type": "cron", "timezone": ...} with its crontab forgotten was taken as
    APScheduler's CronTrigger() with every field '*': a job queued every second, 86,400 a
    day, where no crontab(5) line means that."""
    with pytest.raises(TriggerError, match=r"^trigger.crontab: required: .*'\*/15 \* \* \* \*'"):
        parse_trigger(data)
    with pytest.raises(TriggerError, match=r"^trigger.crontab: required"):
        cron()


@pytest.mark.parametrize("zone", ["localtime", "right/Europe/Berlin", "posixrules"])
def test_a_zone_file_that_is_no_iana_zone_is_refused_naming_a_zone_to_give(zone):
    """'localtime' (on Debian a link to the host's /etc/localtime) was taken: a cron fired at
    another hour once a master on a host in another zone scheduled, and a master on a host
    without /etc/localtime (a container) could not read the schedule at all. The files
    beside the zones were taken too: 'right/Europe/Berlin' (leap seconds) read as UTC+2 in
    winter, a cron an hour early."""
    with pytest.raises(TriggerError, match=rf"^trigger.timezone: '{zone}' is no IANA zone.*"
                                           r"'Europe/Berlin'"):
        parse_trigger({"type": "cron", "crontab": "0 3 * * *", "timezone": zone})


@pytest.mark.parametrize("zone, meant", [("utc", "UTC"), ("europe/berlin", "Europe/Berlin"),
                                         ("Europe/Berln", "Europe/Berlin"),
                                         (" Europe/Berlin", "Europe/Berlin"),
                                         # the city alone was answered only "give an IANA
                                         # name like 'Europe/Berlin'"
                                         ("Berlin", "Europe/Berlin"),
                                         ("new york", "America/New_York"),
                                         ("Indianapolis", "America/Indiana/Indianapolis' "
                                                          "or 'America/Indianapolis")])
def test_a_misspelled_zone_is_answered_with_the_one_meant(zone, meant):
    """pytz (APScheduler 3's zones) took 'utc'; zoneinfo on Linux does not, and 'unknown
    time zone' left the user to find the spelling in the tz database."""
    with pytest.raises(TriggerError, match=rf"unknown time zone '{zone}'; did you mean '{meant}'"):
        parse_trigger({"type": "cron", "crontab": "0 3 * * *", "timezone": zone})


def test_a_date_in_epoch_milliseconds_is_answered_as_such():
    """A client in another language sends its clock's epoch milliseconds (JavaScript's
    Date.now()): 'out of range (years 1 to 9999)' did not say which unit was meant."""
    with pytest.raises(TriggerError, match=r"^trigger.run_date: 1780000000000 .*seconds, not "
                                           r"milliseconds"):
        parse_trigger({"type": "date", "run_date": 1780000000000})


def test_the_helpers_take_a_zone_as_python_code_holds_one():
    """cron(..., timezone=timezone.utc), or a pytz zone (APScheduler 3's), was refused
    ('expected an IANA zone name'): only a ZoneInfo or a name was taken."""
    pytz = pytest.importorskip("pytz")
    for zone, name in ((timezone.utc, "UTC"), (pytz.utc, "UTC"),
                       (pytz.timezone("Europe/Berlin"), "Europe/Berlin")):
        assert cron("0 3 * * *", timezone=zone)["timezone"] == name
        assert every(hours=1, timezone=zone)["timezone"] == name
        assert at("2030-01-01T08:00", timezone=zone)["timezone"] == name
    with pytest.raises(TriggerError, match="IANA zone name"):   # an offset has no DST rules
        cron("0 3 * * *", timezone=timezone(timedelta(hours=2)))

def test_a_misspelled_field_is_answered_with_the_one_meant():
    from elric import cron, every

    with pytest.raises(TriggerError, match="trigger.minute: unknown field for an interval "
                                           "trigger; did you mean minutes?"):
        every(minute=15)   # it listed the nine fields, "for a interval trigger"
    with pytest.raises(TriggerError, match="trigger.hours: .*; did you mean hour?"):
        cron(hours=2)
    with pytest.raises(TriggerError, match="trigger.colour: .*; known fields: days, end_date"):
        every(colour=1)


def test_a_far_end_date_is_still_taken():
    # "9999-12-31" as "never" is past the year 9999 in UTC west of it; stored ones must build
    for kind in ({"type": "cron", "hour": 1}, {"type": "interval", "hours": 1}):
        _, data = parse_trigger({**kind, "end_date": "9999-12-31T23:00:00", "timezone": "America/New_York"})
        assert build_trigger(data).end_date.year == 9999


def test_fires_past_the_year_9999_in_utc_are_none_left_not_an_overflow():
    """9999-12-31 23:00 in New York is in the year 10000 in UTC: computing that fire raised
    OverflowError, at submit (an internal error) and in the scheduler's pass."""
    ny = {"crontab": "0 23 31 12 *", "timezone": "America/New_York"}
    with pytest.raises(TriggerError) as err:
        parse_trigger({"type": "cron", **ny, "start_date": "9999-12-30T00:00"})
    assert err.value.field == "trigger.start_date" and "never fires" in str(err.value)
    last = datetime(9998, 12, 31, 23, tzinfo=ZoneInfo("America/New_York")).timestamp()
    assert next_fire(build_trigger({"type": "cron", **ny}), last) is None
    year = build_trigger({"type": "interval", "weeks": 52, "start_date": "9999-06-01T00:00:00+00:00"})
    assert next_fire(year, datetime(9999, 6, 1, tzinfo=timezone.utc).timestamp()) is None


@pytest.mark.parametrize("data", [
    {"type": "cron", "hour": 2, "minute": 30, "timezone": "Europe/Berlin"},
    {"type": "cron", "crontab": "30 2 * * *", "timezone": "Europe/Berlin"},
])
def test_dst_fixed_time_fires_once_each_change_day(data):
    trigger, _ = parse_trigger(data)
    for day in (datetime(2026, 3, 29), datetime(2026, 10, 25)):  # spring forward, fall back
        start = day.replace(tzinfo=BERLIN)
        got = fires(trigger, start, (day + timedelta(days=1)).replace(tzinfo=BERLIN))
        assert len(got) == 1, got
    # 02:30 does not exist on 2026-03-29: it fires at the jump, 03:00 CEST (01:00 UTC), as cron
    spring = fires(trigger, utc(2026, 3, 28, 23), utc(2026, 3, 29, 23))
    assert spring == [utc(2026, 3, 29, 1, 0)]
    # 02:30 happens twice on 2026-10-25: only the first (CEST, 00:30 UTC) fires
    autumn = fires(trigger, utc(2026, 10, 24, 22), utc(2026, 10, 25, 23))
    assert autumn == [utc(2026, 10, 25, 0, 30)]
    # and the days around keep their daily fire
    week = fires(trigger, utc(2026, 10, 21, 22), utc(2026, 10, 28, 23))
    assert len(week) == 7


def test_dst_wildcard_hour_keeps_every_real_interval():
    trigger, _ = parse_trigger({"type": "cron", "crontab": "*/30 * * * *", "timezone": "Europe/Berlin"})
    day = fires(trigger, datetime(2026, 10, 25, tzinfo=BERLIN), datetime(2026, 10, 26, tzinfo=BERLIN))
    assert len(day) == 50  # a 25-hour day
    assert all((b - a) == timedelta(minutes=30) for a, b in zip(day, day[1:]))


def test_normalized_is_msgpack_data_and_stable():
    for raw in (every(minutes=15), cron("30 2 * * 1-5", timezone="Europe/Berlin"),
                cron(hour="*/2", minute=0, end_date=datetime(2030, 1, 1, tzinfo=timezone.utc)),
                at("2026-05-01T08:00:00Z")):
        _, data = parse_trigger(raw, now=1.7e9)
        stored = unpack(pack(data))
        assert stored == data
        assert parse_trigger(stored)[1] == data


def test_sugar():
    assert every(minutes=15) == {"type": "interval", "minutes": 15}
    assert every(hours=1, jitter=3, timezone="Europe/Berlin") == {
        "type": "interval", "hours": 1, "jitter": 3, "timezone": "Europe/Berlin"}
    assert cron("*/15 * * * *") == {"type": "cron", "crontab": "*/15 * * * *"}
    assert cron(hour=2, minute=30) == {"type": "cron", "hour": 2, "minute": 30}
    assert at(datetime(2026, 5, 1, 8, tzinfo=timezone.utc)) == {"type": "date", "run_date": "2026-05-01T08:00:00+00:00"}
    assert at("2026-05-01 08:00", timezone="Europe/Berlin")["timezone"] == "Europe/Berlin"
    # a ZoneInfo is taken as its name: the trigger must still go over the wire as msgpack
    for trigger in (cron("0 * * * *", timezone=BERLIN), every(hours=1, timezone=BERLIN),
                    at("2026-05-01 08:00", timezone=BERLIN)):
        assert unpack(pack(trigger))["timezone"] == "Europe/Berlin"
    with pytest.raises(TriggerError, match="trigger.interval"):
        every()
    with pytest.raises(TriggerError, match="trigger.crontab"):
        cron("not a crontab")


@settings(max_examples=60, deadline=None)
@given(minute=st.integers(0, 59), hour=st.integers(0, 11), step=st.integers(1, 12),
       zone=st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney"]))
def test_cron_round_trip_property(minute, hour, step, zone):
    raw = {"type": "cron", "crontab": f"{minute} {hour}/{step} * * *", "timezone": zone}
    trigger, data = parse_trigger(raw)
    again = build_trigger(unpack(pack(data)))
    got = fires(trigger, utc(2026, 3, 1), utc(2026, 3, 8))
    assert got == fires(again, utc(2026, 3, 1), utc(2026, 3, 8))
    assert got and all(d.astimezone(ZoneInfo(zone)).minute == minute for d in got)


@pytest.mark.parametrize("crontab, jitter, gap", [
    ("0 9,10 * * *", 7200, "3600s"),   # 9:00 and 10:00: the 10:00 fire was dropped daily
    ("*/7 * * * *", 300, "240s"),      # :56 to the next hour's :00
    ("0 0 1,2 * *", 2 * 86400, "86400s"),
])
def test_a_cron_jitter_longer_than_its_shortest_gap_is_refused_not_dropping_fires(
        crontab, jitter, gap):
    """The fire after a jittered one is the first time after its jittered time: a jitter
    past the next fire time dropped that fire, silently (an interval's is refused). Up to
    the shortest gap, each fire time fires once, in order."""
    now = utc(2026, 1, 1).timestamp()
    with pytest.raises(TriggerError) as err:
        parse_trigger({"type": "cron", "crontab": crontab, "jitter": jitter}, now=now)
    assert err.value.field == "trigger.jitter" and f"shortest gap between its fires ({gap}" \
        in str(err.value) and "fires would be dropped" in str(err.value), err.value
    with pytest.raises(TriggerError, match="trigger.jitter"):
        cron(crontab, jitter=jitter)
    shortest = int(gap[:-1])
    plain, _ = parse_trigger({"type": "cron", "crontab": crontab}, now=now)
    trigger, _ = parse_trigger({"type": "cron", "crontab": crontab, "jitter": shortest},
                               now=now)
    want = fires(plain, utc(2026, 1, 1), utc(2026, 3, 1))
    got = fires(trigger, utc(2026, 1, 1), want[-1] + timedelta(seconds=shortest))
    assert len(got) == len(want) and all(0 <= (g - w).total_seconds() <= shortest
                                         for g, w in zip(got, want))


def test_an_interval_jitter_longer_than_the_interval_is_refused_not_dropping_fires():
    """The fire after a jittered one is the grid point after its time: a jitter past the
    next point dropped that point's fire (every second with 4 s of jitter fired about every
    3 s). Up to the interval, each point fires once, in order."""
    now = utc(2026, 1, 1).timestamp()
    with pytest.raises(TriggerError) as err:
        parse_trigger({"type": "interval", "seconds": 1, "jitter": 4}, now=now)
    assert err.value.field == "trigger.jitter" and "longer than the interval (1s)" in str(err.value)
    with pytest.raises(TriggerError, match="trigger.jitter"):
        every(minutes=1, jitter=61)
    trigger, _ = parse_trigger({"type": "interval", "seconds": 10, "jitter": 10,
                                "start_date": now}, now=now)
    got = fires(trigger, utc(2026, 1, 1), utc(2026, 1, 1, 0, 10))
    assert len(got) == 60 and all(0 <= d.timestamp() - now - 10 * i <= 10
                                  for i, d in enumerate(got))


def test_two_fields_apscheduler_prints_alike_keep_their_own_fire_times():
    # APScheduler prints minute "0-0/5" (minute 0 only) as "0/5" (every fifth minute):
    # built first, the one must not lend its times to the other
    start = datetime(2026, 12, 8, 5, 46, tzinfo=timezone.utc).timestamp()
    only_zero, _ = parse_trigger({"type": "cron", "minute": "0-0/5"})
    every_fifth, _ = parse_trigger({"type": "cron", "minute": "0/5"})
    assert next_fire(only_zero, start) == datetime(2026, 12, 8, 6, 0, tzinfo=timezone.utc).timestamp()
    assert next_fire(every_fifth, start) == datetime(2026, 12, 8, 5, 50, tzinfo=timezone.utc).timestamp()
