"""Tests of elric.rawredis: BulkRedis (raw RESP pipelines on connections made by a
redis-py client's pool) against real, private redis-servers, and its reply parser
``_parse`` as a unit.

pytest-asyncio is not installed: every test drives its coroutine with asyncio.run.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
from urllib.parse import quote

import numpy as np
import pytest
import redis
import redis.asyncio as aredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.credentials import CredentialProvider
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from elric.rawredis import BulkRedis, _Incomplete, _parse, encode
from elric.rbloom import bitfield, stage_geometry
from elric.redis_server import RedisServer, find_redis_server, free_port
from tests.conftest import wait_for

PASSWORD = "s3cret:p@ss/word"          # needs quoting in a URL
QPASS = quote(PASSWORD, safe="")


def run(coro):
    return asyncio.run(coro)


async def execute(url, *commands, **client_kw):
    """Send ``commands`` (already encoded) in one buffer through a client of ``url``."""
    bulk = BulkRedis(aredis.Redis.from_url(url, **client_kw))
    try:
        return await bulk.execute(b"".join(commands), len(commands))
    finally:
        await bulk.close()
        await bulk.client.aclose()


def idle(bulk: BulkRedis) -> list:
    """The connections BulkRedis keeps for its next calls."""
    return bulk._idle


def count_reads(bulk: BulkRedis) -> list:
    """Wrap the read of the client's (single) idle connection; returns the chunk sizes."""
    assert len(idle(bulk)) == 1
    reader = idle(bulk)[0]._reader
    sizes: list[int] = []
    read = reader.read

    async def counting(n=-1):
        chunk = await read(n)
        sizes.append(len(chunk))
        return chunk

    reader.read = counting
    return sizes


# --- a password-protected server (with a unix socket) of this module ---------------------

class PrivateServer:
    """A redis-server this module starts with extra ``args`` (on top of a private folder
    and a log file) and stops by PID; ``client()`` is how it is reached."""

    what = "redis-server"

    def start(self, args: list[str]) -> None:
        out = os.path.join(self.dir, "output.log")   # config errors go here, not to the log
        with open(out, "wb") as sink:
            self.proc = subprocess.Popen([
                find_redis_server(), "--bind", "127.0.0.1", *args, "--dir", self.dir,
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--loglevel", "warning", "--logfile", os.path.join(self.dir, "redis.log"),
            ], stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        try:
            wait_for(self._answers, timeout=10, what=self.what)
        except BaseException:
            self.log_text = "".join(open(os.path.join(self.dir, name), errors="replace").read()
                                    for name in ("output.log", "redis.log")
                                    if os.path.exists(os.path.join(self.dir, name)))
            self.stop()
            raise

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited; see {self.dir}/output.log")
        r = self.client()
        try:
            return r.ping()
        except redis.exceptions.ConnectionError:
            return False
        finally:
            r.close()

    def client(self) -> redis.Redis:
        raise NotImplementedError

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


class AuthServer(PrivateServer):
    """``requirepass`` and a unix socket."""

    what = "password-protected redis-server"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="elric-rawredis-")
        self.sock = os.path.join(self.dir, "redis.sock")
        self.start(["--port", str(self.port), "--unixsocket", self.sock,
                    "--unixsocketperm", "700", "--requirepass", PASSWORD])

    def client(self, db: int = 0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, password=PASSWORD, db=db,
                           socket_timeout=1)

    def url(self, db: int = 0, password: str = QPASS, user: str = "") -> str:
        return f"redis://{user}:{password}@127.0.0.1:{self.port}/{db}"


@pytest.fixture(scope="module")
def auth_server():
    server = AuthServer()
    yield server
    server.stop()


@pytest.fixture
def auth(auth_server):
    c = auth_server.client()
    c.flushall()  # this module's own password-protected server, never a shared one
    c.close()
    return auth_server


# --- execute against the session's server ------------------------------------------------

def test_encode():
    assert encode("SET", b"k\x00", 12) == b"*3\r\n$3\r\nSET\r\n$2\r\nk\x00\r\n$2\r\n12\r\n"
    assert encode() == b"*0\r\n"
    with pytest.raises(TypeError, match="float"):
        encode("SET", "k", 1.5)


