"""The web dashboard in a real headless browser (Debian's chromium, driven by playwright),
against real masters, a real worker and a real Redis: what an operator sees and does."""

from __future__ import annotations

import os
import re
import shutil
import socket
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from html import unescape

import pytest

from elric.redis_server import free_port
from elric.triggers import every
from tests.conftest import wait_for
from tests.test_cli import elric, failed_twice, one_line_error
from tests.jobs import Echo, Fail

PASSWORD = "correct horse"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `python3 bootstrap.py test` installs Debian's "
                    "chromium when it runs as root; else install it (apt install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def get(url: str, **headers) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def logged_in(base: str) -> urllib.request.OpenerDirector:
    """An opener that has logged in to the dashboard at ``base``: it keeps the cookie."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    opener.open(base + "/login", data=urllib.parse.urlencode({"password": PASSWORD}).encode())
    return opener


class Operator:
    """An operator logged in to the dashboard on ``port``: its session cookie, and the
    forms' csrf token as ``page`` shows it."""

    def __init__(self, port: int, page: str = "/jobs") -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.opener = logged_in(self.base)
        self.token = re.search(r'name="csrf" value="([0-9a-f]+)"', self.read(page)).group(1)

    def read(self, path: str) -> str:
        return self.opener.open(self.base + path).read().decode()

    def act(self, *fields: tuple[str, str], headers: dict | None = None, **form: str):
        """POST /act with the token: ``form``, then ``fields`` (pairs: an id sent twice)."""
        data = urllib.parse.urlencode([*form.items(), *fields, ("csrf", self.token)]).encode()
        return self.opener.open(urllib.request.Request(self.base + "/act", data=data,
                                                       headers=headers or {}))


def dashboard_with_a_job(make_cluster, **settings):
    """A master with its dashboard on a free port, and job j1 queued where no worker looks."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", **settings)
    cluster.start_master()
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "j1",
                               "queue": "nobody"})
    return cluster, port


def counts(page) -> dict[str, str]:
    """The overview's job counts, as the page shows them."""
    return {card.get_attribute("id"): card.locator("b").inner_text()
            for card in page.locator(".card").all()}


def test_an_operator_sees_a_worker_pauses_it_and_retries_a_failed_job(
        make_cluster, browser, tmp_path):
    ports = free_port(), free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{ports[0]}",
                           DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    # a second master with a dashboard of its own: the same Redis, so the same numbers
    cluster.start_master(address=f"127.0.0.1:{free_port()}",
                         DASHBOARD_ADDRESS=f"127.0.0.1:{ports[1]}")
    worker = cluster.start_worker("--concurrency", "1")
    client = cluster.client
    client.submit_job({"func": "tests.jobs:Add", "args": [2, 3], "job_id": "added"})
    marker = tmp_path / "may-succeed"
    client.submit_job({"func": "tests.jobs:FailUnlessFile", "args": [str(marker)],
                       "job_id": "flaky"})
    cluster.wait_job("added")
    cluster.wait_job("flaky")
    first, second = (f"http://127.0.0.1:{port}" for port in ports)

    page = browser.new_page()
    page.goto(first + "/workers")
    assert "/login" in page.url   # every page needs a login when a password is set
    page.fill("input[name=password]", "wrong")
    page.press("input[name=password]", "Enter")
    page.wait_for_selector("text=wrong password")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(first + "/workers")

    # a live worker, and a finished job
    row = page.locator("tr.worker", has_text=str(worker.pid))
    assert row.locator("td.state").inner_text() == "running"
    page.goto(first + "/jobs?status=succeeded")
    assert page.locator("tr.job[data-id=added] td.status").inner_text() == "succeeded"
    page.goto(first + "/jobs/added")
    assert "tests.jobs:Add" in page.content()

    # a click pauses the worker; then it takes no job
    page.goto(first + "/workers")
    page.locator("tr.worker", has_text=str(worker.pid)).locator("button", has_text="pause").click()
    page.wait_for_selector("text=pause: 1 of 1 done")
    paused = wait_for(lambda: (lambda w: w if w["state"] == "paused" else None)(
        _worker(client, worker.pid)), what="the worker paused")
    client.submit_job({"func": "tests.jobs:Add", "args": [1, 1], "job_id": "while-paused"})
    # two more heartbeats of the paused worker, and the job still waits
    wait_for(lambda: _worker(client, worker.pid)["last_seen"] > paused["last_seen"] + 1.5,
             what="two heartbeats of the paused worker")
    assert client.get_job("while-paused")["status"] == "queued"
    wait_for(lambda: page.locator("tr.worker", has_text=str(worker.pid))
             .locator("td.state").inner_text() == "paused", what="the page shows it paused")
    page.locator("tr.worker", has_text=str(worker.pid)).locator("button",
                                                                has_text="resume").click()
    cluster.wait_job("while-paused")
    # its pool grows from the page, without a restart
    row = page.locator("tr.worker", has_text=str(worker.pid))
    row.locator("form.processes input[name=value]").fill("2")
    row.locator("button", has_text="set processes").click()
    page.wait_for_selector("text=processes: 1 of 1 done")
    wait_for(lambda: _worker(client, worker.pid)["concurrency"] == 2, what="two processes")
    row = page.locator("tr.worker", has_text=str(worker.pid))
    row.locator("form.queues input[name=value]").fill("default,extra")
    row.locator("button", has_text="set queues").click()
    page.wait_for_selector("text=queues: 1 of 1 done")
    wait_for(lambda: _worker(client, worker.pid)["queues"] == "default,extra",
             what="the worker takes a second queue")

    # a failed job is retried from the page, and succeeds this time
    page.goto(first + "/jobs?status=failed")
    assert "FileNotFoundError" in page.locator("tr.job[data-id=flaky]").inner_text()
    marker.write_text("now")
    page.locator("tr.job[data-id=flaky] button.retry").click()
    page.wait_for_selector("text=retry: 1 of 1 done")
    job = cluster.wait_job("flaky")
    assert job["status"] == "succeeded"   # (a rerun starts its attempts again)

    # the second dashboard (another master) shows the same numbers; the login holds there
    page.goto(first + "/")
    ours = counts(page)
    other = browser.new_page(storage_state=page.context.storage_state())
    other.goto(second + "/")
    assert counts(other) == ours and ours["count-succeeded"] == "3", (ours, counts(other))
    # Prometheus reads the same figures, with the password as its bearer token
    status, text = get(second + "/metrics", Authorization=f"Bearer {PASSWORD}")
    assert 'elric_job_duration_seconds_count{func="tests.jobs:Add"} 2.0' in text, text
    assert 'elric_jobs{status="succeeded"} 3.0' in text
    assert 'elric_start_latency_seconds_count 4.0' in text   # each job's first attempt
    assert f'elric_worker_processes{{worker="{_worker(client, worker.pid)["worker_id"]}"}} 2.0' \
        in text
    shot = os.environ.get("DASHBOARD_SCREENSHOT")   # docs/dashboard.png is made so
    page.screenshot(path=shot or str(tmp_path / "dashboard.png"), full_page=True)


def _worker(client, pid: int) -> dict:
    return next(w for w in client.stats()["workers"] if w.get("pid") == pid)


def test_a_worker_in_trouble_is_marked_on_the_workers_page_and_the_overview(
        make_cluster, browser, redis_url):
    """A worker whose work was stuck retrying showed running, in green, as any other: only
    its own log said what was wrong."""
    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    worker = cluster.start_worker("--concurrency", "1")
    base = f"http://127.0.0.1:{port}"
    wake = f"elric:worker:{_worker(cluster.client, worker.pid)['worker_id']}:wake"
    page = browser.new_page()
    with redis.Redis.from_url(redis_url) as r:
        r.set(wake, "an operator's mistake")   # each wait for work: WRONGTYPE
        wait_for(lambda: _worker(cluster.client, worker.pid)["trouble"], what="its trouble")
        page.goto(base + "/workers")
        row = page.locator("tr.worker", has_text=str(worker.pid))
        said = row.locator("td.trouble").inner_text()
        assert said.startswith("waiting for work: ResponseError for "), said
        assert "bad" in row.locator("td.state").get_attribute("class")
        page.goto(base + "/")
        assert page.locator("#troubled").inner_text() == "1 in trouble"
        r.delete(wake)
    wait_for(lambda: _worker(cluster.client, worker.pid)["trouble"] == "", timeout=30,
             what="the trouble cleared")
    page.goto(base + "/workers")
    row = page.locator("tr.worker", has_text=str(worker.pid))
    assert row.locator("td.trouble").inner_text() == ""
    assert row.locator("td.state").get_attribute("class") == "state ok"
    page.goto(base + "/")
    assert page.locator("#troubled").count() == 0


def test_without_a_password_it_is_read_only_and_serves_loopback_only(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "j1"})
    base = f"http://127.0.0.1:{port}"
    status, html = get(base + "/jobs?status=queued")
    assert status == 200 and "j1" in html and "read-only" in html
    data = urllib.parse.urlencode({"kind": "job", "action": "delete", "id": "j1"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(base + "/act", data=data, timeout=10)
    assert refused.value.code == 403 and b"DASHBOARD_PASSWORD" in refused.value.read()
    assert cluster.client.get_job("j1")["status"] == "queued"
    # a job that is not there is a 404 page, not a crash; any id can be opened
    assert get(base + "/jobs/nope")[0] == 404
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "a/b?c#d"})
    status, html = get(base + "/jobs?status=queued")
    assert 'href="/jobs/a%2Fb%3Fc%23d"' in html
    status, html = get(base + "/jobs/a%2Fb%3Fc%23d")
    assert status == 200 and "a/b?c#d" in html
    # the id box: a pasted id's blanks go; blanks alone are no id (was a bare 404)
    assert "tests.jobs:Add" in get(base + "/jobs?id=+j1%0A")[1]
    status, html = get(base + "/jobs?id=+&status=queued")
    assert status == 200 and 'data-id="j1"' in html
    # another site's page, under a name it pointed at 127.0.0.1, is refused (DNS rebinding)
    assert get(base + "/jobs/j1", Host=f"rebound.example:{port}")[0] == 403

    # off loopback without a password the master refuses to start, naming the setting
    bad = make_cluster(DASHBOARD_ADDRESS=f"0.0.0.0:{free_port()}")
    with pytest.raises(RuntimeError, match="DASHBOARD_PASSWORD"):
        bad.start_master()   # (start_master raises with the log of a master that exited)


def test_past_its_connection_limit_the_dashboard_answers_503_at_once(make_cluster):
    """Each connection is a file of the master's, which Redis's connections need too:
    the dashboard took any number. Past MAX_CONNECTIONS it answers 503 at once; a
    connection closed makes room."""
    from elric.dashboard import MAX_CONNECTIONS

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    base = f"http://127.0.0.1:{port}"
    assert get(base + "/stats")[0] == 200
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10)
            for _ in range(MAX_CONNECTIONS)]
    try:
        with pytest.raises(urllib.error.HTTPError) as busy:
            urllib.request.urlopen(base + "/stats", timeout=10)
        assert busy.value.code == 503 and busy.value.headers["Retry-After"] == "1"
        assert b"too many connections" in busy.value.read()
        assert cluster.client.ping() == "pong"   # the master itself is not held up
        idle.pop().close()
        wait_for(lambda: get(base + "/stats")[0] == 200, timeout=10, what="a free slot used")
    finally:
        for s in idle:
            s.close()


