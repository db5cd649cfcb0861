"""The README's quick start runs as written: its files and commands, taken from the README
itself, against a private Redis, a real master and worker, and the demo site."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

from elric.demo.site import DemoSite
from tests.conftest import ROOT, Cluster, wait_for

README = os.path.join(ROOT, "README.md")


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
    files, commands = quick_start()
    assert set(files) == {"jobs.py", "schedule.py"}
    for name, code in files.items():
        (tmp_path / name).write_text(code)
    assert any(c.startswith("elric master") for c in commands)
    worker = next(c for c in commands if c.startswith("elric worker"))
    cluster = Cluster(redis_url, tmp_path, JOB_MODULES="")   # as the quick start: none set
    with DemoSite(12) as site:
        try:
            # `elric master &` and `elric worker ...`, started from the folder with jobs.py
            from elric.launch import start_master, start_worker
            cluster.procs.append(start_master(cluster.env, str(tmp_path / "master.log"),
                                              cwd=str(tmp_path)))
            args = [a for a in shlex.split(worker, comments=True)[2:] if a != "&"]
            cluster.procs.append(start_worker(cluster.env, str(tmp_path / "worker.log"),
                                              cwd=str(tmp_path), extra=args))
            for line in commands:
                if not line.startswith("python "):
                    continue
                argv = [sys.executable] + [a.replace("http://127.0.0.1:8000/", site.url)
                                           for a in shlex.split(line, comments=True)[1:]]
                done = subprocess.run(argv, cwd=tmp_path, env=cluster.env, timeout=60,
                                      capture_output=True, text=True)
                assert done.returncode == 0, done.stderr
            assert cluster.client.get_job("site")["status"] == "scheduled"
            paths = site.paths()
            wait_for(lambda: set(site.hits) == set(paths) and cluster.client.stats()[
                "totals"]["succeeded"] >= len(paths), timeout=60,
                what=f"every page crawled\n{cluster.logs()}")
            assert all(n == 1 for n in site.hits.values()), site.hits
            listed = subprocess.run([sys.executable, "-m", "elric", "jobs", "--status",
                                     "succeeded"], cwd=tmp_path, env=cluster.env,
                                    capture_output=True, text=True, timeout=60)
            assert listed.returncode == 0 and site.url in listed.stdout, listed.stderr
        finally:
            cluster.close()
