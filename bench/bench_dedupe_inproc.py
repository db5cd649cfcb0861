"""Where the dedupe time goes: Master.submit_jobs called in this process, no RPC.

The same keys and batches as bench_dedupe.py, but the master runs inside this script
(its own redis-server on a free port, never the one on 6379) and --callers coroutines
call ``Master.submit_jobs`` directly: no MessagePack-RPC and no client process share the
machine's cores with the master and Redis. The gap to bench_dedupe.py is what the RPC
layer and the client cost. Queued jobs are deleted between passes (not timed).

    python bench/bench_dedupe_inproc.py --n 1000000 --backend redis-bloom
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402

from bench.bench_dedupe import FUNC, PREFIX, SCOPE, delete_queued, make_keys  # noqa: E402
from elric.config import load_settings  # noqa: E402
from elric.master import Master  # noqa: E402
from elric.redis_server import RedisServer, free_port  # noqa: E402


def redis_cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return info["used_cpu_user"] + info["used_cpu_sys"]


async def run(server: RedisServer, args) -> None:
    keys = make_keys(args.n)
    settings = load_settings(env={}, overrides=dict(
        REDIS_URL=server.url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}", KEY_PREFIX=PREFIX,
        FILTER_BACKEND=args.backend, BLOOM_CAPACITY=args.n, BLOOM_ERROR_RATE=args.error_rate,
        BLOOM_SNAPSHOT_INTERVAL=0))
    master = Master(settings)
    await master.start()
    gc.freeze()                       # as Master.run does
    gc.set_threshold(70_000, 20, 50)
    r = redis.Redis.from_url(server.url)
    try:
        for label in ["pass 1 (new, queued)"] + ["pass 2 (seen)"] * args.repeat:
            batches = [[{"func": FUNC, "dedupe_key": k, "dedupe_scope": SCOPE}
                        for k in keys[i:i + args.batch]]
                       for i in range(0, len(keys), args.batch)][::-1]

            async def caller():
                while batches:
                    await master.submit_jobs(batches.pop())

            c0, r0, t0 = time.process_time(), redis_cpu(r), time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(args.callers)))
            wall = time.perf_counter() - t0
            print(f"  {label:22s} {args.n / wall:>10,.0f} checks/s   CPU µs/key: master "
                  f"{1e6 * (time.process_time() - c0) / args.n:.1f}, redis "
                  f"{1e6 * (redis_cpu(r) - r0) / args.n:.1f}", flush=True)
            delete_queued(r)
    finally:
        await master.close()
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--backend", default="redis-bloom")
    ap.add_argument("--error-rate", type=float, default=0.001)
    ap.add_argument("--callers", type=int, default=4, help="concurrent submit_jobs calls")
    ap.add_argument("--repeat", type=int, default=3, help="times pass 2 is run")
    args = ap.parse_args()
    server = RedisServer().start()
    print(f"{args.backend}, in-process master, n={args.n:,}, batch={args.batch}, "
          f"callers={args.callers} (redis-server pid {server.proc.pid})")
    try:
        asyncio.run(run(server, args))
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
