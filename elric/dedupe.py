"""Dedupe filters: drop a job whose dedupe key was already seen in its scope.

The master asks a filter, before a job reaches a queue, whether each job's
``dedupe_key`` is new in its ``dedupe_scope``. Check-and-add is atomic, so two
concurrent submissions of one key (on one master or on several) let exactly one
through. One interface, three backends chosen by ``make_filter``:

``set`` (:class:`SetFilter`)
    Exact. One Redis set per scope (``keys.dedupe_set``); one Lua script per call
    does SADD for the whole batch. With ``set_ttl`` the key holds a sorted set
    instead (member = dedupe key, score = ms when it was let through): a key is
    new again ``set_ttl`` seconds after it was last let through (seeing it again
    as a duplicate does not extend that). Releasable. Shared by every master.
``bloom`` (:class:`BloomFilter`)
    A Bloom filter in the master's memory (pybloom-live), snapshotted to Redis
    (``keys.dedupe_bloom``) every ``snapshot_interval`` seconds and on close, and
    reloaded on start: a crash forgets at most the last interval. ONE master only.
``redis-bloom`` (:class:`RedisBloomFilter`)
    A Bloom filter kept as Redis bitmaps (``keys.dedupe_rbloom``), shared by every
    master, ~1.97 bytes per item at a 0.1% false-positive rate. Works on plain
    Redis >= 6.0 (Debian's 7.0 has no BF.* commands): one BITFIELD test-and-sets
    the k bits of a key, all in one shard; a call is one pipeline of BITFIELDs
    (pre-encoded, no script) plus one of counters. Layout: ``elric.rbloom``.

Both Bloom backends never forget a key (no false "new"), but may call a new key
"seen" with the configured probability ``error_rate`` (that job is silently
dropped). They grow past ``capacity`` in stages (x2 capacity each) whose error
rates shrink geometrically, p_i = p * (1 - r) * r**i with r = 1/8, so that the
overall false-positive rate stays below ``error_rate`` however far they grow
(sum of p_i = p). Neither can release a key.

No pickle anywhere: snapshots are a small struct header plus pybloom-live's raw
``tofile`` bit arrays.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import struct
from abc import ABC, abstractmethod

import numpy as np
from pybloom_live import BloomFilter as _PyBloom
from redis.exceptions import ResponseError

from elric import rbloom
from elric.keys import Keys
from elric.rawredis import BulkRedis, encode

__all__ = [
    "DedupeError", "DedupeFilter", "SetFilter", "BloomFilter", "RedisBloomFilter",
    "make_filter", "BACKENDS",
]

BACKENDS = ("set", "bloom", "redis-bloom")

# Stage schedule shared by both Bloom backends. Growth x2 keeps the memory of an
# overgrown filter within ~2x of what it needs. Tightening r = 1/8 gives the first
# stage 7/8 of the error budget, so a filter that never grows costs ~15.4 bits/item
# at 0.1 % with redis-bloom's 7 probes (the target is <= 2 bytes/item); each later
# stage costs 3 bits/item more than the one before.
GROWTH = 2
TIGHTENING = 0.125
_LN2_SQ = math.log(2) ** 2


class DedupeError(Exception):
    """A dedupe filter cannot do what was asked (release on a Bloom filter,
    mismatched parameters between masters, a wrong key type, bad settings)."""


def _stage_params(capacity: int, error_rate: float, i: int) -> tuple[int, float]:
    """(capacity, error rate) of stage ``i``."""
    return capacity * GROWTH ** i, error_rate * (1 - TIGHTENING) * TIGHTENING ** i


def _scan_pattern(prefix: str) -> str:
    """A SCAN MATCH pattern for every key starting with ``prefix`` (glob chars escaped)."""
    out = []
    for c in prefix:
        if c in "*?[]\\":
            out.append("\\")
        out.append(c)
    return "".join(out) + "*"


async def _scan_scopes(redis, prefix: str) -> list[str]:
    """Scopes that have a key ``prefix + scope``. SCAN walks the whole keyspace; only
    for scopes written before the scope registry existed (see register_old_scopes)."""
    scopes = []
    async for key in redis.scan_iter(match=_scan_pattern(prefix), count=1000):
        key = key.decode() if isinstance(key, bytes) else key
        scopes.append(key[len(prefix):])
    return sorted(set(scopes))


async def register_old_scopes(redis, keys: Keys) -> None:
    """Add scopes written before the registry ``dedupe:scopes`` existed to it: one SCAN
    of the keyspace, once per Redis (``dedupe:scopes-found`` records it); after that, one
    EXISTS when a filter starts."""
    if await redis.exists(keys.dedupe_scopes_found):
        return
    old = await _scan_scopes(redis, keys.dedupe_stats(""))
    if old:
        await redis.zadd(keys.dedupe_scopes, {scope: _FOREVER for scope in old}, nx=True)
    await redis.set(keys.dedupe_scopes_found, 1)


_FOREVER = float("inf")     # the registry score of a scope that does not expire


async def _registered_scopes(redis, keys: Keys) -> list[str]:
    return sorted(_as_str(s) for s in await redis.zrange(keys.dedupe_scopes, 0, -1))


# KEYS[1] registry; ARGV scope, its stats key, ... Unregisters the scopes whose stats hash
# is gone (dropped by an earlier version, or expired before its registry entry did):
# checked and removed in one step, so a scope written meanwhile stays registered.
_FORGET_GONE_LUA = """
for i = 1, #ARGV, 2 do
  if redis.call('EXISTS', ARGV[i + 1]) == 0 then redis.call('ZREM', KEYS[1], ARGV[i]) end
