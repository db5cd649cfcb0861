"""Tests of elric.dedupe: the three dedupe backends against a real (private) redis-server.

pytest-asyncio is not installed: every test drives its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time

import pytest
import redis
import redis.asyncio as aredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio.connection import Connection

from elric import rbloom
from elric.dedupe import DedupeError, _StagedBloom, make_filter
from elric.keys import Keys

BACKENDS = ["set", "bloom", "redis-bloom"]
SHARED = ["set", "redis-bloom"]          # backends several masters may share
KEYS = Keys("elrictest")


class CountingConnection(Connection):
    """Counts what the client sends: one send per command or per pipeline = one round trip."""

    sends = 0

    async def send_packed_command(self, command, check_health=True):
        type(self).sends += 1
        return await super().send_packed_command(command, check_health)


def client(url, counting=False):
    if counting:
        return aredis.Redis.from_url(url, connection_class=CountingConnection)
    return aredis.Redis.from_url(url)


def run(coro):
    return asyncio.run(coro)


async def with_filter(url, backend, body, **kw):
    """Run ``body(filter, client)`` with a started filter, closing both after."""
    r = client(url)
    f = make_filter(backend, r, KEYS, **kw)
    await f.start()
    try:
        return await body(f, r)
    finally:
        await f.close()
        await r.aclose()


def urls(n, tag="u", start=0):
    return [f"https://example{i % 97}.org/{tag}/{i}?q={i * 7919 % 100003}" for i in range(start, start + n)]


# --- basic behaviour, every backend ----------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_new_then_seen_and_duplicates_in_one_call(redis_url, backend):
    async def body(f, r):
        assert await f.check_and_add("s", []) == []
        assert await f.check_and_add("s", ["a", "b", "a", "c", "b"]) == [True, True, False, True, False]
        assert await f.check_and_add("s", ["a", "d", "c", "d"]) == [False, True, False, False]
        assert await f.check_and_add("s", ["d"]) == [False]
        assert f.name == backend
        assert f.can_release == (backend == "set")
    run(with_filter(redis_url, backend, body, capacity=1000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_key_whose_taker_note_is_past_the_takeover_age_goes_to_the_next_job_once(
        redis_url, backend):
    """A key taken for a job never queued (its note left) goes, past the takeover age, to
    the next job asking for it, once: in a call of seen keys only and in one with new keys
    (`bloom` kept it for good under a new id)."""
    async def body(f, r):
        assert await f.check_and_add("s", ["a", "b"], ["J", "K"]) == [True, True]
        for k in ("a", "b"):   # aged past the takeover age: waiting is no test
            note = KEYS.dedupe_taking(Keys.taker_note("s", k))
            await r.pexpire(note, await r.pttl(note) - 61_000)
        assert await f.check_and_add("s", ["a", "a"], ["L", "M"]) == [True, False]
        assert await f.check_and_add("s", ["c", "b", "b"], ["N", "O", "P"]) == [True, True, False]
        assert await f.owned("s", ["a", "b", "c"], ["L", "O", "N"]) == [True] * 3
        assert await f.check_and_add("s", ["a", "b", "c"], ["Q", "R", "S"]) == [False] * 3
    run(with_filter(redis_url, backend, body, capacity=1000, takeover_after=60))


@pytest.mark.parametrize("backend", BACKENDS)
def test_scopes_are_independent_and_drop_scope_forgets(redis_url, backend):
    async def body(f, r):
        assert await f.check_and_add("round-1", ["x", "y"]) == [True, True]
        assert await f.check_and_add("round-2", ["x", "z"]) == [True, True]
        assert await f.check_and_add("round-1", ["x", "z"]) == [False, True]
        await f.drop_scope("round-1")
        assert await f.check_and_add("round-1", ["x", "y"]) == [True, True]
        assert await f.check_and_add("round-2", ["x", "z"]) == [False, False]
        # Scope names are free text, glob characters included.
        assert await f.check_and_add("a*[b]?", ["x"]) == [True]
        assert await f.check_and_add("a*[b]?", ["x"]) == [False]
    run(with_filter(redis_url, backend, body, capacity=1000))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_fields(redis_url, backend):
    async def body(f, r):
        await f.check_and_add("s1", urls(500))
        await f.check_and_add("s1", urls(200))          # 200 seen: the caller drops them
        await f.count("s1", 200)
        await f.check_and_add("s2", ["one"])
        if backend == "bloom":
            await f.snapshot()
        return await f.stats()
    stats = run(with_filter(redis_url, backend, body, capacity=1000, error_rate=0.01))
    assert set(stats) == {"s1", "s2"}
    s = stats["s1"]
    assert s["backend"] == backend
    assert s["items"] == 500
    assert s["filtered"] == 200
    assert stats["s2"]["items"] == 1 and stats["s2"]["filtered"] == 0
    assert s["bytes"] > 0
    if backend == "set":
        assert 500 * 20 < s["bytes"] < 500 * 500
    else:
        assert s["capacity"] == 1000
        # 500 of 1000 items: about a third of the bits are set.
        assert 0.15 < s["fill_ratio"] < 0.5
        assert 0 < s["expected_fp_rate"] < 0.01
        assert 1000 < s["bytes"] < 4000                  # ~1.3 bytes/item at 1% + overhead


def test_stats_ignore_scopes_of_other_backends(redis_url):
    async def body(a, r):
        b = make_filter("redis-bloom", r, KEYS, capacity=1000)
        await a.check_and_add("by-set", ["k"])
        await b.check_and_add("by-rbloom", ["k"])
        return await a.stats(), await b.stats()
    sa, sb = run(with_filter(redis_url, "set", body))
    assert list(sa) == ["by-set"] and list(sb) == ["by-rbloom"]


# --- release -----------------------------------------------------------------------------

@pytest.mark.parametrize("ttl", [None, 60.0])
def test_set_release_makes_keys_new_again(redis_url, ttl):
    async def body(f, r):
        assert await f.check_and_add("s", ["a", "b", "c"]) == [True] * 3
        await f.release("s", ["a", "c", "never-added"])
        await f.release("s", [])
        assert await f.check_and_add("s", ["a", "b", "c"]) == [True, False, True]
    run(with_filter(redis_url, "set", body, set_ttl=ttl))


# --- set expiry ----------------------------------------------------------------------------

def test_set_ttl_key_becomes_new_again_after_ttl(redis_url):
    ttl = 0.3

    async def body(f, r):
        t0 = time.monotonic()
        assert await f.check_and_add("s", ["a", "b"]) == [True, True]
        t_added = time.monotonic()
        deadline = t_added + 20
        while True:
            res = await f.check_and_add("s", ["a"])
            if res == [True]:
                break
            assert time.monotonic() < deadline, "key never became new again"
            await asyncio.sleep(0.02)   # a poll interval, not a fixed wait
        # Never new again before ttl (a little slack between Redis TIME and our clock).
        assert time.monotonic() - t0 >= ttl - 0.02
        # The key was re-admitted just now, so it is seen again; "b" expired as well.
        assert await f.check_and_add("s", ["a", "b"]) == [False, True]
        # Expired members are pruned and the zset carries a TTL.
        pttl = await r.pttl(KEYS.dedupe_set("s"))
        assert 0 < pttl <= ttl * 1000
    run(with_filter(redis_url, "set", body, set_ttl=ttl))


def test_set_ttl_does_not_expire_early(redis_url):
    async def body(f, r):
        assert await f.check_and_add("s", ["a"]) == [True]
        for _ in range(5):
            assert await f.check_and_add("s", ["a"]) == [False]
        stats = await f.stats()
        assert stats["s"]["items"] == 1
    run(with_filter(redis_url, "set", body, set_ttl=3600))


def test_set_ttl_setting_mismatch_is_a_clear_error(redis_url):
    async def body(plain, r):
        timed = make_filter("set", r, KEYS, set_ttl=10)
        await plain.check_and_add("s", ["a"])
        with pytest.raises(DedupeError, match="set_ttl"):
            await timed.check_and_add("s", ["a"])
    run(with_filter(redis_url, "set", body))


# --- concurrency: two masters ---------------------------------------------------------------

@pytest.mark.parametrize("backend,capacity", [
    ("set", 0), ("redis-bloom", 100_000), ("redis-bloom", 300)])
def test_two_masters_admit_each_key_exactly_once(redis_url, backend, capacity):
    """Capacity 300: the 2,000 keys fill stages of 300, 600 and 1,200 while both masters
    race, so calls with a stale item count meet a stage that filled meanwhile."""
    keys = urls(2000, "c")
    # 1e-12: no genuine false positive among 2,000 keys, so any lost key is a bug
    kw = {"capacity": capacity, "error_rate": 1e-12} if capacity else {}

    async def master(seed, ready, go):
        # Own connection pool: a separate master process as far as Redis is concerned.
        r = client(redis_url)
        f = make_filter(backend, r, KEYS, **kw)
        await f.start()
        await f.check_and_add("warm-up", ["x"])       # connected, script loaded
        ready.release()
        rnd = random.Random(seed)
        batches = []
        for _ in range(3):              # every key three times per master, in shuffled batches
            order = keys[:]
            rnd.shuffle(order)
            batches += [order[i:i + 100] for i in range(0, len(order), 100)]
        rnd.shuffle(batches)
        await go.wait()                                # both masters start together
        results = await asyncio.gather(*(f.check_and_add("crawl", b) for b in batches))
        await f.close()
        await r.aclose()
        return [k for b, res in zip(batches, results) for k, new in zip(b, res) if new]

    async def main():
        ready, go = asyncio.Semaphore(0), asyncio.Event()

        async def starter():
            await ready.acquire()
            await ready.acquire()
            go.set()
        a, b, _ = await asyncio.gather(master(1, ready, go), master(2, ready, go), starter())
        return a, b

    a, b = run(main())
    admitted = a + b
    assert len(admitted) == len(keys)
    assert sorted(admitted) == sorted(keys)
    assert a and b                      # both masters really raced


def test_bloom_concurrent_calls_in_one_master(redis_url):
    keys = urls(2000, "c")

    async def body(f, r):
        batches = [keys[i::7] for i in range(7)] * 3
        results = await asyncio.gather(*(f.check_and_add("crawl", b) for b in batches))
        return sum(sum(res) for res in results)
    assert run(with_filter(redis_url, "bloom", body, capacity=100_000)) == len(keys)


def test_redis_bloom_params_must_match_between_masters(redis_url):
    async def main():
        r = client(redis_url)
        a = make_filter("redis-bloom", r, KEYS, capacity=1000, error_rate=0.01)
        b = make_filter("redis-bloom", r, KEYS, capacity=2000, error_rate=0.01)
        await a.check_and_add("s", ["k"])
        with pytest.raises(DedupeError, match="same capacity and error_rate"):
            await b.check_and_add("s", ["k2"])
        assert (await b.stats())["s"]["error"]
        await b.drop_scope("s")          # dropping the scope lets the new parameters in
        assert await b.check_and_add("s", ["k"]) == [True]
        assert await r.exists(KEYS.dedupe_rbloom("s", 0)) == 1
        await r.aclose()
    run(main())


# --- bloom snapshots ---------------------------------------------------------------------------

def test_bloom_snapshot_on_close_and_reload_on_start(redis_url):
    keys = urls(3500, "snap")     # capacity 1000: stages of 1000, 2000, 4000

    async def main():
        r = client(redis_url)
        f = make_filter("bloom", r, KEYS, capacity=1000, error_rate=0.01, snapshot_interval=3600)
        await f.start()
        admitted = sum(await f.check_and_add("s", keys))      # grows to a third stage
        assert admitted > 0.97 * len(keys)                    # 1% false positives allowed
        assert await f.check_and_add("s", keys[:10]) == [False] * 10
        await f.count("s", 10)   # the snapshot keeps the count
        await f.check_and_add("other", ["x"])
        before = await f.stats()
        await f.close()
        raw = await r.get(KEYS.dedupe_bloom("s"))
        assert raw and b"pickle" not in raw and not raw.startswith(b"\x80")  # our format, not pickle
        assert raw.startswith(_StagedBloom.MAGIC)

        g = make_filter("bloom", r, KEYS, capacity=1000, error_rate=0.01, snapshot_interval=3600)
        await g.start()
        after = await g.stats()
        assert set(after) == {"s", "other"}
        assert after["s"]["items"] == admitted
        assert after["s"]["items"] == before["s"]["items"]
        assert after["s"]["filtered"] == before["s"]["filtered"]
        assert after["s"]["stages"] == before["s"]["stages"] == 3
        res = await g.check_and_add("s", keys)
        assert not any(res)                                       # no false negatives
        assert await g.check_and_add("other", ["x", "y"]) == [False, True]
        await g.close()
        await r.aclose()
    run(main())


def test_bloom_periodic_snapshot_without_close(redis_url):
    async def main():
        r = client(redis_url)
        f = make_filter("bloom", r, KEYS, capacity=1000, snapshot_interval=0.05)
        await f.start()
        await f.check_and_add("s", ["a", "b"])
        deadline = time.monotonic() + 20
        while not await r.exists(KEYS.dedupe_bloom("s")):
            assert time.monotonic() < deadline, "no periodic snapshot"
            await asyncio.sleep(0.02)
        # A "crashed" master: a new instance sees what the periodic snapshot saved.
        g = make_filter("bloom", r, KEYS, capacity=1000, snapshot_interval=0)
        assert await g.check_and_add("s", ["a", "b", "c"]) == [False, False, True]  # lazy load
        await f.close()
        await r.aclose()
    run(main())


def test_bloom_drop_scope_removes_snapshot(redis_url):
    async def body(f, r):
        await f.check_and_add("s", ["a"])
        await f.snapshot()
        assert await r.exists(KEYS.dedupe_bloom("s"))
        await f.drop_scope("s")
        assert not await r.exists(KEYS.dedupe_bloom("s"), KEYS.dedupe_stats("s"))
        assert await f.snapshot() == 0
        assert not await r.exists(KEYS.dedupe_bloom("s"))
        # nothing of it stays in the master: a round scope per fire would pile up
        assert "s" not in f._filters
    run(with_filter(redis_url, "bloom", body, capacity=100))


def test_bloom_corrupt_snapshot_is_refused(redis_url):
    async def main():
        r = client(redis_url)
        # as a snapshot writes it: with its stats hash and registry entry
        await r.set(KEYS.dedupe_bloom("s"), b"garbage")
        await r.hset(KEYS.dedupe_stats("s"), mapping={"backend": "bloom", "items": 5})
        await r.zadd(KEYS.dedupe_scopes, {"s": float("inf")})
        f = make_filter("bloom", r, KEYS, snapshot_interval=0)
        with pytest.raises(DedupeError, match="unreadable Bloom snapshot"):
            await f.start()
        # a snapshot with no stats hash is refused when its scope is first used
        await r.set(KEYS.dedupe_bloom("t"), b"garbage")
        g = make_filter("bloom", r, KEYS, snapshot_interval=0)
        with pytest.raises(DedupeError, match="unreadable Bloom snapshot"):
            await g.check_and_add("t", ["k"])
        await r.aclose()
    run(main())


def test_capacity_warning_logged_once_per_scope(redis_url, caplog):
    async def body(f, r):
        scope = f"s-{f.name}"    # a scope belongs to one backend
        for _ in range(3):
            await f.check_and_add(scope, [f"k{i}" for i in range(60)])
            await f.check_and_add(scope, urls(80, tag=str(random.random())))
    for backend in ["bloom", "redis-bloom"]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="elric.dedupe"):
            run(with_filter(redis_url, backend, body, capacity=100))
        warnings = [r for r in caplog.records if "passed its Bloom capacity" in r.getMessage()]
        assert len(warnings) == 1, backend


# --- growth ------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["bloom", "redis-bloom"])
def test_growth_across_stages_inside_one_call(redis_url, backend):
    """Capacity 100: stages of 100, 200, 400, 800 items. One call crosses three stage
    boundaries, and its duplicates must be found in the old (read-only) stages."""
    keys = urls(1500, "grow")

    async def body(f, r):
        res = await f.check_and_add("g", keys + keys[:300] + keys[1400:])
        assert res[1500:] == [False] * 400
        admitted = sum(res[:1500])
        assert admitted >= 1500 - 10                      # 0.1% false positives
        assert not any(await f.check_and_add("g", keys))  # never a false negative
        s = (await f.stats())["g"]
        assert s["items"] == admitted
        assert s["stages"] == 4 and s["capacity"] == 1500
        assert s["expected_fp_rate"] <= 0.0012
        return s
    run(with_filter(redis_url, backend, body, capacity=100, error_rate=0.001))


def test_redis_bloom_stale_master_catches_up_with_growth(redis_url):
    """b's item count is stale: its first call sends too few stages, the script answers
    how far it got (no key), and b sends them again with the stages it now knows of."""
    keys = urls(1000, "stale")

    async def main():
        ra, rb = client(redis_url), client(redis_url, counting=True)
        a = make_filter("redis-bloom", ra, KEYS, capacity=100)
        b = make_filter("redis-bloom", rb, KEYS, capacity=100)
        assert await b.check_and_add("s", ["first"]) == [True]    # b believes: 1 item, stage 0
        for i in range(0, 1000, 50):
            await a.check_and_add("s", keys[i:i + 50])            # a grows it to stage 3
        CountingConnection.sends = 0
        res = await b.check_and_add("s", keys[:10] + ["fresh"])
        assert res == [False] * 10 + [True]
        assert CountingConnection.sends == 2
        CountingConnection.sends = 0
        assert await b.check_and_add("s", keys[10:20]) == [False] * 10
        assert CountingConnection.sends == 1                       # caught up
        await ra.aclose()
        await rb.aclose()
    run(main())


# --- false-positive rate ------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["bloom", "redis-bloom"])
@pytest.mark.parametrize("error_rate,capacity,probes", [(0.01, 20_000, 20_000), (0.001, 30_000, 60_000)])
@pytest.mark.parametrize("fill", [1, 3])
def test_false_positive_rate_within_target(redis_url, backend, error_rate, capacity, probes, fill):
    """After capacity (and after growing to 3x capacity), fresh keys are wrongly
    called "seen" at most 1.2x the configured rate, plus 3 sigma of sampling noise."""

    async def body(f, r):
        added = urls(capacity * fill, "in")
        for i in range(0, len(added), 1000):
            await f.check_and_add("fp", added[i:i + 1000])
        fresh = urls(probes, "fresh")
        fps = 0
        for i in range(0, len(fresh), 1000):
            fps += (await f.check_and_add("fp", fresh[i:i + 1000])).count(False)
        assert not any(await f.check_and_add("fp", added[:5000]))   # never a false negative
        return fps, await f.stats()

    fps, stats = run(with_filter(redis_url, backend, body, capacity=capacity, error_rate=error_rate))
    expected = 1.2 * error_rate * probes
    assert fps <= expected + 3 * math.sqrt(expected), (fps, expected)
    s = stats["fp"]
    assert s["expected_fp_rate"] <= 1.2 * error_rate
    assert s["stages"] >= (1 if fill == 1 else 2)


# --- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend,ttl", [("set", None), ("set", 60), ("bloom", None), ("redis-bloom", None)])
def test_one_round_trip_per_call(redis_url, backend, ttl):
    kw = {"set_ttl": ttl} if ttl else {"capacity": 5000}

    async def main():
        r = client(redis_url, counting=True)
        f = make_filter(backend, r, KEYS, snapshot_interval=0, **kw)
        await f.start()
        await f.check_and_add("s", ["warm-up"])      # loads the script / the snapshot once
        info = redis.Redis.from_url(redis_url)
        before_cmds = info.info("commandstats")
        CountingConnection.sends = 0
        res = await f.check_and_add("s", urls(1000) + urls(500))  # 500 duplicates inside the call
        sends = CountingConnection.sends
        after_cmds = info.info("commandstats")
        info.close()
        await f.close()
        await r.aclose()
        return res, sends, before_cmds, after_cmds

    res, sends, before, after = run(main())
    assert res == [True] * 1000 + [False] * 500
    top = {k: after[k]["calls"] - before.get(k, {}).get("calls", 0) for k in after}
    if backend == "bloom":
        assert sends == 0                               # in memory
        return
    assert sends == 1
    assert top.get("cmdstat_evalsha", 0) == 1 and top.get("cmdstat_eval", 0) == 0


# --- properties -----------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.sampled_from([f"k{i}" for i in range(30)]), max_size=12), max_size=8))
@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_a_python_set(redis_url, backend, batches):
    """Every backend agrees with an exact set here (tiny key count, so no Bloom false positive)."""

    async def main():
        r = client(redis_url)
        scope = f"prop-{random.getrandbits(64)}"        # the fixture does not flush between examples
        f = make_filter(backend, r, KEYS, capacity=10_000, error_rate=0.0001)
        seen = set()
        for batch in batches:
            want = []
            for k in batch:
                want.append(k not in seen)
                seen.add(k)
            assert await f.check_and_add(scope, batch) == want
        await f.drop_scope(scope)
        await r.aclose()
    run(main())


# --- configuration errors ---------------------------------------------------------------------------

def test_make_filter_rejects_bad_settings(redis_url):
    r = client(redis_url)
    with pytest.raises(DedupeError, match="unknown dedupe backend"):
        make_filter("cuckoo", r, KEYS)
    with pytest.raises(DedupeError, match="set_ttl"):
        make_filter("bloom", r, KEYS, set_ttl=10)
    with pytest.raises(DedupeError, match="error_rate"):
        make_filter("redis-bloom", r, KEYS, error_rate=1.5)
    with pytest.raises(DedupeError, match="capacity"):
        make_filter("bloom", r, KEYS, capacity=0)
    with pytest.raises(DedupeError, match="set_ttl"):
        make_filter("set", r, KEYS, set_ttl=0)


# --- redis-bloom: the bits in Redis are the ones positions_array() names -------------------

def test_redis_bloom_sets_exactly_the_bits_positions_names(redis_url):
    # the script sets the bits positions_array sent, and no others
    keys = urls(300, "bits")

    async def body(f, r):
        new = await f.check_and_add("s", keys)
        assert sum(new) > len(keys) * 0.95
        expected: dict[str, set[int]] = {}
        stage_of_shard = {}
        items = 0
        for key, is_new in zip(keys, new):
            if not is_new:       # a false positive: all its bits were set already
                continue
            st = f.stage(f.stage_of(items))          # a new key goes to the current stage
            items += 1
            shard, offs = rbloom.positions_array(rbloom.hash_keys([key.encode()]), st)
            name = KEYS.dedupe_rbloom("s", st.first_shard + int(shard[0]))
            stage_of_shard[name] = st
            expected.setdefault(name, set()).update(offs[0].tolist())
        assert f.stage_of(items - 1) >= 2          # several stages were used
        found = {}
        for name, st in stage_of_shard.items():
            data = await r.get(name)
            assert len(data) == st.shard_bytes     # created at full size, never grown
            assert data[-1] == 0                   # the creation byte
            found[name] = {i * 8 + b for i, byte in enumerate(data) for b in range(8)
                           if byte & (0x80 >> b)}
        assert found == expected
        extra = [k async for k in r.scan_iter(KEYS.dedupe_rbloom("s", "*"))]
        assert {k.decode() for k in extra} == set(expected)
    run(with_filter(redis_url, "redis-bloom", body, capacity=60, error_rate=0.01))


def test_redis_bloom_next_stage_created_at_full_size(redis_url):
    """A call that fills a stage with its last key leaves the next stage to the next
    call, which creates its shards at full size before a key goes in."""
    async def body(f, r):
        assert all(await f.check_and_add("s", urls(100, "full")))   # stage 0 exactly full
        st1 = f.stage(1)
        names = [KEYS.dedupe_rbloom("s", st1.first_shard + g) for g in range(st1.shards)]
        assert not await r.exists(*names)
        assert await f.check_and_add("s", ["next"]) == [True]
        assert [await r.strlen(n) for n in names] == [st1.shard_bytes] * st1.shards
        assert (await f.stats())["s"]["items"] == 101
    run(with_filter(redis_url, "redis-bloom", body, capacity=100, error_rate=1e-9))


def test_redis_bloom_long_call_in_several_script_calls(redis_url, monkeypatch):
    """A call of more keys than one script call takes is sent in parts; verdicts and
    duplicates across the parts are the same as in one."""
    from elric import dedupe
    monkeypatch.setattr(dedupe, "_MAX_KEYS", 7)
    keys = urls(40, "long")

    async def body(f, r):
        res = await f.check_and_add("s", keys + keys[:5] + ["x", "x"])
        assert res == [True] * 40 + [False] * 5 + [True, False]
        assert (await f.stats())["s"]["items"] == 41
    run(with_filter(redis_url, "redis-bloom", body, capacity=10, error_rate=1e-9))


# --- the scope registry: stats() without SCAN ---------------------------------------------

async def registered(r):
    return set(await r.zrange(KEYS.dedupe_scopes, 0, -1))


def scans(url):
    info = redis.Redis.from_url(url)
    try:
        return info.info("commandstats").get("cmdstat_scan", {}).get("calls", 0)
    finally:
        info.close()


@pytest.mark.parametrize("backend,ttl", [("set", None), ("set", 3600), ("bloom", None),
                                         ("redis-bloom", None)])
def test_stats_and_start_read_the_scope_registry_not_the_keyspace(redis_url, backend, ttl):
    kw = {"set_ttl": ttl} if ttl else {"capacity": 1000}
    filler = redis.Redis.from_url(redis_url)          # the queue's job hashes, say
    filler.mset({f"{KEYS.prefix}:job:{i}": "x" for i in range(3000)})
    filler.close()

    async def body(f, r):
        await f.check_and_add("round-1", ["a", "b"])
        await f.check_and_add("round-2", ["a"])
        if backend == "bloom":
            await f.snapshot()
        assert await registered(r) == {b"round-1", b"round-2"}
        before = scans(redis_url)
        assert set(await f.stats()) == {"round-1", "round-2"}
        assert scans(redis_url) == before                # no walk over 3,000 job keys
        await f.drop_scope("round-1")
        assert await registered(r) == {b"round-2"}
        assert set(await f.stats()) == {"round-2"}
        await f.close()
        # a restarted master finds its scopes through the registry too
        before = scans(redis_url)
        g = make_filter(backend, r, KEYS, snapshot_interval=0, **kw)
        await g.start()
        assert scans(redis_url) == before
        if backend == "bloom":
            assert set(g._filters) == {"round-2"}            # its snapshot was reloaded
        assert await g.check_and_add("round-2", ["a", "c"]) == [False, True]
        assert (await g.stats())["round-2"]["items"] == 2
        await g.close()
    run(with_filter(redis_url, backend, body, snapshot_interval=0, **kw))


def test_set_scopes_expired_by_ttl_leave_the_registry(redis_url):
    async def body(f, r):
        await f.check_and_add("brief", ["a"])
        await f.check_and_add("kept", ["a"])
        await r.delete(KEYS.dedupe_stats("brief"), KEYS.dedupe_set("brief"))  # gone early
        assert set(await f.stats()) == {"kept"}
        assert await registered(r) == {b"kept"}
        # used again, it is registered again
        assert await f.check_and_add("brief", ["a"]) == [True]
        assert set(await f.stats()) == {"brief", "kept"}
    run(with_filter(redis_url, "set", body, set_ttl=3600))


def test_registry_entries_of_ttl_scopes_expire_with_them_without_stats(redis_url):
    """Many short-lived scopes (DEDUPE_TTL) must not pile up in the registry when nobody
    calls stats(): every call of the filter drops the entries that expired."""
    async def body(f, r):
        for i in range(50):
            await f.check_and_add(f"site-{i}", ["a"])
        assert len(await registered(r)) == 50
        deadline = time.monotonic() + 20
        while await r.exists(*[KEYS.dedupe_stats(f"site-{i}") for i in range(50)]):
            assert time.monotonic() < deadline, "the scopes never expired"
            await asyncio.sleep(0.02)      # polling Redis's own expiry, not a fixed wait
        await f.check_and_add("later", ["a"])
        assert await registered(r) == {b"later"}
    run(with_filter(redis_url, "set", body, set_ttl=0.2))


# --- which backend a scope goes to ------------------------------------------------------------

def test_filter_scopes_cover_the_rounds_of_a_periodic_job_whose_id_has_an_at_sign():
    """A fire's scope is ``{job_id}@{time}``, and a job id may hold '@' itself: the
    periodic job's entry in FILTER_SCOPES must still pick its rounds' backend."""
    from elric.config import load_settings
    from elric.reservation import DedupeGate
    from elric.scheduler import fire_id

    s = load_settings(env={}, overrides=dict(
        FILTER_SCOPES={"digest@ops.example": "redis-bloom", "site": "bloom"}))
    gate = DedupeGate(s, {b: b for b in BACKENDS}, queue=None)
    assert gate.filter_for(fire_id("digest@ops.example", 1893456000.0)) == "redis-bloom"
    assert gate.filter_for(fire_id("site", 1893456000.0)) == "bloom"
    assert gate.filter_for("site@eu") == "bloom"       # as before: a scope named after it
    assert gate.filter_for("digest@ops") == "set"


@pytest.mark.parametrize("first, then", [(a, b) for a in BACKENDS for b in BACKENDS if a != b])
def test_a_scope_filled_by_one_backend_is_refused_by_another(redis_url, first, then):
    """FILTER_BACKEND changed, or two masters with different FILTER_SCOPES: the other
    backend would start the scope empty and let every key seen before through again."""
    async def fill(f, r):
        assert await f.check_and_add("s", ["seen"]) == [True]
    run(with_filter(redis_url, first, fill, snapshot_interval=0))   # (bloom: snapshot)

    async def ask(f, r):
        with pytest.raises(DedupeError, match=f"filled by the '{first}' backend"):
            await f.check_and_add("s", ["seen"])
        assert await f.check_and_add("other", ["seen"]) == [True]
    run(with_filter(redis_url, then, ask, snapshot_interval=0))


def test_bloom_final_snapshot_goes_through_a_redis_blip(redis_url):
    """The last snapshot, on shutdown, is all a 'bloom' scope keeps of the keys since the
    one before (all of them with BLOOM_SNAPSHOT_INTERVAL 0): one failed write must not
    forget them."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    async def main():
        r = client(redis_url)
        f = make_filter("bloom", r, KEYS, snapshot_interval=0)
        await f.start()
        assert await f.check_and_add("s", ["a", "b"]) == [True, True]
        real, calls = r.pipeline, []

        def blip(*args, **kwargs):
            calls.append(1)
            if len(calls) == 1:
                raise RedisConnectionError("Connection reset by peer")
            return real(*args, **kwargs)
        r.pipeline = blip
        await f.close()
        r.pipeline = real
        g = make_filter("bloom", r, KEYS, snapshot_interval=0)
        await g.start()
        assert await g.check_and_add("s", ["a", "b", "c"]) == [False, False, True]
        await g.close()
        await r.aclose()
    run(main())


