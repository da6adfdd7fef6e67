"""Run a headless locust load test against a node this script starts and stops.

    python loadtest/run.py --config config.toml --users 50 --duration 60 [--tags trivial]
                           [--user ZmqUser|HttpUser] [--kill-every 2]

Steps: start `srw serve` on the config, wait until every pool is full, run
locust headless (CSV and HTML reports under loadtest/reports/), stop the
node, print a summary.  Exits non-zero if any request failed, or, with
--kill-every S (SIGKILL a random busy-or-idle worker every S seconds), if a
request failed for any reason other than its worker being killed, if more
requests failed than the killed workers could hold (kills x [pool] credits),
or if the pool is not back at full size at the end.
"""
from __future__ import annotations

import argparse
import csv
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from broker.client import BrokerUnavailable, Client  # noqa: E402
from srw import config as cfg  # noqa: E402

REPORTS = HERE / "reports"


def start_node(config: cfg.Config, log_path: Path) -> subprocess.Popen:
    """`srw serve` with its output (every exec at log level info) in `log_path`."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config",
                                 str(config.path)], stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + 60
    for node in config.nodes:
        with Client(node.broker) as client:
            while True:
                try:
                    if client.status(timeout=0.5)["workers"] >= config.pool.workers:
                        break
                except BrokerUnavailable:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"srw serve did not become ready; see {log_path}")
                time.sleep(0.1)
    return proc


def stop_node(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            if " ".join(child.cmdline()).startswith("srw: worker "):
                out.append(child)
        except psutil.Error:
            pass
    return out


class Killer(threading.Thread):
    """SIGKILLs a random worker every `every` seconds until stopped; counts kills."""

    def __init__(self, node: subprocess.Popen, every: float):
        super().__init__(daemon=True)
        self.node, self.every = node, every
        self.kills = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            workers = workers_of(self.node)
            if workers:
                try:
                    random.choice(workers).kill()
                    self.kills += 1
                except psutil.Error:
                    pass


def run_locust(args, config: cfg.Config, prefix: Path) -> int:
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
           "--stop-timeout", "15", args.user]
    if args.tags:
        cmd += ["--tags", *args.tags.split(",")]
    if args.user == "HttpUser":
        cmd += ["--host", f"http://{config.proxy.listen}"]
    env = {"SRW_CONFIG": str(config.path), **dict(__import__("os").environ)}
    return subprocess.run(cmd, env=env, timeout=args.duration + 120).returncode


def failures(prefix: Path) -> dict[str, int]:
    path = Path(f"{prefix}_failures.csv")
    if not path.exists():
        return {}
    counts: dict[str, int] = {}
    with path.open() as f:
        for row in csv.DictReader(f):  # one row per (request name, error)
            counts[row["Error"]] = counts.get(row["Error"], 0) + int(row["Occurrences"])
    return counts


def summary(prefix: Path) -> list[dict]:
    with Path(f"{prefix}_stats.csv").open() as f:
        return list(csv.DictReader(f))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="config.toml")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--spawn-rate", type=int, default=50)
    ap.add_argument("--duration", type=int, default=60, help="seconds")
    ap.add_argument("--tags", default="", help="comma-separated scenarios (default: the mix)")
    ap.add_argument("--user", default="ZmqUser", choices=["ZmqUser", "HttpUser"])
    ap.add_argument("--kill-every", type=float, default=0.0,
                    help="SIGKILL a random worker every S seconds (0: never)")
    ap.add_argument("--name", default="", help="report file prefix (default: from options)")
    args = ap.parse_args()
    config = cfg.load(args.config)
    REPORTS.mkdir(exist_ok=True)
    name = args.name or f"{args.user}-{args.tags or 'mix'}{'-kill' if args.kill_every else ''}"
    prefix = REPORTS / name
    node = start_node(config, Path(f"{prefix}-node.log"))
    killer = Killer(node, args.kill_every) if args.kill_every else None
    try:
        if killer:
            killer.start()
        code = run_locust(args, config, prefix)
        if killer:
            killer.stopped.set()
            killer.join()
        full = wait_full(node, config)
    finally:
        stop_node(node)
    return report(prefix, code, killer, full, config)


def wait_full(node: subprocess.Popen, config: cfg.Config) -> bool:
    """Every broker counts a full pool and exactly that many worker processes run."""
    deadline = time.monotonic() + 20
    want = config.pool.workers
    seen = None
    while time.monotonic() < deadline:
        seen = [pool_size(n.broker) for n in config.nodes], len(workers_of(node))
        if seen == ([want] * len(config.nodes), want * len(config.nodes)):
            return True
        time.sleep(0.2)
    print(f"pool not full: brokers count {seen[0]} workers, {seen[1]} processes run")
    return False


def pool_size(endpoint: str) -> int:
    with Client(endpoint) as client:
        try:
            return client.status(timeout=1.0)["workers"]
        except BrokerUnavailable:
            return -1


def report(prefix: Path, code: int, killer: Killer | None, full: bool,
           config: cfg.Config) -> int:
    print(f"\nreports: {prefix}_stats.csv, {prefix}.html, node log {prefix}-node.log")
    print(f"{'name':24} {'requests':>9} {'fails':>6} {'req/s':>8} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'p99 ms':>7}")
    for row in summary(prefix):
        print(f"{row['Name']:24} {row['Request Count']:>9} {row['Failure Count']:>6} "
              f"{float(row['Requests/s']):8.0f} {row['50%']:>7} {row['95%']:>7} {row['99%']:>7}")
    fails = failures(prefix)
    total = sum(fails.values())
    for error, count in fails.items():
        print(f"  failure x{count}: {error[:150]}")
    print(f"pool at full size ({config.pool.workers} workers) at the end: {full}")
    if killer is None:
        return 0 if code == 0 and total == 0 else 1
    killed = sum(c for e, c in fails.items() if "killed" in e)
    held = killer.kills * config.pool.credits  # at most what the killed workers held
    print(f"workers killed: {killer.kills}; requests failed: {total} "
          f"(status killed: {killed}, other: {total - killed}; the killed workers held at "
          f"most {held})")
    ok = total == killed and killed <= held and full
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