end
"""


async def _forget_gone(redis, keys: Keys, scopes: list[str], hashes: list[dict]) -> None:
    gone = [x for scope, h in zip(scopes, hashes) if not h
            for x in (scope, keys.dedupe_stats(scope))]
    if gone:
        await redis.eval(_FORGET_GONE_LUA, 1, keys.dedupe_scopes, *gone)


async def _drop_keys(redis, keys: Keys, scope: str, *names: str) -> None:
    """Delete a scope's keys and its registry entry in one transaction."""
    pipe = redis.pipeline(transaction=True)
    pipe.delete(*names)
    pipe.zrem(keys.dedupe_scopes, scope)
    await pipe.execute()


def _as_str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


class DedupeFilter(ABC):
    """Atomic check-and-add of dedupe keys, per scope."""

    name: str
    can_release: bool

    def __init__(self, redis, keys: Keys, log: logging.Logger) -> None:
        self.redis = redis
        self.keys = keys
        self.log = log

    @abstractmethod
    async def check_and_add(self, scope: str, keys: list[str]) -> list[bool]:
        """True = key is new in scope (it is now added; let the job through);
        False = seen before. Duplicates inside one call: only the first is True.
        One call costs O(1) round trips to Redis, never one per key."""

    async def release(self, scope: str, keys: list[str]) -> None:
        """Forget ``keys`` in ``scope`` so that they are new again (exact backends only)."""
        raise DedupeError(
            f"the {self.name!r} dedupe backend cannot release keys: a Bloom filter "
            "cannot remove a key without removing bits other keys share (use the "
            "'set' backend if jobs must be re-admitted after failure)")

    @abstractmethod
    async def stats(self) -> dict[str, dict]:
        """Per scope: backend, items, filtered, bytes (+ capacity, fill_ratio,
        expected_fp_rate for the Bloom backends)."""

    @abstractmethod
    async def drop_scope(self, scope: str) -> None:
        """Forget a whole scope (e.g. a finished crawl round)."""

    async def start(self) -> None:
        """Prepare (load snapshots, start background work)."""
        await register_old_scopes(self.redis, self.keys)

    async def close(self) -> None:
        """Finish (final snapshot). Does not close the Redis client: the caller owns it."""


# --------------------------------------------------------------------------------------
# set: exact
# --------------------------------------------------------------------------------------

# KEYS[1] set, KEYS[2] stats hash, KEYS[3] scope registry; ARGV[1] scope, ARGV[2..]
# dedupe keys. SADD per key (not one SMISMEMBER with unpack) so that batches of any
# size fit in the Lua stack.
_SET_LUA = """
local out = {}
local filtered = 0
for i = 2, #ARGV do
  local r = redis.call('SADD', KEYS[1], ARGV[i])
  out[i - 1] = r
  if r == 0 then filtered = filtered + 1 end
end
redis.call('HSET', KEYS[2], 'backend', 'set')
redis.call('ZADD', KEYS[3], '+inf', ARGV[1])
if filtered > 0 then redis.call('HINCRBY', KEYS[2], 'filtered', filtered) end
return out
"""

# KEYS[1] zset (member -> ms let through), KEYS[2] stats hash, KEYS[3] scope registry;
# ARGV[1] ttl ms, ARGV[2] scope, ARGV[3..] dedupe keys. Server time (TIME) so that
# every master agrees on "now" whatever its clock. Expired members are pruned on every
# call, and the keys expire as a whole when a scope stays idle for ttl, so memory stays
# bounded.
_ZSET_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
local cutoff = now - ttl
local nows = string.format('%d', now)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', cutoff))
local out = {}
local filtered = 0
for i = 3, #ARGV do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) > cutoff then
    out[i - 2] = 0
    filtered = filtered + 1
  else
    redis.call('ZADD', KEYS[1], nows, ARGV[i])
    out[i - 2] = 1
  end
