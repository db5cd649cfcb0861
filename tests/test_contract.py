"""Pins the wire contract (elric/contract.py, documented in docs/PROTOCOL.md): names of
statuses, methods and spec keys, and what normalize_spec fills in and refuses. Unit level."""

from __future__ import annotations

import functools
import re
from urllib.parse import urlparse

import msgpack
import pytest

from elric import Job, SpecError
from elric.contract import (METHODS, SPEC_KEYS, STATUSES, ErrorCode, Status, func_path,
                            normalize_spec)
from elric.triggers import every
from tests.jobs import Add, Echo, OnQueueB


def test_status_names():
    assert STATUSES == ("queued", "running", "succeeded", "failed", "retrying", "scheduled",
                        "filtered", "cancelled")
    assert [s for s in Status if s.live] == ["queued", "running", "retrying"]


def test_error_codes():
    assert [c.value for c in ErrorCode] == ["bad_request", "not_found", "method_not_found",
                                            "unauthorized", "redis_unavailable", "internal",
                                            "too_large"]


def test_method_names():
    assert METHODS == ("ping", "auth", "health", "submit_job", "submit_jobs", "get_job",
                       "remove_job", "cancel_job", "list_jobs", "stats", "rerun_job",
                       "pause_job", "resume_job", "modify_job", "control_worker", "run_job",
                       "bulk_jobs", "job_kind", "get_jobs")


def test_spec_key_names():
    assert tuple(SPEC_KEYS) == (
        "func", "args", "kwargs", "job_id", "queue", "priority", "max_retries", "timeout",
        "batch", "parent", "trigger", "replace_existing", "misfire_grace_time", "coalesce",
        "max_instances", "dedupe_key", "dedupe_scope", "limit_key", "limit_interval", "round")
    assert all(isinstance(doc, str) and doc for _, doc in SPEC_KEYS.values())


def test_defaults_of_a_minimal_spec():
    spec = normalize_spec({"func": "tests.jobs:Add"})
    assert re.fullmatch(r"[0-9a-f]{32}", spec.pop("job_id"))
    assert spec == {"func": "tests.jobs:Add", "args": [], "kwargs": {}, "queue": "default",
                    "priority": 0, "max_retries": 0, "timeout": None, "batch": "",
                    "parent": ""}
    assert normalize_spec({"func": "tests.jobs:Add"})["job_id"] != normalize_spec(
        {"func": "tests.jobs:Add"})["job_id"]


def test_spec_then_class_then_settings_defaults():
    """Job.spec puts the class's defaults in the spec; the master adds the settings'."""
    defaults = {"max_retries": 3, "timeout": 60, "queue": "from-settings"}
    assert normalize_spec({"func": "tests.jobs:Add"}, defaults=defaults)["max_retries"] == 3
    n = normalize_spec(OnQueueB.spec(), defaults=defaults)
    assert n["queue"] == "b" and n["timeout"] == 60  # the class beats settings
    # a bare spec names no class defaults: the master never imports the class
    assert normalize_spec({"func": "tests.jobs:OnQueueB"}, defaults=defaults)["queue"] == (
        "from-settings")
    n = normalize_spec(OnQueueB.spec(queue="q", max_retries=0, timeout=5), defaults=defaults)
    assert (n["queue"], n["max_retries"], n["timeout"]) == ("q", 0, 5.0)  # the spec wins
    assert isinstance(n["timeout"], float)


def test_everything_given_is_kept():
    n = normalize_spec({"func": "tests.jobs:Echo", "args": (1, "a", None, [2.5, b"x"]),
                        "kwargs": {"k": {"n": [1]}}, "job_id": "j-1", "queue": "q.1-x_y",
                        "priority": -7, "max_retries": 2, "timeout": 1.5, "batch": "b",
                        "parent": "p", "dedupe_key": "k", "dedupe_scope": "s"})
    assert n == {"func": "tests.jobs:Echo", "args": [1, "a", None, [2.5, b"x"]],
                 "kwargs": {"k": {"n": [1]}}, "job_id": "j-1", "queue": "q.1-x_y",
                 "priority": -7, "max_retries": 2, "timeout": 1.5, "batch": "b",
                 "parent": "p", "dedupe_key": "k", "dedupe_scope": "s"}