def test_execute_returns_replies_in_order(redis_url):
    r = redis.Redis.from_url(redis_url)
    r.set("s", b"\x00\xff\r\nbin")
    r.set("empty", b"")
    r.rpush("l", "a", "b")
    r.close()
    replies = run(execute(
        redis_url,
        encode("GET", "s"),                                  # bulk string
        encode("GET", "missing"),                            # nil
        encode("GET", "empty"),                              # empty bulk string
        encode("INCRBY", "n", 5),                            # integer
        encode("SET", "x", "y"),                             # simple string
        encode("LRANGE", "l", 0, -1),                        # array of bulk strings
        encode("LRANGE", "nothing", 0, -1),                  # empty array
        encode("BITFIELD", "bits", "SET", "u1", 3, 1, "GET", "u1", 3, "GET", "u1", 4,
               "SET", "u1", 3, 0),                           # array of 0/1 -> numpy
        encode("BITFIELD", "bytes", "SET", "u8", 0, 200, "GET", "u8", 0),  # other ints
        encode("EVAL", "return {1, 0, 'z', {1, 1}, {5, 0}}", 0),            # nested
        encode("PING"),
        encode("INCRBY", "n", -7),
    ))
    assert len(replies) == 12
    assert replies[0] == b"\x00\xff\r\nbin"
    assert replies[1] is None
    assert replies[2] == b""
    assert replies[3] == 5 and type(replies[3]) is int
    assert replies[4] == b"OK"
    assert replies[5] == [b"a", b"b"]
    assert replies[6] == []
    bits = replies[7]
    assert isinstance(bits, np.ndarray) and bits.dtype == np.uint8
    assert bits.tolist() == [0, 1, 0, 1]
    assert replies[8] == [0, 200] and isinstance(replies[8], list)
    nested = replies[9]
    assert isinstance(nested, list) and nested[:3] == [1, 0, b"z"]
    assert isinstance(nested[3], np.ndarray) and nested[3].tolist() == [1, 1]
    assert nested[4] == [5, 0] and isinstance(nested[4], list)
    assert replies[10] == b"PONG"
    assert replies[11] == -2


def test_error_reply_is_returned_and_the_connection_survives(redis_url):
    async def body():
        bulk = BulkRedis(aredis.Redis.from_url(redis_url))
        try:
            first = await bulk.execute(
                encode("CLIENT", "ID") + encode("SET", "k", "v") + encode("INCR", "k")
                + encode("NOSUCHCOMMAND", "x") + encode("LPUSH", "k", "z")
                + encode("GET", "k"), 6)
            assert len(idle(bulk)) == 1                    # kept for the next call
            second = await bulk.execute(encode("CLIENT", "ID") + encode("GET", "k"), 2)
            return first, second, bulk.round_trips
        finally:
            await bulk.close()
            await bulk.client.aclose()

    first, second, trips = run(body())
    assert first[1] == b"OK"
    assert isinstance(first[2], ResponseError) and "not an integer" in str(first[2])
    assert isinstance(first[3], ResponseError) and "unknown command" in str(first[3])
    assert isinstance(first[4], ResponseError) and "WRONGTYPE" in str(first[4])
    assert first[5] == b"v"
    assert second == [first[0], b"v"]                      # the same connection, in sync
    assert trips == 2


# --- large replies -----------------------------------------------------------------------

def test_large_bulk_string_over_many_reads(redis_url):
    data = os.urandom(3 * 2**20 + 17)
    r = redis.Redis.from_url(redis_url)
    r.set("big", data)
    r.close()

    async def body():
        bulk = BulkRedis(aredis.Redis.from_url(redis_url))
        try:
            assert await bulk.execute(encode("PING"), 1) == [b"PONG"]
            sizes = count_reads(bulk)
            got = await bulk.execute(encode("GETRANGE", "big", 0, -1) + encode("PING"), 2)
            return got, sizes
        finally:
            await bulk.close()
            await bulk.client.aclose()

    got, sizes = run(body())
    assert got[0] == data and got[1] == b"PONG"
    assert len(sizes) >= 4 and max(sizes) <= 2**20     # split over reads of <= 1 MiB


