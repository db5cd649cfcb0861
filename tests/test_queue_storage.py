"""How a queued job is stored: only the fields that differ from their default (priority
aside), one index (its queue's sorted set), and no lookup for a job_id the master just made
unless the same call runs twice.

In-process against the private redis-server; pytest-asyncio is not installed, so each test
drives its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio

import msgpack
import pytest
import redis
import redis.asyncio as aredis

from elric.contract import normalize_specs
from elric.keys import Keys
from elric.queue import Fenced, RedisQueue
from elric.scripts import PACK_FIELDS

KEYS = Keys("elrictest")
FUNC = "tests.jobs:Echo"


def specs(n, **extra):
    return normalize_specs([{"func": FUNC, "args": [i], **extra} for i in range(n)])


async def with_queue(url, body):
    r = aredis.Redis.from_url(url)
    try:
        return await body(RedisQueue(r, KEYS), r)
    finally:
        await r.aclose()


async def pack_jobs(r, pack_id):
    """The fields of each job in a pack's string (keys.py): end offsets, then the jobs."""
    import struct
    data = await r.get(KEYS.pack(pack_id))
    n = int(await r.hget(KEYS.pack_info(pack_id), "n"))
    ends = struct.unpack(f"<{n}I", data[:4 * n])
    info = await r.hgetall(KEYS.pack_info(pack_id))
    shared = {b"queue": info[b"queue"], b"priority": info[b"priority"],
              b"enqueued_at": info[b"enqueued_at"]}
    if info[b"batch"]:
        shared[b"batch"] = info[b"batch"]
    jobs, start = [], 4 * n
    for end in ends:
        values = msgpack.unpackb(data[start:4 * n + end], raw=True)
        jobs.append({**shared, **{name.encode(): v for name, v in zip(PACK_FIELDS, values)
                                  if v is not None}})
        start = 4 * n + end
    assert start == len(data)
    return jobs


async def waiting_in(r, pack_id):
    """How many jobs of a pack are not handed out yet."""
    n, first = await r.hmget(KEYS.pack_info(pack_id), "n", "next")
    return int(n) - int(first)


async def no_pack_left(r):
    """No pack is in line or holds a job; the infos of emptied packs expire within the
    hour (kept so that a resent ENQUEUE finds them)."""
    assert not await r.keys(f"{KEYS.prefix}:packs:*")
    names = await r.keys(f"{KEYS.prefix}:pack:*")
    assert all(n.endswith(b":info") for n in names), names
    for n in names:
        assert 0 < await r.ttl(n) <= 3600


def script_calls(url, command):
    """How many times Redis ran ``command`` so far, scripts included."""
    r = redis.Redis.from_url(url)
    try:
        return r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)
    finally:
        r.close()


def test_fields_at_their_default_are_not_written_and_read_as_the_default(redis_url):
    async def body(q, r):
        plain, = specs(1)
        ranked, = specs(1, priority=5, batch="b1", job_id="ranked")
        await q.enqueue([plain, ranked])
        h = await r.hgetall(KEYS.job(plain["job_id"]))
        # priority even at 0: the requeue of the earlier version (workers not yet
        # upgraded) computes -tonumber(priority) and would drop a job without it
        assert set(h) == {b"status", b"queue", b"priority", b"enqueued_at", b"member",
                          b"func", b"args"}
        assert h[b"priority"] == b"0"
        view = await q.get_job(plain["job_id"])
        assert (view["priority"], view["attempts"], view["batch"]) == (0, 0, None)
        h = await r.hgetall(KEYS.job("ranked"))
        assert (h[b"priority"], h[b"batch"]) == (b"5", b"b1")
        view = await q.get_job("ranked")
        assert (view["priority"], view["batch"]) == (5, "b1")

        # fetched, then given back: the job returns to its place with priority 0
        got = await q.fetch("w1", ["default"], 10, 30)
        assert [g["job_id"] for g in got] == ["ranked", plain["job_id"]]
        assert [g["attempt"] for g in got] == [1, 1]
        assert await q.release("w1", [(g["job_id"], g["attempt"]) for g in got]) == 2
        line = await r.zrange(KEYS.queue("default"), 0, -1, withscores=True)
        assert [(m.decode()[17:], s) for m, s in line] == [("ranked", -5.0),
                                                          (plain["job_id"], 0.0)]
        assert (await q.get_job(plain["job_id"]))["attempts"] == 0
        # and the lease of a dead worker runs out: RECOVER requeues it the same way
        got = await q.fetch("w2", ["default"], 10, 0)
        assert len(got) == 2
        assert sorted(await q.recover()) == sorted(g["job_id"] for g in got)
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
        got = await q.fetch("w1", ["qb"], 2, 30)
        running = {g["job_id"] for g in got}
        assert {j["job_id"] for j in await q.list_jobs(status="queued")} == everything - running
        assert {j["job_id"] for j in await q.list_jobs(status="running")} == running
        assert (await q.stats())["by_status"]["queued"] == 10
        # a removed queued job is gone from the listing too
        gone = a[0]["job_id"]
        assert await q.remove(gone) is True
        assert gone not in {j["job_id"] for j in await q.list_jobs(status="queued")}
    asyncio.run(with_queue(redis_url, body))


