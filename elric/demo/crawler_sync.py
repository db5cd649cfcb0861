"""The synchronous crawler: each job fetches one page with urllib, one at a time per pool
process, and submits its links as child jobs, as the async crawler (``elric.demo.crawler``,
the one to use; this one shows a plain sync job) does: deduped per scope, on the start
page's host, nofollow obeyed, redirects as page jobs of their own, 5xx, 429 and 408 retried,
``max_bytes``, ``max_depth`` and ``max_redirects`` as there. It does not read robots.txt:
crawl sites that are not your own with the async crawler, which obeys it.

Also the URL, link and page reading both crawlers share.
"""

from __future__ import annotations

import codecs
import re
import string
import time
import urllib.error
import urllib.request
from datetime import UTC
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from urllib.parse import quote, urldefrag, urljoin, urlsplit

from elric import Job


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.base: str | None = None   # the first <base href>: links are relative to it
        # <meta name="robots" (or its own name) content="nofollow">: follow none
        self.nofollow = False

    def handle_starttag(self, tag, attrs):
        attrs = {name: value or "" for name, value in reversed(attrs)}   # the first wins
        href = attrs.get("href")
        if tag in ("a", "area") and href and "nofollow" not in attrs.get("rel", "").lower().split():
            self.links.append(href)
        elif tag in ("frame", "iframe") and attrs.get("src"):   # a page of its own: a link
            self.links.append(attrs["src"])
        elif tag == "base" and href and self.base is None:
            self.base = href
        elif tag == "meta" and attrs.get("name", "").lower() in ("robots", ROBOTS_NAME):
            self.nofollow = self.nofollow or nofollow(attrs.get("content", ""))
        elif tag == "meta" and attrs.get("http-equiv", "").lower() == "refresh" and \
                (target := refresh_url(attrs.get("content", ""))):
            self.links.append(target)


# "0; url=/next": the time, then ; or , or space, then the URL (the "url=" and quotes optional)
_REFRESH = re.compile(r"""\s*[\d.]+(?:\s*[;,]\s*|\s+)(?:url\s*=\s*)?(?:"([^"]*)|'([^']*)|(.+))""",
                      re.IGNORECASE | re.DOTALL)


def refresh_url(content: str) -> str | None:
    """Where a <meta http-equiv="refresh"> leads, as browsers read its content; None when it
    reloads its own page. A page that moved says so this way as often as by a redirect."""
    found = _REFRESH.match(content)
    return found and next(url for url in found.groups() if url is not None) or None


ROBOTS_NAME = "elric-crawler"   # its name in robots.txt, X-Robots-Tag and a robots <meta>
# "name: nofollow" in an X-Robots-Tag is for the crawler named; these are directives instead
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def nofollow(content: str) -> bool:
    """Whether a <meta name="robots">'s content, or an X-Robots-Tag header's, says to follow
    no link of its page. As Google reads a header: a crawler's name ("otherbot: noindex,
    nofollow") holds for the directives after it up to the next name, in one line folded
    from two too; those before any name are for every crawler, others' say nothing here."""
    agent = None
    for part in content.lower().split(","):
        name, colon, rest = part.partition(":")
        if colon and re.fullmatch(r"\s*[\w-]+\s*", name) and name.strip() not in _VALUED:
            agent, part = name.strip(), rest
        if agent in (None, ROBOTS_NAME) and not {"nofollow", "none"}.isdisjoint(part.split()):
            return True
    return False


