"""The ``elric`` command: master, worker, demo, and a few operator calls."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys

from elric.config import SettingsError, load_settings


def _settings(args: argparse.Namespace, **overrides):
    return load_settings(args.settings, overrides=overrides)


def _logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_master(args: argparse.Namespace) -> int:
    from elric.master import Master

    settings = _settings(args, MASTER_ADDRESS=args.address, REDIS_URL=args.redis_url)
    _logging(settings.LOG_LEVEL)
    return asyncio.run(Master(settings).run())


def cmd_worker(args: argparse.Namespace) -> int:
    from elric.worker import Worker

    queues = [q.strip() for q in args.queues.split(",") if q.strip()] if args.queues else None
    settings = _settings(args, MASTER_ADDRESS=args.master, REDIS_URL=args.redis_url,
                         QUEUES=queues, CONCURRENCY=args.concurrency,
                         ASYNC_CONCURRENCY=args.async_concurrency,
                         JOB_MODULES=args.modules or None)
    _logging(settings.LOG_LEVEL)
    return asyncio.run(Worker(settings).run())


def cmd_demo(args: argparse.Namespace) -> int:
    from elric.demo import run_demo

    return run_demo(settings_path=args.settings, pages=args.pages)


def _client(args: argparse.Namespace):
    from elric.client import MasterClient

    settings = _settings(args, MASTER_ADDRESS=args.master)
    return MasterClient.from_settings(settings)


def _print(value) -> None:
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def cmd_call(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.command == "ping":
            print(client.ping())
        elif args.command == "health":
            health = client.health()
            _print(health)
            return 0 if health["ok"] else 1
        elif args.command == "stats":
            _print(client.stats())
        elif args.command == "job":
            job = client.get_job(args.job_id)
            if job is None:
                print(f"no job {args.job_id!r}", file=sys.stderr)
                return 1
            _print(job)
        elif args.command == "jobs":
            _print(client.list_jobs(**{k: v for k, v in (("status", args.status),
                                                         ("queue", args.queue),
                                                         ("limit", args.limit)) if v}))
        elif args.command == "rerun":
            _print(client.rerun_job(args.job_id))
        elif args.command == "remove":
            _print(client.remove_job(args.job_id))
        elif args.command == "cancel":
            _print(client.cancel_job(args.job_id))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elric", description="elric job scheduler")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--settings", help="settings module path (default: ./settings.py or "
                                           "$ELRIC_SETTINGS)")
    sub = parser.add_subparsers(dest="command", required=True)
    _add = sub.add_parser

    def add_parser(name, **kw):
        return _add(name, parents=[common], **kw)

    sub.add_parser = add_parser

    p = sub.add_parser("master", help="run a master")
    p.add_argument("--address", help="host:port to listen on (MASTER_ADDRESS)")
    p.add_argument("--redis-url", help="REDIS_URL")
    p.set_defaults(func=cmd_master)

    p = sub.add_parser("worker", help="run a worker")
    p.add_argument("modules", nargs="*", metavar="MODULE",
                   help="modules to load job classes from (JOB_MODULES), e.g. myproject.jobs")
    p.add_argument("--queues", help="comma-separated queues (QUEUES)")
    p.add_argument("--concurrency", type=int, help="pool processes (CONCURRENCY)")
    p.add_argument("--async-concurrency", type=int,
                   help="async jobs per pool process (ASYNC_CONCURRENCY)")
    p.add_argument("--master", help="master host:port (MASTER_ADDRESS)")
    p.add_argument("--redis-url", help="REDIS_URL")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("demo", help="crawl a demo site on 127.0.0.1 with a master and a worker")
    p.add_argument("--pages", type=int, default=25, help="pages of the demo site")
    p.set_defaults(func=cmd_demo)

    for name, help_text in (("ping", "ask the master for pong"), ("stats", "job statistics"),
                            ("health", "what the master's tasks do (exit 1 if one is stuck)"),
                            ("job", "show one job"), ("jobs", "list jobs"),
                            ("rerun", "run a finished job again"), ("remove", "remove a job"),
                            ("cancel", "stop a job: it never runs, or stops running")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--master", help="master host:port (MASTER_ADDRESS)")
        if name in ("job", "rerun", "remove", "cancel"):
            p.add_argument("job_id")
        if name == "jobs":
            p.add_argument("--status")
            p.add_argument("--queue")
            p.add_argument("--limit", type=int, default=20)
        p.set_defaults(func=cmd_call)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Job modules may live in the current directory, so it must be on sys.path; after the
    # installed packages, so that a folder there named like one (elric/) hides nothing.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    from elric.rpc import RPCError

    try:
        return args.func(args)
    except SettingsError as exc:
        print(f"elric: {exc}", file=sys.stderr)
        return 2
    except RPCError as exc:
        print(f"elric: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
