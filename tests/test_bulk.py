"""Operations on many jobs by filter (`elric rerun|copy|cancel|delete|purge`), against a
real master, worker and Redis, through the command as an operator runs it."""

from __future__ import annotations

import json

import pytest

from elric.bulk import JobFilter
from elric.contract import SpecError
from elric.triggers import every
from tests.conftest import redis_clock_past, wait_for
from tests.jobs import Echo
from tests.test_cli import elric


def _done(cluster, batch: str, n: int) -> None:
    wait_for(lambda: sum(cluster.client.stats()["batches"].get(batch, {}).get(s, 0)
                         for s in ("succeeded", "failed")) >= n, what=f"{n} jobs of {batch}")


def test_rerun_copy_cancel_and_purge_by_filter(cluster):
    cluster.start_worker("--concurrency", "1")
    client = cluster.client
    client.submit_jobs([{"func": "tests.jobs:Fail", "args": [f"no {i}"], "batch": "bad",
                         "job_id": f"bad-{i}"} for i in range(30)])
    client.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "batch": "good",
                         "job_id": f"good-{i}"} for i in range(10)])
    _done(cluster, "bad", 30)
    _done(cluster, "good", 10)

    # rerun: the same ids run again (and fail again); the good ones are not touched
    before = client.get_job("bad-0")["finished_at"]
    out = elric(cluster, "rerun", "--status", "failed", "--batch", "bad", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["touched"] == 30
    wait_for(lambda: all(j["status"] == "failed" and j["finished_at"] > before
                         for j in (client.get_job(f"bad-{i}") for i in range(30))),
             what="30 reruns failed again")
    assert client.get_job("good-0")["status"] == "succeeded"

    # copy: new ids with the same func and arguments
    out = elric(cluster, "copy", "--func", "tests.jobs:Add", "--json")
    assert json.loads(out.stdout)["touched"] == 10, out.stdout + out.stderr
    copies = wait_for(lambda: (lambda rows: rows if len(rows) == 20 else None)(
        client.list_jobs(status="succeeded", batch="good", limit=100)), what="10 copies ran")
    copy = next(j for j in copies if j["job_id"].startswith("good-3~"))
    assert client.get_job(copy["job_id"])["result"] == 4

    # cancel and purge jobs no worker takes; a table line says how many
    client.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "queue": "nobody",
                         "job_id": f"wait-{i}"} for i in range(20)])
    out = elric(cluster, "cancel", "--queue", "nobody", "--since", "0")
    assert out.returncode == 0 and "cancel: 20 jobs done" in out.stdout, out.stdout + out.stderr
    assert client.stats()["by_status"]["cancelled"] == 20
    # a time range that holds none of them touches none
    out = elric(cluster, "delete", "--status", "cancelled", "--until", "2000-01-01T00:00")
    assert "delete: 0 jobs done" in out.stdout, out.stdout + out.stderr
    assert client.stats()["by_status"]["cancelled"] == 20


def test_purge_walks_a_queue_bigger_than_one_step_and_an_empty_filter_is_refused(cluster):
    n = 4500   # more than one bulk step (2,000) and many ZSCAN rounds
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "queue": "big",
                                 "job_id": f"j{i}"} for i in range(n)])
    out = elric(cluster, "purge", "big", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"touched": n, "skipped": 0, "not_found": [], "errors": []}
    assert cluster.client.stats()["by_queue"]["big"]["queued"] == 0
    assert cluster.client.get_job("j0") is None

    refused = elric(cluster, "delete")
    assert refused.returncode == 2 and "empty filter" in refused.stderr, refused.stderr
    for when in ("yesterday", "nan", "inf"):   # (nan and inf: numbers that match no job)
        bad = elric(cluster, "cancel", "--since", when)
        assert bad.returncode == 2 and "ISO 8601" in bad.stderr, bad.stdout + bad.stderr


