"""Crawl benchmark: elric's example crawler against Scrapy on the same site, in the same run.

A separate process (bench/site_server.py) serves --pages pages, each answered after
--latency seconds, ~1.5 KB with ~15 links. Then, --rounds times, alternating:

  elric   a private redis-server, one master and one worker started as the README says
          (`elric master`, `elric worker --queues crawl`: the worker's default flags),
          LIMITS giving the site's host a cap of 64 jobs at once; the crawl starts with
          one submitted page (elric.demo.crawler:Crawl, as `elric demo` does)
  Scrapy  `scrapy runspider` of an equivalent spider, CONCURRENT_REQUESTS and
          CONCURRENT_REQUESTS_PER_DOMAIN 64, ROBOTSTXT_OBEY, installed on first use into
          bench/.venv-scrapy

each at its own default log level (--logs default: elric logs a line per job at INFO,
Scrapy a line per page at DEBUG, to a file) or both at WARNING (--logs quiet).

and prints for each: pages/s (pages over the time from the site's first to its last page
request), CPU ms per page of each process, memory (summed PSS, the worker and its pool
processes for elric, sampled through the crawl, the peak), and whether every page was
requested exactly once; then the ratio of the medians, and the ceiling: the rate of a
crawler that costs nothing, with the same 64 requests at once on the same site. This
machine is shared and noisy: compare the ratio measured in one run, not figures across
runs.

--scaling serves --hosts loopback addresses (127.0.0.2, ...) at 1 s per page and crawls
them with one worker, then with two, each `--concurrency 1 --async-concurrency
--scaling-slots`: two workers should crawl about twice as fast.

    python bench/bench_crawl.py                      # 1,000 pages at 100 ms, 1 round
    python bench/bench_crawl.py --rounds 3
    python bench/bench_crawl.py --scaling            # 4 hosts x 250 pages at 1 s

Every process it starts is stopped by its PID; every wait is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import urllib.request
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import psutil  # noqa: E402

from bench.cluster import Cluster, header  # noqa: E402
from elric.demo.crawler import Crawl  # noqa: E402
from elric.redis_server import RedisServer  # noqa: E402

SCRAPY_VENV = os.path.join(ROOT, "bench", ".venv-scrapy")
SITE = os.path.join(ROOT, "bench", "site_server.py")
SPIDER = '''
import scrapy

class Bench(scrapy.Spider):
    name = "bench"
    start_urls = [{start!r}]

    def parse(self, response):
        for href in response.css("a::attr(href)").getall():
            yield response.follow(href, callback=self.parse)
'''


@dataclass
class Crawled:
    """One crawl's figures."""

    name: str
    pages: int = 0                  # distinct pages requested
    seconds: float = 0.0            # first to last page request, at the site
    exactly_once: bool = False
    cpu_ms: dict[str, float] = field(default_factory=dict)   # per page, per process
    pss_mib: float = 0.0            # peak summed PSS
    in_flight: float = 0.0          # mean page requests in flight, at the site

    @property
    def rate(self) -> float:
        return (self.pages - 1) / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        cpu = ", ".join(f"{k} {v:.2f}" for k, v in self.cpu_ms.items())
        total = sum(self.cpu_ms.values())
        return (f"{self.name:<7} {self.rate:>7.1f} pages/s  {self.pages} pages in "
                f"{self.seconds:.2f}s  exactly once: {'yes' if self.exactly_once else 'NO'}  "
                f"memory {self.pss_mib:.0f} MiB  in flight {self.in_flight:.0f}\n"
                f"        CPU ms/page: {cpu}; total {total:.2f}")


class Site:
    """bench/site_server.py in its own process."""

    def __init__(self, hosts: list[str], pages: int, latency: float, timeout: float) -> None:
        self.hosts, self.pages = hosts, pages
        self.proc = subprocess.Popen(
            [sys.executable, SITE, "--hosts", ",".join(hosts), "--pages", str(pages),
             "--latency", str(latency)], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()   # bounded: the server prints or dies
        if not line.startswith("ready "):
            self.stop()
            raise RuntimeError(f"site server did not start: {line!r}")
        self.port = int(line.split()[1])

    def url(self, host: str, path: str = "/") -> str:
        return f"http://{host}:{self.port}{path}"

    def hits(self) -> list[dict]:
        out = []
        for host in self.hosts:
            with urllib.request.urlopen(self.url(host, "/__hits"), timeout=10) as r:
                out.append(json.load(r))
        return out

    def result(self, crawled: Crawled) -> Crawled:
        per_host = self.hits()
        page_hits = [n for h in per_host for p, n in h["hits"].items() if p.startswith("/p/")]
        crawled.pages = len(page_hits)
        crawled.exactly_once = crawled.pages == self.pages * len(self.hosts) and \
            all(n == 1 for n in page_hits)
        crawled.seconds = max(h["last"] for h in per_host) - min(h["first"] for h in per_host)
        crawled.in_flight = sum(h["mean_in_flight"] for h in per_host)
        return crawled

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


class PeakPss(threading.Thread):
    """Samples the summed PSS of a process and its descendants; keeps the peak."""

    def __init__(self, pids) -> None:
        super().__init__(daemon=True)
        self.pids, self.peak, self.done = pids, 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.25):
            total = 0
            for pid in self.pids():
                try:
                    total += psutil.Process(pid).memory_full_info().pss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)

    def stop(self) -> float:
        self.done.set()
        self.join()
        return self.peak / 2**20


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def tree(pid: int) -> list[int]:
    try:
        return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return []


