"""Redis that is up but refuses writes (maxmemory with noeviction) is an outage for the
caller, answered with code redis_unavailable and a clear message, not an internal error."""

from __future__ import annotations

import asyncio
import logging
import contextlib
import os
import signal
import time

import pytest
import redis

from elric.config import load_settings
from elric.master import Master
from elric.redis_server import RedisServer, free_port
from elric.rpc import RemoteError
from tests.conftest import Cluster, wait_for
from elric.keys import Keys
from tests.jobs import Add, MarkSleep, Sleep

KEYS = Keys("elric")


def fill_until_refused(r: redis.Redis) -> None:
    """Data in, then maxmemory below what is used: every write that needs memory is
    refused (a limit just above the use is crossed only while a big write is read)."""
    block = b"x" * 64 * 1024
    for i in range(64):
        r.set(f"filler:{i}", block)
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", int(r.info("memory")["used_memory"]) - 1024 * 1024)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        r.set("one-more", block)


def test_a_submit_refused_for_lack_of_memory_is_redis_unavailable(own_redis, tmp_path):
    c = Cluster(own_redis.url, tmp_path)
    r = redis.Redis.from_url(own_redis.url)
    try:
        c.start_master()
        fill_until_refused(r)
        spec = Add.spec([1, 2], job_id="oom-1")
        with pytest.raises(RemoteError) as info:
            c.client.submit_job(spec)
        assert info.value.code == "redis_unavailable", str(info.value)
        assert str(info.value) == ("Redis is out of memory (maxmemory): nothing was queued, "
                                   "try again")
        assert info.value.job_ids == ["oom-1"]   # to send it again with
        assert c.client.ping() == "pong"

        r.config_set("maxmemory", 0)
        assert c.client.submit_job(spec)["job_id"] == "oom-1"
        assert c.client.get_job("oom-1")["status"] == "queued"
        listed = [j["job_id"] for j in c.client.list_jobs(limit=1000)]
        assert listed.count("oom-1") == 1 and len(listed) == 1, listed
    finally:
        r.close()
        c.close()


def test_workers_ride_out_a_full_redis(own_redis, tmp_path):
    """A worker started while Redis refuses writes waits instead of exiting; one holding a
    slow job through a full Redis, past its lease, keeps it and records it afterwards."""
    c = Cluster(own_redis.url, tmp_path, LEASE_SECONDS=2)
    r = redis.Redis.from_url(own_redis.url)
    try:
        c.start_master()
        busy = c.start_worker("--concurrency", "1")
        c.client.submit_jobs([Sleep.spec([4], job_id="slow"), Add.spec([1, 2], job_id="later")])
        wait_for(lambda: c.client.get_job("slow")["status"] == "running", what="slow started")
        fill_until_refused(r)
        late = c.start_worker("--concurrency", "1", wait=False)
        full = "command not allowed when used memory > 'maxmemory'"
        wait_for(lambda: full in late.log(), what="the late worker waits")
        # its heartbeats renew its lease: the 4 s job ends, past its 2 s lease, still its
        wait_for(lambda: "job slow tests.jobs:Sleep: succeeded" in busy.log(),
                 what="the busy worker's job ended in a full Redis")
        assert busy.alive() and late.alive(), c.logs()
        r.config_set("maxmemory", 0)
        assert c.wait_job("slow")["status"] == "succeeded", c.logs()
        assert c.client.get_job("slow")["attempts"] == 1, c.logs()
        assert c.wait_job("later")["result"] == 3, c.logs()
        wait_for(lambda: len(c.client.stats()["workers"]) == 2, what="both registered")
        assert busy.alive() and late.alive(), c.logs()
    finally:
        r.close()
        c.close()


def test_a_worker_waiting_to_register_in_a_full_redis_stops_when_told(own_redis, tmp_path):
    """A stop while its first heartbeat was refused went unheard: the worker waited for
    Redis to take writes again, for good (seen when a test's Redis died under a worker)."""
    c = Cluster(own_redis.url, tmp_path)
    r = redis.Redis.from_url(own_redis.url)
    try:
        c.start_master()
        fill_until_refused(r)
        worker = c.start_worker("--concurrency", "1", wait=False)
        wait_for(lambda: "Redis is out of memory" in worker.log(),
                 what="the worker waiting to register")
        worker.signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, worker.log()
    finally:
        r.close()
        c.close()