def test_a_job_id_the_master_made_is_not_looked_up_but_a_chosen_one_is(redis_url):
    async def body(q, r):
        made = specs(50)
        chosen = normalize_specs([{"func": FUNC, "job_id": f"mine-{i}"} for i in range(3)])
        before = script_calls(redis_url, "hget")
        out = await q.enqueue(made + chosen, may_exist={"mine-0", "mine-1", "mine-2"})
        assert [o["status"] for o in out] == ["queued"] * 53
        assert script_calls(redis_url, "hget") - before == 3     # the chosen ids only

        # resubmitting a chosen id is still idempotent: its status comes back, no copy
        await q.fetch("w1", ["default"], 100, 30)
        again = await q.enqueue(chosen[:1], may_exist={"mine-0"})
        assert again == [{"job_id": "mine-0", "status": "running"}]
        assert await r.zcard(KEYS.queue("default")) == 0
        # the reply names only the jobs that existed: each status lands on its own spec
        fresh = specs(2)
        mixed = await q.enqueue([fresh[0], chosen[2], fresh[1], chosen[1]],
                                may_exist={"mine-1", "mine-2"})
        assert [(m["job_id"], m["status"]) for m in mixed] == [
            (fresh[0]["job_id"], "queued"), ("mine-2", "running"),
            (fresh[1]["job_id"], "queued"), ("mine-1", "running")]
        assert (await q.stats())["by_queue"]["default"]["queued"] == 2

        # without may_exist every id is looked up (the scheduler's fires, for one)
        before = script_calls(redis_url, "hget")
        await q.enqueue(specs(4))
        assert script_calls(redis_url, "hget") - before == 4
    asyncio.run(with_queue(redis_url, body))


def test_a_master_drops_the_status_queued_index_of_earlier_versions(redis_url, tmp_path):
    from elric.config import load_settings
    from elric.master import Master
    from elric.redis_server import free_port

    r = redis.Redis.from_url(redis_url)
    r.zadd(KEYS.status("queued"), {"old-job": 1})             # as an earlier ENQUEUE left it
    r.zadd(KEYS.status("succeeded"), {"done-job": 1})

    async def main():
        settings = load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}",
            KEY_PREFIX=KEYS.prefix))
        master = Master(settings)
        await master.start()
        await master.close()
    try:
        asyncio.run(main())
        assert not r.exists(KEYS.status("queued"))
        assert r.zcard(KEYS.status("succeeded")) == 1            # the other indexes stay
    finally:
        r.close()


