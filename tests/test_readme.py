"""The README's quick start runs as written: its files and commands, taken from the README
itself, against a private Redis, a real master and worker, and the site its commands
serve."""

from __future__ import annotations

import json
import os
import re
import shlex
import socket
import subprocess
import sys

from elric.redis_server import free_port
from tests.conftest import ROOT, Cluster, wait_for
from tests.procs import kill_group, run_group

README = os.path.join(ROOT, "README.md")
URL = "http://127.0.0.1:8000/"


def quick_start() -> tuple[dict[str, str], list[str]]:
    """(file name -> code, shell lines) of the README's quick start section."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    files, commands = {}, []
    for lang, body in re.findall(r"```(\w+)\n(.*?)```", section, re.S):
        if lang == "python":
            name = re.match(r"# (\S+\.py)", body).group(1)
            files[name] = body
        elif lang == "sh":
            commands += [line for line in body.splitlines() if line.strip()]
    return files, commands


def test_the_quick_start_crawls_a_site_and_schedules_it(redis_url, tmp_path):
    """Every step as written, from the folder that holds jobs.py: the site its commands
    serve (port 8000 taken for a free one) is crawled, each page once and none failed,
    links with fragments followed and pages that are no text (an image) fetched too."""
    files, commands = quick_start()
    assert set(files) == {"jobs.py", "schedule.py"}
    folder = tmp_path / "site"   # the logs stay outside: the site serves this folder
    folder.mkdir()
    for name, code in files.items():
        (folder / name).write_text(code)
    # pages a real site has: links with fragments (and back: a cycle), an image
    (folder / "links.html").write_text('<a href="jobs.py#top">j</a> <a href="logo.png">i</a>'
                                       ' <a href="./#list">back</a> <a href="#here">here</a>')
    (folder / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    [pip] = [c for c in commands if c.startswith("pip install")]
    assert "[crawl]" in pip and not pip.split()[2].startswith("'."), \
        "the folder with jobs.py is no clone of elric: pip install needs the clone's path"
    assert any(c.startswith("elric master") for c in commands)
    worker = next(c for c in commands if c.startswith("elric worker"))
    [serve] = [c for c in commands   # the site: the one command left running in the background
               if c.startswith("python ") and "&" in shlex.split(c, comments=True)]
    port = free_port()
    url = URL.replace("8000", str(port))
    argv = [a.replace("8000", str(port)) for a in shlex.split(serve, comments=True)[1:]
            if a != "&"]
    with open(tmp_path / "site.log", "w") as site_log:
        site = subprocess.Popen([sys.executable, *argv], cwd=folder, stdout=site_log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    cluster = Cluster(redis_url, tmp_path, JOB_MODULES="")   # as the quick start: none set
    try:
        wait_for(lambda: _answers(port), what=f"the quick start's site: {serve}")
        # `elric master &` and `elric worker ...`, started from the folder with jobs.py
        from elric.launch import start_master, start_worker
        cluster.procs.append(start_master(cluster.env, str(tmp_path / "master.log"),
                                          cwd=str(folder)))
        args = [a for a in shlex.split(worker, comments=True)[2:] if a != "&"]
        cluster.procs.append(start_worker(cluster.env, str(tmp_path / "worker.log"),
                                          cwd=str(folder), extra=args))
        def run(line):
            words = [a.replace(URL, url) for a in shlex.split(line, comments=True)]
            argv = [sys.executable, *words[1:]] if words[0] == "python" else \
                [sys.executable, "-m", "elric", *words[1:]]
            done = run_group(argv, timeout=60, cwd=folder, env=cluster.env)
            assert done.returncode == 0, done.stderr + done.stdout

        for line in commands:
            if line.startswith(("python ", "elric schedules ")) and line != serve:
                run(line)
        assert cluster.client.get_job("site")["status"] == "scheduled"

        def ended(pages=5):
            by_status = cluster.client.stats()["by_status"]
            return by_status["succeeded"] + by_status["failed"] >= pages and not any(
                by_status[s] for s in ("queued", "running", "retrying"))
        wait_for(ended, timeout=60, what=f"the crawl to end\n{cluster.logs()}")
        jobs = cluster.client.list_jobs(limit=1000)
        failed = [(j["args"], j.get("error")) for j in jobs if j["status"] != "succeeded"]
        assert not failed, failed
        hits: dict[str, int] = {}
        for path in re.findall(r'"GET (\S+) HTTP', (tmp_path / "site.log").read_text()):
            hits[path] = hits.get(path, 0) + 1
        assert {"/", "/jobs.py", "/schedule.py", "/links.html", "/logo.png"} <= set(hits)
        assert all(n == 1 for n in hits.values()), hits
        # its "now", run again, crawls again: a plain submit was dropped by dedupe, the
        # first's pages seen in the global scope
        [now] = [c for c in commands if c.endswith("# now")]
        run(now)
        wait_for(lambda: ended(2 * len(hits)), timeout=60, what=f"a crawl again\n{cluster.logs()}")
        again: dict[str, int] = {}
        for path in re.findall(r'"GET (\S+) HTTP', (tmp_path / "site.log").read_text()):
            again[path] = again.get(path, 0) + 1
        assert again == {path: 2 for path in hits}, again
        [links] = [cluster.client.get_job(j["job_id"]) for j in jobs
                   if j["args"] == [url + "links.html"]]
        assert links["result"] == {"url": url + "links.html", "links": 3}, links
        listed = run_group([sys.executable, "-m", "elric", "jobs", "--status", "succeeded",
                            "--json"], timeout=60, cwd=folder, env=cluster.env)
        assert listed.returncode == 0, listed.stderr
        assert url + "jobs.py" in {j["args"][0] for j in json.loads(listed.stdout)}
    finally:
        cluster.close()
        kill_group(site)


def test_the_quick_starts_crawl_takes_a_404_for_an_answer_and_retries_a_5xx(tmp_path):
    """Its raise_for_status() raised for any 4xx too: a broken link was retried (a crawler
    must not), then a failed job. Only a 5xx says to try again."""
    import asyncio
    import importlib.util

    import aiohttp
    import pytest

    from tests.test_crawler import Site

    (tmp_path / "jobs.py").write_text(quick_start()[0]["jobs.py"])
    spec = importlib.util.spec_from_file_location("quick_start_jobs", tmp_path / "jobs.py")
    jobs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(jobs)
    with Site({"/busy": (503, {}, b"")}) as site:   # any other path: a 404
        assert asyncio.run(jobs.Crawl().run(site.url + "/gone")) == {
            "url": site.url + "/gone", "links": 0}
        with pytest.raises(aiohttp.ClientResponseError, match="503"):
            asyncio.run(jobs.Crawl().run(site.url + "/busy"))


def _answers(port: int) -> bool:
    """Whether the site listens (a connection, not a GET: the crawl counts the GETs)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False



