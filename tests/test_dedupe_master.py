"""Dedupe through the master, with real processes: masters, workers and a private Redis.

What the dedupe issue calls done: every backend filters through submit_jobs; scopes and
per-scope backends; exactly-once admission across two masters; children inherit their
parent's scope (the crawler fetches each page once); per-fire scopes of periodic jobs;
releasing a key when its job fails for good; the in-master Bloom filter surviving a
restart; and a keyed batch costing O(1) round trips to Redis.
"""

from __future__ import annotations

import random
import re
import threading
import time

import pytest
import redis

from elric import Job
from elric.client import MasterClient
from elric.redis_server import free_port
from elric.rpc import RemoteError
from elric.triggers import every
from examples.crawler import Crawl
from examples.site import DemoSite
from tests.conftest import TEST_JOB_MODULES, wait_for
from tests.jobs import Echo, Fail, MarkSleep
from tests.silent_proxy import shut

PREFIX = "elric"  # the clusters here keep the default KEY_PREFIX


class SpawnSameKey(Job):
    """Submits ``n`` MarkSleep children that all carry dedupe key ``key`` (tests import
    this module by path: tests.test_dedupe_master:SpawnSameKey)."""

    def run(self, path, n, key):
        for _ in range(n):
            MarkSleep.submit_with(args=[path, 0], dedupe_key=key)
        return n


def statuses(replies):
    return [r["status"] for r in replies]


def idle(c) -> bool:
    by = c.client.stats()["by_status"]
    return by["queued"] == 0 and by["running"] == 0 and by["retrying"] == 0


# --- 1. every backend filters through the master ----------------------------------------

@pytest.mark.parametrize("backend", ["set", "bloom", "redis-bloom"])
def test_each_backend_filters_duplicates_through_the_master(make_cluster, backend):
    c = make_cluster(FILTER_BACKEND=backend)
    c.start_master()
    cl = c.client
    assert cl.submit_job(Echo.spec(["a"], job_id="a", dedupe_key="k1"))["status"] == "queued"
    assert cl.submit_job(Echo.spec(["b"], job_id="b", dedupe_key="k1")) == {
        "job_id": "b", "status": "filtered"}
    # duplicates inside one batch: the first passes
    assert statuses(cl.submit_jobs([Echo.spec([i], job_id=f"d{i}", dedupe_key="k2")
                                    for i in range(3)])) == ["queued", "filtered", "filtered"]
    # dedupe_key_for: Crawl's key is the normalized URL (no fragment, lower-case scheme)
    r1 = cl.submit_job(Crawl.spec(["http://127.0.0.1:1/a#x"], job_id="crawl-1"))
    r2 = cl.submit_job(Crawl.spec(["HTTP://127.0.0.1:1/a"], job_id="crawl-2"))
    assert (r1["status"], r2["status"]) == ("queued", "filtered")
    assert cl.get_job("crawl-1")["dedupe_key"] == "http://127.0.0.1:1/a"

    c.start_worker("--concurrency", "1")  # default queue only: the Crawl jobs stay queued
    for job_id in ("a", "d0"):
        assert c.wait_job(job_id)["status"] == "succeeded", c.logs()
    wait_for(lambda: c.client.stats()["by_queue"]["default"]["queued"] == 0)
    for job_id in ("b", "d1", "d2", "crawl-2"):   # filtered jobs never reached Redis
        assert cl.get_job(job_id) is None
    stats = cl.stats()
    assert stats["totals"]["submitted"] == 3 and stats["totals"]["succeeded"] == 2
    g = stats["filters"]["global"]
    assert (g["backend"], g["items"], g["filtered"]) == (backend, 3, 4)
    assert stats["by_status"]["filtered"] == 4


