"""A master or worker stopped while its Redis is frozen (SIGSTOPped: connects and writes
pass, nothing answers): it stops within its bounds, says what it could not do, and exits
non-zero when something is lost. In-process, with short timeouts, so each test takes about
a second; the same stop of a real process takes the clients' 5 s socket timeout per call
it waits on."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from types import SimpleNamespace

from elric import dedupe, master as master_module, worker as worker_module
from elric.config import load_settings
from elric.master import Master
from elric.redis_server import free_port
from elric.retry import REDIS_CLIENT_OPTIONS

E = "tests.jobs:Echo"


def stop_while_frozen(redis_server, redis_url, monkeypatch, **settings) -> Master:
    """Start a master, take a dedupe key, freeze Redis, stop the master; Redis is thawed
    whatever happens."""
    monkeypatch.setattr(master_module, "STOP_GRACE", 0.3)
    monkeypatch.setattr(dedupe, "LAST_SNAPSHOT_WAIT", 0.3)
    monkeypatch.setattr(master_module, "REDIS_CLIENT_OPTIONS",
                        {**REDIS_CLIENT_OPTIONS, "socket_timeout": 0.6})

    async def main() -> Master:
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}",
            SCHEDULER_LEASE=0.3, **settings)))
        await m.start()
        while not m.scheduler.is_leader:   # its stop then has a lease to give up
            await asyncio.sleep(0.01)
        await m.submit_jobs([{"func": E, "job_id": "j", "dedupe_key": "k"}])
        redis_server.proc.send_signal(signal.SIGSTOP)   # alive, answering nothing
        try:
            await asyncio.wait_for(m.close(), 20)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        return m
    return asyncio.run(main())


def test_a_master_stopped_while_redis_is_frozen_says_why_its_scheduler_did_not_stop(
        redis_server, redis_url, monkeypatch, caplog):
    """Its scheduler's stop timed out: the warning ended in an empty reason, "scheduler did
    not stop cleanly: ", and said nothing of the lease it could not give up."""
    caplog.set_level(logging.INFO)
    stop_while_frozen(redis_server, redis_url, monkeypatch)
    [said] = [r.getMessage() for r in caplog.records if "scheduler did not stop" in
              r.getMessage()]
    assert said == ("scheduler did not stop cleanly: no answer from Redis within 0.3s; "
                    "another master schedules once its lease (SCHEDULER_LEASE) runs out"), said


def test_a_master_whose_last_bloom_snapshot_fails_says_what_is_lost_and_exits_1(
        redis_server, redis_url, monkeypatch, caplog):
    """The keys a 'bloom' filter took since its last snapshot are only in the master: Redis
    frozen at the stop, they were lost (the same job was accepted again after a restart),
    and the master exited 0 after a warning that it "did not close cleanly"."""
    m = stop_while_frozen(redis_server, redis_url, monkeypatch, FILTER_BACKEND="bloom",
                          BLOOM_CAPACITY=1000, BLOOM_SNAPSHOT_INTERVAL=3600)
    assert m.exit_code == 1
    [said] = [r for r in caplog.records if "dedupe filter bloom" in r.getMessage()]
    assert said.levelno == logging.ERROR, said.getMessage()
    assert "could not write its last snapshot" in said.getMessage()
    assert ("the dedupe keys it took since its previous snapshot are lost: a job with one of "
            "them is accepted again") in said.getMessage()


def test_a_stop_cuts_short_the_worker_loops_redis_call_that_gets_no_answer(monkeypatch):
    """The worker's loop heard a stop between its Redis calls only: with Redis frozen each
    call waits out the socket timeout (5 s), and a turn makes several (the claims of a lost
    fetch asked for, then a fetch). A stop 0.5 s into such a turn was heard 9 s later: the
    running jobs outlived a short SHUTDOWN_GRACE, and the exit came 15 s after the SIGTERM,
    past the bound of SHUTDOWN_GRACE + 10 s. Past STOP_HEARD the call is cut short, and
    the claims it may have made are looked for by the stop (``_release_unknown``)."""
    monkeypatch.setattr(worker_module, "STOP_HEARD", 0.2, raising=False)

    async def main():
        w = worker_module.Worker(load_settings(env={"ELRIC_JOB_MODULES": "tests.jobs"}),
                                 concurrency=1)
        w.pool = SimpleNamespace(claims=lambda: [], last_async=False, flush=lambda: None,
                                 kill_overdue=lambda: None, longest_sync_run=lambda: 0.0)
        sent = asyncio.Event()

        async def fetch(*args, **kwargs):   # Redis frozen: no answer (for 5 s, each call)
            sent.set()
            await asyncio.Event().wait()
        w.queue = SimpleNamespace(fetch=fetch)
        loop = asyncio.create_task(w._loop())
        await asyncio.wait_for(sent.wait(), 10)
        w.request_stop()
        heard = time.monotonic()
        try:
            await asyncio.wait_for(asyncio.shield(loop), 5)
        except asyncio.TimeoutError:
            loop.cancel()
            raise AssertionError("the stop was not heard while the fetch got no answer")
        assert time.monotonic() - heard < 2
        assert w._unsure_since is not None   # the fetch may have claimed jobs: asked at stop
    asyncio.run(main())
