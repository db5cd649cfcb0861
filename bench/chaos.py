"""The fault run: elric under a steady load while a nemesis breaks things, then a checker.

Two masters and two workers (real processes) share a Redis (appendfsync always) on a free
port. A load thread submits one-off jobs, alternating masters and resending a batch with
the same ids until a master answers; two periodic jobs fire every 1 s and every 3 s. Every
few seconds the nemesis picks one fault at random:

- SIGKILL a worker, or a master;
- SIGSTOP a worker past LEASE_SECONDS, or a master past SCHEDULER_LEASE, then SIGCONT;
- SIGKILL Redis and start it again on the same files;
- fill Redis to its maxmemory (noeviction) for a few seconds;
- restart a master or a worker with its clock 2 minutes off (libfaketime).

A supervisor restarts whatever exits, as systemd would. When the time is up the faults
stop, and the checker waits for every accepted job and every due fire to end, reads the
whole history (the jobs in Redis, the schedules' runs, the log each run writes) and prints
a table. It exits 0 when no accepted job and no due fire was lost and no fire was doubled.

``--mix`` adds async jobs under limit keys (LIMITS) and parents of children with dedupe
keys; the checker then also proves every accepted child ended, no dedupe key ran two
children and no limit was exceeded but beside an attempt whose lease was lost.

    .venv/bin/python bench/chaos.py --seconds 600      # ten minutes (docs/FAULT_RUN.md)
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import redis

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.chaos_jobs import RUN_LOG, Limited, Logged, Parent  # noqa: E402
from elric.client import MasterClient  # noqa: E402
from elric.codec import unpack  # noqa: E402
from elric.contract import Status  # noqa: E402
from elric.job import _child_job_id  # noqa: E402
from elric.jobstore import Outcome  # noqa: E402
from elric.keys import Keys  # noqa: E402
from elric.launch import Proc, elric_env, faketime_lib, start_master, start_worker  # noqa: E402
from bench.ports import CHAOS_BAND, band_port  # noqa: E402
from elric.redis_server import RedisServer  # noqa: E402
from elric.rpc import RemoteError, RPCConnectionError  # noqa: E402
from elric.scheduler import fire_id  # noqa: E402
from elric.triggers import every  # noqa: E402

LEASE = 3.0             # LEASE_SECONDS and SCHEDULER_LEASE: faults last a few of these
SCHEDULES = {"tick1": 1, "tick3": 3}     # periodic job id -> interval in seconds
ENDED = {s.value.encode() for s in Status if s.ended}   # as Redis gives them
SETTINGS = {"JOB_MODULES": "bench.chaos_jobs", "LEASE_SECONDS": LEASE,
            "SCHEDULER_LEASE": LEASE, "RETRY_BACKOFF": 0.2, "RETRY_BACKOFF_MAX": 2,
            "LOG_LEVEL": "INFO"}
# --mix: async jobs under these limit keys, and parents of children with dedupe keys
LIMITS = {"ka": {"concurrency": 2}, "kb": {"concurrency": 2}, "kc": {"concurrency": 3}}
SHARED_BY = 3   # parents in a row whose second child has one dedupe key: all but one filtered


@dataclass
class Slot:
    """One supervised process: what to start, and the one running now."""

    role: str                 # "master" or "worker"
    name: str
    env: dict
    log_path: str
    proc: Proc | None = None
    skew: str = ""            # FAKETIME for its next start ("+120s"), "" for the real clock
    paused: bool = False
    pending: bool = False     # its last start failed: started again on the next round
    starts: int = 0
    exits: list[int] = field(default_factory=list)   # exit codes, in order

    def start(self) -> None:
        env = dict(self.env)
        if self.skew:   # the wall clock only, as on a host without NTP: the monotonic
            # clock is never compared across hosts, and faking it hangs time.sleep
            env.update(LD_PRELOAD=faketime_lib(), FAKETIME=self.skew,
                       FAKETIME_DONT_FAKE_MONOTONIC="1")
        launch = start_master if self.role == "master" else start_worker
        extra = [] if self.role == "master" else ["--concurrency", "2"]
        self.proc = launch(env, self.log_path, cwd=ROOT, extra=extra)
        self.starts += 1


class Supervisor:
    """Restarts any process that exits, half a second later (systemd's Restart=always)."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots, self.lock = slots, threading.Lock()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            with self.lock:
                for slot in self.slots:
                    if slot.pending or (slot.proc is not None and not slot.proc.alive()):
                        if slot.proc is not None:
                            slot.exits.append(slot.proc.popen.returncode)
                        slot.proc, slot.pending = None, False
                        try:
                            slot.start()
                        except RuntimeError as exc:   # it exited as it started: shown
                            slot.pending = True
                            slot.exits.append(str(exc).splitlines()[0])

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():
            self.thread.join()
        for slot in self.slots:
            if slot.proc is not None:
                slot.proc.signal(signal.SIGCONT)
                slot.proc.stop(timeout=20)


class Load:
    """Submits one-off jobs in small batches; a batch is resent, same ids, until accepted."""

    def __init__(self, addresses: list[str], rng: random.Random, mix: bool = False) -> None:
        self.clients = [MasterClient(a, timeout=5) for a in addresses]
        self.rng, self.accepted, self.resent, self.mix = rng, [], 0, mix
        self.children: dict[str, list[str]] = {}   # parent -> its children's dedupe keys
        self.parents = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.error: BaseException | None = None

    def _loop(self) -> None:
        n, turn = 0, 0
        try:
            while not self._stop.is_set():
                batch = [Logged.spec([self.rng.choice((0, 0.02, 0.1))], job_id=f"j{n + i:06d}")
                         for i in range(3 if self.mix else 5)]
                n += len(batch)
                if self.mix:
                    batch += self._mix(n)
                    n += 3
                while True:   # until a master answers: an accepted job is never given up
                    turn += 1
                    try:
                        self.clients[turn % len(self.clients)].submit_jobs(batch)
                        break
                    except RPCConnectionError:
                        pass
                    except RemoteError as exc:
                        if exc.code != "redis_unavailable":
                            raise
                    self.resent += 1
                    time.sleep(0.2)
                self.accepted += [s["job_id"] for s in batch]
                self._stop.wait(0.1)
        except BaseException as exc:   # reported by the checker: the run fails
            self.error = exc

    def _mix(self, n: int) -> list[dict]:
        """Two async jobs of a limit key and a parent of three children: one without a
        dedupe key, one with a key SHARED_BY parents share, one with a key of its own."""
        # now and then one outlasting a lease: a worker paused meanwhile loses it, and the
        # job runs again beside it
        batch = [Limited.spec([self.rng.choice(sorted(LIMITS)),
                               self.rng.choice((0.05, 0.2, 0.4) * 20 + (LEASE + 2,))],
                              job_id=f"l{n + i:06d}")
                 for i in range(2)]
        parent = f"p{n + 2:06d}"
        keys = ["", f"shared{self.parents // SHARED_BY}", f"own{parent}"]
        self.parents += 1
        self.children[parent] = keys
        return batch + [Parent.spec([keys], job_id=parent)]

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=120)


