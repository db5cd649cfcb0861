"""The wire contract: RPC method names, job spec keys, statuses, and spec validation.

This module is the single definition of what a client may send to a master and what it
gets back; README.md documents it and tests/test_contract.py pins it.
"""

from __future__ import annotations

import importlib
import os
import re
from enum import StrEnum
from typing import Any

from msgpack import ExtType

# --- statuses -------------------------------------------------------------------------
class Status(StrEnum):
    """Where a job is; a str, so it goes to Redis and the wire as its value."""

    QUEUED = "queued"          # waiting in a queue
    RUNNING = "running"        # claimed by a worker
    SUCCEEDED = "succeeded"    # ran and returned
    FAILED = "failed"          # ran out of attempts; in the failed registry
    RETRYING = "retrying"      # failed an attempt; due again after a backoff
    SCHEDULED = "scheduled"    # a periodic job in the job store
    FILTERED = "filtered"      # dropped by the dedupe filter, never queued
    CANCELLED = "cancelled"    # removed before it ran

    @property
    def live(self) -> bool:
        """Queued, running or retrying: the job will still run."""
        return self in (Status.QUEUED, Status.RUNNING, Status.RETRYING)


QUEUED, RUNNING, SUCCEEDED, FAILED, RETRYING, SCHEDULED, FILTERED, CANCELLED = Status
STATUSES = tuple(Status)
LIVE_STATUSES = (QUEUED, RUNNING, RETRYING)
FINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)

# --- RPC methods ----------------------------------------------------------------------
METHODS = (
    "ping", "auth", "submit_job", "submit_jobs", "get_job", "remove_job", "list_jobs",
    "stats", "rerun_job", "pause_job", "resume_job", "modify_job",
)

# The start of the error a master answers when it cannot reach Redis. The dedupe keys the
# call took are given back where no job holds them (exact filters), and the same call may
# be sent again (workers do, with a backoff); with job_ids of the caller's own, a job the
# first call did queue answers with its status instead of being queued twice.
REDIS_UNAVAILABLE = "master cannot reach Redis right now"

# --- job spec -------------------------------------------------------------------------
# key -> (accepted python types, description). Keys the master fills in itself (parent,
# schedule, fire_time) are accepted too so that workers can forward child jobs.
SPEC_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "func": ((str,), '"package.module:ClassName" of a Job subclass (required)'),
    "args": ((list, tuple), "positional arguments (array)"),
    "kwargs": ((dict,), "keyword arguments (map of string to value)"),
    "job_id": ((str,), "caller-chosen id; generated when absent"),
    "queue": ((str,), 'queue name (default "default")'),
    "priority": ((int,), "higher runs first; FIFO within a priority"),
    "max_retries": ((int,), "retries after the first attempt"),
    "timeout": ((int, float), "seconds an attempt may run"),
    "batch": ((str,), "a label for statistics"),
    "parent": ((str,), "id of the job that submitted this one"),
    "trigger": ((dict,), "periodic schedule (cron / interval / date)"),
    "replace_existing": ((bool,), "replace a periodic job with the same job_id"),
    "misfire_grace_time": ((int, float, type(None)), "seconds a late fire may still run"),
    "coalesce": ((str,), 'missed fires: "latest", "all" or "skip"'),
    "max_instances": ((int,), "fires of one periodic job live at once"),
    "dedupe_key": ((str,), "drop the job when this key was seen in its scope"),
    "dedupe_scope": ((str,), "namespace of dedupe_key"),
}

QUEUE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
JOB_ID = re.compile(r"^[^\s]{1,200}$")
FUNC_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
MAX_PRIORITY = 2**31
MAX_TIMEOUT = 2**31  # seconds; also refuses nan and inf, which setitimer cannot take


class SpecError(ValueError):
    """A job spec a master refuses; the message names the key and what is wrong."""


