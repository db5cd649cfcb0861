"""The master's housekeeping (redelivering the jobs of dead workers, queueing retries,
dropping old rounds) survives any error, not only Redis being unreachable: a refused
write (OOM, MISCONF) once ended it for good, and with it every redelivery.
"""

from __future__ import annotations

import asyncio

from redis.exceptions import ResponseError

from elric.contract import normalize_specs
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
            [spec] = normalize_specs([{"func": "tests.jobs:Echo", "job_id": "lost"}])
            await m.queue.enqueue([spec])
            # a worker takes it with a lease that is over at once, then dies
            assert [j["job_id"] for j in await m.queue.fetch("dead", ["default"], 1, 0)] == \
                ["lost"]
            deadline = asyncio.get_running_loop().time() + 30
            while (await m.queue.get_job("lost"))["status"] != "queued":
                assert asyncio.get_running_loop().time() < deadline, "never redelivered"
                await asyncio.sleep(0.05)
            assert len(failures) == 2
    asyncio.run(main())
