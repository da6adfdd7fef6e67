"""Values read from the LMDB store of a node on this host, in this process:
a short-circuit read (as an HDFS client beside its DataNode reads the block
file), instead of a round trip to the node.  ``LmdbEngine.local_reads()``
makes one; the mount (fs/mount.py) is its user.  redis-cluster has none: the
data is in Redis, whose memory no client can read.
"""
from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import lmdb

from core import config as cfg
from core.ids import key_id
from broker.client import BrokerUnavailable

from . import protocol as sp
from .node_client import StorageClient
from .ring import Ring
from .store import _HEADER, MAP_SIZE

__all__ = ["LocalReads"]

log = logging.getLogger("srw.storage")
VALUE_HEADER = _HEADER.size   # a stored value's mtime, before its bytes (storage/store.py)


class LocalReads:
    """Values read from the LMDB environment of a node on this host, in this
    process, instead of a round trip to the node (a short-circuit read, as an
    HDFS client beside its DataNode does).  Only for a key whose first owner
    (where a read over the network goes first) is such a node; ``read`` answers
    None whenever the network read must decide (the key absent there, the
    environment failed), and the caller then makes it.

    Who: a trusted client run with the node's config by a user who may open its
    store (the mount, an operator's tool); never a script, which cannot reach
    the data directory.  The environment is opened read-only (the map is
    PROT_READ) but with its lock file, so each read holds a reader slot and the
    node's writer never reuses the pages it reads; ``reader_check`` at open
    frees the slots of readers that died (a killed mount's).  Each read is its
    own read transaction, begun after the call: it sees every write the node
    has acknowledged (a write is answered after its commit), as the network read
    would.  The node's map size is fixed (storage/store.py MAP_SIZE), so
    MDB_MAP_RESIZED should not come; any LMDB error drops that node's
    environment (one log line) and its reads go over the network again.
    Thread-safe (py-lmdb: one transaction per call)."""

    def __init__(self, ring: Ring, envs: dict):
        self.ring, self._envs = ring, envs
        # key -> (its first owner, its id): a file's chunks are read again and again
        self._place = functools.lru_cache(maxsize=4096)(self._placed)

    @classmethod
    def open(cls, config: cfg.Config, ring: Ring, client) -> LocalReads | None:
        """The stores of this host's nodes that are the ones they serve;
        `client(name)`: that node's StorageClient.  None if there is none."""
        envs = {}
        for node in config.nodes:
            env = _local_env(node, client(node.name))
            if env is not None:
                envs[node.name] = env
        return cls(ring, envs) if envs else None

    @property
    def nodes(self) -> list[str]:
        return sorted(self._envs)

    def read(self, key: str | bytes, offset: int = 0, length: int | None = None) -> bytes | None:
        """The value's bytes from `offset` (at most `length`), or None: read it
        over the network."""
        owner, raw_id = self._place(key)
        env = self._envs.get(owner)
        if env is None:
            return None
        try:
            with env.begin(buffers=True) as txn:
                stored = txn.get(raw_id)
                if stored is None:
                    return None
                start = VALUE_HEADER + min(offset, len(stored) - VALUE_HEADER)
                return bytes(stored[start:] if length is None else stored[start:start + length])
        except lmdb.Error as exc:
            if self._envs.pop(owner, None) is not None:   # left open: another thread may read
                log.warning("node %s's store read here failed (%s: %s): read over the network "
                            "from now on", owner, type(exc).__name__, exc)
            return None

    def _placed(self, key: str | bytes) -> tuple[str, bytes]:
        value = key_id(key)
        return self.ring.targets(value, None)[0].name, value.to_bytes(sp.ID_BYTES, "big")

    def close(self) -> None:
        for env in self._envs.values():
            env.close()
        self._envs.clear()


def _local_env(node: cfg.NodeSettings, client: StorageClient):
    """The node's environment opened read-only, if its store is on this host and
    is the one the node serves: a random value written to the node must be read
    back from it (a copy of the directory, or another host's node with the same
    path, would not have it).  None otherwise, and for a client without the
    right to write and read there (CurveZMQ keys: the node's grants)."""
    path = Path(node.data_dir) / "store"
    if not node.data_dir or not os.path.isfile(path / "data.mdb"):  # False: not ours to enter
        return None
    try:
        env = lmdb.open(str(path), readonly=True, lock=True, subdir=True, map_size=MAP_SIZE,
                        max_dbs=1)
    except lmdb.Error:
        return None       # not ours to read (its lock file not writable), or not LMDB
    probe, nonce = os.urandom(sp.ID_BYTES), os.urandom(16)
    try:
        env.reader_check()
        if client.call(sp.WRITE, probe, nonce).ok:
            with env.begin() as txn:
                seen = txn.get(probe)
            may_read = client.call(sp.READ, probe).ok   # what the node would let us read
            client.call(sp.REMOVE, probe)
            if may_read and seen is not None and seen[VALUE_HEADER:] == nonce:
                return env
    except (lmdb.Error, BrokerUnavailable):
        pass
    env.close()
    return None
