"""MessagePack-RPC between the elric master and its callers: an asyncio server, an
asyncio client and a blocking client, on the ``msgpack`` package alone.

docs/PROTOCOL.md describes the wire format, auth and the error codes. Bad input never
takes the server down: the peer gets an error answer when its msgid is known, else its
connection is closed.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import inspect
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import Any, Callable

import msgpack

from elric.contract import ErrorCode

log = logging.getLogger("elric.rpc")

REQUEST, RESPONSE, NOTIFY = 0, 1, 2
MAX_MESSAGE = 8 * 1024 * 1024
MAX_CONNECTIONS = 1024
IDLE_TIMEOUT = 300.0
AUTH_TIMEOUT = 10.0   # seconds a connection has to authenticate, where a token is needed
MAX_PENDING = 128
HELD_MESSAGES = 4   # max_message of requests a server holds at once (and about one more)
_CHUNK = 64 * 1024
_UNANSWERED = object()   # a call_many slot no answer has filled (an answer may be nil)
LINGER = 30.0   # seconds a connection refused for a too-big request reads on, discarding
# what a client without this master's token is told: what to set, not only "no"
AUTH_REQUIRED = ("authentication required: this master has an RPC_TOKEN; give the client "
                 "the same (RPC_TOKEN in its settings, or ELRIC_RPC_TOKEN)")
AUTH_FAILED = "authentication failed: the client's RPC_TOKEN is not this master's"


class RequestError(Exception):
    """Raised by a handler: the caller receives its code and message as they are."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code


class RPCError(Exception):
    """Base of the errors the clients raise."""


class RemoteError(RPCError):
    """The server answered with an error: ``code`` (an ErrorCode, or None from a server
    that sends bare strings) and ``str(e)``, its message; with ``too_large``,
    ``max_message`` is the server's limit (else None)."""

    def __init__(self, error: Any) -> None:
        code, limit = None, None
        if isinstance(error, dict):
            limit = error.get("max_message")
            code, error = error.get("code"), error.get("message", error)
        self.max_message = limit if type(limit) is int and limit > 0 else None
        if isinstance(error, bytes):
            error = error.decode("utf-8", "replace")
        super().__init__(error if isinstance(error, str) else repr(error))
        known = isinstance(code, str) and code in ErrorCode._value2member_map_
        self.code = ErrorCode(code) if known else code   # (a list would not even hash)


class RPCConnectionError(RPCError):
    """The connection could not be made or broke; the call's outcome is unknown.
    ``answered``: of a ``call_many``, the calls (by index) answered before it broke."""

    answered: dict[int, Any] = {}


class RPCUnreachableError(RPCConnectionError):
    """No connection could be made: nothing was sent."""


class RPCTimeoutError(RPCConnectionError):
    """No answer in time; as with a broken connection, the call may have run."""


class RPCArgumentError(RPCError, TypeError):
    """Arguments msgpack cannot carry (an integer over 64 bits): nothing was sent. An
    RPCError, so that ``elric`` says it in a line (exit 2), and a TypeError for callers."""


def parse_address(address: str) -> tuple[str, int]:
    """``"host:port"`` (``"[::1]:port"`` for IPv6) -> ``(host, port)``."""
    host, sep, port = str(address).strip().rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not (port.isascii() and port.isdigit()) or int(port) > 65535:
        raise ValueError(f"bad address {address!r}: expected host:port with a port 0-65535")
    return host, int(port)


def _error(code: ErrorCode, message: str) -> dict:
    return {"code": code, "message": message}


def _pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogateescape")


def packed_size(obj: Any) -> int:
    """The bytes ``obj`` takes in a message: what a reply that must fit can hold."""
    return len(_pack(obj))


class _ProtocolError(Exception):
    """Input that is no msgpack-rpc; ``msgid`` is the request's when its start told it, and
    ``answer`` the error a server sends it then, before it closes the connection."""

    def __init__(self, message: str, msgid: int | None = None) -> None:
        super().__init__(message)
        self.msgid = msgid
        self.answer = _error(ErrorCode.BAD_REQUEST, f"request refused, {message}; the master "
                             "closes this connection")


