"""Start-up with real processes: a worker started before its master, a master started where
another listens, and a current directory that holds a folder named like the elric package."""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import subprocess
import sys
import textwrap
import threading

import pytest

from elric.launch import elric_env, wait_for_master
from elric.redis_server import free_port
from tests.conftest import ROOT, wait_for
from tests.procs import kill_group, run_group

# Like `pip install -e .`: elric is found by a finder placed after sys.path's own, so any
# folder named elric/ on sys.path, even an empty one, would win over it.
EDITABLE_FINDER = f"""
import importlib.machinery, sys

class _Finder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name == "elric":
            return importlib.machinery.PathFinder.find_spec(name, [{ROOT!r}])

# right after sys.path's own finder (and before that of any editable install of elric)
sys.meta_path.insert(sys.meta_path.index(importlib.machinery.PathFinder) + 1, _Finder)
"""

# Like the `elric` console script: its own folder is first on sys.path, not the cwd.
CONSOLE_SCRIPT = ("import sys\nfrom elric.cli import main\n"
                  "if __name__ == '__main__':\n    sys.exit(main())\n")

JOB_MODULE = textwrap.dedent("""
    from elric import Job


    class Greet(Job):
        def run(self, name):
            return f"hello {name}"
""")


def test_a_folder_named_elric_in_the_current_directory_hides_nothing(redis_url, tmp_path):
    project, site, bin_dir = tmp_path / "project", tmp_path / "site", tmp_path / "bin"
    for d in (project / "elric", site, bin_dir):
        d.mkdir(parents=True)
    (project / "greetings.py").write_text(JOB_MODULE)
    (site / "sitecustomize.py").write_text(EDITABLE_FINDER)
    (bin_dir / "elric").write_text(CONSOLE_SCRIPT)
    address = f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in elric_env(redis_url, address, CONCURRENCY=1).items()
           if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = str(site)  # elric itself only through the finder
    procs = []
    try:
        for role in ("master", "worker"):
            log = open(tmp_path / f"{role}.log", "wb")
            names = ["greetings"] if role == "worker" else []   # its job module, named
            procs.append(subprocess.Popen([sys.executable, str(bin_dir / "elric"), role, *names],
                                          cwd=project, env=env, stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True))
            log.close()
            if role == "master":
                wait_for_master(address)
        from elric.client import MasterClient

        with MasterClient(address) as client:
            job_id = client.submit_job({"func": "greetings:Greet", "args": ["you"]})["job_id"]
            job = wait_for(lambda: (lambda j: j if j["status"] in ("succeeded", "failed")
                                    else None)(client.get_job(job_id)), what="the job ran")
        logs = "".join((tmp_path / f"{r}.log").read_text() for r in ("master", "worker"))
        assert job["status"] == "succeeded", (job, logs)
        assert job["result"] == "hello you"
    finally:
        for p in procs:   # (the group: a worker's pool processes, one that ignores SIGTERM)
            kill_group(p)


