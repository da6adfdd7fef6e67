"""Cluster bench: srw exec by key beside a Redis Cluster, against EVAL, one run.

    python bench/cluster_bench.py [--masters 3] [--requests 3000] [--keys 1000]
                                  [--rounds 1] [--tree DIR]

Builds, in a temp dir on free loopback ports, a Redis Cluster of `--masters`
masters (no replicas: Redis's replication is not what is measured) and one srw
node beside each master (1 worker, default profile), like the tests' fixture,
and stops it all by pid at the end.  The same keys (100-byte values) are read:

  * EVAL "return redis.call('GET', KEYS[1])" through redis-py's RedisCluster
    (one at a time), and redis.asyncio's RedisCluster (64 in flight);
  * srw exec get.py by key (the script: n.redis.get(key)) through Session (one
    at a time) and AsyncClient per node with the one router (64 in flight);
  * srw exec echo.py by key: srw's own path, no Redis call in the script;
  * GET through a plain redis-py Redis (hiredis) on one master, one at a time,
    of the keys it serves: what a Redis call costs a bare client.

For each: p50/p99 of one-at-a-time requests, and requests/s with 64 in flight
(the bare GET: one at a time).  With --tree DIR, `srw serve` of that checkout
(PYTHONPATH=DIR; e.g. /work/wt-base) runs the srw rows too, on the same Redis
cluster, interleaved with this tree's round by round (A B A B).
Then the CPU per request of every srw process (broker, worker, zygote, runner,
pool; summed over the nodes), the redis-servers and this client, from
psutil cpu_times deltas over the 64-in-flight phase (the bare GET: this
process's own, one at a time).  The summary gives, per tree: exec get.py's
throughput over EVAL's, and the runner's CPU per Redis call (get.py's runner
CPU less echo.py's) over the bare client's per GET.  Figures only, no asserts;
docs/scale-out.md computes from them.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import free_port, pct, wait_for  # noqa: E402
from core import redis_auth  # noqa: E402

IN_FLIGHT = 64
VALUE = b"v" * 100
GET_LUA = "return redis.call('GET', KEYS[1])"
SCRIPTS = {
    "get.py": "__return_data = n.redis.get(__input_binary_data_tuple[0]) or b''\n",
}


def row(name: str, lat_us: list[float], rate: float) -> str:
    return f"{name:58} {pct(lat_us, 0.5):8.0f} {pct(lat_us, 0.99):8.0f} {rate:10,.0f}"


# The cluster ---------------------------------------------------------------------

class Layout:
    """Redis masters and `srw serve` beside them, in `root`; `stop()` by pid."""

    def __init__(self, root: Path, masters: int):
        self.root, self.masters = root, masters
        self.ports = [free_port() for _ in range(masters)]
        self.addresses = [f"127.0.0.1:{p}" for p in self.ports]
        self.redis: list[subprocess.Popen] = []
        self.serve: subprocess.Popen | None = None
        self.config = root / "config.toml"
        # Redis's ACL as `srw keys redis` makes it: srw logs in as the user srw; the
        # bench's own EVAL baseline as the default user (srw's user may not EVAL).
        redis_auth.write_secrets(root / "keys")
        self.admin = redis_auth.admin_password(root / "keys")

    def start(self) -> None:
        for port in self.ports:
            folder = self.root / f"redis-{port}"
            folder.mkdir()
            self.redis.append(subprocess.Popen(
                ["redis-server", str(self.root / "keys" / redis_auth.CONF), "--port", str(port), "--bind", "127.0.0.1",
                 "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                 "--cluster-port", str(free_port()), "--dir", str(folder), "--save", "",
                 "--appendonly", "no", "--logfile", str(folder / "redis.log")],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True))
        for port in self.ports:
            wait_for(lambda: _ping(port, self.admin), 10, f"redis-server on {port}")
        subprocess.run(["redis-cli", "--cluster", "create", *self.addresses,
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=30,
                       env={**os.environ, "REDISCLI_AUTH": self.admin})
        wait_for(self._cluster_ok, 30, "cluster_state:ok on every node")
        self._write_config()

    def start_srw(self, tree: Path = REPO) -> None:
        """`srw serve` of the checkout `tree` (its code on PYTHONPATH)."""
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "srw", "serve", "--config", str(self.config)],
            cwd=self.root, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, env=dict(os.environ, PYTHONPATH=str(tree)))
        wait_for(self._srw_ready, 60, "every srw node")

    def _cluster_ok(self) -> bool:
        from redis import Redis
        for port in self.ports:
            with Redis("127.0.0.1", port, password=self.admin, decode_responses=True) as r:
                if "cluster_state:ok" not in r.execute_command("CLUSTER", "INFO"):
                    return False
        return True

    def _write_config(self) -> None:
        history = self.root / "history"
        shutil.copytree(REPO / "history", history)
        for name, body in SCRIPTS.items():
            (history / name).write_text(body)
        seeds = ", ".join(f'"{a}"' for a in self.addresses)
        nodes = "".join(f"""
