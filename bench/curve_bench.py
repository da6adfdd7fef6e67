"""Curve bench: what CurveZMQ costs an exec, split into libzmq's part and srw's.

    PYTHONPATH=$PWD .venv/bin/python bench/curve_bench.py [--requests 10000] \
        [--rounds 3] [--tree DIR ...] [--paths]

In one run, in turns (A B A B, the order reversed every other round):
  * bare pyzmq echoes over TCP loopback, plaintext and CurveZMQ: one hop
    (DEALER -> ROUTER echo) and the four hops of an exec (through a C relay,
    zmq_proxy, curve on both of its sides).  Curve against plaintext there is
    libzmq's crypto alone: srw cannot take that part away;
  * srw exec echo.py (`warning`, as exec_bench's curve row) plaintext and with
    curve on, on this tree and on each --tree DIR (its code on PYTHONPATH);
  * with --store, also an exec whose script makes one store call (read1.py:
    n.read_data of 100 bytes), curve on: what a request that needs its
    capability pays (minted, asked for, revoked).
Per row: p50/p99 one at a time, req/s with 64 in flight (best round), CPU per
exec of the node's processes; with --paths, per process (client, broker,
worker, runner, storage front) CPU and context switches per exec.
Figures only; nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zmq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from common import free_port, pct, task_totals  # noqa: E402
import exec_bench  # noqa: E402
from exec_bench import (PAYLOAD, Exec, Node, latency, median, role_pids,  # noqa: E402
                        throughput, write_config)

from core import protocol as p  # noqa: E402

READ1 = """
try:
    __return_data = n.read_data("curve-bench-key")
except Exception:  # the first request stores it
    n.write_data("curve-bench-key", b"v" * 100)
    __return_data = b"stored"
"""


def store_exec(root: Path, tree: Path | None) -> Exec:
    """A curve node whose execs run read1.py (one store read each)."""
    config = write_config(root, 2, curve=True, tree=tree)
    (root / "history" / "read1.py").write_text(READ1)
    ex = Exec(Node(config, 2, tree))
    ex.frames = p.request_frames(p.EXEC, b"r", p.ExecMeta(name="read1.py"), PAYLOAD)
    latency(ex.sock, ex.frames, 200)  # warm: store connections of the runners
    return ex

# A ROUTER echo; with a server secret (z85) as argv[2], a curve server.
ECHO = """
import sys, zmq
ctx = zmq.Context(); s = ctx.socket(zmq.ROUTER)
if len(sys.argv) > 2:
    s.curve_server = True; s.curve_secretkey = sys.argv[2].encode()
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""

# zmq_proxy between a front ROUTER and a back DEALER; with keys, curve on both sides.
RELAY = """
import sys, zmq
ctx = zmq.Context()
front = ctx.socket(zmq.ROUTER); back = ctx.socket(zmq.DEALER)
if len(sys.argv) > 3:
    secret, public, server = (a.encode() for a in sys.argv[3:6])
    front.curve_server = True; front.curve_secretkey = secret
    back.curve_secretkey, back.curve_publickey, back.curve_serverkey = secret, public, server
front.bind(sys.argv[1]); back.connect(sys.argv[2])
print("ready", flush=True)
zmq.proxy(front, back)
"""


class Echo:
    """A DEALER to an echo server, directly (one hop) or through a relay (four)."""

    def __init__(self, curve: bool, relay: bool):
        self.ctx = zmq.Context()
        self.procs = []
        echo = f"tcp://127.0.0.1:{free_port()}"
        server_public, server_secret = zmq.curve_keypair()
        client_public, client_secret = zmq.curve_keypair()
        self._start(ECHO, echo, *([server_secret.decode()] if curve else []))
        target = echo
        if relay:
            target = f"tcp://127.0.0.1:{free_port()}"
            relay_public, relay_secret = zmq.curve_keypair()
            keys = [relay_secret, relay_public, server_public] if curve else []
            self._start(RELAY, target, echo, *(k.decode() for k in keys))
            server_public = relay_public
        self.sock = self.ctx.socket(zmq.DEALER)
        if curve:
            self.sock.curve_secretkey, self.sock.curve_publickey = client_secret, client_public
            self.sock.curve_serverkey = server_public
        self.sock.connect(target)
        latency(self.sock, [PAYLOAD], 500)  # warm: connections, handshakes

    def _start(self, code: str, *args: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                                text=True)
        self.procs.append(proc)
        proc.stdout.readline()

    def latency(self, n: int) -> list[float]:
        return latency(self.sock, [PAYLOAD], n)

    def throughput(self, n: int) -> float:
        return throughput(self.sock, [PAYLOAD], n)

    def close(self) -> None:
        self.ctx.destroy(linger=0)
        for proc in self.procs:
            proc.kill()
            proc.wait()


# exec_bench's roles and the storage front (curve's revocations went there).
exec_bench.ROLES = exec_bench.ROLES + ("storage",)