def test_large_bitfield_reply_over_many_reads(redis_url):
    st_ = stage_geometry(0, 400_000, 0.01, None)
    data = os.urandom(st_.shard_bytes - 2)
    r = redis.Redis.from_url(redis_url)
    r.set("shard", data + b"\x00\x00")
    r.setbit("shard", st_.seal, 1)
    r.close()
    rng = np.random.default_rng(7)
    offs = rng.integers(0, st_.shard_bits, size=300_000, dtype=np.uint64)
    expected = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[offs.astype(np.int64)]
    cmd, order = bitfield(b"shard", st_, offs, write=False)

    async def body():
        bulk = BulkRedis(aredis.Redis.from_url(redis_url))
        try:
            await bulk.execute(encode("PING"), 1)
            sizes = count_reads(bulk)
            got = await bulk.execute(cmd + encode("PING"), 2)
            return got, sizes
        finally:
            await bulk.close()
            await bulk.client.aclose()

    got, sizes = run(body())
    reply = got[0]
    assert isinstance(reply, np.ndarray) and reply.shape == (300_001,)
    assert reply[0] == 1                                   # the seal
    assert (reply[1:] == expected[order]).all()
    assert got[1] == b"PONG"
    assert len(sizes) >= 2                                 # 1.2 MB cannot come in one read


def test_large_reply_of_many_integers_and_many_commands(redis_url):
    """Integers that are not all 0/1 (the list path) and 2,000 replies, over many reads."""
    data = os.urandom(20_000)
    values = [os.urandom(1500) for _ in range(2000)]
    r = redis.Redis.from_url(redis_url)
    r.set("bytes", data)
    r.mset({f"v{i}": v for i, v in enumerate(values)})
    r.close()
    ops = []
    for i in range(20_000):
        ops += [b"GET", b"u8", b"%d" % (8 * i)]

    async def body():
        bulk = BulkRedis(aredis.Redis.from_url(redis_url))
        try:
            await bulk.execute(encode("PING"), 1)
            sizes = count_reads(bulk)
            got = await bulk.execute(
                encode("BITFIELD", "bytes", *ops)
                + b"".join(encode("GET", f"v{i}") for i in range(2000)), 2001)
            return got, sizes
        finally:
            await bulk.close()
            await bulk.client.aclose()

    got, sizes = run(body())
    assert isinstance(got[0], list) and got[0] == list(data)
    assert got[1:] == values
    assert len(sizes) >= 3


# --- URLs, passwords, dbs, the client's settings ------------------------------------------

def test_password_from_url(auth):
    replies = run(execute(auth.url(), encode("SET", "k", "v"), encode("GET", "k")))
    assert replies == [b"OK", b"v"]
    c = auth.client()
    assert c.get("k") == b"v"
    c.close()


def test_wrong_password_raises_connection_error(auth):
    with pytest.raises(RedisConnectionError, match="invalid username-password|WRONGPASS"):
        run(execute(auth.url(password="wrong"), encode("PING")))


def test_username_and_password_from_url(auth):
    c = auth.client()
    c.execute_command("ACL", "SETUSER", "alice", "reset", "on", ">alice-pw", "~*", "+@all")
    try:
        replies = run(execute(auth.url(user="alice", password="alice-pw"),
                              encode("ACL", "WHOAMI")))
        assert replies == [b"alice"]
        with pytest.raises(RedisConnectionError, match="invalid username-password|WRONGPASS"):
            run(execute(auth.url(user="alice", password=QPASS), encode("PING")))
    finally:
        c.execute_command("ACL", "DELUSER", "alice")
        c.close()


def test_db_from_url(auth):
    assert run(execute(auth.url(db=3), encode("SET", "in3", "three"))) == [b"OK"]
    c3, c0 = auth.client(3), auth.client(0)
    try:
        assert c3.get("in3") == b"three"
        assert c0.get("in3") is None
    finally:
        c3.close()
        c0.close()


def test_unix_socket_url_with_password_and_db(auth):
    url = f"unix://:{QPASS}@{auth.sock}?db=2"
    assert run(execute(url, encode("SET", "u", "sock"), encode("GET", "u"))) == [b"OK", b"sock"]
    c = auth.client(2)
    assert c.get("u") == b"sock"
    c.close()