def test_a_time_range_that_can_hold_no_job_is_refused_naming_it():
    """--since and --until swapped, or given in milliseconds, matched no job: "0 jobs
    done", exit 0, as if none were there."""
    for raw, message in (
            ({"since": 200, "until": 100}, "filter until 100 is not after since 200: no job "
                                           "was submitted between them; swap them"),
            ({"since": 100, "until": 100}, "filter until 100 is not after since 100"),
            ({"since": 1765000000000}, "filter since 1765000000000 is after the year 9999: "
                                       "give epoch seconds, not milliseconds")):
        with pytest.raises(SpecError) as info:
            JobFilter.parse(raw)
        assert message in str(info.value)
    assert JobFilter.parse({"since": 100, "until": 200.5}).until == 200.5


def test_a_copy_over_a_queue_it_grows_copies_each_job_once(cluster):
    n = 4500   # several steps: the copies land in the queue the walk is going through
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "queue": "big",
                                 "job_id": f"j{i}"} for i in range(n)])
    out = elric(cluster, "copy", "--queue", "big", "--json")
    assert json.loads(out.stdout)["touched"] == n, out.stdout + out.stderr
    assert cluster.client.stats()["by_queue"]["big"]["queued"] == 2 * n


def test_purge_takes_the_jobs_a_limit_key_holds_back_too(make_cluster):
    cluster = make_cluster(LIMITS='{"slow.example": {"concurrency": 1}}')
    cluster.start_master()
    cluster.start_worker("--concurrency", "2", SHUTDOWN_GRACE=1)
    c = cluster.client
    c.submit_jobs([{"func": "tests.jobs:Sleep", "args": [30], "limit_key": "slow.example",
                    "job_id": f"s{i}"} for i in range(10)])
    # one runs; the worker's fetches park the others out of the queue's line
    wait_for(lambda: c.stats()["by_status"]["running"] == 1
             and c.get_job("s9")["status"] == "queued"
             and _parked(cluster) > 0, what="jobs parked by their limit key")
    out = elric(cluster, "purge", "default", "--json")
    assert json.loads(out.stdout)["touched"] == 9, out.stdout + out.stderr
    assert c.stats()["by_queue"]["default"]["queued"] == 0


def _parked(cluster) -> int:
    import redis

    from elric.keys import Keys

    r = redis.Redis.from_url(cluster.redis_url)
    try:
        return int(r.hget(Keys().limits_parked, "default") or 0)
    finally:
        r.close()


def test_a_copy_whose_new_id_is_too_long_is_skipped_and_the_others_are_made(redis_url):
    """A source id near 200 characters cannot take "~op": that job is skipped, saying why,
    rather than the whole step refused again at every call (no job of it ever copied)."""
    import asyncio

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            long_id = "L" * 199
            await m.submit_jobs([{"func": "tests.jobs:Echo", "job_id": i, "queue": "copyq"}
                                 for i in ("short", long_id)])
            queued_at = (await m.get_job("short"))["enqueued_at"]
            # a copy passes over jobs queued since it began
            await redis_clock_past(m.redis, queued_at + 0.002)
            step = await m.bulk_jobs("copy", {"ids": ["short", long_id]}, "", "op1")
            assert (step["touched"], step["skipped"]) == (1, 1), step
            assert long_id in step["errors"][0] and "200" in step["errors"][0]
            assert (await m.get_job("short~op1"))["status"] == "queued"
    asyncio.run(main())