def test_a_mixed_batch_is_answered_in_place(make_cluster):
    """Keyed specs without arguments (a crawler's links) are only checked before the
    filter and built after it: they answer in their place among the others and are
    stored exactly as a spec built up front would be."""
    c = make_cluster(FILTER_BACKEND="redis-bloom")
    c.start_master()
    cl = c.client
    echo = "tests.jobs:Echo"
    link = {"func": echo, "dedupe_key": "m2", "job_id": "mine-1", "parent": "p",
            "batch": "b1", "dedupe_scope": "sc"}
    replies = cl.submit_jobs([
        {"func": echo, "dedupe_key": "m1"},                           # new
        {"func": echo, "dedupe_key": "m1"},                           # seen in this batch
        link,                                                         # new, id chosen
        {"func": echo, "args": [1], "dedupe_key": "m3"},              # built up front
        {"func": echo, "args": [2]},                                  # no key
        {"func": echo, "dedupe_key": "m2", "dedupe_scope": "sc", "job_id": "mine-2"},
        {"func": echo, "job_id": "per-1", "trigger": every(hours=1)},
        {"func": echo, "dedupe_key": "m1", "queue": "default"},       # up front, seen
        {"func": echo, "dedupe_key": "m9", "queue": "default"},       # up front, new
    ])
    assert statuses(replies) == ["queued", "filtered", "queued", "queued", "queued",
                                 "filtered", "scheduled", "filtered", "queued"]
    ids = [r["job_id"] for r in replies]
    assert ids[2] == "mine-1" and ids[5] == "mine-2" and ids[6] == "per-1"
    assert len(set(ids)) == len(ids) and all(len(i) == 32 for i in ids[:2] + ids[7:])
    # a deferred spec is stored as the same spec built up front
    deferred, upfront = cl.get_job(ids[0]), cl.get_job(ids[8])
    for job in (deferred, upfront):
        del job["job_id"], job["dedupe_key"], job["enqueued_at"]
    assert deferred == upfront and deferred["dedupe_scope"] == "global"
    mine = cl.get_job("mine-1")
    assert (mine["parent"], mine["batch"], mine["dedupe_scope"], mine["dedupe_key"]) == \
        ("p", "b1", "sc", "m2")
    # sent again (a lost reply): the job it already is, not "filtered"
    again = cl.submit_jobs([link, {"func": echo, "dedupe_key": "m1"}])
    assert again[0] == {"job_id": "mine-1", "status": "queued"}
    assert again[1]["status"] == "filtered" and again[1]["job_id"] not in ids
    # a bad batch is refused whole, naming the spec, before any key is taken
    submitted = cl.stats()["totals"]["submitted"]
    with pytest.raises(RemoteError, match=r"spec 1: dedupe_scope '@fire' is for periodic"):
        cl.submit_jobs([{"func": echo, "dedupe_key": "n1"},
                        {"func": echo, "dedupe_key": "n2", "dedupe_scope": "@fire"}])
    with pytest.raises(RemoteError, match="spec 1: job_id 'twice' appears twice"):
        cl.submit_jobs([{"func": echo, "dedupe_key": "n3", "job_id": "twice"},
                        {"func": echo, "args": [1], "job_id": "twice"}])
    with pytest.raises(RemoteError, match=r"spec 1: job spec key 'parent' must be"):
        cl.submit_jobs([{"func": echo, "dedupe_key": "n4"},
                        {"func": echo, "dedupe_key": "n5", "parent": 5}])
    assert cl.stats()["totals"]["submitted"] == submitted
    assert statuses(cl.submit_jobs([{"func": echo, "dedupe_key": k}
                                    for k in ("n1", "n2", "n3", "n4", "n5")])) == ["queued"] * 5


@pytest.mark.parametrize("backend", ["set", "bloom", "redis-bloom"])
def test_a_batch_with_text_that_is_not_utf8_is_refused_before_any_key_is_taken(make_cluster,
                                                                              backend):
    """A msgpack string with invalid UTF-8 (the client here sends "\\udcff" as the byte
    0xff) cannot be stored or filtered: the whole batch is refused, naming the spec and
    the key, and the good specs of that batch pass when they are sent again."""
    c = make_cluster(FILTER_BACKEND=backend)
    c.start_master()
    cl = c.client
    good = [Echo.spec(["a"], dedupe_key="good-a"), Echo.spec(["b"], dedupe_key="good-b")]
    for bad, named in ((Echo.spec(["x"], dedupe_key="bad\udcff"), "spec 1: dedupe_key"),
                       (Echo.spec(["x\udcff"], dedupe_key="fine"), "spec 1: args[0]"),
                       (Echo.spec(["x"], dedupe_key="fine", dedupe_scope="s\udcff"),
                        "spec 1: dedupe_scope")):
        with pytest.raises(RemoteError, match=re.escape(named) + ".* is not valid UTF-8"):
            cl.submit_jobs([good[0], bad, good[1]])
    assert cl.stats()["filters"] == {} or all(
        f["items"] == 0 for f in cl.stats()["filters"].values())
    assert statuses(cl.submit_jobs(good)) == ["queued", "queued"]
    assert cl.stats()["filters"]["global"]["items"] == 2


# --- 2. scopes and per-scope backends -----------------------------------------------------

