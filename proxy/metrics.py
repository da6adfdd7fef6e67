"""Prometheus metrics on the proxy: ``GET /metrics``, built per scrape.

    scrape -> Cluster.status() (every node's broker, in parallel) -> NodesCollector
           -> a fresh CollectorRegistry -> prometheus_client's text format

Nothing is kept between scrapes but the proxy's own request counts and
latencies (counted by the server's access logger, proxy/server.py: a counter
and a bucket per request, no object): the brokers count (broker/stats.py)
and each scrape turns their status into metric families, so a node's
counters live and reset with its broker (its ``srw_start_time_seconds``
tells when).  A node that does not answer is ``srw_node_up 0`` and
contributes nothing else.  Worker series are
keyed by slot, not pid, so a reload adds none (``srw_worker_info`` maps a
slot to its pid now); the proxy's own process figures come from
prometheus_client's process, platform and GC collectors.
"""
from __future__ import annotations

import bisect
import collections
import time
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import (GC_COLLECTOR, PLATFORM_COLLECTOR, PROCESS_COLLECTOR,
                               CollectorRegistry, generate_latest)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily)
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

NODE = ["node", "group"]
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
# The proxy's request latency buckets, seconds (an exec of a tiny script: ~1 ms).
HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                30.0, 60.0)


@dataclass
class RequestCounts:
    """What the proxy answered: (method, route, code) -> requests, and per
    (method, route) the latency buckets (the last +Inf) and their sum."""
    counts: collections.Counter = field(default_factory=collections.Counter)
    latency: dict = field(default_factory=dict)

    def add(self, method: str, path: str, code: int, seconds: float) -> None:
        self.counts[(method, path, code)] += 1
        timed = self.latency.get((method, path))
        if timed is None:
            timed = self.latency[(method, path)] = [[0] * (len(HTTP_BUCKETS) + 1), 0.0]
        timed[0][bisect.bisect_left(HTTP_BUCKETS, seconds)] += 1
        timed[1] += seconds

    def answered(self, request: web.BaseRequest, code: int, seconds: float) -> None:
        """Count a request the application answered (the server's access logger
        calls this for every response).  Labels stay bounded: a method outside
        METHODS and a path with no route count as "other" (any client can send
        any method and path).  A request that did not parse never reached the
        application and is not counted."""
        info = getattr(request, "_match_info", None)  # set when the app routed it
        if info is None:
            return
        resource = info.route.resource
        self.add(request.method if request.method in METHODS else "other",
                 resource.canonical if resource is not None else "other", code, seconds)


# Where the server (proxy/server.py) finds the application's counts.
COUNTS = web.AppKey("request_counts", RequestCounts)


class NodesCollector:
    """Metric families from one scrape's node statuses and the request counts."""

    def __init__(self, nodes: list[dict], requests: RequestCounts):
        self.nodes, self.requests = nodes, requests

    def collect(self):
        families = node_families()
        for node in self.nodes:
            add_node(families, node)
        yield from families.values()
        http = CounterMetricFamily("srw_proxy_http_requests", "HTTP requests the proxy "
                                   "answered, by method, route and code",
                                   labels=["method", "path", "code"])
        for (method, path, code), n in sorted(self.requests.counts.items()):
            http.add_metric([method, path, str(code)], n)
        yield http
        latency = HistogramMetricFamily("srw_proxy_http_request_duration_seconds", "from a "
                                        "request's headers to its response, by method and "
                                        "route", labels=["method", "path"])
        bounds = [f"{b:g}" for b in HTTP_BUCKETS] + ["+Inf"]
        for (method, path), (buckets, total) in sorted(self.requests.latency.items()):
            latency.add_metric([method, path], list(zip(bounds, _running(buckets))), total)
        yield latency


def _running(counts: list[int]) -> list[int]:
    out, total = [], 0
    for n in counts:
        total += n
        out.append(total)
    return out


