"""The fast path of spec validation (elric/contract.py: normalize_specs, _fast_entry,
_normalize_fast) must answer exactly as the full path (normalize_spec(_fast=False)):
the same normalized dict, or a SpecError with the same message. Unit level.
"""

from __future__ import annotations

import math
import os
import re

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elric import SpecError
from elric.contract import (SPEC_KEYS, _FAST_KEYS, build_deferred, new_job_id,
                            normalize_spec, normalize_specs)

# one object each, as a master passes them (the fast path caches per object)
DEFAULTS = {"max_retries": 2, "timeout": 30.0}
ALLOWED = ["tests"]
HEX32 = re.compile(r"[0-9a-f]{32}")

FUNCS = ["tests.jobs:Add", "tests.jobs:Echo", "tests.jobs:OnQueueB", "examples.crawler:Crawl",
         "no_such_module_xyz.sub:Job", "tests.jobs:NoSuchClass", "tests.jobs:NotAJob",
         "tests.jobs:Add.run", "tests.jobs", "elric.job:Job", "__main__:Job", "os:path",
         "1bad:Name"]

# --- values ------------------------------------------------------------------------------

# what the RPC decoder makes of a msgpack string that is not valid UTF-8: refused
not_utf8 = st.sampled_from(["k\udcff", "\udc80", "ok\ud800x", "\udfff\u00e9"])

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.integers(),
    st.floats(allow_nan=False), st.text(max_size=8), st.binary(max_size=8), not_utf8,
)
ext = st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=4))
map_keys = st.one_of(st.text(max_size=5), not_utf8, st.integers(-5, 5), st.binary(max_size=3),
                     st.none(), st.floats(allow_nan=False), st.tuples(st.integers(0, 2)))
values = st.recursive(
    st.one_of(scalars, ext),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.lists(inner, max_size=4).map(tuple),
                            st.dictionaries(map_keys, inner, max_size=3)),
    max_leaves=12,
)
plain_values = st.recursive(       # msgpack values a master accepts
    st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64 - 1), st.floats(),
              st.text(max_size=8), st.binary(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=10,
)
urls = st.sampled_from(["HTTP://Example.COM/a#frag", "https://x.org", "http://h/p?q=1", "",
                        "not a url", "http://h/\udcff"])
wrong = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=False),
                  st.text(max_size=4), st.binary(max_size=4), st.lists(st.integers(), max_size=2),
                  st.dictionaries(st.text(max_size=2), st.integers(), max_size=2), ext)

args_values = st.one_of(
    st.lists(plain_values, max_size=4), st.lists(plain_values, max_size=4).map(tuple),
    st.lists(values, max_size=4), st.lists(values, max_size=3).map(tuple),
    st.tuples(urls), st.tuples(urls, st.text(max_size=3)), st.just([]), st.just(()),
    st.tuples(st.integers(), st.integers()).map(list), wrong,
)
kwargs_values = st.one_of(
    st.dictionaries(st.text(max_size=5), plain_values, max_size=3),
    st.dictionaries(map_keys, values, max_size=3),
    st.fixed_dictionaries({"url": urls}), st.fixed_dictionaries({"a": st.integers(),
                                                                 "b": st.integers()}),
    st.just({}), wrong,
)
job_ids = st.one_of(
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")), min_size=1,
            max_size=12),
    st.just(""), st.sampled_from(["a b", " lead", "tab\there", "x" * 200, "x" * 201,
                                  "j-1", "ünï", "abc\n"]), not_utf8,
    st.none(), st.booleans(), st.integers(), st.binary(max_size=3), st.lists(st.text(), max_size=1),
)
texts = st.one_of(st.text(max_size=6), st.sampled_from(["", "s", "@fire"]), not_utf8, wrong)

VALUES = {
    "func": st.one_of(st.sampled_from(FUNCS), st.sampled_from(FUNCS), wrong),
    "args": args_values,
    "kwargs": kwargs_values,
    "job_id": job_ids,
    "queue": st.one_of(st.sampled_from(["default", "q.1-x_y", "", "a b", "x" * 101, "é"]),
                       not_utf8, wrong),
    "priority": st.one_of(st.integers(-2**31 - 1, 2**31 + 1), st.sampled_from([2**31, -2**31]),
                          wrong),
    "max_retries": st.one_of(st.integers(-2, 5), wrong),
    "timeout": st.one_of(st.floats(), st.integers(-1, 2**31 + 1), st.sampled_from([2**31,
                                                                                   math.inf]),
                         wrong),
    "batch": texts,
    "parent": texts,
    "trigger": st.one_of(st.just({"type": "interval", "seconds": 5}), wrong),
    "replace_existing": st.one_of(st.booleans(), wrong),
    "misfire_grace_time": st.one_of(st.none(), st.floats(0, 10), st.integers(0, 5), wrong),
    "coalesce": st.one_of(st.sampled_from(["latest", "all", "skip"]), not_utf8, wrong),
    "max_instances": st.one_of(st.integers(0, 3), wrong),
    "dedupe_key": texts,
    "dedupe_scope": texts,
}
assert set(VALUES) == set(SPEC_KEYS)
UNKNOWN = st.sampled_from(["colour", "size", "Func", "", 7, b"func", None, ("func",)])


