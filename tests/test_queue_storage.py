"""How a queued job is stored: one hash holding only the fields that differ from their
default, plus a member of its queue's sorted set, its only index while it waits; an
enqueue sent twice queues each job once.

In-process against the private redis-server; pytest-asyncio is not installed, so each test
drives its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import redis.asyncio as aredis

from elric.contract import Refused, normalize_spec
from elric.keys import Keys
from elric.queue import ENQUEUE_STEP, STALE, RedisQueue
from tests.conftest import lost_run_and_next, outcome

KEYS = Keys("elrictest")
FUNC = "tests.jobs:Echo"


def specs(n, **extra):
    return [normalize_spec({"func": FUNC, "args": [i], **extra}) for i in range(n)]


async def with_queue(url, body):
    r = aredis.Redis.from_url(url)
    try:
        return await body(RedisQueue(r, KEYS), r)
    finally:
        await r.aclose()


def test_fields_at_their_default_are_not_written_and_read_as_the_default(redis_url):
    async def body(q, r):
        plain, = specs(1)
        ranked, = specs(1, priority=5, batch="b1", job_id="ranked")
        await q.enqueue([plain, ranked])
        h = await r.hgetall(KEYS.job(plain["job_id"]))
        assert set(h) == {b"status", b"queue", b"enqueued_at", b"member", b"func", b"args"}
        view = await q.get_job(plain["job_id"])
        assert (view["priority"], view["attempts"], view["batch"]) == (0, 0, None)
        h = await r.hgetall(KEYS.job("ranked"))
        assert (h[b"priority"], h[b"batch"]) == (b"5", b"b1")
        view = await q.get_job("ranked")
        assert (view["priority"], view["batch"], view["args"]) == (5, "b1", [0])

        # fetched, then given back: each job returns to its place in line
        got = (await q.fetch("w1", ["default"], 10, 30)).claims
        assert [g.job_id for g in got] == ["ranked", plain["job_id"]]
        assert [g.attempt for g in got] == [1, 1]
        assert await q.release("w1", [g.run for g in got]) == 2
        line = await r.zrange(KEYS.queue("default"), 0, -1, withscores=True)
        assert [(m.decode()[17:], s) for m, s in line] == [("ranked", -5.0),
                                                          (plain["job_id"], 0.0)]
        assert (await q.get_job(plain["job_id"]))["attempts"] == 0
        # and the lease of a dead worker runs out: recover requeues them the same way
        got = (await q.fetch("w2", ["default"], 10, 0)).claims
        assert len(got) == 2
        back, cancelled, _ = await q.recover()
        assert sorted(back) == sorted(g.job_id for g in got) and cancelled == []
        assert await r.zcard(KEYS.queue("default")) == 2
    asyncio.run(with_queue(redis_url, body))


def test_queued_jobs_are_indexed_by_their_queue_only(redis_url):
    async def body(q, r):
        a = specs(7, queue="qa")
        b = specs(5, queue="qb", priority=3)
        await q.enqueue(a + b)
        assert not await r.exists(KEYS.status("queued"))
        stats = await q.stats()
        assert stats["by_status"]["queued"] == 12
        assert (stats["by_queue"]["qa"]["queued"], stats["by_queue"]["qb"]["queued"]) == (7, 5)

        everything = {s["job_id"] for s in a + b}
        listed = await q.list_jobs(status="queued", limit=100)
        assert {j["job_id"] for j in listed} == everything
        assert all(j["status"] == "queued" for j in listed)
        assert {j["job_id"] for j in await q.list_jobs(limit=100)} == everything
        assert {j["job_id"] for j in await q.list_jobs(queue="qb")} == {s["job_id"] for s in b}
        # per queue, the last in line first
        assert [j["job_id"] for j in await q.list_jobs(queue="qa")] == \
            [s["job_id"] for s in reversed(a)]
        pages = [await q.list_jobs(status="queued", offset=o, limit=5) for o in (0, 5, 10, 15)]
        assert [len(p) for p in pages] == [5, 5, 2, 0]
        paged = [j["job_id"] for p in pages for j in p]
        assert sorted(paged) == sorted(everything)     # none twice, none left out

        # a fetched job leaves the queued listing at once
        got = (await q.fetch("w1", ["qb"], 2, 30)).claims
        running = {g.job_id for g in got}
        assert {j["job_id"] for j in await q.list_jobs(status="queued")} == everything - running
        assert {j["job_id"] for j in await q.list_jobs(status="running")} == running
        assert (await q.stats())["by_status"]["queued"] == 10
        # a removed queued job is gone from the listing too
        gone = a[0]["job_id"]
        assert await q.remove(gone) is True
        assert gone not in {j["job_id"] for j in await q.list_jobs(status="queued")}
    asyncio.run(with_queue(redis_url, body))


def test_a_list_by_func_or_batch_reads_only_the_jobs_it_lists(redis_url):
    """A list by func or batch (or by queue outside the queued lines) read every job it
    passed over into the master: a page of a rare func among 200,000 jobs took seconds.
    Redis now picks the matches, so it sends the page, not the jobs passed over; the lists
    are those of filtering every job, through statuses, offsets and gone or overwritten
    jobs."""
    rare = "tests.jobs:Add"

    async def body(q, r):
        await q.enqueue([normalize_spec({
            "func": rare if i % 50 == 0 else FUNC, "args": ["x" * 200], "job_id": f"j{i}",
            "batch": f"b{i % 7}", "queue": f"q{i % 2}"}) for i in range(1500)])
        claims = (await q.fetch("w", ["q0", "q1"], 600, 30)).claims
        await q.finish("w", [outcome(c, ok=i % 3 > 0) for i, c in enumerate(claims[:500])])
        await q.remove("j750")                        # deleted while queued
        await r.delete(KEYS.job("j0"))                # ended, then expired
        await r.set(KEYS.job("j7"), "overwritten")    # an operator's mistake
        sent = (await r.info("stats"))["total_net_output_bytes"]
        page = await q.list_jobs(func=rare, limit=50)
        assert (await r.info("stats"))["total_net_output_bytes"] - sent < 100_000
        everything = await q.list_jobs(limit=10_000)
        assert len(everything) == 1498

        def expect(status=None, **filters):
            return [row["job_id"] for row in everything
                    if status in (None, row["status"]) and all(
                        row[name] == value for name, value in filters.items())]
        assert [row["job_id"] for row in page] == expect(func=rare)[:50]
        assert len(page) == 28 and len({row["status"] for row in page}) == 4
        assert await r.zscore(KEYS.status("failed"), "j0") is None   # its entry went too
        for filters in ({"batch": "b3"}, {"batch": "b3", "status": "succeeded"},
                        {"func": rare, "queue": "q0"}, {"queue": "q1", "status": "failed"},
                        {"func": FUNC, "batch": "b0", "status": "queued"}, {"batch": "nope"}):
            whole = expect(**filters)
            assert [row["job_id"] for row in await q.list_jobs(**filters, limit=10_000)] == whole
            pages = [await q.list_jobs(**filters, offset=o, limit=40) for o in (0, 40, 80)]
            assert [row["job_id"] for p in pages for row in p] == whole[:120]
        # a deep page reads its own jobs alone, not those before its offset
        sent = (await r.info("stats"))["total_net_output_bytes"]
        deep = await q.list_jobs(batch="b1", offset=150, limit=10)
        assert (await r.info("stats"))["total_net_output_bytes"] - sent < 30_000
        assert [row["job_id"] for row in deep] == expect(batch="b1")[150:160]
        # at most scan_limit entries looked at: the first of them (q0's line holds every
        # queued job of the rare func)
        looked = await r.zcard(KEYS.queue("q0"))
        assert [row["job_id"] for row in await q.list_jobs(func=rare, scan_limit=looked)] == \
            expect(func=rare, status="queued")
    asyncio.run(with_queue(redis_url, body))


def test_a_job_id_that_exists_is_left_alone_and_its_status_answered(redis_url):
    async def body(q, r):
        chosen = [normalize_spec({"func": FUNC, "job_id": f"mine-{i}"}) for i in range(3)]
        out = await q.enqueue(chosen)
        assert [(o.status, o.existed) for o in out] == [("queued", False)] * 3
        await q.fetch("w1", ["default"], 100, 30)
        fresh = specs(2)
        mixed = await q.enqueue([fresh[0], chosen[2], fresh[1], chosen[1]])
        assert [(m.job_id, m.status, m.existed) for m in mixed] == [
            (fresh[0]["job_id"], "queued", False), ("mine-2", "running", True),
            (fresh[1]["job_id"], "queued", False), ("mine-1", "running", True)]
        assert (await q.stats())["by_queue"]["default"]["queued"] == 2
        assert await r.hget(KEYS.counters, "submitted") == b"5"
    asyncio.run(with_queue(redis_url, body))


def test_the_same_enqueue_run_twice_queues_each_job_once(redis_url):
    """redis-py re-sends a command whose reply was lost: the script then runs twice with
    the same arguments, and the second run finds every job in place."""
    async def body(q, r):
        real, sent = q._enqueue, []

        async def sent_twice(keys, args):
            sent.append((keys, args))
            await real(keys=keys, args=args)
            return await real(keys=keys, args=args)
        q._enqueue = sent_twice
        batch = specs(50, batch="twice")
        out = await q.enqueue(batch)
        assert {o.status for o in out} == {"queued"}
        assert (await q.stats())["by_queue"]["default"]["queued"] == 50
        assert await r.hget(KEYS.counters, "submitted") == b"50"
        assert await r.hget(KEYS.batch("twice"), "submitted") == b"50"
        # and a replay after a worker took some: their status comes back, none is re-queued
        got = (await q.fetch("w1", ["default"], 10, 30)).claims
        again = await real(keys=sent[0][0], args=sent[0][1])
        assert [int(x) for x in again[::2]] == list(range(1, 51))
        assert sorted(x.decode() for x in again[1::2]) == ["queued"] * 40 + ["running"] * 10
        rest = (await q.fetch("w1", ["default"], 100, 30)).claims
        assert sorted(g.job_id for g in got + rest) == sorted(s["job_id"] for s in batch)
    asyncio.run(with_queue(redis_url, body))


def test_a_big_submission_is_queued_a_step_at_a_time_in_order(redis_url):
    """One script call queued a whole call's jobs: 10,000 of them held Redis 0.1-0.6 s
    among 200,000 jobs, and every worker's fetch and finish waited. It goes in steps of
    ENQUEUE_STEP jobs now, each job queued once, in order, its answer in its place."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": f"old-{i}"}) for i in range(3)])
        await q.fetch("w1", ["default"], 1, 30)
        batch = specs(2 * ENQUEUE_STEP + 500, batch="big")
        at = {ENQUEUE_STEP - 1: "old-0", ENQUEUE_STEP: "old-1", 2 * ENQUEUE_STEP + 499: "old-2"}
        for i, job_id in at.items():
            batch[i] = normalize_spec({"func": FUNC, "job_id": job_id})
        batch[ENQUEUE_STEP + 1] = batch[ENQUEUE_STEP - 2]   # an id twice, across a step
        calls = (await r.info("commandstats"))["cmdstat_evalsha"]["calls"]
        out = await q.enqueue(batch)
        assert (await r.info("commandstats"))["cmdstat_evalsha"]["calls"] - calls == 3
        assert [(o.job_id, o.status) for o in out if o.existed] == [
            ("old-0", "running"), ("old-1", "queued"), (batch[ENQUEUE_STEP + 1]["job_id"],
                                                        "queued"), ("old-2", "queued")]
        assert all(o.job_id == s["job_id"] for o, s in zip(out, batch))
        new = list(dict.fromkeys(s["job_id"] for s in batch if not s["job_id"].startswith("old")))
        assert await r.hget(KEYS.batch("big"), "submitted") == str(len(new)).encode()
        got = []
        while claims := (await q.fetch("w1", ["default"], 1000, 30)).claims:
            got += claims
        assert [g.job_id for g in got] == ["old-1", "old-2"] + new
    asyncio.run(with_queue(redis_url, body))


