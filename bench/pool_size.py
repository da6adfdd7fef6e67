"""Pool-size sweep: throughput and p99 against [pool] workers, per scenario.

    python bench/pool_size.py [--workers 1,2,4,8] [--seconds 4] [--plot docs/pool-size.png]

For each pool size it starts a node, keeps 64 exec requests in flight on one
socket for a few seconds per scenario (trivial echo, ~5 ms of CPU), and
records requests/s and the p50/p99 latency seen by the client.  Prints a
table; with --plot writes a PNG (matplotlib).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exec_bench import IN_FLIGHT, Node, pct, write_config  # noqa: E402

from core import protocol as p  # noqa: E402

SCENARIOS = {"trivial": ("echo.py", b"x" * 100), "cpu 5ms": ("cpu_5ms.py", b"")}


def drive(endpoint: str, script: str, data: bytes, seconds: float) -> tuple[float, list[float]]:
    """64 in flight for `seconds`; returns (requests/s, latencies in us)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(endpoint)
    meta = p.ExecMeta(name=script, timeout=30.0)
    sent_at: dict[bytes, float] = {}
    latencies: list[float] = []
    counter = 0

    def send():
        nonlocal counter
        rid = counter.to_bytes(8, "little")
        counter += 1
        sent_at[rid] = time.perf_counter()
        p.send_frames(sock, p.request_frames(p.EXEC, rid, meta, data))

    try:
        for _ in range(IN_FLIGHT):
            send()
        start = time.perf_counter()
        end = start + seconds
        while sent_at:
            rid, result = p.parse_reply(p.recv_frames(sock))
            now = time.perf_counter()
            latencies.append((now - sent_at.pop(rid)) * 1e6)
            if result.status != "ok":
                raise SystemExit(f"request failed: {result.status} {result.error}")
            if now < end:
                send()
        elapsed = time.perf_counter() - start
    finally:
        ctx.destroy(linger=0)
    return len(latencies) / elapsed, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--seconds", type=float, default=4.0)
    ap.add_argument("--plot", default="", help="write a PNG here")
    args = ap.parse_args()
    sizes = [int(w) for w in args.workers.split(",")]
    rows = []
    print(f"pool-size sweep: {os.cpu_count()} CPUs, {IN_FLIGHT} in flight, "
          f"{args.seconds:g} s per point")
    print(f"{'workers':>7} {'scenario':10} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8}")
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="srw-pool-") as tmp:
            node = Node(write_config(Path(tmp), size), size)
            try:
                for name, (script, data) in SCENARIOS.items():
                    drive(node.endpoint, script, data, 0.5)  # warm-up
                    rate, lat = drive(node.endpoint, script, data, args.seconds)
                    rows.append((size, name, rate, pct(lat, 0.5) / 1000, pct(lat, 0.99) / 1000))
                    print(f"{size:>7} {name:10} {rate:9,.0f} {rows[-1][3]:8.2f} "
                          f"{rows[-1][4]:8.2f}", flush=True)
            finally:
                node.stop()
    if args.plot:
        plot(rows, sizes, Path(args.plot))


def plot(rows, sizes, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in SCENARIOS:
        mine = [r for r in rows if r[1] == name]
        axes[0].plot([r[0] for r in mine], [r[2] for r in mine], marker="o", label=name)
        axes[1].plot([r[0] for r in mine], [r[4] for r in mine], marker="o", label=name)
    for ax, label in zip(axes, ("requests/s (64 in flight)", "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("[pool] workers")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
        ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"srw pool size on {os.cpu_count()} CPUs")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"plot written to {path}")


if __name__ == "__main__":
    main()
