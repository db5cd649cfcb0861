"""A real master process under hostile input: fuzzed frames, oversized frames, a thousand idle
connections; and no pickle (or its kin) anywhere in elric's sources."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import socket

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from elric.contract import METHODS
from elric.rpc import AsyncClient, Client, RemoteError
from tests.conftest import ROOT, Cluster, wait_for

MAX_MESSAGE = 1 << 20  # the master under test: 1 MiB frames at most
PING_ID = 0xFFFFFFFF   # fuzzed requests use smaller msgids
PING = msgpack.packb([0, PING_ID, "ping", []])
IO_TIMEOUT = 15.0      # a read that waits this long means the master hung on us


@pytest.fixture
def master(redis_url, tmp_path):
    # JOB_MODULES: a fuzzed spec that happens to be valid can only name the tests' jobs
    c = Cluster(redis_url, tmp_path, RPC_MAX_MESSAGE=MAX_MESSAGE, JOB_MODULES="tests.jobs",
                LOG_LEVEL="WARNING")
    c.start_master()
    host, port = c.address.rsplit(":", 1)
    c.port = int(port)
    c.proc = c.procs[0]
    yield c
    c.close()


def rss(proc) -> int:
    return psutil.Process(proc.pid).memory_info().rss


# --- frames ---------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=40) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
        st.text(max_size=10) | st.integers(-5, 5), inner, max_size=5),
    max_leaves=12)
msgids = st.integers(0, PING_ID - 1)
methods = st.sampled_from([m for m in METHODS if m != "auth"])


def packed(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def spec_like():
    keys = st.sampled_from(["func", "args", "kwargs", "job_id", "queue", "priority",
                            "max_retries", "timeout", "batch", "trigger", "dedupe_key",
                            "dedupe_scope", "bogus"])
    funcs = st.sampled_from(["tests.jobs:Add", "tests.jobs:NotAJob", "os:system",
                             "tests.jobs_faults:Touch", "nope", ""]) | st.text(max_size=20)
    return st.fixed_dictionaries({"func": funcs}, optional={}).flatmap(
        lambda base: st.dictionaries(keys, msgpack_values, max_size=5).map(
            lambda extra: {**extra, **base}))


# ("complete", bytes): whole msgpack objects; the stream goes on after them.
# ("stream", bytes): may end mid-object; sent last on its connection, then EOF.
valid_requests = st.builds(lambda i, m, p: packed([0, i, m, p]), msgids, methods,
                           st.lists(msgpack_values, max_size=4))
submits = st.builds(lambda i, s: packed([0, i, "submit_job", [s]]), msgids, spec_like()) | \
    st.builds(lambda i, s: packed([0, i, "submit_jobs", [s]]), msgids,
              st.lists(spec_like(), max_size=4))
unknown = st.builds(lambda i, m, p: packed([0, i, m, p]), msgids, st.text(max_size=30),
                    st.lists(msgpack_values, max_size=3))
notifications = st.builds(lambda m, p: packed([2, m, p]), methods | st.text(max_size=10),
                          st.lists(msgpack_values, max_size=3))
wrong_shapes = st.builds(packed, msgpack_values) | st.builds(
    lambda t, i, m, p: packed([t, i, m, p]), st.integers(-3, 5) | st.text(max_size=3),
    msgpack_values, msgpack_values, msgpack_values)
deep = st.integers(65, 3000).map(lambda d: b"\x91" * d + b"\xc0") | st.builds(
    lambda i, d: b"\x94\x00" + packed(i) + packed("submit_job") + b"\x91" * (d + 1) + b"\xc0",
    msgids, st.integers(60, 900))
complete = st.tuples(st.just("complete"), valid_requests | submits | unknown | notifications
                     | wrong_shapes | deep)

truncated = st.builds(lambda data, cut: data[:max(1, int(len(data) * cut))],
                      valid_requests | submits, st.floats(0.0, 0.999))
huge_headers = st.builds(
    lambda code, n, tail: bytes([code]) + n.to_bytes(4, "big") + tail,
    st.sampled_from([0xdb, 0xc6, 0xc9, 0xdd, 0xdf]),   # str32 bin32 ext32 array32 map32
    st.integers(MAX_MESSAGE + 1, 2**32 - 1), st.binary(max_size=64))
huge_in_request = st.builds(
    lambda i, code, n: b"\x94\x00" + packed(i) + packed("submit_job") + b"\x91"
    + bytes([code]) + n.to_bytes(4, "big"),
    msgids, st.sampled_from([0xdb, 0xc6, 0xdd, 0xdf]), st.integers(MAX_MESSAGE + 1, 2**32 - 1))
stream = st.tuples(st.just("stream"), st.binary(min_size=1, max_size=300) | truncated
                   | huge_headers | huge_in_request)

frames = st.one_of(complete, complete, stream)


class Conn:
    """A raw socket to the master that knows whether the master closed it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        self.unpacker = msgpack.Unpacker(raw=False, unicode_errors="surrogateescape",
                                       strict_map_key=False)   # replies may echo int keys
        self.internal: list = []

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except (BrokenPipeError, ConnectionResetError):
            return False

    def until_pong_or_close(self) -> bool:
        """True when the ping was answered; False when the master closed the connection."""
        while True:
            for msg in self.unpacker:
                if isinstance(msg, list) and msg[:2] == [1, PING_ID] and msg[3] == "pong":
                    return True
                if isinstance(msg, list) and len(msg) == 4 and isinstance(msg[2], str) \
                        and msg[2].startswith("internal error"):
                    self.internal.append(msg[2])
            try:
                data = self.sock.recv(65536)  # socket.timeout: the master hung on us
            except ConnectionResetError:
                return False
            if not data:
                return False
            self.unpacker.feed(data)

    def until_close(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)  # socket.timeout: the master hung on us
            except ConnectionResetError:
                return
            if not data:
                return

    def close(self) -> None:
        self.sock.close()