@pytest.mark.parametrize("exc, reason", [
    (redis.exceptions.OutOfMemoryError("command not allowed"), "out of memory (maxmemory)"),
    (redis.exceptions.ReadOnlyError("You can't write against a read only replica."),
     "read-only replica"),
    (redis.exceptions.BusyLoadingError("Redis is loading the dataset in memory"), "loading"),
    # as elric.rawredis and redis-py's generic path give them: the code starts the message
    (redis.exceptions.ResponseError("OOM command not allowed when used memory > 'maxmemory'"),
     "out of memory"),
    (redis.exceptions.ResponseError("MISCONF Redis is configured to save RDB snapshots, but "
                                    "it's currently unable to persist to disk"), "MISCONF"),
    (redis.exceptions.ResponseError("BUSY Redis is busy running a script."), "busy"),
    # as a pipeline raises them (raise_on_error): redis-py's words before Redis's
    (redis.exceptions.ResponseError("Command # 1 (GET k) of pipeline caused error: BUSY "
                                    "Redis is busy running a script."), "busy"),
    (redis.exceptions.ResponseError("Command # 2 (SREM s k) of pipeline caused error: "
                                    "MISCONF Redis is configured to save RDB snapshots"),
     "MISCONF"),
    (redis.exceptions.ResponseError("Command # 1 (HGET h f) of pipeline caused error: "
                                    "WRONGTYPE Operation against a key"), None),
    # as Redis 6.2 words one a script met
    (redis.exceptions.ResponseError(
        "Error running script (call to f_fd91cf05327aa47d0befcdf546ecf68dfa32f6fa): "
        "@user_script:35: @user_script: 35: -OOM command not allowed when used memory > "
        "'maxmemory'."), "out of memory"),
    (redis.exceptions.ResponseError(
        "Error running script (call to f_6f5af249e1a570a95df2ad63b243f49abb72611b): "
        "@user_script:1: @user_script: 1: -READONLY You can't write against a read only "
        "replica."), "read-only replica"),
    (redis.exceptions.ResponseError(
        "Error running script (call to f_6f5af249e1a570a95df2ad63b243f49abb72611b): "
        "@user_script:1: @user_script: 1: -WRONGTYPE Operation against a key"), None),
    (redis.exceptions.ResponseError("ERR wrong number of arguments"), None),
    (ValueError("OOM"), None),
])
def test_redis_refusal_recognises_each_refusal(exc, reason):
    from elric.retry import redis_refusal

    got = redis_refusal(exc)
    assert got is None if reason is None else reason in got


def test_a_submit_refused_for_memory_gives_back_no_key_another_job_holds(own_redis, tmp_path):
    """The dedupe check refused for memory took no key: giving back its specs' keys freed
    the one an earlier job holds, and the resent job ran as a second job of that key."""
    c = Cluster(own_redis.url, tmp_path)
    r = redis.Redis.from_url(own_redis.url)
    try:
        c.start_master()
        assert c.client.submit_job(Add.spec([1, 2], job_id="first", dedupe_key="k"))[
            "status"] == "queued"
        fill_until_refused(r)
        second = Add.spec([3, 4], job_id="second", dedupe_key="k")
        with pytest.raises(RemoteError) as info:
            c.client.submit_job(second)
        assert info.value.code == "redis_unavailable", str(info.value)
        r.config_set("maxmemory", 0)
        assert c.client.submit_job(second)["status"] == "filtered"
        assert c.client.get_job("second") is None
    finally:
        r.close()
        c.close()


def test_a_master_with_limits_started_while_redis_is_full_waits(own_redis):
    """Publishing LIMITS was the one write of a master's start not retried: started while
    Redis refused writes, the master exited, and its supervisor restarted it into the same
    refusal."""
    r = redis.Redis.from_url(own_redis.url)
    waited = []

    class Seen(logging.Handler):
        def emit(self, record):
            waited.append(record.getMessage())

    async def main():
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=own_redis.url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}",
            LIMITS={"host": {"concurrency": 1}})))
        starting = asyncio.ensure_future(m.start())
        deadline = time.monotonic() + 20
        while not any("publishing LIMITS" in w for w in waited):
            assert not starting.done(), starting.exception()
            assert time.monotonic() < deadline, "the master never tried to publish LIMITS"
            await asyncio.sleep(0.02)
        r.config_set("maxmemory", 0)
        await asyncio.wait_for(starting, 20)
        try:
            assert r.hgetall("elric:limits") == {b"host": b"1,"}
        finally:
            await m.close()

    handler = Seen()
    logging.getLogger("elric.master").addHandler(handler)
    try:
        fill_until_refused(r)
        asyncio.run(main())
    finally:
        logging.getLogger("elric.master").removeHandler(handler)
        r.close()


