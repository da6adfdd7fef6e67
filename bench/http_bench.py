"""HTTP exec next to its baselines, in one run, driven by wrk and by an aiohttp client.

Starts its own node and proxy (`srw serve` on a temporary config with free
loopback ports), a redis-server, and two baseline handlers served through the
same server machinery as the proxy (`proxy.server.run`, same logging, uvloop; with
--stock-baselines on asyncio's own loop, as stock aiohttp runs):

    bare HTTP        POST /bare  -> constant 79 B
    aiohttp+Redis    POST /redis -> redis.asyncio (hiredis) EVAL "return ARGV[1]" 0 <reply>,
                                    its 79 B answer as the body: what a user would write
                                    instead of a server-side script
    HTTP exec        POST /elliptics?exec&name=test_script.py -> the 2011 reply, 79 B
    ..., one id      the same with id=0123456789, the 2011 example's: execs for one id
                     run one at a time on its node (the per-id lock)

Each HTTP path is driven by two clients, 64 connections each:

    wrk      Debian's C load generator (2 threads, a Lua script for the POST and the
             percentiles): costs little CPU, so the servers' own cost shows
    aiohttp  one Python process, 64 requests in flight: ~220 us of CPU per request,
             more than the bare handler, so it caps that baseline

and the ZeroMQ paths by `AsyncClient` (64 in flight on one socket).  Per path:
req/s, p50/p99 latency and the CPU time per request of each process by role
(utime+stime from /proc/PID/stat before and after: the load generator, the proxy
or baseline handler, redis-server, the broker, the workers, and the runners
with their zygotes).  The paths take turns for --rounds rounds;
ratios are taken per round and the median round is shown.  Everything it
started is stopped at the end.

With --tree DIR (repeatable), the proxy of another checkout (e.g. a
`git worktree add --detach` of an older commit) runs beside this one, on the
same node, and its HTTP exec is a row of its own: old and new proxy measured
in the same run.

With --counts, also the context switches per request of each role (every
thread's, from /proc/PID/task/*/status) and, where `perf` runs, its system
calls per request (`perf stat -e raw_syscalls:sys_enter`, attached to the
role's processes for the measured seconds; the counting costs the processes a
little CPU, so the CPU columns of such a run read a little high).  The load
column is the bench's own process: the aiohttp client (under wrk, "-").

Usage: python bench/http_bench.py [--seconds 5] [--rounds 3] [--workers 2] [--tree DIR]
                                  [--clients wrk,aiohttp,zmq] [--counts]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import free_port, task_totals, wait_for, write_config  # noqa: E402

DATA = b"this is some data in POST request"
REPLY = b"its nothing I can do for you without cookies: this is some data in POST request"
IN_FLIGHT = 64
WRK_THREADS = 2
ROLES = ("load", "proxy", "bare", "redis handler", "redis-server", "broker", "worker",
         "runner")
TICK = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time in these

# The POST and a `done` hook printing what the bench reads (latencies in us).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = "%s"
wrk.headers["Content-Type"] = "application/octet-stream"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("SRW-BENCH %%d %%d %%d %%d %%d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.status + e.timeout))
end
""" % DATA.decode()


# The baseline handlers, each run by a child process of the bench ---------------------

