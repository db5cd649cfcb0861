"""The Redis queue: enqueue, fetch with a lease, finish, release, recover; job records.

Masters and workers share this one class. Each state change is one Lua script from
scripts.py; reads (get_job, list_jobs, stats) are pipelined. Values are msgpack; nothing
is pickled.
"""

from __future__ import annotations

import os
import struct
import time
from itertools import accumulate
from typing import Any, AsyncIterator, Iterable

import msgpack
from redis.exceptions import NoScriptError, ResponseError

from elric import scripts
from elric.contract import STATUSES
from elric.keys import Keys


class Fenced(Exception):
    """An enqueue guarded by a scheduler lease token that is no longer current."""


def now_ms() -> int:
    return int(time.time() * 1000)


# Redis's cmsgpack predates msgpack's bin type: what a script unpacks is packed without it
_packb = msgpack.Packer(use_bin_type=False).pack
_packb_bin = msgpack.Packer(use_bin_type=True).pack
# a pack's job ids end in their index (scripts.ENQUEUE); a longer run takes more packs
_PACK_MAX = 10_000
_INDEX = [f"{k:08x}" for k in range(_PACK_MAX)]


def unpack(data: bytes | None) -> Any:
    if data is None or data == b"":
        return None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def _s(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "replace")


def _ms_to_s(value: bytes | None) -> float | None:
    return None if value in (None, b"") else int(value) / 1000.0


async def _take(it, n: int) -> AsyncIterator:
    """The next ``n`` items of an async iterator (fewer at its end)."""
    for _ in range(n):
        item = await anext(it, None)
        if item is None:
            return
        yield item


