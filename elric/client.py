"""A blocking client for the master's RPC API, and the default one ``Job.submit`` uses."""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from typing import Any

from elric import codec
from elric.backoff import Backoff
from elric.config import Settings, load_settings, parse_address
from elric.contract import MAX_BATCH, MAX_READ, MIN_MESSAGE, SpecError, check_arguments
from elric.rpc import (MAX_MESSAGE, Client, RemoteError, RPCArgumentError, RPCConnectionError,
                        RPCError, RPCUnreachableError, packed_size)

# bytes of a request besides its params' items: its type, msgid, method and array headers
REQUEST_FRAME = 64
# A list longer than one call takes goes in calls of this many specs, two in flight: the
# master checks one batch while Redis queues the one before.
SPLIT_BATCH = 1000


class SubmitError(RemoteError):
    """Some batches of a split ``submit_jobs`` were refused (by the master, or here: not
    msgpack values, too big); the others were queued. ``replies``: one per spec, in
    order, None where its batch was refused."""

    def __init__(self, code, message: str, replies: list[dict | None],
                 max_message: int | None = None) -> None:
        super().__init__({"code": code, "message": message, "max_message": max_message})
        self.replies = replies


class MasterClient:
    """The master's RPC methods as Python calls (docs/PROTOCOL.md lists them)."""

    def __init__(self, address: str = "127.0.0.1:7531", *, token: str | None = None,
                 timeout: float = 30.0, max_message: int = MAX_MESSAGE,
                 handshake: float | None = None) -> None:
        """``handshake``: seconds a new connection has to connect and answer its first
        call (auth, else a ping), the client's ``timeout`` holding for the calls after."""
        host, port = parse_address(address, "MASTER_ADDRESS")
        self.address = address
        self.rpc = Client(host, port, timeout=timeout, token=token, max_message=max_message,
                          handshake=handshake)

    @classmethod
    def from_settings(cls, settings: Settings, **options: Any) -> MasterClient:
        return cls(settings.MASTER_ADDRESS, token=settings.RPC_TOKEN,
                   max_message=settings.RPC_MAX_MESSAGE, **options)

    def call(self, method: str, *params: Any) -> Any:
        return self.rpc.call(method, *params)

    def ping(self) -> str:
        return self.call("ping")

    def submit_job(self, spec: dict) -> dict:
        """Raises RPCConnectionError with ``.job_ids`` when the outcome stays unknown."""
        spec = _with_id(spec)
        [answer] = self._until_known("submit_job", [(spec,)])
        if isinstance(answer, Exception):
            raise _unsettled(_unsendable(answer, "submit_job", [spec]), [spec])
        return answer

    def submit_jobs(self, specs: list[dict]) -> list[dict]:
        """One reply map per spec, in order. Up to 10,000 specs go in one call: one bad
        spec refuses them all. A longer list goes in calls of SPLIT_BATCH specs, each all
        or nothing; SubmitError then names the refused spec and says which were queued."""
        specs = [_with_id(spec) for spec in specs]
        if len(specs) <= MAX_BATCH:
            [answer] = self._until_known("submit_jobs", [(specs,)])
            if isinstance(answer, Exception):
                raise _unsettled(_unsendable(answer, "submit_jobs", specs), specs)
            return answer
        starts = range(0, len(specs), SPLIT_BATCH)
        batches = [specs[i:i + SPLIT_BATCH] for i in starts]
        answers = self._until_known("submit_jobs", [(batch,) for batch in batches])
        replies = [reply for batch, a in zip(batches, answers)
                   for reply in ([None] * len(batch) if isinstance(a, Exception) else a)]
        if unknown := next((a for a in answers if isinstance(a, RPCConnectionError)), None):
            raise _unsettled(unknown, specs, replies)
        # refused by the master (RemoteError), or here: msgpack cannot carry it, too big
        refused = [(i, _unsendable(a, "submit_jobs", batch))
                   for i, batch, a in zip(starts, batches, answers) if isinstance(a, Exception)]
        if not refused:
            return replies
        start, first = refused[0]
        message = str(first)
        where = re.match(r"spec (\d+): ", message)   # the master counts from its batch
        last = min(start + SPLIT_BATCH, len(specs)) - 1
        message = (f"spec {start + int(where[1])}: {message[where.end():]}" if where
                   else f"spec {start}: {message}" if start == last
                   else f"specs {start}-{last}: {message}")
        queued = sum(r is not None for r in replies)
        raise SubmitError(getattr(first, "code", None), f"{message}; refused {len(refused)} "
                          f"batch(es) of {SPLIT_BATCH} and queued the other {queued} of "
                          f"{len(specs)} specs (see .replies)", replies,
                          getattr(first, "max_message", None))

    def _until_known(self, method: str, calls: list[tuple]) -> list[Any]:
        """``call_many``, sending again the calls whose outcome is unknown (a master
        restarting) till the client's timeout: safe, as their jobs have ids already."""
        deadline = time.monotonic() + (self.rpc.timeout or 30.0)
        backoff, answers, todo = Backoff(0.05, 2.0), [None] * len(calls), range(len(calls))
        for attempt in itertools.count():
            try:   # a resend waits only for what is left of the first call's time
                got = self.rpc.call_many(method, [calls[i] for i in todo], timeout=None if
                                         attempt == 0 else max(deadline - time.monotonic(), .1))
            except RPCConnectionError as exc:
                if attempt == 0 and isinstance(exc, RPCUnreachableError) and not exc.answered:
                    raise   # nothing was sent: nothing to settle
                # those answered before it broke are known: kept, not sent again
                got = [exc.answered.get(k, exc) for k in range(len(todo))]
            for i, answer in zip(todo, got):
                answers[i] = answer
            todo = [i for i in todo if isinstance(answers[i], RPCConnectionError)]
            delay = backoff.next()
            if not todo or time.monotonic() + delay > deadline:
                break
            time.sleep(delay)
        return answers

    def get_job(self, job_id: str, timeout: float | None = None) -> dict | None:
        """``timeout``: the most seconds to wait for the answer, never over the client's."""
        if timeout is not None and self.rpc.timeout is not None:
            timeout = min(timeout, self.rpc.timeout)
        return self.rpc.call("get_job", job_id, timeout=timeout)

    def get_jobs(self, job_ids: list[str]) -> list[dict | None]:
        """``get_job`` of each, in order, in as few calls as the messages' size allows."""
        jobs: list[dict | None] = []
        while len(jobs) < len(job_ids):
            more = self.call("get_jobs", _fitting(job_ids[len(jobs):len(jobs) + MAX_READ]))
            if not more:   # (asked again, it would answer the same: no end)
                raise RPCError(f"get_jobs answered no job for {job_ids[len(jobs)]!r}")
            jobs += more
        return jobs

    def job_kind(self, job_id: str) -> dict | None:
        """A job's kind and status, not its result or runs (docs/PROTOCOL.md)."""
        return self.call("job_kind", job_id)

    def remove_job(self, job_id: str) -> bool:
        return self.call("remove_job", job_id)

    def health(self) -> dict:
        """``{"master_id", "pid", "ok", "tasks": {name: {"state", "progress_at", "ok"}},
        "now"}``."""
        return self.call("health")

    def cancel_job(self, job_id: str) -> dict:
        """``{"job_id", "was", "status"}``: status ``cancelled``, ``cancelling`` (it was
        running: its worker stops it) or, for a finished job, its status, unchanged."""
        return self.call("cancel_job", job_id)

    def control_worker(self, worker_id: str, action: str, queues: list[str] | None = None,
                       concurrency: int | None = None) -> dict:
        """``action``: pause (fetch no jobs), resume, stop (gracefully), or set (its
        ``queues``, its ``concurrency`` or both); the worker obeys within a second.
        ``{"worker_id", "action", "unchanged"}`` (``unchanged``: already so, nothing to
        do); RemoteError ``not_found`` for a worker that takes no orders: unknown, lost,
        stopped, or stopping (but for ``stop``)."""
        return self.call("control_worker", worker_id, action, queues or None, concurrency)

    def rerun_job(self, job_id: str) -> dict:
        return self.call("rerun_job", job_id)

    def pause_job(self, job_id: str) -> bool:
        return self.call("pause_job", job_id)

    def resume_job(self, job_id: str) -> bool:
        return self.call("resume_job", job_id)

    def run_job(self, job_id: str, wait: float = 0) -> dict:
        """Fire a periodic job now, by its rules: ``{"job_id", "fire_id", "fire_time",
        "run"}``; ``run`` is what the scheduler did with the fire, waited for up to ``wait``
        seconds (None: not seen by then)."""
        return self.call("run_job", job_id, wait)

    def modify_job(self, job_id: str, changes: dict) -> dict:
        return self.call("modify_job", job_id, changes)

    def list_jobs(self, **filter: Any) -> list[dict] | dict:
        """Job summaries (docs/PROTOCOL.md); with ``cursor`` ("" to begin) a map
        ``{"jobs", "cursor"}``: ``cursor`` is where to go on from when ``scan_limit``
        stopped the looking before the page filled, else ""."""
        return self.call("list_jobs", filter)

    def bulk_jobs(self, action: str, filter: dict, cursor: str = "", op: str = "") -> dict:
        """One step of rerun / copy / cancel / delete / find (the ids alone) over the jobs
        ``filter`` picks; call again with the reply's ``cursor`` until it is ""."""
        return self.call("bulk_jobs", action, filter, cursor, op)

    def stats(self) -> dict:
        return self.call("stats")

    def close(self) -> None:
        self.rpc.close()

    def __enter__(self) -> MasterClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _fitting(job_ids: list[str]) -> list[str]:
    """The first of ``job_ids`` (one at least) that fit in a request any master takes (its
    RPC_MAX_MESSAGE may be less than this client's): 1,000 ids of 200 characters do not."""
    room = MIN_MESSAGE - REQUEST_FRAME
    for n, job_id in enumerate(job_ids):
        room -= packed_size(job_id)
        if n and room < 0:
            return job_ids[:n]
    return job_ids


