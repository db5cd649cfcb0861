"""The crawler, the example to start from: each job fetches one page with aiohttp and submits
the links on its host as child jobs (a start page that redirects to another host moves the
crawl there). Its ``run`` is ``async def``, so a pool process fetches many pages at once.

A job's dedupe key is its normalized URL, so a page is fetched once per dedupe scope, which
children inherit (``dedupe_scope="@fire"``: once per round of a periodic crawl). Its limit
key is its host, so ``LIMITS`` (e.g. ``{"*": {"concurrency": 8}}``) keeps a crawl polite
across all workers.

robots.txt is obeyed (see ``elric.demo.crawler_sync``, which holds what both crawlers
share), its Crawl-delay as the links' ``limit_interval``. A 5xx, 429, 408, timeout or broken
connection is retried after a backoff, no sooner than a Retry-After asks; another answer is
a result. nofollow is obeyed. ``max_bytes`` caps what is read of a page (nothing of what is
not HTML), ``max_depth`` the links followed from a start page (None: no cap),
``max_redirects`` the redirects in a row.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, TypeVar
from urllib.parse import urlsplit

try:
    import aiohttp
    import lxml.etree
    import lxml.html
except ImportError:  # pragma: no cover - depends on the install
    raise ImportError("the async crawler needs the crawl extra: "
                      "pip install '/path/to/elric[crawl]'") from None

from elric import Job
from elric.demo.crawler_sync import (CHUNK, REDIRECTS, ROBOTS_MAX_BYTES, ROBOTS_NAME, USER_AGENT,
                                     PageJob, Robots, RobotsUnavailable, cached_robots, header_url,
                                     kept_out, link_jobs, link_of, no_answer, nofollow,
                                     normalize_url, page_codec, refresh_url, result_of,
                                     retry_after, robots_answered, sniffed_html, worth_retrying)

HEADER_MAX_BYTES = 64 * 1024
TURN = 100   # links resolved or submitted between two turns of the process's other jobs
_BASE_HREF = lxml.etree.XPath("//base/@href")   # compiled once
# <meta name="robots">, or its own name (as name="googlebot" is Google's), in any case
_NAME = "translate(@name, 'ABCDEFGHIJKLMNOPQRSTUVWXYZ', 'abcdefghijklmnopqrstuvwxyz')"
_ROBOTS_META = lxml.etree.XPath(
    f"//meta[{_NAME} = 'robots' or {_NAME} = '{ROBOTS_NAME}']/@content")
_REFRESH = lxml.etree.XPath(
    "//meta[translate(@http-equiv, 'REFSH', 'refsh') = 'refresh']/@content")
# the hrefs of links (<a>, <area>) whose rel has no token nofollow (in any case), and the src
# of frames (a page of its own: a link), in the page's order; not(@rel) first: most links
# have none, and skip the string work
_HREFS = lxml.etree.XPath("(//a | //area)[not(@rel) or not(contains(concat(' ', translate("
                          "normalize-space(@rel), 'NOFLW', 'noflw'), ' '), ' nofollow '))]"
                          "/@href | //frame/@src | //iframe/@src")


class ServerError(Exception):
    """A 5xx (or 429 or 408) answer: worth another attempt after a backoff, of at least
    ``retry_after`` seconds when the answer asked for it."""

    def __init__(self, url: str, response: aiohttp.ClientResponse) -> None:
        super().__init__(f"{url}: HTTP {response.status}")
        self.retry_after = retry_after(response.status, response.headers)


class _Process:
    """What one pool process shares between its crawl jobs: one HTTP session (its
    connection pool) and the robots.txt rules it has read, per host and round."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.robots: dict[tuple[str, str], asyncio.Future] = {}
        # per dedupe scope: link -> the job that submitted it
        self.submitted: dict[str | None, dict[str, str]] = {}
        self.resolved: dict[tuple[str, str], tuple[str, str]] = {}   # see resolve()

    def first_time(self, scope: str | None, link: str, job_id: str) -> bool:
        """Whether this process has not yet submitted ``link`` in ``scope``, but from job
        ``job_id`` itself (a failed attempt's children are never sent: its retry sends them).
        Most links were seen before: dropped here, they spare the master's dedupe filter."""
        seen = self.submitted.setdefault(scope, {})
        if seen.get(link, job_id) != job_id:
            return False
        if len(seen) >= 100_000 or len(self.submitted) > 100:   # bound the memory
            self.submitted.clear()
            seen = self.submitted[scope] = {}
        seen[link] = job_id
        return True

    def resolve(self, base: str, href: str, codec: str = "utf-8") -> tuple[str, str]:
        """The normalized URL ``href`` leads to from page ``base`` (in ``codec``), and its
        host (both "" when it leads nowhere). A site's pages share most links (its menus): an
        href from the root, or naming its host, is parsed once per host and process."""
        key = (base, href, codec)
        if href.startswith(("/", "http://", "https://")):
            path_at = base.find("/", base.find("//") + 2)
            key = (base if path_at < 0 else base[:path_at], href, codec)   # scheme://host:port
        found = self.resolved.get(key)
        if found is None:
            link = link_of(base, href, codec)
            found = ("", "") if link is None else (link, urlsplit(link).netloc)
            if len(self.resolved) >= 100_000:   # bound the memory
                self.resolved.clear()
            self.resolved[key] = found
        return found

    def http(self) -> aiohttp.ClientSession:
        """The session; each request names its timeout (its job class's, not the first's)."""
        if self.session is None or self.session.closed:
            self.session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                headers={"User-Agent": USER_AGENT},
                # no cookies: a page's answer must not hang on what the process fetched before
                cookie_jar=aiohttp.DummyCookieJar(),
                # a header line of up to 64 KiB, as urllib reads (aiohttp's 8 KiB fails a
                # page with a large Content-Security-Policy or cookie)
                max_line_size=HEADER_MAX_BYTES, max_field_size=HEADER_MAX_BYTES)
        return self.session

    async def allowed(self, url: str, round_: str, timeout: float) -> Robots | None:
        """The rules of ``url``'s robots.txt in this round if they allow it, else None."""
        # one fetch per host and round; the jobs that ask meanwhile wait for it, and one
        # that failed is asked again
        rules, path = cached_robots(
            self.robots, url, round_,
            lambda read: not read.done() or read.exception() is None and read.result().fresh(),
            lambda origin: asyncio.ensure_future(self._read_robots(origin, timeout)))
        found = await asyncio.shield(rules)
        return found if found.allows(path) else None

    async def _read_robots(self, origin: str, timeout: float) -> Robots:
        url, body = origin + "/robots.txt", b""
        try:
            async with self.http().get(url, timeout=aiohttp.ClientTimeout(total=timeout)) \
                    as response:
                if robots_answered(url, response.status, response.headers):
                    body, _ = await _read(response, ROBOTS_MAX_BYTES)   # not all of a huge one
        except TimeoutError:
            raise RobotsUnavailable(url, f"no answer in {timeout} s") from None
        except aiohttp.TooManyRedirects:
            pass   # RFC 9309: as if there were none
        except (aiohttp.ClientError, OSError) as exc:   # no connection, or a broken one
            raise RobotsUnavailable(url, f"{type(exc).__name__}: {exc}") from None
        return Robots.read(body)


