"""Housekeeping: what keeps jobs moving while no one submits anything (its steps:
``pass_once``). Every master runs it: each step is an atomic script."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math

from redis.exceptions import ResponseError

from elric import limits
from elric.backoff import Backoff
from elric.clock import redis_now
from elric.health import TaskHealth
from elric.queue import DUE_STEP, RedisQueue
from elric.reservation import DedupeGate
from elric.retry import Outage, cancel_pending, described, each, is_outage

log = logging.getLogger("elric.master")

# A gap in Redis time between two redelivery passes (Redis away, stalled, its clock jumped)
# past which no lease runs out for a while: workers' heartbeats renew theirs first.
REDELIVER_GAP = 3.0
REDELIVER_HOLD = 2.0
NAMED = 20   # job ids a log line names


class Housekeeping:
    def __init__(self, queue: RedisQueue, gate: DedupeGate, redis, keys,
                 round_ttl: float, rules: dict[str, limits.Rule]) -> None:
        self.queue, self.gate, self.redis, self.keys = queue, gate, redis, keys
        self.round_ttl, self.rules = round_ttl, rules
        self.health = TaskHealth(stale_after=30)   # a pass at least once a second
        self._redelivered_at = -math.inf   # Redis time of the last redelivery pass
        self._hold_until = 0.0
        self._saw_data = False   # whether data_since was there: its loss is then Redis's
        self._epoch = 0          # the data_epoch this master last wrote: Redis stays above it
        self._backlog = False    # the last pass's promote handled a full step: more are due

    async def run(self) -> None:
        """Until cancelled; any error is logged and retried, never the end of the loop."""
        backoff, outage = Backoff(0.5, 5.0), Outage(log, "housekeeping failed")
        while not cancel_pending():
            try:
                await self.pass_once()
                self.health.progress("redelivering, promoting retries")
                backoff.reset()
                due = await self.queue.next_delayed()
                outage.passed()   # after all it asks Redis: else a failing step logs each pass
                await asyncio.sleep(self._pause(due))
            except Exception as exc:   # Redis away or refusing, a bug: never stop
                self.health.trouble(f"{described(exc)}; retrying")
                outage.failed(exc)
                # a step refused for its own key (not Redis away) still passes once a
                # second: a longer wait would read as a gap and hold redelivery for good
                await asyncio.sleep(backoff.next() if is_outage(exc) else 1.0)
        raise asyncio.CancelledError

    def _pause(self, due: float | None) -> float:
        """Seconds till the next retry is due, at most 1. One due now with no backlog is one
        promote cannot queue (a key of another type): waiting 0 s for it would spin."""
        if due is None or (due == 0 and not self._backlog):
            return 1.0
        return min(1.0, due)

    async def _promote(self) -> None:
        # judged on entries handled, not queued: a full step with one cancelled is a backlog
        _, handled = await self.queue.promote()
        self._backlog = handled >= DUE_STEP

    async def pass_once(self) -> None:
        """Each step even if one before failed for a key of another type (an operator's
        WRONGTYPE): one such key must not stop redelivery, retries or LIMITS. Redis away
        ends the pass."""
        await each((self._redeliver, self._promote, self._drop_old_rounds,
                    self._restore_limits, self.queue.forget_old_workers,
                    self.queue.forget_old_names, self._check_data), lambda step: step())

    async def _check_data(self) -> None:
        """Say it when Redis lost its data (nothing else does) or went back to older data
        (data_since is there, but data_epoch below this master's last write)."""
        if await self.redis.exists(self.keys.data_since):
            self._saw_data = True
            with contextlib.suppress(ResponseError):   # a full Redis: next pass
                epoch, last = await self.redis.incr(self.keys.data_epoch), self._epoch
                self._epoch = epoch
                if epoch <= last:
                    log.error("Redis went back to older data (restarted from an older RDB "
                              "snapshot or AOF, or a replica behind was promoted): what elric "
                              "wrote since is gone; jobs accepted then are lost, and jobs "
                              "ended then may run again; only appendonly yes with appendfsync "
                              "always keeps every write through a Redis crash")
            return
        self._epoch = 0   # gone with the rest: said below, not again as older data
        # a full Redis refuses the SET: tried again next pass, as an outage here would hold
        # redelivery back (see REDELIVER_GAP)
        with contextlib.suppress(ResponseError):
            if await self.redis.set(self.keys.data_since,
                                    int(await redis_now(self.redis) * 1000), nx=True) \
                    and self._saw_data:
                log.error("Redis lost elric's data (restarted without persistence, flushed, or "
                          "its keys evicted): jobs, results and periodic jobs from before are "
                          "gone; run Redis with appendonly yes and maxmemory-policy noeviction")
            self._saw_data = True

    async def _redeliver(self) -> None:
        now = await redis_now(self.redis)
        # (at start too); a step back as well, else a hold set before it would last as long.
        # The leases that ran out meanwhile are also live workers': their jobs would run twice
        if abs(now - self._redelivered_at) > REDELIVER_GAP:
            self._hold_until = now + REDELIVER_HOLD
        self._redelivered_at = now
        if now < self._hold_until:
            return
        recovered, cancelled, failed = await self.queue.recover()
        if recovered:   # named, as a job run again after its worker died is asked about
            log.warning("redelivered %d job(s) whose worker stopped renewing its lease: %s%s",
                        len(recovered), ", ".join(recovered[:NAMED]),
                        f" and {len(recovered) - NAMED} more" if len(recovered) > NAMED else "")
        if cancelled:
            log.warning("cancelled %d job(s) whose worker stopped renewing its lease while "
                        "they were being cancelled: %s", len(cancelled), ", ".join(cancelled))
        if failed:   # each took down a worker more than the cap allows: one may be next
            log.error("failed %d job(s), not redelivered: the worker holding them was lost "
                      "more than MAX_REDELIVERIES (%s) times (does one kill or stall its "
                      "worker?): %s; `elric job ID` says more, `elric rerun ID` runs one "
                      "again", len(failed), self.queue.max_redeliveries, ", ".join(failed))

    async def _restore_limits(self) -> None:
        if await limits.restore(self.redis, self.keys, self.rules):
            log.warning("LIMITS were gone from Redis or overwritten (restarted without "
                        "persistence? flushed?): published again")

    async def _drop_old_rounds(self) -> None:
        cutoff = (await redis_now(self.redis) - self.round_ttl) * 1000
        old = await self.redis.zrangebyscore(self.keys.dedupe_rounds, "-inf", cutoff,
                                             start=0, num=100)

        async def drop(raw: bytes) -> None:
            scope = raw.decode()
            await self.gate.filter_for(scope).drop_scope(scope)
            await self.redis.zrem(self.keys.dedupe_rounds, raw)
        await each(old, drop)   # one round's key of another type must not keep the others
