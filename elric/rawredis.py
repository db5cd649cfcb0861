"""Bulk pipelines of pre-encoded commands on connections of our own.

The redis-bloom filter sends tens of BITFIELD arguments per key. redis-py packs each
argument in Python and hiredis returns each bit as a Python int, which made redis-py
pipelines the master's bottleneck (the figures are in docs/DEDUPE.md). ``execute``
writes one buffer of commands already encoded as RESP (``encode``, or numpy for the
bit offsets) and reads the replies itself, BITFIELD's 0/1 arrays as numpy arrays.

It speaks RESP2 to where a redis-py client or URL points (TCP, TLS, unix socket; user,
password or credential provider; db). A connection problem raises redis-py's
``ConnectionError`` or ``TimeoutError`` and drops the connection, never reused
half-read; a command's error reply comes back in the list as a ``ResponseError``.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl

import numpy as np
from redis.asyncio.connection import parse_url
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


def _tls_context(opts: dict) -> _ssl.SSLContext | None:
    """The SSLContext redis-py itself would use for these connection settings (CA file
    or data, client certificate, verification, hostname check, minimum version,
    ciphers), or None without TLS. Built by redis-py's own asyncio SSLConnection, which
    connects only when asked to: a client's TLS settings hold for our connections too."""
    cls = opts.get("connection_class")
    if cls is None or "SSL" not in cls.__name__:
        return None
    holder = getattr(cls(**{k: v for k, v in opts.items() if k != "connection_class"}),
                     "ssl_context", None)
    if holder is None:
        raise RedisConnectionError(f"cannot take the TLS settings of {cls.__qualname__}")
    return holder.get()


class _Conn:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # pragma: no cover - already broken
            pass


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
    """A small pool of raw connections for ``execute(buffer, n_replies)``."""

    def __init__(self, url: str | None = None, *, opts: dict | None = None,
                 timeout: float = 30.0, max_idle: int = 8) -> None:
        self.opts = dict(opts) if opts is not None else parse_url(url)
        self.timeout = timeout
        self.max_idle = max_idle
        self._idle: list[_Conn] = []
        self._tls: _ssl.SSLContext | None = None   # built once, on the first connection
        self.round_trips = 0   # buffers sent: what "O(1) round trips per call" counts

    @classmethod
    def from_client(cls, client, **kw) -> "BulkRedis":
        """Connect where a ``redis.asyncio.Redis`` client connects (same host or
        socket, TLS, user, password or credential provider, db)."""
        pool = client.connection_pool
        opts = dict(pool.connection_kwargs)
        opts["connection_class"] = pool.connection_class
        return cls(opts=opts, **kw)

    async def _connect(self) -> _Conn:
        o = self.opts
        try:
            if "path" in o:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(o["path"]), self.timeout)
            else:
                if self._tls is None:
                    self._tls = _tls_context(o)
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    o.get("host", "localhost"), int(o.get("port", 6379)), ssl=self._tls),
                    self.timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise RedisConnectionError(f"cannot connect to Redis: {exc}") from None
        conn = _Conn(reader, writer)
        hello = []
        provider = o.get("credential_provider")
        if provider is not None:   # as redis-py does: (password,), (user, pw), or nothing
            try:
                get_async = getattr(provider, "get_credentials_async", None)  # redis-py >= 5.3
                creds = await get_async() if get_async else provider.get_credentials()
            except BaseException as exc:
                conn.close()
                if not isinstance(exc, Exception):
                    raise                                # cancelled: closed, not leaked
                raise RedisConnectionError(f"the credential provider failed: {exc}") from None
            if creds:
                hello.append(encode("AUTH", *creds))
        elif o.get("password") is not None:
            hello.append(encode("AUTH", o["username"], o["password"]) if o.get("username")
                         else encode("AUTH", o["password"]))
        if int(o.get("db", 0) or 0):
            hello.append(encode("SELECT", int(o["db"])))
        if hello:
            for reply in await self._exchange(conn, b"".join(hello), len(hello)):
                if isinstance(reply, ResponseError):
                    conn.close()
                    raise RedisConnectionError(f"Redis refused the connection setup: {reply}")
        return conn

    async def _exchange(self, conn: _Conn, buf: bytes, n: int) -> list:
        try:
            conn.writer.write(buf)
            out: list = []
            data, pos = bytearray(), 0
            read = conn.reader.read
            while len(out) < n:
                try:
                    value, pos = _parse(data, pos)
                    out.append(value)
                except _Incomplete:
                    chunk = await asyncio.wait_for(read(1 << 20), self.timeout)
                    if not chunk:
                        raise RedisConnectionError("Redis closed the connection") from None
                    if pos:
                        del data[:pos]
                        pos = 0
                    data += chunk
            if pos != len(data):
                raise RedisConnectionError("Redis sent more replies than were asked for")
            return out
        except asyncio.TimeoutError:
            conn.close()
            raise RedisTimeoutError(f"no reply from Redis within {self.timeout}s") from None
        except (OSError, RedisConnectionError) as exc:
            conn.close()
            raise RedisConnectionError(f"Redis connection lost: {exc}") from None
        except BaseException:
            conn.close()   # e.g. cancelled half-way: replies would be read by the next user
            raise

    async def execute(self, buf: bytes, n_replies: int) -> list:
        """Send ``buf`` (``n_replies`` encoded commands) and return their replies."""
        conn = self._idle.pop() if self._idle else await self._connect()
        self.round_trips += 1
        replies = await self._exchange(conn, buf, n_replies)
        if len(self._idle) < self.max_idle:
            self._idle.append(conn)
        else:
            conn.close()
        return replies

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