end
redis.call('HSET', KEYS[2], 'backend', 'set')
-- the scope's registry entry expires with its keys; expired entries go on every call
redis.call('ZADD', KEYS[3], string.format('%d', now + ttl), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', nows)
if filtered > 0 then redis.call('HINCRBY', KEYS[2], 'filtered', filtered) end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('PEXPIRE', KEYS[2], ttl)
return out
"""


class SetFilter(DedupeFilter):
    """Exact filter: a Redis set per scope (a sorted set when ``set_ttl`` is given)."""

    name = "set"
    can_release = True

    def __init__(self, redis, keys: Keys, *, set_ttl: float | None = None,
                 log: logging.Logger) -> None:
        super().__init__(redis, keys, log)
        self.set_ttl = set_ttl
        self._ttl_ms = None if set_ttl is None else max(1, int(round(set_ttl * 1000)))
        self._script = redis.register_script(_SET_LUA if set_ttl is None else _ZSET_LUA)

    def _wrongtype(self, scope: str, exc: ResponseError) -> DedupeError:
        kind = "sorted set (set_ttl)" if self.set_ttl is not None else "set (no set_ttl)"
        return DedupeError(
            f"dedupe scope {scope!r}: key {self.keys.dedupe_set(scope)} is not a {kind}; "
            f"it was written with the other set_ttl setting. drop_scope() it or keep "
            f"the setting ({exc})")

    async def check_and_add(self, scope: str, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        args = [scope, *keys] if self._ttl_ms is None else [self._ttl_ms, scope, *keys]
        try:
            res = await self._script(
                keys=[self.keys.dedupe_set(scope), self.keys.dedupe_stats(scope),
                      self.keys.dedupe_scopes], args=args)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise self._wrongtype(scope, exc) from None
            raise
        return [r == 1 for r in res]

    async def release(self, scope: str, keys: list[str]) -> None:
        if not keys:
            return
        key = self.keys.dedupe_set(scope)
        try:
            if self.set_ttl is None:
                await self.redis.srem(key, *keys)
            else:
                await self.redis.zrem(key, *keys)
        except ResponseError as exc:
            if "WRONGTYPE" in str(exc):
                raise self._wrongtype(scope, exc) from None
            raise

    async def stats(self) -> dict[str, dict]:
        scopes = await _registered_scopes(self.redis, self.keys)
        if not scopes:
            return {}
        cutoff = None
        if self._ttl_ms is not None:
            sec, usec = await self.redis.time()
            cutoff = sec * 1000 + usec // 1000 - self._ttl_ms
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.hgetall(self.keys.dedupe_stats(scope))
            pipe.type(self.keys.dedupe_set(scope))
        raw = await pipe.execute()
        await _forget_gone(self.redis, self.keys, scopes, raw[0::2])
        mine = []
        pipe = self.redis.pipeline(transaction=False)
        for i, scope in enumerate(scopes):
            h, kind = raw[2 * i], _as_str(raw[2 * i + 1])
            if _as_str(h.get(b"backend", b"")) != "set":
                continue  # a scope of another backend sharing the stats keys
            key = self.keys.dedupe_set(scope)
            if kind == "zset":
                pipe.zcount(key, f"({cutoff}" if cutoff is not None else "-inf", "+inf")
            else:
                pipe.scard(key)  # 0 for a missing key
            pipe.memory_usage(key)
            mine.append((scope, h))
        res = await pipe.execute()
        out = {}
        for j, (scope, h) in enumerate(mine):
            out[scope] = {
                "backend": self.name,
                "items": int(res[2 * j]),
                "filtered": int(h.get(b"filtered", 0)),
                "bytes": int(res[2 * j + 1] or 0),
            }
        return out

    async def drop_scope(self, scope: str) -> None:
        await _drop_keys(self.redis, self.keys, scope,
                         self.keys.dedupe_set(scope), self.keys.dedupe_stats(scope))


# --------------------------------------------------------------------------------------
# bloom: in the master's memory, snapshotted to Redis
# --------------------------------------------------------------------------------------

class _StagedBloom:
    """A scalable Bloom filter: pybloom-live BloomFilter stages following the
    module's stage schedule (pybloom-live's ScalableBloomFilter uses p*0.9**i and
    overshoots its target several times over once it grows)."""

    MAGIC = b"ELRBLM01"
    HEADER = struct.Struct("<8sQdQI")  # magic, capacity, error_rate, filtered, stages
    STAGE = struct.Struct("<Q")        # length of one stage's tofile() bytes

    def __init__(self, capacity: int, error_rate: float) -> None:
        self.capacity = capacity
        self.error_rate = error_rate
        self.filtered = 0
        self.stages: list[_PyBloom] = [_PyBloom(*_stage_params(capacity, error_rate, 0))]

    @property
    def items(self) -> int:
        return sum(s.count for s in self.stages)

    def add(self, key: str) -> bool:
        """Add ``key``; True if it was new."""
        stages = self.stages
        for s in stages[:-1]:       # older stages are full: read-only
            if key in s:
                self.filtered += 1
                return False
        last = stages[-1]
        if last.count >= last.capacity:
            if key in last:
                self.filtered += 1
                return False
            last = _PyBloom(*_stage_params(self.capacity, self.error_rate, len(stages)))
            stages.append(last)
        if last.add(key):           # True: every bit was already set
            self.filtered += 1
            return False
        return True

    def fill_ratios(self) -> list[float]:
        return [s.bitarray.count() / s.num_bits for s in self.stages]

    def expected_fp_rate(self) -> float:
        # pybloom's filters are partitioned (k slices of num_bits/k): per stage the
        # chance that all k probed bits are set is ~ fill**k.
        miss = 1.0
        for s, fill in zip(self.stages, self.fill_ratios()):
            miss *= 1 - fill ** s.num_slices
        return 1 - miss

    @property
    def nbytes(self) -> int:
        return sum((s.num_bits + 7) // 8 for s in self.stages)

    @property
    def total_capacity(self) -> int:
        return sum(s.capacity for s in self.stages)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        buf.write(self.HEADER.pack(self.MAGIC, self.capacity, self.error_rate,
                                   self.filtered, len(self.stages)))
        for s in self.stages:
            b = io.BytesIO()
            s.tofile(b)
            data = b.getvalue()
            buf.write(self.STAGE.pack(len(data)))
            buf.write(data)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "_StagedBloom":
        buf = io.BytesIO(data)
        magic, capacity, error_rate, filtered, n = cls.HEADER.unpack(buf.read(cls.HEADER.size))
        if magic != cls.MAGIC:
            raise DedupeError(f"not an elric Bloom snapshot (magic {magic!r})")
        self = cls.__new__(cls)
        self.capacity, self.error_rate, self.filtered = capacity, error_rate, filtered
        self.stages = []
        for _ in range(n):
            (length,) = cls.STAGE.unpack(buf.read(cls.STAGE.size))
            self.stages.append(_PyBloom.fromfile(io.BytesIO(buf.read(length)), length))
        if not self.stages:
            raise DedupeError("Bloom snapshot has no stages")
        return self


class BloomFilter(DedupeFilter):
    """In-master Bloom filter per scope; for ONE master (others would not see its
    bits, and two masters snapshotting one scope would overwrite each other)."""

    name = "bloom"
    can_release = False

    def __init__(self, redis, keys: Keys, *, capacity: int, error_rate: float,
                 snapshot_interval: float, log: logging.Logger) -> None:
        super().__init__(redis, keys, log)
        self.capacity = capacity
        self.error_rate = error_rate
        self.snapshot_interval = snapshot_interval
        self._filters: dict[str, _StagedBloom] = {}
        self._dirty: set[str] = set()
        self._warned: set[str] = set()
        self._load_locks: dict[str, asyncio.Lock] = {}
        # Serialises snapshot writes with drop_scope, so a snapshot in flight cannot
        # resurrect a scope that was just dropped.
        self._io_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        await super().start()
        scopes = await _registered_scopes(self.redis, self.keys)
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.hget(self.keys.dedupe_stats(scope), "backend")
        for scope, backend in zip(scopes, await pipe.execute()):
            if backend is not None and _as_str(backend) == self.name:
                await self._filter(scope)
        if self._task is None and self.snapshot_interval > 0:
            self._task = asyncio.create_task(self._snapshot_loop(), name="elric-dedupe-snapshot")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self.snapshot()

    async def _snapshot_loop(self) -> None:
        while True:
            await asyncio.sleep(self.snapshot_interval)
            try:
                await self.snapshot()
            except asyncio.CancelledError:
                raise
            except Exception:  # keep snapshotting: a Redis blip must not stop it for good
                self.log.exception("dedupe: Bloom snapshot failed; will retry")

    async def snapshot(self) -> int:
        """Write the scopes changed since the last snapshot; returns how many."""
        async with self._io_lock:
            dirty, self._dirty = self._dirty, set()
            written = 0
            try:
                for scope in sorted(dirty):
                    f = self._filters.get(scope)
                    if f is None:
                        continue
                    # Serialised synchronously: nothing can add to the filter meanwhile,
                    # so the snapshot is a consistent cut. (Costs a memcpy of the bits.)
                    data = f.to_bytes()
                    pipe = self.redis.pipeline(transaction=True)
                    pipe.set(self.keys.dedupe_bloom(scope), data)
                    pipe.hset(self.keys.dedupe_stats(scope), mapping={
                        "backend": self.name, "items": f.items, "filtered": f.filtered})
                    pipe.zadd(self.keys.dedupe_scopes, {scope: _FOREVER})
                    await pipe.execute()
                    written += 1
                    dirty.discard(scope)
            finally:
                self._dirty |= dirty  # not written (error/cancel): retry next time
            return written

    async def _filter(self, scope: str) -> _StagedBloom:
        f = self._filters.get(scope)
        if f is not None:
            return f
        lock = self._load_locks.setdefault(scope, asyncio.Lock())
        async with lock:
            f = self._filters.get(scope)
            if f is None:
                data = await self.redis.get(self.keys.dedupe_bloom(scope))
                if data:
                    try:
                        f = _StagedBloom.from_bytes(data)
                    except (ValueError, struct.error, DedupeError) as exc:
                        # Refuse rather than start empty: an empty filter would let
                        # every already-seen key through again.
                        raise DedupeError(
                            f"dedupe scope {scope!r}: unreadable Bloom snapshot at "
                            f"{self.keys.dedupe_bloom(scope)} ({exc}); delete that key "
                            "to start the scope empty") from None
                    if (f.capacity, f.error_rate) != (self.capacity, self.error_rate):
                        # Keep the history: the snapshot's own parameters win for this scope.
                        self.log.warning(
                            "dedupe scope %r: snapshot has capacity=%d error_rate=%g, "
                            "configured %d/%g; keeping the snapshot's", scope,
                            f.capacity, f.error_rate, self.capacity, self.error_rate)
                else:
                    f = _StagedBloom(self.capacity, self.error_rate)
                self._filters[scope] = f
        return f

    async def check_and_add(self, scope: str, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        f = await self._filter(scope)
        # No await below: the batch is atomic with respect to every other coroutine.
        out = [f.add(k) for k in keys]
        self._dirty.add(scope)
        if f.items > f.capacity and scope not in self._warned:
            self._warned.add(scope)
            self.log.warning(
                "dedupe scope %r passed its Bloom capacity %d (now %d items): growing "
                "into a new stage (false-positive rate stays <= %g, memory grows)",
                scope, f.capacity, f.items, f.error_rate)
        return out

    async def stats(self) -> dict[str, dict]:
        out = {}
        for scope, f in sorted(self._filters.items()):
            fills = f.fill_ratios()
            bits = [s.num_bits for s in f.stages]
            out[scope] = {
                "backend": self.name,
                "items": f.items,
                "filtered": f.filtered,
                "capacity": f.total_capacity,
                "stages": len(f.stages),
                "fill_ratio": sum(x * b for x, b in zip(fills, bits)) / sum(bits),
                "expected_fp_rate": f.expected_fp_rate(),
                "error_rate": f.error_rate,
                "bytes": f.nbytes,
            }
        return out

    async def drop_scope(self, scope: str) -> None:
        async with self._io_lock:
            self._filters.pop(scope, None)
            self._dirty.discard(scope)
            self._warned.discard(scope)
            await _drop_keys(self.redis, self.keys, scope,
                             self.keys.dedupe_bloom(scope), self.keys.dedupe_stats(scope))


# --------------------------------------------------------------------------------------
# redis-bloom: Bloom filter as Redis bitmaps, shared by every master
# --------------------------------------------------------------------------------------

_BITCOUNT_LIMIT = 64 << 20   # stats(): BITCOUNT the shards only up to this many bytes
_MAX_ROUNDS = 32             # pipelines per segment before giving up (only under churn)


class _BulkIO:
    """The filter's Redis I/O as pre-encoded RESP over BulkRedis."""

    def __init__(self, redis) -> None:
        self.bulk = BulkRedis.from_client(redis)

    @property
    def round_trips(self) -> int:
        return self.bulk.round_trips

    cmd = staticmethod(encode)
    bitfield = staticmethod(rbloom.bitfield)
    create = staticmethod(rbloom.create_shard)
    seal = staticmethod(rbloom.seal_shard)

    async def execute(self, cmds: list) -> list:
        return await self.bulk.execute(b"".join(cmds), len(cmds))

    @staticmethod
    def bits(reply, order):
        return rbloom.unorder(reply[1:], order)

    async def close(self) -> None:
        await self.bulk.close()


