"""Shared by the test_fs*.py modules: a started cluster for a whole module, a
mount, and one random-operations machine run against two trees at once."""
from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from conftest import Cluster, set_node_keys, wait_until

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"),
    reason="FUSE is not available here: no /dev/fuse or no fusermount3 (make system-deps)")


def start_cluster(root: Path, groups: int, scripts: dict[str, str] | None = None,
                  **node_keys) -> Cluster:
    """Under the shipped default profile: its network "local" reaches every node's
    storage port, so the directory scripts write each directory to every group.
    `node_keys` (e.g. max_value) go into every [[node]]."""
    nodes = [{"name": f"n{g}", "group": g} for g in range(1, groups + 1)]
    cluster = Cluster(root, nodes, {"workers": 2}, {}, scripts or {}, None)
    for node in nodes:
        if node_keys:
            set_node_keys(cluster, node["name"], **node_keys)
    try:
        cluster.serve()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def mount(cluster: Cluster, where: Path, *options: str) -> subprocess.Popen:
    """`srw mount [OPTIONS] ` at `where` (made here), once the kernel shows it mounted."""
    where.mkdir()
    proc = cluster.srw("mount", *options, str(where))

    def mounted():
        if proc.poll() is not None:
            raise AssertionError(f"srw mount exited {proc.returncode}: "
                                 f"{proc.stderr.read().decode()}")
        return os.path.ismount(where)
    wait_until(mounted, 15, f"the mount at {where}", interval=0.05)
    # It logs a line per EIO: drain its stderr (into proc.log) so that a full
    # pipe never stops it.
    proc.log = []
    threading.Thread(target=lambda: proc.log.extend(proc.stderr), daemon=True).start()
    return proc


def unmount(proc: subprocess.Popen, where: Path) -> None:
    """fusermount3 -u, and `srw mount` exits 0 (a busy mount is detached, and fails)."""
    unmounted = subprocess.run(["fusermount3", "-u", str(where)], capture_output=True,
                               timeout=15)
    if unmounted.returncode:    # busy: detach it so nothing is left behind
        subprocess.run(["fusermount3", "-uz", str(where)], timeout=15)
    assert proc.wait(15) == 0 and unmounted.returncode == 0, unmounted.stderr


def in_threads(work, count: int) -> None:
    """work(i) in `count` threads at once; each must finish within 60 s, and an
    exception in any fails the caller."""
    errors, start = [], threading.Barrier(count)

    def run(i):
        try:
            start.wait(10)
            work(i)
        except Exception as exc:  # reported below, in the test's thread
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread is still running"
    assert not errors, errors


# Two trees driven by the same operations ------------------------------------------

class LocalTree:
    """A directory of the kernel's (a temp dir, or the mount)."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, rel: str) -> str:
        return os.path.join(self.root, rel)

    def mkdir(self, rel):
        os.mkdir(self.path(rel))

    def rmdir(self, rel):
        os.rmdir(self.path(rel))

    def unlink(self, rel):
        os.unlink(self.path(rel))

    def rename(self, old, new):
        os.rename(self.path(old), self.path(new))

    def write(self, rel, data):
        with open(self.path(rel), "wb") as f:
            f.write(data)

    def tree(self) -> dict:
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            rel = os.path.relpath(dirpath, self.root)
            for name in dirnames:
                out[os.path.normpath(os.path.join(rel, name))] = None
            for name in filenames:
                with open(os.path.join(dirpath, name), "rb") as f:
                    out[os.path.normpath(os.path.join(rel, name))] = f.read()
        return out


class SrwTree:
    """A directory of the cluster's, through FsClient."""

    def __init__(self, fs, root: str):
        self.fs, self.root = fs, root

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def mkdir(self, rel):
        self.fs.mkdir(self.path(rel))

    def rmdir(self, rel):
        self.fs.rmdir(self.path(rel))

    def unlink(self, rel):
        self.fs.unlink(self.path(rel))

    def rename(self, old, new):
        self.fs.rename(self.path(old), self.path(new))

    def write(self, rel, data):
        self.fs.write_file(self.path(rel), data)

    def tree(self, rel: str = ".") -> dict:
        out = {}
        for name, entry in self.fs.readdir(self.path(rel)).items():
            child = os.path.normpath(os.path.join(rel, name))
            if entry.is_dir:
                out[child] = None
                out.update(self.tree(child))
            else:
                out[child] = self.fs.read_data(entry)
        return out


NAMES = ["a", "b", "c"]
paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
RANDOM_OPS = settings(max_examples=20, stateful_step_count=30, deadline=None,
                      derandomize=True)


def outcome(call) -> str:
    """"ok" or the errno's name: what both trees must agree on."""
    try:
        call()
        return "ok"
    except OSError as exc:
        import errno
        return errno.errorcode.get(exc.errno, str(exc.errno))


class SameTree(RuleBasedStateMachine):
    """Each rule runs on `expected` (a local temp dir) and `actual`; their
    outcomes (ok or errno) and then their whole trees must be equal.  A test
    subclasses it and sets `make_trees` to give a fresh pair per example."""

    make_trees = None
    outcomes: list[str] = []   # every rule's outcome, for the test to check it ran

    def __init__(self):
        super().__init__()
        self.expected, self.actual = type(self).make_trees()

    def both(self, op: str, *args):
        want = outcome(lambda: getattr(self.expected, op)(*args))
        got = outcome(lambda: getattr(self.actual, op)(*args))
        assert got == want, f"{op}{args}: expected {want}, got {got}"
        self.outcomes.append(got)

    @rule(path=paths)
    def mkdir(self, path):
        self.both("mkdir", path)

    @rule(path=paths, data=st.binary(max_size=64))
    def write(self, path, data):
        self.both("write", path, data)

    @rule(path=paths)
    def unlink(self, path):
        self.both("unlink", path)

    @rule(path=paths)
    def rmdir(self, path):
        self.both("rmdir", path)

    @rule(old=paths, new=paths)
    def rename(self, old, new):
        self.both("rename", old, new)

    @invariant()
    def same_tree(self):
        assert self.actual.tree() == self.expected.tree()
