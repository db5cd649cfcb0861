"""The examples run as documented, with real processes: the minimal hello job and `elric
demo` (the crawlers: tests/test_crawler.py)."""

from __future__ import annotations

import contextlib
import glob
import os
import re
import signal
import subprocess
import sys
import threading

from tests.conftest import ROOT, wait_for
from tests.procs import group, run_group


def script_env(**elric) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELRIC_")}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.update({f"ELRIC_{k}": str(v) for k, v in elric.items()})
    return env


def demo_in(folder, env: dict) -> subprocess.CompletedProcess:
    """`elric demo --pages 3` run in ``folder``, which is its temp folder too."""
    env["TMPDIR"] = str(folder)
    return run_group([sys.executable, "-m", "elric", "demo", "--pages", "3"], timeout=120,
                     cwd=str(folder), env=env)


def test_hello_example_as_documented(cluster, tmp_path):
    """Its docstring's commands: it named no worker to start (one for the examples' module)."""
    from examples import hello

    [worker] = re.findall(r"^ *elric worker (.*?) &", hello.__doc__, re.M)
    cluster.start_worker(*worker.split(), "--concurrency", "1")
    proc = subprocess.run(
        [sys.executable, "-c", "from examples.hello import Add; print(Add.submit(2, 3))"],
        cwd=str(tmp_path), env=script_env(MASTER_ADDRESS=cluster.address),
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    job = cluster.wait_job(proc.stdout.strip())
    assert (job["status"], job["result"], job["func"]) == ("succeeded", 5, "examples.hello:Add")


def test_elric_demo_command(tmp_path):
    # `elric demo` starts its own redis-server, master and worker, and stops them again
    env = script_env()
    env["TMPDIR"] = str(tmp_path)
    proc = run_group([sys.executable, "-m", "elric", "demo", "--pages", "10"], timeout=120,
                     cwd=ROOT, env=env)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "crawled 11 pages (11 on the site, each fetched 1 time(s) at most)" in out, out
    assert "0 failed" in out
    crawled = re.findall(r"^\s+(http://127\.0\.0\.1:\d+/\S*)\s+\d+ links", out, re.M)
    assert len(crawled) == 11 and len(set(crawled)) == 11, out
    assert {u.split("/", 3)[3] for u in crawled} == {""} | {f"p/{n}" for n in range(10)}
    assert "stopped everything the demo started" in out
    pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
    assert len(pids) == 3, out  # redis-server, master, worker
    for pid in pids:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        raise AssertionError(f"the demo left pid {pid} running")
    # its logs go with a crawl that went well (a failed one keeps them, and says where)
    assert not list(tmp_path.glob("elric-demo-*")), list(tmp_path.iterdir())


def test_elric_demo_on_a_redis_of_yours_leaves_no_keys_behind(redis_url, tmp_path):
    """With ELRIC_REDIS_URL the demo uses that Redis, under a prefix of its own: every run
    left its keys there (queues, stats, workers, its dedupe set: for good)."""
    import redis

    env = script_env(REDIS_URL=redis_url)
    env["TMPDIR"] = str(tmp_path)
    proc = run_group([sys.executable, "-m", "elric", "demo", "--pages", "3"], timeout=120,
                     cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"using Redis at {redis_url}" in proc.stdout, proc.stdout
    with redis.Redis.from_url(redis_url) as r:
        assert r.keys("*") == []


def test_elric_demo_runs_its_own_jobs_whatever_job_modules_a_local_settings_allows(tmp_path):
    (tmp_path / "settings.py").write_text('JOB_MODULES = ["myproject"]\n')
    proc = demo_in(tmp_path, script_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crawled 4 pages (4 on the site" in proc.stdout, proc.stdout


def test_elric_demo_calls_its_master_with_the_rpc_token_a_local_settings_sets(tmp_path):
    """A settings.py with RPC_TOKEN where the demo ran: its master asked for the token, the
    demo waited 20 s for an answer without it, then printed a traceback and left its logs."""
    (tmp_path / "settings.py").write_text('RPC_TOKEN = "s3cret"\n')
    proc = demo_in(tmp_path, script_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crawled 4 pages (4 on the site" in proc.stdout, proc.stdout
    assert not list(tmp_path.glob("elric-demo-*")), list(tmp_path.iterdir())


def test_elric_demo_whose_master_cannot_start_says_so_without_a_traceback(tmp_path):
    from elric.redis_server import free_port

    nobody_there = f"redis://127.0.0.1:{free_port()}/0"
    proc = demo_in(tmp_path, script_env(REDIS_URL=nobody_there))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    [logs] = tmp_path.glob("elric-demo-*")   # kept, and said where
    assert proc.stderr.startswith("demo: master exited with 3") and \
        f"logs in {logs}" in proc.stderr, proc.stderr
    assert "cannot connect" in (logs / "master.log").read_text()


def test_a_master_started_that_never_answers_is_not_left_running(redis_url, tmp_path):
    """start_master gave up on a master that did not answer (the demo's, asking for the
    RPC_TOKEN of a settings.py it did not know) and left it running, with no one to stop it.
    A refusal for want of the token is final: it says so at once, not after a 20 s wait."""
    import socket

    import pytest

    from elric.launch import elric_env, start_master
    from elric.redis_server import free_port

    (tmp_path / "token.py").write_text('RPC_TOKEN = "s3cret"\n')
    address = f"127.0.0.1:{free_port()}"
    env = {**elric_env(redis_url, address), "ELRIC_SETTINGS": str(tmp_path / "token.py")}
    with pytest.raises(RuntimeError, match="refused the client: authentication required"):
        start_master(env, str(tmp_path / "master.log"))

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", int(address.split(":")[1])), 1).close()
            return False
        except OSError:
            return True
    wait_for(refused, timeout=10, what="the master that never answered stopped")


# `elric demo --pages 999` (its most) on a site that answers each page in half a second
SLOW_DEMO = """
import sys, time
from elric.cli import main
from elric.demo.site import DemoSite
render = DemoSite.render
def slow(self, path):
    time.sleep(0.5)
    return render(self, path)
DemoSite.render = slow
sys.exit(main(["demo", "--pages", "999"]))
"""


@contextlib.contextmanager
def demo_crawling(tmp_path):
    """``elric demo`` on a site it takes half a minute or more over, once it crawls: (its
    process, the lines it printed so far, their reader). 2,000 pages took 5 s, and on a
    loaded machine a Ctrl-C came after the crawl had ended: its pages answer slowly (16
    at a time, LIMITS). Its own session: on a failure the whole group is killed, its
    redis-server, master and worker too (they ran on after a kill of the demo alone)."""
    env = script_env()
    env["TMPDIR"] = str(tmp_path)
    with group([sys.executable, "-c", SLOW_DEMO],
               cwd=str(tmp_path), env=env, stdout=subprocess.PIPE, text=True,
               stdin=subprocess.DEVNULL,
               # as from a terminal: tests started in the background inherit SIGINT
               # ignored, and the demo then ran on through the Ctrl-C
               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)) as proc:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        wait_for(lambda: any(line.startswith("crawling") for line in lines), timeout=120,
                 what="the demo crawling")
        yield proc, lines, reader


def test_elric_demo_stopped_by_ctrl_c_leaves_no_log_folder(tmp_path):
    """Ctrl-C during the crawl stopped everything but left its temporary log folder, said
    nowhere (it keeps one only where it says so: a crawl that failed)."""
    with demo_crawling(tmp_path) as (proc, lines, reader):
        assert list(tmp_path.glob("elric-demo-*"))   # its logs, while it runs
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        reader.join(10)
        assert "stopped everything the demo started\n" in lines, lines
        assert not list(tmp_path.glob("elric-demo-*")), list(tmp_path.iterdir())


def test_elric_demo_ctrl_c_from_a_terminal_ends_it_in_seconds(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole group) while the worker ran jobs took 31 s:
    the demo's redis-server ended at once, and its worker gave the jobs it could no longer
    record the full SHUTDOWN_GRACE (30 s). A demo needs none of its jobs finished."""
    from elric.client import MasterClient

    with demo_crawling(tmp_path) as (proc, lines, reader):
        out = "".join(lines)
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", out)]
        assert len(pids) == 3, lines  # redis-server, master, worker
        with MasterClient(re.search(r"started master .* on (\S+);", out)[1]) as client:
            wait_for(lambda: client.stats()["by_status"].get("succeeded", 0) >= 100,
                     timeout=60, what="the worker crawling at speed")
        os.killpg(proc.pid, signal.SIGINT)   # as a terminal's Ctrl-C: to every process
        try:   # (well above what a stop takes, well below SHUTDOWN_GRACE's 30 s)
            assert proc.wait(timeout=15) == 130
        except subprocess.TimeoutExpired:
            raise AssertionError("the demo still stopping 15 s after Ctrl-C") from None
        reader.join(10)
        assert "stopped everything the demo started\n" in lines, lines
        assert not [pid for pid in pids if _alive(pid)]
        assert not _running_in_session(proc.pid)   # the worker's pool processes neither
        assert not list(tmp_path.glob("elric-demo-*")), list(tmp_path.iterdir())


def test_elric_demo_without_the_crawl_extra_crawls_with_the_sync_crawler(tmp_path):
    # aiohttp made unimportable in the demo's process, as after a plain `pip install .`
    code = ("import builtins, sys\n"
            "real = builtins.__import__\n"
            "def no_aiohttp(name, *args, **kwargs):\n"
            "    if name.split('.')[0] == 'aiohttp':\n"
            "        raise ImportError(\"No module named 'aiohttp'\")\n"
            "    return real(name, *args, **kwargs)\n"
            "builtins.__import__ = no_aiohttp\n"
            "from elric.demo import run_demo\n"
            "sys.exit(run_demo(pages=3))\n")
    env = script_env()
    env["TMPDIR"] = str(tmp_path)
    proc = run_group([sys.executable, "-c", code], timeout=120, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # the README's install line: 'elric[crawl]' alone names a package on PyPI, not this one
    assert "pip install '/path/to/elric[crawl]'; crawling with the synchronous crawler" \
        in proc.stdout
    assert "crawled 4 pages (4 on the site, each fetched 1 time(s) at most)" in proc.stdout


def test_elric_demo_stopped_by_sigterm_stops_what_it_started(tmp_path):
    """A `kill`, a supervisor or a closed terminal ended the demo alone: its redis-server,
    master and worker ran on."""
    env = script_env()
    env["TMPDIR"] = str(tmp_path)
    with group([sys.executable, "-m", "elric", "demo", "--pages", "3", "--keep"],
               cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True,
               stdin=subprocess.DEVNULL) as proc:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
        reader.start()
        wait_for(lambda: any("the dashboard stays" in line for line in lines), timeout=120,
                 what="the demo crawled and waits")
        pids = [int(p) for p in re.findall(r"\(pid (\d+)\)", "".join(lines))]
        assert len(pids) == 3, lines  # redis-server, master, worker
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        reader.join(10)
        assert "stopped everything the demo started\n" in lines, lines
        wait_for(lambda: not any(_alive(pid) for pid in pids), timeout=30,
                 what="the demo's processes gone")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _running_in_session(sid: int) -> list[str]:
    """The processes of session ``sid`` still running (not zombies: an init in a container
    may reap none), as their /proc stat lines."""
    running = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                line = f.read()
        except OSError:   # (ended meanwhile)
            continue
        state, _, _, session = line.rpartition(")")[2].split()[:4]
        if int(session) == sid and state != "Z":
            running.append(line)
    return running


# A crawl whose listing lacks a page (here: every page), as any crawl that left one out
MISSES_PAGES = """
import sys
import elric.client
import elric.demo as demo
elric.client.MasterClient.list_jobs = lambda self, **f: []
sys.exit(demo.run_demo(pages=3))
"""


def test_elric_demo_that_did_not_crawl_every_page_says_so_and_keeps_its_logs(tmp_path):
    """A count of failed jobs took the name of the function that says a demo failed: "not
    every page was crawled" was a TypeError traceback, its logs removed."""
    env = script_env()
    env["TMPDIR"] = str(tmp_path)
    proc = run_group([sys.executable, "-c", MISSES_PAGES], timeout=120, cwd=str(tmp_path),
                     env=env)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
    [logs] = tmp_path.glob("elric-demo-*")
    assert f"demo: not every page was crawled; logs in {logs}" in proc.stderr, proc.stderr


# The demo picks free ports, then starts its master on them: another process can take one
# in between (CI's run did, a test beside it), and the demo said "cannot listen" and failed.
TAKEN_FIRST = """
import sys
import elric.demo as demo
from elric.redis_server import free_port
handed = iter([free_port(), int(sys.argv[1])])   # the master's address, then its dashboard's
demo.free_port = lambda: next(handed, None) or free_port()
sys.exit(demo.run_demo(pages=3))
"""


def test_elric_demo_picks_other_ports_when_one_it_picked_is_taken_before_its_master_listens(
        tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env = script_env()
        env["TMPDIR"] = str(tmp_path)
        proc = run_group([sys.executable, "-c", TAKEN_FIRST, str(taken.getsockname()[1])],
                         timeout=120, cwd=str(tmp_path), env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "crawled 4 pages (4 on the site" in proc.stdout, proc.stdout
    assert "taken" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
