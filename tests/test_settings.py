"""Settings: defaults, file < ELRIC_<KEY> < command line, and `elric master|worker` refusing
bad settings with one clear line and exit status 2 (real subprocesses, no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from elric.config import KEYS, SettingsError, load_settings, redact_url
from elric.redis_server import free_port
from tests.conftest import ROOT

# --- unit level -------------------------------------------------------------------------


@pytest.fixture
def no_settings_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no ./settings.py here
    return tmp_path


def test_defaults(no_settings_file):
    s = load_settings(env={})
    assert s.source is None
    assert {key: getattr(s, key) for key in KEYS} == {key: spec.default
                                                       for key, spec in KEYS.items()}
    assert s.MASTER_ADDRESS == "127.0.0.1:7531" and s.master_host_port == ("127.0.0.1", 7531)
    assert s.QUEUES == ["default"] and s.CONCURRENCY is None and s.RPC_TOKEN is None
    assert s.concurrency == (os.cpu_count() or 1)
    assert s.WORKER_CHUNK == 64 and s.LEASE_SECONDS == 30.0 and s.JOB_MODULES == []


def test_the_sample_settings_file_lists_every_key_at_its_default(no_settings_file):
    """settings.py in the repository is the reference a user copies: every key, and each
    at its default, so loading it changes nothing."""
    import runpy

    sample = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "settings.py")
    names = {k for k in runpy.run_path(sample) if k.isupper() and not k.startswith("_")}
    assert names == set(KEYS)
    s = load_settings(sample, env={})
    assert {key: getattr(s, key) for key in KEYS} == {key: spec.default
                                                       for key, spec in KEYS.items()}


def test_settings_that_0_turns_off_say_so(no_settings_file):
    """0 turned the lag warning and periodic Bloom snapshots off, which their descriptions
    did not say: 0 read as "warn at once" and "snapshot all the time"."""
    for key in ("LOOP_LAG_WARN", "BLOOM_SNAPSHOT_INTERVAL"):
        assert "(0: " in KEYS[key].doc, key
        assert getattr(load_settings(env={f"ELRIC_{key}": "0"}), key) == 0


def test_env_overrides_have_the_types_of_their_keys(no_settings_file):
    s = load_settings(env={
        "ELRIC_CONCURRENCY": "4", "ELRIC_RETRY_BACKOFF": "0.25", "ELRIC_LEASE_SECONDS": "10",
        "ELRIC_QUEUES": " a, b,,c ", "ELRIC_JOB_MODULES": "tests.jobs,examples",
        "ELRIC_RPC_TOKEN": "s3cret", "ELRIC_JOB_TIMEOUT": "none", "ELRIC_WORKER_CHUNK": "1",
        "ELRIC_MASTER_ADDRESS": "127.0.0.1:9999", "ELRIC_REDIS_URL": "redis://h:1/2",
        "ELRIC_LOG_LEVEL": "debug"})
    assert s.CONCURRENCY == 4 and type(s.CONCURRENCY) is int
    assert s.RETRY_BACKOFF == 0.25
    assert s.LEASE_SECONDS == 10.0 and isinstance(s.LEASE_SECONDS, float)
    assert s.QUEUES == ["a", "b", "c"]  # comma-separated, blanks dropped
    assert s.JOB_MODULES == ["tests.jobs", "examples"]
    assert s.RPC_TOKEN == "s3cret" and s.JOB_TIMEOUT is None and s.WORKER_CHUNK == 1
    assert s.master_host_port == ("127.0.0.1", 9999)
    assert s.REDIS_URL == "redis://h:1/2" and s.LOG_LEVEL == "debug"
    assert load_settings(env={"ELRIC_CONCURRENCY": ""}).CONCURRENCY is None  # nullable
    assert load_settings(env={"ELRIC_JOB_MODULES": ""}).JOB_MODULES == []   # any
    # not a worker that pulls from no queue, wherever the empty list is from
    for where, settings in (("ELRIC_QUEUES", {"env": {"ELRIC_QUEUES": ","}}),
                            ("command line", {"env": {}, "overrides": {"QUEUES": []}})):
        with pytest.raises(SettingsError, match=rf"^QUEUES \(from {where}\): names no queue"):
            load_settings(**settings)


def test_file_then_env_then_command_line(no_settings_file):
    path = no_settings_file / "mysettings.py"
    path.write_text("import os\nQUEUES = ('x', 'y')\nCONCURRENCY = 3\nKEY_PREFIX = 'file'\n"
                    "_HELPER = 1\nlower_case_is_ignored = 2\n")
    s = load_settings(str(path), env={"ELRIC_CONCURRENCY": "5"})
    assert s.source == str(path)
    assert s.QUEUES == ["x", "y"] and s.KEY_PREFIX == "file" and s.CONCURRENCY == 5
    s = load_settings(str(path), env={"ELRIC_CONCURRENCY": "5"},
                      overrides={"CONCURRENCY": 7, "QUEUES": None})
    assert s.CONCURRENCY == 7 and s.QUEUES == ["x", "y"]  # None: option not given
    # ELRIC_SETTINGS names the file; ./settings.py is the fallback
    assert load_settings(env={"ELRIC_SETTINGS": str(path)}).KEY_PREFIX == "file"
    (no_settings_file / "settings.py").write_text("KEY_PREFIX = 'cwd'\n")
    assert load_settings(env={}).KEY_PREFIX == "cwd"
    # ELRIC_SETTINGS before ./settings.py, as --help says (it said the other way round)
    assert load_settings(env={"ELRIC_SETTINGS": str(path)}).KEY_PREFIX == "file"
    ping = subprocess.run([sys.executable, "-m", "elric", "ping", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert "(default: $ELRIC_SETTINGS, else ./settings.py where there is one)" in " ".join(
        ping.stdout.split()), ping.stdout


@pytest.mark.parametrize("env, message", [
    ({"ELRIC_CONCURRENCY": "abc"}, "CONCURRENCY (from ELRIC_CONCURRENCY): expected an integer"),
    ({"ELRIC_LEASE_SECONDS": "soon"}, "LEASE_SECONDS (from ELRIC_LEASE_SECONDS): expected a "
                                      "number"),
    ({"ELRIC_WORKER_CHUNK": "0"}, "WORKER_CHUNK (from ELRIC_WORKER_CHUNK): must be positive"),
    ({"ELRIC_MAX_RETRIES": "-1"}, "MAX_RETRIES (from ELRIC_MAX_RETRIES): must be 0 or more"),
    # 0 would expire a round's counts as they are written: max_instances would not see it
    ({"ELRIC_FAILED_TTL": "0"}, "FAILED_TTL (from ELRIC_FAILED_TTL): must be positive"),
    # a default every spec takes: refused here, not as each submit's "bad timeout"
    ({"ELRIC_JOB_TIMEOUT": "0"}, "JOB_TIMEOUT (from ELRIC_JOB_TIMEOUT): must be positive"),
    ({"ELRIC_JOB_TIMEOUT": "3e9"}, "JOB_TIMEOUT (from ELRIC_JOB_TIMEOUT): must be at most "
                                   "2147483648 seconds"),
    # Redis cannot expire a key that far out: every keyed submit would fail
    ({"ELRIC_DEDUPE_TTL": "1e14"}, "DEDUPE_TTL (from ELRIC_DEDUPE_TTL): must be at most "
                                   "2147483648 seconds"),
    ({"ELRIC_DEDUPE_TAKEOVER_AFTER": "1e16"}, "DEDUPE_TAKEOVER_AFTER (from "
                                              "ELRIC_DEDUPE_TAKEOVER_AFTER): must be at most"),
    ({"ELRIC_JOB_TIMEOUT": "inf"}, "JOB_TIMEOUT (from ELRIC_JOB_TIMEOUT): must be a finite "
                                   "number, got inf"),
    ({"ELRIC_LEASE_SECONDS": "nan"}, "LEASE_SECONDS (from ELRIC_LEASE_SECONDS): must be a "
                                     "finite number"),
    # every retry waited RETRY_BACKOFF_MAX: the first delay given was never used
    ({"ELRIC_RETRY_BACKOFF": "600"}, "RETRY_BACKOFF_MAX (300) is below RETRY_BACKOFF (600)"),
    ({"ELRIC_RETRY_BACKOFF_MAX": "0.5"}, "RETRY_BACKOFF_MAX (0.5) is below RETRY_BACKOFF (1)"),
    # renewed every third of it, leases ran out under live workers: jobs redelivered
    ({"ELRIC_LEASE_SECONDS": "0.001"}, "LEASE_SECONDS (from ELRIC_LEASE_SECONDS): must be at "
                                       "least 1 second, got 0.001"),
    # renewed every 0.3 ms, in a busy loop of Redis calls: leadership lost at any hiccup
    ({"ELRIC_SCHEDULER_LEASE": "0.001"}, "SCHEDULER_LEASE (from ELRIC_SCHEDULER_LEASE): must "
                                         "be at least 0.3 seconds, got 0.001"),
    # no message fitted, not even a ping or auth: every call failed, the cause unsaid
    ({"ELRIC_RPC_MAX_MESSAGE": "1"}, "RPC_MAX_MESSAGE (from ELRIC_RPC_MAX_MESSAGE): must be "
                                     "at least 65536 bytes (64 KiB), got 1"),
    # a changed filter, up to hundreds of MiB, was rewritten to Redis 100 times a second
    ({"ELRIC_BLOOM_SNAPSHOT_INTERVAL": "0.01"}, "BLOOM_SNAPSHOT_INTERVAL (from ELRIC_BLOOM_"
     "SNAPSHOT_INTERVAL): must be 0 (snapshots only on stop) or at least 1 second, got 0.01"),
    ({"ELRIC_LOG_LEVEL": "loud"}, "LOG_LEVEL (from ELRIC_LOG_LEVEL): expected DEBUG"),
    # entries that named no scope a job can have, or one twice, did nothing, unsaid
    ({"ELRIC_FILTER_SCOPES": "crawl=bloom,=set"}, "FILTER_SCOPES (from ELRIC_FILTER_SCOPES): "
                                                  "'' is no scope: name a dedupe_scope"),
    ({"ELRIC_FILTER_SCOPES": "@fire=bloom"}, "'@fire' is no scope: name a dedupe_scope, or a "
                                             "periodic job's id for the scopes of its"),
    ({"ELRIC_FILTER_SCOPES": "a=set,a=bloom"}, "FILTER_SCOPES (from ELRIC_FILTER_SCOPES): a "
                                               "scope is named twice in 'a=set,a=bloom'"),
    # keys were never new again, and failed jobs kept theirs, unsaid
    ({"ELRIC_FILTER_BACKEND": "bloom", "ELRIC_DEDUPE_TTL": "3600"}, "DEDUPE_TTL applies to "
     "the 'set' dedupe backend only, and no scope uses it (FILTER_BACKEND 'bloom')"),
    ({"ELRIC_FILTER_BACKEND": "redis-bloom", "ELRIC_FILTER_SCOPES": "a=bloom",
      "ELRIC_DEDUPE_RELEASE_ON_FAILURE": "1"}, "DEDUPE_RELEASE_ON_FAILURE applies to the "
                                               "'set' dedupe backend only"),
    # its snapshots were refused by Redis, for good: a restart forgot every key
    ({"ELRIC_FILTER_SCOPES": "big=bloom", "ELRIC_BLOOM_CAPACITY": "300000000"},
     "BLOOM_CAPACITY 300000000 at BLOOM_ERROR_RATE 0.001: a 'bloom' scope's snapshot would "
     "be 524 MiB, over the 512 MiB a Redis string holds, so it could never be saved; use "
     "'redis-bloom' for it"),
    # a worker forked them all at start (the slip of a digit: a machine brought down),
    # where control_worker's set refused as many
    ({"ELRIC_CONCURRENCY": "5000"}, "CONCURRENCY (from ELRIC_CONCURRENCY): must be at most "
                                    "1024 pool processes, got 5000"),
    ({"ELRIC_REDIS_URL": "localhost:6379"}, "REDIS_URL (from ELRIC_REDIS_URL): "
                                            "'localhost:6379' is not a redis://"),
    # a port that is no number was a master's or worker's traceback at start; a database
    # that is none (/abc, /1/2) went to database 0 or 12 unsaid, with another's jobs
    ({"ELRIC_REDIS_URL": "redis://:pw@h:63790x/0"}, "REDIS_URL (from ELRIC_REDIS_URL): "
     "'redis://:***@h:63790x/0': the port must be a number from 1 to 65535, e.g. "
     "redis://127.0.0.1:6379/0"),
    ({"ELRIC_REDIS_URL": "redis://h:6379/abc"}, "REDIS_URL (from ELRIC_REDIS_URL): "
     "'redis://h:6379/abc': the database after the host must be a number, e.g. "
     "redis://127.0.0.1:6379/0"),
    ({"ELRIC_REDIS_URL": "redis://h:6379/1/2"}, "'redis://h:6379/1/2': the database after"),
    ({"ELRIC_REDIS_URL": "redis://h:6379?db=x"}, "'redis://h:6379?db=x': the database (db=) "
                                                 "must be a number"),
    # a #, / or ? in the password ends the host there: it was "the port must be a number"
    # (showing the password); a [ was a ValueError traceback from every command
    ({"ELRIC_REDIS_URL": "redis://:p#w@h:6379/0"}, "REDIS_URL (from ELRIC_REDIS_URL): "
     "'redis://:***@h:6379/0': the password is cut at a #, / or ?; percent-encode special "
     "characters in the password (# as %23, / as %2F, ? as %3F, [ as %5B, ] as %5D)"),
    ({"ELRIC_REDIS_URL": "redis://:p/w@h:6379/0"}, "the password is cut at a #, / or ?"),
    ({"ELRIC_REDIS_URL": "redis://:p?w@h:6379/0"}, "the password is cut at a #, / or ?"),
    ({"ELRIC_REDIS_URL": "redis://u:12#w@h/0"}, "'redis://u:***@h/0': the password is cut"),
    ({"ELRIC_REDIS_URL": "redis://:pa[ss@h:6379/0"}, "REDIS_URL (from ELRIC_REDIS_URL): "
     "'redis://:***@h:6379/0' does not parse as a URL; percent-encode special characters "
     "in the password (# as %23"),
    # the first connection was a TypeError quoting redis-py's AbstractConnection.__init__
    ({"ELRIC_REDIS_URL": "redis://h:6379/0?bogus=1"}, "REDIS_URL (from ELRIC_REDIS_URL): "
     "'redis://h:6379/0?bogus=1': unknown option 'bogus'; REDIS_URL takes redis-py's "
     "connection options, such as db, socket_timeout, socket_connect_timeout"),
    ({"ELRIC_REDIS_URL": "redis://h:6379/0?socket_timeout=5&ssl_cert_reqs=none"},
     "'redis://h:6379/0?socket_timeout=5&ssl_cert_reqs=none': option 'ssl_cert_reqs' is for "
     "TLS: use a rediss:// URL"),
    ({"ELRIC_REDIS_URL": "redis://h[:6379/0"}, "'redis://h[:6379/0' does not parse as a URL, "
                                               "e.g. redis://127.0.0.1:6379/0"),
    ({"ELRIC_REDIS_URL": "redis://:pw@h:63790x/0"}, "e.g. redis://127.0.0.1:6379/0; "
                                                    "percent-encode special characters"),
    # the master refused every job ("module 'tests.jobs' is not allowed by JOB_MODULES
    # (tests/jobs.py)") and a worker imported nothing, as `elric worker tests/jobs.py` does not
    ({"ELRIC_JOB_MODULES": "tests.jobs,tests/jobs_async.py"}, "JOB_MODULES (from "
     "ELRIC_JOB_MODULES): 'tests/jobs_async.py' is a path, not a module name: give "
     "tests.jobs_async"),
    ({"ELRIC_JOB_MODULES": "tests.jobs:Echo"}, "JOB_MODULES (from ELRIC_JOB_MODULES): "
     "'tests.jobs:Echo' is a func, not a module name: give its module, tests.jobs"),
    ({"ELRIC_JOB_MODULES": "my-jobs"}, "JOB_MODULES (from ELRIC_JOB_MODULES): 'my-jobs' is "
                                       "not a module name, such as myproject.jobs"),
    ({"ELRIC_MASTER_ADDRESS": "127.0.0.1"}, "MASTER_ADDRESS: '127.0.0.1' is not host:port"),
    ({"ELRIC_MASTER_ADDRESS": "127.0.0.1:99999"}, "MASTER_ADDRESS: '127.0.0.1:99999' is not"),
    ({"ELRIC_SETTINGS": "/nonexistent/elric.py"}, "settings file '/nonexistent/elric.py' "
                                                  "does not exist"),
])
def test_bad_env_values_name_the_key(no_settings_file, env, message):
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_redis_urls_that_redis_py_reads_are_accepted(no_settings_file):
    """/%30 is database 0 to redis-py (it was refused as no number); the other forms must
    keep passing the checks above."""
    for url in ("redis://h:6379/%30", "redis://h:6379/%31%32", "redis://h", "redis://h:1/2",
                "unix:///tmp/redis.sock", "unix:///tmp/redis.sock?db=3",
                "unix://:p%23w@/tmp/redis.sock?db=3", "rediss://h:6380/1",
                "redis://user:pass@h:6379/0", "redis://:p%23w%2F%3F%5B@h:6379/0",
                "redis://[::1]:6379/0", "redis://h:6379/0?socket_timeout=5&client_name=a@b",
                "rediss://u:p@h:6380/0?ssl_cert_reqs=none", "REDIS://h:6379/0",
                "unix:///tmp/r.sock?db=1&socket_timeout=2&max_connections=5",
                "redis://h:6379/0?bogus="):   # (no value: redis-py passes it over)
        assert load_settings(env={"ELRIC_REDIS_URL": url}).REDIS_URL == url


@pytest.mark.parametrize("url, shown", [
    ("redis://:secret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://u:secret@h:6379/0", "redis://u:***@h:6379/0"),
    ("redis://h:6379/0", "redis://h:6379/0"),
    ("unix:///tmp/r.sock?db=1", "unix:///tmp/r.sock?db=1"),
    ("unix://:secret@/tmp/r.sock", "unix://:***@/tmp/r.sock"),
    # an unencoded #, / or ? ends the password for urlsplit (it was shown whole), a [
    # raised ValueError: all of the password is hidden
    ("redis://:se#cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://u:se/cr?et@h:6379/0", "redis://u:***@h:6379/0"),
    ("redis://:se[cret@h:6379/0", "redis://:***@h:6379/0"),
    ("redis://:se@cret@h:6379/0", "redis://:***@h:6379/0"),
    # a password= option (redis-py's way for a unix socket) was shown in every message
    ("unix:///tmp/r.sock?password=secret&db=1", "unix:///tmp/r.sock?password=***&db=1"),
    ("redis://h:6379/0?db=1&Password=secret", "redis://h:6379/0?db=1&Password=***"),
])
def test_redact_url_hides_the_whole_password(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("body, message", [
    ("COLOUR = 'red'\n", "unknown setting COLOUR (known: REDIS_URL,"),
    # a typo: the key it is close to (it listed all 36 keys, as for COLOUR)
    ("LIMIT = {'*': {'concurrency': 8}}\n", "unknown setting LIMIT; did you mean LIMITS?"),
    ("JOBMODULES = ['jobs']\n", "unknown setting JOBMODULES; did you mean JOB_MODULES?"),
    ("CONCURRENCY = '4'\n", "CONCURRENCY (from {path}): expected int, got '4'"),
    ("CONCURRENCY = True\n", "CONCURRENCY (from {path}): expected int, got True"),
    ("QUEUES = 'a,b'\n", "QUEUES (from {path}): expected list, got 'a,b'"),
    ("QUEUES = ['a', '']\n", "QUEUES (from {path}): expected a list of names"),
    ("QUEUES = []\n", "QUEUES (from {path}): names no queue, and a worker would run nothing"),
    # it said "'set' is not one of set, bloom, redis-bloom"
    ("FILTER_SCOPES = {1: 'set'}\n", "FILTER_SCOPES (from {path}): 1 is no scope"),
    ("raise RuntimeError('nope')\n", "failed to load: RuntimeError: nope"),
])
def test_bad_settings_files_name_the_key(no_settings_file, body, message):
    path = no_settings_file / "bad_settings.py"
    path.write_text(body)
    with pytest.raises(SettingsError) as info:
        load_settings(str(path), env={})
    assert message.format(path=path) in str(info.value)


@pytest.mark.parametrize("env, message", [
    ({"ELRIC_REDIS_ULR": "redis://h/0"}, "ELRIC_REDIS_ULR: unknown setting in the environment; "
                                         "did you mean ELRIC_REDIS_URL?"),
    ({"ELRIC_CONCURENCY": "2"}, "did you mean ELRIC_CONCURRENCY?"),
    ({"ELRIC_NOTHING_LIKE_IT": "1"}, "ELRIC_NOTHING_LIKE_IT: unknown setting in the environment"),
    # nothing like any setting: no guess (it said "did you mean ELRIC_MAX_RETRIES?", the
    # ELRIC_ both share making any name look close); a variable elric reads that is no setting
    ({"ELRIC_BAR": "1"}, "ELRIC_BAR: unknown setting in the environment"),
    ({"ELRIC_SETTING": "s.py"}, "did you mean ELRIC_SETTINGS?"),
])
def test_unknown_elric_variables_are_errors(no_settings_file, env, message):
    with pytest.raises(SettingsError) as info:
        load_settings(env=env)
    assert message in str(info.value) and "\n" not in str(info.value)
    if "mean" not in message:
        assert str(info.value).endswith(message)
    # variables read elsewhere (the settings path, the redis-server binary) are allowed
    load_settings(env={"ELRIC_REDIS_SERVER": "/usr/bin/redis-server"})


def test_lower_case_key_in_a_settings_file_is_an_error(no_settings_file):
    path = no_settings_file / "lower.py"
    path.write_text("redis_url = 'redis://h:1/0'\n")
    with pytest.raises(SettingsError) as info:
        load_settings(str(path), env={})
    assert str(info.value) == (f"{path}: redis_url: settings names are upper case: "
                               "did you mean REDIS_URL?")


def test_a_bloom_capacity_over_a_snapshot_is_left_to_the_backends_without_one(no_settings_file):
    env = {"ELRIC_FILTER_BACKEND": "redis-bloom", "ELRIC_BLOOM_CAPACITY": "300000000"}
    assert load_settings(env=env).BLOOM_CAPACITY == 300_000_000


def test_settings_may_name_the_folder_that_holds_a_settings_py(tmp_path):
    (tmp_path / "settings.py").write_text("CONCURRENCY = 3\n")
    assert load_settings(str(tmp_path), env={}).CONCURRENCY == 3


def test_overrides_are_checked_like_the_settings_file(no_settings_file):
    assert load_settings(env={}, overrides={"CONCURRENCY": 2}).CONCURRENCY == 2
    with pytest.raises(SettingsError, match="WORKER_CHUNK .* expected int"):
        load_settings(env={}, overrides={"WORKER_CHUNK": "8"})


# --- `elric master` / `elric worker` with bad settings: exit 2, one line ------------------

def run_elric(args, cwd, **elric) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELRIC_")}
    env.update({f"ELRIC_{k}": str(v) for k, v in elric.items()})
    return subprocess.run([sys.executable, "-m", "elric", *args], cwd=str(cwd), env=env,
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def unused_address() -> str:
    return f"127.0.0.1:{free_port()}"  # bound and released: nobody listens there


CASES = {
    "unknown key in a settings file": lambda d, r: (
        ["master", "--settings", d["bad.py"]], {}, "unknown setting COLOUR"),
    "wrong type in the environment": lambda d, r: (
        ["worker"], {"CONCURRENCY": "abc"}, "CONCURRENCY (from ELRIC_CONCURRENCY): expected an "
                                            "integer, got 'abc'"),
    "wrong type on the command line": lambda d, r: (
        ["worker", "--concurrency", "0"], {}, "CONCURRENCY (from command line): must be "
                                              "positive"),
    # a worker waits for an unreachable Redis or master instead (tests/test_startup.py),
    # but not for a password that Redis refuses
    "worker: wrong Redis password": lambda d, r: (
        ["worker", "elric.demo.crawler_sync"], {"REDIS_URL": r.replace("redis://", "redis://nobody:wrong@"),
                     "MASTER_ADDRESS": unused_address()},
        f"REDIS_URL {r.replace('redis://', 'redis://nobody:***@')}: cannot connect (invalid "
        "username"),
    "worker: no job modules": lambda d, r: (
        ["worker"], {"REDIS_URL": r, "MASTER_ADDRESS": unused_address()},
        "no job modules: name the modules your Job classes are in, e.g. `elric worker "
        "myproject.jobs`"),
    "worker: no job module imports": lambda d, r: (
        ["worker", "myproject.jobz"], {"REDIS_URL": r, "MASTER_ADDRESS": unused_address()},
        "no job module imports (myproject.jobz: ModuleNotFoundError: No module named "
        "'myproject'): check the names, and that they import from "),
    # a module that imports its Crawl from elric.demo.crawler, where it runs (as
    # examples/crawler.py does): the worker warned, then waited for good, running nothing
    "worker: job modules that define no Job class": lambda d, r: (
        ["worker", "json", "reexports"], {"REDIS_URL": r, "MASTER_ADDRESS": unused_address()},
        "no Job class is defined in job modules json, reexports, so this worker would run "
        "nothing: name the modules that define them (reexports imports "
        "elric.demo.crawler's Crawl)"),
    # a script's code run on import (sys.exit, argparse's parse_args): the worker exited 1
    # with the script's message alone, naming no module, even beside modules that import
    "worker: a job module that exits as it imports": lambda d, r: (
        ["worker", "exits_on_import"], {"REDIS_URL": r, "MASTER_ADDRESS": unused_address()},
        "no job module imports (exits_on_import: SystemExit: usage: exits_on_import.py URL; "
        "it exits as it imports: put a script's code under if __name__ == '__main__')"),
    # (a traceback from redis-py, then "cannot connect (AbstractConnection.__init__() got
    # an unexpected keyword argument 'colour')", quoting redis-py's internals)
    "worker: an option redis-py does not take in REDIS_URL": lambda d, r: (
        ["worker", "elric.demo.crawler_sync"], {"REDIS_URL": r + "?colour=red",
                                                "MASTER_ADDRESS": unused_address()},
        f"REDIS_URL (from ELRIC_REDIS_URL): '{r}?colour=red': unknown option 'colour'; "
        "REDIS_URL takes redis-py's connection options, such as db, socket_timeout"),
    "master: an option redis-py does not take in REDIS_URL": lambda d, r: (
        ["master", "--redis-url", r + "?bogus=1"], {"MASTER_ADDRESS": unused_address()},
        f"REDIS_URL (from command line): '{r}?bogus=1': unknown option 'bogus'; REDIS_URL "
        "takes redis-py's connection options"),
    "master: a typo in an ELRIC_ variable": lambda d, r: (
        ["master", "--redis-url", r], {"REDIS_ULR": r, "MASTER_ADDRESS": unused_address()},
        "ELRIC_REDIS_ULR: unknown setting in the environment; did you mean ELRIC_REDIS_URL?"),
    "worker: a lower-case key in settings.py": lambda d, r: (
        ["worker", "--settings", d["lower.py"]], {"REDIS_URL": r,
                                                  "MASTER_ADDRESS": unused_address()},
        "redis_url: settings names are upper case: did you mean REDIS_URL?"),
    "master: nonexistent --settings": lambda d, r: (
        ["master", "--settings", "/nonexistent/settings.py"], {},
        "settings file '/nonexistent/settings.py' does not exist"),
    "worker: nonexistent --settings": lambda d, r: (
        ["worker", "--settings", "/nonexistent/settings.py"], {},
        "settings file '/nonexistent/settings.py' does not exist"),
    # a folder: "does not exist" of one that does, and no word of the settings.py it lacks
    "jobs: --settings a folder with no settings.py": lambda d, r: (
        ["jobs", "--settings", d["folder"]], {},
        f"settings folder {d['folder']!r} holds no settings.py: give the settings file's "
        "path, or a folder that holds one"),
    "master: MASTER_ADDRESS without a port": lambda d, r: (
        ["master"], {"MASTER_ADDRESS": "127.0.0.1"},
        "MASTER_ADDRESS: '127.0.0.1' is not host:port"),
    # refused, not a crash in the dashboard at start (the environment keeps b"\xff" as "\udcff")
    "master: a DASHBOARD_PASSWORD that is not UTF-8": lambda d, r: (
        ["master", "--redis-url", r], {"MASTER_ADDRESS": unused_address(),
                                       "DASHBOARD_ADDRESS": unused_address(),
                                       "DASHBOARD_PASSWORD": "s3cret\udcff"},
        "DASHBOARD_PASSWORD (from ELRIC_DASHBOARD_PASSWORD): holds bytes that are not UTF-8"),
    # a URL where host:port belongs: taken as host "http://127.0.0.1", it exited 3,
    # "cannot reach ... (try again)", as if the master were only down
    "jobs: --master given as a URL": lambda d, r: (
        ["jobs", "--master", "http://127.0.0.1:7531"], {},
        "MASTER_ADDRESS: 'http://127.0.0.1:7531' is not host:port"),
    "worker: --master without a port": lambda d, r: (
        ["worker", "--master", "127.0.0.1"], {"REDIS_URL": r},
        "MASTER_ADDRESS: '127.0.0.1' is not host:port"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_settings_exit_2_with_one_clear_line(case, tmp_path, redis_url):
    (tmp_path / "bad.py").write_text("COLOUR = 'red'\n")
    (tmp_path / "lower.py").write_text("redis_url = 'redis://127.0.0.1:1/0'\n")
    (tmp_path / "reexports.py").write_text("from elric.demo.crawler import Crawl  # noqa\n")
    (tmp_path / "exits_on_import.py").write_text("import sys\nsys.exit('usage: "
                                                 "exits_on_import.py URL')\n")
    where = {"bad.py": str(tmp_path / "bad.py"), "lower.py": str(tmp_path / "lower.py"), "dead_master": unused_address(),
             "dead_redis": f"redis://127.0.0.1:{free_port()}/0", "folder": str(tmp_path)}
    args, env, message = CASES[case](where, redis_url)
    proc = run_elric(args, tmp_path, **env)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "Traceback" not in output, output
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and proc.stdout == "", output
    assert lines[0].startswith("elric: ") and message in lines[0], output
    assert "s3cret" not in output, output   # a secret is not shown


def test_a_master_whose_redis_is_not_up_exits_3_try_again(tmp_path):
    """README: exit status 3 is "unreachable (try again)"; a master whose Redis is not up
    exited 2, as for a setting to fix (a refused password still is: test_resilience)."""
    dead = f"redis://127.0.0.1:{free_port()}/0"
    proc = run_elric(["master"], tmp_path, REDIS_URL=dead, MASTER_ADDRESS=unused_address())
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stderr.strip().startswith(f"elric: REDIS_URL {dead}: cannot connect"), proc.stderr


def test_queues_a_job_cannot_be_queued_on_are_refused(no_settings_file):
    """A worker started with --queues 'a b' (or ELRIC_QUEUES) served queue "a b", which no
    submit takes (queue names are 1-100 letters, digits, '_', '-' or '.'): it waited for
    nothing, with no word."""
    for settings in ({"env": {"ELRIC_QUEUES": "crawl,a b"}},
                     {"env": {}, "overrides": {"QUEUES": ["a b"]}}):
        with pytest.raises(SettingsError) as info:
            load_settings(**settings)
        assert "queue 'a b': 1-100 letters, digits" in str(info.value), info.value
    assert load_settings(env={"ELRIC_QUEUES": "crawl, a-b.c_1"}).QUEUES == ["crawl", "a-b.c_1"]
