"""What a node's broker counts for `srw status`, the status page and /metrics.

No sockets here: the broker calls `ExecStats.record` once per answered
request and reads the rest only when a client asks for status.  Recording
is a few dict operations (0.18 us measured, against 0.01 us for the
latency deque it replaces), next to the broker's ~18 us of CPU per
request; everything costlier (worker memory, percentiles) is computed per
status request.

Labels are bounded: at most MAX_SCRIPTS script names (then OTHER) and
MAX_CAUSES restart causes (then "other"), because every distinct label is a
time series in Prometheus and clients choose script names.
"""
from __future__ import annotations

import bisect
import collections
import os
import time

import psutil

OK = "ok"
CONTENT = "<content>"    # an exec of script content with no name
OTHER = "<other>"        # every script past the first MAX_SCRIPTS names
MAX_SCRIPTS = 1000
MAX_CAUSES = 32
LATENCY_WINDOW = 2000    # the node's p50/p99 cover at most this many last ok replies
# Upper bounds of the per-script latency buckets (us); the last bucket is +Inf.
BUCKETS_US = (250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000, 100_000, 250_000,
              500_000, 1_000_000, 2_500_000, 5_000_000, 10_000_000)
MEMORY_TTL = 5.0         # seconds a worker's measured memory is reused (WorkerMemory)
# Pool reasons (runtime/pool.py) whose short cause is not their first words.
CAUSE_PREFIXES = (("request ran past its deadline", "timeout"),
                  ("request used more than", "cpu limit"))
# A worker retired by a reload or a resize has no successor; a later worker that
# happens to take its slot is no restart.
NOT_RESTARTS = frozenset({"retired"})


class ScriptStats:
    """One script's executions by status, and its ok replies' latency buckets."""
    __slots__ = ("statuses", "buckets", "sum_us")

    def __init__(self):
        self.statuses: dict[str, int] = {}
        self.buckets = [0] * (len(BUCKETS_US) + 1)  # not cumulative; the last is +Inf
        self.sum_us = 0

    def as_dict(self) -> dict:
        return {"statuses": dict(self.statuses), "buckets": list(self.buckets),
                "sum_us": self.sum_us}


class ExecStats:
    """Executions by script and status, latency per script, and the node's
    latency window.  Only ok replies are timed: a timeout's latency is the
    deadline, and an error's says nothing about the script's speed."""

    def __init__(self, max_scripts: int = MAX_SCRIPTS, window: int = LATENCY_WINDOW):
        self.scripts: dict[str, ScriptStats] = {}
        self.max_scripts = max_scripts
        self.ok_latencies: collections.deque[int] = collections.deque(maxlen=window)
        self.restart_causes: dict[str, int] = {}
        self.warm = {"found": 0, "missed": 0}  # execs that found a warm runner, or not

    def found_warm(self, hit: bool) -> None:
        self.warm["found" if hit else "missed"] += 1

    def record(self, name: str, status: str, latency_us: int) -> None:
        stats = self.scripts.get(name or CONTENT)
        if stats is None:
            stats = self._add(name or CONTENT)
        statuses = stats.statuses
        statuses[status] = statuses.get(status, 0) + 1
        if status == OK:
            stats.buckets[bisect.bisect_left(BUCKETS_US, latency_us)] += 1
            stats.sum_us += latency_us
            self.ok_latencies.append(latency_us)

    def _add(self, name: str) -> ScriptStats:
        if len(self.scripts) >= self.max_scripts:
            name = OTHER
        return self.scripts.setdefault(name, ScriptStats())

    def restarted(self, reason: str) -> None:
        """A worker was replaced; `reason` is its replacement's READY reason."""
        cause = restart_cause(reason)
        if cause in NOT_RESTARTS:
            return
        if cause not in self.restart_causes and len(self.restart_causes) >= MAX_CAUSES:
            cause = "other"
        self.restart_causes[cause] = self.restart_causes.get(cause, 0) + 1

    def snapshot(self) -> dict:
        """The status fields these counters give (see docs/DESIGN.md)."""
        window = sorted(self.ok_latencies)
        totals: dict[str, int] = {}
        for stats in self.scripts.values():
            for status, n in stats.statuses.items():
                totals[status] = totals.get(status, 0) + n
        return {"latency_us": {"p50": percentile(window, 0.5), "p99": percentile(window, 0.99)},
                "latency_window": {"ok_replies": len(window),
                                   "limit": self.ok_latencies.maxlen},
                "statuses": totals,
                "restart_causes": dict(self.restart_causes),
                "warm_execs": dict(self.warm),
                "latency_buckets_us": list(BUCKETS_US),
                "scripts": {name: s.as_dict() for name, s in self.scripts.items()}}