def test_fuzzed_frames_do_not_hurt_a_real_master(master):
    control = Client("127.0.0.1", master.port, timeout=IO_TIMEOUT)
    assert control.call("ping") == "pong"
    start_rss = rss(master.proc)
    sent = {"complete": 0, "stream": 0, "closed": 0}
    internal: list[str] = []

    @settings(max_examples=400, deadline=None, database=None, derandomize=False,
              phases=[Phase.generate, Phase.shrink],
              suppress_health_check=list(HealthCheck))
    @given(st.lists(frames, min_size=26, max_size=40))
    def run(batch):
        conn = Conn(master.port)
        try:
            for kind, data in batch:
                if kind == "complete":
                    ok = conn.send(data + PING) and conn.until_pong_or_close()
                else:
                    if conn.send(data):
                        conn.sock.shutdown(socket.SHUT_WR)
                        conn.until_close()
                    ok = False
                sent[kind] += 1
                if not ok:
                    sent["closed"] += 1
                    internal.extend(conn.internal)
                    conn.close()
                    conn = Conn(master.port)
        finally:
            internal.extend(conn.internal)
            conn.close()
        assert control.call("ping") == "pong"

    run()
    total = sent["complete"] + sent["stream"]
    assert total >= 10_000, sent
    assert master.proc.alive(), master.proc.log()[-3000:]
    assert control.call("ping") == "pong"
    fresh = Client("127.0.0.1", master.port, timeout=IO_TIMEOUT)
    assert fresh.call("ping") == "pong" and isinstance(fresh.call("stats"), dict)
    fresh.close()
    control.close()
    end_rss = rss(master.proc)
    assert end_rss < 2 * start_rss + 50 * 2**20, (start_rss, end_rss)
    assert internal == [], sorted(set(internal))[:20]  # bad input is a clear answer, not a crash


def test_oversized_frame_closes_the_connection(master):
    control = Client("127.0.0.1", master.port, timeout=IO_TIMEOUT)
    assert control.call("ping") == "pong"
    start_rss = rss(master.proc)
    # headers that claim more than the limit: refused on sight (arrays, maps) ...
    for header in (b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
                   b"\x94\x00\x01\xa4ping\xdd" + (MAX_MESSAGE + 1).to_bytes(4, "big")):
        conn = Conn(master.port)
        assert conn.send(header)
        conn.until_close()  # without our EOF: the master closed it
        conn.close()
    # ... and a str / bin that really is bigger: closed once the limit is passed
    for code in (0xdb, 0xc6):
        conn = Conn(master.port)
        body = bytes([code]) + (4 * MAX_MESSAGE).to_bytes(4, "big") + b"x" * (2 * MAX_MESSAGE)
        conn.send(body)  # may break off midway: the master stopped reading
        conn.until_close()
        conn.close()
    # a request just over the limit, as a client would build it
    big = msgpack.packb([0, 1, "ping", ["y" * MAX_MESSAGE]])
    conn = Conn(master.port)
    conn.send(big)
    conn.until_close()
    conn.close()
    assert control.call("ping") == "pong"
    assert master.proc.alive()
    assert rss(master.proc) < 2 * start_rss + 50 * 2**20
    assert "over the" in master.proc.log() or "limit" in master.proc.log()
    control.close()


