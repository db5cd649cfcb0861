"""Periodic-job triggers: validate plain-data trigger dicts and build APScheduler 3.x triggers.

Triggers travel and are stored as msgpack-able dicts (never pickles), e.g. ``{"type": "cron",
"crontab": "30 2 * * 1-5", "timezone": "Europe/Berlin"}``, ``{"type": "interval", "minutes":
15}`` or ``{"type": "date", "run_date": "2026-05-01T08:00"}``. Cron fire times are computed here
on wall-clock fields, with crontab(5)'s meaning across DST (docs/CRON.md); the default zone is
UTC, so that masters on hosts in other zones agree.
"""

from __future__ import annotations

import bisect
import difflib
import json
import math
import random
import re
import time
from datetime import date, datetime, time as dtime, timedelta, timezone as dt_timezone, tzinfo
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo, available_timezones

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.cron.expressions import AllExpression, RangeExpression
from apscheduler.triggers.date import DateTrigger
from apscheduler.triggers.interval import IntervalTrigger

UTC = dt_timezone.utc
CRON_FIELDS = CronTrigger.FIELD_NAMES  # year, month, day, week, day_of_week, hour, minute, second
CRONTAB_FIELDS = ("minute", "hour", "day", "month", "day_of_week")
INTERVAL_UNITS = ("weeks", "days", "hours", "minutes", "seconds")
COMMON = ("start_date", "end_date", "timezone", "jitter")
CRON_GAP_FIRES = 61  # fires a cron's jitter is checked against: a cycle of a minute's 60
ALLOWED = {
    "cron": frozenset(("type", "crontab") + CRON_FIELDS + COMMON),
    "interval": frozenset(("type",) + INTERVAL_UNITS + COMMON),
    "date": frozenset(("type", "run_date", "timezone")),
}