def test_redis_bloom_remembers_a_bounded_number_of_scopes(redis_url, monkeypatch):
    """Item counts are a per-master hint; a master that never drops the scopes another
    master drops (fire rounds) must not keep one per scope for good."""
    from elric import dedupe
    monkeypatch.setattr(dedupe, "_ITEMS_CACHE", 3)

    async def body(f, r):
        for n in range(8):
            assert await f.check_and_add(f"round-{n}", ["k", "k"]) == [True, False]
        assert len(f._items) <= 3
        assert await f.check_and_add("round-0", ["k", "new"]) == [False, True]
    run(with_filter(redis_url, "redis-bloom", body, capacity=100))


@pytest.mark.parametrize("backend", BACKENDS)
def test_filtered_counts_what_the_caller_dropped_and_leaves_a_dropped_scope_gone(redis_url,
                                                                                   backend):
    """A key found seen is not counted: it may be a resend of its job (answered as that job,
    not dropped), which the caller learns after; a count taken back went down."""
    async def body(f, r):
        assert await f.check_and_add("s", ["a", "a", "a"]) == [True, False, False]
        assert (await f.stats())["s"]["filtered"] == 0
        await f.count("s", 1)   # one of the two was a resend
        assert (await f.stats())["s"]["filtered"] == 1
        await f.drop_scope("s")
        await f.count("s", 1)   # its duplicate answered after the scope was dropped
        assert "s" not in await f.stats()
        assert not await r.exists(KEYS.dedupe_stats("s"))
    run(with_filter(redis_url, backend, body))


