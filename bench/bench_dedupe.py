"""Benchmark of dedupe through the master: submit_jobs of keyed jobs, per filter backend.

Starts its own redis-server (elric.redis_server.RedisServer on a free 127.0.0.1 port, never
the one on 6379) and, per backend, a real master process (no worker). Sends --n distinct
URL keys as jobs of bench.jobs:Noop with ``dedupe_key`` set, in ``submit_jobs`` batches of
--batch, from --clients connections with one call in flight each (default 4, as several
crawler workers submitting at once; the spec maps are built before the clock starts); then
the same keys again. Jobs that pass are queued by the master (that is part of what is
measured) and deleted after the pass. With --clients 1 the calls go one after the other
and the bench deletes queued jobs between calls (not timed).
Redis is emptied (FLUSHALL) between backends.

Per backend it prints:

  pass 1 / pass 2 checks/s   keys through the master per second of submit_jobs calls
                             (pass 1: every key new, so every job is also queued;
                             pass 2: every key seen, nothing is queued)
  CPU µs/key                 CPU time of the master, redis-server and this client per
                             key over the pass: where the time goes
  Redis µs/key by command    from INFO commandstats (reset before each pass): the time
                             Redis spent executing each command, per key; a script's
                             (evalsha) time includes the commands it calls, which are
                             also listed on their own. Parsing and I/O are not in it.
  ms/call                    median submit_jobs round trip (client -> master -> Redis)
  filter bytes, bytes/item   Redis MEMORY USAGE (SAMPLES 0) of the scope's filter keys;
                             for bloom the in-master bit arrays (stats), its snapshot in
                             Redis, and the master's RSS growth over the run
  FP pass 1                  keys filtered on pass 1 / n (all keys were distinct, so each
                             one is a false positive; averaged over the fill-up)
  FP@cap                     after pass 2 (filter at capacity): share of --probes fresh
                             keys filtered, the rate error_rate bounds
  FN pass 2                  keys let through on pass 2 (must be 0)

Targets: >= 100,000 checks/s through one master (plenty for a crawl); redis-bloom <= 2
bytes/item at error_rate 0.1%; FP within 1.2x of error_rate for both Bloom backends.

    python bench/bench_dedupe.py --n 200000
    python bench/bench_dedupe.py --n 1000000 --profile /tmp/prof   # + py-spy of the master
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import redis  # noqa: E402

from elric.client import MasterClient  # noqa: E402
from elric.contract import normalize_spec  # noqa: E402
from elric.launch import elric_env, start_master  # noqa: E402
from elric.redis_server import RedisServer, free_port  # noqa: E402

BACKENDS = ("set", "bloom", "redis-bloom")
FUNC = "bench.jobs:Noop"
SCOPE = "bench"
PREFIX = "bench"


def make_keys(n: int, salt: str = "") -> list[str]:
    # Distinct, crawler-like: ~55-65 bytes each (the same shape as bench_dedupe_filters.py).
    return [f"https://www.example{i % 1009}.com/{salt}articles/{i}/page.html"
            f"?ref={i * 2654435761 % 1000003}" for i in range(n)]


def cpu(pid: int) -> float:
    import psutil
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def rss(pid: int) -> int:
    import psutil
    return psutil.Process(pid).memory_info().rss


def filter_bytes(r: redis.Redis, backend: str) -> int:
    names = [f"{PREFIX}:dedupe:stats:{SCOPE}"]
    if backend == "set":
        names.append(f"{PREFIX}:dedupe:set:{SCOPE}")
    elif backend == "redis-bloom":
        names += list(r.scan_iter(f"{PREFIX}:dedupe:rbloom:{SCOPE}:*", count=1000))
    return sum(r.memory_usage(k, samples=0) or 0 for k in names)


class Profiler:
    """py-spy record of one process, in raw (collapsed stack) format."""

    def __init__(self, pid: int, path: str) -> None:
        self.path = path
        exe = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw",
                                      "--rate", "200", "--output", path],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.5)  # let it attach (a bench, not a test: a fixed pause is fine here)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return summarize(self.path) if os.path.exists(self.path) else \
            f"(py-spy wrote nothing: {self.proc.stderr.read().decode()[-300:]})"


def summarize(path: str, top: int = 14) -> str:
    """Inclusive and self shares of the master's busy samples per function."""
    incl, self_, total = Counter(), Counter(), 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(count)
            frames = [fr.strip() for fr in stack.split(";")]
            leaf = frames[-1]
            if leaf.startswith(("select (", "poll (", "epoll")) or "base_events.py" in leaf \
                    and "_run_once" in leaf and len(frames) < 4:
                continue  # idle in the event loop
            total += n
            self_[leaf] += n
            for fr in set(frames):
                incl[fr] += n
    if not total:
        return "(no busy samples)"
    out = [f"    {total} busy samples; inclusive (self) share of busy time:"]
    for fr, n in incl.most_common(60):
        if "elric/" not in fr and "redis/" not in fr and "msgpack" not in fr:
            continue
        out.append(f"    {100 * n / total:5.1f}% ({100 * self_[fr] / total:4.1f}%)  {fr}")
        if len(out) > top:
            break
    out.append("    top self:")
    for fr, n in self_.most_common(8):
        out.append(f"    {100 * n / total:5.1f}%  {fr}")
    return "\n".join(out)


