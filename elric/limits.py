"""Per-key limits (a crawler's politeness per host): how many jobs of one limit key run at
once across all workers, and how often one may start. A master publishes the ``LIMITS``
setting's rules to Redis (again whenever Redis lost them); fetch.lua enforces them:

    LIMITS = {"*": {"concurrency": 8},                        # every key without its own
              "example.com": {"concurrency": 2, "rate": 5}}   # 2 at once, 5 starts/s

Give ``interval`` (seconds between starts) or ``rate`` (starts per second), not both. A
job's own ``limit_interval`` (a robots.txt Crawl-delay) lengthens its key's, ruled or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from elric.config import SettingsError
from elric.contract import MAX_LIMIT_KEY, MAX_TIMEOUT, is_text

RULE_NAMES = ("concurrency", "interval", "rate")


@dataclass(frozen=True, slots=True)
class Rule:
    concurrency: int | None = None   # jobs of the key running their code at once
    interval_ms: int | None = None   # least time between two starts

    def encoded(self) -> str:
        """As fetch.lua reads it: "concurrency,interval_ms", either may be empty."""
        return ",".join("" if v is None else str(v) for v in (self.concurrency, self.interval_ms))


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 \
        and value != float("inf")


def parse_rules(value: Any, where: str = "LIMITS") -> dict[str, Rule]:
    """The rules of a LIMITS setting, or a SettingsError naming what is wrong."""
    if not isinstance(value, dict):
        raise SettingsError(f"{where}: expected a map of limit key to rule, got {value!r}")
    rules = {}
    for key, rule in value.items():
        name = f"{where}[{key!r}]"
        if not isinstance(key, str) or not key:
            raise SettingsError(f"{where}: limit key {key!r} must be a non-empty string")
        # (a job's limit_key is checked so: a key it cannot be would limit nothing, unsaid)
        if len(key) > MAX_LIMIT_KEY:
            raise SettingsError(f"{where}: limit key {key[:20]!r}... is {len(key)} characters, "
                                f"and a job's limit_key has at most {MAX_LIMIT_KEY}: no job "
                                "could match it; shorten it")
        if not is_text(key):
            raise SettingsError(f"{name}: the limit key is not UTF-8 text, as a job's "
                                "limit_key is: no job could match it; give it in UTF-8")
        if not isinstance(rule, dict) or not rule:
            raise SettingsError(f"{name}: expected a map such as {{'concurrency': 2, "
                                f"'rate': 5}}, got {rule!r}")
        unknown = sorted(str(k) for k in rule if k not in RULE_NAMES)
        if unknown:
            raise SettingsError(f"{name}: unknown {', '.join(unknown)} (known: "
                                f"{', '.join(RULE_NAMES)})")
        for k, v in rule.items():
            if not _positive(v):
                raise SettingsError(f"{name}: {k} must be a positive number, got {v!r}")
        if "interval" in rule and "rate" in rule:
            raise SettingsError(f"{name}: give interval (seconds between starts) or rate "
                                "(starts per second), not both")
        concurrency = rule.get("concurrency")
        if concurrency is not None and not isinstance(concurrency, int):
            raise SettingsError(f"{name}: concurrency must be a whole number, got "
                                f"{concurrency!r}")
        seconds = rule.get("interval") or (1.0 / rule["rate"] if "rate" in rule else None)
        if seconds is not None and seconds > MAX_TIMEOUT:   # a job's limit_interval's bound
            raise SettingsError(f"{name}: at most {MAX_TIMEOUT} seconds between starts, "
                                f"got {seconds:g}")
        rules[key] = Rule(concurrency, None if seconds is None else max(1, round(seconds * 1000)))
    return rules


async def publish(redis, keys, rules: dict[str, Rule]) -> None:
    """Make ``rules`` the ones every fetch enforces (a master does this when it starts)."""
    async with redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.limits)
        if rules:
            pipe.hset(keys.limits, mapping={k: r.encoded() for k, r in rules.items()})
        # parked jobs wait for a time the old rules set: every key is looked at again now
        pipe.zunionstore(keys.limits_due, {keys.limits_due: 0})
        await pipe.execute()


async def restore(redis, keys, rules: dict[str, Rule]) -> bool:
    """Publish ``rules`` again if Redis lost them (or holds a key of another type there,
    which fails every fetch): else no host is limited until a master restarts. True if so."""
    kind = await redis.type(keys.limits)
    if kind == b"hash" or kind == b"none" and not rules:
        return False
    await publish(redis, keys, rules)
    return True
