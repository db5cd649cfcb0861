"""msgpack in one place: how values are packed on the wire, in Redis and between processes.

Strings are UTF-8 text and bytes are msgpack bin; maps may have integer keys (the contract
accepts them in arguments). Nothing is pickled anywhere.
"""

from __future__ import annotations

from typing import Any

import msgpack


def pack(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def pack_readable(value: Any) -> bytes:
    """``pack(value)``, or TypeError if it would not unpack: a tuple packs as an array,
    which no map key read back can be (a job recorded so could never be shown)."""
    data = pack(value)
    if not isinstance(value, (dict, list, tuple)):   # no map inside: nothing to check
        return data
    try:
        unpack(data)
    except TypeError:
        raise TypeError("a map key is an array (a tuple?); use strings or integers") from None
    return data


def nests_deeper(value: Any, most: int) -> bool:
    """Whether ``value``'s lists and maps nest more than ``most`` levels (level by level, no
    recursion; ``value`` packed already, so it holds no cycle)."""
    level = {id(value): value} if isinstance(value, _NESTS) else {}
    for _ in range(most):
        if not level:   # (most results: a scalar or a flat map, per job)
            return False
        # each container once a level: [row] * 10_000 is one row to look into, not 10,000
        level = {id(item): item for v in level.values() for item in _nested(v)}
    return bool(level)


_NESTS = (dict, list, tuple)


def _nested(value: dict | list | tuple) -> list:
    items = value.values() if isinstance(value, dict) else value
    # a long one's types first, at C speed: a list of numbers or text costs no loop here
    if len(items) > 16 and not any(issubclass(k, _NESTS) for k in set(map(type, items))):
        return []
    return [item for item in items if isinstance(item, _NESTS)]


def unpack(data: bytes | None) -> Any:
    """The value of ``data``; None for None or empty bytes (a missing Redis field)."""
    if not data:
        return None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def pack_for_lua(value: Any) -> bytes:
    """``value`` packed for a Lua script to unpack: Redis's cmsgpack predates the bin type,
    so bytes go as plain msgpack strings (Lua strings are bytes anyway)."""
    return msgpack.packb(value, use_bin_type=False)