def test_a_mixed_batch_is_queued_in_order_with_its_own_fields(redis_url):
    """Queues, priorities, batches and chosen ids that exist already, mixed in one call:
    each job is queued once, in submission order within its priority, with its own
    fields and counters."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": "old", "queue": "qb"})])
        await q.fetch("w1", ["qb"], 1, 30)
        plan = [dict(queue="qa"), dict(queue="qa", priority=2), dict(queue="qb", batch="b1"),
                dict(queue="qa", batch="b1", job_id="mine-1"), dict(queue="qb", job_id="old"),
                dict(queue="qa", batch="b1", kwargs={"x": 1}, timeout=3, max_retries=2)]
        batch = [normalize_spec({"func": FUNC, "args": [i], **extra})
                 for i, extra in enumerate(plan)]
        out = await q.enqueue(batch)
        assert [o.status for o in out] == ["queued"] * 4 + ["running", "queued"]
        got = (await q.fetch("w2", ["qa", "qb"], 10, 30)).claims
        assert [g.job_id for g in got] == [batch[i]["job_id"] for i in (1, 0, 2, 3, 5)]
        last = got[-1]
        assert (msgpack.unpackb(last.args), msgpack.unpackb(last.kwargs), last.timeout,
                last.max_retries, last.queue) == ([5], {"x": 1}, 3.0, 2, "qa")
        assert await r.hget(KEYS.batch("b1"), "submitted") == b"3"
        assert await r.hget(KEYS.counters, "queue:qa:submitted") == b"4"
        assert await q.finish("w2", [outcome(g) for g in got]) == ["succeeded"] * 5
        assert await r.hget(KEYS.batch("b1"), "succeeded") == b"3"
    asyncio.run(with_queue(redis_url, body))


def test_an_attempt_asked_to_stop_is_not_retried_and_the_request_ends_with_it(redis_url):
    """cancel_job on a running job sets a request its worker reads at a heartbeat. An
    attempt that failed before that heartbeat was retried, the cancel lost with the job
    going on; and a request left on a recorded job stopped its rerun."""
    async def body(q, r):
        [spec] = specs(1, job_id="j", max_retries=3)
        await q.enqueue([spec])
        [claim] = (await q.fetch("w", ["default"], 1, 30)).claims
        assert await q.cancel("j") == "running"
        assert await q.finish("w", [outcome(claim, False, "boom", retry_ms=100)]) == \
            ["cancelled"]
        assert await r.hget(KEYS.job("j"), "cancel") is None
        assert await q.rerun("j") == "cancelled"
        [claim] = (await q.fetch("w", ["default"], 1, 30)).claims
        assert (await q.heartbeat("w", [claim], 30)).cancel == set()
    asyncio.run(with_queue(redis_url, body))


def test_a_fetch_that_empties_a_line_takes_its_wake_tokens_with_it(redis_url):
    """An enqueue of n jobs pushes up to 16 wake tokens, one per worker it may wake. Once a
    fetch has taken the whole line, each token left would wake a worker to find nothing;
    while jobs wait in line, the tokens stay for the other workers."""
    async def body(q, r):
        await q.enqueue(specs(5))
        assert await r.llen(KEYS.wake("default")) == 5
        assert len((await q.fetch("w1", ["default"], 2, 30)).claims) == 2
        assert await r.llen(KEYS.wake("default")) == 5    # three wait: wake the others
        assert len((await q.fetch("w1", ["default"], 10, 30)).claims) == 3
        assert await r.llen(KEYS.wake("default")) == 0
        await q.enqueue(specs(1, queue="other"))         # another line keeps its own
        await q.fetch("w1", ["default"], 10, 30)
        assert await r.llen(KEYS.wake("other")) == 1
    asyncio.run(with_queue(redis_url, body))


def test_a_worker_asking_which_claims_it_holds_reads_only_the_recent_claims(redis_url):
    """After a fetch whose reply may be lost, a worker asks Redis which claims it holds
    unknown to it. That read every job in flight across the cluster (hours-long jobs of
    every other worker) each time; it now reads only the claims made since that fetch."""
    async def body(q, r):
        await q.enqueue(specs(50, queue="long"))
        assert len((await q.fetch("other", ["long"], 50, 3600)).claims) == 50
        running = KEYS.status("running")
        an_hour_ago = int(time.time() * 1000) - 3_600_000   # (the test's Redis is local)
        await r.zadd(running, {m: an_hour_ago for m in await r.zrange(running, 0, -1)})
        await q.enqueue(specs(1, job_id="mine"))
        [mine] = (await q.fetch("w1", ["default"], 1, 30)).claims
        await r.config_resetstat()
        assert await q.claimed("w1", 60) == [("mine", 1, mine.member)]
        assert (await r.info("commandstats"))["cmdstat_hmget"]["calls"] == 1
        assert await q.claimed("other", 60) == []   # claimed before the window
    asyncio.run(with_queue(redis_url, body))



def test_a_claim_whose_attempts_an_operator_overwrote_is_not_among_those_it_holds(redis_url):
    """A running job's attempts set by hand to no count (or deleted) failed the read of a
    worker's claims with a ValueError: a worker whose fetch reply was lost then exited. Such
    a claim is passed over (release.lua could not match its attempt): its lease runs out."""
    async def body(q, r):
        await q.enqueue(specs(3))
        claims = (await q.fetch("w1", ["default"], 3, 30)).claims
        await r.hset(KEYS.job(claims[0].job_id), "attempts", "abc")
        await r.hdel(KEYS.job(claims[1].job_id), "attempts")
        assert await q.claimed("w1", 60) == [claims[2].run]
    asyncio.run(with_queue(redis_url, body))

def test_a_finish_sent_again_answers_what_it_recorded_and_counts_once(redis_url):
    """A finish whose reply was lost is sent again (by redis-py or the worker's retry): the
    second run finds the outcome recorded and answers its status, not 'stale', which would
    make the worker drop the job from its counts and warn of a lost lease."""
    async def body(q, r):
        await q.enqueue(specs(1, job_id="once"))
        claim, = (await q.fetch("w1", ["default"], 1, 30)).claims
        done = [outcome(claim)]
        assert await q.finish("w1", done) == ["succeeded"]
        assert await q.finish("w1", done) == ["succeeded"]
        assert await r.hget(KEYS.counters, "succeeded") == b"1"
        assert await q.finish("w2", done) == ["stale"]   # another worker never held it
        assert await q.finish("w1", [outcome(claim, attempt=2)]) == ["stale"]
        # asked to stop while its worker was cut off: its lease ran out and Redis ended it
        # cancelled, keeping the worker's name; that worker's late outcome is not recorded
        await q.enqueue(specs(1, job_id="cut"))
        claim, = (await q.fetch("w1", ["default"], 1, 0.05)).claims
        assert await q.cancel("cut") == "running"
        deadline = time.monotonic() + 10
        while (await q.recover())[1] != ["cut"]:
            assert time.monotonic() < deadline, "the lease never ran out"
            await asyncio.sleep(0.01)
        assert await q.finish("w1", [outcome(claim)]) == ["stale"]
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("again_by", ["rerun", "resubmit"])
@pytest.mark.parametrize("holder", ["w3", "w1"], ids=["on another worker", "on its own"])
def test_a_lost_run_ending_during_a_later_run_is_not_recorded(redis_url, holder, again_by):
    """A rerun starts again from attempt 1, and so does a job submitted under an id freed
    meanwhile (the job deleted, or its record expired). A worker (w1) cut off past its lease
    went on with its attempt 1 of the job; the job ran elsewhere, was rerun or deleted and
    submitted again, and a worker held the new run at attempt 1: the old run's outcome was
    recorded as the new run's (on w1 itself worker and attempt were the same, and so were
    the reruns of a job submitted again), its heartbeat renewed the new run's lease and its
    release gave the new run back. A claim names its run by the queue member each enqueue
    writes."""
    async def body(q, r):
        lost, new_run = await lost_run_and_next(q, r, again_by, holder=holder)
        assert (await q.heartbeat("w1", [lost], 30)).lost == {"x"}
        assert await q.release("w1", [lost.run]) == 0
        assert await q.finish("w1", [outcome(lost, payload=msgpack.packb("old"))]) == ["stale"]
        assert await r.hmget(KEYS.job("x"), "status", "worker") == [b"running", holder.encode()]
        new = outcome(new_run, payload=msgpack.packb("new"))
        assert await q.finish(holder, [new]) == ["succeeded"]
        assert await q.finish(holder, [new]) == ["succeeded"]   # sent again: its first reply
        assert (await q.get_job("x"))["result"] == "new"
    asyncio.run(with_queue(redis_url, body))


def test_a_cancelled_job_removed_counts_once_in_its_round(redis_url):
    # the round counts a cancel as `removed`; a delete after it must not count again, or
    # the round looks ended while a job of it still waits (max_instances lets a fire by)
    async def body(q, r):
        first, second = specs(2, round="R")
        await q.enqueue([first, second])
        assert await q.cancel(first["job_id"]) == "queued"
        assert await q.remove(first["job_id"])
        counts = {k.decode(): int(v) for k, v in (await r.hgetall(KEYS.round("R"))).items()}
        assert counts == {"submitted": 2, "removed": 1}
    asyncio.run(with_queue(redis_url, body))


def test_a_rerun_counts_as_submitted_in_the_totals_and_its_queue_as_in_its_func(redis_url):
    # a rerun queues the job again: every count of submissions must see it, or a queue's
    # (and the totals') succeeded outgrows its submitted while its func's does not
    async def body(q, r):
        await q.enqueue(specs(1, job_id="again", queue="qr"))
        for _ in range(2):
            claim, = (await q.fetch("w1", ["qr"], 1, 30)).claims
            assert await q.finish("w1", [outcome(claim)]) == ["succeeded"]
            if _ == 0:
                assert await q.rerun("again") == "succeeded"
        stats = await q.stats()
        assert stats["funcs"][FUNC]["submitted"] == 2
        assert (stats["totals"]["submitted"], stats["totals"]["succeeded"]) == (2, 2)
        assert (stats["by_queue"]["qr"]["submitted"], stats["by_queue"]["qr"]["succeeded"]) \
            == (2, 2)
    asyncio.run(with_queue(redis_url, body))


def test_a_job_cancelled_before_it_ran_counts_in_its_queues_cancelled(redis_url):
    # the counters' per-queue fields sum to their totals, as for a job cancelled running
    async def body(q, r):
        await q.enqueue(specs(2, queue="qc"))
        ids = [m.decode()[17:] for m in await r.zrange(KEYS.queue("qc"), 0, -1)]
        assert await q.cancel(ids[0]) == "queued"
        claim, = (await q.fetch("w1", ["qc"], 1, 30)).claims
        assert await q.cancel(claim.job_id) == "running"
        assert await q.finish("w1", [outcome(claim, False, "stopped", cancelled=True)]) == \
            ["cancelled"]
        counters = await r.hgetall(KEYS.counters)
        assert (counters[b"cancelled"], counters[b"queue:qc:cancelled"]) == (b"2", b"2")
    asyncio.run(with_queue(redis_url, body))


def test_a_cancel_or_remove_keeps_its_rounds_counts_expiring(redis_url):
    # a round's hash expires FAILED_TTL after its last change; a cancel or a delete is one,
    # and must not leave it without an expiry (a round gone stale would then live forever)
    async def body(q, r):
        jobs = specs(3, round="R")
        await q.enqueue(jobs)
        await r.pexpire(KEYS.round("R"), 5000)   # about to expire...
        assert await q.cancel(jobs[0]["job_id"]) == "queued"
        assert await r.ttl(KEYS.round("R")) > 3600   # ...pushed back by the cancel
        await r.pexpire(KEYS.round("R"), 5000)
        assert await q.remove(jobs[1]["job_id"])
        assert await r.ttl(KEYS.round("R")) > 3600
        await r.delete(KEYS.round("R"))           # expired, with a job of it still queued
        assert await q.cancel(jobs[2]["job_id"]) == "queued"
        assert 0 < await r.ttl(KEYS.round("R"))
    asyncio.run(with_queue(redis_url, body))


def test_a_rerun_is_its_funcs_and_batchs_last_submit(redis_url):
    # last_at is a func's and a batch's last submit or record: a rerun is a submit
    async def body(q, r):
        await q.enqueue(specs(1, job_id="again", batch="B"))
        claim, = (await q.fetch("w1", ["default"], 1, 30)).claims
        assert await q.finish("w1", [outcome(claim)]) == ["succeeded"]
        recorded = int(await r.hget(KEYS.func(FUNC), "last_at"))
        deadline = time.monotonic() + 10
        while (lambda s, us: s * 1000 + us // 1000)(*await r.time()) <= recorded:
            assert time.monotonic() < deadline, "Redis's clock stands still"
            await asyncio.sleep(0.001)
        assert await q.rerun("again") == "succeeded"
        at = int(await r.hget(KEYS.job("again"), "enqueued_at"))
        assert int(await r.hget(KEYS.func(FUNC), "last_at")) == at
        assert int(await r.hget(KEYS.batch("B"), "last_at")) == at
    asyncio.run(with_queue(redis_url, body))


def test_max_retries_past_2_to_the_53_is_kept_exactly_and_retries(redis_url):
    """Lua numbers are doubles, but max_retries travels and is stored as text: the value a
    worker and get_job see is the one sent, and a failed attempt is retried."""
    async def body(q, r):
        for n in (2**53 + 1, 2**63, 2**64 - 1):
            [spec] = specs(1, job_id=f"j{n}", max_retries=n)
            await q.enqueue([spec])
            [claim] = (await q.fetch("w", ["default"], 1, 30)).claims
            assert claim.max_retries == n
            assert await q.finish("w", [outcome(claim, False, "boom", retry_ms=0)]) == \
                ["retrying"]
            assert (await q.get_job(f"j{n}"))["max_retries"] == n
    asyncio.run(with_queue(redis_url, body))


def test_outcomes_are_recorded_beside_a_key_an_operator_overwrote_with_another_type(
        redis_url, caplog):
    """One stats, round or job hash SET to a string made finish.lua fail with WRONGTYPE: the
    worker's recorder stopped, the worker exited, and so did every worker its jobs went to
    next. The outcomes of the other jobs are recorded; the key is named in the log, once."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": "in-batch", "batch": "b"}),
                         normalize_spec({"func": FUNC, "job_id": "in-round", "round": "r"}),
                         normalize_spec({"func": FUNC, "job_id": "overwritten"}),
                         normalize_spec({"func": FUNC, "job_id": "plain"})])
        claims = (await q.fetch("w1", ["default"], 10, 30)).claims
        assert len(claims) == 4
        broken = [KEYS.batch("b"), KEYS.round("r"), KEYS.job("overwritten")]
        for key in broken:
            await r.delete(key)
            await r.set(key, "overwritten")
        outcomes = [outcome(c) for c in claims]
        statuses = await q.finish("w1", outcomes)
        assert dict(zip([c.job_id for c in claims], statuses)) == {
            "in-batch": "succeeded", "in-round": "succeeded", "overwritten": STALE,
            "plain": "succeeded"}
        assert int(await r.hget(KEYS.counters, "succeeded")) == 3
        assert [await r.get(key) for key in broken] == [b"overwritten"] * 3
        assert await q.finish("w1", outcomes) == statuses   # sent again: its reply was lost
        assert caplog.text.count("holds another type") == 1
        assert all(key in caplog.text for key in broken), caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_a_fetch_passes_over_a_queue_or_job_an_operator_overwrote_with_another_type(
        redis_url, caplog):
    """One queue or job hash SET to a string made fetch.lua fail with WRONGTYPE: the worker
    exited, and no queue of it was served."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j, "queue": queue})
                         for j, queue in (("a", "default"), ("b", "default"), ("c", "other"))])
        broken = [KEYS.queue("other"), KEYS.job("a")]
        for key in broken:
            await r.delete(key)
            await r.set(key, "overwritten")
        fetched = await q.fetch("w1", ["other", "default"], 10, 30)
        assert [c.job_id for c in fetched.claims] == ["b"]
        assert all(key in caplog.text for key in broken), caplog.text
        assert (await q.fetch("w1", ["other", "default"], 10, 30)).claims == []
        assert caplog.text.count("holds another type") == 1
    asyncio.run(with_queue(redis_url, body))


def test_redelivery_and_retries_go_on_past_a_job_an_operator_overwrote(redis_url, caplog):
    """A job hash SET to a string, with its lease run out (or its backoff over), made
    requeue_due.lua fail with WRONGTYPE at every housekeeping pass: it heads the due set,
    so no job after it was ever redelivered or retried again."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j}) for j in "abcd"])
        await q.fetch("w1", ["default"], 4, 30)
        for due_set, ids in ((KEYS.inflight, "ab"), (KEYS.delayed, "cd")):
            await r.zadd(due_set, {ids[0]: 1, ids[1]: 2})   # both due, the broken one first
            await r.delete(KEYS.job(ids[0]))
            await r.set(KEYS.job(ids[0]), "overwritten")
        await r.zrem(KEYS.inflight, "c", "d")
        await r.hset(KEYS.job("d"), "status", "retrying")
        assert (await q.recover())[0] == ["b"]
        assert await q.promote() == (1, 2)   # d queued; c, unreadable, handled too
        assert await r.zcard(KEYS.inflight) == await r.zcard(KEYS.delayed) == 0
        assert all(KEYS.job(j) in caplog.text for j in "ac"), caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_a_job_put_back_in_line_lists_its_queue_again(redis_url):
    """Housekeeping forgets a queue that held no job for the whole retention; a job of it
    retrying (or running) all that time went back into its line unlisted: stats, list_jobs
    and bulk actions did not see it until it ended."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": "a", "queue": "q-x",
                                         "max_retries": 1})])
        [claim] = (await q.fetch("w1", ["q-x"], 1, 30)).claims
        await q.finish("w1", [outcome(claim, False, "boom", retry_ms=0)])
        await r.srem(KEYS.queues, "q-x")   # as forget_queues.lua would have
        assert await q.promote() == (1, 1)
        assert await r.sismember(KEYS.queues, "q-x")
        assert [j["job_id"] for j in await q.list_jobs(status="queued")] == ["a"]
    asyncio.run(with_queue(redis_url, body))


async def forget_idle(q, r, name):
    """Housekeeping forgets queue ``name``, as if idle for its whole retention."""
    await r.hset(KEYS.counters, f"queue:{name}:last_at", 1)
    await q.forget_old_names()
    assert not await r.sismember(KEYS.queues, name)
    fields = await r.hkeys(KEYS.counters)
    assert not [f for f in fields if f.startswith(f"queue:{name}:".encode())]


def test_a_stats_count_an_operator_overwrote_leaves_its_name_alone_not_the_walk(redis_url):
    """A batch's, func's or queue's count set by hand to no number failed the step of
    housekeeping that forgets old names at each pass, for good, stuck on that page: no
    name after it was ever forgotten. That name is left alone; the others are forgotten."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j, "queue": f"q-{j}",
                                         "batch": f"b-{j}"}) for j in ("bad", "idle")])
        for j in ("bad", "idle"):
            await q.remove(j)
            await r.hset(KEYS.batch(f"b-{j}"), "last_at", 1)
        await r.hset(KEYS.batch("b-bad"), "submitted", "lots")
        await r.hset(KEYS.counters, "queue:q-bad:last_at", "long ago")
        await forget_idle(q, r, "q-idle")
        assert await r.smembers(KEYS.batches) == {b"b-bad"}
        assert b"q-bad" in await r.smembers(KEYS.queues)
    asyncio.run(with_queue(redis_url, body))

