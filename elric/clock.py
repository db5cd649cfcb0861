"""Redis's clock, the only one elric trusts: machines' clocks disagree (a VM after a
suspend, a host without NTP), and a lease or a due time judged by two clocks breaks."""

from __future__ import annotations

import time


async def redis_now(redis) -> float:
    """Redis's clock (TIME), in seconds."""
    seconds, micros = await redis.time()
    return seconds + micros / 1e6


class RedisClock:
    """Redis's clock for code that reads the time often: this machine's clock plus the
    offset measured by the last ``sync``."""

    def __init__(self, redis) -> None:
        self.redis, self.offset = redis, 0.0

    async def sync(self) -> float:
        """Measure the offset again; returns the time now."""
        before = time.time()
        now = await redis_now(self.redis)
        self.offset = now - (before + time.time()) / 2
        return now

    def __call__(self) -> float:
        return time.time() + self.offset
