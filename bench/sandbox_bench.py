"""What the sandbox costs: trivial exec under no sandbox, `default` and `strict`, in one run.

    python bench/sandbox_bench.py [--requests 2000] [--throughput 4000] [--baseline DIR]
                                  [--only-tenants] [--rounds 3] [--tenants 1,4,16,64]

Starts one node per profile (2 workers each, loopback, its own temp dir) and
measures, one profile at a time, against the same broker code:
- latency: `echo.py` with 132 bytes, one request at a time (p50, p99), back to
  back and paced 5 ms apart;
- throughput: the same with 64 requests in flight (AsyncClient);
- the fork baselines, under `trusted`: a script that forks and the child
  exits at once (end to end, one request at a time), and the same fork+exit
  timed inside the worker;
- tenants under `default` (a runner per caller and code: README "Sandbox"):
  throughput of script content from 1, 4, 16 and 64 tenants interleaved
  (16: what two workers keep warm, twice what one does), with
  the share of requests that found their tenant's runner warm, and the
  private memory per warm runner and per worker slot; beside them `strict`
  with the 64 tenants' load (a fresh runner per request either way), and
  each row's CPU per request by role (worker, zygote, runners, broker...,
  from /proc; `--tenants 64` runs that count alone).  With
  `--baseline DIR` (a checkout of another commit, e.g. `git worktree add DIR
  HEAD~3`) the same rows run against that code too.  The nodes take turns,
  `--rounds` times; each ratio printed is the median of the same round's.
With `--baseline DIR` the profile rows run on that code too, each profile
on both trees one after the other.
Targets (issue 28): default p50 <= 1.15 x trusted and default throughput >=
0.9 x trusted; strict >= 1,000 execs/s with p50 <= 1.5 ms, or (where this
machine's fork cost forbids it) strict p50 <= 1.3 x the "trusted + fork+exit
per request" row with the strict zygote's private memory (USS) <= 10 MB.
Issue 23: one tenant >= 0.95 x the baseline's, 4 tenants >= 0.8 x one, 64
tenants >= strict.  These are benchmark figures, not test asserts.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import free_port  # noqa: E402

from broker.client import AsyncClient, BrokerUnavailable, Client  # noqa: E402

DATA = b"x" * 132
GAP = 0.005  # seconds between paced requests (the design's "low load")
FORK_EXIT = """
import os
pid = os.fork()
if pid == 0:
    os._exit(0)
os.waitpid(pid, 0)
__return_data = __input_binary_data_tuple[0]
"""
FORK_EXIT_TIMED = """
import os, time
times = []
for _ in range(200):
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    times.append(time.perf_counter() - t)
times.sort()
__return_data = "%.1f %.1f" % (times[100] * 1e6, times[197] * 1e6)
"""


class Node:
    def __init__(self, root: Path, profile: str, code: Path = REPO):
        self.root, self.profile, self.code = root, profile, code
        shutil.copytree(REPO / "history", root / "history")
        (root / "history" / "fork_exit.py").write_text(FORK_EXIT)
        self.broker = f"tcp://127.0.0.1:{free_port()}"
        (root / "config.toml").write_text(f"""
[pool]
workers = 2
profile = "{profile}"
[broker]
heartbeat_interval = 0.5
[proxy]
listen = "127.0.0.1:{free_port()}"
[[node]]
name = "b{profile}"
group = 1
storage = "tcp://127.0.0.1:{free_port()}"
broker = "{self.broker}"
data_dir = "var"
[log]
level = "warning"
file = "{root / 'srw.log'}"
""")

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=str(self.code))  # before the editable install
        self.proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config",
                                      str(self.root / "config.toml")], cwd=self.root,
                                     stdout=subprocess.DEVNULL, start_new_session=True,
                                     env=env)
        deadline = time.monotonic() + 60
        with Client(self.broker) as c:
            while True:
                try:
                    if c.status(timeout=0.5)["workers"] == 2:
                        break
                except BrokerUnavailable:
                    pass
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"node with profile {self.profile} did not start")
                time.sleep(0.05)
        return self

    def cpu(self) -> dict[str, float]:
        """CPU seconds of this node's processes by role (the word after "srw: " in
        their title), with the children each has reaped: the runners that came
        and went count under "runner" (their zygote reaped them)."""
        roles: dict[str, float] = {}
        tick = os.sysconf("SC_CLK_TCK")
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue
            title = _cmdline(pid).split(b"\0", 1)[0]
            role = title[5:].split(maxsplit=1)[0].decode(errors="replace") \
                if title.startswith(b"srw: ") and title[5:].strip() else "serve"
            own, reaped = sum(map(int, fields[11:13])), sum(map(int, fields[13:15]))
            roles[role] = roles.get(role, 0.0) + own / tick
            reaper = "runner" if role == "zygote" else role
            roles[reaper] = roles.get(reaper, 0.0) + reaped / tick
        return roles

    def zygote_uss(self) -> float | None:
        """The private memory (USS, bytes) of this node's zygotes, the largest."""
        sizes = [uss(pid) for pid in descendants(self.proc.pid)
                 if _cmdline(pid).startswith(b"srw: zygote")]
        sizes = [size for size in sizes if size is not None]
        return max(sizes) if sizes else None

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait()


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def descendants(root: int) -> list[int]:
    """The processes under `root` (from /proc: ppid of each)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def uss(pid: int) -> float | None:
    """A process's private memory (Private_Clean + Private_Dirty), in bytes."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    return sum(int(line.split()[1]) * 1024 for line in lines
               if line.startswith(("Private_Clean:", "Private_Dirty:")))


