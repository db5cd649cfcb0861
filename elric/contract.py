"""The wire contract: RPC method names, job spec keys, statuses, and spec validation:
what a client may send to a master and what it gets back (documented in docs/PROTOCOL.md).
"""

from __future__ import annotations

import os
import re
from enum import StrEnum
from typing import Any

from msgpack import ExtType, Timestamp


class Status(StrEnum):
    """Where a job is; a str, so it goes to Redis and the wire as its value."""

    QUEUED = "queued"          # waiting in a queue
    RUNNING = "running"        # claimed by a worker
    SUCCEEDED = "succeeded"    # ran and returned
    FAILED = "failed"          # ran out of attempts; in the failed registry
    RETRYING = "retrying"      # failed an attempt; due again after a backoff
    SCHEDULED = "scheduled"    # a periodic job in the job store
    FILTERED = "filtered"      # dropped by the dedupe filter, never queued
    CANCELLED = "cancelled"    # stopped by cancel_job: never ran, or stopped while running

    @property
    def live(self) -> bool:
        """Queued, running or retrying: the job will still run."""
        return self in (Status.QUEUED, Status.RUNNING, Status.RETRYING)

    @property
    def ended(self) -> bool:
        """Succeeded, failed or cancelled: the job ran its course and will not run again."""
        return self in (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)


STATUSES = tuple(Status)

# --- RPC methods ----------------------------------------------------------------------
METHODS = (
    "ping", "auth", "health", "submit_job", "submit_jobs", "get_job", "remove_job",
    "cancel_job", "list_jobs", "stats", "rerun_job", "pause_job", "resume_job", "modify_job",
    "control_worker", "run_job", "bulk_jobs", "job_kind", "get_jobs",
)
WORKER_ACTIONS = ("pause", "resume", "stop", "set")   # control_worker's actions
MAX_CONCURRENCY = 1024   # pool processes a worker may have (CONCURRENCY, control_worker)


class ErrorCode(StrEnum):
    """What kind of error an RPC answer carries; callers branch on it, never on text."""

    BAD_REQUEST = "bad_request"              # the call is wrong: do not send it again as is
    NOT_FOUND = "not_found"                  # no such job
    METHOD_NOT_FOUND = "method_not_found"
    UNAUTHORIZED = "unauthorized"            # auth missing or wrong; the connection closes
    # The master cannot reach Redis (or Redis refuses writes): nothing was changed, the same
    # call may be sent again. Dedupe keys the call took are given back where no job holds them.
    REDIS_UNAVAILABLE = "redis_unavailable"
    INTERNAL = "internal"                    # a bug; the master logged it
    # A request over the master's RPC_MAX_MESSAGE: the error map also holds its limit,
    # ``max_message``; the connection then closes. Send less per call.
    TOO_LARGE = "too_large"


# --- job spec -------------------------------------------------------------------------
# key -> (accepted python types, description)
SPEC_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "func": ((str,), '"package.module:ClassName" of a Job subclass (required)'),
    "args": ((list, tuple), "positional arguments (array)"),
    "kwargs": ((dict,), "keyword arguments (map of string to value)"),
    "job_id": ((str, type(None)), "caller-chosen id; generated when absent (or nil or \"\"), "
                                  "but for a periodic job"),
    # these four: nil is the default, as a Job class's None is (see _DEFAULTS)
    "queue": ((str, type(None)), 'queue name (default "default")'),
    "priority": ((int, type(None)), "higher runs first; FIFO within a priority"),
    "max_retries": ((int, type(None)), "retries after the first attempt"),
    "timeout": ((int, float, type(None)), "seconds an attempt may run"),
    "batch": ((str,), "a label for statistics"),
    "parent": ((str,), "id of the job that submitted this one"),
    "trigger": ((dict,), "periodic schedule (cron / interval / date)"),
    "replace_existing": ((bool,), "replace a periodic job with the same job_id"),
    "misfire_grace_time": ((int, float, type(None)), "seconds a late fire may still run"),
    "coalesce": ((str,), 'missed fires: "latest", "all" or "skip"'),
    "max_instances": ((int,), "fires of one periodic job live at once"),
    "dedupe_key": ((str,), "drop the job when this key was seen in its scope"),
    "dedupe_scope": ((str,), "namespace of dedupe_key"),
    "limit_key": ((str,), "jobs sharing it share the limits setting LIMITS gives it "
                          "(a crawler: the host)"),
    "limit_interval": ((int, float), "least seconds between two starts of jobs of its "
                                     "limit_key where LIMITS gives less (a crawler: robots.txt's "
                                     "Crawl-delay)"),
    "round": ((str,), "the periodic fire this job descends from (set by the master for a "
                      "fire; children inherit it)"),
}

