"""Throughput and latency of a whole elric deployment: redis-server, master, worker.

Starts its own redis-server (elric.redis_server.RedisServer, never the one on 6379), a
master and a worker (real processes, LOG_LEVEL=WARNING) with --concurrency pool processes,
and prints:

  1. submit rate        --jobs no-op jobs through submit_jobs in batches of --batch,
                        no worker running yet (client send -> master -> Redis -> reply)
     drain rate         (extra) the worker then starts and drains those pre-queued jobs:
                        worker throughput alone, first to last success
  2. end to end         --jobs no-op jobs submitted in batches while the worker runs:
                        jobs/s from the first submit to the last success (the last success
                        is the newest score in the succeeded index; completion is detected
                        by polling the succeeded counter that stats() totals report, read
                        straight from its Redis hash because stats() SCANs the keyspace)
  3. latency            --latency-samples jobs submitted one at a time with submit_job to an
                        idle worker; the job returns time.time() at its start and latency is
                        that minus the client's time.time() just before the submit; each
                        job is waited for (get_job) before the next, then --gap of idle
                        time

--round makes every job of phases 1 and 2 a child of a queued periodic fire (round and
parent that fire's id), as a scheduled crawl's pages send theirs: the master checks each
such call's round before it queues the jobs. With --batch 15 --clients 4, ~15 links a page
and a few workers sending at once.

Phase 2 also prints the CPU time per job of each process (redis-server, master, worker,
its pool processes, this client) from /proc: unlike the rates it hardly moves when other
work shares the machine, and its total bounds the rate the cores allow. --redis-stats adds
Redis time per script for phase 2 (SLOWLOG with a 0 us threshold, so a little slower).

Targets (issue): >= 10,000 jobs/s end to end and p50 < 1 ms on a 2-core machine.
Every process it starts is stopped by its PID; every wait is bounded by --timeout.

    python bench/bench_throughput.py                 # 20,000 jobs, 200 latency samples
    python bench/bench_throughput.py --jobs 5000
    python bench/bench_throughput.py --round --batch 15 --clients 4 --latency-samples 1
"""

from __future__ import annotations

import argparse
import glob
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import redis  # noqa: E402

from bench.cluster import Cluster, Timeout, header, stop_on_sigterm  # noqa: E402
from elric.client import SPLIT_BATCH, MasterClient  # noqa: E402
from elric.contract import MAX_BATCH  # noqa: E402
from elric.jobstore import fire_id  # noqa: E402
from elric.keys import Keys  # noqa: E402

FUNC = "bench.jobs:Noop"
PREFIX = "elric-bench"


def succeeded(r: redis.Redis, keys: Keys) -> int:
    """``stats()["totals"]["succeeded"]``, read from the counter hash it comes from: stats()
    itself SCANs the whole keyspace (dedupe filter stats), ~50 ms at 60k keys, which
    would load the machine being measured."""
    ok, failed = r.hmget(keys.counters, "succeeded", "failed")
    if failed and int(failed):
        raise RuntimeError(f"{int(failed)} job(s) failed: see the worker log")
    return int(ok or 0)


def last_success(r: redis.Redis, keys: Keys) -> float:
    """Finish time (s) of the newest success: the top score of the succeeded index."""
    top = r.zrange(keys.status("succeeded"), -1, -1, withscores=True)
    return top[0][1] / 1000.0 if top else time.time()


def submit_batches(address: str, n: int, batch: int, clients: int = 1,
                   spec: dict | None = None) -> tuple[float, float]:
    """Submit ``n`` no-op jobs in batches from ``clients`` connections at once, each with
    one call in flight (as many workers sending children do); returns (start, end)."""
    spec = spec or {"func": FUNC, "args": [], "kwargs": {}}
    sizes = [min(batch, n - i) for i in range(0, n, batch)]

    def send(todo: list[int]) -> None:
        with MasterClient(address, timeout=60) as client:
            while todo:
                size = todo.pop()
                replies = client.submit_jobs([spec] * size)
                if len(replies) != size or any(r["status"] != "queued" for r in replies):
                    raise RuntimeError(f"submit_jobs answered {replies[:3]}...")

    t0 = time.time()
    with ThreadPoolExecutor(clients) as pool:
        for done in [pool.submit(send, sizes) for _ in range(clients)]:
            done.result()
    return t0, time.time()


def wait_succeeded(cluster: Cluster, r: redis.Redis, keys: Keys, target: int,
                   timeout: float) -> None:
    cluster.wait_until(lambda: succeeded(r, keys) >= target, timeout, f"{target} successes")


