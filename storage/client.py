"""``Session``: the cluster as one client.

Routes by ``id`` (hex) or ``key`` (sha512) with the Ring: exec runs on the
owner of the id in each requested group, or on every node of every group when
no id is given, and returns one Result per node in route order.  Data calls
go to the storage front-end of the owner in each group: a write or remove
returns one Result per group, a read or lookup asks the owners group by
group until one has the key.  A node that does not answer gives a Result
with status ``unavailable``; only a call that no node could answer raises.

Every socket is opened on first use in the process that uses it, so a
Session made before a fork is never used across it (see storage.handle).
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import time
from pathlib import Path
from typing import Callable

import msgpack
import zmq

from core import config as cfg
from core import loop
from core import protocol as p
from core import security, timeouts
from core.exits import UsageError
from core.ids import key_id, parse_id
from broker.client import (CONNECT_WAIT, BrokerUnavailable, Client, Result, gather,
                           unreachable_hint)

from . import protocol as sp
from .errors import (Forbidden, NodeUnavailable, NotFound, ReplicaWriteFailed, StorageError,
                     StorageUnavailable)
from .query import BadQuery
from .ring import Ring
from .router import make_router

__all__ = ["Session", "Result", "StorageError", "NotFound", "StorageUnavailable", "Forbidden",
           "ReplicaWriteFailed", "NodeUnavailable",
           "StorageClient", "storage_ready", "config_from_remote", "BadQuery", "Hits"]

DATA_TIMEOUT = 5.0    # seconds a storage node may take to answer a data call
# A read's reply usually comes within ~100 us.  A thread that sleeps until it
# comes pays a wake-up on top (tens of microseconds on a VM, and ZeroMQ's I/O
# thread already costs one); looking for it without sleeping for this long
# first cut the read p50 by a third here.  Bounded, and only for reads.
SPIN = 0.0002
_SPIN_COMMANDS = frozenset((sp.READ, sp.LOOKUP))


class StorageClient:
    """One node's storage front-end (``storage/protocol.py``), blocking.

    ``submit_data`` sends without waiting, ``result`` waits for that reply (so
    a write can be sent to every group before waiting for any); ``call`` does
    both.  Results carry the node's `name` and `group` as given.  Raises
    NodeUnavailable when the node cannot be reached or does not reply in time.
    For exec through a storage address use ``broker.client.Client``: the node
    relays the broker's own messages."""

    def __init__(self, endpoint: str, name: str = "", group: int = 0,
                 ctx: zmq.Context | None = None, max_message: int | None = None,
                 curve: security.Credentials | None = None,
                 capability: Callable[[], bytes] | None = None):
        self.endpoint, self.name, self.group = endpoint, name, group
        self.capability = capability  # a script's: each call carries the request's token
        self.max_message = max_message
        self.curve = curve
        self._sock = loop.client_socket(ctx or zmq.Context.instance(), endpoint, max_message,
                                        curve and curve.apply)
        self._prefix = os.urandom(4)
        self._ids = itertools.count()
        self._early: dict[bytes, Result] = {}   # replies that came before they were asked for

    def submit_data(self, cmd: bytes, key_id: bytes = b"", data: bytes = b"",
                    wait: float = DATA_TIMEOUT) -> tuple[bytes, float]:
        rid = self._prefix + next(self._ids).to_bytes(8, "little")
        if self.max_message and len(data) > self.max_message:
            raise UsageError(f"value of {len(data)} bytes is larger than max_message "
                             f"({self.max_message} bytes): the storage node would not take it")
        frames = sp.request_frames(cmd, rid, key_id, bytes(data),
                                   self.capability() if self.capability else b"")
        try:
            p.send_frames(self._sock, frames, noblock=True)
        except zmq.Again:  # not connected (yet): wait a little for the connection
            if not self._sock.poll(int(CONNECT_WAIT * 1000), zmq.POLLOUT):
                raise NodeUnavailable(f"cannot connect to storage node {self.endpoint}; "
                                      f"{unreachable_hint(self.curve)}") from None
            p.send_frames(self._sock, frames, noblock=True)
        return rid, wait

    def result(self, rid: bytes, wait: float, spin: bool = False) -> Result:
        """The reply to a submitted request.  One blocking recv with a receive
        timeout, not a poll and a recv: this is the data path.  With `spin`, first
        look for the reply without sleeping for up to SPIN seconds (see there)."""
        if rid in self._early:
            return self._early.pop(rid)
        if spin:
            self._spin()
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            self._sock.setsockopt(zmq.RCVTIMEO, max(0, int(left * 1000) + 1))  # 0: no wait
            try:
                got, status, data, error = sp.parse_reply(p.recv_frames(self._sock))
            except (zmq.Again, sp.ProtocolError):
                if time.monotonic() >= deadline:
                    raise NodeUnavailable(f"no reply from storage node {self.endpoint} "
                                          f"within {wait:.1f} s; is the node running "
                                          "(srw serve)?") from None
                continue
            result = Result(self.name, self.group, status, data, error)
            if got == rid:
                return result
            if len(self._early) < 1024:  # a later request's; replies to abandoned ones age out
                self._early[got] = result

    def _spin(self) -> None:
        clock, sock, end = time.perf_counter, self._sock, time.perf_counter() + SPIN
        while not p.readable(sock) and clock() < end:
            pass

    def call(self, cmd: bytes, key_id: bytes = b"", data: bytes = b"",
             wait: float = DATA_TIMEOUT) -> Result:
        """Send and wait; reads and lookups spin first (they are answered in
        tens of microseconds, writes wait for a commit)."""
        return self.result(*self.submit_data(cmd, key_id, data, wait),
                           spin=cmd in _SPIN_COMMANDS)

    def stat(self, timeout: float = 5.0) -> dict:
        return _unpack(self.call(sp.STAT, wait=timeout))

    def routes(self, timeout: float = 5.0) -> dict:
        return _unpack(self.call(sp.ROUTES, wait=timeout))

    def search(self, query: str, limit: int, timeout: float = DATA_TIMEOUT) -> list[dict]:
        """This node's full-text hits, best first; BadQuery for a query it cannot parse."""
        result = self.call(sp.SEARCH, data=sp.search_data(sp.Search(query, limit)),
                           wait=timeout)
        if result.status == p.BAD_REQUEST:
            raise BadQuery(result.error or "bad query")
        if result.status == p.FORBIDDEN:
            raise Forbidden(f"storage node {self.name or self.endpoint}: {result.error}")
        if not result.ok:
            raise NodeUnavailable(f"storage node {self.name or self.endpoint}: "
                                  f"{result.status}: {result.error}")
        return msgpack.unpackb(result.data, raw=False)["hits"]

    def close(self) -> None:
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _unpack(result: Result) -> dict:
    if not result.ok:
        raise NodeUnavailable(f"storage node {result.node or '?'}: {result.status}: "
                              f"{result.error}")
    return p.unpack_map(result.data)


