"""Errors that pass must not stop anything for good.

The master's housekeeping (redelivering the jobs of dead workers, queueing retries,
dropping old rounds) survives any error, not only Redis being unreachable: a refused
write (OOM, MISCONF) once ended it for good, and with it every redelivery. A worker whose
master cannot reach Redis sends its children again instead of failing their parent.
"""

from __future__ import annotations

import asyncio

from redis.exceptions import ResponseError

from elric.contract import normalize_spec
from tests.test_dedupe_keys_given_back import master


def test_housekeeping_goes_on_after_an_error_it_does_not_know(redis_url):
    async def main():
        async with master(redis_url) as m:
            real, failures = m.queue.recover, []

            async def refused(*a, **kw):
                if len(failures) < 2:
                    failures.append(1)
                    raise ResponseError("OOM command not allowed when used memory > "
                                        "'maxmemory'")
                return await real(*a, **kw)
            m.queue.recover = refused
            spec = normalize_spec({"func": "tests.jobs:Echo", "job_id": "lost"})
            await m.queue.enqueue([spec])
            # a worker takes it with a lease that is over at once, then dies
            assert [j.job_id for j in (await m.queue.fetch("dead", ["default"], 1, 0)).claims] == \
                ["lost"]
            deadline = asyncio.get_running_loop().time() + 30
            while (await m.queue.get_job("lost"))["status"] != "queued":
                assert asyncio.get_running_loop().time() < deadline, "never redelivered"
                await asyncio.sleep(0.05)
            assert len(failures) == 2
    asyncio.run(main())


def test_a_worker_sends_children_again_when_the_master_cannot_reach_redis():
    """'master cannot reach Redis right now' means nothing was taken: a worker sends the
    same children again (with a backoff) rather than failing their parent for good, as
    it does when the master refuses a child spec."""
    from elric.config import load_settings
    from elric.rpc import RemoteError
    from elric.runner import Ran
    from elric.worker import Worker

    def unavailable(detail):
        return RemoteError({"code": "redis_unavailable", "message": "master cannot reach "
                            f"Redis right now ({detail}); nothing was changed, try again"})

    class Master:
        def __init__(self, answers):
            self.answers, self.calls = list(answers), []

        async def call(self, method, *params):
            self.calls.append((method, params))
            answer = self.answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    async def main():
        w = Worker(load_settings(env={}))
        child = {"func": "tests.jobs:Echo", "args": [1]}
        outcomes = [Ran("parent", 1, True, b"", [child])]
        w.master = Master([unavailable("Connection refused"), unavailable("Timeout"),
                           [{"job_id": "c", "status": "queued"}]])
        assert await w._send_children(outcomes) == {}
        assert [c[0] for c in w.master.calls] == ["submit_jobs"] * 3
        # a refusal is not retried: the parent is the one at fault
        w.master = Master([RemoteError({"code": "bad_request", "message":
                                        "spec 0: unknown job spec key(s) 'colour'"})] * 2)
        assert await w._send_children(outcomes) == {
            "parent": "spec 0: unknown job spec key(s) 'colour'"}
    asyncio.run(main())


def test_a_batch_with_a_periodic_job_can_be_sent_again_after_cannot_reach_redis(redis_url):
    """submit_jobs stores periodic jobs first; when a later step cannot reach Redis the
    caller is told to send the call again, and the resent call must then pass: the
    periodic job, stored already, is answered as stored instead of 'already exists'."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from elric.contract import ErrorCode
    from elric.rpc import RequestError

    async def main():
        async with master(redis_url) as m:
            real, failed = m.queue._enqueue, []

            async def once(keys, args):
                if not failed:
                    failed.append(1)
                    raise RedisConnectionError("Connection reset by peer")
                return await real(keys=keys, args=args)
            m.queue._enqueue = once
            batch = [{"func": "tests.jobs:Echo", "job_id": "P",
                      "trigger": {"type": "interval", "minutes": 15}},
                     {"func": "tests.jobs:Echo", "job_id": "one", "dedupe_key": "k"}]
            try:
                await m.submit_jobs(batch)
                raise AssertionError("the first call should have failed")
            except RequestError as exc:
                assert exc.code == ErrorCode.REDIS_UNAVAILABLE
            out = await m.submit_jobs(batch)
            assert [o["status"] for o in out] == ["scheduled", "queued"]
    asyncio.run(main())


def test_a_worker_sends_more_children_than_one_call_takes_in_several_calls():
    """The master takes at most MAX_BATCH specs per submit_jobs call: a parent with more
    children than that failed for good, refused as a whole."""
    from elric.config import load_settings
    from elric.contract import MAX_BATCH
    from elric.runner import Ran
    from elric.worker import Worker

    class Master:
        def __init__(self):
            self.calls = []

        async def call(self, method, specs):
            self.calls.append(len(specs))
            return [{"job_id": s["job_id"], "status": "queued"} for s in specs]

    async def main():
        w = Worker(load_settings(env={}))
        children = [{"func": "tests.jobs:Echo", "job_id": f"c{i}"} for i in range(MAX_BATCH + 1)]
        w.master = Master()
        assert await w._send_children([Ran("parent", 1, True, b"", children)]) == {}
        assert w.master.calls == [MAX_BATCH, 1]
    asyncio.run(main())
