"""Micro-benchmark of the dedupe filters (elric.dedupe), filter level only.

Starts its own redis-server (elric.redis_server.RedisServer, never the one on 6379),
pushes N distinct URL-like keys in batches through each backend, then the same keys
again, and prints for each backend:

  pass 1 / pass 2 checks/s   one client, calls awaited one after the other
  memory, bytes/item         Redis MEMORY USAGE of the filter's keys (set, redis-bloom);
                             bit-array bytes and RSS growth of this process (bloom)
  FP rate                    keys called "seen" on pass 1 (all were distinct) / N: the
                             average over the fill-up, so well below the configured rate
  FP@cap                     then, with the filter at capacity, --probes fresh keys: the
                             share called "seen" (this is what error_rate bounds)
  FN                         keys called "new" on pass 2 (must be 0)

Targets (issue): redis-bloom <= 2 bytes/item at 0.1%; FP within 1.2x of error_rate.

    python bench/bench_dedupe_filters.py --n 200000
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis.asyncio as aredis  # noqa: E402

from elric.config import FILTER_BACKENDS  # noqa: E402
from elric.dedupe import make_filter  # noqa: E402
from elric.keys import Keys  # noqa: E402
from elric.redis_server import RedisServer  # noqa: E402

SCOPE = "bench"


def make_keys(n: int) -> list[str]:
    # Distinct, crawler-like: ~55-65 bytes each.
    return [f"https://www.example{i % 1009}.com/articles/{i}/page.html?ref={i * 2654435761 % 1000003}"
            for i in range(n)]


def rss() -> int:
    try:
        import psutil
        return psutil.Process().memory_info().rss
    except ImportError:  # pragma: no cover
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


async def redis_bytes(r, keys: Keys, backend: str) -> int:
    names = [keys.dedupe_stats(SCOPE)]
    if backend == "set":
        names.append(keys.dedupe_set(SCOPE))
    else:
        async for k in r.scan_iter(match=keys.dedupe_rbloom(SCOPE, 0)[:-1] + "*", count=1000):
            names.append(k)
    total = 0
    for name in names:
        total += int(await r.memory_usage(name, samples=0) or 0)  # SAMPLES 0: exact
    return total


async def bench(backend: str, url: str, data: list[str], args) -> dict:
    r = aredis.Redis.from_url(url)
    await r.flushdb()
    keys = Keys("bench")
    f = make_filter(backend, r, keys, capacity=args.capacity or len(data),
                    error_rate=args.error_rate, snapshot_interval=0)
    await f.start()
    batches = [data[i:i + args.batch] for i in range(0, len(data), args.batch)]
    rss0 = rss()
    out = {"backend": backend}
    for p in (1, 2):
        t = time.perf_counter()
        new = 0
        for b in batches:
            new += sum(await f.check_and_add(SCOPE, b))
        el = time.perf_counter() - t
        out[f"rate{p}"] = len(data) / el
        out[f"new{p}"] = new
    st = (await f.stats())[SCOPE]
    if backend == "bloom":
        out["mem"] = st["bytes"]
        out["rss"] = rss() - rss0
        t = time.perf_counter()
        await f.close()
        out["snapshot_s"] = time.perf_counter() - t
        out["snapshot_bytes"] = await r.strlen(keys.dedupe_bloom(SCOPE))
    else:
        out["mem"] = await redis_bytes(r, keys, backend)
        await f.close()
    out["stats"] = st
    if backend != "set":
        # The probes push the filter past capacity: that warning is expected here.
        quiet = logging.getLogger("bench.quiet")
        quiet.setLevel(logging.ERROR)
        f = make_filter(backend, r, keys, capacity=args.capacity or len(data),
                        error_rate=args.error_rate, snapshot_interval=0, log=quiet)
        await f.start()   # (bloom: reloads the snapshot just written)
        fresh = [k + "#fresh" for k in data[:args.probes]]
        seen = 0
        for i in range(0, len(fresh), args.batch):
            seen += (await f.check_and_add(SCOPE, fresh[i:i + args.batch])).count(False)
        out["fp_cap"] = seen / len(fresh)
        await f.drop_scope(SCOPE)
    await r.aclose()
    return out


async def main(args) -> None:
    data = make_keys(args.n)
    print(f"n={args.n} batch={args.batch} capacity={args.capacity or args.n} "
          f"error_rate={args.error_rate} (redis-server started by this script)")
    with RedisServer() as server:
        results = [await bench(b, server.url, data, args) for b in args.backends.split(",")]
    n = args.n
    print(f"{'backend':<12} {'pass1/s':>9} {'pass2/s':>9} {'memory':>11} {'B/item':>7} "
          f"{'FP rate':>9} {'FP@cap':>9} {'/target':>8} {'FN':>3}")
    for res in results:
        fp = (n - res["new1"]) / n
        cap = res.get("fp_cap")
        fpc = "-" if cap is None else f"{cap:.5f}"
        ratio = "-" if cap is None else f"{cap / args.error_rate:.2f}x"
        print(f"{res['backend']:<12} {res['rate1']:>9,.0f} {res['rate2']:>9,.0f} "
              f"{res['mem']:>11,} {res['mem'] / n:>7.2f} {fp:>9.5f} {fpc:>9} {ratio:>8} {res['new2']:>3}")
    for res in results:
        st = res["stats"]
        extra = ""
        if "fill_ratio" in st:
            extra = (f" fill_ratio={st['fill_ratio']:.3f} expected_fp={st['expected_fp_rate']:.5f}"
                     f" stages={st['stages']}")
        if res["backend"] == "bloom":
            extra += (f" rss_growth={res['rss']:,} snapshot={res['snapshot_bytes']:,}B "
                      f"in {res['snapshot_s'] * 1000:.0f} ms")
        print(f"  {res['backend']}: items={st['items']} filtered={st['filtered']}{extra}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="distinct keys (default 1,000,000)")
    ap.add_argument("--batch", type=int, default=1000, help="keys per check_and_add call")
    ap.add_argument("--capacity", type=int, default=0, help="Bloom capacity (default: n)")
    ap.add_argument("--error-rate", type=float, default=0.001)
    ap.add_argument("--probes", type=int, default=100_000,
                    help="fresh keys probed at capacity for FP@cap (default 100,000)")
    ap.add_argument("--backends", default=",".join(FILTER_BACKENDS))
    asyncio.run(main(ap.parse_args()))