def test_the_same_enqueue_run_twice_queues_each_job_once(redis_url):
    """redis-py re-sends a command whose reply was lost (retry_on_timeout, or its default
    retries): ENQUEUE then runs twice with the same arguments. The master's own ids skip
    the lookup, so the second run must notice it is a replay."""
    async def body(q, r):
        real = q._send_enqueue
        sent = []

        async def sent_twice(strings, argv):
            sent.append((strings, argv))
            await real(strings, argv)
            return await real(strings, argv)
        q._send_enqueue = sent_twice
        batch = specs(50, batch="twice")
        out = await q.enqueue(batch, may_exist=set())
        assert [o["status"] for o in out] == ["queued"] * 50
        pack_id = out[0]["job_id"][:24]
        assert [o["job_id"] for o in out] == [f"{pack_id}{k:08x}" for k in range(50)]
        assert await waiting_in(r, pack_id) == 50
        assert [j[b"args"] for j in await pack_jobs(r, pack_id)] == [
            msgpack.packb([i]) for i in range(50)]
        assert await r.zcard(KEYS.packs("default")) == 1          # the second run added none
        assert (await q.stats())["by_queue"]["default"]["queued"] == 50
        assert await r.hget(KEYS.counters, "submitted") == b"50"
        assert await r.hget(KEYS.batch("twice"), "submitted") == b"50"
        # and a replay after a worker took some: their status comes back, none is re-queued
        got = await q.fetch("w1", ["default"], 10, 30)
        q._send_enqueue = real
        again = await real(*sent[0])        # the commands once more, as redis-py sends them
        assert [int(x) for x in again[::2]] == list(range(1, 51))
        assert [x.decode() for x in again[1::2]] == ["running"] * 10 + ["queued"] * 40
        assert await r.ttl(KEYS.pack(pack_id)) == -1      # its jobs wait: it stays for good
        assert (await q.stats())["by_queue"]["default"]["queued"] == 40
        assert await waiting_in(r, pack_id) == 40
        assert {g["job_id"] for g in got} <= {s["job_id"] for s in batch}
        # all 50 run once each
        rest = await q.fetch("w1", ["default"], 100, 30)
        assert sorted(g["job_id"] for g in got + rest) == sorted(s["job_id"] for s in batch)
    asyncio.run(with_queue(redis_url, body))


def test_jobs_written_by_the_earlier_version_run_through_the_new_scripts(redis_url):
    """A Redis upgraded in place holds jobs with every field written (attempts 0,
    priority 0, batch '', max_retries 0...): they list, run, requeue and finish as before."""
    async def body(q, r):
        for i, prio in enumerate((0, 3)):
            job_id, member = f"old-{i}", f"{i + 1:016x}:old-{i}"
            await r.hset(KEYS.job(job_id), mapping={
                "status": "queued", "queue": "default", "priority": prio, "batch": "",
                "enqueued_at": 1, "attempts": 0, "member": member, "func": FUNC,
                "args": b"\x91\x01", "kwargs": b"\x80", "max_retries": 0})
            await r.zadd(KEYS.queue("default"), {member: -prio})
            await r.sadd(KEYS.queues, "default")
        assert {j["job_id"] for j in await q.list_jobs(status="queued")} == {"old-0", "old-1"}
        got = await q.fetch("w1", ["default"], 10, 30)
        assert [(g["job_id"], g["attempt"], g["args"]) for g in got] == [
            ("old-1", 1, b"\x91\x01"), ("old-0", 1, b"\x91\x01")]
        assert await q.release("w1", [("old-0", 1)]) == 1          # back in line, priority 0
        assert await r.zscore(KEYS.queue("default"), f"{1:016x}:old-0") == 0
        done = await q.finish("w1", [{"job_id": "old-1", "attempt": 1, "ok": True,
                                      "payload": b"\xc0", "duration_ms": 5, "retry_ms": -1}])
        assert done == ["succeeded"]
        view = await q.get_job("old-1")
        assert (view["status"], view["attempts"], view["priority"], view["batch"]) == \
            ("succeeded", 1, 3, None)
        assert {j["job_id"] for j in await q.list_jobs(status="succeeded")} == {"old-1"}
    asyncio.run(with_queue(redis_url, body))