def func_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_attr(path: str) -> Any:
    module_name, _, attr = path.partition(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise SpecError(f"func {path!r}: cannot import module {module_name!r} ({exc})") from None
    except Exception as exc:  # a module that raises on import
        raise SpecError(
            f"func {path!r}: importing {module_name!r} raised {type(exc).__name__}: {exc}"
        ) from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise SpecError(f"func {path!r}: module {module_name!r} has no {attr!r}") from None
    return obj


def check_module_allowed(path: str, allowed: tuple[str, ...] | list[str] | None) -> None:
    """Refuse a func outside the JOB_MODULES prefixes (None or empty: any module)."""
    if not allowed:
        return
    module_name = path.partition(":")[0]
    for prefix in allowed:
        prefix = prefix.rstrip(".")
        if module_name == prefix or module_name.startswith(prefix + "."):
            return
    raise SpecError(
        f"func {path!r}: module {module_name!r} is not allowed by JOB_MODULES "
        f"({', '.join(allowed)})"
    )


_class_cache: dict[str, type] = {}


def resolve_job_class(path: str, allowed: tuple[str, ...] | list[str] | None = None) -> type:
    """Import ``path`` and return it if it is a Job subclass, else raise SpecError."""
    from elric.job import Job  # a cycle: job.py submits through this contract

    if not isinstance(path, str) or not FUNC_PATH.fullmatch(path):
        raise SpecError(
            f'func {path!r}: expected "package.module:ClassName" naming a Job subclass'
        )
    check_module_allowed(path, allowed)
    cached = _class_cache.get(path)
    if cached is not None:
        return cached
    if path.startswith("__main__:"):
        raise SpecError(
            f"func {path!r}: a Job class defined in __main__ cannot be imported by a worker; "
            "move it into a module and import it from there"
        )
    obj = _import_attr(path)
    if not (isinstance(obj, type) and issubclass(obj, Job) and obj is not Job):
        raise SpecError(f"func {path!r}: {obj!r} is not a subclass of elric.Job")
    _class_cache[path] = obj
    return obj


# A lone surrogate: what the RPC decoder makes of a msgpack string that is not valid
# UTF-8 (it keeps the bytes rather than failing). Such text cannot be stored or used as
# a key: it is refused up front, before a dedupe filter takes its key.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# the spec keys holding text that names something (checked for _LONE_SURROGATE)
_TEXT_KEYS = ("func", "job_id", "queue", "batch", "parent", "coalesce", "dedupe_key",
              "dedupe_scope")


def _is_text(value: str) -> bool:
    """Whether a str is valid Unicode text (no lone surrogate): encodable as UTF-8."""
    return value.isascii() or _LONE_SURROGATE.search(value) is None


def _not_text(what: str, value: str) -> SpecError:
    return SpecError(f"{what} {value!r} is not valid UTF-8: send text as UTF-8 and binary "
                     "data as msgpack bin")


def _check_msgpack_value(value: Any, where: str, depth: int = 0) -> None:
    if depth > 64:
        raise SpecError(f"{where}: nested deeper than 64 levels")
    if isinstance(value, ExtType):  # a namedtuple: check it before tuples
        raise SpecError(f"{where}: a msgpack extension type (code {value.code}) is not "
                        "allowed; send plain values (nil, bool, numbers, strings, bytes, "
                        "arrays, maps)")
    if type(value) is str:
        if not _is_text(value):
            raise _not_text(where, value)
        return
    if value is None or isinstance(value, (bool, int, float, str, bytes)):
        if isinstance(value, int) and not isinstance(value, bool) and not (
            -(2**63) <= value < 2**64
        ):
            raise SpecError(f"{where}: integer {value} does not fit in 64 bits")
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_msgpack_value(item, f"{where}[{i}]", depth + 1)
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, bytes)):
                raise SpecError(f"{where}: map key {k!r} is not a string or integer")
            if type(k) is str and not _is_text(k):
                raise _not_text(f"{where}: map key", k)
            _check_msgpack_value(v, f"{where}[{k!r}]", depth + 1)
        return
    raise SpecError(f"{where}: {type(value).__name__} is not a msgpack value")


# msgpack names for type errors: a client in another language knows no "list" or "str"
_WIRE_NAMES = {type(None): "nil", bool: "boolean", int: "integer", float: "number",
               str: "string", bytes: "binary", list: "array", tuple: "array", dict: "map",
               ExtType: "msgpack extension type"}


def _wire_names(types: tuple[type, ...]) -> str:
    names = list(dict.fromkeys(_WIRE_NAMES.get(t, t.__name__) for t in types))
    if "number" in names and "integer" in names:
        names.remove("integer")
    return " or ".join(names)


# Job ids: 128 random bits as 32 hex digits, like uuid4().hex. A master makes one per
# submitted job, and uuid4 (a getrandom() call plus a UUID object) cost it 3-5 us each
# under load. Here they are made 1,024 at a time from one os.urandom call, its hex split
# in C (~0.1 us each). Unpredictable, unlike a seeded generator: a client that sees a
# block of ids must not be able to guess the next ones (the master does not look its own
# ids up before writing them). A forked child drops the parent's unused ones.
_id_pool: list[str] = []
_ID_BLOCK = 1024


def _fresh_ids_after_fork() -> None:
    _id_pool.clear()


os.register_at_fork(after_in_child=_fresh_ids_after_fork)