def test_a_job_cancelled_after_its_queue_was_forgotten_lists_it_again(redis_url):
    """A job retrying, or running, all through its queue's retention that was then cancelled
    counted in `queue:<q>:cancelled` of a queue no longer listed: housekeeping, which walks
    only the listed queues, never forgot that field."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j, "queue": f"q-{j}",
                                         "max_retries": 1}) for j in ("wait", "run", "due")])
        claims = {c.job_id: c for c in (await q.fetch("w1", ["q-wait", "q-run", "q-due"],
                                                      3, 30)).claims}
        await q.finish("w1", [outcome(claims["wait"], False, "boom", retry_ms=3_600_000)])
        for j in ("wait", "run", "due"):
            await forget_idle(q, r, f"q-{j}")
        assert await q.cancel("wait") == "retrying"
        assert await q.cancel("run") == await q.cancel("due") == "running"
        assert await q.release("w1", [claims["run"].run]) == 0   # ends cancelled
        await r.zadd(KEYS.inflight, {"due": 0}, xx=True)          # its lease ran out
        assert (await q.recover())[1] == ["due"]
        for j in ("wait", "run", "due"):
            assert (await q.get_job(j))["status"] == "cancelled"
            await forget_idle(q, r, f"q-{j}")
    asyncio.run(with_queue(redis_url, body))


def test_a_heartbeat_renews_the_other_leases_beside_a_key_an_operator_overwrote(
        redis_url, caplog):
    """A job's or the worker's hash SET to a string made heartbeat.lua fail with WRONGTYPE
    each second: the leases after that job's were not renewed (their jobs ran twice), and
    an operator's pause or stop was never read."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j}) for j in "ab"])
        claims = (await q.fetch("w1", ["default"], 10, 30)).claims
        broken = [KEYS.job("a"), KEYS.worker("w1")]
        for key in broken:
            await r.delete(key)
            await r.set(key, "overwritten")
        before = await r.zscore(KEYS.inflight, "b")
        renewed = await q.heartbeat("w1", claims, 60, {"state": "running"})
        assert renewed.lost == {"a"} and not renewed.control.stop
        assert await r.zscore(KEYS.inflight, "b") > before
        assert await r.get(KEYS.worker("w1")) == b"overwritten"
        assert all(key in caplog.text for key in broken), caplog.text
    asyncio.run(with_queue(redis_url, body))


