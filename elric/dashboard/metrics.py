"""Prometheus metrics, read from Redis at each scrape (the master's ``stats``), so every
master answers the same and a restart loses nothing."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                   HistogramMetricFamily, SummaryMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

from elric.jobstats import BOUNDS_MS

__all__ = ["CONTENT_TYPE", "render"]


class _Snapshot:
    """A collector over one ``stats()`` reply."""

    def __init__(self, stats: dict) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats
        jobs = GaugeMetricFamily("elric_jobs", "Jobs by status now", labels=["status"])
        for status, n in s["by_status"].items():
            jobs.add_metric([status], n)
        yield jobs
        depth = GaugeMetricFamily("elric_queue_depth", "Jobs waiting in a queue",
                                  labels=["queue"])
        outcomes = CounterMetricFamily("elric_queue_jobs", "Jobs of a queue by event",
                                       labels=["queue", "event"])
        for queue, row in s["by_queue"].items():
            depth.add_metric([queue], row["queued"])
            for event in ("submitted", "succeeded", "failed", "retrying"):
                outcomes.add_metric([queue, event], row.get(event, 0))
        yield depth
        yield outcomes
        totals = CounterMetricFamily("elric_job_events", "Job events since the start",
                                     labels=["event"])
        for event, n in s["totals"].items():
            if event not in ("started", "start_latency_ms"):   # the latency summary's
                totals.add_metric([event], n)
        yield totals
        workers = GaugeMetricFamily("elric_workers", "Workers by state", labels=["state"])
        alive = sum(1 for w in s["workers"] if w.get("alive"))
        workers.add_metric(["alive"], alive)
        workers.add_metric(["lost"], len(s["workers"]) - alive)
        yield workers
        yield GaugeMetricFamily("elric_jobs_in_flight", "Jobs running on workers now",
                                value=s["by_status"].get("running", 0))
        yield from _workers(s["workers"])
        checks = CounterMetricFamily("elric_dedupe_checks", "Dedupe checks per scope",
                                     labels=["scope"])
        hits = CounterMetricFamily("elric_dedupe_hits", "Submissions a dedupe filter dropped",
                                   labels=["scope"])
        fill = GaugeMetricFamily("elric_dedupe_fill_ratio", "Fill of a Bloom filter",
                                 labels=["scope"])
        for scope, f in s["filters"].items():
            checks.add_metric([scope], f.get("items", 0) + f.get("filtered", 0))
            hits.add_metric([scope], f.get("filtered", 0))
            if "fill_ratio" in f:
                fill.add_metric([scope], f["fill_ratio"])
        yield checks
        yield hits
        yield fill
        yield from _funcs(s["funcs"])
        totals = s["totals"]
        yield SummaryMetricFamily("elric_start_latency_seconds",
                                  "From queued to started, first attempts",
                                  count_value=totals["started"],
                                  sum_value=totals["start_latency_ms"] / 1000)
        fires = CounterMetricFamily("elric_fires", "Fires of periodic jobs by outcome",
                                    labels=["outcome"])
        for outcome in ("fired", "missed", "skipped"):
            fires.add_metric([outcome], s["scheduler"][outcome])
        yield fires
        yield SummaryMetricFamily("elric_fire_lateness_seconds",
                                  "From a fire's time to its job queued",
                                  count_value=s["scheduler"]["fired"],
                                  sum_value=s["scheduler"]["lateness_ms"] / 1000)


def _workers(workers: list[dict]):
    """Each live worker's load, as its last heartbeat recorded it."""
    load = {name: GaugeMetricFamily(f"elric_worker_{name}", doc, labels=["worker"])
            for name, doc in (("cpu_percent", "CPU % of a worker and its pool (100: a core)"),
                              ("rss_bytes", "Memory of a worker and its pool processes"),
                              ("in_flight", "Jobs a worker runs now"),
                              ("processes", "A worker's pool processes"))}
    for w in workers:
        if not w.get("alive"):
            continue
        values = {**w, "processes": w.get("concurrency")}
        for name, family in load.items():
            if isinstance(values.get(name), (int, float)):
                family.add_metric([w["worker_id"]], values[name])
    yield from load.values()


def _funcs(funcs: dict):
    done = CounterMetricFamily("elric_func_jobs", "Jobs of a func by outcome",
                               labels=["func", "outcome"])
    for func, row in funcs.items():
        for outcome in ("succeeded", "failed", "retried", "cancelled"):
            done.add_metric([func, outcome], row.get(outcome, 0))
    yield done
    durations = HistogramMetricFamily("elric_job_duration_seconds",
                                      "How long attempts of a func ran", labels=["func"])
    bounds = [str(b / 1000) for b in BOUNDS_MS] + ["+Inf"]
    for func, row in funcs.items():
        cumulative = [sum(row["histogram"][:i + 1]) for i in range(len(bounds))]
        durations.add_metric([func], list(zip(bounds, cumulative)), row["duration_ms"] / 1000)
    yield durations


def render(stats: dict) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(stats))
    return generate_latest(registry)
