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

import time
from pathlib import Path

import zmq

from broker import protocol as p
from broker.client import BrokerUnavailable, Client, Result, gather
from srw import config as cfg

from . import protocol as sp
from .ring import Ring, id_hex, key_id, parse_id

__all__ = ["Session", "Result", "StorageError", "NotFound", "StorageUnavailable",
           "StorageClient", "storage_ready", "config_from_remote"]

DATA_TIMEOUT = 5.0    # seconds a storage node may take to answer a data call


class StorageError(Exception):
    """Base of the errors a data call raises; per-node statuses are data, not errors."""


class NotFound(StorageError, KeyError):
    """No group has the key (every owner that answered said not_found)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else "not found"


class StorageUnavailable(StorageError, ConnectionError):
    """No owner of the key answered (all down, or their stores failed)."""


class NodeUnavailable(BrokerUnavailable):
    """One storage node did not answer; the Session turns it into a Result."""


class StorageClient(Client):
    """One node's storage front-end (``storage/protocol.py``); exec works too."""

    def submit_data(self, cmd: bytes, key_id: bytes = b"", data: bytes = b"",
                    wait: float = DATA_TIMEOUT) -> tuple[bytes, float]:
        rid = self._next_rid()
        self._send(sp.request_frames(cmd, rid, key_id, bytes(data)))
        self._outstanding.add(rid)
        return rid, wait

    def call(self, cmd: bytes, key_id: bytes = b"", data: bytes = b"",
             wait: float = DATA_TIMEOUT) -> Result:
        return self.result(*self.submit_data(cmd, key_id, data, wait))

    def _wait(self, rid: bytes, wait: float) -> Result:
        """As Client._wait, but one blocking recv with a receive timeout instead of
        a poll and a recv: the data path is a few microseconds shorter."""
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._unavailable(wait)
            self._sock.setsockopt(zmq.RCVTIMEO, int(left * 1000) + 1)
            try:
                got, result = p.parse_reply(self._sock.recv_multipart())
            except zmq.Again:
                continue
            except p.ProtocolError:
                continue
            if got == rid:
                return result
            if got in self._outstanding:
                self._early[got] = result

    def stat(self, timeout: float = 5.0) -> dict:
        return _unpack(self.call(sp.STAT, wait=timeout))

    def routes(self, timeout: float = 5.0) -> dict:
        return _unpack(self.call(sp.ROUTES, wait=timeout))

    def _unavailable(self, wait: float) -> NodeUnavailable:
        return NodeUnavailable(f"no reply from storage node {self.endpoint} within "
                               f"{wait:.1f} s; is the node running (srw serve)?")

    def _unreachable(self) -> NodeUnavailable:
        return NodeUnavailable(f"cannot connect to storage node {self.endpoint}; "
                               "is the node running (srw serve)?")


def _unpack(result: Result) -> dict:
    if not result.ok:
        raise NodeUnavailable(f"node {result.node}: {result.status}: {result.error}")
    return p.unpack_map(result.data)


def storage_ready(endpoint: str, timeout: float = 0.5) -> bool:
    """Whether the storage front-end at `endpoint` answers a stat within `timeout`."""
    with StorageClient(endpoint) as client:
        try:
            client.stat(timeout)
        except BrokerUnavailable:
            return False
    return True


def config_from_remote(endpoint: str, timeout: float = 5.0) -> cfg.Config:
    """The cluster as the storage node at `endpoint` knows it (its ROUTES):
    how a client that knows one address finds every node, as Elliptics did."""
    with StorageClient(endpoint) as client:
        nodes = client.routes(timeout)["nodes"]
    try:
        settings = tuple(cfg.NodeSettings(name=n["name"], group=n["group"],
                                          storage=n["storage"], broker=n["broker"],
                                          data_dir="", ids=tuple(n["ids"])) for n in nodes)
    except (KeyError, TypeError) as exc:
        raise NodeUnavailable(f"storage node {endpoint} sent bad routes: {exc}") from None
    return cfg.Config(path=Path(f"routes-of-{endpoint.replace('/', '')}"), nodes=settings)