def baseline_server(kind: str, listen: str, config_path: str, redis_port: str,
                    stock_loop: bool = False) -> int:
    """bare: a constant reply; redis: the reply from a Redis EVAL.  Both through
    proxy.server.run with the proxy's logging."""
    from aiohttp import web

    from proxy.server import run
    from core import config as cfg
    from core import logs
    logs.setup(cfg.load(config_path).log, kind, buffered=True)
    app = web.Application()

    async def constant(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/octet-stream")

    async def evaluate(request: web.Request) -> web.Response:
        data = await request.read()
        reply = await request.app[REDIS].eval("return ARGV[1]", 0, REPLY[:-len(DATA)] + data)
        return web.Response(body=reply, content_type="application/octet-stream")

    if kind == "bare":
        app.router.add_post("/bare", constant)
    else:
        import redis.asyncio
        REDIS = web.AppKey("redis", redis.asyncio.Redis)

        async def connect(app):
            app[REDIS] = redis.asyncio.Redis(host="127.0.0.1", port=int(redis_port))
            yield
            await app[REDIS].aclose()
        app.cleanup_ctx.append(connect)
        app.router.add_post("/redis", evaluate)
    return run(app, listen, title=f"srw: bench {kind} handler", stock_loop=stock_loop)


# Load ---------------------------------------------------------------------------

class Run:
    """One path's measured seconds: requests answered, latency percentiles (us),
    and the load generator's CPU seconds (None: read with the servers' CPU)."""

    def __init__(self, requests: int, seconds: float, p50: float, p99: float,
                 load_cpu: float | None = None):
        self.requests, self.seconds, self.p50, self.p99 = requests, seconds, p50, p99
        self.load_cpu = load_cpu


def wrk_path(url: str, seconds: float, script: Path, started) -> Run:
    """wrk for 1 s (warm-up), then for `seconds`; its CPU from its rusage."""
    wrk = shutil.which("wrk")
    base = [wrk, f"-t{WRK_THREADS}", f"-c{IN_FLIGHT}", "-s", str(script), "--timeout", "10s"]
    subprocess.run([*base, "-d1s", url], stdout=subprocess.DEVNULL, check=True, timeout=30)
    started()
    proc = subprocess.Popen([*base, f"-d{seconds:g}s", url], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    found = re.search(r"^SRW-BENCH (\d+) (\d+) (\d+) (\d+) (\d+)$", out, re.M)
    if proc.returncode or not found:
        raise RuntimeError(f"wrk {url}: exit {proc.returncode}\n{out}")
    requests, duration_us, p50, p99, errors = map(int, found.groups())
    if errors:
        raise RuntimeError(f"wrk {url}: {errors} errors or non-2xx replies\n{out}")
    return Run(requests, duration_us / 1e6, p50, p99, usage.ru_utime + usage.ru_stime)


async def drive(call, seconds: float, started) -> Run:
    """Keep IN_FLIGHT calls running for `seconds` (after a 1 s warm-up)."""
    latencies: list[float] = []
    warm_until = time.perf_counter() + 1.0
    stop_at = warm_until + seconds

    async def loop():
        while True:
            start = time.perf_counter()
            if start >= stop_at:
                return
            await call()
            end = time.perf_counter()
            if start >= warm_until:
                latencies.append(end - start)

    async def mark():
        nonlocal warm_until, stop_at
        await asyncio.sleep(warm_until - time.perf_counter())
        started()
        # The measured seconds start once started() returned (--counts: it starts
        # perf, which on a loaded machine takes a while, blocking this loop).
        warm_until = time.perf_counter()
        stop_at = warm_until + seconds

    await asyncio.gather(mark(), *(loop() for _ in range(IN_FLIGHT)))
    latencies.sort()
    return Run(len(latencies), seconds, statistics.median(latencies) * 1e6,
               latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1e6)


async def http_path(url: str, seconds: float, started) -> Run:
    import aiohttp
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def call():
            async with session.post(url, data=DATA) as resp:
                body = await resp.read()
            if resp.status != 200 or body != REPLY:
                raise RuntimeError(f"{url}: {resp.status} {body[:200]!r}")
        return await drive(call, seconds, started)


async def zmq_path(endpoint: str, hex_id: str | None, seconds: float, started) -> Run:
    from broker.client import AsyncClient
    async with AsyncClient(endpoint, timeout=10) as client:
        async def call():
            r = await client.exec("test_script.py", DATA, id=hex_id)
            if not r.ok or r.data != REPLY:
                raise RuntimeError(f"zmq exec: {r.status} {r.error}")
        return await drive(call, seconds, started)


def check_reply(url: str) -> None:
    """wrk counts statuses, not bodies: one request first, its body checked."""
    with urllib.request.urlopen(urllib.request.Request(url, data=DATA), timeout=10) as resp:
        body = resp.read()
    if body != REPLY:
        raise RuntimeError(f"{url}: {body[:200]!r}")


# Processes ----------------------------------------------------------------------


def accepting(listen: str) -> bool:
    host, port = listen.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=0.5).close()
        return True
    except OSError:
        return False


def node_ready(endpoint: str, workers: int) -> bool:
    from broker.client import BrokerUnavailable, Client
    with Client(endpoint) as client:
        try:
            return client.status(timeout=0.5)["workers"] >= workers
        except BrokerUnavailable:
            return False


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per path")
    parser.add_argument("--rounds", type=int, default=3,
                        help="times each path is measured, in turn (the median is shown)")
    parser.add_argument("--workers", type=int, default=2, help="pool workers of the node")
    parser.add_argument("--log-level", default="info",
                        help="[log] level of the node and proxy (info logs every request)")
    parser.add_argument("--clients", default="wrk,aiohttp,zmq",
                        help="which load generators, comma-separated (wrk, aiohttp, zmq)")
    parser.add_argument("--stock-baselines", action="store_true",
                        help="run the baseline handlers on asyncio's own event loop (as "
                             "stock aiohttp does), not on uvloop as the proxy")
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="also run the proxy of this checkout (same node), as a row "
                             "of its own; repeatable")
    parser.add_argument("--counts", action="store_true",
                        help="also context switches and (with perf) system calls per "
                             "request of each role")
    parser.add_argument("--baseline", nargs=4, metavar=("KIND", "HOST:PORT", "CONFIG", "REDIS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline:
        return baseline_server(*args.baseline, stock_loop=args.stock_baselines)
    clients = args.clients.split(",")
    for tool in (["wrk"] if "wrk" in clients else []) + ["redis-server"]:
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} not found: install Debian's {tool} "
                             "(make system-deps)")

    from core import config as cfg
    with tempfile.TemporaryDirectory(prefix="srw-http-bench-") as tmp:
        config = cfg.load(write_config(Path(tmp), args.workers, args.log_level))
        node = config.nodes[0]
        listen = {kind: f"127.0.0.1:{free_port()}" for kind in ("bare", "redis")}
        redis_port = str(free_port())
        procs = []
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config",
                                           str(config.path)], cwd=tmp, process_group=0,
                                          stdout=subprocess.DEVNULL))
            procs.append(subprocess.Popen(["redis-server", "--port", redis_port, "--bind",
                                           "127.0.0.1", "--save", "", "--appendonly", "no"],
                                          cwd=tmp, process_group=0, stdout=subprocess.DEVNULL))
            for kind in ("bare", "redis"):
                procs.append(subprocess.Popen(
                    [sys.executable, __file__, "--baseline", kind, listen[kind],
                     str(config.path), redis_port]
                    + (["--stock-baselines"] if args.stock_baselines else []), process_group=0,
                    stdout=subprocess.DEVNULL))
            trees = start_tree_proxies(args.tree, Path(tmp), procs)
            wait_for(lambda: node_ready(node.broker, args.workers), 60, "node n1")
            for listen_at in [config.proxy.listen, *trees.values()]:
                wait_for(lambda: accepting(listen_at), 30, f"the proxy on {listen_at}")
            for kind in ("bare", "redis"):
                wait_for(lambda: accepting(listen[kind]), 30, f"the {kind} handler")
            script = Path(tmp) / "post.lua"
            script.write_text(WRK_SCRIPT)
            run(args, clients, config, dict(listen, trees=trees), script, procs)
        finally:
            for proc in procs:
                stop(proc)
    return 0


