"""Huey's side of bench_latency.py, run with bench/.venv-huey's Python (Huey is not a
dependency of elric): a no-op task, and a driver that enqueues it one at a time.

    cd bench && python -c "import huey_peer; huey_peer.main()" --samples 300
    # (BENCH_REDIS_URL must be set; imported, since Huey names a task by its module)

prints one JSON line: the latencies in ms (the task's own start time minus the time just
before the enqueue call). The consumer: huey_consumer huey_peer.huey -w 2 -k process.
"""

import argparse
import json
import os
import time

from huey import RedisHuey

huey = RedisHuey("elric-bench", url=os.environ["BENCH_REDIS_URL"], blocking=True)


@huey.task()
def noop():
    return time.time()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--gap", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=30.0)
    args = ap.parse_args()
    noop().get(blocking=True, timeout=args.timeout)   # the consumer is up
    latencies = []
    for _ in range(args.samples):
        before = time.time()
        result = noop()
        time.sleep(0.003)   # as the elric side does: polls compete for the CPUs
        deadline = time.monotonic() + args.timeout
        while (started := result.get()) is None:
            if time.monotonic() > deadline:
                raise SystemExit("huey: a task did not run in time")
            time.sleep(0.001)
        latencies.append((started - before) * 1000)
        time.sleep(args.gap)
    print(json.dumps(latencies))


if __name__ == "__main__":
    main()