class _PipeIO:
    """The filter's Redis I/O as redis-py pipelines (hiredis parses the replies)."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self.round_trips = 0

    @staticmethod
    def cmd(*args):
        return args

    @staticmethod
    def bitfield(key, st, offs, write):
        flat = offs.reshape(-1).tolist()
        if write:
            ops = [x for o in flat for x in ("SET", "u1", o, 1)]
        else:
            ops = [x for o in flat for x in ("GET", "u1", o)]
        return ("BITFIELD" if write else "BITFIELD_RO", key, "GET", "u1", st.seal, *ops), None

    @staticmethod
    def create(key, st):
        return ("SETRANGE", key, st.shard_bytes - 1, b"\0")

    @staticmethod
    def seal(key, st):
        return ("BITFIELD", key, "SET", "u1", st.seal, 1)

    async def execute(self, cmds: list) -> list:
        pipe = self.redis.pipeline(transaction=False)
        for c in cmds:
            pipe.execute_command(*c)
        self.round_trips += 1
        return await pipe.execute(raise_on_error=False)

    @staticmethod
    def bits(reply, order):
        return np.array(reply[1:], dtype=np.int8)

    async def close(self) -> None:
        pass


class RedisBloomFilter(DedupeFilter):
    """Bloom filter in Redis bitmaps; every master shares it (same capacity and
    error_rate required: checked against the scope's stats hash).

    Geometry and encoding are in ``elric.rbloom``. A call is split into segments of
    at most the room left in the current stage; per segment one pipeline (two when
    older stages must be read first) of BITFIELDs sent as pre-encoded RESP over
    ``BulkRedis``, then one pipeline of counters. No Lua: a script would cost Redis
    ~1.5 us per key more than the same BITFIELDs sent directly.

    Atomicity without a script: every BITFIELD also reads its shard's SEAL bit (set
    once the stage is full, never cleared). A key's verdict is made only by a
    test-and-set on a stage that was unsealed at that instant, after every older
    stage was read (or already holds its bits). Two masters racing on one key end
    on the same unsealed stage, where BITFIELD is atomic: exactly one sees a 0 bit.
    A master whose idea of the current stage is stale finds the seal set, keeps the
    keys it found already present as seen, and carries on with the rest in the next
    stage; one that is early finds the older stage unsealed and goes back to it."""

    name = "redis-bloom"
    can_release = False
    VERSION = 2   # bump when the hashing, layout or stage plan changes

    def __init__(self, redis, keys: Keys, *, capacity: int, error_rate: float,
                 log: logging.Logger) -> None:
        super().__init__(redis, keys, log)
        self.capacity = capacity
        self.error_rate = error_rate
        self.params = (f"v{self.VERSION} capacity={capacity} error_rate={error_rate!r} "
                       f"growth={GROWTH} tightening={TIGHTENING}")
        # temporary: RBLOOM_IO=pipeline measures redis-py pipelines against BulkRedis
        self.bulk = (_PipeIO if os.environ.get("RBLOOM_IO") == "pipeline" else _BulkIO)(redis)
        self._stages: list[rbloom.RStage] = []
        self._items_hint: dict[str, int] = {}
        self._sealed: dict[str, int] = {}     # per scope: stages known to be sealed
        self._ready: set[str] = set()          # scopes whose params this master checked
        self._locks: dict[str, asyncio.Lock] = {}
        self._inflight: dict[str, int] = {}       # keys of lock-free calls under way
        self._dup_rate: dict[str, float] = {}     # recent share of keys seen, per scope
        self._drained: dict[str, asyncio.Event] = {}
        self._warned: set[str] = set()

    # -- sizing ----------------------------------------------------------------------
    def stage(self, i: int) -> rbloom.RStage:
        while len(self._stages) <= i:
            j = len(self._stages)
            cap, p = _stage_params(self.capacity, self.error_rate, j)
            self._stages.append(rbloom.stage_geometry(
                j, cap, p, self._stages[-1] if self._stages else None))
        return self._stages[i]

    def stage_of(self, items: int) -> int:
        i = 0
        while items >= self.stage(i).cum:
            i += 1
        return i

    def positions(self, key: bytes, st: rbloom.RStage) -> tuple[int, list[int]]:
        """(shard within the stage, k bit offsets in it) of one key (the reference)."""
        return rbloom.positions(key, st)

    def _shard_key(self, scope: str, st: rbloom.RStage, shard: int) -> bytes:
        return self.keys.dedupe_rbloom(scope, st.first_shard + shard).encode()

    # -- API -------------------------------------------------------------------------
    async def close(self) -> None:
        await self.bulk.close()

    async def _prepare(self, scope: str) -> None:
        """Once per scope per master: record or check the parameters, then create the
        current stage's shards at full size (only now is it known to be ours)."""
        stats = self.keys.dedupe_stats(scope)
        c = self.bulk.cmd
        r = await self.bulk.execute([
            c("HSETNX", stats, "params", self.params), c("HSETNX", stats, "backend", self.name),
            c("HGET", stats, "params"), c("HGET", stats, "items"),
            c("ZADD", self.keys.dedupe_scopes, "+inf", scope)])
        self._check_params(scope, r[2])
        items = int(r[3] or 0)
        st = self.stage(self.stage_of(items))
        await self.bulk.execute([
            self.bulk.create(self._shard_key(scope, st, s), st) for s in range(st.shards)])
        self._items_hint[scope] = items
        self._ready.add(scope)

    def _check_params(self, scope: str, params) -> None:
        if params is not None and _as_str(params) != self.params:
            self._ready.discard(scope)
            raise DedupeError(
                f"dedupe scope {scope!r} is a redis-bloom filter with other parameters "
                f"than this master's ({self.params}): it was created with "
                f"{_as_str(params)}. Every master must use the same capacity and "
                f"error_rate for a scope (or drop_scope it).")

    async def check_and_add(self, scope: str, keys: list[str]) -> list[bool]:
        if not keys:
            return []
        raw = [k.encode("utf-8", "surrogatepass") if type(k) is str
               else k if isinstance(k, bytes) else str(k).encode("utf-8", "surrogatepass")
               for k in keys]
        h = rbloom.hash_keys(raw)
        verdict = np.zeros(len(raw), dtype=np.int8)        # 1 new, 2 seen
        # Stage room: a call may add at most the room left in the current stage (plus
        # 1 %: a full stage seen again, a re-crawl of every key, then costs one segment
        # per call, not one per 0.1 % of a batch; the overfill adds < 5 % to the stage's
        # false-positive rate, measured ~0.6-0.9x of the target). Calls that fit, counting
        # the keys of calls in flight, run side by side; near a stage's end they take
        # turns under the scope's lock and split into segments. Between masters the
        # overfill is at most the keys they have in flight at once.
        n = len(raw)
        if scope not in self._ready:
            async with self._locks.setdefault(scope, asyncio.Lock()):
                if scope not in self._ready:
                    await self._prepare(scope)
        if self._room(scope) >= n:                  # the usual case: the call fits
            await self._segment(scope, h, np.arange(n), verdict)
        else:                                       # near a stage's end: take turns
            async with self._locks[scope]:
                pos = 0
                while pos < n:
                    room = self._room(scope)
                    if room <= 0 or room < min(n - pos, 256) and self._inflight.get(scope):
                        # wait for calls in flight to count (rather than tiny segments)
                        changed = self._drained.setdefault(scope, asyncio.Event())
                        changed.clear()
                        await changed.wait()
                        continue
                    seg = np.arange(pos, min(n, pos + room))
                    await self._segment(scope, h, seg, verdict)
                    pos += seg.size
        return (verdict == 1).tolist()

    async def _segment(self, scope: str, h: np.ndarray, seg: np.ndarray,
                       verdict: np.ndarray) -> None:
        """Decide the keys of ``seg`` and count them, reserving their room meanwhile."""
        self._inflight[scope] = self._inflight.get(scope, 0) + seg.size
        try:
            await self._decide(scope, h, seg, verdict)
            seen = int((verdict[seg] == 2).sum())
            self._dup_rate[scope] = 0.7 * self._dup_rate.get(scope, 0.0) + 0.3 * seen / seg.size
            await self._count(scope, seg.size - seen, seen)
        finally:
            self._inflight[scope] -= seg.size
            self._drained.setdefault(scope, asyncio.Event()).set()

    def _room(self, scope: str) -> int:
        """Keys a call may still add to the current stage (see check_and_add)."""
        items = self._items_hint.get(scope, 0)
        st = self.stage(self.stage_of(items))
        return st.cum - items + st.capacity // 100 - self._inflight.get(scope, 0)

    async def _decide(self, scope: str, h: np.ndarray, seg: np.ndarray,
                      verdict: np.ndarray) -> None:
        """Give every key of ``seg`` its verdict (see the class docstring)."""
        stats = self.keys.dedupe_stats(scope)
        lo = np.zeros(len(verdict), dtype=np.int64)        # first stage still to consult
        # Mostly duplicates lately (a re-crawl)? Then read the current stage first and
        # test-and-set only the keys not found: a read costs Redis ~30 % less per key.
        probe = np.zeros(len(verdict), dtype=bool) \
            if self._dup_rate.get(scope, 0.0) >= 0.5 else None
        cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

        def where(s: int):
            if s not in cache:
                cache[s] = rbloom.positions_array(h[seg], self.stage(s))
            return cache[s]

        for _ in range(_MAX_ROUNDS):
            todo = np.flatnonzero(verdict[seg] == 0)        # indices into seg
            if todo.size == 0:
                return
            cur = self.stage_of(self._items_hint.get(scope, 0))
            bufs = [self.bulk.cmd("HGET", stats, "params"), self.bulk.cmd("HGET", stats, "items")]
            plan = []       # (stage, kind, seg indices, order) per BITFIELD sent
            klo = lo[seg[todo]]
            for s in range(int(klo.min()), max(cur, int(klo.max())) + 1):
                if s < cur:      # read an older stage: keys that have not passed it yet
                    groups = [("old", todo[klo <= s])]
                else:            # test-and-set: keys past every older stage, next is s
                    idx = todo[klo == s]
                    if probe is None:
                        groups = [("set", idx)]
                    else:        # (or first read it, where that was not done yet)
                        first = probe[seg[idx]]
                        groups = [("probe", idx[~first]), ("set", idx[first])]
                for kind, idx in groups:
                    if idx.size == 0:
                        continue
                    st = self.stage(s)
                    shard, offs = where(s)
                    for g in np.unique(shard[idx]):
                        sel = idx[shard[idx] == g]
                        cmd, order = self.bulk.bitfield(self._shard_key(scope, st, int(g)), st,
                                                     offs[sel], kind == "set")
                        bufs.append(cmd)
                        plan.append((s, kind, sel, order))
            replies = await self.bulk.execute(bufs)
            for r in replies:
                if isinstance(r, ResponseError):
                    raise r
            self._check_params(scope, replies[0])
            items = int(replies[1] or 0)
            if items < self._items_hint.get(scope, 0):   # the scope was dropped meanwhile
                self._sealed.pop(scope, None)
            self._items_hint[scope] = items
            read = np.zeros(len(verdict), dtype=bool)       # keys read in an older stage
            open_at = np.full(len(verdict), cur, dtype=np.int64)
            first_open = last_sealed = None
            for (s, kind, sel, order), r in zip(plan, replies[2:]):
                st = self.stage(s)
                sealed = r[0] == 1
                if sealed:
                    last_sealed = s if last_sealed is None else max(last_sealed, s)
                else:
                    first_open = s if first_open is None else min(first_open, s)
                present = self.bulk.bits(r, order).reshape(-1, st.k).all(axis=1)
                keys = seg[sel]
                verdict[keys[present]] = 2                 # all its bits: seen, whatever stage
                rest = keys[~present]
                if kind == "set":
                    if sealed:
                        lo[rest] = s + 1                   # stale: on to the next stage
                    else:
                        verdict[rest] = 1                  # the arbiter: new
                elif kind == "probe":
                    probe[rest] = True                     # not there: test-and-set next
                    if sealed:
                        lo[rest] = s + 1
                else:
                    read[rest] = True
                    if not sealed:                         # still open: test-and-set it
                        open_at[rest] = np.minimum(open_at[rest], s)
            read &= verdict == 0
            lo[read] = open_at[read]
            # what this round saw: stages below the first open one are sealed
            known = self._sealed.get(scope, 0)
            if first_open is not None:
                known = min(known, first_open)
            elif last_sealed is not None:
                known = max(known, last_sealed + 1)
            self._sealed[scope] = known
            if self._sealed.get(scope, 0) < cur:
                # An older stage is still open although our count said it was full:
                # seal what the count says is full (the master that filled it may have
                # died between its counter and its seal), then go on.
                await self._seal(scope, items)
        raise DedupeError(f"dedupe scope {scope!r}: no verdict after {_MAX_ROUNDS} rounds "
                          "(the filter kept changing under this call)")

    async def _count(self, scope: str, added: int, filtered: int) -> None:
        stats = self.keys.dedupe_stats(scope)
        c = self.bulk.cmd
        bufs = [c("HINCRBY", stats, "items", added),
                c("HINCRBY", stats, "filtered", filtered),
                # a scope dropped by another master during this call is recreated whole
                c("HSETNX", stats, "params", self.params),
                c("HSETNX", stats, "backend", self.name),
                c("ZADD", self.keys.dedupe_scopes, "+inf", scope)]
        items = int((await self.bulk.execute(bufs))[0])
        self._items_hint[scope] = items
        await self._seal(scope, items)
        if items > self.capacity and scope not in self._warned:
            self._warned.add(scope)
            self.log.warning(
                "dedupe scope %r passed its Bloom capacity %d (now %d items): growing "
                "into a new stage (false-positive rate stays <= %g, memory grows)",
                scope, self.capacity, items, self.error_rate)

    async def _seal(self, scope: str, items: int) -> None:
        """Seal every stage the count says is full (idempotent), creating the next
        stage's shards at full size first."""
        cur = self.stage_of(items)
        first = self._sealed.get(scope, 0)
        if first >= cur:
            return
        st = self.stage(cur)
        bufs = [self.bulk.create(self._shard_key(scope, st, g), st) for g in range(st.shards)]
        for s in range(first, cur):
            old = self.stage(s)
            bufs += [self.bulk.seal(self._shard_key(scope, old, g), old)
                     for g in range(old.shards)]
        await self.bulk.execute(bufs)
        self._sealed[scope] = cur

    def _stages_in_use(self, items: int) -> list[rbloom.RStage]:
        # The stages holding items (a next stage is only created by the next new key).
        return [self.stage(i) for i in range(self.stage_of(max(0, items - 1)) + 1)]

    async def stats(self) -> dict[str, dict]:
        scopes = await _registered_scopes(self.redis, self.keys)
        if not scopes:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.hgetall(self.keys.dedupe_stats(scope))
        hashes = await pipe.execute()
        await _forget_gone(self.redis, self.keys, scopes, hashes)
        out = {}
        for scope, h in zip(scopes, hashes):
            if _as_str(h.get(b"backend", b"")) != self.name:
                continue
            items = int(h.get(b"items", 0))
            entry = {"backend": self.name, "items": items,
                     "filtered": int(h.get(b"filtered", 0)),
                     "params": _as_str(h.get(b"params", b""))}
            if entry["params"] != self.params:
                entry["error"] = "created with other parameters than this master's"
                out[scope] = entry
                continue
            stages = self._stages_in_use(items)
            measure = sum(st.shards * st.shard_bytes for st in stages) <= _BITCOUNT_LIMIT
            pipe = self.redis.pipeline(transaction=False)
            for st in stages:
                for g in range(st.shards):
                    key = self.keys.dedupe_rbloom(scope, st.first_shard + g)
                    pipe.memory_usage(key)
                    if measure:   # the Bloom bytes only, not the seal's
                        pipe.bitcount(key, 0, st.shard_bits // 8 - 1)
            res = await pipe.execute()
            step = 2 if measure else 1
            mem = [int(r or 0) for r in res[0::step]]
            set_bits = [int(r) for r in res[1::step]] if measure else None
            miss, total_bits, total_set, pos = 1.0, 0, 0.0, 0
            for st in stages:
                if measure:
                    fills = [c / st.shard_bits for c in set_bits[pos:pos + st.shards]]
                else:
                    # Estimate: items of this stage spread evenly over its bits.
                    n_st = min(st.capacity, max(0, items - (st.cum - st.capacity)))
                    fills = [1 - math.exp(-st.k * n_st / st.bits)] * st.shards
                pos += st.shards
                # A key probes one shard: its FP chance there is fill**k.
                miss *= 1 - sum(f ** st.k for f in fills) / st.shards
                total_bits += st.bits
                total_set += sum(fills) * st.shard_bits
            entry.update({
                "capacity": stages[-1].cum,
                "stages": len(stages),
                "fill_ratio": total_set / total_bits,
                "fill_measured": measure,
                "expected_fp_rate": 1 - miss,
                "error_rate": self.error_rate,
                "bytes": sum(mem),
            })
            out[scope] = entry
        return out

    async def drop_scope(self, scope: str) -> None:
        items = int(await self.redis.hget(self.keys.dedupe_stats(scope), "items") or 0)
        # Every shard that can exist belongs to a stage up to the current one; one more
        # stage covers a master that grew it between the HGET and the DEL.
        last = self.stage(self.stage_of(items) + 1)
        keys = [self.keys.dedupe_rbloom(scope, g) for g in range(last.first_shard + last.shards)]
        await _drop_keys(self.redis, self.keys, scope, self.keys.dedupe_stats(scope), *keys)
        self._items_hint.pop(scope, None)
        self._sealed.pop(scope, None)
        self._ready.discard(scope)
        self._warned.discard(scope)


# --------------------------------------------------------------------------------------

def make_filter(backend: str, redis, keys: Keys, *, capacity: int = 1_000_000,
                error_rate: float = 0.001, set_ttl: float | None = None,
                snapshot_interval: float = 30.0,
                log: logging.Logger = logging.getLogger("elric.dedupe")) -> DedupeFilter:
    """Build the dedupe filter named ``backend`` ("set", "bloom" or "redis-bloom").

    ``redis`` is a ``redis.asyncio.Redis`` (decode_responses=False). ``capacity`` and
    ``error_rate`` size the Bloom backends; ``set_ttl`` (seconds) makes a key new again
    that long after it was let through (set backend only); ``snapshot_interval`` is
    how often the in-master Bloom filter is written to Redis (0 = only on close)."""
    if backend not in BACKENDS:
        raise DedupeError(f"unknown dedupe backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not isinstance(capacity, int) or capacity <= 0:
        raise DedupeError(f"dedupe capacity must be a positive integer, got {capacity!r}")
    if not 0 < error_rate < 1:
        raise DedupeError(f"dedupe error_rate must be between 0 and 1, got {error_rate!r}")
    if set_ttl is not None:
        if backend != "set":
            raise DedupeError(f"set_ttl applies to the 'set' backend only; a {backend!r} "
                              "filter cannot forget single keys")
        if not set_ttl > 0:
            raise DedupeError(f"set_ttl must be > 0 seconds, got {set_ttl!r}")
    if snapshot_interval < 0:
        raise DedupeError(f"snapshot_interval must be >= 0, got {snapshot_interval!r}")
    if backend == "set":
        return SetFilter(redis, keys, set_ttl=set_ttl, log=log)
    if backend == "bloom":
        return BloomFilter(redis, keys, capacity=capacity, error_rate=error_rate,
                           snapshot_interval=snapshot_interval, log=log)
    return RedisBloomFilter(redis, keys, capacity=capacity, error_rate=error_rate, log=log)