@pytest.mark.parametrize("backend", ["set", "redis-bloom"])
def test_count_racing_a_drop_leaves_no_stray_stats_hash(redis_url, backend):
    """count checked the scope, then counted: a drop in between left a stats hash of
    only ``filtered=1``, with no backend, no expiry and in no registry."""
    async def body(f, r):
        await f.check_and_add("s", ["a", "a"])
        exists = f.redis.exists

        async def dropped_after_the_check(*keys):
            found = await exists(*keys)
            await r.delete(KEYS.dedupe_stats("s"))   # the scope dropped meanwhile
            return found
        f.redis.exists = dropped_after_the_check
        await f.count("s", 1)
        f.redis.exists = exists
        left = await r.hgetall(KEYS.dedupe_stats("s"))   # gone, or whole: never a stray
        assert not left or b"backend" in left, left
    run(with_filter(redis_url, backend, body))


def test_a_bloom_scope_dropped_while_it_loads_stays_dropped(redis_url):
    """A load that had read the snapshot when drop_scope ran kept what it read: the
    dropped scope came back with its old keys, and the next snapshot wrote it back."""
    async def main():
        r = client(redis_url)
        first = make_filter("bloom", r, KEYS, capacity=100, snapshot_interval=0)
        await first.check_and_add("s", ["old"])
        await first.snapshot()
        f = make_filter("bloom", r, KEYS, capacity=100, snapshot_interval=0)
        pipeline, read, go_on = r.pipeline, asyncio.Event(), asyncio.Event()

        def paused_after_the_read(**kw):
            pipe = pipeline(**kw)
            execute = pipe.execute

            async def execute_then_wait():
                got = await execute()
                read.set()
                await go_on.wait()
                return got
            pipe.execute = execute_then_wait
            return pipe
        r.pipeline = paused_after_the_read
        check = asyncio.ensure_future(f.check_and_add("s", ["new"]))
        await asyncio.wait_for(read.wait(), 10)          # the old snapshot is read
        r.pipeline = pipeline
        drop = asyncio.ensure_future(f.drop_scope("s"))
        # the drop either waits for the load (it must) or, as before, ran meanwhile
        deadline = time.monotonic() + 10
        while not drop.done() and not f._io_lock._waiters:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        go_on.set()
        await asyncio.gather(check, drop)
        await f.snapshot()
        assert await f.check_and_add("s", ["old"]) == [True]   # new again: dropped
        await f.close()
        await first.close()
        await r.aclose()
    run(main())