async def claims_nothing_while_overwritten(q, r, key: str, caplog) -> None:
    """With ``key`` SET to a string a fetch takes nothing, looks again in a second and names
    the key; once it is deleted, a fetch claims the queued job."""
    await q.enqueue(specs(1))
    await r.set(key, "overwritten")
    fetched = await q.fetch("w1", ["default"], 10, 30)
    assert fetched.claims == [] and fetched.limited_wait == 1.0
    assert key in caplog.text
    await r.delete(key)
    assert len((await q.fetch("w1", ["default"], 10, 30)).claims) == 1


def test_a_fetch_claims_nothing_while_the_limits_hash_holds_another_type(redis_url, caplog):
    """The limits hash SET to a string made every fetch fail with WRONGTYPE: each worker
    exited. Without its rules a fetch takes nothing (it might break a limit), looks again
    in a second and names the key; a master publishes the rules over it."""
    async def body(q, r):
        await claims_nothing_while_overwritten(q, r, KEYS.limits, caplog)
    asyncio.run(with_queue(redis_url, body))


def test_a_job_done_within_a_millisecond_has_a_duration_of_zero_not_none():
    """A job that returned within its first millisecond (duration_ms 0) showed
    "duration": null in get_job and elric job --json, as a job that never ran does."""
    done = RedisQueue.job_view("j", {b"status": b"succeeded", b"duration_ms": b"0",
                                     b"started_at": b"1000", b"finished_at": b"1000"})
    assert done["duration"] == 0.0
    assert RedisQueue.job_view("j", {b"status": b"queued"})["duration"] is None


