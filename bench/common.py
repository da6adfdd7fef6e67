"""Helpers every bench uses: loopback ports, percentiles, bounded waits, CPU and
context switches of processes from /proc."""
from __future__ import annotations

import os
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


def task_totals(pids: list[int]) -> tuple[float, int]:
    """(CPU seconds, context switches) of every thread of these processes."""
    cpu, switches = 0.0, 0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = open(f"/proc/{pid}/task/{tid}/stat").read().rsplit(")", 1)[1].split()
                status = open(f"/proc/{pid}/task/{tid}/status").read()
            except OSError:
                continue
            cpu += (int(stat[11]) + int(stat[12])) / tick
            switches += sum(int(line.split()[1]) for line in status.splitlines()
                            if "ctxt_switches:" in line)
    return cpu, switches