GOOD_TEXT = st.one_of(st.text(max_size=6), st.sampled_from(["", "s", "@fire"]))
USUAL = {        # func -> arguments that fit it
    "tests.jobs:Add": st.fixed_dictionaries({"args": st.tuples(st.integers(), st.integers())}),
    "tests.jobs:Echo": st.fixed_dictionaries({}, optional={
        "args": st.lists(plain_values, max_size=3), "kwargs": st.dictionaries(
            st.text(max_size=4), plain_values, max_size=3)}),
    "examples.crawler:Crawl": st.one_of(
        st.fixed_dictionaries({"args": st.tuples(urls)}),
        st.fixed_dictionaries({"kwargs": st.fixed_dictionaries({"url": urls})}),
        st.fixed_dictionaries({"args": st.tuples(urls), "kwargs": st.fixed_dictionaries(
            {"batch": st.text(max_size=3)})})),
    "tests.jobs:OnQueueB": st.fixed_dictionaries({}, optional={"kwargs": st.just({"tag": 1})}),
}


@st.composite
def specs(draw):
    shape = draw(st.sampled_from(["usual", "usual", "usual but", "usual but", "fast", "fast",
                                  "link", "link", "link but", "any", "unknown", "not a map"]))
    if shape.startswith("link"):   # a crawler's child: keyed, no arguments (deferrable)
        spec = {"func": draw(st.sampled_from(sorted(USUAL) + FUNCS[4:7])),
                "dedupe_key": draw(GOOD_TEXT)}
        for k in draw(st.lists(st.sampled_from(["job_id", "batch", "parent",
                                                "dedupe_scope"]), unique=True)):
            spec[k] = draw(job_ids if k == "job_id" else GOOD_TEXT)
        if shape == "link but":    # ... with one value of a wrong type, or one key more
            k = draw(st.sampled_from(sorted(_FAST_KEYS) + ["queue"]))
            spec[k] = draw(wrong)
        return spec
    if shape.startswith("usual"):  # the shape a client sends: the fast path takes it
        func = draw(st.sampled_from(sorted(USUAL)))
        spec = {"func": func, **draw(USUAL[func])}
        for k in draw(st.lists(st.sampled_from(["job_id", "batch", "parent", "dedupe_key",
                                                "dedupe_scope"]), unique=True)):
            spec[k] = draw(job_ids if k == "job_id" else GOOD_TEXT)
        if shape == "usual but":   # ... with one value of a wrong type
            k = draw(st.sampled_from(sorted(_FAST_KEYS)))
            spec[k] = draw(wrong)
        return spec
    if shape == "not a map":
        return draw(st.one_of(st.lists(st.integers(), max_size=2), st.text(max_size=3),
                              st.none(), st.integers()))
    pool = sorted(_FAST_KEYS) if shape == "fast" else list(SPEC_KEYS)
    keys = draw(st.lists(st.sampled_from(pool), unique=True, max_size=len(pool)))
    if "func" not in keys and draw(st.integers(0, 9)):
        keys.insert(draw(st.integers(0, len(keys))), "func")     # usually there
    spec = {k: draw(VALUES[k]) for k in keys}
    if shape == "unknown":
        for k in draw(st.lists(UNKNOWN, min_size=1, max_size=2, unique=True)):
            spec[k] = draw(wrong)
    return spec


# --- comparing answers -------------------------------------------------------------------

def typed(x):
    """Equality that also tells 1 from 1.0 and True, and a list from a tuple."""
    if isinstance(x, dict):
        return ("dict", sorted(((typed(k), typed(v)) for k, v in x.items()), key=repr))
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [typed(v) for v in x])
    if isinstance(x, float) and math.isnan(x):
        return ("float", "nan")
    return (type(x).__name__, x)


def answer(fn):
    try:
        return "ok", fn()
    except SpecError as exc:
        return "error", str(exc)


