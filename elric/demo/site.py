"""A small demo site served on 127.0.0.1, for the crawler demo and its tests.

Page ``/p/N`` links to a few other pages (the graph has cycles) and the index links to
page 0, so a crawl from ``/`` reaches every page. For the crawler's tests it can also
serve a robots.txt, pages that fail with 503 a few times first, links from the index to
pages of its own (``extra``: path -> body size; size 0 answers 404).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class DemoSite:
    def __init__(self, pages: int = 25, *, disallow: tuple[str, ...] = (),
                 fail_first: dict[str, int] | None = None,
                 extra: dict[str, int] | None = None) -> None:
        self.pages = pages
        self.disallow = disallow            # robots.txt Disallow lines (none: no robots.txt)
        self.fail_first = dict(fail_first or {})   # path -> 503 answers before a 200
        self.extra = dict(extra or {})
        self.hits: dict[str, int] = {}
        self._lock = threading.Lock()
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                with site._lock:
                    site.hits[self.path] = n = site.hits.get(self.path, 0) + 1
                if n <= site.fail_first.get(self.path, 0):
                    self.send_error(503)
                    return
                body = site.render(self.path)
                if body is None:
                    self.send_error(404)
                    return
                data = body.encode()
                self.send_response(200)
                kind = "text/plain" if self.path == "/robots.txt" else "text/html"
                self.send_header("Content-Type", f"{kind}; charset=utf-8")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/"

    def paths(self) -> list[str]:
        return ["/"] + [f"/p/{n}" for n in range(self.pages)]

    def page_hits(self) -> dict[str, int]:
        """Requests per page of the crawl (robots.txt and extras left out)."""
        return {p: n for p, n in self.hits.items() if p in self.paths()}

    def links_of(self, path: str) -> list[str]:
        if path == "/":
            return ["/p/0", *self.extra]
        n = int(path.rsplit("/", 1)[1])
        targets = {(n + 1) % self.pages, (n * 7 + 3) % self.pages, (n // 2)}
        return ["/"] + [f"/p/{t}" for t in sorted(targets)]

    def render(self, path: str) -> str | None:
        if path == "/robots.txt":
            if not self.disallow:
                return None
            return "User-agent: *\n" + "".join(f"Disallow: {d}\n" for d in self.disallow)
        if self.extra.get(path):
            return f"<html><body>{'x' * self.extra[path]}</body></html>"
        if path not in self.paths():
            return None
        links = "".join(f'<li><a href="{link}">{link}</a></li>' for link in self.links_of(path))
        return f"<html><body><h1>{path}</h1><ul>{links}</ul></body></html>"

    def start(self) -> "DemoSite":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "DemoSite":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
