"""How elric's processes log: text for people, or LOG_FORMAT = "json" for log collectors;
the same in a worker's pool processes, so a worker's log has one format."""

from __future__ import annotations

import json
import logging


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
