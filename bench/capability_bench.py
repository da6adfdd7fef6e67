"""Capability bench: what a script's store call costs with CurveZMQ on, against a baseline tree.

    .venv/bin/python bench/capability_bench.py --baseline /path/to/worktree-of-main \
        [--calls 1000] [--rounds 5]

Starts two one-node clusters with curve on (one worker, default profile,
sync off so that writes measure the call, not the disk): one on this tree,
one on the baseline tree (``git worktree add ../base main``; its code runs
with PYTHONPATH pointing at it).  A script (calls.py) times, inside the
runner, `calls` n.read_data and `calls` n.write_data of a 100-byte value on
its node; the two nodes take turns (--rounds), so their ratio comes from the
same moments of the machine.  Prints per round and the median of rounds, in
microseconds per call.  Figures only; nothing here is a pass/fail test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from exec_bench import curve_of, write_config  # noqa: E402

from broker.client import BrokerUnavailable, Client  # noqa: E402

INIT = """
from storage.handle import StorageHandle
n = StorageHandle()
"""
CALLS = """
import time
key = __input_binary_data_tuple[0].decode()
count = int(__cookie_string)
n.write_data(key, b"v" * 100)
started = time.perf_counter()
for _ in range(count):
    n.read_data(key)
read = time.perf_counter() - started
started = time.perf_counter()
for _ in range(count):
    n.write_data(key, b"v" * 100)
write = time.perf_counter() - started
__return_data = f"{read / count * 1e6:.2f} {write / count * 1e6:.2f}"
"""


class Node:
    def __init__(self, tree: Path, root: Path):
        config = write_config(root, 1, init=INIT, curve=True)
        (root / "history" / "calls.py").write_text(CALLS)
        text = config.read_text().replace('data_dir = "var"', 'data_dir = "var"\nsync = false')
        config.write_text(text)
        import tomllib
        self.endpoint = tomllib.loads(text)["node"][0]["broker"]
        env = {**os.environ, "PYTHONPATH": str(tree)}
        self.proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config",
                                      str(config)], cwd=tree, env=env,
                                     stdout=subprocess.DEVNULL, start_new_session=True)
        self.client = Client(self.endpoint, timeout=60, curve=curve_of(config))
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.client.status(timeout=0.5)["workers"] >= 1:
                    break
            except BrokerUnavailable:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"node did not start; see {root}/srw.log")
            time.sleep(0.05)

    def measure(self, calls: int) -> tuple[float, float]:
        result = self.client.exec("calls.py", b"bench-key", cookie=str(calls))
        if not result.ok:
            raise SystemExit(f"calls.py: {result.status}: {result.error}")
        read, write = result.data.split()
        return float(read), float(write)

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", required=True, type=Path)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    trees = {"this tree": REPO, "baseline": args.baseline.resolve()}
    with tempfile.TemporaryDirectory() as tmp:
        nodes = {}
        try:
            for name, tree in trees.items():
                (Path(tmp) / name.replace(" ", "-")).mkdir()
                nodes[name] = Node(tree, Path(tmp) / name.replace(" ", "-"))
            for node in nodes.values():
                node.measure(args.calls // 10)  # warm: a runner, its session, its connections
            figures = {name: [] for name in nodes}
            for r in range(args.rounds):
                for name, node in nodes.items():
                    figures[name].append(node.measure(args.calls))
                print(f"round {r + 1}: " + "; ".join(
                    f"{name} read {f[-1][0]:.1f} us write {f[-1][1]:.1f} us"
                    for name, f in figures.items()), flush=True)
        finally:
            for node in nodes.values():
                node.stop()
    med = {name: (statistics.median(x[0] for x in f), statistics.median(x[1] for x in f))
           for name, f in figures.items()}
    best = {name: (min(x[0] for x in f), min(x[1] for x in f)) for name, f in figures.items()}
    for label, table in (("median of rounds", med), ("best round", best)):
        print(f"\n{'us per store call, ' + label:40} {'read':>8} {'write':>8}")
        for name, (read, write) in table.items():
            print(f"{name:40} {read:8.1f} {write:8.1f}")
        ours, base = table["this tree"], table["baseline"]
        print(f"{'this tree / baseline':40} {ours[0] / base[0]:8.2f} {ours[1] / base[1]:8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
