"""`elric demo`: crawl a small site on 127.0.0.1 with a real master and worker.

Starts what it needs (a redis-server unless ELRIC_REDIS_URL is set, a master, a worker, the
demo site), submits the first page, waits until every job is done, prints what was crawled
and stops everything it started.

The crawler and the site live in this package (not in ``examples/``) so that ``elric demo``
works from any directory after ``pip install``; ``examples/`` re-exports them.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import time

from elric.config import load_settings
from elric.redis_server import PORT_TRIES, RedisServer, any_taken, free_port

MAX_PAGES = 999   # with "/", the 1,000 jobs one listing reads back (the demo counts those)


def run_demo(settings_path: str | None = None, pages: int = 25, timeout: float = 120.0,
             keep: bool = False) -> int:
    from elric.client import MasterClient
    from elric.launch import start_master, start_worker
    from elric.demo.site import DemoSite

    try:
        from elric.demo.crawler import Crawl
    except ImportError as exc:   # installed without the crawl extra: the sync crawler
        from elric.demo.crawler_sync import CrawlSync as Crawl
        print(f"({exc}; crawling with the synchronous crawler instead)")

    # A `kill`, a supervisor or a closed terminal stops what the demo started too.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _exit_on_signal)
    settings = load_settings(settings_path)
    prefix = f"elric-demo-{os.getpid()}"
    # what it started, stopped in the finally, after a Ctrl-C during start-up too
    redis_server = site = logdir = None
    started = []
    # its logs are kept where it said so (a failure); else removed, after Ctrl-C too
    keep_logs = False

    def failed(why) -> int:
        nonlocal keep_logs
        print(f"demo: {why}; logs in {logdir}", file=sys.stderr)
        keep_logs = True
        return 1
    try:
        if os.environ.get("ELRIC_REDIS_URL"):
            redis_url = settings.REDIS_URL
            print(f"using Redis at {redis_url} (ELRIC_REDIS_URL)")
        else:
            redis_server = RedisServer().start()
            redis_url = redis_server.url
            print(f"started redis-server (pid {redis_server.proc.pid}) on {redis_url}")
        site = DemoSite(pages).start()
        logdir = tempfile.mkdtemp(prefix="elric-demo-")
        for attempt in range(1, PORT_TRIES + 1):
            # ports found free can be taken before the master listens on them (a test or
            # a program beside it): then it exits, and other ports are tried
            address = f"127.0.0.1:{free_port()}"
            dashboard = f"127.0.0.1:{free_port()}"
            env = _master_env(settings, Crawl, redis_url, address, dashboard, prefix)
            try:
                master = start_master(env, os.path.join(logdir, "master.log"))
                break
            except RuntimeError as exc:   # it exited, or never answered
                if attempt == PORT_TRIES or not any_taken(address, dashboard):
                    return failed(exc)
                print(f"demo: {address} or {dashboard} was taken as the master started; "
                      "trying other ports", file=sys.stderr)
        started.append(master)
        print(f"started master (pid {master.pid}) on {address}; its dashboard: "
              f"http://{dashboard}/" + ("" if keep else " (add --keep to look at it after "
                                                      "the crawl)"))
        worker = start_worker(env, os.path.join(logdir, "worker.log"),
                              extra=["--queues", "crawl", "--concurrency", "2"])
        started.append(worker)
        print(f"started worker (pid {worker.pid}) with 2 processes")
        client = MasterClient(address, token=settings.RPC_TOKEN)
        t0 = time.monotonic()
        client.submit_job(Crawl.spec([site.url, "demo"], job_id="demo-start", batch="demo",
                                     dedupe_scope="demo"))
        print(f"crawling {site.url} ...")
        while True:
            stats = client.stats()
            live = sum(stats["by_status"].get(s, 0) for s in ("queued", "running", "retrying"))
            done = stats["batches"].get("demo", {})
            if live == 0 and done.get("submitted", 0) and \
                    done.get("succeeded", 0) + done.get("failed", 0) >= done["submitted"]:
                break
            if time.monotonic() - t0 > timeout:
                return failed("timed out")
            if not worker.alive() or not master.alive():
                return failed("a process exited early")
            time.sleep(0.1)
        elapsed = time.monotonic() - t0
        jobs = [client.get_job(j["job_id"])   # a listing carries no results: read each
                for j in client.list_jobs(batch="demo", status="succeeded", limit=1000)]
        for job in sorted(jobs, key=lambda j: j["result"]["url"]):
            r = job["result"]
            print(f"  {r['url']:<40} {r['links']:>2} links  {r['bytes']:>4} bytes")
        failures = done.get("failed", 0)   # (named failed, it hid failed() below)
        print(f"crawled {len(jobs)} pages ({len(site.paths())} on the site, each fetched "
              f"{max(site.page_hits().values())} time(s) at most) in {elapsed:.2f}s; "
              f"{failures} failed")
        client.close()
        ok = len(jobs) == len(site.paths()) and failures == 0
        if not ok:
            failed("not every page was crawled")
        if keep:
            print(f"the dashboard stays at http://{dashboard}/ until you press Ctrl-C")
            try:
                while master.alive():
                    time.sleep(0.5)
            except KeyboardInterrupt:
                pass
        return 0 if ok else 1
    finally:
        for proc in reversed(started):
            proc.stop()
        if site is not None:
            site.stop()
        if redis_server is not None:
            redis_server.cleanup()
        elif os.environ.get("ELRIC_REDIS_URL"):   # a Redis of the user's: it kept the demo's
            _drop_keys(redis_url, prefix)          # keys (some for good) run after run
        if logdir is not None and not keep_logs:
            shutil.rmtree(logdir, ignore_errors=True)
        print("stopped everything the demo started")


def _master_env(settings, crawl, redis_url: str, address: str, dashboard: str,
                prefix: str) -> dict:
    from elric.launch import elric_env

    # only its crawler, whatever a settings.py here says; a polite crawl (16 pages of a host
    # at once); a quick Ctrl-C: a demo's running jobs need not finish (its Redis goes too)
    env = elric_env(redis_url, address, KEY_PREFIX=prefix, SHUTDOWN_GRACE=1,
                    LOG_LEVEL="WARNING", JOB_MODULES=crawl.__module__,
                    LIMITS='{"*": {"concurrency": 16}}', DASHBOARD_ADDRESS=dashboard)
    # its master and worker read the settings it read, RPC_TOKEN too (start_master and
    # the demo's client call the master with it)
    if settings.source is not None:
        env["ELRIC_SETTINGS"] = os.path.abspath(settings.source)
    if settings.RPC_TOKEN:
        env["ELRIC_RPC_TOKEN"] = settings.RPC_TOKEN
    return env


def _drop_keys(redis_url: str, prefix: str) -> None:
    import redis

    try:
        with redis.Redis.from_url(redis_url) as r:
            keys = list(r.scan_iter(match=f"{prefix}:*", count=1000))
            for at in range(0, len(keys), 1000):
                r.unlink(*keys[at:at + 1000])
    except redis.RedisError as exc:
        print(f"demo: could not delete its keys {prefix}:* ({exc})", file=sys.stderr)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)   # through the finally that stops everything