class Nemesis:
    """Picks a fault every few seconds; the ones that last are undone by a timer."""

    def __init__(self, slots: list[Slot], server: RedisServer, rng: random.Random) -> None:
        self.slots, self.server, self.rng = slots, server, rng
        self.faults: collections.Counter[str] = collections.Counter()
        self.undo: list[tuple[threading.Timer, object]] = []
        self.faketime = faketime_lib()
        self.redis_lock = threading.Lock()   # a fill and a restart never overlap

    def choices(self) -> list:
        found = [self.kill, self.pause, self.restart_redis, self.fill_redis]
        return found + [self.skew] if self.faketime else found

    def strike(self) -> None:
        fault = self.rng.choice(self.choices())
        self.faults[fault(self.rng.choice(("master", "worker")))] += 1

    def _pick(self, role: str) -> Slot | None:
        ready = [s for s in self.slots if s.role == role and not s.paused and s.proc
                 and s.proc.alive()]
        return self.rng.choice(ready) if ready else None

    def _later(self, seconds: float, undo) -> None:
        """Run ``undo`` once: after ``seconds``, or at calm(), whichever comes first."""
        done = threading.Lock()

        def once():
            if done.acquire(blocking=False):
                undo()
        timer = threading.Timer(seconds, once)
        timer.daemon = True
        self.undo.append((timer, once))
        timer.start()

    def kill(self, role: str) -> str:
        slot = self._pick(role)
        if slot:
            slot.skew = ""
            slot.proc.signal(signal.SIGKILL)
        return f"SIGKILL {role}"

    def pause(self, role: str) -> str:
        slot = self._pick(role)
        if slot:
            slot.paused = True
            slot.proc.signal(signal.SIGSTOP)

            def resume(proc=slot.proc):
                proc.signal(signal.SIGCONT)
                slot.paused = False
            self._later(LEASE + self.rng.uniform(1, 3), resume)
        return f"SIGSTOP {role} past its lease"

    def skew(self, role: str) -> str:
        slot = self._pick(role)
        if slot:
            slot.skew = self.rng.choice(("+120", "-120"))
            slot.proc.signal(signal.SIGKILL)   # the supervisor starts it under the skew
        return f"restart {role} with its clock 2 min off"

    def restart_redis(self, _role: str) -> str:
        with self.redis_lock:
            self.server.stop(kill=True)
            time.sleep(self.rng.uniform(0.5, 3))   # the nemesis waits; everything else runs
            self.server.start()
        return "SIGKILL Redis and start it again"

    def fill_redis(self, _role: str) -> str:
        if not self.redis_lock.acquire(blocking=False):
            return "fill Redis skipped (Redis busy with another fault)"
        r, n = redis.Redis.from_url(self.server.url), 0
        try:
            used = r.info("memory")["used_memory"]
            r.config_set("maxmemory", used + 4_000_000)
            r.config_set("maxmemory-policy", "noeviction")
            chunk = b"x" * 100_000
            while n < 1000:
                try:
                    r.set(f"chaos:fill:{n}", chunk)
                except redis.exceptions.ResponseError:   # OOM: it is full
                    break
                n += 1
        except redis.exceptions.RedisError:
            pass
        finally:
            r.close()

        def empty(count=n):
            try:
                with redis.Redis.from_url(self.server.url) as again:
                    if count:
                        again.delete(*(f"chaos:fill:{i}" for i in range(count)))
                    again.config_set("maxmemory", 0)
            except redis.exceptions.RedisError:
                pass   # restarted meanwhile: it came back without the limit
            finally:
                self.redis_lock.release()
        self._later(self.rng.uniform(2, 6), empty)
        return "fill Redis to maxmemory"

    def calm(self) -> None:
        """Undo whatever still lasts: resume the paused, empty Redis."""
        for timer, once in self.undo:
            timer.cancel()
            once()


