"""Enqueue->start latency of single no-op jobs on an idle worker: elric against Huey, in
the same run.

One private redis-server serves both. elric: a master and one worker with its default
flags (a pool process per CPU); each sample is a sync no-op job submitted with
submit_job. Huey: RedisHuey (blocking dequeue) with its consumer `-w 2 -k process` (one
worker process per CPU here), installed on first use into bench/.venv-huey, driven by
bench/huey_peer.py. Latency is the job's own time.time() at its start minus the client's
just before the enqueue call; each job is waited for (polled every ms) before the next,
then --gap seconds of idle. The two alternate, --rounds times; medians across rounds.

    python bench/bench_latency.py                   # 3 rounds x 300 samples each
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import redis  # noqa: E402

from bench.bench_throughput import FUNC, percentile  # noqa: E402
from bench.cluster import Cluster, header  # noqa: E402
from elric.redis_server import RedisServer  # noqa: E402

HUEY_VENV = os.path.join(ROOT, "bench", ".venv-huey")
HUEY_PYTHON = os.path.join(HUEY_VENV, "bin", "python")


def ensure_huey() -> None:
    if not os.path.exists(os.path.join(HUEY_VENV, "bin", "huey_consumer")):
        print("installing Huey into bench/.venv-huey (once)", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", HUEY_VENV])
        subprocess.check_call([HUEY_PYTHON, "-m", "pip", "install", "--quiet", "huey", "redis"])


def elric_latencies(redis_url: str, samples: int, gap: float, timeout: float) -> list[float]:
    cluster = Cluster("elric-bench-latency-", redis_url, LOG_LEVEL="WARNING",
                      KEY_PREFIX="bench-latency", JOB_MODULES="bench.jobs")
    keep_logs = True   # when a run fails
    try:
        cluster.start_master()
        cluster.start_worker()
        client = cluster.connect()
        spec = {"func": FUNC}

        def one() -> float:
            before = time.time()
            job_id = client.submit_job(spec)["job_id"]
            time.sleep(0.003)   # as the Huey side does: polls compete for the CPUs
            deadline = time.monotonic() + timeout
            while (job := client.get_job(job_id))["status"] not in ("succeeded", "failed"):
                if time.monotonic() > deadline or not all(p.alive() for p in cluster.procs):
                    raise RuntimeError(f"elric: job {job_id} did not run in time")
                time.sleep(0.001)
            return (job["result"] - before) * 1000

        one()   # the worker is up and the job class loaded
        latencies = []
        for _ in range(samples):
            latencies.append(one())
            time.sleep(gap)
        keep_logs = False
        return latencies
    finally:
        cluster.close(keep_logs)


def huey_latencies(redis_url: str, samples: int, gap: float, timeout: float) -> list[float]:
    env = dict(os.environ, BENCH_REDIS_URL=redis_url, PYTHONPATH=os.path.join(ROOT, "bench"))
    consumer = subprocess.Popen(
        [os.path.join(HUEY_VENV, "bin", "huey_consumer"), "huey_peer.huey", "-w", "2",
         "-k", "process", "-q"], env=env, cwd=os.path.join(ROOT, "bench"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # imported, not run as __main__: Huey names a task by its module
        done = subprocess.run([HUEY_PYTHON, "-c", "import huey_peer; huey_peer.main()",
                               "--samples", str(samples), "--gap", str(gap),
                               "--timeout", str(timeout)],
                              env=env, capture_output=True, text=True,
                              timeout=timeout + samples * (gap + 1))
        if done.returncode != 0:
            raise RuntimeError(f"huey driver failed: {done.stderr[-2000:]}")
        return json.loads(done.stdout)
    finally:
        consumer.terminate()
        try:
            consumer.wait(timeout=20)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()


def summary(latencies: list[float]) -> str:
    return (f"p50 {percentile(latencies, 50):.2f}  p90 {percentile(latencies, 90):.2f}  "
            f"p99 {percentile(latencies, 99):.2f}  max {max(latencies):.2f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gap", type=float, default=0.02, help="idle seconds between samples")
    ap.add_argument("--timeout", type=float, default=30.0, help="bound on every wait (s)")
    args = ap.parse_args()
    ensure_huey()
    server = RedisServer().start()
    try:
        r = redis.Redis.from_url(server.url)
        header("enqueue->start latency, elric and Huey", r)
        r.close()
        p50s: dict[str, list[float]] = {"elric": [], "huey": []}
        for n in range(args.rounds):
            order = ("elric", "huey") if n % 2 == 0 else ("huey", "elric")
            for name in order:
                run = elric_latencies if name == "elric" else huey_latencies
                latencies = run(server.url, args.samples, args.gap, args.timeout)
                p50s[name].append(percentile(latencies, 50))
                print(f"round {n + 1} {name:<5} {summary(latencies)}", flush=True)
        elric, huey = (statistics.median(p50s[k]) for k in ("elric", "huey"))
        print(f"median p50: elric {elric:.2f} ms, Huey {huey:.2f} ms; "
              f"elric/Huey = {elric / huey:.2f}")
        return 0
    finally:
        server.cleanup()


if __name__ == "__main__":
    sys.exit(main())