def test_actions_need_the_session_token_and_metrics_need_the_password(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "j1"})
    base = f"http://127.0.0.1:{port}"
    html = get(base + "/jobs/j1")[1]
    assert 'name="password"' in html and "tests.jobs:Add" not in html   # a login instead

    # logged in, a POST without the form's token, or from another site, changes nothing
    op = Operator(port, "/jobs?status=queued")
    data = urllib.parse.urlencode({"kind": "job", "action": "delete", "id": "j1"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        op.opener.open(base + "/act", data=data)
    assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as refused:
        op.act(kind="job", action="delete", id="j1", headers={"Origin": "http://evil.example"})
    assert refused.value.code == 403
    assert cluster.client.get_job("j1")["status"] == "queued"
    op.act(kind="job", action="delete", id="j1")
    assert cluster.client.get_job("j1") is None

    # a schedule run now from its page: the scheduler fires it at once, by its rules
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "hourly",
                               "trigger": {"type": "interval", "hours": 1}})
    html = op.read("/schedules")
    assert "hourly" in html and "run now" in html
    assert "run now: 1 of 1 done" in op.act(kind="schedule", action="run now", id="hourly",
                                           next="/schedules").read().decode()
    wait_for(lambda: [r for r in cluster.client.get_job("hourly")["runs"]
                      if r["outcome"] != "skipped"], what="the schedule fired")

    # Prometheus: the password as a bearer token; without it, nothing
    assert "elric_jobs" not in get(base + "/metrics")[1]
    status, text = get(base + "/metrics", Authorization=f"Bearer {PASSWORD}")
    assert status == 200 and 'elric_job_events_total{event="submitted"} 2.0' in text
    assert 'event="start_latency_ms"' not in text   # a sum of ms is no event count
    assert 'elric_fires_total{outcome="fired"} 1.0' in text   # the one run now


def test_a_login_redirects_only_within_the_dashboard():
    from elric.dashboard import _local_path

    assert _local_path("/jobs?status=failed") == "/jobs?status=failed"
    for elsewhere in ("//evil.example/", "/\\evil.example/", "https://evil.example/", "",
                      "/\t/evil.example/", "/\n/evil.example/", "/\r/evil.example/"):
        assert _local_path(elsewhere) == "/", repr(elsewhere)


def test_a_job_page_shows_any_arguments_the_contract_accepts(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    # bytes, and maps with int and str keys together, or bytes keys: all msgpack values
    cluster.client.submit_job({"func": "tests.jobs:Echo", "job_id": "odd",
                               "args": [b"\x00raw", {1: "one", "two": 2}, {b"k": 3}],
                               "kwargs": {"flag": b"x"}})
    status, html = get(f"http://127.0.0.1:{port}/jobs/odd")
    assert status == 200, html
    assert "&#34;1&#34;: &#34;one&#34;" in html and "x00raw" in html, html


def test_a_job_page_tells_a_result_that_is_text_from_a_number(make_cluster):
    """A job's result showed as Python prints it: the text "3" as 3, as a job that returned
    the number 3 showed it (and None, True, maps as Python's, not JSON as its arguments)."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job({"func": "tests.jobs:Écrire", "args": ["3"], "job_id": "text"})
    cluster.client.submit_job({"func": "tests.jobs:Echo", "args": [None, True],
                               "job_id": "map"})
    for job_id in ("text", "map"):
        assert cluster.wait_job(job_id)["status"] == "succeeded"
    html = {job_id: unescape(get(f"http://127.0.0.1:{port}/jobs/{job_id}")[1])
            for job_id in ("text", "map")}
    assert '<h2>Result</h2><pre>"3"</pre>' in html["text"], html["text"]
    assert '"args": [\n  null,\n  true\n ]' in html["map"], html["map"]


def test_a_job_page_cuts_huge_arguments_and_says_where_they_are_whole(make_cluster):
    """A job's page held its arguments whole, megabytes of them, fetched and drawn again at
    every refresh: the browser froze most of each two seconds."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.client.submit_job({"func": "tests.jobs:Echo", "args": ["é" * 1_000_000],
                               "job_id": "big", "queue": "nobody"})
    status, html = get(f"http://127.0.0.1:{port}/jobs/big")
    assert status == 200 and len(html) < 100_000, len(html)
    assert "é" * 1000 in html and "elric job big --json" in html, html[-3000:]