# the keys elric sets (the master for a fire, the worker forwarding a job's children)
SET_BY_ELRIC = ("parent", "round")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
QUEUE_RULE = "1-100 letters, digits, '_', '-' or '.'"   # QUEUE_NAME in words, for errors
# no control characters: an id is printed in every CLI line naming its job, where an escape
# sequence would reach the operator's terminal
JOB_ID = re.compile(r"^[^\s\x00-\x1f\x7f-\x9f]{1,200}$")
# a periodic job's fire: `{job_id}@{fire time, ISO UTC}Z` (jobstore.fire_id). No submitted
# job may take such an id, or the fire at that time would find it taken and never run
FIRE_ID = re.compile(r"^.+@\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$", re.DOTALL)
FIRE_ID_RULE = ("ids ending in '@' and a UTC time with 'Z' (as 'site@2026-03-29T00:30:00Z') "
                "are reserved for the fires of periodic jobs; choose another")
FUNC_PATH = re.compile(r"^[^\W\d][\w.]*:[^\W\d][\w.]*$")   # a Python name: any letter or _ first
MAX_PRIORITY = 2**31
MAX_BATCH = 10_000   # specs one submit_jobs call takes
MAX_READ = 1000   # ids one get_jobs call takes
MIN_MESSAGE = 64 * 1024   # the least RPC_MAX_MESSAGE: a message this big goes to any master
MAX_TIMEOUT = 2**31  # seconds; also refuses nan and inf, which setitimer cannot take


class SpecError(ValueError):
    """A job spec a master refuses; the message names the key and what is wrong."""


class Refused(ValueError):
    """A job's state refuses what a call asks (remove a running job, rerun one not
    finished); a master answers it ``bad_request`` with the reason."""


class NotFound(LookupError):
    """What a call names (a job, a periodic job, a worker) does not exist; a master answers
    it ``not_found``. Its own class, so that a KeyError or IndexError from a bug is not
    taken for it."""


def func_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def check_func(path: Any, allowed: tuple[str, ...] | list[str] | None = None) -> None:
    """Check the name a job gives its class, without importing anything: the master needs
    no project code (the worker that loads the module finds the class). ``allowed``: the
    JOB_MODULES prefixes (None or empty: any module)."""
    if not isinstance(path, str) or not FUNC_PATH.fullmatch(path):
        raise SpecError(
            f'func {path!r}: expected "package.module:ClassName" naming a Job subclass'
        )
    if path.startswith("__main__:"):
        raise SpecError(
            f"func {path!r}: a Job class defined in __main__ cannot be imported by a worker; "
            "move it into a module and import it from there"
        )
    module_name = path.partition(":")[0]
    # the module itself, or one inside a package named
    if not allowed or any((module_name + ".").startswith(prefix.rstrip(".") + ".")
                          for prefix in allowed):
        return
    raise SpecError(f"func {path!r}: module {module_name!r} is not allowed by JOB_MODULES "
                    f"({', '.join(allowed)})")


# What the RPC decoder makes of a msgpack string that is not UTF-8: refused up front, as
# Redis cannot store it, before a dedupe filter takes its key.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_PERIODIC_KEYS = ("replace_existing", "misfire_grace_time", "coalesce", "max_instances")
DEFAULT_QUEUE = "default"   # a job's queue when its spec and class name none
MAX_LIMIT_KEY = 200  # characters: a limit key names Redis keys
# keys left out or nil take the settings' default, else this (Job.spec fills in the class's)
_DEFAULTS = (("queue", DEFAULT_QUEUE), ("priority", 0), ("max_retries", 0), ("timeout", None))


def is_text(value: str) -> bool:
    """Whether a str is valid Unicode text (no lone surrogate): encodable as UTF-8."""
    return value.isascii() or _LONE_SURROGATE.search(value) is None


