"""A site for crawl benchmarks: N pages answered after a fixed latency, served by one
asyncio process (so the crawler, not the site, is what is measured).

Page ``/p/K`` is ~1.5 KB of HTML with ~15 links to other pages (``/p/K+1`` among them, so
a crawl from ``/`` and its link to ``/p/0`` reaches every page). ``/robots.txt`` answers
404. ``/__hits`` answers JSON: requests per path, the times of the first and last page
request, and the mean and peak page requests in flight.

    python bench/site_server.py --hosts 127.0.0.1 --port 0 --pages 1000 --latency 0.1

prints ``ready PORT`` once it listens (every host on the same port) and serves until
killed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

LINKS = 15


def links(k: int, pages: int) -> list[int]:
    """The pages ``/p/k`` links to."""
    return sorted({(k + 1) % pages, *((k * 7 + i * 13 + 1) % pages for i in range(LINKS - 1))})


def page(k: int, pages: int) -> bytes:
    targets = links(k, pages)
    items = "".join(f'<li><a href="/p/{t}">page {t}: a link worth following</a></li>\n'
                    for t in targets)
    return (f"<html><head><title>page {k}</title></head><body><h1>page {k}</h1>\n"
            f"<ul>\n{items}</ul><p>{'filler text ' * 10}</p></body></html>").encode()


class Site:
    def __init__(self, pages: int, latency: float) -> None:
        self.pages = pages
        self.latency = latency
        self.hits: dict[str, int] = {}
        self.first = self.last = 0.0
        # page requests in flight, integrated over time: the mean a crawler kept going
        self.in_flight = self.peak = 0
        self.area = 0.0
        self.changed = 0.0
        self.bodies = [page(k, pages) for k in range(pages)]

    def answer(self, path: str) -> tuple[int, bytes, str]:
        if path == "/__hits":
            # from the first page request to the last answer
            mean = self.area / (self.changed - self.first) if self.changed > self.first else 0.0
            body = json.dumps({"hits": self.hits, "first": self.first, "last": self.last,
                               "mean_in_flight": mean, "peak_in_flight": self.peak})
            return 200, body.encode(), "application/json"
        if path == "/":   # the start page, outside the page count
            return 200, b'<html><body><a href="/p/0">start</a></body></html>', "text/html"
        if path.startswith("/p/") and path[3:].isdigit() and int(path[3:]) < self.pages:
            return 200, self.bodies[int(path[3:])], "text/html; charset=utf-8"
        return 404, b"not found", "text/plain"

    def _count(self, step: int) -> None:
        now = time.time()
        if self.changed:
            self.area += self.in_flight * (now - self.changed)
        self.changed = now
        self.in_flight += step
        self.peak = max(self.peak, self.in_flight)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:   # HTTP/1.1 keep-alive: requests one after another
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                if path != "/__hits":
                    self.hits[path] = self.hits.get(path, 0) + 1
                    page = path.startswith("/p/")
                    if page:
                        now = time.time()
                        self.first = self.first or now
                        self.last = now
                        self._count(+1)
                    await asyncio.sleep(self.latency)
                    if page:
                        self._count(-1)
                status, body, kind = self.answer(path)
                reason = b"OK" if status == 200 else b"Not Found"
                writer.write(b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                             % (status, reason, kind.encode(), len(body)) + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def main(hosts: list[str], port: int, pages: int, latency: float) -> None:
    servers = []
    for host in hosts:   # a site per host: each counts its own hits
        site = Site(pages, latency)
        server = await asyncio.start_server(site.serve, host, port, backlog=1024)
        port = server.sockets[0].getsockname()[1]   # every host on the first one's port
        servers.append(server)
    print(f"ready {port}", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", default="127.0.0.1", help="comma-separated loopback addresses")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--pages", type=int, default=1000)
    ap.add_argument("--latency", type=float, default=0.1)
    a = ap.parse_args()
    asyncio.run(main(a.hosts.split(","), a.port, a.pages, a.latency))