def run_pass(client: MasterClient, r: redis.Redis, keys: list[str], batch: int,
             job_key) -> tuple[float, Counter, list[float]]:
    """Submit every key once; returns (seconds in submit_jobs, statuses, per-call ms)."""
    spent, counts, lat = 0.0, Counter(), []
    queue_keys = [f"{PREFIX}:queue:default"]
    for i in range(0, len(keys), batch):
        specs = [{"func": FUNC, "dedupe_key": k, "dedupe_scope": SCOPE}
                 for k in keys[i:i + batch]]
        t0 = time.perf_counter()
        replies = client.submit_jobs(specs)
        dt = time.perf_counter() - t0
        spent += dt
        lat.append(dt * 1000)
        queued = [rep["job_id"] for rep in replies if rep["status"] == "queued"]
        counts.update(rep["status"] for rep in replies)
        if queued:  # not timed: keep Redis memory flat
            r.unlink(*{k for j in queued for k in job_key(j)}, *queue_keys)
    return spent, counts, lat


def run_pass_concurrent(address: str, r: redis.Redis, keys: list[str], batch: int,
                        clients: int) -> tuple[float, Counter, list[float]]:
    """Like run_pass with ``clients`` connections, each with one call in flight (as many
    crawler workers submitting at once). Queued jobs are deleted after the pass, not
    between calls (so the time is the wall time of the whole pass)."""
    import asyncio

    from elric.rpc import AsyncClient

    host, port = address.rsplit(":", 1)
    # the submitters' own work (building the spec maps) is done before the clock starts
    batches = [[{"func": FUNC, "dedupe_key": k, "dedupe_scope": SCOPE}
                for k in keys[i:i + batch]] for i in range(0, len(keys), batch)]
    counts, lat = Counter(), []

    async def one(conn, todo):
        while todo:
            specs = todo.pop()
            t0 = time.perf_counter()
            replies = await conn.call("submit_jobs", specs)
            lat.append((time.perf_counter() - t0) * 1000)
            counts.update(rep["status"] for rep in replies)

    async def main():
        conns = [await AsyncClient.connect(host, int(port), timeout=300, max_message=64 << 20)
                 for _ in range(clients)]
        todo = batches[::-1]
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, todo) for c in conns))
        wall = time.perf_counter() - t0
        for c in conns:
            await c.close()
        return wall

    return asyncio.run(main()), counts, lat


def delete_queued(r: redis.Redis) -> None:
    """Delete the jobs a pass queued (after its CPU figures are taken)."""
    for pattern in (f"{PREFIX}:job:*", f"{PREFIX}:queue:*", f"{PREFIX}:status:*"):
        names = list(r.scan_iter(pattern, count=10_000))
        for i in range(0, len(names), 10_000):
            r.unlink(*names[i:i + 10_000])


def command_usec(r: redis.Redis) -> dict[str, tuple[int, int]]:
    """{command: (calls, usec)} since the last CONFIG RESETSTAT, without the bench's own
    commands (INFO, CONFIG, and UNLINK: the cleanup of queued jobs with --clients 1)."""
    out = {}
    for name, row in r.info("commandstats").items():
        cmd = name.removeprefix("cmdstat_")
        if cmd not in ("info", "config|resetstat", "unlink"):
            out[cmd] = (int(row["calls"]), int(row["usec"]))
    return out


