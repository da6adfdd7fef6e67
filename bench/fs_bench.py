"""Directories and the mount, next to a local tmpfs directory, in one run.

    .venv/bin/python bench/fs_bench.py [--files N] [--big N] [--mb N] [--gib N]
                                       [--huge N] [--dirs-only]

Starts one node (`srw serve`, default profile, sync on) in a temporary folder
and mounts it (`srw mount`), then times the same operations on the mount, on
a tmpfs directory (/dev/shm) and, where it applies, through FsClient (the
Python API, no kernel in between): creating N empty files in one directory,
stat of each, listing a directory of `--big` entries (filled through
FsClient), and writing and reading 1 MB files.  Then one large file
(`--gib`, default 1 GiB): a sequential write and read (MB/s), random 4 KiB
reads in it (ops/s), each read first with the file's pages dropped from the
kernel's cache (`uncached`) and then again as it is (the mount keeps them
from one open to the next), and `tar -x` of a source tree (this repository's
tracked files), each also through a minimal mfusepy passthrough of a tmpfs
directory (`Passthrough` below, its own process): what any FUSE filesystem
in Python pays.  First (`--huge`, default 100,000 entries; `--dirs-only` for
these rows alone) creates and lookups in a directory of that many entries
against an empty one (creates) and one of 100 (lookups), through FsClient
and the mount.  Not part of the test suite.  Everything started is stopped
and unmounted.
"""
from __future__ import annotations

import argparse
import os
import random
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

import msgpack  # noqa: E402

from fs import shape  # noqa: E402
from fs.client import FsClient, bucket_key  # noqa: E402
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


def scale(args, cfg: Path, mnt: Path) -> None:
    """Create and lookup in a directory of --huge entries against an empty one
    (a create) or one of 100 (a lookup), through FsClient and the mount, the
    two directories taking turns in rounds so that load hits both alike."""
    with Session(cfg) as session:
        fs = FsClient(session)
        for where in ("/huge", "/empty", "/small"):
            fs.mkdir(where)
        fill(cfg, "/small", 100, threads=1)
        made = timed(lambda: plant(session, fs.stat("/huge").ino, args.huge))
        print(f"(/huge: {args.huge:,} entries written straight into buckets in {made:.1f} s)")
        print(f"{'operation':34} {'huge':>12} {'empty/100':>12} {'ratio':>12}")
        rounds, n = 5, args.files // 5
        spent = {"/huge": [0.0, 0.0, 0.0, 0.0], "/empty": [0.0, 0.0, 0.0, 0.0]}
        rng = random.Random(1)
        for r in range(rounds):
            for where, full in (("/huge", "/huge"), ("/empty", "/small")):
                t = spent[where]
                t[0] += timed(lambda: [fs.create(f"{where}/api{r}-{i}") for i in range(n)])
                t[1] += timed(lambda: [creates_in(mnt / where[1:], f"m{r}-{i}")
                                       for i in range(n)])
                names = [f"e{rng.randrange(args.huge if full == '/huge' else 100)}"
                         for _ in range(n)]
                t[2] += timed(lambda: [fs.stat(f"{full}/{name}") for name in names])
                t[3] += timed(lambda: [os.stat(mnt / full[1:] / f"{name}") for name in
                                       names])  # a name the kernel may have cached: see README
        total = rounds * n
        for i, what in enumerate(("create (FsClient)", "create (mount)", "lookup (FsClient)",
                                  "lookup, stat (mount)")):
            huge, small = total / spent["/huge"][i], total / spent["/empty"][i]
            print(f"{what:34} {huge:>12,.0f} {small:>12,.0f} {huge / small:>12.2f}  ops/s")


def plant(session: Session, ino: str, n: int) -> None:
    """Directory `ino` with entries e0..e{n-1}, written straight into buckets
    (`shape.layout`): 100,000 creates take minutes, hours on a loaded machine."""
    entries = {f"e{i}": [f"{i + 1:016x}", "f", 0o644, 0, 1.7e9] for i in range(n)}
    head, buckets = shape.layout(entries, os.urandom(shape.SALT))
    assert max(map(len, buckets.values())) <= 128, "a bucket over 128: run again"
    for at, bucket in buckets.items():
        session.write(bucket_key(ino, *at), msgpack.packb(bucket))
    session.write(f"fs:d:{ino}", msgpack.packb(head))


def creates_in(folder: Path, name: str) -> None:
    open(folder / name, "wb").close()