def test_func_is_checked_by_name_without_importing(monkeypatch):
    import importlib
    import sys

    def no_import(name, *args, **kwargs):
        raise AssertionError(f"normalize_spec imported {name}")

    monkeypatch.setattr(importlib, "import_module", no_import)
    n = normalize_spec({"func": "not.imported.here:Job"}, allowed_modules=["not.imported"])
    assert n["func"] == "not.imported.here:Job" and n["queue"] == "default"
    assert "not.imported.here" not in sys.modules


@pytest.mark.parametrize("spec, message", [
    ([], "job spec must be a map, got list"),
    ({"func": "tests.jobs:Add", "colour": 1, "size": 2},
     "unknown job spec key(s) 'colour', 'size'; known keys: func, args, kwargs"),
    ({"args": [1]}, "job spec is missing 'func'"),
    ({"func": 42}, "job spec key 'func' must be string, got integer"),
    ({"func": "tests.jobs:Add", "args": "1, 2"}, "job spec key 'args' must be array, got string"),
    ({"func": "tests.jobs:Add", "args": None}, "job spec key 'args' must be array, got nil"),
    ({"func": "tests.jobs:Add", "kwargs": [1]}, "job spec key 'kwargs' must be map, got array"),
    ({"func": "tests.jobs:Add", "priority": "high"},
     "job spec key 'priority' must be integer or nil, got string"),
    ({"func": "tests.jobs:Add", "priority": True},
     "job spec key 'priority' must be integer or nil, got boolean"),
    ({"func": "tests.jobs:Add", "priority": 1.5},
     "job spec key 'priority' must be integer or nil, got number"),
    ({"func": "tests.jobs:Add", "timeout": "10"},
     "job spec key 'timeout' must be number or nil, got string"),
    ({"func": "tests.jobs:Add", "misfire_grace_time": "1"},
     "job spec key 'misfire_grace_time' must be number or nil, got string"),
    ({"func": "tests.jobs:Add", "args": msgpack.ExtType(1, b"x")},
     "job spec key 'args' must be array, got msgpack extension type"),
    ({"func": "tests.jobs.Add"}, 'expected "package.module:ClassName"'),
    ({"func": "tests.jobs:"}, 'expected "package.module:ClassName"'),
    ({"func": "__main__:Local"}, "defined in __main__ cannot be imported by a worker"),
    ({"func": "tests.jobs:Echo", "args": [msgpack.ExtType(5, b"x")]},
     "args[0]: a msgpack extension type (code 5) is not allowed"),
    ({"func": "tests.jobs:Echo", "args": [object()]}, "args[0]: object is not a msgpack value"),
    # what the RPC decoder makes of extension type -1: it said "Timestamp is not a msgpack value"
    ({"func": "tests.jobs:Echo", "kwargs": {"at": msgpack.Timestamp(5, 0)}},
     "kwargs['at']: a msgpack extension type (code -1, a timestamp) is not allowed"),
    ({"func": "tests.jobs:Add", "timeout": msgpack.Timestamp(5, 0)},
     "job spec key 'timeout' must be number or nil, got msgpack timestamp"),
    ({"func": "tests.jobs:Echo", "args": [{1.5: "x"}]},
     "args[0]: map key 1.5 is a float: map keys must be strings, integers or bytes"),
    ({"func": "tests.jobs:Echo", "args": [2**64]}, "does not fit in 64 bits"),
    ({"func": "tests.jobs:Echo", "kwargs": {"k": {1, 2}}}, "kwargs['k']: set is not a msgpack"),
    ({"func": "tests.jobs:Echo", "kwargs": {1: "x"}}, "kwargs key 1 must be a string"),
    ({"func": "tests.jobs:Echo", "job_id": "has space"}, "job_id 'has space': 1-200 characters"),
    ({"func": "tests.jobs:Echo", "job_id": "x" * 201}, "1-200 characters without spaces"),
    # an escape sequence in an id reached the operator's terminal in every line naming it
    ({"func": "tests.jobs:Echo", "job_id": "a\x1b[2Jb"}, "without spaces or control characters"),
    ({"func": "tests.jobs:Echo", "job_id": "a\x9bb"}, "without spaces or control characters"),
    ({"func": "tests.jobs:Echo", "queue": "a/b"}, "queue 'a/b': 1-100 letters"),
    ({"func": "tests.jobs:Echo", "priority": 2**31}, "must be within ±2**31"),
    ({"func": "tests.jobs:Echo", "max_retries": -1}, "max_retries -1: must be 0 or more"),
    ({"func": "tests.jobs:Echo", "timeout": 0}, "timeout 0: must be a positive number"),
    ({"func": "tests.jobs:Echo", "timeout": -1.5}, "timeout -1.5: must be a positive number"),
    ({"func": "tests.jobs:Echo", "coalesce": "all"},
     "job spec key 'coalesce' is for periodic jobs: give a 'trigger' too"),
    ({"func": "tests.jobs:Echo", "max_instances": 2}, "'max_instances' is for periodic jobs"),
    ({"func": "tests.jobs:Echo", "timeout": float("nan")}, "timeout nan: must be a positive"),
    ({"func": "tests.jobs:Echo", "timeout": float("inf")}, "timeout inf: must be a positive"),
    ({"func": "tests.jobs:Echo", "timeout": 1e300}, "at most 2147483648; nil or left out"),
    ({"func": "tests.jobs:Echo", "limit_interval": 0}, "limit_interval 0: must be a positive"),
    ({"func": "tests.jobs:Echo", "limit_interval": float("nan")}, "limit_interval nan: must be"),
    ({"func": "tests.jobs:Echo", "limit_interval": 1e300}, "(at most 2147483648)"),
    ({"func": "tests.jobs:Echo", "limit_interval": None},
     "job spec key 'limit_interval' must be number, got nil"),
    # it spaces the starts of its limit_key's jobs: with none it was kept and did nothing
    ({"func": "tests.jobs:Echo", "limit_interval": 5},
     "limit_interval 5: spaces the starts of jobs sharing a limit_key, and this job has none; "
     "give a limit_key (or its class's limit_key_for), or leave limit_interval out"),
    # a key no job hash would record: never given back, and every later '' filtered
    ({"func": "tests.jobs:Echo", "dedupe_key": ""}, "dedupe_key '': leave it out for no "
                                                    "dedupe"),
])
def test_refused_specs_name_what_is_wrong(spec, message):
    with pytest.raises(SpecError) as info:
        normalize_spec(spec)
    assert message in str(info.value)


