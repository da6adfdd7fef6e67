"""`srw mount`: the same checks as test_fs.py, through the kernel (FUSE)."""
from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis.stateful import run_state_machine_as_test

from fs_support import (RANDOM_OPS, LocalTree, SameTree, in_threads, mount, needs_fuse,
                        start_cluster, unmount)

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = start_cluster(tmp_path_factory.mktemp("fsmount"), groups=1)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def mnt(cluster):
    where = cluster.root / "mnt"
    proc = mount(cluster, where)
    try:
        yield where
    finally:
        unmount(proc, where)


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