def bench_backend(server: RedisServer, backend: str, args, keys: list[str],
                  probes: list[str]) -> dict:
    r = redis.Redis.from_url(server.url)
    r.flushdb()  # our own server (RedisServer), never a shared one
    address = f"127.0.0.1:{free_port()}"
    env = elric_env(server.url, address, KEY_PREFIX=PREFIX, FILTER_BACKEND=backend,
                    BLOOM_CAPACITY=args.capacity or args.n, BLOOM_ERROR_RATE=args.error_rate,
                    BLOOM_SNAPSHOT_INTERVAL=0, LOG_LEVEL="WARNING")
    env.pop("ELRIC_SETTINGS", None)
    log = os.path.join(args.workdir, f"master-{backend}.log")
    master = start_master(env, log, cwd=ROOT)
    client = MasterClient(address, timeout=300, max_message=64 << 20)
    out = {"backend": backend}
    try:
        # warm up: class import, scripts loaded, connections open (another scope)
        client.submit_jobs([{"func": FUNC, "dedupe_key": k, "dedupe_scope": "warm"}
                            for k in make_keys(10, "warm/")])
        r.flushdb()  # our own server (RedisServer), never a shared one
        mem0 = int(r.info("memory")["used_memory"])
        rss0 = rss(master.pid)

        def job_key(j):
            return (f"{PREFIX}:job:{j}",)

        for p, label in ((1, "pass1"), (2, "pass2")):
            prof = Profiler(master.pid, os.path.join(args.profile, f"{backend}-{label}.txt")) \
                if args.profile else None
            pids = {"master": master.pid, "redis": server.proc.pid, "client": os.getpid()}
            r.config_resetstat()
            c0 = {k: cpu(v) for k, v in pids.items()}
            t0 = time.perf_counter()
            if args.clients > 1:
                spent, counts, lat = run_pass_concurrent(address, r, keys, args.batch,
                                                         args.clients)
            else:
                spent, counts, lat = run_pass(client, r, keys, args.batch, job_key)
            wall = time.perf_counter() - t0
            cpus = {k: cpu(v) - c0[k] for k, v in pids.items()}
            commands = command_usec(r)
            if args.clients > 1:
                delete_queued(r)
            if prof:
                out[f"{label}_profile"] = prof.stop()
            out[label] = {"rate": len(keys) / spent, "wall": wall, "spent": spent,
                          "ms_p50": statistics.median(lat), "ms_max": max(lat),
                          "counts": dict(counts), "cpu": cpus, "commands": commands}
            if p == 1:
                rss1 = rss(master.pid)
                stats = client.stats()["filters"][SCOPE]
                out["filter_stats"] = stats
                out["mem"] = filter_bytes(r, backend)
                out["used_memory_delta"] = int(r.info("memory")["used_memory"]) - mem0
        # false positives at capacity: fresh keys, after pass 2 (which added nothing), so
        # that pass 2 measured the filter at capacity, not grown by the probes
        _, pc, _ = run_pass(client, r, probes, args.batch, job_key)
        out["probes"] = dict(pc)
        out["final_stages"] = client.stats()["filters"][SCOPE].get("stages")
        out["rss_delta"] = rss1 - rss0
        out["fp1"] = out["pass1"]["counts"].get("filtered", 0) / len(keys)
        out["fn2"] = out["pass2"]["counts"].get("queued", 0)
        if probes:
            out["fp_cap"] = out["probes"].get("filtered", 0) / len(probes)
    finally:
        client.close()
        code = master.stop(timeout=120)
        if code != 0:
            print(f"  master exited with {code}; see {log}", file=sys.stderr)
    if backend == "bloom":
        out["snapshot_bytes"] = r.strlen(f"{PREFIX}:dedupe:bloom:{SCOPE}")
    r.close()
    return out