def test_redelivery_leaves_a_job_whose_queue_an_operator_overwrote_in_flight(redis_url, caplog):
    """A job's queue SET to a string (its line was empty while it ran) made requeue_due.lua
    fail after it had taken the job out of inflight and marked it queued: in no queue and
    no due set, it was lost for good. It stays in flight, named, until the key is fixed."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j, "queue": f"q-{j}"})
                         for j in "ab"])
        await q.fetch("w1", ["q-a", "q-b"], 2, 30)
        await r.zadd(KEYS.inflight, {"a": 1, "b": 2}, xx=True)   # their leases ran out
        await r.set(KEYS.queue("q-a"), "overwritten")
        assert (await q.recover())[0] == ["b"]
        assert (await q.get_job("a"))["status"] == "running"
        assert await r.zscore(KEYS.inflight, "a") is not None
        assert KEYS.queue("q-a") in caplog.text
        await r.delete(KEYS.queue("q-a"))
        await r.zadd(KEYS.inflight, {"a": 1}, xx=True)
        assert (await q.recover())[0] == ["a"]
        assert [c.job_id for c in (await q.fetch("w2", ["q-a"], 1, 30)).claims] == ["a"]
    asyncio.run(with_queue(redis_url, body))


def test_redelivery_loses_no_job_while_the_running_index_holds_another_type(redis_url, caplog):
    """The index of running jobs SET to a string made requeue_due.lua fail after taking a
    job out of inflight, still marked running: no pass ever put it back. It stays due."""
    async def body(q, r):
        await q.enqueue(specs(1))
        [claim] = (await q.fetch("w1", ["default"], 1, 30)).claims
        await r.zadd(KEYS.inflight, {claim.job_id: 1}, xx=True)
        await r.set(KEYS.status("running"), "overwritten")
        assert (await q.recover())[0] == []
        assert await r.zscore(KEYS.inflight, claim.job_id) == 1
        assert KEYS.status("running") in caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_a_fetch_claims_nothing_while_inflight_holds_another_type(redis_url, caplog):
    """inflight SET to a string made fetch.lua fail after it had taken a job out of its queue
    and marked it running: with no lease, no redelivery ever found it. The fetch takes
    nothing, looks again in a second and names the key."""
    async def body(q, r):
        await claims_nothing_while_overwritten(q, r, KEYS.inflight, caplog)
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["queue", "seq", "queues", "counters", "index"])
def test_a_rerun_refused_for_a_key_an_operator_overwrote_leaves_the_job_as_it_was(
        redis_url, overwritten):
    """A finished job's queue SET to a string made rerun.lua fail after it had marked the
    job queued: in no queue, it never ran, and every later rerun was refused (LIVE queued).
    seq (its INCR), the queues set or the counters failed it after the job had left its
    status index, its result gone. The rerun is refused before any write, naming the key."""
    bad = {"queue": KEYS.queue("q-a"), "seq": KEYS.seq, "queues": KEYS.queues,
           "counters": KEYS.counters, "index": KEYS.status("succeeded")}[overwritten]

    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": "a", "queue": "q-a"})])
        [claim] = (await q.fetch("w1", ["q-a"], 1, 30)).claims
        await q.finish("w1", [outcome(claim)])
        kept = await r.dump(bad)
        await r.delete(bad)
        await r.set(bad, "overwritten")
        with pytest.raises(Exception, match=bad):
            await q.rerun("a")
        assert (await q.get_job("a"))["status"] == "succeeded"
        assert overwritten == "index" or await r.zscore(KEYS.status("succeeded"), "a")
        await r.delete(bad)
        if kept:
            await r.restore(bad, 0, kept)
        assert await q.rerun("a") == "succeeded"
        assert [c.job_id for c in (await q.fetch("w1", ["q-a"], 1, 30)).claims] == ["a"]
    asyncio.run(with_queue(redis_url, body))


def test_a_retry_while_the_delayed_set_holds_another_type_fails_named_not_lost(redis_url,
                                                                              caplog):
    """The delayed set SET to a string made finish.lua fail at a retry's ZADD, after the job
    was out of inflight and marked retrying: in no due set, it never ran again, and every
    outcome call holding a retry failed. It fails, its error naming the key, and a rerun
    runs it once the key is fixed; the other outcomes are recorded."""
    async def body(q, r):
        await q.enqueue(specs(3, max_retries=2))
        claims = (await q.fetch("w1", ["default"], 3, 30)).claims
        await r.set(KEYS.delayed, "overwritten")
        outcomes = [outcome(claims[0], False, "boom", retry_ms=1000),
                    outcome(claims[1], False, "final"), outcome(claims[2])]
        assert await q.finish("w1", outcomes) == ["failed", "failed", "succeeded"]
        assert await r.zcard(KEYS.inflight) == 0
        view = await q.get_job(claims[0].job_id)
        assert f"Not retried: {KEYS.delayed}" in view["error"]
        assert "Not retried" not in (await q.get_job(claims[1].job_id))["error"]
        assert KEYS.delayed in caplog.text
        await r.delete(KEYS.delayed)
        assert await q.rerun(claims[0].job_id) == "failed"
        assert [c.job_id for c in (await q.fetch("w1", ["default"], 1, 30)).claims] == \
            [claims[0].job_id]
    asyncio.run(with_queue(redis_url, body))


def test_a_field_edited_while_its_job_ran_fails_that_job_not_the_whole_batch(redis_url):
    """finish.lua read max_retries and enqueued_at as numbers: one edited to what elric does
    not write while its job ran failed the whole call, the good outcomes of the batch with
    it (their jobs ran again elsewhere once their leases ran out)."""
    async def body(q, r):
        q.release_keys_on_failure = True
        await q.enqueue([normalize_spec({"func": FUNC, "args": [i], "job_id": job_id, **extra})
                         for i, (job_id, extra) in enumerate((
                             ("good", {}), ("edited", {"max_retries": 2}),
                             ("dated", {"dedupe_key": "k", "dedupe_scope": "global"})))])
        await r.zadd(KEYS.dedupe_set("global"), {"k": 1})   # (DEDUPE_TTL) taken at 1 ms
        claims = {c.job_id: c for c in (await q.fetch("w1", ["default"], 10, 30)).claims}
        await r.hset(KEYS.job("edited"), "max_retries", "abc")
        await r.hset(KEYS.job("dated"), "enqueued_at", "soon")
        assert await q.finish("w1", [outcome(claims["good"]),
                                     outcome(claims["edited"], ok=False, retry_ms=1000),
                                     outcome(claims["dated"], ok=False)]) == \
            ["succeeded", "failed", "failed"]
        # taken before or after this job was queued: unknown, so kept
        assert await r.zscore(KEYS.dedupe_set("global"), "k") == 1
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["queues", "counters"])
def test_a_give_back_goes_on_while_the_queues_or_counters_hold_another_type(redis_url, caplog,
                                                                           overwritten):
    """The set of queues (SADD, giving back at once) or the counters (`handed_back`, giving
    back with a reason) SET to a string made release.lua fail once it had put the first job
    (or all of them) back: the worker's give-back failed, the other jobs held until their
    leases ran out. They go back, not listed or counted; the key is named."""
    bad = getattr(KEYS, overwritten)

    async def body(q, r):
        await q.enqueue(specs(2))
        claims = (await q.fetch("w1", ["default"], 2, 30)).claims
        await r.delete(bad)
        await r.set(bad, "overwritten")
        reason = "no module" if overwritten == "counters" else None
        assert await q.release("w1", [c.run for c in claims], reason=reason) == 2
        assert await r.zcard(KEYS.inflight) == 0
        assert bad in caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_release_leaves_a_job_whose_queue_an_operator_overwrote_claimed(redis_url, caplog):
    """A job's queue SET to a string (its line was empty while it ran) made release.lua fail
    after it had taken the job out of inflight and marked it queued: in no queue and no
    inflight, it was lost for good. It stays claimed with its lease, named, so once the key
    is fixed its lease running out puts it back."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": j, "queue": f"q-{j}"})
                         for j in "ab"])
        claims = {c.job_id: c for c in (await q.fetch("w1", ["q-a", "q-b"], 2, 30)).claims}
        await r.set(KEYS.queue("q-a"), "overwritten")
        assert await q.release("w1", [claims["a"].run, claims["b"].run]) == 1
        assert (await q.get_job("a"))["status"] == "running"
        assert await r.zscore(KEYS.inflight, "a") is not None
        assert KEYS.queue("q-a") in caplog.text
        assert (await q.get_job("b"))["status"] == "queued"
        await r.delete(KEYS.queue("q-a"))
        await r.zadd(KEYS.inflight, {"a": 1}, xx=True)   # its lease ran out
        assert (await q.recover())[0] == ["a"]
        assert [c.job_id for c in (await q.fetch("w2", ["q-a"], 1, 30)).claims] == ["a"]
    asyncio.run(with_queue(redis_url, body))


