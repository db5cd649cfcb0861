"""Delays between tries, for the retrying loops of masters, workers and clients alike.

A module of its own, not in ``elric.retry``: the client and the CLI use it without redis-py."""

from __future__ import annotations


class Backoff:
    """Delays that double from ``first`` up to ``most``; ``reset()`` after a success."""

    def __init__(self, first: float = 0.1, most: float = 5.0) -> None:
        self.first, self.most = first, most
        self.delay = first

    def reset(self) -> None:
        self.delay = self.first

    def next(self) -> float:
        delay, self.delay = self.delay, min(self.delay * 2, self.most)
        return delay
