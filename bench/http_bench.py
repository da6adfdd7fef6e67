"""HTTP exec next to its baselines, in one run.

Starts its own node and proxy (`srw serve` on a temporary config with free
loopback ports) and a bare aiohttp handler that answers a constant through the
same server machinery (`proxy.server.serve`), then drives, one after another,
with 64 requests in flight each:

    bare HTTP     POST /bare            -> constant 79 B (aiohttp client, 64 connections)
    HTTP exec     POST /elliptics?exec&name=test_script.py
                                        -> the 2011 reply, 79 B (aiohttp client, 64 connections)
    ZeroMQ exec   AsyncClient.exec("test_script.py")   (64 in flight on one socket)
    ..., one id   the same two with id=0123456789, the 2011 example's: execs for one
                  id run one at a time on its node (the per-id lock)

and prints throughput and latency percentiles per path, and HTTP exec's
throughput as a fraction of the bare handler's.  The paths take turns for
--rounds rounds; the ratio is taken per round and its median shown.
Everything it started is stopped at the end.

Usage: python bench/http_bench.py [--seconds 5] [--rounds 3] [--workers 2]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import free_port, wait_for, write_config  # noqa: E402

DATA = b"this is some data in POST request"
REPLY = b"its nothing I can do for you without cookies: this is some data in POST request"
IN_FLIGHT = 64


# The bare handler, run by a child process of the bench ------------------------------

def bare_server(listen: str, config_path: str) -> int:
    """The baseline: a constant reply, through proxy.server.run with the proxy's logging."""
    from aiohttp import web

    from proxy.server import run
    from core import config as cfg
    from core import logs
    logs.setup(cfg.load(config_path).log, "bare", buffered=True)

    async def constant(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=REPLY, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_post("/bare", constant)
    return run(app, listen, title="srw: bench bare handler")


# Load ---------------------------------------------------------------------------

async def drive(call, seconds: float) -> tuple[int, list[float]]:
    """Keep IN_FLIGHT calls running for `seconds` (after a 1 s warm-up); (count, latencies)."""
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

    await asyncio.gather(*(loop() for _ in range(IN_FLIGHT)))
    return len(latencies), latencies


async def http_path(url: str, seconds: float):
    import aiohttp
    connector = aiohttp.TCPConnector(limit=IN_FLIGHT)
    async with aiohttp.ClientSession(connector=connector) as session:
        async def call():
            async with session.post(url, data=DATA) as resp:
                body = await resp.read()
            if resp.status != 200 or body != REPLY:
                raise RuntimeError(f"{url}: {resp.status} {body[:200]!r}")
        return await drive(call, seconds)


async def zmq_path(endpoint: str, hex_id: str | None, seconds: float):
    from broker.client import AsyncClient
    async with AsyncClient(endpoint, timeout=10) as client:
        async def call():
            r = await client.exec("test_script.py", DATA, id=hex_id)
            if not r.ok or r.data != REPLY:
                raise RuntimeError(f"zmq exec: {r.status} {r.error}")
        return await drive(call, seconds)


def summary(label: str, seconds: float, result) -> tuple[str, float]:
    count, lat = result
    lat.sort()
    p50 = statistics.median(lat) * 1e6
    p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e6
    rate = count / seconds
    return f"{label:34} {count:>8} {rate:>9.0f} {p50:>8.0f} {p99:>8.0f}", rate


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
    parser.add_argument("--bare-server", nargs=2, metavar=("HOST:PORT", "CONFIG"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare_server:
        return bare_server(*args.bare_server)

    from core import config as cfg
    with tempfile.TemporaryDirectory(prefix="srw-http-bench-") as tmp:
        config = cfg.load(write_config(Path(tmp), args.workers, args.log_level))
        node = config.nodes[0]
        bare_listen = f"127.0.0.1:{free_port()}"
        procs = []
        try:
            procs.append(subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config",
                                           str(config.path)], cwd=tmp, process_group=0,
                                          stdout=subprocess.DEVNULL))
            procs.append(subprocess.Popen([sys.executable, __file__, "--bare-server", bare_listen,
                                           str(config.path)], process_group=0,
                                          stdout=subprocess.DEVNULL))
            wait_for(lambda: node_ready(node.broker, args.workers), 60, "node n1")
            wait_for(lambda: accepting(config.proxy.listen), 30, "the proxy")
            wait_for(lambda: accepting(bare_listen), 30, "the bare handler")
            run(args, config, bare_listen, procs)
        finally:
            for proc in procs:
                stop(proc)
    return 0


def run(args, config, bare_listen: str, procs: list[subprocess.Popen]) -> None:
    proxy = f"http://{config.proxy.listen}/elliptics?exec&name=test_script.py"
    broker = config.nodes[0].broker
    s = args.seconds
    rows = [
        ("bare aiohttp handler (constant)", lambda: http_path(f"http://{bare_listen}/bare", s)),
        ("HTTP exec via proxy", lambda: http_path(proxy, s)),
        ("ZeroMQ exec (AsyncClient)", lambda: zmq_path(broker, None, s)),
        ("HTTP exec, one id (2011 example)", lambda: http_path(proxy + "&id=0123456789", s)),
        ("ZeroMQ exec, one id", lambda: zmq_path(broker, "0123456789", s)),
    ]
    print(f"srw HTTP bench: {IN_FLIGHT} in flight, {s:g} s per path after 1 s warm-up, "
          f"{args.rounds} rounds, {args.workers} workers, {os.cpu_count()} CPUs, "
          f"33 B request, 79 B reply, log level {args.log_level}")
    header = (f"{'path':34} {'requests':>8} {'req/s':>9} {'p50 us':>8} {'p99 us':>8}   "
              "CPU us per request: load, proxy|bare, broker, workers+runners")
    print(header)
    measured: dict[str, list[tuple[float, str]]] = {label: [] for label, _ in rows}
    for round_no in range(1, args.rounds + 1):
        # Paths alternate round by round, so a slow spell of the machine
        # does not land on one path only.
        for label, make in rows:
            before = cpu_by_role(procs)
            result = asyncio.run(make())
            cpu = {role: (t - before.get(role, 0.0)) / max(1, result[0]) * 1e6
                   for role, t in cpu_by_role(procs).items()}
            line, rate = summary(label, s, result)
            server = cpu["proxy"] + cpu["bare"]
            line = (f"{line}   {cpu['load']:>5.0f} {server:>5.0f} {cpu['broker']:>5.0f} "
                    f"{cpu['worker']:>5.0f}")
            measured[label].append((rate, line))
            print(f"{line}   (round {round_no})", flush=True)
    print(f"\nmedian round per path:\n{header}")
    for label, runs in measured.items():
        print(sorted(runs)[len(runs) // 2][1])
    bare = [rate for rate, _ in measured["bare aiohttp handler (constant)"]]
    http = [rate for rate, _ in measured["HTTP exec via proxy"]]
    zmq_rates = [rate for rate, _ in measured["ZeroMQ exec (AsyncClient)"]]
    ratios = sorted(h / b for h, b in zip(http, bare))
    print(f"HTTP exec / bare handler throughput by round: "
          f"{', '.join(f'{r:.2f}' for r in ratios)}; median {ratios[len(ratios) // 2]:.2f} "
          f"(target >= 0.6); HTTP exec / ZeroMQ exec: "
          f"{statistics.median(http) / statistics.median(zmq_rates):.2f}")


def cpu_by_role(procs: list[subprocess.Popen]) -> dict[str, float]:
    """CPU seconds used so far by role: load (this process), proxy, bare, broker, worker
    (with its zygote and runners)."""
    import psutil
    out = dict.fromkeys(("load", "proxy", "bare", "broker", "worker"), 0.0)
    me = psutil.Process()
    tree = [me]
    for proc in procs:
        try:
            root = psutil.Process(proc.pid)
            tree += [root] + root.children(recursive=True)
        except psutil.Error:
            pass
    for proc in tree:
        try:
            title = " ".join(proc.cmdline())
            times = proc.cpu_times()
        except psutil.Error:
            continue
        role = "load" if proc.pid == me.pid else next(
            (r for r in ("proxy", "bare", "broker", "worker") if title.startswith(f"srw: {r}")
             or title.startswith(f"srw: bench {r}")), None)
        if title.startswith(("srw: runner", "srw: zygote")):
            role = "worker"  # a worker's sandbox: its runners and their zygote
        if role:
            out[role] += times.user + times.system
    return out


if __name__ == "__main__":
    sys.exit(main())
