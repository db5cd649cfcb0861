"""The ``elric`` command: master, worker, demo, and the operator's calls to a master.

Exit status: 0 ok, 1 not found or failed, 2 usage or settings, 3 unavailable (the master or
its Redis cannot be reached: try again). With --json an error is JSON on stdout too, unless
the reply was printed: {"error": "not_found"|"failed"|"usage"|"unavailable", "message": ...}."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import math
import os
import sys
import time
from datetime import datetime

from elric import logs, views
from elric.bulk import JobFilter, left_alone, not_run, schedule_left_alone
from elric.config import (SettingsError, Unreachable, is_module_name, load_settings,
                          meant_module, names)
from elric.contract import STATUSES, ErrorCode, NotFound, SpecError, Status


def cmd_master(args: argparse.Namespace) -> int:
    from elric.master import Master

    settings = load_settings(args.settings, overrides=dict(
        MASTER_ADDRESS=args.address, REDIS_URL=args.redis_url, LOG_FORMAT=args.log_format))
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)
    return asyncio.run(Master(settings).run())


def cmd_worker(args: argparse.Namespace) -> int:
    from elric.contract import WORKER_ACTIONS

    if args.modules and args.modules[0] in WORKER_ACTIONS:   # elric worker pause ID, ...
        return _control_worker(args)
    from elric.worker import Worker   # after: steering a worker needs none of its modules
    for name in args.modules:   # a mistyped action (elric worker Pause ID) starts no worker
        if not is_module_name(name) or name.endswith(".py") and os.path.isfile(name):
            raise UsageError(_not_a_module(name, WORKER_ACTIONS))

    queues = names(args.queues, "--queues") if args.queues is not None else None
    settings = load_settings(args.settings, overrides=dict(
        MASTER_ADDRESS=args.master, REDIS_URL=args.redis_url, QUEUES=queues,
        CONCURRENCY=args.concurrency, ASYNC_CONCURRENCY=args.async_concurrency,
        JOB_MODULES=args.modules or None, LOG_FORMAT=args.log_format))
    logs.configure(settings.LOG_LEVEL, settings.LOG_FORMAT)
    return asyncio.run(Worker(settings).run())


def _not_a_module(name: str, actions) -> str:
    """Why ``name`` starts no worker; a file (jobs.py, ./jobs) or a func (jobs:Crawl) is
    answered with the module meant, which an import error would not say."""
    if meant := meant_module(name):   # (not a worker id, host:pid:hex)
        return (f"{name!r} is a {meant[0]}, not a module name: elric worker {meant[1]}, from "
                "the folder it imports from (a worker runs every Job class of its modules)")
    return (f"{name!r} is not a module name; to steer a running worker: "
            f"elric worker {'|'.join(actions)} ID")


def cmd_demo(args: argparse.Namespace) -> int:
    from elric.demo import MAX_PAGES, run_demo
    from elric.redis_server import RedisServerError

    # (at least 1: the site links page n to pages n+1 and 7n+3 modulo their number)
    if not 1 <= args.pages <= MAX_PAGES:
        raise UsageError(f"--pages takes 1 to {MAX_PAGES} (the demo site's size), "
                         f"got {args.pages}")
    try:
        return run_demo(settings_path=args.settings, pages=args.pages, keep=args.keep)
    except RedisServerError as exc:   # the demo's own Redis did not start
        raise Failed(f"{exc}; or set ELRIC_REDIS_URL to a Redis of yours") from None


def _client(args: argparse.Namespace):
    from elric.client import MasterClient

    settings = load_settings(args.settings, overrides={"MASTER_ADDRESS": args.master})
    return MasterClient.from_settings(settings, handshake=HANDSHAKE)


# seconds a master has to answer a new connection: a peer that accepts and never answers
# (Redis, a web server) is told at once, not after a call's 30 s
HANDSHAKE = 5.0


def _print(value) -> None:
    _json_out(views.json_text(value, indent=2, sort_keys=True))


_json_shown = False   # a reply printed as JSON: an error after it prints no second object


def _json_out(text: str) -> None:
    global _json_shown
    _json_shown = True
    print(text)


def _argument(text: str):
    """A command-line job argument: JSON when it parses (7, true, [1], {"a": 1}), else text."""
    def finite(number: str) -> float:   # 1e400 is JSON, but read as inf: not the number typed
        if math.isinf(float(number)):
            raise UsageError(f"argument {text!r}: {number} is beyond a float's range (it would "
                             f"arrive as infinity); quote it ('\"{number}\"') to send it as text")
        return float(number)

    try:   # (json.loads reads NaN and Infinity too, which are no JSON: they stay text)
        return json.loads(text, parse_constant=_not_json, parse_float=finite)
    except ValueError:
        return text


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _wait(client, job_id: str, timeout: float | None) -> dict:
    """Wait for the job to end, with a spinner saying where it is."""
    from rich.status import Status as Spinner

    from elric.handle import wait

    told = set()

    def show(job: dict) -> None:
        spinner.update(f"job {job_id}: {job['status']} (attempt {job.get('attempts', 0)})")
        if (why := job.get("not_run")) and why not in told:   # why it waits, said once
            told.add(why)
            print(f"elric: job {job_id} not run: {why}", file=sys.stderr)

    with Spinner(f"job {job_id}: queued", console=views.console) as spinner:
        return wait(client, job_id, timeout, on_status=show)


def _say_if_no_worker_takes(client, job_id: str) -> None:
    """A note when no running worker takes the job's queue: --wait waited there without a
    word (a spinner on a terminal), however long no worker came or a paused one stayed so."""
    job = client.get_job(job_id) or {}
    queue = job.get("queue")
    if job.get("status") not in (Status.QUEUED, Status.RETRYING) or not queue:
        return
    if not any(views.worker_state(w) == "running" and queue in str(w.get("queues", "")).split(",")
               for w in client.stats()["workers"]):
        print(f"elric: no running worker takes queue {queue!r} (elric workers; elric worker "
              f"resume ID resumes a paused one): job {job_id} waits until one does (elric "
              f"worker MODULE --queues {queue})", file=sys.stderr)


def _submit_spec(args: argparse.Namespace) -> dict:
    """The spec ``elric submit`` sends: built by the Job class (its queue, retries, timeout,
    dedupe and limit keys) when the class imports here, else the name alone."""
    import pkgutil

    from elric.job import Job

    options = {key: getattr(args, key) for key in ("queue", "job_id", "batch")
               if getattr(args, key) is not None}
    if args.spec is not None:
        try:
            more = json.loads(args.spec)
        except ValueError as exc:
            raise UsageError(f"--spec: not JSON ({exc})") from None
        if not isinstance(more, dict):
            raise UsageError("--spec: expected a JSON map of job spec keys, e.g. "
                             '\'{"priority": 5, "max_retries": 3}\'')
        if twice := sorted(more.keys() & {*options, "func", "args"}):
            raise UsageError(f"--spec: {', '.join(twice)} go(es) as FUNC, ARG... or its own "
                             "option, not in --spec")
        options.update(more)   # the master checks each key, as any client's
    arguments = [_argument(a) for a in args.arguments]
    try:
        cls = pkgutil.resolve_name(args.func_path)   # "package.module:ClassName"
    except Exception as exc:
        print(f"elric: {args.func_path} is not importable here ({type(exc).__name__}: "
              f"{exc}): sent by name, without its class's defaults (queue, retries, dedupe "
              "and limit keys)", file=sys.stderr)
        return {"func": args.func_path, "args": arguments, **options}   # the master judges it
    if not (isinstance(cls, type) and issubclass(cls, Job)) or cls is Job:
        # else queued, it would be handed back or refused by every worker
        what = "elric.Job itself" if cls is Job else f"a {type(cls).__name__}"
        raise UsageError(f"{args.func_path} is {what}, not a Job class: FUNC names a "
                         "subclass of elric.Job, as \"package.module:ClassName\"")
    spec = cls.spec(arguments, **options)
    cls._check_arguments(spec["args"], spec["kwargs"])
    return spec


def cmd_call(args: argparse.Namespace) -> int:
    """The commands that ask a master: one RPC call (or a few), shown as a table, or as the
    reply itself with --json."""
    show = _print if args.json else None
    if "" in (getattr(args, "job_ids", None) or [getattr(args, "job_id", None)]):
        # the master's refusal of it is bad_request, which rerun reads as the job's state
        raise UsageError("a job id cannot be empty")
    for dest in ("queue", "by_func", "batch", "status", "worker", "since", "until"):
        if getattr(args, dest, None) == "":
            # meant no filter at all: `elric delete --queue "$Q" --status failed`, with $Q
            # unset, deleted the failed jobs of every queue
            raise UsageError(f"--{dest.removeprefix('by_')} '': give a value, or leave the "
                             "option out")
    if args.command == "jobs" and args.status == Status.FILTERED:
        if flag := next((f for f, v in (("--queue", args.queue), ("--func", args.by_func),
                                        ("--batch", args.batch)) if v is not None), None):
            raise UsageError(f"--status filtered shows counts per dedupe scope (a filtered "
                             f"submission is not stored), not by {flag}; leave {flag} out")
    with _client(args) as client:
        command = args.command
        # tables saying how long ago a time is judge it by Redis's clock, as the master does
        # (this machine's may be hours off); health() answers it without reading every count
        if not show and (command in ("job", "jobs", "results", "schedules")
                         or command == "submit" and args.wait):
            views.use_clock(client.health()["now"])
        if command == "ping":
            (show or print)(client.ping())   # --json: "pong", as JSON
        elif command == "health":
            health = client.health()
            (show or views.health)(health)
            return 0 if health["ok"] else 1
        elif command == "stats":
            _print(client.stats())
        elif command == "status":
            stats, health = client.stats(), client.health()
            show({"stats": stats, "health": health}) if show else views.status(stats, health)
            return 0 if health["ok"] else 1
        elif command == "top":
            return _top(client, args)
        elif command == "workers":
            stats = client.stats()
            show(stats["workers"]) if show else views.workers(stats["workers"], stats.get("now"))
        elif command == "job":   # (a periodic job whose data cannot be read: named, exit 0)
            job = _on_one_job(client.get_job, args.job_id)
            if job is None:
                raise NotFound(f"no job {args.job_id!r}")
            (show or views.job)(job)
        elif command == "jobs" and args.status == Status.FILTERED:
            # a filtered submission is dropped, never stored: there are counts, not jobs
            (show or views.filtered)(client.stats()["filters"])
        elif command == "jobs":
            # (--limit 0 goes to the master, which refuses it, rather than shows 100 jobs)
            rows = client.list_jobs(**_filter(args, offset=args.offset, limit=args.limit)) \
                if args.status == Status.SCHEDULED else _jobs_page(client, args)
            if not rows and (args.queue or args.by_func or args.batch):
                # a bulk find's first step refuses a name no job had: "no jobs" made a typo
                # (--func jobs.Crawl) look like an empty queue
                client.bulk_jobs("find", _filter(args), "")
            # periodic jobs are listed as short maps of their schedules: shown as schedules
            view = views.schedules if args.status == Status.SCHEDULED else views.jobs
            (show or view)(rows)
            _more(rows, args, show)
        elif command == "schedules":
            return _schedules(client, args, show)
        elif command == "results":
            return _results(client, args)
        elif command == "submit":
            if args.timeout is not None and not args.wait:   # else ignored, unsaid
                raise UsageError("--timeout is how long --wait waits; a job's own time limit "
                                 "is its class's timeout (or JOB_TIMEOUT)")
            if args.timeout is not None and not args.timeout > 0:   # (nan: a traceback)
                raise UsageError(f"--timeout takes seconds above 0, got {args.timeout:g}; "
                                 "leave it out to wait until the job ends")
            spec = _submit_spec(args)
            try:
                reply = client.submit_job(spec)
            except TypeError as exc:   # nothing sent: an argument msgpack cannot carry
                raise UsageError(f"{exc} (integers take 64 bits, text UTF-8)") from None
            # filtered: it never runs (scheduled: each fire is a job of its own); any other
            # status is of the job that has this id (a submission sent again): waited for
            if not args.wait or reply["status"] in (Status.FILTERED, Status.SCHEDULED):
                if reply["status"] == Status.SCHEDULED and reply.get("next_run_time") is None \
                        and (client.job_kind(reply["job_id"]) or {}).get("status") == "finished":
                    raise Failed(f"periodic job {reply['job_id']!r} has finished: no fires are "
                                 "left; send it with replace_existing and a trigger that fires "
                                 f"again, or elric schedules remove {reply['job_id']}")
                (show or (lambda r: print(f"{r['job_id']} {r['status']}")))(reply)
                if reply["status"] == Status.FILTERED:   # it printed "ID filtered" alone
                    from elric.handle import filtered
                    why = filtered(reply["job_id"], spec)
                    if not args.wait:
                        print(f"elric: {why}", file=sys.stderr)
                if args.wait:   # nothing to wait for: say why
                    raise Failed(why if reply["status"] == Status.FILTERED else (
                        f"job {reply['job_id']} was scheduled: the id of a periodic job, so "
                        "nothing was queued; each fire is a job of its own (elric job "
                        f"{reply['job_id']} lists them)"))
                return 0
            from elric.rpc import RPCConnectionError
            try:
                _say_if_no_worker_takes(client, reply["job_id"])
                job = _wait(client, reply["job_id"], args.timeout)
            except (RPCConnectionError, KeyboardInterrupt):   # its id was on the spinner alone
                print(f"elric: stopped waiting for job {reply['job_id']}, which goes on: "
                      f"elric job {reply['job_id']} shows it", file=sys.stderr)
                raise
            except TimeoutError as exc:   # it said how long, not that the job goes on
                raise Failed(f"{exc}: it keeps running; elric job {reply['job_id']} "
                             "follows it") from None
            (show or views.job)(job)
            return 0 if job["status"] == Status.SUCCEEDED else 1
        elif command in BULK and (command == "copy" or _bulk_filter(args) or
                                  len(args.job_ids) != 1):
            return _bulk(client, args, show)
        elif command == "rerun":
            (show or (lambda r: print(f"job {r['job_id']}: {r['status']}")))(
                _on_one_job(client.rerun_job, args.job_ids[0]))
        elif command in ("remove", "delete"):
            if (client.job_kind(args.job_ids[0]) or {}).get("periodic"):   # as a delete of many
                raise Failed(left_alone(args.job_ids[0], Status.SCHEDULED, "delete"))
            if not _on_one_job(client.remove_job, args.job_ids[0]):
                raise NotFound(f"no job {args.job_ids[0]!r}")
            (show or (lambda r: print(f"job {args.job_ids[0]}: removed")))(True)
        elif command == "cancel":
            reply = _on_one_job(client.cancel_job, args.job_ids[0])
            if show:
                show(reply)
            if not Status(reply["was"]).live:   # nothing done: exit 1, as a bulk cancel
                raise Failed(left_alone(reply["job_id"], reply["was"]))
            if not show:
                print(f"job {reply['job_id']}: {reply['status']} (was {reply['was']})")
    return 0


def _on_one_job(call, job_id: str):
    """``call(job_id)``; the master refusing it for the job's state (running, periodic)
    fails the command (exit 1), as the same command on many jobs does, not as a usage error."""
    from elric.rpc import RemoteError
    try:
        return call(job_id)
    except RemoteError as exc:
        if exc.code == ErrorCode.BAD_REQUEST:
            raise Failed(str(exc)) from None
        raise


# command -> the bulk_jobs action it runs on a filter (purge: delete a queue's queued jobs)
BULK = {"rerun": "rerun", "copy": "copy", "cancel": "cancel", "remove": "delete",
        "delete": "delete", "purge": "delete"}


def _when(text: str) -> float:
    """Epoch seconds, or an ISO 8601 time (local time when it names no zone)."""
    try:
        if math.isfinite(float(text)):   # "nan" and "inf" parse, and match no job
            return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"{text!r} is not a time: give epoch seconds or ISO 8601, e.g. "
                         "2026-12-04T10:00") from None


def _filter(args: argparse.Namespace, **more) -> dict:
    """The job filter --status, --queue, --func and --batch give, with ``more``."""
    f = {"status": getattr(args, "status", None), "queue": args.queue, "func": args.by_func,
         "batch": args.batch, **more}
    return {key: value for key, value in f.items() if value not in (None, "")}


def _bulk_filter(args: argparse.Namespace) -> dict:
    if args.command == "purge":
        return {"status": "queued", "queue": args.queue_name}
    return _filter(args, worker=args.worker, since=args.since and _when(args.since),
                   until=args.until and _when(args.until))


def _bulk(client, args: argparse.Namespace, show) -> int:
    """Run a bulk operation step by step, with a running count, until its cursor ends."""
    from rich.status import Status as Spinner

    from elric.rpc import RPCError

    action, f = BULK[args.command], _bulk_filter(args)
    if getattr(args, "job_ids", None):
        f["ids"] = args.job_ids
    op = os.urandom(4).hex() if action == "copy" else ""

    def walk(kind: str) -> dict:
        total, cursor = {"touched": 0, "skipped": 0, "not_found": [], "errors": []}, ""
        while True:
            try:
                step = client.bulk_jobs(kind, f, cursor, op)
            except RPCError as exc:   # its "nothing was changed" is this step's alone
                if cursor:   # (a copy run again makes copies under new ids)
                    again = "; run again, it copies them again" if action == "copy" else ""
                    exc.args = (f"{args.command} stopped after {total['touched']} jobs done, "
                                f"{total['skipped']} skipped (not undone{again}): {exc}",)
                raise
            total["touched"] += step["touched"]
            total["skipped"] += step["skipped"]
            total["not_found"] += step.get("not_found", [])
            total["errors"] += step["errors"][:5 - len(total["errors"])]
            spinner.update(f"{args.command}: {total['touched']} "
                           f"{'found' if kind == 'find' else 'done'}, {total['skipped']} skipped")
            cursor = step["cursor"]
            if not cursor:
                return total

    with Spinner(f"{args.command}: starting", console=views.console) as spinner:
        total = walk(action)
        if action == "cancel" and not (total["touched"] + total["skipped"]
                                       or total["not_found"]):
            # a cancel walks live jobs only: it said "0 done", exit 0, of a filter that
            # matched ended jobs alone; as a cancel of ended ids, they are skipped
            if ended := walk("find")["touched"]:
                total.update(skipped=ended, errors=[
                    f"the {ended} jobs matching had already ended: nothing cancelled"])
    if show:
        show(total)
    else:
        missing = total["not_found"]
        print(f"{args.command}: {total['touched']} jobs done, {total['skipped']} skipped"
              + (f", {len(missing)} not found" if missing else ""))
        for error in total["errors"]:
            print(f"  skipped: {error}")
        if missing:   # (mistyped, or its record expired)
            print(f"  not found: {', '.join(missing[:10])}{', ...' if len(missing) > 10 else ''}")
    # it did nothing asked
    return 1 if (total["skipped"] or total["not_found"]) and not total["touched"] else 0


def _top(client, args: argparse.Namespace) -> int:
    """A live view, read again every second, until Ctrl-C (or --iterations); with --json,
    the stats it shows, once."""
    if args.iterations is not None and args.iterations < 1:   # (0 read as none: for good)
        raise UsageError(f"--iterations takes 1 or more, got {args.iterations}")
    if args.json:
        _print(client.stats())
        return 0
    from rich.live import Live

    with Live(console=views.console, auto_refresh=False) as live:
        for n in itertools.count(1):
            live.update(views.top(client.stats()), refresh=True)
            if args.iterations and n >= args.iterations:
                return 0
            time.sleep(1.0)


def _control_worker(args: argparse.Namespace) -> int:
    """elric worker pause|resume|stop ID, elric worker set ID --queues a,b --concurrency N
    (either or both; the master checks the values)."""
    action, ids = args.modules[0], args.modules[1:]
    if len(ids) != 1:
        raise UsageError(f"elric worker {action} takes one worker id (see elric workers)")
    if action == "set" and args.queues is None and args.concurrency is None:
        raise UsageError("elric worker set ID takes --queues a,b, --concurrency N or both")
    if action != "set" and (args.queues is not None or args.concurrency is not None):
        # the master would ignore them: "pause asked" for what was meant as a set
        raise UsageError(f"elric worker {action} takes no --queues or --concurrency; "
                         "elric worker set ID does")
    queues = names(args.queues, "--queues") if args.queues is not None else None
    with _client(args) as client:
        reply = client.control_worker(ids[0], action, queues,
                                      args.concurrency if action == "set" else None)
    if args.json:
        _print(reply)
    else:
        print(f"worker {ids[0]}: " + ({"pause": "already paused", "resume": "was not paused",
                                       "stop": "already told to stop"}[action] +
                                      ": nothing to do" if reply.get("unchanged") else
                                      f"{action} asked; it obeys within a second"))
    return 0


def _jobs_page(client, args: argparse.Namespace) -> list[dict]:
    """The page of jobs asked for; a call looks at a bounded stretch of jobs, so where one
    stops before the page is full (a rare func) the next goes on from its cursor."""
    rows, seen, cursor = [], set(), ""
    while True:
        reply = client.list_jobs(**_filter(args, offset=0 if cursor else args.offset,
                                           limit=args.limit - len(rows)), cursor=cursor)
        rows += [row for row in reply["jobs"] if row["job_id"] not in seen]  # (moved on
        seen.update(row["job_id"] for row in rows)   # between calls: met twice)
        cursor = reply["cursor"]
        if not cursor or len(rows) >= args.limit:
            return rows


def _more(rows: list, args: argparse.Namespace, show) -> None:
    """A full page may have more after it: say how to see them (a table showed no sign)."""
    if len(rows) == args.limit and not show:
        print(f"(the first {args.limit} from {args.offset}: --offset "
              f"{args.offset + args.limit} shows the next)")


def _schedules(client, args: argparse.Namespace, show) -> int:
    if not args.action:
        schedules = client.list_jobs(status="scheduled", offset=args.offset, limit=args.limit)
        (show or views.schedules)(schedules)
        _more(schedules, args, show)
        return 0
    if not args.job_id:
        raise UsageError(f"elric schedules {args.action} takes the periodic job's id")
    job = client.job_kind(args.job_id) or {}
    if job and not job["periodic"]:   # remove_job would delete this one-off job
        raise Failed(f"job {args.job_id!r} is not periodic: " + (
            f"elric delete {args.job_id} removes it" if args.action == "remove" else
            f"elric rerun {args.job_id} runs it again" if args.action == "run-now" else
            f"only periodic jobs {args.action}"))
    if args.action == "run-now":
        return _run_now(client, args.job_id, show)
    unchanged = schedule_left_alone(job, args.action)
    if job.get("status") == "finished" and unchanged:
        raise Failed(f"periodic job {args.job_id!r} {unchanged}")
    call = {"pause": client.pause_job, "resume": client.resume_job,
            "remove": client.remove_job}[args.action]
    if not call(args.job_id):
        raise NotFound(f"no periodic job {args.job_id!r}")
    said = unchanged or f"{args.action}d"
    if said == "resumed" and (client.job_kind(args.job_id) or {}).get("status") == "finished":
        said += ", and finished: no fires are left"   # (its end passed while paused)
    (show or (lambda _: print(f"periodic job {args.job_id}: {said}")))(True)
    return 0


def _results(client, args: argparse.Namespace) -> int:
    """Stream the results of succeeded jobs a page at a time; the master finds their ids a
    step at a time (bulk_jobs "find"), so neither side holds them all."""
    if not 1 <= args.page_size <= 1000:
        raise UsageError("--page-size takes 1 to 1000")
    f = _filter(args, status=Status.SUCCEEDED)
    jsonl, cursor, first, pending = args.json or args.format == "jsonl", "", True, []
    while True:
        step = client.bulk_jobs("find", f, cursor)
        pending += step["ids"]
        cursor = step["cursor"]
        while len(pending) >= args.page_size or (pending and not cursor):
            page, pending = pending[:args.page_size], pending[args.page_size:]
            rows = [{k: job[k] for k in ("job_id", "func", "result", "finished_at")}
                    for job in client.get_jobs(page)   # an expired or rerun job: left out
                    if job is not None and job["status"] == Status.SUCCEEDED]
            if jsonl:
                for row in rows:
                    _json_out(views.json_text(row))
            else:
                views.results(rows, first=first)
            first = False
            sys.stdout.flush()
        if not cursor:
            if first and not jsonl:
                views.results([], first=True)
            return 0


RUN_NOW_WAIT = 15.0   # seconds to see the fire: a master taking over scheduling may need ~10


def _run_now(client, job_id: str, show) -> int:
    """Ask for a fire now, and for what the scheduler did with it: max_instances may skip
    it, and that should not pass in silence (exit 1)."""
    # paused or finished: failed, not usage
    reply = _on_one_job(lambda one: client.run_job(one, RUN_NOW_WAIT), job_id)
    job = client.get_job(job_id) or {}   # its next run time after the fire
    why = not_run(reply, RUN_NOW_WAIT)
    if show:
        show(reply)
    elif why is None:
        print(f"periodic job {job_id}: fired {reply['fire_id']} ({reply['run']['outcome']}); "
              f"next run {views.when(job.get('next_run_time'))}")
    if why is not None:
        raise Failed(f"periodic job {job_id}: {why}")
    return 0


class Failed(Exception):
    """The command ran but what it asked for did not happen: exit status 1."""


class UsageError(Exception):
    """A command given what it cannot take: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # not argparse's exit: main prints it as every usage error, as JSON with --json
        self.print_usage(sys.stderr)
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elric", description="elric job scheduler")
    common = _Parser(add_help=False)
    common.add_argument("--settings", help="settings file, or a folder with a settings.py "
                        "(default: $ELRIC_SETTINGS, else ./settings.py where there is one)")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_parser(name: str, help: str) -> argparse.ArgumentParser:
        # description: `elric NAME --help` says what the command does, as `elric --help` does
        return sub.add_parser(name, help=help, description=help, parents=[common])

    p = add_parser("master", help="run a master")
    p.add_argument("--address", help="host:port to listen on (MASTER_ADDRESS)")
    p.add_argument("--redis-url", help="Redis URL (REDIS_URL)")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines (LOG_FORMAT)")
    p.set_defaults(func=cmd_master)

    p = add_parser("worker", help="run a worker; or pause|resume|stop|set ID one")
    p.add_argument("modules", nargs="*", metavar="MODULE",
                   help="modules to load job classes from (JOB_MODULES), e.g. myproject.jobs; "
                        "or pause|resume|stop ID, set ID --queues a,b --concurrency N to "
                        "steer a running one")
    p.add_argument("--json", action="store_true", help="print the reply as JSON")
    p.add_argument("--queues", help="comma-separated queues (QUEUES)")
    p.add_argument("--concurrency", type=int,
                   help="pool processes (CONCURRENCY); with set: change a running worker's")
    p.add_argument("--async-concurrency", type=int,
                   help="async jobs per pool process (ASYNC_CONCURRENCY)")
    p.add_argument("--master", help="master host:port (MASTER_ADDRESS)")
    p.add_argument("--redis-url", help="Redis URL (REDIS_URL)")
    p.add_argument("--log-format", choices=("text", "json"), help="log lines (LOG_FORMAT)")
    p.set_defaults(func=cmd_worker)

    p = add_parser("demo", help="crawl a demo site on 127.0.0.1 with a master and a worker")
    p.add_argument("--pages", type=int, default=25, help="pages of the demo site")
    p.add_argument("--keep", action="store_true",
                   help="keep everything running after the crawl, to look at the dashboard")
    p.set_defaults(func=cmd_demo)

    calls = (("ping", "ask the master for pong"), ("status", "an overview: jobs, workers, "
              "health (exit 1 if not ok)"), ("stats", "job statistics, as JSON"),
             ("health", "what the master's tasks do (exit 1 if one is stuck or retrying)"),
             ("workers", "the workers, alive and lost"), ("job", "show one job"),
             ("top", "a live view of jobs, queues, funcs and workers, every second"),
             ("jobs", "list jobs by status ({}), newest first within each".format(", ".join(
                 s for s in STATUSES if s not in (Status.SCHEDULED, Status.FILTERED)))),
             ("results", "stream the results of succeeded jobs, in no set order"),
             ("schedules", "list periodic jobs, or pause|resume|run-now|remove one"),
             ("submit", "submit a job by name; --wait for its outcome"),
             ("rerun", "run finished jobs again (same ids)"),
             ("copy", "submit copies of jobs (new ids)"),
             ("cancel", "stop jobs: they never run, or stop running"),
             ("delete", "delete jobs that are not running"), ("remove", "the same as delete"),
             ("purge", "delete every queued job of a queue"))
    for name, help_text in calls:
        p = add_parser(name, help=help_text)
        p.add_argument("--master", help="master host:port (MASTER_ADDRESS)")
        p.add_argument("--json", action="store_true", help="print the reply as JSON")
        if name == "job":
            p.add_argument("job_id")
        bulk = name in BULK and name != "purge"
        if bulk:
            p.add_argument("job_ids", nargs="*", metavar="ID",
                           help="job ids; or none, and a filter below")
        if bulk or name == "jobs":
            p.add_argument("--status", help=", ".join(JobFilter.STATUSES if bulk else STATUSES))
        if bulk or name in ("jobs", "results"):
            p.add_argument("--queue")
            p.add_argument("--func", dest="by_func", metavar="FUNC",   # (else help says BY_FUNC)
                           help='"package.module:ClassName"')
            p.add_argument("--batch")
        if bulk:
            p.add_argument("--worker", help="the worker that ran it last")
            p.add_argument("--since", help="submitted at or after (ISO 8601 or epoch s)")
            p.add_argument("--until", help="submitted before")
        if name == "top":
            p.add_argument("--iterations", type=int, help="stop after this many screens")
        if name == "purge":
            p.add_argument("queue_name", metavar="QUEUE")
        if name == "jobs":
            p.add_argument("--offset", type=int, default=0, help="jobs to skip")
            p.add_argument("--limit", type=int, default=20, help="jobs to show (1 to 1000)")
        if name == "results":
            p.add_argument("--format", choices=("table", "jsonl"), default="table",
                           help="jsonl: one {job_id, func, result, finished_at} a line "
                                "(as --json)")
            # list_jobs scans from the newest job to each page's offset: big pages, few scans
            p.add_argument("--page-size", type=int, default=1000,
                           help="jobs read per call to the master (1 to 1000)")
        if name == "schedules":
            p.add_argument("action", nargs="?", choices=("pause", "resume", "run-now", "remove"),
                           help="run-now: fire it now, by its rules (max_instances may skip "
                                "it); cron keeps its calendar, an interval restarts from now "
                                "(before its start_date: begins then)")
            p.add_argument("job_id", nargs="?", help="the periodic job's id, with an action")
            p.add_argument("--offset", type=int, default=0, help="schedules to skip")
            p.add_argument("--limit", type=int, default=100,
                           help="schedules to show (1 to 1000)")
        if name == "submit":
            p.add_argument("func_path", metavar="FUNC", help='"package.module:ClassName"')
            # (default: else argparse calls ARG required, beside a missing FUNC)
            p.add_argument("arguments", nargs="*", metavar="ARG", default=[],
                           help="positional arguments: JSON where they parse, else text")
            p.add_argument("--queue")
            p.add_argument("--job-id")
            p.add_argument("--batch")
            p.add_argument("--spec", metavar="JSON",
                           help='more job spec keys (docs/PROTOCOL.md), e.g. \'{"priority": 5, '
                           '"max_retries": 3, "timeout": 60, "dedupe_key": "k"}\'; with a '
                           '"trigger" and --job-id, a periodic job')
            p.add_argument("--wait", action="store_true",
                           help="wait for the outcome; the exit status follows it")
            p.add_argument("--timeout", type=float,
                           help="with --wait: seconds to wait (the job goes on after)")
        p.set_defaults(func=cmd_call)
    parser.commands = sub.choices
    return parser


