"""Tests of elric.rbloom: the redis-bloom filter's geometry (shard plans, probes,
positions) and its wire encoding (BITFIELD commands as RESP bytes), as units and against
a real (private) redis-server.

pytest-asyncio is not installed: every test drives its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest
import redis
import redis.asyncio as aredis
from hypothesis import given, settings
from hypothesis import strategies as st

from elric import rbloom
from elric.rawredis import BulkRedis, encode
from elric.dedupe import _stage_params
from elric.rbloom import (bitfield, bits_per_item, create_shard, hash_keys, positions,
                          positions_array, probes_for, seal_shard, shard_plan, stage_geometry,
                          unorder)

SPECIAL = [0, 1, 9, 10, 11, 99, 100, 101, 999, 1000, 10**9 - 1, 10**9, 2**32 - 1]

SMALL = stage_geometry(0, 1000, 0.01, None)


def stages():
    """A chain of stages: small, medium, and a large one of several shards."""
    s0 = stage_geometry(0, 1000, 0.001 * 7 / 8, None)
    s1 = stage_geometry(1, 2_000_000, 0.001 / 64, s0)
    s2 = stage_geometry(2, 300_000_000, 0.001, s1)
    s3 = stage_geometry(3, 5, 0.3, s2)
    return [s0, s1, s2, s3]


STAGES = stages()


def run(coro):
    return asyncio.run(coro)


# --- BITFIELD as RESP --------------------------------------------------------------------

offsets_lists = st.lists(st.one_of(st.sampled_from(SPECIAL), st.integers(0, 2**32 - 1),
                                   st.integers(0, 150)), max_size=120)


def reference_bitfield(key: bytes, stage, offs: np.ndarray, order: np.ndarray,
                       write: bool) -> bytes:
    flat = [int(x) for x in offs.reshape(-1)]
    ops = []
    for j in order.tolist():
        ops += [b"SET", b"u1", flat[j], b"1"] if write else [b"GET", b"u1", flat[j]]
    return encode(b"BITFIELD" if write else b"BITFIELD_RO", key, b"GET", b"u1", stage.seal,
                  *ops)


def check_order(offs: np.ndarray, order: np.ndarray) -> None:
    flat = offs.reshape(-1).tolist()
    assert isinstance(order, np.ndarray)
    assert sorted(order.tolist()) == list(range(len(flat)))          # a permutation
    seen: dict[int, int] = {}
    for j in order.tolist():                                          # stable on ties
        if flat[j] in seen:
            assert seen[flat[j]] < j, (flat, order.tolist())
        seen[flat[j]] = j


@settings(max_examples=300, deadline=None)
@given(offsets_lists, st.booleans(), st.sampled_from([np.uint64, np.int64, np.uint32]),
       st.sampled_from([1, 2, 3, 7]), st.binary(min_size=1, max_size=20),
       st.sampled_from(STAGES))
def test_bitfield_bytes(offsets, write, dtype, width, key, stage):
    offs = np.array(offsets, dtype=dtype)
    if len(offsets) % width == 0 and len(offsets):
        offs = offs.reshape(-1, width)                 # the (n, k) shape positions gives
    data, order = bitfield(key, stage, offs, write)
    check_order(offs, order)
    assert data == reference_bitfield(key, stage, offs, order, write)


def test_bitfield_special_offsets_and_empty():
    offs = np.array(SPECIAL[::-1] + SPECIAL, dtype=np.uint64)
    for write in (False, True):
        data, order = bitfield(b"k", SMALL, offs, write)
        check_order(offs, order)
        assert data == reference_bitfield(b"k", SMALL, offs, order, write)
        data, order = bitfield(b"k", SMALL, np.array([], dtype=np.uint64), write)
        assert order.size == 0
        assert data == encode(b"BITFIELD" if write else b"BITFIELD_RO", b"k", b"GET", b"u1",
                              SMALL.seal)


def test_bitfield_keeps_ops_on_one_offset_in_order():
    offs = np.array([[5, 123, 5], [7, 5, 123]], dtype=np.uint64)
    _, order = bitfield(b"k", SMALL, offs, True)
    flat = offs.reshape(-1)
    picks = [int(j) for j in order if flat[j] == 5]
    assert picks == [0, 2, 4]
    picks = [int(j) for j in order if flat[j] == 123]
    assert picks == [1, 5]


@settings(max_examples=200, deadline=None)
@given(offsets_lists)
def test_unorder_inverts_the_order(offsets):
    offs = np.array(offsets, dtype=np.uint64)
    _, order = bitfield(b"k", SMALL, offs, False)
    truth = (offs * np.uint64(2654435761) >> np.uint64(7)) & np.uint64(1)   # a bit per offset
    reply = truth[order].tolist()                  # what Redis answers, in the sent order
    got = unorder(reply, order)
    assert got.tolist() == truth.tolist()
    assert unorder(np.array(reply, dtype=np.uint8), order).tolist() == truth.tolist()


@settings(max_examples=100, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(0, 300))
def test_unorder_of_any_permutation(rnd, n):
    order = np.array(rnd.sample(range(n), n), dtype=np.int64)
    reply = [rnd.randint(0, 1) for _ in range(n)]
    out = unorder(reply, order)
    assert out.shape == (n,)
    for j in range(n):
        assert out[order[j]] == reply[j]


# --- positions -----------------------------------------------------------------------------

def test_stages_under_test():
    assert STAGES[2].shards > 1 and STAGES[0].shards == 1
    assert [s.first_shard for s in STAGES] == [0, STAGES[0].shards,
                                               STAGES[0].shards + STAGES[1].shards,
                                               sum(s.shards for s in STAGES[:3])]
    assert len({(s.seed1, s.seed2) for s in STAGES}) == 4
    assert STAGES[1].cum == 2_001_000


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=40), st.sampled_from(STAGES))
def test_positions_array_agrees_with_positions(keys, stage):
    h = hash_keys(keys)
    assert h.shape == (len(keys), 2) and h.dtype == np.uint64
    shard, offs = positions_array(h, stage)
    assert shard.shape == (len(keys),) and offs.shape == (len(keys), stage.k)
    for i, key in enumerate(keys):
        s, o = positions(key, stage)
        assert 0 <= s < stage.shards
        assert all(0 <= x < stage.shard_bits for x in o)
        assert int(shard[i]) == s
        assert offs[i].tolist() == o


def test_positions_spread_over_shards_and_stages():
    keys = [b"key-%d" % i for i in range(2000)]
    big = STAGES[2]
    shard, offs = positions_array(hash_keys(keys), big)
    assert set(shard.tolist()) == set(range(big.shards))
    assert int(offs.max()) < big.shard_bits
    # the stages' seeds make their positions independent
    a = positions_array(hash_keys(keys), STAGES[0])[1]
    b = positions_array(hash_keys(keys), stage_geometry(7, 1000, 0.001 * 7 / 8, None))[1]
    assert (a != b).mean() > 0.99


# --- sizing ------------------------------------------------------------------------------

def best_plan(need: int):
    """(least allocation, plans within 3 % of it) over shards of jemalloc size classes."""
    plans = []
    for j in range(12, 28):
        for mult in (4, 5, 6, 7):
            alloc = mult * 2**j
            if alloc > 2**29:
                continue
            n = math.ceil(need / (alloc - 16 - 2))
            plans.append((n * alloc, n, alloc - 16))
    least = min(p[0] for p in plans)
    return least, [p for p in plans if p[0] <= least * 1.03]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(1, 2**37), st.integers(1, 2**20),
                 st.sampled_from([1, 64 * 1024 - 3, 64 * 1024 - 2, 64 * 1024 - 1, 64 * 1024,
                                  2**29 - 18, 2**29 - 17, 2**29, 3 * 2**29 + 1])))
def test_shard_plan(need):
    n, size = shard_plan(need)
    assert n >= 1 and 3 <= size <= 2**29
    assert n * (size - 2) >= need                      # Bloom bits hold what is needed
    if need + 2 <= 64 * 1024:
        assert (n, size) == (1, need + 2)
        return
    alloc = size + 16
    j = alloc.bit_length() - 3
    assert alloc >> j in (4, 5, 6, 7) and alloc == (alloc >> j) << j   # a size class
    least, ok = best_plan(need)
    assert n * alloc <= least * 1.03
    assert n == min(p[1] for p in ok)                  # the fewest shards among those
    assert (n - 1) * (size - 2) < need                 # no shard to spare
    # so at most 3 % over the need rounded up to whole 16 KiB shards
    assert n * alloc <= 1.03 * 16384 * math.ceil(need / (16384 - 18))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(1e-12, 0.6), st.floats(1e-17, 1e-12),
                 st.sampled_from([0.5, 0.1, 0.01, 0.001, 1e-6, 1e-17])))
def test_probes_for(p):
    k = probes_for(p)
    optimal = -math.log(p) / math.log(2) ** 2
    assert bits_per_item(k, p) <= 1.06 * optimal
    assert all(bits_per_item(j, p) > 1.06 * optimal for j in range(1, k))   # the fewest
    assert (1 - math.exp(-k / bits_per_item(k, p))) ** k == pytest.approx(p, rel=1e-6)


@pytest.mark.parametrize("p", [1e-40, 1e-300, 5e-324])
def test_probes_for_absurd_rates_still_answers(p):
    k = probes_for(p)                       # (at most 64 probes: more bits instead)
    assert 1 <= k <= 64 and 0 < bits_per_item(k, p) < math.inf


def test_far_stages_of_a_strict_filter_have_a_geometry():
    """Each stage tightens the rate: at 1e-12 stage 5, at 1e-3 stage 15, reached rates
    below 1e-16, where 1 - p**(1/k) rounded to 1.0 and sizing divided by zero."""
    for p, stages in ((1e-12, 12), (1e-3, 24)):
        prev = None
        for i in range(stages):
            cap, q = _stage_params(10, p, i)
            prev = stage_geometry(i, cap, q, prev)
            assert prev.k >= 1 and prev.bits >= cap * bits_per_item(prev.k, q) * 0.99


def test_probes_for_documented_value():
    assert probes_for(0.001) == 7
    assert probes_for(0.5) == 1


@pytest.mark.parametrize("p", [0.65, 0.7, 0.9])
def test_probes_for_terminates(monkeypatch, p):
    calls = [0]
    real = rbloom.bits_per_item

    def counted(k, q):
        calls[0] += 1
        if calls[0] > 10_000:
            raise RuntimeError(f"probes_for({p}) still looping after 10,000 probes")
        return real(k, q)

    monkeypatch.setattr(rbloom, "bits_per_item", counted)
    try:
        k = probes_for(p)
    except ValueError:
        return                                          # refusing is fine too
    assert k >= 1


# --- against Redis -----------------------------------------------------------------------

def test_create_and_seal_shard(redis_url):
    r = redis.Redis.from_url(redis_url)
    try:
        for stage in (SMALL, stage_geometry(1, 100_000, 0.001, SMALL)):
            key = b"shard-%d" % stage.index

            async def body(cmds, n):
                bulk = BulkRedis(aredis.Redis.from_url(redis_url))
                try:
                    return await bulk.execute(b"".join(cmds), n)
                finally:
                    await bulk.close()
                    await bulk.client.aclose()

            assert run(body([create_shard(key, stage)], 1)) == [stage.shard_bytes]
            assert r.get(key) == b"\0" * stage.shard_bytes
            # bits set, then created again: nothing changes
            for bit in (0, 7, stage.shard_bits - 1, stage.shard_bits // 3):
                r.setbit(key, bit, 1)
            before = r.get(key)
            assert run(body([create_shard(key, stage), create_shard(key, stage)], 2)) == \
                [stage.shard_bytes] * 2
            assert r.get(key) == before
            assert r.strlen(key) == stage.shard_bytes
            # the seal: exactly bit st.seal, nothing else
            reply = run(body([seal_shard(key, stage)], 1))
            assert isinstance(reply[0], np.ndarray) and reply[0].tolist() == [0]
            after = r.get(key)
            assert len(after) == stage.shard_bytes
            diff = np.unpackbits(np.frombuffer(before, np.uint8)) != \
                np.unpackbits(np.frombuffer(after, np.uint8))
            assert np.flatnonzero(diff).tolist() == [stage.seal]
            assert r.getbit(key, stage.seal) == 1
            assert stage.seal == (stage.shard_bytes - 2) * 8
            assert after[-1] == 0                          # the creation byte stays 0
    finally:
        r.close()


def test_bitfield_round_trip_with_redis(redis_url):
    """Test-and-set through Redis: unorder puts old bits back; a repeated offset is new
    only the first time; BITFIELD_RO then sees every bit set."""
    stage = STAGES[0]
    keys = [b"k%d" % i for i in range(300)] + [b"k5", b"k17"]
    shard, offs = positions_array(hash_keys(keys), stage)
    key = b"rb"
    r = redis.Redis.from_url(redis_url)
    pre = np.random.default_rng(5).integers(0, stage.shard_bits, 500)
    try:
        async def body():
            bulk = BulkRedis(aredis.Redis.from_url(redis_url))
            try:
                await bulk.execute(create_shard(key, stage), 1)
                for bit in pre.tolist():
                    r.setbit(key, bit, 1)
                snapshot = r.get(key)
                cmd, order = bitfield(key, stage, offs, True)
                rep = (await bulk.execute(cmd, 1))[0]
                old = unorder(rep[1:], order).reshape(offs.shape)
                cmd_ro, order_ro = bitfield(key, stage, offs, False)
                rep_ro = (await bulk.execute(cmd_ro, 1))[0]
                return snapshot, rep, old, unorder(rep_ro[1:], order_ro)
            finally:
                await bulk.close()
                await bulk.client.aclose()

        snapshot, rep, old, now = run(body())
    finally:
        r.close()
    assert rep[0] == 0                                  # not sealed
    bits = np.unpackbits(np.frombuffer(snapshot, np.uint8))
    flat = offs.reshape(-1).astype(np.int64)
    # expected old values: the snapshot, except an offset seen earlier in this command
    expected = []
    seen = set()
    for o in flat.tolist():
        expected.append(1 if (bits[o] or o in seen) else 0)
        seen.add(o)
    assert old.reshape(-1).tolist() == expected
    assert old[-2:].min(axis=1).tolist() == [1, 1]      # k5, k17 again: all bits already set
    assert now.tolist() == [1] * flat.size