def check_same(spec, defaults, allowed):
    fast = answer(lambda: normalize_specs([spec], defaults=defaults, allowed_modules=allowed))
    full = answer(lambda: normalize_spec(spec, defaults=defaults, allowed_modules=allowed,
                                         _fast=False))
    assert fast[0] == full[0], (spec, fast, full)
    if fast[0] == "error":
        assert fast[1] == full[1], spec
        return
    (a,), b = fast[1], full[1]
    if type(spec.get("job_id")) is not str or not spec["job_id"]:
        ia, ib = a.pop("job_id"), b.pop("job_id")
        assert HEX32.fullmatch(ia) and HEX32.fullmatch(ib), (ia, ib)
    assert set(a) == set(b)
    assert typed(a) == typed(b), spec
    # also through normalize_spec's own fast path
    c = normalize_spec(spec, defaults=defaults, allowed_modules=allowed)
    if "job_id" not in a:
        c.pop("job_id")
    assert typed(c) == typed(b), spec
    # and through the deferred path (checked now, built after the filter)
    d = deferred(spec, defaults, allowed)
    if "job_id" not in a:
        assert HEX32.fullmatch(d.pop("job_id"))
    assert typed(d) == typed(b), spec
    return a


def deferred(spec, defaults, allowed):
    """normalize_specs with ``defer``: a copy of the spec back when it was deferred,
    then build_deferred; the same errors as without."""
    defer = []
    plain = answer(lambda: normalize_specs([spec], defaults=defaults, allowed_modules=allowed))
    got = answer(lambda: normalize_specs([spec], defaults=defaults, allowed_modules=allowed,
                                         defer=defer))
    assert got[0] == plain[0] and (got[0] == "ok" or got[1] == plain[1]), (spec, got, plain)
    if got[0] == "error":
        return None
    assert len(defer) == 1
    (out,) = got[1]
    if defer[0] is None:
        return out
    # a copy (the caller's dict is not kept), with the key derived if it had none
    assert out is not spec and all(out[k] is v for k, v in spec.items())
    assert type(out["dedupe_key"]) is str and out.keys() - spec.keys() <= {"dedupe_key"}
    return build_deferred(out, defer[0])


