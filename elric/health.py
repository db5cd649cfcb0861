"""What each background task of a process is doing, and when it last got something done:
the ``health`` RPC shows it, so a process that answers ``ping`` but does no work is seen."""

from __future__ import annotations

from dataclasses import dataclass

from elric.clock import ticks


@dataclass
class TaskHealth:
    """One background task: its state in a few words, and its last progress."""

    stale_after: float              # seconds without progress before it counts as stuck
    state: str = "starting"
    # ticks() at its last progress: a wall-clock step (NTP) makes it look neither stuck nor fine
    progress_ticks: float | None = None
    in_trouble: bool = False        # retrying after an error (Redis away): not ok till it passes

    def progress(self, state: str) -> None:
        self.state, self.progress_ticks, self.in_trouble = state, ticks(), False

    def trouble(self, state: str) -> None:
        """Something went wrong and the task is retrying: no progress."""
        self.state, self.in_trouble = state, True

    def view(self, running: bool, now: float) -> dict:
        """Its state; ``progress_at`` on the clock ``now`` is read by (Redis's), in epoch s."""
        age = None if self.progress_ticks is None else ticks() - self.progress_ticks
        ok = running and not self.in_trouble and age is not None and age <= self.stale_after
        return {"state": self.state if running else "ended",
                "progress_at": None if age is None else now - age, "ok": ok}
