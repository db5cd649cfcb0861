"""How elric's processes log: text for people, or LOG_FORMAT = "json" for log collectors;
the same in a worker's pool processes, so a worker's log has one format."""

from __future__ import annotations

import json
import logging
import math
import os
import select
import sys
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass, field


class JsonLines(logging.Formatter):
    """LOG_FORMAT = "json": one object per line, for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": record.created, "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        for key in ("job_id", "func", "attempt"):   # set on job events (elric.jobs)
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["traceback"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str, log_format: str, name: str = "%(name)s", stream=None) -> None:
    """Log at ``level`` (a name) to ``stream`` (stderr); ``name``: how a text line names
    its logger."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {name}: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler])


@dataclass(slots=True)
class _Pipe:
    read: int     # what fd 1 or 2 now writes to
    out: int      # where fd 1 or 2 wrote before: the worker's output
    level: int
    partial: bytearray = field(default_factory=bytearray)   # a line not yet ended


class JobOutput:
    """LOG_FORMAT = "json" in a pool process: fds 1 and 2 are pipes, so that each line a
    job writes there (print, sys.stderr, a command it runs) reaches the worker's output
    as a JSON record too, with the id of the sync job running (``job_id``, set by the
    runner) - not as a plain line that a log collector cannot parse. ``current``: the
    running job's context variable; given, sys.stdout and sys.stderr become JobStreams,
    so that what an async job writes there (many run at once) carries its own id."""

    def __init__(self, current: ContextVar | None = None) -> None:
        self.job_id: str | None = None
        self.lock = threading.Lock()   # reads and writes a line whole, and in order
        self.format = JsonLines().format
        self.pipes: list[_Pipe] = []
        # (id of a job's context, pipe level) -> (the context, its line not yet ended)
        self.held: dict[tuple[int, int], tuple[object, str]] = {}
        # the thread in write or end: a write it makes meanwhile (a finalizer the GC runs
        # while a record is built, a warning) goes to the fd, not back for the lock it holds
        self.writer: int | None = None
        for fd, level in ((1, logging.INFO), (2, logging.WARNING)):
            read, write = os.pipe()   # (not inherited: only fds 1 and 2 are, by commands)
            os.set_blocking(read, False)
            self.pipes.append(_Pipe(read, os.dup(fd), level))
            os.dup2(write, fd)
            os.close(write)
        # this process's own records go straight to the worker's stderr
        self.stderr = open(self.pipes[1].out, "w", buffering=1, encoding="utf-8",
                           errors="backslashreplace", closefd=False)
        os.register_at_fork(after_in_child=self._forked)
        if current is not None:
            for name, pipe in (("stdout", self.pipes[0]), ("stderr", self.pipes[1])):
                if getattr(sys, name) is not None:
                    setattr(sys, name, JobStream(getattr(sys, name), self, pipe, current))

    def _forked(self) -> None:
        """In the child of a job's fork, which JobStream.write may take the lock in: the
        relay thread may have held it then, and is not there to let it go."""
        self.lock, self.writer = threading.Lock(), None

    def relay(self) -> None:
        """The thread passing the lines on as they come."""
        fds = [p.read for p in self.pipes]
        while True:
            select.select(fds, [], [])
            with self.lock:
                for pipe in self.pipes:
                    self._pass(pipe, False)

    def switch(self, job_id: str | None) -> None:
        """At a sync job's start and end: what was written before is passed on with the id
        it was written under, and what comes after, with ``job_id``."""
        with self.lock:
            for pipe in self.pipes:
                self._pass(pipe, True)
            self.job_id = job_id

    def _pass(self, pipe: _Pipe, end: bool) -> None:
        for _ in range(16):   # bounded: a command left running may write on and on
            try:
                data = os.read(pipe.read, 65536)
            except BlockingIOError:
                break
            pipe.partial += data
        *lines, rest = pipe.partial.split(b"\n")
        if end or len(rest) > 65536:   # a line never ended is passed on as one
            lines.append(rest)
            rest = b""
        pipe.partial = bytearray(rest)
        for line in lines:
            if line:
                text = line.decode("utf-8", "backslashreplace").rstrip("\r")
                self._write(pipe, text, self.job_id)

    def write(self, pipe: _Pipe, ctx, text: str) -> None:
        """What the job of context ``ctx`` wrote through sys.stdout or sys.stderr: its
        lines passed on now with its id, the end of one not yet ended held until it is
        (or the job ends; once it has, as it comes: a thread it left writes on)."""
        with self.lock:
            self.writer = threading.get_ident()
            try:
                key = (id(ctx), pipe.level)   # (held with the context: its id is not reused)
                if key in self.held:
                    text = self.held.pop(key)[1] + text
                *lines, rest = text.split("\n")
                if ctx.ended or len(rest) > 65536:   # as _pass does with a line never ended
                    lines.append(rest)
                elif rest:
                    self.held[key] = (ctx, rest)
                for line in lines:
                    if line:
                        self._write_text(pipe, line, ctx.job_id)
            finally:
                self.writer = None

    def end(self, ctx) -> None:
        """At an async job's end: the line it left unfinished is passed on."""
        with self.lock:
            self.writer = threading.get_ident()
            try:
                for pipe in self.pipes:
                    held = self.held.pop((id(ctx), pipe.level), None)
                    if held is not None:
                        self._write_text(pipe, held[1], ctx.job_id)
            finally:
                self.writer = None

    def _write_text(self, pipe: _Pipe, line: str, job_id: str) -> None:
        if not line.isascii():   # (a flag: costs nothing) a lone surrogate is not UTF-8
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        self._write(pipe, line.rstrip("\r"), job_id)

    def _write(self, pipe: _Pipe, text: str, job_id: str | None) -> None:
        record = logging.LogRecord("elric.jobs.output", pipe.level, "", 0, text, None, None)
        if job_id is not None:
            record.job_id = job_id
        data = (self.format(record) + "\n").encode()
        try:
            while data:
                data = data[os.write(pipe.out, data):]
        except OSError:   # the worker's output is gone: nothing to tell it
            pass


class JobStream:
    """sys.stdout or sys.stderr of a pool process in json mode: what a job other than the
    sync one running (so an async one, or a thread holding a job's context) writes is
    passed on as records with its id, read from the context at each write; the rest goes
    to fd 1 or 2 as before, where JobOutput.relay reads it. All else is the stream's."""

    def __init__(self, stream, output: JobOutput, pipe: _Pipe, current: ContextVar) -> None:
        self.stream, self.output, self.pipe, self.current = stream, output, pipe, current

    def write(self, text: str) -> int:
        ctx = self.current.get()
        if ctx is None or ctx.job_id == self.output.job_id or \
                self.output.writer == threading.get_ident():
            return self.stream.write(text)
        if not isinstance(text, str):   # the message a TextIOWrapper gives
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self.output.write(self.pipe, ctx, text)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


class Hourly:
    """Log a warning once an hour per key (a job's): due at every fire or pass, it would
    flood the log, and else nothing would say so."""

    def __init__(self, log: logging.Logger) -> None:
        self.log, self._at = log, {}

    def __call__(self, key: str, message: str, *args, level: int = logging.WARNING) -> None:
        now = time.monotonic()
        if now - self._at.get(key, -math.inf) < 3600.0:
            return
        if len(self._at) >= 10_000:   # many jobs: bounded memory, more warnings
            self._at.clear()
        self._at[key] = now
        self.log.log(level, message + ". Logged once an hour per job", *args)