SETTINGS = settings(max_examples=1500, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@SETTINGS
@given(specs())
def test_fast_path_answers_as_the_full_path(spec):
    check_same(spec, DEFAULTS, None)


@SETTINGS
@given(specs())
def test_fast_path_answers_as_the_full_path_with_allowed_modules(spec):
    check_same(spec, DEFAULTS, ALLOWED)


@settings(max_examples=300, deadline=None)
@given(specs())
def test_fast_path_without_defaults(spec):
    check_same(spec, None, None)


def test_the_fast_path_is_taken_and_gives_the_usual_answers():
    """The generated specs do reach the fast path with these shapes; pin a few answers."""
    n = check_same({"func": "tests.jobs:Add", "args": (1, 2), "batch": "b"}, DEFAULTS, None)
    assert n == {"func": "tests.jobs:Add", "args": [1, 2], "kwargs": {}, "queue": "default",
                 "priority": 0, "max_retries": 2, "timeout": 30.0, "batch": "b", "parent": ""}
    n = check_same({"func": "examples.crawler:Crawl", "args": ["HTTP://Ex.COM/a#x"]},
                   DEFAULTS, None)
    assert n["dedupe_key"] == "http://ex.com/a" and n["queue"] == "crawl"
    assert n["max_retries"] == 2 and n["timeout"] == 30.0
    n = check_same({"func": "tests.jobs:Echo", "kwargs": {"k": [1]}, "job_id": "j-1",
                    "dedupe_key": "", "dedupe_scope": "s"}, DEFAULTS, ALLOWED)
    assert n["job_id"] == "j-1" and n["dedupe_key"] == "" and n["kwargs"] == {"k": [1]}
    assert check_same({"func": "tests.jobs:Add", "job_id": ""}, DEFAULTS, None)["args"] == []


@pytest.mark.parametrize("spec", [
    {"func": "examples.crawler:Crawl"},                                # hook lacks its url
    {"func": "examples.crawler:Crawl", "args": [5]},                   # hook raises
    {"func": "examples.crawler:Crawl", "kwargs": {"nope": 1}},
    {"func": "examples.crawler:Crawl", "args": ["http://h/"], "kwargs": {1: "x"}},
    {"func": "tests.jobs:Add", "args": [msgpack.ExtType(3, b"x")]},
    {"func": "tests.jobs:Add", "kwargs": {"a": {(1,): 2}}},
    {"func": "tests.jobs:Add", "args": [2**64]},
    {"func": "tests.jobs:Add", "args": msgpack.ExtType(1, b"")},
    {"func": "tests.jobs:Add", "job_id": "a b"},
    {"func": "tests.jobs:Add", "job_id": "x" * 201},
    {"func": "tests.jobs:Add", "batch": True},
    {"func": "tests.jobs:Add", "parent": None},
    {"func": "tests.jobs:Add", "dedupe_scope": b"s"},
    {"func": "examples.crawler:Crawl", "args": ["http://h/"]},         # not allowed: tests
    {"func": "no_such_module_xyz:Job"},
    {"func": "tests.jobs:NotAJob"},
    {"func": "tests.jobs:Add", "dedupe_key": "k\udcff"},
    {"func": "tests.jobs:Add", "dedupe_key": "k", "dedupe_scope": "s\udcff"},
    {"func": "tests.jobs:Add", "dedupe_key": "k", "dedupe_scope": ""},
    {"func": "tests.jobs:Add", "dedupe_scope": ""},
    {"func": "tests.jobs:Add", "dedupe_key": "k", "job_id": "j\udcff"},
    {"func": "tests.jobs:Add", "dedupe_key": "k", "batch": "\ud800"},
    {"func": "tests.jobs:Add", "dedupe_key": "k", "parent": "p\udcff"},
    {"func": "tests.jobs:Echo", "dedupe_key": "k", "args": [["deep", "\udcff"]]},
    {"func": "tests.jobs:Echo", "kwargs": {"x\udcff": 1}},
    {"func": "examples.crawler:Crawl", "args": ["http://h/\udcff"]},  # derived key
])
def test_refusals_match(spec):
    for allowed in (None, ALLOWED):
        check_same(spec, DEFAULTS, allowed)
    with pytest.raises(SpecError):
        normalize_spec(spec, defaults=DEFAULTS, allowed_modules=ALLOWED, _fast=False)


def test_job_id_none_is_refused_like_the_full_path():
    check_same({"func": "tests.jobs:Add", "job_id": None}, DEFAULTS, None)


@pytest.mark.parametrize("key, value", [("job_id", "abc\n"), ("queue", "q\n")])
def test_trailing_newline_is_refused(key, value):
    with pytest.raises(SpecError):
        normalize_spec({"func": "tests.jobs:Add", key: value}, _fast=False)


# --- batches -----------------------------------------------------------------------------

GOOD = [{"func": "tests.jobs:Add", "args": [1, 2]},
        {"func": "examples.crawler:Crawl", "args": ["http://h/x"]},
        {"func": "tests.jobs:Echo", "kwargs": {"a": [1]}, "job_id": "e-1"},
        {"func": "tests.jobs:OnQueueB", "priority": 3}]                  # full path
BAD = [{"func": "tests.jobs:Add", "args": "12"},
       {"func": "tests.jobs:Add", "job_id": "a b"},
       {"func": "tests.jobs:Add", "colour": 1},
       {"func": "examples.crawler:Crawl"},
       {"func": "tests.jobs:NotAJob"},
       "not a map",
       {"func": "tests.jobs:Add", "kwargs": {1: 2}}]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(GOOD), max_size=5), st.sampled_from(BAD),
       st.lists(st.sampled_from(GOOD + BAD), max_size=3))
def test_batch_errors_name_the_first_bad_spec(before, bad, after):
    batch = before + [bad] + after
    message = answer(lambda: normalize_spec(bad, defaults=DEFAULTS, _fast=False))
    assert message[0] == "error"
    with pytest.raises(SpecError) as info:
        normalize_specs(batch, defaults=DEFAULTS)
    if len(batch) == 1:
        assert str(info.value) == message[1]
    else:
        assert str(info.value) == f"spec {len(before)}: {message[1]}"


