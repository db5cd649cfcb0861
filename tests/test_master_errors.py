"""What a master answers when a handler fails: ``not_found`` only for what a call names
and does not exist, ``internal`` for a bug, even one that raises a KeyError.

An in-process master (the same code as run_master.py) against the private redis-server,
called over real RPC. pytest-asyncio is not installed: each test runs with asyncio.run.
"""

from __future__ import annotations

import asyncio

import pytest

from elric.config import load_settings
from elric.master import Master
from elric.redis_server import free_port
from elric.rpc import AsyncClient, RemoteError


async def answer(client: AsyncClient, method: str, *params) -> str:
    with pytest.raises(RemoteError) as info:
        await client.call(method, *params)
    return info.value.code


def with_master(redis_url, body) -> None:
    """Run ``body(master, client)`` against a master started in this process."""
    async def main():
        m = Master(load_settings(env={}, overrides=dict(
            REDIS_URL=redis_url, MASTER_ADDRESS=f"127.0.0.1:{free_port()}")))
        host, port = (await m.start())[:2]
        client = await AsyncClient.connect(host, port)
        try:
            await body(m, client)
        finally:
            await client.close()
            await m.close()
    asyncio.run(main())


def test_a_lookup_error_from_a_bug_is_internal_and_a_missing_job_not_found(redis_url):
    """Any LookupError a handler raised was answered not_found: a KeyError from a bug told
    the client that the job did not exist, so it gave up instead of reporting the bug."""
    async def body(m, client):
        for method, params in (("cancel_job", ["nope"]), ("rerun_job", ["nope"]),
                               ("run_job", ["nope"]), ("control_worker", ["nope", "stop"])):
            assert await answer(client, method, *params) == "not_found", method

        async def key_error(job_id):
            return {}["status"]   # a bug in reading a job

        async def index_error(job_id):
            return [][0]
        m.queue.get_job, m.queue.cancel = key_error, index_error
        assert await answer(client, "get_job", "some") == "internal"
        assert await answer(client, "cancel_job", "some") == "internal"
    with_master(redis_url, body)


def test_a_list_filter_that_is_not_utf8_is_bad_request(redis_url):
    """A queue, func or batch sent as invalid UTF-8 (a lone surrogate once decoded) went to
    Redis, which cannot take it: the caller got 'internal error: UnicodeEncodeError'."""
    async def body(m, client):
        # bulk_jobs filters are checked by the same rules, with the same messages
        for call, first in (("list_jobs", ()), ("bulk_jobs", ("find",))):
            for key in ("queue", "func", "batch"):
                with pytest.raises(RemoteError) as info:
                    await client.call(call, *first, {key: "x\udcff"})
                assert info.value.code == "bad_request", (key, str(info.value))
                assert f"{call}: {key} " in str(info.value) and "UTF-8" in str(info.value)
            for bad, said in (({"status": "done"}, "unknown status 'done'; known: "),
                              ({"queue": 7}, "filter queue must be a string"),
                              (["x"], "filter must be a map, got list")):
                with pytest.raises(RemoteError, match=f"^{call}: {said}"):
                    await client.call(call, *first, bad)
        assert await client.call("list_jobs", {"queue": "default"}) == []
    with_master(redis_url, body)


def test_a_worker_id_that_is_not_utf8_is_bad_request(redis_url):
    """A worker_id sent as invalid UTF-8 went to Redis, which cannot take it: the caller got
    'internal error: UnicodeEncodeError', as list_jobs's filters once did."""
    async def body(m, client):
        # an id, a filter and a spec are refused by one rule, in one message
        not_text = "'w\\udcff' is not valid UTF-8: send text as UTF-8 and binary data as " \
            "msgpack bin"
        for call, params, what in (("control_worker", ("w\udcff", "stop"), "worker_id"),
                                   ("get_job", ("w\udcff",), "job_id"),
                                   ("list_jobs", ({"queue": "w\udcff"},), "list_jobs: queue"),
                                   ("submit_job", ({"func": "tests.jobs:Echo",
                                                    "job_id": "w\udcff"},), "job_id")):
            with pytest.raises(RemoteError) as info:
                await client.call(call, *params)
            assert info.value.code == "bad_request", str(info.value)
            assert str(info.value) == f"{what} {not_text}", (call, str(info.value))
    with_master(redis_url, body)


def test_an_order_to_a_worker_whose_hash_expired_is_not_found_and_writes_nothing(redis_url):
    """A lost worker stays listed after its hash expired: an order to it wrote a new hash,
    with no TTL, that stayed for good, and answered "it obeys within a second"."""
    async def body(m, client):
        seconds, _ = await m.redis.time()   # listed, seen a moment ago; its hash is gone
        await m.redis.zadd(m.keys.workers, {"lost-1": seconds * 1000})
        with pytest.raises(RemoteError, match="lost-1") as info:
            await client.call("control_worker", "lost-1", "pause")
        assert info.value.code == "not_found"
        assert await m.redis.exists(m.keys.worker("lost-1")) == 0
    with_master(redis_url, body)
