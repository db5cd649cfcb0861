"""`pip install` elric, then `elric demo` from an empty directory: nothing from the repo needed.

The wheel is built from a copy of the repo and installed into a fresh virtual environment.
No package index is used: the fresh environment takes elric's dependencies (redis, msgpack,
...) from this test environment through a .pth file, which is added only after the install
so that pip there never sees this environment's (editable) elric.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from tests.conftest import ROOT
from tests.procs import run_group


def clean_env(tmp_path) -> dict:
    # nothing may point back at the repo: no PYTHONPATH, no ELRIC_* settings
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("ELRIC_", "PIP_"))}
    env.update(PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1", TMPDIR=str(tmp_path))
    return env


def run(args, env, cwd, timeout=120) -> subprocess.CompletedProcess:
    # its own session, so a timeout can stop the demo's redis-server, master and worker too
    return run_group(args, timeout, cwd=cwd, env=env)


def build_wheel(tmp_path, env) -> str:
    # from a copy: an in-tree build would leave build/ and elric.egg-info/ in the repo
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
        ".hypothesis"))
    out = tmp_path / "wheels"
    # no build isolation: that would fetch setuptools from an index; this venv has it
    proc = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-w", str(out), str(src)], env, cwd=str(tmp_path))
    hint = ("\nthis environment's setuptools needs the 'wheel' package to build wheels "
            "(setuptools < 70.1): the test extras should install it\n"
            if "invalid command 'bdist_wheel'" in proc.stderr + proc.stdout else "")
    assert proc.returncode == 0, proc.stdout + proc.stderr + hint
    (wheel,) = out.glob("elric-*.whl")
    return str(wheel)


def test_installed_wheel_runs_the_demo_from_an_empty_directory(tmp_path):
    env = clean_env(tmp_path)
    wheel = build_wheel(tmp_path, env)
    names = set(zipfile.ZipFile(wheel).namelist())
    lua = {f"elric/lua/{n}" for n in os.listdir(os.path.join(ROOT, "elric", "lua"))
           if n.endswith(".lua")}
    assert {"elric/lua/__init__.py", "elric/demo/__init__.py", "elric/demo/crawler.py",
            "elric/demo/site.py"} | lua <= names, sorted(names)
    assert not any(n.startswith("examples/") for n in names)

    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", str(venv)], env, cwd=str(tmp_path))
    if made.returncode != 0:
        pytest.skip(f"cannot create a virtual environment here: {made.stderr.strip()}")
    python = str(venv / "bin" / "python")
    proc = run([python, "-m", "pip", "install", "--no-deps", "--no-index", wheel], env,
               cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # the dependencies, from this environment; .pth files in that directory are not run,
    # so its editable install of elric (a finder set up by a .pth) stays out
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
               env, cwd=str(tmp_path)).stdout.strip()
    ours = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    with open(os.path.join(site, "elric-test-deps.pth"), "w") as f:
        f.write("".join(f"{path}\n" for path in ours))

    empty = tmp_path / "empty"
    empty.mkdir()
    where = run([python, "-c", "import elric; print(elric.__file__)"], env, cwd=str(empty))
    assert where.returncode == 0, where.stderr
    assert os.path.realpath(where.stdout.strip()).startswith(os.path.realpath(site)), \
        where.stdout

    proc = run([str(venv / "bin" / "elric"), "demo", "--pages", "10"], env, cwd=str(empty),
               timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "crawled 11 pages (11 on the site, each fetched 1 time(s) at most)" in out, out
    assert "; 0 failed" in out, out
    assert "stopped everything the demo started" in out, out
    assert os.listdir(empty) == []  # wrote nothing into the directory it ran from