def normalize_url(url: str) -> str:
    """One spelling per page: no fragment, lower-case scheme and host (without a final dot),
    no default port, a path without ``.`` and ``..`` segments, and escapes as a browser
    sends them (UTF-8, upper-case, none for ``~``)."""
    url = urldefrag(url)[0]
    parts = urlsplit(url)   # urlparse took a last segment's ";v=2" off its path
    scheme, netloc = parts.scheme.lower(), parts.netloc.lower()
    default = ":80" if scheme == "http" else ":443" if scheme == "https" else None
    if parts.port is None:   # (a ValueError for a port out of range or no number)
        netloc = netloc.removesuffix(":")   # http://h:/ is http://h/, as browsers read it
    elif default and netloc.endswith(default):   # http://h:80/ is http://h/, the same host
        netloc = netloc[:-len(default)]
    path = parts.path or "/"
    query = f"?{parts.query}" if parts.query else ""
    if not (url.isascii() and _PLAIN.fullmatch(path + query)):   # escapes to spell
        try:   # an international domain name, as DNS knows it
            netloc = _ascii_host(netloc)
        except UnicodeError:
            pass
        path, query = requote(path), requote(query)
    if netloc.endswith(".") or ".:" in netloc:   # example.com. is example.com (DNS's root)
        netloc = _HOST_DOT.sub("", netloc)
    if "/." in path:   # /x/../a is /a, as urljoin makes a relative link's path
        path = _without_dots(path)
    return f"{scheme}://{netloc}{path}{query}"


def _ascii_host(netloc: str) -> str:
    # Python's codec is IDNA 2003, which maps ß and ς away: straße.de became strasse.de,
    # another domain than browsers (and aiohttp) reach, IDNA 2008's xn--strae-oqa.de
    if _DEVIATIONS.isdisjoint(netloc):
        return netloc.encode("idna").decode("ascii")
    return ".".join(label if label.isascii() else "xn--" + label.encode("punycode").decode()
                    for label in netloc.split("."))


_DEVIATIONS = frozenset("ßς\u200c\u200d")
_HOST_DOT = re.compile(r"\.(?=(?::\d*)?$)")   # a host's final dot, before a port


def _without_dots(path: str) -> str:
    """``path`` without its ``.`` and ``..`` segments (RFC 3986's remove_dot_segments)."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    # /a/b/.. is the folder /a/
    return "/" + "/".join(kept) + ("/" if kept and segments[-1] in (".", "..") else "")


_ESCAPE = re.compile("%[0-9A-Fa-f]{2}")
_UNRESERVED = frozenset(string.ascii_letters + string.digits + "-._~")
# what RFC 3986 lets a path or query hold raw; aiohttp escapes the rest (" < > [ \ ] ^ ` { | })
_SAFE = "!$&'()*+,;=:@/?"
_PLAIN = re.compile(rf"[\w\-.~{re.escape(_SAFE)}]*", re.ASCII)


def requote(text: str) -> str:
    # escapes what a URL may not hold raw; other escapes stay (%2F is no /, %26 no &)
    return _ESCAPE.sub(_escape, quote(text, safe=_SAFE + "%"))


def _escape(match: re.Match) -> str:
    char = chr(int(match.group()[1:], 16))
    return char if char in _UNRESERVED else match.group().upper()


def worth_retrying(status: int) -> bool:
    """Whether an answer says nothing of the page, only that now was a bad time: a 5xx, a
    429, or a 408 (the server gave up waiting for the request), as Scrapy retries them."""
    return status >= 500 or status in (408, 429)


def retry_after(status: int, headers) -> float:
    """The seconds a 429 or 503 asks to wait by its Retry-After (a number, or an HTTP date);
    0 without one. A job's error carries it as ``retry_after``: its retry waits that long."""
    value = headers.get("Retry-After", "").strip() if status in (429, 503) else ""
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)   # naive for -0000: UTC, no zone said (RFC 5322)
        return max(0.0, when.replace(tzinfo=when.tzinfo or UTC).timestamp() - time.time())
    except (TypeError, ValueError):   # none, or not a date
        return 0.0


def page_key(url: str) -> str:
    """A page job's dedupe key, its normalized URL with the query's parameters in order of
    name (``?b=2&a=1`` is ``?a=1&b=2``, fetched as first linked); a URL that is no http(s)
    URL is refused at submit (queued, it failed every attempt, and every round of a
    periodic crawl)."""
    key = normalize_url(url)
    if not key.startswith(("http://", "https://")):
        raise ValueError(f"{url!r} is no http(s) URL")
    path, _, query = key.partition("?")
    if "&" in query:   # a name given twice keeps its order: ?a=2&a=1 may be another page
        params = sorted(query.split("&"), key=lambda param: param.partition("=")[0])
        key = f"{path}?{'&'.join(params)}"
    return key