def test_pool_processes_run_the_elric_of_a_worker_started_in_a_checkout(make_cluster, tmp_path):
    """A worker started in a checkout (python -m elric, run_worker.py) runs the checkout's
    elric, and its pool processes ran another elric installed on the path: the fork server
    starts in an empty folder, and Python 3.11's ignores the sys.path it is given."""
    import shutil

    other = tmp_path / "other"   # another elric, found after the checkout's own
    shutil.copytree(f"{ROOT}/elric", other / "elric",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (other / "whereami.py").write_text(textwrap.dedent("""
        import sys

        from elric import Job


        class Where(Job):
            def run(self):
                return sys.modules["elric.runner"].__file__
    """))
    c = make_cluster(JOB_MODULES="whereami")
    c.env["PYTHONPATH"] = str(other)
    c.start_master()
    c.start_worker("--concurrency", "1")
    job_id = c.client.submit_job({"func": "whereami:Where"})["job_id"]
    job = c.wait_job(job_id)
    assert job["status"] == "succeeded", (job["error"], c.logs())
    assert job["result"] == f"{ROOT}/elric/runner.py"


# --- a worker waits for Redis and its master ---------------------------------------------

def test_a_worker_started_before_its_master_waits_and_then_runs_jobs(make_cluster):
    c = make_cluster()
    worker = c.start_worker("--concurrency", "1", wait=False)
    wait_for(lambda: f"worker: cannot reach elric master at {c.address}; retrying"
             in worker.log() or not worker.alive(), what="the worker waiting for its master")
    assert worker.alive(), worker.log()
    c.start_master()
    from tests.jobs import Add

    job_id = c.client.submit_job(Add.spec([2, 3]))["job_id"]
    job = c.wait_job(job_id)
    assert job["status"] == "succeeded" and job["result"] == 5, c.logs()
    assert worker.alive()


def test_a_master_started_where_another_listens_fails_at_once_naming_the_address(
        make_cluster, started_procs):
    """start_master took any master's pong for its own: it returned, the master it started
    exited a moment later (cannot listen) and its caller talked to the other one."""
    c = make_cluster()
    first = c.start_master()
    with pytest.raises(RuntimeError, match=re.escape(
            f"another master already listens at {c.address} (pid {first.pid})")):
        c.start_master()
    (_, second) = started_procs
    assert not second.alive()          # stopped, not left to exit on its own
    assert c.client.health()["pid"] == first.pid


def test_a_master_whose_dashboard_cannot_listen_is_not_taken_for_started(make_cluster):
    """Its RPC server listened before its dashboard: a health call in between failed inside
    the master (a traceback in its log), and once health answered there, start_master (the
    demo's) took a master about to exit for started."""
    c = make_cluster()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dashboard = "127.0.0.1:%d" % taken.getsockname()[1]
        with pytest.raises(RuntimeError, match=re.escape(
                f"DASHBOARD_ADDRESS {dashboard}: cannot listen")) as raised:
            c.start_master(DASHBOARD_ADDRESS=dashboard)
    log = str(raised.value)   # (its whole log: it never joined the cluster's processes)
    assert log.startswith("master exited with 2") and "Traceback" not in log, log


@pytest.mark.parametrize("missing", ["redis", "master"])
def test_sigterm_while_waiting_exits_0_at_once(missing, make_cluster, redis_server):
    dead = f"127.0.0.1:{free_port()}"
    redis_url = f"redis://:pw-Zx81@{dead}/0" if missing == "redis" else redis_server.url
    c = make_cluster(REDIS_URL=redis_url)
    worker = c.start_worker(wait=False)
    expected = (f"worker: cannot reach Redis at redis://:***@{dead}/0; retrying"
                if missing == "redis"
                else f"worker: cannot reach elric master at {c.address}; retrying")
    wait_for(lambda: expected in worker.log() or not worker.alive(), what=expected)
    assert worker.alive(), worker.log()
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=5) == 0, worker.log()
    assert "Traceback" not in worker.log() and "pw-Zx81" not in worker.log(), worker.log()


class OldRedisProxy:
    """The test's real Redis behind a loopback proxy that says, in INFO, it is Redis 6.0
    (the same length as the real "7.0" or "6.2", so the reply stays well formed)."""

    def __init__(self, target_port: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port, self.target_port = self.listener.getsockname()[1], target_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return   # closed
            server = socket.create_connection(("127.0.0.1", self.target_port))
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, answers: bool) -> None:
        try:
            while data := src.recv(65536):
                if answers:
                    data = re.sub(rb"redis_version:\d\.\d", b"redis_version:6.0", data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                s.close()

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("role", ["master", "worker"])
def test_a_redis_older_than_6_2_is_refused_at_start_naming_it(role, redis_server, tmp_path):
    """On Redis 6.0 the scripts' ZADD LT fails with a syntax error: a worker fetched no job
    ever and logged the error at each try, with the master and the worker up and alive."""
    proxy = OldRedisProxy(redis_server.port)
    env = elric_env(f"redis://127.0.0.1:{proxy.port}/0", f"127.0.0.1:{free_port()}",
                    JOB_MODULES="tests.jobs")
    try:
        done = run_group([sys.executable, "-m", "elric", role], timeout=60, cwd=ROOT, env=env)
    finally:
        proxy.close()
    assert done.returncode == 2, done.stderr
    assert re.search(r"REDIS_URL redis://127\.0\.0\.1:\d+/0: Redis 6\.0\.\d+ is too old; elric "
                     r"needs Redis 6\.2 or later", done.stderr), done.stderr
    assert "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("role", ["master", "worker"])
def test_a_redis_url_where_no_redis_answers_is_refused_at_start_naming_it(role, tmp_path):
    """REDIS_URL at a port where an HTTP server listens: the master exited 2 naming it, the
    worker with a traceback from redis-py's parser (exit 1)."""
    with socket.create_server(("127.0.0.1", 0)) as site:
        def answer() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = site.accept()
                    with conn:
                        conn.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")
        threading.Thread(target=answer, daemon=True).start()
        url = f"redis://127.0.0.1:{site.getsockname()[1]}/0"
        env = elric_env(url, f"127.0.0.1:{free_port()}", JOB_MODULES="tests.jobs")
        done = run_group([sys.executable, "-m", "elric", role], timeout=60, cwd=ROOT, env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()   # (redis-py's parsers word it each their way)
    assert re.fullmatch(rf"elric: REDIS_URL {re.escape(url)}: cannot connect \(Protocol "
                        r"error.*\)", line, re.I), line
