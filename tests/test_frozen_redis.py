"""A master or worker stopped while its Redis is frozen (SIGSTOPped: connects and writes
pass, nothing answers): it stops within its bounds, says what it could not do, and exits
non-zero when something is lost. In-process, with short timeouts, so each test takes about
a second; the same stop of a real process takes the clients' 5 s socket timeout per call
it waits on."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import time
from types import SimpleNamespace

import pytest

from elric import master as master_module, worker as worker_module
from elric.config import load_settings
from elric.master import Master
from elric.redis_server import free_port
from elric.rpc import AsyncClient, RPCConnectionError
from elric.retry import REDIS_CLIENT_OPTIONS

E = "tests.jobs:Echo"


def stop_while_frozen(redis_server, redis_url, monkeypatch, *, socket_timeout=0.6,
                      calling=False, **settings) -> Master:
    """Start a master, take a dedupe key, freeze Redis (``calling``: then make an RPC call
    that waits on it), stop the master; Redis is thawed whatever happens. The stop must end
    within MASTER_STOP_TIMEOUT (and a margin for a loaded machine)."""
    monkeypatch.setattr(master_module, "REDIS_CLIENT_OPTIONS",
                        {**REDIS_CLIENT_OPTIONS, "socket_timeout": socket_timeout})
    settings = {"MASTER_STOP_TIMEOUT": 1.0, "SCHEDULER_LEASE": 0.3, **settings}

    async def main() -> Master:
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}", **settings)))
        host, port = await m.start()
        while not m.scheduler.is_leader:   # its stop then has a lease to give up
            await asyncio.sleep(0.01)
        await m.submit_jobs([{"func": E, "job_id": "j", "dedupe_key": "k"}])
        redis_server.proc.send_signal(signal.SIGSTOP)   # alive, answering nothing
        try:
            if calling:
                client = await AsyncClient.connect(host, port)
                call = asyncio.ensure_future(client.call("submit_job", {
                    "func": E, "job_id": "j2", "dedupe_key": "k2"}))
                await wait_for(lambda: m.admission._admitting)   # in flight, waiting on Redis
            try:
                await asyncio.wait_for(m.close(), settings["MASTER_STOP_TIMEOUT"] + 1)
            except asyncio.TimeoutError:
                raise AssertionError("the stop took longer than MASTER_STOP_TIMEOUT") from None
            if calling:   # its caller is not left waiting: the call was cut, and said
                with pytest.raises(RPCConnectionError):
                    await asyncio.wait_for(call, 5)
                await client.close()
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        return m
    return asyncio.run(main())


async def wait_for(condition, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "waited in vain"
        await asyncio.sleep(0.01)


BLOOM = dict(FILTER_BACKEND="bloom", BLOOM_CAPACITY=1000, BLOOM_SNAPSHOT_INTERVAL=3600)


def said(caplog, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


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
    m = stop_while_frozen(redis_server, redis_url, monkeypatch, **BLOOM)
    assert m.exit_code == 1
    [said] = [r for r in caplog.records if "dedupe filter bloom" in r.getMessage()]
    assert said.levelno == logging.ERROR, said.getMessage()
    assert "could not write its last snapshot" in said.getMessage()
    assert ("the dedupe keys it took since its previous snapshot are lost: a job with one of "
            "them is accepted again") in said.getMessage()


def test_a_master_stopped_while_redis_is_frozen_stops_within_master_stop_timeout(
        redis_server, redis_url, monkeypatch, caplog):
    """Each step of the stop had a bound of its own, and they added up: a call in flight
    (10 s), the scheduler's stop (SCHEDULER_LEASE), the background tasks (10 s), the
    clean-up of a cut call (10 s), the last Bloom snapshot (20 s): with Redis frozen, near
    a minute, past a supervisor's stop timeout, whose SIGKILL lost the snapshot unsaid.
    They share MASTER_STOP_TIMEOUT now, the snapshot keeping its share, and each cut is
    said with what it means."""
    caplog.set_level(logging.INFO)
    m = stop_while_frozen(redis_server, redis_url, monkeypatch, socket_timeout=5,
                          calling=True, MASTER_STOP_TIMEOUT=1.0, **BLOOM)
    assert said(caplog, "stopping (within 1s: MASTER_STOP_TIMEOUT")
    [calls] = said(caplog, "still had calls in flight")
    assert "their callers get no answer" in calls, calls
    [scheduler] = said(caplog, "scheduler did not stop cleanly")
    assert "another master schedules once its lease" in scheduler, scheduler
    [cleanups] = said(caplog, "clean-up(s) of failed calls cut short")
    assert "stay taken" in cleanups, cleanups
    [lost] = said(caplog, "could not write its last snapshot")
    assert re.search(r"no answer from Redis within the 0\.\ds the stop left it", lost), lost
    assert m.exit_code == 1


def test_a_second_sigterm_ends_a_masters_stop_at_once_and_says_what_it_cut(
        redis_server, redis_url, monkeypatch, caplog):
    """A second SIGTERM or Ctrl-C did nothing: a master stopping with Redis frozen could
    not be told to give up but by SIGKILL, which says nothing of what it loses."""
    caplog.set_level(logging.INFO)
    monkeypatch.setattr(master_module.gc, "freeze", lambda: None)   # the test process's
    monkeypatch.setattr(master_module.gc, "set_threshold", lambda *a: None)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}

    async def main() -> int:
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}",
            SCHEDULER_LEASE=0.3, MASTER_STOP_TIMEOUT=30, **BLOOM)))
        running = asyncio.create_task(m.run())
        # (its signal handlers are set as its start ends, before the scheduler leads)
        await wait_for(lambda: getattr(m, "scheduler", None) and m.scheduler.is_leader)
        await m.submit_jobs([{"func": E, "job_id": "j", "dedupe_key": "k"}])
        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            await wait_for(m._stop.is_set)   # stopping
            os.kill(os.getpid(), signal.SIGTERM)
            try:
                return await asyncio.wait_for(running, 2)
            except asyncio.TimeoutError:
                raise AssertionError("a second SIGTERM did not end the stop") from None
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
    try:
        assert asyncio.run(main()) == 1
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert said(caplog, "told again to stop")
    [lost] = said(caplog, "could not write its last snapshot")
    assert "cut short by a second stop" in lost, lost


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


def test_a_dashboard_that_fails_to_close_is_said_once_not_left_as_a_stray_error(
        redis_url, caplog):
    """The stop closes the dashboard as a task of its own: its error was never retrieved, so
    asyncio printed it as a stray traceback at exit, and the stop's log said nothing."""
    stray = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _, ctx: stray.append(ctx))
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}",
            DASHBOARD_ADDRESS=f"127.0.0.1:{free_port()}")))
        await m.start()
        opened = m.dashboard.close

        async def fails() -> None:
            await opened()
            raise RuntimeError("its runner broke")
        m.dashboard.close = fails
        await m.close()
        del m
        import gc
        gc.collect()   # a task's unretrieved error is reported when it is collected

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
    assert said(caplog, "the dashboard did not close cleanly: its runner broke")
    assert stray == [], stray
