"""The synchronous crawler: the crawl of ``elric.demo.crawler`` (the one to use) as a plain
sync job, each fetching one page with urllib, one at a time per pool process.

Also what both crawlers share: URL, link and page reading, robots.txt's rules (RFC 9309)
and what its answer means, a page's result and its links' jobs.
"""

from __future__ import annotations

import codecs
import http.client
import math
import re
import string
import time
import urllib.error
import urllib.request
from datetime import UTC
from email.utils import parsedate_to_datetime
from html.parser import HTMLParser
from typing import Callable, TypeVar
from urllib.parse import quote, urldefrag, urljoin, urlsplit

from elric import Job

T = TypeVar("T")


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
    """Where a <meta http-equiv="refresh"> leads, as browsers read it (None: to its own page)."""
    found = _REFRESH.match(content)
    return found and next(url for url in found.groups() if url is not None) or None


ROBOTS_NAME = "elric-crawler"   # its name in robots.txt, X-Robots-Tag and a robots <meta>
# "name: nofollow" in an X-Robots-Tag is for the crawler named; these are directives instead
_VALUED = {"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"}


def nofollow(content: str) -> bool:
    """Whether a robots <meta>'s content, or an X-Robots-Tag's, says to follow no link. As
    Google reads a header: a crawler's name ("otherbot: nofollow") holds up to the next name;
    what comes before any name holds for every crawler."""
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
    parts = urlsplit(url)   # not urlparse: it takes a last segment's ";v=2" off the path
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
    # Python's codec is IDNA 2003, which maps ß and ς away (straße.de to strasse.de): another
    # domain than browsers reach, IDNA 2008's xn--strae-oqa.de
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
        when = _http_date(value)
    except (TypeError, ValueError):   # none, or not a date
        return 0.0
    # the date is by the server's clock: less its Date (RFC 9110 10.2.3), not this machine's
    # time, which may be an hour off (a retry at once, or an hour late)
    try:
        now = _http_date(headers.get("Date", ""))
    except (TypeError, ValueError):   # none: this machine's clock is all there is
        now = time.time()
    return max(0.0, when - now)


def _http_date(value: str) -> float:
    when = parsedate_to_datetime(value)   # naive for -0000: UTC, no zone said (RFC 5322)
    return when.replace(tzinfo=when.tzinfo or UTC).timestamp()


def page_key(url: str) -> str:
    """A page job's dedupe key: its normalized URL, the query's parameters in order of name
    (``?b=2&a=1`` is ``?a=1&b=2``). One that is no http(s) URL is refused at submit."""
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
    """The normalized http(s) URL ``href`` on page ``base`` leads to; None for another scheme,
    one that does not parse, or one over MAX_URL (a site may link each page to a longer URL).
    A query is escaped in the page's ``codec``, as browsers send it."""
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
    """The charset to read a page in, as browsers find it: its byte order mark's, else its
    Content-Type's, else a <meta>'s in its first 1024 bytes, else UTF-8 if it reads as such,
    else a later <meta>'s, else windows-1252."""
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
    """The codec to read the page in (with errors="replace", as browsers do): page_charset's,
    its label as browsers read it (UTF-8 for one Python does not know)."""
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


def result_of(url: str, status: int, redirects: int, location: str | None,
              max_redirects: int, fetched: frozenset[str]) -> tuple[dict, str | None, str | None]:
    """Page ``url``'s result, no links nor bytes yet, and where its redirect to ``location``
    leads: a URL the job follows itself (to the page's own dedupe key, which the master
    would drop as seen), or one to submit as a job of its own. A loop ends at a URL the job
    has ``fetched``, a chain of new URLs at ``max_redirects``."""
    result = {"url": url, "status": status, "links": 0, "bytes": 0}
    if redirects:
        result["redirects"] = redirects
    if location is None:
        return result, None, None
    result["redirect"] = target = link_of(url, location)
    if target is None:
        result["error"] = "a redirect to no web page"
    elif redirects >= max_redirects:
        result["error"] = f"over {max_redirects} redirects in a row"
    elif target == normalize_url(url) or target in fetched:
        result["error"] = "a redirect loop"
    elif page_key(target) == page_key(url):
        return result, target, None
    else:
        return result, None, target
    return result, None, None


def header_url(sent: bytes) -> str:
    """A Location sent with bytes not ASCII, as browsers read it: UTF-8, else each such byte
    escaped."""
    try:
        return sent.decode("utf-8")
    except UnicodeDecodeError:
        return quote(sent, safe=string.punctuation)