def percentiles(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2] * 1e6, s[min(len(s) - 1, int(len(s) * 0.99))] * 1e6


def latency(endpoint: str, n: int, name: str = "echo.py", gap: float = 0.0) -> tuple[float, float]:
    """One request at a time; `gap` seconds between the end of one and the next."""
    times = []
    with Client(endpoint, timeout=30) as c:
        for _ in range(50):
            c.exec(name, DATA)
        for _ in range(n):
            if gap:
                time.sleep(gap)
            t = time.perf_counter()
            r = c.exec(name, DATA)
            times.append(time.perf_counter() - t)
            assert r.status == "ok", (r.status, r.error)
    return percentiles(times)


def throughput(endpoint: str, n: int, in_flight: int = 64) -> float:
    async def main():
        async with AsyncClient(endpoint, timeout=60) as c:
            sem = asyncio.Semaphore(in_flight)

            async def one():
                async with sem:
                    r = await c.exec("echo.py", DATA)
                    assert r.status == "ok", (r.status, r.error)

            t = time.perf_counter()
            await asyncio.gather(*(one() for _ in range(n)))
            return n / (time.perf_counter() - t)

    return asyncio.run(main())


TENANT_CODE = "__return_data = __input_binary_data_tuple[0]  # tenant %d\n"


def tenants_throughput(endpoint: str, n: int, tenants: int, in_flight: int = 64) -> float:
    """Script content from `tenants` tenants in turn (one caller, several codes)."""
    async def main():
        async with AsyncClient(endpoint, timeout=60) as c:
            sem = asyncio.Semaphore(in_flight)

            async def one(i):
                async with sem:
                    r = await c.exec("", DATA, code=TENANT_CODE % (i % tenants))
                    assert r.status == "ok", (r.status, r.error)

            for i in range(2 * tenants):  # each tenant seen once: warm where it can be
                await one(i)
            t = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(n)))
            return n / (time.perf_counter() - t)

    return asyncio.run(main())


def warm_figures(endpoint: str) -> tuple[dict, float | None, float | None]:
    """(warm_execs counts, USS per warm runner, sandbox USS per worker slot) in bytes."""
    with Client(endpoint) as c:
        status = c.status()
    rows = status.get("worker_rows", [])
    sandbox = [r["sandbox_uss"] for r in rows if r.get("sandbox_uss")]
    warm = sum(r.get("warm_runners", 0) for r in rows)
    per_slot = sum(sandbox) / len(sandbox) if sandbox else None
    per_runner = sum(sandbox) / warm if warm and sandbox else None
    return status.get("warm_execs", {}), per_runner, per_slot


FEW_TENANTS_ONLY = ("strict",)  # nodes whose rows are 64 tenants alone (a fresh runner each)