[[node]]
name = "r{i}"
group = 1
redis = "{a}"
broker = "tcp://127.0.0.1:{free_port()}"
data_dir = "var/r{i}"
""" for i, a in enumerate(self.addresses))
        self.config.write_text(f"""
[cluster]
engine = "redis-cluster"
seeds = [{seeds}]

[pool]
workers = 1
max_requests = 0   # no recycling mid-run: the CPU columns sum the live processes

[proxy]
listen = "127.0.0.1:{free_port()}"

[log]
level = "warning"
file = "{self.root / 'srw.log'}"
{nodes}""")

    def _srw_ready(self) -> bool:
        from broker.client import BrokerUnavailable
        from storage.client import Session
        if self.serve.poll() is not None:
            raise SystemExit(f"bench: srw serve exited: {self.serve.stderr.read().decode()}")
        with Session(self.config) as s:
            try:
                return all(st.get("workers", 0) >= 1 for st in s.status())
            except BrokerUnavailable:
                return False

    def processes(self) -> dict[str, list[psutil.Process]]:
        """srw's processes by role (from their titles), the redis-servers, this client."""
        roles: dict[str, list[psutil.Process]] = {}
        srw = psutil.Process(self.serve.pid).children(recursive=True) if self.serve else []
        for proc in srw:
            try:
                title = proc.cmdline()[0]
            except (psutil.Error, IndexError):
                continue
            if title.startswith("srw: "):
                roles.setdefault(title.split()[1], []).append(proc)
        roles["redis-server"] = [psutil.Process(p.pid) for p in self.redis]
        roles["client (this bench)"] = [psutil.Process()]
        return roles

    def stop_srw(self) -> None:
        if self.serve is not None and self.serve.poll() is None:
            self.serve.terminate()
            try:
                self.serve.wait(30)
            except subprocess.TimeoutExpired:
                self.serve.kill()
                self.serve.wait(5)
        self.serve = None

    def stop(self) -> None:
        self.stop_srw()
        for proc in self.redis:
            proc.kill()
            proc.wait(5)


def _ping(port: int, password: str) -> bool:
    from redis import Redis
    try:
        with Redis("127.0.0.1", port, password=password, socket_connect_timeout=0.5) as r:
            return r.ping()
    except Exception:  # redis ConnectionError while it starts
        return False


# Measurements -------------------------------------------------------------------

def cpu_seconds(roles: dict[str, list[psutil.Process]]) -> dict[str, float]:
    out = {}
    for role, procs in roles.items():
        total = 0.0
        for proc in procs:
            try:
                t = proc.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        out[role] = total
    return out


def eval_latency(addresses: list[str], password: str, keys: list[str], n: int) -> list[float]:
    from redis.cluster import ClusterNode, RedisCluster
    host, port = addresses[0].rsplit(":", 1)
    rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))], password=password)
    try:
        out = []
        for i in range(n):
            t = time.perf_counter()
            rc.eval(GET_LUA, 1, keys[i % len(keys)])
            out.append((time.perf_counter() - t) * 1e6)
        return out
    finally:
        rc.close()


async def eval_rate(addresses: list[str], password: str, keys: list[str], n: int) -> float:
    from redis.asyncio.cluster import ClusterNode, RedisCluster
    host, port = addresses[0].rsplit(":", 1)
    rc = RedisCluster(startup_nodes=[ClusterNode(host, int(port))], password=password,
                      max_connections=IN_FLIGHT * 2)
    await rc.initialize()
    counter = iter(range(n))

    async def one():
        for i in counter:
            await rc.eval(GET_LUA, 1, keys[i % len(keys)])
    try:
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(IN_FLIGHT)))
        return n / (time.perf_counter() - t)
    finally:
        await rc.aclose()