def no_answer(url: str, timeout: float) -> TimeoutError:
    # urllib's and aiohttp's say "timed out" or nothing: the error recorded says what, how long
    return TimeoutError(f"{url}: no answer in {timeout} s")


# --- robots.txt, as both crawlers obey it ---

USER_AGENT = f"{ROBOTS_NAME}/0.1"
ROBOTS_MAX_BYTES = 512 * 1024   # RFC 9309: parse at least 500 KiB of a robots.txt
ROBOTS_MAX_AGE = 24 * 3600.0    # RFC 9309: seconds a robots.txt read is used at most
ROBOTS_KEPT = 10_000            # (host, round) pairs a process keeps the robots.txt of


class RobotsUnavailable(Exception):
    """robots.txt answered a 5xx (or 429 or 408), or nothing: RFC 9309 keeps every page of
    its host out until it answers. Worth another attempt after a backoff, as a page's 5xx."""

    def __init__(self, url: str, why: str, retry_after: float = 0.0) -> None:
        super().__init__(f"{url}: {why}: no page of its host is fetched until it answers "
                         f"(RFC 9309)")
        self.retry_after = retry_after


def robots_answered(url: str, status: int, headers) -> bool:
    """Whether robots.txt ``url``'s answer has rules to read: a 4xx is no robots.txt
    (everything allowed); a 5xx, 429 or 408 raises RobotsUnavailable."""
    if worth_retrying(status):
        raise RobotsUnavailable(url, f"HTTP {status}", retry_after(status, headers))
    return status < 400


def cached_robots(cache: dict, url: str, round_: str, fresh: Callable[[T], bool],
                  read: Callable[[str], T]) -> tuple[T, str]:
    """What ``cache`` holds for the robots.txt of ``url``'s host in round ``round_``, read
    anew by ``read(origin)`` unless ``fresh``; and the path (with its query) to ask it about,
    normalized as the rules are spelled (a start URL may be typed /café or /x/../private)."""
    parts = urlsplit(normalize_url(url))
    key = (f"{parts.scheme}://{parts.netloc}", round_)
    found = cache.get(key)
    if found is None or not fresh(found):
        if len(cache) >= ROBOTS_KEPT:   # many rounds and hosts: start afresh
            cache.clear()
        found = cache[key] = read(key[0])
    return found, (f"{parts.path or '/'}?{parts.query}" if parts.query else parts.path or "/")


def kept_out(job: Job, url: str, error: RobotsUnavailable | None = None) -> dict:
    """The result of page ``url``, which robots.txt keeps out: disallowed, or unavailable
    (``error``), which is raised instead while ``job`` has a retry left: asked again after
    a backoff. With none left, it is no failed page: the site kept it out."""
    if error is not None and job.attempt <= (job.max_retries or 0):
        raise error
    result = {"url": url, "status": None, "links": 0, "bytes": 0,
              "robots": "disallowed" if error is None else "unavailable"}
    if error is not None:
        result["error"] = str(error)
    return result


class Robots:
    """A robots.txt as RFC 9309 reads it: the rules of the groups naming this crawler, else
    of ``*``; of those, the longest that matches a path (``*``: anything; a final ``$``: the
    end), Allow on a tie: urllib's RobotFileParser knows no ``*`` nor ``$``."""

    def __init__(self, lines: list[str], agent: str) -> None:
        self.read_at = time.monotonic()   # a round that runs for days reads it again
        token = agent.split("/")[0].lower()
        groups: list[tuple[list[str], list[tuple[str, bool]], list[float]]] = []
        in_rules = True   # the next User-agent line starts a group
        for line in lines:
            key, colon, value = line.split("#", 1)[0].partition(":")
            key, value = key.strip().lower(), value.strip()
            if key == "user-agent":
                if in_rules:
                    groups.append(([], [], []))
                    in_rules = False
                groups[-1][0].append(value.split("/")[0].lower())
            elif groups and key in ("allow", "disallow"):
                # a rule ends the group's User-agent lines; a Crawl-delay or Sitemap does not
                in_rules = True
                if value:   # "Disallow:" keeps nothing out
                    groups[-1][1].append((requote(value), key == "allow"))
            elif groups and key == "crawl-delay" and _seconds(value):
                groups[-1][2].append(min(float(value), 86_400.0))   # a day at most
        named = [group for group in groups if token in group[0]]   # case-insensitive
        chosen = named or [group for group in groups if "*" in group[0]]
        # Crawl-delay, in no RFC but widely written: the least seconds between two requests
        self.delay = max((delay for _, _, delays in chosen for delay in delays), default=None)
        rules = sorted({rule for _, group, _ in chosen for rule in group},
                       key=lambda rule: (-len(rule[0]), not rule[1]))
        self.rules = [(pattern, _glob(pattern), allow) for pattern, allow in rules]

    @classmethod
    def read(cls, body: bytes) -> Robots:
        """The rules of a robots.txt that answered ``body`` (b"" for none: all allowed)."""
        return cls(body.decode("utf-8-sig", "replace").splitlines(), USER_AGENT)   # no BOM

    def fresh(self) -> bool:
        """Whether these rules were read less than ROBOTS_MAX_AGE ago."""
        return time.monotonic() - self.read_at < ROBOTS_MAX_AGE

    def allows(self, path: str) -> bool:
        """Whether the crawler may fetch ``path`` (with its query)."""
        if path == "/robots.txt":
            return True
        for prefix, glob, allow in self.rules:   # the longest first; on a tie Allow
            if path.startswith(prefix) if glob is None else _matches(glob, path):
                return allow
        return True