def test_a_child_jobs_page_links_to_its_parent_and_its_batch(make_cluster):
    """A child job's page named its parent and batch as plain text: from a failed child,
    the job that submitted it, or the rest of its batch, were a copy and a search away."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job({"func": "tests.jobs:Spawn", "args": [1], "job_id": "mum",
                               "batch": "b&1"})
    [child] = cluster.wait_job("mum")["result"]["children"]
    html = get(f"http://127.0.0.1:{port}/jobs/{child}")[1]
    assert '<a href="/jobs/mum">mum</a>' in html and \
        '<a href="/jobs?batch=b%261">b&amp;1</a>' in html, html


def test_an_action_that_did_nothing_is_not_counted_done(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    for job_id in ("j1", "j2"):
        cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": job_id,
                                   "queue": "nobody"})
    cluster.client.cancel_job("j2")
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    op = Operator(port)

    def act(kind: str, action: str, *ids: str) -> str:
        return unescape(op.act(*(("id", i) for i in ids), kind=kind, action=action)
                        .read().decode())

    # the bulk form sends what is ticked: an ended job is not cancelled again; the reasons
    # are the CLI's (a periodic job's says how to stop it)
    assert "cancel: 1 of 2 done; job 'j2' had ended (cancelled): left alone" in act(
        "job", "cancel", "j1", "j2")
    assert "delete: 0 of 1 done; gone: not found" in act("job", "delete", "gone")
    # past the first three reasons, how many more there were
    assert "delete: 0 of 5 done; g1: not found; g2: not found; g3: not found; and 2 more<" \
        in act("job", "delete", "g1", "g2", "g3", "g4", "g5")
    assert "pause: 0 of 1 done; gone: not found" in act("schedule", "pause", "gone")
    # a bulk button pressed with nothing ticked: back to the list, not a 400 page saying
    # the action is unknown
    assert "retry: 0 of 0 done" in act("job", "retry")


def test_a_job_action_never_touches_a_schedule_nor_a_schedule_action_a_job(make_cluster):
    """A hand-made POST of "job delete" with a schedule's id removed the schedule (the
    CLI's delete refuses it): the kind is checked before anything is done."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    cluster.client.submit_job(Echo.spec(job_id="tick", queue="nobody", trigger=every(hours=1)))
    op = Operator(port)
    for kind, action, ids, wrong in (
            ("job", "delete", ["tick"], "'tick' is a periodic job"),
            ("job", "cancel", ["tick"], "'tick' is a periodic job"),
            ("job", "delete", ["j1", "tick"], "'tick' is a periodic job"),   # j1 too: kept
            ("schedule", "remove", ["j1"], "'j1' is a one-off job"),
            ("schedule", "pause", ["tick", "j1"], "'j1' is a one-off job")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            op.act(*(("id", i) for i in ids), kind=kind, action=action)
        text = refused.value.read().decode()
        assert refused.value.code == 400 and wrong in text and "nothing was done" in text, \
            (kind, action, ids, text)
    tick, j1 = cluster.client.get_job("tick"), cluster.client.get_job("j1")
    assert "trigger" in tick and not tick.get("paused") and j1["status"] == "queued"


def test_a_form_that_is_not_utf8_is_a_400_that_says_so(make_cluster):
    """A POST (an action, a login) whose body is not UTF-8 was a 500 ("internal error:
    UnicodeDecodeError")."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    op = Operator(port)
    for path, body in (("/act", b"kind=job&action=delete&id=j1\xff&csrf=" + op.token.encode()),
                       ("/login", b"password=\xff")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            op.opener.open(op.base + path, data=body)
        assert refused.value.code == 400, path
        assert "not UTF-8" in refused.value.read().decode(), path
    assert cluster.client.get_job("j1")["status"] == "queued"


def test_a_form_that_sends_a_file_is_a_400_that_says_so(make_cluster):
    """A multipart POST whose kind, action or id was a file was a 500 ("internal error:
    TypeError: unhashable type"): the dashboard's forms send text only."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    op = Operator(port)
    token = op.token

    def part(name: str, value: str, file: bool = False) -> bytes:
        named = f'name="{name}"' + (f'; filename="{name}.txt"' if file else "")
        return f"--XX\r\nContent-Disposition: form-data; {named}\r\n\r\n{value}\r\n".encode()
    for path, fields in (("/act", (("kind", "job", True), ("action", "delete", False),
                                   ("id", "j1", False), ("csrf", token, False))),
                         ("/act", (("kind", "job", False), ("action", "delete", False),
                                   ("id", "j1", True), ("csrf", token, False))),
                         ("/login", (("password", PASSWORD, True),))):
        body = b"".join(part(*field) for field in fields) + b"--XX--\r\n"
        request = urllib.request.Request(op.base + path, data=body, headers={
            "Content-Type": "multipart/form-data; boundary=XX"})
        with pytest.raises(urllib.error.HTTPError) as refused:
            op.opener.open(request)
        assert refused.value.code == 400, (path, fields)
        assert "sends a file" in refused.value.read().decode(), (path, fields)
    assert cluster.client.get_job("j1")["status"] == "queued"


def test_an_id_sent_twice_in_one_bulk_action_is_done_and_counted_once(make_cluster):
    """The same id twice in one bulk form (two rows of one job, a script) counted twice:
    "cancel: 1 of 2 done; j1: had ended", or a delete's second "not found", for one job."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "j2",
                               "queue": "nobody"})
    op = Operator(port)
    for action, job_id in (("cancel", "j1"), ("delete", "j2")):
        note = urllib.parse.unquote_plus(
            op.act(("id", job_id), ("id", job_id), kind="job", action=action).geturl())
        assert note.endswith(f"note={action}: 1 of 1 done"), note


def test_a_run_now_the_scheduler_skips_is_not_counted_done(make_cluster):
    """"run now: 1 of 1 done" of a schedule at its max_instances: the scheduler skipped the
    fire, nothing ran, and only the schedule's page said so (the CLI's run-now exits 1)."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    cluster.client.submit_job(Echo.spec(job_id="tick", queue="nobody", trigger=every(hours=1)))
    op = Operator(port, "/schedules")

    def run_now() -> str:
        return urllib.parse.unquote_plus(
            op.act(kind="schedule", action="run now", id="tick").geturl())
    note = run_now()
    assert note.endswith("note=run now: 1 of 1 done"), note   # queued; no worker takes it
    note = run_now()
    [skipped, queued] = cluster.client.get_job("tick")["runs"]
    assert queued["outcome"] == "queued" and skipped["outcome"] == "skipped"
    assert note.endswith(f"note=run now: 0 of 1 done; tick: {skipped['job_id']} skipped "
                         "(max_instances)"), note


def test_a_page_offset_or_a_pool_size_that_is_no_number_is_no_crash(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    op = Operator(port)
    for path in ("/jobs?offset=%C2%B2", "/schedules?offset=%C2%B2"):   # "²" is a digit
        assert op.opener.open(op.base + path).status == 200
    # past what Redis's ZRANGE takes (a signed 64-bit index): an empty page, as past the end
    for offset in (2**63, 2**63 - 10, 10**30):
        for path in ("/jobs", "/schedules"):
            html = op.read(f"{path}?offset={offset}")
            assert "No job matches." in html or "No periodic job." in html, (path, offset)
    for bad in ("²", "--5"):   # "--5".lstrip("-") is decimal, but int() refuses it
        assert "processes: 0 of 1 done" in op.act(kind="worker", action="processes", id="w1",
                                                  value=bad).read().decode()
    # a value sent to an action that takes none, or none to one that does: refused, no 500
    for action, value in (("pause", {"value": "3"}), ("processes", {})):
        assert f"{action}: 0 of 1 done; w1: " in op.act(kind="worker", action=action, id="w1",
                                                        **value).read().decode()
    # queues are read as the CLI reads them: blanks dropped ("no worker": the list passed),
    # and a list naming none is said so
    for value, said in (("a,,b", "no worker 'w1'"), (",", "queues: ',' names nothing")):
        assert said in urllib.parse.unquote_plus(op.act(
            kind="worker", action="queues", id="w1", value=value).geturl()), value


def test_an_offset_of_thousands_of_digits_is_past_the_end_not_a_500(make_cluster):
    """int() refuses a string of more than 4,300 digits: /schedules?offset=999... was a 500
    ("internal error: ValueError: Exceeds the limit ... for integer string conversion")."""
    cluster, port = dashboard_with_a_job(make_cluster)
    cluster.client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    for path, empty in (("/jobs", "No job matches."), ("/schedules", "No periodic job.")):
        status, html = get(f"http://127.0.0.1:{port}{path}?offset={'9' * 5000}")
        assert status == 200 and empty in html, (path, html[-500:])


def test_a_pool_size_of_thousands_of_digits_is_refused_not_a_500(make_cluster):
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    op = Operator(port)
    for value in ("9" * 5000, "-" + "9" * 5000):
        note = urllib.parse.unquote_plus(op.act(kind="worker", action="processes", id="w1",
                                                value=value).geturl())
        assert "processes: 0 of 1 done; w1: control_worker set: concurrency " in note, note


def test_a_huge_error_is_cut_in_the_job_list_and_whole_on_its_page(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    message = "x" * 300_000   # one line: the list shows an error's last line
    cluster.client.submit_job({"func": "tests.jobs:Fail", "args": [message], "job_id": "big"})
    assert cluster.wait_job("big")["status"] == "failed"
    base = f"http://127.0.0.1:{port}"
    status, html = get(base + "/jobs?status=failed")   # refreshed every 2 s: kept small
    assert status == 200 and "big" in html and len(html) < 20_000, len(html)
    assert message in get(base + "/jobs/big")[1]


def test_without_a_password_any_loopback_name_with_or_without_a_port_is_served():
    from aiohttp.test_utils import make_mocked_request

    from elric.dashboard.access import Access

    def ok(host: str) -> bool:
        return Access(None).host_ok(make_mocked_request("GET", "/", headers={"Host": host}))

    for host in ("[::1]:7532", "[::1]", "127.0.0.1:7532", "localhost", "localhost:7532"):
        assert ok(host), host
    for host in ("rebound.example:7532", "[2001:db8::1]:7532", "10.0.0.1"):
        assert not ok(host), host


def test_a_cookie_or_csrf_token_with_non_ascii_text_is_refused_not_a_500():
    from aiohttp.test_utils import make_mocked_request

    from elric.dashboard.access import Access

    access = Access("pw")

    def request(cookie: str):
        return make_mocked_request("POST", "/act", headers={"Cookie": f"elric_session={cookie}"})

    # "²".isdigit() is true, but int() refuses it; compare_digest refuses non-ASCII str
    for cookie in ("\u00b2.x", "9999999999.\u00e9"):
        assert access.session(request(cookie)) is None
        assert not access.may_read(request(cookie))
    session = access.new_session()
    assert access.session(request(session)) == session
    assert access.may_act(request(session), {"csrf": "\u00e9"}) == \
        "the form is stale or forged: reload the page and try again"


def test_two_logins_in_one_second_are_two_sessions():
    """A session was its expiry second signed: two browsers logged in within a second shared
    one session, its CSRF token and the notes shown after an action."""
    from aiohttp.test_utils import make_mocked_request

    from elric.dashboard.access import Access

    access = Access("pw")

    def request(cookie: str):
        return make_mocked_request("POST", "/act", headers={"Cookie": f"elric_session={cookie}"})

    first, second = access.new_session(), access.new_session()   # (one second, mostly)
    assert first != second
    assert access.session(request(first)) == first and access.session(request(second)) == second
    first_csrf = access.csrf_token(request(first))
    assert access.may_act(request(first), {"csrf": first_csrf}) is None
    assert access.may_act(request(second), {"csrf": first_csrf}) == \
        "the form is stale or forged: reload the page and try again"
    # a session's expiry cannot be moved: it is signed with its nonce
    expires, nonce, signature = first.split(".")
    assert access.session(request(f"{int(expires) + 1}.{nonce}.{signature}")) is None


def test_a_cookie_or_bearer_token_that_is_not_utf8_is_refused_not_a_500(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()

    def status_line(header: bytes) -> bytes:   # raw bytes: urllib sends only Latin-1 text
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                      + header + b"\r\n\r\n")
            return s.makefile("rb").readline()

    # the server reads a header's bytes that are not UTF-8 as lone surrogates
    for header in (b"Authorization: Bearer \xff", b"Cookie: elric_session=9999999999.\xff"):
        assert status_line(header).startswith(b"HTTP/1.1 401"), header   # refused, no 500
    assert status_line(b"Authorization: Bearer " + PASSWORD.encode()).startswith(
        b"HTTP/1.1 200")


def test_a_session_cookie_of_thousands_of_digits_is_no_session_not_a_500(make_cluster):
    """int() refuses over 4,300 digits: such a cookie was a bare 500 on every page."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    status, html = get(f"http://127.0.0.1:{port}/jobs", Cookie=f"elric_session={'9' * 5000}.a")
    assert status == 200 and 'name="password"' in html, html   # a login, as for no cookie


def test_a_key_of_the_wrong_type_is_an_error_page_that_names_it(make_cluster, redis_url):
    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    base = f"http://127.0.0.1:{port}"
    with redis.Redis.from_url(redis_url) as r:
        r.set("elric:workers", "an operator's mistake")   # stats() reads it: WRONGTYPE
    # the page says what the RPC says (elric status prints it), not a bare "500 Internal
    # Server Error"
    for path in ("/", "/workers", "/stats"):
        status, html = get(base + path)
        assert status == 500 and "internal error: ResponseError" in html, html
        assert " elric:workers " in html and "WRONGTYPE" in html   # the key it names
    assert "Internal error" in html and "<nav>" in html
    assert get(base + "/jobs")[0] == 200   # pages that read no worker still work


def test_one_schedule_that_cannot_be_read_is_named_and_the_others_shown(make_cluster,
                                                                        redis_url):
    """The schedules page gets every row: one run record or trigger written by hand (a bad
    restore) failed the page for every schedule, with a bare 500; `elric job` and run-now
    on it printed an internal error. The page names it and what to do; run-now, one line;
    its job page and `elric job` show it unreadable with that message, as for a one-off."""
    import redis

    from elric.keys import Keys

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    for job_id in ("bad-runs", "bad-trigger", "good"):
        cluster.client.submit_job(Echo.spec(job_id=job_id, queue="nobody",
                                            trigger=every(hours=1)))
    with redis.Redis.from_url(redis_url) as r:
        r.lpush(Keys().schedule_runs("bad-runs"), b"\xc1")
        r.hset(Keys().schedule("bad-trigger"), "trigger", b"\x81\xa4type\xa3bad")
    status, html = get(f"http://127.0.0.1:{port}/schedules")
    assert status == 200 and 'href="/jobs/good"' in html, html
    for job_id in ("bad-runs", "bad-trigger"):
        assert f"periodic job &#39;{job_id}&#39;: its stored data cannot be read (" in html
        assert f"remove it (elric schedules remove {job_id}) and add it again" in html
        one_line_error(elric(cluster, "schedules", "run-now", job_id), 1,
                       f"periodic job '{job_id}': its stored data cannot be read (")
        shown = elric(cluster, "job", job_id)
        assert shown.returncode == 0 and "its stored data cannot be read (" in shown.stdout
        status, page = get(f"http://127.0.0.1:{port}/jobs/{job_id}")
        assert status == 200 and "unreadable" in page, page
        assert f"periodic job &#39;{job_id}&#39;: its stored data cannot be read (" in page
        assert 'value="remove"' in page and 'value="pause"' not in page   # what it says
    assert elric(cluster, "job", "good").returncode == 0
    assert 'value="pause"' in get(f"http://127.0.0.1:{port}/jobs/good")[1]
    assert elric(cluster, "schedules", "run-now", "good").returncode == 0


def test_the_workers_page_reads_only_the_workers(make_cluster, redis_url):
    """/workers read the whole of stats() (every func's, batch's and queue's counts): on
    a big store slow, and failing whenever any of those could not be read."""
    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    worker = cluster.start_worker("--concurrency", "1")
    with redis.Redis.from_url(redis_url) as r:   # a func's counts that cannot be read
        r.sadd("elric:funcs", "broken")
        r.set("elric:stats:func:broken", "an operator's mistake")
    assert get(f"http://127.0.0.1:{port}/stats")[0] == 500   # what reads it says so
    status, html = get(f"http://127.0.0.1:{port}/workers")
    assert status == 200 and f"<td class=\"n\">{worker.pid}</td>" in html, html


def test_how_long_ago_is_judged_by_redis_clock_not_the_masters(make_cluster):
    """A master whose clock ran two hours ahead showed a worker that beat a second ago as
    "last seen ... (2 h ago)" beside its state "running": the times are Redis's."""
    from elric.launch import faketime_lib

    if (lib := faketime_lib()) is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    real_time = dict(cluster.env)
    cluster.env.update(LD_PRELOAD=lib, FAKETIME="+7200")
    cluster.start_master()
    cluster.env = real_time
    worker = cluster.start_worker("--concurrency", "1")
    html = get(f"http://127.0.0.1:{port}/workers")[1]
    row = re.search(rf'<tr class="worker".*?<td class="n">{worker.pid}</td>.*?</tr>', html,
                    re.S).group(0)
    assert "running" in row and re.search(r"\([\d.]+ s ago\)", row), row
    # the master's own tasks too: their last progress is on the master's clock (the RPC
    # health answers it on Redis's)
    html = get(f"http://127.0.0.1:{port}/")[1]
    tasks = re.search(r"<th>last progress</th>.*?</table>", html, re.S).group(0)
    assert re.search(r"\([\d.]+ s ago\)", tasks) and " h ago" not in tasks and \
        "(in " not in tasks, tasks


def test_a_session_is_timed_by_redis_clock_not_the_masters(make_cluster):
    """A session's end was set and checked by the master's own clock, and every dashboard
    of the cluster takes the cookie: one made on a master an hour ahead lasted 13 h on the
    others, and a master an hour ahead ended the others' sessions an hour early."""
    from elric.dashboard.access import SESSION_SECONDS, Access
    from elric.launch import faketime_lib

    if (lib := faketime_lib()) is None:
        pytest.skip("needs the libfaketime package (pip install -e .[test])")
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.env.update(LD_PRELOAD=lib, FAKETIME="+3600")
    cluster.start_master()
    base = f"http://127.0.0.1:{port}"
    jar = urllib.request.HTTPCookieProcessor()
    urllib.request.build_opener(jar).open(
        base + "/login", data=urllib.parse.urlencode({"password": PASSWORD}).encode())
    [cookie] = jar.cookiejar
    ends = int(cookie.value.partition(".")[0])
    now = cluster.client.health()["now"]
    assert abs(ends - (now + SESSION_SECONDS)) < 60, (ends - now) / 3600
    # a session another master made half an hour before its end is still one here
    signed = f"{int(now) + 1800}.0123456789abcdef"
    late = f"{signed}.{Access(PASSWORD)._sign(signed)}"
    status, html = get(base + "/jobs", Cookie=f"elric_session={late}")
    assert status == 200 and "log out</button>" in html, html


def test_times_name_their_zone(make_cluster):
    """Times were the master's local time with no zone: read in another zone (the
    browser's, a second master's) as if they were its own, hours off."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.env["TZ"] = "XYZ-9"   # a POSIX zone nine hours east of UTC, named XYZ
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    html = get(f"http://127.0.0.1:{port}/workers")[1]
    assert re.search(r"\d\d:\d\d:\d\d XYZ \(", html), html


def test_a_queues_job_list_looks_at_no_more_jobs_than_a_func_filter_does(make_cluster):
    """/jobs?queue=Q (each queue's link on the overview) has an index for Q's waiting jobs
    only: for the rest it read up to 100,000 jobs of every queue at each load and each
    refresh, every 2 s; it looks at as many as a func or batch filter does, and says so.
    A page whose scan stopped before it filled showed "No job matches." as if final: it
    links to look further from where it stopped."""
    from elric.dashboard import SCAN

    cluster, port = dashboard_with_a_job(make_cluster)
    client = cluster.client
    client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "old", "queue": "q"})
    client.cancel_job("old")
    client.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 2], "queue": "other"}
                        for _ in range(SCAN + 10)])
    cursor = None
    while cursor != "":   # cancelled after "old": the list meets them first
        cursor = client.bulk_jobs("cancel", {"queue": "other"}, cursor or "")["cursor"]
    html = unescape(get(f"http://127.0.0.1:{port}/jobs?queue=q")[1])
    assert f"Looked at up to {SCAN:,} jobs" in html and 'data-id="old"' not in html, html
    assert "No job matches among those looked at so far." in html, html
    further = re.search(r'<a href="(/jobs\?[^"]*)">look further</a>', html).group(1)
    html = unescape(get(f"http://127.0.0.1:{port}{further}")[1])
    assert 'data-id="old"' in html and "look further" not in html, html
    assert "from where an earlier page stopped" in html
    html = get(f"http://127.0.0.1:{port}/jobs?queue=nobody&status=queued")[1]
    assert 'data-id="j1"' in html and "Looked at" not in html   # a queue's own index


def test_no_counter_in_metrics_goes_down_when_a_dedupe_key_is_given_back(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}",
                           DEDUPE_RELEASE_ON_FAILURE=True)
    cluster.start_master()

    def counters() -> dict[str, float]:
        text = get(f"http://127.0.0.1:{port}/metrics")[1]
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\w+_total(?:\{.*\})?) (\S+)$",
                                                        text, re.M)} | {"text": text}

    cluster.client.submit_job(Fail.spec(job_id="f1", dedupe_key="k"))
    before = counters()
    assert re.search(r'^elric_dedupe_keys\{scope="\w+"\} 1\.0$', before["text"], re.M)
    cluster.start_worker("--concurrency", "1")
    assert cluster.wait_job("f1")["status"] == "failed"   # its key is given back
    after = counters()
    # Prometheus reads a counter that went down as a restart: rate() would show a burst
    assert [k for k in before if k != "text" and after.get(k, 0) < before[k]] == []
    assert re.search(r'^elric_dedupe_keys\{scope="\w+"\} 0\.0$', after["text"], re.M)


def test_metrics_count_every_func_not_only_the_latest_that_stats_holds(make_cluster,
                                                                         redis_url):
    """/metrics read stats(), which holds the 100 funcs last active: past 100 funcs, an
    older func's counters left the scrape until it ran again (past 100 busy ones, funcs
    left and came back scrape by scrape): gaps in its graphs, a sum over funcs that fell
    and rose again (a reset to rate()), and what it did in a gap longer than rate()'s
    window never counted."""
    import time

    import redis

    from elric.keys import Keys
    from elric.queue import STATS_ROWS

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    keys, funcs, now_ms = Keys("elric"), STATS_ROWS + 20, int(time.time() * 1000)
    with redis.Redis.from_url(redis_url) as r, r.pipeline(transaction=False) as pipe:
        for i in range(funcs):   # gen.f0 last active the longest ago
            pipe.sadd(keys.funcs, f"gen.f{i}")
            pipe.hset(keys.func(f"gen.f{i}"), mapping={
                "submitted": i + 3, "succeeded": i + 1, "failed": 1, "le:1": i + 2,
                "duration_ms": 7 * (i + 2), "last_at": now_ms - (funcs - i) * 1000})
        pipe.execute()
    assert len(cluster.client.stats()["funcs"]) == STATS_ROWS   # the RPC reply stays bounded
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    succeeded = dict(re.findall(r'^elric_func_jobs_total\{func="([^"]+)",outcome="succeeded"'
                                r'\} (\S+)$', text, re.M))
    assert succeeded == {f"gen.f{i}": f"{i + 1}.0" for i in range(funcs)}, succeeded
    for i in (0, funcs - 1):   # the oldest's figures as the newest's: its own
        assert f'elric_func_jobs_total{{func="gen.f{i}",outcome="failed"}} 1.0' in text
        assert f'elric_job_duration_seconds_count{{func="gen.f{i}"}} {i + 2}.0' in text
        assert f'elric_job_duration_seconds_sum{{func="gen.f{i}"}} {7 * (i + 2) / 1000}' \
            in text


def test_a_scrape_reads_no_batch_or_minute_it_does_not_show(make_cluster, redis_url):
    """/metrics read stats() whole: the batch labels and their rows, and an hour of minute
    rows, on every scrape, for no metric."""
    import redis

    from elric.dashboard.metrics import render

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.client.submit_job(Echo.spec(job_id="j", queue="nobody", batch="b1"))
    with redis.Redis.from_url(redis_url, socket_timeout=10) as r, r.monitor() as monitor:
        text = get(f"http://127.0.0.1:{port}/metrics")[1]
        r.echo("scraped")   # (another connection of the pool): the scrape's commands end
        seen = []
        while "scraped" not in (seen or [""])[-1]:
            c = monitor.next_command()
            if c["client_type"] != "lua" and not c["command"].upper().startswith("EVAL"):
                seen.append(c["command"])   # (housekeeping's scripts name batches too)
    assert any(c.lower() == "smembers elric:funcs" for c in seen), seen   # it was watched
    assert [c for c in seen if re.search(r"elric:(batches|stats:(batch|minute):)", c)] == []
    # what it shows is as before: stats() rendered (while it holds every func)
    assert 'elric_queue_depth{queue="nobody"} 1.0' in text
    assert text == render(cluster.client.stats()).decode()


def test_a_worker_field_that_is_no_number_is_shown_not_a_broken_page(make_cluster, redis_url):
    import time

    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    with redis.Redis.from_url(redis_url) as r:   # a worker's hash an operator edited
        r.zadd("elric:workers", {"w1": int(time.time() * 1000)})
        r.hset("elric:worker:w1", mapping={"host": "h", "pid": "7", "queues": "default",
                                           "state": "running", "started_at": "1.5e12"})
    # stats() keeps a value it cannot read as it is; the page shows it, and the workers
    # beside it with their buttons
    status, html = get(f"http://127.0.0.1:{port}/workers")
    assert status == 200 and "<td>1.5e12</td>" in html and "set processes" in html, html


def test_metrics_count_as_jobs_only_the_jobs_redis_holds(make_cluster):
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    for job_id in ("first", "again"):   # the second is a duplicate: dropped, not stored
        cluster.client.submit_job(Echo.spec(job_id=job_id, dedupe_key="k", queue="nobody"))
    assert cluster.client.get_job("again") is None
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    jobs = re.findall(r'^elric_jobs\{status="(\w+)"\} (\S+)$', text, re.M)
    # "Jobs by status now": sum(elric_jobs) is how many jobs there are; the drops are
    # elric_dedupe_hits_total's
    assert sum(float(n) for _, n in jobs) == 1 and "filtered" not in dict(jobs), jobs
    assert re.search(r'^elric_dedupe_hits_total\{scope="\w+"\} 1\.0$', text, re.M), text


def test_an_empty_password_is_no_password_read_only_and_loopback_only():
    from aiohttp.test_utils import make_mocked_request

    from elric.dashboard.access import Access

    # RPC_TOKEN = "" in a settings module: the master took it for no password (it allows
    # loopback only, and logs "read-only, no login"), but an empty login then opened every
    # action, to any Host: another site's page rebound to 127.0.0.1 could log in and act
    access = Access("")
    assert not access.password_ok("")
    rebound = make_mocked_request("POST", "/act", headers={"Host": "rebound.example:7532"})
    assert not access.host_ok(rebound)
    session = make_mocked_request("POST", "/act", headers={
        "Host": "127.0.0.1:7532", "Cookie": f"elric_session={access.new_session()}"})
    assert "read-only" in access.may_act(session, {"csrf": access.csrf_token(session)})


def test_a_worker_that_stopped_is_shown_stopped_not_lost(make_cluster, redis_url):
    import time

    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    stopped, killed = (cluster.start_worker("--concurrency", "1") for _ in range(2))
    ids = {w["pid"]: w["worker_id"] for w in cluster.client.stats()["workers"]}
    assert stopped.stop() == 0   # SIGTERM: it says goodbye (state "stopped")
    killed.kill()                # no goodbye: lost
    with redis.Redis.from_url(redis_url) as r:   # 60 s of silence, without the wait
        r.zadd("elric:workers", {wid: (time.time() - 61) * 1000 for wid in ids.values()})
    base = f"http://127.0.0.1:{port}"
    html = get(base + "/workers")[1]
    for proc, state in ((stopped, "stopped"), (killed, "lost")):
        row = re.search(rf'data-id="{ids[proc.pid]}">.*?class="state \w*">(\w+)<', html, re.S)
        assert row and row.group(1) == state, (state, html)
    # an alert on lost workers does not fire for one stopped on purpose (a deploy)
    text = get(base + "/metrics")[1]
    for state, n in (("alive", 0), ("lost", 1), ("stopped", 1)):
        assert f'elric_workers{{state="{state}"}} {n}.0' in text, text
    assert ">1 lost<" in get(base + "/")[1]
    assert "workers: 0 alive, 1 lost, 1 stopped" in elric(cluster, "status").stdout


def test_a_worker_that_stopped_offers_no_actions(make_cluster):
    """For its first minute a stopped worker (still "alive": heard from lately) had pause,
    stop and set buttons, which the master refuses: it has stopped, it takes no orders."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    running, stopped = (cluster.start_worker("--concurrency", "1") for _ in range(2))
    ids = {w["pid"]: w["worker_id"] for w in cluster.client.stats()["workers"]}
    assert stopped.stop() == 0
    html = get(f"http://127.0.0.1:{port}/workers")[1]
    rows = {wid: re.search(rf'data-id="{wid}">(.*?)</tr>', html, re.S).group(1)
            for wid in ids.values()}
    assert 'value="pause"' in rows[ids[running.pid]] and ">stopped<" in rows[ids[stopped.pid]]
    assert "<form" not in rows[ids[stopped.pid]], rows[ids[stopped.pid]]


def test_a_worker_told_to_stop_shows_stopping_while_its_jobs_finish(make_cluster):
    """A worker that was told to stop and waited for its running jobs (up to SHUTDOWN_GRACE)
    showed "running", in green, with its pause and stop buttons: the stop the page had said
    was done looked as if it had done nothing."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    worker = cluster.start_worker("--concurrency", "1", SHUTDOWN_GRACE=120)
    cluster.client.submit_job({"func": "tests.jobs:Sleep", "args": [120], "job_id": "long"})
    cluster.wait_job("long", ("running",))
    worker_id = _worker(cluster.client, worker.pid)["worker_id"]
    cluster.client.control_worker(worker_id, "stop")

    def row():
        html = get(f"http://127.0.0.1:{port}/workers")[1]
        return re.search(rf'data-id="{worker_id}">(.*?)</tr>', html, re.S).group(1)
    shown = wait_for(lambda: (lambda r: r if ">stopping<" in r else None)(row()),
                     timeout=10, what="the worker shown stopping")
    assert 'class="state bad"' in shown and "<form" not in shown, shown
    assert "stopping" in elric(cluster, "workers").stdout   # the CLI says it too
    worker.kill()


def test_the_overview_says_when_workers_alive_are_paused(make_cluster):
    """With every worker paused, jobs waited while the overview said "workers alive 1" and
    nothing else: only the workers page told why nothing ran."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    worker = cluster.start_worker("--concurrency", "1")
    cluster.client.control_worker(_worker(cluster.client, worker.pid)["worker_id"], "pause")
    wait_for(lambda: _worker(cluster.client, worker.pid)["state"] == "paused",
             what="the worker paused")
    html = get(f"http://127.0.0.1:{port}/")[1]
    card = re.search(r'id="count-workers">(.*?)</div>', html, re.S).group(1)
    assert "<b>1</b>" in card and ">1 paused<" in card, card


def test_the_overview_marks_a_queue_with_jobs_waiting_that_no_running_worker_takes(
        make_cluster, redis_url):
    """Jobs waited on a queue no worker served (a typo, a worker paused or started with
    other queues) while the overview showed the queue as any other: nothing said why."""
    import time

    import redis

    cluster, port = dashboard_with_a_job(make_cluster)   # j1 on queue "nobody"
    row = re.compile(r'<tr><td><a href="/jobs\?queue=nobody">.*?</tr>', re.S)
    html = get(f"http://127.0.0.1:{port}/")[1]
    assert "no running worker takes it" in row.search(html).group(0), html
    with redis.Redis.from_url(redis_url) as r:   # a worker, running, that takes it
        r.hset("elric:worker:w:1:a", mapping={"queues": "default,nobody", "state": "running"})
        r.zadd("elric:workers", {"w:1:a": time.time() * 1000})
    html = get(f"http://127.0.0.1:{port}/")[1]
    assert "no running worker takes it" not in row.search(html).group(0), html


def test_a_worker_silent_longer_than_its_record_lives_is_forgotten(make_cluster, redis_url):
    import time

    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    # a worker of two days ago: its hash expired a day after its last heartbeat; every
    # start has a new id, so such rows piled up for good, as lost, read at every refresh
    with redis.Redis.from_url(redis_url) as r:
        r.zadd("elric:workers", {"old:1:abc": (time.time() - 2 * 86400) * 1000})
        wait_for(lambda: r.zscore("elric:workers", "old:1:abc") is None,
                 what="housekeeping forgets the worker")   # (a pass a second)
    html = get(f"http://127.0.0.1:{port}/workers")[1]
    assert "old:1:abc" not in html and html.count('class="worker"') == 1, html
    assert 'elric_workers{state="lost"} 0.0' in get(f"http://127.0.0.1:{port}/metrics")[1]


def test_a_job_that_is_not_there_says_why_it_may_be_gone(make_cluster):
    """A schedule's run links to its job; a day after it succeeded (RESULT_TTL) its record
    has expired, and the link led to a bare "no job 'nightly@...'", as a typo does."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", RESULT_TTL=3600)
    cluster.start_master()
    status, html = get(f"http://127.0.0.1:{port}/jobs/nightly%402026-01-01T00%3A00%3A00Z")
    assert status == 404 and "no job 'nightly@2026-01-01T00:00:00Z'" in unescape(html), html
    assert "succeeded 1 h (RESULT_TTL)" in html and "failed 7 d (FAILED_TTL)" in html, html


def test_an_address_that_is_no_page_is_a_page_with_the_way_back(make_cluster):
    """A mistyped address (/worker, /jobs/) was aiohttp's bare "404: Not Found": no page
    of the dashboard, no link to one."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    for path in ("/worker", "/jobs/"):
        status, html = get(f"http://127.0.0.1:{port}{path}")
        assert status == 404 and f"no page {path}" in html and 'href="/workers"' in html, html


def test_a_job_deleted_from_its_page_says_it_was_deleted(make_cluster):
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    op = Operator(port, "/jobs/j1")
    # the page's delete button comes back to the job's page, which is gone now: it says
    # the delete was done, not only "Not found" as if it had failed
    with pytest.raises(urllib.error.HTTPError) as gone:
        op.act(kind="job", action="delete", id="j1", next="/jobs/j1")
    html = gone.value.read().decode()
    assert gone.value.code == 404 and "delete: 1 of 1 done" in html, html
    assert cluster.client.get_job("j1") is None


def test_the_jobs_an_operator_ticked_stay_ticked_when_the_list_refreshes(make_cluster, browser):
    cluster, port = dashboard_with_a_job(make_cluster)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/jobs?status=queued")
    page.locator("tr.job[data-id=j1] input[type=checkbox]").check()
    page.locator("h1").click()   # reading the page: the focus leaves the form
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "j2",
                               "queue": "nobody"})
    page.wait_for_selector("tr.job[data-id=j2]")   # the list refreshed
    # else a bulk retry, cancel or delete then acted on nothing of what was ticked
    assert page.locator("tr.job[data-id=j1] input[type=checkbox]").is_checked()


def test_text_an_operator_selects_stays_selected_while_the_page_would_refresh(
        make_cluster, browser):
    """Each refresh (every 2 s) drew the page anew: a traceback or a job id being selected
    to copy was unselected under the mouse."""
    cluster, port = dashboard_with_a_job(make_cluster)
    page = browser.new_page()
    page.add_init_script("""{ const every = window.setInterval; window.ticks = 0;
        window.setInterval = (f, ms) => every(() => { window.ticks++; return f(); }, ms); }""")
    page.goto(f"http://127.0.0.1:{port}/jobs/j1")
    page.evaluate("""() => { const r = document.createRange();
        r.selectNodeContents(document.querySelector("h1")); getSelection().addRange(r); }""")
    cluster.client.cancel_job("j1")
    ticks = page.evaluate("window.ticks")
    page.wait_for_function(f"window.ticks >= {ticks + 2}")   # two refreshes' time
    assert page.evaluate("getSelection().toString()") == "Job j1 queued"
    page.evaluate("getSelection().removeAllRanges()")   # done: the page is live again
    page.wait_for_selector("h1 >> text=cancelled")


def test_a_refresh_waits_for_the_last_one_to_answer(make_cluster, browser):
    """A page slower than the refresh (a filter scanning 10,000 jobs took 4 s on a busy
    master) was asked again every 2 s all the same: the requests piled up on the master,
    each making the others slower, for as long as the tab stayed open."""
    cluster, port = dashboard_with_a_job(make_cluster)
    page = browser.new_page()
    page.add_init_script("""{ const every = window.setInterval; window.ticks = 0;
        window.setInterval = (f, ms) => every(() => { window.ticks++; return f(); }, ms); }""")
    held = []   # refreshes the "master" has not answered yet

    def route(r):
        if "x-elric-live" in r.request.headers:
            held.append(r)
        else:
            r.continue_()
    page.route("**/jobs/j1", route)
    page.goto(f"http://127.0.0.1:{port}/jobs/j1")
    ticks = page.evaluate("window.ticks")
    page.wait_for_function(f"window.ticks >= {ticks + 3}")
    assert len(held) == 1, len(held)
    held.pop().continue_()
    page.wait_for_function(f"window.ticks >= {ticks + 5}")
    assert len(held) == 1   # once it answered, the next one went


def test_a_page_that_cannot_refresh_says_so_instead_of_freezing(make_cluster, browser,
                                                                   redis_url):
    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    master = cluster.start_master()
    page = browser.new_page()
    # this browser's clock years off: the page's times are by Redis's clock, the banner's too
    page.clock.set_fixed_time("2001-02-03T04:05:06Z")
    page.goto(f"http://127.0.0.1:{port}/login?next=/")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_selector("#count-queued")
    # the figures cannot be read: the page shows why, then the figures once they can be
    with redis.Redis.from_url(redis_url) as r:
        r.set("elric:workers", "an operator's mistake")
        page.wait_for_selector("text=Internal error")
        r.delete("elric:workers")
    page.wait_for_selector("#count-queued")
    # the session ended (expired, or the password changed): the login, not frozen figures
    cookies = page.context.cookies()
    page.context.clear_cookies()
    page.wait_for_url(re.compile(r"/login\?next=/$"))
    page.context.add_cookies(cookies)
    page.goto(f"http://127.0.0.1:{port}/")
    # the master went away: the figures are marked as old
    master.stop()
    page.wait_for_selector("#stale")
    banner = page.locator("#stale").inner_text()
    assert "cannot be reached" in banner
    # it showed this browser's clock (04:05:06, or 2001) where every other time is Redis's
    with redis.Redis.from_url(redis_url) as r:
        year = datetime.fromtimestamp(r.time()[0]).year
    assert re.search(rf"as of\s+{year}-\d\d-\d\d \d\d:\d\d:\d\d ", banner), banner
    assert page.locator("#count-queued").count() == 1   # the last figures stay, marked


def test_a_schedule_pause_or_resume_that_changes_nothing_says_why(make_cluster, browser):
    """The schedules page counted the pause of a paused job (or the resume of one not
    paused) as done, where the CLI says "already paused" / "was not paused"."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    client = cluster.client
    client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1)))
    page = browser.new_page()
    page.clock.install()   # no refresh: the page as a second tab, or operator, left it
    page.goto(f"http://127.0.0.1:{port}/login?next=/schedules")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(re.compile(r"/schedules"))

    def click(action: str) -> None:
        page.locator("tr", has_text="tick").locator("button", has_text=action).click()

    assert client.pause_job("tick") is True     # paused elsewhere meanwhile
    click("pause")
    page.wait_for_selector("text=pause: 0 of 1 done; tick: already paused")
    assert client.resume_job("tick") is True    # and resumed elsewhere
    click("resume")
    page.wait_for_selector("text=resume: 0 of 1 done; tick: was not paused")
    click("pause")                              # one that changes it is done
    page.wait_for_selector("text=pause: 1 of 1 done")
    assert client.get_job("tick")["paused"] is True


def test_metrics_without_the_right_token_is_a_401_that_says_what_to_send(make_cluster):
    """A scraper without the token, or with a wrong one, got a 303 to the login page:
    Prometheus followed it and reported an HTML parse error, not that it was refused."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    base = f"http://127.0.0.1:{port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic OnB3"}):
        request = urllib.request.Request(base + "/metrics", headers=headers)
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)   # (urllib follows a 303)
        assert refused.value.code == 401, (headers, refused.value.code)
        assert refused.value.headers["WWW-Authenticate"].startswith("Bearer"), headers
        body = refused.value.read().decode()
        assert body.count("\n") == 1 and "Authorization: Bearer" in body, body
    status, text = get(base + "/metrics", Authorization=f"Bearer {PASSWORD}")
    assert status == 200 and "elric_jobs" in text
    # a page, not a scraper: still the login
    assert 'name="password"' in get(base + "/jobs")[1]


def test_a_job_page_shows_text_arguments_as_written_not_as_escapes(make_cluster, browser):
    """The arguments of a crawl of a Japanese or German site showed as "\\u65e5\\u672c":
    the page's JSON escaped every character outside ASCII."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    text = "https://例え.jp/日本語?q=Müller €😀"
    cluster.client.submit_job({"func": "tests.jobs:Echo", "job_id": "intl", "queue": "nobody",
                               "args": [text], "kwargs": {"ü": '<b>"x"</b>'}})
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/jobs/intl")
    shown = page.locator("pre").first.inner_text()
    assert text in shown and '"ü": "<b>\\"x\\"</b>"' in shown, shown   # and no markup


def test_a_bulk_delete_or_cancel_asks_first_as_the_one_job_buttons_do(make_cluster, browser):
    """A job's own delete and cancel buttons ask "Delete this job?", but the bulk ones under
    the list acted at once: a slip from "retry" to "delete" lost every ticked failed job,
    tracebacks and all."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    for i in range(3):
        cluster.client.submit_job({"func": "tests.jobs:Add", "args": [i, 1], "job_id": f"j{i}",
                                   "queue": "nobody"})
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/login?next=/jobs%3Fstatus%3Dqueued")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_selector("tr.job[data-id=j2]")
    asked, yes = [], []
    page.on("dialog", lambda d: (asked.append(d.message), d.accept() if yes else d.dismiss()))
    page.get_by_role("button", name="select all on this page").click()
    for n, action in enumerate(("delete", "cancel"), 1):
        page.locator(f"#bulk button[value={action}]").click()
        wait_for(lambda: len(asked) == n, what=f"the {action} button asks first")
    assert all("3 jobs" in question for question in asked), asked   # says how many
    assert [cluster.client.get_job(f"j{i}")["status"] for i in range(3)] == ["queued"] * 3
    yes.append(True)   # a yes does it
    page.locator("#bulk button[value=delete]").click()
    page.wait_for_selector("text=delete: 3 of 3 done")


def a_failed_nightly_run(make_cluster, **settings):
    """A master with its dashboard, a worker, and periodic job "nightly" fired once: its run
    failed ("disk full <sda>"). Returns the cluster, the dashboard's port, the run's id."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", **settings)
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Fail.spec(["disk full <sda>"], job_id="nightly",
                                        trigger=every(hours=24)))
    fire = cluster.client.run_job("nightly")["fire_id"]
    cluster.wait_job(fire)
    return cluster, port, fire


def test_a_schedules_failed_run_links_to_its_job_and_traceback(make_cluster, browser):
    """The schedules page showed a fire's outcome ("failed") with its job id only in a
    tooltip: an operator could not get from "last night's run failed" to why without
    copying the id out by hand."""
    cluster, port, fire = a_failed_nightly_run(make_cluster)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/schedules")
    link = page.locator("tr", has_text="nightly").get_by_role("link", name="failed")
    wait_for(lambda: link.count() == 1, what="the failed run shown as a link")
    link.click()
    page.wait_for_selector("pre.bad")
    assert "ValueError: disk full <sda>" in page.locator("pre.bad").inner_text()
    assert fire in page.locator("h1").inner_text()


def test_the_job_list_of_status_scheduled_is_the_schedules_page(make_cluster):
    """Picking "scheduled" in the job list's status filter showed the periodic jobs as rows
    with a blank status and queue: they are listed where their triggers and runs show."""
    cluster, port = dashboard_with_a_job(make_cluster)
    cluster.client.submit_job(Fail.spec(["x"], job_id="nightly", trigger=every(hours=24)))
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs?status=scheduled") as page:
        html = page.read().decode()
        assert page.url.endswith("/schedules"), page.url
    assert "<h1>Schedules</h1>" in html and "<td>interval[1 day, 0:00:00]</td>" in html, html


def test_the_job_list_of_status_filtered_is_the_dedupe_counts(make_cluster):
    """/jobs?status=filtered said "No job matches" with "any status" picked: a filtered
    submission is no job, only a count per dedupe scope, shown on the statistics page."""
    cluster, port = dashboard_with_a_job(make_cluster)
    c = cluster.client
    c.submit_jobs([Echo.spec(job_id="a", dedupe_key="k", dedupe_scope="pages", queue="none")])
    assert c.submit_job(Echo.spec(job_id="b", dedupe_key="k", dedupe_scope="pages",
                                  queue="none"))["status"] == "filtered"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/jobs?status=filtered") as page:
        html = page.read().decode()
        assert page.url.endswith("/stats#filters"), page.url
    assert '<h2 id="filters">Dedupe filters' in html and "<td>pages</td>" in html, html
    assert "not stored as a job" in html


def test_a_schedule_links_to_its_own_page(make_cluster):
    """The schedules page named each periodic job without a link: its own page (arguments,
    every run kept) could be reached only by typing its id."""
    cluster, port = dashboard_with_a_job(make_cluster)
    cluster.client.submit_job(Fail.spec(["x"], job_id="night&day", trigger=every(hours=24)))
    html = get(f"http://127.0.0.1:{port}/schedules")[1]
    assert '<a href="/jobs/night%26day">night&amp;day</a>' in html, html


def test_a_periodic_jobs_page_shows_its_runs_and_the_schedules_actions(make_cluster,
                                                                       browser):
    """A periodic job's own page showed its runs as raw Python maps, an empty "Result"
    heading, and the buttons of a one-off job (delete) but not pause, resume or run now."""
    cluster, port, fire = a_failed_nightly_run(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/login?next=/jobs/nightly")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_selector("h1:has-text('nightly')")
    text = page.locator("main").inner_text()
    assert "{'" not in text and "Result" not in text, text
    assert page.get_by_role("link", name=fire).count() == 1, text
    assert [b.inner_text() for b in page.locator("main form.inline button").all()] == [
        "pause", "run now", "remove"]
    page.get_by_role("button", name="pause").click()   # steered from here, back here
    page.wait_for_selector("main form.inline button:has-text('resume')")
    assert cluster.client.get_job("nightly")["paused"] is True
    page.get_by_role("link", name=fire).click()   # the run's own page: why it failed
    page.wait_for_selector("pre.bad")
    assert "ValueError: disk full <sda>" in page.locator("pre.bad").inner_text()


def test_the_failed_list_shows_the_exception_not_a_traceback_s_last_line(make_cluster,
                                                                         browser):
    """The list showed an error's last line: of a message of many lines its tail alone
    ("unexpected '<' at line 3", no exception), and of an async job failing in a TaskGroup
    the group's closing frame, "+------------------------------------"."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Fail.spec(["could not parse page:\nunexpected '<' at line 3"],
                                        job_id="parse"))
    cluster.client.submit_job({"func": "tests.jobs_async:AsyncGroupFail", "args": ["gone"],
                               "job_id": "group"})
    for job_id in ("parse", "group"):
        assert cluster.wait_job(job_id)["status"] == "failed"
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/jobs?status=failed")
    error = {job_id: page.locator(f"tr.job[data-id={job_id}] td.bad").last.inner_text()
             for job_id in ("parse", "group")}
    assert error["parse"] == "ValueError: could not parse page: unexpected '<' at line 3", error
    assert error["group"].startswith("ExceptionGroup: unhandled errors in a TaskGroup") and \
        error["group"].endswith(": ValueError: gone"), error