class _TooLarge(_ProtocolError):
    """A message over the size limit; ``size`` says how big ("of 9000 bytes"). Its answer
    names the limit, so the caller can send less rather than send it again."""

    def __init__(self, size: str, limit: int, msgid: int | None) -> None:
        super().__init__(f"message {size}, limit {limit}", msgid)
        self.answer = {**_error(ErrorCode.TOO_LARGE, f"request {size}: over this master's "
                                f"limit of {limit} bytes (RPC_MAX_MESSAGE); send less per call"),
                       "max_message": limit}


_HEAD = 16   # bytes enough to hold a request's array header, type and msgid


def _request_msgid(head: bytes) -> int | None:
    """The msgid of a request from its first bytes; None if they are no request's start."""
    unpacker = msgpack.Unpacker()
    unpacker.feed(head)
    try:
        if unpacker.read_array_header() != 4 or unpacker.unpack() != REQUEST:
            return None
        msgid = unpacker.unpack()
    except Exception:
        return None
    return msgid if type(msgid) is int and 0 <= msgid <= 0xFFFFFFFF else None


class _Containers:
    """The unpacker's hook counting a message's arrays and maps (a byte each on the wire,
    far more decoded). Not a _Decoder method: that cycle only a rare full gc would free."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def __call__(self, container):
        self.left -= 1
        if self.left < 0:
            raise ValueError(f"over {self.limit} arrays and maps in one message; "
                             "send fewer per call")
        return container


class _Decoder:
    """Streaming unpacker with a size limit per message. Unpacker.tell() is only exact
    after a complete message, so the one in progress is measured from the last one's end.
    ``containers``: the arrays and maps a message may hold; None: no limit."""

    def __init__(self, max_message: int, containers: int | None = None):
        self.max = max_message
        self.chunk = min(_CHUNK, max_message)
        self._count = containers and _Containers(containers)
        hooks = {"object_hook": self._count, "list_hook": self._count} if self._count else {}
        self._options = dict(**hooks,
            # int map keys decode, so the contract can name them rather than drop the connection
            raw=False, unicode_errors="surrogateescape", strict_map_key=False,
            max_buffer_size=max_message + self.chunk, read_size=self.chunk,  # (else 1 MiB)
            max_str_len=max_message, max_bin_len=max_message, max_ext_len=max_message,
            max_array_len=max_message, max_map_len=max_message // 2)
        self._unpacker = msgpack.Unpacker(**self._options)
        self._fed = self._end = 0
        self.size = 0   # bytes of the message last yielded
        self._head = b""   # the first bytes of the message in progress (from _end)

    def _start(self, data: bytes, base: int) -> bytes:
        """The first bytes of the message that starts at _end; ``data`` starts at ``base``."""
        if self._end >= base:
            return data[self._end - base:self._end - base + _HEAD]
        return (self._head + data[:_HEAD])[:_HEAD]

    def _too_large(self, size: str, data: bytes, base: int) -> _TooLarge:
        return _TooLarge(size, self.max, _request_msgid(self._start(data, base)))

    def feed(self, data: bytes):
        """Yield each message completed by ``data``; raise _ProtocolError on bad input
        (_TooLarge for one over the limit)."""
        base = self._fed   # where ``data`` starts in the stream
        self._fed += len(data)
        try:
            self._unpacker.feed(data)   # BufferFull past the limit
            for msg in self._unpacker:  # FormatError, StackError (deep nesting), limits...
                end = self._unpacker.tell()
                if end - self._end > self.max:
                    raise self._too_large(f"of {end - self._end} bytes", data, base)
                self.size, self._end = end - self._end, end
                if self._count:
                    self._count.left = self._count.limit
                yield msg
        except _ProtocolError:
            raise
        except Exception as exc:
            if self.partial <= self.max:   # else BufferFull, a string over max_str_len...
                detail = f": {exc}" if str(exc) else ""
                if isinstance(exc, TypeError):   # unhashable: an array or map as a map key
                    detail += " (a map key is an array or a map; use strings or integers)"
                raise _ProtocolError(f"bad msgpack: {type(exc).__name__}{detail}",
                                     _request_msgid(self._start(data, base))) from None
        if self.partial > self.max:
            raise self._too_large(f"of over {self.partial} bytes", data, base)
        self._head = self._start(data, base)
        if self._fed == self._end and self._end > self.chunk:
            # between messages: a new unpacker, as one never shrinks the buffer a big
            # message grew (a connection that sent one would keep up to max_message)
            self._unpacker = msgpack.Unpacker(**self._options)
            self._fed = self._end = 0

    @property
    def partial(self) -> int:
        """Bytes fed of a message not complete yet."""
        return self._fed - self._end


def _arity(fn: Callable) -> tuple[int, int | None, list[str]] | None:
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # no introspectable signature: let the call itself decide
    low, high, names = 0, 0, []
    for p in sig.parameters.values():
        if p.kind is p.VAR_POSITIONAL:
            return low, None, [*names, f"*{p.name}"]
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            required = p.default is p.empty
            low, high = low + required, high + 1
            names.append(p.name if required else f"[{p.name}]")
    return low, high, names


def _arity_problem(name: str, arity, got: int) -> str | None:
    low, high, names = arity
    if low <= got and (high is None or got <= high):
        return None
    count = f"at least {low}" if high is None else str(low) if low == high else f"{low} to {high}"
    noun = "argument" if (low if high is None else high) == 1 else "arguments"
    listing = f" ({', '.join(names)})" if names else ""
    return f"{name} takes {count} {noun}{listing}, got {got}"


def _parse(msg: Any):
    """-> (msgid, method, params); method None if only the msgid is usable; None if nothing is."""
    if not isinstance(msg, list) or len(msg) not in (3, 4) or type(msg[0]) is not int:
        return None
    if len(msg) == 4 and msg[0] == REQUEST:
        msgid, method, params = msg[1:]
        if type(msgid) is not int or not 0 <= msgid <= 0xFFFFFFFF:
            return None
    elif len(msg) == 3 and msg[0] == NOTIFY:
        msgid, (method, params) = None, msg[1:]
    else:
        return None
    if isinstance(method, bytes):
        method = method.decode("utf-8", "surrogateescape")
    if not isinstance(method, str) or not isinstance(params, list):
        return (msgid, None, None) if msgid is not None else None
    return msgid, method, params


class Server:
    """The master's RPC endpoint. ``handlers`` maps method names to plain or coroutine
    functions, called as ``handler(*params)``. Plain functions run on the event loop,
    so they must not block."""

    def __init__(self, handlers: dict[str, Callable], *, token: str | None = None,
                 max_message: int = MAX_MESSAGE, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT, max_pending: int = MAX_PENDING,
                 max_held: int | None = None):
        self.handlers = handlers
        self.max_message, self.max_connections = max_message, max_connections
        self.idle_timeout, self.max_pending = idle_timeout, max_pending
        # Bytes of requests read and not yet answered, across connections. Past max_held,
        # connections read no more (TCP holds their peers) until some are answered; but
        # one part-way through a message reads on, else all such could wait on each other.
        self.max_held = max_held or HELD_MESSAGES * max_message
        self.held = 0
        self._reading_on: _Connection | None = None   # the one that reads on
        self._freed = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self._token = None if token is None else token.encode("utf-8")
        self._arities = {name: _arity(fn) for name, fn in handlers.items()}
        self._listener: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task, _Connection] = {}

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    async def start(self, host: str, port: int = 0) -> tuple[str, int]:
        self._listener = await asyncio.start_server(self._accept, host, port)
        self.address = self._listener.sockets[0].getsockname()[:2]
        log.info("elric rpc listening on %s:%d", *self.address)
        return self.address

    async def close(self, grace: float = 10.0, cut: asyncio.Event | None = None) -> None:
        """Stop listening and reading requests; let the calls in flight finish and send
        their answers, for up to ``grace`` seconds or till ``cut`` is set (cutting one
        short may leave its state half-written), then cancel what is left."""
        if self._listener is not None:
            self._listener.close()
        conns = list(self._connections.items())
        for _, conn in conns:
            conn.stop_reading()   # _Connection.run ends, once its calls in flight are done
        if conns:
            began, tasks = time.monotonic(), [task for task, _ in conns]
            waits = {asyncio.ensure_future(asyncio.wait(tasks))}
            if cut is not None:
                waits.add(asyncio.ensure_future(cut.wait()))
            await asyncio.wait(waits, timeout=grace, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            late = [task for task in tasks if not task.done()]
            if late:
                log.warning("%d connection(s) still had calls in flight after %.1fs; "
                            "cancelling them: their callers get no answer, and what they "
                            "asked may be done or not", len(late), time.monotonic() - began)
                for task, conn in conns:
                    for t in list(conn.tasks):
                        t.cancel()
                    task.cancel()
                await asyncio.gather(*late, return_exceptions=True)
        if self._listener is not None:
            await self._listener.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            log.warning("refusing connection from %s: %d connections open",
                        writer.get_extra_info("peername"), len(self._connections))
            writer.close()
            return
        task = asyncio.current_task()
        self._connections[task] = conn = _Connection(self, reader, writer)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # the server is closing; asyncio would log this as an error otherwise
        finally:
            del self._connections[task]

    def _free(self, size: int) -> None:
        self.held -= size
        self._freed.set()   # (wakes its waiters; those that wait again wait on a new one)
        self._freed = asyncio.Event()

    async def invoke(self, method: str, params: list) -> Any:
        handler = self.handlers.get(method)
        if handler is None:  # the wording of the reference msgpack-rpc-python server
            raise RequestError(f"'{method}' method not found", ErrorCode.METHOD_NOT_FOUND)
        arity = self._arities.get(method)
        problem = arity and _arity_problem(method, arity, len(params))
        if problem:
            raise RequestError(problem)
        result = handler(*params)
        if inspect.isawaitable(result):
            result = await result
        return result


class _Connection:
    def __init__(self, server: Server, reader, writer):
        self.server, self.reader, self.writer = server, reader, writer
        self.peer = writer.get_extra_info("peername")
        self.authed = server._token is None
        self.tasks: dict[asyncio.Task, int] = {}   # each with its request's size
        self.slots = asyncio.Semaphore(server.max_pending)
        self.held = 0   # bytes of its requests read and not yet answered
        self.stopping = False

    def stop_reading(self) -> None:
        """Read no more requests (the server is closing): what arrived is still handled,
        then ``run`` sees the end of the stream, waits for its calls and closes."""
        self.writer.transport.pause_reading()  # (a no-op on a closing transport)
        self.reader.feed_eof()
        self.stopping = True
        self.server._free(0)   # (if it waits for room to read)

    def _free(self, size: int) -> None:
        self.held -= size
        self.server._free(size)

    async def _room(self, decoder: _Decoder) -> None:
        """Wait until the server holds less than max_held, or this connection may read on."""
        server = self.server
        if server._reading_on is self and not decoder.partial:
            server._reading_on = None   # its message is read: another may read on
            server._free(0)
        while server.held >= server.max_held and not self.stopping:
            if decoder.partial and server._reading_on in (None, self):
                server._reading_on = self
                return
            await server._freed.wait()

    async def run(self) -> None:
        decoder = _Decoder(self.server.max_message, self.server.max_message // 16)
        refused = False   # a bad request was answered; the rest of it may still come
        loop = asyncio.get_running_loop()
        # a peer without the token may not hold a slot by sending a byte now and then
        auth_by = loop.time() + AUTH_TIMEOUT
        try:
            while True:
                if self.server.held >= self.server.max_held or \
                        self.server._reading_on is self:   # (else no wait: no coroutine)
                    await self._room(decoder)
                try:   # asyncio.timeout, not wait_for: no task per read
                    async with asyncio.timeout_at(loop.time() + self.server.idle_timeout
                                                  if self.authed else auth_by) as idle:
                        data = await self.reader.read(decoder.chunk)
                except TimeoutError:
                    # the socket's own ETIMEDOUT (its peer gone) fails every read at once:
                    # read again, the loop would spin here, the master frozen
                    if not idle.expired():
                        raise
                    if self.tasks:
                        continue  # a long request in flight is not idleness
                    log.info("closing %s connection from %s", "idle" if self.authed else
                             "unauthenticated", self.peer)
                    return
                if not data:
                    return
                self.held += len(data)
                self.server.held += len(data)
                for msg in decoder.feed(data):
                    if not await self._dispatch(msg, decoder.size):
                        return
                msg = None   # (an idle connection would keep its last request)
        except _ProtocolError as exc:
            self._read_no_more()
            log.warning("closing connection from %s: %s", self.peer, exc)
            if exc.msgid is not None and self.authed:
                await self._send(exc.msgid, exc.answer, None)
                refused = True
        except OSError:   # reset, timed out, unreachable: the peer is gone
            pass
        finally:
            self._read_no_more()
            try:  # let handlers finish: cutting one short may leave state half-written
                await asyncio.gather(*self.tasks, return_exceptions=True)
                if refused:
                    await self._linger()
            finally:
                self.writer.close()

    def _read_no_more(self) -> None:
        """Free the bytes of a message part-read (its calls free theirs when answered)."""
        if self.server._reading_on is self:
            self.server._reading_on = None
        self._free(self.held - sum(self.tasks.values()))

    async def _linger(self) -> None:
        """Read and drop what the peer still sends of a refused request till it closes (LINGER
        s at most): closing with input unread resets the connection, losing the answer."""
        try:
            self.writer.write_eof()
            async with asyncio.timeout(LINGER):
                while await self.reader.read(_CHUNK):
                    pass
        except (TimeoutError, OSError):
            pass

    async def _dispatch(self, msg: Any, size: int) -> bool:
        """Handle one message of ``size`` bytes, held until it is answered if it is a call;
        False closes the connection (which frees all it holds)."""
        parsed = _parse(msg)
        if parsed is None:
            log.warning("closing connection from %s: not a request: %.200r", self.peer, msg)
            return False
        msgid, method, params = parsed
        if not self.authed or method == "auth":
            self._free(size)
            return await self._auth(msgid, method, params)
        if method is None:
            self._free(size)
            invalid = "invalid request: expected [0, msgid, method, params]"
            await self._send(msgid, _error(ErrorCode.BAD_REQUEST, invalid), None)
            return True
        await self.slots.acquire()  # at the limit, stop reading until a request finishes
        task = asyncio.create_task(self._handle(msgid, method, params))
        self.tasks[task] = size
        task.add_done_callback(self._finished)
        return True

    def _finished(self, task: asyncio.Task) -> None:
        self._free(self.tasks.pop(task))
        self.slots.release()

    async def _auth(self, msgid, method, params) -> bool:
        token, error = self.server._token, None
        if method != "auth":
            error = _error(ErrorCode.UNAUTHORIZED, AUTH_REQUIRED)
        elif token is not None:
            given = params[0] if len(params) == 1 else None
            if isinstance(given, str):
                given = given.encode("utf-8", "surrogateescape")
            if not isinstance(given, bytes) or not hmac.compare_digest(given, token):
                error = _error(ErrorCode.UNAUTHORIZED, AUTH_FAILED)
        if msgid is not None:
            await self._send(msgid, error, None if error else True)
        if error:
            log.warning("closing connection from %s: %s", self.peer, error)
            return False
        self.authed = True
        return True

    async def _handle(self, msgid: int | None, method: str, params: list) -> None:
        error = result = None
        try:
            result = await self.server.invoke(method, params)
        except RequestError as exc:
            error = _error(exc.code, str(exc))
            if msgid is None:
                log.warning("notification %s from %s: %s", method, self.peer, exc)
        except Exception as exc:
            log.exception("%s from %s failed", method, self.peer)
            error = _error(ErrorCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
        if msgid is not None:
            await self._send(msgid, error, result, method)

    async def _send(self, msgid: int, error: dict | None, result: Any, method: str = "") -> None:
        try:
            data = _pack([RESPONSE, msgid, error, result])
            if len(data) > self.server.max_message:
                raise ValueError(f"response is {len(data)} bytes, limit {self.server.max_message}")
        except Exception as exc:
            problem = f"{type(exc).__name__}: {exc}"
            log.error("cannot send the result of %s to %s: %s", method, self.peer, problem)
            error = _error(ErrorCode.INTERNAL, f"internal error: cannot send result: {problem}")
            data = _pack([RESPONSE, msgid, error, None])
        if self.writer.is_closing():
            return
        self.writer.write(data)
        try:
            # A peer that stops reading must not pin its buffers forever.
            async with asyncio.timeout(self.server.idle_timeout):
                await self.writer.drain()
        except TimeoutError:
            log.warning("aborting connection from %s: not reading its responses", self.peer)
            self.writer.transport.abort()
        except ConnectionError:
            pass


def _unreachable(host: str, port: int, exc: OSError) -> RPCUnreachableError:
    if isinstance(exc, TimeoutError):
        reason = "timed out"
    elif exc.errno and exc.errno > 0:
        reason = os.strerror(exc.errno)  # asyncio's message also names the address
        if exc.errno == errno.ECONNREFUSED:   # nothing listens there: say what should
            reason += " (is an elric master running there? clients find it by MASTER_ADDRESS)"
    else:  # a name that does not resolve, or several addresses that all failed
        reason = exc.strerror or str(exc) or type(exc).__name__
    return RPCUnreachableError(f"cannot reach elric master at {host}:{port}: {reason}")


class _Caller:
    """What both clients share: numbering and packing requests, and reading responses."""

    def __init__(self, host: str, port: int, timeout: float | None, max_message: int):
        self.host, self.port, self.timeout = host, port, timeout
        self._where = f"elric master at {host}:{port}"
        self._max_message = max_message
        self._msgid = 0
        self._heard = False   # any bytes from the peer on this connection

    def _request(self, method: str, params: tuple) -> tuple[int, bytes]:
        """-> (msgid, request bytes); raises, with nothing sent, if they cannot go."""
        self._msgid = msgid = (self._msgid + 1) & 0xFFFFFFFF
        try:
            data = _pack([REQUEST, msgid, method, list(params)])
        except Exception as exc:
            raise RPCArgumentError(f"cannot send {method!r} arguments: {exc}") from exc
        if len(data) > self._max_message:
            raise RPCError(f"{method!r} request is {len(data)} bytes, "
                           f"over the {self._max_message}-byte limit")
        return msgid, data

    def _timed_out(self, method: str, limit: float | None) -> RPCTimeoutError:
        # a Redis or web server at MASTER_ADDRESS waits for a line end that never comes
        hint = "" if self._heard else f"; nothing has answered on this connection: {_WRONG}"
        return RPCTimeoutError(f"no answer from {self._where} to {method} within {limit}s{hint}")


_WRONG = "is MASTER_ADDRESS an elric master's address (not, say, Redis's)?"


def _too_large(answer: Any) -> bool:
    return isinstance(answer, RemoteError) and answer.code == ErrorCode.TOO_LARGE


def _responses(decoder: _Decoder, data: bytes):
    """Yield (msgid, RemoteError or None, result) for each response ``data`` completes."""
    for msg in decoder.feed(data):
        if not (isinstance(msg, list) and len(msg) == 4 and msg[0] == RESPONSE and
                type(msg[1]) is int):
            # a master sends responses only; text from another server reads as small ints
            raise _ProtocolError(f"it sent {data[:40]!r}, no msgpack-rpc response: {_WRONG}")
        yield msg[1], None if msg[2] is None else RemoteError(msg[2]), msg[3]


class AsyncClient(_Caller):
    """Many concurrent calls over one connection, matched to responses by msgid."""

    def __init__(self, reader, writer, host: str, port: int, timeout: float | None,
                 max_message: int):
        super().__init__(host, port, timeout, max_message)
        self._reader, self._writer = reader, writer
        self._pending: dict[int, asyncio.Future] = {}
        self._lost: str | None = None
        self._reader_task = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, host: str, port: int, *, timeout: float | None = 10.0,
                      token: str | None = None, max_message: int = MAX_MESSAGE) -> AsyncClient:
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except OSError as exc:
            raise _unreachable(host, port, exc) from None
        client = cls(reader, writer, host, port, timeout, max_message)
        if token is not None:
            try:
                await client.call("auth", token)
            except BaseException:
                await client.close()
                raise
        return client

    async def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        """``timeout`` None means the client's default (the one given to connect)."""
        if self._lost:
            raise RPCConnectionError(self._lost)
        msgid, data = self._request(method, params)
        future = self._pending[msgid] = asyncio.get_running_loop().create_future()
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                self._writer.write(data)
                await self._writer.drain()
                return await future
        except TimeoutError:
            raise self._timed_out(method, limit) from None
        except OSError as exc:   # (EHOSTUNREACH too: drain raises what the reads met)
            if future.done() and not future.cancelled() and \
                    isinstance(future.exception(), RemoteError):
                raise future.exception() from None   # answered (too_large) while sending
            raise RPCConnectionError(f"connection to {self._where} lost: {exc}") from None
        finally:
            self._pending.pop(msgid, None)

    @property
    def closed(self) -> bool:
        """The connection is gone: closed by either side, or lost."""
        return self._lost is not None

    async def close(self) -> None:
        self._fail(f"connection to {self._where} closed by the client")
        self._writer.close()
        self._reader_task.cancel()
        await asyncio.gather(self._reader_task, return_exceptions=True)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    def _fail(self, reason: str) -> None:
        self._lost = self._lost or reason
        for future in self._pending.values():
            if not future.done():
                future.set_exception(RPCConnectionError(self._lost))

    async def _read_loop(self) -> None:
        decoder, reason = _Decoder(self._max_message), "closed by the server"
        try:
            while data := await self._reader.read(decoder.chunk):
                self._heard = True
                for msgid, error, result in _responses(decoder, data):
                    if _too_large(error):
                        # the server ends this connection: no new call goes on it (those
                        # in flight may still be answered)
                        self._lost = self._lost or (f"connection to {self._where} closed "
                                                    "by the server after a request too large")
                    future = self._pending.get(msgid)  # None if the call gave up
                    if future is not None and not future.done():
                        if error:
                            future.set_exception(error)
                        else:
                            future.set_result(result)
        except (OSError, _ProtocolError) as exc:
            reason = f"lost: {exc}"
        finally:
            self._fail(f"connection to {self._where} {reason}")
            self._writer.close()