def storage_ready(endpoint: str, timeout: float = 0.5,
                  curve: security.Credentials | None = None, start: str | None = None) -> bool:
    """Whether the storage front-end at `endpoint` answers a stat within `timeout`
    (and, given `start`, is the one `srw serve` started with that nonce)."""
    with StorageClient(endpoint, curve=curve) as client:
        try:
            stat = client.stat(timeout)
        except BrokerUnavailable:
            return False
    return start is None or stat.get("start") == start


def config_from_remote(endpoint: str, timeout: float = 5.0,
                       curve: security.Credentials | None = None,
                       capability: Callable[[], bytes] | None = None) -> cfg.Config:
    """The cluster as the storage node at `endpoint` knows it (its ROUTES):
    how a client that knows one address finds every node, as Elliptics did."""
    with StorageClient(endpoint, curve=curve, capability=capability) as client:
        nodes = client.routes(timeout)["nodes"]
    try:
        settings = tuple(cfg.NodeSettings(name=n["name"], group=n["group"],
                                          storage=n["storage"], broker=n["broker"],
                                          data_dir="", ids=tuple(n["ids"])) for n in nodes)
    except (KeyError, TypeError) as exc:
        raise NodeUnavailable(f"storage node {endpoint} sent bad routes: {exc}") from None
    return cfg.Config(path=Path(f"routes-of-{endpoint.replace('/', '')}"), nodes=settings)