def test_a_bloom_scope_whose_snapshot_fails_does_not_hold_back_the_others(redis_url):
    """Snapshots were written in scope order and the first error ended the pass: one
    scope whose stats hash an operator overwrote with another type kept every scope after
    it from being written, for good (a restart then forgot their keys)."""
    async def body(f, r):
        await f.check_and_add("a", ["k"])
        await f.check_and_add("b", ["k"])
        await r.set(KEYS.dedupe_stats("a"), "not a hash")
        with pytest.raises(redis.ResponseError, match="dedupe:stats:a "):   # names the key
            await f.snapshot()
        assert await r.exists(KEYS.dedupe_bloom("b"))
        assert await r.hget(KEYS.dedupe_stats("b"), "items") == b"1"
        assert f._dirty == {"a"}                         # tried again next time
        await r.delete(KEYS.dedupe_stats("a"))           # the operator's fix
        assert await f.snapshot() == 1
    run(with_filter(redis_url, "bloom", body, capacity=100, snapshot_interval=0))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stats_key_of_another_type_spoils_only_its_own_scope(redis_url, backend, caplog):
    """One scope's stats hash overwritten with another type made every stats() call fail
    (elric stats, status, the dashboard) and a 'bloom' master fail to start."""
    async def main():
        r = client(redis_url)
        first = make_filter(backend, r, KEYS, capacity=100, snapshot_interval=0)
        await first.check_and_add("good", ["a"])
        await first.check_and_add("bad", ["a"])
        await first.close()
        await r.set(KEYS.dedupe_stats("bad"), "an operator's string")
        with caplog.at_level(logging.WARNING, logger="elric.dedupe"):
            f = make_filter(backend, r, KEYS, capacity=100, snapshot_interval=0)
            await f.start()
            for _ in range(2):
                assert list(await f.stats()) == ["good"]
        said = [m.getMessage() for m in caplog.records
                if KEYS.dedupe_stats("bad") in m.getMessage()]
        assert len(said) == 1, said                      # once, naming the key
        await r.aclose()
    run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_stats_key_of_another_type_is_named_when_its_scope_is_used(redis_url, backend):
    """'set' blamed its set key and the set_ttl setting and advised dropping the scope
    (every key in it new again); the Bloom backends raised a bare WRONGTYPE."""
    async def body(f, r):
        await r.set(KEYS.dedupe_stats("bad"), "an operator's string")
        with pytest.raises(DedupeError) as got:
            await f.check_and_add("bad", ["k"])
        assert KEYS.dedupe_stats("bad") in str(got.value) and "set_ttl" not in str(got.value)
    run(with_filter(redis_url, backend, body, snapshot_interval=0))


