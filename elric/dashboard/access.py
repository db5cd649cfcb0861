"""Who may see and steer the dashboard.

Jobs' arguments, results and tracebacks are private. Without a password the dashboard
serves only a loopback address, read-only. With one (``DASHBOARD_PASSWORD``, else
``RPC_TOKEN``) every page needs a login, and every action a CSRF token bound to the
session. The session cookie is signed with a key derived from the password, so every
dashboard of the cluster accepts it and a changed password ends every session.

A few failed logins in a row from one address make it wait before its next try, longer
after each. Each master counts in its own memory: behind a balancer over M masters, M
times the tries; behind a proxy every client is the proxy's address, and waits together.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web

from elric.config import is_loopback

COOKIE = "elric_session"
SESSION_SECONDS = 12 * 3600
OPEN_PATHS = ("/login",)   # what a visitor who has not logged in may load
LOGIN_TRIES = 5          # failed logins in a row from one address before it must wait
LOGIN_WAIT = 10.0        # s it then waits, twice as long after each further failure,
LOGIN_WAIT_MOST = 600.0  # up to this; an hour without a failure forgets them
LOGIN_ADDRESSES = 10_000  # addresses whose failures are kept: those that failed last


@dataclass(slots=True)
class _Failures:
    """Failed logins in a row from one address; monotonic times: a wait on this master."""

    count: int
    last: float

    @property
    def until(self) -> float:
        over = self.count - LOGIN_TRIES
        wait = 0.0 if over < 0 else min(LOGIN_WAIT_MOST, LOGIN_WAIT * 2 ** min(over, 10))
        return self.last + wait


def _same(given: str, expected: str) -> bool:
    """In constant time; compare_digest refuses str with non-ASCII text (a 500), not bytes.
    surrogatepass: a header's bytes that are not UTF-8 arrive as lone surrogates."""
    return hmac.compare_digest(given.encode(errors="surrogatepass"),
                               expected.encode(errors="surrogatepass"))


class Access:
    def __init__(self, password: str | None, clock: Callable[[], float] = time.time) -> None:
        self.password = password or None   # "" (RPC_TOKEN = ""): none, as the master reads it
        # Redis's (the master's synced clock): each dashboard takes the others' sessions,
        # and their machines' clocks may be an hour apart
        self.clock = clock
        self._key = hashlib.sha256(b"elric-dashboard\0" + password.encode()).digest() \
            if password else b""
        self._failed: dict[str, _Failures] = {}   # by address, the latest failure last

    @property
    def login_required(self) -> bool:
        return self.password is not None

    def _sign(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def password_ok(self, given: str) -> bool:
        return self.login_required and _same(given, self.password)

    def login_wait(self, address: str) -> float:
        """Seconds before ``address`` may try a password again (0: now)."""
        failed = self._failed.get(address)
        return max(0.0, failed.until - time.monotonic()) if failed else 0.0

    def login_tried(self, address: str, ok: bool) -> None:
        failed, now = self._failed.pop(address, None), time.monotonic()
        if not ok:
            count = failed.count if failed and now - failed.last < 3600 else 0
            self._failed[address] = _Failures(count + 1, now)
            if len(self._failed) > LOGIN_ADDRESSES:   # the one that failed longest ago
                del self._failed[next(iter(self._failed))]

    def new_session(self) -> str:
        # the nonce: two logins in one second were one session (one CSRF token, one note)
        signed = f"{int(self.clock()) + SESSION_SECONDS}.{secrets.token_hex(8)}"
        return f"{signed}.{self._sign(signed)}"

    def session(self, request: web.Request) -> str | None:
        """The request's session cookie when it is valid and not expired, else None."""
        value = request.cookies.get(COOKIE, "")
        signed, _, signature = value.rpartition(".")
        expires = signed.partition(".")[0]
        # (int() refuses over 4,300 digits: no cookie of ours has over 20)
        if not (self.login_required and expires.isdecimal() and len(expires) <= 20
                and int(expires) > self.clock()):
            return None
        return value if _same(signature, self._sign(signed)) else None

    def csrf_token(self, request: web.Request) -> str:
        session = self.session(request)
        return self._sign(f"csrf:{session}") if session else ""

    def note_signature(self, request: web.Request, note: str) -> str:
        """An action's note, signed for this session: a page shows only notes the dashboard
        wrote (else a link's ?note= could make it say "log in at ...")."""
        session = self.session(request)
        return self._sign(f"note:{session}\0{note}") if session else ""

    def note(self, request: web.Request) -> str:
        """The page's note when this session's action wrote it, else ""."""
        note, signature = request.query.get("note", ""), request.query.get("sig", "")
        return note if signature and _same(signature, self.note_signature(request, note)) \
            else ""

    def may_act(self, request: web.Request, form) -> str | None:
        """Why this POST may not change anything, or None when it may."""
        if not self.login_required:
            return ("this dashboard is read-only: set DASHBOARD_PASSWORD on the master to "
                    "act from it")
        session = self.session(request)
        if session is None:
            return "log in first"
        if refused := self.other_site(request):
            return refused
        if not _same(str(form.get("csrf", "")), self.csrf_token(request)):
            return "the form is stale or forged: reload the page and try again"
        return None

    def other_site(self, request: web.Request) -> str | None:
        """Why a POST from another site's page is refused, or None when it is this one's."""
        origin = request.headers.get("Origin")   # (its host: a TLS proxy may change the scheme)
        if origin and origin.partition("://")[2] != request.host:
            # nginx passes on the upstream's own Host unless told: every button refused
            return (f"refused a request from another site ({origin}, not {request.host}); "
                    "behind a proxy, pass on the Host the browser sent (nginx: "
                    "proxy_set_header Host $host)")
        return None

    def host_ok(self, request: web.Request) -> bool:
        """Without a password, a page answers only to a loopback name: another site's page
        cannot reach it by pointing its own name at 127.0.0.1 (DNS rebinding)."""
        if self.login_required:
            return True
        host = request.host
        if host.startswith("["):         # [::1]:7532 (strip("[]") left "::1]:7532")
            host = host[1:].partition("]")[0]
        elif host.count(":") == 1:       # 127.0.0.1:7532, localhost:7532
            host = host.rpartition(":")[0]
        return is_loopback(host)

    def may_read(self, request: web.Request) -> bool:
        if (not self.login_required or request.path in OPEN_PATHS
                or self.session(request) is not None):
            return True
        # Prometheus sends the password as a bearer token (the scheme in any case: RFC 7235)
        scheme, _, bearer = request.headers.get("Authorization", "").partition(" ")
        return request.path == "/metrics" and scheme.lower() == "bearer" and \
            self.password_ok(bearer)