def main(argv: list[str] | None = None) -> int:
    parser, argv = build_parser(), sys.argv[1:] if argv is None else argv
    # the command's own parser, intermixed, so ARG... may follow options (submit F --queue
    # q 1 2); argparse refuses intermixed parsing with subcommands
    command = parser.commands.get(argv[0]) if argv else None
    try:
        args = command.parse_intermixed_args(argv[1:], argparse.Namespace(command=argv[0])) \
            if command else parser.parse_args(argv)
    except UsageError as exc:
        return _fail(exc, 2, "--json" in argv)
    # Job modules may live in the current directory, so it must be on sys.path; after the
    # installed packages, so that a folder there named like one (elric/) hides nothing.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    from elric.rpc import RemoteError, RPCConnectionError, RPCError

    global _json_shown
    _json_shown, as_json = False, getattr(args, "json", False)
    try:
        return args.func(args)
    except (RPCConnectionError, Unreachable) as exc:   # the master or Redis: try again later
        return _fail(exc, UNAVAILABLE, as_json)
    except RemoteError as exc:
        return _fail(exc, {"not_found": 1, "internal": 1,
                           "redis_unavailable": UNAVAILABLE}.get(exc.code, 2), as_json)
    # (RPCError: after its subclasses; SpecError: a Job class's spec refused here, e.g. its
    # dedupe_key_for given the wrong arguments)
    except (SettingsError, UsageError, RPCError, SpecError) as exc:
        return _fail(exc, 2, as_json)
    except (NotFound, Failed, TimeoutError) as exc:
        return _fail(exc, 1, as_json)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # elric results | head: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # mute exit's flush
        return 0
    finally:
        # CPython marks a KeyboardInterrupt that left exec'd source (a lazy import's dataclass)
        # as unhandled, and python -m then dies by SIGINT, not this status; an eval clears it
        eval("None")


UNAVAILABLE = 3   # the master or its Redis cannot be reached: try again
ERRORS = {1: "failed", 2: "usage", UNAVAILABLE: "unavailable"}   # --json's error kinds


def _fail(exc: Exception, status: int, as_json: bool) -> int:
    print(f"elric: {exc}", file=sys.stderr)
    if as_json and not _json_shown:   # a script reads stdout as JSON
        kind = "not_found" if isinstance(exc, NotFound) or \
            getattr(exc, "code", None) == ErrorCode.NOT_FOUND else ERRORS[status]
        _json_out(views.json_text({"error": kind, "message": str(exc)}))
    return status


if __name__ == "__main__":
    sys.exit(main())