@dataclass
class Report:
    seconds: float
    faults: dict
    accepted: int = 0
    ended: int = 0
    failed: int = 0
    lost_jobs: list = field(default_factory=list)
    fires_due: int = 0
    fires_queued: int = 0
    fires_not_run: int = 0       # recorded as missed or skipped: not lost
    lost_fires: list = field(default_factory=list)
    doubled_fires: list = field(default_factory=list)
    doubled_runs: list = field(default_factory=list)    # one claim (job, attempt) ended twice
    phantoms: list = field(default_factory=list)        # succeeded, yet never ran
    run_twice: int = 0
    restarts: int = 0
    unasked_exits: list = field(default_factory=list)
    errors: collections.Counter = field(default_factory=collections.Counter)
    details: dict = field(default_factory=dict)   # lost job id -> its hash in Redis
    load_error: str = ""
    mix: bool = False
    children: int = 0                # children of succeeded parents
    children_accepted: int = 0       # of them, with a record (the rest were filtered)
    lost_children: list = field(default_factory=list)   # accepted and not ended, or a
    # dedupe key taken with no child of it accepted
    doubled_dedupe: list = field(default_factory=list)  # a dedupe key two children ran under
    limit_breaches: list = field(default_factory=list)  # more jobs of a key at once than
    # its limit, no fault explaining it
    limit_explained: int = 0         # the same, beside an attempt whose lease was lost

    @property
    def passed(self) -> bool:
        return not (self.lost_jobs or self.lost_fires or self.doubled_fires or
                    self.doubled_runs or self.phantoms or self.load_error or
                    self.lost_children or self.doubled_dedupe or self.limit_breaches or
                    # no child seen is a checker that looked for the wrong ids
                    (self.mix and not self.children_accepted))

    def table(self) -> str:
        faults = ", ".join(f"{k} {v}" for k, v in sorted(self.faults.items()))
        rows = [
            ("jobs accepted", self.accepted),
            ("  with an outcome", f"{self.ended} ({self.failed} failed)"),
            ("  lost", len(self.lost_jobs)),
            ("fires due", self.fires_due),
            ("  queued", self.fires_queued),
            ("  missed or skipped (recorded)", self.fires_not_run),
            ("  lost", len(self.lost_fires)),
            ("  doubled", len(self.doubled_fires)),
            ("jobs run more than once", f"{self.run_twice} (after a kill, pause or outage)"),
            ("  one attempt run twice", len(self.doubled_runs)),
            ("succeeded without a run", len(self.phantoms)),
        ]
        if self.mix:
            rows += [
                ("children of succeeded parents", self.children),
                ("  accepted (others filtered)", self.children_accepted),
                ("  lost", len(self.lost_children)),
                ("dedupe keys run twice", len(self.doubled_dedupe)),
                ("limit exceeded, no fault", len(self.limit_breaches)),
                ("  beside a lease-lost attempt", self.limit_explained),
            ]
        rows += [
            ("process restarts", self.restarts),
            ("ERROR lines in the logs", sum(self.errors.values())),
        ]
        lines = [f"fault run: {self.seconds:.0f} s of faults: {faults or 'none'}"]
        lines += [f"| {name:<30} | {value!s:>34} |" for name, value in rows]
        for what, ids in (("lost job", self.lost_jobs), ("lost fire", self.lost_fires),
                          ("doubled fire", self.doubled_fires),
                          ("attempt run twice", self.doubled_runs),
                          ("succeeded without a run", self.phantoms),
                          ("lost child", self.lost_children),
                          ("dedupe key run twice", self.doubled_dedupe),
                          ("limit exceeded", self.limit_breaches)):
            lines += [f"{what}: {i} {self.details.get(i, '')}" for i in ids[:20]]
        lines += [f"{n} x {text}" for text, n in self.errors.most_common(5)]
        if self.unasked_exits:
            lines.append(f"exits the nemesis did not cause: {self.unasked_exits}")
        if self.load_error:
            lines.append(f"the load stopped: {self.load_error}")
        lines.append("result: " + ("PASS" if self.passed else "FAIL"))
        return "\n".join(lines)


