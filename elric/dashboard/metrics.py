"""Prometheus metrics, read from Redis at each scrape (the master's ``stats``), so every
master answers the same and a restart loses nothing."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate

from prometheus_client import generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, SummaryMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

from elric.admission import PER_FIRE
from elric.contract import FIRE_ID
from elric.jobstats import BOUNDS_MS
from elric.views import worker_counts, worker_state

__all__ = ["CONTENT_TYPE", "render"]


def _family(kind, name: str, doc: str, labels: list[str], samples):
    """A metric family of ``kind`` with a sample per (label values, value) pair."""
    family = kind(name, doc, labels=labels)
    for values, value in samples:
        family.add_metric(values, value)
    return family


@dataclass
class _Snapshot:
    """A collector over one ``stats()`` reply."""

    stats: dict

    def collect(self):
        s = self.stats
        # filtered submissions are no jobs: their count is elric_dedupe_hits_total's
        yield _family(GaugeMetricFamily, "elric_jobs", "Jobs by status now", ["status"],
                      [([status], n) for status, n in s["by_status"].items()
                       if status != "filtered"])
        queues = s["by_queue"].items()
        yield _family(GaugeMetricFamily, "elric_queue_depth", "Jobs waiting in a queue",
                      ["queue"], [([queue], row["queued"]) for queue, row in queues])
        events = [([queue, event], row.get(event, 0)) for queue, row in queues
                  for event in ("submitted", "succeeded", "failed", "retrying")]
        yield _family(CounterMetricFamily, "elric_queue_jobs", "Jobs of a queue by event",
                      ["queue", "event"], events)
        events = [([event], n) for event, n in s["totals"].items()
                  if event not in ("started", "start_latency_ms")]   # the latency summary's
        yield _family(CounterMetricFamily, "elric_job_events", "Job events since the start",
                      ["event"], events)
        yield _family(GaugeMetricFamily, "elric_workers", "Workers by state", ["state"],
                      [([state], n) for state, n in worker_counts(s["workers"]).items()])
        yield GaugeMetricFamily("elric_jobs_in_flight", "Jobs running on workers now",
                                value=s["by_status"].get("running", 0))
        yield from _workers(s["workers"])
        # a "@fire" scope per fire, named by its id, would be a new series at every fire:
        # their keys are summed as "@fire"; their counts and fill are left out (a sum over
        # scopes that expire would go down)
        per_fire = [f for scope, f in s["filters"].items() if FIRE_ID.fullmatch(scope)]
        filters = [(scope, f) for scope, f in s["filters"].items()
                   if not FIRE_ID.fullmatch(scope)]
        # keys held now, a gauge: they go when they expire or a failed job gives its key back
        keys = [([scope], f.get("items", 0)) for scope, f in filters] + (
            [([PER_FIRE], sum(f.get("items", 0) for f in per_fire))] if per_fire else [])
        hits = [([scope], f.get("filtered", 0)) for scope, f in filters]
        fill = [([scope], f["fill_ratio"]) for scope, f in filters if "fill_ratio" in f]
        yield _family(GaugeMetricFamily, "elric_dedupe_keys", "Keys a dedupe scope holds now",
                      ["scope"], keys)
        yield _family(CounterMetricFamily, "elric_dedupe_hits",
                      "Submissions a dedupe filter dropped", ["scope"], hits)
        yield _family(GaugeMetricFamily, "elric_dedupe_fill_ratio", "Fill of a Bloom filter",
                      ["scope"], fill)
        yield from _funcs(s["funcs"])
        yield SummaryMetricFamily("elric_start_latency_seconds",
                                  "From queued to started, first attempts",
                                  count_value=s["totals"]["started"],
                                  sum_value=s["totals"]["start_latency_ms"] / 1000)
        fires = s["scheduler"]
        yield _family(CounterMetricFamily, "elric_fires", "Fires of periodic jobs by outcome",
                      ["outcome"], [([o], fires[o]) for o in ("fired", "missed", "skipped")])
        yield CounterMetricFamily("elric_fires_filtered", "Fires the dedupe filter dropped "
                                  "(of those fired)", value=fires["filtered"])
        yield SummaryMetricFamily("elric_fire_lateness_seconds",
                                  "From a fire's time to its job queued",
                                  count_value=fires["fired"], sum_value=fires["lateness_ms"] / 1000)


def _workers(workers: list[dict]):
    """Each live worker's load, and whether its work is stuck retrying (its ``trouble``), as
    its last heartbeat recorded them; a stopped one's is left out (its processes exited)."""
    load = {name: GaugeMetricFamily(f"elric_worker_{name}", doc, labels=["worker"])
            for name, doc in (("cpu_percent", "CPU % of a worker and its pool (100: a core)"),
                              ("rss_bytes", "Memory of a worker and its pool processes"),
                              ("in_flight", "Jobs a worker runs now"),
                              ("processes", "A worker's pool processes"),
                              ("trouble", "1: a worker's work is stuck retrying (a master "
                               "or Redis it cannot use); its trouble field says what"))}
    for w in workers:
        if worker_state(w) in ("lost", "stopped"):
            continue
        values = {**w, "processes": w.get("concurrency"), "trouble": int(bool(w.get("trouble")))}
        for name, family in load.items():
            if isinstance(values.get(name), (int, float)):
                family.add_metric([w["worker_id"]], values[name])
    yield from load.values()


def _funcs(funcs: dict):
    outcomes = [([func, outcome], row.get(outcome, 0)) for func, row in funcs.items()
                for outcome in ("succeeded", "failed", "retried", "cancelled")]
    yield _family(CounterMetricFamily, "elric_func_jobs", "Jobs of a func by outcome",
                  ["func", "outcome"], outcomes)
    durations = HistogramMetricFamily("elric_job_duration_seconds",
                                      "How long attempts of a func ran", labels=["func"])
    bounds = [str(b / 1000) for b in BOUNDS_MS] + ["+Inf"]
    for func, row in funcs.items():
        buckets = list(zip(bounds, accumulate(row["histogram"])))   # cumulative, as Prometheus's
        durations.add_metric([func], buckets, row["duration_ms"] / 1000)
    yield durations


def render(stats: dict) -> bytes:
    return generate_latest(_Snapshot(stats))   # a Collector: no registry to hold it