def test_a_job_whose_fields_cannot_be_read_is_not_copied_with_defaults(redis_url):
    """get_job shows a field elric cannot read (an operator's edit) as None: a copy
    must not make a job with its default in its place."""
    import asyncio

    import redis.asyncio as aredis

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.submit_jobs([{"func": "tests.jobs:Echo", "job_id": i, "queue": "copyq",
                                  "max_retries": 3} for i in ("good", "edited")])
            async with aredis.Redis.from_url(redis_url) as r:
                await r.hset(m.keys.job("edited"), "max_retries", "abc")
            queued_at = (await m.get_job("good"))["enqueued_at"]
            await redis_clock_past(m.redis, queued_at + 0.002)
            step = await m.bulk_jobs("copy", {"ids": ["good", "edited"]}, "", "op1")
            assert (step["touched"], step["skipped"]) == (1, 1), step
            assert "max_retries 'abc'" in step["errors"][0], step
            assert await m.get_job("edited~op1") is None
            assert (await m.get_job("good~op1"))["max_retries"] == 3
    asyncio.run(main())


def test_a_walk_by_func_or_batch_reads_only_the_jobs_it_picks(redis_url):
    """A bulk walk read every job of the indexes it walked into the master, 2,000 a step
    (a find by a rare batch among 200,000 jobs took seconds); Redis now picks them out and
    sends only those. It picks what filtering each job does: by func, batch, queue,
    status, worker and time of submission, passing over a gone job."""
    import asyncio

    import redis.asyncio as aredis

    from tests.conftest import outcome
    from tests.test_dedupe_keys_given_back import master

    async def walk(m, f):
        cursor, ids = "", []
        while True:
            step = await m.bulk_jobs("find", f, cursor)
            ids, cursor = ids + step["ids"], step["cursor"]
            if not cursor:
                return sorted(set(ids))

    async def main():
        async with master(redis_url) as m, aredis.Redis.from_url(redis_url) as r:
            for start in (0, 750):   # submitted at two times: since and until part them
                await m.submit_jobs([{
                    "func": "tests.jobs:Add" if i % 50 == 0 else "tests.jobs:Echo",
                    "args": ["x" * 200], "job_id": f"j{i}", "batch": f"b{i % 7}",
                    "queue": f"q{i % 2}"} for i in range(start, start + 750)])
                middle = (await m.get_job(f"j{start}"))["enqueued_at"]
                await redis_clock_past(m.redis, middle + 0.002)
            claims = (await m.queue.fetch("w", ["q0", "q1"], 600, 30)).claims
            await m.queue.finish("w", [outcome(c, ok=i % 3 > 0)
                                       for i, c in enumerate(claims[:500])])
            await r.delete(m.keys.job("j0"))   # ended, then expired
            everything = await m.queue.list_jobs(limit=10_000)
            assert 0 < sum(row["enqueued_at"] >= middle for row in everything) < 1499
            sent = (await r.info("stats"))["total_net_output_bytes"]
            assert len(await walk(m, {"func": "tests.jobs:Add"})) == 29
            assert (await r.info("stats"))["total_net_output_bytes"] - sent < 50_000
            for f in ({"batch": "b3"}, {"batch": "b3", "status": "succeeded"},
                      {"func": "tests.jobs:Add", "queue": "q0"}, {"worker": "w"},
                      {"queue": "q1", "status": "failed"}, {"batch": "b2", "since": middle},
                      {"func": "tests.jobs:Echo", "until": middle, "status": "queued"}):
                fields = {k: v for k, v in f.items() if k not in ("since", "until")}
                assert await walk(m, f) == sorted(
                    row["job_id"] for row in everything
                    if all(row[k] == v for k, v in fields.items())
                    and row["enqueued_at"] >= f.get("since", 0)
                    and row["enqueued_at"] < f.get("until", float("inf"))), f
    asyncio.run(main())