_process = _Process()


async def _read(response: aiohttp.ClientResponse, limit: int) -> tuple[bytes, bool]:
    """At most ``limit`` bytes of the body, and whether there was more."""
    body = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        body += chunk
        if len(body) > limit:
            return bytes(body[:limit]), True
    return bytes(body), False


T = TypeVar("T")


async def _in_turns(items: list[T]) -> AsyncIterator[T]:
    """``items``, giving the process's other jobs a turn every TURN of them: a page of many
    links would stall them all."""
    for n, item in enumerate(items, 1):
        yield item
        if n % TURN == 0:
            await asyncio.sleep(0)


# the page as page_codec reads it, handed to lxml in UTF-8 (its <meta> charset unheeded)
_UTF8 = lxml.html.HTMLParser(encoding="utf-8")


class Crawl(PageJob, Job):
    max_retries = 3
    timeout = 60
    request_timeout = 20.0

    async def run(self, url: str, batch: str = "", depth: int = 0, redirects: int = 0) -> dict:
        """Crawl page ``url``, ``depth`` links from its start page, reached by ``redirects``
        redirects in a row."""
        fetched: set[str] = set()
        while True:   # a redirect the job follows itself (see result_of)
            fetched.add(normalize_url(url))
            result, target = await self._page(url, batch, depth, redirects, frozenset(fetched))
            if target is None:
                return result
            url, redirects = target, redirects + 1

    async def _page(self, url: str, batch: str, depth: int, redirects: int,
                    fetched: frozenset[str]) -> tuple[dict, str | None]:
        """Crawl page ``url``: its result, and where a redirect leads that the job follows."""
        try:
            robots = await _process.allowed(url, self.dedupe_scope or batch,
                                            self.request_timeout)
        except RobotsUnavailable as exc:
            return kept_out(self, url, exc), None
        if robots is None:
            return kept_out(self, url), None
        try:
            # normalized, as ``fetched`` knows a loop by it
            async with _process.http().get(
                    normalize_url(url),
                    timeout=aiohttp.ClientTimeout(total=self.request_timeout),
                    allow_redirects=False) as response:
                status = response.status
                if worth_retrying(status):
                    raise ServerError(url, response)
                location = response.headers.get("Location") if status in REDIRECTS else None
                if location and not location.isascii():   # aiohttp's bytes not UTF-8: escapes
                    location = header_url(location.encode("utf-8", "surrogateescape"))
                if location is None:
                    # content_type is lower-case; none said: read, HTML if it starts as HTML
                    html = status < 300 and ("html" in response.content_type
                                             if response.headers.get("Content-Type") else None)
                    # a PDF, an image, an error page, a 3xx to nowhere: nothing to read
                    body, truncated = await _read(response, self.max_bytes) \
                        if html is not False else (b"", False)
                    if html is None:
                        html = sniffed_html(body)
                        body, truncated = (body, truncated) if html else (b"", False)
                    charset = response.charset
                    tags = response.headers.getall("X-Robots-Tag", [])
        except TimeoutError:
            raise no_answer(url, self.request_timeout) from None
        result, follow, link = result_of(url, status, redirects, location, self.max_redirects,
                                         fetched)
        if link is not None:   # no step deeper; from the start page, to any host
            result["links"] = await self._submit(
                url, [(link, urlsplit(link).netloc)], batch, depth, robots.delay,
                anywhere=depth == 0, redirects=redirects + 1)
        if location is not None:
            return result, follow
        result["bytes"] = len(body)
        if truncated:
            result["truncated"] = True
        if not html:
            return result, None   # a 404 is an answer: nothing to retry, no links to follow
        if self.max_depth is not None and depth >= self.max_depth:
            result["max_depth"] = True   # its links are a step too far: not followed
            return result, None
        # the robots <meta> said in HTTP: its links are not followed
        links = [] if any(map(nofollow, tags)) else await self._links(url, body, charset)
        result["links"] = await self._submit(url, links, batch, depth + 1, robots.delay)
        return result, None

    @staticmethod
    async def _links(base: str, html: bytes, charset: str | None) -> list[tuple[str, str]]:
        """The links of ``html`` (in ``charset``), relative to ``base``: (URL, host)."""
        codec = page_codec(charset, html)
        try:   # lxml, in C: far less CPU than html.parser, which the sync crawler uses
            doc = lxml.html.fromstring(html.decode(codec, "replace").encode("utf-8", "replace"),
                                       parser=_UTF8) if html.strip() else None
        except (lxml.etree.ParserError, ValueError):
            doc = None   # not a document lxml can read: no links
        if doc is None:
            return []
        if any(nofollow(content) for content in _ROBOTS_META(doc)):
            return []
        given = _BASE_HREF(doc)
        if given:   # <base href>: what the page's links are relative to
            base = link_of(base, given[0]) or base
        # in the page's order, each once (a child's id follows its place: a rerun of the
        # page, in any process, gives each link the id it had)
        hrefs = [*filter(None, map(refresh_url, _REFRESH(doc))), *_HREFS(doc)]
        return list(dict.fromkeys([_process.resolve(base, href, codec)
                                   async for href in _in_turns(hrefs)]))

    async def _submit(self, url: str, links: list[tuple[str, str]], batch: str, depth: int,
                      delay: float | None = None, anywhere: bool = False,
                      redirects: int = 0) -> int:
        """Submit the links, (URL, host), that stay on ``url``'s host (``anywhere``: on any),
        as jobs at ``depth`` (after ``redirects`` redirects in a row) that start ``delay``
        seconds apart at least (its robots.txt's Crawl-delay); returns how many."""
        args, options = link_jobs(batch, depth, redirects, delay)
        host = None if anywhere else urlsplit(normalize_url(url)).netloc
        found = 0
        async for link, link_host in _in_turns(links):
            if not link_host or host not in (None, link_host):
                continue   # another host (or no link: "")
            found += 1
            if _process.first_time(self.dedupe_scope, link, self.job_id):
                type(self).submit_with(args=[link, *args], **options)
        return found