def test_a_job_whose_queue_field_was_deleted_while_it_ran_fails_alone(redis_url):
    """finish.lua built the per-queue counter from the job's `queue`: one deleted (HDEL) while
    its job ran failed the whole call, the good outcomes of the batch with it (their jobs
    ran again elsewhere once their leases ran out). With no queue to go back to, it is not
    retried: it fails, the error naming the field."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "args": [i], "job_id": job_id,
                                         "max_retries": 2})
                         for i, job_id in enumerate(("good", "gone", "done"))])
        claims = {c.job_id: c for c in (await q.fetch("w1", ["default"], 10, 30)).claims}
        await r.hdel(KEYS.job("gone"), "queue")
        await r.hdel(KEYS.job("done"), "queue")
        assert await q.finish("w1", [outcome(claims["good"]),
                                     outcome(claims["gone"], ok=False, retry_ms=1000),
                                     outcome(claims["done"])]) == \
            ["succeeded", "failed", "succeeded"]
        assert "`queue`" in (await q.get_job("gone"))["error"]
        assert not await r.zscore(KEYS.delayed, "gone")
        assert await r.hget(KEYS.counters, "queue:default:succeeded") == b"1"
    asyncio.run(with_queue(redis_url, body))


def test_a_cancelled_job_whose_queue_field_was_deleted_ends_cancelled_alone(redis_url):
    """end_run (cancel_end_fn.lua) built the per-queue counter from the job's `queue`:
    one deleted while its job ran failed a worker's give-back (release) and a pass of
    recover, every other job of the call with it."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "args": [i], "job_id": job_id})
                         for i, job_id in enumerate(("back", "gone", "late", "dead"))])
        claims = {c.job_id: c for c in (await q.fetch("w1", ["default"], 2, 30)).claims}
        late = {c.job_id: c for c in (await q.fetch("w2", ["default"], 2, 0)).claims}
        for job_id in ("gone", "dead"):
            assert await q.cancel(job_id) == "running"
            await r.hdel(KEYS.job(job_id), "queue")
        assert await q.release("w1", [c.run for c in claims.values()]) == 1
        assert (await q.get_job("back"))["status"] == "queued"
        assert (await q.get_job("gone"))["status"] == "cancelled"
        assert set(late) == {"late", "dead"}
        assert await q.recover() == (["late"], ["dead"], [])
        assert (await q.get_job("dead"))["status"] == "cancelled"
    asyncio.run(with_queue(redis_url, body))


def test_a_job_whose_queue_field_was_deleted_is_not_lost_going_back_in_line(redis_url, caplog):
    """requeue_fn.lua built the queue key from the job's `queue`: one deleted (HDEL) while its
    job ran failed the put-back after the job had left inflight (or, given back, its claim)
    marked queued: in no queue, nothing ran or ended it. It stays due (or claimed), named,
    and a rerun of a finished one is refused naming the field."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "args": [i], "job_id": job_id})
                         for i, job_id in enumerate(("late", "back", "kept", "done"))])
        claims = {c.job_id: c for c in (await q.fetch("w1", ["default"], 4, 30)).claims}
        await q.finish("w1", [outcome(claims["done"])])
        for job_id in ("late", "kept", "done"):
            await r.hdel(KEYS.job(job_id), "queue")
        assert await q.release("w1", [claims["back"].run, claims["kept"].run]) == 1
        assert (await q.get_job("kept"))["status"] == "running"
        assert await r.zscore(KEYS.inflight, "kept") is not None
        await r.zadd(KEYS.inflight, {"late": 1, "kept": 1}, xx=True)   # their leases ran out
        assert (await q.recover())[0] == []
        for job_id in ("late", "kept"):
            assert (await q.get_job(job_id))["status"] == "running"
            assert await r.zscore(KEYS.inflight, job_id) > 1   # due again later
            assert KEYS.job(job_id) in caplog.text
        assert "queue` field is missing" in caplog.text
        with pytest.raises(Refused, match="`queue`"):
            await q.rerun("done")
        assert (await q.get_job("done"))["status"] == "succeeded"
        await r.hset(KEYS.job("late"), "queue", "default")
        await r.zadd(KEYS.inflight, {"late": 1}, xx=True)
        assert (await q.recover())[0] == ["late"]
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["counters", "queues", "batch", "func", "round"])
def test_a_cancelled_job_whose_stats_an_operator_overwrote_still_ends_cancelled(
        redis_url, caplog, overwritten):
    """end_run (cancel_end_fn.lua) counted the job it ended in the counters, its
    queue's listing, its batch's, func's and round's hashes unguarded: one overwritten
    with another type failed the ending half written (the job already marked cancelled),
    and with it a worker's give-back or a pass of recover, every job after it in the call
    left as it was. That write is left out, named; the jobs end cancelled."""
    bad = {"counters": KEYS.counters, "queues": KEYS.queues, "batch": KEYS.batch("b"),
           "func": KEYS.func(FUNC), "round": KEYS.round("r")}[overwritten]

    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "args": [i], "job_id": job_id,
                                         "batch": "b"})
                         for i, job_id in enumerate(("gone", "gone2", "dead", "dead2"))])
        claims = (await q.fetch("w1", ["default"], 2, 30)).claims
        await q.fetch("w2", ["default"], 2, 0)   # their leases run out at once
        for job_id in ("gone", "gone2", "dead", "dead2"):
            assert await q.cancel(job_id) == "running"
            await r.hset(KEYS.job(job_id), "round", "r")
        await r.delete(bad)
        await r.rpush(bad, "overwritten")
        assert await q.release("w1", [c.run for c in claims]) == 0
        assert await q.recover() == ([], ["dead", "dead2"], [])
        for job_id in ("gone", "gone2", "dead", "dead2"):
            assert (await q.get_job(job_id))["status"] == "cancelled"
        assert bad in caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_list_jobs_shows_a_job_whose_key_an_operator_overwrote_as_unreadable(redis_url):
    """A job's key in a status index (or a queue) SET to a string failed list_jobs whole
    (WRONGTYPE in its pipeline): the CLI's and the dashboard's job lists showed nothing.
    That job is listed with its status, named unreadable; the rest as before."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "args": [i], "job_id": job_id})
                         for i, job_id in enumerate(("a", "b", "c", "w"))])
        claims = (await q.fetch("w", ["default"], 3, 30)).claims
        await q.finish("w", [outcome(c) for c in claims])
        for job_id in ("b", "w"):
            await r.set(KEYS.job(job_id), "overwritten")
        rows = {row["job_id"]: row for row in await q.list_jobs()}
        assert sorted(rows) == ["a", "b", "c", "w"]
        assert (rows["b"]["status"], rows["w"]["status"]) == ("succeeded", "queued")
        assert rows["b"]["unreadable"] and rows["w"]["unreadable"]
        assert "unreadable" not in rows["a"]
        assert [row["job_id"] for row in await q.list_jobs(status="succeeded", offset=1)] \
            == ["b", "a"]
        assert await r.zscore(KEYS.status("succeeded"), "b") is not None   # not dropped
    asyncio.run(with_queue(redis_url, body))


