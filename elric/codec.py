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


def unpack(data: bytes | None) -> Any:
    """The value of ``data``; None for None or empty bytes (a missing Redis field)."""
    if not data:
        return None
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def pack_for_lua(value: Any) -> bytes:
    """``value`` packed for a Lua script to unpack: Redis's cmsgpack predates the bin type,
    so bytes go as plain msgpack strings (Lua strings are bytes anyway)."""
    return msgpack.packb(value, use_bin_type=False)
