"""`srw mount`: the same checks as test_fs.py, through the kernel (FUSE)."""
from __future__ import annotations

import errno
import hashlib
import itertools
import os
import random
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import msgpack
import psutil
import pytest
from hypothesis.stateful import run_state_machine_as_test

from fs import shape
from fs.client import CHUNK, FsClient, bucket_key, chunk_key
from fs.mount import DIRTY, SENDING
from storage.client import NotFound, Session

from conftest import retire
from fs_support import (RANDOM_OPS, LocalTree, SameTree, in_threads, mount, needs_fuse,
                        start_cluster, unmount)

pytestmark = needs_fuse
# [fs] max_file of the module's cluster: past 10 GiB (the sparse write), and
# no default's.
MAX_FILE = (12 << 30) + 12345


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    # max_value is one chunk: a file several times max_value must still work.
    cluster = start_cluster(tmp_path_factory.mktemp("fsmount"), groups=1, max_value=CHUNK)
    with cluster.path.open("a") as config:     # read by the mount and by Session
        config.write(f"\n[fs]\nmax_file = {MAX_FILE}\n")
    yield cluster
    retire([cluster])


@pytest.fixture(scope="module")
def mounted(cluster):
    where = cluster.root / "mnt"
    proc = mount(cluster, where, "--allow-other", "--default-permissions")
    try:
        yield where, proc
    finally:
        unmount(proc, where)


@pytest.fixture(scope="module")
def mnt(mounted):
    return mounted[0]


@pytest.fixture(scope="module")
def remote(cluster):
    """A second mount that reads every value over the network (the one above
    reads from the node's store in its own process: storage/local_read.py)."""
    where = cluster.root / "mnt-remote"
    proc = mount(cluster, where, "--no-local-reads")
    try:
        yield where, proc
    finally:
        unmount(proc, where)


@pytest.fixture
def fs(cluster):
    with Session(cluster.path) as session:
        yield FsClient(session)


def stored(fs: FsClient, path: str) -> list[int]:
    """Which of the file's first 16 chunks are in the store."""
    ino, found = fs.stat(path).ino, []
    for n in range(16):
        try:
            fs.session.read(chunk_key(ino, n))
            found.append(n)
        except NotFound:
            pass
    return found


def sh(script: str, cwd: Path) -> str:
    out = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                         capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr.decode()
    return out.stdout.decode()


def test_shell_tools_work_on_the_mount(mnt, tmp_path):
    source = tmp_path / "blob"
    source.write_bytes(os.urandom(300_000))
    sh(f"mkdir tools tools/sub && cp {source} tools/sub/blob && echo hello > tools/hi",
       mnt)
    assert sh("cat tools/hi", mnt) == "hello\n"
    assert (mnt / "tools/sub/blob").read_bytes() == source.read_bytes()
    long = sh("ls -l tools/sub", mnt).splitlines()
    assert long[1].split()[0] == "-rw-r--r--" and long[1].split()[4] == "300000"
    sh("mv tools/sub/blob tools/moved && mv tools/hi tools/sub/hi", mnt)
    assert sorted(sh("find tools", mnt).split()) == \
        ["tools", "tools/moved", "tools/sub", "tools/sub/hi"]
    assert sh("du -s --apparent-size -B1 tools/moved", mnt).split()[0] == "300000"
    sh("rm -r tools/sub && rm tools/moved && rmdir tools", mnt)
    assert not (mnt / "tools").exists()
    failed = subprocess.run(["rmdir", str(mnt / "nope")], capture_output=True, timeout=15)
    assert failed.returncode == 1 and b"No such file or directory" in failed.stderr


def test_200_concurrent_creates_through_the_kernel(mnt):
    (mnt / "many").mkdir()

    def create(i):
        for k in range(25):
            (mnt / "many" / f"f{i}-{k}").write_bytes(b"%d" % k)
    in_threads(create, 8)
    assert sorted(os.listdir(mnt / "many")) == \
        sorted(f"f{i}-{k}" for i in range(8) for k in range(25))