async def through_client(client, buf: bytes, n: int, **seed) -> list:
    """SET ``seed`` through the redis-py ``client``, then send ``buf`` (``n`` commands)
    through ``BulkRedis(client)``; closes the client."""
    try:
        for key, value in seed.items():
            await client.set(key, value)
        bulk = BulkRedis(client)
        try:
            return await bulk.execute(buf, n)
        finally:
            await bulk.close()
    finally:
        await client.aclose()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_connects_where_the_client_does(auth, kind):
    url = auth.url(db=5) if kind == "tcp" else f"unix://:{QPASS}@{auth.sock}?db=5"

    assert run(through_client(aredis.Redis.from_url(url), encode("GET", "via")
                              + encode("SET", "via2", "b"), 2, via="client")) == [b"client", b"OK"]
    c5, c0 = auth.client(5), auth.client(0)
    try:
        assert c5.get("via2") == b"b" and c0.get("via2") is None
    finally:
        c5.close()
        c0.close()


class Creds(CredentialProvider):
    def __init__(self, *creds):
        self.creds, self.calls = creds, 0

    def get_credentials(self):
        self.calls += 1
        return self.creds

    async def get_credentials_async(self):
        return self.get_credentials()


@pytest.mark.parametrize("creds", [(PASSWORD,), ("alice", "alice-pw")])
def test_with_a_credential_provider(auth, creds):
    provider = Creds(*creds)

    client = aredis.Redis(host="127.0.0.1", port=auth.port, db=3, credential_provider=provider)
    admin = auth.client()
    admin.execute_command("ACL", "SETUSER", "alice", "reset", "on", ">alice-pw", "~*", "+@all")
    try:
        assert run(through_client(client, encode("GET", "via") + encode("ACL", "WHOAMI"), 2,
                                  via="provider")) == \
            [b"provider", b"alice" if len(creds) == 2 else b"default"]
        assert provider.calls >= 1
    finally:
        admin.execute_command("ACL", "DELUSER", "alice")
        admin.close()


# --- connection failures -----------------------------------------------------------------