def new_job_id() -> str:
    if not _id_pool:
        _id_pool.extend(os.urandom(16 * _ID_BLOCK).hex(" ", 16).split(" "))
    return _id_pool.pop()


# The keys a job spec usually has; a spec with only these takes the fast path below.
_FAST_KEYS = frozenset({"func", "args", "kwargs", "job_id", "batch", "parent",
                        "dedupe_key", "dedupe_scope"})
# (func, defaults as a tuple, allowed modules as a tuple) -> (the normalized spec of
# {"func": func}, the class, whether the class derives dedupe keys). Bounded: cleared
# when it passes _FAST_CACHE_MAX entries.
_fast_cache: dict[tuple, tuple] = {}
_FAST_CACHE_MAX = 1024


def _settings_key(defaults: dict | None, allowed) -> tuple | None:
    """What the fast path's cache depends on besides func (None: not hashable)."""
    try:
        key = (tuple(sorted(defaults.items())) if defaults else (),
               tuple(allowed) if allowed else None)
        hash(key)
        return key
    except TypeError:
        return None


_MISSING = object()


def _fast_entry(func: str, defaults: dict | None, allowed, skey: tuple) -> tuple | None:
    ck = (func, skey)
    entry = _fast_cache.get(ck)
    if entry is None:
        # (an empty dedupe_key: the class hook is not called without arguments)
        try:
            base = normalize_spec({"func": func, "dedupe_key": ""}, defaults=defaults,
                                  allowed_modules=allowed, _fast=False)
        except SpecError:
            return None       # the full path reports it, in its own order of checks
        del base["dedupe_key"], base["job_id"]
        cls = resolve_job_class(func, allowed)
        from elric.job import Job
        derives = getattr(cls.dedupe_key_for, "__func__", None) is not \
            getattr(Job.dedupe_key_for, "__func__", None)
        if len(_fast_cache) >= _FAST_CACHE_MAX:
            _fast_cache.clear()
        entry = _fast_cache[ck] = (base, cls, derives)
    return entry


def _normalize_fast(spec: dict, entry: tuple) -> dict | None:
    """normalize_spec for specs of the usual shape, with the class and its defaults
    resolved once per func (``entry``); None sends the spec down the full path (which
    also produces every error message)."""
    base, cls, derives = entry
    out = base.copy()
    out.update(spec)          # then check what came from the spec
    args, kwargs, job_id = out["args"], out["kwargs"], out.get("job_id", _MISSING)
    batch, parent = out["batch"], out["parent"]
    key, scope = out.get("dedupe_key", ""), out.get("dedupe_scope", "-")
    if (type(batch) is not str or type(parent) is not str
            or type(args) not in (list, tuple) or type(kwargs) is not dict
            or type(key) is not str or type(scope) is not str or not scope
            or not (batch.isascii() and parent.isascii() and key.isascii()
                    and scope.isascii()) and not (_is_text(batch) and _is_text(parent)
                                                   and _is_text(key) and _is_text(scope))):
        return None
    if job_id is _MISSING:
        out["job_id"] = _id_pool.pop() if _id_pool else new_job_id()
    elif type(job_id) is not str or not JOB_ID.fullmatch(job_id) or not _is_text(job_id):
        return None                                           # (nil, "" and bad ids too)
    if args or kwargs:
        out["args"], out["kwargs"] = list(args), dict(kwargs)
        for k in out["kwargs"]:
            if type(k) is not str:
                return None
        try:
            _check_msgpack_value(out["args"], "args")
            _check_msgpack_value(out["kwargs"], "kwargs")
        except SpecError:
            return None
    else:
        out["args"], out["kwargs"] = [], {}                    # never base's own objects
    if derives and "dedupe_key" not in out:
        try:
            derived = cls.dedupe_key_for(*out["args"], **out["kwargs"])
        except Exception:
            return None
        if derived is not None:
            out["dedupe_key"] = str(derived)
            if not _is_text(out["dedupe_key"]):
                return None
    return out


