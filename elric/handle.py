"""What ``Job.submit`` returns: the job's id, and a way to ask about it or wait for it."""

from __future__ import annotations

import time
from typing import Any, Callable

from elric.contract import ErrorCode, NotFound, Status
from elric.rpc import RemoteError, RPCTimeoutError

ENDED = tuple(s for s in Status if s.ended)   # a periodic job's "paused" is no Status


class _Unanswered(RPCTimeoutError, TimeoutError):
    """The master did not answer before a wait's deadline: the TimeoutError a wait
    promises, and still a connection error (elric exits 3: try again)."""


class JobFailed(Exception):
    """The job ended without succeeding; ``job`` is its record (status, error, attempts)."""

    def __init__(self, job: dict) -> None:
        last = (job.get("error") or "").strip().splitlines()
        super().__init__(f"job {job['job_id']} {job['status']}"
                         + (f": {last[-1]}" if last else ""))
        self.job = job


def wait(client, job_id: str, timeout: float | None = None,
         on_status: Callable[[dict], None] | None = None) -> dict:
    """Poll until the job ends and return its record; TimeoutError after ``timeout`` s,
    NotFound (a LookupError) when there is no such job, ValueError for a periodic one or
    one whose key holds no job (an operator's overwrite).
    Polls often at first, then once a second, and on while the master says Redis is away."""
    if timeout is not None and not timeout >= 0:   # (NaN too)
        raise ValueError(f"timeout takes seconds, 0 or more (None: no limit), got {timeout}")
    deadline = None if timeout is None else time.monotonic() + timeout
    delay, state, why = 0.02, None, ""
    while True:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.01)
        try:   # a master gone silent holds no poll past the deadline
            job = client.get_job(job_id, timeout=left)
            state = job and job["status"]
        except RPCTimeoutError as exc:
            if deadline is None:
                raise
            if state is not None and time.monotonic() >= deadline:   # the poll at the end:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:g}s{why}") \
                    from None
            raise _Unanswered(str(exc)) from None
        except RemoteError as exc:   # Redis away: the same call again, as PROTOCOL says
            if exc.code != ErrorCode.REDIS_UNAVAILABLE:
                raise
            job, state = {}, f"unknown ({exc})"
        if job is None:
            raise NotFound(f"no job {job_id!r}")
        if state in ENDED:
            return job
        if job and state is None and job.get("unreadable"):   # its key overwritten: no status comes
            raise ValueError(f"job {job_id} cannot be read: {job['error']}; delete it "
                             f"(elric delete {job_id}) and submit it again")
        if "trigger" in job:   # scheduled, paused or finished: no status of it ever ends
            raise ValueError(f"job {job_id} is a periodic job ({state}): each fire "
                             "is a job of its own")
        if on_status is not None and job:
            on_status(job)
        if job and on_status is None:   # (elric submit --wait says it as it waits)
            why = f"; not run: {job['not_run']}" if job.get("not_run") else ""
        if deadline is not None:
            # the last poll is at the deadline, not at the last step before it (a second
            # early): a job that ends in that second is waited for, as promised
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"job {job_id} still {state} after {timeout:g}s{why}")
            delay = min(delay, left)
        time.sleep(delay)
        delay = min(1.0, delay * 1.5)


def filtered(job_id: str, spec: dict) -> str:
    """What a submission the dedupe filter dropped is told: else it looks queued, never runs."""
    return (f"job {job_id} was filtered: its dedupe key {spec.get('dedupe_key')!r} was seen "
            f"in scope {spec.get('dedupe_scope') or 'global'!r}, so it never runs; to run it "
            "again, submit it with a new dedupe_scope (its child jobs dedupe there too)")


class JobHandle(str):
    """A submitted job's id (a str: it prints, compares and stores as the id) that can also
    ask the master about the job. ``submitted``: what the submit answered (``queued``,
    ``filtered``, ``scheduled``), or ``child`` for a job a running job submitted (it is
    sent when its parent ends)."""

    def __new__(cls, job_id: str, submitted: str = "queued") -> "JobHandle":
        handle = super().__new__(cls, job_id)
        handle.submitted = submitted
        return handle

    @property
    def id(self) -> str:
        return str(self)

    def _client(self):
        if self.submitted == "child":   # its handle lives in a pool process: no master
            raise ValueError(f"job {self.id} was child: a child job is sent when its "
                             "parent ends; ask about it from outside the job")
        from elric.client import default_client
        return default_client()

    def status(self) -> str | None:
        """The job's status now (None: no such job, or its record expired)."""
        job = self._client().get_job(self.id)
        if job is None:   # a filtered job leaves no record: its submit said what it is
            return Status.FILTERED if self.submitted == Status.FILTERED else None
        return job["status"]

    def result(self, timeout: float | None = None) -> Any:
        """Wait for the job to end and return its result; JobFailed when it failed or was
        cancelled, TimeoutError when ``timeout`` seconds pass first."""
        # any other answer (a submission sent again) is the status of a job to wait for
        why = {"filtered": "its dedupe key was seen, so it never runs",
               "scheduled": "a periodic job; each fire is a job of its own"}.get(
                   self.submitted)
        if why is not None:
            raise ValueError(f"job {self.id} was {self.submitted}: {why}")
        job = wait(self._client(), self.id, timeout)
        if job["status"] != Status.SUCCEEDED:
            raise JobFailed(job)
        return job.get("result")