def test_a_batch_of_many_runs_is_queued_in_order_with_its_own_fields(redis_url):
    """ENQUEUE takes a batch as runs of consecutive jobs sharing queue, priority, batch
    and freshness. A batch that changes them from job to job (chosen ids that exist
    already, a queue where nothing new is queued) still queues each job once, in
    submission order, with its own fields, counters and statuses; sent again, it queues
    nothing."""
    async def body(q, r):
        for job_id, queue in (("old", "qb"), ("old2", "qc")):
            await q.enqueue(normalize_specs([{"func": FUNC, "job_id": job_id, "queue": queue}]))
            assert [g["job_id"] for g in await q.fetch("w1", [queue], 1, 30)] == [job_id]
        plan = [dict(queue="qa"), dict(queue="qa", priority=2), dict(queue="qb", batch="b1"),
                dict(queue="qa", batch="b1", job_id="mine-1"), dict(queue="qb", job_id="old"),
                dict(queue="qa", batch="b1"), dict(queue="qa", batch="b1", kwargs={"x": 1}),
                dict(queue="qc", job_id="old2"), dict(queue="qa")]
        batch = normalize_specs([{"func": FUNC, "args": [i], **extra}
                                 for i, extra in enumerate(plan)])
        chosen = {"mine-1", "old", "old2"}
        seq0 = int(await r.get(f"{KEYS.prefix}:seq"))
        statuses = ["queued"] * 4 + ["running"] + ["queued"] * 2 + ["running", "queued"]
        real, sent = q._send_enqueue, []

        async def record(strings, argv):
            sent.append((strings, argv))
            return await real(strings, argv)
        q._send_enqueue = record
        out = await q.enqueue(batch, may_exist=chosen)
        q._send_enqueue, sent_first = real, sent[0]
        ids = [s["job_id"] for s in batch]                # the master's own got pack ids
        assert out == [{"job_id": j, "status": s} for j, s in zip(ids, statuses)]
        packs = {0: [0], 1: [1], 2: [2], 5: [5, 6], 8: [8]}   # one per run: first -> jobs
        for first, members in packs.items():
            assert [ids[i] for i in members] == [f"{ids[first][:24]}{k:08x}"
                                                 for k in range(len(members))]
        assert len({ids[first][:24] for first in packs}) == len(packs)

        def seq(i):
            return f"{seq0 + i + 1:016x}"

        def member(i):  # each job its own place in line, in a pack too
            return f"{seq(i)}:{ids[i]}".encode()

        def pack_member(i):
            return f"{seq(i)}:{ids[i][:24]}".encode()
        # the master's own ids went into packs, one per run; the chosen one has a member
        assert await r.zrange(KEYS.queue("qa"), 0, -1, withscores=True) == [(member(3), 0.0)]
        assert await r.zrange(KEYS.packs("qa"), 0, -1, withscores=True) == [
            (pack_member(1), -2.0)] + [(pack_member(i), 0.0) for i in (0, 5, 8)]
        assert await r.zrange(KEYS.packs("qb"), 0, -1, withscores=True) == [
            (pack_member(2), 0.0)]
        for first, members in packs.items():
            pack_id = ids[first][:24]
            assert len(await pack_jobs(r, pack_id)) == len(members)
            info = await r.hgetall(KEYS.pack_info(pack_id))
            assert info == {
                b"n": str(len(members)).encode(), b"queue": batch[first]["queue"].encode(),
                b"seq": seq(first).encode(), b"next": b"0",
                b"priority": str(batch[first]["priority"]).encode(),
                b"batch": (batch[first].get("batch") or "").encode(),
                b"enqueued_at": info[b"enqueued_at"]}
        assert await r.zcard(KEYS.queue("qb")) == await r.zcard(KEYS.queue("qc")) == 0
        assert await r.zcard(KEYS.packs("qc")) == 0
        counters = {k.decode(): int(v) for k, v in (await r.hgetall(KEYS.counters)).items()}
        assert (counters["submitted"], counters["queue:qa:submitted"],
                counters["queue:qb:submitted"], counters["queue:qc:submitted"]) == (9, 6, 2, 1)
        assert await r.hget(KEYS.batch("b1"), "submitted") == b"4"
        assert {k.decode(): int(v) for k, v in (await r.hgetall(KEYS.packed_counts)).items()} \
            == {"qa": 5, "qb": 1}
        stats = await q.stats()
        assert (stats["by_status"]["queued"], stats["by_queue"]["qa"]["queued"],
                stats["by_queue"]["qb"]["queued"]) == (7, 6, 1)
        for i, spec in enumerate(batch):
            h = await r.hgetall(KEYS.job(ids[i]))
            if statuses[i] == "running":
                assert h[b"status"] == b"running" and b"args" not in h   # left alone
                continue
            if ids[i] not in chosen:
                assert h == {}
                first = 5 if i == 6 else i
                h = {**(await pack_jobs(r, ids[i][:24]))[i - first], b"status": b"queued",
                     b"member": member(i)}
            assert (h[b"status"], h[b"queue"].decode(), int(h[b"priority"]),
                    h.get(b"batch", b"").decode(), h[b"member"], h[b"args"]) == (
                b"queued", spec["queue"], spec["priority"], spec.get("batch") or "",
                member(i), msgpack.packb([i]))
            assert (h.get(b"kwargs") and msgpack.unpackb(h[b"kwargs"])) == spec["kwargs"] or \
                not spec["kwargs"] and b"kwargs" not in h
            view = await q.get_job(ids[i])
            assert (view["status"], view["queue"], view["args"], view["batch"]) == (
                "queued", spec["queue"], [i], spec.get("batch") or None)
            assert view["enqueued_at"] == int(h[b"enqueued_at"]) / 1000
        assert await q.get_statuses(ids + [ids[0][:24] + "00000001", "x" * 32]) == \
            statuses + [None, None]

        # the same command again (redis-py resending it): every status comes back,
        # nothing is added
        again = await real(*sent_first)
        assert [(int(a) - 1, b.decode()) for a, b in zip(again[::2], again[1::2])] == \
            list(enumerate(statuses))
        assert (await r.zcard(KEYS.queue("qa")), await r.zcard(KEYS.packs("qa")),
                await r.zcard(KEYS.packs("qb"))) == (1, 4, 1)
        assert [await waiting_in(r, ids[i][:24]) for i in packs] == [1, 1, 1, 2, 1]
        assert int(await r.hget(KEYS.counters, "submitted")) == 9
        assert await r.hget(KEYS.batch("b1"), "submitted") == b"4"
        assert (await q.stats())["by_status"]["queued"] == 7

        # workers take them in line: priority first, then submission order, packs and
        # single jobs merged, across queues too; a job taken from a pack gets its job hash,
        # member included
        order = [1, 0, 2, 3, 5, 6, 8]
        got = [g["job_id"] for g in await q.fetch("w2", ["qa"], 2, 30)]
        got += [g["job_id"] for g in await q.fetch("w2", ["qa", "qb"], 5, 30)]
        assert got == [ids[i] for i in order]
        for i in order:
            h = await r.hgetall(KEYS.job(ids[i]))
            assert (h[b"status"], h[b"attempts"], h[b"member"], h[b"args"], h[b"queue"]) == (
                b"running", b"1", member(i), msgpack.packb([i]), batch[i]["queue"].encode())
        assert await r.zcard(KEYS.packs("qa")) == await r.zcard(KEYS.packs("qb")) == 0
        await no_pack_left(r)
        assert await q.get_statuses([ids[i] for i in order]) == ["running"] * 7
        assert (await q.stats())["by_status"]["queued"] == 0
        # a job given back goes to its pack's place in line, ahead of newer jobs
        newer = specs(1, queue="qa")
        await q.enqueue(newer, may_exist=set())
        assert await q.release("w2", [(ids[5], 1)]) == 1
        assert [g["job_id"] for g in await q.fetch("w3", ["qa"], 2, 30)] == [
            ids[5], newer[0]["job_id"]]
    asyncio.run(with_queue(redis_url, body))