def test_another_site_cannot_log_an_operator_out(make_cluster):
    """/logout took any POST: a page on another site could end the operator's session (its
    form's answer deletes the cookie), over and over, as every action checks the Origin."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    base = f"http://127.0.0.1:{port}"
    jar = urllib.request.HTTPCookieProcessor()
    opener = urllib.request.build_opener(jar)
    opener.open(base + "/login", data=urllib.parse.urlencode({"password": PASSWORD}).encode())
    with pytest.raises(urllib.error.HTTPError) as refused:
        opener.open(urllib.request.Request(base + "/logout", data=b"",
                                           headers={"Origin": "http://evil.example"}))
    assert refused.value.code == 403 and b"evil.example" in refused.value.read()
    assert [c.name for c in jar.cookiejar] == ["elric_session"]   # still logged in
    assert opener.open(base + "/jobs").geturl() == base + "/jobs"   # (not the login)
    # its own page's button logs out
    opener.open(urllib.request.Request(base + "/logout", data=b"", headers={"Origin": base}))
    assert list(jar.cookiejar) == []


def test_a_link_from_another_site_opens_the_page_for_an_operator_logged_in(make_cluster,
                                                                           browser):
    """The session cookie was SameSite=Strict: a link to a job from an alert, a chat or a
    ticket (another site) came without it, and asked an operator logged in for the password
    again. Every action needs its CSRF token (and its own site's Origin), so Lax is safe."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    base = f"http://127.0.0.1:{port}"
    page = browser.new_page()
    page.goto(base + "/login")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(base + "/")
    page.goto(f"http://localhost:{port}/login")   # another site: localhost is not 127.0.0.1
    page.evaluate(f"document.body.insertAdjacentHTML('beforeend', "
                  f"'<a id=out href=\"{base}/jobs/j1\">j1</a>')")
    page.click("#out")
    page.wait_for_url(re.compile(r".*/(jobs/j1|login\?.*)$"))
    assert page.url == base + "/jobs/j1", page.url


def test_a_failed_login_keeps_its_message_and_where_it_was_going(make_cluster, browser):
    """The login page refreshed itself every 2 s as the live pages do: after a wrong
    password (a POST to /login) it fetched /login, which wiped "wrong password" and the page
    asked for (the next login went to the overview), once the focus left the box."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    base = f"http://127.0.0.1:{port}"
    page = browser.new_page()
    page.clock.install()   # the page's timers run when the test says
    page.goto(base + "/jobs/j1")
    page.fill("input[name=password]", "wrong")
    page.press("input[name=password]", "Enter")
    page.wait_for_selector("text=wrong password")
    page.locator("h1").click()   # reading the message: the focus leaves the box
    page.clock.run_for(5000)     # two refreshes' time
    page.wait_for_load_state("networkidle")
    assert page.locator("text=wrong password").count() == 1
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_url(base + "/jobs/j1")


def test_a_page_read_while_redis_hangs_does_not_say_something_may_have_changed(
        make_cluster, redis_server):
    """A page read while Redis did not answer said "it may have been changed: send it
    again", the words for a call that changes something and lost its reply: an operator
    who had only looked at the overview was told to wonder what had changed."""
    import signal

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    base = f"http://127.0.0.1:{port}"
    assert get(base + "/")[0] == 200
    redis_server.proc.send_signal(signal.SIGSTOP)   # alive, but answering nothing
    try:
        # (/workers reads Redis outside an RPC handler: its words were the dashboard's own)
        said = {path: get(base + path) for path in ("/", "/jobs", "/jobs/j1", "/workers")}
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    for path, (status, html) in said.items():
        message = unescape(re.search(r'<div class="warn">(.*?)</div>', html, re.S).group(1))
        assert status == 503 and "cannot reach Redis" in message, (path, message)
        assert "changed" not in message and message.endswith("try again"), (path, message)


def test_an_action_while_redis_hangs_comes_back_with_why_it_was_not_done(make_cluster,
                                                                         redis_server):
    """An action's reason for each id it could not do is its note, on the page it came
    from; while Redis does not answer that is why (it was an error page at /act, whose
    refresh, a GET of /act, is no page at all)."""
    import signal

    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    op = Operator(port)
    redis_server.proc.send_signal(signal.SIGSTOP)   # alive, but answering nothing
    try:
        with pytest.raises(urllib.error.HTTPError) as failed:   # the list cannot load either
            op.act(kind="job", action="delete", id="j1", next="/jobs")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    html = unescape(failed.value.read().decode())
    assert failed.value.url.startswith(op.base + "/jobs?sig="), failed.value.url
    assert "delete: 0 of 1 done; j1: master cannot reach Redis" in html, html
    assert cluster.client.get_job("j1")["status"] == "queued"


def test_metrics_take_the_bearer_scheme_in_any_case(make_cluster):
    """HTTP's auth scheme is case-insensitive (RFC 7235): "bearer PASSWORD", as some
    clients and hand-written curl commands send it, was refused as a wrong token."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    for scheme in ("bearer", "BEARER", "Bearer"):
        status, text = get(f"http://127.0.0.1:{port}/metrics",
                           Authorization=f"{scheme} {PASSWORD}")
        assert status == 200 and "elric_jobs" in text, (scheme, status, text)


def test_an_action_refused_behind_a_proxy_that_rewrites_host_says_what_to_set(make_cluster):
    """nginx passes Host on as the upstream's (127.0.0.1:7532) unless told otherwise: every
    button behind it was refused "from another site (https://elric.example.com)", the
    operator's own site, with nothing saying why or what to change."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    op = Operator(port)
    with pytest.raises(urllib.error.HTTPError) as refused:
        op.act(kind="job", action="delete", id="j1", headers={
            "Origin": "https://elric.example.com", "Host": f"127.0.0.1:{port}"})
    said = refused.value.read().decode()
    assert refused.value.code == 403 and "https://elric.example.com" in said, said
    assert f"127.0.0.1:{port}" in said and "proxy_set_header Host $host" in said, said


def test_the_redis_page_while_redis_runs_a_long_script_is_unavailable_not_a_bug(make_cluster):
    """The /redis page reads INFO itself, outside the RPC handlers. Redis busy with a long
    script (or loading, or a replica cut off) answered it with a refusal that the page took
    for a bug: a 500 and a traceback in the master's log at every refresh of a live page."""
    from tests.test_transient_errors import redis_running_a_long_script

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    master = cluster.start_master()
    with redis_running_a_long_script(cluster.redis_url):
        status, html = get(f"http://127.0.0.1:{port}/redis")
    assert status == 503 and "Redis is busy running a script" in html, html
    assert "dashboard: /redis failed" not in master.log(), master.log()
    assert get(f"http://127.0.0.1:{port}/redis")[0] == 200


def test_a_page_while_redis_loads_its_data_says_so_not_cannot_reach_redis(tmp_path,
                                                                          monkeypatch):
    """redis-py raises LOADING as a ConnectionError: a page reading Redis itself (/workers,
    /redis) said "master cannot reach Redis right now" of a Redis that answered it."""
    import threading

    import redis

    from elric.redis_server import RedisServer, find_redis_server
    from tests.conftest import Cluster

    server = RedisServer().start()
    port = free_port()
    cluster = Cluster(server.url, tmp_path, DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    r = redis.Redis.from_url(server.url)
    try:
        cluster.start_master()
        with r.pipeline(transaction=False) as pipe:   # 32 MiB Redis cannot compress
            for i in range(512):
                pipe.set(f"filler:{i}", os.urandom(64 * 1024))
            pipe.execute()
        r.save()
        # restarted to load them 10 ms a key (5 s), answering (LOADING) between each 2 MiB
        slow = tmp_path / "slow-loading-redis-server"
        slow.write_text(f'#!/bin/sh\nexec {find_redis_server()} "$@" --key-load-delay 10000\n')
        slow.chmod(0o755)
        monkeypatch.setenv("ELRIC_REDIS_SERVER", str(slow))
        server.stop()
        restart = threading.Thread(target=server.start, kwargs={"timeout": 60})
        restart.start()
        try:
            status, html = wait_for(lambda: (lambda page: page if "loading" in page[1] else None)(
                get(f"http://127.0.0.1:{port}/workers")), what="the page while Redis loads")
        finally:   # the rest at full speed (7: 6.2 refuses it while loading)
            with socket.create_connection(("127.0.0.1", server.port), timeout=30) as conn:
                conn.sendall(b"CONFIG SET key-load-delay 0\r\n")
                conn.recv(64)
            restart.join(60)
        assert status == 503 and "Redis is loading its data" in html, html
        assert "cannot reach Redis" not in html, html
        assert get(f"http://127.0.0.1:{port}/workers")[0] == 200
    finally:
        r.close()
        cluster.close()
        server.cleanup()



def test_a_password_cannot_be_guessed_at_full_speed(make_cluster):
    """The login took a guess as fast as a client could send them: a few failures from one
    address now make it wait (a 429 that says for how long, whatever the password), and
    another address is not held up."""
    import http.client

    from elric.dashboard.access import LOGIN_TRIES

    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)

    def login(source: str, password: str) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10,
                                                source_address=(source, 0))
        connection.request("POST", "/login", urllib.parse.urlencode(
            {"password": password, "next": "/jobs/j1"}),
            {"Content-Type": "application/x-www-form-urlencoded"})
        return connection.getresponse()

    for _ in range(LOGIN_TRIES):
        assert login("127.0.0.1", "guess").status == 401
    for password in ("guess", PASSWORD):
        refused = login("127.0.0.1", password)
        html = refused.read().decode()
        assert refused.status == 429 and int(refused.headers["Retry-After"]) > 0, html
        assert "too many failed logins" in html and 'name="password"' in html, html
    other = login("127.0.0.2", PASSWORD)   # another client
    assert other.status == 303 and other.headers["Location"] == "/jobs/j1"


