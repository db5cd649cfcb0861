"""Bulk pipelines of pre-encoded commands for the redis-bloom filter.

The redis-bloom filter sends tens of BITFIELD arguments per key. redis-py packs each
argument in Python and hiredis returns each bit as a Python int, which made redis-py
pipelines the master's bottleneck (the figures are in docs/DEDUPE.md). ``execute``
writes one buffer of commands already encoded as RESP (``encode``, or numpy for the
bit offsets) and reads the replies itself, BITFIELD's 0/1 arrays as numpy arrays.

Its connections are made by a redis-py client's pool, so they are set up as the
client's own (host or socket, TLS, credentials, db); they speak RESP2. A connection
problem raises redis-py's ``ConnectionError`` or ``TimeoutError`` and the connection
is dropped, never reused half-read; a command's error reply comes back in the list as
a ``ResponseError``.
"""

from __future__ import annotations

import asyncio

import numpy as np
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["BulkRedis", "encode"]


def _b(x) -> bytes:
    if isinstance(x, bytes):
        return x
    if isinstance(x, str):
        return x.encode()
    if isinstance(x, int):
        return b"%d" % x
    raise TypeError(f"cannot send {type(x).__name__} to Redis")


def encode(*args) -> bytes:
    """One command as RESP: ``*<n>`` then ``$<len>`` bulk strings."""
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        a = _b(a)
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


class _Incomplete(Exception):
    pass


_BIT_CHECK = np.frombuffer(b":0\r\n", dtype=np.uint8)


def _parse(buf: bytearray, pos: int):
    """One RESP2 reply at ``pos``: (value, next pos); raises _Incomplete.

    An array of integers that are all 0 or 1 (what BITFIELD u1 replies) comes back as
    a numpy uint8 array, read in one step from its fixed 4-byte elements."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos], bytes(buf[pos + 1:end])
    pos = end + 2
    if kind == 43:                                   # + simple string
        return line, pos
    if kind == 45:                                   # - error
        return ResponseError(line.decode("utf-8", "replace")), pos
    if kind == 95:                                   # _ null (a RESP3 client's)
        return None, pos
    if kind == 58:                                   # : integer
        return int(line), pos
    if kind == 36:                                   # $ bulk string
        n = int(line)
        if n < 0:
            return None, pos
        if len(buf) < pos + n + 2:
            raise _Incomplete
        return bytes(buf[pos:pos + n]), pos + n + 2
    if kind == 42:                                   # * array
        n = int(line)
        if n < 0:
            return None, pos
        if n and pos >= len(buf):
            raise _Incomplete
        if n and buf[pos] == 58:
            have = min(n, (len(buf) - pos) // 4)          # whole 4-byte cells so far
            # (a copy: a view would pin ``buf``, which must still grow and shrink)
            cells = np.frombuffer(buf[pos:pos + 4 * have], dtype=np.uint8).reshape(have, 4)
            digits = cells[:, 1] - 48
            if (cells[:, [0, 2, 3]] == _BIT_CHECK[[0, 2, 3]]).all() and (digits <= 1).all():
                if have == n:
                    return digits, pos + 4 * n
                tail = bytes(buf[pos + 4 * have:pos + 4 * have + 3])
                if (b":0\r".startswith(tail) or b":1\r".startswith(tail)) \
                        and len(buf) < pos + 4 * n:
                    raise _Incomplete                     # a 0/1 array still arriving
            # not (only) 0/1 integers: element by element below
        out = []
        for _ in range(n):
            value, pos = _parse(buf, pos)
            out.append(value)
        return out, pos
    raise RedisConnectionError(f"Redis sent a reply this client cannot read: {kind!r}")


class BulkRedis:
    """``execute(buffer, n_replies)`` on connections made as a ``redis.asyncio.Redis``
    client's pool makes them, kept here (taking one from that pool per call costs more
    CPU than the call's own I/O)."""

    def __init__(self, client, *, timeout: float = 30.0, max_idle: int = 8) -> None:
        self.client = client
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list = []
        self.round_trips = 0   # buffers sent: what "O(1) round trips per call" counts

    async def execute(self, buf: bytes, n_replies: int) -> list:
        """Send ``buf`` (``n_replies`` encoded commands) and return their replies."""
        conn = self._idle.pop() if self._idle else self.client.connection_pool.make_connection()
        try:
            if not conn.is_connected:
                await conn.connect()
            await conn.send_packed_command(buf, check_health=False)
            self.round_trips += 1
            replies = await self._read(conn._reader, n_replies)
        except BaseException:
            await conn.disconnect()    # (cancelled half-way too: replies would be left)
            raise
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            await conn.disconnect()
        return replies

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.disconnect()

    async def _read(self, reader: asyncio.StreamReader, n: int) -> list:
        out: list = []
        data, pos = bytearray(), 0
        try:
            while len(out) < n:
                try:
                    value, pos = _parse(data, pos)
                    out.append(value)
                except _Incomplete:
                    chunk = await asyncio.wait_for(reader.read(1 << 20), self.timeout)
                    if not chunk:
                        raise RedisConnectionError("Redis closed the connection") from None
                    if pos:
                        del data[:pos]
                        pos = 0
                    data += chunk
        except asyncio.TimeoutError:
            raise RedisTimeoutError(f"no reply from Redis within {self.timeout}s") from None
        except OSError as exc:
            raise RedisConnectionError(f"Redis connection lost: {exc}") from None
        if pos != len(data):
            raise RedisConnectionError("Redis sent more replies than were asked for")
        return out
