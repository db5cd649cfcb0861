"""What queueing a job costs Redis: RedisQueue.enqueue alone, no master, no RPC, no filter.

Queues --n keyed jobs (the crawler's shape: func, dedupe_key, dedupe_scope) in batches of
--batch through ``RedisQueue.enqueue`` into a redis-server of its own (a free port, never
the one on 6379), and prints per job: Redis CPU, this process's CPU, and Redis memory.
Job ids are the master's own (``may_exist=set()``, as submit_jobs passes them: the
batch is queued as a pack), unless --chosen-ids makes every id one a caller chose (looked
up before it is written, then a job hash and a queue member each).

    python bench/bench_enqueue.py --n 500000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis  # noqa: E402
import redis.asyncio as aredis  # noqa: E402

from bench.bench_dedupe import FUNC, PREFIX, SCOPE, make_keys  # noqa: E402
from bench.bench_dedupe_inproc import redis_cpu  # noqa: E402
from elric.contract import normalize_specs  # noqa: E402
from elric.keys import Keys  # noqa: E402
from elric.queue import RedisQueue  # noqa: E402
from elric.redis_server import RedisServer  # noqa: E402


async def run(server: RedisServer, args) -> None:
    keys = make_keys(args.n)
    batches = []
    for i in range(0, args.n, args.batch):
        specs = [{"func": FUNC, "dedupe_key": k, "dedupe_scope": SCOPE}
                 for k in keys[i:i + args.batch]]
        if args.chosen_ids:
            for j, spec in enumerate(specs):
                spec["job_id"] = f"job-{i + j}"
        batches.append(normalize_specs(specs))
    r = redis.Redis.from_url(server.url)
    ar = aredis.Redis.from_url(server.url)
    queue = RedisQueue(ar, Keys(PREFIX))
    try:
        mem0, cpu0 = r.info("memory")["used_memory"], redis_cpu(r)
        t0, p0 = time.perf_counter(), time.process_time()
        for specs in batches:
            may_exist = {s["job_id"] for s in specs} if args.chosen_ids else set()
            await queue.enqueue(specs, may_exist=may_exist)
        wall, py = time.perf_counter() - t0, time.process_time() - p0
        cpu, mem = redis_cpu(r) - cpu0, r.info("memory")["used_memory"] - mem0
        queued = (await queue.stats())["by_queue"]["default"]["queued"]
        print(f"  {queued:,} jobs queued: {args.n / wall:,.0f} jobs/s;  per job: Redis CPU "
              f"{1e6 * cpu / args.n:.2f} us, this process {1e6 * py / args.n:.2f} us, "
              f"Redis memory {mem / args.n:,.0f} B")
    finally:
        await ar.aclose()
        r.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--chosen-ids", action="store_true",
                    help="every job_id chosen by the caller (looked up before writing)")
    args = ap.parse_args()
    with RedisServer() as server:
        print(f"enqueue, n={args.n:,}, batch={args.batch}"
              f"{', caller-chosen ids' if args.chosen_ids else ''} "
              f"(redis-server pid {server.proc.pid})")
        asyncio.run(run(server, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
