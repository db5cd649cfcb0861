"""Commands the docs tell users to run do what the docs say (tests/test_readme.py runs the
README's quick start)."""

from __future__ import annotations

import asyncio
import json
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


def _section(doc: str, title: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read().split(f"\n## {title}", 1)[1].split("\n## ", 1)[0]


def test_readmes_settings_table_says_the_defaults_config_py_has():
    """README's settings table is what an operator reads first: each key is one config.py
    has, at the default it has (none, or what its description says a None stands for)."""
    from elric.config import KEYS

    rows = re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| (.+?) \|",
                      _section("README.md", "Settings"), re.M)
    assert rows
    for names, defaults in rows:
        names, defaults = re.findall(r"`(\w+)`", names), defaults.split(", ")
        assert len(names) == len(defaults), names
        for name, written in zip(names, defaults):
            assert name in KEYS, f"README's settings table names {name}: no such setting"
            value, said = KEYS[name].default, re.search(r"\(default: ([^)]+)\)", KEYS[name].doc)
            shown = (said.group(1) if said else "none") if value is None else \
                json.dumps(value) if isinstance(value, (list, dict)) else \
                f"{value:g}" if isinstance(value, (int, float)) else str(value)
            assert written.strip("`") == shown, f"README: {name} defaults to {written}, " \
                f"config.py: {shown}"


def test_readmes_command_table_names_every_command_and_only_options_they_take():
    """README's table of the `elric` command: every subcommand is there, and each option a
    row shows is one of its commands takes (an option renamed or dropped shows)."""
    from elric.cli import build_parser

    commands = build_parser().commands
    named = set()
    for cells in re.findall(r"^\| (.+) \| (.+) \|$", _section("README.md", "The `elric`"),
                            re.M)[2:]:
        these = [c for alts in re.findall(r"`elric ([\w\\|-]+)", cells[0])
                 for c in alts.split("\\|")]
        assert these and set(these) <= set(commands), these
        named |= set(these)
        taken = {o for c in these for a in commands[c]._actions for o in a.option_strings}
        shown = set(re.findall(r"(--\w[\w-]*)", " ".join(cells)))
        assert shown <= taken, f"{these}: README shows {sorted(shown - taken)}, not taken"
    assert named == set(commands), f"commands README's table lacks: {set(commands) - named}"


def test_protocol_names_every_job_field_filter_key_and_action_the_master_has():
    """What a client in another language can read or send, PROTOCOL.md names: each field of
    a job map, each list_jobs and bulk_jobs filter key, each bulk and control_worker action."""
    from elric import bulk, contract, master, queue

    methods = _section("docs/PROTOCOL.md", "Methods")
    row = dict(re.findall(r"^\| `(\w+)\(.*?` \| (.+) \|$", methods, re.M))
    fields = ({"job_id", "duration", "unreadable"} | set(queue._VIEW) | set(queue._OPTIONAL_VIEW)
              ) - {"duration_ms"}
    wanted = {"Job map (`get_job`)": ("Job map", fields),
              "list_jobs filter": ("Methods", set(master.LIST_FILTERS)),
              "bulk_jobs filter": ("bulk_jobs", set(bulk.JobFilter.__dataclass_fields__)),
              "bulk_jobs actions": ("bulk_jobs", set(bulk.ACTIONS)),
              "control_worker actions": ("control_worker", set(contract.WORKER_ACTIONS))}
    for what, (where, names) in wanted.items():
        text = row[where] if where in row else _section("docs/PROTOCOL.md", where)
        said = set(re.findall(r"`(\w+)`", text))
        assert names <= said, f"PROTOCOL.md's {what} lacks {sorted(names - said)}"


def test_protocols_methods_table_gives_each_handlers_arguments():
    """PROTOCOL.md's `method(args)` is how a client in another language calls it: each
    argument the master's handler takes, in order, optional (`[, x]`) where it has a default;
    an array of them (`[x, ...]`) stands for the handler's one list argument."""
    import inspect

    from elric.contract import METHODS
    from elric.master import Master

    rows = dict(re.findall(r"^\| `(\w+)\(([^)]*)\)` \|", _section("docs/PROTOCOL.md",
                                                                  "Methods"), re.M))
    assert set(rows) == set(METHODS)
    for method in METHODS:
        if method == "auth":   # the RPC layer's, not a handler
            continue
        written = re.sub(r"\[(\w+), \.\.\.\]", r"\1", rows[method])   # an array: one argument
        required, _, optional = written.partition("[")
        doc = [(name, False) for name in re.findall(r"\w+", required)] + [
            (name, True) for name in re.findall(r"\w+", optional)]
        params = [p for p in inspect.signature(getattr(Master, method)).parameters.values()
                  if p.name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD]
        code = [(p.name, p.default is not p.empty) for p in params]
        assert [(n.rstrip("s"), o) for n, o in code] == [(n.rstrip("s"), o) for n, o in doc], \
            f"{method}: PROTOCOL.md says {method}({rows[method]}), the handler takes {code}"


def test_crons_macros_are_the_ones_triggers_py_expands():
    """CRON.md's macro row: each macro and what it stands for, as triggers.MACROS has them."""
    from elric.triggers import MACROS

    [row] = re.findall(r"^\| Macros \| (.+) \| (.+) \|$", _section("docs/CRON.md",
                                                                    "Crontab rules"), re.M)
    macros, meanings = re.findall(r"`(@\w+)`", row[0]), re.findall(r"`([^`@]+)`", row[1])
    assert dict(zip(macros, meanings)) == MACROS and len(macros) == len(meanings)