def test_scopes_are_independent_and_filter_scopes_override_the_backend(make_cluster,
                                                                       redis_url):
    c = make_cluster(FILTER_BACKEND="set", FILTER_SCOPES="big=redis-bloom,mem=bloom")
    c.start_master()
    scopes = ["a", "b", "big", "mem", None]   # None: the default scope "global"

    def batch(tag):
        return [Echo.spec([s], job_id=f"{tag}-{s}", dedupe_key="same",
                          **({"dedupe_scope": s} if s else {})) for s in scopes]

    assert statuses(c.client.submit_jobs(batch("one"))) == ["queued"] * 5
    assert statuses(c.client.submit_jobs(batch("two"))) == ["filtered"] * 5
    assert c.client.get_job("one-a")["dedupe_scope"] == "a"
    assert c.client.get_job("one-None")["dedupe_scope"] == "global"
    filters = c.client.stats()["filters"]
    assert {s: (f["backend"], f["items"], f["filtered"]) for s, f in filters.items()} == {
        "a": ("set", 1, 1), "b": ("set", 1, 1), "global": ("set", 1, 1),
        "big": ("redis-bloom", 1, 1), "mem": ("bloom", 1, 1)}
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.exists(f"{PREFIX}:dedupe:set:a") and not r.exists(f"{PREFIX}:dedupe:set:big")
        assert list(r.scan_iter(f"{PREFIX}:dedupe:rbloom:big:*"))
    finally:
        r.close()


# --- 3. atomic across masters -------------------------------------------------------------

@pytest.mark.parametrize("backend", ["set", "redis-bloom"])
def test_two_masters_admit_each_key_exactly_once(make_cluster, backend):
    c = make_cluster(FILTER_BACKEND=backend)
    c.start_master()
    second = f"127.0.0.1:{free_port()}"
    c.start_master(address=second)
    keys = [f"https://site.test/page/{i}" for i in range(300)]
    threads, per_thread = 8, []
    barrier = threading.Barrier(threads)
    errors = []

    def submit(t):
        rnd = random.Random(t)
        order = keys[:]
        rnd.shuffle(order)
        got = []
        try:
            with MasterClient(c.address if t % 2 else second) as cl:
                barrier.wait(timeout=20)
                for i in range(0, len(order), 15):
                    chunk = order[i:i + 15]
                    replies = cl.submit_jobs([Echo.spec([k], job_id=f"t{t}-{keys.index(k)}",
                                                        dedupe_key=k) for k in chunk])
                    got += [(k, r["status"]) for k, r in zip(chunk, replies)]
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)
        per_thread.append(got)

    pool = [threading.Thread(target=submit, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join(timeout=60)
    assert not errors, errors
    queued = {k: 0 for k in keys}
    for got in per_thread:
        assert len(got) == len(keys)
        for k, status in got:
            assert status in ("queued", "filtered")
            queued[k] += status == "queued"
    assert set(queued.values()) == {1}, [k for k, n in queued.items() if n != 1][:5]
    stats = c.client.stats()
    assert stats["by_status"]["queued"] == len(keys)
    assert stats["filters"]["global"]["filtered"] == (threads - 1) * len(keys)


# --- 4. children inherit the scope: the crawler fetches each page once ------------------

def test_crawler_fetches_each_page_once_per_scope(make_cluster):
    c = make_cluster()
    c.start_master()
    c.start_worker("--queues", "crawl", "--concurrency", "2")
    with DemoSite(pages=25) as site:
        for n, scope in enumerate(["crawl-1", "crawl-2"], start=1):
            c.client.submit_job(Crawl.spec([site.url], job_id=scope, dedupe_scope=scope))
            wait_for(lambda: idle(c) and c.client.get_job(scope)["status"] == "succeeded",
                     what=f"crawl {scope} done")
            # every page, once per crawl. The graph has cycles: a pool process drops the
            # links it submitted before; the master's filter drops those another process
            # (or the user, for the start page) submitted
            assert site.page_hits() == {p: n for p in site.paths()}, c.logs()
            f = c.client.stats()["filters"][scope]
            assert f["items"] == len(site.paths()) and f["filtered"] > 0
        jobs = c.client.list_jobs(queue="crawl", limit=1000)
        assert len(jobs) == 2 * len(site.paths())
        assert all(j["status"] == "succeeded" for j in jobs)
        by_scope = {}
        for j in jobs:   # the children carry the scope their parent had
            by_scope.setdefault(j["dedupe_scope"], []).append(j)
        assert sorted(by_scope) == ["crawl-1", "crawl-2"]
        assert all(len(v) == len(site.paths()) for v in by_scope.values())
        assert all(j["parent"] for v in by_scope.values() for j in v if j["job_id"] not in
                   by_scope)


# --- 5. per-fire scopes of periodic jobs ---------------------------------------------------

@pytest.mark.parametrize("override", [None, "redis-bloom"])
def test_each_fire_gets_its_own_scope(make_cluster, tmp_path, override):
    settings = {"FILTER_SCOPES": f"round={override}"} if override else {}
    # SpawnSameKey lives in this module: its workers load it too
    c = make_cluster(JOB_MODULES=f"{TEST_JOB_MODULES},tests.test_dedupe_master", **settings)
    c.start_master()
    c.start_worker("--concurrency", "2")
    path = tmp_path / "ran"
    path.touch()
    spec = SpawnSameKey.spec([str(path), 3, "shared"], job_id="round",
                             trigger=every(seconds=1), dedupe_scope="@fire")
    assert c.client.submit_job(spec)["status"] == "scheduled"
    wait_for(lambda: len(path.read_text().split()) >= 2, what="two fires' children ran")
    assert c.client.call("pause_job", "round")
    wait_for(lambda: idle(c), what="everything finished")
    fires = [j for j in c.client.list_jobs(func=SpawnSameKey.spec()["func"], limit=1000)]
    children = c.client.list_jobs(func=MarkSleep.spec()["func"], limit=1000)
    assert len(fires) >= 2 and all(f["status"] == "succeeded" for f in fires), c.logs()
    # one child per fire: the other two carried the same key in the same (per-fire) scope
    assert sorted(ch["parent"] for ch in children) == sorted(f["job_id"] for f in fires)
    assert sorted(path.read_text().split()) == sorted(ch["job_id"] for ch in children)
    for f in fires:
        assert f["dedupe_scope"] == f["job_id"] and f["job_id"].startswith("round@")
    for ch in children:
        assert ch["dedupe_scope"] == ch["parent"]      # inherited from its fire
    filters = c.client.stats()["filters"]
    for f in fires:
        s = filters[f["job_id"]]
        assert (s["backend"], s["items"], s["filtered"]) == (override or "set", 1, 2)


def test_old_fire_scopes_are_dropped_after_the_round_ttl(make_cluster, redis_url):
    c = make_cluster(DEDUPE_ROUND_TTL=1)
    c.start_master()
    spec = Echo.spec(["x"], job_id="tick", trigger=every(seconds=1), dedupe_scope="@fire",
                     dedupe_key="page")
    c.client.submit_job(spec)
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: r.zcard(f"{PREFIX}:dedupe:rounds") >= 1, what="a fire's round")
        # the round is recorded just before its fire is queued: wait for the fire too
        fire = wait_for(lambda: c.client.list_jobs(func=Echo.spec()["func"]),
                        what="the fire queued")[0]
        assert fire["dedupe_scope"] == fire["job_id"] and fire["status"] == "queued"
        assert c.client.stats()["filters"][fire["job_id"]]["items"] == 1
        assert c.client.call("pause_job", "tick")
        # every key of the rounds goes
        wait_for(lambda: r.zcard(f"{PREFIX}:dedupe:rounds") == 0
                 and not set(r.scan_iter(f"{PREFIX}:dedupe:*")), what="rounds dropped")
        assert c.client.stats()["filters"] == {}
    finally:
        r.close()



def test_a_late_fires_round_is_kept_the_round_ttl_from_when_it_is_queued(redis_url):
    """A round's age was counted from its fire time: a fire run late (misfire_grace_time
    nil, a master down over night) was older than DEDUPE_ROUND_TTL as it was queued, and
    housekeeping dropped its scope while it ran: its children's keys, seen again, ran again,
    and the scope they made anew was never dropped."""
    import asyncio
    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url, DEDUPE_ROUND_TTL=3600) as m:
            r, keys = m.redis, m.keys
            late = (await r.time())[0] - 7200   # two hours ago
            await m.submit_jobs([Echo.spec(job_id="nightly", dedupe_scope="@fire",
                                           misfire_grace_time=None,
                                           trigger={"type": "date", "run_date": late})])
            while not (fires := await r.zrange(keys.dedupe_rounds, 0, -1)):
                await asyncio.sleep(0.02)
            await m.housekeeping._drop_old_rounds()
            assert await r.zrange(keys.dedupe_rounds, 0, -1) == fires
    asyncio.run(asyncio.wait_for(main(), 30))