def test_connections_do_not_keep_their_last_large_request(master):
    """An open connection kept its last request, and the buffer its decoder grew for it,
    until it closed: 200 clients that had each sent 8 MiB held over 3 GB."""
    clients = [Client("127.0.0.1", master.port, timeout=IO_TIMEOUT) for _ in range(48)]
    try:
        assert all(c.call("ping") == "pong" for c in clients)   # all connected
        start = rss(master.proc)
        for c in clients:   # one after another
            with pytest.raises(RemoteError, match="ping takes 0 arguments, got 1"):
                c.call("ping", b"x" * (MAX_MESSAGE - 64))
        grown = rss(master.proc) - start
        assert grown < 20 * MAX_MESSAGE, f"grew {grown >> 20} MiB"   # 48 MiB was sent
    finally:
        for c in clients:
            c.close()


def test_many_large_requests_at_once_stay_within_the_masters_budget(master):
    """200 clients sending a 7 MiB request each at once made the master read them all at
    once (1.4 GB, OOM-killed), and each connection's decoder kept its grown buffer after.
    It holds a few messages' worth at a time (the others wait in TCP): all are answered,
    and its peak memory grows by a small part of what was sent."""
    status = f"/proc/{master.proc.pid}/status"
    if not os.path.exists(status):
        pytest.skip("needs Linux's /proc")

    def peak() -> int:   # the master's peak resident memory, in bytes
        with open(status) as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) << 10

    clients = 128   # each sends one request just under RPC_MAX_MESSAGE: 128 MiB in all

    async def main():
        conns = [await AsyncClient.connect("127.0.0.1", master.port, timeout=IO_TIMEOUT)
                 for _ in range(clients)]
        try:
            with open(f"/proc/{master.proc.pid}/clear_refs", "w") as f:
                f.write("5")   # the peak starts again from now
            start = peak()
            payload = b"x" * (MAX_MESSAGE - 64)
            answers = await asyncio.gather(*(c.call("ping", payload) for c in conns),
                                           return_exceptions=True)
            return start, answers
        finally:
            await asyncio.gather(*(c.close() for c in conns))

    start, answers = asyncio.run(main())
    grown = peak() - start
    assert [str(a) if isinstance(a, RemoteError) else a for a in answers] == \
        ["ping takes 0 arguments, got 1"] * clients   # every one read and answered
    # what it may hold: 4 MiB, one message more and a chunk (64 KiB) per connection, each
    # decoded too; and asyncio's read buffers. Some 36 MiB, of the 128 MiB sent at once
    # (with no bound, over 100 MiB)
    assert grown < 64 * MAX_MESSAGE, f"peak grew {grown >> 20} MiB"
    assert master.proc.alive()


def raise_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        if hard != resource.RLIM_INFINITY and hard < n:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {n}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, hard))


@contextlib.contextmanager
def master_and_idle_connections(redis_url, tmp_path):
    """A master that may hold 4096 files, its port, a client that pinged it, and a list for
    idle connections: closed, with the master, after."""
    raise_nofile(4096)  # before the master starts: it inherits the limit
    c = Cluster(redis_url, tmp_path, LOG_LEVEL="WARNING")
    idle: list[socket.socket] = []
    try:
        c.start_master()
        port = int(c.address.rsplit(":", 1)[1])
        control = Client("127.0.0.1", port, timeout=IO_TIMEOUT)
        assert control.call("ping") == "pong"
        yield c, port, control, idle
    finally:
        for s in idle:
            s.close()
        c.close()


def test_a_thousand_idle_connections_and_another_client_is_served(redis_url, tmp_path):
    with master_and_idle_connections(redis_url, tmp_path) as (c, port, control, idle):
        for _ in range(1000):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT))
        # served while a thousand connections sit there
        assert control.call("ping") == "pong"
        reply = control.call("submit_job", {"func": "tests.jobs:Add", "args": [1, 2],
                                            "job_id": "while-idle"})
        assert reply == {"job_id": "while-idle", "status": "queued"}
        assert control.call("get_job", "while-idle")["status"] == "queued"
        # a new client too
        with Client("127.0.0.1", port, timeout=IO_TIMEOUT) as other:
            assert other.call("ping") == "pong"
        # every idle one was accepted and is still open: each answers a ping now
        for s in idle:
            s.sendall(PING)
        for s in idle:
            unpacker = msgpack.Unpacker(raw=False)
            while True:
                data = s.recv(4096)
                assert data, "an idle connection was closed"
                unpacker.feed(data)
                got = list(unpacker)
                if got:
                    assert got == [[1, PING_ID, None, "pong"]]
                    break
        for s in idle:
            s.close()
        idle.clear()
        assert control.call("ping") == "pong"
        control.close()
        assert c.procs[0].alive()