def check_text(what: str, value: str) -> None:
    """The one refusal of text that is not UTF-8, in a spec, a filter or an id."""
    if not is_text(value):
        raise SpecError(f"{what} {value!r} is not valid UTF-8: send text as UTF-8 and binary "
                        "data as msgpack bin")


# how deep job arguments may nest, and results (a result is often the next job's argument)
MAX_NESTING = 64


def _check_msgpack_value(value: Any, where: str, depth: int = 0) -> None:
    if depth > MAX_NESTING:
        raise SpecError(f"{where}: nested deeper than {MAX_NESTING} levels")
    if isinstance(value, (ExtType, Timestamp)):  # a namedtuple: check it before tuples
        # (the decoder makes a Timestamp of extension type -1)
        code = value.code if isinstance(value, ExtType) else "-1, a timestamp"
        raise SpecError(f"{where}: a msgpack extension type (code {code}) is not "
                        "allowed; send plain values (nil, bool, numbers, strings, bytes, "
                        "arrays, maps; a time as epoch seconds)")
    if isinstance(value, str):
        check_text(where, value)
    elif isinstance(value, int):
        if not -(2**63) <= value < 2**64:   # (a bool is 0 or 1)
            raise SpecError(f"{where}: integer {value} does not fit in 64 bits")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_msgpack_value(item, f"{where}[{i}]", depth + 1)
    elif isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, bytes)):
                raise SpecError(f"{where}: map key {k!r} is a {type(k).__name__}: map keys "
                                "must be strings, integers or bytes, as msgpack carries them")
            if isinstance(k, str):
                check_text(f"{where}: map key", k)
            _check_msgpack_value(v, f"{where}[{k!r}]", depth + 1)
    elif not (value is None or isinstance(value, (float, bytes))):
        raise SpecError(f"{where}: {type(value).__name__} is not a msgpack value")


def check_arguments(args: Any, kwargs: Any) -> None:
    """SpecError naming the first argument the contract refuses (as normalize_spec does):
    where packing a spec failed, that says which argument, and why."""
    _check_msgpack_value(args, "args")
    _check_msgpack_value(kwargs, "kwargs")


# msgpack names for type errors: a client in another language knows no "list" or "str"
_WIRE_NAMES = {type(None): "nil", bool: "boolean", int: "integer", float: "number",
               str: "string", bytes: "binary", list: "array", tuple: "array", dict: "map",
               ExtType: "msgpack extension type", Timestamp: "msgpack timestamp"}


def _wire_names(types: tuple[type, ...]) -> str:
    names = list(dict.fromkeys(_WIRE_NAMES.get(t, t.__name__) for t in types))
    if "number" in names and "integer" in names:
        names.remove("integer")
    return " or ".join(names)


# what to give instead of a value of the wrong type that a user of APScheduler gives
_INSTEAD = {("coalesce", bool): '"latest", "all" or "skip" (APScheduler\'s True is "latest", '
                                'False "all")',
            ("trigger", str): 'e.g. {"type": "cron", "crontab": "*/5 * * * *"}, as '
                              'elric.cron("*/5 * * * *") makes (and every(...), at(...))'}


def check_type(key: str, value: Any) -> None:
    """Refuse a value of the wrong type for spec key ``key``, or text that is not UTF-8."""
    types = SPEC_KEYS[key][0]
    if not isinstance(value, types) or isinstance(value, ExtType) or (
            value is True or value is False) and bool not in types:
        instead = _INSTEAD.get((key, type(value)))
        raise SpecError(f"job spec key {key!r} must be {_wire_names(types)}, "
                        f"got {_WIRE_NAMES.get(type(value), type(value).__name__)}"
                        + (f": {instead}" if instead else ""))
    if isinstance(value, str):
        check_text(key, value)