MAX_URL = 2083   # characters: browsers' (and Scrapy's) limit; most servers refuse more


def link_of(base: str, href: str, codec: str = "utf-8") -> str | None:
    """The normalized http(s) URL ``href`` on page ``base`` leads to; None for another
    scheme (ftp:, mailto:), one that does not parse (``http://[oops``), or one over
    MAX_URL (a site that links each page to a longer URL would be crawled to no end): one
    bad link on a page, not a failed page. A query is escaped in its page's ``codec``, as
    browsers send it (a character it has not as its HTML reference)."""
    href = href.strip(" \t\n\r\f")   # without the whitespace around it, as browsers read it
    if "\\" in href:   # a backslash before the query is a slash to browsers (WHATWG URL)
        path, mark, query = href.partition("?")
        href = path.replace("\\", "/") + mark + query
    if not (href.isascii() or codec.startswith("utf")):
        path, mark, query = href.partition("#")[0].partition("?")
        href = path + mark + "".join(
            c if c.isascii() else quote(c.encode(codec, "xmlcharrefreplace"), safe="")
            for c in query)
    try:
        link = normalize_url(urljoin(base, href))
    except ValueError:
        return None
    return link if link.startswith(("http://", "https://")) and len(link) <= MAX_URL else None


# <meta charset="x">, or <meta http-equiv="Content-Type" content="text/html; charset=x">
_META_CHARSET = re.compile(rb"""<meta[^>]*?charset\s*=\s*["']?([-\w.:]+)""", re.IGNORECASE)


def page_charset(declared: str | None, body: bytes) -> str:
    """The charset to read a page in: its byte order mark's (browsers heed it first), else
    its Content-Type's, else a <meta>'s in its first 1024 bytes (where browsers look first),
    else UTF-8 if it reads as such (a tail cut mid-character too), else a later <meta>'s
    (browsers heed it too), else windows-1252."""
    if body.startswith((codecs.BOM_UTF16_BE, codecs.BOM_UTF16_LE)):
        return "utf-16"   # which of the two, the codec reads from the mark
    if body.startswith(codecs.BOM_UTF8):
        return "utf-8-sig"   # without the mark
    if declared:
        return declared
    found = _META_CHARSET.search(body, 0, 1024)
    if not found:
        try:
            codecs.getincrementaldecoder("utf-8")().decode(body)   # not final: a cut tail reads
            return "utf-8"
        except UnicodeDecodeError:
            found = _META_CHARSET.search(body)
    return found.group(1).decode("ascii") if found else "windows-1252"


# labels browsers (the WHATWG Encoding Standard) read as Windows' superset, where Python's
# codec of that name is the strict one, or one Python does not know (windows-874)
_SUPERSETS = {"shift_jis": "cp932", "x-sjis": "cp932", "gb2312": "gbk", "euc-kr": "cp949",
              "windows-874": "cp874", "iso-8859-1": "cp1252", "latin1": "cp1252",
              "us-ascii": "cp1252", "ascii": "cp1252"}


def page_codec(declared: str | None, body: bytes) -> str:
    """The codec to read the page in: page_charset's as browsers read its label (UTF-8 for
    one Python does not know); read with errors="replace", as browsers do (lxml stopped at
    the first byte it could not read, and the links after it were lost)."""
    charset = page_charset(declared, body)
    codec = _SUPERSETS.get(charset.lower(), charset)
    try:
        b"".decode(codec)   # a text codec: not base64, say
        return codecs.lookup(codec).name
    except LookupError:
        return "utf-8"


# the MIME Sniffing Standard's HTML patterns: after whitespace, a tag ending in " " or ">"
_HTML_START = re.compile(rb"[\t\n\x0c\r ]*<(?:!doctype html|html|head|script|iframe|h1|div|font|"
                         rb"table|a|style|title|b|body|br|p|!--)[ >]", re.IGNORECASE)