def test_an_action_after_the_session_ended_is_the_login_that_leads_back(make_cluster):
    """A button pressed after the session expired got a bare "log in first" text page,
    with no way back but typing the address: it is the login page, which then goes back to
    the page the button was on. The action is not done."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    base = f"http://127.0.0.1:{port}"
    expired = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    data = urllib.parse.urlencode({"kind": "job", "action": "delete", "id": "j1",
                                   "csrf": "0" * 64, "next": "/jobs?status=queued"}).encode()
    with pytest.raises(urllib.error.HTTPError) as refused:
        expired.open(base + "/act", data=data)
    html = refused.value.read().decode()
    assert refused.value.code == 401 and "log in" in html, html
    back = unescape(re.search(r'name="next" value="([^"]*)"', html).group(1))
    assert back == "/jobs?status=queued"
    assert cluster.client.get_job("j1")["status"] == "queued"
    login = urllib.parse.urlencode({"password": PASSWORD, "next": back}).encode()
    assert expired.open(base + "/login", data=login).geturl() == base + back


def test_an_action_checks_its_targets_kind_without_reading_results_or_runs(make_cluster,
                                                                            browser,
                                                                            redis_url):
    """Before acting, an action read each target whole (get_job) to tell a one-off job from
    a periodic one: a job's result (megabytes make the click slow), a periodic job's spec
    and runs with their rounds. It reads the fields it checks, and nothing more."""
    import threading

    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}", DASHBOARD_PASSWORD=PASSWORD)
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job(Echo.spec(["x" * 900_000], job_id="big"))
    assert cluster.wait_job("big")["status"] == "succeeded"
    cluster.client.submit_job(Echo.spec(job_id="tick", queue="nobody", trigger=every(hours=1)))
    page = browser.new_page()
    page.clock.install()   # no refresh: only the action reads
    page.goto(f"http://127.0.0.1:{port}/login?next=/jobs%3Fstatus%3Dsucceeded")
    page.fill("input[name=password]", PASSWORD)
    page.press("input[name=password]", "Enter")
    page.wait_for_selector("tr.job[data-id=big]")
    marks = redis.Redis.from_url(redis_url)

    def through(route):   # the action's own reads lie between two marks, the page after
        marks.echo("act-start")
        response = route.fetch(max_redirects=0)
        marks.echo("act-done")
        route.fulfill(response=response)
    page.route("**/act", through)

    def read_by(click) -> list[str]:
        """What the dashboard asked Redis itself (not its scripts) while it acted."""
        seen, ready = [], threading.Event()

        def watch():
            with redis.Redis.from_url(redis_url).monitor() as m:
                ready.set()
                for command in m.listen():
                    seen.append(command)
                    if command["command"] == "ECHO act-done":
                        return
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        assert ready.wait(10)
        click()
        watcher.join(30)
        assert not watcher.is_alive(), seen
        start = [c["command"] for c in seen].index("ECHO act-start")
        return [c["command"] for c in seen[start:] if c["client_type"] != "lua"]

    reads = read_by(lambda: page.locator("tr.job[data-id=big] button.retry").click())
    page.wait_for_selector("text=retry: 1 of 1 done")
    assert not [c for c in reads if c.startswith("HGETALL elric:job:big") or
                c.startswith(("HGET ", "HMGET ")) and " result" in c], reads
    page.goto(f"http://127.0.0.1:{port}/schedules")
    page.wait_for_selector("tr:has-text('tick')")
    reads = read_by(lambda: page.locator("tr", has_text="tick").locator(
        "button", has_text="pause").click())
    page.wait_for_selector("text=pause: 1 of 1 done")
    # the pause reads the schedule once, to change it; its runs are read by no one
    assert reads.count("HGETALL elric:schedule:tick") == 1 and not [
        c for c in reads if c.startswith("LRANGE")], reads
    assert cluster.client.get_job("tick")["paused"] is True


def dashboard_failed_twice(make_cluster):
    """A master with its dashboard on a free port, after tests.test_cli's failed_twice."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    failed_twice(cluster)
    return cluster, port