def _statuses(r: redis.Redis, keys: Keys, ids: list[str]) -> dict[str, bytes | None]:
    pipe = r.pipeline(transaction=False)
    for job_id in ids:
        pipe.hget(keys.job(job_id), "status")
    return dict(zip(ids, pipe.execute()))


def children_of(r: redis.Redis, keys: Keys, parents: dict[str, list[str]],
                deadline: float) -> dict[str, tuple[str, str]]:
    """Child id -> (parent, dedupe key). A child's id names its parent's submission (the
    parent's enqueued_at), known once the parent is queued; one never queued has none."""
    while True:
        try:
            pipe = r.pipeline(transaction=False)
            for parent in parents:
                pipe.hget(keys.job(parent), "enqueued_at")
            queued_at = pipe.execute()
            break
        except redis.exceptions.RedisError:   # back from a fault by now, or soon
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return {_child_job_id(parent, i, int(at)): (parent, key)
            for (parent, dedupe_keys), at in zip(parents.items(), queued_at) if at is not None
            for i, key in enumerate(dedupe_keys)}


def _due_fires(starts: dict[str, float], until: float) -> dict[str, str]:
    """fire id -> schedule, for every fire time of each schedule up to ``until``."""
    due = {}
    for job_id, start in starts.items():
        t = start
        while t <= until:
            due[fire_id(job_id, t)] = job_id
            t += SCHEDULES[job_id]
    return due