def _cpu(pid: int) -> float:
    """CPU seconds (user + system) a process has used; 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_snapshot(groups: dict[str, list[int]]) -> dict[str, float]:
    return {name: sum(_cpu(p) for p in pids) for name, pids in groups.items()}


def print_cpu(before: dict[str, float], after: dict[str, float], jobs: int) -> None:
    """CPU per job of each process in phase 2: on 2 cores, what caps the rate."""
    used = {k: (after[k] - before[k]) * 1000 / jobs * 1000 for k in before}  # us per job
    total = sum(used.values())
    cores = os.cpu_count() or 1
    print("   CPU us/job: " + ", ".join(f"{k} {v:.0f}" for k, v in used.items())
          + f"; total {total:.0f} -> {cores} cores cap {cores * 1e6 / max(total, 1):,.0f} jobs/s")


def print_redis_stats(r: redis.Redis, jobs: int, seconds: float) -> None:
    """Redis time in phase 2: per top-level command, and EVALSHA split by script (SLOWLOG
    with a 0 us threshold logs every top-level call with its duration)."""
    import hashlib
    import re

    from elric import lua

    # a script's sha1 is of its text with the shared functions put before it, as the
    # lua.load(redis, name, *functions) calls in elric/ register it
    names = {}
    for path in glob.glob(os.path.join(ROOT, "elric", "**", "*.py"), recursive=True):
        with open(path) as f:
            for name, functions in re.findall(r'lua\.load\(\w+, "(\w+)"((?:, "\w+")*)\)',
                                              f.read()):
                text = "".join(lua.source(x) for x in (*re.findall(r'"(\w+)"', functions),
                                                       name))
                names[hashlib.sha1(text.encode()).hexdigest()] = name
    inner = {"get", "hget", "hset", "hmget", "incr", "zadd", "zrem", "lpush", "ltrim",
             "hincrby", "sadd", "exists", "expire", "zrangebyscore", "zremrangebyscore",
             "zrange", "del", "persist", "hdel", "zrevrange"}  # also called from scripts
    per: dict[str, list[int]] = {}
    for entry in r.slowlog_get(1_000_000):
        cmd = entry["command"].split()
        name = cmd[0].decode().lower() if cmd else "?"
        if name == "evalsha" and len(cmd) > 1:
            name = names.get(cmd[1].decode(), "script?")
        elif name in inner:
            continue
        row = per.setdefault(name, [0, 0])
        row[0] += entry["duration"]
        row[1] += 1
    total = sum(u for u, _ in per.values())
    print(f"   Redis: {total / 1e6:.2f}s in commands over {seconds:.2f}s of phase 2 "
          f"({total / jobs:.1f} us/job); top-level calls by time:")
    for name, (usec, calls) in sorted(per.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"     {name:<10} {calls:>6} calls {usec / max(calls, 1):>8.1f} us/call "
              f"{usec / jobs:>6.1f} us/job")


def percentile(values: list[float], p: float) -> float:
    s = sorted(values)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=20_000, help="jobs for phases 1 and 2")
    ap.add_argument("--batch", type=int, default=1000, help="specs per submit_jobs call")
    ap.add_argument("--clients", type=int, default=1,
                    help="connections submitting at once in phase 1")
    ap.add_argument("--round", action="store_true",
                    help="phases 1 and 2 submit a queued periodic fire's children")
    ap.add_argument("--latency-samples", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    ap.add_argument("--gap", type=float, default=0.02,
                    help="idle seconds between latency samples")
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on every wait (s)")
    ap.add_argument("--redis-stats", action="store_true",
                    help="print Redis time per command and per script for phase 2")
    ap.add_argument("--keep-logs", action="store_true", help="print the log folder, keep it")
    ap.add_argument("--log-level", default="WARNING",
                    help="LOG_LEVEL of master and worker (INFO: a line per job, the default's cost)")
    args = ap.parse_args(argv)
    if args.jobs < 1 or args.batch < 1 or args.latency_samples < 1 or args.concurrency < 1:
        ap.error("--jobs, --batch, --latency-samples and --concurrency must be >= 1")

    stop_on_sigterm()
    cluster = Cluster("elric-bench-", LOG_LEVEL=args.log_level, KEY_PREFIX=PREFIX,
                      CONCURRENCY=args.concurrency, JOB_MODULES="bench.jobs")
    r = cluster.redis
    address, keys = cluster.address, Keys(PREFIX)
    try:
        header("elric throughput benchmark", r)
        print(f"worker: {args.concurrency} processes; jobs: {FUNC} (returns time.time())")
        master = cluster.start_master()
        client = cluster.connect()

        # 1. submission rate, no worker yet (after one call that loads the job class and
        # the scripts, as any master that has served a call has)
        client.submit_jobs([{"func": FUNC}])
        spec = {"func": FUNC, "args": [], "kwargs": {}}
        if args.round:   # a fire, queued: its id is the round its children carry
            at = float(int(time.time()) + 2)
            client.submit_job({**spec, "job_id": "bench-round",
                               "trigger": {"type": "date", "run_date": at}})
            fid = fire_id("bench-round", at)
            cluster.wait_until(lambda: client.get_job(fid), args.timeout, "the fire queued")
            spec.update(round=fid, parent=fid)
        t0, t1 = submit_batches(address, args.jobs, args.batch, args.clients, spec)
        kind = ", a fire's children" if args.round else ""
        print(f"1. submit_jobs      {args.jobs:>7} jobs in batches of {args.batch}, "
              f"{args.clients} client(s){kind}: "
              f"{args.jobs / (t1 - t0):>9,.0f} jobs/s  ({t1 - t0:.2f}s, no worker)")

        # the same jobs in one call: the client splits the list, two batches in flight
        with MasterClient(address, timeout=60) as one:
            t0 = time.time()
            replies = one.submit_jobs([spec] * args.jobs)
            t1 = time.time()
        if len(replies) != args.jobs or any(x["status"] != "queued" for x in replies):
            raise RuntimeError(f"submit_jobs answered {replies[:3]}...")
        how = (f"split by the client into batches of {SPLIT_BATCH}, two in flight"
               if args.jobs > MAX_BATCH else "one batch")
        print(f"   one call         {args.jobs:>7} jobs, {how}: {args.jobs / (t1 - t0):>9,.0f} "
              f"jobs/s  ({t1 - t0:.2f}s, no worker)")

        # worker starts; it drains what phase 1 queued (worker throughput alone)
        worker = cluster.start_worker()
        wait_succeeded(cluster, r, keys, 2 * args.jobs + args.round, args.timeout)
        first = r.zrange(keys.status("succeeded"), 0, 0, withscores=True)[0][1] / 1000.0
        last = last_success(r, keys)
        if last > first:
            print(f"   drain (extra)    {2 * args.jobs:>7} pre-queued jobs, worker only:    "
                  f"{(2 * args.jobs - 1) / (last - first):>9,.0f} jobs/s  "
                  f"(first to last success, {last - first:.2f}s)")
        cluster.wait_until(lambda: any(w.get("pid") == worker.pid
                                       and w.get("state") == "running"
                                       for w in client.stats()["workers"]),
                           args.timeout, "the worker registered")
        time.sleep(0.2)

        # 2. end to end, worker running
        if args.redis_stats:
            r.config_set("slowlog-max-len", 1_000_000)
            r.config_set("slowlog-log-slower-than", 0)
            r.slowlog_reset()
        groups = {"redis": [cluster.server.proc.pid], "master": [master.pid],
                  "worker": [worker.pid], "pool": _descendants(worker.pid),
                  "client": [os.getpid()]}
        base = succeeded(r, keys)
        cpu0 = cpu_snapshot(groups)
        t0, t1 = submit_batches(address, args.jobs, args.batch, spec=spec)
        wait_succeeded(cluster, r, keys, base + args.jobs, args.timeout)
        end = last_success(r, keys)
        cpu1 = cpu_snapshot(groups)
        print(f"2. end to end       {args.jobs:>7} jobs, first submit to last success: "
              f"{args.jobs / (end - t0):>9,.0f} jobs/s  ({end - t0:.2f}s; submitting took "
              f"{t1 - t0:.2f}s = {args.jobs / (t1 - t0):,.0f} jobs/s)")

        print_cpu(cpu0, cpu1, args.jobs)
        if args.redis_stats:
            r.config_set("slowlog-log-slower-than", -1)
            print_redis_stats(r, args.jobs, end - t0)

        # 3. enqueue -> start latency on an idle worker
        time.sleep(0.5)
        spec = {"func": FUNC, "args": [], "kwargs": {}}
        lat = []
        for i in range(args.latency_samples):
            before = time.time()
            job_id = client.submit_job(spec)["job_id"]
            time.sleep(0.003)  # let it run before polling: polls compete for the 2 CPUs
            job = cluster.wait_until(
                lambda: (lambda j: j if j and j["status"] in ("succeeded", "failed")
                         else None)(client.get_job(job_id)),
                args.timeout, f"latency job {i}", interval=0.001)
            if job["status"] != "succeeded":
                raise RuntimeError(f"latency job {job_id} {job['status']}: {job['error']}")
            lat.append((job["result"] - before) * 1000)
            time.sleep(args.gap)
        print(f"3. latency          {len(lat):>7} jobs, submit_job -> job starts (ms): "
              f"p50 {percentile(lat, 50):.2f}  p90 {percentile(lat, 90):.2f}  "
              f"p99 {percentile(lat, 99):.2f}  min {min(lat):.2f}  max {max(lat):.2f}  "
              f"mean {statistics.fmean(lat):.2f}")
        totals = client.stats()["totals"]
        print(f"   stats() totals: submitted {totals['submitted']}, succeeded "
              f"{totals['succeeded']}, failed {totals['failed']}")
        print("targets: end to end >= 10,000 jobs/s; latency p50 < 1 ms")
        return 0
    except (Timeout, RuntimeError, KeyboardInterrupt) as exc:
        return cluster.failed(exc)
    finally:
        cluster.close(args.keep_logs)

if __name__ == "__main__":
    sys.exit(main())
