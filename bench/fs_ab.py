"""Two trees' mounts and the mfusepy passthrough, side by side, measured in turns.

    .venv/bin/python bench/fs_ab.py OLD_TREE [NEW_TREE] [--mib 256] [--rounds 6]
        [--new-option=--no-local-reads] [--write-only]

Starts one node and one mount from each tree (`PYTHONPATH=<tree> srw serve`
and `srw mount`, so e.g. a `git worktree add --detach` of the parent commit
against this one), and fs_bench.py's passthrough of a tmpfs directory; then,
round after round, each of the three writes a file of `--mib` MiB, reads it
back, and makes 1,000 random 4 KiB reads in it (fs_bench.py's rows), each
read with the file's pages dropped from the kernel's cache first and then
again as it is; then `tar -x` of this repository's files (`--write-only`:
the write alone).  Each tree's write row also says how many LMDB write
transactions (each one synced commit under `sync = true`) its node made per
MiB written (the truncation and the size at close included).  Taking
turns within one run puts both trees under the same load, which on a shared
machine moves every figure more than any change; the medians of the
per-round ratios to the passthrough are printed last.  Not part of the test
suite.  Everything started is stopped and unmounted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import lmdb

import fs_bench
from common import REPO, wait_for, write_config

def random_reads(folder: Path, size: int) -> float:
    return fs_bench.random_reads(folder, size, 1000)


# Each read row first drops the file's pages from the kernel's cache (the way to
# the store: what the targets are about); its "again" row reads the same
# once more as it is (the page cache, if the mount keeps it from one open to the next).
ROWS = (("write MB/s", fs_bench.big_write), ("read MB/s", fs_bench.cold(fs_bench.big_read)),
        ("read again MB/s", fs_bench.big_read),
        ("random 4 KiB ops/s", fs_bench.cold(random_reads)),
        ("random again ops/s", random_reads))
TARBALL: list = []      # (this repository's tracked files as a tar, their count), made once


def tar_x(folder: Path, size: int) -> float:
    """`tar -x` of this repository (fs_bench.source_tar) into a fresh directory."""
    shutil.rmtree(folder / "src", ignore_errors=True)
    return fs_bench.untar(folder, *TARBALL)


ROWS = [*ROWS, ("tar -x files/s", tar_x)]


def start(tree: Path, procs: list, roots: list, options: list[str]) -> Path:
    """A node and its mount (`srw mount OPTIONS`), both running `tree`'s code;
    the mount point."""
    root = Path(tempfile.mkdtemp(prefix="srw-fs-ab-"))
    roots.append(root)
    cfg = write_config(root, workers=2, log_level="warning")
    env = {**os.environ, "PYTHONPATH": str(tree)}
    procs.append(subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config", str(cfg)],
                                  cwd=root, env=env, stdout=subprocess.DEVNULL,
                                  start_new_session=True))
    wait_for(lambda: fs_bench.ready(cfg), 90, f"srw serve of {tree}")
    mnt = root / "mnt"
    mnt.mkdir()
    procs.append(subprocess.Popen([sys.executable, "-m", "srw", "mount", str(mnt), "--config",
                                   str(cfg), *options], cwd=root, env=env,
                                  start_new_session=True))
    wait_for(lambda: os.path.ismount(mnt), 30, f"the mount of {tree}")
    return mnt


def passthrough(procs: list, roots: list) -> Path:
    through, mnt = Path(tempfile.mkdtemp(dir="/dev/shm")), Path(tempfile.mkdtemp())
    roots += [through, mnt]
    procs.append(subprocess.Popen([sys.executable, fs_bench.__file__, "--passthrough",
                                   str(through), str(mnt)], start_new_session=True))
    wait_for(lambda: os.path.ismount(mnt), 30, "the passthrough mount")
    return mnt


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def commits(mnt: Path):
    """A function giving the number of write transactions committed so far by
    the store of the node behind `mnt` (start's layout; LMDB's last txnid),
    or None for the passthrough."""
    store = mnt.parent / "var" / "n1" / "store"
    if not store.is_dir():
        return None
    env = lmdb.open(str(store), readonly=True, max_dbs=1)
    return lambda: env.info()["last_txnid"]


def measure(mounts: dict[str, Path], size: int, rounds: int) -> None:
    results = {name: [] for name in mounts}
    counters = {name: commits(mnt) for name, mnt in mounts.items()}
    for r in range(rounds):
        print(f"round {r + 1}, load {load()}", flush=True)
        for name, mnt in mounts.items():
            count, before = counters[name], counters[name] and counters[name]()
            row = [ROWS[0][1](mnt, size)]   # the write, its commits counted
            synced = f"  ({(count() - before) / (size >> 20):.2f} commits/MiB)" if count else ""
            row += [measure_row(mnt, size) for measure_row in (f for _, f in ROWS[1:])]
            results[name].append(row)
            print(f"  {name:12}" + "".join(f"  {what.split()[0]}{'+' * ('again' in what)} "
                                           f"{value:8,.0f}" for (what, _), value in zip(ROWS, row))
                  + synced, flush=True)
    print(f"load at the end {load()}; median of the per-round ratios to the passthrough:")
    for i, (what, _) in enumerate(ROWS):
        ratios = {name: statistics.median(results[name][r][i] / results["passthrough"][r][i]
                                          for r in range(rounds))
                  for name in ("old", "new")}
        print(f"  {what:20} old {ratios['old']:.2f}   new {ratios['new']:.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", type=Path)
    parser.add_argument("new", type=Path, nargs="?", default=REPO)
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--write-only", action="store_true",
                        help="only the sequential write row (more rounds in the same time)")
    parser.add_argument("--new-option", action="append", default=[], metavar="OPTION",
                        help="an option of the new tree's `srw mount` (repeatable), "
                        "e.g. --new-option=--no-local-reads")
    args = parser.parse_args()
    if args.write_only:
        del ROWS[1:]
    procs: list[subprocess.Popen] = []
    roots: list[Path] = []
    mounts: dict[str, Path] = {}
    try:
        mounts["old"] = start(args.old.resolve(), procs, roots, [])
        mounts["new"] = start(args.new.resolve(), procs, roots, args.new_option)
        mounts["passthrough"] = passthrough(procs, roots)
        TARBALL.extend(fs_bench.source_tar(roots[0]))   # a plain directory
        measure(mounts, args.mib << 20, args.rounds)
    finally:
        for mnt in mounts.values():
            subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        fs_bench.stop(procs)
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
