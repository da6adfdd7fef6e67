"""``Session``: the cluster as one client.

Exec is placed by the engine's router (storage/router.py): by ``id`` (hex) or
``key`` on the owner in each requested group (lmdb) or beside the key's
master (redis-cluster), on every node of the groups with neither; one Result
per node in route order (storage/execs.py).  Data calls go to the engine
(storage/engine.py): lmdb answers a write or remove with one Result per
group, redis-cluster with one; a read or lookup returns the value or raises.
A node that does not answer gives a Result with status ``unavailable``; only
a call that no node could answer raises.

Every socket is opened on first use in the process that uses it, so a
Session made before a fork is never used across it (see storage.handle).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from core import config as cfg
from core import security
from broker.client import BrokerUnavailable, Client, Result, gather

from . import execs
from .engine import engine_class
from .errors import (Forbidden, NodeUnavailable, NotFound, ReplicaWriteFailed, StorageError,
                     StorageUnavailable)
from .node_client import DATA_TIMEOUT, StorageClient, config_from_remote, storage_ready
from .query import BadQuery
from .ring import Ring

__all__ = ["Session", "Result", "StorageError", "NotFound", "StorageUnavailable", "Forbidden",
           "ReplicaWriteFailed", "NodeUnavailable", "DATA_TIMEOUT",
           "StorageClient", "storage_ready", "config_from_remote", "BadQuery", "Hits"]


def __getattr__(name: str):
    if name == "Hits":  # the search answer; imported only when asked for
        from .hits import Hits
        return Hits
    raise AttributeError(name)


class Session:
    """The cluster as one client.  With `max_message` (srw's own callers pass
    ``Config.max_message``) its sockets take no larger message and an exec the
    brokers could not take raises ValueError; by default there is no limit.

    CurveZMQ: ``key`` (the client's .key_secret) and ``server_key`` (the
    server's public .key), or ``curve`` Credentials; by default the config's
    ``[security] key`` when its curve is on (core.security.client_credentials).
    `script_node`: a script's handle's Session (storage/handle.py)."""

    def __init__(self, config: str | Path | cfg.Config = "config.toml",
                 timeout: float | None = None, max_message: int | None = None,
                 key: str | None = None, server_key: str | None = None,
                 curve: security.Credentials | None = None,
                 capability: Callable[[], bytes] | None = None,
                 script_node: str | None = None):
        self.config = config if isinstance(config, cfg.Config) else cfg.load(config)
        self.capability = capability  # a script's Session: see StorageClient
        self.ring = Ring(self.config)  # the groups there are
        self.timeout = timeout
        self.max_message = max_message
        self.curve = curve or security.client_credentials(self.config, key, server_key)
        self.engine = engine_class(self.config)(self.config, timeout, max_message, self.curve,
                                                capability, script_node)
        self._brokers: dict[str, Client] = {}

    @property
    def router(self):
        """Placement (storage/router.py), the engine's."""
        return self.engine.router

    def _broker(self, name: str) -> Client:
        client = self._brokers.get(name)
        if client is None:
            # No timeout given: the config's request_timeout, which the client then waits for.
            client = Client(self.config.node(name).broker,
                            timeout=self.timeout or self.config.broker.request_timeout,
                            max_message=self.max_message, curve=self.curve)
            self._brokers[name] = client
        return client

    def route(self, id: str | None = None, key: str | bytes | None = None,
              groups: list[int] | None = None):
        """The nodes a request goes to, in route order (storage/router.py)."""
        return self.router.route(id, key, groups).nodes

    # Exec ----------------------------------------------------------------------

    def exec(self, name: str = "", data: bytes = b"", code: str = "", id: str | None = None,
             key: str | bytes | None = None, groups: list[int] | None = None,
             cookie: str = "", timeout: float | None = None) -> list[Result]:
        route = self.router.route(id, key, groups)
        if (unplaced := execs.nowhere(self.router, route)) is not None:
            return unplaced
        calls = []
        for node in route.nodes:
            client = self._broker(node.name)
            try:
                calls.append((client, *client.submit(name, data, code, timeout, cookie,
                                                     route.hex_id)))
            except BrokerUnavailable as exc:  # not even connected: answer for it
                calls.append(exc)
        sent = iter(gather([c for c in calls if not isinstance(c, BrokerUnavailable)]))
        results = [execs.answer(node, call if isinstance(call, BrokerUnavailable) else next(sent))
                   for node, call in zip(route.nodes, calls)]
        return execs.settle(self.router, route, results)

    # Data (storage/engine.py) --------------------------------------------------

    def write(self, key: str | bytes | None = None, data: bytes = b"", id: str | None = None,
              groups: list[int] | None = None, index: bool = False,
              lang: str | None = None) -> list[Result]:
        """Store `data` under the key in every group; one Result per group (one in
        redis-cluster mode).

        With `index`, the value's text also goes into the full-text index, its
        words stemmed by `lang` (a configured [search] language, its short name,
        or "none"; None: each word by the stemmer of its script), which is kept
        with the document.  lmdb: each group's owner runs its indexing script on
        the value and answers once the text is in its full-text index (a
        Result's data says why when it was not: binary content).  redis-cluster:
        Redis takes the value and its index entry in one MULTI, and the call
        returns once the node beside the key's master indexed it (its data says
        so when that took longer than the timeout; README "Full-text search").
        Above max_index_bytes nothing is stored (``output_too_large``)."""
        return self.engine.write(key, data, id, groups, index, lang)

    def search(self, query: str, limit: int = 10, offset: int = 0,
               groups: list[int] | None = None, timeout: float | None = None,
               lang: str | None = None, raw: bool = False):
        """Full-text search: a SEARCH to every node of the groups (redis-cluster:
        every node's search front-end), hits merged by score.

        `query` is typed text (storage/query.py), or FTS5's syntax with `raw`;
        `lang` stems every word with one stemmer; `timeout` bounds each node's
        search (else its [search] timeout), which answers what it has by then.
        Returns Hits: [{"key", "score", "snippet", "parts"}], best first, each
        key once (the best of its replicas), with .count, .partial and .failures.
        Raises BadQuery (a ValueError) for a query that cannot be run,
        StorageUnavailable when no node answered."""
        return self.engine.search(query, limit, offset, groups, timeout, lang, raw)

    def remove(self, key: str | bytes | None = None, id: str | None = None,
               groups: list[int] | None = None) -> list[Result]:
        """Remove the key from every group; ``not_found`` where it was absent."""
        return self.engine.remove(key, id, groups)

    def read(self, key: str | bytes | None = None, id: str | None = None,
             groups: list[int] | None = None) -> bytes:
        """The value, from the first group whose owner has it.

        Raises NotFound when no group has it, StorageUnavailable when no owner
        answered."""
        return self.engine.read(key, id, groups)

    def read_range(self, key: str | bytes | None = None, offset: int = 0, length: int = 0,
                   id: str | None = None, groups: list[int] | None = None) -> bytes:
        """At most `length` bytes of the value from `offset`: fewer where it ends,
        none past its end; only those bytes cross the network.  Raises like
        read, and ValueError for a negative offset or length, or one too large
        for the wire (storage/protocol.py range_data)."""
        return self.engine.read_range(key, id, groups, offset, length)

    def lookup(self, key: str | bytes | None = None, id: str | None = None,
               groups: list[int] | None = None) -> dict:
        """{"size", "mtime", "id", "node", "group"} of the key; raises like read.
        In redis-cluster mode {"size", "node", "group", "redis"}: Redis keeps no mtime."""
        return self.engine.lookup(key, id, groups)

    def stat(self) -> list[dict]:
        """Every node's store: entries, bytes, sync; an unreachable node shows its error."""
        return self.engine.stat()

    # Nodes -------------------------------------------------------------------

    def status(self) -> list[dict]:
        """Every node's pool status; an unreachable node shows as {"name", "error"}."""
        out = []
        for node in self.config.nodes:
            try:
                out.append(self._broker(node.name).status(timeout=2.0))
            except BrokerUnavailable as exc:
                out.append({"name": node.name, "group": node.group, "error": str(exc)})
        return out

    def close(self) -> None:
        for client in self._brokers.values():
            client.close()
        self._brokers.clear()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
