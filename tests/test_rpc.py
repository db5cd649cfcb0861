"""elric.rpc over real sockets on 127.0.0.1: both clients, the server's error answers,
hostile input, limits, auth, and the legacy msgpack-rpc-python client."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import textwrap
import threading
import time

import msgpack
import pytest

from elric.rpc import (AUTH_FAILED, AUTH_REQUIRED, AsyncClient, Client, RemoteError,
                       RequestError, RPCConnectionError, RPCError, RPCTimeoutError, Server,
                       parse_address)
from tests.conftest import wait_for
from tests.legacy import SCRIPT_PRELUDE, legacy_python

DEADLINE = 10.0


def arun(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def eventually(predicate, what="condition", timeout=DEADLINE):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


def basic_handlers(**extra):
    async def echo(value):
        return value

    def submit_job(spec):
        return {"job_id": spec.get("job_id", "j1")}

    def window(a, b=2, *, c=3):
        return a + b + c

    def reject(reason):
        raise RequestError(f"bad spec: {reason}")

    def crash():
        return 1 / 0

    def unpackable():
        return object()

    def total(*numbers):
        return sum(numbers)

    return {"ping": lambda: "pong", "echo": echo, "submit_job": submit_job, "window": window,
            "reject": reject, "crash": crash, "unpackable": unpackable, "total": total, **extra}


@contextlib.asynccontextmanager
async def serving(handlers=None, **options):
    server = Server(basic_handlers() if handlers is None else handlers, **options)
    await server.start("127.0.0.1", 0)
    try:
        yield server
    finally:
        await server.close(grace=0.2)    # (a handler that hangs is cut after grace)


class ServerThread:
    """A Server on its own event loop in a thread, for the blocking client and subprocesses."""

    def __init__(self, handlers=None, port=0, grace=0.2, **options):
        self.server = Server(basic_handlers() if handlers is None else handlers, **options)
        self.port, self.grace = port, grace    # (a handler that hangs is cut after grace)

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(DEADLINE)

    def __enter__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.address = self.run(self.server.start("127.0.0.1", self.port))
        return self

    def __exit__(self, *exc):
        self.run(self.server.close(grace=self.grace))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


class Raw:
    """A bare connection speaking msgpack by hand, to send what a real client would not."""

    @classmethod
    async def open(cls, address):
        self = cls()
        self.reader, self.writer = await asyncio.open_connection(*address)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape")
        return self

    def send(self, data: bytes):
        self.writer.write(data)

    async def next(self):
        """("msg", message) for the next message, or ("closed", None) at end of stream."""
        async with asyncio.timeout(DEADLINE):
            while True:
                for msg in self.unpacker:
                    return "msg", msg
                try:
                    data = await self.reader.read(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    return "closed", None
                self.unpacker.feed(data)

    def close(self):
        self.writer.close()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- basics ---------------------------------------------------------------------------

def test_ping_async_client():
    async def main():
        async with serving() as server:
            host, port = server.address
            assert host == "127.0.0.1" and port > 0
            async with await AsyncClient.connect(host, port) as client:
                assert await client.call("ping") == "pong"
                assert await client.call("echo", {"a": [1, 2.5, None, True, b"\x00\xff"]}) == \
                    {"a": [1, 2.5, None, True, b"\x00\xff"]}
                assert await client.call("auth", "anything") is True  # no token set
    arun(main())


def test_ping_blocking_client():
    with ServerThread() as st, Client(*st.address) as client:
        assert client.call("ping") == "pong"
        assert client.call("echo", ["x", {"k": 1}]) == ["x", {"k": 1}]
        assert client.call("total", 1, 2, 3) == 6


def test_concurrent_calls_complete_out_of_order():
    async def main():
        gate, finished = asyncio.Event(), []

        async def slow():
            await gate.wait()
            return "slow"

        def fast():
            gate.set()
            return "fast"

        async with serving(basic_handlers(slow=slow, fast=fast)) as server:
            client = await AsyncClient.connect(*server.address)

            async def tracked(method):
                result = await client.call(method)
                finished.append(method)
                return result

            # slow is sent first and can only finish after fast ran: responses cross.
            assert await asyncio.gather(tracked("slow"), tracked("fast")) == ["slow", "fast"]
            assert finished == ["fast", "slow"]
            values = list(range(300))
            assert await asyncio.gather(*(client.call("echo", v) for v in values)) == values
            await client.close()
    arun(main())


def test_blocking_client_pipelines_calls_and_keeps_their_order():
    """call_many keeps two calls in flight; answers that cross come back in call order,
    a refused call is its error in place, and the calls after it still run."""
    seen, gate = [], threading.Event()

    async def step(n):
        seen.append(n)
        if n == 0:   # ends only once call 1 arrived: one call at a time would time out
            while not gate.is_set():
                await asyncio.sleep(0.001)
        if n == 1:
            gate.set()
        if n == 3:
            raise RequestError("three is refused")
        return n * 10

    with ServerThread(basic_handlers(step=step)) as st, Client(*st.address) as c:
        out = c.call_many("step", [(n,) for n in range(6)], depth=2)
        assert out[:3] == [0, 10, 20] and out[4:] == [40, 50]
        assert isinstance(out[3], RemoteError) and "three is refused" in str(out[3])
        assert c.call("echo", "next") == "next"   # no answer left over on the connection
        # one that cannot go is its error in place, the one before it answered (a split
        # submit_jobs says which batches were queued); nothing is left half-read
        out = c.call_many("echo", [("x",), ("y" * (9 * 1024 * 1024),), ("z",)])
        assert out[0::2] == ["x", "z"] and isinstance(out[1], RPCError), out[0::2]
        assert "over the" in str(out[1])
        with pytest.raises(RPCError, match="over the"):
            c.call("echo", "y" * (9 * 1024 * 1024))
        assert c.call("echo", "after") == "after"


def test_blocking_client_pipeline_goes_on_after_a_call_over_the_servers_limit():
    """The server reads nothing after a too_large request on that connection: the next
    call, already sent, was never answered and call_many raised a lost connection, hiding
    the answers of the calls that ran (split submit_jobs: batches queued, or not?)."""
    ran = []

    def echo(x):
        ran.append(x)
        return x

    with ServerThread(basic_handlers(echo=echo), max_message=4096) as st, \
            Client(*st.address) as c:
        out = c.call_many("echo", [("a",), ("x" * 5000,), ("b",), ("c",)], depth=2)
        assert out[0] == "a" and out[2:] == ["b", "c"], out
        assert isinstance(out[1], RemoteError) and out[1].code == "too_large", out
        assert ran == ["a", "b", "c"]   # each once: those dropped unread went again
        assert c.call("echo", "next") == "next"


def test_notifications_run_the_handler_and_get_no_answer():
    async def main():
        seen = []
        async with serving(basic_handlers(record=seen.append)) as server:
            raw = await Raw.open(server.address)
            raw.send(msgpack.packb([2, "record", [1]]) + msgpack.packb([2, "record", [2]])
                     + msgpack.packb([2, "nope", []]) + msgpack.packb([0, 9, "ping", []]))
            assert await raw.next() == ("msg", [1, 9, None, "pong"])  # nothing before it
            assert seen == [1, 2]
            raw.close()
    arun(main())


# -- error answers --------------------------------------------------------------------

def test_error_messages():
    async def main():
        async with serving() as server:
            client = await AsyncClient.connect(*server.address)
            cases = [
                (("nope",), "'nope' method not found", "method_not_found"),
                (("submit_job", {}, 2, 3), "submit_job takes 1 argument (spec), got 3",
                 "bad_request"),
                (("window",), "window takes 1 to 2 arguments (a, [b]), got 0", "bad_request"),
                (("ping", 1), "ping takes 0 arguments, got 1", "bad_request"),
                (("reject", "no queue"), "bad spec: no queue", "bad_request"),
                (("crash",), "internal error: ZeroDivisionError: division by zero",
                 "internal"),
            ]
            for call, message, code in cases:
                with pytest.raises(RemoteError) as info:
                    await client.call(*call)
                assert (str(info.value), info.value.code) == (message, code)
            assert await client.call("window", 1) == 6
            assert await client.call("submit_job", {"job_id": "x"}) == {"job_id": "x"}
            await client.close()
    arun(main())


def test_internal_error_is_logged_and_connection_stays_up(caplog):
    async def main():
        async with serving() as server:
            client = await AsyncClient.connect(*server.address)
            with pytest.raises(RemoteError, match=r"^internal error: ZeroDivisionError: division by zero$"):
                await client.call("crash")
            assert await client.call("ping") == "pong"
            with pytest.raises(RemoteError, match=r"^internal error: cannot send result: TypeError"):
                await client.call("unpackable")
            assert await client.call("ping") == "pong"
            await client.close()
    with caplog.at_level(logging.INFO, logger="elric.rpc"):
        arun(main())
    crash = [r for r in caplog.records if r.name == "elric.rpc" and r.exc_info]
    assert crash and crash[0].exc_info[0] is ZeroDivisionError


def test_response_over_the_limit_is_an_error_answer():
    async def main():
        async with serving(basic_handlers(big=lambda n: "x" * n), max_message=4096) as server:
            client = await AsyncClient.connect(*server.address)
            with pytest.raises(RemoteError, match=r"^internal error: cannot send result: .*limit 4096"):
                await client.call("big", 5000)
            assert await client.call("ping") == "pong"
            await client.close()
    arun(main())


def test_blocking_client_errors():
    with ServerThread() as st, Client(*st.address) as client:
        with pytest.raises(RemoteError, match="'nope' method not found"):
            client.call("nope")
        with pytest.raises(RemoteError, match="internal error: ZeroDivisionError"):
            client.call("crash")
        with pytest.raises(TypeError):
            client.call("echo", object())  # cannot be packed: never sent
        assert client.call("ping") == "pong"


# -- hostile input --------------------------------------------------------------------

DEEP = b"\x91" * 3000 + b"\xc0"  # nesting beyond the C unpacker's stack, within the size limit
BAD_INPUT = {
    "garbage": (b"\xc1\xc1\xc1\xc1", None),
    "deep_nesting": (DEEP, None),
    "oversized_notification": (msgpack.packb([2, "echo", ["x" * 5000]]), None),
    "not_an_array": (msgpack.packb({"method": "ping"}), None),
    "scalar": (msgpack.packb(42), None),
    "response_sent_to_server": (msgpack.packb([1, 1, None, None]), None),
    "unknown_type": (msgpack.packb([7, 1, "ping", []]), None),
    "bool_type": (msgpack.packb([False, 1, "ping", []]), None),
    "msgid_not_int": (msgpack.packb([0, "x", "ping", []]), None),
    "msgid_too_big": (msgpack.packb([0, 2**40, "ping", []]), None),
    "bad_notification": (msgpack.packb([2, 5, []]), None),
    "method_not_string": (msgpack.packb([0, 5, 123, []]), [1, 5, {"code": "bad_request", "message": "invalid request: expected [0, msgid, method, params]"}, None]),
    "params_not_array": (msgpack.packb([0, 6, "ping", "x"]), [1, 6, {"code": "bad_request", "message": "invalid request: expected [0, msgid, method, params]"}, None]),
    "invalid_utf8_method": (b"\x94\x00\x07\xa2\xff\xfe\x90", [1, 7, {"code": "method_not_found", "message": "'\udcff\udcfe' method not found"}, None]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_answered_or_closed_and_others_are_served(case):
    payload, answer = BAD_INPUT[case]

    async def main():
        async with serving(max_message=4096) as server:
            bystander = await AsyncClient.connect(*server.address)
            assert await bystander.call("ping") == "pong"
            raw = await Raw.open(server.address)
            raw.send(payload)
            if answer is None:
                assert await raw.next() == ("closed", None)
            else:
                assert await raw.next() == ("msg", answer)
                raw.send(msgpack.packb([0, 8, "ping", []]))  # still served
                assert await raw.next() == ("msg", [1, 8, None, "pong"])
            raw.close()
            assert await bystander.call("echo", "x" * 3000) == "x" * 3000
            await bystander.close()
    arun(main())


OVERSIZED = {"string": msgpack.packb([0, 1, "echo", ["x" * 5000]]),
             "total": msgpack.packb([0, 1, "echo", ["abc"] * 1500])}


@pytest.mark.parametrize("case", sorted(OVERSIZED))
def test_a_request_over_the_limit_is_answered_with_the_limit_then_closed(case):
    """It was closed without an answer: a client whose own limit is bigger saw a lost
    connection, and sent the same request again, forever."""
    async def main():
        async with serving(max_message=4096) as server:
            bystander = await AsyncClient.connect(*server.address)
            raw = await Raw.open(server.address)
            raw.send(OVERSIZED[case])
            kind, answer = await raw.next()
            assert kind == "msg" and answer[:2] == [1, 1] and answer[3] is None, answer
            assert answer[2]["code"] == "too_large" and answer[2]["max_message"] == 4096
            assert "limit of 4096 bytes" in answer[2]["message"], answer[2]
            assert await raw.next() == ("closed", None)
            raw.close()
            await eventually(lambda: server.connection_count == 1, "the refused connection to go")
            assert await bystander.call("echo", "x" * 3000) == "x" * 3000
            await bystander.close()
    arun(main())


@pytest.mark.parametrize("payload", [
    msgpack.packb([0, 9, "echo", [{(1, 2): "x"}]]),   # an array as a map key
    msgpack.packb([0, 9, "echo", [{"k": {(1,): 2}}]]),
    msgpack.packb([0, 9, "echo", [{frozenset(): 1}]], default=lambda o: {}),  # a map as a key
], ids=["array_key", "nested_array_key", "map_key"])
def test_a_request_that_cannot_be_decoded_is_answered_by_its_msgid_then_closed(payload):
    """It was closed without an answer: the caller saw a lost connection, as if the
    master had died, and could only resend the same request."""
    async def main():
        async with serving(max_message=4096) as server:
            raw = await Raw.open(server.address)
            raw.send(payload)
            kind, answer = await raw.next()
            assert kind == "msg" and answer[:2] == [1, 9] and answer[3] is None, answer
            assert answer[2]["code"] == "bad_request", answer
            assert "map key is an array or a map" in answer[2]["message"], answer
            assert await raw.next() == ("closed", None)
            raw.close()
    arun(main())


def test_a_request_of_many_small_arrays_and_maps_is_refused_before_it_is_whole():
    """Each empty map or array a request holds is one byte on the wire and some 80 bytes
    decoded: a connection that sent 8 MB of them, short of the last byte, kept ~600 MB
    in the master for as long as it stayed, and a few such connections took gigabytes.
    A request may hold max_message // 16 of them: past that it is answered and closed,
    what it built freed."""
    limit = 64 * 1024
    many = limit - 64   # empty maps, a byte each: within the size limit

    async def main():
        async with serving(max_message=limit) as server:
            bystander = await AsyncClient.connect(*server.address)
            raw = await Raw.open(server.address)
            raw.send(b"\x94\x00\x05\xa4echo\x91\xdd" + many.to_bytes(4, "big") +
                     b"\x80" * (many - 1))   # the last one never comes
            kind, answer = await raw.next()
            assert kind == "msg" and answer[:2] == [1, 5] and answer[3] is None, answer
            assert answer[2]["code"] == "bad_request", answer
            assert f"over {limit // 16} arrays and maps" in answer[2]["message"], answer
            raw.close()
            await eventually(lambda: server.connection_count == 1, "the refused one to go")
            # as many in a request's arguments are served
            assert await bystander.call("echo", [[]] * (limit // 16 - 3)) == \
                [[]] * (limit // 16 - 3)
            await bystander.close()
    arun(main())


def test_clients_with_a_bigger_limit_are_told_the_servers():
    big = "x" * 200_000   # over the server's limit, sent in many reads

    async def main():
        async with serving(max_message=64 * 1024) as server:
            client = await AsyncClient.connect(*server.address, max_message=1 << 20)
            assert await client.call("ping") == "pong"
            with pytest.raises(RemoteError) as info:
                await client.call("echo", big)
            assert (info.value.code, info.value.max_message) == ("too_large", 64 * 1024)
            await client.close()
            async with await AsyncClient.connect(*server.address) as again:
                assert await again.call("echo", "small") == "small"
    arun(main())
    with ServerThread(max_message=64 * 1024) as st, \
            Client(*st.address, max_message=1 << 20) as client:
        with pytest.raises(RemoteError) as info:
            client.call("echo", big)
        assert (info.value.code, info.value.max_message) == ("too_large", 64 * 1024)
        assert client.call("ping") == "pong"   # on a new connection


def test_truncated_frame_closes_only_that_connection():
    async def main():
        async with serving() as server:
            bystander = await AsyncClient.connect(*server.address)
            raw = await Raw.open(server.address)
            raw.send(msgpack.packb([0, 1, "echo", ["abcdef"]])[:-3])
            raw.writer.write_eof()
            assert await raw.next() == ("closed", None)
            raw.close()
            await eventually(lambda: server.connection_count == 1, "the truncated connection to go")
            assert await bystander.call("ping") == "pong"
            await bystander.close()
    arun(main())


def test_raw_strings_from_old_clients_decode_to_str():
    async def main():
        async with serving() as server:
            raw = await Raw.open(server.address)
            spec = {"name": "héllo", "args": ["a", 1], "meta": {"k": "v"}}
            raw.send(msgpack.packb([0, 1, "echo", [spec]], use_bin_type=False))
            assert await raw.next() == ("msg", [1, 1, None, spec])
            raw.send(msgpack.packb([0, 2, "submit_job", [{"job_id": "j9"}]], use_bin_type=False))
            assert await raw.next() == ("msg", [1, 2, None, {"job_id": "j9"}])
            raw.close()
    arun(main())


# -- limits ---------------------------------------------------------------------------

def test_max_connections():
    async def main():
        async with serving(max_connections=2) as server:
            first = await AsyncClient.connect(*server.address)
            second = await AsyncClient.connect(*server.address)
            assert [await first.call("ping"), await second.call("ping")] == ["pong", "pong"]
            third = await AsyncClient.connect(*server.address)
            with pytest.raises(RPCConnectionError):
                await third.call("ping")
            await third.close()
            await first.close()
            await eventually(lambda: server.connection_count == 1, "a free connection slot")
            fourth = await AsyncClient.connect(*server.address)
            assert await fourth.call("ping") == "pong"
            assert await second.call("ping") == "pong"
            await fourth.close()
            await second.close()
    arun(main())


def test_max_pending_bounds_concurrent_requests_per_connection():
    async def main():
        gate, state = asyncio.Event(), {"active": 0, "peak": 0}

        async def hold(i):
            state["active"] += 1
            state["peak"] = max(state["peak"], state["active"])
            await gate.wait()
            state["active"] -= 1
            return i

        async with serving(basic_handlers(hold=hold), max_pending=2) as server:
            client = await AsyncClient.connect(*server.address)
            calls = asyncio.gather(*(client.call("hold", i) for i in range(10)))
            await eventually(lambda: state["active"] == 2, "two requests running")
            gate.set()
            assert await calls == list(range(10))
            assert state["peak"] == 2
            await client.close()
    arun(main())


def test_what_a_server_holds_is_all_freed_and_a_tiny_budget_still_serves():
    """The server counts the bytes of requests read and not yet answered, across
    connections, and reads no more past max_held (bar one connection part-way through a
    message): a count that leaked would stop it for good. Calls, answers in error,
    notifications, bad requests, one too large, a peer gone mid-message: all freed."""
    async def main():
        async with serving(max_message=4096, max_held=1) as server:
            client = await AsyncClient.connect(*server.address)
            text = "x" * 3000   # most reads end part-way through the next request
            assert await asyncio.gather(*(client.call("echo", text) for _ in range(20))) \
                == [text] * 20
            with pytest.raises(RemoteError, match="ZeroDivisionError"):
                await client.call("crash")
            raw = await Raw.open(server.address)
            raw.send(msgpack.packb([2, "echo", [text]]) + msgpack.packb([0, 7, 1, []]))
            assert (await raw.next())[1][:3] == [1, 7, {"code": "bad_request", "message":
                                                 "invalid request: expected [0, msgid, "
                                                 "method, params]"}]
            raw.send(msgpack.packb([0, 8, "echo", [text]])[:2000])
            await eventually(lambda: server.held >= 2000, "the part-read request held")
            raw.close()
            too_large = await Raw.open(server.address)
            too_large.send(msgpack.packb([0, 9, "echo", ["y" * 5000]]))
            assert (await too_large.next())[1][2]["code"] == "too_large"
            too_large.close()
            assert await client.call("echo", text) == text
            await client.close()
            await eventually(lambda: server.connection_count == 0, "all closed")
            assert server.held == 0 and server._reading_on is None
    arun(main())


def test_idle_connection_is_closed_and_blocking_client_reconnects():
    with ServerThread(idle_timeout=0.2) as st, Client(*st.address) as client:
        assert client.call("ping") == "pong"
        deadline = time.monotonic() + DEADLINE
        while st.server.connection_count:
            assert time.monotonic() < deadline, "idle connection was not closed"
            time.sleep(0.01)
        assert client.call("ping") == "pong"  # reconnected, nothing was lost


# -- auth -----------------------------------------------------------------------------

def test_auth():
    async def main():
        async with serving(token="s3cret") as server:
            client = await AsyncClient.connect(*server.address, token="s3cret")
            assert await client.call("ping") == "pong"
            await client.close()

            with pytest.raises(RemoteError, match=f"^{re.escape(AUTH_FAILED)}$"):
                await AsyncClient.connect(*server.address, token="wrong")

            client = await AsyncClient.connect(*server.address)
            with pytest.raises(RemoteError, match=f"^{re.escape(AUTH_REQUIRED)}$"):
                await client.call("ping")
            with pytest.raises(RPCConnectionError):
                await client.call("ping")  # the server closed it
            await client.close()

            raw = await Raw.open(server.address)  # a notification cannot authenticate
            raw.send(msgpack.packb([2, "ping", []]))
            assert await raw.next() == ("closed", None)
            raw.close()
    arun(main())


def test_auth_blocking_client():
    with ServerThread(token="s3cret") as st:
        with Client(*st.address, token="s3cret") as client:
            assert client.call("ping") == "pong"
        with Client(*st.address, token="nope") as client, pytest.raises(RemoteError, match="authentication failed"):
            client.call("ping")
        with Client(*st.address) as client:
            with pytest.raises(RemoteError, match="authentication required"):
                client.call("ping")


def test_a_peer_that_never_authenticates_is_closed_however_it_trickles(monkeypatch):
    """With RPC_TOKEN set, a peer without it held a connection slot, and up to
    RPC_MAX_MESSAGE of buffered input, for as long as it sent a byte every 299 s: a
    thousand such peers locked every caller out. It has AUTH_TIMEOUT to authenticate."""
    from elric import rpc
    monkeypatch.setattr(rpc, "AUTH_TIMEOUT", 0.3, raising=False)

    async def main():
        async with serving(token="s3cret") as server:
            bystander = await AsyncClient.connect(*server.address, token="s3cret")
            raw = await Raw.open(server.address)
            raw.send(b"\x94\x00\x01\xa4auth\x91\xdb\x00\x10\x00\x00")   # a 1 MB token...

            async def trickle():
                while not raw.writer.is_closing():
                    raw.send(b"x")
                    await asyncio.sleep(0.02)
            sending = asyncio.create_task(trickle())
            assert await raw.next() == ("closed", None)
            sending.cancel()
            raw.close()
            await eventually(lambda: server.connection_count == 1, "the peer's slot freed")
            assert await bystander.call("ping") == "pong"
            await bystander.close()
    arun(main())


# -- connection loss ------------------------------------------------------------------

def test_async_pending_call_fails_promptly_when_server_closes():
    async def main():
        started = asyncio.Event()

        async def hang():
            started.set()
            await asyncio.Event().wait()

        async with serving(basic_handlers(hang=hang)) as server:
            client = await AsyncClient.connect(*server.address, timeout=60)
            call = asyncio.create_task(client.call("hang"))
            await asyncio.wait_for(started.wait(), DEADLINE)
            t0 = time.monotonic()
            await server.close(grace=0.2)     # a call that never ends is cut after grace
            with pytest.raises(RPCConnectionError, match="closed by the server"):
                await asyncio.wait_for(call, DEADLINE)
            assert time.monotonic() - t0 < 5
            with pytest.raises(RPCConnectionError):
                await client.call("ping")
            await client.close()
    arun(main())


class Slow:
    """A handler that runs until ``release`` is set, then answers "done"."""

    def __init__(self):
        self.started, self.release, self.finished = asyncio.Event(), asyncio.Event(), []

    async def __call__(self):
        self.started.set()
        await self.release.wait()
        self.finished.append(True)
        return "done"


@contextlib.asynccontextmanager
async def a_slow_call_running():
    """A server running a client's call of Slow: (slow, server, client, the call's task)."""
    slow = Slow()
    async with serving(basic_handlers(slow=slow)) as server:
        client = await AsyncClient.connect(*server.address, timeout=60)
        call = asyncio.create_task(client.call("slow"))
        await asyncio.wait_for(slow.started.wait(), DEADLINE)
        yield slow, server, client, call


def test_close_lets_calls_in_flight_finish_and_answer():
    """A closing server reads no new request, but a call already running finishes and
    its answer is sent: cutting it short could leave its state half-written."""
    async def main():
        async with a_slow_call_running() as (slow, server, client, call):
            closing = asyncio.create_task(server.close())
            await asyncio.sleep(0)            # let close() stop the reading first
            later = asyncio.create_task(client.call("ping"))
            await asyncio.sleep(0)
            assert not closing.done()         # waiting for the call in flight
            slow.release.set()
            assert await asyncio.wait_for(call, DEADLINE) == "done"
            await asyncio.wait_for(closing, DEADLINE)
            assert slow.finished == [True]
            with pytest.raises(RPCConnectionError):   # read by nobody: never answered
                await asyncio.wait_for(later, DEADLINE)
            await client.close()
    arun(main())


def test_close_lets_a_call_finish_whose_client_has_gone():
    """A client that gave up (closed its connection) leaves its call running; the server
    closing then still lets it finish rather than cutting it half-way."""
    async def main():
        async with a_slow_call_running() as (slow, server, client, call):
            await client.close()
            with pytest.raises(RPCConnectionError):
                await call
            # the server has seen the client go: its connection waits for the call
            deadline = time.monotonic() + DEADLINE
            while not all(c.reader.at_eof() for c in server._connections.values()):
                assert time.monotonic() < deadline
                await asyncio.sleep(0.01)
            for _ in range(3):
                await asyncio.sleep(0)        # (its run() goes on to wait for the call)
            closing = asyncio.create_task(server.close())
            await asyncio.sleep(0)
            assert not closing.done()          # waiting for the call of the gone client
            slow.release.set()
            await asyncio.wait_for(closing, DEADLINE)
            assert slow.finished == [True]
    arun(main())


def test_call_timeout():
    async def main():
        async def hang():
            await asyncio.Event().wait()

        async with serving(basic_handlers(hang=hang)) as server:
            client = await AsyncClient.connect(*server.address)
            with pytest.raises(RPCTimeoutError):
                await client.call("hang", timeout=0.1)
            assert await client.call("ping") == "pong"
            await client.close()
    arun(main())


def test_not_listening():
    port = free_port()
    expected = (f"cannot reach elric master at 127.0.0.1:{port}: Connection refused (is an "
                "elric master running there? clients find it by MASTER_ADDRESS)")

    async def main():
        with pytest.raises(RPCConnectionError) as info:
            await AsyncClient.connect("127.0.0.1", port)
        assert str(info.value) == expected
    arun(main())
    with Client("127.0.0.1", port) as client, pytest.raises(RPCConnectionError) as info:
        client.call("ping")
    assert str(info.value) == expected


def ping_errors(port: int, error: type[Exception], timeout: float = DEADLINE) -> list:
    """The ``error`` a ping to 127.0.0.1:``port`` raises: the blocking client's, the async's."""
    async def ping():
        client = await AsyncClient.connect("127.0.0.1", port, timeout=timeout)
        with pytest.raises(error) as info:
            await client.call("ping")
        await client.close()
        return info.value
    with Client("127.0.0.1", port, timeout=timeout) as client, \
            pytest.raises(error) as info:
        client.call("ping")
    return [info.value, arun(ping())]


@contextlib.contextmanager
def peer_answering(reply: bytes, *, then_read: bool = False):
    """A TCP peer answering each of two connections' first message with ``reply`` (then
    reading until the client closes, if ``then_read``); yields its port."""
    with socket.create_server(("127.0.0.1", 0)) as peer:
        def answer():
            for _ in range(2):
                conn, _ = peer.accept()
                with conn:
                    conn.recv(1024)
                    conn.sendall(reply)
                    if then_read:
                        conn.recv(1024)
        threading.Thread(target=answer, daemon=True).start()
        yield peer.getsockname()[1]


def test_an_address_that_is_no_elric_masters_is_named_as_the_likely_mistake(redis_url):
    """MASTER_ADDRESS set to Redis's address (or a web server's): a CLI command waited its
    30 s, then said only "no answer from elric master at ... to ping"; text a server sent
    back read as small ints and was dropped, so that too ended only in a timeout."""
    from urllib.parse import urlparse

    hint = "is MASTER_ADDRESS an elric master's address (not, say, Redis's)?"
    redis_port = urlparse(redis_url).port   # Redis waits for a line end: no answer at all

    for error in ping_errors(redis_port, RPCTimeoutError, timeout=0.5):
        assert str(error) == (f"no answer from elric master at 127.0.0.1:{redis_port} to ping "
                              f"within 0.5s; nothing has answered on this connection: {hint}")

    with peer_answering(b"HTTP/1.0 400 Bad request\r\n\r\n") as port:   # a web server
        for error in ping_errors(port, RPCConnectionError):
            assert str(error) == (f"connection to elric master at 127.0.0.1:{port} lost: it "
                                  "sent b'HTTP/1.0 400 Bad request\\r\\n\\r\\n', no msgpack-rpc "
                                  f"response: {hint}")

    async def answered_then_hung():   # a master that answered: a plain timeout, no hint
        async def hang():
            await asyncio.Event().wait()

        async with serving(basic_handlers(hang=hang)) as server:
            client = await AsyncClient.connect(*server.address)
            assert await client.call("ping") == "pong"
            with pytest.raises(RPCTimeoutError) as info:
                await client.call("hang", timeout=0.1)
            await client.close()
            assert "nothing has answered" not in str(info.value)
    arun(answered_then_hung())


def test_a_response_whose_msgid_is_no_integer_is_a_lost_connection():
    """A peer answering [1, [1], nil, x] (an array as msgid): the blocking client raised a
    bare TypeError (unhashable type) and kept the connection, whose next answers were out
    of step; the async client's reader died with it, logged as an unretrieved exception,
    and its calls said "closed by the server"."""
    with peer_answering(msgpack.packb([1, [1], None, "pong"]), then_read=True) as port:
        for error in ping_errors(port, RPCConnectionError):
            assert "lost: it sent b'\\x94\\x01\\x91\\x01" in str(error), error
            assert "no msgpack-rpc response" in str(error), error


def test_blocking_client_fails_on_broken_connection_then_reconnects():
    started = threading.Event()

    async def hang():
        started.set()
        await asyncio.Event().wait()

    st = ServerThread(basic_handlers(hang=hang)).__enter__()
    port = st.address[1]
    client = Client("127.0.0.1", port, timeout=60)
    try:
        assert client.call("ping") == "pong"
        errors = []
        caller = threading.Thread(target=lambda: errors.append(_raises(client.call, "hang")))
        caller.start()
        assert started.wait(DEADLINE)
        st.__exit__(None, None, None)
        caller.join(DEADLINE)
        assert isinstance(errors[0], RPCConnectionError) and not isinstance(errors[0], RPCTimeoutError)
        with pytest.raises(RPCConnectionError, match="cannot reach"):
            client.call("ping")
        with ServerThread(port=port):
            assert client.call("ping") == "pong"
    finally:
        client.close()


def _raises(fn, *args):
    try:
        fn(*args)
    except Exception as exc:
        return exc
    return None


def test_blocking_client_is_thread_safe():
    with ServerThread() as st, Client(*st.address) as client:
        results = {}

        def work(n):
            results[n] = [client.call("echo", [n, i]) for i in range(25)]

        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(DEADLINE)
        assert results == {n: [[n, i] for i in range(25)] for n in range(8)}


def test_client_refuses_oversized_request():
    with ServerThread() as st, Client(*st.address, max_message=1024) as client:
        with pytest.raises(RPCError, match="over the 1024-byte limit"):
            client.call("echo", "x" * 2000)
        assert client.call("ping") == "pong"


def test_parse_address():
    assert parse_address("127.0.0.1:7100") == ("127.0.0.1", 7100)
    assert parse_address("[::1]:80") == ("::1", 80)
    for bad in ["", "host", "host:", ":80", "host:http", "host:70000", "host:-1"]:
        with pytest.raises(ValueError, match="expected host:port"):
            parse_address(bad)


# -- the legacy msgpack-rpc-python client ---------------------------------------------

LEGACY_SCRIPT = SCRIPT_PRELUDE + textwrap.dedent("""
    client = msgpackrpc.Client(msgpackrpc.Address("127.0.0.1", int(sys.argv[1])), timeout=10)
    out = {"ping": norm(client.call("ping")),
           "echo": norm(client.call("echo", {"name": "job-1", "args": [1, 2.5, None, True],
                                             "meta": {"k": "v"}}))}
    try:
        client.call("nope")
    except msgpackrpc.error.RPCError as exc:
        out["missing"] = norm(exc.args[0])
    client.close()
    print(json.dumps(out))