def test_a_bulk_step_sends_its_jobs_scripts_together_not_a_call_a_job(redis_url):
    """A step's cancels, reruns and deletes each went as a call of its own, all at once:
    the master opened up to 128 Redis connections, and spent several times the CPU Redis
    did; they go in one pipeline now, and do what they did."""
    import asyncio

    import redis.asyncio as aredis

    from tests.test_dedupe_keys_given_back import master

    async def step(m, r, action: str, f: dict) -> dict:
        opened = (await r.info("stats"))["total_connections_received"]
        done = await m.bulk_jobs(action, f)
        assert done["cursor"] == ""
        assert (await r.info("stats"))["total_connections_received"] - opened < 5, action
        return {k: done[k] for k in ("touched", "skipped")}

    async def main():
        async with master(redis_url) as m, aredis.Redis.from_url(redis_url) as r:
            await m.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "job_id": f"j{i}",
                                  "queue": "nobody", "batch": "many"} for i in range(1000)])
            await m.bulk_jobs("find", {"batch": "many"})   # its connections made: not counted
            assert await step(m, r, "cancel", {"batch": "many"}) == {"touched": 1000,
                                                                      "skipped": 0}
            assert await step(m, r, "rerun", {"batch": "many"}) == {"touched": 1000,
                                                                     "skipped": 0}
            by_status = (await m.stats())["by_status"]
            assert by_status["queued"] == 1000 and by_status["cancelled"] == 0
            assert await step(m, r, "delete", {"batch": "many", "status": "queued"}) == {
                "touched": 1000, "skipped": 0}
            assert await m.get_job("j7") is None
    asyncio.run(main())


def test_one_jobs_cancel_rerun_and_delete_are_one_script_call_each(redis_url):
    """A button or `elric cancel ID` acts on one job: through a bulk step's pipeline, which
    asks Redis SCRIPT EXISTS before its scripts, each took a second round trip."""
    import asyncio

    import redis.asyncio as aredis

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m, aredis.Redis.from_url(redis_url) as r:
            await m.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 1], "job_id": "one",
                                  "queue": "nobody"}])
            for act in (m.cancel_job, m.rerun_job, m.cancel_job, m.remove_job):
                await act("one")   # (each script loaded once, by its first call)
            await m.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 1], "job_id": "one",
                                  "queue": "nobody"}])
            await r.config_resetstat()
            for act in (m.cancel_job, m.rerun_job, m.cancel_job, m.remove_job):
                await act("one")
            stats = await r.info("commandstats")
            assert "cmdstat_script|exists" not in stats, stats
            assert await m.get_job("one") is None
    asyncio.run(main())


def test_a_copy_step_reads_its_sources_together(redis_url):
    """A copy step read each source with a call of its own, all at once (up to 128 Redis
    connections); it reads them in one round trip now."""
    import asyncio

    import redis.asyncio as aredis

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m, aredis.Redis.from_url(redis_url) as r:
            await m.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "job_id": f"j{i}",
                                  "queue": "nobody", "batch": "many"} for i in range(1000)])
            await m.bulk_jobs("find", {"batch": "many"})   # its connections made: not counted
            opened = (await r.info("stats"))["total_connections_received"]
            done = await m.bulk_jobs("copy", {"batch": "many"}, "", "op")
            assert (await r.info("stats"))["total_connections_received"] - opened < 5
            assert (done["touched"], done["skipped"], done["cursor"]) == (1000, 0, "")
            assert (await m.get_job("j7~op"))["args"] == [7, 1]
    asyncio.run(main())


def test_a_cancel_bigger_than_one_step_counts_each_job_once(cluster):
    n = 4500   # several steps: the jobs it cancels land in the cancelled index it would walk
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "queue": "nobody",
                                 "batch": "many", "job_id": f"j{i}"} for i in range(n)])
    out = elric(cluster, "cancel", "--batch", "many", "--json")
    assert json.loads(out.stdout) == {"touched": n, "skipped": 0, "not_found": [],
                                      "errors": []}, out.stdout
    assert cluster.client.stats()["by_status"]["cancelled"] == n


