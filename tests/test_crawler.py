"""The example crawlers against a site the test serves on 127.0.0.1, with a real master and
worker: every page fetched exactly once; robots.txt obeyed; a 5xx retried, a 404 not; a
page over the size cap cut off."""

from __future__ import annotations

import asyncio
import html
import json
import threading
import time
import types
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from examples.crawler import Crawl, normalize_url
from examples.crawler_sync import CrawlSync
from elric.demo.crawler_sync import retry_after
from examples.site import DemoSite
from tests.conftest import wait_for

BIG = 3 * 1024 * 1024   # over Crawl.max_bytes


def crawl(cluster, site: DemoSite, job_class, batch: str = "site") -> dict[str, dict]:
    """Crawl ``site`` from its index and wait until every job is done; returns the jobs of
    the crawl by the URL path they fetched."""
    c = cluster.client
    c.submit_job(job_class.spec([site.url, batch], job_id=f"{batch}-start", batch=batch,
                                dedupe_scope=batch))

    def finished():
        stats = c.stats()
        live = sum(stats["by_status"][s] for s in ("queued", "running", "retrying"))
        done = stats["batches"].get(batch, {})
        return live == 0 and done.get("succeeded", 0) + done.get("failed", 0) == \
            done.get("submitted", -1)

    wait_for(finished, timeout=90, what="the crawl finished")
    jobs = [c.get_job(j["job_id"]) for j in c.list_jobs(batch=batch, limit=1000)]
    root = site.url.rstrip("/")
    return {j["args"][0].removeprefix(root): j for j in jobs}


def reachable(site: DemoSite, disallowed=()) -> set[str]:
    seen, todo = set(), ["/"]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        if path not in disallowed and path in site.paths():
            todo.extend(site.links_of(path))
    return seen


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_every_page_is_fetched_exactly_once(cluster, job_class):
    cluster.start_worker("--queues", "crawl", "--concurrency", "2")
    with DemoSite(pages=30) as site:
        jobs = crawl(cluster, site, job_class)
        assert site.page_hits() == {path: 1 for path in site.paths()}, cluster.logs()
    assert set(jobs) == set(site.paths())
    assert all(j["status"] == "succeeded" and j["attempts"] == 1 for j in jobs.values())
    assert all(j["result"]["links"] > 0 for j in jobs.values())
    assert {j["limit_key"] for j in jobs.values()} == {site.url.split("/")[2]}
    stats = cluster.client.stats()
    assert stats["by_status"]["filtered"] > 0  # links to pages seen before were dropped
    assert stats["batches"]["site"]["submitted"] == len(site.paths())


def test_robots_errors_retries_and_the_size_cap(make_cluster):
    c = make_cluster(RETRY_BACKOFF=0.05)
    c.start_master()
    c.start_worker("--queues", "crawl", "--concurrency", "2")
    site = DemoSite(pages=20, disallow=("/p/3",), fail_first={"/p/2": 2},
                    extra={"/gone": 0, "/big": BIG})
    with site:
        jobs = crawl(c, site, Crawl)
    expected = reachable(site, disallowed={"/p/3"})
    assert set(jobs) == expected, c.logs()
    assert all(j["status"] == "succeeded" for j in jobs.values()), c.logs()

    # robots.txt: the disallowed page is never fetched; the file is read once per round in
    # each pool process at most
    assert "/p/3" not in site.hits
    assert jobs["/p/3"]["result"]["robots"] == "disallowed"
    assert 1 <= site.hits["/robots.txt"] <= 2
    # a page that answers 503 twice is retried with backoff and then crawled
    assert (jobs["/p/2"]["attempts"], jobs["/p/2"]["result"]["status"]) == (3, 200)
    assert "HTTP 503" in jobs["/p/2"]["error"] and site.hits["/p/2"] == 3
    # a 404 is an answer, not an error: no retry
    assert (jobs["/gone"]["attempts"], jobs["/gone"]["result"]["status"]) == (1, 404)
    assert site.hits["/gone"] == 1
    # a page over the cap is read up to the cap
    big = jobs["/big"]["result"]
    assert (big["bytes"], big["truncated"]) == (Crawl.max_bytes, True)
    # every other page once
    assert all(site.hits[p] == 1 for p in expected - {"/p/2", "/p/3"})


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_crawl_that_robots_txt_forbids_entirely_fetches_nothing_but_robots(cluster,
                                                                            job_class):
    """The sync crawler read no robots.txt: it fetched every page."""
    cluster.start_worker("--queues", "crawl", "--concurrency", "1")
    with DemoSite(pages=5, disallow=("/",)) as site:
        jobs = crawl(cluster, site, job_class)
        assert set(site.hits) == {"/robots.txt"}
    assert list(jobs) == ["/"] and jobs["/"]["result"]["robots"] == "disallowed"


def test_a_process_submits_each_link_once_per_scope_and_bounds_what_it_remembers():
    from elric.demo.crawler import _Process

    p = _Process()
    assert p.first_time("round-1", "http://a/p/1", "A")
    assert not p.first_time("round-1", "http://a/p/1", "B")   # the master never sees it again
    assert p.first_time("round-1", "http://a/p/1", "A")  # A again: that attempt may have failed
    assert p.first_time("round-2", "http://a/p/1", "B")  # another round fetches it again
    assert p.first_time(None, "http://a/p/1", "B")
    for n in range(100_000):
        p.first_time("round-3", f"http://a/p/{n}", "C")
    assert p.first_time("round-3", "http://a/p/new", "C")  # full: it forgot, starts afresh
    assert p.submitted == {"round-3": {"http://a/p/new": "C"}}
    assert p.first_time("round-1", "http://a/p/1", "B")  # forgotten: the master drops it


def test_a_link_resolved_once_per_host_is_the_link_of_every_page():
    """A root-relative or absolute href is parsed once per host; a relative one still
    depends on the page it is on."""
    from elric.demo.crawler import _Process

    p = _Process()
    assert p.resolve("http://A:8/p/1", "/p/2#top") == ("http://a:8/p/2", "a:8")
    assert p.resolve("http://A:8/d/e/f?x=1", "/p/2#top") == ("http://a:8/p/2", "a:8")
    assert len(p.resolved) == 1                            # one parse for both pages
    assert p.resolve("https://A:8/p/1", "/p/2") == ("https://a:8/p/2", "a:8")  # not http
    assert p.resolve("http://a:8/p/1", "q") == ("http://a:8/p/q", "a:8")
    assert p.resolve("http://a:8/d/e", "q") == ("http://a:8/d/q", "a:8")
    assert p.resolve("http://a:8", "/../x/./y") == ("http://a:8/x/y", "a:8")
    assert p.resolve("http://a:8/p/1", "HTTPS://B/z") == ("https://b/z", "b")
    assert p.resolve("https://a:8/p/1", "//b/z") == ("https://b/z", "b")


def submit_links(url: str, html: bytes, charset: str | None = None) -> int:
    """What a crawl job does with a page it fetched: submit its links (on its host)."""
    async def submit():
        return await Crawl()._submit(url, await Crawl._links(url, html, charset), "b", 1)

    return asyncio.run(submit())


@pytest.mark.parametrize("body", [b"", b"   ", b"\x00\xff<<<", b"<html><body>no links"])
def test_a_page_lxml_cannot_read_or_without_links_gives_none(body):
    assert submit_links("http://a/", body) == 0


# --- one page at a time, in this process, against a site served here on 127.0.0.1 ---


class Site:
    """Answers each path with its route: ``(status, headers, body)``, or a function given
    the request handler; any other path is a 404."""

    def __init__(self, routes: dict) -> None:
        self.hits: dict[str, int] = {}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                site.hits[self.path] = site.hits.get(self.path, 0) + 1
                route = routes.get(self.path, (404, {}, b""))
                if callable(route):
                    return route(self)
                status, headers, body = route
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        site = self
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def __enter__(self) -> "Site":
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def children(monkeypatch):
    """Crawl jobs run here as in a pool process (a process state of their own); the links
    they submit land in the list this returns."""
    from elric.demo import crawler, crawler_sync
    from elric.job import _current, _RunContext

    monkeypatch.setattr(crawler, "_process", crawler._Process())
    monkeypatch.setattr(crawler_sync, "_robots", {})
    ctx = _RunContext("parent", {})
    token = _current.set(ctx)
    yield ctx.children
    _current.reset(token)


def fetch(job, url: str, depth: int = 0, *more) -> dict:
    """``job.run(url)`` on an event loop of its own, as one crawl job."""
    from elric.demo import crawler

    async def run():
        try:
            return await job.run(url, "b", depth, *more)
        finally:
            if crawler._process.session is not None:
                await crawler._process.session.close()

    return asyncio.run(run())


def links(children) -> list[str]:
    return [spec["args"][0] for spec in children]