def check_children(report: Report, status: dict, children: dict, run_log: str) -> None:
    """Every child the master accepted ended; a dedupe key taken has one child of it
    accepted, and only that one ran (reruns of its id aside)."""
    groups = collections.defaultdict(list)   # dedupe key (or the child id) -> child ids
    succeeded = set()
    for cid, (parent, key) in children.items():
        groups[key or cid].append(cid)
        if status.get(parent) == b"succeeded":
            succeeded.add(key or cid)
    ran = collections.defaultdict(set)   # dedupe key -> child ids that ran to their end
    with open(run_log, encoding="utf-8") as f:
        for line in f:
            kind, job_id, *rest = line.split()
            if kind == "end" and len(rest) == 5 and rest[4].startswith("D=") \
                    and rest[4] != "D=-":
                ran[rest[4][2:]].add(job_id)
    for key, ids in groups.items():
        taken = [i for i in ids if status.get(i) is not None]
        if key in succeeded:
            report.children += len(ids)
            report.children_accepted += len(taken)
        if (key in succeeded and not taken) or any(status[i] not in ENDED for i in taken):
            report.lost_children.append(key)
        if len(set(taken) | ran[key]) > 1:
            report.doubled_dedupe.append(key)


def check_limits(report: Report, run_log: str, limits: dict) -> None:
    """At no instant more runs of a limit key than its concurrency, by the monotonic times
    of the run log, except beside an attempt whose lease was lost: one that was not its
    job's last attempt, or never ended (its process was killed: it ends, at the latest,
    when its job starts again). Its key's slot was given back when it was redelivered, so
    others may rightly run beside it (docs/FAULT_RUN.md)."""
    runs = {}   # (job, attempt, pid) -> [key, start, end]
    last = collections.Counter()   # job -> its last attempt
    starts = collections.defaultdict(list)   # job -> start times of its runs
    with open(run_log, encoding="utf-8") as f:
        for line in f:
            kind, job_id, attempt, pid, _, *rest = line.split()
            if len(rest) != 2 or not rest[1].startswith("L="):
                continue
            run = runs.setdefault((job_id, attempt, pid), [rest[1][2:], None, None])
            run[1 if kind == "start" else 2] = float(rest[0])
            last[job_id] = max(last[job_id], int(attempt))
            if kind == "start":
                starts[job_id].append(float(rest[0]))
    events = collections.defaultdict(list)   # key -> (time, 0 end / 1 start, run id, fair)
    for (job_id, attempt, pid), (key, start, end) in runs.items():
        if start is None:
            continue
        fair = end is not None and int(attempt) == last[job_id]
        if end is None:
            end = min([t for t in starts[job_id] if t > start], default=math.inf)
        run = (job_id, attempt, pid)
        events[key] += [(start, 1, run, fair), (end, 0, run, fair)]
    explained = set()   # lease-lost runs that ran while their key was over its limit
    for key, evs in events.items():
        limit = limits[key]["concurrency"]
        running = {}
        for t, is_start, run, fair in sorted(evs):   # at one time, ends come before starts
            if not is_start:
                running.pop(run, None)
                continue
            running[run] = fair
            if len(running) > limit:
                if sum(running.values()) > limit:
                    report.limit_breaches.append(
                        f"{key} at {t:.3f}: " + " ".join(f"{j}#{a}" for j, a, _ in running))
                else:
                    explained.update(r for r, f in running.items() if not f)
    report.limit_explained = len(explained)