def test_redis_bloom_drop_scope_deletes_the_shards_of_a_scope_made_with_other_params(redis_url):
    """drop_scope cut the shard range with the dropping master's BLOOM_CAPACITY, not the
    scope's: after a capacity change (what the params error tells to drop for) shards were
    left behind, and the scope made again grew into their old bits (keys seen for good)."""
    async def main():
        r = client(redis_url)
        old = make_filter("redis-bloom", r, KEYS, capacity=100)
        await old.check_and_add("s", urls(3000, "old"))          # stages of 100..1600
        new = make_filter("redis-bloom", r, KEYS, capacity=10_000)
        await new.drop_scope("s")
        assert await r.keys(KEYS.dedupe_rbloom("s", 0)[:-1] + "*") == []
        again = make_filter("redis-bloom", r, KEYS, capacity=100)
        await again.check_and_add("s", urls(3000, "fill"))
        assert sum(await again.check_and_add("s", urls(3000, "old"))) > 2900  # new again
        await r.aclose()
    run(main())


def test_bloom_scopes_redis_lost_are_snapshotted_again(redis_url):
    """Only scopes changed since the last snapshot were written: after Redis came back
    empty (restarted without persistence, flushed) the scopes no new key went to were
    never written again, and the master's next restart let all their keys through."""
    async def body(f, r):
        await f.check_and_add("quiet", ["a", "b"])
        await f.check_and_add("busy", ["a"])
        await f.snapshot()
        await r.flushdb()                      # our private server: Redis lost its data
        await f.check_and_add("busy", ["b"])
        assert await f.snapshot() == 2
        g = make_filter("bloom", r, KEYS, capacity=100, snapshot_interval=0)
        await g.start()
        assert await g.check_and_add("quiet", ["a", "b", "c"]) == [False, False, True]
        assert await f.snapshot() == 0         # nothing lost, nothing changed: no writes
        # Redis came back from a save older than the last snapshot
        old = await r.dump(KEYS.dedupe_bloom("quiet")), await r.dump(KEYS.dedupe_stats("quiet"))
        await f.check_and_add("quiet", ["d"])
        assert await f.snapshot() == 1
        for name, value in zip((KEYS.dedupe_bloom("quiet"), KEYS.dedupe_stats("quiet")), old):
            await r.restore(name, 0, value, replace=True)
        assert await f.snapshot() == 1
        g = make_filter("bloom", r, KEYS, capacity=100, snapshot_interval=0)
        assert await g.check_and_add("quiet", ["d"]) == [False]
    run(with_filter(redis_url, "bloom", body, capacity=100, snapshot_interval=0))