def test_deep_nesting_is_refused():
    value: list = []
    for _ in range(70):
        value = [value]
    with pytest.raises(SpecError, match="nested deeper than 64 levels"):
        normalize_spec({"func": "tests.jobs:Echo", "args": value})


def test_job_modules_restrict_func():
    assert normalize_spec({"func": "tests.jobs:Add"}, allowed_modules=["tests"])
    assert normalize_spec({"func": "tests.jobs:Add"}, allowed_modules=["tests.jobs."])
    with pytest.raises(SpecError, match="not allowed by JOB_MODULES"):
        normalize_spec({"func": "tests.jobs:Add"}, allowed_modules=["examples"])
    with pytest.raises(SpecError, match="not allowed by JOB_MODULES"):
        normalize_spec({"func": "tests.jobsx:Add"}, allowed_modules=["tests.jobs"])


def test_func_path():
    assert func_path(Echo) == "tests.jobs:Echo" and func_path(OnQueueB) == "tests.jobs:OnQueueB"


def test_a_class_or_module_named_with_letters_outside_ascii_is_a_func():
    """Python names may start with any letter; such a class was refused as no
    "package.module:ClassName" at all."""
    from tests.jobs import Écrire

    assert normalize_spec(Écrire.spec(["x"]))["func"] == "tests.jobs:Écrire"
    assert normalize_spec({"func": "tâches.été:Tâche_2"})["func"] == "tâches.été:Tâche_2"
    for bad in ("tests.jobs:2Add", "2tests:Add", "tests.jobs:Add-x", "tests jobs:Add"):
        with pytest.raises(SpecError, match='expected "package.module:ClassName"'):
            normalize_spec({"func": bad})


def test_dedupe_key_from_the_class_hook():
    from examples.crawler import Crawl

    n = normalize_spec(Crawl.spec(["HTTP://Example.com#top"]))
    assert n["dedupe_key"] == "http://example.com/" and n["queue"] == "crawl"
    assert n["max_retries"] == Crawl.max_retries and n["timeout"] == float(Crawl.timeout)
    assert Crawl.spec(["http://a/"], dedupe_key="mine")["dedupe_key"] == "mine"
    assert "dedupe_key" not in Add.spec([1, 2])


