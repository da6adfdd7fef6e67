"""Run a headless locust load test against a node this script starts and stops.

    python loadtest/run.py --config config.toml --users 50 --duration 60 [--tags trivial]
                           [--user ZmqUser|HttpUser] [--kill-every 2]

Steps: start `srw serve` on the config, wait until every pool is full, run
locust headless with a progress line every few seconds, stop the node, print
a summary from locust's final stats.  Each run gets its own folder,
loadtest/reports/<time>-<name>/: CSV and HTML reports, final.json and the
node's log.  Exits non-zero if any request failed, or, with
--kill-every S (SIGKILL a random busy-or-idle worker every S seconds), if a
request failed for any reason other than its worker being killed, if more
requests failed than the killed workers could hold (kills x [pool] credits),
or if the pool is not back at full size at the end.
"""
from __future__ import annotations

import argparse
import csv
import json
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
from core import config as cfg  # noqa: E402

REPORTS = HERE / "reports"
PROGRESS_EVERY = 5.0  # seconds between progress lines


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


def run_locust(args, config: cfg.Config, folder: Path) -> int:
    prefix = folder / "locust"
    cmd = [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
           "-u", str(args.users), "-r", str(args.spawn_rate), "-t", f"{args.duration}s",
           "--csv", str(prefix), "--html", f"{prefix}.html", "--only-summary",
           "--json-file", str(folder / "final"), "--stop-timeout", "15", args.user]
    if args.tags:
        cmd += ["--tags", *args.tags.split(",")]
    if args.user == "HttpUser":
        cmd += ["--host", f"http://{config.proxy.listen}"]
    env = {"SRW_CONFIG": str(config.path), "SRW_FAILURES_FILE": str(folder / "failures.json"),
           **dict(__import__("os").environ)}
    with (folder / "locust.out").open("wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        started = time.monotonic()
        deadline = started + args.duration + 120
        try:
            while proc.poll() is None:
                if time.monotonic() > deadline:
                    proc.kill()
                    raise SystemExit(f"locust did not finish; see {folder / 'locust.out'}")
                time.sleep(PROGRESS_EVERY)
                print(progress(prefix, time.monotonic() - started, args.duration), flush=True)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode


def progress(prefix: Path, elapsed: float, duration: int) -> str:
    """One line from the newest row of locust's stats history."""
    path = Path(f"{prefix}_stats_history.csv")
    rows = []
    if path.exists():
        with path.open() as f:
            rows = [r for r in csv.DictReader(f) if r.get("Name") == "Aggregated"]
    head = f"[{min(elapsed, duration):4.0f}/{duration} s]"
    if not rows or rows[-1]["Total Request Count"] == "0":
        return f"{head} starting users"
    r = rows[-1]
    return (f"{head} {r['User Count']} users, {r['Total Request Count']} requests, "
            f"{r['Total Failure Count']} failed, {float(r['Requests/s']):.0f} req/s now, "
            f"p50 {r['50%']} ms, p99 {r['99%']} ms")


def failures(folder: Path) -> dict[str, int]:
    """Final failure counts by reason (failures.json, from the locustfile): the last
    line of each error, which for a traceback is the exception itself."""
    path = folder / "failures.json"
    if not path.exists():
        return {}
    counts: dict[str, int] = {}
    for entry in json.loads(path.read_text()):  # one per (request name, error)
        lines = [line for line in str(entry["error"]).splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else "(no message)"
        counts[reason] = counts.get(reason, 0) + int(entry["occurrences"])
    return counts


def summary(folder: Path) -> list[dict]:
    """Per request name, from locust's final stats (final.json): count, failures,
    rate and percentiles."""
    rows = []
    for entry in json.loads((folder / "final.json").read_text()):
        times = sorted((float(ms), n) for ms, n in entry["response_times"].items())
        span = max(entry["last_request_timestamp"] - entry["start_time"], 1e-9)
        rows.append({"name": entry["name"], "requests": entry["num_requests"],
                     "fails": entry["num_failures"],
                     "rate": entry["num_requests"] / span,
                     **{f"p{q}": percentile(times, entry["num_requests"], q / 100)
                        for q in (50, 95, 99)}})
    return rows


def percentile(times: list[tuple[float, int]], count: int, q: float) -> float:
    """The q-quantile of a histogram (locust keeps response times rounded, in ms)."""
    seen = 0
    for ms, n in times:
        seen += n
        if seen >= q * count:
            return ms
    return times[-1][0] if times else 0.0


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
    name = args.name or f"{args.user}-{args.tags or 'mix'}{'-kill' if args.kill_every else ''}"
    folder = REPORTS / f"{time.strftime('%Y%m%d-%H%M%S')}-{name}"
    folder.mkdir(parents=True)
    print(f"srw load test {name}: {args.users} users for {args.duration} s; reports in "
          f"{folder}", flush=True)
    node = start_node(config, folder / "node.log")
    killer = Killer(node, args.kill_every) if args.kill_every else None
    try:
        if killer:
            killer.start()
        code = run_locust(args, config, folder)
        if killer:
            killer.stopped.set()
            killer.join()
        full = wait_full(node, config)
    finally:
        stop_node(node)
    return report(folder, code, killer, full, config)


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


def report(folder: Path, code: int, killer: Killer | None, full: bool,
           config: cfg.Config) -> int:
    print(f"\nreports in {folder}: locust.html, locust_stats.csv, final.json, node.log")
    print(f"{'name':24} {'requests':>9} {'fails':>6} {'req/s':>8} {'p50 ms':>7} "
          f"{'p95 ms':>7} {'p99 ms':>7}")
    for row in summary(folder):
        print(f"{row['name']:24} {row['requests']:>9} {row['fails']:>6} {row['rate']:8.0f} "
              f"{row['p50']:>7g} {row['p95']:>7g} {row['p99']:>7g}")
    fails = failures(folder)
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