# --- 6. releasing the key of a job that failed for good ---------------------------------

@pytest.mark.parametrize("ttl", [None, 3600])
def test_release_on_failure_frees_the_key(make_cluster, ttl):
    settings = {"DEDUPE_RELEASE_ON_FAILURE": True, "RETRY_BACKOFF": 4}
    if ttl:
        settings["DEDUPE_TTL"] = ttl
    c = make_cluster(**settings)
    c.start_master()
    c.start_worker("--concurrency", "2")
    cl = c.client
    cl.submit_jobs([Fail.spec(job_id="f1", dedupe_key="bad", max_retries=1),
                    Echo.spec(["ok"], job_id="ok1", dedupe_key="good")])
    assert c.wait_job("ok1")["status"] == "succeeded"
    c.wait_job("f1", statuses=("retrying",))
    # between attempts the key is still held
    assert cl.submit_job(Fail.spec(job_id="f-dup", dedupe_key="bad"))["status"] == "filtered"
    assert c.wait_job("f1")["status"] == "failed", c.logs()
    # failed for good: the key is free again; a succeeded job keeps its key
    assert cl.submit_job(Echo.spec(["again"], job_id="f2", dedupe_key="bad"))["status"] == \
        "queued"
    assert c.wait_job("f2")["status"] == "succeeded"
    assert cl.submit_job(Echo.spec(["x"], job_id="f3", dedupe_key="bad"))["status"] == \
        "filtered"
    assert cl.submit_job(Echo.spec(["x"], job_id="ok2", dedupe_key="good"))["status"] == \
        "filtered"