def test_batch_results_have_fresh_args_and_kwargs():
    shared_args, shared_kwargs = [1, [2]], {"k": "v"}
    batch = [{"func": "tests.jobs:Echo", "args": shared_args, "kwargs": shared_kwargs},
             {"func": "tests.jobs:Echo", "args": shared_args, "kwargs": shared_kwargs},
             {"func": "tests.jobs:Echo"}, {"func": "tests.jobs:Echo"},
             {"func": "tests.jobs:Echo", "args": (), "kwargs": {}},
             {"func": "tests.jobs:Echo", "args": shared_args, "queue": "q"}]    # full path
    out = normalize_specs(batch, defaults=DEFAULTS)
    objects = [id(o) for n in out for o in (n["args"], n["kwargs"])]
    assert len(set(objects)) == len(objects)                   # no two results share one
    for n in out:
        assert n["args"] is not shared_args and n["kwargs"] is not shared_kwargs
        n["args"].append("mutated")
        n["kwargs"]["mutated"] = True
    assert shared_args == [1, [2]] and shared_kwargs == {"k": "v"}
    assert [n["args"] for n in out] == [[1, [2], "mutated"]] * 2 + [["mutated"]] * 3 + \
        [[1, [2], "mutated"]]
    again = normalize_specs(batch, defaults=DEFAULTS)               # a later call
    assert [n["args"] for n in again] == [[1, [2]]] * 2 + [[]] * 3 + [[1, [2]]]
    assert [n["kwargs"] for n in again] == [{"k": "v"}] * 2 + [{}] * 4
    one = normalize_spec({"func": "tests.jobs:Echo"}, defaults=DEFAULTS)
    assert one["args"] == [] and one["kwargs"] == {}
    assert len({n["job_id"] for n in out + again}) == len(out) * 2


# --- job ids -------------------------------------------------------------------------------

def test_new_job_id_is_distinct_hex():
    ids = [new_job_id() for _ in range(20_000)]
    ids += [n["job_id"] for n in normalize_specs([{"func": "tests.jobs:Add"}] * 5000)]
    assert all(HEX32.fullmatch(i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_forked_child_does_not_repeat_the_parents_ids():
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                                 # the child
        try:
            os.close(r)
            fast = normalize_specs([{"func": "tests.jobs:Add"}])[0]["job_id"]
            os.write(w, f"{new_job_id()} {new_job_id()} {fast}".encode())
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    with os.fdopen(r, "rb") as reader:
        while chunk := reader.read():
            chunks.append(chunk)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    child = b"".join(chunks).decode().split()
    assert len(child) == 3 and all(HEX32.fullmatch(i) for i in child)
    fast = normalize_specs([{"func": "tests.jobs:Add"}])[0]["job_id"]
    parent = [new_job_id(), new_job_id(), fast, new_job_id(), new_job_id()]
    assert not set(child) & set(parent), (child, parent)


@pytest.mark.parametrize("spec, named", [
    ({"dedupe_key": "k\udcff"}, "dedupe_key 'k\\udcff' is not valid UTF-8"),
    ({"dedupe_key": "k", "dedupe_scope": "s\udcff"}, "dedupe_scope 's\\udcff'"),
    ({"job_id": "j\udcff"}, "job_id 'j\\udcff'"),
    ({"queue": "\udcff"}, "queue '\\udcff'"),
    ({"batch": "b\ud800"}, "batch 'b\\ud800'"),
    ({"args": [1, ["\udcff"]]}, "args[1][0] '\\udcff' is not valid UTF-8"),
    ({"kwargs": {"a": {"b\udcff": 1}}}, "kwargs['a']: map key 'b\\udcff'"),
])
def test_text_that_is_not_utf8_is_refused_naming_where(spec, named):
    """A msgpack string with invalid UTF-8 decodes to lone surrogates (the RPC layer keeps
    the bytes); no such text can be stored, used as a key or answered, so the master
    refuses it before a filter takes its key."""
    for path in (lambda s: normalize_specs([s]), lambda s: normalize_specs([s], defer=[]),
                 lambda s: normalize_spec(s, _fast=False)):
        with pytest.raises(SpecError, match=re.escape(named)):
            path({"func": "tests.jobs:Echo", **spec})


def test_a_derived_key_that_is_not_utf8_is_refused():
    spec = {"func": "tests.jobs:KeyFromBytes", "args": [b"http://h/\xff"]}
    for path in (lambda s: normalize_specs([s]), lambda s: normalize_specs([s], defer=[]),
                 lambda s: normalize_spec(s, _fast=False)):
        with pytest.raises(SpecError, match="KeyFromBytes'.* the dedupe_key its dedupe_key_for made, "
                           "'http://h/.*' is not valid"):
            path(spec)


def test_an_empty_dedupe_scope_is_refused():
    """A scope named "" would not be passed on to children (an empty scope reads as
    none), so they would dedupe in the global scope instead of their parent's."""
    for path in (lambda s: normalize_specs([s]), lambda s: normalize_specs([s], defer=[]),
                 lambda s: normalize_spec(s, _fast=False)):
        with pytest.raises(SpecError, match="dedupe_scope '': name a scope"):
            path({"func": "tests.jobs:Echo", "dedupe_key": "k", "dedupe_scope": ""})