def check(r: redis.Redis, keys: Keys, report: Report, accepted: list[str],
          starts: dict[str, float], until: float, run_log: str, drain: float,
          children: dict | None = None, limits: dict | None = None) -> None:
    """Wait up to ``drain`` seconds for everything accepted and due to end, then count.
    ``children`` (id -> (parent, dedupe key)) and ``limits`` are checked too if given."""
    due = _due_fires(starts, until)
    everything = accepted + list(due)
    children = children or {}
    deadline = time.monotonic() + drain
    while True:
        try:
            status = _statuses(r, keys, everything + list(children))
        except redis.exceptions.RedisError:
            status = {}
        # a filtered child has no record: wait for those the master accepted
        open_ = [i for i in everything if status.get(i) not in ENDED] + \
            [i for i in children if status.get(i) not in ENDED and status.get(i) is not None]
        if not open_ or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    not_run = set()
    for job_id in starts:
        for raw in r.lrange(keys.schedule_runs(job_id), 0, -1):
            run = unpack(raw)
            if run.get("outcome") in (Outcome.MISSED, Outcome.SKIPPED):
                not_run.add(run["job_id"])
    report.accepted = len(accepted)
    report.ended = sum(status.get(i) in ENDED for i in accepted)
    report.failed = sum(status.get(i) == b"failed" for i in everything)
    report.lost_jobs = [i for i in accepted if status.get(i) not in ENDED]
    for job_id in report.lost_jobs[:5]:   # what Redis says of them, for whoever looks into it
        fields = r.hgetall(keys.job(job_id))
        report.details[job_id] = {k.decode(): v.decode(errors="replace") for k, v in
                                  fields.items() if k not in (b"args", b"kwargs", b"result")}
    report.fires_due = len(due)
    report.fires_queued = sum(status.get(i) is not None for i in due)
    report.fires_not_run = len(not_run & due.keys())
    report.lost_fires = [i for i in due if status.get(i) not in ENDED and i not in not_run]
    # every fire of a schedule is on its grid (start + k * interval): any other is doubled
    for job_id, start in starts.items():
        for key in r.scan_iter(match=keys.job(f"{job_id}@*"), count=1000):
            fid = key.decode()[len(keys.job("")):]
            when = datetime.fromisoformat(fid.partition("@")[2])
            k = (when.timestamp() - start) / SCHEDULES[job_id]
            if k < 0 or k != math.floor(k):
                report.doubled_fires.append(fid)
    ends, claims = collections.Counter(), collections.Counter()
    with open(run_log, encoding="utf-8") as f:
        for line in f:
            kind, job_id, attempt, *_ = line.split()
            if kind == "end":
                ends[job_id] += 1
                claims[job_id, attempt] += 1
    report.run_twice = sum(1 for n in ends.values() if n > 1)
    # a redelivered job runs again under a new attempt; the same attempt twice is one claim
    # run twice, which only a bug does
    report.doubled_runs = [f"{j} attempt {a}" for (j, a), n in claims.items() if n > 1]
    report.phantoms = [i for i in everything + list(children)
                       if status.get(i) == b"succeeded" and not ends[i]]
    if children:
        report.mix = True
        check_children(report, status, children, run_log)
    if limits:
        report.mix = True
        check_limits(report, run_log, limits)