@pytest.mark.parametrize("where", ["master", "worker"])
def test_the_master_that_admitted_a_job_says_whether_its_key_goes_back(make_cluster, where):
    """DEDUPE_RELEASE_ON_FAILURE is a dedupe setting, read by the master, which decides
    about keys; the worker that recorded the failure decided instead, so set on the master
    alone it gave back nothing, and set on a worker alone it gave back keys the master
    meant to keep."""
    c = make_cluster()
    c.start_master(**({"DEDUPE_RELEASE_ON_FAILURE": True} if where == "master" else {}))
    c.start_worker("--concurrency", "1",
                   **({"DEDUPE_RELEASE_ON_FAILURE": True} if where == "worker" else {}))
    c.client.submit_job(Fail.spec(job_id="f1", dedupe_key="bad"))
    assert c.wait_job("f1")["status"] == "failed"
    again = c.client.submit_job(Echo.spec(["again"], job_id="f2", dedupe_key="bad"))
    assert again["status"] == ("queued" if where == "master" else "filtered"), c.logs()


def a_failed_jobs_key_again(make_cluster, scope: str, **settings) -> str:
    """Job f1 with key "bad" in ``scope`` fails; what a second job with that key gets."""
    c = make_cluster(**settings)
    c.start_master()
    c.start_worker("--concurrency", "1")
    c.client.submit_job(Fail.spec(job_id="f1", dedupe_key="bad", dedupe_scope=scope))
    assert c.wait_job("f1")["status"] == "failed"
    return c.client.submit_job(Fail.spec(job_id="f2", dedupe_key="bad",
                                         dedupe_scope=scope))["status"]


@pytest.mark.parametrize("backend", ["set", "redis-bloom"])
def test_by_default_a_failed_jobs_key_stays(make_cluster, backend):
    assert a_failed_jobs_key_again(make_cluster, "s", FILTER_BACKEND=backend) == "filtered"


def test_release_on_failure_leaves_bloom_scopes_alone(make_cluster):
    # release applies to the set backend; a redis-bloom scope keeps the key (no error)
    assert a_failed_jobs_key_again(make_cluster, "rb", DEDUPE_RELEASE_ON_FAILURE=True,
                                   FILTER_SCOPES="rb=redis-bloom") == "filtered"


# --- 7. the in-master Bloom filter across a restart ---------------------------------------

@pytest.mark.parametrize("how", ["sigterm", "sigkill-after-snapshot"])
def test_bloom_survives_a_master_restart(make_cluster, redis_url, how):
    interval = 0 if how == "sigterm" else 1   # 0: only the final snapshot on SIGTERM
    c = make_cluster(FILTER_BACKEND="bloom", BLOOM_SNAPSHOT_INTERVAL=interval)
    master = c.start_master()
    keys = [f"https://site.test/{i}" for i in range(500)]

    def submit(tag):
        return statuses(c.client.submit_jobs(
            [Echo.spec([k], job_id=f"{tag}-{i}", dedupe_key=k, dedupe_scope="urls")
             for i, k in enumerate(keys)]))

    assert submit("one") == ["queued"] * len(keys)
    assert submit("dup") == ["filtered"] * len(keys)
    r = redis.Redis.from_url(redis_url)
    try:
        if how == "sigterm":
            assert not r.exists(f"{PREFIX}:dedupe:bloom:urls")   # no periodic snapshot
            assert master.stop(timeout=20) == 0, master.log()
        else:
            wait_for(lambda: r.hget(f"{PREFIX}:dedupe:stats:urls", "filtered") == b"500",
                     what="a periodic snapshot")
            master.kill()
        assert r.exists(f"{PREFIX}:dedupe:bloom:urls")
    finally:
        r.close()
    c.start_master()
    assert c.client.stats()["filters"]["urls"]["items"] == len(keys)
    assert submit("two") == ["filtered"] * len(keys)
    f = c.client.stats()["filters"]["urls"]
    assert (f["backend"], f["items"], f["filtered"]) == ("bloom", len(keys), 2 * len(keys))
    assert c.client.submit_job(Echo.spec(["n"], job_id="new", dedupe_key="fresh",
                                         dedupe_scope="urls"))["status"] == "queued"