def report(o: dict, n: int, args) -> None:
    b = o["backend"]
    p1, p2 = o["pass1"], o["pass2"]
    print(f"\n== {b}  (n={n:,}, batch={args.batch}, clients={args.clients}, "
          f"capacity={args.capacity or n:,}, error_rate={args.error_rate:g})")
    for label, p in (("pass 1 (new, queued)", p1), ("pass 2 (seen)", p2)):
        print(f"  {label:22s} {p['rate']:>10,.0f} checks/s   {p['ms_p50']:6.1f} ms/call p50 "
              f"({p['ms_max']:.0f} max)   {p['spent']:.1f}s in calls, {p['wall']:.1f}s wall"
              f"   {p['counts']}")
        print(f"  {'':22s} CPU µs/key: " + ", ".join(
            f"{k} {v * 1e6 / n:.1f}" for k, v in p["cpu"].items())
            + ("  (client includes the untimed cleanup of queued jobs)"
               if args.clients == 1 else ""))
        top = sorted(p["commands"].items(), key=lambda kv: -kv[1][1])[:6]
        print(f"  {'':22s} Redis µs/key by command: " + (", ".join(
            f"{cmd} {usec / n:.2f}" for cmd, (calls, usec) in top) or "(none)"))
    fs = o["filter_stats"]
    if b == "bloom":
        print(f"  memory  bit arrays {fs['bytes']:,} B = {fs['bytes'] / n:.2f} B/item; "
              f"snapshot in Redis at close {o['snapshot_bytes']:,} B ({o['final_stages']} stage(s) after "
              f"the probes); master RSS +{o['rss_delta']:,} B "
              f"= {o['rss_delta'] / n:.2f} B/item")
    else:
        print(f"  memory  MEMORY USAGE of the filter keys {o['mem']:,} B = "
              f"{o['mem'] / n:.2f} B/item (Redis used_memory +{o['used_memory_delta']:,} B)")
    line = f"  FP pass 1 {o['fp1']:.5f} ({o['fp1'] / args.error_rate:.2f}x of {args.error_rate:g})"
    if "fp_cap" in o:
        line += (f"   FP@cap {o['fp_cap']:.5f} ({o['fp_cap'] / args.error_rate:.2f}x, "
                 f"{o['probes'].get('filtered', 0)} of {sum(o['probes'].values()):,} probes)")
    if "expected_fp_rate" in fs:
        line += f"   expected (fill) {fs['expected_fp_rate']:.5f}"
    print(line + f"   FN pass 2 {o['fn2']}")
    if b != "set":
        ok_fp = o["fp1"] <= 1.2 * args.error_rate and o.get("fp_cap", 0) <= 1.2 * args.error_rate
        print(f"  target FP <= 1.2x error_rate: {'met' if ok_fp else 'MISSED'}")
    if b == "redis-bloom":
        bpi = o["mem"] / n
        print(f"  target <= 2 B/item: {'met' if bpi <= 2 else 'MISSED'} ({bpi:.2f});  target "
              f">= 100,000 checks/s: pass 1 {'met' if p1['rate'] >= 1e5 else 'MISSED'}, "
              f"pass 2 {'met' if p2['rate'] >= 1e5 else 'MISSED'}; both passes "
              f"{2 * n / (p1['spent'] + p2['spent']):,.0f} checks/s")
    for label in ("pass1", "pass2"):
        if f"{label}_profile" in o:
            print(f"  py-spy of the master, {label}:\n{o[f'{label}_profile']}")


def machine_reference() -> float:
    """µs per spec of normalize_spec on 1,000 crawler specs, best of 3: a yardstick of
    how fast this machine runs Python right now (the figures it went with are in
    docs/DEDUPE.md). Other work on a shared machine moves it, and every rate with it."""
    import timeit

    specs = [{"func": FUNC, "dedupe_key": k, "dedupe_scope": SCOPE}
             for k in make_keys(1000, "ref/")]
    return min(timeit.repeat(lambda: [normalize_spec(s) for s in specs],
                             number=100, repeat=3)) / 100 / 1000 * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="distinct keys (default 1000000)")
    ap.add_argument("--batch", type=int, default=1000, help="jobs per submit_jobs call")
    ap.add_argument("--backends", default=",".join(BACKENDS))
    ap.add_argument("--error-rate", type=float, default=0.001)
    ap.add_argument("--capacity", type=int, default=0, help="BLOOM_CAPACITY (default: n)")
    ap.add_argument("--probes", type=int, default=None,
                    help="fresh keys probed at capacity for FP@cap (default n/5)")
    ap.add_argument("--profile", default="", help="folder for py-spy profiles of the master")
    ap.add_argument("--clients", type=int, default=4,
                    help="connections with a call in flight each (1: calls one after the "
                         "other, queued jobs deleted between calls, untimed)")
    args = ap.parse_args()
    if args.profile:
        os.makedirs(args.profile, exist_ok=True)
    keys = make_keys(args.n)
    probes = make_keys(args.n // 5 if args.probes is None else args.probes, "probe/")
    server = RedisServer().start()
    args.workdir = server.dir
    print(f"redis-server pid {server.proc.pid} on {server.url}; master logs in {server.dir}")
    print(f"machine reference (normalize_spec, lower is faster): "
          f"{machine_reference():.2f} µs/spec")
    try:
        for backend in args.backends.split(","):
            report(bench_backend(server, backend.strip(), args, keys, probes), args.n, args)
    finally:
        server.cleanup()
    print(f"machine reference at the end: {machine_reference():.2f} µs/spec")
    return 0


if __name__ == "__main__":
    sys.exit(main())