class Hits(list):
    """Session.search's answer: the hits, best first, and about them `count`
    (documents that match, in the group with the most), `partial` (a node was
    cut at the deadline or failed) and `failures` (one line per failed node)."""

    def __init__(self, hits: list[dict], count: int, partial: bool, failures: list[str]):
        super().__init__(hits)
        self.count, self.partial, self.failures = count, partial, failures


def merge_hits(results: list[Result], limit: int, offset: int = 0) -> Hits:
    """Every node's SEARCH reply -> hits offset to offset + limit, each key once.
    Replicas give a key several scores (BM25 depends on each node's documents);
    the best one stands for it.  Ties go by key."""
    best: dict[str, dict] = {}
    failures, counts, partial = [], {}, False
    for r in results:
        if r.status == p.BAD_REQUEST:  # the query: every node would say the same
            raise BadQuery(r.error or "bad query")
        try:
            reply = p.unpack_map(r.data) if r.ok else None
        except p.ProtocolError:
            reply = None
        if reply is None:
            failures.append(f"node {r.node} (group {r.group}): {r.status}: "
                            f"{r.error or 'a reply that is not a search reply'}")
            continue
        partial = partial or bool(reply.get("partial"))
        counts[r.group] = counts.get(r.group, 0) + int(reply.get("count", 0))
        for hit in reply.get("hits", []):
            if hit["key"] not in best or hit["score"] > best[hit["key"]]["score"]:
                best[hit["key"]] = hit
    if failures and len(failures) == len(results):
        raise StorageUnavailable("no node answered the search: " + "; ".join(failures))
    ranked = sorted(best.values(), key=lambda h: (-h["score"], h["key"]))
    return Hits(ranked[offset:offset + limit], max(counts.values(), default=0),
                partial or bool(failures), failures)