def node_families() -> dict:
    g, c = GaugeMetricFamily, CounterMetricFamily
    return {
        "up": g("srw_node_up", "1 when the node's broker answered this scrape", labels=NODE),
        "info": g("srw_node_info", "the node's srw version", labels=NODE + ["version"]),
        "start": g("srw_start_time_seconds", "when the node's broker started (its counters "
                   "start there), seconds since the epoch", labels=NODE),
        "execs": c("srw_executions", "exec requests answered, by script and status "
                   "(<content>: script content with no name; <other>: past 1000 names)",
                   labels=NODE + ["script", "status"]),
        "latency": HistogramMetricFamily("srw_exec_latency_seconds", "time from the "
                                         "broker's receipt to its reply, ok replies only",
                                         labels=NODE + ["script"]),
        "queued": g("srw_queue_depth", "requests waiting for a worker or an id's lock",
                    labels=NODE),
        "workers": g("srw_workers", "live workers (neither gone nor draining)", labels=NODE),
        "busy": g("srw_workers_busy", "live workers holding requests", labels=NODE),
        "restarts": c("srw_worker_restarts", "workers replaced, by cause (recycled "
                      "included), as the broker learned from the replacements",
                      labels=NODE + ["cause"]),
        "warm": g("srw_warm_runners", "runners kept warm for their tenant (copy isolation)",
                  labels=NODE),
        "warm_execs": c("srw_warm_execs", "execs that found their tenant's runner warm "
                        "(found=yes) or took a fresh one (found=no)", labels=NODE + ["found"]),
        "uss": g("srw_worker_uss_bytes", "private memory of each worker (process=worker) "
                 "and of its zygote and runners (process=sandbox)",
                 labels=NODE + ["slot", "process"]),
        "worker": g("srw_worker_info", "the pid of each slot's worker now",
                    labels=NODE + ["slot", "pid"]),
    }


def add_node(families: dict, node: dict) -> None:
    labels = [node["name"], str(node["group"])]
    up = "error" not in node
    families["up"].add_metric(labels, 1 if up else 0)
    if not up:
        return
    families["info"].add_metric(labels + [node["version"]], 1)
    families["start"].add_metric(labels, round(time.time() - node["uptime"], 3))
    for key in ("queued", "workers", "busy"):
        families[key].add_metric(labels, node[key])
    families["warm"].add_metric(labels, node["warm_runners"])
    for found, key in (("yes", "found"), ("no", "missed")):
        families["warm_execs"].add_metric(labels + [found], node["warm_execs"][key])
    for cause, n in node["restart_causes"].items():
        families["restarts"].add_metric(labels + [cause], n)
    bounds = node["latency_buckets_us"]
    for script, stats in node["scripts"].items():
        for status, n in stats["statuses"].items():
            families["execs"].add_metric(labels + [script, status], n)
        families["latency"].add_metric(labels + [script], cumulative(stats["buckets"], bounds),
                                       stats["sum_us"] / 1e6)
    for row in node["worker_rows"]:
        if row["state"] == "gone":  # its slot's new worker has the series now
            continue
        families["worker"].add_metric(labels + [str(row["slot"]), str(row["pid"])], 1)
        for process, key in (("worker", "uss"), ("sandbox", "sandbox_uss")):
            if row[key] is not None:
                families["uss"].add_metric(labels + [str(row["slot"]), process], row[key])


def cumulative(buckets: list[int], bounds_us: list[int]) -> list[tuple[str, int]]:
    """Per-bucket counts (the last +Inf) as Prometheus' cumulative (le, count) pairs."""
    out, total = [], 0
    for bound, count in zip([*(f"{b / 1e6:g}" for b in bounds_us), "+Inf"], buckets):
        total += count
        out.append((bound, total))
    return out


def exposition(nodes: list[dict], requests: RequestCounts) -> web.Response:
    """The /metrics response for one scrape."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodesCollector(nodes, requests))
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):  # the proxy's own
        registry.register(collector)
    # The 0.0.4 text format: what every Prometheus version scrapes.
    return web.Response(body=generate_latest(registry),
                        headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4})