def test_a_run_longer_than_a_pack_takes_several_and_every_job_is_found(redis_url):
    """Pack ids end in 8 hex digits of index; a run of more than _PACK_MAX jobs is cut
    into packs. Each job is found by its id, listed, removed, and taken once."""
    from elric.queue import _PACK_MAX

    async def body(q, r):
        batch = specs(_PACK_MAX + 3)
        out = await q.enqueue(batch, may_exist=set())
        ids = [o["job_id"] for o in out]
        assert len(set(ids)) == len(ids) and {o["status"] for o in out} == {"queued"}
        first, second = ids[0][:24], ids[_PACK_MAX][:24]
        assert first != second and ids[-1] == f"{second}{2:08x}"
        assert await r.zcard(KEYS.packs("default")) == 2
        assert (await q.get_job(ids[-1]))["args"] == [_PACK_MAX + 2]
        assert await q.get_statuses([ids[_PACK_MAX - 1], f"{first}{_PACK_MAX:08x}"]) == [
            "queued", None]                                  # past the pack's end: none
        assert await q.remove(ids[1]) is True
        assert await q.get_job(ids[1]) is None and await q.remove(ids[1]) is False
        assert await q.get_statuses([ids[1]]) == [None]
        with pytest.raises(ValueError, match="is queued"):
            await q.rerun(ids[2])                             # waiting in its pack: live
        with pytest.raises(LookupError):
            await q.rerun(ids[1])
        assert len(await q.list_jobs(status="queued", limit=20_000)) == _PACK_MAX + 2
        assert (await q.stats())["by_status"]["queued"] == _PACK_MAX + 2
        taken = []
        while got := await q.fetch("w1", ["default"], 4000, 30):
            taken += [g["job_id"] for g in got]
        assert taken == ids[:1] + ids[2:]                   # in line, the removed one skipped
        assert (await q.stats())["by_status"]["queued"] == 0
        await no_pack_left(r)
    asyncio.run(with_queue(redis_url, body))