def test_ids_that_are_no_job_are_said_and_a_command_that_did_nothing_exits_1(cluster):
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 1], "queue": "nobody",
                               "job_id": "there"})
    out = elric(cluster, "cancel", "there", "typo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout == "cancel: 1 jobs done, 0 skipped, 1 not found\n  not found: typo\n"
    out = elric(cluster, "cancel", "there", "typo")   # an ended job's skip says why too
    assert "skipped: job 'there' had ended (cancelled)" in out.stdout, out.stdout
    for command in ("delete", "rerun", "cancel", "copy"):
        out = elric(cluster, command, "typo", "typo2", "--json")
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        assert json.loads(out.stdout) == {"touched": 0, "skipped": 0,
                                          "not_found": ["typo", "typo2"], "errors": []}, (
            command, out.stdout)


def test_a_periodic_id_given_to_delete_rerun_or_copy_says_what_does_that_to_it(cluster):
    """A periodic job has no job record: a delete, rerun or copy of many named it "no job"."""
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    for command, does in (("delete", "remove tick removes it"),
                          ("rerun", "run-now tick fires it now"),
                          ("copy", "run-now tick fires it now")):
        out = elric(cluster, command, "tick", "typo", "--json")
        assert out.returncode == 1, (command, out.stdout, out.stderr)
        assert (json.loads(out.stdout)["errors"], json.loads(out.stdout)["not_found"]) == (
            [f"job 'tick' is periodic: elric schedules {does}"], ["typo"]), out.stdout
    assert cluster.client.get_job("tick")["status"] == "scheduled"   # left alone
    one = elric(cluster, "rerun", "tick")   # one id: rerun_job, which said "no job" too
    assert (one.returncode, one.stderr.strip()) == (   # failed, as the rerun of many
        1, "elric: job 'tick' is periodic: elric schedules run-now tick fires it now")
    for command in ("delete", "remove"):   # one id: remove_job, which removed the schedule
        one = elric(cluster, command, "tick")
        assert (one.returncode, one.stderr.strip()) == (
            1, "elric: job 'tick' is periodic: elric schedules remove tick removes it")
    assert cluster.client.get_job("tick")["status"] == "scheduled"


def test_an_id_given_twice_is_done_and_counted_once(cluster):
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 1], "queue": "nobody",
                                 "job_id": job_id} for job_id in ("a", "b")])
    for command, job_id in (("copy", "a"), ("delete", "b")):
        out = elric(cluster, command, job_id, job_id, "--json")
        assert json.loads(out.stdout) == {"touched": 1, "skipped": 0, "not_found": [],
                                          "errors": []}, (
            command, out.stdout, out.stderr)
    assert [j["job_id"] for j in cluster.client.list_jobs(queue="nobody")][1:] == ["a"]


def test_an_id_given_twice_and_one_that_is_no_job_are_counted_as_such(cluster):
    """`elric delete a1 a1 nope` said "1 jobs done, 1 skipped": a missing id counted as a
    job skipped, and one given twice counted twice ("nope nope": 2 skipped)."""
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 1], "queue": "nobody",
                                 "job_id": job_id} for job_id in ("a1", "c1")])
    for args in (("delete", "a1", "a1", "nope", "nope"), ("cancel", "c1", "c1", "nope", "nope"),
                 ("rerun", "c1", "c1", "nope", "nope")):
        out = elric(cluster, *args)
        assert (out.returncode, out.stdout) == (
            0, f"{args[0]}: 1 jobs done, 0 skipped, 1 not found\n  not found: nope\n"), out
    out = elric(cluster, "delete", "nope", "nope", "--json")   # nothing done: exit 1
    assert (out.returncode, json.loads(out.stdout)) == (1, {
        "touched": 0, "skipped": 0, "not_found": ["nope"], "errors": []}), out