def test_jobs_failed_now_and_failed_ends_of_all_time_are_told_apart(make_cluster):
    """The overview's failed card (jobs failed now) and its queue table's failed (every
    failed end since the start) showed 1 and 2 under the same word, as `elric top` did."""
    _, port = dashboard_failed_twice(make_cluster)
    overview, stats = (get(f"http://127.0.0.1:{port}{path}")[1] for path in ("/", "/stats"))
    assert "<h2>Jobs now</h2>" in overview and re.search(
        r'id="count-failed"><span class="muted">failed</span><b>1<', overview), overview
    for html in (overview, stats):
        assert '<th class="n">failed (all time)</th>' in html, html
        assert '<td class="n">0</td><td class="n">2</td>' in html, html   # succeeded, failed


def test_a_workers_failed_column_says_it_counts_attempts(make_cluster):
    """The workers page's failed (4: a job retried once, run again) sat beside 1 job
    failed, and its note called them jobs."""
    cluster, port = dashboard_failed_twice(make_cluster)
    wait_for(lambda: cluster.client.stats()["workers"][0]["failed"] == 4, what="a heartbeat")
    html = get(f"http://127.0.0.1:{port}/workers")[1]
    assert '<th class="n">failed attempts</th>' in html and 'failed">4</td>' in html, html