def test_bloom_snapshots_in_trouble_show_in_health(make_cluster, redis_url):
    """The snapshot loop retried a failing snapshot for good, and only its log said so:
    health called the master ok while a restart would forget the scope's keys."""
    c = make_cluster(FILTER_BACKEND="bloom", BLOOM_SNAPSHOT_INTERVAL=1)
    c.start_master()
    stats = f"{PREFIX}:dedupe:stats:urls"
    r = redis.Redis.from_url(redis_url)
    try:
        wait_for(lambda: c.client.health()["ok"], what="health ok")
        assert "dedupe snapshots" in c.client.health()["tasks"]
        c.client.submit_job(Echo.spec([1], job_id="a", dedupe_key="a", dedupe_scope="urls"))
        wait_for(lambda: r.hget(stats, "items"), what="a periodic snapshot")
        r.set(stats, "an operator's string")
        c.client.submit_job(Echo.spec([2], job_id="b", dedupe_key="b", dedupe_scope="urls"))
        wait_for(lambda: not c.client.health()["ok"], what="health showing the failure")
        task = c.client.health()["tasks"]["dedupe snapshots"]
        assert stats in task["state"] and "retrying" in task["state"], task
        r.delete(stats)
        wait_for(lambda: c.client.health()["ok"], what="health ok again")
        assert r.hget(stats, "items") == b"2"
    finally:
        r.close()

# --- 8. a keyed batch costs O(1) round trips to Redis -------------------------------------