class RedisQueue:
    def __init__(self, redis, keys: Keys, *, result_ttl: int = 86400,
                 failed_ttl: int = 7 * 86400, release_keys_on_failure: bool = False) -> None:
        self.redis = redis
        self.keys = keys
        self.result_ttl = result_ttl
        self.failed_ttl = failed_ttl
        self.release_keys_on_failure = release_keys_on_failure
        self._enqueue = redis.register_script(scripts.ENQUEUE)
        self._fetch = redis.register_script(scripts.FETCH)
        self._finish = redis.register_script(scripts.FINISH)
        self._release = redis.register_script(scripts.RELEASE)
        self._recover = redis.register_script(scripts.RECOVER)
        self._promote = redis.register_script(scripts.PROMOTE)
        self._heartbeat = redis.register_script(scripts.HEARTBEAT)
        self._remove = redis.register_script(scripts.REMOVE)
        self._rerun = redis.register_script(scripts.RERUN)
        self._lookup = redis.register_script(scripts.LOOKUP)

    # --- writes ----------------------------------------------------------------------
    async def enqueue(self, specs: list[dict], *, fence: tuple[str, int] | None = None,
                      may_exist: set | None = None,
                      existed: list[int] | None = None) -> list[dict]:
        """Queue normalized specs; an existing job_id is left as it is (idempotent).

        A spec whose job_id the master made (not in ``may_exist``) gets its id here: that
        of its place in a pack (scripts.ENQUEUE); ``spec["job_id"]`` is set to it.

        Returns ``{"job_id", "status"}`` per spec: ``queued`` for a new job, else the
        status the existing job has. ``may_exist``, when given, holds the only job_ids
        that can exist already (the ones a caller chose); the others were just made by
        the master, and Redis skips looking them up. ``existed``, when given, gets the
        positions of the specs whose job_id existed (nothing was queued for them).
        """
        if not specs:
            return []
        # runs of consecutive jobs sharing queue, priority, batch and freshness (see
        # scripts.ENQUEUE): [n, queue, priority, batch, fresh, body, queue, ...]. A fresh
        # run (the master's own ids) is queued as a pack: its jobs get the ids
        # {pack}{index:08x}, and its body is [pack, n]; its string (sent as a SET)
        # holds each job's fields packed by position, after a table of where each ends.
        now = now_ms()
        runs: list[Any] = [len(specs)]
        head = None
        body: list[Any] = []
        pack_id = ""
        packs: list[tuple[int, str, list[bytes]]] = []
        packb, packb_bin = _packb, _packb_bin
        for spec in specs:
            get = spec.get
            job_id = spec["job_id"]
            this = (spec["queue"], spec["priority"], get("batch") or "",
                    may_exist is not None and job_id not in may_exist)
            if this != head or len(body) >= _PACK_MAX:
                head, body = this, []
                pack_id = os.urandom(12).hex() if this[3] else ""
                if pack_id:
                    packs.append((len(runs) + 4, pack_id, body))
                runs += [this[0], repr(this[1]), this[2], "1" if pack_id else "0", body]
            # The job hash's fields besides those the script sets itself, by position
            # (scripts.PACK_FIELDS), None where the field is at the default a missing one reads
            # as (numbers as repr, as redis-py would): a field at its default costs Redis
            # ~0.35 us per job for nothing. (Spelled out rather than looped over: this is
            # a third of the master's time per new job.)
            values = (spec["func"],
                      packb_bin(v) if (v := get("args")) else None,
                      packb_bin(v) if (v := get("kwargs")) else None,
                      repr(v) if (v := get("max_retries")) else None,
                      None if (v := get("timeout")) is None else repr(v),
                      get("parent") or None,
                      get("schedule"),
                      None if (v := get("fire_time")) is None else repr(v),
                      get("dedupe_key"),
                      get("dedupe_scope"))
            if pack_id:
                spec["job_id"] = pack_id + _INDEX[len(body)]
                body.append(packb(values))
                continue
            fields: list = []
            for name, v in zip(scripts.PACK_FIELDS, values):
                if v is not None:
                    fields += (name, v)
            body += [job_id, len(fields), *fields]
        strings = []
        for at, pack_id, blobs in packs:  # [pack, n]; its string: n end offsets, the jobs
            ends = list(accumulate(map(len, blobs)))
            runs[at] = [pack_id, len(blobs)]
            strings.append((self.keys.pack(pack_id),
                            struct.pack(f"<{len(ends)}I", *ends) + b"".join(blobs)))
        argv: list[Any] = [self.keys.prefix, now, fence[0] if fence else "",
                           fence[1] if fence else "", _packb(runs)]
        try:
            existing = await self._send_enqueue(strings, argv)
        except ResponseError as exc:
            if str(exc).startswith("FENCED"):
                raise Fenced(str(exc)) from None
            raise
        statuses = ["queued"] * len(specs)
        for i in range(0, len(existing), 2):
            statuses[int(existing[i]) - 1] = _s(existing[i + 1])
            if existed is not None:
                existed.append(int(existing[i]) - 1)
        return [{"job_id": spec["job_id"], "status": status}
                for spec, status in zip(specs, statuses)]

    async def _send_enqueue(self, strings: list[tuple[str, bytes]], argv: list) -> list:
        """ENQUEUE, with its packs' strings SET just before it in one pipeline (one round
        trip; see scripts.ENQUEUE for why they are not its arguments). A string whose
        script did not run expires (PACK_KEEP); a resent pipeline is ENQUEUE's replay."""
        if not strings:
            return await self._enqueue(args=argv)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, data in strings:
                pipe.set(key, data, ex=scripts.PACK_KEEP)
            pipe.evalsha(self._enqueue.sha, 0, *argv)
            replies = await pipe.execute(raise_on_error=False)
        existing = replies[-1]
        if isinstance(existing, NoScriptError):      # a Redis that restarted: load it
            existing = await self._enqueue(args=argv)
        if not isinstance(existing, Exception):
            return existing   # (it found every string: a failed SET was of one resent)
        for reply in replies[:-1]:
            if isinstance(reply, Exception):
                raise reply   # why a string is missing (NOPACK)
        raise existing

    async def fetch(self, worker_id: str, queues: Iterable[str], limit: int,
                    lease_seconds: float) -> list[dict]:
        now = now_ms()
        rows = await self._fetch(args=[self.keys.prefix, now, now + int(lease_seconds * 1000),
                                       worker_id, limit, *queues])
        return [{
            "job_id": _s(r[0]), "attempt": int(r[1]), "func": _s(r[2]), "args": r[3],
            "kwargs": r[4], "timeout": float(r[5]) if r[5] else None,
            "max_retries": int(r[6]), "queue": _s(r[7]), "dedupe_scope": _s(r[8]) or None,
        } for r in rows]

    async def finish(self, worker_id: str, outcomes: list[dict]) -> list[str]:
        """Record outcomes: ``{job_id, attempt, ok, payload, duration_ms, retry_ms}``."""
        argv: list[Any] = [self.keys.prefix, now_ms(), worker_id, self.result_ttl,
                           self.failed_ttl, "1" if self.release_keys_on_failure else "0"]
        for o in outcomes:
            argv += [o["job_id"], o["attempt"], "ok" if o["ok"] else "err", o["payload"],
                     int(o["duration_ms"]), int(o.get("retry_ms", -1))]
        return [_s(s) for s in await self._finish(args=argv)]

    async def release(self, worker_id: str, claims: list[tuple[str, int]]) -> int:
        if not claims:
            return 0
        argv: list[Any] = [self.keys.prefix, now_ms(), worker_id]
        for job_id, attempt in claims:
            argv += [job_id, attempt]
        return int(await self._release(args=argv))

    async def heartbeat(self, worker_id: str, job_ids: list[str], lease_seconds: float) -> int:
        if not job_ids:
            return 0
        now = now_ms()
        return int(await self._heartbeat(
            args=[self.keys.prefix, now, now + int(lease_seconds * 1000), worker_id, *job_ids]))

    async def recover(self, limit: int = 1000) -> list[str]:
        return [_s(i) for i in await self._recover(args=[self.keys.prefix, now_ms(), limit])]

    async def promote(self, limit: int = 1000) -> int:
        return int(await self._promote(args=[self.keys.prefix, now_ms(), limit]))

    async def next_delayed(self) -> float | None:
        """Seconds until the next retry is due, or None if none waits."""
        first = await self.redis.zrange(self.keys.delayed, 0, 0, withscores=True)
        if not first:
            return None
        return max(0.0, first[0][1] / 1000.0 - time.time())

    async def remove(self, job_id: str) -> bool:
        return bool(await self._remove(args=[self.keys.prefix, job_id]))

    async def rerun(self, job_id: str) -> str:
        """Queue a finished job again; raises LookupError / ValueError with the reason."""
        try:
            return _s(await self._rerun(args=[self.keys.prefix, now_ms(), job_id]))
        except ResponseError as exc:
            msg = str(exc)
            if msg.startswith("NOJOB"):
                raise LookupError(f"no job {job_id!r}") from None
            if msg.startswith("LIVE"):
                raise ValueError(f"job {job_id!r} is {msg.split()[-1]}; only a finished job "
                                 "can be rerun") from None
            raise

    # --- reads -----------------------------------------------------------------------
    @staticmethod
    def job_view(job_id: str, h: dict[bytes, bytes]) -> dict:
        """The ``get_job`` map of one job hash."""
        def g(name: str) -> bytes | None:
            return h.get(name.encode())

        result = g("result")
        timeout = g("timeout")
        view = {
            "job_id": job_id,
            "func": _s(g("func")),
            "args": unpack(g("args")) or [],
            "kwargs": unpack(g("kwargs")) or {},
            "queue": _s(g("queue")),
            "priority": int(g("priority") or 0),
            "status": _s(g("status")),
            "result": unpack(result) if result else None,
            "error": _s(g("error")),
            "attempts": int(g("attempts") or 0),
            "max_retries": int(g("max_retries") or 0),
            "timeout": float(timeout) if timeout else None,
            "worker": _s(g("worker")) or None,
            "batch": _s(g("batch")) or None,
            "parent": _s(g("parent")) or None,
            "enqueued_at": _ms_to_s(g("enqueued_at")),
            "started_at": _ms_to_s(g("started_at")),
            "finished_at": _ms_to_s(g("finished_at")),
            "retry_at": _ms_to_s(g("retry_at")),
        }
        duration = g("duration_ms")
        view["duration"] = int(duration) / 1000.0 if duration else None
        for name in ("schedule", "dedupe_key", "dedupe_scope"):
            if g(name):
                view[name] = _s(g(name))
        if g("fire_time"):
            view["fire_time"] = float(g("fire_time"))
        return view

    async def _hashes(self, job_ids: list[str], *fields: str) -> list:
        """Per job: its hash (all fields, or a list of ``fields``) or, for a job waiting
        in a pack, the same made from its packed fields; {} (all None) when there is
        none. One atomic read (scripts.LOOKUP): a job taken meanwhile is not missed."""
        out = []
        for i in range(0, len(job_ids), 1000):
            rows = await self._lookup(args=[self.keys.prefix, len(fields), *fields,
                                            *job_ids[i:i + 1000]])
            for flat in rows:
                h = dict(zip(flat[::2], flat[1::2]))
                out.append([h.get(f.encode()) for f in fields] if fields else h)
        return out

    async def get_job(self, job_id: str) -> dict | None:
        h = (await self._hashes([job_id]))[0]
        return self.job_view(job_id, h) if h else None

    async def get_dedupe_holds(self, job_ids: list[str]) -> list[tuple | None]:
        """Per job: (status, dedupe_key, dedupe_scope), or None when there is no such job."""
        rows = await self._hashes(job_ids, "status", "dedupe_key", "dedupe_scope")
        return [None if row[0] is None else tuple(_s(v) for v in row) for row in rows]

    async def get_statuses(self, job_ids: list[str]) -> list[str | None]:
        return [_s(row[0]) for row in await self._hashes(job_ids, "status")]

    async def list_jobs(self, *, status: str | None = None, queue: str | None = None,
                        func: str | None = None, batch: str | None = None, offset: int = 0,
                        limit: int = 100, scan_limit: int = 100_000) -> list[dict]:
        """Newest first within each status (queued jobs: per queue, the last in line
        first); filters on queue, func and batch."""
        statuses = [status] if status else [s for s in STATUSES if s not in ("scheduled",
                                                                              "filtered")]
        out: list[dict] = []
        scanned = 0
        page = 500
        for st in statuses:
            if st == "queued":  # indexed by the queues' own sorted sets and packs
                names = [queue] if queue else sorted(
                    _s(q) for q in await self.redis.smembers(self.keys.queues))
                for q in names:
                    line = self._line(q)
                    while len(out) < limit + offset and scanned < scan_limit:
                        ids = [i async for i in _take(line, page)]
                        if not ids:
                            break
                        scanned += len(ids)
                        await self._page(st, ids, "", True, out, queue, func, batch)
                    if len(out) >= limit + offset or scanned >= scan_limit:
                        break
                if len(out) >= limit + offset:
                    break
                continue
            index, start = self.keys.status(st), 0
            while len(out) < limit + offset and scanned < scan_limit:
                ids = await self.redis.zrevrange(index, start, start + page - 1)
                if not ids:
                    break
                start += page
                scanned += len(ids)
                await self._page(st, ids, index, False, out, queue, func, batch)
            if len(out) >= limit + offset:
                break
        return out[offset:offset + limit]

    async def _line(self, q: str):
        """The job_ids queued in ``q``, the last in line first: the queue's sorted set
        and its packs merged by place in line (priority, then sequence number)."""
        async def entries(key: str):
            start = 0
            while True:
                rows = await self.redis.zrevrange(key, start, start + 499, withscores=True)
                if not rows:
                    return
                start += 500
                for member, score in rows:
                    yield score, member

        singles, packs = entries(self.keys.queue(q)), entries(self.keys.packs(q))
        a, b = await anext(singles, None), await anext(packs, None)
        while a is not None or b is not None:
            # members start with the 16 hex digits of their sequence number
            if b is None or a is not None and (a[0], a[1][:16]) > (b[0], b[1][:16]):
                yield a[1][17:]  # {seq:016x}:{job_id}
                a = await anext(singles, None)
            else:  # a pack: {seq:016x}:{pack}; its jobs not taken yet, in line order
                pack_id = _s(b[1][17:])
                size, first = await self.redis.hmget(self.keys.pack_info(pack_id), "n", "next")
                for k in reversed(range(int(first or 0), int(size or 0))):
                    yield (pack_id + _INDEX[k]).encode()
                b = await anext(packs, None)

    async def _page(self, st: str, ids: list[bytes], index: str, in_line: bool,
                    out: list[dict], queue, func, batch) -> None:
        """Append the views of one page of an index that match the filters."""
        hashes = await self._hashes([_s(raw) for raw in ids])
        gone = []
        for raw, h in zip(ids, hashes):
            job_id = _s(raw)
            if not h:
                gone.append(raw)
                continue
            if h.get(b"status") != st.encode():
                continue  # index entry lagging a transition; shown under its own
            view = self.job_view(job_id, h)
            if queue and view["queue"] != queue or func and view["func"] != func \
                    or batch and view["batch"] != batch:
                continue
            out.append(view)
        if gone and not in_line:  # expired results: their index entries go too
            await self.redis.zrem(index, *gone)

    async def stats(self) -> dict:
        k = self.keys
        queues = sorted(_s(q) for q in await self.redis.smembers(k.queues))
        batches = sorted(_s(b) for b in await self.redis.smembers(k.batches))
        async with self.redis.pipeline(transaction=False) as pipe:
            for st in STATUSES:
                pipe.zcard(k.status(st))
            for q in queues:
                pipe.zcard(k.queue(q))
            pipe.hgetall(k.packed_counts)
            pipe.hgetall(k.counters)
            for b in batches:
                pipe.hgetall(k.batch(b))
            pipe.zrange(k.workers, 0, -1, withscores=True)
            res = await pipe.execute()
        by_status = dict(zip(STATUSES, res[:len(STATUSES)]))
        res = res[len(STATUSES):]
        in_packs = {_s(q): int(c) for q, c in res[len(queues)].items()}
        waiting = {q: n + in_packs.get(q, 0) for q, n in zip(queues, res[:len(queues)])}
        by_status["queued"] = sum(waiting.values())  # queued jobs are indexed per queue
        res = res[len(queues) + 1:]
        counters = {_s(a): int(b) for a, b in res[0].items()}
        batch_rows = res[1:1 + len(batches)]
        workers_seen = res[1 + len(batches)]
        by_queue = {}
        for q in queues:
            row = {"queued": waiting[q]}
            for st in ("submitted", "succeeded", "failed", "retrying"):
                row[st] = counters.get(f"queue:{q}:{st}", 0)
            by_queue[q] = row
        workers = []
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for wid, _ in workers_seen:
                pipe.hgetall(k.worker(_s(wid)))
            infos = await pipe.execute()
        for (wid, seen), info in zip(workers_seen, infos):
            row = {_s(a): _s(b) for a, b in info.items()}
            row["worker_id"] = _s(wid)
            row["last_seen"] = seen / 1000.0
            row["alive"] = bool(info) and now - seen / 1000.0 < 60
            workers.append(row)
        return {
            "by_status": by_status,
            "by_queue": by_queue,
            "batches": {b: {_s(x): int(y) for x, y in row.items()}
                        for b, row in zip(batches, batch_rows)},
            "totals": {name: counters.get(name, 0) for name in
                       ("submitted", "succeeded", "failed", "retrying", "redelivered")},
            "workers": workers,
        }