class Session:
    """The cluster as one client.  With `max_message` (srw's own callers pass
    ``Config.max_message``) its sockets take no larger message and an exec the
    brokers could not take raises ValueError; by default there is no limit.

    CurveZMQ: ``key`` (the client's .key_secret) and ``server_key`` (the
    server's public .key), or ``curve`` Credentials; by default the config's
    ``[security] key`` when its curve is on (core.security.client_credentials)."""

    def __init__(self, config: str | Path | cfg.Config = "config.toml",
                 timeout: float | None = None, max_message: int | None = None,
                 key: str | None = None, server_key: str | None = None,
                 curve: security.Credentials | None = None,
                 capability: Callable[[], bytes] | None = None):
        self.config = config if isinstance(config, cfg.Config) else cfg.load(config)
        self.capability = capability  # a script's Session: see StorageClient
        self.router = make_router(self.config)
        self.ring = Ring(self.config)  # lmdb data calls: the owners of a key's id
        self.timeout = timeout
        self.max_message = max_message
        self.curve = curve or security.client_credentials(self.config, key, server_key)
        self._brokers: dict[str, Client] = {}
        self._stores: dict[str, StorageClient] = {}
        self._redis = None  # redis-cluster data calls: a RedisStore, made at first use

    def _broker(self, name: str) -> Client:
        client = self._brokers.get(name)
        if client is None:
            # No timeout given: the config's request_timeout, which the client then waits for.
            client = Client(self.config.node(name).broker,
                            timeout=self.timeout or self.config.broker.request_timeout,
                            max_message=self.max_message, curve=self.curve)
            self._brokers[name] = client
        return client

    def _store(self, name: str) -> StorageClient:
        client = self._stores.get(name)
        if client is None:
            node = self.config.node(name)
            client = StorageClient(node.storage, node.name, node.group,
                                   max_message=self.max_message, curve=self.curve,
                                   capability=self.capability)
            self._stores[name] = client
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
        if not route.nodes:  # redis-cluster: no srw node beside the key's master now
            self.router.stale()
            return [Result("", 1, p.UNAVAILABLE, b"", route.error, route.redis)]
        calls = []
        for node in route.nodes:
            client = self._broker(node.name)
            try:
                calls.append((client, *client.submit(name, data, code, timeout, cookie,
                                                     route.hex_id)))
            except BrokerUnavailable as exc:  # not even connected: answer for it
                calls.append(exc)
        results = self._collect(route.nodes, calls)
        if key is not None and any(r.status == p.UNAVAILABLE or r.moved for r in results):
            self.router.stale()  # a failover, or a slot moved: read the map again (ourselves)
        return results

    @staticmethod
    def _collect(targets, calls) -> list[Result]:
        """Results in route order; a node that did not answer is ``unavailable``.
        In redis-cluster mode each names the Redis node beside its srw node."""
        sent = [c for c in calls if not isinstance(c, BrokerUnavailable)]
        answers = iter(gather(sent))
        results = []
        for node, call in zip(targets, calls):
            answer = call if isinstance(call, BrokerUnavailable) else next(answers)
            if isinstance(answer, BrokerUnavailable):
                answer = Result(node.name, node.group, p.UNAVAILABLE, b"", str(answer))
            results.append(dataclasses.replace(answer, redis=node.redis) if node.redis
                           else answer)
        return results

    # Data --------------------------------------------------------------------

    def write(self, key: str | bytes | None = None, data: bytes = b"", id: str | None = None,
              groups: list[int] | None = None, index: bool = False) -> list[Result]:
        """Store `data` under the key in every group; one Result per group.

        With `index`, each group's owner also runs its indexing script on the
        value and answers once the text is in its full-text index (a Result's
        data says why when it was not: binary content); above the node's
        max_index_bytes nothing is stored (``output_too_large``)."""
        if self._redis_mode:
            if index:
                raise StorageError('indexed writes need cluster.engine = "lmdb" (the '
                                   "full-text index lives in each node's storage process)")
            return [self._redis_call("write", key, id, groups, bytes(data))]
        if not index:
            return self._to_all(sp.WRITE, key, id, groups, data)
        if key is None:
            raise UsageError("an indexed write needs the key (search answers with keys)")
        raw_key = key.encode() if isinstance(key, str) else bytes(key)
        wait = self.timeout or DATA_TIMEOUT + self.config.broker.request_timeout + timeouts.INDEX_GRACE
        return self._to_all(sp.INDEXED_WRITE, key, None, groups,
                            sp.indexed_value(raw_key, data), wait)

    def search(self, query: str, limit: int = 10, offset: int = 0,
               groups: list[int] | None = None, timeout: float | None = None,
               lang: str | None = None, raw: bool = False) -> Hits:
        """Full-text search: a SEARCH to every node of the groups, hits merged by score.

        `query` is typed text (storage/query.py), or FTS5's syntax with `raw`;
        `lang` stems every word with one stemmer; `timeout` bounds each node's
        search (else its [search] timeout), which answers what it has by then.
        Returns Hits: [{"key", "score", "snippet", "parts"}], best first, each
        key once (the best of its replicas), with .count, .partial and .failures.
        Raises BadQuery (a ValueError) for a query that cannot be run,
        StorageUnavailable when no node answered."""
        if self._redis_mode:
            raise StorageError('search needs cluster.engine = "lmdb"')
        if not isinstance(offset, int) or offset < 0 or not isinstance(limit, int) or \
                not 0 < limit <= sp.MAX_HITS - offset:
            raise UsageError(f"limit must be 1 or more and offset 0 or more, at most "
                             f"{sp.MAX_HITS} together, not {limit!r} and {offset!r}")
        if timeout is not None and not 0 < timeout <= sp.MAX_SEARCH_TIMEOUT:
            raise UsageError(f"timeout must be above 0 and at most {sp.MAX_SEARCH_TIMEOUT:.0f} "
                             f"seconds, not {timeout!r}")
        data = sp.search_data(sp.Search(query, offset + limit, lang, raw, timeout))
        nodes = [n for n in self.config.nodes if groups is None or n.group in groups]
        wait = (timeout or self.config.search.timeout) + DATA_TIMEOUT
        return merge_hits(self._send_all(nodes, sp.SEARCH, b"", data, wait), limit, offset)

    def remove(self, key: str | bytes | None = None, id: str | None = None,
               groups: list[int] | None = None) -> list[Result]:
        """Remove the key from every group; ``not_found`` where it was absent."""
        if self._redis_mode:
            return [self._redis_call("remove", key, id, groups)]
        return self._to_all(sp.REMOVE, key, id, groups)

    def read(self, key: str | bytes | None = None, id: str | None = None,
             groups: list[int] | None = None) -> bytes:
        """The value, from the first group whose owner has it.

        Raises NotFound when no group has it, StorageUnavailable when no owner
        answered."""
        if self._redis_mode:
            return self._redis_store().read(self._redis_key(key, id, groups))
        return self._first(sp.READ, key, id, groups).data

    def lookup(self, key: str | bytes | None = None, id: str | None = None,
               groups: list[int] | None = None) -> dict:
        """{"size", "mtime", "id", "node", "group"} of the key; raises like read.
        In redis-cluster mode {"size", "node", "group", "redis"}: Redis keeps no mtime."""
        if self._redis_mode:
            size = self._redis_store().size(self._redis_key(key, id, groups))
            route = self.router.route(key=key)
            return {"size": size, "node": route.nodes[0].name if route.nodes else "",
                    "group": 1, "redis": route.redis}
        result = self._first(sp.LOOKUP, key, id, groups)
        return {**p.unpack_map(result.data), "node": result.node, "group": result.group}

    def stat(self) -> list[dict]:
        """Every node's store: entries, bytes, sync; an unreachable node shows its error."""
        if self._redis_mode:
            return [{"name": n.name, "group": n.group, "redis": n.redis,
                     "error": "no srw store: the data is in Redis (INFO keyspace there)"}
                    for n in self.config.nodes]
        out = []
        for node in self.config.nodes:
            try:
                out.append(self._store(node.name).stat())
            except BrokerUnavailable as exc:
                out.append({"name": node.name, "group": node.group, "error": str(exc)})
        return out

    # Data in a Redis Cluster (storage/redis_store.py) ----------------------------

    @property
    def _redis_mode(self) -> bool:
        return self.config.cluster.redis

    def _redis_store(self):
        if self._redis is None:
            from .redis_store import RedisStore
            self._redis = RedisStore(self.router.ask, self.router.auth, self.timeout,
                                     max_value=self.config.largest_payload)
        return self._redis

    def _redis_key(self, key, id, groups) -> str | bytes:
        self.router.check_groups(groups)
        if id is not None or key is None:
            raise UsageError('give the key: with cluster.engine = "redis-cluster" data is '
                             "found by key, not by id")
        return key

    def _redis_call(self, method: str, key, id, groups, *args) -> Result:
        """write or remove; one Result, named for the srw node beside the key's master."""
        key = self._redis_key(key, id, groups)
        route = self.router.route(key=key)
        node = route.nodes[0].name if route.nodes else ""
        try:
            found = getattr(self._redis_store(), method)(key, *args)
        except StorageUnavailable as exc:
            self.router.stale()
            return Result(node, 1, p.UNAVAILABLE, b"", str(exc), route.redis)
        if found is False:
            return Result(node, 1, p.NOT_FOUND, b"", f"key {key!r} not found", route.redis)
        return Result(node, 1, p.OK, b"", None, route.redis)

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
        sent = []
        for node in targets:
            client = self._store(node.name)
            try:
                sent.append((client, *client.submit_data(cmd, raw_id, data, wait)))
            except NodeUnavailable as exc:
                sent.append(exc)
        deadline = time.monotonic() + wait
        results = []
        for node, call in zip(targets, sent):
            try:
                if isinstance(call, NodeUnavailable):
                    raise call
                client, rid, _ = call
                results.append(client.result(rid, max(0.0, deadline - time.monotonic())))
            except NodeUnavailable as exc:
                results.append(Result(node.name, node.group, p.UNAVAILABLE, b"", str(exc)))
        return results

    def _first(self, cmd: bytes, key, id, groups) -> Result:
        raw_id, targets = self._locate(key, id, groups)
        wait = self.timeout or DATA_TIMEOUT
        failures = []
        for node in targets:
            try:
                result = self._store(node.name).call(cmd, raw_id, wait=wait)
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
        for client in [*self._brokers.values(), *self._stores.values()]:
            client.close()
        if self._redis is not None:
            self._redis.close()
        self._brokers.clear()
        self._stores.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