def _seconds(value: str) -> bool:
    try:
        return 0 < float(value) < math.inf
    except ValueError:
        return False


def _glob(pattern: str) -> tuple[list[str], bool] | None:
    """A rule with ``*`` or a final ``$``: its parts between the ``*``, and whether it ends
    with ``$``; None for a plain prefix."""
    end = pattern.endswith("$")
    if "*" not in pattern and not end:
        return None
    return (pattern[:-1] if end else pattern).split("*"), end


def _matches(glob: tuple[list[str], bool], path: str) -> bool:
    # each part at the first place it fits: linear, where a regex (.*a.*a.*a.*b) could
    # take a minute on a path a site chose, stalling every job of the process
    parts, end = glob
    if not path.startswith(parts[0]):
        return False
    at = len(parts[0])
    if len(parts) == 1:
        return not end or at == len(path)
    for part in parts[1:-1]:
        at = path.find(part, at)
        if at < 0:
            return False
        at += len(part)
    last = parts[-1]
    if end:
        return len(path) - len(last) >= at and path.endswith(last)
    return path.find(last, at) >= 0


def _read(response, limit: int, deadline: float) -> bytes:
    """At most ``limit`` bytes of the body by ``deadline`` (a wait begun by then lasts the
    request's timeout at most): urllib's timeout is for each wait, not the request."""
    body = bytearray()
    while len(body) < limit and (chunk := response.read1(min(CHUNK, limit - len(body)))):
        body += chunk
        if time.monotonic() > deadline:
            raise TimeoutError
    return bytes(body)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (an HTTPError): the crawler makes where it leads a job of its
    own, kept to the crawl's host, its links read relative to it."""

    def redirect_request(self, *args, **kwargs):
        return None


_opener = urllib.request.build_opener(_NoRedirects)
# robots.txt's redirects are followed (RFC 9309: five at least; urllib's ten, as aiohttp's)
_robots_opener = urllib.request.build_opener()
# as the async crawler's: the name its robots.txt knows it by (not Python-urllib's)
_opener.addheaders = _robots_opener.addheaders = [("User-Agent", USER_AGENT)]

# this pool process's robots.txt rules, per (scheme://host, round): read once in each
_robots: dict[tuple[str, str], Robots] = {}


def _allowed(url: str, round_: str, timeout: float) -> Robots | None:
    """The rules of ``url``'s robots.txt in this round if they allow it, else None."""
    rules, path = cached_robots(_robots, url, round_, Robots.fresh,
                                lambda origin: _read_robots(origin, timeout))
    return rules if rules.allows(path) else None


def _read_robots(origin: str, timeout: float) -> Robots:
    url, deadline = origin + "/robots.txt", time.monotonic() + timeout
    try:
        with _robots_opener.open(url, timeout=timeout) as response:
            body = _read(response, ROBOTS_MAX_BYTES, deadline) \
                if robots_answered(url, response.status, response.headers) else b""
    except urllib.error.HTTPError as exc:   # a 4xx, a 5xx, or redirects with no end
        robots_answered(url, exc.code, exc.headers)   # a 3xx: as if there were none (RFC 9309)
        body = b""
    except (OSError, http.client.HTTPException) as exc:   # no connection, or a broken one
        # urllib's URLError wraps what failed: a connection not made in time too
        reason = exc.reason if isinstance(getattr(exc, "reason", None), OSError) else exc
        why = f"no answer in {timeout} s" if isinstance(reason, TimeoutError) \
            else f"{type(reason).__name__}: {reason}"
        raise RobotsUnavailable(url, why) from None
    return Robots.read(body)