def test_a_fetch_claims_with_the_counters_an_operator_overwrote(redis_url, caplog):
    """fetch.lua counted first starts in the counters hash after writing its claims: that
    hash overwritten with another type failed every fetch that claimed a new job (claims
    made, never returned: each ran only after its lease ran out), on every worker. The
    claims are returned; the count is left out, named."""
    async def body(q, r):
        await q.enqueue(specs(2))
        await r.delete(KEYS.counters)
        await r.rpush(KEYS.counters, "overwritten")
        assert len((await q.fetch("w", ["default"], 10, 30)).claims) == 2
        assert KEYS.counters in caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_outcomes_are_recorded_while_the_running_index_holds_another_type(redis_url, caplog):
    """The index of running jobs SET to a string made finish.lua fail taking each job out
    of it (after inflight): every outcome of every worker failed, each job left running
    with no lease, and the worker's recorder stopped. They are recorded, the key named."""
    async def body(q, r):
        await q.enqueue(specs(2))
        claims = (await q.fetch("w1", ["default"], 2, 30)).claims
        await r.set(KEYS.status("running"), "overwritten")
        assert await q.finish("w1", [outcome(c) for c in claims]) == ["succeeded"] * 2
        assert await r.zcard(KEYS.inflight) == 0
        assert KEYS.status("running") in caplog.text
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["seq", "delayed"])
def test_retries_stay_due_while_seq_or_the_delayed_set_holds_another_type(redis_url, caplog,
                                                                          overwritten):
    """seq SET to a string made requeue_due.lua fail putting a retry back in line (its INCR
    for a new place), after taking it out of the delayed set: marked retrying in no set, it
    never ran again. The delayed set itself failed every pass with a bare WRONGTYPE. The
    pass writes nothing, naming the key; once it is fixed, the retry goes back."""
    bad = getattr(KEYS, overwritten)

    async def body(q, r):
        await q.enqueue(specs(1, max_retries=1))
        [claim] = (await q.fetch("w1", ["default"], 1, 30)).claims
        assert await q.finish("w1", [outcome(claim, False, "boom", retry_ms=0)]) == \
            ["retrying"]
        kept = await r.dump(bad)
        await r.delete(bad)
        await r.set(bad, "overwritten")
        assert await q.promote() == (0, 0)
        assert bad in caplog.text
        await r.delete(bad)
        await r.restore(bad, 0, kept)
        assert await q.promote() == (1, 1)
        assert [c.job_id for c in (await q.fetch("w1", ["default"], 1, 30)).claims] == \
            [claim.job_id]
    asyncio.run(with_queue(redis_url, body))


def test_a_pass_with_nothing_due_writes_nothing(redis_url):
    """requeue_due.lua checked seq by INCRBY 0, a write on every housekeeping pass: each
    was appended to the AOF (an fsync each with appendfsync always) and sent to replicas."""
    async def body(q, r):
        await q.enqueue(specs(1))
        writes = (await r.info("persistence"))["rdb_changes_since_last_save"]
        assert await q.promote() == (0, 0)
        assert (await r.info("persistence"))["rdb_changes_since_last_save"] == writes
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["counters", "queues"])
def test_redelivery_goes_on_while_the_counters_or_queues_hold_another_type(redis_url, caplog,
                                                                          overwritten):
    """The counters (HINCRBY redelivered) or the set of queues (SADD) SET to a string made
    requeue_due.lua fail at every pass, after putting back one job: the others whose lease
    ran out waited for good. They go back in line; the key is named."""
    bad = getattr(KEYS, overwritten)

    async def body(q, r):
        await q.enqueue(specs(2))
        claims = (await q.fetch("w1", ["default"], 2, 30)).claims
        await r.zadd(KEYS.inflight, {c.job_id: 1 for c in claims}, xx=True)
        await r.delete(bad)
        await r.set(bad, "overwritten")
        assert sorted((await q.recover())[0]) == sorted(c.job_id for c in claims)
        assert await r.zcard(KEYS.queue("default")) == 2
        assert bad in caplog.text
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["counters", "queues", "parked", "batch", "func",
                                         "round"])
def test_a_cancel_or_remove_goes_on_while_a_stats_key_holds_another_type(redis_url, caplog,
                                                                         overwritten):
    """The counters, the queues set, the parked counts, a batch's, func's or round's hash
    SET to a string made cancel.lua (or remove.lua) fail halfway: every cancel or delete of
    such a job failed (for the parked counts or a round, with the job out of its line and
    still queued: lost). Each is cancelled or deleted; the count is left out, named."""
    bad = {"counters": KEYS.counters, "queues": KEYS.queues, "parked": KEYS.limits_parked,
           "batch": KEYS.batch("b"), "func": KEYS.func(FUNC), "round": KEYS.round("R")}
    bad = bad[overwritten]

    async def body(q, r):
        await q.enqueue(specs(3, batch="b", round="R", limit_key="k"))
        await r.hset(KEYS.limits, "k", "1,")   # k runs one job at once: two are parked
        [claim] = (await q.fetch("w1", ["default"], 3, 30)).claims
        parked = [m.decode()[17:] for m in await r.zrange(KEYS.limit_parked("k"), 0, -1)]
        await r.delete(bad)
        await r.set(bad, "overwritten")
        assert await q.cancel(parked[0]) == "queued"
        assert await q.remove(parked[1])
        assert (await q.get_job(parked[0]))["status"] == "cancelled"
        assert await q.get_job(parked[1]) is None
        assert await r.zcard(KEYS.limit_parked("k")) == 0
        assert bad in caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_get_job_shows_a_job_whose_key_an_operator_overwrote_as_unreadable(redis_url):
    """A job's key SET to a string made get_job raise WRONGTYPE: `elric job ID` and the
    dashboard's job page showed an internal error. It is shown unreadable, its key named,
    as list_jobs shows it."""
    async def body(q, r):
        await q.enqueue(specs(1, job_id="x"))
        await r.set(KEYS.job("x"), "overwritten")
        view = await q.get_job("x")
        assert view["job_id"] == "x" and view["status"] is None
        assert KEYS.job("x") in view["unreadable"] and view["error"] == view["unreadable"]
        assert await q.get_job("none") is None
    asyncio.run(with_queue(redis_url, body))


def test_a_fetch_claims_while_the_running_index_holds_another_type(redis_url, caplog):
    """The index of running jobs SET to a string made fetch.lua fail indexing its first
    claim (marked running, leased, never returned): every fetch that claimed, on every
    worker, failed. The claims are returned, not indexed; the key is named."""
    async def body(q, r):
        await q.enqueue(specs(2))
        await r.set(KEYS.status("running"), "overwritten")
        claims = (await q.fetch("w1", ["default"], 10, 30)).claims
        assert len(claims) == 2
        assert KEYS.status("running") in caplog.text
        assert await q.finish("w1", [outcome(c) for c in claims]) == ["succeeded"] * 2
    asyncio.run(with_queue(redis_url, body))


