"""Dedupe keys a call takes, and gives back when no job ends up holding them.

A call makes one ``Reservation`` for its specs and ``check``s it: each scope's filter says
which specs pass (their keys are now taken) and which were seen before. The call then
either queues the passed specs and ``settle``s (keys of ids that existed already go back
unless that job holds them), or fails and ``cancel``s (keys no job holds go back). Only
exact filters can give keys back; a Bloom filter keeps them.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import redis

from elric.config import Settings
from elric.contract import Status
from elric.dedupe import DedupeError, DedupeFilter
from elric.queue import Hold, RedisQueue, Submitted
from elric.retry import retry

log = logging.getLogger("elric.master")

GLOBAL_SCOPE = "global"


def _by_scope(specs) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for spec in specs:
        groups.setdefault(spec["dedupe_scope"], []).append(spec)
    return groups


class ScopeRefused(Exception):
    """A filter refused a scope (DedupeError, whose message names the scope); the keys
    this call took before are back."""

    def __init__(self, scope: str, exc: Exception) -> None:
        super().__init__(str(exc))
        self.scope = scope


@dataclass
class Reservation:
    """One call's dedupe keys. ``passed``: the specs with no key and those whose key was
    new (they hold it now; if ``check`` failed, those it took before); ``filtered``: the
    specs whose key was seen before."""

    gate: "DedupeGate"
    specs: list[dict]
    # id(spec) -> its key was new. A check again (a caller's retry) asks only the specs not
    # answered yet, since a scope asked twice would call its own keys seen
    new: dict[int, bool] = field(default_factory=dict)
    # the group whose filter call failed: its answer may be lost with the keys taken
    unsure: list[dict] = field(default_factory=list)
    # scope -> why its filter refused it (see check): its specs are neither passed nor filtered
    refused: dict[str, ScopeRefused] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for spec in self.specs:
            if spec.get("dedupe_key") is not None:
                spec.setdefault("dedupe_scope", GLOBAL_SCOPE)

    @property
    def passed(self) -> list[dict]:
        return [s for s in self.specs if s.get("dedupe_key") is None or self.new.get(id(s))]

    @property
    def filtered(self) -> list[dict]:
        return [s for s in self.specs if self.new.get(id(s)) is False]

    async def check(self, *, past_refusals: bool = False) -> None:
        """Ask each scope's filter about its keyed specs, one call per scope. A scope the
        filter refuses raises ScopeRefused, or with ``past_refusals`` goes to ``refused``."""
        mine = set()   # a retry: the keys its lost check took for these very ids are theirs
        if self.unsure:   # (a Bloom filter cannot give them back to be found new again)
            mine = {id(s) for s in await self._took(self.unsure)}
            self.unsure = []
        unanswered = (s for s in self.specs
                      if s.get("dedupe_key") is not None and id(s) not in self.new)
        # exact scopes first: a refusal or an error after them gives their keys back, but a
        # Bloom filter keeps the keys it took, and a call that fails would lose those jobs
        for scope, group in sorted(_by_scope(unanswered).items(),
                                   key=lambda g: not self.gate.filter_for(g[0]).can_release):
            try:   # each filter notes each key's taker (see ``reclaim``, ``_took``)
                verdicts = await self.gate.filter_for(scope).check_and_add(
                    scope, [s["dedupe_key"] for s in group], [s["job_id"] for s in group])
            except DedupeError as exc:
                if not past_refusals:
                    raise ScopeRefused(scope, exc) from None
                self.refused[scope] = ScopeRefused(scope, exc)
                continue
            except redis.exceptions.ResponseError:
                raise   # the script took no key: giving these back frees other jobs' keys
            except BaseException:
                self.unsure = group
                raise
            self.new.update((id(s), v or id(s) in mine) for s, v in zip(group, verdicts))

    async def reclaim(self, specs: list[dict]) -> None:
        """Filtered specs whose job does not exist: those whose key an earlier call took for
        this very id (its master died before queueing it) pass now; their key is theirs."""
        self.new.update((id(s), True) for s in await self._took(specs))

    async def settle(self, submitted: list[Submitted]) -> None:
        """After an enqueue of ``passed``: an id that existed queued nothing, so its key goes
        back unless that job holds it (a resend of the same job)."""
        existed = [spec for spec, s in zip(self.passed, submitted) if s.existed]
        await self.gate.give_back_unheld(existed)   # returns at once if none

    async def cancel(self, patience: float = 0.0) -> None:
        """After a failed call: keys of the passed (and unsure) specs whose job does not
        exist go back (the enqueue may have run, its reply lost), tried for up to
        ``patience`` s. A key maybe another job's is kept: its taker's note serves a resend."""
        deadline = time.monotonic() + patience
        try:
            took = await retry(lambda: self._took(self.unsure), log=log, deadline=deadline,
                               what="reading who took dedupe keys")
        except Exception as exc:
            log.warning("could not read who took %d dedupe key(s) (%s); keeping them",
                        len(self.unsure), exc)
            took = []
        await self.gate.give_back_unheld(self.passed + took, patience=patience)

    async def _took(self, specs: list[dict]) -> list[dict]:
        """The keyed ``specs`` whose key a check took for their very job id (the filter
        noted it as the taker), not queued since: one found seen is another job's."""
        took = []
        for scope, group in _by_scope(s for s in specs if s.get("dedupe_key") is not None).items():
            mine = await self.gate.filter_for(scope).owned(
                scope, [s["dedupe_key"] for s in group], [s["job_id"] for s in group])
            took += [s for s, m in zip(group, mine) if m]
        return took