class CommandLog:
    """MONITOR the test Redis between two markers; counts commands from clients and from
    scripts separately."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.r = redis.Redis.from_url(url)
        self.ready, self.done = threading.Event(), threading.Event()
        self.client_cmds: list[str] = []
        self.script_cmds: dict[str, int] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            with self.r.monitor() as m:
                recording = False
                for cmd in m.listen():
                    text = cmd["command"]
                    if text == "ECHO elric-monitor-start":
                        recording = True
                        self.ready.set()
                        continue
                    if text == "ECHO elric-monitor-stop":
                        break
                    if not recording:
                        continue
                    name = text.split(" ", 1)[0].upper()
                    if cmd.get("client_type") == "lua":
                        self.script_cmds[name] = self.script_cmds.get(name, 0) + 1
                    else:
                        self.client_cmds.append(name)
        finally:
            self.done.set()

    def __enter__(self):
        self.thread.start()
        with redis.Redis.from_url(self.url) as ctl:
            deadline = time.monotonic() + 10
            while not self.ready.is_set():   # MONITOR may start after the first ECHO
                assert time.monotonic() < deadline, "MONITOR did not start"
                ctl.echo("elric-monitor-start")
                self.ready.wait(0.05)
        return self

    def __exit__(self, *exc):
        with redis.Redis.from_url(self.url) as ctl:
            ctl.echo("elric-monitor-stop")
        assert self.done.wait(20), "MONITOR did not stop"
        self.r.close()


@pytest.mark.parametrize("backend", ["set", "bloom", "redis-bloom"])
def test_keyed_batch_costs_o1_round_trips(make_cluster, redis_url, backend):
    c = make_cluster(FILTER_BACKEND=backend)
    c.start_master()
    c.client.submit_job(Echo.spec(["warm"], dedupe_key="warm"))   # scripts loaded
    specs = [Echo.spec([i], job_id=f"j{i}", dedupe_key=f"https://site.test/{i}")
             for i in range(1000)]
    with CommandLog(redis_url) as log:
        replies = c.client.submit_jobs(specs)
    assert statuses(replies) == ["queued"] * 1000
    # every key went through Redis in scripts (the set backend: one SADD per key) ...
    if backend == "set":
        assert log.script_cmds.get("SADD", 0) >= 1000
    assert log.script_cmds.get("HSET", 0) >= 1000   # the job hashes, written by ENQUEUE
    # ... but the master sent a handful of commands, not one per job. Its housekeeping
    # runs meanwhile too, more passes the slower the machine: each raises data_epoch once
    # (INCRBY) and sends at most 15 commands, 5 scripts among them (and one cut in two by
    # the log's start or end)
    passes = log.client_cmds.count("INCRBY") + 1
    assert len(log.client_cmds) < 50 + 15 * passes, sorted(log.client_cmds)
    assert log.client_cmds.count("EVALSHA") <= 4 + 5 * passes, log.client_cmds


# --- 9. a master killed between the filter and the queue -------------------------------------

class HoldingProxy:
    """TCP proxy to Redis that forwards everything until a client sends ``marker``; from
    then on that connection's data is thrown away: the command never reaches Redis. With
    ``cut_all``, Redis is gone instead until ``restore``: every connection is closed with
    that command unsent, and new ones are closed at once (the first ``marker`` only)."""

    def __init__(self, target_port: int, marker: bytes, cut_all: bool = False) -> None:
        import socket
        self.marker, self.port, self.cut_all = marker, free_port(), cut_all
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._socks = []
        self.cut = threading.Event()
        threading.Thread(target=self._accept, args=(target_port,), daemon=True).start()

    def _accept(self, target_port: int) -> None:
        import socket
        while True:
            try:
                client, _ = self._listener.accept()
                if self.cut.is_set():
                    client.close()
                    continue
                server = socket.create_connection(("127.0.0.1", target_port))
            except OSError:
                return
            self._socks += [client, server]
            held = threading.Event()
            for src, dst, watch in ((client, server, True), (server, client, False)):
                threading.Thread(target=self._pump, args=(src, dst, held, watch),
                                 daemon=True).start()

    def _pump(self, src, dst, held, watch) -> None:
        try:
            while data := src.recv(65536):
                if watch and self.marker and self.marker in data:
                    held.set()
                    if self.cut_all:   # once: the commands after restore pass
                        self.cut.set()
                        self.marker = self.cut_all = None
                        for s in self._socks:
                            _end(s)
                if not held.is_set():
                    dst.sendall(data)
        except OSError:
            pass

    def restore(self) -> None:
        self.cut.clear()

    def close(self) -> None:
        for s in [self._listener, *self._socks]:
            _end(s)


def _end(sock) -> None:
    """Close ``sock`` and wake a thread blocked on it: close() alone does not, on Linux, and
    a pump went on relaying after its test (into the next test's Redis)."""
    shut(sock)
    sock.close()


def enqueue_sha() -> bytes:
    import hashlib

    from elric.lua import source
    text = "".join(map(source, ("clock_fn", "expect_fn", "enqueue")))   # as lua.load joins them
    return hashlib.sha1(text.encode()).hexdigest().encode()


def test_a_resend_after_the_master_died_between_filter_and_queue_is_queued(make_cluster,
                                                                          redis_url):
    """A master SIGKILLed after the filter took a job's key but before the job was queued
    leaves the key taken by no job. The caller resends the same job (PROTOCOL: resending
    with the same job_id is safe) to another master: it must be queued, not "filtered"
    (a duplicate of a job that was never made: the job is lost)."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = HoldingProxy(port, enqueue_sha())
    r = redis.Redis.from_url(redis_url)
    try:
        c = make_cluster(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0")
        doomed = c.start_master()
        spec = Echo.spec(["p"], job_id="page-7", dedupe_key="http://x/7", dedupe_scope="crawl")
        box = {}

        def call():
            try:
                with MasterClient(c.address, timeout=10) as cl:   # resends until then
                    box["reply"] = cl.submit_job(spec)
            except Exception as exc:
                box["reply"] = exc
        t = threading.Thread(target=call, daemon=True)
        t.start()
        wait_for(lambda: r.sismember(f"{PREFIX}:dedupe:set:crawl", "http://x/7"),
                 what="the filter took the key")
        doomed.kill()
        t.join(20)
        assert isinstance(box.get("reply"), Exception), box
        assert not r.exists(f"{PREFIX}:job:page-7")
        other = make_cluster()          # straight to Redis
        other.start_master()
        assert other.client.submit_job(spec) == {"job_id": "page-7", "status": "queued"}
        assert other.client.submit_job({**spec, "job_id": "page-8"})["status"] == "filtered"
        assert other.client.submit_job(spec) == {"job_id": "page-7", "status": "queued"}
    finally:
        r.close()
        proxy.close()


def test_a_key_whose_job_was_never_queued_goes_to_a_resend_without_an_id(make_cluster,
                                                                         redis_url):
    """Redis went away between the filter and the queue, and stayed away past the ~10 s
    the failed call gives its keys back for: the key stayed taken by no job. A resend
    without a job_id (a fresh id) was "filtered" for good, and the job was lost. Past
    DEDUPE_TAKEOVER_AFTER the next job with that key takes it, once."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = HoldingProxy(port, enqueue_sha(), cut_all=True)
    r = redis.Redis.from_url(redis_url)
    try:
        c = make_cluster(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0", DEDUPE_TAKEOVER_AFTER=1)
        master = c.start_master()
        spec = Echo.spec(["p"], dedupe_key="http://x/9")      # no job_id: a fresh one each time
        with MasterClient(c.address, timeout=60) as cl:
            with pytest.raises(RemoteError) as info:
                cl.submit_job(spec)
        assert info.value.code == "redis_unavailable", str(info.value)
        wait_for(lambda: "dedupe key(s)" in master.log() and "keeping them" in master.log(),
                 what="the give-back given up")
        assert r.sismember(f"{PREFIX}:dedupe:set:global", "http://x/9")
        proxy.restore()

        def resend():   # a pooled connection the cut closed may fail a first call
            try:
                got = c.client.submit_job(spec)
            except RemoteError as exc:
                assert exc.code == "redis_unavailable", str(exc)
                return None
            return got if got["status"] == "queued" else None
        first = wait_for(resend, what="a resend queued")
        assert c.client.submit_job(spec)["status"] == "filtered"
        c.start_worker(REDIS_URL=redis_url)   # not through the proxy, which outlives the test
        assert c.wait_job(first["job_id"])["status"] == "succeeded"
        assert [j["job_id"] for j in c.client.list_jobs()] == [first["job_id"]]
    finally:
        r.close()
        proxy.close()


def submit_as_its_master_dies(c, submit, taken, what: str) -> None:
    """``submit(client)`` to a master of ``c`` started now (its enqueue held by a
    HoldingProxy), SIGKILLed once ``taken()`` holds: the call fails, nothing queued."""
    doomed = c.start_master()
    box = {}

    def call():
        try:
            with MasterClient(c.address, timeout=5) as cl:
                box["reply"] = submit(cl)
        except Exception as exc:
            box["reply"] = exc
    t = threading.Thread(target=call, daemon=True)
    t.start()
    wait_for(taken, what=what)
    doomed.kill()
    t.join(20)
    assert isinstance(box.get("reply"), Exception), box


def test_a_bloom_batch_whose_master_died_before_queueing_it_is_queued_on_resend(make_cluster,
                                                                               redis_url):
    """`bloom`: the master took the batch's keys in its memory, a periodic snapshot wrote
    them to Redis while the enqueue was under way, and the master was SIGKILLed before
    queueing. The client sent the batch again (same ids) to the restarted master, which
    loaded the snapshot: every job was answered "filtered" and none existed, the batch lost.
    A resend of the same jobs must be queued, and a new job with a key of it filtered."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = HoldingProxy(port, enqueue_sha())
    r = redis.Redis.from_url(redis_url)
    try:
        c = make_cluster(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0", FILTER_BACKEND="bloom",
                         BLOOM_SNAPSHOT_INTERVAL=1)
        specs = [Echo.spec([i], job_id=f"page-{i}", dedupe_key=f"http://x/{i}",
                           dedupe_scope="crawl") for i in range(5)]
        submit_as_its_master_dies(
            c, lambda cl: cl.submit_jobs(specs),
            lambda: r.hget(f"{PREFIX}:dedupe:stats:crawl", "items") == b"5",
            "a snapshot holding the batch's keys")
        assert not r.exists(f"{PREFIX}:job:page-0")
        other = make_cluster(FILTER_BACKEND="bloom")   # straight to Redis
        other.start_master()
        assert statuses(other.client.submit_jobs(specs)) == ["queued"] * 5
        assert other.client.submit_job({**specs[0], "job_id": "dup"})["status"] == "filtered"
        assert statuses(other.client.submit_jobs(specs)) == ["queued"] * 5   # (they exist)
        assert len(other.client.list_jobs()) == 5
    finally:
        r.close()
        proxy.close()


@pytest.mark.parametrize("backend", ["redis-bloom", "bloom"])
def test_a_bloom_key_whose_job_was_never_queued_goes_to_a_resend_under_a_new_id(
        make_cluster, redis_url, backend):
    """A master SIGKILLed between the filter and the queue left the key taken for a job
    that never existed (`bloom`: in the snapshot the restarted master loads). A resend under
    a new job_id (a client that lets the master or `Job.submit` pick ids, as a rerun
    parent's children do) was "filtered" for good: the job was lost. As with `set`, past
    DEDUPE_TAKEOVER_AFTER the next job with the key takes it over, once."""
    port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    proxy = HoldingProxy(port, enqueue_sha())
    r = redis.Redis.from_url(redis_url)
    settings = {"FILTER_BACKEND": backend, "DEDUPE_TAKEOVER_AFTER": 1}
    try:
        c = make_cluster(REDIS_URL=f"redis://127.0.0.1:{proxy.port}/0",
                         BLOOM_SNAPSHOT_INTERVAL=1, **settings)
        spec = Echo.spec(["p"], dedupe_key="http://x/9")      # no job_id: a fresh one each time
        submit_as_its_master_dies(
            c, lambda cl: cl.submit_job(spec),
            lambda: r.hget(f"{PREFIX}:dedupe:stats:global", "items") == b"1",
            "the filter took the key")
        other = make_cluster(**settings)
        other.start_master()
        first = wait_for(lambda: (lambda got: got if got["status"] == "queued" else None)(
            other.client.submit_job(spec)), what="a resend queued")
        assert other.client.submit_job(spec)["status"] == "filtered"
        assert [j["job_id"] for j in other.client.list_jobs()] == [first["job_id"]]
    finally:
        r.close()
        proxy.close()
