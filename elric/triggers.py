"""Periodic-job triggers: validate plain-data trigger dicts and build APScheduler 3.x triggers.

Triggers travel and are stored as msgpack-able dicts (never pickles), e.g.
``{"type": "cron", "crontab": "30 2 * * 1-5", "timezone": "Europe/Berlin"}``,
``{"type": "interval", "minutes": 15}`` or ``{"type": "date", "run_date": "2026-05-01T08:00"}``.
The fire-time arithmetic is APScheduler's; this module adds validation that names the bad
field, UTC as the explicit default zone (so masters on hosts in other zones agree), crontab
weekday numbering, a single fire at repeated wall-clock times when DST ends, and jitter that
does not accumulate.
"""

from __future__ import annotations

import math
import random
import re
from datetime import datetime, timedelta, timezone as dt_timezone, tzinfo
from typing import Any
from zoneinfo import ZoneInfo

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

UTC = dt_timezone.utc
CRON_FIELDS = CronTrigger.FIELD_NAMES  # year, month, day, week, day_of_week, hour, minute, second
CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
INTERVAL_UNITS = ("weeks", "days", "hours", "minutes", "seconds")
COMMON = ("start_date", "end_date", "timezone", "jitter")
ALLOWED = {
    "cron": frozenset(("type", "crontab") + CRON_FIELDS + COMMON),
    "interval": frozenset(("type",) + INTERVAL_UNITS + COMMON),
    "date": frozenset(("type", "run_date", "timezone")),
}
# crontab counts weekdays from Sunday (0 and 7); APScheduler 3.x counts 0 as Monday.
_CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_NUMERIC_DOW = re.compile(r"^(\*|\d+)(?:-(\d+))?(?:/(\d+))?$")


class TriggerError(ValueError):
    """An invalid trigger; ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class _CronTrigger(CronTrigger):
    """CronTrigger that fires a fixed-hour job once when DST ends: APScheduler 3.x fires
    "30 2 * * *" at both 02:30s of the repeated hour; like Vixie cron, this skips the second.
    Jobs whose hour is "*" keep firing every real interval."""

    __slots__ = ("skip_repeated",)

    def get_next_fire_time(self, previous_fire_time, now):
        nxt = super().get_next_fire_time(previous_fire_time, now)
        while nxt is not None and self.skip_repeated and _is_repeated_wall_time(nxt, self.timezone):
            nxt = super().get_next_fire_time(nxt, nxt)
        return nxt


class _IntervalTrigger(IntervalTrigger):
    """IntervalTrigger whose jitter does not accumulate: APScheduler 3.x adds the interval to
    the previous (jittered) fire time, so it drifts; here each fire is jittered from its grid
    point."""

    def get_next_fire_time(self, previous_fire_time, now):
        if previous_fire_time is None or not self.jitter:
            return super().get_next_fire_time(previous_fire_time, now)
        start = self.start_date.timestamp()
        step = math.floor((previous_fire_time.timestamp() - start) / self.interval_length) + 1
        nxt = start + step * self.interval_length + random.uniform(0, self.jitter)
        if self.end_date is None or nxt <= self.end_date.timestamp():
            return datetime.fromtimestamp(nxt, self.timezone)
        return None


def _is_repeated_wall_time(when: datetime, tz: tzinfo) -> bool:
    local = when.astimezone(tz)
    return local.fold == 1 and local.replace(fold=0).utcoffset() != local.utcoffset()


def _zone(value: Any) -> tuple[str, tzinfo]:
    if isinstance(value, ZoneInfo):
        value = value.key
    if not isinstance(value, str) or not value:
        raise TriggerError("trigger.timezone",
                           f"expected an IANA zone name like 'Europe/Berlin', got {value!r}")
    try:
        return value, ZoneInfo(value)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        raise TriggerError("trigger.timezone", f"unknown time zone {value!r}") from None


def _datetime(data: dict, name: str, tz: tzinfo) -> datetime | None:
    """``data[name]`` (ISO 8601 string, datetime or epoch seconds) as an aware datetime
    (naive means ``tz``); None when absent."""
    value, field = data.get(name), f"trigger.{name}"
    if value is None or isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value)
        except ValueError:
            raise TriggerError(field, f"not an ISO 8601 date-time: {value!r}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        dt = datetime.fromtimestamp(value, UTC)
    else:
        raise TriggerError(field, "expected an ISO 8601 string or epoch seconds, "
                                  f"got {type(value).__name__}")
    return dt if dt is None or dt.tzinfo is not None else dt.replace(tzinfo=tz)


def _number(data: dict, name: str) -> float | int | None:
    """``data[name]`` as a number of 0 or more; None when absent."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TriggerError(f"trigger.{name}", f"expected a number, got {value!r}")
    if value < 0:
        raise TriggerError(f"trigger.{name}", f"must not be negative, got {value!r}")
    return value