def _with_id(spec: Any) -> Any:
    """The spec with a job_id chosen here if it has none (not for a periodic job: the user
    chooses), so that sending it again after a lost connection names the same job."""
    if isinstance(spec, dict) and spec.get("job_id") in ("", None) and "trigger" not in spec:
        return {**spec, "job_id": os.urandom(16).hex()}
    return spec


def _unsendable(exc: Exception, method: str, specs: list) -> Exception:
    """``exc``, or for a call msgpack could not pack, an error naming the first spec it
    cannot carry ("spec 77: ", as the master counts) and what in it, as msgpack does not."""
    if not isinstance(exc, RPCArgumentError):
        return exc
    for i, spec in enumerate(specs):
        if (what := _what_unsendable(spec)) is not None:
            place = f"spec {i}: " if method == "submit_jobs" else ""
            return RPCArgumentError(f"{place}cannot send {method!r} arguments: {what}; pass "
                                    "plain data (dict, list, str, numbers)")
    return exc


def _what_unsendable(spec: Any) -> str | None:
    """What in ``spec`` msgpack cannot pack (an argument by its place), or None."""
    try:
        codec.pack(spec)
        return None
    except (TypeError, ValueError, OverflowError) as exc:
        first = exc
    for key, value in spec.items() if isinstance(spec, dict) else ():
        try:
            codec.pack(value)
        except (TypeError, ValueError, OverflowError) as exc:
            try:   # the contract's words name the argument ("args[1]['when']")
                check_arguments(*((value, {}) if key == "args" else ([], value)))
            except SpecError as named:
                if key in ("args", "kwargs"):
                    return str(named)
            return f"{key}: {exc}"
    return str(first)