def crawl_with_elric(site: Site, workers: int, worker_args: list[str], limits: dict,
                     timeout: float, quiet: bool = True) -> Crawled:
    cluster = Cluster("elric-bench-crawl-", KEY_PREFIX="bench-crawl",
                      LIMITS=json.dumps(limits), JOB_MODULES=Crawl.__module__,
                      **({"LOG_LEVEL": "WARNING"} if quiet else {}))
    keep_logs = True   # when the crawl fails or errs
    try:
        master = cluster.start_master()
        worker_pids = [cluster.start_worker(f"worker-{n}", ["--queues", "crawl", *worker_args]).pid
                       for n in range(workers)]
        client = cluster.connect()
        cluster.wait_until(lambda: len(client.stats()["workers"]) == workers, timeout,
                           "the workers registered", interval=0.1)
        cluster.wait_until(lambda: all(len(tree(pid)) > 1 for pid in worker_pids), timeout,
                           "the pool processes started", interval=0.1)
        redis_pid = cluster.server.proc.pid
        groups = {"redis": lambda: [redis_pid], "master": lambda: [master.pid],
                  "worker": lambda: worker_pids,
                  "pool": lambda: [c for pid in worker_pids for c in tree(pid)[1:]]}
        before = {name: cpu_seconds(pids()) for name, pids in groups.items()}
        memory = PeakPss(lambda: [c for pid in worker_pids for c in tree(pid)])
        client.submit_jobs([Crawl.spec([site.url(host), "bench"], job_id=f"start-{host}",
                                       batch="bench", dedupe_scope="bench")
                            for host in site.hosts])

        def finished() -> bool:
            stats = client.stats()
            done = stats["batches"].get("bench", {})
            live = sum(stats["by_status"][s] for s in ("queued", "running", "retrying"))
            return live == 0 and done.get("succeeded", 0) + done.get("failed", 0) == \
                done.get("submitted", -1)

        cluster.wait_until(finished, timeout, "the crawl finished", interval=0.1)
        crawled = site.result(Crawled("elric"))
        crawled.pss_mib = memory.stop()
        crawled.cpu_ms = {name: (cpu_seconds(pids()) - before[name]) * 1000 / crawled.pages
                          for name, pids in groups.items()}
        failed = client.stats()["batches"]["bench"].get("failed", 0)
        if failed:
            print(f"        ({failed} crawl jobs failed)")
        keep_logs = bool(failed)
        return crawled
    finally:
        cluster.close(keep_logs)


