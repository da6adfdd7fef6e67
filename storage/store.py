"""One node's data on LMDB: one environment per node, under ``data_dir/store``.

A value is kept under its 64-byte id, behind an 8-byte header holding its
mtime (nanoseconds, big-endian), so a lookup needs no second table.

``apply(batch)`` runs a batch of requests in one transaction, in order: a
write transaction (one commit, so one fsync for the whole batch) when the
batch holds a write or a remove, else a read transaction.  Replies are
returned only after the commit, so a write is acknowledged only once it is
durable (``sync`` on: fsync at commit; off: the OS writes it back later,
which survives a process crash but not a power cut).  If the shared
transaction fails (disk full, I/O error) every request is redone alone, so
only the requests that fail get an error.

The environment is opened by the storage process itself, after any fork,
and never handed to a child.
"""
from __future__ import annotations

import os
import struct
import time
from pathlib import Path

import lmdb

from broker import protocol as bp

from . import protocol as sp
from .protocol import StorageRequest

# Address space reserved for the map, not disk space: LMDB grows the file as
# data comes.  1 TiB is far beyond any node this runtime is meant for.
MAP_SIZE = 1 << 40
_HEADER = struct.Struct(">Q")

Reply = tuple[str, bytes, str]   # (status, data, error)


class Store:
    def __init__(self, path: str | Path, name: str, sync: bool = True,
                 max_value: int = 64 * 1024 * 1024):
        os.makedirs(path, exist_ok=True)
        self.path, self.name, self.sync, self.max_value = str(path), name, sync, max_value
        self.env = lmdb.open(self.path, map_size=MAP_SIZE, subdir=True, sync=sync,
                             metasync=sync, max_dbs=0)
        self.env.reader_check()  # reader slots left behind by a killed process
        self._handlers = {sp.WRITE: self._write, sp.READ: self._read,
                          sp.REMOVE: self._remove, sp.LOOKUP: self._lookup}

    def apply(self, requests: list[StorageRequest]) -> list[Reply]:
        """One reply per request, in order; never raises for a store failure."""
        write = any(r.cmd in sp.MUTATING for r in requests)
        try:
            with self.env.begin(write=write, buffers=True) as txn:
                replies = [self._handlers[r.cmd](txn, r) for r in requests]
            return replies  # the commit (and fsync) happened when the block closed
        except lmdb.Error as exc:
            if len(requests) == 1:
                return [(bp.UNAVAILABLE, b"",
                         f"node {self.name}: the store failed ({type(exc).__name__}: {exc}); "
                         "is the disk full?")]
            # The failed transaction was aborted: nothing of it is stored.
            return [self.apply([r])[0] for r in requests]

    def stats(self) -> dict:
        stat = self.env.stat()
        pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return {"entries": stat["entries"], "bytes": pages * stat["psize"],
                "map_size": self.env.info()["map_size"], "sync": self.sync,
                "max_value": self.max_value}

    def close(self) -> None:
        self.env.close()

    # Handlers: (txn, request) -> Reply ------------------------------------------

    def _write(self, txn, req: StorageRequest) -> Reply:
        if len(req.data) > self.max_value:
            return (bp.OUTPUT_TOO_LARGE, b"",
                    f"value is {len(req.data)} bytes; node {self.name} stores at most "
                    f"{self.max_value} (node.max_value)")
        txn.put(req.id, _HEADER.pack(time.time_ns()) + req.data)
        return bp.OK, b"", ""

    def _read(self, txn, req: StorageRequest) -> Reply:
        value = txn.get(req.id)
        if value is None:
            return self._missing(req)
        return bp.OK, bytes(value[_HEADER.size:]), ""

    def _remove(self, txn, req: StorageRequest) -> Reply:
        if not txn.delete(req.id):
            return self._missing(req)
        return bp.OK, b"", ""

    def _lookup(self, txn, req: StorageRequest) -> Reply:
        value = txn.get(req.id)
        if value is None:
            return self._missing(req)
        (mtime_ns,) = _HEADER.unpack(value[:_HEADER.size])
        return bp.OK, bp.pack({"size": len(value) - _HEADER.size, "mtime": mtime_ns / 1e9,
                               "id": req.id.hex()}), ""

    def _missing(self, req: StorageRequest) -> Reply:
        return bp.NOT_FOUND, b"", f"node {self.name}: no value with id {req.id.hex()[:16]}..."
