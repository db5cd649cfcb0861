"""A port picked free can be taken before the process started on it listens there (a test
or a program beside it): the shared start-up paths then pick another port, and only then."""

from __future__ import annotations

import re
import socket

import pytest

import elric.redis_server
from elric.redis_server import RedisServer, RedisServerError, any_taken
from tests.conftest import wait_for


@pytest.fixture
def taken():
    """A port another process (this one) listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def hand_out_first(monkeypatch, port: int) -> None:
    """free_port gives ``port`` first (as if it were taken right after it was found free),
    then free ports."""
    real = elric.redis_server.free_port
    handed = iter([port])
    monkeypatch.setattr(elric.redis_server, "free_port", lambda: next(handed, None) or real())


def test_a_redis_server_whose_port_is_taken_before_it_listens_starts_on_another(
        monkeypatch, taken):
    hand_out_first(monkeypatch, taken)
    with RedisServer() as server:
        assert server.port != taken
        assert server._answers()


def test_a_redis_server_does_not_take_another_ones_answer_for_its_own(monkeypatch):
    """Another redis-server on the port it picked answered its PING: start returned, its own
    had exited (cannot listen), and its caller used (and emptied) the other one."""
    with RedisServer() as other:
        hand_out_first(monkeypatch, other.port)
        with RedisServer() as server:
            assert server.port != other.port and server.proc.poll() is None


def test_a_redis_server_started_by_a_wrapper_that_does_not_exec_it_is_its_own(
        monkeypatch, tmp_path):
    """ELRIC_REDIS_SERVER may be a script that runs redis-server as its child: INFO's
    process_id is not the Popen's pid, and start waited its 10 s and failed. Told apart by
    the folder it runs in, its own, another's PONG is still none (the test above)."""
    real = elric.redis_server.find_redis_server()
    wrapper = tmp_path / "redis-wrapper"
    # no exec: it stays the parent, and passes its SIGTERM on so none is left running
    wrapper.write_text(f"""#!/bin/sh
trap 'kill -TERM $child; wait $child; exit 0' TERM
'{real}' "$@" &
child=$!
wait $child
""")
    wrapper.chmod(0o755)
    monkeypatch.setenv("ELRIC_REDIS_SERVER", str(wrapper))
    with RedisServer() as server:
        with socket.create_connection(("127.0.0.1", server.port)) as s, s.makefile("rb") as r:
            s.sendall(b"INFO server\r\n")
            info = r.read(int(r.readline()[1:])).decode()
        pid = int(re.search(r"^process_id:(\d+)", info, re.M).group(1))
        assert pid != server.proc.pid and server._answers()
    wait_for(lambda: not any_taken(server.port), timeout=10, what="its redis-server to stop")


def test_a_redis_server_on_a_port_it_was_given_fails_at_once_when_it_is_taken(taken):
    server = RedisServer(port=taken)
    try:
        with pytest.raises(RedisServerError, match="redis-server exited with 1"):
            server.start()
        assert server.port == taken
    finally:
        server.cleanup()


def test_the_clusters_master_whose_port_is_taken_before_it_listens_starts_on_another(
        make_cluster, monkeypatch, taken):
    hand_out_first(monkeypatch, taken)
    c = make_cluster()
    assert c.address == f"127.0.0.1:{taken}"
    master = c.start_master()
    assert c.address != f"127.0.0.1:{taken}"
    assert c.client.health()["pid"] == master.pid
    assert c.env["ELRIC_MASTER_ADDRESS"] == c.address   # its workers' too
    c.start_worker("--concurrency", "1")


def test_a_master_with_a_bad_setting_fails_at_once_with_its_message(make_cluster,
                                                                    started_procs):
    c = make_cluster(LEASE_SECONDS="soon")
    with pytest.raises(RuntimeError, match=re.escape("LEASE_SECONDS")):
        c.start_master()
    assert len(started_procs) == 1


def test_a_master_on_an_address_it_was_given_is_not_moved(make_cluster, taken):
    c = make_cluster()
    with pytest.raises(RuntimeError, match="cannot listen"):
        c.start_master(address=f"127.0.0.1:{taken}")