def run(seconds: float, seed: int, drain: float, workdir: str, mix: bool = False) -> Report:
    rng = random.Random(seed)
    run_log = os.path.join(workdir, "runs.log")
    open(run_log, "w").close()
    # Redis and the masters are restarted on their ports after a kill: ports of a band of
    # the run's own, where no connection's local port (the ephemeral range) nor a test's is
    server = RedisServer(port=band_port(CHAOS_BAND), appendonly=True).start()
    r = redis.Redis.from_url(server.url, socket_timeout=5)
    keys = Keys("elric")
    addresses = [f"127.0.0.1:{band_port(CHAOS_BAND)}" for _ in range(2)]
    base = elric_env(server.url, addresses[0], **SETTINGS)
    base[RUN_LOG] = run_log
    if mix:
        base["ELRIC_LIMITS"] = json.dumps(LIMITS)
    slots = [Slot("master", f"master-{i}", {**base, "ELRIC_MASTER_ADDRESS": a},
                  os.path.join(workdir, f"master-{i}.log")) for i, a in enumerate(addresses)]
    slots += [Slot("worker", f"worker-{i}", {**base, "ELRIC_MASTER_ADDRESS": addresses[i]},
                   os.path.join(workdir, f"worker-{i}.log")) for i in range(2)]
    for slot in slots:
        slot.start()
    supervisor = Supervisor(slots)
    nemesis = Nemesis(slots, server, rng)
    report = Report(seconds, nemesis.faults)
    load = None
    try:
        client = MasterClient(addresses[0], timeout=10)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except RPCConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        first = math.ceil(time.time()) + 2
        starts = {}
        for job_id, interval in SCHEDULES.items():
            start = first + interval
            client.submit_job(Logged.spec([0.02], job_id=job_id, replace_existing=True,
                                          trigger=every(seconds=interval, start_date=datetime
                                                        .fromtimestamp(start, timezone.utc)
                                                        .isoformat()),
                                          coalesce="all", misfire_grace_time=None,
                                          max_instances=1000))
            starts[job_id] = start
        client.close()
        supervisor.thread.start()
        load = Load(addresses, rng, mix)
        load.thread.start()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(rng.uniform(2, 5))
            nemesis.strike()
        until = time.time()
        nemesis.calm()
        load.stop()
        if load.error is not None:
            report.load_error = f"{type(load.error).__name__}: {load.error}"
        children = children_of(r, keys, load.children, time.monotonic() + drain)
        check(r, keys, report, load.accepted, starts, until, run_log, drain, children,
              LIMITS if mix else None)
    finally:
        if load is not None:
            load.stop()
        nemesis.calm()
        supervisor.stop()
        r.close()
        server.cleanup()
    report.restarts = sum(s.starts - 1 for s in slots)
    # the nemesis only SIGKILLs; any other exit is a process giving up (then restarted)
    report.unasked_exits = [(s.name, code) for s in slots for code in s.exits
                            if code != -signal.SIGKILL]
    for slot in slots:   # shown, not judged: an ERROR line is a bug or a fault's trace
        with open(slot.log_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if " ERROR " in line:
                    report.errors[line.split(" ERROR ", 1)[1].strip()[:100]] += 1
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long faults go on")
    parser.add_argument("--seed", type=int, default=None, help="the nemesis's random seed")
    parser.add_argument("--drain", type=float, default=120,
                        help="how long the checker waits for every job to end")
    parser.add_argument("--keep", metavar="DIR", help="keep logs in DIR (default: a temp dir)")
    parser.add_argument("--mix", action="store_true", help="also async jobs under limit keys "
                        "and parents of children with dedupe keys")
    args = parser.parse_args(argv)
    seed = random.randrange(2**32) if args.seed is None else args.seed
    workdir = args.keep or tempfile.mkdtemp(prefix="elric-chaos-")
    os.makedirs(workdir, exist_ok=True)
    print(f"fault run: seed {seed}, logs in {workdir}", flush=True)
    report = run(args.seconds, seed, args.drain, workdir, args.mix)
    print(report.table(), flush=True)
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