def big_write(folder: Path, size: int) -> float:
    block = os.urandom(MB)

    def write():
        fd = os.open(folder / "large", os.O_CREAT | os.O_WRONLY | os.O_TRUNC)
        try:
            for _ in range(size // MB):
                os.write(fd, block)
        finally:
            os.close(fd)
    return size / MB / timed(write)


def big_read(folder: Path, size: int) -> float:
    def read():
        fd = os.open(folder / "large", os.O_RDONLY)
        try:
            while os.read(fd, MB):
                pass
        finally:
            os.close(fd)
    return size / MB / timed(read)


def uncached(folder: Path) -> None:
    """Drop the kernel's pages of the large file (on every mount alike): a read
    row then measures the way to the file's store, not the page cache, which
    srw's mount keeps from one open to the next (close-to-open)."""
    fd = os.open(folder / "large", os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def cold(measure):
    """`measure(folder, size, ...)` with the large file's pages dropped first."""
    def run(folder: Path, size: int, *args) -> float:
        uncached(folder)
        return measure(folder, size, *args)
    return run


def random_reads(folder: Path, size: int, n: int = 2000) -> float:
    rng = random.Random(1)
    offsets = [rng.randrange(size // 4096) * 4096 for _ in range(n)]

    def read():
        fd = os.open(folder / "large", os.O_RDONLY)
        try:
            for at in offsets:
                os.pread(fd, 4096, at)
        finally:
            os.close(fd)
    return n / timed(read)


def untar(folder: Path, tarball: Path, files: int) -> float:
    (folder / "src").mkdir()
    return files / timed(lambda: subprocess.run(["tar", "-C", str(folder / "src"), "-xf",
                                                 str(tarball)], check=True))


def source_tar(root: Path) -> tuple[Path, int]:
    """This repository's tracked files as a tar (git archive), and their count."""
    tarball = root / "src.tar"
    subprocess.run(["git", "-C", str(REPO), "archive", "-o", str(tarball), "HEAD"], check=True)
    files = subprocess.run(["tar", "-tf", str(tarball)], capture_output=True, text=True,
                           check=True).stdout.split()
    return tarball, sum(1 for f in files if not f.endswith("/"))


def row3(what: str, mount: float, local: float, passthrough: float, unit: str) -> None:
    print(f"{what:34} {mount:>12,.0f} {local:>12,.0f} {passthrough:>12,.0f}  {unit}"
          f"   (mount/passthrough {mount / passthrough:.2f})")


class Passthrough:
    """The least a FUSE filesystem in Python does: every call passed to a
    directory of tmpfs, one thread (as srw mount)."""

    def __init__(self, root: str):
        self.root = root

    def _p(self, path: str) -> str:
        return self.root + path

    def getattr(self, path, fh=None):
        st = os.lstat(self._p(path))
        return {k: getattr(st, k) for k in ("st_mode", "st_nlink", "st_size", "st_uid",
                                            "st_gid", "st_atime", "st_mtime", "st_ctime")}

    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._p(path))

    def mkdir(self, path, mode):
        os.mkdir(self._p(path), mode)

    def unlink(self, path):
        os.unlink(self._p(path))

    def rmdir(self, path):
        os.rmdir(self._p(path))

    def rename(self, old, new):
        os.rename(self._p(old), self._p(new))

    def chmod(self, path, mode):
        os.chmod(self._p(path), mode)

    def chown(self, path, uid, gid):
        os.chown(self._p(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._p(path), times)

    def symlink(self, target, source):
        os.symlink(source, self._p(target))

    def readlink(self, path):
        return os.readlink(self._p(path))

    def create(self, path, mode, fi=None):
        return os.open(self._p(path), os.O_CREAT | os.O_RDWR | os.O_TRUNC, mode)

    def open(self, path, flags):
        return os.open(self._p(path), flags)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        os.truncate(self._p(path), length)

    def flush(self, path, fh):
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        return 0


def passthrough_main(root: str, mountpoint: str) -> None:
    import mfusepy
    ops = type("PassthroughOps", (Passthrough, mfusepy.Operations), {"use_ns": True})(root)
    mfusepy.FUSE(ops, mountpoint, foreground=True, nothreads=True, fsname="passthrough")


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
        if args.huge:
            scale(args, cfg, mnt)
        if not args.dirs_only:
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
    large(args, mnt, shm)


def large(args, mnt: Path, shm: Path) -> None:
    """The large-file and tar rows: the mount, tmpfs, and the passthrough."""
    size = int(args.gib * (1 << 30)) // MB * MB
    through = Path(tempfile.mkdtemp(dir="/dev/shm"))
    pmnt = Path(tempfile.mkdtemp())
    proc = subprocess.Popen([sys.executable, __file__, "--passthrough", str(through),
                             str(pmnt)], start_new_session=True)
    try:
        wait_for(lambda: os.path.ismount(pmnt), 30, "the passthrough mount")
        tarball, files = source_tar(shm)
        label = f"{size / (1 << 30):g} GiB"
        print(f"{'operation':34} {'mount':>12} {'tmpfs':>12} {'passthrough':>12}")
        results = {}
        for name, folder in (("mount", mnt), ("tmpfs", shm), ("passthrough", pmnt)):
            results[name] = (big_write(folder, size), cold(big_read)(folder, size),
                             big_read(folder, size), cold(random_reads)(folder, size),
                             random_reads(folder, size), untar(folder, tarball, files))
        for i, (what, unit) in enumerate(((f"sequential write, {label}", "MB/s"),
                                          (f"sequential read, {label}", "MB/s"),
                                          ("  read again (page cache kept?)", "MB/s"),
                                          (f"random 4 KiB reads in {label}", "ops/s"),
                                          ("  the same again", "ops/s"),
                                          (f"tar -x of {files} files", "files/s"))):
            row3(what, results["mount"][i], results["tmpfs"][i], results["passthrough"][i],
                 unit)
    finally:
        subprocess.run(["fusermount3", "-u", str(pmnt)], timeout=30)
        proc.wait(30)
        shutil.rmtree(through, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=500)
    parser.add_argument("--big", type=int, default=10_000)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--huge", type=int, default=100_000,
                        help="entries of the large directory of the scale rows (0: none)")
    parser.add_argument("--dirs-only", action="store_true",
                        help="only the scale rows (create and lookup in --huge)")
    parser.add_argument("--passthrough", nargs=2, metavar=("ROOT", "MOUNTPOINT"),
                        help=argparse.SUPPRESS)     # the passthrough's own process
    args = parser.parse_args()
    if args.passthrough:
        passthrough_main(*args.passthrough)
        return 0
    procs: list[subprocess.Popen] = []
    root = Path(tempfile.mkdtemp(prefix="srw-fs-bench-"))
    try:
        run(args, root, procs)
    finally:
        stop(procs)
        shutil.rmtree(root, ignore_errors=True)
    return 0


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM each process started, last first (SIGKILL after 20 s)."""
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
