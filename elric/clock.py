"""Redis's clock, the only one elric trusts: machines' clocks disagree (a VM after a
suspend, a host without NTP), and a lease or a due time judged by two clocks breaks."""

from __future__ import annotations

import time

# Between syncs Redis's time goes on by a clock no NTP step moves; BOOTTIME counts a suspend
# too (Linux), elsewhere monotonic.
_CLOCK = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


def ticks() -> float:
    """Seconds on a clock no NTP step moves (this machine's): for ages, never for dates."""
    return time.clock_gettime(_CLOCK)


async def redis_now(redis) -> float:
    """Redis's clock (TIME), in seconds."""
    seconds, micros = await redis.time()
    return seconds + micros / 1e6


class RedisClock:
    """Redis's clock for code that reads the time often: Redis's time at the last ``sync``
    plus the time elapsed since on a clock that does not step."""

    def __init__(self, redis) -> None:
        self.redis = redis
        self._base, self._at = time.time(), ticks()   # this machine's, until a sync

    async def sync(self) -> float:
        """Read Redis's time again; returns the time now."""
        before = ticks()
        now = await redis_now(self.redis)
        self._base, self._at = now, (before + ticks()) / 2
        return now

    def __call__(self) -> float:
        return self._base + (ticks() - self._at)
