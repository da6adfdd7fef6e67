"""The lmdb engine: srw's own storage process per node, groups of replicas.

    data call ──► key (sha512) or id ──► the Ring (storage/ring.py): its owner in
                  each requested group ──► that node's storage front-end
                  (storage/node_client.py, storage/protocol.py)

A write or remove goes to every group's owner at once and returns one Result
per group; a read or lookup asks the owners group by group until one has the
key.  A node that does not answer gives a Result with status ``unavailable``;
only a call that no node could answer raises.  Sockets are opened on first
use in the process that uses them.
"""
from __future__ import annotations

import hashlib
import time
from typing import Callable

from core import config as cfg
from core import protocol as p
from core import security, timeouts
from core.exits import UsageError
from core.ids import key_id, parse_id
from broker.client import BrokerUnavailable, Result

from . import protocol as sp
from .analyzer import UnknownLanguage, language_name
from .engine import Engine, Place
from .errors import Forbidden, NodeUnavailable, NotFound, StorageError, StorageUnavailable
from .hits import Hits, collect_all, merge_hits, search_data, send_all, submit_all
from .node_client import DATA_TIMEOUT, StorageClient, storage_ready
from .ring import Ring
from .router import RingRouter

__all__ = ["LmdbEngine"]


class LmdbEngine(Engine):
    roles = ("storage", "broker", "pool")

    def __init__(self, config: cfg.Config, timeout: float | None = None,
                 max_message: int | None = None,
                 curve: security.Credentials | None = None,
                 capability: Callable[[], bytes] | None = None,
                 script_node: str | None = None):
        self.config, self.timeout, self.max_message = config, timeout, max_message
        self.curve, self.capability = curve, capability
        self.ring = Ring(config)
        self._router = RingRouter(config)
        self._stores: dict[str, StorageClient] = {}

    @classmethod
    def storage_node(cls) -> type:
        from .node import StorageNode  # the storage process only: LMDB, FTS5
        return StorageNode

    @classmethod
    def make_router(cls, config: cfg.Config) -> RingRouter:
        return RingRouter(config)

    @property
    def router(self) -> RingRouter:
        return self._router

    def _store(self, name: str) -> StorageClient:
        client = self._stores.get(name)
        if client is None:
            node = self.config.node(name)
            client = StorageClient(node.storage, node.name, node.group,
                                   max_message=self.max_message, curve=self.curve,
                                   capability=self.capability)
            self._stores[name] = client
        return client

    # Data ------------------------------------------------------------------------

    def write(self, key, data: bytes, id, groups, index: bool = False,
              lang: str | None = None) -> list[Result]:
        if not index:
            return self._to_all(sp.WRITE, key, id, groups, data)
        if key is None:
            raise UsageError("an indexed write needs the key (search answers with keys)")
        raw_key = key.encode() if isinstance(key, str) else bytes(key)
        try:
            lang = language_name(lang, self.config.search.languages)
        except UnknownLanguage as exc:
            raise UsageError(str(exc)) from None
        wait = self.timeout or DATA_TIMEOUT + self.config.broker.request_timeout + \
            timeouts.INDEX_GRACE
        return self._to_all(sp.INDEXED_WRITE, key, None, groups,
                            sp.indexed_value(raw_key, data, lang or ""), wait)

    def search(self, query: str, limit: int, offset: int, groups, timeout, lang,
               raw) -> Hits:
        data = search_data(query, limit, offset, timeout, lang, raw)
        nodes = [n for n in self.config.nodes if groups is None or n.group in groups]
        wait = (timeout or self.config.search.timeout) + DATA_TIMEOUT
        return merge_hits(self._send_all(nodes, sp.SEARCH, b"", data, wait), limit, offset)

    def remove(self, key, id, groups) -> list[Result]:
        return self._to_all(sp.REMOVE, key, id, groups)

    def remove_keys(self, keys: list) -> None:
        """Every remove sent before any reply is waited for: a node takes those
        waiting as one batch, one commit (and fsync) instead of one each."""
        self._pipelined(sp.REMOVE, [(key, b"") for key in keys])

    def write_keys(self, items: list) -> list[list[Result]]:
        """Every write sent before any reply is waited for, as remove_keys: a
        node commits those it finds waiting together, and answers each after
        that commit."""
        return self._pipelined(sp.WRITE, items)

    def _pipelined(self, cmd: bytes, items: list) -> list[list[Result]]:
        """`cmd` for each (key, data) to every owner, all sent before the replies
        are collected: each key's Results, in order."""
        wait, sent = self.timeout or DATA_TIMEOUT, []
        for key, data in items:
            raw_id, targets = self._locate(key, None, None)
            sent.append(submit_all([(node, self._store(node.name)) for node in targets],
                                   cmd, raw_id, data, wait))
        deadline = time.monotonic() + wait
        return [collect_all(calls, deadline) for calls in sent]

    def read(self, key, id, groups) -> bytes:
        return self._first(sp.READ, key, id, groups).data

    def read_range(self, key, id, groups, offset: int, length: int) -> bytes:
        return self._first(sp.READ_RANGE, key, id, groups, sp.range_data(offset, length)).data

    def lookup(self, key, id, groups) -> dict:
        result = self._first(sp.LOOKUP, key, id, groups)
        return {**p.unpack_map(result.data), "node": result.node, "group": result.group}

    def stat(self) -> list[dict]:
        out = []
        for node in self.config.nodes:
            try:
                out.append(self._store(node.name).stat())
            except BrokerUnavailable as exc:
                out.append({"name": node.name, "group": node.group, "error": str(exc)})
        return out

    def use_groups(self, asked: list[int] | None, groups: set[int]) -> list[int] | None:
        """As in Elliptics, a group with no node is no error (its copies just cannot
        be made): it is left out; asking only for groups the cluster lacks is."""
        if not asked:
            return None
        have = [g for g in asked if g in groups]
        if not have:
            raise StorageError(f"none of the groups {asked} is in the cluster "
                               f"(groups: {sorted(groups)})")
        return have

    @property
    def client(self):
        raise StorageError('n.redis needs [cluster] engine = "redis-cluster"')

    def _locate(self, key, id, groups) -> tuple[bytes, list]:
        if (key is None) == (id is None):
            raise UsageError("give a key or an id")
        value = parse_id(id) if id is not None else key_id(key)
        return value.to_bytes(sp.ID_BYTES, "big"), self.ring.targets(value, groups)

    def _to_all(self, cmd: bytes, key, id, groups, data: bytes = b"",
                wait: float | None = None) -> list[Result]:
        """Sent to every owner first, then the replies collected: the nodes work
        in parallel, so the whole call takes the slowest node's time."""
        raw_id, targets = self._locate(key, id, groups)
        return self._send_all(targets, cmd, raw_id, data, wait or self.timeout or DATA_TIMEOUT)

    def _send_all(self, targets, cmd: bytes, raw_id: bytes, data: bytes,
                  wait: float) -> list[Result]:
        return send_all([(node, self._store(node.name)) for node in targets], cmd, raw_id,
                        data, wait)

    def _first(self, cmd: bytes, key, id, groups, data: bytes = b"") -> Result:
        raw_id, targets = self._locate(key, id, groups)
        wait = self.timeout or DATA_TIMEOUT
        failures = []
        for node in targets:
            try:
                result = self._store(node.name).call(cmd, raw_id, data, wait=wait)
            except BrokerUnavailable as exc:
                result = Result(node.name, node.group, p.UNAVAILABLE, b"", str(exc))
            if result.ok:
                return result
            failures.append(result)
        what = f"key {key!r}" if key is not None else f"id {id}"
        detail = "; ".join(f"{r.node} (group {r.group}): {r.status}: {r.error}"
                           for r in failures)
        if any(r.status == p.FORBIDDEN for r in failures):
            raise Forbidden(f"{what}: forbidden ({detail})")
        if any(r.status == p.NOT_FOUND for r in failures):
            raise NotFound(f"{what} not found ({detail})")
        raise StorageUnavailable(f"no owner of {what} answered ({detail})")

    def local_reads(self):
        """Reads straight from the stores of this host's nodes
        (storage/local_read.py), or None when no node's store here is the one
        it serves and may be read.  Imported here: LMDB only for who asks."""
        from .local_read import LocalReads
        return LocalReads.open(self.config, self.ring, self._store)

    # The nodes -------------------------------------------------------------------

    @classmethod
    def ready(cls, node: cfg.NodeSettings, curve, start: str) -> bool:
        return storage_ready(node.storage, curve=curve, start=start)

    @classmethod
    def places(cls, config: cfg.Config, nodes, curve, timeout: float,
               max_value: int) -> list[Place]:
        """Each node's own store, in config order."""
        return [NodePlace(node, config, curve, timeout) for node in nodes]

    def close(self) -> None:
        for client in self._stores.values():
            client.close()
        self._stores.clear()