BARE, REDIS, EXEC = ("bare aiohttp handler (constant)", "aiohttp + Redis EVAL handler",
                     "HTTP exec via proxy")


def start_tree_proxies(trees: list[Path], tmp: Path, procs: list) -> dict[str, str]:
    """`srw proxy` of each checkout in `trees`, on a port of its own, in front of
    the bench's node; returns {label: listen}."""
    out = {}
    for tree in trees:
        tree = tree.resolve()
        label = f"{tree.name}@{tree_commit(tree)}"
        listen_at = f"127.0.0.1:{free_port()}"
        path = tmp / f"proxy-{len(out)}.toml"
        text = (tmp / "config.toml").read_text()
        path.write_text(re.sub(r'(?m)^listen = ".*"$', f'listen = "{listen_at}"', text, 1))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "srw", "proxy", "--config", str(path)], cwd=tmp,
            process_group=0, stdout=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=str(tree))))
        out[label] = listen_at
    return out


def tree_commit(tree: Path) -> str:
    found = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                           capture_output=True, text=True)
    return found.stdout.strip() or "?"


def paths(clients: list[str], config, listen: dict, script: Path, s: float) -> list:
    """(client, label, url or None, measure(started) -> Run) for every path, in run order."""
    exec_url = f"http://{config.proxy.listen}/elliptics?exec&name=test_script.py"
    urls = [(BARE, f"http://{listen['bare']}/bare"), (REDIS, f"http://{listen['redis']}/redis"),
            (EXEC, exec_url), ("HTTP exec, one id (2011 example)", exec_url + "&id=0123456789")]
    for label, listen_at in listen["trees"].items():
        urls.append((f"HTTP exec, {label}"[:33],
                     f"http://{listen_at}/elliptics?exec&name=test_script.py"))
    out = []
    for label, url in urls:
        if "wrk" in clients:
            out.append(("wrk", label, url,
                        lambda started, url=url: wrk_path(url, s, script, started)))
        if "aiohttp" in clients:
            out.append(("aiohttp", label, url,
                        lambda started, url=url: asyncio.run(http_path(url, s, started))))
    if "zmq" in clients:
        broker = config.nodes[0].broker
        for label, hex_id in (("ZeroMQ exec (AsyncClient)", None),
                              ("ZeroMQ exec, one id", "0123456789")):
            out.append(("zmq", label, None, lambda started, hex_id=hex_id: asyncio.run(
                zmq_path(broker, hex_id, s, started))))
    return out