def test_job_spec_builds_a_valid_spec_and_refuses_what_cannot_work():
    spec = Add.spec([1, 2], job_id="a", priority=3)
    assert spec == {"func": "tests.jobs:Add", "args": [1, 2], "kwargs": {}, "job_id": "a",
                    "priority": 3}
    assert normalize_spec(spec)["priority"] == 3

    class Local(Job):
        def run(self):
            return 1

    with pytest.raises(SpecError, match="must be defined at module level"):
        Local.spec()
    Local.__module__ = "__main__"
    Local.__qualname__ = "Local"
    with pytest.raises(SpecError, match="defined in __main__, so a worker cannot import it"):
        Local.spec()
    with pytest.raises(SpecError, match="takes no 'func'"):
        Add.spec([1, 2], func="tests.jobs:Echo")


def test_job_spec_refuses_args_that_are_no_list_rather_than_split_them():
    """args="http://a/" became a list of its characters: the job was queued, ran with
    nine arguments and failed on the worker, far from the mistake (its dedupe key too was
    derived from the characters); kwargs as a list of pairs passed as a map."""
    for args, kwargs in (("http://a/", None), (b"ab", None), ({"url": "x"}, None),
                         ([1], [("k", "v")]), ([1], "k")):
        with pytest.raises(SpecError, match="Echo: args must be a list or tuple and kwargs "
                                            "a dict"):
            Echo.spec(args, kwargs)
        with pytest.raises(SpecError, match="Echo: args must be"):
            Echo.submit_with(args=args, kwargs=kwargs)
    assert Echo.spec((1, 2), {"k": 1})["args"] == [1, 2]