def test_a_copy_keeps_its_sources_limit_key(redis_url):
    """A copy of a crawled page is still a request to its host: it keeps the source's
    limit_key (LIMITS holds for it) and limit_interval (a robots.txt's Crawl-delay) as it
    keeps its batch and timeout."""
    import asyncio

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.submit_jobs([{"func": "tests.jobs:Echo", "job_id": "page",
                                  "limit_key": "slow.test", "limit_interval": 2.5,
                                  "queue": "copyq"}])
            queued_at = (await m.get_job("page"))["enqueued_at"]
            # a copy passes over jobs queued since it began
            await redis_clock_past(m.redis, queued_at + 0.002)
            step = await m.bulk_jobs("copy", {"ids": ["page"]}, "", "op1")
            assert step["touched"] == 1, step
            copy = await m.get_job("page~op1")
            assert (copy["limit_key"], copy["limit_interval"]) == ("slow.test", 2.5)
    asyncio.run(main())


def test_a_copy_counts_a_source_gone_since_the_walk_met_it_as_skipped(redis_url):
    """A job deleted between the walk that chose it and its copy was passed over in
    silence: "copy: 1 jobs done, 0 skipped" of two jobs chosen."""
    import asyncio

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.submit_jobs([{"func": "tests.jobs:Echo", "job_id": i, "queue": "copyq"}
                                 for i in ("stays", "goes")])
            queued_at = (await m.get_job("goes"))["enqueued_at"]
            # a copy passes over jobs queued since it began
            await redis_clock_past(m.redis, queued_at + 0.002)
            walk = m.bulk.walk

            async def then_one_goes(*args, **kwargs):   # another operator's delete, meanwhile
                chosen = await walk(*args, **kwargs)
                assert await m.queue.remove("goes")
                return chosen
            m.bulk.walk = then_one_goes
            step = await m.bulk_jobs("copy", {"queue": "copyq"}, "", "op1")
            assert (step["touched"], step["skipped"], step["errors"]) == (
                1, 1, ["no job 'goes'"]), step
    asyncio.run(main())


