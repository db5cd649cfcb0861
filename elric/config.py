"""Settings: defaults, a settings module, ELRIC_<KEY> environment overrides, validation.

The settings module is ./settings.py, or the file ``--settings`` or ``ELRIC_SETTINGS`` names.
An upper-case name in it or an ``ELRIC_`` variable that names no key, or a key in lower
case, is an error: a typo must not silently leave a setting at its default.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import runpy
from dataclasses import dataclass
from typing import Any

from elric.contract import (MAX_CONCURRENCY, MAX_TIMEOUT, MIN_MESSAGE, QUEUE_NAME, QUEUE_RULE,
                            is_text)


class SettingsError(Exception):
    """A bad setting; the message is one line naming the key and what is wrong."""


class Unreachable(SettingsError):
    """What a setting names cannot be reached now (a Redis not up yet): try again."""


@dataclass(frozen=True)
class Key:
    default: Any
    types: tuple[type, ...]
    doc: str
    nullable: bool = False


# The dedupe filters (elric.dedupe): here, so that checking settings imports none of them.
FILTER_BACKENDS = ("set", "bloom", "redis-bloom")

KEYS: dict[str, Key] = {
    "REDIS_URL": Key("redis://127.0.0.1:6379/0", (str,),
                     "Redis for queues, results and the job store; rediss:// and passwords work"),
    "KEY_PREFIX": Key("elric", (str,), "prefix of every Redis key"),
    "MASTER_ADDRESS": Key("127.0.0.1:7531", (str,),
                          "host:port the master listens on and clients and workers connect to"),
    "RPC_TOKEN": Key(None, (str,), "shared secret a connection must present first", True),
    "DASHBOARD_ADDRESS": Key(None, (str,), "host:port the master serves the web dashboard and "
                                           "/metrics on (default: no dashboard)", True),
    "DASHBOARD_PASSWORD": Key(None, (str,), "the dashboard's login (default: RPC_TOKEN; with "
                                            "neither it is read-only, on loopback only)", True),
    "RPC_MAX_MESSAGE": Key(8 * 1024 * 1024, (int,), "largest RPC message in bytes (at "
                                                      "least 64 KiB)"),
    "CONCURRENCY": Key(None, (int,), "worker processes (default: CPU count)", True),
    "QUEUES": Key(["default"], (list,), "queues a worker pulls from"),
    "RESULT_TTL": Key(86400, (int,), "seconds results of succeeded jobs are kept"),
    "RESULT_MAX_BYTES": Key(None, (int,), "largest result a job may return, packed (default: "
                                          "RPC_MAX_MESSAGE / 8, 1 MiB)", True),
    "FAILED_TTL": Key(7 * 86400, (int,), "seconds failed jobs stay in the failed registry"),
    "MAX_RETRIES": Key(0, (int,), "default retries after a failed attempt"),
    "RETRY_BACKOFF": Key(1.0, (int, float), "first retry delay in seconds; doubles each time"),
    "RETRY_BACKOFF_MAX": Key(300.0, (int, float), "longest retry delay in seconds"),
    "JOB_TIMEOUT": Key(None, (int, float), "default seconds an attempt may run", True),
    "LEASE_SECONDS": Key(30.0, (int, float),
                         "a dead worker's jobs are redelivered after this long"),
    "MAX_REDELIVERIES": Key(5, (int,), "times a job may be queued again after its worker was "
                            "lost running it; lost once more, it fails (None: no limit)", True),
    "SHUTDOWN_GRACE": Key(30.0, (int, float), "seconds running jobs get to finish after "
                          "SIGTERM; a stop takes at most this + 10 s, Redis away or not"),
    "WORKER_CHUNK": Key(64, (int,), "most jobs handed to a pool process at once (fast jobs)"),
    "ASYNC_CONCURRENCY": Key(100, (int,), "async jobs each pool process runs at once"),
    "LOOP_LAG_WARN": Key(1.0, (int, float), "seconds an async job may block its event loop "
                         "before a warning (0: never)"),
    "LIMITS": Key({}, (dict,), "per limit key (or \"*\"): {concurrency, interval | rate} "
                               "across all workers; ELRIC_LIMITS takes JSON"),
    "JOB_MODULES": Key([], (list,), "modules a worker loads job classes from at start; the "
                                    "master refuses other funcs (empty: any)"),
    "LOG_LEVEL": Key("INFO", (str,), "DEBUG, INFO, WARNING or ERROR"),
    "LOG_FORMAT": Key("text", (str,), "text, or json: one JSON object per line"),
    "SCHEDULER_LEASE": Key(10.0, (int, float),
                           "seconds a dead scheduling master is replaced within"),
    "MASTER_STOP_TIMEOUT": Key(20.0, (int, float), "seconds a master's stop (SIGTERM, "
                               "Ctrl-C) takes at most, Redis away or not; a second one ends "
                               "it at once. Calls in flight, then the scheduler, background "
                               "tasks and clean-ups share it; the 'bloom' backend's last "
                               "snapshot keeps half. What a stop cuts short is logged, and "
                               "a lost snapshot exits 1. Give a supervisor's stop timeout "
                               "more (systemd's TimeoutStopSec, Kubernetes' grace period)"),
    "MIN_INTERVAL": Key(1.0, (int, float), "shortest interval trigger accepted, in seconds"),
    "FILTER_BACKEND": Key("set", (str,), 'dedupe filter: "set", "bloom" or "redis-bloom"'),
    "FILTER_SCOPES": Key({}, (dict,), "per-scope backend overrides {scope: backend}"),
    "DEDUPE_TTL": Key(None, (int, float),
                      "set backend: seconds after which a key is new again", True),
    "DEDUPE_RELEASE_ON_FAILURE": Key(False, (bool,), "release the key of a job that failed for "
                                                     "good (set backend only)"),
    "DEDUPE_ROUND_TTL": Key(86400, (int,), "seconds a per-fire dedupe scope is kept"),
    "DEDUPE_TAKEOVER_AFTER": Key(600, (int, float), "seconds after which a key "
                                 "taken for a job never queued goes to the next job with it"),
    "BLOOM_CAPACITY": Key(1_000_000, (int,), "items a Bloom filter is sized for"),
    "BLOOM_ERROR_RATE": Key(0.001, (float,), "false-positive rate a Bloom filter keeps"),
    "BLOOM_SNAPSHOT_INTERVAL": Key(30.0, (int, float), "seconds between snapshots of the "
                                   "in-master Bloom filter, at least 1 (0: only on stop)"),
}


@dataclass(frozen=True)
class Floor:
    """The least a setting may be (``said`` so in its error), and why no less works."""

    least: float
    said: str
    why: str
    zero_too: bool = False   # 0 is allowed too: it turns the thing off


FLOORS = {
    # the master redelivers once a second: a shorter lease redelivers no sooner
    "LEASE_SECONDS": Floor(1.0, "at least 1 second", "workers renew leases every third of it, "
                           "and a shorter one runs out under them"),
    # (renewed in a busy loop of Redis calls below it, its retries starting at 0.1 s)
    "SCHEDULER_LEASE": Floor(0.3, "at least 0.3 seconds", "the scheduler renews it every "
                             "third, and a shorter one runs out under it"),
    # the stats reply, bounded (100 funcs, 100 batches, 60 minutes), takes tens of KiB
    "RPC_MAX_MESSAGE": Floor(MIN_MESSAGE, "at least 65536 bytes (64 KiB)", "a stats reply alone "
                             "may take tens of KiB; raise it"),
    "BLOOM_SNAPSHOT_INTERVAL": Floor(1.0, "0 (snapshots only on stop) or at least 1 second",
                                     "each snapshot rewrites the changed filters, up to "
                                     "hundreds of MiB", zero_too=True),
}

# ELRIC_ variables that are not settings but are read elsewhere: any other ELRIC_<NAME> that
# names no key is a typo, refused rather than silently ignored.
ENV_NOT_SETTINGS = ("ELRIC_SETTINGS", "ELRIC_REDIS_SERVER")


def _check_env_names(env) -> None:
    known = [*KEYS, *(name.removeprefix("ELRIC_") for name in ENV_NOT_SETTINGS)]
    for name in sorted(env):
        key = name.removeprefix("ELRIC_")
        if name.startswith("ELRIC_") and key not in known:
            # by the part after ELRIC_, which every name shares (ELRIC_BAR is not close to
            # ELRIC_MAX_RETRIES); ELRIC_SETTING is ELRIC_SETTINGS mistyped
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean ELRIC_{close[0]}?" if close else ""
            raise SettingsError(f"{name}: unknown setting in the environment{hint}")


class Settings:
    """Resolved settings; attribute access by key name."""

    def __init__(self, values: dict[str, Any], source: str | None) -> None:
        self._values = values
        self.source = source

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def master_host_port(self) -> tuple[str, int]:
        return parse_address(self.MASTER_ADDRESS, "MASTER_ADDRESS")

    @property
    def concurrency(self) -> int:
        return self.CONCURRENCY or os.cpu_count() or 1

    @property
    def result_max_bytes(self) -> int:
        return self.RESULT_MAX_BYTES or self.RPC_MAX_MESSAGE // 8


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for messages and logs: the one
    before its host, and a ``password=`` option's (a unix socket's way to give one)."""
    end = _credentials_end(url)
    start = url.find("://") + 3
    user, colon, _ = url[start:end].partition(":")
    if end >= 0 and colon:
        url = f"{url[:start]}{user}:***{url[end:]}"
    return re.sub(r"([?&]password=)[^&#]*", r"\1***", url, flags=re.I)