def _crontab_day_of_week(expr: str) -> str:
    """Rewrite crontab weekday numbers (0/7 = Sunday) as names APScheduler reads the same way."""
    items = []
    for item in expr.split(","):
        m = _NUMERIC_DOW.fullmatch(item)
        if not m or item == "*":  # names ("mon-fri") mean the same in both
            items.append(item)
            continue
        first, last, step = m.groups()
        lo, hi = (0, 6) if first == "*" else (int(first), int(last or first))
        if step is not None and last is None and first != "*":
            hi = 6  # "1/2" means from 1 to the end of the week
        if hi > 7 or lo > hi or (step is not None and int(step) == 0):
            raise TriggerError("trigger.crontab",
                               f"invalid day of week {item!r} (0-7, 0 and 7 are Sunday)")
        items.extend(_CRONTAB_DAYS[d] for d in range(lo, hi + 1, int(step or 1)))
    return ",".join(dict.fromkeys(items))


def _cron_fields(data: dict) -> dict[str, str]:
    """The APScheduler cron fields of ``data`` (a crontab or separate fields), each checked."""
    crontab = data.get("crontab")
    if crontab is None:
        fields = {name: data[name] for name in CRON_FIELDS if data.get(name) is not None}
    elif mixed := [n for n in CRON_FIELDS if data.get(n) is not None]:
        raise TriggerError("trigger.crontab", f"cannot be combined with {', '.join(mixed)}")
    elif not isinstance(crontab, str):
        raise TriggerError("trigger.crontab",
                           f"expected a string like '*/15 * * * *', got {crontab!r}")
    elif len(crontab.split()) != 5:
        raise TriggerError("trigger.crontab", f"expected 5 fields ({' '.join(CRONTAB_FIELDS)}), "
                                              f"got {len(crontab.split())} in {crontab!r}")
    else:
        fields = dict(zip(CRONTAB_FIELDS, crontab.split()))
        fields["day_of_week"] = _crontab_day_of_week(fields["day_of_week"])
    for name, value in fields.items():  # one field at a time, so the error names it
        where = f"trigger.{name}" if crontab is None else "trigger.crontab"
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TriggerError(where, f"expected an int or a string, got {value!r}")
        fields[name] = expr = str(value)
        try:
            CronTrigger.FIELDS_MAP[name](name, expr)
        except ValueError as exc:
            raise TriggerError(where, f"{name} {expr!r}: {exc}") from None
    return fields


