"""The Job base class users subclass, and how a job is submitted.

``Fetch.submit(url)`` from a script sends the job to the master over RPC and returns its
id. Inside a running job the same call is collected by the worker (as a child job, marked
with the parent's id) and sent to the master in a batch when the parent finishes.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import inspect
import itertools
import sys
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

from elric import codec
from elric.contract import SpecError, Status, check_arguments, check_type, func_path
from elric.handle import JobHandle, filtered


@dataclass
class _RunContext:
    """What the worker's child process knows about the job it runs now."""

    job_id: str
    spec: dict
    children: list[dict] = field(default_factory=list)
    # numbers the children: next() is atomic, so threads holding the job's context (from
    # asyncio.to_thread) never number two alike, as reading len(children) could
    numbers: Iterator[int] = field(default_factory=itertools.count)
    ended: bool = False   # its children were taken: a task or thread it left submits no more


# The job running now in this pool process: a context variable, since an async pool process
# runs many jobs at once, each in its own task (and so its own context).
_current: ContextVar[_RunContext | None] = ContextVar("elric_current_job", default=None)
# Set in pool processes, which never talk to a master: a submit there without a job's
# context (a thread the job started, an import) would queue a job of no parent each retry
in_pool_process = False


def _child_job_id(parent_id: str, n: int, enqueued_at: int = 0) -> str:
    # The same for every attempt, so a parent run again after a crash does not double its
    # children; a rerun, or the id submitted again after a delete, makes new ones.
    name = f"{parent_id}/{n}/{enqueued_at}"
    digest = hashlib.blake2b(name.encode(), digest_size=12).hexdigest()
    return f"c{digest}"


# spec keys a Job class's attribute does not give (only queue, priority, max_retries and
# timeout do): a class naming one meant it, and would have been sent without it
_NOT_CLASS_DEFAULTS = ("dedupe_key", "dedupe_scope", "limit_key", "limit_interval", "trigger",
                       "replace_existing", "misfire_grace_time", "coalesce", "max_instances")


def _class_default(cls: type, key: str) -> Any:
    """The plain data ``cls`` (not Job) gives ``key``, or None: a method, property or other
    descriptor of that name is the class's own business, and None is no value."""
    for k in cls.__mro__:
        if key in vars(k):
            value = vars(k)[key]
            if k in (Job, object) or callable(value) or hasattr(type(value), "__get__"):
                return None
            return value
    return None


@functools.cache   # once a class, not at every spec (a crawl's child jobs are many)
def _class_problem(cls: type) -> str | None:
    """Why ``cls`` cannot be submitted, or None: it names a spec key no spec takes from a
    class, or its ``run`` is Job's (as with a typo'd ``def runn``)."""
    for key in _NOT_CLASS_DEFAULTS:
        if _class_default(cls, key) is not None:
            how = (f"return it from {key}_for(*args, **kwargs)" if key in (
                "dedupe_key", "limit_key") else f"pass it as submit_with({key}=...)")
            return (f"{cls.__qualname__}.{key}: a Job class's attributes give only its "
                    f"queue, priority, max_retries and timeout; {how}")
    if cls.run is not Job.run:
        return None
    own = [name for k in cls.__mro__ if k not in (Job, object)
           for name, value in vars(k).items() if callable(value) and not name.startswith("__")]
    near = difflib.get_close_matches("run", own, n=1)
    typo = f" (it defines {near[0]}: a typo?)" if near else ""
    return (f"{cls.__qualname__} does not implement run, the method a worker calls with the "
            f"job's arguments{typo}: define run(self, ...) or async def run(self, ...)")


@functools.lru_cache(maxsize=4096)
def _arguments_problem(cls: type, positional: int, names: frozenset) -> str | None:
    """Why ``run`` does not take ``positional`` arguments and keywords ``names``, or None.
    Only their count and names matter, so a crawler's thousands of child submits bind once.
    A decorator's signature is judged, not its ``__wrapped__``'s: it may pass a parameter
    itself; a run that is no plain function is not judged."""
    run = inspect.getattr_static(cls, "run")
    if not inspect.isfunction(run):
        return None
    try:
        signature = inspect.signature(run, follow_wrapped=False)
    except ValueError:   # no signature to read
        return None
    try:
        signature.bind(None, *([None] * positional), **dict.fromkeys(names))
    except TypeError as exc:
        return f"{cls.__name__}.run{signature} does not take these arguments: {exc}"
    return None