@pytest.mark.parametrize("overwritten", ["succeeded", "failed", "cancelled"])
def test_outcomes_are_recorded_while_an_ended_index_holds_another_type(redis_url, caplog,
                                                                       overwritten):
    """The index of succeeded, failed or cancelled jobs SET to a string made finish.lua fail
    (the outcome's ZADD, or the trim every call makes): every outcome of every worker
    failed, the recorder stopped. They are recorded, not indexed there; the key is named."""
    bad = KEYS.status(overwritten)

    async def body(q, r):
        await q.enqueue(specs(2))
        claims = (await q.fetch("w1", ["default"], 2, 30)).claims
        await r.set(bad, "overwritten")
        assert await q.finish("w1", [outcome(claims[0]), outcome(claims[1], False, "e")]) \
            == ["succeeded", "failed"]
        assert await r.zcard(KEYS.inflight) == 0
        assert bad in caplog.text
    asyncio.run(with_queue(redis_url, body))


def test_a_cancel_of_a_job_whose_key_an_operator_overwrote_says_to_delete_it(redis_url):
    """cancel.lua read the job's fields first and raised WRONGTYPE: `elric cancel` and a
    bulk cancel met an internal error. It is refused (before any write), saying why and
    what to do."""
    async def body(q, r):
        await q.enqueue(specs(1, job_id="x"))
        await r.set(KEYS.job("x"), "overwritten")
        with pytest.raises(Refused, match=rf"job 'x' cannot be read: {KEYS.job('x')} is not "
                           r"a hash \(overwritten\?\); delete it \(elric delete x\)"):
            await q.cancel("x")
        assert await r.get(KEYS.job("x")) == b"overwritten"
    asyncio.run(with_queue(redis_url, body))


def test_a_job_whose_key_an_operator_overwrote_can_be_deleted(redis_url):
    """list_jobs and the dashboard show such a job unreadable, with a delete button, but
    remove.lua read its fields first and raised WRONGTYPE: nothing but redis-cli could
    clear it. The key goes, with its lease and delay; its line and indexes drop it."""
    async def body(q, r):
        batch = specs(2)
        await q.enqueue(batch)
        gone, kept = (s["job_id"] for s in batch)
        await r.set(KEYS.job(gone), "overwritten")
        assert await q.remove(gone) is True
        assert not await r.exists(KEYS.job(gone))
        assert [v["job_id"] for v in await q.list_jobs(status="queued")] == [kept]
        claims = (await q.fetch("w1", ["default"], 10, 30)).claims
        assert [c.job_id for c in claims] == [kept]
    asyncio.run(with_queue(redis_url, body))


def test_a_worker_silent_past_its_lease_is_lost_and_takes_no_orders(redis_url):
    """A killed worker showed "running" with its jobs in flight for 60 s, though its jobs
    were redelivered once its lease ran out; and a pause or stop of it said "asked; it obeys
    within a second" (exit 0) for good, its hash living a day."""
    async def body(q, r):
        for wid in ("quiet", "fresh"):
            await q.heartbeat(wid, [], 3, {"state": "running", "in_flight": 2})
        now = (lambda s, us: s + us / 1e6)(*await r.time())
        await r.zadd(KEYS.workers, {"quiet": (now - 4) * 1000})   # silent past its 3 s lease
        alive = {w["worker_id"]: w["alive"] for w in await q.workers()}
        assert alive == {"quiet": False, "fresh": True}
        assert await q.control_worker("quiet", paused="1") == "lost"
        assert await r.hget(KEYS.worker("quiet"), "paused") is None
        assert await q.control_worker("fresh", paused="1") == "ok"
    asyncio.run(with_queue(redis_url, body))


def test_a_worker_that_stopped_is_told_stopped_not_lost_once_past_its_lease(redis_url):
    """A worker that stopped cleanly sends no more heartbeats: once past its lease, a pause
    of it said "lost: its jobs go to other workers", where elric workers and the dashboard
    showed it stopped."""
    async def body(q, r):
        await q.heartbeat("done", [], 3, {"state": "running"})
        await r.hset(KEYS.worker("done"), "state", "stopped")   # (Worker._close)
        now = (lambda s, us: s + us / 1e6)(*await r.time())
        await r.zadd(KEYS.workers, {"done": (now - 4) * 1000})
        assert await q.control_worker("done", paused="1") == "stopped"
    asyncio.run(with_queue(redis_url, body))


def test_a_worker_stopping_takes_a_stop_again_and_no_other_order(redis_url):
    """A worker finishing its jobs before it exits ignores a pause and a new pool size, yet
    `elric worker set ID --concurrency 3` said "set asked; it obeys within a second", exit 0."""
    async def body(q, r):
        await q.heartbeat("w", [], 30, {"state": "stopping"})
        assert await q.control_worker("w", set_concurrency="3") == "stopping"
        assert await q.control_worker("w", paused="1") == "stopping"
        assert await r.hmget(KEYS.worker("w"), "set_concurrency", "paused") == [None, None]
        assert await q.control_worker("w", stop="1") == "ok"
    asyncio.run(with_queue(redis_url, body))


def test_a_list_stopped_by_its_scan_limit_says_where_to_look_further(redis_url, monkeypatch):
    """The dashboard's /jobs?batch=B showed no job, as if final, when its scan limit ran
    out on other queued jobs first. A list stopped so answers where it stopped; going on
    from there, a scan limit's worth at a time, lists what one unbounded list does."""
    import elric.queue
    monkeypatch.setattr(elric.queue, "MATCH_STEP", 20)   # a few script calls a page

    async def body(q, r):
        await q.enqueue([normalize_spec({
            "func": FUNC, "job_id": f"j{i}", "queue": f"q{i % 2}",
            "batch": "rare" if i % 40 < 2 else "common"}) for i in range(200)])
        claims = (await q.fetch("w", ["q0", "q1"], 100, 30)).claims   # the older half ends
        await q.finish("w", [outcome(c) for c in claims])
        whole = [row["job_id"] for row in await q.list_jobs(batch="rare", limit=1000)]
        assert len(whole) == 10 and len({w[1:] for w in whole}) == 10
        looked, match = [], q._list_match

        async def counted(keys, args):
            reply = await match(keys=keys, args=args)
            looked[-1] += reply[1]
            return reply
        q._list_match = counted
        for offset, limit in ((0, 1000), (0, 3), (4, 3)):
            listed, cursor = [], ""
            while len(listed) < limit:
                looked.append(0)
                rows, cursor = await q.list_page(batch="rare", offset=0 if cursor else offset,
                                                 limit=limit - len(listed), scan_limit=30,
                                                 cursor=cursor)
                assert looked[-1] <= 30
                listed += [row["job_id"] for row in rows]
                if not cursor:
                    break
                assert rows or looked[-1] == 30   # (not a page that looked at nothing)
            assert listed == whole[offset:offset + limit]
        looked.append(0)   # the first 15 in line match nothing: said, not final
        rows, cursor = await q.list_page(batch="rare", status="queued", scan_limit=15)
        fifteenth = (await r.zrevrange(KEYS.queue("q0"), 14, 14))[0]
        assert (rows, cursor) == ([], f"0:0:0:15:{fifteenth.hex()}:q0")
        for bad in ("nonsense", "-1:0:0:0::q0", "0:0:0:-1::q0", "0:0:0:0:zz:q0"):
            with pytest.raises(ValueError, match="bad cursor"):
                await q.list_page(batch="rare", cursor=bad)
    asyncio.run(with_queue(redis_url, body))


def test_a_list_going_on_from_its_cursor_misses_no_job_that_stayed_when_others_left(
        redis_url):
    """The cursor was a rank: a job that left the index before it (cancelled, deleted,
    finished) moved every later job a rank up, and the next page began a job too far: a
    matching job that stayed where it was was never listed."""
    async def body(q, r):
        await q.enqueue([normalize_spec({"func": FUNC, "job_id": f"j{i:02}",
                                         "batch": "rare" if i in (29, 10) else "common"})
                         for i in range(40)])   # listed newest first: j39 .. j00
        rows, cursor = await q.list_page(batch="rare", status="queued", scan_limit=10)
        assert rows == [] and cursor
        await q.cancel("j35")   # looked at already
        assert await r.zscore(KEYS.queue("default"), f"{1 + 35:016x}:j35") is None
        rows, cursor = await q.list_page(batch="rare", status="queued", cursor=cursor)
        assert [row["job_id"] for row in rows] == ["j29", "j10"]
    asyncio.run(with_queue(redis_url, body))