def link_jobs(batch: str, depth: int, redirects: int, delay: float | None) -> tuple[list, dict]:
    """A page's links' jobs' args after the link, and their submit options: at ``depth``,
    after ``redirects`` redirects in a row, in the crawl's ``batch``, and ``delay`` seconds
    apart at least (their host's robots.txt's Crawl-delay, across all workers)."""
    options: dict = {"batch": batch} if batch else {}
    if delay:
        options["limit_interval"] = delay
    return [batch, depth, redirects] if redirects else [batch, depth], options


class PageJob:
    """What both crawlers' page jobs share: their settings, checked where a class is
    defined, and their keys: a page's dedupe key is page_key's, its limit key its host as the
    crawl's links spell it (politeness, setting LIMITS, is per host)."""

    queue = "crawl"
    request_timeout: float          # seconds: one HTTP request, its page read by then
    max_bytes = 2 * 1024 * 1024     # read at most this much of a page
    max_depth: int | None = None    # follow at most this many links from a start page
    max_redirects = MAX_REDIRECTS   # follow at most this many redirects in a row

    def __init_subclass__(cls, **kwargs) -> None:
        # a bad value fails here, not at every page
        super().__init_subclass__(**kwargs)
        timeout, size = cls.request_timeout, cls.max_bytes
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool)
                and 0 < timeout < math.inf):
            raise ValueError(f"{cls.__name__}.request_timeout must be a number of seconds "
                             f"over 0, not {timeout!r}")
        if not (isinstance(size, int) and not isinstance(size, bool) and size > 0):
            raise ValueError(f"{cls.__name__}.max_bytes must be a whole number of bytes "
                             f"over 0, not {size!r}")
        if not (cls.max_depth is None or type(cls.max_depth) is int and cls.max_depth >= 0):
            raise ValueError(f"{cls.__name__}.max_depth must be a whole number of links or "
                             f"None, not {cls.max_depth!r}")
        if not (type(cls.max_redirects) is int and cls.max_redirects >= 0):
            raise ValueError(f"{cls.__name__}.max_redirects must be a whole number of "
                             f"redirects, not {cls.max_redirects!r}")

    @classmethod
    def dedupe_key_for(cls, url: str, batch: str = "", depth: int = 0, redirects: int = 0) -> str:
        return page_key(url)

    @classmethod
    def limit_key_for(cls, url: str, batch: str = "", depth: int = 0,
                      redirects: int = 0) -> str:
        return urlsplit(normalize_url(url)).netloc


class CrawlSync(PageJob, Job):
    max_retries = 2
    timeout = 30
    request_timeout = 10.0

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
        try:
            robots = _allowed(url, self.dedupe_scope or batch, self.request_timeout)
        except RobotsUnavailable as exc:
            return kept_out(self, url, exc), None
        if robots is None:
            return kept_out(self, url), None
        deadline = time.monotonic() + self.request_timeout
        location = None
        try:
            # normalized: urllib sends ASCII only, and a start URL may be typed /café
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
            status, html, body = exc.code, False, b""
            location = exc.headers.get("Location") if exc.code in REDIRECTS else None
            if location and not location.isascii():   # urllib reads headers as Latin-1
                location = header_url(location.encode("latin-1"))
        except urllib.error.URLError as exc:   # a connection not made in time too
            if not isinstance(exc.reason, TimeoutError):
                raise
            raise no_answer(url, self.request_timeout) from None
        result, follow, link = result_of(url, status, redirects, location, self.max_redirects,
                                         fetched)
        if link is not None:   # no step deeper; from the start page, to any host
            result["links"] = self._submit(url, [link], batch, depth, robots.delay, depth == 0,
                                           redirects + 1)
        if location is not None:
            return result, follow
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
                                       batch, depth + 1, robots.delay)
        return result, None

    def _submit(self, url: str, links: list[str | None], batch: str, depth: int,
                delay: float | None = None, anywhere: bool = False, redirects: int = 0) -> int:
        """Submit the links that stay on ``url``'s host (``anywhere``: on any), each once,
        as jobs at ``depth`` (after ``redirects`` redirects in a row) that start ``delay``
        seconds apart at least (its robots.txt's Crawl-delay); returns how many."""
        args, options = link_jobs(batch, depth, redirects, delay)
        host = urlsplit(normalize_url(url)).netloc   # as its links are spelled
        found = [link for link in dict.fromkeys(links)
                 if link is not None and (anywhere or urlsplit(link).netloc == host)]
        for link in found:
            # most links were seen before; the master's dedupe filter drops those
            type(self).submit_with(args=[link, *args], **options)
        return len(found)