class TriggerError(ValueError):
    """An invalid trigger; ``field`` is the dotted path of the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class _IntervalTrigger(IntervalTrigger):
    """IntervalTrigger whose jitter does not accumulate (APScheduler 3.x adds the interval to
    the previous, jittered, fire time): each fire is jittered from its grid point."""

    def get_next_fire_time(self, previous_fire_time, now):
        if previous_fire_time is not None and previous_fire_time < self.start_date:
            previous_fire_time, now = None, previous_fire_time  # run early (run_job): keep start
        try:
            if not self.jitter:
                return super().get_next_fire_time(previous_fire_time, now)
        except (OverflowError, OSError, ValueError):  # fromtimestamp: past the year 9999
            return None
        start, length = self.start_date.timestamp(), self.interval_length
        if previous_fire_time is None:  # as APScheduler: start, or the grid's next point
            step = max(0, math.ceil((now.timestamp() - start) / length))
        else:
            step = math.floor((previous_fire_time.timestamp() - start) / length) + 1
        return _jittered(self, start + step * length)


def _jittered(trigger, t: float) -> datetime | None:
    """Fire time ``t`` (epoch) plus the trigger's jitter, added in seconds (on the zone's wall
    clock it moved a fire an hour across a DST change) and never past end_date: jitter must
    not decide whether a fire exists. None: ``t`` is past end_date or the year 9999."""
    end = math.inf if trigger.end_date is None else trigger.end_date.timestamp()
    if t > end:
        return None
    try:
        return datetime.fromtimestamp(min(end, t + random.uniform(0, trigger.jitter or 0)),
                                      trigger.timezone)
    except (OverflowError, OSError, ValueError):
        return None


def _zone(value: Any) -> tuple[str, tzinfo]:
    # a ZoneInfo, a pytz zone (APScheduler 3's) or timezone.utc: by name
    value = "UTC" if value is UTC else getattr(value, "key", None) or \
        getattr(value, "zone", None) or value
    if not isinstance(value, str) or not value:
        raise TriggerError("trigger.timezone",
                           f"expected an IANA zone name like 'Europe/Berlin', got {value!r}")
    try:
        return value, ZoneInfo(value)
    except (KeyError, ValueError, OSError):  # ZoneInfoNotFoundError is a KeyError
        names = _zone_names()   # pytz took 'utc' (APScheduler 3's zones): zoneinfo does not
        close = [names[z] for z in difflib.get_close_matches(value.strip().lower(), names,
                                                             n=1, cutoff=0.9)]
        city = value.strip().lower().replace(" ", "_")   # 'Berlin', 'new york': the city alone
        close = close or sorted(z for low, z in names.items() if low.endswith(f"/{city}"))
        raise TriggerError("trigger.timezone", f"unknown time zone {value!r}" + (
            f"; did you mean {' or '.join(map(repr, close[:2]))}?" if close else
            "; give an IANA name like 'Europe/Berlin' (CEST, PST: no zones)")) from None


@lru_cache(maxsize=1)   # read from disk: once
def _zone_names() -> dict[str, str]:
    return {z.lower(): z for z in available_timezones() if z != "localtime"}


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
    elif isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value):
        try:
            dt = datetime.fromtimestamp(value, UTC)
        except (OverflowError, OSError, ValueError):
            raise TriggerError(field, f"{value!r} is out of range (years 1 to 9999 in epoch "
                                      "seconds, not milliseconds)") from None
    else:
        raise TriggerError(field, "expected an ISO 8601 string or epoch seconds, "
                                  f"got {type(value).__name__}")
    return None if dt is None else _existing(dt if dt.tzinfo is not None else dt.replace(tzinfo=tz))


def _finite(value: int | float) -> bool:
    # an int is finite however large; math.isfinite raised OverflowError on 10**400
    return isinstance(value, int) or math.isfinite(value)


def _number(data: dict, name: str) -> float | int | None:
    """``data[name]`` as a number of 0 or more; None when absent."""
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
        raise TriggerError(f"trigger.{name}", f"expected a number, got {value!r}")
    if value < 0:
        raise TriggerError(f"trigger.{name}", f"must not be negative, got {value!r}")
    return value


# --- cron: crontab(5) meaning, wall-clock arithmetic, DST resolution -----------------------
# crontab counts weekdays from Sunday (0 and 7); APScheduler 3.x counts 0 as Monday.
_CRONTAB_DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat", "sun")
_MONTH_NAMES = ("January", "February", "March", "April", "May", "June", "July", "August",
                "September", "October", "November", "December")
_MONTHS = tuple(m[:3].lower() for m in _MONTH_NAMES)  # crontab's names: jan, feb, ...
# each crontab field's lowest and highest value, and its names (numbered from the lowest)
_CRONTAB_RANGES = {"minute": (0, 59, ()), "hour": (0, 23, ()), "day": (1, 31, ()),
                   "month": (1, 12, _MONTHS), "day_of_week": (0, 7, _CRONTAB_DAYS[:7])}
_CRONTAB_ITEM = re.compile(r"^(\*|\w+)(?:-(\w+))?(?:/(\d+))?$")
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *",
          "@weekly": "0 0 * * 0", "@daily": "0 0 * * *", "@midnight": "0 0 * * *",
          "@hourly": "0 * * * *"}
_SEARCH_YEARS = 401  # the Gregorian calendar (weekdays included) repeats every 400 years
_SECOND = timedelta(seconds=1)
_END = 253402300800  # 10000-01-01T00:00:00Z: no fire time from here on


def _crontab_values(name: str, expr: str) -> list[int]:
    """One crontab field as the sorted values it allows (crontab(5): lists, ranges, steps,
    names; a step may exceed its range: ``14-15/2`` is 14)."""
    lo, hi, names = _CRONTAB_RANGES[name]

    def number(text: str) -> int:
        if text.lower() in names:
            return names.index(text.lower()) + lo
        if not text.isdecimal() or not lo <= int(text) <= hi:   # "²".isdigit() is true
            raise ValueError(f"{text!r} is not in {lo}-{hi}" + (" or a name" if names else ""))
        return int(text)

    out: set[int] = set()
    for item in expr.split(","):
        m = _CRONTAB_ITEM.fullmatch(item)
        if not m:
            raise ValueError(f"cannot read {item!r}")
        first, last, step = m.groups()
        if first == "*" and last is not None:
            raise ValueError(f"cannot read {item!r}")
        start, top = lo if first == "*" else number(first), 6 if name == "day_of_week" else hi
        end = top if first == "*" or (last is None and step) else start if last is None \
            else number(last)  # "*" and "3/4" end at Saturday: 7 is Sunday again
        if name == "day_of_week" and first != "*" and end < start and end == 0:
            end = 7  # "fri-sun": Sunday closes the range
        if end < start or (step is not None and int(step) == 0):
            raise ValueError(f"invalid range {item!r}")
        out.update(range(start, end + 1, int(step or 1)))
    if name == "day_of_week":
        out = {d % 7 for d in out}
    return sorted(out)


def _crontab_fields(crontab: str) -> dict[str, str]:
    """A crontab line (or macro) as APScheduler field expressions of explicit values."""
    text = MACROS.get(crontab.strip().lower(), crontab)
    if text.strip().startswith("@"):
        raise TriggerError("trigger.crontab", f"unknown macro {crontab!r}; known: "
                                              f"{', '.join(MACROS)}")
    parts = text.split()
    if len(parts) != 5:
        raise TriggerError("trigger.crontab", f"expected 5 fields ({' '.join(CRONTAB_FIELDS)}), "
                                              f"got {len(parts)} in {crontab!r}")
    fields = {}
    for name, expr in zip(CRONTAB_FIELDS, parts):
        try:
            values = _crontab_values(name, expr)
        except ValueError as exc:
            raise TriggerError("trigger.crontab", f"{name} {expr!r}: {exc}") from None
        fields[name] = "*" if expr == "*" else ",".join(
            _CRONTAB_DAYS[v] if name == "day_of_week" else str(v) for v in values)
    return fields


def _matches(field, w: datetime) -> bool:
    return field.get_next_value(w) == field.get_value(w)


_ALLOWED: dict[tuple, tuple[int, ...]] = {}   # (name, its expressions) -> its values


def _allowed(field, top: int) -> tuple[int, ...]:
    """The values in [0, top) a time-of-day field allows (none depends on the date), ascending;
    kept per field, which few schedules vary: a trigger is built at each ``get``. Keyed by its
    expressions, not its text: APScheduler prints "0-0/5" (minute 0) as "0/5" (every fifth)."""
    key = (field.name, tuple((type(e), *sorted(vars(e).items())) for e in field.expressions))
    if (known := _ALLOWED.get(key)) is not None:
        return known
    day, values = datetime(2000, 1, 1), []
    v = field.get_next_value(day)
    while v is not None:   # from one allowed value to the next
        values.append(v)
        v = field.get_next_value(day.replace(**{field.name: v + 1})) if v + 1 < top else None
    if len(_ALLOWED) < 4096:
        _ALLOWED[key] = tuple(values)
    return tuple(values)


def _offset_change(lo: int, hi: int, tz: tzinfo) -> int:
    """The first whole second in (lo, hi] whose UTC offset differs from lo's (a transition)."""
    before = datetime.fromtimestamp(lo, tz).utcoffset()   # (hi's is taken to differ)
    return lo + 1 + bisect.bisect(range(lo + 1, hi), False,
                                  key=lambda t: datetime.fromtimestamp(t, tz).utcoffset() != before)