def bare_get(addresses: list[str], password: str, keys: list[str], n: int
             ) -> tuple[list[float], float, float]:
    """GET by a plain redis-py Redis (hiredis parser) on the first key's master,
    one at a time, of the keys that master serves: latencies, rate, and this
    process's CPU per GET (us)."""
    from redis import Redis
    from redis.cluster import ClusterNode, RedisCluster
    from redis.utils import HIREDIS_AVAILABLE
    if not HIREDIS_AVAILABLE:
        raise SystemExit("bench: hiredis is not installed (redis[hiredis])")
    host, port = addresses[0].rsplit(":", 1)
    with RedisCluster(startup_nodes=[ClusterNode(host, int(port))], password=password) as rc:
        master = rc.get_node_from_key(keys[0])
        mine = [k for k in keys if rc.get_node_from_key(k).name == master.name]
    with Redis(master.host, master.port, password=password) as r:
        for key in mine[:200]:
            r.get(key)
        out = []
        own = psutil.Process()
        cpu = sum(own.cpu_times()[:2])
        start = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            r.get(mine[i % len(mine)])
            out.append((time.perf_counter() - t) * 1e6)
        rate = n / (time.perf_counter() - start)
        return out, rate, (sum(own.cpu_times()[:2]) - cpu) / n * 1e6


def srw_latency(config: Path, name: str, keys: list[str], n: int) -> list[float]:
    from storage.client import Session
    out = []
    with Session(config) as s:
        for i in range(n):
            key = keys[i % len(keys)]
            t = time.perf_counter()
            [result] = s.exec(name, key.encode(), key=key)
            out.append((time.perf_counter() - t) * 1e6)
            if not result.ok:
                raise SystemExit(f"bench: {name} {key}: {result.status}: {result.error}")
    return out


async def srw_rate(config: Path, name: str, keys: list[str], n: int) -> float:
    from broker.client import AsyncClient
    from core import config as cfg
    from storage.engine import engine_class
    settings = cfg.load(config)
    router = engine_class(settings).make_router(settings)
    router.refresh()
    clients = {node.name: AsyncClient(node.broker) for node in settings.nodes}
    routes = [router.route(key=k, refresh=False) for k in keys]
    counter = iter(range(n))

    async def one():
        for i in counter:
            route = routes[i % len(routes)]
            result = await clients[route.nodes[0].name].exec(
                name, keys[i % len(keys)].encode(), id=route.hex_id)
            if not result.ok:
                raise SystemExit(f"bench: {name}: {result.status}: {result.error}")
    try:
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(IN_FLIGHT)))
        return n / (time.perf_counter() - t)
    finally:
        await asyncio.gather(*(c.close() for c in clients.values()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3000,
                        help="per measurement (the 64-in-flight ones run 3x as many)")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--tree", type=Path, action="append", default=[],
                        help="another checkout whose srw serve runs the srw rows too")
    args = parser.parse_args()
    keys = [f"bench:{i}" for i in range(args.keys)]
    trees = {"this tree": REPO, **{f"{t.resolve().name}": t.resolve() for t in args.tree}}
    root = Path(tempfile.mkdtemp(prefix="srw-cluster-bench-"))
    layout = Layout(root, args.masters)
    try:
        layout.start()
        from redis.cluster import ClusterNode, RedisCluster
        host, port = layout.addresses[0].rsplit(":", 1)
        with RedisCluster(startup_nodes=[ClusterNode(host, int(port))],
                          password=layout.admin) as rc:
            for key in keys:
                rc.set(key, VALUE)
        print(f"cluster bench: {args.masters} Redis masters, one srw node (1 worker, "
              f"default profile) beside each; {len(keys)} keys of {len(VALUE)} bytes; "
              f"{psutil.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}")
        print(f"{'path':58} {'p50 us':>8} {'p99 us':>8} {'req/s':>10}  "
              f"({IN_FLIGHT} in flight)")
        summary = []
        for round_no in range(1, args.rounds + 1):
            cpu: dict[str, dict[str, float]] = {}
            rates: dict[str, float] = {}
            for tree_name, tree in trees.items():
                layout.start_srw(tree)
                try:
                    srw_rows(layout, keys, args, f" [{tree_name}]", cpu, rates)
                finally:
                    layout.stop_srw()
            baseline_rows(layout, keys, args, cpu, rates)
            print_cpu(cpu, args.masters)
            summary += summarize(round_no, trees, cpu, rates)
            print(f"load average {os.getloadavg()[0]:.1f}\n", flush=True)
        print("\n".join(summary))
    finally:
        layout.stop()
        shutil.rmtree(root, ignore_errors=True)


