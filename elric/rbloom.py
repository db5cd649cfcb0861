"""Geometry and hashing of the ``redis-bloom`` dedupe filter (Bloom filter in Redis
bitmaps). Pure functions: sizing, hashing, and the records a batch sends to
``elric/lua/dedupe_rbloom.lua``; ``elric.dedupe.RedisBloomFilter`` does the I/O.

Layout of one shard (a Redis string of ``size`` bytes, ``keys.dedupe_rbloom``):

    bytes [0, size-1)   the Bloom bits (``bits`` = (size - 1) * 8 of them)
    byte  size - 1      always 0: ``SETRANGE key size-1 "\\0"`` creates the shard at its
                        full size in one allocation (Redis grows a string that BITFIELD
                        extends greedily, +1 MiB or x2) and is harmless on an existing one

A key hashes (xxh3-128, once) to one shard per stage and k bit offsets in it, so one
BITFIELD tests-and-sets all of them (``SET u1 <offset> 1`` k times): SET returns the
bit's old value, and the key was new iff one of them was 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import xxhash

# Bits per item may exceed the optimum by this much so that fewer bits are probed per
# key: every probe is four more BITFIELD arguments for Redis to run.
_MEMORY_SLACK = 1.06
_RESERVED = 1                 # the creation byte at the end of each shard

# Shard sizes: a Redis string holds at most 2**32 bits (512 MiB). Above 64 KiB shard
# sizes are picked from jemalloc's size classes ({4,5,6,7} * 2**j), minus room for the
# sds header, so the allocation is not rounded up by up to 25 %.
_SMALL_SHARD = 64 * 1024
_MAX_SHARD_BYTES = (1 << 29) - 16
_SDS_SLACK = 16


def shard_plan(need_bytes: int) -> tuple[int, int]:
    """(number of shards, bytes per shard) whose Bloom bits (each shard keeps
    ``_RESERVED`` bytes for itself) hold at least ``need_bytes``."""
    if need_bytes + _RESERVED <= _SMALL_SHARD:
        return 1, need_bytes + _RESERVED
    cands = []
    for alloc in (mult << j for j in range(12, 28) for mult in (4, 5, 6, 7)):
        size = alloc - _SDS_SLACK
        if size <= _MAX_SHARD_BYTES:
            n = -(-need_bytes // (size - _RESERVED))
            cands.append((n * alloc, n, size))
    best = min(c[0] for c in cands)
    # Among plans within 3 % of the least memory, the fewest keys.
    ok = [c for c in cands if c[0] <= best * 1.03]
    _, n, size = min(ok, key=lambda c: (c[1], c[0]))
    return n, size


def bits_per_item(k: int, p: float) -> float:
    """Bits per item for which a Bloom filter with k hashes has false-positive rate p."""
    # log1p: for the tiny rates of far stages 1 - p**(1/k) rounds to 1.0
    return -k / math.log1p(-p ** (1 / k))


def probes_for(p: float) -> int:
    """The fewest probes k whose bits per item stay within _MEMORY_SLACK of optimal
    (for rates near 1, where no k is, the k with the fewest bits)."""
    best = -math.log(p) / math.log(2) ** 2
    ks = range(1, 65)
    for k in ks:
        if bits_per_item(k, p) <= _MEMORY_SLACK * best:
            return k
    return min(ks, key=lambda k: bits_per_item(k, p))


@dataclass(frozen=True)
class RStage:
    capacity: int      # items this stage takes
    cum: int           # items of this and every earlier stage
    k: int             # bits per key
    shards: int
    shard_bytes: int   # the string's length, reserved bytes included
    first_shard: int   # global shard number of its first key (stages share one numbering)
    seed1: int         # per-stage hash mixing: independent positions per stage
    seed2: int

    @property
    def shard_bits(self) -> int:
        """Bloom bits per shard (offsets 0 .. shard_bits-1)."""
        return (self.shard_bytes - _RESERVED) * 8

    @property
    def bits(self) -> int:
        return self.shards * self.shard_bits


def stage_geometry(i: int, capacity: int, p: float, prev: RStage | None) -> RStage:
    """Stage ``i`` holding ``capacity`` items at false-positive rate ``p``."""
    k = probes_for(p)
    need = math.ceil(capacity * bits_per_item(k, p) / 8)
    shards, size = shard_plan(need)
    seed = 0x656C726963 + 2 * i
    seed1, seed2 = _splitmix(np.array([seed, seed + 1], dtype=np.uint64)).tolist()
    return RStage(capacity=capacity, cum=capacity + (prev.cum if prev else 0), k=k,
                  shards=shards, shard_bytes=size,
                  first_shard=(prev.first_shard + prev.shards) if prev else 0,
                  seed1=seed1, seed2=seed2)


# --- hashing -----------------------------------------------------------------------------

def _splitmix(z: np.ndarray) -> np.ndarray:
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def hash_keys(raw: list[bytes]) -> np.ndarray:
    """One 128-bit xxh3 per key, as an (n, 2) uint64 array."""
    return np.frombuffer(b"".join(map(xxhash.xxh3_128_digest, raw)),
                         dtype="<u8").reshape(len(raw), 2).astype(np.uint64, copy=False)


def positions_array(h: np.ndarray, st: RStage) -> tuple[np.ndarray, np.ndarray]:
    """(shard within the stage, (n, k) bit offsets) for hashed keys ``h``.

    Enhanced double hashing (Dillinger & Manolios): x_i = a + i*b + (i^3-i)/6 mod m,
    with a, b and the shard from the key's hash mixed with the stage's seeds."""
    with np.errstate(over="ignore"):
        x1 = _splitmix(h[:, 0] ^ np.uint64(st.seed1))
        x2 = _splitmix(h[:, 1] ^ np.uint64(st.seed2))
    m, ns = np.uint64(st.shard_bits), np.uint64(st.shards)
    shard = x2 % ns
    a = x1 % m
    b = (x2 // ns) % m
    i = np.arange(st.k, dtype=np.uint64)
    c = (i * i * i - i) // np.uint64(6)
    offs = (a[:, None] + b[:, None] * i[None, :] + c[None, :]) % m
    return shard, offs


def records(h: np.ndarray, st: RStage) -> bytes:
    """What dedupe_rbloom.lua reads for stage ``st``: per key 1 + k little-endian uint32s,
    its global shard number then its k bit offsets (offsets < 2**32: a string's limit)."""
    shard, offs = positions_array(h, st)
    rec = np.empty((len(h), st.k + 1), dtype="<u4")
    rec[:, 0] = shard + np.uint64(st.first_shard)
    rec[:, 1:] = offs
    return rec.tobytes()