def _existing(dt: datetime) -> datetime:
    """``dt``, or for a wall time a DST gap skips, the jump (where a fixed-time cron job runs
    too, docs/CRON.md). A repeated time is its first pass."""
    try:
        if dt.astimezone(UTC).astimezone(dt.tzinfo).replace(tzinfo=None) == \
                dt.replace(tzinfo=None):
            return dt
    except OverflowError:  # out of range in UTC: the caller says so, naming its field
        return dt
    lo, hi = sorted((dt.replace(fold=1).timestamp(), dt.replace(fold=0).timestamp()))
    return datetime.fromtimestamp(_offset_change(int(lo), math.ceil(hi), dt.tzinfo), dt.tzinfo)


class _CronTrigger(CronTrigger):
    """APScheduler's cron fields, with fire times found on wall-clock fields in the zone, then
    resolved to an instant as cron does across DST (docs/CRON.md). ``day_or``: day and
    day_of_week are ORed. ``wild``: the minute or hour starts with ``*`` (it fires in both
    passes of a repeated hour, and not in a gap)."""

    __slots__ = ("day_or", "wild", "crontab", "_by_name", "_day_fields", "_times")

    def __init__(self, *, crontab: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.crontab = crontab
        self._by_name = {f.name: f for f in self.fields}
        self.wild = any(str(self._by_name[n]).startswith("*") for n in ("hour", "minute"))
        self.day_or = False
        if crontab is not None:
            minute, hour, day, _, day_of_week = MACROS.get(crontab.strip().lower(), crontab).split()
            self.wild = hour.startswith("*") or minute.startswith("*")
            # crontab(5): day of month OR day of week when both are restricted (neither "*...")
            self.day_or = not (day.startswith("*") or day_of_week.startswith("*"))
        self._day_fields = [self._by_name[n] for n in ("week",) if str(self._by_name[n]) != "*"]
        self._times = [_allowed(self._by_name[n], top)
                       for n, top in (("hour", 24), ("minute", 60), ("second", 60))]

    def __str__(self) -> str:
        # the zone says when the calendar's times are (the next run is shown in local time)
        fields = (super().__str__()[5:-1] if self.crontab is None
                  else f"crontab='{self.crontab}'")
        return f"cron[{fields}, timezone='{self.timezone}']"

    def _day_ok(self, w: datetime) -> bool:
        dom, dow = _matches(self._by_name["day"], w), _matches(self._by_name["day_of_week"], w)
        if not ((dom or dow) if self.day_or else (dom and dow)):
            return False
        return all(_matches(f, w) for f in self._day_fields)

    def _time_on(self, w: datetime) -> datetime | None:
        """The first matching time of day at or after ``w`` on its day."""
        hours, minutes, seconds = self._times
        for h in hours[bisect.bisect_left(hours, w.hour):]:
            for m in minutes[bisect.bisect_left(minutes, w.minute) if h == w.hour else 0:]:
                i = bisect.bisect_left(seconds, w.second) if (h, m) == (w.hour, w.minute) else 0
                if i < len(seconds):
                    return w.replace(hour=h, minute=m, second=seconds[i])
        return None

    def next_wall(self, w: datetime, end: datetime | None = None) -> datetime | None:
        """The first matching naive wall-clock time at or after ``w`` (before ``end``)."""
        year, month = self._by_name["year"], self._by_name["month"]
        years = 0
        while years < _SEARCH_YEARS and (end is None or w < end):
            if (y := year.get_next_value(w)) is None:
                return None
            if y != w.year:
                w, years = datetime(y, 1, 1), years + 1
                continue
            if (m := month.get_next_value(w)) is None:
                if w.year == 9999:
                    return None
                w, years = datetime(w.year + 1, 1, 1), years + 1
                continue
            if m != w.month:
                w = datetime(w.year, m, 1)
                continue
            if self._day_ok(w) and (t := self._time_on(w)) is not None:
                return t if end is None or t < end else None
            if w.date() == date.max:
                return None
            nxt = datetime.combine(w.date() + timedelta(days=1), dtime())
            if not self.day_or:  # day ANDed: skip to its next value (none: the month's end)
                day = self._by_name["day"]
                nxt = nxt.replace(day=day.get_next_value(nxt) or day.get_max(nxt))
            years += nxt.year != w.year  # a year left day by day counts too
            w = nxt
        return None

    def _resolve(self, w: datetime) -> int | None:
        """Wall time -> instant: the first pass of a repeated time; for a time skipped by a
        gap, the jump itself (fixed-time jobs) or no fire (wildcard jobs, as cronie)."""
        first = w.replace(tzinfo=self.timezone)
        if first.astimezone(UTC).astimezone(self.timezone).replace(tzinfo=None) == w:
            return int(first.timestamp())
        if self.wild:
            return None
        return _offset_change(int(w.replace(tzinfo=self.timezone, fold=1).timestamp()),
                              int(first.timestamp()), self.timezone)

    def next_instant(self, s: int) -> int | None:
        """The first fire time at or after whole second ``s`` (epoch), without jitter."""
        if s >= _END:
            return None
        try:
            tz = self.timezone
            local = datetime.fromtimestamp(s, tz)
            w = local.replace(tzinfo=None)
            before = datetime.fromtimestamp(s - 1, tz)
            if before.utcoffset() < local.utcoffset():  # s is the jump out of a DST gap: the
                w = before.replace(tzinfo=None) + _SECOND  # gap's wall times resolve to s
            other = local.replace(fold=1 - local.fold)
            if other.utcoffset() != local.utcoffset():  # s lies in a repeated hour
                p0, p1 = sorted((int(local.timestamp()), int(other.timestamp())))
                change = _offset_change(p0, p1, tz)
                start = datetime.fromtimestamp(change, tz).replace(tzinfo=None)  # repeat begins
                end = start + (p1 - p0) * _SECOND                                # repeat ends
                if local.fold == 0:  # the rest of the first pass, then (wildcard) the second
                    passes = [(w, 0), (start, 1)] if self.wild else [(w, 0)]
                else:  # in the second pass only wildcard jobs fire
                    passes = [(w, 1)] if self.wild else []
                for begin, fold in passes:
                    if (hit := self.next_wall(begin, end)) is not None:
                        return int(hit.replace(tzinfo=tz, fold=fold).timestamp())
                w = end
            while (hit := self.next_wall(w)) is not None:
                if (t := self._resolve(hit)) is not None:
                    return t
                w = hit + _SECOND
        except OverflowError:  # a time late in 9999 that is in 10000 in UTC or in the zone
            pass
        return None

    def get_next_fire_time(self, previous_fire_time, now):
        if previous_fire_time is not None:  # strictly after the previous fire
            s = math.floor(previous_fire_time.timestamp()) + 1
            if self.start_date is not None:  # a fire run early (run_job) keeps start_date
                s = max(s, math.ceil(self.start_date.timestamp()))
        else:
            start = max(now, self.start_date) if self.start_date else now
            s = math.ceil(start.timestamp())
        t = self.next_instant(s)
        return None if t is None else _jittered(self, t)


@lru_cache(maxsize=1024)   # many jobs share a crontab; jitter spreads them
def _closest_fires(data: str, hour: int) -> tuple[int, int] | None:
    """The two fires closest together among the first CRON_GAP_FIRES (without jitter, not
    past end_date) from ``hour`` on, of the cron ``data`` (normalized JSON: a cache key)."""
    trigger = _parse(json.loads(data), hour)[0]
    start = trigger.start_date.timestamp() if trigger.start_date else hour
    end = trigger.end_date.timestamp() if trigger.end_date else math.inf
    t, best = trigger.next_instant(math.ceil(max(hour, start))), None
    for _ in range(CRON_GAP_FIRES):
        if t is None or (nxt := trigger.next_instant(t + 1)) is None or nxt > end:
            break
        if best is None or nxt - t < best[1] - best[0]:
            best = (t, nxt)
        t = nxt
    return best


def _never_fires(trigger: _CronTrigger, now: float) -> TriggerError:
    """Why a cron trigger has no fire after ``now``, naming the field when one alone says."""
    end, f = trigger.end_date, trigger._by_name
    if end is not None and end.timestamp() < now:
        return TriggerError("trigger.end_date", f"{end.isoformat()} is in the past; "
                                                "this cron never fires")
    if str(f["year"]) != "*" and f["year"].get_next_value(
            datetime.fromtimestamp(now, trigger.timezone).replace(tzinfo=None)) is None:
        return TriggerError("trigger.year", f"{f['year']} is in the past; this cron never fires")
    start = trigger.start_date
    if end is not None and (t := trigger.next_instant(math.ceil(max(
            now, start.timestamp() if start else now)))) is not None:  # it fires, after end
        nxt = datetime.fromtimestamp(t, trigger.timezone).isoformat()
        return TriggerError("trigger.end_date", f"{end.isoformat()} comes before the next fire "
                                                f"({nxt}); this cron never fires")
    if start is not None and start.timestamp() > now and trigger.next_instant(math.ceil(now)) \
            is not None:  # the fields match times, but none from start_date on
        return TriggerError("trigger.start_date", f"{start.isoformat()} comes after the last "
                                                  "fire; this cron never fires")
    days_only = all(type(e) in (RangeExpression, AllExpression) for e in f["day"].expressions)
    if days_only and (not trigger.day_or or str(f["day_of_week"]) == "*"):
        months = [m for m in range(1, 13) if _matches(f["month"], datetime(2000, m, 1))]
        if all(f["day"].get_next_value(datetime(2000, m, 1)) is None for m in months):
            names = " or ".join(_MONTH_NAMES[m - 1] for m in months)
            return TriggerError("trigger.day", f"{names} {'has' if len(months) == 1 else 'have'} "
                                               f"no day {f['day']}; this cron never fires")
    where = "trigger" if trigger.crontab is None else "trigger.crontab"
    return TriggerError(where, "no date and time matches all fields; this cron never fires")


def _cron_fields(data: dict) -> dict[str, str]:
    """The APScheduler cron fields of ``data`` (a crontab or separate fields), each checked."""
    crontab, given = data.get("crontab"), [n for n in CRON_FIELDS if data.get(n) is not None]
    if crontab is not None:
        if given:
            raise TriggerError("trigger.crontab", f"cannot be combined with {', '.join(given)}")
        if not isinstance(crontab, str):
            raise TriggerError("trigger.crontab",
                               f"expected a string like '*/15 * * * *', got {crontab!r}")
        return _crontab_fields(crontab)   # (explicit values, each in its field's range)
    fields = {}
    for name in given:  # one field at a time, so the error names it
        if isinstance(value := data[name], bool) or not isinstance(value, (int, str)):
            raise TriggerError(f"trigger.{name}", f"expected an int or a string, got {value!r}")
        fields[name] = expr = str(value)
        try:
            CronTrigger.FIELDS_MAP[name](name, expr)
        except ValueError as exc:
            raise TriggerError(f"trigger.{name}", f"{name} {expr!r}: {exc}") from None
    return fields


def parse_trigger(data: dict, *, now: float | None = None) -> tuple[BaseTrigger, dict]:
    """Validate ``data``; return (APScheduler trigger, normalized dict to store).

    An interval without start_date starts one interval after ``now`` (default: the wall
    clock), stored so every master computes the same fire times. A cron or interval that
    never fires after ``now`` is refused. Normalized data parses to itself.
    """
    now = time.time() if now is None else now
    trigger, normalized = _parse(data, now)
    if _zone_names().get((zone := normalized["timezone"]).lower()) != zone:
        # localtime: each host's own (masters would disagree); right/: leap seconds, misread
        raise TriggerError("trigger.timezone", f"{zone!r} is no IANA zone, but a file beside "
                                               "them; name one, like 'Europe/Berlin'")
    length = getattr(trigger, "interval_length", None)
    if length is not None and (trigger.jitter or 0) > length:
        # the next fire is the grid point after the last one's jittered time, not one it passed
        raise TriggerError("trigger.jitter", f"{trigger.jitter:g}s is longer than the interval "
                                             f"({length:g}s): fires would be dropped")
    try:  # jittered fire times must still be dates (checked here: stored ones still build)
        datetime.fromtimestamp(now + (getattr(trigger, "jitter", None) or 0), UTC)
    except (OverflowError, OSError, ValueError):
        raise TriggerError("trigger.jitter", f"{trigger.jitter!r} is out of range: fires "
                                             "would come after the year 9999") from None
    if isinstance(trigger, _CronTrigger) and trigger.jitter and (gap := _closest_fires(json.dumps(
            {**normalized, "jitter": 0}, sort_keys=True), int(now // 3600 * 3600))) \
            and trigger.jitter > gap[1] - gap[0]:
        # the next fire is the first time after the last one's jittered time: as interval's
        a, b = (datetime.fromtimestamp(t, trigger.timezone).isoformat() for t in gap)
        raise TriggerError("trigger.jitter", f"{trigger.jitter:g}s is longer than the shortest "
                                             f"gap between its fires ({gap[1] - gap[0]}s, {a} "
                                             f"to {b}): fires would be dropped")
    if not isinstance(trigger, DateTrigger) and next_fire(trigger, now, first=True) is None:
        if isinstance(trigger, _CronTrigger):
            raise _never_fires(trigger, now)
        if trigger.end_date is None:  # no end: its first fire is past the year 9999 in UTC
            raise TriggerError("trigger.start_date", f"{trigger.start_date.isoformat()} is out "
                                                     "of range: the first fire would come after "
                                                     "the year 9999 in UTC")
        raise TriggerError("trigger.end_date", f"{trigger.end_date.isoformat()} comes before "
                                               "the next fire; this interval never fires")
    if normalized["type"] == "cron" and not set(normalized) & {"crontab", *CRON_FIELDS}:
        # APScheduler's CronTrigger() fires every second; a stored one still builds
        raise TriggerError("trigger.crontab", "required: a crontab like '*/15 * * * *', or "
                                              f"fields ({', '.join(CRON_FIELDS)})")
    return trigger, normalized


def _parse(data: dict, now: float) -> tuple[BaseTrigger, dict]:
    if not isinstance(data, dict):
        raise TriggerError("trigger", f"expected a map with a 'type', got {type(data).__name__}")
    kind = data.get("type")
    if not isinstance(kind, str) or kind not in ALLOWED:   # (a list or map would not hash)
        raise TriggerError("trigger.type", f"expected 'cron', 'interval' or 'date', got {kind!r}")
    if unknown := sorted(str(k) for k in data if k not in ALLOWED[kind]):
        known = sorted(ALLOWED[kind] - {"type"})
        close = difflib.get_close_matches(unknown[0], known, n=1)   # every(minute=15)
        article = "an" if kind == "interval" else "a"
        raise TriggerError(f"trigger.{unknown[0]}", f"unknown field for {article} {kind} "
                           "trigger; " + (f"did you mean {close[0]}?" if close else
                                          f"known fields: {', '.join(known)}"))
    zone_name, tz = _zone(data.get("timezone") or "UTC")
    start, end = _datetime(data, "start_date", tz), _datetime(data, "end_date", tz)
    jitter = _number(data, "jitter")

    if kind == "date":
        if (run_date := _datetime(data, "run_date", tz)) is None:
            raise TriggerError("trigger.run_date", "required (ISO 8601 date-time)")
        try:  # a fire time is shown and named in UTC
            run_date.astimezone(UTC)
        except OverflowError:
            raise TriggerError("trigger.run_date", f"{data['run_date']!r} is out of range "
                                                   "(years 1 to 9999 in UTC)") from None
        trigger, fields = DateTrigger(run_date=run_date, timezone=tz), {"run_date": run_date}
    elif kind == "interval":
        fields = {u: _number(data, u) for u in INTERVAL_UNITS if data.get(u) is not None}
        try:
            length = timedelta(**fields)
            if start is None:  # APScheduler's default, made explicit so it survives restarts
                start = (datetime.fromtimestamp(now, UTC) + length).astimezone(tz)
        except OverflowError:
            raise TriggerError("trigger.interval", "too long: its fires would come after the "
                                                   "year 9999") from None
        if length.total_seconds() <= 0:
            raise TriggerError("trigger.interval",
                               "weeks + days + hours + minutes + seconds must be more than zero")
        trigger = _IntervalTrigger(**fields, start_date=start, end_date=end, timezone=tz,
                                   jitter=jitter)
    else:
        fields, crontab = _cron_fields(data), data.get("crontab")
        trigger = _CronTrigger(**fields, start_date=start, end_date=end, timezone=tz,
                               jitter=jitter, crontab=crontab)
        if crontab is not None:  # stored as written, not as APScheduler fields
            fields = {"crontab": crontab}

    if data.get("start_date") is not None and end is not None and end < start:
        raise TriggerError("trigger.end_date",
                           f"{end.isoformat()} is before start_date {start.isoformat()}")
    out = {"type": kind, **fields, "start_date": start, "end_date": end, "timezone": zone_name,
           "jitter": jitter}
    return trigger, {k: _plain(v) for k, v in out.items() if v is not None and v != 0}


def build_trigger(data: dict) -> BaseTrigger:
    """The trigger for a normalized (stored) dict; never refuses one that no longer fires."""
    return _parse(data, time.time())[0]


def next_fire(trigger: BaseTrigger, t: float, *, first: bool = False) -> float | None:
    """The fire time after a fire at ``t`` (``first``: the first fire at or after ``t``), in
    epoch seconds; None: none left."""
    dt = datetime.fromtimestamp(t, UTC)
    try:
        nxt = trigger.get_next_fire_time(None if first else dt, dt)
    except OverflowError:  # a jittered fire past the year 9999
        return None
    return None if nxt is None else nxt.timestamp()


def _plain(value: Any) -> Any:
    if isinstance(value, tzinfo):  # taken by _zone, but a spec must be msgpack data
        return _zone(value)[0]
    return value.isoformat() if isinstance(value, datetime) else value


def _checked(kind: str, fields: dict) -> dict:
    data = {"type": kind, **{k: _plain(v) for k, v in fields.items() if v is not None}}
    try:   # fail here, where the caller wrote the trigger
        parse_trigger(data)
    except TriggerError as exc:
        # unless it fires at some time: the master judges what is left, by Redis's clock
        try:
            parse_trigger(data, now=0.0)
        except TriggerError:
            raise exc from None
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