""")


def test_legacy_msgpack_rpc_python_client():
    python = legacy_python()  # built once, before the loop runs: it blocks

    async def main():
        async with serving() as server:
            proc = await asyncio.create_subprocess_exec(
                python, "-c", LEGACY_SCRIPT, str(server.address[1]),
                stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE)
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, err.decode()
            return json.loads(out.decode().strip().splitlines()[-1])

    assert arun(main()) == {
        "ping": "pong",
        "echo": {"name": "job-1", "args": [1, 2.5, None, True], "meta": {"k": "v"}},
        "missing": {"code": "method_not_found", "message": "'nope' method not found"},
    }


def test_an_error_with_a_code_that_is_no_code_keeps_it_as_sent():
    """A server's error code that is not one of ours (even an unhashable one) is kept as
    it came, never raised over: it would kill an AsyncClient's read loop."""
    from elric.contract import ErrorCode

    assert RemoteError({"code": "not_found", "message": "m"}).code is ErrorCode.NOT_FOUND
    odd = RemoteError({"code": ["x"], "message": "no such job"})
    assert odd.code == ["x"] and str(odd) == "no such job"



def _fork(fn) -> int:
    """Run ``fn`` in a child forked from this process; its pid (exit status 1 if it raised)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            fn()
            code = 0
        finally:
            os._exit(code)
    return pid


def _exit_status(pid: int, timeout=DEADLINE) -> int:
    """The child's exit status; -9 if it did not end within ``timeout`` and was killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -9


