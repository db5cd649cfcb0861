"""Dedupe filters: drop a job whose dedupe key was already seen in its scope.

Before a job is queued the master asks a filter whether its ``dedupe_key`` is new in
its ``dedupe_scope``. Check-and-add is atomic: two concurrent submissions of one key let
exactly one through (across masters too, except with ``bloom``). Backends: ``set`` (exact,
can release keys), ``bloom`` (in one master) and ``redis-bloom`` (shared); docs/DEDUPE.md
compares them.

The Bloom backends never call a seen key new, and call a new key seen with probability
at most ``error_rate``: past ``capacity`` they grow in stages whose error rates shrink
geometrically (p_i = p * (1 - r) * r**i, summing to p). They cannot release a key.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import struct
import time
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from pybloom_live import BloomFilter as _PyBloom
from redis.exceptions import ResponseError

from elric import lua
from elric.backoff import Backoff
from elric.config import FILTER_BACKENDS
from elric.config import KEYS as SETTINGS
from elric.keys import Keys
from elric.health import TaskHealth
from elric.retry import Outage, described, each, retry, until

if TYPE_CHECKING:   # numpy, which it loads, costs every master and CLI command ~0.1 s
    from elric import rbloom

log = logging.getLogger("elric.dedupe")

# How long a key's taker stays noted (`owned`) past the takeover age when no DEDUPE_TTL
# bounds it: the resend of a job whose master died between filter and queue comes within it.
TAKING_TTL_MS = 86_400_000
TAKEOVER_AFTER = SETTINGS["DEDUPE_TAKEOVER_AFTER"].default

# Seconds close() tries to write the last snapshot of 'bloom' scopes, given no deadline
# (a stopping master gives its own: its share of MASTER_STOP_TIMEOUT).
LAST_SNAPSHOT_WAIT = 10.0

# Each stage holds GROWTH times the last (memory stays within 2x of the need); r = 1/8
# leaves the first stage most of the error budget, so a filter that never grows is small.
GROWTH = 2
TIGHTENING = 0.125

# A Redis string holds at most 512 MiB (proto-max-bulk-len): a 'bloom' snapshot is one
MAX_SNAPSHOT = 512 << 20


def bloom_stage_bytes(capacity: int, error_rate: float) -> int:
    """Bytes of a 'bloom' scope's first stage's bits (pybloom-live's sizing), unallocated."""
    cap, p = _stage_params(capacity, error_rate, 0)
    slices = math.ceil(math.log(1.0 / p, 2))
    return slices * math.ceil(cap * abs(math.log(p)) / (slices * math.log(2) ** 2)) // 8


class DedupeError(Exception):
    """A dedupe filter cannot do what was asked (release on a Bloom filter,
    mismatched parameters between masters, a wrong key type, bad settings)."""


def _stage_params(capacity: int, error_rate: float, i: int) -> tuple[int, float]:
    """(capacity, error rate) of stage ``i``."""
    return capacity * GROWTH ** i, error_rate * (1 - TIGHTENING) * TIGHTENING ** i


def _as_str(x) -> str:
    return x.decode() if isinstance(x, bytes) else str(x)


def _other_backend(scope: str, other: str, mine: str) -> DedupeError:
    # (FILTER_BACKEND changed, or masters whose FILTER_SCOPES differ)
    return DedupeError(
        f"dedupe scope {scope!r} was filled by the {other!r} backend, and this master "
        f"uses {mine!r} for it: it would start the scope empty and let every key seen "
        "before through again. Give every master the same FILTER_BACKEND and "
        "FILTER_SCOPES, or drop the scope (docs/DEDUPE.md, 'To switch a scope's backend')")


class DedupeFilter(ABC):
    """Atomic check-and-add of dedupe keys, per scope. Every scope with a stats hash
    is listed in the registry ``keys.dedupe_scopes``, so nothing scans the keyspace."""

    name: str
    can_release = False   # has release(): a Bloom filter's keys share bits, none can go
    saves_on_close = False   # close() writes what is only in this process (its keys)

    def __init__(self, redis, keys: Keys, takeover_after: float) -> None:
        self.redis = redis
        self.keys = keys
        self._takeover_ms = int(takeover_after * 1000)   # dedupe_taker_fn.lua's grace
        self._forget_gone = lua.load(redis, "dedupe_forget_gone")
        self._count = lua.load(redis, "dedupe_count")
        self._warned: set[str] = set()
        self._unreadable: set[str] = set()   # scopes whose stats key is not a hash: warned

    @abstractmethod
    async def check_and_add(self, scope: str, keys: list[str],
                            owners: list[str] | None = None) -> list[bool]:
        """True = key is new in scope (it is now added; let the job through);
        False = seen before. Duplicates inside one call: only the first is True.
        One call costs O(1) round trips to Redis, never one per key. ``owners``: per key
        the job id taking it ("" for none), noted in Redis by every backend (see ``owned``).
        Nothing is counted ``filtered``: see ``count``."""

    def _notes(self, scope: str, keys: list[str]) -> list[str]:
        p = self.keys.dedupe_taking(Keys.taker_note(scope, ""))
        return [p + k for k in keys]

    async def owned(self, scope: str, keys: list[str], owners: list[str]) -> list[bool]:
        """Per key: whether ``check_and_add`` let it through for that owner, and neither the
        owner's job was queued since nor the key given back (every backend notes takers)."""
        if not keys:
            return []
        got = await self.redis.mget(self._notes(scope, keys))
        return [g == o.encode() for g, o in zip(got, owners)]

    async def count(self, scope: str, n: int) -> None:
        """Add ``n`` jobs dropped to the scope's ``filtered`` (not ``check_and_add``: a key
        found seen may be the same job sent again). A scope dropped meanwhile stays gone."""
        await self._count(keys=[self.keys.dedupe_stats(scope)], args=[n])

    @abstractmethod
    async def stats(self) -> dict[str, dict]:
        """Per scope: backend, items, filtered, bytes (+ capacity, stages, fill_ratio,
        expected_fp_rate, error_rate for the Bloom backends)."""

    @abstractmethod
    async def drop_scope(self, scope: str) -> None:
        """Forget a whole scope (e.g. a finished crawl round)."""

    async def start(self) -> None:
        """Prepare (load snapshots, start background work)."""

    def health_view(self, now: float) -> dict | None:
        """Its background task's ``TaskHealth.view`` (at ``now``), if it has one."""
        return None

    async def close(self, deadline: float | None = None) -> None:
        """Finish (final snapshot), by ``deadline`` (``time.monotonic()``) if given. Does
        not close the Redis client: the caller owns it."""

    async def _scopes(self) -> list[tuple[str, dict]]:
        """(scope, stats hash) of this backend's registered scopes. Scopes whose stats
        hash is gone (expired, deleted) leave the registry."""
        scopes = sorted(_as_str(s) for s in await self.redis.zrange(self.keys.dedupe_scopes, 0, -1))
        pipe = self.redis.pipeline(transaction=False)
        for scope in scopes:
            pipe.hgetall(self.keys.dedupe_stats(scope))
        # one key of another type (an operator's) must not fail every scope's stats
        hashes = await pipe.execute(raise_on_error=False) if scopes else []
        for scope, h in zip(scopes, hashes):
            if isinstance(h, Exception) and "WRONGTYPE" not in str(h):
                raise h   # Redis refusing (loading, ...): not this scope's fault
            if isinstance(h, Exception) and scope not in self._unreadable:
                self._unreadable.add(scope)
                log.warning("dedupe scope %r is left out of stats: %s is not a hash (%s); "
                            "delete that key", scope, self.keys.dedupe_stats(scope), h)
        gone = [scope for scope, h in zip(scopes, hashes) if not h]
        if gone:
            await self._forget_gone(keys=[self.keys.dedupe_scopes,
                                          *map(self.keys.dedupe_stats, gone)], args=gone)
        return [(scope, h) for scope, h in zip(scopes, hashes) if isinstance(h, dict)
                and _as_str(h.get(b"backend", b"")) == self.name]

    async def _blame_stats_key(self, scope: str, exc: Exception) -> None:
        """A DedupeError for a scope another backend filled (a script's BACKEND refusal), or
        a WRONGTYPE from a stats key of another type (an operator's: no scope to drop)."""
        if str(exc).startswith("BACKEND "):
            raise _other_backend(scope, str(exc).split()[1], self.name) from None
        key = self.keys.dedupe_stats(scope)
        if "WRONGTYPE" in str(exc) and _as_str(await self.redis.type(key)) not in ("hash", "none"):
            raise DedupeError(f"dedupe scope {scope!r}: {key} is not a hash; delete that key "
                              "(a redis-bloom scope kept its state there: drop it)") from None

    async def _drop_keys(self, scope: str, *names: str) -> None:
        self._warned.discard(scope)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(self.keys.dedupe_stats(scope), *names)
        pipe.zrem(self.keys.dedupe_scopes, scope)
        await pipe.execute()

    def _note_growth(self, scope: str, items: int, capacity: int, error_rate: float) -> None:
        if items > capacity and scope not in self._warned:
            self._warned.add(scope)
            log.warning(
                "dedupe scope %r passed its Bloom capacity %d (now %d items): growing "
                "into a new stage (false-positive rate stays <= %g, memory grows)",
                scope, capacity, items, error_rate)


# --- set: exact -------------------------------------------------------------------------

class SetFilter(DedupeFilter):
    """Exact filter: a Redis set per scope (a zset of key -> ms let through with
    ``set_ttl``: a key is new again ``set_ttl`` seconds after it was let through)."""

    name = "set"
    can_release = True

    def __init__(self, redis, keys: Keys, *, set_ttl: float | None = None,
                 takeover_after: float = TAKEOVER_AFTER) -> None:
        super().__init__(redis, keys, takeover_after)
        self._ttl_ms = None if set_ttl is None else max(1, int(round(set_ttl * 1000)))
        self._script = lua.load(redis, "dedupe_set" if set_ttl is None else "dedupe_set_ttl",
                                "clock_fn", "dedupe_taker_fn")

    async def _typed(self, scope: str, call):
        """``await call``, a WRONGTYPE reply (the scope was written with the other
        set_ttl setting) as a DedupeError that says so."""
        try:
            return await call
        except ResponseError as exc:
            await self._blame_stats_key(scope, exc)
            if "WRONGTYPE" not in str(exc):
                raise
            kind = "sorted set (set_ttl)" if self._ttl_ms is not None else "set (no set_ttl)"
            raise DedupeError(
                f"dedupe scope {scope!r}: key {self.keys.dedupe_set(scope)} is not a {kind}; "
                f"it was written with the other set_ttl setting. Keep the setting, or drop "
                f"the scope (docs/DEDUPE.md, 'To switch a scope's backend') ({exc})") from None

    async def check_and_add(self, scope: str, keys: list[str],
                            owners: list[str] | None = None) -> list[bool]:
        if not keys:
            return []
        res = await self._typed(scope, self._script(
            keys=[self.keys.dedupe_set(scope), self.keys.dedupe_stats(scope),
                  self.keys.dedupe_scopes], args=[
                      scope, "" if owners is None else self.keys.dedupe_taking(""),
                      self._ttl_ms or TAKING_TTL_MS + self._takeover_ms, self._takeover_ms,
                      *keys, *(owners or ())]))
        return [r == 1 for r in res]

    async def release(self, scope: str, keys: list[str]) -> None:
        if keys:
            pipe = self.redis.pipeline(transaction=True)
            pipe.delete(*self._notes(scope, keys))   # a key given back has no taker
            remove = pipe.srem if self._ttl_ms is None else pipe.zrem
            remove(self.keys.dedupe_set(scope), *keys)
            await self._typed(scope, pipe.execute())

    async def stats(self) -> dict[str, dict]:
        mine = await self._scopes()
        if not mine:
            return {}
        cutoff = "-inf"
        if self._ttl_ms is not None:      # members let through before it have expired
            sec, usec = await self.redis.time()
            cutoff = f"({sec * 1000 + usec // 1000 - self._ttl_ms}"
        pipe = self.redis.pipeline(transaction=False)
        for scope, _ in mine:
            pipe.type(self.keys.dedupe_set(scope))
        kinds = await pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for (scope, _), kind in zip(mine, kinds):
            key = self.keys.dedupe_set(scope)
            if _as_str(kind) == "zset":
                pipe.zcount(key, cutoff, "+inf")
            else:
                pipe.scard(key)           # 0 for a missing key
            pipe.memory_usage(key)
        res = await pipe.execute()
        return {scope: {"backend": self.name, "items": int(res[2 * j]),
                        "filtered": int(h.get(b"filtered", 0)), "bytes": int(res[2 * j + 1] or 0)}
                for j, (scope, h) in enumerate(mine)}

    async def drop_scope(self, scope: str) -> None:
        await self._drop_keys(scope, self.keys.dedupe_set(scope))


# --- bloom: in the master's memory, snapshotted to Redis --------------------------------

class _StagedBloom:
    """pybloom-live BloomFilter stages following the module's stage schedule
    (pybloom-live's own ScalableBloomFilter overshoots its target once it grows).
    Snapshot: a struct header, then each stage's ``tofile`` bytes (no pickle)."""

    MAGIC = b"ELRBLM01"
    HEADER = struct.Struct("<8sQdQI")  # magic, capacity, error_rate, filtered, stages
    STAGE = struct.Struct("<Q")        # length of one stage's tofile() bytes

    def __init__(self, capacity: int, error_rate: float, filtered: int = 0,
                 stages: list[_PyBloom] | None = None) -> None:
        self.capacity = capacity
        self.error_rate = error_rate
        self.filtered = filtered
        self.stages = stages or [_PyBloom(*_stage_params(capacity, error_rate, 0))]

    @property
    def items(self) -> int:
        return sum(s.count for s in self.stages)

    def __contains__(self, key: str) -> bool:
        return any(key in s for s in self.stages)

    def put(self, key: str) -> None:
        """Add ``key``, which its caller found new (not ``in``), into the last stage, or a
        next one if that is full."""
        if self.stages[-1].count >= self.stages[-1].capacity:
            self.stages.append(_PyBloom(*_stage_params(self.capacity, self.error_rate,
                                                       len(self.stages))))
        self.stages[-1].add(key, skip_check=True)   # counted: its job was let through

    def stats(self) -> dict:
        fills = [s.bitarray.count() / s.num_bits for s in self.stages]
        bits = [s.num_bits for s in self.stages]
        # partitioned filters (k slices): a stage's false-positive chance is ~ fill**k
        miss = math.prod(1 - f ** s.num_slices for s, f in zip(self.stages, fills))
        return {"items": self.items, "filtered": self.filtered,
                "capacity": sum(s.capacity for s in self.stages), "stages": len(self.stages),
                "fill_ratio": sum(f * b for f, b in zip(fills, bits)) / sum(bits),
                "expected_fp_rate": 1 - miss, "error_rate": self.error_rate,
                "bytes": sum((b + 7) // 8 for b in bits)}

    def to_bytes(self) -> bytes:
        parts = [self.HEADER.pack(self.MAGIC, self.capacity, self.error_rate,
                                  self.filtered, len(self.stages))]
        for s in self.stages:
            b = io.BytesIO()
            s.tofile(b)
            parts += [self.STAGE.pack(len(b.getvalue())), b.getvalue()]
        return b"".join(parts)

    @classmethod
    def from_bytes(cls, data: bytes) -> "_StagedBloom":
        buf = io.BytesIO(data)
        magic, capacity, error_rate, filtered, n = cls.HEADER.unpack(buf.read(cls.HEADER.size))
        if magic != cls.MAGIC:
            raise DedupeError(f"not an elric Bloom snapshot (magic {magic!r})")
        if not n:
            raise DedupeError("Bloom snapshot has no stages")
        stages = []
        for _ in range(n):
            (length,) = cls.STAGE.unpack(buf.read(cls.STAGE.size))
            stages.append(_PyBloom.fromfile(io.BytesIO(buf.read(length)), length))
        return cls(capacity, error_rate, filtered, stages)


class BloomFilter(DedupeFilter):
    """In-master Bloom filter per scope; for ONE master (others would not see its
    bits, and two masters snapshotting one scope would overwrite each other). A crash
    forgets at most the keys of the last ``snapshot_interval``."""

    name = "bloom"
    saves_on_close = True

    def __init__(self, redis, keys: Keys, *, capacity: int, error_rate: float,
                 snapshot_interval: float, takeover_after: float = TAKEOVER_AFTER) -> None:
        super().__init__(redis, keys, takeover_after)
        self.capacity = capacity
        self.error_rate = error_rate
        self.snapshot_interval = snapshot_interval
        self._filters: dict[str, _StagedBloom] = {}
        self._dirty: set[str] = set()
        # per scope, the keys a check found new and is noting the takers of: seen meanwhile
        self._taking: dict[str, set[str]] = {}
        self._note = lua.load(redis, "dedupe_note_takers", "dedupe_taker_fn")
        # snapshot writes, loads and drop_scope take turns: neither a snapshot in flight
        # nor a load that read before the drop may bring back a scope just dropped
        self._io_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._stop = asyncio.Event()
        self.health = TaskHealth(stale_after=2 * snapshot_interval + 30)

    async def start(self) -> None:
        for scope, _ in await self._scopes():
            await self._filter(scope)
        if self._task is None and self.snapshot_interval > 0:
            self._task = asyncio.create_task(self._snapshot_loop(), name="elric-dedupe-snapshot")

    async def close(self, deadline: float | None = None) -> None:
        """Stop snapshotting and write the last snapshot, tried till ``deadline``
        (``time.monotonic()``; default LAST_SNAPSHOT_WAIT from now)."""
        if deadline is None:
            deadline = time.monotonic() + LAST_SNAPSHOT_WAIT
        if self._task is not None:
            # asked to stop, not cancelled: redis-py may swallow a cancellation that lands
            # in a call (8.2 does in pipelines), and the task would go on for good
            self._stop.set()
            try:
                await asyncio.wait({self._task}, timeout=max(0.0, deadline - time.monotonic()))
            finally:   # (a stop cut short cancels this wait)
                self._task.cancel()   # still in a call to a Redis that does not answer
                self._task = None
        # the keys since the last snapshot are only here: a Redis blip must not lose them
        await retry(self.snapshot, what="dedupe: last Bloom snapshot", log=log,
                    backoff=Backoff(0.1, 1.0), deadline=deadline)

    def health_view(self, now: float) -> dict | None:
        return None if self._task is None else self.health.view(not self._task.done(), now)

    async def _snapshot_loop(self) -> None:
        # any error is retried: one Redis blip must not end snapshots for good
        backoff = Backoff(min(1.0, self.snapshot_interval), self.snapshot_interval)
        outage, delay = Outage(log, "dedupe: Bloom snapshot"), self.snapshot_interval
        every = f"writing snapshots every {self.snapshot_interval:g}s"
        self.health.progress(every)
        while True:
            await until(self._stop, delay)
            if self._stop.is_set():
                return
            try:
                await self.snapshot()
            except Exception as exc:   # health shows it: a restart would lose the keys
                outage.failed(exc)
                self.health.trouble(f"{described(exc)}; retrying")
                delay = backoff.next()
                continue
            outage.passed()
            backoff.reset()
            self.health.progress(every)
            delay = self.snapshot_interval

    async def snapshot(self) -> int:
        """Write the scopes changed since the last snapshot, and those Redis lost or holds
        older (the keys are only here now); returns how many."""
        async with self._io_lock:
            pipe = self.redis.pipeline(transaction=False)
            for scope in self._filters:
                pipe.hget(self.keys.dedupe_stats(scope), "items")
            held = await pipe.execute(raise_on_error=False) if self._filters else []
            self._dirty.update(scope for (scope, f), n in zip(self._filters.items(), held)
                               if n != str(f.items).encode())
            dirty, self._dirty = self._dirty, set()

            async def write(scope: str) -> None:
                f = self._filters[scope]   # drop_scope takes a scope out of _dirty
                # serialised with no await: nothing adds to it meanwhile, a consistent cut
                data = f.to_bytes()
                pipe = self.redis.pipeline(transaction=True)
                pipe.set(self.keys.dedupe_bloom(scope), data)
                pipe.hset(self.keys.dedupe_stats(scope), mapping={
                    "backend": self.name, "items": f.items, "filtered": f.filtered})
                pipe.zadd(self.keys.dedupe_scopes, {scope: float("inf")})
                await pipe.execute()
                dirty.discard(scope)
            todo = sorted(dirty)
            try:   # one scope's key of another type must not hold back the others
                await each(todo, write)
            finally:
                self._dirty |= dirty  # not written (error, cancelled): next time
            return len(todo)

    async def _filter(self, scope: str) -> _StagedBloom:
        if (f := self._filters.get(scope)) is not None:
            return f
        async with self._io_lock:
            if scope in self._filters:   # loaded while this one waited: read once
                return self._filters[scope]
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(self.keys.dedupe_bloom(scope))
            pipe.hget(self.keys.dedupe_stats(scope), "backend")
            try:
                data, other = await pipe.execute()
            except ResponseError as exc:
                await self._blame_stats_key(scope, exc)
                raise
            if other is not None and _as_str(other) != self.name:
                raise _other_backend(scope, _as_str(other), self.name)
            if not data:
                f = _StagedBloom(self.capacity, self.error_rate)
            else:
                try:
                    f = _StagedBloom.from_bytes(data)
                except (ValueError, struct.error, DedupeError) as exc:
                    # refused rather than started empty, which would let every seen key in
                    raise DedupeError(
                        f"dedupe scope {scope!r}: unreadable Bloom snapshot at "
                        f"{self.keys.dedupe_bloom(scope)} ({exc}); delete that key "
                        "to start the scope empty") from None
                if (f.capacity, f.error_rate) != (self.capacity, self.error_rate):
                    log.warning(
                        "dedupe scope %r: snapshot has capacity=%d error_rate=%g, "
                        "configured %d/%g; keeping the snapshot's", scope,
                        f.capacity, f.error_rate, self.capacity, self.error_rate)
            if other is None:   # claimed now, not at its first snapshot: others refuse it
                pipe = self.redis.pipeline(transaction=True)
                pipe.hsetnx(self.keys.dedupe_stats(scope), "backend", self.name)
                pipe.zadd(self.keys.dedupe_scopes, {scope: float("inf")})
                if not (await pipe.execute())[0]:   # another backend's, since the read
                    theirs = await self.redis.hget(self.keys.dedupe_stats(scope), "backend")
                    raise _other_backend(scope, _as_str(theirs), self.name)
            self._filters[scope] = f
            return f

    async def check_and_add(self, scope: str, keys: list[str],
                            owners: list[str] | None = None) -> list[bool]:
        if not keys:
            return []
        f = await self._filter(scope)
        taking = self._taking.setdefault(scope, set())
        out = []
        for k in keys:   # no await: atomic for every other coroutine
            out.append(k not in taking and k not in f)
            if out[-1]:
                taking.add(k)
        took = [k for k, new in zip(keys, out) if new]
        try:
            # noted before they go in: a snapshot holds no key whose taker is unknown. Seen
            # keys nearly never have a note (their job was queued): only ask if any has
            if owners is not None and (took or await self.redis.exists(
                    *self._notes(scope, keys))):
                got = await self._note(args=[
                    self.keys.dedupe_taking(""), TAKING_TTL_MS + self._takeover_ms,
                    self._takeover_ms, scope, bytes(48 + new for new in out), *keys, *owners])
                out = [v == 49 for v in got]   # b"1"
            for k in took:
                f.put(k)
        finally:
            taking.difference_update(took)
            if not taking:
                self._taking.pop(scope, None)
        self._dirty.add(scope)
        self._note_growth(scope, f.items, f.capacity, f.error_rate)
        return out

    async def count(self, scope: str, n: int) -> None:
        f = self._filters.get(scope)   # the count is the filter's, in memory
        if f is not None:
            f.filtered += n
            self._dirty.add(scope)

    async def stats(self) -> dict[str, dict]:
        return {scope: {"backend": self.name, **f.stats()}
                for scope, f in sorted(self._filters.items())}

    async def drop_scope(self, scope: str) -> None:
        async with self._io_lock:
            self._filters.pop(scope, None)
            self._dirty.discard(scope)
            await self._drop_keys(scope, self.keys.dedupe_bloom(scope))


# --- redis-bloom: Bloom filter as Redis bitmaps, shared by every master -----------------

_BITCOUNT_LIMIT = 64 << 20   # stats(): BITCOUNT the shards only up to this many bytes
_MAX_KEYS = 10_000           # keys per script call: bounds how long one call blocks Redis
_ITEMS_CACHE = 10_000        # scopes whose item count a master remembers (a hint)


class RedisBloomFilter(DedupeFilter):
    """Bloom filter in Redis bitmaps, shared by every master (their capacity and error_rate
    must match the scope's stats hash). A batch is hashed here; one atomic script call
    (elric/lua/dedupe_rbloom.lua) decides its keys in order, so of two masters racing on
    one key exactly one finds a 0 bit."""

    name = "redis-bloom"
    VERSION = 4   # bump when the hashing, layout or stage plan changes

    def __init__(self, redis, keys: Keys, *, capacity: int, error_rate: float,
                 takeover_after: float = TAKEOVER_AFTER) -> None:
        super().__init__(redis, keys, takeover_after)
        self.capacity = capacity
        self.error_rate = error_rate
        self.params = (f"v{self.VERSION} capacity={capacity} error_rate={error_rate!r} "
                       f"growth={GROWTH} tightening={TIGHTENING}")
        self._script = lua.load(redis, "dedupe_rbloom", "expect_fn", "dedupe_taker_fn")
        self._stages: list[rbloom.RStage] = []
        self._items: dict[str, int] = {}          # per scope: its item count last seen

    def stage(self, i: int) -> rbloom.RStage:
        from elric import rbloom

        for j in range(len(self._stages), i + 1):
            cap, p = _stage_params(self.capacity, self.error_rate, j)
            self._stages.append(rbloom.stage_geometry(
                j, cap, p, self._stages[-1] if self._stages else None))
        return self._stages[i]

    def stage_of(self, items: int) -> int:
        i = 0
        while items >= self.stage(i).cum:
            i += 1
        return i

    async def check_and_add(self, scope: str, keys: list[str],
                            owners: list[str] | None = None) -> list[bool]:
        if not keys:
            return []
        from elric import rbloom

        h = rbloom.hash_keys([k.encode("utf-8", "surrogatepass") for k in keys])
        head = [scope, self.params, self.name, self.keys.dedupe_rbloom(scope, 0)[:-1],
                "" if owners is None else self.keys.dedupe_taking(""),
                TAKING_TTL_MS + self._takeover_ms, self._takeover_ms]
        verdicts = b""
        while (done := len(verdicts)) < len(keys):
            part = h[done:done + _MAX_KEYS]
            items = self._items.get(scope, 0)
            last = self.stage_of(items)
            if self.stage(last).cum - items < len(part):
                last += 1          # the batch may fill the current stage: send the next
            args = head + [last + 1]
            for st in map(self.stage, range(last + 1)):
                args += [st.cum, st.k, st.first_shard, st.shards, st.shard_bytes,
                         rbloom.records(part, st)]
            if owners is not None:   # noted as each key's taker
                args += keys[done:done + len(part)] + owners[done:done + len(part)]
            try:
                got, items = await self._script(
                    keys=[self.keys.dedupe_stats(scope), self.keys.dedupe_scopes], args=args)
            except ResponseError as exc:
                await self._blame_stats_key(scope, exc)
                theirs = str(exc).partition(" ")
                if theirs[0] != "PARAMS":
                    raise
                raise DedupeError(
                    f"dedupe scope {scope!r} is a redis-bloom filter with other parameters "
                    f"than this master's ({self.params}): it was created with "
                    f"{theirs[2]}. Every master must use the same capacity and "
                    f"error_rate for a scope (or drop the scope: docs/DEDUPE.md).") from None
            if scope not in self._items and len(self._items) >= _ITEMS_CACHE:
                self._items.clear()   # scopes other masters dropped would pile up here
            self._items[scope] = items  # short of keys: a stage was missing, send the rest
            verdicts += got
        self._note_growth(scope, self._items[scope], self.capacity, self.error_rate)
        return [v == 49 for v in verdicts]          # b"1"

    async def stats(self) -> dict[str, dict]:
        out = {}
        for scope, h in await self._scopes():
            items = int(h.get(b"items", 0))
            entry = out[scope] = {"backend": self.name, "items": items,
                                  "filtered": int(h.get(b"filtered", 0)),
                                  "params": _as_str(h.get(b"params", b""))}
            if entry["params"] != self.params:
                entry["error"] = "created with other parameters than this master's"
            else:
                entry.update(await self._fill(scope, items))
        return out

    async def _fill(self, scope: str, items: int) -> dict:
        """Capacity, memory and fill of a scope's stages (a next stage is only created
        by the next new key). Bits are counted up to _BITCOUNT_LIMIT, estimated above."""
        stages = [self.stage(i) for i in range(self.stage_of(max(0, items - 1)) + 1)]
        measure = sum(st.shards * st.shard_bytes for st in stages) <= _BITCOUNT_LIMIT
        pipe = self.redis.pipeline(transaction=False)
        for g in range(stages[-1].first_shard + stages[-1].shards):
            key = self.keys.dedupe_rbloom(scope, g)
            pipe.memory_usage(key)
            if measure:
                pipe.bitcount(key)            # the creation byte is always 0
        res = await pipe.execute()
        sizes, counts = (res[0::2], res[1::2]) if measure else (res, [])
        miss, total_set = 1.0, 0.0
        for st in stages:
            if measure:
                fills = [c / st.shard_bits
                         for c in counts[st.first_shard:st.first_shard + st.shards]]
            else:   # items of this stage spread evenly over its bits
                n_st = min(st.capacity, max(0, items - (st.cum - st.capacity)))
                fills = [1 - math.exp(-st.k * n_st / st.bits)] * st.shards
            miss *= 1 - sum(f ** st.k for f in fills) / st.shards  # a key probes one shard
            total_set += sum(fills) * st.shard_bits
        return {"capacity": stages[-1].cum, "stages": len(stages),
                "fill_ratio": total_set / sum(st.bits for st in stages),
                "fill_measured": measure, "expected_fp_rate": 1 - miss,
                "error_rate": self.error_rate, "bytes": sum(int(r or 0) for r in sizes)}

    async def drop_scope(self, scope: str) -> None:
        items, params = await self.redis.hmget(self.keys.dedupe_stats(scope), "items", "params")
        cut = self   # the scope's shards were cut by the parameters it was made with
        if params is not None and _as_str(params) != self.params:
            made = dict(kv.split("=", 1) for kv in _as_str(params).split()[1:])
            cut = RedisBloomFilter(self.redis, self.keys, capacity=int(made["capacity"]),
                                   error_rate=float(made["error_rate"]))
        # shards exist up to the current stage; one more covers a master that grew it
        # between the HMGET and the DEL
        last = cut.stage(cut.stage_of(int(items or 0)) + 1)
        await self._drop_keys(scope, *(self.keys.dedupe_rbloom(scope, g)
                                       for g in range(last.first_shard + last.shards)))
        self._items.pop(scope, None)


def make_filter(backend: str, redis, keys: Keys, *,
                capacity: int = SETTINGS["BLOOM_CAPACITY"].default,
                error_rate: float = SETTINGS["BLOOM_ERROR_RATE"].default,
                set_ttl: float | None = None,
                snapshot_interval: float = SETTINGS["BLOOM_SNAPSHOT_INTERVAL"].default,
                takeover_after: float = TAKEOVER_AFTER) -> DedupeFilter:
    """The dedupe filter named ``backend``, on a ``redis.asyncio.Redis`` (bytes replies).
    ``set_ttl``: seconds after which a key is new again ('set' only); ``snapshot_interval``:
    seconds between 'bloom' snapshots (0: only on close)."""
    if backend not in FILTER_BACKENDS:
        raise DedupeError(f"unknown dedupe backend {backend!r}; choose one of "
                          f"{', '.join(FILTER_BACKENDS)}")
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
        return SetFilter(redis, keys, set_ttl=set_ttl, takeover_after=takeover_after)
    if backend == "bloom":
        return BloomFilter(redis, keys, capacity=capacity, error_rate=error_rate,
                           snapshot_interval=snapshot_interval, takeover_after=takeover_after)
    return RedisBloomFilter(redis, keys, capacity=capacity, error_rate=error_rate,
                            takeover_after=takeover_after)