def test_children_submitted_from_threads_with_the_jobs_context_get_ids_of_their_own():
    """asyncio.to_thread (what a job blocking its loop is told to use) copies the job's
    context, so threads submit children together: two could read the same count of
    children before either added its own, take one id, and the master kept one job."""
    import contextvars
    import sys
    import threading

    from elric import job as job_module

    ctx = job_module._RunContext("parent", {"job_id": "parent"})
    token = job_module._current.set(ctx)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)   # threads switch all the time: the race shows
    try:
        threads = [threading.Thread(target=contextvars.copy_context().run,
                                    args=(lambda: [Add.submit(i, i) for i in range(500)],))
                   for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
        job_module._current.reset(token)
    assert len({c["job_id"] for c in ctx.children}) == len(ctx.children) == 4000


def test_a_class_default_of_the_wrong_type_is_refused_naming_the_attribute():
    """A class's timeout = timedelta(...) or queue = an Enum reached the wire: a script got
    "cannot send 'submit_job' arguments" and a parent "a child job's arguments are not
    msgpack values", naming neither the class nor the attribute."""
    import enum
    from datetime import timedelta

    class Where(enum.Enum):
        CRAWL = "crawl"

    for key, value, message in (
            ("timeout", timedelta(seconds=30), "Bad.timeout = datetime.timedelta(seconds=30): "
                                               "job spec key 'timeout' must be number or nil, "
                                               "got timedelta"),
            ("queue", Where.CRAWL, "Bad.queue = <Where.CRAWL: 'crawl'>: job spec key 'queue' "
                                   "must be string or nil, got Where"),
            ("priority", True, "Bad.priority = True: job spec key 'priority' must be integer "
                               "or nil, got boolean")):
        Bad = type("Bad", (Echo,), {key: value, "__module__": "tests.jobs"})
        with pytest.raises(SpecError) as info:
            Bad.spec([1])
        assert str(info.value) == message
    assert type("Fine", (Echo,), {"timeout": 5, "__module__": "tests.jobs"}).spec()["timeout"] == 5


def test_a_class_attribute_that_no_spec_takes_is_refused_naming_it():
    """Only queue, priority, max_retries and timeout are a class's defaults: a class's
    limit_key = "example.com" (or limit_interval, dedupe_scope, trigger...) was submitted
    without it, and its jobs ran unlimited, undeduped or once, without a word."""
    for key, value, how in (
            ("limit_key", "example.com", "return it from limit_key_for(*args, **kwargs)"),
            ("dedupe_key", "k", "return it from dedupe_key_for(*args, **kwargs)"),
            ("limit_interval", 2.5, "pass it as submit_with(limit_interval=...)"),
            ("dedupe_scope", "crawl", "pass it as submit_with(dedupe_scope=...)"),
            ("trigger", {"type": "interval", "seconds": 60},
             "pass it as submit_with(trigger=...)")):
        Bad = type("Bad", (Echo,), {key: value, "__module__": "tests.jobs"})
        with pytest.raises(SpecError) as info:
            Bad.spec([1])
        assert str(info.value) == (f"Bad.{key}: a Job class's attributes give only its queue, "
                                   f"priority, max_retries and timeout; {how}"), key
        Sub = type("Sub", (Bad,), {"__module__": "tests.jobs"})   # inherited: the same
        with pytest.raises(SpecError, match=f"Sub.{key}: "):
            Sub.spec([1])
    # what a worker sets on the instance it runs, and the option given as such, are fine
    assert Echo.spec([1], dedupe_scope="crawl", limit_key="h")["limit_key"] == "h"


def test_a_coalesce_or_trigger_given_as_apscheduler_takes_it_says_what_elric_takes():
    """APScheduler's coalesce=True, or a crontab string as the trigger, were refused as
    "must be string, got boolean" and "must be map, got string", naming neither the values
    elric takes nor the helpers that make a trigger."""
    periodic = {"func": "tests.jobs:Add", "job_id": "p", "trigger": every(minutes=5)}
    for spec, said in (
            ({**periodic, "coalesce": True}, "job spec key 'coalesce' must be string, got "
             "boolean: \"latest\", \"all\" or \"skip\" (APScheduler's True is \"latest\", False "
             "\"all\")"),
            ({**periodic, "trigger": "*/5 * * * *"}, "job spec key 'trigger' must be map, got "
             "string: e.g. {\"type\": \"cron\", \"crontab\": \"*/5 * * * *\"}, as "
             "elric.cron(\"*/5 * * * *\") makes (and every(...), at(...))")):
        with pytest.raises(SpecError) as info:
            normalize_spec(spec)
        assert str(info.value) == said


def test_arguments_that_do_not_fit_run_are_refused_at_submit_naming_its_signature():
    """Add.submit(1) was queued, and each attempt failed in the worker with "run() missing 1
    required positional argument", its retries used up."""
    for args, kwargs, said in (([1], {}, "missing a required argument: 'b'"),
                               ([1, 2, 3], {}, "too many positional arguments"),
                               ([1, 2], {"c": 3}, "got an unexpected keyword argument 'c'")):
        with pytest.raises(SpecError) as info:   # (before any master is asked)
            Add.submit_with(args, kwargs)
        assert str(info.value) == f"Add.run(self, a, b) does not take these arguments: {said}"
    Add._check_arguments([1], {"b": 2})
    Echo._check_arguments([1, 2, 3], {"x": 1})   # *args, **kwargs: any
    Hooked = type("Hooked", (Job,), {"run": classmethod(lambda cls, a: a),
                                     "__module__": "tests.jobs"})
    Hooked._check_arguments([], {})   # no plain method: not judged here

    def with_session(run):   # a decorator that passes a parameter of its own
        @functools.wraps(run)
        def wrapper(self, *args, **kwargs):
            return run(self, "session", *args, **kwargs)
        return wrapper
    Session = type("Session", (Job,), {"run": with_session(lambda self, session, url: url),
                                       "__module__": "tests.jobs"})
    Session._check_arguments(["http://127.0.0.1/"], {})   # what the wrapper takes
    assert Add.spec()["args"] == []   # a spec alone (a template, a test's) is not judged


def test_a_class_that_does_not_implement_run_is_refused_at_submit_naming_it():
    """A Job class with ``def runn`` (a typo) was accepted: each attempt failed in the
    worker with NotImplementedError, its retries used up, none of it seen where it was
    submitted."""
    Typo = type("Typo", (Job,), {"runn": lambda self, name: name, "__module__": "tests.jobs"})
    with pytest.raises(SpecError) as info:
        Typo.spec(["x"])
    assert str(info.value) == ("Typo does not implement run, the method a worker calls with "
                               "the job's arguments (it defines runn: a typo?): define "
                               "run(self, ...) or async def run(self, ...)")
    Bare = type("Bare", (Job,), {"__module__": "tests.jobs"})
    with pytest.raises(SpecError, match=r"^Bare does not implement run, .*: define run\("):
        Bare.spec()
    assert type("Sub", (Echo,), {"__module__": "tests.jobs"}).spec([1])["args"] == [1]


def test_a_method_or_none_under_a_spec_key_name_is_not_refused():
    """The refusal above took any name in the class body: a job's own ``def trigger(self,
    url)``, a property, or ``dedupe_scope: str | None = None`` re-declared was refused as
    if it were a class default. Only plain data that is not None is one."""
    for key, value in (("trigger", lambda self, url: url),
                       ("limit_key", property(lambda self: "h")),
                       ("coalesce", classmethod(lambda cls: True)),
                       ("limit_interval", staticmethod(lambda: 2.5)),
                       ("dedupe_scope", None), ("limit_key", None)):
        Fine = type("Fine", (Echo,), {key: value, "__module__": "tests.jobs"})
        spec = Fine.spec([1])
        assert spec["func"] == "tests.jobs:Fine" and key not in spec, key
    # a subclass's None puts its parent's value aside: the class's attribute is None
    Bad = type("Bad", (Echo,), {"limit_key": "h", "__module__": "tests.jobs"})
    assert "limit_key" not in type("Sub", (Bad,), {"limit_key": None,
                                                   "__module__": "tests.jobs"}).spec([1])


def test_a_key_with_a_default_given_as_none_takes_the_default():
    """Job.spec(timeout=None) was refused ("'timeout' must be number, got nil"), though a
    class's timeout = None means no timeout of its own, modify_job's timeout nil removes
    one, and the refusal of a bad timeout said to "leave it out for no timeout"."""
    settings = {"max_retries": 3, "timeout": 60}
    for spec, defaults, want in (
            (Add.spec([1, 2], timeout=None), None, None),   # no JOB_TIMEOUT: none
            (Add.spec([1, 2], timeout=None), settings, 60.0),
            (OnQueueB.spec(timeout=None, queue=None, priority=None, max_retries=None),
             settings, 60.0),
            ({"func": "tests.jobs:Add", "timeout": None}, settings, 60.0)):
        n = normalize_spec(spec, defaults=defaults)
        assert n["timeout"] == want, (spec, n)
        assert (n["queue"], n["priority"]) == ("default", 0), n
        assert n["max_retries"] == (defaults or {}).get("max_retries", 0), n
    assert re.fullmatch(r"[0-9a-f]{32}", normalize_spec(Add.spec(job_id=None))["job_id"])
    with pytest.raises(SpecError, match="job_id: a periodic job needs one of your choosing"):
        normalize_spec(Add.spec(job_id=None, trigger={"cron": "* * * * *"}))
    # an explicit None beats the class's own: as modify_job's, it removes it
    timed = type("Timed", (Echo,), {"timeout": 5, "__module__": "tests.jobs"})
    assert normalize_spec(timed.spec(timeout=None))["timeout"] is None
    with pytest.raises(SpecError, match=r"must be number or nil, got string"):
        normalize_spec({"func": "tests.jobs:Add", "timeout": "10"})
    with pytest.raises(SpecError, match=r"nil or left out: JOB_TIMEOUT's"):
        normalize_spec({"func": "tests.jobs:Add", "timeout": 0})


def test_a_child_given_an_empty_or_no_job_id_gets_its_derived_one():
    """A master reads job_id "" (or nil) as none given and makes up a random id: a child
    sent so was queued again by every retry of its parent, and its handle read "None"."""
    from elric import job as job_module

    ctx = job_module._RunContext("parent", {"job_id": "parent"})
    token = job_module._current.set(ctx)
    try:
        handles = [Add.submit_with([1, 1], job_id=given) for given in ("", None, "mine")]
    finally:
        job_module._current.reset(token)
    assert handles == [job_module._child_job_id("parent", 0),
                       job_module._child_job_id("parent", 1), "mine"]
    assert [c["job_id"] for c in ctx.children] == handles


class Page(Job):   # as the README's Crawl
    async def run(self, url):
        return url

    @classmethod
    def limit_key_for(cls, url):
        return urlparse(url).netloc

    @classmethod
    def dedupe_key_for(cls, url):
        return url.split("#")[0]


def test_a_hook_that_returns_an_empty_key_is_a_spec_error_naming_it():
    """The README's crawler given "example.com" (no scheme): its limit_key_for, the URL's
    netloc, is "", and the master's refusal named a limit_key the caller never gave."""
    for args, hook in ((["example.com"], "limit_key_for"), (["#top"], "dedupe_key_for")):
        with pytest.raises(SpecError, match=rf"Page.{hook}\(\*\[.*\]\) returned '': return "
                                            "None for no"):
            Page.spec(args)


def test_a_child_with_arguments_msgpack_cannot_carry_is_refused_at_its_submit():
    """Such a child failed its parent only as the parent ended, whatever the parent did
    with the error: it is refused where it is submitted, naming the class."""
    from elric import job as job_module

    ctx = job_module._RunContext("parent", {"job_id": "parent"})
    token = job_module._current.set(ctx)
    try:
        for args in ([{1, 2}], [{(1, 2): "pair"}]):
            with pytest.raises(SpecError, match=r"^Echo.submit: its arguments are not msgpack"):
                Echo.submit(*args)
    finally:
        job_module._current.reset(token)
    assert ctx.children == []


def test_a_script_submit_with_arguments_msgpack_cannot_carry_is_refused_as_a_child_is():
    """From a script, Add.submit(datetime.now()) raised the client's "cannot send
    'submit_job' arguments: can not serialize ...", naming neither the class nor what to
    pass (a child's submit did), or, with no master up, only that none was reachable."""
    from datetime import datetime

    from elric.client import MasterClient, set_default_client

    set_default_client(MasterClient("127.0.0.1:1"))   # nothing listens: nothing may be sent
    try:
        for args in ([datetime.now()], [{1, 2}], [object()], [2**70], [{(1, 2): "pair"}]):
            with pytest.raises(SpecError, match=r"^Echo.submit: its arguments are not msgpack "
                                                r"values \(.+\); pass plain data"):
                Echo.submit(*args)
    finally:
        set_default_client(None)


def test_a_tuple_as_a_map_key_in_arguments_names_the_argument_and_what_keys_may_be():
    """msgpack packs a tuple key as an array, which no map key read back can be: submit
    said "its arguments are not msgpack values (unhashable type: 'list')", naming neither
    the argument nor what is wrong with it."""
    from elric.client import MasterClient, set_default_client

    set_default_client(MasterClient("127.0.0.1:1"))   # nothing listens: nothing may be sent
    keys = "map key (1, 2) is a tuple: map keys must be strings, integers or bytes, as " \
        "msgpack carries them"
    try:
        for args, kwargs, where in (([{(1, 2): "x"}], {}, "args[0]"),
                                    ([], {"m": {(1, 2): "x"}}, "kwargs['m']"),
                                    ([1, {"a": [{(1, 2): "x"}]}], {}, "args[1]['a'][0]")):
            with pytest.raises(SpecError) as info:
                Echo.submit(*args, **kwargs)
            assert f"({where}: {keys})" in str(info.value), str(info.value)
    finally:
        set_default_client(None)
    with pytest.raises(SpecError, match=re.escape(f"args[0]: {keys}")):   # a spec sent as is
        normalize_spec({"func": "tests.jobs:Echo", "args": [{(1, 2): "x"}]})


def test_a_dedupe_hook_that_raises_is_a_spec_error():
    from examples.crawler import Crawl

    with pytest.raises(SpecError, match=r"Crawl.dedupe_key_for\(args, kwargs\) raised "
                                        r"TypeError: .*missing 1 required positional"):
        Crawl.spec([])


def _protocol_rows(section: str) -> list[str]:
    """The first cell (`name(...)` or `name`) of each row of a docs/PROTOCOL.md table."""
    from tests.conftest import ROOT

    with open(f"{ROOT}/docs/PROTOCOL.md", encoding="utf-8") as f:
        text = f.read().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(\w+)[(`]", text, re.M)


def test_protocol_md_has_a_row_for_each_method_code_spec_key_and_status():
    """docs/PROTOCOL.md is what a client in another language reads: a method, error code,
    spec key or status added to contract.py (or dropped from it) must show in its table."""
    assert sorted(_protocol_rows("Methods")) == sorted(METHODS)
    assert sorted(_protocol_rows("Errors")) == sorted(ErrorCode)
    assert sorted(_protocol_rows("Job spec")) == sorted(SPEC_KEYS)
    assert sorted(_protocol_rows("Statuses")) == sorted(STATUSES)


def test_master_client_has_a_call_for_each_rpc_method():
    """The README: MasterClient "is the whole RPC API in Python" (auth: its token)."""
    from elric import MasterClient

    assert [m for m in METHODS if not callable(getattr(MasterClient, m, None))] == ["auth"]