class Job:
    """Subclass this and implement ``run``. Class attributes are per-class defaults."""

    queue: str | None = None
    priority: int | None = None
    max_retries: int | None = None
    timeout: float | None = None

    #: set by the worker before ``run`` is called (``max_retries`` too, the job's own: no
    #: retry is left once ``attempt > max_retries``)
    job_id: str = ""
    attempt: int = 0
    dedupe_scope: str | None = None

    def run(self, *args: Any, **kwargs: Any) -> Any:
        """The work. May be ``async def``: the pool process then runs it, many at once, on
        its event loop; it must not block the loop (no time.sleep, no sync HTTP).

        Stopping it: past ``timeout`` a sync run gets ``JobTimeout`` and an async one is
        cancelled; cancel_job raises ``JobCancelled`` (a BaseException) in a sync run and
        cancels an async one. Clean up in ``finally``; one that ignores these for 5 s
        loses its process. An exception with a ``retry_after`` attribute (seconds) waits
        at least that long for its retry, up to RETRY_BACKOFF_MAX, and so do the other jobs
        of its limit key (a server's Retry-After is for all its pages)."""
        raise NotImplementedError(f"{type(self).__name__}.run is not implemented")

    @classmethod
    def dedupe_key_for(cls, *args: Any, **kwargs: Any) -> str | None:
        """Hook: the dedupe key of a submission with these arguments (None: no dedupe)."""
        return None

    @classmethod
    def limit_key_for(cls, *args: Any, **kwargs: Any) -> str | None:
        """Hook: the limit key of a submission with these arguments (None: no limit). Jobs
        sharing a key share the limits setting LIMITS gives it, across all workers."""
        return None

    @classmethod
    def spec(cls, args: Any = (), kwargs: dict | None = None, **options: Any) -> dict:
        """The job spec map ``submit_with`` sends (useful for ``submit_jobs`` batches)."""
        path = func_path(cls)
        if path.startswith("__main__:"):
            raise SpecError(
                f"{cls.__qualname__} is defined in __main__, so a worker cannot import it; "
                "move the class into a module and import it from your script"
            )
        if "<locals>" in path:
            raise SpecError(f"{path}: a Job class must be defined at module level")
        if "func" in options:
            raise SpecError("submit_with() takes no 'func': it is the class itself")
        if not isinstance(args, (list, tuple)) or not isinstance(kwargs or {}, dict):
            # list() would split a string into characters and dict() take a list of pairs
            raise SpecError(f"{cls.__name__}: args must be a list or tuple and kwargs a dict, "
                            f"got {type(args).__name__} and {type(kwargs).__name__}")
        spec = {"func": path, "args": list(args), "kwargs": dict(kwargs or {})}
        # The class's defaults and hooks are applied here, where the class is: a master
        # checks names only and never imports project code.
        for key in ("queue", "priority", "max_retries", "timeout"):
            if (value := getattr(cls, key)) is not None:
                try:   # here, naming the attribute: sent, it failed as a value or argument
                    check_type(key, value)
                except SpecError as exc:
                    raise SpecError(f"{cls.__qualname__}.{key} = {value!r}: {exc}") from None
                spec[key] = value
        if wrong := _class_problem(cls):
            raise SpecError(wrong)   # (a class without run failed each attempt in the worker)
        for key in ("dedupe_key", "limit_key"):
            if key not in options:
                derived = cls._derive(key, spec["args"], spec["kwargs"])
                if derived is not None:
                    spec[key] = derived
        spec.update(options)
        return spec

    @classmethod
    def _check_arguments(cls, args: list, kwargs: dict) -> None:
        """SpecError unless ``run`` takes these arguments: else each attempt failed in the
        worker, its retries used up. (``spec`` does not judge them: a spec built for a test
        or a template may leave them out.)"""
        if problem := _arguments_problem(cls, len(args), frozenset(kwargs)):
            raise SpecError(problem)

    @classmethod
    def _derive(cls, key: str, args: list, kwargs: dict) -> str | None:
        hook = f"{key}_for"
        try:
            derived = getattr(cls, hook)(*args, **kwargs)
        except Exception as exc:  # e.g. arguments that do not fit the job's signature
            raise SpecError(f"{cls.__name__}.{hook}(args, kwargs) raised "
                            f"{type(exc).__name__}: {exc}") from None
        if derived is not None and key == "limit_key" and not isinstance(derived, str):
            raise SpecError(f"{cls.__name__}.{hook} must return a string or None, "
                            f"got {type(derived).__name__}")
        if derived == "":   # (the master's refusal named a key the caller never gave)
            raise SpecError(f"{cls.__name__}.{hook}(*{args!r:.80}) returned '': return None "
                            f"for no {key}, or check the arguments")
        return None if derived is None else str(derived)

    @classmethod
    def _plain(cls, spec: dict) -> dict:
        """``spec`` as msgpack carries it (a copy), or SpecError naming the class."""
        try:
            return codec.unpack(codec.pack(spec))
        except (TypeError, ValueError, OverflowError) as exc:
            try:   # msgpack's own words name no argument ("unhashable type: 'list'")
                check_arguments(spec.get("args", ()), spec.get("kwargs", {}))
            except SpecError as named:
                exc = named
            raise SpecError(f"{cls.__name__}.submit: its arguments are not msgpack values "
                            f"({exc}); pass plain data (dict, list, str, numbers)") from None

    @classmethod
    def submit(cls, *args: Any, **kwargs: Any) -> JobHandle:
        """Submit this job with these arguments; returns its id, a ``JobHandle``
        (``.status()``, ``.result(timeout=...)``)."""
        return cls.submit_with(args=args, kwargs=kwargs)

    @classmethod
    def submit_with(cls, args: Any = (), kwargs: dict | None = None,
                    **options: Any) -> JobHandle:
        """Submit with spec options (job_id, queue, priority, max_retries, timeout, ...);
        None for one of the last four puts the class's aside: the settings' default applies
        (JOB_TIMEOUT for timeout; none if unset)."""
        spec = cls.spec(args, kwargs, **options)
        cls._check_arguments(spec["args"], spec["kwargs"])
        ctx = _current.get()
        if ctx is not None:
            if ctx.ended:
                raise RuntimeError(f"{cls.__name__}.submit after job {ctx.job_id} ended: its "
                                   "children are sent as it ends; await the tasks and threads "
                                   "that submit them before run returns")
            spec.setdefault("parent", ctx.job_id)
            n = next(ctx.numbers)
            if not spec.get("job_id"):   # "" or None: a master would make up a random id
                spec["job_id"] = _child_job_id(ctx.job_id, n, ctx.spec.get("enqueued_at", 0))
            # a child shares its parent's dedupe scope, batch and round unless it names its own
            for key in ("dedupe_scope", "batch", "round"):
                if ctx.spec.get(key) and key not in options:
                    spec[key] = ctx.spec[key]
            # a copy as it is now: the job may go on to change a list it passed
            ctx.children.append(cls._plain(spec))
            return JobHandle(spec["job_id"], "child")
        if in_pool_process:
            raise RuntimeError(f"{cls.__name__}.submit in a pool process but not from a "
                               "running job (from a thread it started, or on import): submit "
                               "child jobs from the job's own thread, its tasks or "
                               "asyncio.to_thread, which carry the job's context")
        from elric.client import default_client  # only a script needs the client and settings
        # checked here too: the client's refusal named neither the class nor what to pass
        reply = default_client().submit_job(cls._plain(spec))
        if reply["status"] == Status.FILTERED:   # (once per line of the caller that submits)
            level = 2
            while sys._getframe(level - 1).f_code.co_filename == __file__:   # (Job.submit)
                level += 1
            warnings.warn(filtered(reply["job_id"], spec), stacklevel=level)
        return JobHandle(reply["job_id"], reply["status"])