def test_pack_jobs_keep_their_place_in_line_when_given_back_or_removed(redis_url):
    """A job taken from a pack and given back goes back to its own place, ahead of the
    rest of its pack; a pack whose waiting jobs were all removed leaves the line at once
    (it must not hold a place a fetch looks at, nor stay in Redis)."""
    async def body(q, r):
        out = await q.enqueue(specs(5), may_exist=set())
        ids = [o["job_id"] for o in out]
        got = [g["job_id"] for g in await q.fetch("w1", ["default"], 2, 30)]
        assert got == ids[:2]
        assert await q.release("w1", [(ids[0], 1), (ids[1], 1)]) == 2
        got = [g["job_id"] for g in await q.fetch("w2", ["default"], 10, 30)]
        assert got == ids                                       # 0, 1 first, as before
        # removed: packs P1, P2 of one job each, then a single job X
        p1, p2 = [(await q.enqueue(specs(1), may_exist=set()))[0]["job_id"] for _ in "ab"]
        await q.enqueue(normalize_specs([{"func": FUNC, "job_id": "X"}]))
        assert await q.remove(p1) is True
        assert [g["job_id"] for g in await q.fetch("w3", ["default"], 1, 30)] == [p2]
        assert [g["job_id"] for g in await q.fetch("w3", ["default"], 1, 30)] == ["X"]
        # a pack all of whose jobs are removed is gone, fetched or not
        trio = [o["job_id"] for o in await q.enqueue(specs(3), may_exist=set())]
        for job_id in trio:
            assert await q.remove(job_id) is True
        await no_pack_left(r)
        assert (await q.stats())["by_status"]["queued"] == 0
        assert await q.list_jobs(status="queued") == []
        # and one partly removed keeps the place of its first job left
        four = [o["job_id"] for o in await q.enqueue(specs(4), may_exist=set())]
        await q.enqueue(normalize_specs([{"func": FUNC, "job_id": "Y"}]))
        assert await q.remove(four[0]) and await q.remove(four[2])
        got = [g["job_id"] for g in await q.fetch("w4", ["default"], 1, 30)]
        got += [g["job_id"] for g in await q.fetch("w4", ["default"], 10, 30)]
        assert got == [four[1], four[3], "Y"]
        await no_pack_left(r)
    asyncio.run(with_queue(redis_url, body))