def test_a_link_that_does_not_parse_is_skipped_not_the_page(children):
    page = b'<html><body><a href="http://[oops/">bad</a><a href="/a">a</a></body></html>'
    assert submit_links("http://h/", page) == 1
    assert links(children) == ["http://h/a"]
    with Site({"/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert CrawlSync().run(site.url + "/")["links"] == 1
    assert links(children)[1:] == [site.url + "/a"]


def test_a_port_out_of_range_is_no_link_and_an_empty_one_the_default(children):
    """http://h:99999/ was a link (a start page's redirect there a job that failed every
    attempt: aiohttp's InvalidURL); http://h:/a, which browsers read as http://h/a, another
    host: not followed."""
    from elric import SpecError
    from elric.demo.crawler_sync import link_of

    for href in "http://h:99999/", "http://h:8a/", "//h:-1/":
        assert link_of("http://h/", href) is None, href
    with pytest.raises(SpecError):
        Crawl.spec(["http://h:99999/"])
    page = b'<html><body><a href="http://h:/a">a</a><a href="https://[::1]:/b">b</a></body>'
    assert submit_links("http://h/", page) == 1
    assert links(children) == ["http://h/a"]
    assert normalize_url("https://[::1]:/b") == "https://[::1]/b"


def test_a_link_too_long_for_a_browser_is_not_followed(children):
    """A link of 100,000 characters was a job (its URL stored twice, as argument and dedupe
    key) that most servers answer 414; a site whose pages link to a longer URL each (href
    "a/" on a page served at any path) made ever longer ones until they did. Browsers and
    Scrapy stop at 2,083 characters."""
    def page(*paths):
        return "<html><body>{}</body></html>".format(
            "".join(f'<a href="{path}">x</a>' for path in paths)).encode()

    ok, long = "/" + "a" * (2083 - len("http://h/")), "/" + "a" * 2083
    assert submit_links("http://h/", page(ok, long, "/b" * 50_000)) == 1
    assert links(children) == ["http://h" + ok]
    with Site({"/": (200, {"Content-Type": "text/html"}, page(long, "/c"))}) as site:
        assert CrawlSync().run(site.url + "/")["links"] == 1


def test_whitespace_around_an_href_is_not_part_of_the_link(children):
    """As browsers read it: a trailing space was sent as /a%20, a 404."""
    page = b'<html><body><a href="/a ">a</a><a href=" /b\t">b</a></body></html>'
    assert submit_links("http://h/", page) == 2
    assert links(children) == ["http://h/a", "http://h/b"]
    with Site({"/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert CrawlSync().run(site.url + "/")["links"] == 2
    assert links(children)[2:] == [site.url + "/a", site.url + "/b"]


def test_a_backslash_in_a_links_path_is_a_slash_as_browsers_read_it(children):
    """A Windows-made href="sub\\page.html" was fetched with its backslash (nginx: a 404,
    and /docs/sub/page.html another dedupe key); browsers read a backslash in an http(s)
    URL's path as a slash (WHATWG URL), "\\\\host\\x" as another host; the query keeps it
    (escaped)."""
    from elric.demo.crawler_sync import link_of

    page = (b'<html><body><a href="sub\\page.html">a</a><a href="\\top\\b?q=a\\b">b</a>'
            b'<a href="\\\\elsewhere\\x">c</a></body></html>')
    assert link_of("http://h/docs/", "\\\\elsewhere\\x") == "http://elsewhere/x"
    assert submit_links("http://h/docs/", page) == 2
    assert links(children) == ["http://h/docs/sub/page.html", "http://h/top/b?q=a%5Cb"]
    children.clear()
    with Site({"/docs/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert CrawlSync().run(site.url + "/docs/")["links"] == 2
    assert links(children) == [site.url + "/docs/sub/page.html", site.url + "/top/b?q=a%5Cb"]


def test_only_http_links_are_followed(children):
    """An ftp: or ws: link to the crawl's host was submitted, and failed in aiohttp."""
    def page(host):
        return (f'<html><body><a href="ftp://{host}/f">f</a><a href="ws://{host}/w">w</a>'
                f'<a href="mailto:a@{host}">m</a><a href="javascript:go()">j</a>'
                f'<a href="HTTPS://{host}/s">s</a></body></html>').encode()

    assert submit_links("http://h/", page("h")) == 1
    assert links(children) == ["https://h/s"]
    routes = {}
    with Site(routes) as site:
        routes["/"] = (200, {"Content-Type": "text/html"}, page(site.url.split("/")[2]))
        assert CrawlSync().run(site.url + "/")["links"] == 1


def test_a_default_port_is_no_other_host_nor_another_page(children):
    """http://h:80/a was a link to another host (not followed) and another dedupe key."""
    page = b'<html><body><a href="http://h:80/a">a</a><a href="https://H:443/b">b</a></body>'
    assert submit_links("http://h:80/", page) == 2
    assert links(children) == ["http://h/a", "https://h/b"]
    assert Crawl.dedupe_key_for("HTTP://h:80/a#x") == Crawl.dedupe_key_for("http://h/a")
    assert normalize_url("https://h:80/") == "https://h:80/"   # not https's default


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_host_with_a_trailing_dot_is_the_same_host(children, job_class):
    """example.com. (fully qualified) and example.com are one host: it was another, with a
    limit key, a robots.txt and dedupe keys of its own, and its links to example.com were
    off the crawl's host."""
    assert normalize_url("http://Example.COM./a") == "http://example.com/a"
    assert normalize_url("http://u@h.:8/b?x=a.") == "http://u@h:8/b?x=a."
    assert normalize_url("http://bücher.example./") == "http://xn--bcher-kva.example/"
    assert job_class.spec(["http://example.com.:80/"])["limit_key"] == "example.com"
    assert job_class.dedupe_key_for("http://h./a") == job_class.dedupe_key_for("http://h/a")
    found = [normalize_url(link) for link in ("http://h/a", "http://h./b")]   # as link_of
    submitted = asyncio.run(Crawl()._submit("http://h./", [(link, "h") for link in found],
                                            "b", 1)) if job_class is Crawl \
        else CrawlSync()._submit("http://h./", found, "b", 1)
    assert submitted == 2 and links(children) == ["http://h/a", "http://h/b"]


def test_dot_segments_are_no_other_page(children):
    """A link spelled with the host and a .. or . (http://h/x/../a) kept them: another dedupe
    key for /a, fetched twice; a relative one was resolved (urljoin)."""
    page = (b'<html><body><a href="/a">a</a><a href="http://h/x/../a">a</a>'
            b'<a href="HTTP://H/./a">a</a><a href="http://h/b/c/..">b</a></body></html>')
    assert submit_links("http://h/", page) == 2
    assert links(children) == ["http://h/a", "http://h/b/"]
    for url in ("http://h/x/../a", "http://h/%2e%2E/a", "http://h/./a?x=/../"):
        assert Crawl.dedupe_key_for(url).split("?")[0] == "http://h/a", url
    assert normalize_url("http://h/.well-known/a//b/") == "http://h/.well-known/a//b/"


def test_a_character_a_url_may_not_hold_raw_is_the_escape_aiohttp_sends(children):
    """/a<b and /a%3Cb, ?q="x" and ?q=%22x%22 (or |, {}, [], ^, `) were two dedupe keys each,
    the same request on the wire (aiohttp escapes what RFC 3986 keeps out of a URL): one page
    fetched twice."""
    import yarl

    pairs = [("/a<b>", "/a%3cb%3E"), ('/s?q="a b"', "/s?q=%22a%20b%22"), ("/a|b", "/a%7Cb"),
             ("/{x}^`", "/%7Bx%7D%5E%60"), ("/q?a[]=1\\", "/q?a%5B%5D=1%5C")]
    for raw, escaped in pairs:
        key = normalize_url("http://h" + raw)
        assert key == normalize_url("http://h" + escaped) == str(yarl.URL(key)), raw
    assert normalize_url("http://h/a;b=c,d?e=$&f=@:/?") == "http://h/a;b=c,d?e=$&f=@:/?"
    page = b'<html><body><a href="/a|b">1</a><a href="/a%7cb">2</a></body></html>'
    assert submit_links("http://h/", page) == 1
    assert links(children) == ["http://h/a%7Cb"]


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_semicolon_in_a_links_last_segment_is_part_of_its_path(children, job_class):
    """urlparse takes ";v=2" of a last segment for "params" apart from the path, and the
    URL was rebuilt without them: /a;v=2 (a jsessionid, a matrix parameter, a file named
    so) was fetched as /a, another page, and the page it named never."""
    page = b'<html><body><a href="/a;v=2">a</a><a href="b;x?q=1">b</a></body></html>'
    routes = {"/": (200, {"Content-Type": "text/html"}, page),
              "/a;v=2": (200, {"Content-Type": "text/html"}, b"<html>v2</html>")}
    with Site(routes) as site:
        assert run_page(job_class, site.url + "/")["links"] == 2
        assert links(children) == [site.url + "/a;v=2", site.url + "/b;x?q=1"]
        assert run_page(job_class, links(children)[0], 1)["status"] == 200
    assert "/a" not in site.hits and site.hits["/a;v=2"] == 1
    assert job_class.dedupe_key_for("http://h/a;v=2") != job_class.dedupe_key_for("http://h/a")


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_query_in_another_order_is_the_same_page(job_class):
    """?a=1&b=2 and ?b=2&a=1 were two dedupe keys: a site that builds its links' queries
    in no fixed order (filters, facets) had each page fetched once per order. A name given
    twice keeps its order (?a=1&a=2 may not be ?a=2&a=1)."""
    def key(url):
        return job_class.dedupe_key_for(url)

    assert key("http://h/p?b=2&a=1&c") == key("http://h/p?a=1&b=2&c") == "http://h/p?a=1&b=2&c"
    assert key("http://h/p?x=2&a=1&x=1") == "http://h/p?a=1&x=2&x=1" != key("http://h/p?x=1&x=2")
    assert key("http://h/p?b&a") != key("http://h/p?b=&a")   # not even "b" is "b="
    assert job_class.spec(["http://h/p?b=2&a=1"])["args"][0] == "http://h/p?b=2&a=1"


@pytest.mark.parametrize("charset", ["utf-8", "windows-1252"])
def test_a_page_is_read_in_the_charset_its_content_type_names(children, charset):
    """Without a <meta> charset lxml read UTF-8 as Latin-1: /café became /cafÃ©, a 404."""
    page = '<html><body><a href="/café">c</a></body></html>'.encode(charset)
    kind = {"Content-Type": f"text/html; charset={charset}"}
    with Site({"/": (200, kind, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1
    assert links(children) == [site.url + "/caf%C3%A9"] * 2


@pytest.mark.parametrize("meta", [
    '<meta charset="windows-1252">', "<META Charset=windows-1252 />",
    '<meta http-equiv="Content-Type" content="text/html; charset=windows-1252">'])
def test_a_page_without_a_charset_in_its_content_type_is_read_in_its_meta_charset(
        children, meta):
    """The sync crawler read such a page as UTF-8: /café in windows-1252 became /caf%EF%BF%BD
    (a replacement character), a 404; lxml reads the <meta> itself."""
    page = f'<html><head>{meta}</head><body><a href="/café">c</a></body></html>'
    with Site({"/": (200, {"Content-Type": "text/html"}, page.encode("windows-1252"))}) \
            as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1
    assert links(children) == [site.url + "/caf%C3%A9"] * 2


@pytest.mark.parametrize("charset", ["utf-8", "windows-1252"])
def test_a_page_that_names_no_charset_is_read_as_utf_8_if_it_is(children, charset):
    """A page with no charset in its Content-Type nor a <meta> (nginx sends "text/html" as
    it is): the async crawler read it as Latin-1, so UTF-8 links came out garbled
    (/café as /cafÃ©, a 404), and the sync one as UTF-8 whatever it was (a windows-1252
    /café became /caf%EF%BF%BD). As browsers guess: UTF-8 if it reads as such, else
    windows-1252, a tail cut off mid-character (the size cap) still UTF-8."""
    page = '<html><body><a href="/café">c</a>é</body></html>'.encode(charset)
    with Site({"/": (200, {"Content-Type": "text/html"}, page),
               "/cut": (200, {"Content-Type": "text/html"}, page + "é".encode(charset))}) \
            as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1
        cut = len(page) + 1   # the first byte of the last é only, in UTF-8
        assert fetch(type("Cut", (Crawl,), {"max_bytes": cut})(), site.url + "/cut")["links"] == 1
        assert type("Cut", (CrawlSync,), {"max_bytes": cut})().run(site.url + "/cut")["links"] \
            == 1
    assert links(children) == [site.url + "/caf%C3%A9"] * 4


@pytest.mark.parametrize("codec,declared", [
    ("utf-8-sig", "iso-8859-1"), ("utf-16", None), ("utf-16-be", "utf-8"), ("utf-16-le", None)])
def test_a_page_that_starts_with_a_byte_order_mark_is_read_in_its_charset(children, codec,
                                                                         declared):
    """A byte order mark says the charset before a Content-Type does (browsers heed it
    first): a UTF-16 page was read as windows-1252 and gave no link, a UTF-8 one served
    as Latin-1 turned /café into /cafÃ©, a 404."""
    import codecs

    page = '<html><body><a href="/café">c</a></body></html>'.encode(codec)
    if codec.endswith("-be"):
        page = codecs.BOM_UTF16_BE + page
    elif codec.endswith("-le"):
        page = codecs.BOM_UTF16_LE + page
    kind = "text/html" + (f"; charset={declared}" if declared else "")
    with Site({"/": (200, {"Content-Type": kind}, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1
    assert links(children) == [site.url + "/caf%C3%A9"] * 2


@pytest.mark.parametrize("charset", ["iso-8859-1", "windows-1252"])
def test_a_links_query_is_escaped_in_its_pages_charset_as_browsers_send_it(children, charset):
    """A browser escapes a link's query in its page's charset (its path in UTF-8): on a
    Latin-1 page /s?q=é is /s?q=%E9, which was fetched as /s?q=%C3%A9, a search for "Ã©"."""
    page = '<html><body><a href="/s?q=é">s</a><a href="/café?q=ü&x=€&#937;#é">c</a></body></html>'
    kind = {"Content-Type": f"text/html; charset={charset}"}
    with Site({"/": (200, kind, page.encode("windows-1252"))}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 2
        assert CrawlSync().run(site.url + "/")["links"] == 2
    # Ω, which windows-1252 has not, as a browser sends it: "&#937;" escaped
    assert links(children) == [site.url + "/s?q=%E9",
                               site.url + "/caf%C3%A9?q=%FC&x=%80%26%23937%3B"] * 2


def test_a_meta_charset_after_the_first_kilobyte_is_heeded(children):
    """Found in the first 1024 bytes only, a <meta> after a long <head> was missed: a
    Shift_JIS page was read as windows-1252 (the async crawler read it with lxml's own
    <meta> reading before the charset was picked for it)."""
    page = (f'<html><head><!-- {"x" * 2000} --><meta charset="shift_jis"></head>'
            '<body><a href="/日本">j</a></body></html>').encode("shift_jis")
    with Site({"/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1
    assert links(children) == [site.url + "/%E6%97%A5%E6%9C%AC"] * 2


@pytest.mark.parametrize("charset, bad", [("shift_jis", b"\x81 "), ("gbk", b"\xff"),
                                          ("euc-kr", b"\xa1"), (None, b"\x81")],
                         ids=["shift_jis", "gbk", "euc-kr", "none-said"])
def test_links_after_a_byte_the_pages_charset_cannot_read_are_followed(children, charset, bad):
    """lxml (libxml2) stops reading a page at the first byte sequence its charset cannot
    read: one stray byte early in a Shift_JIS, GBK or EUC-KR page, or 0x81 in one that
    names no charset (read as windows-1252, where 0x81 is none; a Shift_JIS lead byte), and
    the async crawler followed none of the links after it. As browsers and the sync
    crawler: the byte reads as U+FFFD, the rest of the page as it is."""
    page = ('<html><body><a href="/a">a</a>{}<p>日本</p><a href="/b">b</a><a href="/日">c</a>'
            '</body></html>').format if charset else \
        '<html><body><a href="/a">a</a>{}<a href="/b">b</a><a href="/c">c</a></body></html>'.format
    kind = f"text/html; charset={charset}" if charset else "text/html"
    body = page("{}").encode(charset or "ascii").replace(b"{}", bad)
    with Site({"/": (200, {"Content-Type": kind}, body)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 3
        assert CrawlSync().run(site.url + "/")["links"] == 3
    assert links(children)[:3] == links(children)[3:]
    assert links(children)[2] == site.url + ("/%E6%97%A5" if charset else "/c")


@pytest.mark.parametrize("charset, codec, path", [
    ("Shift_JIS", "cp932", "/髙①"), ("gb2312", "gbk", "/镕"), ("EUC-KR", "cp949", "/똠"),
    ("windows-874", "cp874", "/ไทย"), ("tis-620", "cp874", "/ไทย"),
    ("iso-8859-1", "cp1252", "/€")])
def test_a_page_is_read_in_the_charset_browsers_read_for_its_label(children, charset, codec,
                                                                    path):
    """Sites label pages written in Windows' supersets by the older standard's name (Shift_JIS
    for Windows-31J, gb2312 for GBK, EUC-KR for Windows-949, ISO-8859-1 for windows-1252), and
    browsers read them so (the WHATWG Encoding Standard); Python's codecs are the strict ones:
    a link with a character of the superset became another URL (a 404). windows-874 (Thai),
    a name Python does not know, read as UTF-8: every Thai link garbled."""
    page = f'<html><body><a href="{path}">x</a></body></html>'.encode(codec)
    with Site({"/": (200, {"Content-Type": f"text/html; charset={charset}"}, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1
    assert links(children) == [normalize_url(site.url + path)] * 2


def test_a_page_with_a_long_header_is_read(children):
    """aiohttp refused a header line over 8 KiB (a large Content-Security-Policy or cookie,
    which sites send and browsers read) with "400, Got more than 8190 bytes": the page
    failed every attempt. urllib, in the sync crawler, reads up to 64 KiB."""
    page = (200, {"Content-Type": "text/html", "Content-Security-Policy": "x" * 20_000,
                  "Set-Cookie": "a=" + "b" * 9_000}, b'<html><body><a href="/a">a</a></body>')
    with Site({"/": page}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1
        assert CrawlSync().run(site.url + "/")["links"] == 1


def test_a_charset_lxml_does_not_know_reads_as_none(children):
    page = b'<html><body><a href="/a">a</a></body></html>'
    assert submit_links("http://h/", page, "x-no-such") == 1
    assert links(children) == ["http://h/a"]


def test_a_content_type_in_capitals_is_html_still(children):
    """Media types are case-insensitive: a Text/HTML page was taken for no HTML."""
    page = b'<html><body><a href="/a">a</a></body></html>'
    with Site({"/": (200, {"Content-Type": "Text/HTML; Charset=UTF-8"}, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == 1


def test_a_page_served_without_a_content_type_is_html_if_it_starts_as_html(children):
    """A server that sent no Content-Type (a CGI script's, a misconfigured one's) had its
    pages taken for no HTML: none of their links was followed, and the crawl ended there.
    Browsers sniff such a body (the MIME Sniffing Standard): HTML if it starts with a tag."""
    page = b'\n  <!DOCTYPE html><html><body><a href="/a">a</a></body></html>'
    routes = {"/": (200, {}, page), "/div": (200, {}, b'<DIV><a href="/a">a</a></DIV>'),
              "/png": (200, {}, b'\x89PNG\r\n\x1a\n<a href="/a">'),
              "/text": (200, {}, b'links: <a href="/a">a</a>')}
    with Site(routes) as site:
        for path, found in ("/", 1), ("/div", 1), ("/png", 0), ("/text", 0):
            for result in fetch(Crawl(), site.url + path), CrawlSync().run(site.url + path):
                assert result["links"] == found, path
                assert result["bytes"] == (len(routes[path][2]) if found else 0), path
    assert links(children) == [site.url + "/a"] * 4


def test_links_are_relative_to_a_base_href(children):
    """A page's links were resolved against its own URL, not its <base href>: 404s."""
    page = (b'<html><head><base href="/docs/v2/"></head><body><a href="intro">i</a>'
            b'<a href="/top">t</a></body></html>')
    with Site({"/docs/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert fetch(Crawl(), site.url + "/docs/")["links"] == 2
        assert CrawlSync().run(site.url + "/docs/")["links"] == 2
    assert links(children) == [site.url + "/docs/v2/intro", site.url + "/top"] * 2


@pytest.mark.parametrize("content, path", [
    ("0; url=/moved", "/moved"), ("0;URL='/q uoted'", "/q%20uoted"), ('3, url="next"', "/d/next"),
    ("0.5 /bare", "/bare"), ("5", None), ("0; url=http://localhost/off", None), ("", None)])
def test_a_meta_refresh_leads_to_a_link_of_its_page(children, content, path):
    """<meta http-equiv="refresh" content="0; url=..."> (a page that moved, said in HTML)
    was not read: the page it leads to was never crawled. Its URL is a link of the page,
    relative to it, on the crawl's host only; without one it reloads the page itself."""
    page = (f'<html><head><meta http-equiv="Refresh" content="{html.escape(content)}">'
            '</head><body>moved</body></html>').encode()
    with Site({"/d/": (200, {"Content-Type": "text/html"}, page)}) as site:
        expected = [] if path is None else [site.url + path]
        assert fetch(Crawl(), site.url + "/d/")["links"] == len(expected)
        assert CrawlSync().run(site.url + "/d/")["links"] == len(expected)
    assert links(children) == expected * 2


@pytest.mark.parametrize("head, followed", [
    (b'<meta name="robots" content="noindex">', 2),   # we index nothing: no change
    (b'<meta name="Robots" content="noindex, NoFollow">', 0),
    (b'<meta name="robots" content="none">', 0),
    (b'<meta name="Elric-Crawler" content="nofollow">', 0),   # its own name: for it alone
    (b'<meta name="elric-crawler" content="noindex"><meta name="robots" content="nofollow">',
     0),
    (b'<meta name="googlebot" content="nofollow">', 2)])
def test_links_marked_nofollow_are_not_followed(children, head, followed):
    """rel="nofollow" and a robots <meta> saying nofollow (or none) were not read: every
    link was followed; nor was a <meta> that names the crawler (as name="googlebot" does)."""
    page = (b"<html><head>" + head + b'</head><body><a href="/a">a</a>'
            b'<a rel="external  NOFOLLOW" href="/b">b</a><a rel="nofollowed" href="/c">c</a>'
            b"</body></html>")
    with Site({"/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == followed
        assert CrawlSync().run(site.url + "/")["links"] == followed
    assert links(children) == [site.url + "/a", site.url + "/c"] * followed   # each crawler


def tagged(tags: list[str], page: bytes):
    """A route that answers ``page`` with an X-Robots-Tag header for each of ``tags``."""
    def route(handler):
        handler.send_response(200)
        for name, value in [("Content-Type", "text/html"), *[("X-Robots-Tag", t) for t in tags],
                            ("Content-Length", str(len(page)))]:
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(page)
    return route


@pytest.mark.parametrize("tags, followed", [
    (["noindex"], 2), (["noindex, NoFollow"], 0), (["none"], 0), (["otherbot: nofollow"], 2),
    (["Elric-Crawler: nofollow"], 0), (["elric-crawler: noindex", "elric-crawler:none"], 0),
    (["unavailable_after: 25 Jun 2010 15:00:00 PST", "nofollow"], 0),
    (["max-snippet:20, nofollow"], 0)])
def test_a_page_whose_x_robots_tag_says_nofollow_has_its_links_not_followed(children, tags,
                                                                            followed):
    """The X-Robots-Tag header (a robots <meta> said in HTTP, for any page, or for the
    crawler it names) was not read: every link of a page it marked nofollow was followed."""
    page = b'<html><body><a href="/a">a</a><a href="/c">c</a></body></html>'
    with Site({"/": tagged(tags, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == followed
        assert CrawlSync().run(site.url + "/")["links"] == followed
    assert links(children) == [site.url + "/a", site.url + "/c"] * followed   # each crawler


@pytest.mark.parametrize("tags, followed", [
    (["googlebot: nofollow, otherbot: noindex"], 2), (["googlebot: nofollow", "otherbot: none"], 2),
    (["googlebot: noindex, elric-crawler: nofollow"], 0),
    (["elric-crawler: noindex, otherbot: nofollow"], 2), (["otherbot: noindex, nofollow"], 2),
    (["otherbot: noindex", "nofollow"], 0), (["elric-crawler: nofollow, otherbot: noindex"], 0),
    (["unavailable_after: Wednesday, 03-Nov-2027 15:00:00 PST, otherbot: nofollow"], 2)])
def test_an_x_robots_tag_naming_crawlers_holds_for_each_until_the_next_name(children, tags,
                                                                           followed):
    """As Google reads it: a crawler's name applies to the directives after it, up to the
    next name. Only the first name of a line was read, its directives the rest of the line:
    "elric-crawler: noindex, otherbot: nofollow" kept this crawler from every link, and
    "googlebot: noindex, elric-crawler: nofollow" let it follow them all."""
    page = b'<html><body><a href="/a">a</a><a href="/c">c</a></body></html>'
    with Site({"/": tagged(tags, page)}) as site:
        assert fetch(Crawl(), site.url + "/")["links"] == followed
        assert CrawlSync().run(site.url + "/")["links"] == followed
    assert links(children) == [site.url + "/a", site.url + "/c"] * followed   # each crawler


def test_image_map_areas_and_frames_are_links_of_their_page(children):
    """An image map's <area href> was not followed, nor a <frame> or <iframe>'s src: the
    pages only they lead to were never crawled. Each is a link, in the page's order."""
    page = (b'<html><body><img usemap="#m" src="/m.png"><map name="m"><area href="/area" '
            b'alt="x"><area rel="nofollow" href="/no" alt="x"></map><iframe src="/iframe">'
            b'</iframe><a href="/a">a</a></body></html>')
    frames = (b'<html><head></head><frameset cols="50%,50%"><frame src="/f1"><frame src="/f2">'
              b'</frameset></html>')
    with Site({"/": (200, {"Content-Type": "text/html"}, page),
               "/frames": (200, {"Content-Type": "text/html"}, frames)}) as site:
        for path, found in ("/", ["/area", "/iframe", "/a"]), ("/frames", ["/f1", "/f2"]):
            assert fetch(Crawl(), site.url + path)["links"] == len(found)
            assert CrawlSync().run(site.url + path)["links"] == len(found)
            assert links(children) == [site.url + link for link in found] * 2
            children.clear()


def test_a_page_is_fetched_without_the_cookies_other_pages_set(children):
    """A pool process's one HTTP session kept every cookie a site set: each later request to
    the host sent them (another crawl's, an earlier round's; a port is no other host to a
    cookie), so what a page served hung on what that process fetched before, and the jar grew
    with every host crawled. The sync crawler keeps none either."""
    from elric.demo import crawler

    sent = []

    def check(handler):
        sent.append(handler.headers.get("Cookie"))
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.send_header("Content-Length", "0")
        handler.end_headers()

    page = (200, {"Content-Type": "text/html", "Set-Cookie": "session=abc; Path=/"}, b"<html>")
    with Site({"/set": page, "/check": check}) as first, Site({"/check": check}) as other:
        async def run():
            try:
                for url in first.url + "/set", first.url + "/check", other.url + "/check":
                    # localhost: aiohttp keeps no cookie of an IP address
                    await Crawl().run(url.replace("127.0.0.1", "localhost"), "b")
            finally:
                await crawler._process.session.close()

        asyncio.run(run())
    assert sent == [None, None]


def test_other_jobs_of_the_process_go_on_while_a_page_of_many_links_is_read(children):
    """A page of 10,000 links took a second or two of Python to resolve and submit its
    links, and no other job of the pool process moved meanwhile (its fetches timed out, its
    leases went unrenewed): here another task of the loop gets turns in between."""
    from elric.demo import crawler

    n = 10_000
    page = "<html><body>{}</body></html>".format(
        "".join(f'<a href="/p/{i}">{i}</a>' for i in range(n))).encode()
    seen = set()   # (links resolved, links submitted) each time the other task ran

    async def run(url):
        job = asyncio.ensure_future(Crawl().run(url, "b"))
        try:
            while not job.done():
                seen.add((len(crawler._process.resolved), len(children)))
                await asyncio.sleep(0)
            return job.result()
        finally:
            await crawler._process.session.close()

    with Site({"/": (200, {"Content-Type": "text/html"}, page)}) as site:
        assert asyncio.run(run(site.url + "/"))["links"] == n
    assert len(children) == n
    assert any(0 < resolved < n for resolved, _ in seen), "no turn while resolving"
    assert any(0 < submitted < n for _, submitted in seen), "no turn while submitting"


class QuickCrawl(Crawl):
    request_timeout = 3.0


class QuickCrawlSync(CrawlSync):
    request_timeout = 1.5


def endless_robots(handler):
    """A robots.txt that never ends (until the crawler hangs up)."""
    handler.send_response(200)
    handler.send_header("Content-Type", "text/plain")
    handler.end_headers()
    try:
        handler.wfile.write(b"User-agent: *\nDisallow: /private\n")
        while True:
            handler.wfile.write(b"# " + b"x" * 2045 + b"\n")
    except OSError:   # the crawler hung up
        pass


@pytest.mark.parametrize("job_class", [QuickCrawl, QuickCrawlSync], ids=["async", "sync"])
def test_a_huge_robots_txt_is_read_up_to_a_cap(children, job_class):
    """robots.txt was read whole: one that never ended timed out, and every page of its
    host failed with it."""
    page = b'<html><body><a href="/a">a</a></body></html>'
    routes = {"/robots.txt": endless_robots, "/": (200, {"Content-Type": "text/html"}, page)}
    with Site(routes) as site:
        assert run_page(job_class, site.url + "/")["links"] == 1
        assert run_page(job_class, site.url + "/private")["robots"] == "disallowed"


@pytest.mark.parametrize("name, value", [
    ("request_timeout", 0), ("request_timeout", -1.0), ("request_timeout", "20"),
    ("request_timeout", float("nan")), ("request_timeout", None),
    ("max_bytes", 0), ("max_bytes", -1), ("max_bytes", "2MB"), ("max_bytes", 1e6),
    ("max_bytes", True), ("max_depth", -1), ("max_depth", "3"), ("max_depth", 2.0),
    ("max_depth", True), ("max_redirects", -1), ("max_redirects", None)])
def test_a_crawl_given_a_bad_size_or_timeout_says_so_where_it_is_defined(name, value):
    """A timeout of 0 meant none at all, a size of "2MB" failed every page when read."""
    with pytest.raises(ValueError, match=f"^Bad.{name} must be .*, not {value!r}"):
        type("Bad", (Crawl,), {name: value})
    type("Good", (Crawl,), {"request_timeout": 5, "max_bytes": 1024, "max_depth": 0})


def test_each_crawl_class_keeps_its_own_request_timeout(children):
    """The process's HTTP session took the request_timeout of the first class to use it."""
    from elric.demo import crawler

    answer = threading.Event()
    page = (200, {"Content-Type": "text/html"}, b"<html><body>hi</body></html>")
    with Site({"/": page, "/slow": lambda handler: answer.wait(30)}) as site:
        async def run():
            try:
                await Crawl().run(site.url + "/", "b")   # 20 s, and the session made
                t0 = time.monotonic()
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(QuickCrawl().run(site.url + "/slow", "b"), 10)
                return time.monotonic() - t0
            finally:
                await crawler._process.session.close()

        try:
            elapsed = asyncio.run(run())
        finally:
            answer.set()
    assert elapsed < QuickCrawl.request_timeout + 2


def test_a_server_that_does_not_answer_fails_the_attempt_saying_what_and_how_long(children):
    """The error recorded was a bare TimeoutError: neither the URL nor the time it had."""
    from elric.demo.crawler import RobotsUnavailable

    answer = threading.Event()
    routes = {"/robots.txt": lambda handler: answer.wait(30)}
    with Site(routes) as site:
        try:
            with pytest.raises(RobotsUnavailable,
                               match="^http://.*/robots.txt: no answer in 3.0 s: .*RFC 9309"):
                fetch(QuickCrawl(), site.url + "/slow")
            with pytest.raises(RobotsUnavailable,
                               match="^http://.*/robots.txt: no answer in 1.5 s: .*RFC 9309"):
                QuickCrawlSync().run(site.url + "/slow")
            routes["/slow"] = routes.pop("/robots.txt")   # robots.txt: 404, the page hangs
            with pytest.raises(TimeoutError, match="^http://.*/slow: no answer in 3.0 s$"):
                fetch(QuickCrawl(), site.url + "/slow")
            # the sync crawler's said "timed out", and its 10 s were no setting of its class
            with pytest.raises(TimeoutError, match="^http://.*/slow: no answer in 1.5 s$"):
                QuickCrawlSync().run(site.url + "/slow")
        finally:
            answer.set()


def redirect(to: str, status: int = 302):
    return (status, {"Location": to}, b"")


def run_page(job_class, url: str, depth: int = 0, *more) -> dict:
    """One page job of ``job_class``, async or not, run here (0: a start page)."""
    return fetch(job_class(), url, depth, *more) if issubclass(job_class, Crawl) \
        else job_class().run(url, "b", depth, *more)


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_where_a_redirect_leads_is_a_page_job_of_its_own(children, job_class):
    """A redirect was followed inside the job: a page that /old led to and a link also
    named was fetched twice, and a loop was retried to no end. Now the target is a child
    job, which the master dedupes with the links to that page. The sync crawler (urllib)
    went on following them: it fetched a page of another host (localhost is no
    127.0.0.1), and read the links of where it landed as relative to the first URL."""
    page = b'<html><body><a href="a">a</a></body></html>'
    routes = {"/old": redirect("new/", 301), "/new/": (200, {"Content-Type": "text/html"}, page),
              "/loop": redirect("/loop"), "/odd": redirect("mailto:x@y")}
    with Site(routes) as site:
        routes["/away"] = redirect(site.url.replace("127.0.0.1", "localhost") + "/new/")
        assert run_page(job_class, site.url + "/old") == {
            "url": site.url + "/old", "status": 301, "links": 1, "bytes": 0,
            "redirect": site.url + "/new/"}
        assert links(children) == [site.url + "/new/"] and "/new/" not in site.hits
        assert run_page(job_class, site.url + "/loop")["links"] == 0   # to itself: nothing new
        assert run_page(job_class, site.url + "/away", 1)["links"] == 0   # off the crawl's host
        assert run_page(job_class, site.url + "/odd")["error"] == "a redirect to no web page"
        assert links(children) == [site.url + "/new/"] and site.hits["/loop"] == 1
        assert "/new/" not in site.hits


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_redirect_to_its_own_page_spelled_otherwise_is_followed_in_the_job(children,
                                                                              job_class):
    """A redirect to a URL the normaliser makes the page's own (its query in another order)
    was a child job with the page's dedupe key, which the master dropped as seen: the page
    was never fetched. The job fetches it itself; a loop of such URLs ends, each fetched
    once."""
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    routes = {"/p?a=1&b=2": redirect("/p?b=2&a=1", 301), "/p?b=2&a=1": page,
              "/l?a=1&b=2": redirect("/l?b=2&a=1"), "/l?b=2&a=1": redirect("/l?a=1&b=2")}
    with Site(routes) as site:
        assert run_page(job_class, site.url + "/p?a=1&b=2") == {
            "url": site.url + "/p?b=2&a=1", "status": 200, "links": 1,
            "bytes": len(page[2]), "redirects": 1}
        assert links(children) == [site.url + "/a"]   # the page's link, not the page again
        looped = run_page(job_class, site.url + "/l?a=1&b=2")
        assert (looped["links"], looped["error"]) == (0, "a redirect loop")
        assert site.hits["/l?a=1&b=2"] == site.hits["/l?b=2&a=1"] == 1
    assert links(children) == [site.url + "/a"]


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
@pytest.mark.parametrize("sent,path", [(b"/caf\xc3\xa9", "/caf%C3%A9"), (b"/caf\xe9", "/caf%E9")])
def test_a_redirect_to_a_location_in_utf_8_leads_where_browsers_go(children, job_class, sent,
                                                                   path):
    """Servers send a Location's non-ASCII in UTF-8, as browsers (and aiohttp) read it; the
    sync crawler read it as Latin-1 (urllib's headers): /café became /cafÃ©, a 404. A byte
    that is no UTF-8 browsers escape: the async crawler took it for no web page."""
    def moved(handler):
        handler.send_response_only(301)
        handler.flush_headers()
        handler.wfile.write(b"Location: " + sent + b"\r\nContent-Length: 0\r\n\r\n")

    with Site({"/old": moved}) as site:
        assert run_page(job_class, site.url + "/old")["redirect"] == site.url + path
    assert links(children) == [site.url + path]


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_redirect_without_a_location_is_an_answer_with_no_links(children, job_class):
    """A 3xx that says nowhere to go is a final answer, as Scrapy takes it: the sync crawler
    read none of it, the async one followed the links of its body."""
    head, body = {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>'
    routes = {"/moved": (302, head, body), "/choose": (300, {**head, "Location": "/a"}, body)}
    with Site(routes) as site:
        for path, status in ("/moved", 302), ("/choose", 300):
            assert run_page(job_class, site.url + path) == {
                "url": site.url + path, "status": status, "links": 0, "bytes": 0}, path
    assert not children


def test_a_page_has_one_spelling_whatever_its_escapes_and_the_sync_crawler_fetches_it(
        children):
    """/café, /caf%c3%a9 and /caf%C3%A9 were three pages to fetch (one a page the sync
    crawler could not fetch at all: urllib sends ASCII only), %7e and ~ two."""
    one = normalize_url("http://h/caf%C3%A9?q=%C3%A9")
    assert normalize_url("http://h/café?q=é") == normalize_url("http://h/caf%c3%a9?q=%c3%a9") \
        == one == "http://h/caf%C3%A9?q=%C3%A9"
    assert normalize_url("http://h/%7euser/a%20b") == normalize_url("http://h/~user/a b") \
        == "http://h/~user/a%20b"
    assert normalize_url("http://h/a%2fb?x=%26") == "http://h/a%2Fb?x=%26"   # not / nor &
    assert normalize_url("http://Bücher.example:8/") == "http://xn--bcher-kva.example:8/"
    page = '<html><body><a href="/café">c</a></body></html>'.encode()
    routes = {"/": (200, {"Content-Type": "text/html; charset=utf-8"}, page),
              "/caf%C3%A9": (200, {"Content-Type": "text/html"}, b"<html>cafe</html>")}
    with Site(routes) as site:
        assert CrawlSync().run(site.url + "/")["links"] == 1
        assert links(children) == [site.url + "/caf%C3%A9"]
        assert CrawlSync().run(links(children)[0])["bytes"] > 0


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_domain_name_with_a_sharp_s_is_the_domain_browsers_reach(job_class):
    """Python's IDNA 2003 codec maps ß to ss and ς to σ: a crawl of straße.de fetched its
    first page there (aiohttp is IDNA 2008, as browsers are) and every other page from
    strasse.de, another domain and another site."""
    import yarl

    for url in "http://straße.de/a", "http://Faß.DE:8/", "http://τεςτ.gr/":
        assert yarl.URL(normalize_url(url)).raw_host == yarl.URL(url).raw_host, url
    assert job_class.spec(["http://straße.de/"])["limit_key"] == "xn--strae-oqa.de"
    assert normalize_url("http://bücher.example/") == "http://xn--bcher-kva.example/"


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_start_url_as_a_browser_shows_it_is_fetched(children, job_class):
    """A start URL typed as the address bar shows it (/café, /a b) failed every attempt in
    the sync crawler: urllib sends ASCII only, and no space."""
    page = (200, {"Content-Type": "text/html"}, b"<html>here</html>")
    with Site({"/caf%C3%A9": page, "/a%20b": page}) as site:
        for path in "/café", "/a b#top":
            assert run_page(job_class, site.url + path)["bytes"] > 0, path
    assert site.hits == {"/robots.txt": 1, "/caf%C3%A9": 1, "/a%20b": 1}


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_page_is_requested_as_it_is_normalized(children, job_class):
    """The async crawler requested a start URL as given: its host with a final dot, which
    a site that canonicalizes hosts redirects to the host without it, a redirect to the
    page's own URL (a loop to the job, the page lost); here, a name no resolver knows."""
    page = (200, {"Content-Type": "text/html"}, b"<html>here</html>")
    with Site({"/": page}) as site:
        fqdn = site.url.replace("127.0.0.1", "127.0.0.1.")
        assert run_page(job_class, fqdn + "/")["status"] == 200
    assert site.hits["/"] == 1


def test_both_crawlers_give_a_page_the_same_result(children):
    """The sync crawler's result had no status for a page it read: code written for the
    results of one crawler broke on the other's."""
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    with Site({"/": page, "/file.pdf": (200, {"Content-Type": "application/pdf"}, b"%PDF")}) \
            as site:
        for path in "/", "/file.pdf", "/gone":
            assert fetch(Crawl(), site.url + path) == CrawlSync().run(site.url + path), path


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_robots_txt_that_redirects_in_a_loop_is_no_robots_txt(children, job_class):
    """As RFC 9309 has it; it raised TooManyRedirects, and every page of the host failed."""
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    with Site({"/robots.txt": redirect("/robots.txt"), "/": page}) as site:
        assert run_page(job_class, site.url + "/")["links"] == 1


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_robots_txt_that_fails_keeps_its_hosts_pages_out_and_is_asked_again(make_cluster,
                                                                              job_class):
    """RFC 9309: a robots.txt answered with a 5xx, or not at all, keeps every page of its
    host out for now, and is asked again later. The page was a failed job once its retries
    were used up. Each attempt asks again (after a backoff, as for a page); once none is
    left, the page is disallowed, its result naming robots.txt and what it answered. The
    sync crawler read no robots.txt."""
    c = make_cluster(RETRY_BACKOFF=0.05)
    c.start_master()
    c.start_worker("--queues", "crawl", "--concurrency", "1")
    page = (200, {"Content-Type": "text/html"}, b"<html>hi</html>")
    asked: list[float] = []
    with Site({"/robots.txt": (503, {}, b""), "/": page}) as down, \
            Site({"/robots.txt": busy_first(503, "0", asked), "/": page}) as back:
        # the claim's max_retries, not the class's 3
        c.client.submit_job(job_class.spec([down.url + "/", "b"], job_id="down",
                                           max_retries=1))
        c.client.submit_job(job_class.spec([back.url + "/", "b"], job_id="back"))
        down_job, back_job = c.wait_job("down"), c.wait_job("back")
    assert (down_job["status"], down_job["attempts"]) == ("succeeded", 2), c.logs()
    assert down_job["result"]["robots"] == "unavailable"
    assert down_job["result"]["error"].startswith(down.url + "/robots.txt: HTTP 503: ")
    assert "/" not in down.hits and down.hits["/robots.txt"] == 2
    assert (back_job["attempts"], back_job["result"]["status"]) == (2, 200), c.logs()
    assert back.url + "/robots.txt: HTTP 503: " in back_job["error"]


@pytest.mark.parametrize("job_class", [QuickCrawl, QuickCrawlSync], ids=["async", "sync"])
def test_a_robots_txt_not_answered_says_so(children, job_class):
    """The error said what aiohttp said ("Cannot connect to host ..."), not that it was
    robots.txt that kept the page out."""
    from elric.demo.crawler import RobotsUnavailable
    from elric.redis_server import free_port

    url = f"http://127.0.0.1:{free_port()}"   # nothing listens there
    with pytest.raises(RobotsUnavailable, match=f"^{url}/robots.txt: .*RFC 9309"):
        run_page(job_class, url + "/")
    last = job_class()
    last.attempt, last.max_retries = 2, 1   # no retry left: the page is disallowed
    result = fetch(last, url + "/") if isinstance(last, Crawl) else last.run(url + "/", "b")
    assert (result["status"], result["robots"]) == (None, "unavailable")
    assert result["error"].startswith(f"{url}/robots.txt: ")


def test_the_sync_crawler_takes_a_404_for_an_answer_and_retries_a_503(children):
    """A broken link raised HTTPError: retried twice, then a failed job."""
    import urllib.error

    with Site({"/busy": (503, {}, b"")}) as site:
        assert CrawlSync().run(site.url + "/gone") == {
            "url": site.url + "/gone", "status": 404, "links": 0, "bytes": 0}
        with pytest.raises(urllib.error.HTTPError, match="503"):
            CrawlSync().run(site.url + "/busy")


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_408_is_retried_as_scrapy_retries_it(make_cluster, job_class):
    """A 408 (the server, or a load balancer before it, gave up waiting for the request: it
    says nothing of the page) was a final result: the page was never crawled, nor its links.
    Scrapy's RETRY_HTTP_CODES hold it; a 404 stays an answer."""
    c = make_cluster(RETRY_BACKOFF=0.05)
    c.start_master()
    c.start_worker("--queues", "crawl", "--concurrency", "1")
    times: list[float] = []
    with Site({"/p": busy_first(408, "0", times)}) as site:
        c.client.submit_job(job_class.spec([site.url + "/p", "b"], job_id="p"))
        job = c.wait_job("p")
    assert (job["status"], job["attempts"], job["result"]["status"]) == ("succeeded", 2, 200), \
        c.logs()
    assert "408" in job["error"] and len(times) == 2


def busy_first(status: int, retry_after: str, times: list[float]):
    """A route that answers ``status`` with ``Retry-After`` once, then a page; ``times``
    gets the time of each request."""
    def route(handler):
        times.append(time.monotonic())
        busy = len(times) == 1
        handler.send_response(status if busy else 200)
        handler.send_header("Retry-After" if busy else "Content-Type",
                            retry_after if busy else "text/html")
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return route


def test_a_429_or_503_error_carries_the_retry_after_it_asked_for(children):
    """The job's error says how long the server asked to wait: a number or an HTTP date,
    of a 429 or a 503 only."""
    import urllib.error
    from email.utils import formatdate

    from elric.demo.crawler import ServerError

    later = formatdate(time.time() + 30, usegmt=True)
    routes = {"/many": (429, {"Retry-After": "7"}, b""), "/down": (503, {"Retry-After": later}, b""),
              "/odd": (503, {"Retry-After": "soon"}, b""), "/bug": (500, {"Retry-After": "7"}, b"")}
    with Site(routes) as site:
        for path, at_least, at_most in [("/many", 7, 7), ("/down", 25, 30), ("/odd", 0, 0),
                                        ("/bug", 0, 0)]:
            with pytest.raises(ServerError) as error:
                fetch(Crawl(), site.url + path)
            with pytest.raises(urllib.error.HTTPError) as sync_error:
                CrawlSync().run(site.url + path)
            for after in error.value.retry_after, sync_error.value.retry_after:
                assert at_least <= after <= at_most, path


def test_a_retry_waits_what_retry_after_asks_up_to_the_longest_backoff(make_cluster):
    """A 429's retry came after the worker's backoff (50 ms here), whatever the server asked;
    a Retry-After of an hour waits RETRY_BACKOFF_MAX, not an hour."""
    c = make_cluster(RETRY_BACKOFF=0.05, RETRY_BACKOFF_MAX=3)
    c.start_master()
    c.start_worker("--queues", "crawl", "--concurrency", "1")
    many, down = [], []
    with Site({"/many": busy_first(429, "2", many), "/down": busy_first(503, "3600", down)}) \
            as site:
        for path in "/many", "/down":
            c.client.submit_job(Crawl.spec([site.url + path, "b"], job_id=path[1:]))
        wait_for(lambda: all(c.client.get_job(j)["status"] == "succeeded"
                             for j in ("many", "down")), timeout=60, what="both retried")
    assert many[1] - many[0] >= 2 and 3 <= down[1] - down[0] < 60, c.logs()


# runs both crawlers' fetch of a page in a process of its own (under a wrong clock), and
# prints the retry_after each error carried
_RETRY_AFTER_OF = """
import asyncio, json, sys, urllib.error
from elric.demo import crawler
from elric.demo.crawler_sync import CrawlSync
from elric.job import _current, _RunContext

_current.set(_RunContext("parent", {}))
async def run():
    try:
        await crawler.Crawl().run(sys.argv[1], "b", 0)
    except crawler.ServerError as exc:
        return exc.retry_after
    finally:
        await crawler._process.session.close()
try:
    CrawlSync().run(sys.argv[1], "b", 0)
except urllib.error.HTTPError as exc:
    print(json.dumps([asyncio.run(run()), exc.retry_after]))
"""


@pytest.mark.parametrize("offset", ["+3600", "-3600"], ids=["ahead", "behind"])
def test_a_retry_after_date_is_judged_by_the_servers_clock_not_the_workers(offset):
    """A Retry-After HTTP date was taken less the worker's own clock: on a worker an hour
    ahead the date was long past and the page retried at once; an hour behind, it waited
    an hour more (RETRY_BACKOFF_MAX). The date is the server's: judged against its Date."""
    import os
    import subprocess
    import sys
    from email.utils import formatdate

    from elric.launch import faketime_lib
    from tests.conftest import ROOT

    lib = faketime_lib()
    if lib is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")

    def route(handler):   # "come back in 30 s" (send_response sends its Date)
        handler.send_response(503)
        handler.send_header("Retry-After", formatdate(time.time() + 30, usegmt=True))
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    with Site({"/down": route}) as site:
        env = {**os.environ, "LD_PRELOAD": lib, "FAKETIME": offset}
        out = subprocess.run([sys.executable, "-c", _RETRY_AFTER_OF, site.url + "/down"],
                             env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for after in json.loads(out.stdout):   # (whole seconds: the dates' and when they were read)
        assert 25 <= after <= 31, (after, out.stdout)


ROBOTS = """# a robots.txt as sites write them
User-agent: *
Disallow: /*.pdf$
Disallow: /*?session=
Disallow: /private
Allow: /private/public
Disallow:

User-agent: Elric-Crawler
User-agent: other
Disallow: /mine-only   # a comment
Crawl-delay: 3

User-agent: nobody
Disallow: /
"""


@pytest.mark.parametrize("path, allowed", [
    ("/", True), ("/a.pdf", False), ("/a.pdf?x=1", True), ("/p?session=1", False),
    ("/p?q=1&session=1", True), ("/private/x", False), ("/private/public/y", True),
    ("/robots.txt", True)])
def test_robots_txt_rules_as_rfc_9309_reads_them(path, allowed):
    """urllib's RobotFileParser knows no * nor $ (Disallow: /*.pdf$ kept nothing out) and
    takes the first rule that matches, not the longest (Allow: /private/public lost)."""
    from elric.demo.crawler import Robots

    assert Robots(ROBOTS.splitlines(), "other-bot/2").allows(path) is allowed
    assert Robots(ROBOTS.splitlines(), "elric-crawler/0.1").allows(path) is True
    assert Robots([], "elric-crawler/0.1").allows(path) is True


def test_robots_txt_groups_for_the_crawler_by_name_are_its_rules_alone():
    from elric.demo.crawler import Robots

    mine = Robots(ROBOTS.splitlines(), "elric-crawler/0.1")
    assert not mine.allows("/mine-only/x") and mine.allows("/private")
    nobody = Robots(ROBOTS.splitlines(), "Nobody/1.0")
    assert not nobody.allows("/") and not nobody.allows("/private/public")


def test_robots_txt_crawl_delay_is_read_from_the_crawlers_groups():
    from elric.demo.crawler import Robots

    assert Robots(ROBOTS.splitlines(), "elric-crawler/0.1").delay == 3
    assert Robots(ROBOTS.splitlines(), "other-bot/2").delay is None   # not in the * group
    lines = ["User-agent: *", "Crawl-delay: 0.5", "Crawl-delay: soon", "Crawl-delay: -1",
             "Crawl-delay: nan", "Disallow:"]
    assert Robots(lines, "e").delay == 0.5
    assert Robots(["User-agent: *", "Crawl-delay: 1e9"], "e").delay == 86_400


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_429s_retry_after_holds_back_the_other_pages_of_its_host(cluster, job_class):
    """A 429's Retry-After delayed that page's retry only: the host's other pages went on
    at full rate while it asked to slow down. Now they wait as long; other hosts do not
    (localhost is no 127.0.0.1)."""
    cluster.start_worker("--queues", "crawl", "--concurrency", "2")
    page = (200, {"Content-Type": "text/html"}, b"<html>")
    with Site({"/busy": (429, {"Retry-After": "60"}, b""), "/a": page, "/b": page}) as site:
        elsewhere = site.url.replace("127.0.0.1", "localhost")
        submit = cluster.client.submit_job
        submit(job_class.spec([site.url + "/busy"], job_id="busy"))
        cluster.wait_job("busy", statuses=("retrying",))
        submit(job_class.spec([site.url + "/a"], job_id="held"))
        submit(job_class.spec([elsewhere + "/b"], job_id="elsewhere"))
        assert cluster.wait_job("elsewhere")["status"] == "succeeded", cluster.logs()
        assert cluster.client.get_job("held")["status"] == "queued"
        assert "/a" not in site.hits


@pytest.mark.parametrize("limits, least", [(None, 1.0), ({"*": {"concurrency": 8, "rate": 50}}, 1.0),
                                           ({"*": {"interval": 1.5}}, 1.5)],
                         ids=["no-limits", "shorter-rule", "longer-rule"])
def test_a_crawl_keeps_the_crawl_delay_robots_txt_asks_across_workers(make_cluster, limits,
                                                                      least):
    """Crawl-delay was not read: a site asking for a second between requests had a page
    of it fetched at once by every free slot of every worker. Now the pages a page links to
    start that far apart, across all workers, unless LIMITS asks for longer."""
    c = make_cluster(**({"LIMITS": json.dumps(limits)} if limits else {}))
    c.start_master()
    for _ in range(2):
        c.start_worker("--queues", "crawl", "--concurrency", "2")
    index = "".join(f'<a href="/{p}">{p}</a>' for p in "abc").encode()
    routes = {"/robots.txt": (200, {"Content-Type": "text/plain"},
                              b"User-agent: *\nCrawl-delay: 1\n"),
              "/": (200, {"Content-Type": "text/html"}, index),
              **{f"/{p}": (200, {"Content-Type": "text/html"}, b"<html>") for p in "abc"}}
    with Site(routes) as site:
        jobs = crawl(c, types.SimpleNamespace(url=site.url + "/"), Crawl)
    assert set(jobs) == {"/", "/a", "/b", "/c"} and site.hits["/robots.txt"] <= 4, c.logs()
    assert all(j["status"] == "succeeded" for j in jobs.values()), c.logs()
    assert {jobs[p].get("limit_interval") for p in ("/a", "/b", "/c")} == {1.0}
    starts = sorted(jobs[p]["started_at"] for p in ("/a", "/b", "/c"))
    assert all(later - first >= least for first, later in zip(starts, starts[1:])), starts


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_the_jobs_a_page_submits_carry_its_robots_txt_crawl_delay(children, job_class):
    """The sync crawler read no Crawl-delay: the pages a page linked to were fetched as fast
    as LIMITS let. A page's links, and where its redirect leads, carry it as their
    limit_interval (the test above shows the master keeps it, across workers)."""
    robots = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nCrawl-delay: 2.5\n")
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    with Site({"/robots.txt": robots, "/": page, "/go": redirect("/b")}) as site, \
            Site({"/": page}) as plain:
        for url in site.url + "/", site.url + "/go", plain.url + "/":
            assert run_page(job_class, url)["links"] == 1, url
    assert [(spec["args"][0], spec.get("limit_interval")) for spec in children] == [
        (site.url + "/a", 2.5), (site.url + "/b", 2.5), (plain.url + "/a", None)]


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_robots_txt_that_answers_a_4xx_allows_everything(children, job_class):
    """RFC 9309: a robots.txt that is not there (404), or not to be read (403), is none:
    every page may be fetched. The sync crawler asked for none at all."""
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    with Site({"/": page}) as missing, Site({"/robots.txt": (403, {}, b""), "/": page}) as shut:
        for site in missing, shut:
            assert run_page(job_class, site.url + "/") == {
                "url": site.url + "/", "status": 200, "links": 1, "bytes": len(page[2])}
            assert site.hits == {"/robots.txt": 1, "/": 1}
    assert links(children) == [missing.url + "/a", shut.url + "/a"]


def test_a_robots_txt_group_ends_at_a_rule_not_at_a_crawl_delay():
    """RFC 9309: a group's user-agent lines end at its first rule (Allow or Disallow). A
    Crawl-delay (or any other line) ended them too: below, the crawler's group had no
    rules, so it fetched /private, which the group it shares with * forbids."""
    from elric.demo.crawler import Robots

    lines = ["User-agent: elric-crawler", "Crawl-delay: 5", "User-agent: *",
             "Disallow: /private", "", "User-agent: other", "Sitemap: /s.xml", "Disallow:"]
    assert not Robots(lines, "elric-crawler/0.1").allows("/private/x")
    assert Robots(lines, "other/1").allows("/private/x")   # "Disallow:" is a rule too


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_crawl_obeys_a_wildcard_in_robots_txt(children, job_class):
    robots = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /*.pdf$\n")
    with Site({"/robots.txt": robots}) as site:
        assert run_page(job_class, site.url + "/files/a.pdf") == {
            "url": site.url + "/files/a.pdf", "status": None, "links": 0, "bytes": 0,
            "robots": "disallowed"}
    assert "/files/a.pdf" not in site.hits


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_robots_txt_is_asked_about_a_start_url_as_its_links_are_spelled(children, job_class):
    """A start URL typed as a browser shows it (/café, /x/../private) was matched against
    robots.txt as typed: no rule matched, and the page it forbids was fetched."""
    robots = (200, {"Content-Type": "text/plain"},
              "User-agent: *\nDisallow: /café\nDisallow: /private\n".encode())
    with Site({"/robots.txt": robots}) as site:
        for path in "/café", "/x/../private", "/caf%c3%a9":
            assert run_page(job_class, site.url + path)["robots"] == "disallowed", path
    assert site.hits == {"/robots.txt": 1}   # once per host and round


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_robots_txt_is_read_again_when_a_day_old(children, monkeypatch, job_class):
    """robots.txt was read once per host and round in a process and never again: a round
    that ran for days kept the rules its site had since changed. RFC 9309: a robots.txt is
    cached for 24 hours at most (the age, lowered here, is a module constant)."""
    from elric.demo import crawler_sync

    rules = [b"User-agent: *\nDisallow:\n"]

    def robots(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(rules[0])))
        handler.end_headers()
        handler.wfile.write(rules[0])

    with Site({"/robots.txt": robots, "/x": (200, {"Content-Type": "text/html"}, b"x")}) as site:
        assert run_page(job_class, site.url + "/x")["status"] == 200
        rules[0] = b"User-agent: *\nDisallow: /x\n"
        assert run_page(job_class, site.url + "/x")["status"] == 200   # within the day: as read
        assert site.hits["/robots.txt"] == 1
        monkeypatch.setattr(crawler_sync, "ROBOTS_MAX_AGE", 0.0)
        assert run_page(job_class, site.url + "/x")["robots"] == "disallowed"
    assert site.hits == {"/robots.txt": 2, "/x": 2}


def test_a_robots_txt_rule_made_to_backtrack_costs_no_time():
    """As a regex, /*a*a*a*a*b took 40 s on a path of 300 a's, stalling the process."""
    from elric.demo.crawler import Robots

    rules = Robots(["User-agent: *", "Disallow: /*a*a*a*a*a*a*b", "Disallow: /*x*y$"], "e")
    t0 = time.monotonic()
    assert rules.allows("/" + "a" * 5000)
    assert not rules.allows("/" + "a" * 5000 + "b") and not rules.allows("/x/y")
    assert rules.allows("/x/y/") and rules.allows("/y/x")
    assert time.monotonic() - t0 < 1


def test_the_sync_crawler_reads_a_page_up_to_a_cap_and_parses_html_only(children):
    """It read a page whole, however big, and parsed a PDF or an image for links."""
    big = b"<html><body>" + b"x" * BIG + b"</body></html>"
    links_in = b'<html><body><a href="/a">a</a></body></html>'
    with Site({"/big": (200, {"Content-Type": "text/html"}, big),
               "/file.pdf": (200, {"Content-Type": "application/pdf"}, links_in)}) as site:
        result = CrawlSync().run(site.url + "/big")
        assert (result["bytes"], result["truncated"]) == (CrawlSync.max_bytes, True)
        assert CrawlSync().run(site.url + "/file.pdf")["links"] == 0


def endless(status: int, content_type: str, start: bytes, sent: threading.Event):
    """A route that sends ``start`` of a big body and then nothing until ``sent`` is set."""
    def route(handler):
        handler.send_response(status)
        handler.send_header("Content-Type", content_type)
        handler.send_header("Content-Length", str(BIG))
        handler.end_headers()
        handler.wfile.write(start)
        sent.wait(30)   # the rest never comes
    return route


def test_what_is_not_html_is_not_read(children):
    """A PDF was read up to max_bytes (2 MiB) to be thrown away: here one that never ends
    kept each crawler until its request timed out."""
    sent = threading.Event()
    with Site({"/file.pdf": endless(200, "application/pdf", b"%PDF-1.7\n", sent)}) as site:
        try:
            assert fetch(QuickCrawl(), site.url + "/file.pdf")["bytes"] == 0
            assert CrawlSync().run(site.url + "/file.pdf")["bytes"] == 0
        finally:
            sent.set()


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_redirect_into_what_robots_txt_forbids_is_not_followed(children, job_class):
    """aiohttp followed redirects on its own: robots.txt was asked about the first URL only.
    The page a redirect leads to is a job of its own, which asks robots.txt first."""
    robots = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private\n")
    page = (200, {"Content-Type": "text/html"}, b"<html><body>secret</body></html>")
    with Site({"/robots.txt": robots, "/go": redirect("/private/x"), "/private/x": page}) \
            as site:
        assert run_page(job_class, site.url + "/go")["redirect"] == site.url + "/private/x"
        result = run_page(job_class, links(children)[0])
    assert result == {"url": site.url + "/private/x", "status": None, "links": 0, "bytes": 0,
                      "robots": "disallowed"}
    assert "/private/x" not in site.hits


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_start_url_that_is_no_web_page_is_refused_at_submit(job_class):
    """"example.com" was queued, and failed every attempt in aiohttp or urllib (a periodic
    crawl: every round)."""
    from elric import SpecError

    for url in ("example.com", "ftp://h/", "/p/1"):
        with pytest.raises(SpecError, match=f"{url!r} is no http"):
            job_class.spec([url])
    assert job_class.spec(["HTTPS://h/"])["dedupe_key"] == "https://h/"


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_robots_txt_that_starts_with_a_byte_order_mark_is_obeyed(children, job_class):
    """Saved by a Windows editor: its first line read as "\\ufeffuser-agent", no group."""
    robots = (200, {"Content-Type": "text/plain"},
              "\ufeffUser-agent: *\nDisallow: /x\n".encode("utf-8"))
    with Site({"/robots.txt": robots}) as site:
        assert run_page(job_class, site.url + "/x")["robots"] == "disallowed"
    assert "/x" not in site.hits


@pytest.mark.parametrize("job_class", [Crawl, CrawlSync], ids=["async", "sync"])
def test_a_pages_limit_key_is_its_host_as_its_links_spell_it(job_class):
    """A start URL spelled http://Example.com:80/ had limit key "example.com:80", its pages
    "example.com": LIMITS for example.com did not hold it."""
    assert job_class.spec(["http://Example.COM:80/"])["limit_key"] == "example.com"
    assert job_class.spec(["http://Bücher.example/"])["limit_key"] == "xn--bcher-kva.example"


@pytest.mark.parametrize("given, kept", [(7, 7.0), (0.5, 0.5), (10**400, 1e9), (-3, 0.0),
                                         (float("nan"), 0.0), ("60", 0.0), (True, 1.0)],
                         ids=["int", "float", "10**400", "negative", "nan", "str", "bool"])
def test_a_jobs_retry_after_is_read_as_seconds_whatever_it_holds(given, kept):
    """A user's exception may carry any retry_after: the pool process must still report the
    failure (an int past a float's range raised OverflowError there)."""
    from elric.runner import Ran, _failed

    class Busy(Exception):
        retry_after = given

    assert _failed(Ran("j", 1, False, ""), Busy("busy")).retry_after == kept


def test_a_retry_after_date_without_a_zone_is_utc(monkeypatch):
    """RFC 5322's -0000 is UTC with no zone said; Python reads it as a naive time, which
    .timestamp() took for local time: hours off wherever the machine is not on UTC."""
    from email.utils import formatdate

    monkeypatch.setenv("TZ", "Pacific/Auckland")
    time.tzset()
    try:
        later = formatdate(time.time() + 30).replace("+0000", "-0000")
        assert 25 <= retry_after(503, {"Retry-After": later}) <= 30
    finally:
        monkeypatch.undo()
        time.tzset()


def test_an_error_page_is_not_read(children):
    """A 404's body has no links to follow: it was read up to max_bytes and thrown away,
    and one that streamed slowly held the job until its request timed out."""
    sent = threading.Event()
    with Site({"/gone": endless(404, "text/html", b"<html><body>not here", sent)}) as site:
        try:
            assert fetch(QuickCrawl(), site.url + "/gone") == {
                "url": site.url + "/gone", "status": 404, "links": 0, "bytes": 0}
        finally:
            sent.set()


# --- crawl classes of a user's own, run by real workers (they load this module) ----------

class PoliteCrawl(Crawl):
    """A crawl of settings of its own: every page it finds must be crawled with them."""
    queue = "polite"
    max_bytes = 64 * 1024


class PoliteCrawlSync(CrawlSync):
    queue = "polite"


class SavedCrawl(Crawl):
    """Saves each page after crawling it; the first save of the start page fails (the store
    was away for a moment), so that attempt is retried, in the same pool process."""

    async def run(self, url: str, *args) -> dict:   # its batch and depth: the crawl's
        result = await super().run(url, *args)
        if self.attempt == 1 and self.job_id.endswith("-start"):
            raise ConnectionError("the page store did not answer")
        return result


def own_classes_cluster(make_cluster, **settings):
    from tests.conftest import TEST_JOB_MODULES

    c = make_cluster(JOB_MODULES=f"{TEST_JOB_MODULES},tests.test_crawler", **settings)
    c.start_master()
    return c


@pytest.mark.parametrize("job_class", [PoliteCrawl, PoliteCrawlSync], ids=["async", "sync"])
def test_the_pages_a_crawl_class_of_ones_own_finds_are_crawled_by_that_class(make_cluster,
                                                                             job_class):
    """Every page but the first was a job of the stock class: its queue, timeouts, size
    cap and retries, not those the crawl was started with."""
    c = own_classes_cluster(make_cluster)
    c.start_worker("--queues", "polite,crawl", "--concurrency", "2")
    with DemoSite(pages=10) as site:
        jobs = crawl(c, site, job_class)
    assert set(jobs) == set(site.paths()), c.logs()
    assert {(j["func"], j["queue"]) for j in jobs.values()} == {
        (job_class.spec([site.url])["func"], "polite")}


def test_a_page_whose_attempt_failed_after_finding_its_links_submits_them_when_retried(
        make_cluster):
    """A pool process remembers the links it submitted, to spare the master's filter. The
    children of a failed attempt are never sent, yet its retry in the same process took
    its links for sent: the crawl ended at its first page."""
    c = own_classes_cluster(make_cluster, RETRY_BACKOFF=0.05)
    c.start_worker("--queues", "crawl", "--concurrency", "1")   # one pool process
    with DemoSite(pages=10) as site:
        jobs = crawl(c, site, SavedCrawl)
    assert set(jobs) == set(site.paths()), c.logs()
    assert jobs["/"]["attempts"] == 2 and "store did not answer" in jobs["/"]["error"]


def test_a_copy_of_a_crawled_page_is_still_of_its_crawl(cluster):
    """A copy dropped the page's dedupe scope with its key: the links it found went to the
    global scope, where every page was new, and the whole site was crawled again."""
    cluster.start_worker("--queues", "crawl", "--concurrency", "2")
    with DemoSite(pages=10) as site:
        jobs = crawl(cluster, site, Crawl)
        start = jobs["/"]["job_id"]
        assert cluster.client.bulk_jobs("copy", {"ids": [start]}, "", "op1")["touched"] == 1
        copy = cluster.wait_job(f"{start}~op1")
        assert copy["status"] == "succeeded" and copy["result"]["links"] > 0, cluster.logs()
        wait_for(lambda: not any(cluster.client.list_jobs(status=s) for s in
                                 ("queued", "running", "retrying")), what="all ended")
        assert site.hits["/"] == 2
        assert all(site.hits[p] == 1 for p in site.paths() if p != "/"), site.hits


def test_a_crawl_goes_on_at_the_host_its_start_page_redirects_to(cluster):
    """Most sites send their start URL elsewhere (http://example.com/ to
    https://www.example.com/): a redirect was followed on its page's host only, and the crawl
    ended at its first page. Here a second port is the other host; a redirect found further
    in stays on its host, and so does a link."""
    cluster.start_worker("--queues", "crawl", "--concurrency", "2")
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    routes, bare_routes = {"/": page}, {"/elsewhere": page}
    with Site(routes) as www, Site(bare_routes) as bare:
        bare_routes["/"] = redirect(www.url + "/", 301)
        routes["/a"] = (200, {"Content-Type": "text/html"}, f'<a href="{bare.url}/elsewhere">'
                        '</a><a href="/away">a</a>'.encode())
        routes["/away"] = redirect(bare.url + "/elsewhere")
        for job_class, batch in (Crawl, "async"), (CrawlSync, "sync"):
            jobs = crawl(cluster, types.SimpleNamespace(url=bare.url + "/"), job_class, batch)
            assert set(jobs) == {"/", www.url + "/", www.url + "/a", www.url + "/away"}, \
                cluster.logs()
            assert all(j["status"] == "succeeded" for j in jobs.values()), cluster.logs()
            assert jobs[www.url + "/"]["limit_key"] == www.url.split("/")[2]
        assert www.hits["/"] == www.hits["/a"] == 2 and "/elsewhere" not in bare.hits


class ShallowCrawl(Crawl):
    max_depth = 3


class ShallowCrawlSync(CrawlSync):
    max_depth = 3


def test_a_crawl_goes_no_deeper_than_its_max_depth(make_cluster):
    """A calendar's "next month" (or a link with a new session id on every page) is a site
    of no end, and a crawl of it never ended. A crawl class's max_depth stops it that many
    links from its start page; a redirect is no step further."""
    c = own_classes_cluster(make_cluster)
    c.start_worker("--queues", "crawl", "--concurrency", "2")
    routes = {f"/{n}": (200, {"Content-Type": "text/html"},
                        f'<html><body><a href="/{n + 1}">next</a></body></html>'.encode())
              for n in range(1, 30)}
    routes["/"] = routes.pop("/1")
    routes["/2"] = (200, {"Content-Type": "text/html"}, b'<a href="/3">next</a>')
    routes["/3"] = redirect("/3/")
    routes["/3/"] = (200, {"Content-Type": "text/html"}, b'<a href="/4">next</a>')
    with Site(routes) as site:
        for job_class, batch in (ShallowCrawl, "async"), (ShallowCrawlSync, "sync"):
            jobs = crawl(c, types.SimpleNamespace(url=site.url + "/"), job_class, batch)
            assert set(jobs) == {"/", "/2", "/3", "/3/", "/4"}, c.logs()
            assert [jobs[p]["args"][2:] for p in ("/", "/2", "/3", "/3/", "/4")] == \
                [[], [1], [2], [2, 1], [3]]   # /3/: a redirect led to it
            assert jobs["/4"]["result"] == {"url": site.url + "/4", "status": 200, "links": 0,
                                            "bytes": len(routes["/4"][2]), "max_depth": True}
    assert site.hits["/4"] == 2 and "/5" not in site.hits


@pytest.mark.parametrize("job_class, shallow", [(Crawl, ShallowCrawl),
                                               (CrawlSync, ShallowCrawlSync)],
                         ids=["async", "sync"])
def test_a_chain_of_redirects_is_followed_twenty_times_at_most(children, job_class, shallow):
    """Each redirect is a page job of its own at its page's depth: a site that redirected
    /r/0 to /r/1 to /r/2 ... (a new URL each time, none deduped) was followed to no end,
    max_depth or not. A job carries the redirects that led to it; the 21st is not followed
    (browsers and Scrapy stop at 20), and a link found after them starts afresh."""
    page = (200, {"Content-Type": "text/html"}, b'<html><body><a href="/a">a</a></body></html>')
    routes = {f"/r/{n}": redirect(f"/r/{n + 1}") for n in range(40)}
    routes["/to-page"], routes["/page"] = redirect("/page"), page
    with Site(routes) as site:
        jobs, args = [], [site.url + "/r/0", "b", 0]
        while args and len(jobs) < 40:
            jobs.append(run_page(job_class, args[0], *args[2:]))
            args = children.pop()["args"] if children else None
        assert len(jobs) == 21 and not children
        assert [job.get("redirects", 0) for job in jobs] == list(range(21))
        assert jobs[-1]["error"] == "over 20 redirects in a row" and jobs[-1]["links"] == 0
        # max_depth holds after a redirect: the page it leads to is as deep as it was
        assert run_page(shallow, site.url + "/to-page", 3)["links"] == 1
        [spec] = children
        assert spec["args"][1:] == ["b", 3, 1]
        assert run_page(shallow, spec["args"][0], *spec["args"][2:]) == {
            "url": site.url + "/page", "status": 200, "links": 0, "bytes": len(page[2]),
            "redirects": 1, "max_depth": True}
        children.clear()
        assert run_page(job_class, site.url + "/page", 0, 5)["links"] == 1
        assert children[0]["args"][1:] == ["b", 1]   # a link: no redirect before it


def test_the_sync_crawlers_request_timeout_is_a_deadline_for_the_whole_request(children):
    """urllib's timeout is for each wait: a page dripped a byte a second was read for as long
    as it took (the job's own timeout ended it, if any), and a connection that did not open
    in time failed as a bare URLError. The async crawler's is for the whole request."""
    import socket

    from elric.demo import crawler_sync
    from elric.demo.crawler_sync import Robots, RobotsUnavailable

    stop = threading.Event()

    def drip(handler):
        handler.send_response(200)
        handler.send_header("Content-Type", "text/html")
        handler.end_headers()
        try:
            for _ in range(20):   # the server's pace: 5 bytes a second, for 4 s
                if stop.wait(0.2):
                    return
                handler.wfile.write(b"x")
                handler.wfile.flush()
        except OSError:   # the crawler hung up
            pass

    with Site({"/drip": drip}) as site, socket.socket() as full:
        full.bind(("127.0.0.1", 0))
        full.listen(0)
        waiting = []   # connections that fill its backlog: one more gets no answer
        try:
            with pytest.raises(TimeoutError, match="^http://.*/drip: no answer in 1.5 s$"):
                QuickCrawlSync().run(site.url + "/drip")
            while True:
                waiting.append(socket.socket())
                waiting[-1].settimeout(0.5)
                try:
                    waiting[-1].connect(full.getsockname())
                except TimeoutError:
                    break
            url = "http://127.0.0.1:%d/" % full.getsockname()[1]
            with pytest.raises(RobotsUnavailable,   # asked first, and kept to the same time
                               match=f"^{url}robots.txt: no answer in 1.5 s: "):
                QuickCrawlSync().run(url)
            crawler_sync._robots[url[:-1], ""] = Robots([], "e")   # as if it had answered
            with pytest.raises(TimeoutError, match=f"^{url}: no answer in 1.5 s$"):
                QuickCrawlSync().run(url)
        finally:
            stop.set()
            for sock in waiting:
                sock.close()