def test_a_forked_child_gets_a_connection_of_its_own():
    # A blocking client made before a fork (a prefork server, multiprocessing) must not
    # share its socket with the child: both would read each other's answers.
    with ServerThread() as st, Client(*st.address) as client:
        assert client.call("ping") == "pong"

        def child():
            for i in range(300):
                assert client.call("echo", ["child", i]) == ["child", i]

        pid = _fork(child)
        for i in range(300):
            assert client.call("echo", ["parent", i]) == ["parent", i]
        assert _exit_status(pid) == 0


def test_a_child_forked_while_a_call_is_in_flight_can_call():
    # The parent's lock was held at the fork: in the child it would stay held for good.
    release = threading.Event()

    async def slow():
        await asyncio.get_running_loop().run_in_executor(None, release.wait, DEADLINE)
        return "slow"

    with ServerThread(basic_handlers(slow=slow)) as st, Client(*st.address) as client:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(client.call, "slow")
            wait_for(client._lock.locked, DEADLINE, what="the slow call holding the lock")
            try:
                assert _exit_status(_fork(lambda: client.call("ping", timeout=5))) == 0
            finally:
                release.set()
            assert in_flight.result(DEADLINE) == "slow"


def test_a_connection_whose_socket_timed_out_ends_while_its_call_runs():
    """A read failing with the socket's own ETIMEDOUT (its peer gone: the kernel's
    retransmissions or keepalives ran out) was taken for the idle timeout: with a call in
    flight the connection read again, failing at once, with no await between: the event
    loop spun there, the master frozen, and the call it waited for never ended."""
    async def main():
        release, reads = asyncio.Event(), []

        async def hang():
            await release.wait()
            return "late"
        async with serving(basic_handlers(hang=hang)) as server:
            client = await AsyncClient.connect(*server.address, timeout=None)
            call = asyncio.ensure_future(client.call("hang"))
            await eventually(lambda: any(c.tasks for c in server._connections.values()),
                             "the call in flight")
            [conn] = server._connections.values()
            real_read = conn.reader.read

            async def read(n):
                reads.append(n)
                if len(reads) > 3:   # the spin: end it, for the test to say so
                    raise ConnectionResetError("spun")
                return await real_read(n)
            conn.reader.read = read
            conn.reader.set_exception(TimeoutError(errno.ETIMEDOUT, "Connection timed out"))
            await asyncio.sleep(0)
            release.set()
            await eventually(lambda: not server._connections, "the connection ended")
            assert reads == [], f"read {len(reads)} time(s) more after the socket failed"
            call.cancel()
            await client.close()
    arun(main())


def test_a_call_whose_send_fails_with_any_socket_error_is_a_connection_error():
    """A send failing with an OSError that is no ConnectionError (EHOSTUNREACH, the read
    side's error that drain raises) escaped call() as itself: a worker sending child jobs,
    which waits out a lost master (RPCConnectionError), stopped on it instead."""
    async def main():
        async with serving() as server:
            client = await AsyncClient.connect(*server.address, timeout=5)

            async def unreachable():
                raise OSError(errno.EHOSTUNREACH, "No route to host")
            client._writer.drain = unreachable
            with pytest.raises(RPCConnectionError, match="No route to host"):
                await client.call("ping")
            await client.close()
    arun(main())