def sniffed_html(body: bytes) -> bool:
    """Whether a body that came without a Content-Type is HTML, as browsers sniff it."""
    return _HTML_START.match(body) is not None


REDIRECTS = frozenset((301, 302, 303, 307, 308))
MAX_REDIRECTS = 20   # in a row, as browsers (and Scrapy) follow at most
CHUNK = 64 * 1024


def result_of(url: str, status: int, redirects: int, location: str | None = None,
              max_redirects: int = MAX_REDIRECTS,
              fetched: frozenset[str] = frozenset()) -> tuple[dict, str | None, bool]:
    """Page ``url``'s result, no links nor bytes yet; where its redirect to ``location``
    leads if it is to be followed; and whether the job follows it itself. Elsewhere, it
    is a page job of its own, deduped with the links to that page (fetched once); to a URL
    of the page's own dedupe key (its query in another order), the master would drop that
    job as seen and the page would be lost, so the job fetches it. A loop ends at a URL
    the job has ``fetched`` (normalized), a chain of new URLs at ``max_redirects``."""
    result = {"url": url, "status": status, "links": 0, "bytes": 0}
    if redirects:
        result["redirects"] = redirects
    if location is None:
        return result, None, False
    result["redirect"] = target = link_of(url, location)
    if target is None:
        result["error"] = "a redirect to no web page"
    elif redirects >= max_redirects:
        result["error"] = f"over {max_redirects} redirects in a row"
    elif target == normalize_url(url) or target in fetched:
        result["error"] = "a redirect loop"
    else:
        return result, target, page_key(target) == page_key(url)
    return result, None, False


def header_url(sent: bytes) -> str:
    """A URL a header (a Location) sent with bytes not ASCII, as browsers read it: UTF-8,
    else each such byte escaped (urllib read a UTF-8 /café as /cafÃ©, a 404; aiohttp's
    Latin-1 /caf\\xe9 was no web page)."""
    try:
        return sent.decode("utf-8")
    except UnicodeDecodeError:
        return quote(sent, safe=string.punctuation)


def no_answer(url: str, timeout: float) -> TimeoutError:
    # urllib's and aiohttp's say "timed out" or nothing: the error recorded says what, how long
    return TimeoutError(f"{url}: no answer in {timeout} s")