def paths(name: str, ex: Exec, n: int) -> None:
    roles = role_pids(ex)
    before = {role: task_totals(pids) for role, pids in roles.items()}
    started = time.perf_counter()
    ex.latency(n // 4)
    one = time.perf_counter() - started
    middle = {role: task_totals(pids) for role, pids in roles.items()}
    throughput(ex.sock, ex.frames, n)
    after = {role: task_totals(pids) for role, pids in roles.items()}
    print(f"\n{name}: per exec, one at a time ({n // 4}, {one / (n // 4) * 1e6:.0f} us wall) "
          f"| 64 in flight ({n}):")
    print(f"  {'process':8} {'CPU us':>7} {'ctx sw':>7} | {'CPU us':>7} {'ctx sw':>7}")
    for role in roles:
        a = [(middle[role][i] - before[role][i]) / (n // 4) for i in (0, 1)]
        b = [(after[role][i] - middle[role][i]) / n for i in (0, 1)]
        print(f"  {role:8} {a[0] * 1e6:7.1f} {a[1]:7.2f} | {b[0] * 1e6:7.1f} {b[1]:7.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tree", type=Path, action="append", default=[],
                    help="another checkout whose srw rows run in turns with this one's")
    ap.add_argument("--paths", action="store_true",
                    help="then CPU and context switches per exec for each process")
    ap.add_argument("--skip-echo", action="store_true")
    ap.add_argument("--store", action="store_true",
                    help="also execs that make one store call each (curve on)")
    args = ap.parse_args()
    n = args.requests
    print(f"curve bench: load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}",
          flush=True)
    rows: dict[str, object] = {}
    if not args.skip_echo:
        for relay in (False, True):
            hops = "4 hops (C relay)" if relay else "1 hop"
            rows[f"pyzmq echo {hops}, plaintext"] = lambda r=relay: Echo(False, r)
            rows[f"pyzmq echo {hops}, CurveZMQ"] = lambda r=relay: Echo(True, r)
    trees = [("", None)] + [(f" @ {t.name}", t.resolve()) for t in args.tree]
    with tempfile.TemporaryDirectory(prefix="srw-curve-") as tmp:
        for suffix, tree in trees:
            for curve in (False, True):
                root = Path(tmp) / f"node{len(rows)}"
                name = f"srw exec, {'CurveZMQ' if curve else 'plaintext'}{suffix}"
                rows[name] = lambda root=root, curve=curve, tree=tree: Exec(
                    Node(write_config(root, 2, curve=curve, tree=tree), 2, tree))
            if args.store:
                root = Path(tmp) / f"node{len(rows)}"
                rows[f"srw exec read1.py, CurveZMQ{suffix}"] = \
                    lambda root=root, tree=tree: store_exec(root, tree)
        runs = {}
        try:
            for name, make in rows.items():
                runs[name] = make()
            lat: dict[str, list[float]] = {name: [] for name in runs}
            rate: dict[str, list[float]] = {name: [] for name in runs}
            for i in range(args.rounds):
                for name, run in list(runs.items())[::-1 if i % 2 else 1]:
                    lat[name].extend(run.latency(n // 4 // args.rounds))
                    rate[name].append(run.throughput(n))
            print(f"\n{'path':44} {'p50 us':>7} {'p99 us':>7} {'req/s':>8}  CPU us/exec")
            for name in runs:
                cpu = getattr(runs[name], "cpu_us", [])
                print(f"{name:44} {pct(lat[name], 0.5):7.0f} {pct(lat[name], 0.99):7.0f} "
                      f"{max(rate[name]):8,.0f}  {', '.join(f'{c:.0f}' for c in cpu)}")
            print()
            pairs = [(name, name.replace("CurveZMQ", "plaintext")) for name in runs
                     if "CurveZMQ" in name and name.replace("CurveZMQ", "plaintext") in runs]
            for curve, plain in pairs:
                ratios = [c / p for c, p in zip(rate[curve], rate[plain])]
                extra = pct(lat[curve], 0.5) - pct(lat[plain], 0.5)
                print(f"{curve.replace(', CurveZMQ', '')}: curve / plaintext p50 "
                      f"{pct(lat[curve], 0.5) / pct(lat[plain], 0.5):.2f} (+{extra:.0f} us), "
                      f"req/s by round {', '.join(f'{r:.2f}' for r in ratios)} "
                      f"(median {median(ratios):.2f})")
            for name in runs:
                if " @ " in name:
                    ours = name.split(" @ ")[0]
                    ratios = [a / b for a, b in zip(rate[ours], rate[name])]
                    print(f"{ours} this tree / {name.split(' @ ')[1]}: p50 "
                          f"{pct(lat[ours], 0.5) / pct(lat[name], 0.5):.2f}, req/s by round "
                          f"{', '.join(f'{r:.2f}' for r in ratios)}")
            if args.paths:
                for name, run in runs.items():
                    if name.startswith("srw"):
                        paths(name, run, n)
        finally:
            for run in runs.values():
                run.close()
    print(f"\nload average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
