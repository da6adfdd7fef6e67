"""The mount on cluster.engine = "redis-cluster": a Redis Cluster of three
masters and three replicas, an srw node beside each, one mount for the module.
A file's chunks and its inode object share a slot (the ino as hash tag)."""
from __future__ import annotations

import hashlib
import os
import subprocess

import pytest

from fs.client import CHUNK, FsClient, chunk_key, inode_key
from storage.client import NotFound, Session

from conftest import REPO, Cluster
from fs_support import mount, needs_fuse, unmount

pytestmark = needs_fuse


@pytest.fixture(scope="module")
def rc(tmp_path_factory, shared_redis):
    """(srw cluster, mount point) beside the suite's Redis Cluster: stopped at the
    end, by pid."""
    root = tmp_path_factory.mktemp("fsrc")
    redis = shared_redis
    redis.keys_into(root / "srw" / "keys")
    srw = proc = None
    try:
        nodes = [{"name": f"r{i}", "redis": a} for i, a in enumerate(redis.addresses)]
        srw = Cluster(root / "srw", nodes, {"workers": 1}, {"request_timeout": 5.0}, {},
                      (REPO / "history" / "python.init").read_text(),
                      cluster={"engine": "redis-cluster", "seeds": redis.addresses[:3]})
        srw.serve()
        where = root / "mnt"
        proc = mount(srw, where, "--allow-other", "--default-permissions")
        yield srw, where
    finally:
        if proc is not None:
            unmount(proc, where)
        if srw is not None:
            srw.stop()


def test_files_links_and_renames_on_redis_cluster(rc, tmp_path):
    srw, mnt = rc
    source = tmp_path / "src"
    source.write_bytes(os.urandom(3 * CHUNK + 999))
    (mnt / "d").mkdir()
    subprocess.run(["dd", f"if={source}", f"of={mnt}/d/big", "bs=64K", "status=none"],
                   check=True, timeout=60)
    os.link(mnt / "d/big", mnt / "d/again")
    os.symlink("big", mnt / "d/link")
    os.rename(mnt / "d/again", mnt / "moved")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    for path in ("d/big", "d/link", "moved"):
        assert hashlib.sha256((mnt / path).read_bytes()).hexdigest() == digest
    with Session(srw.path) as session:
        fs = FsClient(session)
        ino = fs.stat("/moved").ino
        assert fs.stat_links("/moved")[1] == 2
        for key in [inode_key(ino)] + [chunk_key(ino, n) for n in range(4)]:
            session.read(key)                       # one slot: all reachable
        os.unlink(mnt / "d/big")
        os.unlink(mnt / "moved")
        for key in [inode_key(ino)] + [chunk_key(ino, n) for n in range(4)]:
            with pytest.raises(NotFound):
                session.read(key)