def test_durations_on_the_statistics_page_are_in_units_that_fit_them(make_cluster, browser):
    """A func whose jobs ran a second and a half showed a mean of "1503.2 ms" and a p95 of
    "≤ 2000 ms" (a five-minute job: "≤ 300000 ms"): every duration was in milliseconds."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    cluster.client.submit_job({"func": "tests.jobs:Sleep", "args": [1.5], "job_id": "slow"})
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "job_id": "quick"})
    for job_id in ("slow", "quick"):
        cluster.wait_job(job_id)
    page = browser.new_page()
    page.goto(f"http://127.0.0.1:{port}/stats")

    def cells(func: str) -> tuple[str, str]:   # its mean and p95
        row = page.locator("tr", has=page.locator(f"a:text-is('{func}')")).first
        return tuple(row.locator("td").nth(n).inner_text() for n in (7, 8))

    mean, p95 = cells("tests.jobs:Sleep")
    assert re.fullmatch(r"1\.\d s", mean) and p95 == "≤ 2.0 s", (mean, p95)
    mean, p95 = cells("tests.jobs:Add")   # under a second: still in ms
    assert re.fullmatch(r"\d+\.\d ms", mean) and re.fullmatch(r"≤ \d+\.0 ms", p95), (mean, p95)


def test_a_list_of_exactly_a_page_has_no_next_link_to_an_empty_page(make_cluster):
    """A list of 50 jobs (a page) offered "next", to a page saying "No job matches."."""
    from elric.dashboard import PAGE

    cluster, port = dashboard_with_a_job(make_cluster)   # j1, and PAGE - 1 more
    cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 2], "queue": "nobody"}
                                for _ in range(PAGE - 1)])
    html = get(f"http://127.0.0.1:{port}/jobs?status=queued")[1]
    assert html.count('class="job"') == PAGE and ">next<" not in html, html
    cluster.client.submit_job({"func": "tests.jobs:Add", "args": [1, 2], "queue": "nobody"})
    html = get(f"http://127.0.0.1:{port}/jobs?status=queued")[1]
    assert html.count('class="job"') == PAGE and ">next<" in html, html


def test_a_deep_page_of_a_long_list_reads_one_page_of_jobs_not_every_job_before_it(
        make_cluster, browser, redis_url):
    """The jobs list read every job before its offset: the last page of 10,000 queued jobs
    read all 10,000 (seconds, again at each 2 s refresh), and past list_jobs' 100,000 jobs
    looked at a page of a million was empty, its jobs out of reach."""
    import redis

    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    for n in range(0, 10_000, 1000):
        cluster.client.submit_jobs([{"func": "tests.jobs:Add", "args": [1, 2], "queue": "deep",
                                     "job_id": f"d{i:05}"} for i in range(n, n + 1000)])
    page = browser.new_page()
    page.clock.install()   # no refresh while Redis's calls are counted
    with redis.Redis.from_url(redis_url) as r:
        for path in ("/jobs?status=queued&queue=deep&offset=9900", "/jobs?offset=9900"):
            page.goto(f"http://127.0.0.1:{port}{path}")
            r.config_resetstat()
            page.get_by_role("link", name="next").click()   # the last page
            page.wait_for_url(re.compile("offset=9950"))
            ids = [row.get_attribute("data-id") for row in page.locator("tr.job").all()]
            # the last in line last: the first 50 sent
            assert ids == [f"d{i:05}" for i in range(49, -1, -1)], (path, ids)
            read = r.info("commandstats").get("cmdstat_hmget", {}).get("calls", 0)
            assert read <= 1000, (path, read)   # a few hundred summaries, not 10,000


def test_metrics_label_no_series_with_a_fires_id(make_cluster):
    """A periodic job with dedupe_scope "@fire" has a scope per fire, named by the fire's
    id: each was a new series of elric_dedupe_keys, _hits_total and _fill_ratio, so a job
    fired every minute made 1,440 a day, without end. Their keys are summed in one."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    client = cluster.client
    client.submit_job(Echo.spec(job_id="tick", trigger=every(hours=1), queue="nobody",
                                dedupe_key="K", dedupe_scope="@fire", max_instances=2))
    client.submit_job(Echo.spec(job_id="once", dedupe_key="K", queue="nobody"))
    fires = {client.run_job("tick", 5)["fire_id"] for _ in range(2)}
    assert len(fires) == 2 and all(client.get_job(f) for f in fires), fires
    text = get(f"http://127.0.0.1:{port}/metrics")[1]
    scopes = set(re.findall(r'scope="([^"]*)"', text))
    assert not any("tick@" in scope for scope in scopes), scopes
    assert re.search(r'^elric_dedupe_keys\{scope="@fire"\} 2\.0$', text, re.M), text
    assert re.search(r'^elric_dedupe_keys\{scope="global"\} 1\.0$', text, re.M), text