def test_an_enqueue_resent_after_its_pack_emptied_queues_nothing_again(redis_url):
    """redis-py may resend ENQUEUE after its pack was taken and its first job removed:
    the pack's info (kept an hour) still says it was stored. Later than that, a resent
    pack is queued again, but FETCH runs none of its jobs twice."""
    async def body(q, r):
        real, sent = q._send_enqueue, []

        async def record(strings, argv):
            sent.append((strings, argv))
            return await real(strings, argv)
        q._send_enqueue = record
        ids = [o["job_id"] for o in await q.enqueue(specs(2), may_exist=set())]
        q._send_enqueue = real
        assert await q.remove(ids[0]) is True                  # removed while it waited
        assert [g["job_id"] for g in await q.fetch("w1", ["default"], 5, 30)] == ids[1:]
        again = await real(*sent[0])
        assert [x.decode() if isinstance(x, bytes) else x for x in again] == [
            1, "cancelled", 2, "running"]
        assert not await r.exists(KEYS.pack(ids[0][:24]))    # the string sent again: dropped
        assert await q.fetch("w1", ["default"], 5, 30) == []
        assert int(await r.hget(KEYS.counters, "submitted")) == 2
        # past the hour: queued again, but the job that has a hash does not run twice
        await r.delete(KEYS.pack_info(ids[0][:24]))
        await real(*sent[0])
        assert [g["job_id"] for g in await q.fetch("w1", ["default"], 5, 30)] == ids[:1]
        assert (await q.get_job(ids[1]))["attempts"] == 1
        assert (await q.stats())["by_status"]["queued"] == 0
        await no_pack_left(r)
    asyncio.run(with_queue(redis_url, body))


def test_a_pack_string_is_kept_only_when_its_enqueue_took_it(redis_url):
    """The master SETs a pack's string (with an expiry) just before ENQUEUE in the same
    pipeline: ENQUEUE makes it permanent; without the string (its SET failed) ENQUEUE
    refuses the whole call before writing anything; a script Redis lost is loaded."""
    from redis.exceptions import ResponseError

    async def body(q, r):
        out = await q.enqueue(specs(3), may_exist=set())
        pack_id = out[0]["job_id"][:24]
        assert await r.ttl(KEYS.pack(pack_id)) == -1
        # the string missing: NOPACK, nothing queued, no counter moved
        real, sent = q._send_enqueue, []

        async def without_strings(strings, argv):
            sent.append((strings, argv))
            return await real([], argv)
        q._send_enqueue = without_strings
        with pytest.raises(ResponseError, match="NOPACK"):
            await q.enqueue(specs(2) + normalize_specs([{"func": FUNC, "job_id": "c"}]),
                            may_exist={"c"})
        q._send_enqueue = real
        assert (await q.stats())["by_status"]["queued"] == 3
        assert int(await r.hget(KEYS.counters, "submitted")) == 3
        assert await q.get_job("c") is None
        (key, _), = sent[0][0]
        assert not await r.exists(key, key + ":info")
        # a string whose script refused the call (here: a stale fence token) expires
        record = []

        async def keep(strings, argv):
            record.append((strings, argv))
            argv = list(argv)
            argv[2:4] = [KEYS.scheduler_fence, "stale"]
            return await real(strings, argv)
        q._send_enqueue = keep
        with pytest.raises(Fenced):
            await q.enqueue(specs(2), may_exist=set())
        q._send_enqueue = real
        (key, _), = record[0][0]
        assert 0 < await r.ttl(key) <= 3600
        assert (await q.stats())["by_status"]["queued"] == 3
        # Redis lost its scripts (a restart): loaded again, the call goes through
        await r.script_flush()
        out = await q.enqueue(specs(2), may_exist=set())
        assert await r.ttl(KEYS.pack(out[0]["job_id"][:24])) == -1
        assert (await q.stats())["by_status"]["queued"] == 5
        # a SET Redis refuses (out of memory): the call fails, nothing is queued
        await r.config_set("maxmemory", 1)
        try:
            with pytest.raises(ResponseError, match="maxmemory"):
                await q.enqueue(specs(2), may_exist=set())
        finally:
            await r.config_set("maxmemory", 0)
        assert (await q.stats())["by_status"]["queued"] == 5
        assert int(await r.hget(KEYS.counters, "submitted")) == 5
    asyncio.run(with_queue(redis_url, body))


