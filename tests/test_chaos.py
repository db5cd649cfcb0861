"""The fault run (bench/chaos.py): its short form under CI, and its checker on a history
made by hand, so a checker that misses a lost job or a doubled fire fails here."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from bench.chaos import LIMITS, Report, check
from elric.codec import pack
from elric.keys import Keys
from bench.ports import CHAOS_BAND, band, ephemeral_ports
from elric.scheduler import fire_id
from tests.conftest import ROOT
from tests.procs import run_group

KEYS = Keys("elric")


def test_the_checker_finds_lost_jobs_lost_fires_and_doubled_fires(redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    start = 1_800_000_000.0   # tick1 fires every second from here, tick3 every 3 s
    starts = {"tick1": start, "tick3": start}
    for job_id in ("j1", "j2", fire_id("tick1", start), fire_id("tick1", start + 2),
                   fire_id("tick3", start), fire_id("tick3", start + 3),
                   fire_id("tick3", start + 4)):   # start + 4 is off tick3's grid
        r.hset(KEYS.job(job_id), "status", "succeeded")
    r.hset(KEYS.job("j3"), "status", "running")   # never ends: lost
    # tick1 at start + 1 has no job, but its schedule recorded it as missed: not lost
    r.rpush(KEYS.schedule_runs("tick1"), pack({"job_id": fire_id("tick1", start + 1),
                                               "outcome": "missed"}))
    run_log = tmp_path / "runs.log"
    run_log.write_text("start j1 1 10\nend j1 1 10\nstart j1 2 11\nend j1 2 11\n"
                       "start j2 1 10\nend j2 1 10\nstart j2 1 12\nend j2 1 12\n")
    report = Report(1, {})
    check(r, KEYS, report, ["j1", "j2", "j3", "j4"], starts, start + 3.5, str(run_log),
          drain=0)
    assert (report.accepted, report.ended, report.failed) == (4, 2, 0)
    assert report.lost_jobs == ["j3", "j4"]
    assert (report.fires_due, report.fires_queued, report.fires_not_run) == (6, 4, 1)
    assert report.lost_fires == [fire_id("tick1", start + 3)]
    assert report.doubled_fires == [fire_id("tick3", start + 4)]
    assert report.run_twice == 2
    assert report.doubled_runs == ["j2 attempt 1"]        # one claim run to its end twice
    # every fire job marked succeeded here never wrote a run: succeeded without a run
    assert report.phantoms == [fire_id("tick1", start), fire_id("tick1", start + 2),
                               fire_id("tick3", start), fire_id("tick3", start + 3)]
    assert not report.passed and report.table().endswith("result: FAIL")
    r.close()


def test_the_mix_checker_finds_lost_children_keys_run_twice_and_limits_exceeded(
        redis_url, tmp_path):
    r = redis.Redis.from_url(redis_url)
    for job_id in ("p1", "p2", "a1", "a2", "d1"):
        r.hset(KEYS.job(job_id), "status", "succeeded")
    r.hset(KEYS.job("b1"), "status", "running")            # accepted, never ends: lost
    children = {"a1": ("p1", ""), "a2": ("p1", "s"),
                "b1": ("p2", ""), "b2": ("p2", "s"),       # b2 filtered: s is a2's
                "c1": ("p2", "t"),                         # t taken, no child of it: lost
                "d1": ("p1", "u"), "d2": ("p2", "u")}      # d2 filtered, yet ran
    lines = ["start p1 1 9 0 1.0 -", "end p1 1 9 0 1.1 -", "start p2 1 9 0 1.0 -",
             "end p2 1 9 0 1.1 -"]
    for job_id, key in (("a1", "-"), ("a2", "s"), ("d1", "u"), ("d2", "u")):
        lines += [f"start {job_id} 1 9 0 2.0 D={key}", f"end {job_id} 1 9 0 2.1 D={key}"]
    # ka (2 at once): three different jobs at 3.5, no fault: a breach
    lines += ["start l1 1 9 0 3.0 L=ka", "start l2 1 9 0 3.2 L=ka", "start l3 1 9 0 3.5 L=ka",
              "end l1 1 9 0 4.0 L=ka", "end l2 1 9 0 4.0 L=ka", "end l3 1 9 0 4.0 L=ka"]
    # kb: m1's first attempt was killed (no end) and redelivered at 9.0; m2 and m3 beside
    # it are explained, and nothing overlaps its second attempt
    lines += ["start m1 1 9 0 5.0 L=kb", "start m2 1 9 0 6.0 L=kb", "start m3 1 9 0 6.5 L=kb",
              "end m2 1 9 0 7.0 L=kb", "end m3 1 9 0 7.0 L=kb", "start m1 2 8 0 9.0 L=kb",
              "end m1 2 8 0 9.5 L=kb"]
    run_log = tmp_path / "runs.log"
    run_log.write_text("\n".join(lines) + "\n")
    report = Report(1, {})
    check(r, KEYS, report, ["p1", "p2"], {}, 0, str(run_log), drain=0, children=children,
          limits=LIMITS)
    assert (report.children, report.children_accepted) == (7, 4)
    assert sorted(report.lost_children) == ["b1", "t"]
    assert report.doubled_dedupe == ["u"]
    assert report.limit_breaches == ["ka at 3.500: l1#1 l2#1 l3#1"]
    assert report.limit_explained == 1
    assert report.phantoms == [] and not report.passed
    r.close()


# chaos.run in a process of its own (conftest's free_port does not apply there, as under
# CI), up to its supervisor's start: the ports its Redis and masters were given
PORTS_OF_A_RUN = """
import sys
import tempfile
import bench.chaos as chaos
from elric.redis_server import RedisServer

