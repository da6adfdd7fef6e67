"""Directories as server-side scripts (history/fs.py, fs/client.py, `srw fs`),
on one started two-group cluster shared by the module (groups are replicas)."""
from __future__ import annotations

import dataclasses
import errno
import itertools
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import msgpack
import pytest
from hypothesis.stateful import run_state_machine_as_test

from core import config as cfg
from fs import shape
from fs.client import CHUNK, GROUP, FsClient, FsError, bucket_key, chunk_key
from storage.client import NotFound, Session
from storage.engine_lmdb import LmdbEngine

from conftest import retire
from fs_support import RANDOM_OPS, LocalTree, SameTree, SrwTree, in_threads, start_cluster

THREADS = 8


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("fs"), groups=2)
    yield cluster
    retire([cluster])


@pytest.fixture
def fs(cluster):
    with Session(cluster.path) as session:
        yield FsClient(session)


def with_clients(cluster, work, count: int = THREADS) -> None:
    """work(fs, i) in `count` threads at once, each with a Session of its own
    (a Session is not thread-safe)."""
    def run(i):
        with Session(cluster.path) as session:
            work(FsClient(session), i)
    in_threads(run, count)


def test_200_concurrent_creates_leave_200_entries_in_every_group(cluster, fs):
    fs.mkdir("/many")
    with_clients(cluster, lambda c, i: [c.create(f"/many/f{i}-{k}", exclusive=True)
                                      for k in range(200 // THREADS)])
    names = set(fs.readdir("/many"))
    assert names == {f"f{i}-{k}" for i in range(THREADS) for k in range(200 // THREADS)}
    ino = fs.stat("/many").ino
    replicas = [stored(fs, ino, g) for g in (1, 2)]
    head, buckets = replicas[0]
    assert replicas[0] == replicas[1] and head["n"] == 200
    assert len(buckets) > 1 and sum(len(b) for b in buckets.values()) == 200   # split


def stored(fs: FsClient, ino: str, group: int) -> tuple[dict, dict]:
    """(head, {(depth, prefix): bucket}) of directory `ino` as group `group` holds it."""
    head = msgpack.unpackb(fs.session.read(f"fs:d:{ino}", groups=[group]), raw=False)
    m = head["b"]
    named = {(m[i], i) for i in range(len(m)) if i < 1 << m[i]}
    return head, {at: msgpack.unpackb(fs.session.read(bucket_key(ino, *at), groups=[group]),
                                      raw=False) for at in named}


def test_concurrent_renames_both_ways_leave_each_file_in_one_place(cluster, fs):
    fs.mkdir("/left")
    fs.mkdir("/right")
    files = [f"x{i}" for i in range(24)]
    for i, name in enumerate(files):
        fs.write_file(f"/{'left' if i % 2 else 'right'}/{name}", name.encode())

    def shuffle(client, i):
        rng = random.Random(i)
        for _ in range(25):
            name = rng.choice(files)
            src, dst = ("left", "right") if rng.random() < 0.5 else ("right", "left")
            try:
                client.rename(f"/{src}/{name}", f"/{dst}/{name}")
            except FsError as exc:  # another thread moved it first
                assert exc.errno == errno.ENOENT
    with_clients(cluster, shuffle, 6)

    left, right = fs.readdir("/left"), fs.readdir("/right")
    assert sorted([*left, *right]) == sorted(files)
    for listing in (left, right):
        for name, entry in listing.items():
            assert fs.read_data(entry) == name.encode()
    assert not fs.directory(fs.stat("/left").ino)["i"]
    assert not fs.directory(fs.stat("/right").ino)["a"]


def test_a_half_done_rename_is_finished_by_the_next_reader(fs):
    """A client that died after `take`: the entry is in the source's intents
    only, and a readdir of the source finishes the move."""
    fs.mkdir("/src")
    fs.mkdir("/dst")
    entry = fs.write_file("/src/f", b"moving")
    src, dst = fs.stat("/src").ino, fs.stat("/dst").ino
    fs.call(src, "take", "/src/f", name="f", iid="i1", to=dst, to_name="g", replace_ino=None)
    assert fs.lookup(src, "f", "/src") is None
    assert fs.readdir("/src") == {}
    moved = fs.readdir("/dst")  # a move sets the ctime
    assert moved == {"g": entry._replace(ctime=moved["g"].ctime)}
    # A late apply of the same intent (a second recoverer) adds nothing.
    assert fs.call(dst, "apply", "", iid="i1", src=src)["result"] is None
    fs.unlink("/dst/g")
    assert fs.readdir("/dst") == {}


def test_an_applied_rename_is_applied_once(fs):
    """A client that died after `apply`: a second apply (a recoverer) must not
    add the entry again, even after it moved on in the target."""
    fs.mkdir("/once1")
    fs.mkdir("/once2")
    entry = fs.write_file("/once1/f", b"once")
    src, dst = fs.stat("/once1").ino, fs.stat("/once2").ino
    fs.call(src, "take", "/once1/f", name="f", iid="i2", to=dst, to_name="g",
            replace_ino=None)
    assert fs.call(dst, "apply", "", iid="i2", src=src)["result"] == ""
    fs.rename("/once2/g", "/once2/h")
    assert fs.call(dst, "apply", "", iid="i2", src=src)["result"] == ""
    moved = fs.readdir("/once2")  # a move sets the ctime
    assert moved == {"h": entry._replace(ctime=moved["h"].ctime)}
    assert fs.readdir("/once1") == {}           # the reader finished it
    assert not fs.directory(src)["i"] and not fs.directory(dst)["a"]
    moved = fs.readdir("/once2")  # a move sets the ctime
    assert moved == {"h": entry._replace(ctime=moved["h"].ctime)}


def test_a_refused_rename_puts_the_entry_back(fs):
    fs.mkdir("/r1")
    fs.mkdir("/r2")
    fs.mkdir("/r2/full")
    fs.mkdir("/r2/full/inside")
    fs.mkdir("/r1/d")
    with pytest.raises(FsError) as refused:
        fs.rename("/r1/d", "/r2/full")
    assert refused.value.errno == errno.ENOTEMPTY
    assert set(fs.readdir("/r1")) == {"d"}
    with pytest.raises(FsError) as into_itself:
        fs.rename("/r2", "/r2/full/inside/r2")
    assert into_itself.value.errno == errno.EINVAL


def test_random_operations_give_the_tree_a_local_directory_gets(cluster, fs, tmp_path):
    count = itertools.count()

    def trees():
        n = next(count)
        local = Path(tempfile.mkdtemp(dir=tmp_path))
        fs.mkdir(f"/random{n}")
        return LocalTree(local), SrwTree(fs, f"/random{n}")

    machine = type("SrwLikeLocal", (SameTree,), {"make_trees": staticmethod(trees),
                                                  "outcomes": []})
    run_state_machine_as_test(machine, settings=RANDOM_OPS)
    assert len(machine.outcomes) >= 100 and machine.outcomes.count("ok") >= 20, \
        sorted(set(machine.outcomes))


BAD = [
    (["mkdir", "/bad/../.."], "No such file or directory"),
    (["mkdir", "/bad/" + "n" * 256], "File name too long"),
    (["mkdir", "/bad/missing/child"], "No such file or directory"),
    (["mkdir", "/bad/file/child"], "Not a directory"),
    (["mkdir", "/bad"], "File exists"),
    (["rmdir", "/bad"], "Directory not empty"),
    (["rm", "/bad/dir"], "Is a directory"),
    (["get", "/bad/dir"], "Is a directory"),
    (["mv", "/bad/dir", "/bad/file"], "Not a directory"),
]


def test_bad_input_is_one_line_and_exit_1(cluster, fs):
    fs.mkdir("/bad")
    fs.mkdir("/bad/dir")
    fs.write_file("/bad/file", b"")
    for args, reason in BAD:
        out = cluster.run("fs", *args)
        assert out.returncode == 1, (args, out)
        assert out.stderr.decode() == f"srw: {args[-1]}: {reason}\n", args
    for local, reason in ((cluster.root / "missing", "No such file or directory"),
                          (cluster.root, "Is a directory")):
        out = cluster.run("fs", "put", str(local), "/bad/new")
        assert (out.returncode, out.stderr.decode()) == (1, f"srw: {local}: {reason}\n")
    with pytest.raises(FsError) as absent:   # nothing made of a file that could not be read
        fs.stat("/bad/new")
    assert absent.value.errno == errno.ENOENT
    with pytest.raises(FsError) as nul:
        fs.mkdir("/bad/a\0b")
    assert nul.value.errno == errno.EINVAL


def test_cli_put_ls_get_mv_stat(cluster, tmp_path):
    local = tmp_path / "local"
    local.write_bytes(b"\x00binary\xff" * 1000)
    steps = [("mkdir", "/cli"), ("put", str(local), "/cli/f"), ("mv", "/cli/f", "/cli/g")]
    for step in steps:
        assert cluster.run("fs", *step).returncode == 0, step
    assert cluster.run("fs", "get", "/cli/g").stdout == local.read_bytes()
    listing = cluster.run("fs", "ls", "-l", "/cli").stdout.decode()
    assert listing.split()[:2] == ["-rw-r--r--", "8000"] and listing.endswith(" g\n")
    assert cluster.run("fs", "stat", "/cli").stdout.decode().startswith("/cli: drwxr-xr-x")


def test_a_file_of_many_chunks_is_written_in_groups_and_read_back(cluster, fs):
    """write_data sends GROUP chunks before it waits for their replies: a file of
    two groups and a part reads back whole, in every group of nodes; a shorter
    file written over it leaves none of the old chunks past its end."""
    data = random.Random(5).randbytes((2 * GROUP + 1) * CHUNK + 123)
    entry = fs.write_file("/grouped", data)
    assert entry.size == len(data) and fs.read_file("/grouped") == data
    with Session(cluster.path) as session:
        for group in (1, 2):
            last = 2 * GROUP + 1  # the part: in the third group of chunks sent
            assert session.read(chunk_key(entry.ino, last), groups=[group]) == \
                data[last * CHUNK:]
    fs.write_file("/grouped", data[:CHUNK + 5])
    assert fs.read_file("/grouped") == data[:CHUNK + 5]
    with Session(cluster.path) as session, pytest.raises(NotFound):
        session.read(chunk_key(entry.ino, 2))


def test_cli_put_streams_a_file_larger_than_it_holds_in_memory(cluster, fs, tmp_path):
    """`srw fs put -` reads a pipe (short reads) a few chunks at a time: a 96 MiB
    file goes in with the command's peak memory well below the file's size (it
    held the whole file before), and reads back whole."""
    local = tmp_path / "big"
    local.write_bytes(random.Random(7).randbytes(96 * CHUNK + 77))
    pipe = subprocess.Popen(["cat", str(local)], stdout=subprocess.PIPE)
    put = subprocess.Popen([sys.executable, "-m", "srw", "fs", "put", "-", "/streamed",
                            "--config", str(cluster.path)], cwd=cluster.root,
                           stdin=pipe.stdout, stderr=subprocess.PIPE)
    pipe.stdout.close()
    peak_kib, deadline = 0, time.monotonic() + 120
    while put.poll() is None and time.monotonic() < deadline:
        peak_kib = max(peak_kib, high_water_kib(put.pid))  # (ru_maxrss counts the fork)
        time.sleep(0.02)
    if put.poll() is None:
        put.kill()
    pipe.wait(10)
    assert put.wait(10) == 0, put.stderr.read()
    assert 0 < peak_kib < 80 * 1024, f"peak RSS {peak_kib // 1024} MiB for a 96 MiB file"
    assert fs.read_file("/streamed") == local.read_bytes()


def high_water_kib(pid: int) -> int:
    """The process's peak resident memory since its exec (VmHWM), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("VmHWM:")), 0)
    except OSError:
        return 0


def test_an_emptied_directory_merges_back_into_one_bucket(cluster, fs):
    """Buckets merge back as names go (history/fs.py `merge`), down to one; a
    listing made meanwhile holds every name that stays.  The directory is
    planted as one that grew to 8 buckets (before merges, buckets only split)."""
    fs.mkdir("/shrink")
    ino = fs.stat("/shrink").ino
    entries = {f"f{i}": [f"{i + 1:016x}", "f", 0o644, 0, 1.7e9] for i in range(40)}
    head, buckets = shape.layout(entries, b"12345678")
    head["b"] = bytes([3]) * 8
    buckets = {(3, p): {} for p in range(8)}
    for name, value in entries.items():
        buckets[(3, shape.slot(head["k"], name) % 8)][name] = value
    for at, bucket in buckets.items():
        fs.session.write(bucket_key(ino, *at), msgpack.packb(bucket))
    fs.session.write(f"fs:d:{ino}", msgpack.packb(head))
    stays, done, listings = {f"f{i}" for i in range(20, 40)}, [], []

    def list_meanwhile(c, i):
        if i == 0:
            for name in sorted(entries.keys() - stays):
                c.unlink(f"/shrink/{name}")
            done.append(True)
        while not done and len(listings) < 200:
            listings.append(set(c.readdir("/shrink")))
    with_clients(cluster, list_meanwhile, count=2)
    assert listings and all(stays <= listed for listed in listings)
    assert set(fs.readdir("/shrink")) == stays
    head, buckets = stored(fs, ino, 1)
    assert len(head["b"]) < 8 and {n for b in buckets.values() for n in b} == stays
    for name in stays:
        fs.unlink(f"/shrink/{name}")
    for group in (1, 2):
        head = msgpack.unpackb(fs.session.read(f"fs:d:{ino}", groups=[group]), raw=False)
        assert head["b"] == b"\0" and head["n"] == 0
        with pytest.raises(NotFound):       # emptied: removed
            fs.session.read(bucket_key(ino, 0, 0), groups=[group])
    assert fs.readdir("/shrink") == {}


def test_local_reads_come_from_the_served_store_never_from_a_copy(cluster, fs, tmp_path):
    """Short-circuit reads (storage/local_read.py): both nodes' stores are on
    this host; a read whose first owner is one of them never goes over the
    network, sees at once what a write just acknowledged, and a store the node
    does not serve (a copy of its directory) is never read."""
    with Session(cluster.path) as session:
        local = session.engine.local_reads()
        assert local.nodes == ["n1", "n2"]
        mine = FsClient(session, local=local)
        session.read = session.read_range = None      # any network read would fail
        data = random.Random(3).randbytes(3000)
        fs.write_file("/local", data)
        ino = fs.stat("/local").ino
        assert mine.read_part(ino, 0, 100, 50) == data[100:150]
        assert mine.read_chunk(ino, 0) == data and mine.stat("/local").size == 3000
        fs.write_file("/local", b"new")
        assert mine.read_chunk(ino, 0) == b"new" and local.read(chunk_key(ino, 1)) is None
        local.close()

    config = cfg.load(cluster.path)
    n1 = config.nodes[0]
    copy = tmp_path / "copy"
    with lmdb.open(str(Path(n1.data_dir) / "store"), readonly=True, max_dbs=1) as env:
        (copy / "store").mkdir(parents=True)
        env.copy(str(copy / "store"))
    stale = dataclasses.replace(config, nodes=(dataclasses.replace(n1, data_dir=str(copy)),
                                               *config.nodes[1:]))
    engine = LmdbEngine(stale)
    try:
        local = engine.local_reads()
        assert local.nodes == ["n2"]
        local.close()
    finally:
        engine.close()
