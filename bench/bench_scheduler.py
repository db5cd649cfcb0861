"""Scheduler benchmark: how late are fires when 100,000 periodic jobs fire 1,000 times a second?

Starts its own redis-server (elric.redis_server.RedisServer, never the one on 6379) and one
real master process (LOG_LEVEL=WARNING), then:

  1. stores --jobs periodic jobs (bench.jobs:Noop) through the master's submit_jobs RPC in
     batches of 10,000 (the real path: validation, trigger parsing, the job store script;
     ~2,500-3,000 jobs/s on 2 cores, so 100,000 take ~40 s);
  2. each has an interval trigger of --jobs / --rate seconds (100 s by default) and the
     start times are spread evenly 1/--rate s apart from a common T0 after the storing, so
     the schedule asks for --rate fires/s, evenly, for --seconds;
  3. after T0 + --seconds it waits until the master has handled every fire due in the
     window, then reads each fired job's hash: lateness = enqueued_at (set by the enqueue
     script, ms) - fire_time. It prints fires/s, lateness p50/p99/max, fires missing from
     the expected set, and the master's and Redis's CPU time per fire.

No worker is needed (fires stay queued). With fewer jobs than --rate x --seconds a job fires
more than once in the window; then max_instances is raised so no fire is skipped, or pass
--worker to run one worker (--concurrency 1) that runs the no-op fires, so max_instances=1
and every job has at most one live fire, exactly as with 100,000 jobs. Compare
``--jobs 1000 --worker`` with ``--jobs 100000 --worker``: same fire rate, 100x the stored
jobs. Target (issue): p99 < 50 ms at 1,000 fires/s with 100,000 stored jobs.

    python bench/bench_scheduler.py                       # 100,000 jobs, 60 s
    python bench/bench_scheduler.py --jobs 1000 --worker --seconds 30

Every process it starts is stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import redis  # noqa: E402

from bench.bench_throughput import _descendants, cpu_snapshot, percentile  # noqa: E402
from bench.cluster import Cluster, Timeout, header, stop_on_sigterm  # noqa: E402
from elric.client import MasterClient  # noqa: E402
from elric.keys import Keys  # noqa: E402

FUNC = "bench.jobs:Noop"
PREFIX = "elric-bench"
BATCH = 10_000  # the master's submit_jobs limit


def store_jobs(client: MasterClient, n: int, interval: float, t0: float, rate: float,
               max_instances: int) -> float:
    """Submit n periodic jobs in batches; returns the store rate (jobs/s)."""
    began = time.time()
    for first in range(0, n, BATCH):
        specs = [{"func": FUNC, "job_id": f"p{i}", "max_instances": max_instances,
                  "trigger": {"type": "interval", "seconds": interval,
                              "start_date": t0 + i / rate}}
                 for i in range(first, min(n, first + BATCH))]
        replies = client.submit_jobs(specs)
        if any(r["status"] != "scheduled" for r in replies):
            raise RuntimeError(f"submit_jobs answered {replies[:3]}...")
        if time.time() > t0 - 1:
            raise RuntimeError(f"storing is slower than --lead allows ({first + len(specs)} of "
                               f"{n} stored when fires begin); pass a larger --lead")
    return n / (time.time() - began)


def expected_fires(n: int, interval: float, t0: float, rate: float, end: float) -> int:
    total = 0
    for i in range(n):
        start = t0 + i / rate
        if start < end:
            total += math.ceil((end - start) / interval)
    return total


def read_fires(r: redis.Redis, keys: Keys, t0: float, end: float) -> list[tuple[float, float]]:
    """(fire_time, lateness s) of every fire with fire_time in [t0, end)."""
    late = []
    names = list(r.scan_iter(match=keys.job("p*@*"), count=5000))
    for first in range(0, len(names), 5000):
        pipe = r.pipeline(transaction=False)
        for name in names[first:first + 5000]:
            pipe.hmget(name, "fire_time", "enqueued_at")
        for fire_time, enqueued_at in pipe.execute():
            if fire_time is None or enqueued_at is None:
                continue
            ft = float(fire_time)
            if t0 <= ft < end:
                late.append((ft, int(enqueued_at) / 1000.0 - ft))
    return late


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=100_000, help="periodic jobs stored")
    ap.add_argument("--seconds", type=float, default=60.0, help="measured window (s)")
    ap.add_argument("--rate", type=float, default=1000.0,
                    help="fires per second the schedule asks for (interval = jobs / rate)")
    ap.add_argument("--lead", type=float, default=None,
                    help="seconds from the start of storing to the first fire "
                         "(default 10 + jobs / 2000)")
    ap.add_argument("--worker", action="store_true",
                    help="run one worker so fires finish (max_instances=1 never skips)")
    ap.add_argument("--timeout", type=float, default=120.0, help="bound on the final wait (s)")
    ap.add_argument("--worst", type=int, default=0,
                    help="also print when the N latest fires were due")
    ap.add_argument("--keep-logs", action="store_true", help="print the log folder, keep it")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.seconds <= 0 or args.rate <= 0:
        ap.error("--jobs, --seconds and --rate must be positive")

    interval = args.jobs / args.rate
    per_job = math.ceil(args.seconds / interval)
    max_instances = 1 if args.worker else per_job + 1
    lead = args.lead if args.lead is not None else 10 + args.jobs / 2000

    stop_on_sigterm()
    cluster = Cluster("elric-bench-sched-", LOG_LEVEL="WARNING", KEY_PREFIX=PREFIX,
                      CONCURRENCY=1, JOB_MODULES="bench.jobs")
    r = cluster.redis
    keys = Keys(PREFIX)
    try:
        header("elric scheduler benchmark", r)
        print(f"{args.jobs:,} periodic jobs, interval {interval:g}s, starts 1/{args.rate:g}s "
              f"apart -> {args.rate:,.0f} fires/s asked for {args.seconds:g}s; "
              f"max_instances {max_instances}; worker: {'yes' if args.worker else 'no'}")
        master = cluster.start_master()
        worker = cluster.start_worker() if args.worker else None
        client = cluster.connect(timeout=300)

        t0 = time.time() + lead
        end = t0 + args.seconds
        store_rate = store_jobs(client, args.jobs, interval, t0, args.rate, max_instances)
        stored = r.zcard(keys.schedules)
        print(f"1. stored {stored:,} jobs via submit_jobs RPC (batches of {BATCH:,}): "
              f"{store_rate:,.0f} jobs/s; Redis memory {r.info('memory')['used_memory_human']}")
        if stored != args.jobs:
            raise RuntimeError(f"{stored} jobs in the store, expected {args.jobs}")

        cluster.wait_until(lambda: time.time() >= t0, lead + 5, "T0")
        groups = {"master": [master.pid], "redis": [cluster.server.proc.pid]}
        if worker:
            groups["worker"] = [worker.pid, *_descendants(worker.pid)]
        cpu0 = cpu_snapshot(groups)
        cluster.wait_until(lambda: time.time() >= end, args.seconds + 5,
                           "the end of the window", interval=0.1)
        cpu1 = cpu_snapshot(groups)

        def window_done():  # every fire due before `end` handled: the index head is later
            head = r.zrange(keys.schedules, 0, 0, withscores=True)
            return not head or head[0][1] >= end * 1000
        cluster.wait_until(window_done, args.timeout,
                           "the master to handle the window's fires", interval=0.05)
        drained_at = time.time()

        late = read_fires(r, keys, t0, end)
        want = expected_fires(args.jobs, interval, t0, args.rate, end)
        if not late:
            raise RuntimeError("no fires were recorded")
        ms = [x * 1000 for _, x in late]
        print(f"2. fires in the window: {len(late):,} of {want:,} expected "
              f"({want - len(late):,} missing) = {len(late) / args.seconds:,.0f} fires/s; "
              f"window's last fire handled {max(0.0, drained_at - end):.2f}s after its end")
        print(f"   lateness enqueued_at - fire_time (ms, 1 ms steps): p50 {percentile(ms, 50):.1f}"
              f"  p90 {percentile(ms, 90):.1f}  p99 {percentile(ms, 99):.1f}"
              f"  p99.9 {percentile(ms, 99.9):.1f}  max {max(ms):.1f}")
        worst = sorted(late, key=lambda f: -f[1])[:args.worst]
        if worst:
            print("   latest fires (s after T0: ms late): " + ", ".join(
                f"+{ft - t0:.2f}: {x * 1000:.0f}" for ft, x in sorted(worst)))
        used = {k: (cpu1[k] - cpu0[k]) * 1e6 / len(late) for k in groups}
        print("   CPU us/fire: " + ", ".join(f"{k} {v:.0f}" for k, v in used.items()))
        ok = percentile(ms, 99) < 50 and len(late) == want
        print(f"target: p99 < 50 ms and no fire missing -> {'met' if ok else 'NOT met'}")
        return 0 if ok else 2
    except (Timeout, RuntimeError, KeyboardInterrupt) as exc:
        return cluster.failed(exc)
    finally:
        cluster.close(args.keep_logs)

if __name__ == "__main__":
    sys.exit(main())
