"""Commands the docs tell users to run do what the docs say (tests/test_readme.py runs the
README's quick start)."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest
import redis.asyncio as aioredis

from elric.dedupe import make_filter
from elric.keys import Keys
from tests.conftest import ROOT


@pytest.mark.parametrize("backend", ["set", "bloom", "redis-bloom"])
def test_dedupes_drop_scope_command_empties_the_scope(redis_url, backend):
    """DEDUPE.md said "drop_scope it" to switch a scope's backend, and no command, RPC or
    CLI does: its command now drops a scope of any backend, so each key is new again."""
    with open(os.path.join(ROOT, "docs", "DEDUPE.md"), encoding="utf-8") as f:
        [command] = re.findall(r"```sh\n(python -c .*?)```", f.read(), re.S)
    command = command.replace('"set"', f'"{backend}"').replace(
        "redis://127.0.0.1:6379/0", redis_url)

    async def check_and_add() -> list[bool]:
        f = make_filter(backend, aioredis.Redis.from_url(redis_url), Keys("elric"),
                        snapshot_interval=0)
        await f.start()
        try:
            return await f.check_and_add("crawl", ["a"])
        finally:
            await f.close()
    assert asyncio.run(check_and_add()) == [True]
    assert asyncio.run(check_and_add()) == [False]
    done = subprocess.run(["sh", "-c", command.replace("python ", f"{sys.executable} ", 1)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert asyncio.run(check_and_add()) == [True]