def test_a_packed_job_is_fetched_and_shown_as_the_same_job_with_a_chosen_id(redis_url):
    """The same specs through both layouts (a pack; a hash and a queue member) give the
    same fetch rows (what the worker runs: timeout, retries, scope...) and views."""
    async def body(q, r):
        shapes = [dict(), dict(kwargs={"a": 1, "ü": [1.5, None]}), dict(max_retries=3),
                  dict(timeout=2.5), dict(parent="p-1", dedupe_key="k", dedupe_scope="s"),
                  dict(batch="b-é", priority=-4), dict(args=[b"\x00\xff", "ünï", 2 ** 63 - 1]),
                  dict(dedupe_key="", dedupe_scope="round:1")]
        def made():
            out = normalize_specs([{"func": FUNC, "args": [i], **x}
                                   for i, x in enumerate(shapes)])
            out[2]["schedule"], out[2]["fire_time"] = "periodic-1", 1700000000.25
            return out
        packed, chosen = made(), made()
        for i, spec in enumerate(chosen):
            spec["job_id"] = f"mine-{i}"
        for i in range(len(shapes)):     # one queue per job: every run is its own pack
            for spec in (packed[i], chosen[i]):
                spec["queue"] = f"q{i}"
        await q.enqueue(packed, may_exist=set())
        await q.enqueue(chosen, may_exist={s["job_id"] for s in chosen})
        assert await r.zcard(KEYS.packs("q0")) == 1 and await r.zcard(KEYS.queue("q0")) == 1

        def same(a, b):
            a, b = dict(a), dict(b)
            for d in (a, b):
                d.pop("job_id")
                d.pop("enqueued_at", None)
                d.pop("started_at", None)
            return a == b
        for i in range(len(shapes)):
            p, c = packed[i]["job_id"], chosen[i]["job_id"]
            assert same(await q.get_job(p), await q.get_job(c)), i
            rows = await q.fetch("w", [f"q{i}"], 5, 30)
            assert [row["job_id"] for row in rows] == [c, p] or [row["job_id"] for row in rows] == [p, c]
            assert same(rows[0], rows[1]), (i, rows)
            assert same(await q.get_job(p), await q.get_job(c)), i
    asyncio.run(with_queue(redis_url, body))


def test_a_pack_that_lost_its_string_is_dropped_not_a_poison_for_its_queue(redis_url):
    """Redis must not evict, but a pack string deleted by hand or evicted must not make
    every fetch of its queue fail (nor claim the jobs ahead of it without handing them
    out): it leaves the line, its jobs are gone, the others run once."""
    async def body(q, r):
        await q.enqueue(normalize_specs([{"func": FUNC, "job_id": "ahead", "queue": "qp"}]))
        lost = [o["job_id"] for o in await q.enqueue(specs(3, queue="qp"), may_exist=set())]
        behind = [o["job_id"] for o in await q.enqueue(specs(2, queue="qp"), may_exist=set())]
        await r.delete(KEYS.pack(lost[0][:24]))
        assert await q.get_job(lost[1]) is None and await q.remove(lost[1]) is False
        got = [g["job_id"] for g in await q.fetch("w1", ["qp"], 10, 30)]
        assert got == ["ahead"] + behind
        assert (await q.get_job("ahead"))["attempts"] == 1
        assert (await q.stats())["by_queue"]["qp"]["queued"] == 0
        assert await q.fetch("w1", ["qp"], 10, 30) == []
        await no_pack_left(r)
    asyncio.run(with_queue(redis_url, body))