def test_a_cancel_whose_filter_matches_only_ended_jobs_says_so_and_exits_1(cluster):
    """It walks live jobs only, so it said "cancel: 0 jobs done, 0 skipped", exit 0, as if
    it had nothing to do; a cancel of the same jobs by id skips them, exit 1."""
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [i, 1], "queue": "nobody",
                                 "job_id": f"w{i}"} for i in range(3)])
    for i in range(3):
        cluster.client.cancel_job(f"w{i}")
    said = "the 3 jobs matching had already ended: nothing cancelled"
    for args in (("--queue", "nobody"), ("--status", "cancelled")):
        out = elric(cluster, "cancel", *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stdout == f"cancel: 0 jobs done, 3 skipped\n  skipped: {said}\n", out.stdout
    out = elric(cluster, "cancel", "--queue", "nobody", "--json")
    assert out.returncode == 1 and json.loads(out.stdout) == {
        "touched": 0, "skipped": 3, "not_found": [], "errors": [said]}, out.stdout
    out = elric(cluster, "cancel", "--queue", "nobody", "--status", "failed")   # none match
    assert (out.returncode, out.stdout) == (0, "cancel: 0 jobs done, 0 skipped\n"), out


def test_a_copy_of_a_periodic_fires_jobs_is_of_its_round(redis_url):
    """A copy keeps its source's dedupe scope; a fire's "@fire" scope is only for jobs of
    its round, and the copy had none: every copy of a periodic crawl's page was refused,
    and the whole copy with it (exit 2)."""
    import asyncio

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.submit_jobs([Echo.spec(job_id="tick", trigger=every(hours=1),
                                           dedupe_scope="@fire", queue="copyq")])
            fire = (await m.run_job("tick", 10))["fire_id"]
            await m.submit_jobs([{"func": "tests.jobs:Echo", "job_id": "page", "parent": fire,
                                  "round": fire, "dedupe_scope": fire, "queue": "copyq"}])
            queued_at = (await m.get_job("page"))["enqueued_at"]
            # a copy passes over jobs queued since it began
            await redis_clock_past(m.redis, queued_at + 0.002)
            step = await m.bulk_jobs("copy", {"ids": [fire, "page"]}, "", "op1")
            assert step["touched"] == 2, step
            for source in (fire, "page"):
                copy = await m.get_job(f"{source}~op1")
                assert (copy["dedupe_scope"], copy["round"]) == (fire, fire), copy
    asyncio.run(main())


def test_a_copy_whose_round_source_goes_as_it_is_submitted_copies_the_others(redis_url):
    """A copy of a fire's job joins the round as its source's child; a source deleted
    between its read and the copy's submit failed that check, which refused the whole step:
    no job of it copied, and elric copy exited 2 with a round error naming no job."""
    import asyncio

    from tests.test_dedupe_keys_given_back import master

    async def main():
        async with master(redis_url) as m:
            await m.submit_jobs([Echo.spec(job_id="tick", trigger=every(hours=1),
                                           dedupe_scope="@fire", queue="copyq")])
            fire = (await m.run_job("tick", 10))["fire_id"]
            await m.submit_jobs([{"func": "tests.jobs:Echo", "job_id": i, "parent": fire,
                                  "round": fire, "dedupe_scope": fire, "queue": "copyq"}
                                 for i in ("stays", "goes")])
            queued_at = (await m.get_job("goes"))["enqueued_at"]
            # a copy passes over jobs queued since it began
            await redis_clock_past(m.redis, queued_at + 0.002)
            submit = m.bulk.admission.submit

            async def after_one_goes(specs):   # another operator's delete, meanwhile
                await m.queue.remove("goes")
                return await submit(specs)
            m.bulk.admission.submit = after_one_goes
            step = await m.bulk_jobs("copy", {"ids": ["stays", "goes"]}, "", "op1")
            assert (step["touched"], step["skipped"]) == (1, 1), step
            assert "'goes'" in step["errors"][0], step
            assert (await m.get_job("stays~op1"))["status"] == "queued"
            assert await m.get_job("goes~op1") is None
    asyncio.run(main())


def test_a_bulk_command_whose_later_step_fails_says_what_the_earlier_ones_did(monkeypatch,
                                                                             capsys):
    """A step refused after others had copied (Redis away, a master restarting) was told
    as "nothing was changed, try again": run again, every copy made was made twice."""
    from elric import cli
    from elric.client import MasterClient
    from elric.rpc import RemoteError

    steps = iter([{"touched": 2000, "skipped": 1, "errors": ["no job 'x'"], "cursor": "c1"}])

    def bulk_jobs(self, action, f, cursor="", op=""):
        for step in steps:
            return step
        raise RemoteError({"code": "redis_unavailable", "message": "master cannot reach Redis "
                           "right now (gone); nothing was changed, try again"})
    monkeypatch.setattr(MasterClient, "bulk_jobs", bulk_jobs)
    assert cli.main(["copy", "--batch", "b", "--master", "127.0.0.1:1"]) == cli.UNAVAILABLE
    err = capsys.readouterr().err
    assert err.startswith("elric: copy stopped after 2000 jobs done, 1 skipped (not undone; run "
                          "again, it copies them again): master cannot reach Redis"), err


def test_a_find_step_of_long_ids_answers_what_the_least_message_limit_takes(redis_url):
    """Each find step's reply fits in 64 KiB (its ZSCAN pages cut where they would not:
    one page scanned again in fewer, or left to the next step), and the steps reach every
    job once at least."""
    import asyncio

    from elric.contract import MIN_MESSAGE
    from elric.rpc import packed_size
    from tests.test_dedupe_keys_given_back import master

    ids = [f"{i:04d}" + "y" * 196 for i in range(1200)]

    async def main():
        async with master(redis_url) as m:
            for n in range(0, len(ids), 300):
                await m.submit_jobs([Echo.spec(job_id=job_id, queue="longq")
                                     for job_id in ids[n:n + 300]])
            cursor, found, steps = "", set(), 0
            while True:
                step = await m.bulk_jobs("find", {"queue": "longq"}, cursor)
                assert packed_size(step) < MIN_MESSAGE - 64, len(step["ids"])
                found.update(step["ids"])
                cursor, steps = step["cursor"], steps + 1
                if not cursor:
                    break
            assert found == set(ids) and steps >= 4, steps
    asyncio.run(main())


def test_an_unreadable_schedule_among_the_ids_is_skipped_and_named_not_failing_the_rest(
        cluster, redis_url):
    """An id given to delete, cancel, rerun or copy that is no job is looked for among the
    periodic jobs: one whose schedule hash an operator overwrote (a field of garbage, or
    another type) failed the whole command (a usage error, or an internal error), the
    jobs beside it left alone. It is skipped, named, as any periodic job is."""
    import redis

    from elric.keys import Keys

    for job_id in ("bad-field", "bad-type"):
        cluster.client.submit_job(Echo.spec(job_id=job_id, trigger=every(hours=1)))
    with redis.Redis.from_url(redis_url) as r:
        r.hset(Keys().schedule("bad-field"), "trigger", b"\xc1")
        r.set(Keys().schedule("bad-type"), "an operator's")
    for command, does in (("delete", "remove {} removes it"), ("cancel", "pause|remove {} "
                          "stops it"), ("rerun", "run-now {} fires it now"),
                          ("copy", "run-now {} fires it now")):
        cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 1], "queue": "nobody",
                                   "job_id": "there"})
        out = elric(cluster, command, "bad-field", "there", "bad-type", "typo", "--json")
        assert out.returncode == 0, (command, out.stdout, out.stderr)
        assert json.loads(out.stdout) == {"touched": 1, "skipped": 2, "not_found": ["typo"],
                                          "errors": [
            f"job '{i}' is periodic: elric schedules {does.format(i)}"
            for i in ("bad-field", "bad-type")]}, (command, out.stdout)