def _read(response, limit: int, deadline: float) -> bytes:
    """At most ``limit`` bytes of the body by ``deadline`` (a wait begun by then lasts the
    request's timeout at most): urllib's timeout is for each wait, and a server that
    dripped a page held the job for as long as it took."""
    body = bytearray()
    while len(body) < limit and (chunk := response.read1(min(CHUNK, limit - len(body)))):
        body += chunk
        if time.monotonic() > deadline:
            raise TimeoutError
    return bytes(body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects itself, off the crawl's host too, and the links of where it
    landed were read as relative to the first URL: here a redirect is an answer (an
    HTTPError), and the crawler makes where it leads a job of its own."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirects)


class PageKeys:
    """Both crawlers' page jobs' keys: a page's dedupe key is page_key's, its limit key its
    host as the crawl's links spell it (politeness, setting LIMITS, is per host)."""

    @classmethod
    def dedupe_key_for(cls, url: str, batch: str = "", depth: int = 0, redirects: int = 0) -> str:
        return page_key(url)

    @classmethod
    def limit_key_for(cls, url: str, batch: str = "", depth: int = 0,
                      redirects: int = 0) -> str:
        return urlsplit(normalize_url(url)).netloc


class CrawlSync(PageKeys, Job):
    queue = "crawl"
    max_retries = 2
    timeout = 30
    request_timeout = 10.0          # one HTTP request, its page read by then
    max_bytes = 2 * 1024 * 1024     # read at most this much of a page
    max_depth: int | None = None    # follow at most this many links from a start page
    max_redirects = MAX_REDIRECTS   # follow at most this many redirects in a row

    def run(self, url: str, batch: str = "", depth: int = 0, redirects: int = 0) -> dict:
        """Crawl page ``url``, ``depth`` links from its start page, reached by ``redirects``
        redirects in a row."""
        fetched: set[str] = set()
        while True:   # a redirect the job follows itself (see result_of)
            fetched.add(normalize_url(url))
            result, target = self._page(url, batch, depth, redirects, frozenset(fetched))
            if target is None:
                return result
            url, redirects = target, redirects + 1

    def _page(self, url: str, batch: str, depth: int, redirects: int,
              fetched: frozenset[str]) -> tuple[dict, str | None]:
        """Crawl page ``url``: its result, and where a redirect leads that the job follows."""
        deadline = time.monotonic() + self.request_timeout
        try:
            # normalized: a start URL may be typed as a browser shows it (/café), and
            # urllib sends ASCII only
            with _opener.open(normalize_url(url), timeout=self.request_timeout) as response:
                # none said: read, HTML if it starts as HTML (browsers sniff it)
                html = "html" in response.headers.get_content_type() \
                    if response.headers.get("Content-Type") else None
                # not all of a huge page, nothing of a PDF or an image: no links in it
                body = _read(response, self.max_bytes + 1, deadline) if html is not False \
                    else b""
                if html is None:
                    html = sniffed_html(body)
                    body = body if html else b""
                charset = response.headers.get_content_charset()
                tags = response.headers.get_all("X-Robots-Tag") or []
                status = response.status
        except TimeoutError:
            raise no_answer(url, self.request_timeout) from None
        except urllib.error.HTTPError as exc:   # a redirect, a 4xx or a 5xx
            if worth_retrying(exc.code):
                exc.retry_after = retry_after(exc.code, exc.headers)
                raise   # worth another attempt, after a backoff
            # a 404 is an answer: nothing to retry, no links to follow
            location = exc.headers.get("Location") if exc.code in REDIRECTS else None
            if location and not location.isascii():   # urllib reads headers as Latin-1
                location = header_url(location.encode("latin-1"))
            result, target, here = result_of(url, exc.code, redirects, location,
                                             self.max_redirects, fetched)
            if here:
                return result, target
            if target is not None:
                # kept to the crawl's host (the start page's to any: the crawl goes on
                # there); no step deeper
                result["links"] = self._submit(url, [target], batch, depth, depth == 0,
                                               redirects + 1)
            return result, None
        except urllib.error.URLError as exc:   # a connection not made in time too
            if not isinstance(exc.reason, TimeoutError):
                raise
            raise no_answer(url, self.request_timeout) from None
        result, _, _ = result_of(url, status, redirects)
        result["bytes"] = min(len(body), self.max_bytes)
        if len(body) > self.max_bytes:
            body, result["truncated"] = body[:self.max_bytes], True
        if not html:
            return result, None
        if self.max_depth is not None and depth >= self.max_depth:
            result["max_depth"] = True   # its links are a step too far: not followed
            return result, None
        parser = Links()
        codec = page_codec(charset, body)
        parser.feed(body.decode(codec, "replace"))
        if parser.nofollow or any(map(nofollow, tags)):
            parser.links = []
        base = parser.base and link_of(url, parser.base) or url
        result["links"] = self._submit(url, [link_of(base, href, codec) for href in parser.links],
                                       batch, depth + 1)
        return result, None

    def _submit(self, url: str, links: list[str | None], batch: str, depth: int,
                anywhere: bool = False, redirects: int = 0) -> int:
        """Submit the links that stay on ``url``'s host (``anywhere``: on any), each once,
        as jobs at ``depth`` (after ``redirects`` redirects in a row); returns how many."""
        args = [batch, depth, redirects] if redirects else [batch, depth]
        host = urlsplit(normalize_url(url)).netloc   # as its links are spelled
        found = [link for link in dict.fromkeys(links)
                 if link is not None and (anywhere or urlsplit(link).netloc == host)]
        for link in found:
            # most links were seen before; the master's dedupe filter drops those
            type(self).submit_with(args=[link, *args],
                                   **({"batch": batch} if batch else {}))
        return len(found)