@pytest.mark.parametrize("then", ["set", "redis-bloom"])
def test_a_bloom_scope_is_refused_by_another_backend_before_its_first_snapshot(redis_url, then):
    """A 'bloom' scope named its backend only in its snapshots: until the first one (with
    BLOOM_SNAPSHOT_INTERVAL 0, until its master stopped) a master with another backend
    for it filled it too, letting through every key the bloom master had seen."""
    async def body(f, r):
        assert await f.check_and_add("s", ["seen"]) == [True]
        other = make_filter(then, r, KEYS)
        with pytest.raises(DedupeError, match="filled by the 'bloom' backend"):
            await other.check_and_add("s", ["seen"])
    run(with_filter(redis_url, "bloom", body, snapshot_interval=0))


def test_a_round_whose_drop_fails_does_not_keep_the_others(redis_url):
    """Housekeeping dropped old rounds in order and stopped at the first error: one round
    scope whose stats key an operator overwrote (redis-bloom reads it to drop) kept every
    later round in Redis for good."""
    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url, FILTER_BACKEND="redis-bloom", DEDUPE_ROUND_TTL=1) as m:
            r, keys, f = m.redis, m.keys, m.filters["redis-bloom"]
            for scope in ("a@1", "b@2"):
                await f.check_and_add(scope, ["k"])
            await r.set(keys.dedupe_stats("a@1"), "an operator's string")
            await r.zadd(keys.dedupe_rounds, {"a@1": 0, "b@2": 0})
            with pytest.raises(redis.ResponseError):
                await m.housekeeping._drop_old_rounds()
            assert await r.zrange(keys.dedupe_rounds, 0, -1) == [b"a@1"]
            assert not await r.exists(keys.dedupe_stats("b@2"), keys.dedupe_rbloom("b@2", 0))
    run(main())