class Session:
    def __init__(self, config: str | Path | cfg.Config = "config.toml",
                 timeout: float | None = None):
        self.config = config if isinstance(config, cfg.Config) else cfg.load(config)
        self.ring = Ring(self.config)
        self.timeout = timeout
        self._brokers: dict[str, Client] = {}
        self._stores: dict[str, StorageClient] = {}

    def _broker(self, name: str) -> Client:
        client = self._brokers.get(name)
        if client is None:
            client = Client(self.config.node(name).broker, timeout=self.timeout)
            self._brokers[name] = client
        return client

    def _store(self, name: str) -> StorageClient:
        client = self._stores.get(name)
        if client is None:
            client = StorageClient(self.config.node(name).storage)
            self._stores[name] = client
        return client

    def route(self, id: str | None = None, key: str | bytes | None = None,
              groups: list[int] | None = None):
        """The nodes a request goes to, in route order."""
        if id is not None and key is not None:
            raise ValueError("give id or key, not both")
        value = parse_id(id) if id is not None else key_id(key) if key is not None else None
        return self.ring.targets(value, groups)

    # Exec ----------------------------------------------------------------------

    def exec(self, name: str = "", data: bytes = b"", code: str = "", id: str | None = None,
             key: str | bytes | None = None, groups: list[int] | None = None,
             cookie: str = "", timeout: float | None = None) -> list[Result]:
        targets = self.route(id, key, groups)
        hex_id = id if id is not None else (None if key is None else id_hex(key_id(key)))
        calls = []
        for node in targets:
            client = self._broker(node.name)
            try:
                calls.append((client, *client.submit(name, data, code, timeout, cookie,
                                                     hex_id)))
            except BrokerUnavailable as exc:  # not even connected: answer for it
                calls.append(exc)
        return self._collect(targets, calls)

    @staticmethod
    def _collect(targets, calls) -> list[Result]:
        """Results in route order; a node that did not answer is ``unavailable``."""
        sent = [c for c in calls if not isinstance(c, BrokerUnavailable)]
        answers = iter(gather(sent))
        results = []
        for node, call in zip(targets, calls):
            answer = call if isinstance(call, BrokerUnavailable) else next(answers)
            if isinstance(answer, BrokerUnavailable):
                answer = Result(node.name, node.group, p.UNAVAILABLE, b"", str(answer))
            results.append(answer)
        return results

    # Data --------------------------------------------------------------------

    def write(self, key: str | bytes | None = None, data: bytes = b"", id: str | None = None,
              groups: list[int] | None = None) -> list[Result]:
        """Store `data` under the key in every group; one Result per group."""
        return self._to_all(sp.WRITE, key, id, groups, data)

    def remove(self, key: str | bytes | None = None, id: str | None = None,
               groups: list[int] | None = None) -> list[Result]:
        """Remove the key from every group; ``not_found`` where it was absent."""
        return self._to_all(sp.REMOVE, key, id, groups)

    def read(self, key: str | bytes | None = None, id: str | None = None,
             groups: list[int] | None = None) -> bytes:
        """The value, from the first group whose owner has it.

        Raises NotFound when no group has it, StorageUnavailable when no owner
        answered."""
        return self._first(sp.READ, key, id, groups).data

    def lookup(self, key: str | bytes | None = None, id: str | None = None,
               groups: list[int] | None = None) -> dict:
        """{"size", "mtime", "id", "node", "group"} of the key; raises like read."""
        result = self._first(sp.LOOKUP, key, id, groups)
        return {**p.unpack_map(result.data), "node": result.node, "group": result.group}

    def stat(self) -> list[dict]:
        """Every node's store: entries, bytes, sync; an unreachable node shows its error."""
        out = []
        for node in self.config.nodes:
            try:
                out.append(self._store(node.name).stat())
            except BrokerUnavailable as exc:
                out.append({"name": node.name, "group": node.group, "error": str(exc)})
        return out

    def _locate(self, key, id, groups) -> tuple[bytes, list]:
        if (key is None) == (id is None):
            raise ValueError("give a key or an id")
        value = parse_id(id) if id is not None else key_id(key)
        return value.to_bytes(sp.ID_BYTES, "big"), self.ring.targets(value, groups)

    def _to_all(self, cmd: bytes, key, id, groups, data: bytes = b"") -> list[Result]:
        raw_id, targets = self._locate(key, id, groups)
        wait = self.timeout or DATA_TIMEOUT
        calls = []
        for node in targets:
            client = self._store(node.name)
            try:
                calls.append((client, *client.submit_data(cmd, raw_id, data, wait)))
            except BrokerUnavailable as exc:
                calls.append(exc)
        return self._collect(targets, calls)

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
        self._brokers.clear()
        self._stores.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
