"""Tests of elric.rbloom: the redis-bloom filter's geometry (shard plans, probes,
positions) and the records a batch sends to its script, as units (the filter against
Redis is tested in test_dedupe.py).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elric import rbloom
from elric.dedupe import _stage_params
from elric.rbloom import (bits_per_item, hash_keys, positions_array, probes_for, records,
                          shard_plan, stage_geometry)


def stages():
    """A chain of stages: small, medium, and a large one of several shards."""
    s0 = stage_geometry(0, 1000, 0.001 * 7 / 8, None)
    s1 = stage_geometry(1, 2_000_000, 0.001 / 64, s0)
    s2 = stage_geometry(2, 300_000_000, 0.001, s1)
    s3 = stage_geometry(3, 5, 0.3, s2)
    return [s0, s1, s2, s3]


STAGES = stages()


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
def test_positions_are_in_the_stage(keys, stage):
    h = hash_keys(keys)
    assert h.shape == (len(keys), 2) and h.dtype == np.uint64
    shard, offs = positions_array(h, stage)
    assert shard.shape == (len(keys),) and offs.shape == (len(keys), stage.k)
    assert all(0 <= s < stage.shards for s in shard.tolist())
    assert all(0 <= x < stage.shard_bits for x in offs.flatten().tolist())


def test_positions_of_a_key_stay_what_filters_in_redis_hold():
    """A filter's bits outlive this code: other hashing (without a VERSION bump in
    RedisBloomFilter) would call every key already seen new."""
    h = hash_keys([b"https://example.com/"])
    shard, offs = positions_array(h, STAGES[0])
    assert (int(shard[0]), offs[0].tolist()) == (0, [559, 6818, 13078, 3964, 10229, 1122, 7396])
    shard, offs = positions_array(h, STAGES[2])
    assert (int(shard[0]), offs[0].tolist()) == (
        4, [157180522, 13542164, 138339127, 263136092, 119497740, 244294712, 100656369])


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


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=40), st.sampled_from(STAGES))
def test_records_are_shard_then_offsets_per_key(keys, stage):
    data = records(hash_keys(keys), stage)
    rec = np.frombuffer(data, dtype="<u4").reshape(len(keys), stage.k + 1)
    shard, offs = positions_array(hash_keys(keys), stage)
    assert rec[:, 0].tolist() == (shard + stage.first_shard).tolist()  # global shard numbers
    assert rec[:, 1:].tolist() == offs.tolist()


# --- sizing ------------------------------------------------------------------------------

def best_plan(need: int):
    """(least allocation, plans within 3 % of it) over shards of jemalloc size classes."""
    plans = []
    for j in range(12, 28):
        for mult in (4, 5, 6, 7):
            alloc = mult * 2**j
            if alloc > 2**29:
                continue
            n = math.ceil(need / (alloc - 16 - 1))
            plans.append((n * alloc, n, alloc - 16))
    least = min(p[0] for p in plans)
    return least, [p for p in plans if p[0] <= least * 1.03]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.integers(1, 2**37), st.integers(1, 2**20),
                 st.sampled_from([1, 64 * 1024 - 3, 64 * 1024 - 2, 64 * 1024 - 1, 64 * 1024,
                                  2**29 - 18, 2**29 - 17, 2**29 - 16, 2**29, 3 * 2**29 + 1])))
def test_shard_plan(need):
    n, size = shard_plan(need)
    assert n >= 1 and 2 <= size <= 2**29
    assert n * (size - 1) >= need                      # Bloom bits hold what is needed
    if need + 1 <= 64 * 1024:
        assert (n, size) == (1, need + 1)
        return
    alloc = size + 16
    j = alloc.bit_length() - 3
    assert alloc >> j in (4, 5, 6, 7) and alloc == (alloc >> j) << j   # a size class
    least, ok = best_plan(need)
    assert n * alloc <= least * 1.03
    assert n == min(p[1] for p in ok)                  # the fewest shards among those
    assert (n - 1) * (size - 1) < need                 # no shard to spare
    # so at most 3 % over the need rounded up to whole 16 KiB shards
    assert n * alloc <= 1.03 * 16384 * math.ceil(need / (16384 - 17))


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