def test_stats_raise_a_refusal_of_redis_rather_than_call_scopes_unreadable(redis_url):
    """Only a key of another type leaves a scope out of stats: a reply such as LOADING
    is Redis's trouble, raised (retried, shown), not each scope's."""
    async def body(f, r):
        await f.check_and_add("s", ["k"])
        pipeline = r.pipeline

        def loading(**kw):
            pipe = pipeline(**kw)
            pipe.execute = lambda raise_on_error=True: asyncio.sleep(
                0, [redis.BusyLoadingError("Redis is loading the dataset in memory")])
            return pipe
        r.pipeline = loading
        with pytest.raises(redis.BusyLoadingError):
            await f.stats()
        r.pipeline = pipeline
        assert list(await f.stats()) == ["s"]
    run(with_filter(redis_url, "set", body))


def test_a_bloom_filter_closes_while_a_snapshot_is_in_a_redis_call(redis_url):
    """close cancelled the snapshot task and waited for it to end; a cancellation that
    lands in a redis-py pipeline call can be swallowed (redis-py 8.2), the task went on
    snapshotting, and the master's shutdown hung."""
    async def main():
        r = client(redis_url)
        for i in range(30):
            f = make_filter("bloom", r, KEYS, capacity=1000, snapshot_interval=0.001)
            await f.start()
            for n in range(20):   # snapshots in flight, one after the other
                await f.check_and_add("s", [f"{i}-{n}"])
                await asyncio.sleep(0.001)
            closing = asyncio.ensure_future(f.close())
            done, _ = await asyncio.wait({closing}, timeout=20)   # a deadline for a hang
            assert done, f"close hung (round {i})"
        await r.aclose()
    run(main())
