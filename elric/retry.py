"""Redis errors told apart (an outage to wait out, or a bug), and retry with backoff."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from typing import Awaitable, Callable, TypeVar

from redis.exceptions import (AuthenticationError, BusyLoadingError, MasterDownError,
                              OutOfMemoryError, ReadOnlyError, ResponseError)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from elric.backoff import Backoff

T = TypeVar("T")

# What "Redis cannot be reached right now" looks like from redis-py.
REDIS_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)

# How masters and workers connect: a silent connection (host gone, dropped by a firewall)
# fails its command in seconds, retried as an outage, rather than hang (redis-py < 8 would).
REDIS_CLIENT_OPTIONS = {"socket_connect_timeout": 5, "socket_timeout": 5,
                        "socket_keepalive": True}

# Redis is up but refuses writes for a while (each reason below): an outage too, not a bug.
# redis-py raises these classes; the other codes come as plain ResponseErrors.
_REFUSAL_CLASSES = {OutOfMemoryError: "OOM", ReadOnlyError: "READONLY",
                    BusyLoadingError: "LOADING", MasterDownError: "MASTERDOWN"}

_REFUSALS = {
    "OOM": "Redis is out of memory (maxmemory)",
    "READONLY": "Redis is a read-only replica",
    "MISCONF": "Redis refuses writes because it cannot save its snapshot (MISCONF)",
    "LOADING": "Redis is loading its data",
    "BUSY": "Redis is busy running a script",
    "MASTERDOWN": "Redis is a replica that lost its master (MASTERDOWN)",
    "NOREPLICAS": "Redis has fewer good replicas than min-replicas-to-write (NOREPLICAS)",
}


# redis-py's prefix to a pipelined command's error: "Command # 1 (GET key) of pipeline ..."
_PIPELINED = " of pipeline caused error: "
# Redis 6.2's prefix to a script's error: "Error running script (call to f_<sha>):
# @user_script:35: @user_script: 35: -OOM ..." (a redis.call's) or "... @user_script:1: CODE"
_IN_SCRIPT = re.compile(r"Error running script \(call to f_[0-9a-f]+\): "
                        r"@user_script:\d+: (?:@user_script: \d+: -)?(?=[A-Z])")


def reply_text(exc: BaseException) -> str:
    """An error's text as Redis sent it, without redis-py's pipeline prefix (which quotes
    the command: a Bloom snapshot's bytes, say)."""
    text = str(exc)
    if text.startswith("Command # ") and _PIPELINED in text:
        return text.partition(_PIPELINED)[2]
    return text


def error_code(exc: BaseException) -> str:
    """The code of a Redis error reply (its first word), past a pipeline's or a 6.2
    script's prefix: else a refusal there reads as a bug, not an outage to wait out."""
    text = reply_text(exc)
    if (script := _IN_SCRIPT.match(text)) is not None:
        text = text[script.end():]
    return text.split(" ", 1)[0]   # "OOM command not allowed when ..."


def unblocked(exc: BaseException) -> bool:
    """Redis ended a BLPOP with an error (a failover made it a replica, or CLIENT UNBLOCK
    ... ERROR): a wake, not a failure."""
    return isinstance(exc, ResponseError) and error_code(exc) == "UNBLOCKED"


def redis_refusal(exc: BaseException) -> str | None:
    """What Redis refused for, if ``exc`` is such a refusal; else None."""
    code = next((c for cls, c in _REFUSAL_CLASSES.items() if isinstance(exc, cls)), None)
    if code is None and isinstance(exc, ResponseError):
        code = error_code(exc)
    return _REFUSALS.get(code)


def is_outage(exc: BaseException) -> bool:
    """Redis cannot be reached, or is up but refuses writes for a while: wait, try again."""
    return isinstance(exc, REDIS_ERRORS) or redis_refusal(exc) is not None


def _weather(exc: BaseException) -> str | None:
    """Redis's trouble in plain words, for logs and health alike; None for other errors."""
    return redis_refusal(exc) or (
        # (a ConnectionError too: Redis is there, its password changed under us)
        "Redis refuses the password in REDIS_URL" if isinstance(exc, AuthenticationError)
        else "Redis unreachable" if isinstance(exc, REDIS_ERRORS) else None)


def described(exc: BaseException) -> str:
    """An error as a task's health state shows it: Redis's trouble and what it said, or
    any other error's class and text."""
    kind = _weather(exc)
    return f"{kind} ({reply_text(exc)})" if kind else f"{type(exc).__name__}: {exc}"


async def each(items, call: Callable[[T], Awaitable]) -> None:
    """``await call(item)`` for every item; the first error is raised after the rest, but
    an outage (``is_outage``) ends it at once."""
    failed = None
    for item in items:
        try:
            await call(item)
        except Exception as exc:
            if is_outage(exc):
                raise
            failed = failed or exc
    if failed is not None:
        raise failed


async def until(event: asyncio.Event, timeout: float) -> None:
    """Wait for ``event``, or for ``timeout`` seconds to pass: whichever comes first."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(event.wait(), max(0.0, timeout))


def cancel_pending() -> bool:
    """The running task was asked to stop: redis-py may turn a cancel into a connection
    error or a return, so a loop waiting for CancelledError would run on."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class Outage:
    """What a retrying loop logs: its trouble when it starts or changes kind, and that it
    passed; not each retry."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log, self.what = log, what
        self.kind: str | None = None   # None: no trouble
        self.since = 0.0

    def failed(self, exc: BaseException, kind: str | None = None) -> None:
        """``kind``: the caller's name for expected trouble that is no Redis's (a master
        unreachable)."""
        if cancel_pending():   # the cancel came as this error: retrying would keep it alive
            raise asyncio.CancelledError from exc
        kind = kind or _weather(exc)
        name = kind or type(exc).__name__
        if name == self.kind:
            return
        if self.kind is None:
            self.since = time.monotonic()
        self.kind = name
        if kind:   # expected weather: one line
            self.log.warning("%s: %s (%s); retrying", self.what, kind, reply_text(exc))
        else:      # a bug, or a key of another type: its traceback
            self.log.error("%s; retrying", self.what, exc_info=exc)

    def passed(self) -> None:
        if self.kind is not None:
            self.log.info("%s: works again after %.1fs", self.what,
                          time.monotonic() - self.since)
            self.kind = None

    def trouble(self) -> str:
        """The trouble and how long it lasts, for an operator; "" when none."""
        return "" if self.kind is None else \
            f"{self.kind} for {time.monotonic() - self.since:.0f}s"


async def retry(call: Callable[[], Awaitable[T]], *, what: str, log: logging.Logger,
                errors: tuple[type[BaseException], ...] = REDIS_ERRORS,
                backoff: Backoff | None = None, deadline: float | None = None,
                outage: Outage | None = None) -> T:
    """``await call()`` until it does not raise one of ``errors`` or a refusal of Redis's,
    logging the trouble once (``Outage``: pass one to show it as it lasts); past
    ``deadline`` (``time.monotonic()``) the last error is raised."""
    backoff, outage = backoff or Backoff(), outage or Outage(log, what)
    while True:
        try:
            result = await call()
            outage.passed()
            return result
        except Exception as exc:
            if not isinstance(exc, errors) and redis_refusal(exc) is None:
                raise
            if deadline is not None and time.monotonic() >= deadline:
                raise
            outage.failed(exc)
            pause = backoff.next()   # (the last ends at the deadline: no try past it)
            await asyncio.sleep(pause if deadline is None
                                else min(pause, deadline - time.monotonic()))
