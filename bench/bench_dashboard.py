"""How fast the dashboard's pages answer with many jobs in Redis (target: < 1 s each with
1,000,000 jobs).

Starts its own redis-server, a master serving the dashboard and, for a while, a worker;
submits --jobs jobs through the master (most wait in two queues, across three funcs and
ten batches; --failed of them fail on the worker first), then fetches each page --repeat
times and prints the median and the slowest time per page. Last, it deletes one queue's
jobs with bulk_jobs (what `elric purge q1` does) and prints the rate and the master's peak
memory. Every process it starts is
stopped by its PID.

    python bench/bench_dashboard.py                  # 1,000,000 jobs
    python bench/bench_dashboard.py --jobs 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from elric.client import MasterClient  # noqa: E402
from elric.launch import elric_env, start_master, start_worker  # noqa: E402
from elric.redis_server import RedisServer, free_port  # noqa: E402

FUNCS = ("bench.jobs:Noop", "bench.jobs:Noop2", "bench.jobs:Noop3")
PAGES = ("/", "/workers", "/schedules", "/jobs", "/jobs?status=queued&queue=q1",
         "/jobs?status=queued&queue=q2&offset=500", "/jobs?status=failed",
         "/jobs?func=bench.jobs:Noop3&status=queued", "/jobs?batch=b7",
         "/jobs/job-{middle}", "/stats", "/redis", "/metrics")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--failed", type=int, default=5_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    logdir = tempfile.mkdtemp(prefix="elric-bench-dashboard-")
    server = RedisServer().start()
    procs, failed = [], True
    try:
        address, dashboard = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        env = elric_env(server.url, address, KEY_PREFIX="elric-bench", LOG_LEVEL="WARNING",
                        JOB_MODULES="bench.jobs,tests.jobs", DASHBOARD_ADDRESS=dashboard)
        procs.append(start_master(env, os.path.join(logdir, "master.log"), cwd=ROOT))
        client = MasterClient(address, timeout=120)
        # failures first, on a worker of their own queue, so the failed index has entries
        worker = start_worker(env, os.path.join(logdir, "worker.log"), cwd=ROOT,
                              extra=["--queues", "fail", "--concurrency", "2"])
        procs.append(worker)
        for start in range(0, args.failed, 5000):
            client.submit_jobs([{"func": "tests.jobs:Fail", "queue": "fail",
                                 "job_id": f"fail-{i}"}
                                for i in range(start, min(args.failed, start + 5000))])
        t0 = time.monotonic()
        for start in range(0, args.jobs, 10_000):
            client.submit_jobs([{"func": FUNCS[i % 3], "args": [i], "queue": f"q{i % 2 + 1}",
                                 "batch": f"b{i % 10}", "job_id": f"job-{i}"}
                                for i in range(start, min(args.jobs, start + 10_000))])
        print(f"submitted {args.jobs:,} jobs in {time.monotonic() - t0:.1f} s")
        while client.stats()["by_status"]["failed"] < args.failed:
            time.sleep(0.5)
        procs.remove(worker)
        worker.stop()
        stats = client.stats()
        print(f"in Redis: {stats['by_status']}")
        print(f"{'page':<48} {'median ms':>10} {'slowest ms':>11}")
        worst = 0.0
        for page in (p.format(middle=args.jobs // 2) for p in PAGES):
            times = []
            for _ in range(args.repeat):
                t = time.perf_counter()
                with urllib.request.urlopen(f"http://{dashboard}{page}", timeout=60) as r:
                    r.read()
                times.append((time.perf_counter() - t) * 1000)
            worst = max(worst, max(times))
            print(f"{page:<48} {statistics.median(times):>10.1f} {max(times):>11.1f}")
        print(f"slowest page: {worst:.0f} ms (target < 1000 ms)")
        # a bulk operation over half of them: step by step, the master's memory bounded
        t, cursor, touched, steps = time.perf_counter(), "", 0, 0
        while True:
            step = client.bulk_jobs("delete", {"status": "queued", "queue": "q1"}, cursor)
            touched, cursor, steps = touched + step["touched"], step["cursor"], steps + 1
            if not cursor:
                break
        took = time.perf_counter() - t
        with open(f"/proc/{procs[0].pid}/status") as f:
            peak = next(line.split()[1] for line in f if line.startswith("VmHWM"))
        print(f"bulk delete of queue q1: {touched:,} jobs in {took:.1f} s ({touched / took:,.0f}"
              f" jobs/s, {steps} steps); the master's peak RSS {int(peak) / 1024:.0f} MiB")
        client.close()
        failed = False
        return 0
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.cleanup()
        if failed:   # the logs are kept, and named, only then
            print(f"logs: {logdir}")
        else:
            shutil.rmtree(logdir)


if __name__ == "__main__":
    sys.exit(main())
