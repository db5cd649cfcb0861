"""Which async HTTP client the example crawler uses: aiohttp against httpx, measured.

Serves bench/site_server.py pages from a separate process and fetches --pages of them with
--in-flight requests at once through one client session, in this one process, for each
client in turn (--rounds, alternating); prints pages/s and CPU ms per page. httpx is not
a dependency: pip install httpx to run this.

    python bench/bench_http_client.py                  # 3,000 pages, 64 in flight, no delay
    python bench/bench_http_client.py --latency 0.1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.bench_crawl import Site  # noqa: E402


async def fetch_all(get, urls: list[str], in_flight: int) -> None:
    todo = iter(urls)

    async def fetcher():
        for url in todo:
            await get(url)

    await asyncio.gather(*(fetcher() for _ in range(in_flight)))


async def with_aiohttp(urls, in_flight):
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def get(url):
            async with session.get(url) as response:
                await response.read()
        await fetch_all(get, urls, in_flight)


async def with_httpx(urls, in_flight):
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=in_flight)
    async with httpx.AsyncClient(limits=limits) as client:
        async def get(url):
            (await client.get(url)).read()
        await fetch_all(get, urls, in_flight)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pages", type=int, default=3000)
    ap.add_argument("--in-flight", type=int, default=64)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    site = Site(["127.0.0.1"], 1000, args.latency, 60)
    try:
        urls = [site.url("127.0.0.1", f"/p/{n % 1000}") for n in range(args.pages)]
        print(f"{args.pages} GETs, {args.in_flight} in flight, {args.latency * 1000:.0f} ms "
              "per page")
        for n in range(args.rounds):
            clients = [("aiohttp", with_aiohttp), ("httpx", with_httpx)]
            for name, run in clients if n % 2 == 0 else clients[::-1]:
                cpu, wall = time.process_time(), time.perf_counter()
                asyncio.run(run(urls, args.in_flight))
                cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
                print(f"{name:<8} {args.pages / wall:>8.0f} pages/s  "
                      f"{cpu * 1000 / args.pages:.3f} CPU ms/page", flush=True)
    finally:
        site.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
