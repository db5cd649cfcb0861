"""A submit whose answer is lost (the connection broke after the request went: a master
restarting, a network blip) is sent again by the client, under job ids chosen before the
first send, so it is queued exactly once and the caller gets its answer."""

from __future__ import annotations

import socket
import threading

import msgpack
import pytest

from elric.client import MasterClient
from elric.redis_server import free_port
from elric.rpc import RPCConnectionError, RPCUnreachableError
from tests.jobs import Add
from tests.silent_proxy import SilentProxy


@pytest.fixture
def proxied(cluster):
    """(cluster, proxy, client): the client reaches the master through the proxy."""
    proxy = SilentProxy(int(cluster.address.rsplit(":", 1)[1]))
    client = MasterClient(f"127.0.0.1:{proxy.port}", timeout=20)
    yield cluster, proxy, client
    client.close()
    proxy.close()


def test_a_submit_whose_answer_was_lost_is_sent_again_and_queued_once(proxied):
    cluster, proxy, client = proxied
    proxy.cut_answers = 1
    reply = client.submit_job(Add.spec([1, 2]))   # no job_id: the client names it
    assert reply["status"] == "queued" and proxy.connections == 2, (reply, proxy.connections)
    assert cluster.client.stats()["totals"]["submitted"] == 1
    assert cluster.client.get_job(reply["job_id"])["status"] == "queued"


def test_a_batch_whose_answer_was_lost_is_queued_once(proxied):
    cluster, proxy, client = proxied
    proxy.cut_answers = 2   # and the first resend's too
    replies = client.submit_jobs([Add.spec([i, i]) for i in range(3)])
    assert [r["status"] for r in replies] == ["queued"] * 3 and proxy.connections == 3
    assert len({r["job_id"] for r in replies}) == 3
    assert cluster.client.stats()["totals"]["submitted"] == 3


def test_a_submit_never_answered_says_how_to_settle_it_and_was_queued_once(proxied):
    cluster, proxy, _ = proxied
    proxy.cut_answers = 1000
    with MasterClient(f"127.0.0.1:{proxy.port}", timeout=1) as client:
        with pytest.raises(RPCConnectionError) as info:
            client.submit_job(Add.spec([1, 2], job_id="mine"))
    assert "whether job(s) mine were queued is unknown" in str(info.value), info.value
    assert info.value.job_ids == ["mine"]
    assert proxy.connections >= 2   # sent again meanwhile, under the same id: one job
    assert cluster.client.stats()["totals"]["submitted"] == 1
    assert cluster.client.get_job("mine")["status"] == "queued"


def test_a_submit_sent_then_refused_is_unknown_not_unreachable(proxied):
    """The first send went, then the master was gone: "unreachable" would say nothing was
    sent, and a caller would submit again under a new id."""
    cluster, proxy, client = proxied
    proxy.cut_answers, proxy.refuse_after = 1, 1
    client.rpc.timeout = 1
    with pytest.raises(RPCConnectionError) as info:
        client.submit_job(Add.spec([1, 2]))
    assert not isinstance(info.value, RPCUnreachableError), repr(info.value)
    [job_id] = info.value.job_ids
    assert cluster.client.get_job(job_id)["status"] == "queued"   # it had gone


def test_a_long_list_never_answered_gives_the_ids_to_send_it_again_with(proxied):
    """The ids are the client's: without them on the error, the caller could only send the
    list again under new ones, queueing each job twice."""
    cluster, proxy, _ = proxied
    proxy.cut_answers = 1000
    specs = [Add.spec([i, i]) for i in range(10_001)]   # split in calls of 1,000
    with MasterClient(f"127.0.0.1:{proxy.port}", timeout=1) as client:
        with pytest.raises(RPCConnectionError) as info:
            client.submit_jobs(specs)
    ids = info.value.job_ids
    assert len(set(ids)) == len(specs) and info.value.replies == [None] * len(specs)
    again = cluster.client.submit_jobs([{**s, "job_id": i} for s, i in zip(specs, ids)])
    assert {r["status"] for r in again} == {"queued"}
    assert cluster.client.stats()["totals"]["submitted"] == len(specs)   # each once


def _master_breaking_after(answers: int, connections: int = 2
                           ) -> tuple[str, list[tuple[int, str]]]:
    """A stand-in master (threads) whose first connection answers ``answers`` submit_jobs
    calls, then closes; later ones (up to ``connections`` in all; then it is gone) answer
    every call. Returns its address and the calls it got: (connection, the batch's first
    job id), in order."""
    listener = socket.create_server(("127.0.0.1", 0))
    got: list[tuple[int, str]] = []

    def serve(conn: socket.socket, n: int) -> None:
        unpacker, calls = msgpack.Unpacker(raw=False), 0
        with conn:
            while data := conn.recv(65536):
                unpacker.feed(data)
                for _, msgid, _, [specs] in unpacker:
                    got.append((n, specs[0]["job_id"]))
                    calls += 1
                    if n == 0 and calls == answers + 1:   # after the answers sent: it breaks
                        conn.shutdown(socket.SHUT_WR)
                    if n > 0 or calls <= answers:
                        conn.sendall(msgpack.packb([1, msgid, None, [
                            {"job_id": s["job_id"], "status": "queued"} for s in specs]]))

    def accept() -> None:
        for n in range(connections):
            threading.Thread(target=serve, args=(listener.accept()[0], n), daemon=True).start()
        listener.close()
    threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", got


def test_a_long_list_whose_connection_broke_part_way_sends_again_only_what_was_unanswered():
    """Every batch of a split submit_jobs was taken as unknown when the connection broke,
    the four answered before it too: their answers were dropped and they went again."""
    address, got = _master_breaking_after(4)
    specs = [Add.spec([i, i]) for i in range(10_001)]   # split in calls of 1,000
    with MasterClient(address, timeout=20) as client:
        replies = client.submit_jobs(specs)
    ids = [r["job_id"] for r in replies]
    assert len(set(ids)) == len(specs) and {r["status"] for r in replies} == {"queued"}
    assert [i for n, i in got if n == 1] == ids[4000::1000]   # the batches from the fifth


def test_a_long_list_whose_resend_fails_names_the_jobs_unknown_and_keeps_the_answers():
    """The error named the first three specs of the list as unknown, which were answered
    queued; it names the first of the batches left unanswered."""
    address, _ = _master_breaking_after(4, connections=1)
    specs = [Add.spec([i, i]) for i in range(10_001)]
    with MasterClient(address, timeout=2) as client:
        with pytest.raises(RPCConnectionError) as info:
            client.submit_jobs(specs)
    ids, replies = info.value.job_ids, info.value.replies
    assert [r and r["status"] for r in replies] == ["queued"] * 4000 + [None] * 6001
    assert f"whether job(s) {', '.join(ids[4000:4003])}, ... (6001 in all) were queued is " \
        "unknown" in str(info.value), str(info.value)


def test_an_empty_job_id_is_named_by_the_client_too(proxied):
    cluster, proxy, client = proxied
    proxy.cut_answers = 1
    reply = client.submit_job(Add.spec([1, 2], job_id=""))
    assert reply["status"] == "queued" and reply["job_id"]
    assert cluster.client.stats()["totals"]["submitted"] == 1


def test_a_master_not_there_is_said_at_once():
    """Nothing was sent: no resend, and nothing to settle."""
    with MasterClient(f"127.0.0.1:{free_port()}", timeout=20) as client:
        with pytest.raises(RPCUnreachableError, match="cannot reach elric master") as info:
            client.submit_job(Add.spec([1, 2]))
    assert "unknown" not in str(info.value) and not hasattr(info.value, "job_ids")