class NodePlace(Place):
    """One node's own store, asked directly (not through the Ring).  A read
    takes what the node holds: the node's max_value bounds it."""

    def __init__(self, node: cfg.NodeSettings, config: cfg.Config, curve, timeout: float):
        self.name, self.node, self.timeout = node.name, node, timeout
        self._config, self._curve = config, curve
        self._client: StorageClient | None = None

    def _call(self, cmd: bytes, key: str, data: bytes = b"") -> Result:
        if self._client is None:
            self._client = StorageClient(self.node.storage, self.node.name, self.node.group,
                                         curve=self._curve,
                                         max_message=self._config.max_message)
        try:
            return self._client.call(cmd, hashlib.sha512(key.encode()).digest(), data,
                                     wait=self.timeout)
        except NodeUnavailable as exc:
            raise StorageUnavailable(str(exc)) from None

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        result = self._call(sp.READ, key)
        if result.status == p.NOT_FOUND:
            raise NotFound(key)
        if not result.ok:
            raise StorageUnavailable(f"{self.name}: {result.status}: {result.error}")
        return result.data

    def write(self, key: str, value: bytes) -> None:
        result = self._call(sp.WRITE, key, value)
        if not result.ok:
            raise StorageError(f"{result.status}: {result.error}")

    def write_if(self, key: str, value: bytes, expected) -> str:
        # A node's read never meets UNREADABLE (it answers a value or a status).
        digest = hashlib.sha256(expected).digest() if isinstance(expected, bytes) else None
        result = self._call(sp.WRITE_IF, key, sp.write_if_data(digest, value))
        if result.status == p.BUSY:  # its data: the sha256 hex of what the node holds
            return "ok" if result.data == hashlib.sha256(value).hexdigest().encode() else "busy"
        return "ok" if result.ok else f"{self.name}: {result.status}: {result.error}"

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