def tenant_rows(nodes: list[tuple[str, "Node"]], n: int, rounds: int,
                tenant_counts: tuple[int, ...] = (1, 4, 64)) -> list[tuple]:
    """Rows of (label, req/s of each round, warm share, USS per warm runner, per
    slot, CPU per request of each round) for each node and tenant count.  Each
    round runs every row once, the nodes taking turns (in the reverse order
    every other round); 64 tenants (a fork per request) run n // 4 requests."""
    rates: dict[str, list[float]] = {}
    found: dict[str, list[int]] = {}
    memory: dict[str, tuple] = {}
    cpu: dict[str, list[float]] = {}
    for i in range(rounds):
        for tenants in tenant_counts:
            for label, node in nodes[::-1 if i % 2 else 1]:
                if label.startswith(FEW_TENANTS_ONLY) and tenants != 64:
                    continue
                row = f"{label}, {tenants} tenant{'s' * (tenants > 1)}"
                before, _, _ = warm_figures(node.broker)
                count = n // 4 if tenants == 64 else n
                cpu_before = node.cpu()
                rates.setdefault(row, []).append(tenants_throughput(node.broker, count, tenants))
                # The node's processes (and the runners they reaped), warm-up requests included.
                cpu_after = node.cpu()
                cpu.setdefault(row, []).append(
                    {role: (cpu_after[role] - cpu_before.get(role, 0.0)) / (count + 2 * tenants)
                     for role in cpu_after})
                after, *figures = warm_figures(node.broker)
                memory.setdefault(row, figures)  # the first round's: after that row alone
                counts = found.setdefault(row, [0, 0])
                counts[0] += after.get("found", 0) - before.get("found", 0)
                counts[1] += after.get("missed", 0) - before.get("missed", 0)
    return [(row, rps, found[row][0] / sum(found[row]) if sum(found[row]) else None,
             *memory[row], cpu[row]) for row, rps in rates.items()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="sequential requests per profile")
    ap.add_argument("--throughput", type=int, default=4000, help="requests for throughput")
    ap.add_argument("--paced", type=int, default=400, help=f"requests {GAP * 1000:g} ms apart")
    ap.add_argument("--baseline", type=Path, help="another checkout to run the tenant rows "
                    "against, in turns with this one")
    ap.add_argument("--only-tenants", action="store_true", help="the tenant rows alone")
    ap.add_argument("--rounds", type=int, default=3, help="turns the tenant rows take")
    ap.add_argument("--tenants", default="1,4,16,64", help="the tenant rows' tenant counts")
    args = ap.parse_args()
    trees = [("", REPO)] + ([(f" @ {args.baseline.name}", args.baseline)]
                            if args.baseline else [])
    figures = {}
    with tempfile.TemporaryDirectory(prefix="srw-sandbox-bench-") as tmp:
        for label, profile in PROFILES if not args.only_tenants else ():
            for suffix, tree in trees:  # this code, then the baseline's, profile by profile
                root = Path(tmp) / f"{profile}{suffix.replace(' @ ', '-')}"
                root.mkdir()
                figures.setdefault(suffix, ([], {}, {}))
                profile_rows(root, tree, label + suffix, profile, args, *figures[suffix])
        root = Path(tmp) / "tenants"
        root.mkdir()
        (root / "base").mkdir()
        with contextlib.ExitStack() as stack:
            nodes = [("default", stack.enter_context(Node(root, "default")))]
            if args.baseline:
                old = stack.enter_context(Node(root / "base", "default", args.baseline))
                nodes.append((f"default @ {args.baseline.name}", old))
            (root / "strict").mkdir()
            nodes.append(("strict (fork)", stack.enter_context(Node(root / "strict", "strict"))))
            tenant_table = tenant_rows(nodes, args.throughput, args.rounds,
                                       tuple(int(x) for x in args.tenants.split(",")))
    for suffix, (rows, base, rates) in figures.items():
        print_profiles(rows, base, rates, suffix)
    print_tenants(tenant_table, figures[""][2].get("strict") if figures else None)
    return 0


PROFILES = (("no sandbox (trusted)", "trusted"), ("default", "default"),
            ("strict (fork)", "strict"))