def test_nothing_listening_raises_connection_error():
    bulk = BulkRedis(aredis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0"), timeout=5)
    with pytest.raises(RedisConnectionError):
        run(bulk.execute(encode("PING"), 1))
    assert bulk.round_trips == 0 and idle(bulk) == []


def test_silent_server_raises_timeout_not_hang():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        async def body():
            # silent from the connection's setup on: the client's socket_timeout
            bulk = BulkRedis(aredis.Redis.from_url(f"redis://127.0.0.1:{port}/0",
                                                   socket_timeout=0.5), timeout=0.5)
            try:
                return await asyncio.wait_for(bulk.execute(encode("PING"), 1), 10)
            finally:
                await bulk.close()
                await bulk.client.aclose()

        with pytest.raises(RedisTimeoutError):
            run(body())


def test_server_stopped_between_calls():
    server = RedisServer().start()
    try:
        async def body():
            bulk = BulkRedis(aredis.Redis.from_url(server.url))               # default timeout 30 s
            try:
                assert await bulk.execute(encode("SET", "a", 1) + encode("GET", "a"), 2) \
                    == [b"OK", b"1"]
                assert await bulk.execute(encode("PING"), 1) == [b"PONG"]
                assert bulk.round_trips == 2 and len(idle(bulk)) == 1
                server.stop()
                # the idle connection is dead: an error, not a hang (guard: 10 s)
                with pytest.raises(RedisConnectionError):
                    await asyncio.wait_for(bulk.execute(encode("PING"), 1), 10)
                with pytest.raises(RedisConnectionError):
                    await asyncio.wait_for(bulk.execute(encode("PING"), 1), 10)
                trips = bulk.round_trips
                server.start()
                assert await bulk.execute(encode("PING"), 1) == [b"PONG"]
                assert bulk.round_trips == trips + 1
            finally:
                await bulk.close()
                await bulk.client.aclose()

        run(body())
    finally:
        server.cleanup()


# --- _parse ------------------------------------------------------------------------------
# A generated reply is a tuple: ("int", n) ("bulk", bytes) ("nil",) ("err", text)
# ("simple", bytes) ("arr", [items]) ("nilarr",).

def resp(v) -> bytes:
    kind = v[0]
    if kind == "int":
        return b":%d\r\n" % v[1]
    if kind == "bulk":
        return b"$%d\r\n%s\r\n" % (len(v[1]), v[1])
    if kind == "nil":
        return b"$-1\r\n"
    if kind == "nilarr":
        return b"*-1\r\n"
    if kind == "err":
        return b"-%s\r\n" % v[1].encode()
    if kind == "simple":
        return b"+%s\r\n" % v[1]
    return b"*%d\r\n" % len(v[1]) + b"".join(resp(x) for x in v[1])


def expected(v):
    """What _parse should give, in the comparable form of ``comparable``."""
    kind = v[0]
    if kind == "int":
        return v[1]
    if kind in ("bulk", "simple"):
        return v[1]
    if kind in ("nil", "nilarr"):
        return None
    if kind == "err":
        return ("error", v[1])
    items = v[1]
    if items and all(x[0] == "int" and x[1] in (0, 1) for x in items):
        return ("bits", [x[1] for x in items])
    return [expected(x) for x in items]


def comparable(value):
    if isinstance(value, np.ndarray):
        assert value.dtype == np.uint8 and value.ndim == 1
        return ("bits", value.tolist())
    if isinstance(value, ResponseError):
        return ("error", str(value))
    if isinstance(value, list):
        return [comparable(x) for x in value]
    assert value is None or type(value) in (int, bytes), repr(value)
    return value


_line = st.binary(min_size=0, max_size=12).filter(lambda b: b"\r" not in b and b"\n" not in b)
_leaf = st.one_of(
    st.tuples(st.just("int"), st.integers(-2**63, 2**63 - 1)),
    st.tuples(st.just("int"), st.integers(0, 1)),
    st.tuples(st.just("bulk"), st.binary(max_size=30)),
    st.tuples(st.just("bulk"), st.sampled_from([b"", b"\r\n", b":0\r\n", b"*1\r\n:1"])),
    st.just(("nil",)),
    st.just(("nilarr",)),
    st.tuples(st.just("err"), st.text(alphabet=st.characters(blacklist_characters="\r\n",
                                                             blacklist_categories=("Cs",)),
                                      min_size=0, max_size=20)),
    st.tuples(st.just("simple"), _line),
)
_bits = st.lists(st.tuples(st.just("int"), st.integers(0, 1)), min_size=1, max_size=40)
replies = st.recursive(
    st.one_of(_leaf, st.tuples(st.just("arr"), _bits)),
    lambda children: st.tuples(st.just("arr"), st.lists(children, max_size=6)),
    max_leaves=25,
)


def assert_incomplete(prefix: bytes) -> None:
    try:
        value = _parse(bytearray(prefix), 0)
    except _Incomplete:
        return
    raise AssertionError(f"prefix {prefix!r} parsed as {value!r}")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies)
def test_parse_every_split_point(v):
    data = resp(v)
    for i in range(len(data)):
        assert_incomplete(data[:i])
    buf = bytearray(data)
    value, pos = _parse(buf, 0)
    assert pos == len(data)
    want = expected(v)
    got = comparable(value)
    buf[:] = b"\xff" * len(buf)           # what is parsed does not share the buffer
    assert comparable(value) == got
    assert got == want


@settings(max_examples=200, deadline=None)
@given(st.lists(replies, min_size=1, max_size=5), st.binary(max_size=5))
def test_parse_consecutive_replies_from_an_offset(vs, junk):
    """As _exchange uses it: replies back to back, each from where the last ended."""
    data = junk + b"".join(resp(v) for v in vs)
    buf, pos = bytearray(data), len(junk)
    for v in vs:
        value, pos = _parse(buf, pos)
        assert comparable(value) == expected(v)
    assert pos == len(data)
    with pytest.raises(_Incomplete):
        _parse(buf, pos)


