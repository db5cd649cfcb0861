"""Every Lua script elric runs, one ``.lua`` file per operation in this folder.

Each file starts with a header naming its KEYS, its ARGV, what it returns and the invariant
it keeps. Key names come from ``elric.keys``: a script gets whole keys in KEYS and key
prefixes in ARGV, and only appends an id it read to a prefix it was given.
"""

from __future__ import annotations

from functools import cache
from importlib import resources


@cache
def source(name: str) -> str:
    """The text of ``elric/lua/<name>.lua``."""
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")


def load(redis, name: str, *functions: str):
    """The script ``name`` registered on a redis-py client (sent by EVALSHA, loaded once),
    with the files named in ``functions`` (shared Lua functions) put before it."""
    return redis.register_script("".join(source(f) for f in (*functions, name)))