def test_exclusive_creates_of_one_name_have_one_winner(mnt):
    (mnt / "excl").mkdir()
    won = []

    def create(i):
        try:
            os.close(os.open(mnt / "excl" / "one", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            won.append(i)
        except FileExistsError:
            pass
    in_threads(create, 8)
    assert len(won) == 1 and os.listdir(mnt / "excl") == ["one"]


def test_renames_both_ways_through_the_kernel(mnt):
    left, right = mnt / "left", mnt / "right"
    left.mkdir()
    right.mkdir()
    files = [f"x{i}" for i in range(16)]
    for i, name in enumerate(files):
        ((left if i % 2 else right) / name).write_text(name)

    def shuffle(seed):
        rng = random.Random(seed)
        for _ in range(20):
            name = rng.choice(files)
            src, dst = (left, right) if seed % 2 else (right, left)
            try:
                os.rename(src / name, dst / name)
            except FileNotFoundError:  # it is on the other side
                pass
    in_threads(shuffle, 4)
    found = os.listdir(left) + os.listdir(right)
    assert sorted(found) == sorted(files)
    for side in (left, right):
        for name in os.listdir(side):
            assert (side / name).read_text() == name


def test_random_operations_through_the_kernel(mnt, tmp_path):
    count = itertools.count()

    def trees():
        mounted = mnt / f"random{next(count)}"
        mounted.mkdir()
        return LocalTree(Path(tempfile.mkdtemp(dir=tmp_path))), LocalTree(mounted)

    machine = type("MountLikeLocal", (SameTree,), {"make_trees": staticmethod(trees),
                                                    "outcomes": []})
    run_state_machine_as_test(machine, settings=RANDOM_OPS)
    assert len(machine.outcomes) >= 100 and machine.outcomes.count("ok") >= 20


def test_ctrl_c_unmounts(cluster):
    where = cluster.root / "second"
    proc = mount(cluster, where)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(15) == 0, b"".join(proc.log).decode()
    assert not os.path.ismount(where)


# Files in chunks, times, sizes -------------------------------------------------------

def test_a_file_three_times_max_value_by_dd(mnt, fs, tmp_path):
    source = tmp_path / "src"
    source.write_bytes(os.urandom(3 * CHUNK + 12345))
    sh(f"dd if={source} of=big bs=64K status=none", mnt)
    copied = sh("dd if=big bs=128K status=none | sha256sum", mnt).split()[0]
    assert copied == hashlib.sha256(source.read_bytes()).hexdigest()
    assert os.stat(mnt / "big").st_size == 3 * CHUNK + 12345
    assert stored(fs, "/big") == [0, 1, 2, 3]
    sh("cp big big2 && truncate -s 100 big2 && mv big2 big", mnt)   # replaces big
    assert (mnt / "big").read_bytes() == source.read_bytes()[:100]
    assert stored(fs, "/big") == [0]


def received(pid: int) -> int:
    """Bytes the process's TCP connections have received (its store replies),
    from the kernel's tcp_info (`ss`, iproute2)."""
    out = subprocess.run(["ss", "-tinpH"], capture_output=True, text=True, timeout=10,
                         check=True).stdout.splitlines()
    total = 0
    for head, info in zip(out[::2], out[1::2]):
        if f"pid={pid}," in head:
            total += sum(int(f.split(":")[1]) for f in info.split()
                         if f.startswith("bytes_received:"))
    return total


@pytest.mark.parametrize("over", ["network", "local"])
def test_random_reads_move_only_their_own_bytes(over, fs, mounted, remote):
    """Reads that are not sequential are ranged reads: a few KiB each, never a
    1 MiB chunk, at chunk edges, past the end, in a hole and in a chunk stored
    shorter than its share (zeros); over the network (only those bytes cross
    it) and from the node's store in the mount's process (nothing crosses it)."""
    mnt, proc = remote if over == "network" else mounted
    data = bytearray(os.urandom(6 * CHUNK + 5000))
    fs.write_file("/ranged", bytes(data))      # through the API: not in the mount's cache
    ino = fs.stat("/ranged").ino
    fs.session.remove(chunk_key(ino, 2))       # a hole
    data[2 * CHUNK:3 * CHUNK] = bytes(CHUNK)
    fs.session.write(chunk_key(ino, 3), bytes(data[3 * CHUNK:3 * CHUNK + 100]))
    data[3 * CHUNK + 100:4 * CHUNK] = bytes(CHUNK - 100)
    rng = random.Random(5)
    reads = [(CHUNK - 4096, 8192), (2 * CHUNK + 4096, 4096), (3 * CHUNK, 8192),
             (len(data) - 100, 4096), (len(data) + 10, 4096), (5 * CHUNK - 4096, 12288)]
    reads += [(rng.randrange(1, len(data) // 4096) * 4096, 4096) for _ in range(40)]
    pid = proc.pid
    fd = os.open(mnt / "ranged", os.O_RDONLY)
    try:
        before = received(pid)
        for at, size in reads:
            assert os.pread(fd, size, at) == data[at:at + size], (at, size)
        moved = received(pid) - before
    finally:
        os.close(fd)
    asked = sum(size for _, size in reads)
    assert moved < (asked + 64 * 1024 if over == "network" else 4096), (moved, asked)
    assert (mnt / "ranged").read_bytes() == data        # sequential: whole chunks


def test_a_reread_is_served_by_the_kernel_until_another_client_changes_the_file(fs,
                                                                               remote):
    """Close-to-open: the kernel keeps a file's pages from one open to the next
    (a re-read moves nothing from the store) while the stored file is the one
    it read; a write by another client, even of the same size, is read anew."""
    mnt, proc = remote
    first, second = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    (mnt / "kept").write_bytes(first)
    assert (mnt / "kept").read_bytes() == first
    before = received(proc.pid)
    assert (mnt / "kept").read_bytes() == first
    assert received(proc.pid) - before < 64 * 1024            # the kernel's pages
    fs.write_data("/kept", fs.stat("/kept"), second)     # another client, same size
    assert (mnt / "kept").read_bytes() == second
    assert received(proc.pid) - before > 3 * CHUNK
    third = os.urandom(3 * CHUNK)          # changed while open here, and stat'd after it
    with open(mnt / "kept", "rb") as held:
        assert held.read() == second
        fs.write_data("/kept", fs.stat("/kept"), third)
        time.sleep(1.1)                    # past the attribute timeout: the stat walks
        os.stat(mnt / "kept")
    assert (mnt / "kept").read_bytes() == third


def test_attributes_set_on_an_open_file_are_seen_at_once_and_stored_at_close(mnt, fs):
    """As tar -x does: write, futimens, fchown, fchmod, close.  The mount holds
    them with the open file (stat and fstat see them) and stores them with its
    size at the close."""
    fd = os.open(mnt / "attrs", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        os.write(fd, b"x" * 5000)
        os.utime(fd, ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
        os.chown(fd, NOBODY, NOBODY)
        os.chmod(fd, 0o4751)
        for st in (os.fstat(fd), os.stat(mnt / "attrs")):
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_size,
                    st.st_mtime_ns) == (0o4751, NOBODY, NOBODY, 5000, 1_100_000_000_000_000_000)
        with pytest.raises(OSError) as refused:     # no entry can hold it: at the call
            os.utime(fd, (0, float(2 ** 35)))   # past shape.MTIME_LIMIT
        assert refused.value.errno == errno.EINVAL
    finally:
        os.close(fd)
    entry = fs.stat("/attrs")
    assert (entry.mode, entry.uid, entry.gid, entry.size, entry.mtime) == \
        (0o4751, NOBODY, NOBODY, 5000, 1_100_000_000)


def test_a_chunk_written_out_that_fails_is_eio_at_a_later_write_or_close(mnt, cluster):
    """Write-behind: with the store stopped, a chunk the courier could not store
    is EIO at a later write or at the close, never lost in silence; the store
    back, the mount serves on."""
    [storage] = cluster.processes("srw: storage n1")
    block, errors = os.urandom(CHUNK), []
    fd = os.open(mnt / "lost", os.O_CREAT | os.O_WRONLY)
    storage.suspend()
    try:
        for _ in range(DIRTY + SENDING + 2):
            try:
                os.write(fd, block)
            except OSError as exc:
                errors.append(exc.errno)
                break
    finally:
        storage.resume()
        try:
            os.close(fd)
        except OSError as exc:
            errors.append(exc.errno)
    assert errors and set(errors) == {errno.EIO}, errors
    (mnt / "after").write_bytes(block)
    assert (mnt / "after").read_bytes() == block


def test_sparse_write_at_10_gib_stores_one_chunk(mnt, fs, mounted):
    at = 10 << 30
    fd = os.open(mnt / "sparse", os.O_CREAT | os.O_RDWR)
    try:
        assert os.pwrite(fd, b"end", at) == 3
        assert os.fstat(fd).st_size == at + 3
        assert os.pread(fd, 8, at - 5) == bytes(5) + b"end"
        assert os.pread(fd, 4096, 5 << 30) == bytes(4096)
    finally:
        os.close(fd)
    sh("truncate -s 10G grown && echo -n x >> grown", mnt)
    assert os.stat(mnt / "grown").st_size == at + 1
    ino = fs.stat("/sparse").ino
    fs.session.read(chunk_key(ino, at // CHUNK))
    assert stored(fs, "/sparse") == [] and stored(fs, "/grown") == []
    assert psutil.Process(mounted[1].pid).memory_info().rss < 300 << 20


def test_efbig_at_the_write_past_the_largest_file(mnt):
    fd = os.open(mnt / "huge", os.O_CREAT | os.O_RDWR)
    try:
        with pytest.raises(OSError) as raised:
            os.pwrite(fd, b"x", MAX_FILE)
        assert raised.value.errno == errno.EFBIG
        with pytest.raises(OSError) as raised:
            os.ftruncate(fd, MAX_FILE + 1)
        assert raised.value.errno == errno.EFBIG
        assert os.pwrite(fd, b"x", MAX_FILE - 1) == 1        # up to the limit is fine
    finally:
        os.close(fd)
    assert os.stat(mnt / "huge").st_size == MAX_FILE


def test_touch_a_keeps_mtime_and_touch_m_sets_it(mnt):
    f = mnt / "touched"
    f.write_bytes(b"x")
    os.utime(f, (1_000_000_000, 1_100_000_000))
    sh("touch -a touched", mnt)
    assert os.stat(f).st_mtime == 1_100_000_000
    sh("touch -m -d @1200000000 touched", mnt)
    assert os.stat(f).st_mtime == 1_200_000_000


def test_tar_x_and_cp_a_keep_mtimes_and_modes(mnt, tmp_path):
    src = tmp_path / "tree"
    (src / "sub").mkdir(parents=True)
    for i in range(12):
        f = src / ("sub" if i % 2 else ".") / f"f{i}"
        f.write_bytes(os.urandom(1000 * i))
        f.chmod(0o600 + i % 8)
        os.utime(f, (1_000_000_000 + i, 1_000_000_000 + 1000 * i))
    sh(f"mkdir untarred copied && tar -C {src} -cf - . | tar -C untarred -xf - "
       f"&& cp -a {src}/. copied/", mnt)

    def seen(root):
        out = {}
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                st = os.stat(os.path.join(dirpath, name))
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                out[rel] = (int(st.st_mtime), st.st_mode, st.st_size)
        return out
    assert seen(mnt / "untarred") == seen(src) and seen(mnt / "copied") == seen(src)


def test_concurrent_writers_to_one_file(mnt):
    piece = CHUNK // 3 + 7       # pieces straddle chunk boundaries
    os.close(os.open(mnt / "shared", os.O_CREAT | os.O_WRONLY))

    def write(i):
        fd = os.open(mnt / "shared", os.O_WRONLY)
        try:
            for k in range(i, 8, 4):
                os.pwrite(fd, bytes([k]) * piece, k * piece)
        finally:
            os.close(fd)
    in_threads(write, 4)
    assert (mnt / "shared").read_bytes() == b"".join(bytes([k]) * piece for k in range(8))


def test_a_relative_path_longer_than_path_max_inside_the_tree(mnt):
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    name = "d" * 255
    try:
        for _ in range(17):       # 17 x 256 bytes: the tree's path passes 4096
            os.mkdir(name, dir_fd=fd)
            inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = inner
        out = os.open("f", os.O_CREAT | os.O_WRONLY, dir_fd=fd)
        os.write(out, b"deep")
        os.close(out)
        out = os.open("f", os.O_RDONLY, dir_fd=fd)
        assert os.read(out, 10) == b"deep"
        os.close(out)
    finally:
        os.close(fd)


# POSIX entries, owners, permissions ------------------------------------------------

NOBODY = 65534


def as_nobody(mnt: Path, *argv: str) -> subprocess.CompletedProcess:
    """`argv` as uid and gid 65534 in the mount (entered as root: the test's
    temp dirs above it are root's alone)."""
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}",
                           "--clear-groups", *argv], capture_output=True, timeout=30, cwd=mnt)


def test_symlinks_fifos_and_devices_round_trip(mnt):
    (mnt / "kinds").mkdir()
    (mnt / "kinds/target").write_bytes(b"pointed at")
    os.symlink("target", mnt / "kinds/link")
    os.symlink("/" + "x" * 2000, mnt / "kinds/dangling")
    os.mkfifo(mnt / "kinds/fifo", 0o640)
    os.mknod(mnt / "kinds/null", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    assert os.readlink(mnt / "kinds/link") == "target"
    assert (mnt / "kinds/link").read_bytes() == b"pointed at"
    assert os.readlink(mnt / "kinds/dangling") == "/" + "x" * 2000
    assert stat.S_ISLNK(os.lstat(mnt / "kinds/link").st_mode)
    fifo, null = os.stat(mnt / "kinds/fifo"), os.stat(mnt / "kinds/null")
    assert stat.S_ISFIFO(fifo.st_mode) and stat.S_IMODE(fifo.st_mode) == 0o640
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    os.rename(mnt / "kinds/link", mnt / "kinds/moved")
    assert os.readlink(mnt / "kinds/moved") == "target"
    for name in ("moved", "dangling", "fifo", "null", "target"):
        os.unlink(mnt / "kinds" / name)
    assert os.listdir(mnt / "kinds") == []


def test_owners_and_permissions_for_another_uid(mnt):
    (mnt / "perm").mkdir()
    (mnt / "perm/open").write_bytes(b"anyone")
    (mnt / "perm/secret").write_bytes(b"root only")
    os.chmod(mnt / "perm/secret", 0o600)
    assert as_nobody(mnt, "cat", "perm/open").stdout == b"anyone"
    assert b"Permission denied" in as_nobody(mnt, "cat", "perm/secret").stderr
    assert b"Permission denied" in as_nobody(mnt, "touch", "perm/new").stderr
    os.chown(mnt / "perm", NOBODY, NOBODY)
    made = as_nobody(mnt, "bash", "-c", "echo mine > perm/new && chmod 600 perm/new")
    assert made.returncode == 0, made.stderr
    st = os.stat(mnt / "perm/new")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (NOBODY, NOBODY, 0o600)
    os.chown(mnt / "perm/new", 0, -1)       # -1: the group stays
    assert (os.stat(mnt / "perm/new").st_uid, os.stat(mnt / "perm/new").st_gid) == (0, NOBODY)
    assert b"Permission denied" in as_nobody(mnt, "cat", "perm/new").stderr


def test_atime_mtime_ctime_of_their_own(mnt):
    f = mnt / "times"
    f.write_bytes(b"x")
    os.utime(f, ns=(1_000_000_000_000_000_000, 1_100_000_000_000_000_000))
    st = os.stat(f)
    assert (st.st_atime_ns, st.st_mtime_ns) == (1_000_000_000_000_000_000,
                                                1_100_000_000_000_000_000)
    assert st.st_ctime > 1_500_000_000         # set now, not the mtime given
    os.utime(f, ns=(1_200_000_000_000_000_000, 1_100_000_000_000_000_000))
    assert os.stat(f).st_atime_ns == 1_200_000_000_000_000_000


def test_hard_links_share_contents_attributes_and_count(mnt, fs):
    (mnt / "hl").mkdir()
    first, second, third = mnt / "hl/a", mnt / "hl/b", mnt / "hl/c"
    first.write_bytes(b"one")
    os.link(first, second)
    os.link(second, third)
    # The kernel caches each name's attributes for a second (libfuse's
    # attr_timeout; each name is a node of its own): counts through FsClient.
    assert os.stat(third).st_nlink == 3
    assert [fs.stat_links(f"/hl/{n}")[1] for n in "abc"] == [3, 3, 3]
    with open(second, "ab") as f:
        f.write(b" two")
    os.chmod(third, 0o640)
    assert first.read_bytes() == b"one two"
    assert stat.S_IMODE(os.stat(first).st_mode) == 0o640
    assert os.stat(first).st_ino == os.stat(third).st_ino
    os.unlink(first)
    os.rename(third, second)          # over another name of the same file: nothing happens
    assert fs.stat_links("/hl/b")[1] == 2 and third.read_bytes() == b"one two"
    ino = fs.stat("/hl/b").ino
    (mnt / "hl/other").write_bytes(b"x")
    os.rename(mnt / "hl/other", third)      # replaces one name: the file keeps the other
    assert fs.stat_links("/hl/b")[1] == 1 and second.read_bytes() == b"one two"
    os.unlink(second)                       # the last name: contents and inode go
    with pytest.raises(NotFound):
        fs.session.read(chunk_key(ino, 0))
    with pytest.raises(OSError) as raised:
        os.link(mnt / "hl", mnt / "hl2")
    assert raised.value.errno == errno.EPERM


def test_a_listing_is_not_disturbed_by_creates_and_removes_under_it(mnt, fs):
    """An open directory is listed from one snapshot (libfuse's high-level API
    keeps what the first readdir answered, and the kernel asks from offsets
    in it): while a listing of 3,000 names is read, 100 of them removed and
    100 made change nothing in it: each name listed once."""
    fs.mkdir("/snap")
    ino = fs.stat("/snap").ino
    files = {f"e{i:04d}": [f"{i + 1:016x}", "f", 0o644, 0, 1.7e9] for i in range(3000)}
    head, buckets = shape.layout(files, os.urandom(shape.SALT))
    for at, bucket in buckets.items():
        fs.session.write(bucket_key(ino, *at), msgpack.packb(bucket))
    fs.session.write(f"fs:d:{ino}", msgpack.packb(head))
    seen = []
    with os.scandir(mnt / "snap") as listing:     # getdents of 32 KiB: many calls
        for i, entry in enumerate(listing):
            seen.append(entry.name)
            if i == 10:
                for k in range(100):
                    fs.unlink(f"/snap/e{2999 - k:04d}")
                    fs.create(f"/snap/new{k}")
    assert len(seen) == len(set(seen)) == 3000 and set(seen) == set(files)
    now = set(os.listdir(mnt / "snap"))
    assert len(now) == 3000 and "new0" in now and "e2999" not in now


def test_a_directory_of_10000_entries(mnt, fs):
    """10,000 entries written straight into buckets as fs.py lays them out
    (10,000 creates, an exec each, take minutes on a loaded 2-core machine).
    Then the kernel lists all of them, looks some up, creates, renames and
    unlinks in it (buckets split), and every bucket holds at most 128 entries."""
    fs.mkdir("/tenk")
    ino = fs.stat("/tenk").ino
    names = [f"e{i:05d}" for i in range(10_000)]
    files = {name: [f"{i + 1:016x}", "f", 0o644, 0, 1.7e9] for i, name in enumerate(names)}
    head, buckets = shape.layout(files, os.urandom(shape.SALT))
    for at, bucket in buckets.items():
        assert all(r.ok for r in fs.session.write(bucket_key(ino, *at), msgpack.packb(bucket)))
    assert all(r.ok for r in fs.session.write(f"fs:d:{ino}", msgpack.packb(head)))
    (mnt / "tenk" / "first").write_bytes(b"first")
    head = msgpack.unpackb(fs.session.read(f"fs:d:{ino}"), raw=False)
    assert head["n"] == 10_001 and len(head["b"]) >= 64
    held = 0
    for at in {(d, i) for i, d in enumerate(head["b"]) if i < 1 << d}:
        bucket = msgpack.unpackb(fs.session.read(bucket_key(ino, *at)), raw=False)
        assert len(bucket) <= 128
        held += len(bucket)
    assert held == 10_001
    assert sorted(os.listdir(mnt / "tenk")) == sorted([*names, "first"])
    rng = random.Random(1)
    for name in rng.sample(names, 20):
        assert os.stat(mnt / "tenk" / name).st_mtime == 1.7e9
    for i in range(10):
        (mnt / "tenk" / f"new{i}").write_bytes(b"%d" % i)
    os.mkdir(mnt / "tenk" / "sub")
    assert os.stat(mnt / "tenk").st_nlink == 3
    with pytest.raises(OSError) as full:
        os.rmdir(mnt / "tenk")
    assert full.value.errno == errno.ENOTEMPTY
    os.rename(mnt / "tenk" / "new7", mnt / "tenk" / "sub" / "seven")
    os.rename(mnt / "tenk" / "new8", mnt / "tenk" / "e00008")
    assert (mnt / "tenk" / "sub" / "seven").read_bytes() == b"7"
    assert (mnt / "tenk" / "e00008").read_bytes() == b"8"
    gone = rng.sample(names, 20)
    for name in gone:
        os.unlink(mnt / "tenk" / name)
        assert not (mnt / "tenk" / name).exists()
    listed = set(os.listdir(mnt / "tenk"))
    assert len(listed) == 10_000 + 1 + 10 + 1 - 2 - 20 and listed.isdisjoint(gone)
    head = msgpack.unpackb(fs.session.read(f"fs:d:{ino}"), raw=False)
    assert head["n"] == len(listed) and head["s"] == 1


def test_a_directory_of_the_old_form_is_read_then_moved_into_buckets(mnt, fs):
    """One value {"e", "i", "a", "dead"} (before buckets) under the head's key:
    read as it is; its first write moves its entries into buckets."""
    fs.mkdir("/old")
    ino = fs.stat("/old").ino
    files = {f"o{i}": [f"{i + 1:016x}", "f", 0o644, 0, 1.7e9] for i in range(200)}
    files["d"] = ["00000000000000ff", "d", 0o755, 0, 1.7e9]
    old = msgpack.packb({"e": files, "i": {}, "a": {}, "dead": False})
    assert all(r.ok for r in fs.session.write(f"fs:d:{ino}", old))
    assert sorted(os.listdir(mnt / "old")) == sorted(files)
    assert os.stat(mnt / "old" / "o7").st_mtime == 1.7e9
    assert os.stat(mnt / "old").st_nlink == 3
    (mnt / "old" / "new").write_bytes(b"new")
    head = msgpack.unpackb(fs.session.read(f"fs:d:{ino}"), raw=False)
    assert "e" not in head and head["n"] == 202 and head["s"] == 1
    assert sorted(os.listdir(mnt / "old")) == sorted([*files, "new"])
    assert (mnt / "old" / "new").read_bytes() == b"new"
    assert os.stat(mnt / "old").st_nlink == 3