def test_parse_bits_at_random_cut_points():
    """A 0/1 array is only taken once all of its 4-byte elements are there."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 2, size=5000)
    data = b"*5000\r\n" + b"".join(b":%d\r\n" % b for b in bits)
    for cut in sorted(set(rng.integers(len(b"*5000\r\n") + 1, len(data), size=300).tolist())):
        assert_incomplete(data[:cut])
    value, pos = _parse(bytearray(data), 0)
    assert pos == len(data) and value.tolist() == bits.tolist()


def test_parse_refuses_an_unknown_reply_type():
    for data in (b"%1\r\n+a\r\n+b\r\n", b"!3\r\nerr\r\n", b"hello\r\n"):
        with pytest.raises(RedisConnectionError, match="cannot read"):
            _parse(bytearray(data), 0)


def test_array_header_alone_is_incomplete():
    for data in (b"*1\r\n", b"*3\r\n", b"*2\r\n*2\r\n", b"*2\r\n:1\r\n*1\r\n"):
        with pytest.raises(_Incomplete):
            _parse(bytearray(data), 0)


def test_array_with_empty_simple_string():
    assert _parse(bytearray(b"*2\r\n:1\r\n+\r\n"), 0) == ([1, b""], 11)


def test_eval_returning_an_empty_status_in_an_array(redis_url):
    got = run(execute(redis_url, encode("EVAL", "return {1, redis.status_reply('')}", 0),
                      socket_timeout=1.0))
    assert got == [[1, b""]]


# --- TLS (rediss://) --------------------------------------------------------------------------

class TLSServer(PrivateServer):
    """TLS only, on a certificate made here for 127.0.0.1 (openssl). Skips where either
    openssl or TLS in the redis-server binary is missing."""

    what = "TLS redis-server"

    def __init__(self) -> None:
        if shutil.which("openssl") is None:
            pytest.skip("no openssl to make a test certificate")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="elric-rawredis-tls-")
        self.cert = os.path.join(self.dir, "cert.pem")
        key = os.path.join(self.dir, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes",
                        "-keyout", key, "-out", self.cert, "-days", "2",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                       check=True, capture_output=True)
        try:
            self.start(["--port", "0", "--tls-port", str(self.port), "--tls-cert-file",
                        self.cert, "--tls-key-file", key, "--tls-ca-cert-file", self.cert,
                        "--tls-auth-clients", "no", "--requirepass", PASSWORD])
        except BaseException:
            text = getattr(self, "log_text", "")
            if "tls" in text.lower() and ("not supported" in text or "Bad directive" in text):
                pytest.skip(f"this redis-server has no TLS: {text.strip()[-200:]}")
            raise

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url(), ssl_ca_certs=self.cert, socket_timeout=2)

    def url(self, query: str = "") -> str:
        return f"rediss://:{QPASS}@127.0.0.1:{self.port}/0{query}"


@pytest.fixture(scope="module")
def tls():
    server = TLSServer()
    yield server
    server.stop()


def test_tls_verifies_with_the_clients_ca(tls):
    """BulkRedis uses the client's TLS settings (CA file, verification)."""
    client = aredis.Redis.from_url(tls.url(), ssl_ca_certs=tls.cert)
    assert run(through_client(client, encode("GET", "tls") + encode("INCR", "n"), 2,
                              tls="yes")) == [b"yes", 1]


def test_tls_url_with_a_ca_file_and_without_verification(tls):
    assert run(execute(tls.url(f"?ssl_ca_certs={tls.cert}"), encode("PING"))) == [b"PONG"]
    assert run(execute(tls.url("?ssl_cert_reqs=none"), encode("PING"))) == [b"PONG"]


def test_tls_refuses_a_certificate_it_cannot_verify(tls):
    # no CA given: the self-signed certificate is not trusted, and nothing is sent
    with pytest.raises(RedisConnectionError):
        run(execute(tls.url(), encode("SET", "untrusted", "1")))
    c = tls.client()
    try:
        assert c.get("untrusted") is None
    finally:
        c.close()


def test_tls_redis_bloom_filter_end_to_end(tls):
    """The redis-bloom backend against a TLS Redis, as a master uses it."""
    from elric.dedupe import make_filter
    from elric.keys import Keys

    async def body():
        client = aredis.Redis.from_url(tls.url(), ssl_ca_certs=tls.cert)
        f = make_filter("redis-bloom", client, Keys("elrictls"), capacity=1000)
        await f.start()
        try:
            first = await f.check_and_add("s", ["a", "b", "a"])
            second = await f.check_and_add("s", ["a", "c"])
            stats = await f.stats()
            return first, second, stats["s"]["items"]
        finally:
            await f.close()
            await client.aclose()
    assert run(body()) == ([True, True, False], [False, True], 3)
