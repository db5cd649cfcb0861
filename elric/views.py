"""What the ``elric`` command shows people: tables and short summaries, drawn with rich.
Scripts use ``--json``, which prints the RPC replies as they are."""

from __future__ import annotations

import json
import math
import sys
import time
from datetime import datetime

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from elric.clock import ticks


class _Console(Console):
    def on_broken_pipe(self) -> None:
        # rich's own exits 1 (`elric jobs | head` read as a failure under pipefail); the
        # command's main takes a reader gone as an ending that did what was asked
        self.quiet = True
        raise BrokenPipeError


# a pipe or a file gets whole lines, not a table cut to 80 columns
console = _Console(highlight=False, width=None if sys.stdout.isatty() else 400)


def json_safe(value):
    """``value`` as JSON can hold it: keys as text (a job's maps may mix int and bytes
    keys), and infinity or NaN as text (a p95 past the last bucket is "inf")."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k if isinstance(k, str) else str(k): json_safe(v) for k, v in value.items()}
    return [json_safe(v) for v in value] if isinstance(value, (list, tuple)) else value


def json_text(value, **options) -> str:
    """JSON for people and scripts; bytes print as their repr."""
    return json.dumps(json_safe(value), default=str, **options)


def shown(value) -> str:
    """JSON for people: text as written ("\\u65e5" tells nobody anything)."""
    return json_text(value, ensure_ascii=False)


# control characters but newline and tab (C0, DEL, C1), as JSON writes them
_CONTROLS = {c: f"\\u{c:04x}" for c in (*range(0x20), *range(0x7f, 0xa0)) if c not in (9, 10)}


def printable(text: str) -> str:
    """``text`` with its control characters shown, not sent: a job's error may quote what
    the job read, and a terminal obeys escape sequences (clear the screen, hide text)."""
    return text.translate(_CONTROLS)


def cut(text: str, most: int) -> str:
    """``text`` in at most ``most`` characters, ending "…" where it was cut."""
    return text if len(text) <= most else text[:most - 1] + "…"


# Redis's clock as use_clock was told it (None: not told), and ticks() then: it runs on by
# a clock no NTP step moves
_told_now: float | None = None
_told_at = 0.0


def use_clock(now: float) -> None:
    """Judge every "ago" from here on by ``now``, Redis's clock as a reply answered it, run
    on as time passes: this machine's clock may be hours off."""
    global _told_now, _told_at
    _told_now, _told_at = now, ticks()


def when(seconds: float | None, now: float | None = None) -> str:
    """An epoch time as local time, its zone named, with how long ago or ahead of ``now``
    (default: Redis's, as use_clock was told it); no number (an edited hash) as it is."""
    if not seconds or not isinstance(seconds, (int, float)):
        return str(seconds or "-")
    if not now:
        now = time.time() if _told_now is None else _told_now + ticks() - _told_at
    delta = seconds - now
    ago = f"in {_span(delta)}" if delta > 0 else f"{_span(-delta)} ago"
    return f"{stamp(seconds)} ({ago})"


def stamp(seconds: float) -> str:
    """An epoch time as local time, its zone named."""
    return f"{datetime.fromtimestamp(seconds).astimezone():%Y-%m-%d %H:%M:%S %Z}"


def _span(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.1f} s"


def duration(ms: float) -> str:
    """Milliseconds in a unit that fits: "12.5 ms", "1.5 s", "5 min" (not "300000 ms")."""
    return f"{ms:.1f} ms" if ms < 1000 else _span(ms / 1000)


def mib(n) -> str:
    """Bytes as MiB; "-" when not measured (a worker on a system without /proc)."""
    return f"{n / 2**20:.1f}" if isinstance(n, (int, float)) else "-"


def percent(x) -> str:
    return f"{x:.1f}" if isinstance(x, (int, float)) else "-"


def _table(columns: tuple[str, ...], rows=(), header: bool = True) -> Table:
    table = Table(*columns, box=None, header_style="bold", pad_edge=False, show_header=header)
    for row in rows:
        table.add_row(*(c if isinstance(c, Text) else Text(printable(str(c)))   # no markup
                        for c in row))
    return table


def _rows(rows: list, nothing: str, columns: tuple[str, ...], cells, header: bool = True) -> None:
    """A table of ``cells(row)`` for each row, or ``nothing`` (if not "") when there are none."""
    if rows:
        console.print(_table(columns, map(cells, rows), header))
    elif nothing:
        console.print(nothing)


