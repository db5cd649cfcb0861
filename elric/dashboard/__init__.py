"""The web dashboard, served by a master when ``DASHBOARD_ADDRESS`` is set.

Server-rendered pages (aiohttp and Jinja2, no build step) that refresh their main part every
two seconds. Pages and actions go through the master's own RPC handlers, with their checks and
errors, so every dashboard shows the same. ``access.py`` says who may see what.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
from urllib.parse import parse_qsl, quote, urlencode

import jinja2
from aiohttp import web

from elric.bulk import left_alone, not_run, schedule_left_alone
from elric.config import SettingsError, names
from elric.contract import ErrorCode, STATUSES, Status
from elric.dashboard import metrics
from elric.dashboard.access import COOKIE, SESSION_SECONDS, Access
from elric.master import MAX_SCAN
from elric.retry import REDIS_ERRORS, redis_refusal
from elric.rpc import RequestError
from elric.views import (attempts, cut, duration, json_text, mib, percent, stamp, when,
                         worker_counts, worker_state)

log = logging.getLogger("elric.dashboard")

PAGE = 50                      # rows per page of a job list
SCAN = 10_000                  # jobs a filtered page looks at, at most: then "look further"
LIVE_HEADER = "X-Elric-Live"   # a refresh asks for the page's main part only
HTTP_STATUS = {ErrorCode.NOT_FOUND: 404, ErrorCode.BAD_REQUEST: 400,
               ErrorCode.REDIS_UNAVAILABLE: 503}
RUN_WAIT = 5.0                 # seconds a run now waits to say what became of its fire
# Connections open at once (their files are among the master's SPARE_FILES): past it, a 503
# at once, where one left waiting could not tell a busy dashboard from a hung master.
MAX_CONNECTIONS = 32
KEEPALIVE = 15.0               # seconds an idle connection is kept (aiohttp's: an hour)
BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\nContent-Length: 47\r\n\r\n"
        b"the dashboard has too many connections: retry\r\n")
SHOWN = 20_000                 # characters of a job's arguments or result its page shows
PAGES = (("/", "overview"), ("/workers", "workers"), ("/schedules", "schedules"),
         ("/jobs", "jobs"), ("/jobs?status=failed", "failed"), ("/stats", "statistics"),
         ("/redis", "redis"))


def _actions(master) -> dict:
    """(kind, action) -> a call of the master's RPC handler that does it to one id, given
    the form's value (which only a worker's processes and queues take)."""
    def processes(worker_id, value):   # a number, or the text the master will refuse
        # (int() refuses over 4,300 digits: such a number is refused as text)
        value = int(value) if value.removeprefix("-").isdecimal() and len(value) <= 20 \
            else value
        return master.control_worker(worker_id, "set", None, value)

    def queues(worker_id, value):
        return master.control_worker(worker_id, "set", names(value, "queues"))

    by_id = {("job", "retry"): master.rerun_job, ("job", "cancel"): master.cancel_job,
             ("job", "delete"): master.remove_job, ("schedule", "pause"): master.pause_job,
             ("schedule", "resume"): master.resume_job, ("schedule", "remove"): master.remove_job,
             ("schedule", "run now"): lambda one: master.run_job(one, RUN_WAIT)}
    for action in ("pause", "resume", "stop"):
        by_id["worker", action] = functools.partial(master.control_worker, action=action)
    return {("worker", "processes"): processes, ("worker", "queues"): queues,
            **{key: lambda one, value, call=call: call(one) for key, call in by_id.items()}}


def _local_path(value: str) -> str:
    """A redirect target on this site only (no //host, no scheme; browsers read /\\ as //,
    and a URL drops tabs and newlines, so "/", a tab, "/host" is //host)."""
    local = value.startswith("/") and not value.startswith(("//", "/\\"))
    return value if local and value.isprintable() else "/"


class Dashboard:
    def __init__(self, master, password: str | None) -> None:
        self.master = master
        self.access = Access(password, clock=lambda: master.store.clock())
        self.actions = _actions(master)
        self.templates = jinja2.Environment(
            loader=jinja2.PackageLoader("elric", "dashboard/templates"),
            autoescape=True, trim_blocks=True, lstrip_blocks=True)
        # json, not tojson: a job's maps may have bytes keys, or int and str keys it cannot
        # sort. "ago" is by Redis's clock, as every time shown: this machine's may be off
        self.templates.filters.update(
            when=lambda seconds: when(seconds, master.store.clock()), mib=mib, percent=percent,
            attempts=lambda job: attempts(job, master.store.clock()), duration=duration,
            quote_id=lambda text: quote(text, safe=""), worker_state=worker_state,
            worker_counts=worker_counts, json=_json)
        self.app = web.Application(middlewares=[self._guard])
        self.app.add_routes([
            web.get("/", self.overview), web.get("/workers", self.workers),
            web.get("/schedules", self.schedules), web.get("/jobs", self.jobs),
            web.get("/jobs/{job_id:.+}", self.job), web.get("/stats", self.stats),
            web.get("/redis", self.redis_page), web.get("/metrics", self.metrics),
            web.get("/login", self.login_page), web.post("/login", self.login),
            web.post("/logout", self.logout), web.post("/act", self.act)])
        self.runner: web.AppRunner | None = None
        self.listener: asyncio.Server | None = None
        self.open = 0   # connections served now

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self.runner = web.AppRunner(self.app, access_log=None, keepalive_timeout=KEEPALIVE)
        await self.runner.setup()
        self.listener = await asyncio.get_running_loop().create_server(
            self._connection, host, port)
        return self.listener.sockets[0].getsockname()[:2]

    def _connection(self):
        if self.open >= MAX_CONNECTIONS:
            return _Busy()
        self.open += 1
        return _Counted(self.runner.server(), self)

    async def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.runner is not None:
            await self.runner.cleanup()

    # --- plumbing ---------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler):
        if not self.access.host_ok(request):
            raise web.HTTPForbidden(text="this dashboard has no password: it answers only to "
                                         "a loopback address (localhost, 127.0.0.1, [::1])")
        if not self.access.may_read(request):
            if request.path == "/metrics":   # a scraper: a login page would be a parse error
                given = "Authorization" in request.headers
                raise web.HTTPUnauthorized(
                    headers={"WWW-Authenticate": 'Bearer realm="elric"'
                             + (', error="invalid_token"' if given else "")},
                    text=("the bearer token is wrong" if given else "no bearer token")
                    + ": send the dashboard password (DASHBOARD_PASSWORD, else RPC_TOKEN) as "
                    "the header Authorization: Bearer PASSWORD\n")
            if request.method == "GET":
                raise web.HTTPSeeOther("/login?" + urlencode({"next": request.path_qs}))
            handler = self.session_ended
        try:
            response = await handler(request)
        except RequestError as exc:
            response = self._render(request, "error.html", status=HTTP_STATUS.get(exc.code, 500),
                                    message=str(exc), code=exc.code)
        except web.HTTPNotFound:   # no route: a mistyped address gets the pages' links
            response = self._render(request, "error.html", status=404, code=ErrorCode.NOT_FOUND,
                                    message=f"no page {request.path}: the pages are above")
        except web.HTTPException:   # a redirect, or a refusal with its own text
            raise
        except Exception as exc:   # a bug, or a key an operator gave another type: say so,
            # unless a page reading Redis outside an RPC handler (/redis's INFO) met it away or
            # refusing (refusal first: redis-py raises LOADING as a ConnectionError)
            if (refusal := redis_refusal(exc)) is not None or isinstance(exc, REDIS_ERRORS):
                response = self._render(
                    request, "error.html", status=503, code="redis_unavailable",
                    message=f"{refusal}: try again" if refusal else
                    f"master cannot reach Redis right now ({exc}); try again")
            else:
                log.exception("dashboard: %s failed", request.path)   # as the RPC would
                response = self._render(request, "error.html", status=500,
                                        code=ErrorCode.INTERNAL,
                                        message=f"internal error: {type(exc).__name__}: {exc}")
        response.headers["X-Frame-Options"] = "DENY"   # no clickjacking of the buttons
        response.headers["Cache-Control"] = "no-store"
        return response

    def _render(self, request: web.Request, name: str, status: int = 200, **context):
        html = self.templates.get_template(name).render(
            live=LIVE_HEADER in request.headers, path=request.path_qs, pages=PAGES,
            can_act=self.access.login_required,
            csrf=self.access.csrf_token(request), note=self.access.note(request),
            as_of=stamp(self.master.store.clock()), **context)
        return web.Response(text=html, status=status, content_type="text/html")

    # --- pages ------------------------------------------------------------------------
    async def overview(self, request: web.Request):
        stats = await self.master.stats()
        health = await self.master.health()
        # queues a running worker takes: jobs waiting elsewhere wait for good
        served = {q for w in stats["workers"] if worker_state(w) == "running"
                  for q in str(w.get("queues", "")).split(",")}
        return self._render(request, "overview.html", stats=stats, health=health,
                            chart=_chart(stats["throughput"]), served=served)

    async def workers(self, request: web.Request):
        # only the workers: stats() reads every func, batch and queue's counts too
        return self._render(request, "workers.html", workers=await self.master.queue.workers())

    async def schedules(self, request: web.Request):
        offset = _int(request.query.get("offset"))
        # one row more than a page: whether a next page has any
        rows = await self.master.list_jobs({"status": "scheduled", "offset": offset,
                                            "limit": PAGE + 1})
        more, rows = len(rows) > PAGE, rows[:PAGE]
        jobs = await asyncio.gather(*(self.master.get_job(r["job_id"]) for r in rows))
        for row, job in zip(rows, jobs):   # the last outcomes of each
            if job and job.get("unreadable"):   # one that cannot be read: named, the others shown
                row["trigger_text"] = job["error"]
            row["runs"] = (job or {}).get("runs", [])[:5]
        return self._render(request, "schedules.html", rows=rows, offset=offset, page=PAGE,
                            more=more)

    async def jobs(self, request: web.Request):
        q = request.query
        if q.get("id", "").strip():   # (blanks alone: "/jobs/" is no page)
            raise web.HTTPSeeOther(f"/jobs/{quote(q['id'].strip(), safe='')}")
        if q.get("status") == Status.SCHEDULED:   # listed as schedules, they had no status
            raise web.HTTPSeeOther("/schedules")   # (or queue) in this table's rows
        if q.get("status") == Status.FILTERED:   # not stored as jobs: counted per dedupe scope
            raise web.HTTPSeeOther("/stats#filters")   # ("No job matches", "any status")
        filters = {k: q[k] for k in ("status", "queue", "func", "batch") if q.get(k)}
        offset, cursor = _int(q.get("offset")), q.get("cursor", "")
        # an index lists a status, or a queue's waiting jobs; any other filter scans: bounded,
        # and where the scan stopped before the page filled, a link looks further from there
        unindexed = bool(filters.keys() & {"func", "batch"}) or (
            "queue" in filters and filters.get("status") != Status.QUEUED)
        reply = await self.master.list_jobs({**filters, "offset": offset, "limit": PAGE + 1,
                                             "cursor": cursor,
                                             **({"scan_limit": SCAN} if unindexed else {})})
        rows, further = reply["jobs"], reply["cursor"]
        more, rows = len(rows) > PAGE, rows[:PAGE]
        return self._render(request, "jobs.html", rows=rows, filters=filters, offset=offset,
                            scan=SCAN if unindexed else MAX_SCAN, more=more, cursor=cursor,
                            further=further and urlencode({**filters, "cursor": further}),
                            page=PAGE, statuses=[s for s in STATUSES if s != "filtered"],
                            newest=urlencode(filters),
                            query=urlencode({**filters, **({"cursor": cursor} if cursor else {})}))

    async def job(self, request: web.Request):
        job_id = request.match_info["job_id"]
        job = await self.master.get_job(job_id)
        if job is None:   # (a schedule's run links to its job, kept for a while)
            s = self.master.settings
            raise RequestError(
                f"no job {job_id!r}: its id is mistyped, it was deleted, or it ended longer ago "
                f"than ended jobs are kept: succeeded {duration(s.RESULT_TTL * 1000)} "
                f"(RESULT_TTL), failed {duration(s.FAILED_TTL * 1000)} (FAILED_TTL)",
                ErrorCode.NOT_FOUND)
        return self._render(request, "job.html", job=job)

    async def stats(self, request: web.Request):
        stats = await self.master.stats()
        return self._render(request, "stats.html", funcs=stats["funcs"], more=stats["more"],
                            batches=stats["batches"], filters=stats["filters"])

    async def redis_page(self, request: web.Request):
        info = await self.master.redis.info()
        try:
            policy = (await self.master.redis.config_get("maxmemory-policy")).get(
                "maxmemory-policy", "unknown")
        except Exception:   # CONFIG may be renamed or disabled on a managed Redis
            policy = "unknown (CONFIG GET refused)"
        warnings = []
        if not info.get("aof_enabled"):
            warnings.append("AOF is off: a Redis crash loses the jobs accepted since the last "
                            "snapshot. Set appendonly yes.")
        if policy != "noeviction":
            warnings.append(f"maxmemory-policy is {policy}: Redis may evict jobs when full. "
                            "Set maxmemory-policy noeviction.")
        return self._render(request, "redis.html", info=info, policy=policy,
                            warnings=warnings)

    async def metrics(self, request: web.Request):
        # every func: one left out (stats() holds the latest) leaves gaps in its graphs
        body = metrics.render(await self.master.stats(for_metrics=True))
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    # --- login and actions ------------------------------------------------------------
    async def login_page(self, request: web.Request, error: str = "", next: str = "",
                         status: int = 401):
        return self._render(request, "login.html", error=error,
                            next=_local_path(next or request.query.get("next", "/")),
                            status=status if error else 200)

    async def session_ended(self, request: web.Request):
        """A form sent without a session (it expired): nothing is done; the login, which
        goes back to the page the form was on."""
        form = await _form(request)
        return await self.login_page(request, "your session has ended: log in, then do it "
                                     "again", next=str(form.get("next", "/")))

    async def login(self, request: web.Request):
        form, address = await _form(request), request.remote or ""
        if wait := math.ceil(self.access.login_wait(address)):   # whatever the password:
            response = await self.login_page(   # else a guess goes on as fast as before
                request, f"too many failed logins from {address}: try again in {wait} s",
                next=str(form.get("next", "/")), status=429)
            response.headers["Retry-After"] = str(wait)
            return response
        ok = self.access.password_ok(str(form.get("password", "")))
        if self.access.login_required:
            self.access.login_tried(address, ok)
        if not ok:
            log.warning("dashboard: a failed login from %s", address)
            return await self.login_page(
                request, "wrong password" if self.access.login_required
                else "this dashboard has no password: it is read-only",
                next=str(form.get("next", "/")))
        response = web.HTTPSeeOther(_local_path(str(form.get("next", "/"))))
        # Lax: a link from another site (an alert) opens a page; every action needs its
        # CSRF token, and this site's Origin, besides
        response.set_cookie(COOKIE, self.access.new_session(), max_age=SESSION_SECONDS,
                            httponly=True, samesite="Lax")
        return response

    async def logout(self, request: web.Request):
        if refused := self.access.other_site(request):   # its form has no CSRF token
            raise web.HTTPForbidden(text=refused)
        response = web.HTTPSeeOther("/login")
        response.del_cookie(COOKIE)
        return response

    async def act(self, request: web.Request):
        """One action on one or many ids (a bulk retry sends every id it lists)."""
        form = await _form(request)
        if refused := self.access.may_act(request, form):
            raise web.HTTPForbidden(text=refused)
        # an id sent twice (two rows of one job) is one job: done, and counted, once
        kind, action = form.get("kind"), form.get("action")
        ids = list(dict.fromkeys(form.getall("id", [])))
        handler = self.actions.get((kind, action))
        if handler is None:   # (no id: a bulk button with nothing ticked, "0 of 0 done")
            raise web.HTTPBadRequest(text=f"unknown action {kind!r} {action!r}")
        value = str(form.get("value", ""))   # every handler takes one: a stray one is no 500
        done, errors, jobs = 0, [], {}
        for one in ids if kind != "worker" else []:   # its kind, checked before any is done
            try:   # (a job delete given a schedule's id removed the schedule)
                jobs[one] = await self.master.job_kind(one)
            except RequestError as exc:   # Redis away, an id it refuses: left alone, said why
                errors.append(f"{one}: {exc}")
        if wrong := [one for one, job in jobs.items()
                     if job and job["periodic"] != (kind == "schedule")]:
            periodic = "a periodic" if kind == "job" else "a one-off"
            raise web.HTTPBadRequest(text=f"{wrong[0]!r} is {periodic} job: the {kind} action "
                                          f"{action!r} does not act on it; nothing was done\n")
        for one in ids if kind == "worker" else jobs:
            try:
                # the CLI's words for a pause or resume that changes nothing
                if unchanged := schedule_left_alone(jobs.get(one), action):
                    errors.append(f"{one}: {unchanged}")
                    continue
                reply = await handler(one, value)
            except (RequestError, SettingsError) as exc:   # SettingsError: a queue list
                errors.append(f"{one}: {exc}")
                continue
            # delete, pause and resume answer False for no such job; a cancel of a job that
            # had ended, or of a periodic one, leaves it alone: neither is done
            if reply is False:
                errors.append(f"{one}: not found")
            elif action == "cancel" and not Status(reply["was"]).live:
                errors.append(left_alone(one, reply["was"]))
            elif kind == "worker" and reply.get("unchanged"):   # (two clicks, two tabs)
                errors.append(f"{one}: already asked to {action}: nothing to do")
            elif action == "run now" and (why := not_run(reply, RUN_WAIT)):
                errors.append(f"{one}: {why}")   # e.g. skipped: max_instances are running
            else:
                done += 1
        log.info("dashboard: %s %s: %d of %d done", kind, action, done, len(ids))
        note = f"{action}: {done} of {len(ids)} done" + "".join(f"; {e}" for e in errors[:3]) \
            + (f"; and {len(errors) - 3} more" if len(errors) > 3 else "")
        path, _, query = _local_path(str(form.get("next", "/"))).partition("?")
        # the last action's note and its signature go; this one's, signed for this session
        kept = [(k, v) for k, v in parse_qsl(query) if k not in ("sig", "note")]
        sig = self.access.note_signature(request, note)
        raise web.HTTPSeeOther(f"{path}?{urlencode([*kept, ('sig', sig), ('note', note)])}")


class _Counted:
    """aiohttp's handler of a connection, which counts it open until it is lost."""

    def __init__(self, handler, dashboard: Dashboard) -> None:
        self._handler, self._dashboard = handler, dashboard

    def __getattr__(self, name):
        return getattr(self._handler, name)

    def connection_lost(self, exc) -> None:
        self._dashboard.open -= 1
        self._handler.connection_lost(exc)


class _Busy(asyncio.Protocol):
    """A connection past MAX_CONNECTIONS: answered 503 at once, and closed when the peer
    closes, or after a second (closing with its request unread would reset the
    connection, and the peer could lose the answer)."""

    def connection_made(self, transport) -> None:
        transport.write(BUSY)
        asyncio.get_running_loop().call_later(1.0, transport.close)

    def data_received(self, data) -> None:
        pass


async def _form(request: web.Request):
    """The form POSTed; a body that is not UTF-8, or a field that is a file (no page of
    ours sends either) is a 400 saying so, not a 500."""
    try:
        form = await request.post()
    except UnicodeDecodeError as exc:
        raise web.HTTPBadRequest(text=f"the form is not UTF-8 text ({exc.reason} at byte "
                                      f"{exc.start}): send it as the dashboard's pages do\n") \
            from None
    if files := [name for name, value in form.items() if not isinstance(value, str)]:
        raise web.HTTPBadRequest(text=f"the form sends a file ({files[0]}): the dashboard's "
                                      "forms send text only\n")
    return form


def _int(value) -> int:
    # isdecimal, not isdigit: int() refuses digits such as "²" (a 500); and over 4,300
    # digits (a 500 too): such a number is past the end of any list, as 2**64 is
    if not value or not value.isdecimal():
        return 0
    return int(value) if len(value) <= 20 else 2**64


def _json(value, job_id: str) -> str:
    """A job's arguments or result, cut at SHOWN characters: megabytes, drawn again at each
    refresh, froze the browser."""
    # text as written (a page is UTF-8): "\u65e5" tells an operator nothing
    text = json_text(value, indent=1, sort_keys=True, ensure_ascii=False)
    return text if len(text) <= SHOWN else (f"{cut(text, SHOWN)}\n({len(text) - SHOWN + 1:,} "
                                            f"more characters: elric job {job_id} --json "
                                            "shows them all)")


def _chart(minutes: list[dict]) -> dict:
    """Bars of succeeded and failed jobs per minute, scaled to the busiest minute."""
    top = max([m["succeeded"] + m["failed"] for m in minutes] + [1])
    return {"top": top, "bars": [
        {"minute": m["minute"], "ok": m["succeeded"] / top * 100, "failed": m["failed"] / top * 100,
         "label": f"{m['succeeded']} succeeded, {m['failed']} failed"} for m in minutes]}