def test_the_readmes_settings_table_shows_each_keys_default():
    """The README's table of the settings most deployments touch copies their defaults from
    elric/config.py; a default changed there must not leave the README saying the old one."""
    from elric.config import KEYS

    def shown(key: str) -> str:
        default = KEYS[key].default
        if default is None:
            return "CPU count" if key == "CONCURRENCY" else "none"
        if isinstance(default, float) and default.is_integer():
            return str(int(default))
        return default if isinstance(default, str) else json.dumps(default)

    with open(README, encoding="utf-8") as f:
        section = f.read().split("## Settings", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| (.+?) \|", section, re.M)
    assert len(rows) >= 10
    for names, defaults in rows:
        keys = re.findall(r"`([A-Z_]+)`", names)
        values = [v.strip("`") for v in defaults.split(", ")]
        assert values == [shown(k) for k in keys], names


def readme_commands() -> dict[str, list[str]]:
    """The subcommands the README's table of `elric` commands names (`elric a\\|b ...`:
    a and b), each with the actions it names after it (`elric schedules [pause\\|...]`)."""
    with open(README, encoding="utf-8") as f:
        section = f.read().split("## The `elric` command", 1)[1].split("\n## ", 1)[0]
    table = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| ")]
    commands: dict[str, list[str]] = {}
    for span in re.findall(r"`(elric [^`]+)`", "\n".join(table)):
        names, _, rest = span.removeprefix("elric ").partition(" ")
        actions = re.match(r"\[?([a-z-]+(?:\\\|[a-z-]+)+)", rest)
        for name in names.split("\\|"):
            commands.setdefault(name, []).extend(actions.group(1).split("\\|") if actions else [])
    return commands


def test_each_command_the_readme_names_exists(capsys):
    """The quick start ran, but nothing read the README's table of commands: a command
    renamed (or an action of one) left the README naming one that is not there."""
    from elric.cli import main

    commands = readme_commands()
    assert len(commands) >= 15 and {"submit", "schedules", "purge"} <= commands.keys(), commands
    for name, actions in commands.items():
        try:   # --help exits; an unknown command is a usage error, returned as 2
            status = main([name, "--help"])
        except SystemExit as exc:
            status = exc.code
        shown = capsys.readouterr()
        assert status == 0, (name, status, shown.err)
        for action in actions:   # named in its help (worker: "pause|resume|stop|set ID")
            assert action in shown.out, (name, action, shown.out)