tempfile.tempdir = sys.argv[1]   # the fake Redis's folder
ports = []
class Server(RedisServer):
    def start(self, timeout=10.0):
        ports.append(self.port)
        return self
    def stop(self, kill=False):
        pass
class Slot(chaos.Slot):
    def start(self):
        if self.role == "master":
            ports.append(int(self.env["ELRIC_MASTER_ADDRESS"].rpartition(":")[2]))
def stop(slots):
    raise SystemExit(" ".join(map(str, ports)))
chaos.RedisServer, chaos.Slot, chaos.Supervisor = Server, Slot, stop
chaos.run(1, 0, 0, sys.argv[1])
"""


def test_the_fault_runs_ports_are_none_a_connection_or_a_test_beside_it_can_take(tmp_path):
    """Its Redis and masters are restarted on their ports after a kill: one in the kernel's
    ephemeral range may meanwhile be any connection's local port on the machine (a CI run
    failed so), one in a test process's band a port that test starts a master on."""
    proc = subprocess.run([sys.executable, "-c", PORTS_OF_A_RUN, str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    ports = [int(p) for p in proc.stderr.split()[-3:]]
    assert len(set(ports)) == 3, proc.stderr
    low, high = ephemeral_ports()
    assert not [p for p in ports if low <= p <= high], ports
    assert all(p in band(CHAOS_BAND) for p in ports), ports


def test_the_port_bands_lie_apart_below_the_ephemeral_range():
    from bench.ports import TEST_BANDS, band_port

    bands = [band(n) for n in range(TEST_BANDS + 1)]
    assert all(a.stop <= b.start for a, b in zip(bands, bands[1:]))
    assert bands[-1].stop <= ephemeral_ports()[0] and len(bands[0]) >= 1000
    handed = [band_port(CHAOS_BAND) for _ in range(50)]
    assert len(set(handed)) == 50 and all(p in bands[-1] for p in handed)


def test_a_short_fault_run_loses_nothing_and_doubles_no_fire(tmp_path):
    """60 s of faults against real masters, workers and Redis (the README runs it for ten
    minutes), with the mix: async jobs under limit keys, children with dedupe keys."""
    # a group of its own: on a timeout its redis-servers, masters and workers go with it
    proc = run_group(
        [sys.executable, os.path.join(ROOT, "bench", "chaos.py"), "--seconds", "60",
         "--mix", "--keep", str(tmp_path)], timeout=400, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "result: PASS" in out, out
    assert "lost job" not in out and "doubled fire:" not in out, out
    assert "| dedupe keys run twice          |                                  0 |" in out, out
    faults = out.split("s of faults: ")[1].splitlines()[0]
    assert faults != "none", out