@dataclass
class DedupeGate:
    """The master's filters, one per backend, and the scope each spec goes to."""

    settings: Settings
    filters: dict[str, DedupeFilter]
    queue: RedisQueue

    def filter_for(self, scope: str) -> DedupeFilter:
        scopes = self.settings.FILTER_SCOPES
        # a fire's scope is "{job_id}@{time}", and a job id may hold '@' itself
        backend = scopes.get(scope) or scopes.get(scope.rsplit("@", 1)[0]) \
            or scopes.get(scope.split("@", 1)[0]) or self.settings.FILTER_BACKEND
        return self.filters[backend]

    async def give_back_unheld(self, specs: list[dict], *, patience: float = 0.0) -> None:
        """Give back the keys of ``specs`` that no job holds (to exact filters; a failure is
        only logged), trying for ``patience`` seconds while Redis is away: a key left taken
        with no job filters the resend of its job, which is then lost."""
        keyed = [s for s in specs if s.get("dedupe_key") is not None]
        if not keyed:
            return
        deadline = time.monotonic() + patience
        try:
            holds = await retry(lambda: self.queue.get_holds([s["job_id"] for s in keyed]),
                                what="looking up the jobs of dedupe keys to give back",
                                log=log, deadline=deadline)
        except Exception as exc:
            log.warning("could not look up the jobs of %d dedupe key(s) (%s); keeping them",
                        len(keyed), exc)
            return
        unheld = (s for s, hold in zip(keyed, holds) if not self._holds(hold, s))
        for scope, group in _by_scope(unheld).items():
            f = self.filter_for(scope)
            if f.can_release:
                try:
                    await retry(lambda: f.release(scope, [s["dedupe_key"] for s in group]),
                                log=log, deadline=deadline,
                                what=f"giving back dedupe keys of scope {scope!r}")
                except Exception as exc:
                    log.warning("could not give back dedupe keys of scope %r: %s", scope, exc)

    async def count(self, specs: list[dict]) -> None:
        """Count ``specs`` in their filters' ``filtered``: jobs dropped as duplicates (a
        failure is only logged: the jobs are answered, the count is behind)."""
        for scope, n in Counter(spec["dedupe_scope"] for spec in specs).items():
            try:
                await self.filter_for(scope).count(scope, n)
            except Exception as exc:
                log.warning("could not count %d filtered job(s) in dedupe scope %r: %s", n,
                            scope, exc)

    def _holds(self, hold: Hold | None, spec: dict) -> bool:
        """Whether the job under a spec's id holds its key: a job with this very key and
        scope (this call made it, or it is the same job sent again), unless it failed for
        good and failed jobs give their keys back."""
        if hold is None or (hold.dedupe_key, hold.dedupe_scope) != (
                spec["dedupe_key"], spec["dedupe_scope"]):
            return False
        return not (self.settings.DEDUPE_RELEASE_ON_FAILURE and hold.status == Status.FAILED)