def test_connections_past_the_limit_are_closed_and_others_served(redis_url, tmp_path):
    from elric.rpc import MAX_CONNECTIONS

    with master_and_idle_connections(redis_url, tmp_path) as (c, port, control, idle):
        for _ in range(MAX_CONNECTIONS - 1):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT))
        assert control.call("ping") == "pong"  # all accepted before this answer
        extra = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
        extra.sendall(PING)
        try:
            assert extra.recv(4096) == b""  # closed, not served
        except ConnectionResetError:
            pass
        extra.close()
        assert control.call("ping") == "pong"
        idle.pop().close()

        def served():
            try:
                with Client("127.0.0.1", port, timeout=IO_TIMEOUT) as again:
                    return again.call("ping") == "pong"
            except Exception:
                return False

        wait_for(served, timeout=20, what="a freed slot is served")
        control.close()
        assert c.procs[0].alive()


def test_idle_connections_leave_the_master_files_for_redis(redis_url, tmp_path):
    """Under a soft RLIMIT_NOFILE of 1024 (a common default), idle connections short of
    MAX_CONNECTIONS took every file the master had: its Redis pool could open no more
    connections, so a connected client's calls failed with redis_unavailable ("Too many
    open files") and the scheduler lost its lease. The master raises its soft limit
    toward the hard one, enough for MAX_CONNECTIONS and the Redis pool."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2048:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 2048")
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))   # the master inherits it
    c = Cluster(redis_url, tmp_path, LOG_LEVEL="WARNING")
    try:
        c.start_master()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    idle: list[socket.socket] = []
    try:
        port = int(c.address.rsplit(":", 1)[1])
        control = Client("127.0.0.1", port, timeout=IO_TIMEOUT)
        assert control.call("ping") == "pong"
        for _ in range(350):   # past the 300 files, within the listen backlog beyond
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT))
        # calls at once, each needing a Redis connection of its own
        specs = [({"func": "tests.jobs:Add", "job_id": f"j{i}"},) for i in range(40)]
        replies = control.call_many("submit_job", specs, depth=40)
        assert replies == [{"job_id": f"j{i}", "status": "queued"} for i in range(40)]
        control.close()
        assert c.procs[0].alive()
    finally:
        for s in idle:
            s.close()
        c.close()

# --- no pickle ------------------------------------------------------------------------

FORBIDDEN = re.compile(r"^\s*(import|from)\s+(c?pickle|cloudpickle|dill|marshal|shelve|_pickle)"
                       r"\b|\b(c?pickle|cloudpickle|dill|_pickle)\.\w|\bmarshal\.loads?\b"
                       r"|\bcloudpickle\b", re.M)


def test_no_pickle_anywhere_in_elric():
    sources = []
    for folder, _, files in os.walk(os.path.join(ROOT, "elric")):
        sources += [os.path.join(folder, f) for f in files if f.endswith(".py")]
    assert len(sources) >= 10
    hits = []
    for path in sources:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        for m in FORBIDDEN.finditer(text):
            line = text.count("\n", 0, m.start()) + 1
            hits.append(f"{os.path.relpath(path, ROOT)}:{line}: {m.group(0).strip()}")
    assert hits == []
    # and the pattern does catch what it is meant to
    for bad in ("import pickle", "from pickle import loads", "x = pickle.loads(b)",
                "import cloudpickle", "marshal.loads(data)", "import dill"):
        assert FORBIDDEN.search(bad), bad


def test_a_low_hard_file_limit_lowers_the_connections_taken(monkeypatch, caplog):
    """Where the hard limit leaves no room for MAX_CONNECTIONS beside the Redis pool, the
    master takes fewer connections (and says so) rather than run out of files."""
    from elric import master

    limits = {resource.RLIMIT_NOFILE: (256, 512)}
    monkeypatch.setattr(resource, "getrlimit", limits.__getitem__)
    monkeypatch.setattr(resource, "setrlimit", limits.__setitem__)
    fit = 512 - master.MAX_REDIS_CONNECTIONS - master.SPARE_FILES
    assert master._connections_that_fit(1024) == fit
    assert limits[resource.RLIMIT_NOFILE] == (512, 512)
    assert f"takes {fit} RPC connections, not 1024" in caplog.text
    limits[resource.RLIMIT_NOFILE] = (256, resource.RLIM_INFINITY)
    assert master._connections_that_fit(1024) == 1024
    assert limits[resource.RLIMIT_NOFILE] == (1024 + master.MAX_REDIS_CONNECTIONS
                                              + master.SPARE_FILES, resource.RLIM_INFINITY)