def _credentials_end(url: str) -> int:
    """The index of the ``@`` that ends ``url``'s user and password, or -1 if none. When a
    #, / or ? in the password cuts the host short or it does not parse, the last ``@``."""
    from urllib.parse import urlsplit

    if url.rfind("@") < url.find("://"):
        return -1
    try:
        parts = urlsplit(url)
        parts.port
    except ValueError:
        return url.rfind("@")
    if _cut_short(parts):
        return url.rfind("@")
    at = parts.netloc.rfind("@")   # (an @ past the host is a query value's, client_name=a@b)
    return -1 if at < 0 else url.find("://") + 3 + at


def _cut_short(parts) -> bool:
    """An ``@`` past the host where only a password's unencoded #, / or ? would put it."""
    return ("@" in parts.path or "@" in parts.fragment
            or any("@" in field.partition("=")[0] for field in parts.query.split("&")))


def is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_address(value: str, key: str) -> tuple[str, int]:
    """``host:port`` as (host, port), or a SettingsError naming ``key``."""
    from elric.rpc import parse_address as parse

    try:
        if "://" not in str(value):   # a URL parses as host "http://h": unreachable, exit 3
            return parse(value)
    except ValueError:
        pass
    raise SettingsError(f"{key}: {value!r} is not host:port (e.g. 127.0.0.1:7531)")