def worker_state(w: dict) -> str:
    """running, paused, stopping (its running jobs finish) or stopped; lost: silent past its
    lease (stats' alive), its jobs redelivered, without stopping."""
    return w.get("state", "running") if w.get("alive") or w.get("state") == "stopped" \
        else "lost"


def worker_counts(workers: list[dict]) -> dict[str, int]:
    """Workers alive (running or paused), lost and stopped (on purpose: not lost)."""
    states = [worker_state(w) for w in workers]
    lost, stopped = states.count("lost"), states.count("stopped")
    return {"alive": len(states) - lost - stopped, "lost": lost, "stopped": stopped}


def _master(h: dict) -> None:
    console.print(f"master {h.get('master_id', '')}: "
                  + ("ok" if h.get("ok") else "[red]NOT OK[/red]"))


def jobs(rows: list[dict]) -> None:
    """A succeeded job's row shows no error: an earlier attempt's made it look failed."""
    _rows(rows, "no jobs", ("job id", "status", "func", "args", "queue", "attempts",
                            "finished", "error"),
          lambda j: (j["job_id"], j.get("status", ""), j.get("func", ""),
                     cut(shown(j.get("args", []))[1:-1], 80), j.get("queue", ""),
                     j.get("attempts", ""), when(j.get("finished_at")),
                     cut(j.get("error") or "", 60) if j.get("status") != "succeeded" else ""))


def results(rows: list[dict], first: bool) -> None:
    """One page of ``elric results``; only the first has a header (or says there are none)."""
    _rows(rows, "no results" if first else "", ("job id", "func", "finished", "result"),
          lambda r: (r["job_id"], r["func"], when(r["finished_at"]),
                     cut(shown(r["result"]), 200)), header=first)


def filtered(filters: dict) -> None:
    console.print("filtered submissions are not stored as jobs; their counts per dedupe scope:")
    _rows([{"scope": scope, **f} for scope, f in sorted(filters.items())], "no dedupe scopes",
          ("scope", "filtered", "keys", "backend"),
          lambda f: (f["scope"], f.get("filtered", 0), f.get("items", ""), f.get("backend", "")))


def attempts(j: dict, now: float | None = None) -> str:
    """A job's attempts, and in how many its worker was lost (else attempts 2 with
    max_retries 0 looks like a bug)."""
    n = j.get("attempts", 0)
    if not j.get("redelivered"):
        return str(n)
    lost = f"worker {j['lost_worker']}" if j.get("lost_worker") else "its worker"
    return f"{n} ({j['redelivered']} redelivered: {lost} lost at " \
        f"{when(j.get('redelivered_at'), now)})"


def job(j: dict) -> None:
    pairs = [(key, attempts(j) if key == "attempts" else j[key])
             for key in ("job_id", "status", "func", "queue", "priority", "attempts",
                         "max_retries", "worker", "batch", "parent", "round", "not_run",
                         "unreadable")
             if j.get(key) not in (None, "")]
    pairs += [(key, when(j[key])) for key in ("enqueued_at", "started_at", "finished_at")
              if j.get(key)]
    pairs += [(key, cut(shown(j[key]), 2000)) for key in ("args", "kwargs", "result")
              if j.get(key) not in (None, [], {})]
    if j.get("trigger_text"):
        pairs += [("trigger", j["trigger_text"]), ("next run", when(j.get("next_run_time")))]
        pairs += [("paused", "yes")] if j.get("paused") else []
    console.print(_table(("", ""), pairs, header=False))   # pairs: job_id at least
    if j.get("error"):
        console.print("[bold]error[/bold]")
        console.print(printable(j["error"]), markup=False)
    for run in j.get("runs", [])[:10]:   # the newest ten; why one was skipped or missed
        why = f" ({run['reason']})" if run.get("reason") else ""
        # its fire's outcome says nothing of the jobs it submitted: a round's own progress
        p = run.get("round") or {}
        progress = f"  round: {p['live']} live, {p['succeeded']} succeeded, " \
            f"{p['failed']} failed" if p.get("submitted") else ""
        console.print(f"  {when(run.get('fire_time'))}  {run.get('outcome', '')}{why}"
                      f"  {run.get('job_id', '')}{progress}", markup=False)


def schedules(rows: list[dict]) -> None:
    _rows(rows, "no periodic jobs", ("job id", "func", "trigger", "next run", "paused"),
          lambda s: (s["job_id"], s.get("func", ""), s.get("trigger_text", ""),
                     when(s.get("next_run_time")), "yes" if s.get("paused") else ""))


def trouble(w: dict) -> Text:
    """What a worker's work is stuck on (it retries), in red; "" when nothing."""
    return Text(printable(str(w.get("trouble") or "")), style="bold red")


