"""Helpers every bench uses: loopback ports, percentiles, bounded waits."""
from __future__ import annotations

import shutil
import socket
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(samples: list[float], q: float) -> float:
    """The q-quantile (0..1) of the samples, nearest rank."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} not ready within {timeout:.0f} s")
        time.sleep(0.05)


def write_config(root: Path, workers: int, log_level: str) -> Path:
    """One node's config in `root` (a copy of the shipped history, free ports)."""
    shutil.copytree(REPO / "history", root / "history")
    path = root / "config.toml"
    path.write_text(f"""
[pool]
workers = {workers}
max_requests = 0   # no recycling mid-run: the CPU columns sum the live processes

[proxy]
listen = "127.0.0.1:{free_port()}"

[[node]]
name = "n1"
group = 1
storage = "tcp://127.0.0.1:{free_port()}"
broker = "tcp://127.0.0.1:{free_port()}"
data_dir = "var/n1"

[log]
level = "{log_level}"
file = "{root / 'srw.log'}"
""")
    return path