def ensure_scrapy() -> str:
    python = os.path.join(SCRAPY_VENV, "bin", "python")
    if not os.path.exists(os.path.join(SCRAPY_VENV, "bin", "scrapy")):
        print("installing Scrapy into bench/.venv-scrapy (once)", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", SCRAPY_VENV])
        subprocess.check_call([python, "-m", "pip", "install", "--quiet", "scrapy"])
    return os.path.join(SCRAPY_VENV, "bin", "scrapy")


def crawl_with_scrapy(scrapy: str, site: Site, timeout: float, quiet: bool) -> Crawled:
    with tempfile.TemporaryDirectory(prefix="elric-bench-scrapy-") as tmp:
        spider = os.path.join(tmp, "spider.py")
        with open(spider, "w") as f:
            f.write(SPIDER.format(start=site.url(site.hosts[0])))
        settings = {"CONCURRENT_REQUESTS": 64, "CONCURRENT_REQUESTS_PER_DOMAIN": 64,
                    "DOWNLOAD_DELAY": 0, "ROBOTSTXT_OBEY": True,
                    "TELNETCONSOLE_ENABLED": False, **({"LOG_LEVEL": "WARNING"} if quiet else {})}
        argv = [scrapy, "runspider", spider]
        for k, v in settings.items():
            argv += ["-s", f"{k}={v}"]
        log = open(os.path.join(tmp, "scrapy.log"), "w")   # as a terminal would take it
        proc = subprocess.Popen(argv, cwd=tmp, stdout=log, stderr=log)
        log.close()
        memory = PeakPss(lambda: [proc.pid])
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise TimeoutError("Scrapy did not finish in time") from None
        crawled = site.result(Crawled("scrapy"))
        crawled.pss_mib = memory.stop()
    return crawled


def scrapy_cpu(fn, *args) -> Crawled:
    """Run ``fn`` (a Scrapy crawl) and set its CPU from the rusage of reaped children."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    crawled = fn(*args)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    crawled.cpu_ms = {"scrapy": used * 1000 / max(crawled.pages, 1)}
    return crawled


def ceiling(pages: int, latency: float, at_once: int) -> float:
    """Pages/s, measured as a crawl is, of a crawler with no cost of its own: every request
    takes ``latency``, a page's links are queued the moment it is answered, and a new
    request starts the moment one of ``at_once`` ends. Below at_once / latency because the
    crawl starts from one page and widens a level per request."""
    import collections
    import heapq

    from bench.site_server import links

    seen, line, free, starts = {0}, collections.deque([0]), at_once, []
    answers: list[tuple[float, int]] = []
    now = 0.0
    while True:
        while free and line:
            free -= 1
            starts.append(now)
            heapq.heappush(answers, (now + latency, line.popleft()))
        if not answers:
            return (len(starts) - 1) / (starts[-1] - starts[0])
        now, k = heapq.heappop(answers)
        free += 1
        for link in links(k, pages):
            if link not in seen:
                seen.add(link)
                line.append(link)


def compare(args) -> None:
    scrapy = ensure_scrapy()
    host = "127.0.0.1"
    results: dict[str, list[Crawled]] = {"elric": [], "scrapy": []}
    for n in range(args.rounds):
        for name in ("elric", "scrapy") if n % 2 == 0 else ("scrapy", "elric"):
            site = Site([host], args.pages, args.latency, args.timeout)
            try:
                if name == "elric":
                    limits = {f"{host}:{site.port}": {"concurrency": 64}}
                    crawled = crawl_with_elric(site, 1, [], limits, args.timeout,
                                               args.logs == "quiet")
                else:
                    crawled = scrapy_cpu(crawl_with_scrapy, scrapy, site, args.timeout,
                                         args.logs == "quiet")
            finally:
                site.stop()
            results[name].append(crawled)
            print(crawled.line(), flush=True)
    rate = {name: statistics.median(c.rate for c in runs) for name, runs in results.items()}
    print(f"median pages/s: elric {rate['elric']:.1f}, Scrapy {rate['scrapy']:.1f}; "
          f"elric/Scrapy = {rate['elric'] / rate['scrapy']:.2f}x")
    best = ceiling(args.pages, args.latency, 64)
    print(f"ceiling of this site at 64 requests at once: {best:.0f} pages/s (elric at "
          f"{rate['elric'] / best:.0%} of it); elric can reach 2x only while Scrapy is "
          f"below {best / 2:.0f}")


def scaling(args) -> None:
    hosts = [f"127.0.0.{2 + i}" for i in range(args.hosts)]
    worker_args = ["--concurrency", "1", "--async-concurrency", str(args.scaling_slots)]
    rates = {}
    for workers in (1, 2):
        site = Site(hosts, args.pages // args.hosts, 1.0, args.timeout)
        try:
            crawled = crawl_with_elric(site, workers, worker_args, {}, args.timeout)
        finally:
            site.stop()
        crawled.name = f"{workers} wkr"
        print(crawled.line(), flush=True)
        rates[workers] = crawled.rate
    print(f"two workers / one = {rates[2] / rates[1]:.2f}x")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.1, help="seconds per page")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--logs", choices=("default", "quiet"), default="default",
                    help="default: each at its own default log level, as its docs start it "
                         "(elric INFO: a line per job; Scrapy DEBUG: a line per page); "
                         "quiet: both at WARNING")
    ap.add_argument("--scaling", action="store_true",
                    help="one worker against two, several hosts at 1 s per page")
    ap.add_argument("--hosts", type=int, default=4, help="hosts in --scaling")
    ap.add_argument("--scaling-slots", type=int, default=50,
                    help="async jobs per worker in --scaling")
    ap.add_argument("--timeout", type=float, default=600.0, help="bound on every wait (s)")
    args = ap.parse_args()
    server = RedisServer().start()
    try:
        import redis

        r = redis.Redis.from_url(server.url)
        header("elric crawl benchmark", r)
        r.close()
    finally:
        server.cleanup()
    if args.scaling:
        print(f"scaling: {args.hosts} hosts x {args.pages // args.hosts} pages at 1 s each")
        scaling(args)
    else:
        print(f"site: {args.pages} pages at {args.latency * 1000:.0f} ms each; cap 64 per host; "
              f"logs: {args.logs}")
        compare(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