def parse_trigger(data: dict, *, now: float | None = None) -> tuple[BaseTrigger, dict]:
    """Validate ``data``; return (APScheduler trigger, normalized dict to store).

    An interval without start_date starts one interval after ``now`` (default: the wall
    clock), like APScheduler's; that start is stored so every master computes the same fire
    times. Normalized data parses to itself.
    """
    if not isinstance(data, dict):
        raise TriggerError("trigger", f"expected a map with a 'type', got {type(data).__name__}")
    kind = data.get("type")
    if kind not in ALLOWED:
        raise TriggerError("trigger.type", f"expected 'cron', 'interval' or 'date', got {kind!r}")
    if unknown := sorted(str(k) for k in data if k not in ALLOWED[kind]):
        known = ", ".join(sorted(ALLOWED[kind] - {"type"}))
        raise TriggerError(f"trigger.{unknown[0]}",
                           f"unknown field for a {kind} trigger; known fields: {known}")
    zone_name, tz = _zone(data.get("timezone") or "UTC")
    start, end = _datetime(data, "start_date", tz), _datetime(data, "end_date", tz)
    jitter = _number(data, "jitter")

    if kind == "date":
        if (run_date := _datetime(data, "run_date", tz)) is None:
            raise TriggerError("trigger.run_date", "required (ISO 8601 date-time)")
        trigger, fields = DateTrigger(run_date=run_date, timezone=tz), {"run_date": run_date}
    elif kind == "interval":
        fields = {u: _number(data, u) for u in INTERVAL_UNITS if data.get(u) is not None}
        length = timedelta(**fields)
        if length.total_seconds() <= 0:
            raise TriggerError("trigger.interval",
                               "weeks + days + hours + minutes + seconds must be more than zero")
        if start is None:  # APScheduler's default, made explicit so it survives restarts
            base = datetime.now(UTC) if now is None else datetime.fromtimestamp(now, UTC)
            start = (base + length).astimezone(tz)
        trigger = _IntervalTrigger(**fields, start_date=start, end_date=end, timezone=tz,
                                   jitter=jitter)
    else:
        fields = _cron_fields(data)
        trigger = _CronTrigger(**fields, start_date=start, end_date=end, timezone=tz, jitter=jitter)
        trigger.skip_repeated = fields.get("hour", "*") != "*"
        if data.get("crontab") is not None:  # stored as written, not as APScheduler fields
            fields = {"crontab": data["crontab"]}

    if start is not None and end is not None and end < start:
        raise TriggerError("trigger.end_date",
                           f"{end.isoformat()} is before start_date {start.isoformat()}")
    out = {"type": kind, **fields, "start_date": start, "end_date": end, "timezone": zone_name,
           "jitter": jitter}
    return trigger, {k: _plain(v) for k, v in out.items() if v is not None and v != 0}


def build_trigger(data: dict) -> BaseTrigger:
    """The APScheduler trigger for a normalized dict (as returned by ``parse_trigger``)."""
    return parse_trigger(data)[0]


def next_fire(trigger: BaseTrigger, t: float, *, first: bool = False) -> float | None:
    """The fire time after a fire at ``t`` (``first``: the first fire at or after ``t``), in
    epoch seconds; None: none left."""
    dt = datetime.fromtimestamp(t, UTC)
    nxt = trigger.get_next_fire_time(None if first else dt, dt)
    return None if nxt is None else nxt.timestamp()


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _checked(kind: str, fields: dict) -> dict:
    data = {"type": kind, **{k: _plain(v) for k, v in fields.items() if v is not None}}
    parse_trigger(data)  # fail here, where the caller wrote the trigger
    return data


def every(*, weeks=0, days=0, hours=0, minutes=0, seconds=0, **kw) -> dict:
    """``every(minutes=15)`` -> ``{"type": "interval", "minutes": 15}`` (validated)."""
    units = dict(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    return _checked("interval", {**{k: v for k, v in units.items() if v}, **kw})


def cron(crontab: str | None = None, **fields) -> dict:
    """``cron("30 2 * * *", timezone="Europe/Berlin")`` or ``cron(hour=2, minute=30)``."""
    return _checked("cron", {"crontab": crontab, **fields})


def at(run_date, timezone: str | None = None) -> dict:
    """``at("2026-05-01T08:00:00+02:00")``: run once."""
    return _checked("date", {"run_date": run_date, "timezone": timezone})