def test_a_job_whose_key_an_operator_overwrote_is_skipped_and_named_by_a_bulk_command(
        cluster, redis_url):
    """A job key of another type among the ids given, or in an index a walk goes through,
    failed the whole command with an internal error (WRONGTYPE), the jobs beside it left
    alone (elric purge of its queue: none purged). A walk skips it, named with what to do
    (its fields cannot say whether the filter picks it: a purge of q1 also walks other
    queues' jobs); a delete by id deletes it, as the message says: skipped by a delete
    too, it could not be deleted at all."""
    import redis

    from elric.keys import Keys

    cluster.client.submit_jobs([Echo.spec(job_id=job_id, queue=queue) for job_id, queue in
                                (("one", "q1"), ("two", "q1"), ("three", "q1"),
                                 ("four", "q1"), ("other", "q2"))])
    with redis.Redis.from_url(redis_url) as r:
        for job_id in ("two", "four", "other"):
            r.set(Keys().job(job_id), "an operator's")

        def said(job_id):
            return (f"job '{job_id}' cannot be read: elric:job:{job_id} is not a hash "
                    f"(overwritten?); delete it (elric delete {job_id})")
        for args, touched, skipped in ((("cancel", "one", "two"), 1, ["two"]),
                                       (("purge", "q1"), 1, ["four", "two"]),
                                       (("delete", "two", "one"), 2, [])):
            out = elric(cluster, *args, "--json")
            assert out.returncode == 0, (args, out.stdout, out.stderr)
            got = json.loads(out.stdout)
            assert sorted(got.pop("errors")) == [said(job_id) for job_id in skipped], args
            assert got == {"touched": touched, "skipped": len(skipped), "not_found": []}, args
        assert cluster.client.get_job("three") is None   # purged
        assert r.exists(Keys().job("two")) == 0            # deleted by id
        assert r.exists(Keys().job("four"), Keys().job("other")) == 2   # left, named
