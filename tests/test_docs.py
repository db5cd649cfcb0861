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


def test_architectures_key_table_lists_the_keys_keys_py_builds():
    """ARCHITECTURE.md's Redis keys table is a copy of elric/keys.py's list, with more said
    per key: a key added to Keys, or renamed, must show in both (an operator reads them to
    inspect a deployment with redis-cli)."""
    import elric.keys

    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
        table = set(re.findall(r"^\| `(\{p\}:[^`]+)` \|", f.read(), re.M))
    listed = set(re.findall(r"``(\{p\}:[^`]+)``", elric.keys.__doc__))
    assert table == listed
    keys = Keys("p")
    built = [v for v in vars(keys).values() if v != "p"] + [
        keys.dedupe_taking("") + Keys.taker_note("s", "k")]
    for name, value in vars(Keys).items():
        if callable(value) and name not in ("__init__", "taker_note", "dedupe_taking"):
            ids = value.__closure__[0].cell_contents.count("{}")   # _family's pattern
            built.append(value(keys, *["x"] * ids))
    patterns = {p: re.compile(re.sub(r"\\\{\w+\\\}", ".+", re.escape(p.replace("{p}", "p"))))
                for p in listed}
    unlisted = [k for k in built if not any(r.fullmatch(k) for r in patterns.values())]
    assert not unlisted, f"keys Keys builds that keys.py's docstring does not list: {unlisted}"
    unbuilt = [p for p, r in patterns.items() if not any(r.fullmatch(k) for k in built)]
    assert not unbuilt, f"keys listed that Keys does not build: {unbuilt}"


def test_architectures_module_list_names_every_module_of_elric():
    """A contributor reads ARCHITECTURE.md's Modules for what each file of elric/ is for:
    one added (or renamed) must be said there, and none named there be gone."""
    with open(os.path.join(ROOT, "docs", "ARCHITECTURE.md"), encoding="utf-8") as f:
        section = f.read().split("\n## Modules\n", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(\w+)\.py`", section)) | set(re.findall(r"`(\w+)/`", section))
    top, every = set(), set()   # elric's modules and packages; and the packages' modules
    for folder, _, files in os.walk(os.path.join(ROOT, "elric")):
        if "__init__.py" in files:
            mine = {f.removesuffix(".py") for f in files if re.fullmatch(r"[a-z]\w*\.py", f)}
            top |= mine if folder.endswith("elric") else {os.path.basename(folder)}
            every |= mine | {os.path.basename(folder)}
    assert top <= named <= every, (top - named, named - every)