def _deferred(spec: dict, entry: tuple) -> dict | None:
    """What normalize_specs defers of ``spec`` (keys among _FAST_KEYS): a copy with its
    dedupe_key (derived by the class hook when it has none), made with the checks of
    _normalize_fast but nothing built; None when the spec has no key to filter by or
    fails a check (then _normalize_fast or the full path answers it, errors included)."""
    _, cls, derives = entry
    get = spec.get
    job_id = get("job_id", _MISSING)
    args, kwargs = get("args", ()), get("kwargs", _NO_KWARGS)
    batch, parent, scope = get("batch", ""), get("parent", ""), get("dedupe_scope", "-")
    if (type(batch) is not str or type(parent) is not str
            or type(args) not in (list, tuple) or type(kwargs) is not dict
            or type(scope) is not str or not scope
            or not (batch.isascii() and parent.isascii() and scope.isascii())
            and not (_is_text(batch) and _is_text(parent) and _is_text(scope))
            or job_id is not _MISSING and (type(job_id) is not str
                                           or JOB_ID.fullmatch(job_id) is None
                                           or not _is_text(job_id))):
        return None
    if args or kwargs:
        args, kwargs = list(args), dict(kwargs)
        for k in kwargs:
            if type(k) is not str:
                return None
        try:
            _check_msgpack_value(args, "args")
            _check_msgpack_value(kwargs, "kwargs")
        except SpecError:
            return None
    out = spec.copy()        # the caller's dict is neither kept nor changed
    key = get("dedupe_key", _MISSING)
    if key is _MISSING:
        if not derives:
            return None      # no key: nothing to filter, built now
        try:
            derived = cls.dedupe_key_for(*args, **kwargs)
        except Exception:
            return None
        if derived is None:
            return None
        key = out["dedupe_key"] = str(derived)
    elif type(key) is not str:
        return None
    if not key.isascii() and not _is_text(key):
        return None
    return out


_NO_KWARGS: dict = {}


def build_deferred(spec: dict, entry: tuple) -> dict:
    """The normalized spec of one that normalize_specs deferred: what _normalize_fast
    makes of it, without its checks again (_deferred made them on this very dict, and
    its dedupe_key is in it already)."""
    out = entry[0].copy()
    out.update(spec)
    if "job_id" not in out:
        out["job_id"] = _id_pool.pop() if _id_pool else new_job_id()
    args, kwargs = out["args"], out["kwargs"]
    out["args"], out["kwargs"] = (list(args), dict(kwargs)) if args or kwargs else ([], {})
    return out


def normalize_specs(specs: list, *, defaults: dict | None = None,
                    allowed_modules: tuple[str, ...] | list[str] | None = None,
                    chosen_ids: set | None = None, defer: list | None = None) -> list[dict]:
    """normalize_spec for a batch; a SpecError names the spec (``spec 3: ...``) when
    the batch has more than one. Specs of the usual shape cost ~1 us each. The job_ids
    the caller chose (not generated) are added to ``chosen_ids`` when it is given.

    ``defer``, when given (an empty list), gets one item per spec: None when the spec
    was normalized, or an entry when a keyed spec of the usual shape was only checked
    (~0.3 us without arguments): then a copy of the spec is in the result, with its
    ``dedupe_key`` (derived if the class derives it) but no generated job_id, and
    ``build_deferred(copy, entry)`` normalizes it. A spec a filter drops is never
    built."""
    if chosen_ids is not None:
        chosen_ids.update(spec["job_id"] for spec in specs
                          if type(spec) is dict and "job_id" in spec and spec["job_id"]
                          and type(spec["job_id"]) is str)
    out = []
    append = out.append
    entries: dict[str, tuple | None] = {}
    fast_keys = _FAST_KEYS
    skey = _settings_key(defaults, allowed_modules)
    for spec in specs:
        if skey is not None and type(spec) is dict and spec.keys() <= fast_keys:
            func = spec.get("func")
            if type(func) is str:
                entry = entries.get(func, False)
                if entry is False:
                    entry = entries[func] = _fast_entry(func, defaults, allowed_modules,
                                                        skey)
                if entry is not None:
                    if defer is not None:
                        d = _deferred(spec, entry)
                        if d is not None:
                            append(d)
                            defer.append(entry)
                            continue
                    n = _normalize_fast(spec, entry)
                    if n is not None:
                        append(n)
                        if defer is not None:
                            defer.append(None)
                        continue
        try:
            append(normalize_spec(spec, defaults=defaults, allowed_modules=allowed_modules,
                                  _fast=False))
        except SpecError as exc:
            if len(specs) == 1:
                raise
            raise SpecError(f"spec {len(out)}: {exc}") from None
        if defer is not None:
            defer.append(None)
    return out


