"""How long the test harness takes to start and to stop one node.

    .venv/bin/python bench/node_start.py [--runs 5] [--workers 2]

Each run builds a one-node cluster with tests/conftest.py's Cluster (free
loopback ports, a copy of the history dir), times `serve()` (until the node
reports all its workers) and `stop()` (SIGTERM, wait, SIGKILL what is left),
and prints the median and the spread.  Machines vary 2x from day to day: compare
two commits run back to back, never against a figure from another day.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import Cluster  # noqa: E402  (the harness the tests use)


def one_run(workers: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), [{"name": "n1"}], {"workers": workers}, {}, {}, None)
        began = time.monotonic()
        try:
            cluster.serve()
            started = time.monotonic()
        finally:
            stopping = time.monotonic()
            cluster.stop()
            stopped = time.monotonic()
    return started - began, stopped - stopping


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    starts, stops = [], []
    for _ in range(args.runs):
        start, stop = one_run(args.workers)
        starts.append(start)
        stops.append(stop)
    for name, samples in (("start", starts), ("stop", stops)):
        print(f"{name}: median {statistics.median(samples):.3f} s "
              f"(min {min(samples):.3f}, max {max(samples):.3f}, {args.runs} runs)")


if __name__ == "__main__":
    main()
