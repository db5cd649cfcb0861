"""Every Lua script elric runs, one ``.lua`` file per operation in this folder.

Each file starts with a header naming its KEYS, its ARGV, what it returns and the invariant
it keeps. Key names come from ``elric.keys``: a script gets whole keys in KEYS and key
prefixes in ARGV, and only appends an id it read to a prefix it was given.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from redis.exceptions import ResponseError

from elric.config import SettingsError
from elric.retry import is_outage


@cache
def source(name: str) -> str:
    """The text of ``elric/lua/<name>.lua``."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def load(redis, name: str, *functions: str):
    """The script ``name`` registered on a redis-py client (sent by EVALSHA, loaded once),
    with the files named in ``functions`` (shared Lua functions) put before it."""
    return redis.register_script("".join(source(f) for f in (*functions, name)))


# The oldest Redis the scripts run on: fetch.lua's ZADD LT came in 6.2.
MIN_REDIS = (6, 2)


async def require_redis(redis, url: str) -> str:
    """Refuse a Redis too old for the scripts, naming it: on 6.0 they would fail with a
    syntax error in the middle of a job's life, not at start. A Redis whose INFO is renamed
    away is not refused. Returns its maxmemory-policy ("noeviction" if INFO does not say)."""
    try:
        info = await redis.info()
    except ResponseError as exc:
        if is_outage(exc):   # refusing for now (loading, busy): the caller waits
            raise
        return "noeviction"
    version = str(info.get("redis_version", ""))
    got = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if len(got) == 2 and got < MIN_REDIS:
        raise SettingsError(f"REDIS_URL {url}: Redis {version} is too old; elric needs Redis "
                            f"{'.'.join(map(str, MIN_REDIS))} or later")
    return str(info.get("maxmemory_policy", "noeviction"))