def normalize_spec(
    spec: Any,
    *,
    defaults: dict | None = None,
    allowed_modules: tuple[str, ...] | list[str] | None = None,
) -> dict:
    """A new spec with every job key, the settings' ``defaults`` filled in (``Job.spec``
    put the class's there); SpecError naming a bad key."""
    if not isinstance(spec, dict):
        raise SpecError(f"job spec must be a map, got {type(spec).__name__}")
    if not spec.keys() <= SPEC_KEYS.keys():
        unknown = sorted(str(k) for k in spec.keys() - SPEC_KEYS.keys())
        raise SpecError(
            f"unknown job spec key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(SPEC_KEYS)}"
        )
    if "func" not in spec:
        raise SpecError("job spec is missing 'func' (\"package.module:ClassName\")")
    for key, value in spec.items():
        check_type(key, value)
    if "trigger" not in spec and spec.keys() & _PERIODIC_KEYS:
        key = next(k for k in _PERIODIC_KEYS if k in spec)
        raise SpecError(f"job spec key {key!r} is for periodic jobs: give a 'trigger' "
                        "too, or leave it out")
    if "trigger" in spec and not spec.get("job_id"):
        raise SpecError("job_id: a periodic job needs one of your choosing, so that sending "
                        "it again (a script run again) replaces it, not adds a second schedule")
    check_func(spec["func"], allowed_modules)
    # a generated job_id is 128 random bits: a client cannot predict the next
    out = {"func": spec["func"], "args": list(spec.get("args", ())),
           "kwargs": dict(spec.get("kwargs", {})),
           "job_id": spec.get("job_id") or os.urandom(16).hex(),
           "batch": spec.get("batch", ""), "parent": spec.get("parent", "")}
    # each default comes from the spec (Job.spec puts the class's there), else the settings
    for key, fallback in _DEFAULTS:
        value = spec.get(key)
        if value is None and defaults:
            value = defaults.get(key)
        out[key] = fallback if value is None else value
    out["priority"], out["max_retries"] = int(out["priority"]), int(out["max_retries"])
    # the optional keys (trigger, dedupe, limit_key, round...) as given
    out |= {key: value for key, value in spec.items() if key not in out}
    if out.get("round") == "":
        raise SpecError("round '': leave it out (the master sets it for periodic fires)")
    if out.get("dedupe_key") == "":
        # (a job's hash keeps no empty field: the key would be taken, never given back)
        raise SpecError("dedupe_key '': leave it out for no dedupe")
    if out.get("dedupe_scope") == "":
        # (a job's scope is passed on to its children only when it is not empty)
        raise SpecError("dedupe_scope '': name a scope, or leave it out for the global one")
    for k in out["kwargs"]:
        if not isinstance(k, str):
            raise SpecError(f"kwargs key {k!r} must be a string")
    _check_msgpack_value(out["kwargs"], "kwargs")
    _check_msgpack_value(out["args"], "args")
    if out.get("limit_key") is not None and not 0 < len(out["limit_key"]) <= MAX_LIMIT_KEY:
        raise SpecError(f"limit_key {out['limit_key']!r}: 1-{MAX_LIMIT_KEY} characters, or "
                        "leave it out for no limit")
    if "limit_interval" in out and not 0 < out["limit_interval"] <= MAX_TIMEOUT:
        raise SpecError(f"limit_interval {out['limit_interval']!r}: must be a positive number "
                        f"of seconds (at most {MAX_TIMEOUT})")
    if "limit_interval" in out and out.get("limit_key") is None:
        raise SpecError(f"limit_interval {out['limit_interval']!r}: spaces the starts of jobs "
                        "sharing a limit_key, and this job has none; give a limit_key (or its "
                        "class's limit_key_for), or leave limit_interval out")
    if not JOB_ID.fullmatch(out["job_id"]):
        raise SpecError(f"job_id {out['job_id']!r}: 1-200 characters without spaces or "
                        "control characters")
    if not QUEUE_NAME.fullmatch(str(out["queue"])):
        raise SpecError(f"queue {out['queue']!r}: {QUEUE_RULE}")
    if not -MAX_PRIORITY < out["priority"] < MAX_PRIORITY:
        raise SpecError(f"priority {out['priority']}: must be within ±2**31")
    if out["max_retries"] < 0:
        raise SpecError(f"max_retries {out['max_retries']}: must be 0 or more")
    if out["timeout"] is not None:
        if isinstance(out["timeout"], bool) or not 0 < out["timeout"] <= MAX_TIMEOUT:
            raise SpecError(f"timeout {out['timeout']!r}: must be a positive number of seconds "
                            f"(at most {MAX_TIMEOUT}; nil or left out: JOB_TIMEOUT's, none "
                            "if unset)")
        out["timeout"] = float(out["timeout"])
    return out
