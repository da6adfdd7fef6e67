"""Directories and the mount, next to a local tmpfs directory, in one run.

    .venv/bin/python bench/fs_bench.py [--files N] [--big N] [--mb N]

Starts one node (`srw serve`, default profile, sync on) in a temporary folder
and mounts it (`srw mount`), then times the same operations on the mount, on
a tmpfs directory (/dev/shm) and, where it applies, through FsClient (the
Python API, no kernel in between): creating N empty files in one directory,
stat of each, listing a directory of `--big` entries (filled through
FsClient), and writing and reading 1 MB files.  Not part of the test suite.
Everything started is stopped and unmounted.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import wait_for, write_config  # noqa: E402

from fs.client import FsClient  # noqa: E402
from storage.client import Session  # noqa: E402

MB = 1 << 20
ATTR_TIMEOUT = 1.1   # libfuse's default attr_timeout and entry_timeout (1 s), and a bit


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def creates(folder: Path, n: int) -> float:
    folder.mkdir()
    return n / timed(lambda: [open(folder / f"f{i}", "wb").close() for i in range(n)])


def stats(folder: Path, n: int) -> float:
    return n / timed(lambda: [os.stat(folder / f"f{i}") for i in range(n)])


def write_mb(folder: Path, n: int) -> float:
    block = os.urandom(MB)

    def write():
        for i in range(n):
            with open(folder / f"mb{i}", "wb") as f:
                f.write(block)
    return n / timed(write)


def read_mb(folder: Path, n: int) -> float:
    def read():
        for i in range(n):
            assert len((folder / f"mb{i}").read_bytes()) == MB
    return n / timed(read)


def fill(cfg: Path, path: str, n: int, threads: int = 4) -> float:
    """n empty files in `path` through FsClient, from `threads` clients; files/s."""
    def work(t):
        with Session(cfg) as session:
            fs = FsClient(session)
            for i in range(t, n, threads):
                fs.create(f"{path}/e{i}")
    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return n / (time.perf_counter() - started)


def row(what: str, mount: float, local: float, api: float | None, unit: str) -> None:
    api_text = f"{api:>12,.0f}" if api is not None else f"{'-':>12}"
    print(f"{what:34} {mount:>12,.0f} {local:>12,.0f} {api_text}  {unit}"
          f"   (mount/tmpfs {mount / local:.3f})")


def run(args, root: Path, procs: list) -> None:
    cfg = write_config(root, workers=2, log_level="warning")
    serve = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config", str(cfg)],
                             cwd=root, stdout=subprocess.DEVNULL, start_new_session=True)
    procs.append(serve)
    wait_for(lambda: ready(cfg), 60, "srw serve")
    mnt = root / "mnt"
    mnt.mkdir()
    mount = subprocess.Popen([sys.executable, "-m", "srw", "mount", str(mnt), "--config",
                              str(cfg)], cwd=root, start_new_session=True)
    procs.append(mount)
    wait_for(lambda: os.path.ismount(mnt), 30, "the mount")
    shm = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        measure(args, cfg, mnt, shm)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        subprocess.run(["fusermount3", "-u", str(mnt)], timeout=30)
        mount.wait(30)


def ready(cfg: Path) -> bool:
    with Session(cfg, timeout=1.0) as session:
        try:
            FsClient(session).readdir("/")
            return True
        except OSError:
            return False


def measure(args, cfg: Path, mnt: Path, shm: Path) -> None:
    n = args.files
    print(f"{'operation':34} {'mount':>12} {'tmpfs':>12} {'FsClient':>12}")
    with Session(cfg) as session:
        fs = FsClient(session)
        fs.mkdir("/api")
        api_creates = n / timed(lambda: [fs.create(f"/api/f{i}") for i in range(n)])
        row(f"create, {n} in one directory", creates(mnt / "c", n), creates(shm / "c", n),
            api_creates, "files/s")
        api_stats = n / timed(lambda: [fs.stat(f"/api/f{i}") for i in range(n)])
        time.sleep(ATTR_TIMEOUT)   # else the kernel answers from its attribute cache
        row(f"stat of those {n} (uncached)", stats(mnt / "c", n), stats(shm / "c", n),
            api_stats, "stats/s")
        fs.mkdir("/big")
        filled = fill(cfg, "/big", args.big)
        print(f"(filled /big with {args.big:,} entries through FsClient, 4 clients: "
              f"{filled:,.0f} files/s)")
        (shm / "big").mkdir()
        for i in range(args.big):
            open(shm / "big" / f"e{i}", "wb").close()
        mount_ls = timed(lambda: os.listdir(mnt / "big"))
        api_ls = timed(lambda: fs.readdir("/big"))
        local_ls = timed(lambda: os.listdir(shm / "big"))
        assert len(os.listdir(mnt / "big")) == args.big
        row(f"readdir of {args.big:,} entries", args.big / mount_ls, args.big / local_ls,
            args.big / api_ls, "entries/s")
        print(f"{'':34} {mount_ls * 1e3:>10.1f}ms {local_ls * 1e3:>10.1f}ms "
              f"{api_ls * 1e3:>10.1f}ms  per listing")
    row(f"write 1 MB files ({args.mb})", write_mb(mnt, args.mb), write_mb(shm, args.mb),
        None, "MB/s")
    row(f"read 1 MB files ({args.mb})", read_mb(mnt, args.mb), read_mb(shm, args.mb),
        None, "MB/s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=20)
    args = parser.parse_args()
    procs: list[subprocess.Popen] = []
    root = Path(tempfile.mkdtemp(prefix="srw-fs-bench-"))
    try:
        run(args, root, procs)
    finally:
        for proc in reversed(procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
