"""One storage node's front-end (storage/protocol.py) as a blocking client.

``StorageClient`` is what the lmdb engine (storage/engine_lmdb.py), the pushed
scripts' store and a script's ``n.search`` talk to one node with;
``storage_ready`` and ``config_from_remote`` ask one node about itself.
"""
from __future__ import annotations

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
from core import security
from core.exits import UsageError
from broker.client import CONNECT_WAIT, BrokerUnavailable, Result, unreachable_hint

from . import protocol as sp
from .errors import Forbidden, NodeUnavailable
from .query import BadQuery

__all__ = ["StorageClient", "storage_ready", "config_from_remote", "DATA_TIMEOUT"]

DATA_TIMEOUT = 5.0    # seconds a storage node may take to answer a data call
# A read's reply usually comes within ~100 us.  A thread that sleeps until it
# comes pays a wake-up on top (tens of microseconds on a VM, and ZeroMQ's I/O
# thread already costs one); looking for it without sleeping for this long
# first cut the read p50 by a third here.  Bounded, and only for reads.  On a
# busy machine the reply comes later than that, and the spin only burns a CPU
# the node needs: after a spin that missed, the next SPIN_PAUSE reads block at
# once (on two loaded cores, half the client's CPU per read; no slower).
SPIN = 0.0002
SPIN_PAUSE = 16
_SPIN_COMMANDS = frozenset((sp.READ, sp.READ_RANGE, sp.LOOKUP))


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
        self._unspun = 0    # reads left that do not spin (SPIN_PAUSE)

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
        if self._unspun:
            self._unspun -= 1
            return
        clock, sock, end = time.perf_counter, self._sock, time.perf_counter() + SPIN
        while not p.readable(sock):
            if clock() >= end:
                self._unspun = SPIN_PAUSE
                return

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