def test_a_page_shows_only_a_note_the_dashboards_action_wrote(make_cluster):
    """Any ?note= in a link was shown as the page's notice: a link from anyone could make
    the dashboard say "your session has ended: log in at ...". An action's own note shows."""
    cluster, port = dashboard_with_a_job(make_cluster, DASHBOARD_PASSWORD=PASSWORD)
    op = Operator(port)
    with op.act(kind="job", action="delete", id="j1", next="/jobs") as answer:
        url, html = answer.url, unescape(answer.read().decode())
    assert '<div class="note">delete: 1 of 1 done</div>' in html, html
    forged = "/jobs?" + urllib.parse.urlencode({"note": "session ended: log in at evil.example"})
    mine = url.removeprefix(op.base)
    assert "1+of+1" in mine, mine
    for path in (forged, mine.replace("1+of+1", "0+of+1")):
        page = op.read(path)
        assert 'class="note"' not in page, (path, page)


def test_a_stopped_workers_load_is_not_exported_as_if_it_ran():
    """A worker that stopped (its process gone) is "alive" in stats (heard from lately):
    /metrics went on exporting its last memory, CPU and pool size, so a sum over workers
    counted processes that had exited."""
    from elric.dashboard.metrics import render

    totals = dict.fromkeys(("submitted", "succeeded", "failed", "retrying", "redelivered",
                            "handed_back", "cancelled", "started", "start_latency_ms"), 0)
    load = {"alive": True, "cpu_percent": 1.0, "rss_bytes": 100, "in_flight": 0,
            "concurrency": 2, "trouble": ""}
    stats = {"by_status": {}, "by_queue": {}, "totals": totals, "filters": {}, "funcs": {},
             "scheduler": dict.fromkeys(("fired", "missed", "skipped", "filtered",
                                         "lateness_ms"), 0),
             "workers": [{**load, "worker_id": "on", "state": "running"},
                         {**load, "worker_id": "off", "state": "stopped"}]}
    text = render(stats).decode()
    assert 'elric_worker_rss_bytes{worker="on"} 100.0' in text
    assert 'worker="off"' not in text, text
    assert 'elric_workers{state="stopped"} 1.0' in text



def test_an_error_line_with_no_space_wraps_in_the_job_list_not_past_its_width(make_cluster,
                                                                               browser):
    """An error whose last line has no space (a long URL, a blob) drew the list's error
    column wider than the window: the list scrolled sideways, and every row's retry button
    sat past the right edge."""
    port = free_port()
    cluster = make_cluster(DASHBOARD_ADDRESS=f"127.0.0.1:{port}")
    cluster.start_master()
    cluster.start_worker("--concurrency", "1")
    url = "https://example.com/" + "a" * 280
    cluster.client.submit_job({"func": "tests.jobs:Fail", "args": [url], "job_id": "long"})
    assert cluster.wait_job("long")["status"] == "failed"
    page = browser.new_page(viewport={"width": 1280, "height": 800})
    page.goto(f"http://127.0.0.1:{port}/jobs?status=failed")
    assert page.get_by_text("ValueError: https://example.com/").is_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= 1280