def _unsettled(exc: Exception, specs: list, replies: list | None = None) -> Exception:
    """A submit's error, with ``job_ids`` (every spec's, in order) and ``replies`` (the
    answers known, else None). An unknown outcome is an RPCConnectionError, never
    "unreachable", which means nothing was sent."""
    ids = [s.get("job_id") if isinstance(s, dict) else None for s in specs]
    error = exc
    if isinstance(exc, RPCConnectionError):   # named: those whose batch was not answered
        unknown = [i for i, r in zip(ids, replies or [None] * len(ids)) if r is None]
        shown = ", ".join(map(str, unknown[:3])) + (
            f", ... ({len(unknown)} in all)" if len(unknown) > 3 else "")
        error = RPCConnectionError(f"{exc}; whether job(s) {shown} were queued is unknown: "
                                   "send the same specs again with these job ids (all in "
                                   "this error's .job_ids), which cannot queue one twice")
    error.job_ids, error.replies = ids, replies or [None] * len(specs)
    return error


_default: MasterClient | None = None
_lock = threading.Lock()


def default_client() -> MasterClient:
    """The client built from settings (settings.py, ELRIC_SETTINGS, ELRIC_<KEY>)."""
    global _default
    with _lock:
        if _default is None:
            _default = MasterClient.from_settings(load_settings())
        return _default


def set_default_client(client: MasterClient | None) -> None:
    global _default
    with _lock:
        _default = client
