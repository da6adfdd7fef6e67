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

Indexed values (INDEXED_WRITE) also get a row in the ``fulltext`` sub-database,
written in the same transaction as the value: id -> the value's version (its
mtime in nanoseconds), the lang its write named, and the key.  It says what
the full-text index must hold, so the index can be checked against it after
a crash; a plain write or a remove of the id deletes the row in its own
transaction.  ``changes`` tells the caller, after each ``apply``, what the
full-text index must do.

The environment is opened by the storage process itself, after any fork,
and never handed to a child.
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import lmdb

from core import protocol as bp

from . import protocol as sp
from .analyzer import UnknownLanguage, language_name
from .protocol import StorageRequest

# Address space reserved for the map, not disk space: LMDB grows the file as
# data comes.  1 TiB is far beyond any node this runtime is meant for.
MAP_SIZE = 1 << 40
_HEADER = struct.Struct(">Q")

# A fulltext row's version with this bit set: a lang (1 byte of length, then the
# name) comes before the key.  Rows of older nodes have it clear: no lang.
_WITH_LANG = 1 << 63
Reply = tuple[str, bytes, str]   # (status, data, error)
DEFERRED: Reply = ("", b"", "")   # an indexed write: answered once its text is indexed
FULLTEXT_DB = b"fulltext"


@dataclass(frozen=True, slots=True)
class IndexJob:
    """An indexed value waiting for its text: the request (None at start-up), the
    stemmer its write named (None: each word by its script)."""
    id: bytes
    key: bytes
    version: int
    value: bytes
    request: StorageRequest | None = None
    lang: str | None = None


@dataclass
class Changes:
    """What the full-text index must do after a batch committed."""
    to_index: list[IndexJob] = field(default_factory=list)
    dropped: list[bytes] = field(default_factory=list)   # ids no longer indexed


