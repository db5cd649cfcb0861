"""The counts kept beside the jobs (status indexes, queue sizes, parked counts, func, batch
and round live counts) agree with the jobs themselves after every step of random sequences
of queue operations (fixed seeds: the same steps every run).

In-process against the private redis-server, each test driving its coroutine with
asyncio.run.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import redis as sync_redis
import redis.asyncio as aredis

from elric import limits
from elric.bulk import Bulk, JobFilter
from elric.contract import NotFound, normalize_spec
from elric.jobstore import RedisJobStore
from elric.keys import Keys
from elric.queue import RedisQueue
from tests.conftest import outcome, redis_clock_past

KEYS = Keys("elrictest")
FUNCS = ("tests.jobs:Echo", "tests.jobs:Add")
LIVE = ("queued", "running", "retrying")
FAR = 2 ** 52   # ms: a time no walk reaches
INDEXED = ("running", "succeeded", "failed", "retrying", "cancelled")


# concurrency only: an interval would make what a fetch takes depend on the clock
RULES = ({"h1": {"concurrency": 1}, "h2": {"concurrency": 2}}, {"*": {"concurrency": 1}},
         {"h3": {"concurrency": 1}}, {})


class _Admission:
    """What Bulk needs of the master's admission, straight to the queue."""

    def __init__(self, queue):
        self.queue = queue

    def normalize(self, spec):
        return normalize_spec(spec)

    async def submit(self, specs):
        return await self.queue.enqueue(specs)

    async def rerun_many(self, job_ids):
        return await self.queue.rerun_many(job_ids)


async def truth(r):
    """Every job hash: job id -> its fields."""
    jobs = {}
    async for key in r.scan_iter(match=KEYS.job("*")):
        h = await r.hgetall(key)
        jobs[key.decode()[len(KEYS.job("")):]] = {a.decode(): b.decode() for a, b in h.items()}
    return jobs


async def check(q, r, rounds, step):
    """Every count against what the job hashes say; an AssertionError names the step."""
    jobs = await truth(r)
    stats = await q.stats()
    where = f"after {step}"
    by_status = Counter(j["status"] for j in jobs.values())
    for st in INDEXED:
        ids = {m.decode() for m in await r.zrange(KEYS.status(st), 0, -1)}
        want = {i for i, j in jobs.items() if j["status"] == st}
        assert ids == want, (where, st, ids ^ want)
        assert stats["by_status"][st] == by_status[st], (where, st)
    assert stats["by_status"]["queued"] == by_status["queued"], where
    # each queued job is once in its queue or its key's parked set, under its member
    lines = Counter()
    parked = Counter()
    for qn in await r.smembers(KEYS.queues):
        for m in await r.zrange(KEYS.queue(qn.decode()), 0, -1):
            lines[m.decode()] += 1
    for lk in ("h1", "h2", "h3"):
        for m in await r.zrange(KEYS.limit_parked(lk), 0, -1):
            lines[m.decode()] += 1
            job = jobs.get(m.decode()[17:])
            parked[job["queue"] if job else "?"] += 1
    want = Counter(j["member"] for j in jobs.values() if j["status"] == "queued")
    assert lines == want, (where, lines, want)
    counted = {a.decode(): int(b) for a, b in (await r.hgetall(KEYS.limits_parked)).items()}
    assert {k: v for k, v in counted.items() if v} == dict(parked), (where, counted, parked)
    per_queue = Counter(j["queue"] for j in jobs.values() if j["status"] == "queued")
    for qn, row in stats["by_queue"].items():
        assert row["queued"] == per_queue[qn], (where, qn)
    # inflight: the running jobs
    inflight = {m.decode() for m in await r.zrange(KEYS.inflight, 0, -1)}
    assert inflight == {i for i, j in jobs.items() if j["status"] == "running"}, where
    delayed = {m.decode() for m in await r.zrange(KEYS.delayed, 0, -1)}
    assert delayed == {i for i, j in jobs.items() if j["status"] == "retrying"}, where
    # live and running per func and batch, live per round
    for name, rows in (("func", stats["funcs"]), ("batch", stats["batches"])):
        live = Counter(j.get(name) for j in jobs.values() if j["status"] in LIVE)
        running = Counter(j.get(name) for j in jobs.values() if j["status"] == "running")
        for label, row in rows.items():
            assert (row["live"], row["running"]) == (live[label], running[label]), \
                (where, name, label, row, live[label], running[label])
        assert not set(live) - set(rows) - {None}, (where, name)
    for rnd in rounds:
        n = await r.hmget(KEYS.round(rnd), "submitted", "succeeded", "failed", "removed")
        s, ok, bad, gone = (int(x or 0) for x in n)
        live = sum(1 for j in jobs.values() if j.get("round") == rnd and j["status"] in LIVE)
        assert s - ok - bad - gone == live, (where, rnd, (s, ok, bad, gone), live)
    # the cumulative counters agree with each other: totals, per queue, per func, per minute
    totals = stats["totals"]
    counters = await r.hgetall(KEYS.counters)
    for name, func_name, minute in (("succeeded", "succeeded", "succeeded"),
                                    ("failed", "failed", "failed"),
                                    ("retrying", "retried", "retried"),
                                    ("cancelled", "cancelled", None),
                                    ("submitted", "submitted", None)):
        got = {"totals": totals[name],
               "funcs": sum(row[func_name] for row in stats["funcs"].values())}
        got["queues"] = sum(int(v) for k, v in counters.items()
                            if k.startswith(b"queue:") and k.endswith(b":" + name.encode()))
        if minute:
            got["minutes"] = sum(row[minute] for row in stats["throughput"])
        assert len(set(got.values())) == 1, (where, name, got)
    for lk in ("h1", "h2", "h3"):
        members = {m.decode() for m in await r.smembers(KEYS.limit_running(lk))}
        stale = {i for i in members if jobs.get(i, {}).get("status") != "running"}
        assert not stale, (where, lk, stale)
    return jobs