HEADER = (f"{'client':7} {'path':33} {'requests':>8} {'req/s':>7} {'p50 us':>7} {'p99 us':>7}"
          f"   CPU us/request: {'load':>5} {'front':>5} {'redis':>5} {'broker':>6} "
          f"{'worker':>6} {'runner':>6}")
# front: the proxy, or the baseline handler; redis: redis-server; runner: the
# workers' zygotes and runners (a runner that exited counts in its zygote's cutime).


def run(args, clients: list[str], config, listen: dict, script: Path,
        procs: list[subprocess.Popen]) -> None:
    todo = paths(clients, config, listen, script, args.seconds)
    print(f"srw HTTP bench: {IN_FLIGHT} connections or in flight, {args.seconds:g} s per path "
          f"after 1 s warm-up, {args.rounds} rounds, {args.workers} workers, "
          f"{os.cpu_count()} CPUs, 33 B request, 79 B reply, log level {args.log_level}; "
          f"wrk {WRK_THREADS} threads; baselines on "
          f"{'asyncio' if args.stock_baselines else 'uvloop'}")
    print(HEADER)
    for url in {url for _, _, url, _ in todo if url}:
        check_reply(url)
    measured: dict[tuple[str, str], list[dict]] = {}
    counter = Counts(procs) if args.counts else None
    for round_no in range(1, args.rounds + 1):
        # Paths alternate round by round, so a slow spell of the machine
        # does not land on one path only.
        for client, label, _, measure in todo:
            before = {}

            def started():
                before.update(cpu_by_role(procs))
                if counter is not None:
                    counter.start()
            result = measure(started)
            counted = counter.stop(result.requests) if counter is not None else None
            after = cpu_by_role(procs)
            cpu = {role: (after[role] - before[role]) / max(1, result.requests) * 1e6
                   for role in ROLES}
            if result.load_cpu is not None:
                cpu["load"] = result.load_cpu / max(1, result.requests) * 1e6
            row = {"rate": result.requests / result.seconds, "cpu": cpu,
                   "front": cpu["proxy"] + cpu["bare"] + cpu["redis handler"]}
            row["line"] = (f"{client:7} {label:33} {result.requests:>8} {row['rate']:>7.0f} "
                           f"{result.p50:>7.0f} {result.p99:>7.0f}   {'':15} "
                           f"{cpu['load']:>5.0f} {row['front']:>5.0f} "
                           f"{cpu['redis-server']:>5.0f} {cpu['broker']:>6.0f} "
                           f"{cpu['worker']:>6.0f} {cpu['runner']:>6.0f}")
            if counted is not None:
                if client == "wrk":
                    counted["load"] = (None, None)  # wrk is not the bench's process
                row["counts"] = counts_line(client, label, counted)
            measured.setdefault((client, label), []).append(row)
            print(f"{row['line']}   (round {round_no})", flush=True)
    print(f"\nmedian round per path:\n{HEADER}")
    for runs in measured.values():
        print(sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]["line"])
    if counter is not None:
        print(f"\nper request, median round by req/s: context switches | system calls "
              f"({'perf stat' if counter.perf else 'no perf: -'})\n{COUNTS_HEADER}")
        for runs in measured.values():
            print(sorted(runs, key=lambda r: r["rate"])[len(runs) // 2]["counts"])
    for client in ("wrk", "aiohttp"):
        if (client, EXEC) in measured:
            print_ratios(client, measured)
            print_tree_ratios(client, measured)


def print_ratios(client: str, measured: dict) -> None:
    """The issue's targets, per round (same-run ratios), and their medians."""
    exec_, bare, redis_ = (measured[(client, label)] for label in (EXEC, BARE, REDIS))
    for name, target, values in (
            ("HTTP exec / aiohttp+Redis req/s", ">= 1.0",
             [e["rate"] / r["rate"] for e, r in zip(exec_, redis_)]),
            ("HTTP exec / bare handler req/s", ">= 0.6",
             [e["rate"] / b["rate"] for e, b in zip(exec_, bare)]),
            ("proxy CPU / bare handler CPU per request", "<= 1.5",
             [e["cpu"]["proxy"] / b["cpu"]["bare"] for e, b in zip(exec_, bare)])):
        print(f"{client}: {name}: by round {', '.join(f'{v:.2f}' for v in values)}; median "
              f"{statistics.median(values):.2f} (target {target})")


def print_tree_ratios(client: str, measured: dict) -> None:
    """This tree's HTTP exec against each --tree's, per round (same run)."""
    exec_ = measured[(client, EXEC)]
    for (who, label), other in measured.items():
        if who != client or not label.startswith("HTTP exec, ") or "one id" in label:
            continue
        rates = [e["rate"] / o["rate"] for e, o in zip(exec_, other)]
        cpus = [e["cpu"]["proxy"] / o["cpu"]["proxy"] for e, o in zip(exec_, other)]
        print(f"{client}: HTTP exec / {label[len('HTTP exec, '):]}: req/s by round "
              f"{', '.join(f'{v:.2f}' for v in rates)} (median {statistics.median(rates):.2f}); "
              f"proxy CPU per request {', '.join(f'{v:.2f}' for v in cpus)} "
              f"(median {statistics.median(cpus):.2f})")


COUNTED = ("load", "proxy", "bare", "redis handler", "broker", "worker", "runner")
COUNTS_HEADER = (f"{'client':7} {'path':33}   switches: " + " ".join(
    f"{r.split()[0][:6]:>6}" for r in COUNTED) + "   syscalls: " + " ".join(
    f"{r.split()[0][:6]:>6}" for r in COUNTED))


def counts_line(client: str, label: str, counted: dict) -> str:
    def cell(v):
        return f"{'-' if v is None else f'{v:.1f}':>6}"
    return (f"{client:7} {label:33}             " + " ".join(cell(counted[r][0]) for r in COUNTED)
            + "             " + " ".join(cell(counted[r][1]) for r in COUNTED))


class Counts:
    """Context switches and system calls per request of each role, over the
    measured seconds (see the module's docstring, --counts)."""

    def __init__(self, procs: list[subprocess.Popen]):
        self.procs = procs
        self.perf = shutil.which("perf") is not None and subprocess.run(
            ["perf", "stat", "-e", "raw_syscalls:sys_enter", "true"],
            capture_output=True).returncode == 0
        self.pids: dict[str, list[int]] = {}
        self.switches: dict[str, int] = {}
        self.running: dict[str, tuple[subprocess.Popen, str]] = {}

    def start(self) -> None:
        self.pids = pids_by_role(self.procs)
        self.switches = {role: task_totals(pids)[1] for role, pids in self.pids.items()}
        if not self.perf:
            return
        for role, pids in self.pids.items():
            fd, out = tempfile.mkstemp(prefix="srw-http-bench-perf-")
            os.close(fd)
            self.running[role] = (subprocess.Popen(
                ["perf", "stat", "-x,", "-o", out, "-e", "raw_syscalls:sys_enter",
                 "-p", ",".join(map(str, pids))], stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL), out)

    def stop(self, requests: int) -> dict[str, tuple[float | None, float | None]]:
        per = max(1, requests)
        out = {role: (None, None) for role in COUNTED}
        for role, pids in self.pids.items():
            out[role] = ((task_totals(pids)[1] - self.switches[role]) / per, None)
        for role, (proc, path) in self.running.items():
            proc.send_signal(signal.SIGINT)
            proc.wait(10)
            try:
                with open(path) as f:
                    calls = next(int(line.split(",")[0]) for line in f
                                 if "raw_syscalls:sys_enter" in line)
                out[role] = (out[role][0], calls / per)
            except (OSError, StopIteration, ValueError):
                pass
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        self.running = {}
        return out


def pids_by_role(procs: list[subprocess.Popen]) -> dict[str, list[int]]:
    """The live processes of each counted role: the descendants of `procs`, by
    title, and this process as the load generator."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                parents.setdefault(stat[0], []).append(int(entry))
    out: dict[str, list[int]] = {"load": [os.getpid()]}
    todo = [proc.pid for proc in procs]
    while todo:
        pid = todo.pop()
        todo += parents.get(pid, [])
        role = role_of(pid)
        if role in COUNTED:
            out.setdefault(role, []).append(pid)
    return out


def cpu_by_role(procs: list[subprocess.Popen]) -> dict[str, float]:
    """CPU seconds used so far by role (ROLES), from /proc/PID/stat utime+stime
    of this process and of every descendant of `procs`."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = proc_stat(int(entry))
            if stat is not None:
                stats[int(entry)] = stat
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    out = dict.fromkeys(ROLES, 0.0)
    todo = [proc.pid for proc in procs]
    out["load"] = sum(stats[os.getpid()][1:]) / TICK if os.getpid() in stats else 0.0
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        if pid not in stats:
            continue
        role = role_of(pid)
        if role:
            _, own, reaped = stats[pid]
            # A zygote reaps its runners: what exited runners used is in its cutime.
            out[role] += (own + (reaped if role == "runner" else 0)) / TICK
    return out


def proc_stat(pid: int) -> tuple[int, int, int] | None:
    """(ppid, utime+stime, cutime+cstime) in ticks, or None for a process gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name may hold spaces
    return int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[13]) + int(fields[14])


def role_of(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            title = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for prefix, role in (("srw: proxy", "proxy"), ("srw: broker", "broker"),
                         ("srw: worker", "worker"), ("srw: runner", "runner"),
                         ("srw: zygote", "runner"), ("srw: bench bare", "bare"),
                         ("srw: bench redis", "redis handler")):
        if title.startswith(prefix):
            return role
    return "redis-server" if title.split(" ")[0].endswith("redis-server") else None


if __name__ == "__main__":
    sys.exit(main())