class Store:
    def __init__(self, path: str | Path, name: str, sync: bool = True,
                 max_value: int = 64 * 1024 * 1024, max_index_bytes: int = 1024 * 1024,
                 languages: tuple[str, ...] = ("english", "russian")):
        os.makedirs(path, exist_ok=True)
        self.path, self.name, self.sync, self.max_value = str(path), name, sync, max_value
        self.max_index_bytes, self.languages = max_index_bytes, languages
        self.env = lmdb.open(self.path, map_size=MAP_SIZE, subdir=True, sync=sync,
                             metasync=sync, max_dbs=1)
        self.env.reader_check()  # reader slots left behind by a killed process
        self.fulltext = self.env.open_db(FULLTEXT_DB)
        self.changes = Changes()
        self._batch_changes = Changes()
        self._handlers = {sp.WRITE: self._write, sp.READ: self._read,
                          sp.REMOVE: self._remove, sp.LOOKUP: self._lookup,
                          sp.INDEXED_WRITE: self._indexed_write, sp.WRITE_IF: self._write_if,
                          sp.READ_RANGE: self._read_range}

    def apply(self, requests: list[StorageRequest]) -> list[Reply]:
        """One reply per request, in order (DEFERRED for an indexed write, which
        ``changes.to_index`` lists); never raises for a store failure."""
        self.changes = Changes()
        return self._apply(requests)

    def _apply(self, requests: list[StorageRequest]) -> list[Reply]:
        write = any(r.cmd in sp.MUTATING for r in requests)
        self._batch_changes = Changes()
        try:
            with self.env.begin(write=write, buffers=True) as txn:
                replies = [self._handlers[r.cmd](txn, r) for r in requests]
            # The commit (and fsync) happened when the block closed.
            self.changes.to_index += self._batch_changes.to_index
            self.changes.dropped += self._batch_changes.dropped
            return replies
        except lmdb.Error as exc:
            if len(requests) == 1:
                return [(bp.UNAVAILABLE, b"",
                         f"node {self.name}: the store failed ({type(exc).__name__}: {exc}); "
                         "is the disk full?")]
            # The failed transaction was aborted: nothing of it is stored.
            return [self._apply([r])[0] for r in requests]

    # The full-text rows -----------------------------------------------------------

    def indexed(self) -> dict[bytes, tuple[int, bytes]]:
        """id -> (version, key) of every indexed value: what the index must hold."""
        out = {}
        with self.env.begin(db=self.fulltext) as txn:
            for key_id, row in txn.cursor():
                version, _, key = _split_row(row)
                out[key_id] = (version, key)
        return out

    def is_current(self, key_id: bytes, version: int) -> bool:
        """Whether the value of `key_id` is still the indexed one of that version."""
        with self.env.begin(db=self.fulltext) as txn:
            row = txn.get(key_id)
        return row is not None and _split_row(row)[0] == version

    def job(self, key_id: bytes) -> IndexJob | None:
        """The indexed value of `key_id` as an IndexJob (start-up re-indexing)."""
        with self.env.begin() as txn:
            row, value = txn.get(key_id, db=self.fulltext), txn.get(key_id)
        if row is None or value is None:
            return None
        version, lang, key = _split_row(row)
        return IndexJob(key_id, key, version, value[_HEADER.size:], lang=lang)

    def stats(self) -> dict:
        stat = self.env.stat()
        pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        # The main database also holds the name of the fulltext sub-database.
        return {"entries": stat["entries"] - 1, "bytes": pages * stat["psize"],
                "map_size": self.env.info()["map_size"], "sync": self.sync,
                "max_value": self.max_value}

    def close(self) -> None:
        self.env.close()

    # Handlers: (txn, request) -> Reply ------------------------------------------

    def _too_large(self, value) -> Reply | None:
        if len(value) > self.max_value:
            return (bp.OUTPUT_TOO_LARGE, b"",
                    f"value is {len(value)} bytes; node {self.name} stores at most "
                    f"{self.max_value} (node.max_value)")
        return None

    def _write(self, txn, req: StorageRequest) -> Reply:
        refused = self._too_large(req.data)
        if refused:
            return refused
        txn.put(req.id, _HEADER.pack(time.time_ns()) + req.data)
        self._unindex(txn, req.id)
        return bp.OK, b"", ""

    def _write_if(self, txn, req: StorageRequest) -> Reply:
        """Compare-and-set: compared and written in this one write transaction."""
        try:
            expected, value = sp.split_write_if(req.data)
        except sp.ProtocolError as exc:
            return bp.BAD_REQUEST, b"", f"node {self.name}: {exc}"
        stored = txn.get(req.id)
        now = None if stored is None else hashlib.sha256(stored[_HEADER.size:]).digest()
        if now != expected:
            return (bp.BUSY, now.hex().encode() if now else b"",
                    f"node {self.name}: write-if: the stored value is not the one expected "
                    f"(another writer came first); nothing written")
        return self._write(txn, StorageRequest(req.client, req.cmd, req.rid, req.id, value))

    def _indexed_write(self, txn, req: StorageRequest) -> Reply:
        try:
            key, lang, value = sp.split_indexed(req.data)
            lang = language_name(lang, self.languages)
        except (sp.ProtocolError, UnknownLanguage) as exc:
            return bp.BAD_REQUEST, b"", f"node {self.name}: {exc}"
        if hashlib.sha512(key).digest() != bytes(req.id):
            return bp.BAD_REQUEST, b"", f"node {self.name}: indexed write: the id is not sha512(key)"
        if len(value) > self.max_index_bytes:
            return (bp.OUTPUT_TOO_LARGE, b"",
                    f"document is {len(value)} bytes; node {self.name} indexes at most "
                    f"{self.max_index_bytes} (node.max_index_bytes); nothing was stored")
        refused = self._too_large(value)
        if refused:
            return refused
        version = time.time_ns()
        txn.put(req.id, _HEADER.pack(version) + value)
        txn.put(req.id, _row(version, lang, key), db=self.fulltext)
        self._batch_changes.to_index.append(IndexJob(bytes(req.id), key, version,
                                                     bytes(value), req, lang))
        return DEFERRED

    def _unindex(self, txn, key_id) -> None:
        if txn.delete(key_id, db=self.fulltext):
            self._batch_changes.dropped.append(bytes(key_id))

    def _read(self, txn, req: StorageRequest) -> Reply:
        value = txn.get(req.id)
        if value is None:
            return self._missing(req)
        return bp.OK, bytes(value[_HEADER.size:]), ""

    def _read_range(self, txn, req: StorageRequest) -> Reply:
        """Part of a value, sliced in the transaction's buffer: only the bytes
        asked for are copied."""
        try:
            offset, length = sp.split_range(req.data)
        except sp.ProtocolError as exc:
            return bp.BAD_REQUEST, b"", f"node {self.name}: {exc}"
        value = txn.get(req.id)
        if value is None:
            return self._missing(req)
        start = _HEADER.size + min(offset, len(value) - _HEADER.size)
        return bp.OK, bytes(value[start:start + length]), ""

    def _remove(self, txn, req: StorageRequest) -> Reply:
        if not txn.delete(req.id):
            return self._missing(req)
        self._unindex(txn, req.id)
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


def _row(version: int, lang: str | None, key: bytes) -> bytes:
    """A fulltext row: version, then (with a lang) its length and name, then the key."""
    if lang is None:
        return _HEADER.pack(version) + key
    raw = lang.encode()
    return _HEADER.pack(version | _WITH_LANG) + bytes([len(raw)]) + raw + key


def _split_row(row: bytes) -> tuple[int, str | None, bytes]:
    """(version, lang or None, key) of a fulltext row."""
    (version,) = _HEADER.unpack(row[:_HEADER.size])
    if not version & _WITH_LANG:
        return version, None, bytes(row[_HEADER.size:])
    size = row[_HEADER.size]
    start = _HEADER.size + 1
    return (version & ~_WITH_LANG, bytes(row[start:start + size]).decode(),
            bytes(row[start + size:]))