async def walk(url, seed, steps, n_jobs=30):
    rng = random.Random(seed)
    r = aredis.Redis.from_url(url)
    # a lost run fails its job at once, at the second loss, or never (MAX_REDELIVERIES)
    q = RedisQueue(r, KEYS, max_redeliveries=(0, 1, None)[seed % 3])
    bulk = Bulk(q, _Admission(q), r, KEYS, RedisJobStore(r, KEYS))
    await limits.publish(r, KEYS, limits.parse_rules(RULES[0]))
    held = {w: {} for w in ("w1", "w2", "w3")}   # worker -> job_id -> claim it holds
    ended = {w: [] for w in held}                # runs ended, not yet told to a fetch
    ids = [f"j{i}" for i in range(n_jobs)]
    rounds = ("r1", "r2")
    log = []
    ops = 0
    try:
        while ops < steps:
            op = rng.choice(["enqueue"] * 4 + ["fetch"] * 4 + ["finish"] * 4 + [
                "release", "hand_back", "expire", "cancel", "cancel", "remove", "rerun",
                "promote", "copy", "delete_batch", "cancel_batch", "limits", "recheck"])
            job_id = rng.choice(ids)
            w = rng.choice(list(held))
            desc = None
            if op == "enqueue":
                batch = []
                for jid in rng.sample(ids, rng.choice([1, 1, 2, 3])):
                    spec = {"func": rng.choice(FUNCS), "job_id": jid,
                            "queue": rng.choice(["qa", "qb"]), "priority": rng.choice([0, 0, 5]),
                            "max_retries": rng.choice([0, 1, 2])}
                    for key, values in (("batch", ["b1", "b2"]), ("round", rounds),
                                        ("limit_key", ["h1", "h2", "h3"])):
                        if rng.random() < 0.5:
                            spec[key] = rng.choice(values)
                    batch.append(spec)
                await q.enqueue([normalize_spec(spec) for spec in batch])
                desc = ("enqueue", batch)
            elif op == "limits":
                rules = rng.choice(RULES)
                await limits.publish(r, KEYS, limits.parse_rules(rules))
                desc = ("limits", rules)
            elif op == "fetch":
                told = ended[w]
                ended[w] = []
                got = await q.fetch(w, rng.choice([["qa"], ["qb"], ["qa", "qb"]]),
                                    rng.choice([0, 1, 2, 3]), 30, ended=told)
                for c in got.claims:
                    held[w][c.job_id] = c
                desc = ("fetch", w, told, [(c.job_id, c.attempt) for c in got.claims])
            elif op in ("finish", "release", "hand_back") and held[w]:
                picked = rng.sample(sorted(held[w]), min(len(held[w]), rng.choice([1, 1, 2, 3])))
                taken = [held[w].pop(jid) for jid in picked]
                claims = [c.run for c in taken]
                if op == "finish":
                    kinds = [rng.choice(["ok", "err", "err_retry", "cancel"]) for _ in claims]
                    outcomes = [outcome(c, kind == "ok", b"\x01" if kind == "ok" else "boom",
                                        retry_ms=0 if kind == "err_retry" else -1,
                                        cancelled=kind == "cancel")
                                for c, kind in zip(taken, kinds)]
                    res = await q.finish(w, outcomes)
                    if rng.random() < 0.2:   # sent again: its reply was lost
                        res = (res, await q.finish(w, outcomes))
                    desc = ("finish", w, claims, kinds, res)
                else:
                    n = await q.release(w, claims,
                                        reason="no module" if op == "hand_back" else None)
                    desc = (op, w, claims, n)
                if rng.random() < 0.5:
                    ended[w] += claims
            elif op == "expire":
                running = sorted(j for claims in held.values() for j in claims)
                job_id = rng.choice(running) if running else job_id   # (else it seldom runs)
                await r.zadd(KEYS.inflight, {job_id: 0}, xx=True)
                desc = ("expire+recover", job_id, await q.recover())
            elif op == "cancel":
                desc = ("cancel", job_id, await q.cancel(job_id))
            elif op == "remove":
                try:
                    desc = ("remove", job_id, await q.remove(job_id))
                except (ValueError, LookupError) as exc:
                    desc = ("remove", job_id, str(exc)[:20])
            elif op == "rerun":
                try:
                    desc = ("rerun", job_id, await q.rerun(job_id))
                except (ValueError, LookupError) as exc:
                    desc = ("rerun", job_id, str(exc)[:20])
            elif op == "promote":
                await r.zadd(KEYS.delayed, {job_id: 0}, xx=True)
                desc = ("promote", job_id, await q.promote())
            elif op == "recheck":   # a second went by: parked keys are looked at again
                due = await r.zrange(KEYS.limits_due, 0, -1)
                if due:
                    await r.zadd(KEYS.limits_due, {lk: 0 for lk in due})
                desc = ("recheck", due)
            elif op == "copy":
                pick = rng.sample(ids, 3)
                # a copy passes over jobs queued since it began: let Redis's clock pass them
                times = [int(t) for t in [await r.hget(KEYS.job(i), "enqueued_at")
                                          for i in pick] if t]
                if times:   # (its ms clock past the last: a µs past the next ms)
                    await redis_clock_past(r, (max(times) + 1) / 1000, interval=0.001)
                step = await bulk.run("copy", JobFilter(ids=pick), "", f"op{ops}")
                desc = ("copy", pick, step.touched)
            elif op in ("delete_batch", "cancel_batch"):
                b = rng.choice(["b1", "b2"])
                try:
                    step = await bulk.run(op.split("_")[0], JobFilter(batch=b))
                except NotFound:   # no job of it lately: none is stored
                    assert not [i for i in ids
                                if await r.hget(KEYS.job(i), "batch") == b.encode()]
                    continue
                desc = (op, b, step.touched, step.skipped)
            if desc is None:
                continue
            ops += 1
            log.append(desc)
            # parked keys are looked at again only at a "recheck" (or a slot freed), not
            # when a second of the clock went by: the same seed takes the same steps
            later = await r.zrangebyscore(KEYS.limits_due, "(0", "+inf")
            if later:
                await r.zadd(KEYS.limits_due, {lk: FAR for lk in later})
            try:
                await check(q, r, rounds, desc)
            except AssertionError as exc:
                raise AssertionError(f"seed {seed} step {ops}: {exc}\nsteps:\n" +
                                     "\n".join(map(repr, log[-25:]))) from None
        return log
    finally:
        await r.aclose()


def test_counts_agree_with_the_jobs_through_random_operations(redis_url):
    for seed in range(3):
        client = sync_redis.Redis.from_url(redis_url)
        client.flushdb()   # the private server's, as the fixture did
        client.close()
        asyncio.run(walk(redis_url, seed, 200))