PATHS = (("srw exec get.py by key (n.redis.get)", "get.py"),
         ("srw exec echo.py by key (no Redis call)", "echo.py"))
EVAL_ROW = "EVAL GET via redis-py RedisCluster"
BARE_ROW = "GET via a bare redis-py Redis (hiredis)"


def srw_rows(layout: Layout, keys, args, suffix: str, cpu: dict, rates: dict) -> None:
    n, n_rate = args.requests, args.requests * 3
    # Warm-up: each worker's cluster client, compiled scripts, connections.
    srw_latency(layout.config, "get.py", keys, 200)
    for label, name in PATHS:
        label += suffix
        lat = srw_latency(layout.config, name, keys, n)
        roles = layout.processes()
        before = cpu_seconds(roles)
        rates[label] = asyncio.run(srw_rate(layout.config, name, keys, n_rate))
        after = cpu_seconds(roles)
        cpu[label] = {r: (after[r] - before[r]) / n_rate * 1e6 for r in roles}
        print(row(label, lat, rates[label]), flush=True)


def baseline_rows(layout: Layout, keys, args, cpu: dict, rates: dict) -> None:
    n, n_rate = args.requests, args.requests * 3
    eval_latency(layout.addresses, layout.admin, keys, 200)
    lat = eval_latency(layout.addresses, layout.admin, keys, n)
    roles = {k: v for k, v in layout.processes().items()
             if k in ("redis-server", "client (this bench)")}
    before = cpu_seconds(roles)
    rates[EVAL_ROW] = asyncio.run(eval_rate(layout.addresses, layout.admin, keys, n_rate))
    after = cpu_seconds(roles)
    cpu[EVAL_ROW] = {r: (after[r] - before[r]) / n_rate * 1e6 for r in roles}
    print(row(EVAL_ROW, lat, rates[EVAL_ROW]), flush=True)
    lat, rates[BARE_ROW], per_get = bare_get(layout.addresses, layout.admin, keys, n_rate)
    cpu[BARE_ROW] = {"client (this bench)": per_get}
    print(row(BARE_ROW, lat, rates[BARE_ROW]) + "  (one at a time)", flush=True)


def print_cpu(cpu: dict, masters: int) -> None:
    print(f"\nCPU per request, us (user+system, summed over {masters} nodes; "
          f"{IN_FLIGHT}-in-flight phase)")
    order = ["broker", "worker", "zygote", "runner", "pool", "redis-server",
             "client (this bench)"]
    print(f"{'path':58} " + " ".join(f"{r.split()[0]:>8}" for r in order) + f" {'total':>8}")
    for label, by_role in cpu.items():
        cells = [by_role.get(r) for r in order]
        total = sum(c for c in cells if c)
        print(f"{label:58} " + " ".join(f"{'-' if c is None else f'{c:.0f}':>8}"
                                        for c in cells) + f" {total:8.0f}")


def summarize(round_no: int, trees: dict, cpu: dict, rates: dict) -> list[str]:
    """Per tree: exec get.py over EVAL (throughput), and the runner's CPU per
    Redis call (get.py less echo.py) over the bare client's per GET."""
    out = []
    bare = cpu[BARE_ROW]["client (this bench)"]
    for tree_name in trees:
        get, echo = (f"{label} [{tree_name}]" for label, _ in PATHS)
        per_call = cpu[get].get("runner", 0.0) - cpu[echo].get("runner", 0.0)
        out.append(f"round {round_no} [{tree_name}]: exec get.py {rates[get] / rates[EVAL_ROW]:.2f}x "
                   f"EVAL's throughput (target >= 0.35); runner CPU per Redis call "
                   f"{per_call:.0f} us, {per_call / bare:.2f}x the bare GET's {bare:.0f} us "
                   f"(target <= 2)")
    return out


if __name__ == "__main__":
    main()