def test_a_full_redis_neither_takes_a_running_job_away_nor_runs_it_twice(own_redis, tmp_path):
    """Redis refuses a script under maxmemory only at its first write that may grow memory:
    the redelivery of jobs whose lease ran out (its first write a ZREM) passed, while every
    heartbeat (a ZADD first) was refused. A job running through a full Redis lost its lease
    and ran again, once per lease, as long as Redis stayed full. Leases are renewed."""
    c = Cluster(own_redis.url, tmp_path, LEASE_SECONDS=2)
    r = redis.Redis.from_url(own_redis.url)
    marks = tmp_path / "runs.txt"
    try:
        c.start_master()
        worker = c.start_worker("--concurrency", "1")
        c.client.submit_job(MarkSleep.spec([str(marks), 5], job_id="long"))
        wait_for(lambda: marks.exists() and marks.read_text(), what="the job started")
        fill_until_refused(r)
        # it runs its 5 s, past two leases, in a full Redis
        wait_for(lambda: "job long tests.jobs:MarkSleep:" in worker.log(), timeout=30,
                 what="the job ended")
        r.config_set("maxmemory", 0)
        assert c.wait_job("long")["status"] == "succeeded", c.logs()
        assert marks.read_text().split() == ["long"], c.logs()   # it ran once
        assert c.client.get_job("long")["attempts"] == 1
    finally:
        r.config_set("maxmemory", 0)
        r.close()
        c.close()


def test_a_master_warns_when_redis_would_evict_its_jobs(own_redis, tmp_path):
    """With an eviction policy a full Redis drops keys instead of refusing writes: accepted
    jobs then vanished (2,601 of 4,000 in a run with allkeys-lru) and no log said why."""
    r = redis.Redis.from_url(own_redis.url)
    c = Cluster(own_redis.url, tmp_path)
    try:
        quiet = c.start_master()
        r.config_set("maxmemory-policy", "allkeys-lru")
        warned = c.start_master(address=f"127.0.0.1:{free_port()}")
        wait_for(lambda: "listening on" in warned.log(), what="the second master up")
        assert "maxmemory-policy allkeys-lru" in warned.log(), warned.log()
        assert ("Redis evicts keys when it is full (maxmemory-policy allkeys-lru): jobs it "
                "accepted may vanish; set maxmemory-policy noeviction") in warned.log()
        assert "maxmemory-policy" not in quiet.log(), quiet.log()
    finally:
        r.close()
        c.close()


def refuse_writes_misconf(r: redis.Redis, folder: str) -> None:
    """A snapshot that cannot be saved, with stop-writes-on-bgsave-error: Redis answers
    MISCONF to every write, and to PING. (A folder where the snapshot goes: as root no
    permission stops the save, and CONFIG SET dir is refused on Redis 7.)"""
    r.config_set("save", "3600 1")   # (MISCONF only while some save point is set)
    r.config_set("stop-writes-on-bgsave-error", "yes")
    os.makedirs(os.path.join(folder, r.config_get("dbfilename")["dbfilename"], "in-the-way"))
    r.bgsave()
    wait_for(lambda: (lambda p: p["rdb_last_bgsave_status"] == "err" and not
                      p["rdb_bgsave_in_progress"])(r.info("persistence")), what="save failed")
    with pytest.raises(redis.exceptions.ResponseError, match="^MISCONF"):
        r.ping()


@contextlib.contextmanager
def master_on_a_redis_refusing_writes(server: RedisServer, tmp_path):
    """A master on ``server`` (the test's own) that answers MISCONF from then on: yields
    the cluster and a client of that Redis (``stop-writes-on-bgsave-error no`` lifts it)."""
    c = Cluster(server.url, tmp_path)
    r = redis.Redis.from_url(server.url)
    try:
        c.start_master()
        refuse_writes_misconf(r, server.dir)
        yield c, r
    finally:
        c.close()
        # no save point left: with one, the snapshot SIGTERM asks for fails as the others
        # did, Redis refuses to exit, and its stop waited the 10 s before a SIGKILL
        with contextlib.suppress(redis.exceptions.RedisError):
            r.config_set("save", "")
        r.close()


def test_a_worker_started_while_redis_refuses_writes_says_what_redis_answered(own_redis,
                                                                              tmp_path):
    """Redis answering MISCONF to the start-up PING was logged as "cannot reach Redis":
    an operator looked for a network fault while Redis, reachable, refused writes."""
    with master_on_a_redis_refusing_writes(own_redis, tmp_path) as (c, r):
        worker = c.start_worker("--concurrency", "1", wait=False)
        wait_for(lambda: "retrying" in worker.log(), what="the worker waits for Redis")
        assert "cannot save its snapshot (MISCONF)" in worker.log(), worker.log()
        assert "cannot reach Redis" not in worker.log(), worker.log()
        r.config_set("stop-writes-on-bgsave-error", "no")
        wait_for(lambda: any(w.get("pid") == worker.pid for w in c.client.stats()["workers"]),
                 what="the worker registered once Redis takes writes")