def _check(key: str, value: Any, where: str) -> Any:
    spec = KEYS[key]

    def bad(problem: str) -> SettingsError:
        return SettingsError(f"{key} (from {where}): {problem}")

    if value is None and spec.nullable:
        return None
    if isinstance(value, tuple) and list in spec.types:
        value = list(value)
    if isinstance(value, bool) and bool not in spec.types or not isinstance(value, spec.types):
        raise bad(f"expected {' or '.join(t.__name__ for t in spec.types)}, got {value!r}")
    # bytes that are not UTF-8 (the environment keeps them as lone surrogates) reach no
    # browser, Redis or RPC peer as such; not shown, as the value may be a secret
    if isinstance(value, str) and not is_text(value):
        raise bad("holds bytes that are not UTF-8 text; give it in UTF-8")
    if key == "LIMITS":
        from elric.limits import parse_rules

        parse_rules(value, f"{key} (from {where})")
    elif key == "FILTER_BACKEND" and value not in FILTER_BACKENDS:
        raise bad(f"{value!r} is not one of {', '.join(FILTER_BACKENDS)}")
    elif key == "FILTER_SCOPES":
        for scope, backend in value.items():
            # (no spec's scope is empty, and a fire's is named by its periodic job)
            if not isinstance(scope, str) or scope in ("", "@fire"):
                raise bad(f"{scope!r} is no scope: name a dedupe_scope, or a periodic "
                          "job's id for the scopes of its '@fire' rounds")
            if backend not in FILTER_BACKENDS:
                raise bad(f"{scope!r}: {backend!r} is not one of {', '.join(FILTER_BACKENDS)}")
    if key == "BLOOM_ERROR_RATE" and not 0 < value < 1:
        raise bad(f"must be between 0 and 1, got {value!r}")
    if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
        raise bad(f"expected a list of names, got {value!r}")
    if key == "QUEUES":   # (JOB_MODULES may be empty: any module)
        if not value:
            raise bad("names no queue, and a worker would run nothing; give one at least")
        for name in value:   # (a worker on "a b" waited for nothing: no submit queues there)
            if not QUEUE_NAME.fullmatch(name):
                raise bad(f"queue {name!r}: {QUEUE_RULE}")
    if key == "JOB_MODULES":
        for name in value:
            _check_module_name(name, bad)
    if isinstance(value, float) and not math.isfinite(value):
        raise bad(f"must be a finite number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        # the few where 0 means something (no retries, no wait, never); a new key is positive
        zero_ok = key in ("MAX_RETRIES", "RETRY_BACKOFF", "RETRY_BACKOFF_MAX", "MAX_REDELIVERIES",
                          "SHUTDOWN_GRACE", "LOOP_LAG_WARN", "MIN_INTERVAL", "BLOOM_ERROR_RATE",
                          "BLOOM_SNAPSHOT_INTERVAL")
        if value < 0 or (value == 0 and not zero_ok):
            raise bad(f"must be {'0 or more' if zero_ok else 'positive'}, got {value!r}")
    if (floor := FLOORS.get(key)) and value < floor.least and not (floor.zero_too and value == 0):
        raise bad(f"must be {floor.said}, got {value!r}: {floor.why}")
    # JOB_TIMEOUT: the default of every spec's timeout; DEDUPE_TTL, DEDUPE_TAKEOVER_AFTER:
    # the dedupe scripts' expiries, which Redis refuses far beyond it
    if key in ("JOB_TIMEOUT", "DEDUPE_TTL", "DEDUPE_TAKEOVER_AFTER") and value > MAX_TIMEOUT:
        raise bad(f"must be at most {MAX_TIMEOUT} seconds, got {value!r}")
    if key == "CONCURRENCY" and value > MAX_CONCURRENCY:   # each a process, forked at start
        raise bad(f"must be at most {MAX_CONCURRENCY} pool processes, got {value!r}")
    if key in ("MASTER_ADDRESS", "DASHBOARD_ADDRESS"):
        parse_address(value, key)
    if key == "LOG_LEVEL" and value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise bad("expected DEBUG, INFO, WARNING or ERROR")
    if key == "LOG_FORMAT" and value not in ("text", "json"):
        raise bad(f"expected text or json, got {value!r}")
    if key == "REDIS_URL":
        _check_redis_url(value, bad)
    return value


def is_module_name(text: str) -> bool:
    return all(part.isidentifier() for part in text.split("."))


def meant_module(name: str) -> tuple[str, str] | None:
    """("func" or "path", the module meant) for jobs:Crawl or jobs.py given as a module."""
    mod, colon, attr = name.partition(":")
    if colon and is_module_name(mod) and is_module_name(attr):
        return "func", mod
    meant = name.removesuffix(".py").replace(os.sep, ".").strip(".")
    if (name.endswith(".py") or os.sep in name) and meant and is_module_name(meant):
        return "path", meant
    return None


def _check_module_name(name: str, bad) -> None:
    """A JOB_MODULES name a worker can import: a path or a func there was no error here, and
    then the master refused every job and a worker imported nothing."""
    if is_module_name(name):
        return
    if meant := meant_module(name):
        raise bad(f"{name!r} is a {meant[0]}, not a module name: give "
                  f"{'its module, ' if meant[0] == 'func' else ''}{meant[1]}")
    raise bad(f"{name!r} is not a module name, such as myproject.jobs")


def _check_redis_url(value: str, bad) -> None:
    from urllib.parse import parse_qs, unquote, urlsplit

    if not value.lower().startswith(("redis://", "rediss://", "unix://")):   # (as redis-py)
        raise bad(f"{value!r} is not a redis://, rediss:// or unix:// URL")
    shown, example = redact_url(value), "e.g. redis://127.0.0.1:6379/0"
    # (the password is never shown: only the hint at what in it breaks the URL)
    encode = ("percent-encode special characters in the password (# as %23, / as %2F, "
              "? as %3F, [ as %5B, ] as %5D)")
    hint = f"; {encode}" if "@" in value else ""
    try:   # (a [ in the password: every command's traceback)
        parts = urlsplit(value)
    except ValueError:
        raise bad(f"{shown!r} does not parse as a URL{hint or ', ' + example}") from None
    if _cut_short(parts):
        raise bad(f"{shown!r}: the password is cut at a #, / or ?; {encode}")
    try:   # (a master or worker failed at start with a traceback)
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise bad(f"{shown!r}: the port must be a number from 1 to 65535, {example}{hint}")
    # redis-py reads a path that is no number as database 0, /1/2 as 12, and /%30 as 0
    db = unquote(parts.path).strip("/")
    if parts.scheme != "unix" and db and not (db.isascii() and db.isdigit()):
        raise bad(f"{shown!r}: the database after the host must be a number, {example}")
    query, scheme = parse_qs(parts.query), parts.scheme.lower()
    if not all(db.isdigit() for db in query.get("db", [])):   # (?db=x)
        raise bad(f"{shown!r}: the database (db=) must be a number, {example}")
    # an option redis-py does not take: its TypeError at the first connection would quote
    # its internals (it passes over an option with no value, as parse_qs does)
    taken = _redis_url_options(scheme) if query else set()
    for name in query:
        if name in taken:
            continue
        if scheme != "rediss" and name in _redis_url_options("rediss"):
            raise bad(f"{shown!r}: option {name!r} is for TLS: use a rediss:// URL")
        raise bad(f"{shown!r}: unknown option {name!r}; REDIS_URL takes redis-py's "
                  "connection options, such as db, socket_timeout, socket_connect_timeout, "
                  "socket_keepalive, health_check_interval, client_name")


def _redis_url_options(scheme: str) -> set[str]:
    """The query options redis-py takes in a URL of ``scheme``: its pool's, and those of the
    connection class the scheme makes (each is passed to that class as a keyword)."""
    import inspect

    from redis.asyncio import connection   # here: most commands never read a query

    cls = {"unix": connection.UnixDomainSocketConnection,
           "rediss": connection.SSLConnection}.get(scheme, connection.Connection)
    return {"max_connections"} | {
        p.name for k in cls.__mro__ if "__init__" in vars(k)
        for p in inspect.signature(k.__init__).parameters.values()
        if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "self"}


def names(raw: str, field: str | None) -> list[str]:
    """The one reading of a comma list, "a, b,,c" as a, b, c (env, CLI and dashboard);
    with ``field``, one that names nothing (",") is an error naming it, not an empty list."""
    found = [part.strip() for part in raw.split(",") if part.strip()]
    if field and not found:
        raise SettingsError(f"{field}: {raw!r} names nothing; give names such as a,b")
    return found


def _from_env(key: str, raw: str) -> Any:
    spec = KEYS[key]
    name = f"ELRIC_{key}"
    if spec.nullable and raw.strip().lower() in ("", "none", "null"):
        return None
    if list in spec.types:
        return names(raw, None)   # an empty QUEUES is refused by _check, wherever it is from
    if key == "LIMITS":
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise SettingsError(f"{key} (from {name}): expected JSON such as "
                                f'{{"*": {{"concurrency": 8}}}}: {exc}') from None
    if dict in spec.types:  # scope=backend,scope=backend
        pairs = [part.split("=", 1) for part in raw.split(",") if part.strip()]
        if any(len(p) != 2 for p in pairs):
            raise SettingsError(f"{key} (from {name}): expected scope=backend,..., got {raw!r}")
        out = {a.strip(): b.strip() for a, b in pairs}
        if len(out) < len(pairs):   # the last would win, unsaid
            raise SettingsError(f"{key} (from {name}): a scope is named twice in {raw!r}")
        return out
    if bool in spec.types:
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("0", "false", "no", "off", ""):
            return False
        raise SettingsError(f"{key} (from {name}): expected true or false, got {raw!r}")
    if int in spec.types or float in spec.types:
        number, what = (float, "a number") if float in spec.types else (int, "an integer")
        try:
            return number(raw)
        except ValueError:
            raise SettingsError(f"{key} (from {name}): expected {what}, got {raw!r}") from None
    return raw


def load_settings(path: str | None = None, env: dict | None = None,
                  overrides: dict | None = None) -> Settings:
    """Defaults ← settings module ← ELRIC_<KEY> variables ← ``overrides`` (command line)."""
    env = os.environ if env is None else env
    _check_env_names(env)
    values = {key: spec.default for key, spec in KEYS.items()}
    source = path or env.get("ELRIC_SETTINGS")
    if source is None and os.path.exists("settings.py"):
        source = "settings.py"
    if source is not None:
        if os.path.isdir(source):   # a project's folder: the settings.py in it
            if not os.path.isfile(os.path.join(source, "settings.py")):
                raise SettingsError(f"settings folder {source!r} holds no settings.py: give "
                                    "the settings file's path, or a folder that holds one")
            source = os.path.join(source, "settings.py")
        if not os.path.isfile(source):
            raise SettingsError(f"settings file {source!r} does not exist")
        try:
            namespace = runpy.run_path(source)
        except Exception as exc:
            raise SettingsError(f"settings file {source!r} failed to load: "
                                f"{type(exc).__name__}: {exc}") from None
        for name, value in namespace.items():
            if not name.isupper() and name.upper() in KEYS:
                raise SettingsError(f"{source}: {name}: settings names are upper case: "
                                    f"did you mean {name.upper()}?")
            if not name.isupper() or name.startswith("_"):
                continue
            if name not in KEYS:   # (a guess, as for ELRIC_ variables: not 36 names)
                close = difflib.get_close_matches(name, KEYS, n=1)
                raise SettingsError(f"{source}: unknown setting {name}" + (
                    f"; did you mean {close[0]}?" if close else
                    f" (known: {', '.join(KEYS)})"))
            values[name] = _check(name, value, source)
    for key in KEYS:
        raw = env.get(f"ELRIC_{key}")
        if raw is not None:
            values[key] = _check(key, _from_env(key, raw), f"ELRIC_{key}")
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = _check(key, value, "command line")
    if (values["RESULT_MAX_BYTES"] or 0) > values["RPC_MAX_MESSAGE"] // 2:
        raise SettingsError(f"RESULT_MAX_BYTES ({values['RESULT_MAX_BYTES']}) must be at most "
                            f"half of RPC_MAX_MESSAGE ({values['RPC_MAX_MESSAGE']}), or get_job "
                            "could not send such a result; raise RPC_MAX_MESSAGE too")
    if values["RETRY_BACKOFF_MAX"] < values["RETRY_BACKOFF"]:   # caps every delay, the first too
        raise SettingsError(f"RETRY_BACKOFF_MAX ({values['RETRY_BACKOFF_MAX']:g}) is below "
                            f"RETRY_BACKOFF ({values['RETRY_BACKOFF']:g}), the first retry's "
                            "delay: every retry would wait RETRY_BACKOFF_MAX; raise it, or "
                            "lower RETRY_BACKOFF")
    backends = {values["FILTER_BACKEND"], *values["FILTER_SCOPES"].values()}
    if "bloom" in backends:
        from elric.dedupe import MAX_SNAPSHOT, bloom_stage_bytes

        need = bloom_stage_bytes(values["BLOOM_CAPACITY"], values["BLOOM_ERROR_RATE"])
        if need > MAX_SNAPSHOT:   # never saved: a restart would forget every key
            raise SettingsError(
                f"BLOOM_CAPACITY {values['BLOOM_CAPACITY']} at BLOOM_ERROR_RATE "
                f"{values['BLOOM_ERROR_RATE']:g}: a 'bloom' scope's snapshot would be "
                f"{need >> 20} MiB, over the 512 MiB a Redis string holds, so it could never "
                "be saved; use 'redis-bloom' for it, or a smaller BLOOM_CAPACITY")
    if "set" not in backends:
        for key in ("DEDUPE_TTL", "DEDUPE_RELEASE_ON_FAILURE"):   # they would do nothing
            if values[key]:
                raise SettingsError(f"{key} applies to the 'set' dedupe backend only, and no "
                                    f"scope uses it (FILTER_BACKEND "
                                    f"{values['FILTER_BACKEND']!r}): a Bloom filter cannot "
                                    "forget a key; leave it out, or use 'set'")
    return Settings(values, source)