def normalize_spec(
    spec: Any,
    *,
    defaults: dict | None = None,
    allowed_modules: tuple[str, ...] | list[str] | None = None,
    check_class: bool = True,
    _fast: bool = True,
) -> dict:
    """Validate a submitted spec and fill in defaults (class attributes, then settings).

    Returns a new dict with every job key present. Raises SpecError naming the bad key.
    """
    if _fast and check_class and type(spec) is dict and spec.keys() <= _FAST_KEYS \
            and type(spec.get("func")) is str:
        skey = _settings_key(defaults, allowed_modules)
        entry = _fast_entry(spec["func"], defaults, allowed_modules, skey) \
            if skey is not None else None
        out = _normalize_fast(spec, entry) if entry is not None else None
        if out is not None:
            return out
    if not isinstance(spec, dict):
        raise SpecError(f"job spec must be a map, got {type(spec).__name__}")
    unknown = sorted(str(k) for k in spec if k not in SPEC_KEYS)
    if unknown:
        raise SpecError(
            f"unknown job spec key(s) {', '.join(map(repr, unknown))}; "
            f"known keys: {', '.join(SPEC_KEYS)}"
        )
    if "func" not in spec:
        raise SpecError("job spec is missing 'func' (\"package.module:ClassName\")")
    for key, value in spec.items():
        types, _ = SPEC_KEYS[key]
        bad_bool = isinstance(value, bool) and bool not in types
        if not isinstance(value, types) or bad_bool or isinstance(value, ExtType):
            raise SpecError(f"job spec key {key!r} must be {_wire_names(types)}, "
                            f"got {_WIRE_NAMES.get(type(value), type(value).__name__)}")
        if key in _TEXT_KEYS and not _is_text(value):
            raise _not_text(key, value)
    if "trigger" not in spec:
        for key in ("replace_existing", "misfire_grace_time", "coalesce", "max_instances"):
            if key in spec:
                raise SpecError(f"job spec key {key!r} is for periodic jobs: give a 'trigger' "
                                "too, or leave it out")
    defaults = defaults or {}
    cls = resolve_job_class(spec["func"], allowed_modules) if check_class else None

    def pick(key: str, fallback: Any) -> Any:
        if key in spec:
            return spec[key]
        if cls is not None and getattr(cls, key, None) is not None:
            return getattr(cls, key)
        return defaults.get(key, fallback)

    out: dict[str, Any] = {
        "func": spec["func"],
        "args": list(spec.get("args", ())),
        "kwargs": dict(spec.get("kwargs", {})),
        "job_id": spec.get("job_id") or new_job_id(),
        "queue": pick("queue", "default"),
        "priority": int(pick("priority", 0)),
        "max_retries": int(pick("max_retries", 0)),
        "timeout": pick("timeout", None),
        "batch": spec.get("batch", ""),
        "parent": spec.get("parent", ""),
    }
    for key in ("trigger", "replace_existing", "misfire_grace_time", "coalesce",
                "max_instances", "dedupe_key", "dedupe_scope"):
        if key in spec:
            out[key] = spec[key]
    if out.get("dedupe_scope") == "":
        # (a job's scope is passed on to its children only when it is not empty)
        raise SpecError("dedupe_scope '': name a scope, or leave it out for the global one")
    for k in out["kwargs"]:
        if not isinstance(k, str):
            raise SpecError(f"kwargs key {k!r} must be a string")
    _check_msgpack_value(out["args"], "args")
    _check_msgpack_value(out["kwargs"], "kwargs")
    if cls is not None and "dedupe_key" not in out:
        try:
            derived = cls.dedupe_key_for(*out["args"], **out["kwargs"])
        except Exception as exc:  # e.g. arguments that do not fit the job's signature
            raise SpecError(f"func {spec['func']!r}: {cls.__name__}.dedupe_key_for(args, "
                            f"kwargs) raised {type(exc).__name__}: {exc}") from None
        if derived is not None:
            out["dedupe_key"] = str(derived)
            if not _is_text(out["dedupe_key"]):
                raise _not_text(f"func {spec['func']!r}: the dedupe_key its dedupe_key_for "
                                "made,", out["dedupe_key"])
    if not JOB_ID.fullmatch(out["job_id"]):
        raise SpecError(f"job_id {out['job_id']!r}: 1-200 characters without spaces")
    if not QUEUE_NAME.fullmatch(str(out["queue"])):
        raise SpecError(f"queue {out['queue']!r}: 1-100 letters, digits, '_', '-' or '.'")
    if not -MAX_PRIORITY < out["priority"] < MAX_PRIORITY:
        raise SpecError(f"priority {out['priority']}: must be within ±2**31")
    if out["max_retries"] < 0:
        raise SpecError(f"max_retries {out['max_retries']}: must be 0 or more")
    if out["timeout"] is not None:
        if isinstance(out["timeout"], bool) or not 0 < out["timeout"] <= MAX_TIMEOUT:
            raise SpecError(f"timeout {out['timeout']!r}: must be a positive number of seconds "
                            f"(at most {MAX_TIMEOUT}; leave it out for no timeout)")
        out["timeout"] = float(out["timeout"])
    return out
