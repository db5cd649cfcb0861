"""What each background task of a process is doing, and when it last got something done:
the ``health`` RPC shows it, so a process that answers ``ping`` but does no work is seen."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass
class TaskHealth:
    """One background task: its state in a few words, and its last progress (epoch s)."""

    stale_after: float              # seconds without progress before it counts as stuck
    state: str = "starting"
    progress_at: float | None = None
    in_trouble: bool = False        # retrying after an error (Redis away): not ok till it passes

    def progress(self, state: str) -> None:
        self.state, self.progress_at, self.in_trouble = state, time.time(), False

    def trouble(self, state: str) -> None:
        """Something went wrong and the task is retrying: no progress."""
        self.state, self.in_trouble = state, True

    def view(self, running: bool) -> dict:
        ok = running and not self.in_trouble and self.progress_at is not None and \
            time.time() - self.progress_at <= self.stale_after
        return {"state": self.state if running else "ended", "progress_at": self.progress_at,
                "ok": ok}
