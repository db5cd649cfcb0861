"""How elric's processes log: text for people, or LOG_FORMAT = "json" for log collectors;
the same in a worker's pool processes, so a worker's log has one format."""

from __future__ import annotations

import json
import logging
import math
import time


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


def configure(level: str, log_format: str, name: str = "%(name)s") -> None:
    """Log at ``level`` (a name) to stderr; ``name``: how a text line names its logger."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLines() if log_format == "json" else logging.Formatter(
        f"%(asctime)s %(levelname)s {name}: %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        handlers=[handler])


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