def profile_rows(root: Path, tree: Path, label: str, profile: str, args, rows: list,
                 base: dict, rates: dict) -> None:
    """One profile's rows on the code in `tree`, added to rows, base (p50s) and rates."""
    with Node(root, profile, tree) as node:
        p50, p99 = latency(node.broker, args.requests)
        rps = rates[profile] = throughput(node.broker, args.throughput)
        rows.append((label, p50, p99, rps))
        g50, g99 = latency(node.broker, args.paced, gap=GAP)
        rows.append((f"  same, requests {GAP * 1000:g} ms apart", g50, g99, None))
        base[profile] = p50
        base[profile + " paced"] = g50
        if profile == "strict":
            base["zygote uss"] = node.zygote_uss()
        if profile == "trusted":
            f50, f99 = latency(node.broker, args.requests // 2, "fork_exit.py")
            rows.append(("trusted + fork+exit per request", f50, f99, None))
            g50, g99 = latency(node.broker, args.paced, "fork_exit.py", gap=GAP)
            rows.append((f"  same, requests {GAP * 1000:g} ms apart", g50, g99, None))
            base["fork"], base["fork paced"] = f50, g50
            with Client(node.broker, timeout=30) as c:
                inner = c.exec("", code=FORK_EXIT_TIMED).data.decode().split()
            rows.append(("  fork+exit+wait inside the worker", float(inner[0]),
                         float(inner[1]), None))
            base["inner"] = float(inner[0])


def print_profiles(rows: list, base: dict, rates: dict, suffix: str) -> None:
    """The rows of one tree, then issue 28's targets for it."""
    print(f"\n{'path' + suffix:40} {'p50 us':>8} {'p99 us':>8} {'req/s (64 in flight)':>21}")
    for label, p50, p99, rps in rows:
        print(f"{label:40} {p50:8.0f} {p99:8.0f} {rps and f'{rps:21.0f}' or '-':>21}")
    for how, key in (("back to back", ""), (f"{GAP * 1000:g} ms apart", " paced")):
        print(f"{how}: default p50 / trusted p50 = "
              f"{base['default' + key] / base['trusted' + key]:.2f} (target <= 1.15); strict "
              f"p50 {base['strict' + key] / 1000:.2f} ms (target <= 1.5), / trusted + "
              f"fork+exit per request p50 = {base['strict' + key] / base['fork' + key]:.2f} "
              "(else target <= 1.3)")
    zygote = base.get("zygote uss")
    print(f"64 in flight: default / trusted = {rates['default'] / rates['trusted']:.2f} "
          f"(target >= 0.9); strict {rates['strict']:.0f} execs/s (target >= 1000); the "
          f"strict zygote's USS {f'{zygote / 2**20:.1f} MB' if zygote else '-'} "
          "(target <= 10 MB with the 1.3 x fork+exit row)")
    fast = base["strict"] <= 1500 and rates["strict"] >= 1000
    bounded = base["strict"] <= 1.3 * base["fork"] and zygote is not None and zygote <= 10 << 20
    print(f"strict target (>= 1,000 execs/s and p50 <= 1.5 ms, or within 1.3 x the fork+exit "
          f"row with a zygote of <= 10 MB USS): {'met' if fast or bounded else 'not met'}"
          f"{' (the first)' if fast else ' (the second)' if bounded else ''}")


def print_tenants(tenant_table: list, strict: float | None) -> None:
    """The rows (median req/s and the node's CPU per request, and each round's),
    then the targets' ratios, each the median of the ratios within a round.  The
    CPU per request (the node's processes, client apart) moves less with the
    machine's load than the rate does."""
    print(f"\n{'script content, 64 in flight':36} {'req/s':>7} {'CPU/req':>8} {'warm':>5} "
          f"{'USS/warm runner':>15} {'USS/slot':>9}  req/s, CPU us/req by round")
    rates, cpus, roles = {}, {}, {}
    for label, rps, share, per_runner, per_slot, by_role in tenant_table:
        cpu = [sum(r.values()) for r in by_role]
        roles[label] = by_role
        rates[label], cpus[label] = rps, [1 / c if c else 0.0 for c in cpu]
        print(f"{label:36} {median(rps):7.0f} {median(cpu) * 1e6:5.0f} us "
              f"{f'{share:.0%}' if share is not None else '-':>5} "
              f"{f'{per_runner / 2**20:.1f} MB' if per_runner else '-':>15} "
              f"{f'{per_slot / 2**20:.1f} MB' if per_slot else '-':>9}  "
              + " ".join(f"{x:.0f}" for x in rps) + ", "
              + " ".join(f"{x * 1e6:.0f}" for x in cpu))

    def ratio(a: str, b: str) -> str:
        """Of the rates, then of the inverse CPU per request (requests per CPU second)."""
        if a not in rates or b not in rates:
            return "-"
        by_round = [x / y for x, y in zip(rates[a], rates[b])]
        per_cpu = [x / y if y else 0.0 for x, y in zip(cpus[a], cpus[b])]
        return (f"{median(by_round):.2f} (rounds: {' '.join(f'{r:.2f}' for r in by_round)}; "
                f"per CPU second {median(per_cpu):.2f})")
    for node in dict.fromkeys(label.rsplit(",", 1)[0] for label in rates):
        if node.startswith(FEW_TENANTS_ONLY):
            continue
        print(f"{node}: 4 tenants / 1 tenant = {ratio(f'{node}, 4 tenants', f'{node}, 1 tenant')}"
              f" (target >= 0.8); 64 tenants / strict = "
              f"{ratio(f'{node}, 64 tenants', 'strict (fork), 64 tenants')} (target >= 1)")
        base = next((b for b in rates if b.endswith(", 1 tenant") and b.startswith(f"{node} @")),
                    None)
        if base:
            print(f"{node}: 1 tenant / {base} = {ratio(f'{node}, 1 tenant', base)} "
                  "(target >= 0.95)")
    if strict:
        print(f"strict (fork), echo.py above: {strict:.0f}/s")
    print_roles(roles)


ROLES = ("worker", "zygote", "runner", "broker", "pool", "storage", "proxy", "serve")


def print_roles(roles: dict[str, list[dict[str, float]]]) -> None:
    """CPU per request by role (median of the rounds), runners including those
    their zygote reaped."""
    print(f"\n{'CPU us per request, by role':36} " + " ".join(f"{r:>7}" for r in ROLES))
    for label, by_round in roles.items():
        print(f"{label:36} " + " ".join(
            f"{median([r.get(role, 0.0) for r in by_round]) * 1e6:7.0f}" for role in ROLES))


def median(values: list[float]) -> float:
    s = sorted(values)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


if __name__ == "__main__":
    sys.exit(main())