class Client(_Caller):
    """Blocking client for scripts and threads: one call at a time per instance
    (a lock makes it thread-safe), connecting lazily and again after a failure, and
    afresh in a forked child (the parent's socket and lock are not the child's)."""

    def __init__(self, host: str, port: int, *, timeout: float | None = 10.0,
                 token: str | None = None, max_message: int = MAX_MESSAGE,
                 handshake: float | None = None):
        super().__init__(host, port, timeout, max_message)
        self._token, self.handshake = token, handshake
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._decoder: _Decoder | None = None
        self._pid = os.getpid()

    def call(self, method: str, *params: Any, timeout: float | None = None) -> Any:
        [answer] = self.call_many(method, [params], depth=1, timeout=timeout)
        if isinstance(answer, Exception):
            raise answer
        return answer

    def call_many(self, method: str, calls: list[tuple], *, depth: int = 2,
                  timeout: float | None = None) -> list[Any]:
        """Call ``method`` once per params tuple in ``calls``, keeping up to ``depth`` calls
        in flight on this connection, so the master works on one while the next travels.
        Returns the results in order; a call the master refused is its RemoteError, in
        place, and one that cannot be sent (TypeError, or RPCError: too big) is that
        error: the calls after it still ran."""
        if self._pid != os.getpid():   # forked: the parent's lock may be held, its socket shared
            self._pid, self._lock = os.getpid(), threading.Lock()
            self._drop()   # (closes the child's copy only: the parent's connection stays up)
        with self._lock:
            self._ensure_connected()
            return self._pipeline(method, calls, depth,
                                  self.timeout if timeout is None else timeout)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = self._decoder = None

    def _ensure_connected(self) -> None:
        if self._sock is not None:
            # Anything to read while no call is in flight means the server closed it (e.g.
            # idle timeout). Nothing was sent yet, so reconnecting cannot duplicate a call.
            self._sock.settimeout(0)  # with a timeout set, recv would wait for data first
            try:
                self._sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                return  # (the call sets its own timeout)
            except OSError:
                pass
            self._drop()
        limit = self.handshake or self.timeout
        try:
            self._sock = socket.create_connection((self.host, self.port), limit)
        except OSError as exc:
            raise _unreachable(self.host, self.port, exc) from None
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._decoder, self._heard = _Decoder(self._max_message), False
        if self._token is None and not self.handshake:
            return
        # with a handshake, a first answer within it tells a master from a peer that
        # accepts and never answers (Redis waits for a line end) before a long call
        first, params = ("ping", ()) if self._token is None else ("auth", (self._token,))
        try:
            [answer] = self._pipeline(first, [params], 1, limit)
            if isinstance(answer, RemoteError):
                raise answer
        except BaseException as exc:
            self._drop()   # a connection that did not authenticate is never used
            if self.handshake and isinstance(exc, RPCConnectionError):
                raise RPCUnreachableError(str(exc)) from None   # the call itself was not sent
            raise

    def _pipeline(self, method: str, calls: list[tuple], depth: int,
                  timeout: float | None) -> list[Any]:
        answers: dict[int, tuple] = {}   # read early: answered out of order
        in_flight: deque[tuple[int, int]] = deque()   # (msgid, index in calls)
        todo = deque(range(len(calls)))
        out: list[Any] = [_UNANSWERED] * len(calls)

        def broke(exc: RPCConnectionError) -> RPCConnectionError:
            # the calls answered so far ran: a caller sends again only the others
            exc.answered = {i: a for i, a in enumerate(out) if a is not _UNANSWERED} | {
                i: answers[m][0] or answers[m][1] for m, i in in_flight if m in answers}
            return exc
        try:
            while todo or in_flight:
                # after a too_large answer the server reads nothing more on this connection
                if todo and len(in_flight) < depth and not any(
                        _too_large(e) for e, _ in answers.values()):
                    try:
                        msgid, data = self._request(method, calls[todo[0]])
                    except (TypeError, RPCError) as exc:   # nothing sent: in place
                        out[todo.popleft()] = exc
                        continue
                    self._sock.settimeout(timeout)
                    self._sock.sendall(data)
                    in_flight.append((msgid, todo.popleft()))
                    continue
                msgid, i = in_flight.popleft()
                out[i] = self._answer(msgid, timeout, answers)
                if _too_large(out[i]):
                    # the calls sent after it were dropped unread, never run: they go
                    # again on a new connection, as those not sent yet do
                    todo.extendleft(reversed([j for _, j in in_flight]))
                    in_flight.clear()
                    answers.clear()
                    self._drop()
                    if todo:
                        self._ensure_connected()
            return out
        except TimeoutError:
            self._drop()  # a late answer must not be read as the next call's
            raise broke(self._timed_out(method, timeout)) from None
        except (OSError, _ProtocolError) as exc:
            self._drop()
            raise broke(RPCConnectionError(f"connection to {self._where} lost: {exc}")) from None
        except RPCConnectionError as exc:   # closed by the server; or no new connection
            self._drop()
            raise broke(exc)
        except BaseException:
            if in_flight:   # answers still to come would be read as the next call's
                self._drop()
            raise

    def _answer(self, msgid: int, timeout: float | None, answers: dict[int, tuple]) -> Any:
        """Read until call ``msgid`` is answered, keeping other answers in ``answers``;
        returns its result, or its RemoteError (not raised)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while msgid not in answers:
            if deadline is not None:
                self._sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = self._sock.recv(self._decoder.chunk)
            self._heard = self._heard or bool(chunk)
            if not chunk:
                self._drop()
                raise RPCConnectionError(f"connection to {self._where} closed by the server")
            for got, error, result in _responses(self._decoder, chunk):
                answers[got] = (error, result)
        error, result = answers.pop(msgid)
        return error or result