def percentile(ordered: list[int], q: float) -> int:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0


def restart_cause(reason: str) -> str:
    """A short, bounded label for why a worker went away: "killed by SIGKILL",
    "exited with status 1", "timeout", "recycled"; the reason's words before
    any detail otherwise."""
    for prefix, cause in CAUSE_PREFIXES:
        if reason.startswith(prefix):
            return cause
    for stop in ":;(":
        reason = reason.partition(stop)[0]
    return reason.strip()[:40] or "unknown"


def bucket_quantile(buckets: list[int], bounds: list[int], q: float) -> int | None:
    """The q-quantile (us) of a script's ok latencies, from its buckets, with
    linear interpolation inside the bucket (as Prometheus' histogram_quantile).
    In the +Inf bucket it is the last finite bound; None with no ok reply."""
    total = sum(buckets)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(buckets):
        if count and seen + count >= rank:
            if i == len(bounds):
                return bounds[-1]
            low = bounds[i - 1] if i else 0
            return int(low + (bounds[i] - low) * (rank - seen) / count)
        seen += count
    return bounds[-1]


def uptime_text(seconds: float) -> str:
    """3723.5 -> "1h 02m 03s"; days in front when there are some."""
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    return (f"{d}d " if d else "") + f"{h}h {m:02d}m {s:02d}s"


class WorkerMemory:
    """Private memory (USS) of each worker and of its sandbox (its zygote and
    runners), measured at most every MEMORY_TTL seconds, and again when a worker
    is new.  The kernel walks a process's page tables to answer (smaps_rollup):
    ~0.4 ms per process measured, so 8 workers with their zygotes and runners
    stall the broker's loop ~10 ms; at most once per MEMORY_TTL, whoever asks."""

    def __init__(self):
        self.measured_at = -MEMORY_TTL
        self.figures: dict[int, tuple[int | None, int | None]] = {}

    def of(self, pids: list[int]) -> dict[int, tuple[int | None, int | None]]:
        now = time.monotonic()
        if now - self.measured_at >= MEMORY_TTL or set(pids) - set(self.figures):
            self.figures = measure(pids)
            self.measured_at = now
        return self.figures


def worker_rows(workers, jobs: dict, memory: WorkerMemory) -> list[dict]:
    """A row per worker for the status (`jobs`: the broker's, by job id)."""
    workers = sorted(workers, key=lambda w: w.slot)
    measured = memory.of([w.pid for w in workers])
    rows = []
    for w in workers:
        state = ("gone" if w.gone_at else "draining" if w.draining
                 else "busy" if w.jobs else "idle")
        running = jobs.get(next(iter(w.jobs), b""))  # it runs its jobs in order
        uss, sandbox_uss = measured.get(w.pid, (None, None))
        rows.append({"pid": w.pid, "slot": w.slot, "state": state, "served": w.replied,
                     "held": len(w.jobs),
                     "script": (running.meta.name or CONTENT) if running else "",
                     "uss": uss, "sandbox_uss": sandbox_uss, "warm_runners": w.warm})
    return rows


def measure(pids: list[int]) -> dict[int, tuple[int | None, int | None]]:
    """pid -> (its USS, the USS of all its descendants), in bytes; None where
    a process could not be read (gone, or not ours)."""
    out = {}
    for pid in pids:
        below = descendants(pid)
        known = [n for n in map(uss, below) if n is not None]
        out[pid] = (uss(pid), sum(known) if known or not below else None)
    return out


def descendants(pid: int) -> list[int]:
    """From the kernel's children lists: a few small reads, where a walk of all
    of /proc (psutil's children()) costs ~4 ms on a quiet machine."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children", "rb") as f:
                    found = [int(child) for child in f.read().split()]
            except OSError:
                continue
            out += found
            todo += found
    return out


def uss(pid: int) -> int | None:
    try:
        return psutil.Process(pid).memory_full_info().uss
    except psutil.Error:
        return None