def workers(rows: list[dict], now: float | None = None) -> None:
    """Each worker with its load as of its last heartbeat; ``now``: Redis's (stats())."""
    _rows(rows, "no workers", ("worker", "host", "pid", "queues", "processes", "CPU %",
                               "RSS MiB", "in flight", "done", "failed attempts", "last seen",
                               "state", "trouble"),
          lambda w: (w.get("worker_id", ""), w.get("host", ""), w.get("pid", ""),
                     w.get("queues", ""), w.get("concurrency", ""),
                     percent(w.get("cpu_percent")), mib(w.get("rss_bytes")),
                     w.get("in_flight", "-"), w.get("done", "-"), w.get("failed", "-"),
                     when(w.get("last_seen"), now), worker_state(w), trouble(w)))


def status(stats: dict, health: dict) -> None:
    _master(health)
    for name, task in sorted(health.get("tasks", {}).items()):
        console.print(f"  {name}: {task.get('state', '')}", markup=False)
    console.print(_table(("status", "jobs"), sorted(stats.get("by_status", {}).items())))
    # counts since the start (retrying: retried attempts), and the mean of the latency sum
    # (fetch.lua adds each first start's wait to start_latency_ms and counts it in started)
    t = stats.get("totals", {})
    totals = {("retried" if k == "retrying" else k): v for k, v in t.items()
              if k != "start_latency_ms"}
    mean = t["start_latency_ms"] / t["started"] if t.get("started") else None
    console.print("totals (all time): " + ", ".join(f"{k} {v}" for k, v in totals.items())
                  + "; mean start latency " + ("-" if mean is None else duration(mean)))
    console.print("workers: " + ", ".join(
        f"{n} {state}" for state, n in worker_counts(stats.get("workers", [])).items()))
    troubled = [w["worker_id"] for w in stats.get("workers", []) if w.get("trouble")]
    if troubled:
        console.print(Text("workers in trouble (elric workers says what): "
                           + ", ".join(troubled), style="bold red"))


def health(h: dict) -> None:
    _master(h)
    console.print(_table(("task", "ok", "state", "last progress"), [
        (name, "yes" if task.get("ok") else "NO", task.get("state", ""),
         when(task.get("progress_at"), h.get("now")))
        for name, task in sorted(h.get("tasks", {}).items())]))


def top(stats: dict) -> Group:
    """``elric top``'s screen: jobs now, the last minute, queues, busiest funcs, workers."""
    by = stats["by_status"]
    # jobs in each status now; the queue and func tables count ends since the start
    now = Text("now: " + "  ".join(f"{s} {by.get(s, 0)}" for s in (
        "queued", "running", "retrying", "succeeded", "failed", "cancelled", "scheduled")))
    minute = (stats.get("throughput") or [{}, {}])[-2]   # the last whole minute
    rate = Text(f"last minute: {minute.get('succeeded', 0)} succeeded, "
                f"{minute.get('failed', 0)} failed, {minute.get('retried', 0)} retried")
    ended = ("succeeded (all time)", "failed (all time)")
    queues = _table(("queue", "waiting", *ended), [
        (name, q["queued"], q["succeeded"], q["failed"])
        for name, q in sorted(stats["by_queue"].items())])
    busiest = sorted(stats.get("funcs", {}).items(),
                     key=lambda kv: (kv[1]["live"], kv[1]["last_at"] or 0), reverse=True)
    funcs = _table(("func", "waiting", "running", *ended, "mean ms", "p95 ms"), [
        (name, f["waiting"], f["running"], f["succeeded"], f["failed"],
         "-" if f["mean_ms"] is None else f"{f['mean_ms']:.1f}",
         "-" if f["p95_ms"] is None else f"≤ {f['p95_ms']}") for name, f in busiest[:10]])
    # (stats() holds the latest funcs only, and counts the rest)
    if more := max(0, len(busiest) - 10) + stats.get("more", {}).get("funcs", 0):
        funcs = Group(funcs, Text(f"and {more} more funcs"))
    # in stats()'s order, those at work first: a screen too short cuts the gone ones
    workers = _table(("worker", "state", "processes", "CPU %", "in flight", "done",
                      "failed attempts", "last seen", "trouble"), [
        (w["worker_id"], worker_state(w), w.get("concurrency", ""), percent(w.get("cpu_percent")),
         w.get("in_flight", "-"), w.get("done", "-"), w.get("failed", "-"),
         when(w.get("last_seen"), stats.get("now")), trouble(w)) for w in stats["workers"]])
    return Group(now, rate, queues, funcs, workers)
