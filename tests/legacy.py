"""A separate virtual environment holding the legacy msgpack-rpc-python client.

msgpack-rpc-python 0.4.1 pulls the retired ``msgpack-python`` 0.5.6, which would clash
with the modern ``msgpack`` in the dev environment, so it lives in its own venv. It is
built once (a few seconds) and reused; a file lock keeps parallel test processes from
building it at the same time.

Location: ``$ELRICTEST_LEGACY_VENV``, default ``<repo>/.venv-legacy``.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("msgpack-rpc-python==0.4.1", "tornado==4.5.3")
_MARKER = ".elric-legacy-ready"


# How every legacy-client script starts: that client hands strings back as bytes.
SCRIPT_PRELUDE = """\
import json, sys
import msgpackrpc


def norm(x):
    if isinstance(x, bytes):
        return x.decode()
    if isinstance(x, dict):
        return {norm(k): norm(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [norm(v) for v in x]
    return x

"""

def legacy_venv() -> str:
    return os.path.abspath(os.environ.get("ELRICTEST_LEGACY_VENV") or os.path.join(ROOT, ".venv-legacy"))


def _ready(venv: str) -> bool:
    # The marker names the pins, so changing PACKAGES rebuilds the venv.
    try:
        with open(os.path.join(venv, _MARKER)) as f:
            return f.read() == "\n".join(PACKAGES) and os.path.exists(os.path.join(venv, "bin", "python"))
    except OSError:
        return False


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def legacy_python() -> str:
    """Path to the legacy venv's interpreter, building the venv first if needed."""
    venv = legacy_venv()
    python = os.path.join(venv, "bin", "python")
    if _ready(venv):
        return python
    os.makedirs(venv, exist_ok=True)
    # Lock the directory itself: no stray lock file next to it, and `venv --clear`
    # empties the directory without removing it, so the lock holds throughout.
    fd = os.open(venv, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if not _ready(venv):
            # Outside a venv _base_executable is sys.executable; inside one it is the
            # interpreter the venv was made from, so the new venv does not nest.
            base = getattr(sys, "_base_executable", None) or sys.executable
            # without pip of its own: this interpreter's pip installs into it. Bootstrapping
            # pip (and setuptools) into the new venv was most of the build's time
            _run([base, "-m", "venv", "--clear", "--without-pip", venv])
            _run([sys.executable, "-m", "pip", "--python", python, "install",
                  "--disable-pip-version-check", "--no-input", "-q", *PACKAGES])
            with open(os.path.join(venv, _MARKER), "w") as f:
                f.write("\n".join(PACKAGES))
    finally:
        os.close(fd)
    return python
