"""Statistics per func and per batch, and throughput per minute, as stats() reports them.

The scripts keep counters and a duration histogram per func and batch, and counts per
minute. The bucket bounds live only here: the queue tells finish.lua each duration's bucket.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from dataclasses import dataclass
from itertools import accumulate

# Upper bounds (ms, inclusive) of the duration histogram's buckets; one more holds the rest
BOUNDS_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 30000, 60000,
             300000)
BUCKETS = tuple(f"le:{b}" for b in BOUNDS_MS) + ("le:inf",)   # hash field per bucket
MINUTE_TTL = 86400      # a day of per-minute throughput is kept
THROUGHPUT_MINUTES = 60  # how many minutes stats() reports

# The counters of a stats hash, named after the status a job reached (as in the batch hash)
COUNTERS = ("submitted", "succeeded", "failed", "retrying", "cancelled", "removed")


def bucket(duration_ms: int) -> str:
    """The histogram field a duration counts in."""
    return BUCKETS[bisect_left(BOUNDS_MS, duration_ms)]


def ms_to_s(value: bytes | None) -> float | None:
    """A time Redis holds in ms ("" or missing: none), in seconds."""
    return None if not value else int(value) / 1000.0


@dataclass(slots=True)
class JobStats:
    """One func's or batch's stats hash, decoded."""

    counters: dict[str, int]
    duration_ms: int          # summed over every recorded attempt
    histogram: list[int]      # attempts per bucket of BUCKETS
    first_at: float | None    # epoch s: its first job submitted
    last_at: float | None     # epoch s: a job of it last submitted or recorded

    @classmethod
    def from_hash(cls, h: dict[bytes, bytes]) -> JobStats:
        counters = {name.decode(): int(value) for name, value in h.items()
                    if name.decode() in COUNTERS}
        return cls(counters, int(h.get(b"duration_ms", 0)),
                   [int(h.get(name.encode(), 0)) for name in BUCKETS],
                   ms_to_s(h.get(b"first_at")), ms_to_s(h.get(b"last_at")))

    @property
    def live(self) -> int:
        """Submitted and not yet ended (never below 0: counts from before a reset)."""
        ended = ("succeeded", "failed", "cancelled", "removed")
        return max(0, self.counters.get("submitted", 0)
                   - sum(self.counters.get(name, 0) for name in ended))

    @property
    def mean_ms(self) -> float | None:
        n = sum(self.histogram)
        return self.duration_ms / n if n else None

    @property
    def p95_ms(self) -> float | None:
        """The upper bound of the bucket holding the 95th percentile (inf: the last one)."""
        n = sum(self.histogram)
        if not n:
            return None
        at = bisect_left(list(accumulate(self.histogram)), math.ceil(0.95 * n))
        return (*BOUNDS_MS, math.inf)[at]

    def summary(self, running: int) -> dict:
        """``running``: how many of its jobs run now; the rest of the live ones wait (queued,
        or retrying after a backoff)."""
        return {"live": self.live, "running": running, "waiting": max(0, self.live - running),
                "mean_ms": self.mean_ms, "p95_ms": self.p95_ms,
                "first_at": self.first_at, "last_at": self.last_at}

    def func_view(self, running: int) -> dict:
        """A func's row in stats(): every counter (retrying as "retried"), the summary."""
        counters = {("retried" if name == "retrying" else name): self.counters.get(name, 0)
                    for name in COUNTERS}
        return {**counters, **self.summary(running), "duration_ms": self.duration_ms,
                "histogram": self.histogram}

    def batch_view(self, running: int) -> dict:
        """A batch's row in stats(): the counters it has, then the summary."""
        return {**self.counters, **self.summary(running)}


def throughput_row(minute: int, h: dict[bytes, bytes]) -> dict:
    """One minute's counts (``minute``: epoch minutes) as stats() reports them."""
    return {"minute": minute * 60, "succeeded": int(h.get(b"succeeded", 0)),
            "failed": int(h.get(b"failed", 0)), "retried": int(h.get(b"retrying", 0))}
