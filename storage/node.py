"""The node's storage front-end: data commands on LMDB, exec handed to the broker.

    clients (DEALER) --> [ROUTER node.storage]  StorageNode  --> Store (LMDB, data_dir/store)
                                                     |
                                                   Relay [DEALER] --> node.broker

Each turn of the loop reads every request already waiting (up to BATCH):
frames that make no sense are answered ``bad_request``, exec and status go
to the broker through the Relay, stat and routes are answered at once, and
the data commands run as one batch in one LMDB transaction (one commit, one
fsync for all its writes); their replies go out after the commit.  Storage
calls never wait for an exec, so a script's own reads and writes cannot
deadlock on the per-id lock its exec holds in the broker.
"""
from __future__ import annotations

import ctypes
import heapq
import itertools
import logging
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from core import loop
from core import protocol as bp
from core import security, timeouts
from core.config import START_ENV, Config, NodeSettings

from . import protocol as sp
from .fulltext import FullText
from .grants import Grants
from .indexer import Indexer
from .searcher import Searcher
from .store import DEFERRED, Store

log = logging.getLogger("srw.storage")

BATCH = 256          # requests read before the batch is run; bounds reply latency
STATUS_WAIT = 5.0    # seconds a relayed status request may take
VIEW_FROM = 64 * 1024    # a value this large is not copied out of its message (recv_request)
_recv = zmq.backend.Socket.recv     # pyzmq's Cython recv, as core.protocol calls it
MMAP_MAX, TRIM_MAX = 32 << 20, 64 << 20     # see keep_freed_memory
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameters


class Relay:
    """Exec and status requests on their way to the node's broker and back.

    The hop uses its own request ids (the callers' may collide); each relayed
    request gets exactly one reply: the broker's, or ``unavailable`` when the
    broker cannot be reached or does not answer by the request's deadline
    plus timeouts.RELAY_GRACE."""

    def __init__(self, ctx: zmq.Context, node: NodeSettings, default_timeout: float, reply,
                 max_message: int, credentials: security.Credentials | None = None):
        self.node, self.default_timeout, self.reply = node, default_timeout, reply
        self.sock = loop.socket(ctx, zmq.DEALER, max_message)
        self.sock.setsockopt(zmq.RECONNECT_IVL, 50)
        self.sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)  # never queue for a broker that is not there
        if credentials is not None:  # the node's own key: the broker trusts what we relay
            credentials.apply(self.sock)
        self.sock.connect(node.broker)
        # hop rid -> (client, rid), or the callback of the node's own request
        self.pending: dict[bytes, tuple[bytes, bytes] | Callable[[bp.Result], None]] = {}
        self.deadlines: list[tuple[float, bytes]] = []
        self._ids = itertools.count()

    def forward(self, req: bp.FrontRequest) -> None:
        """A core.protocol request -> the broker."""
        if not self._send(req.cmd, req.meta, req.data, (req.client, req.rid)):
            self.reply(req.client, req.rid, bp.UNAVAILABLE, error=self._no_broker())

    def exec(self, meta: bp.ExecMeta, data: bytes, on_reply) -> None:
        """The node's own exec (indexing); `on_reply(Result)` gets exactly one answer."""
        if not self._send(bp.EXEC, meta, data, on_reply):
            on_reply(self._unavailable(self._no_broker()))

    def _send(self, cmd: int, meta: bp.ExecMeta, data: bytes, caller) -> bool:
        hop = next(self._ids).to_bytes(8, "little")
        try:
            bp.send_frames(self.sock, bp.request_frames(cmd, hop, meta, data), noblock=True)
        except zmq.Again:
            return False
        self.pending[hop] = caller
        wait = (meta.timeout or self.default_timeout) if cmd == bp.EXEC else STATUS_WAIT
        heapq.heappush(self.deadlines, (time.monotonic() + wait + timeouts.RELAY_GRACE, hop))
        return True

    def _no_broker(self) -> str:
        return (f"node {self.node.name}: its broker {self.node.broker} is not running; is "
                "the node's broker started (srw serve)?")

    def _unavailable(self, error: str) -> bp.Result:
        return bp.Result(self.node.name, self.node.group, bp.UNAVAILABLE, b"", error)

    def _answer(self, caller, result: bp.Result, send=None) -> None:
        if callable(caller):
            caller(result)
        elif send is not None:
            send(bp.reply_frames(*caller, result.status, result.node, result.group,
                                 result.data, result.error or ""))
        else:
            self.reply(*caller, result.status, error=result.error or "")

    def read_replies(self, send) -> None:
        """Relay every waiting broker reply to its caller through `send`."""
        for _ in range(1000):
            frames = bp.recv_frames_nowait(self.sock)
            if frames is None:
                return
            try:
                hop, result = bp.parse_reply(frames)
            except bp.ProtocolError:
                continue
            caller = self.pending.pop(hop, None)
            if caller is not None:
                self._answer(caller, result, send)

    def expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, hop = heapq.heappop(self.deadlines)
            caller = self.pending.pop(hop, None)
            if caller is not None:
                self._answer(caller, self._unavailable(
                    f"node {self.node.name}: no reply from its broker {self.node.broker} "
                    "within the request's deadline"))

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    def answer_all(self, error: str) -> None:
        callers, self.pending = list(self.pending.values()), {}
        for caller in callers:
            self._answer(caller, self._unavailable(error))

    def close(self) -> None:
        self.sock.close()


def bind_front(ctx: zmq.Context, config: Config, address: str):
    """(keyring, ROUTER bound at `address`): with curve, the keyring says who may
    connect (ZAP) and what each client may do; without, None."""
    keyring = security.keyring(config)
    front = loop.socket(ctx, zmq.ROUTER, config.max_message)
    front.setsockopt(zmq.ROUTER_MANDATORY, 0)
    if keyring is not None:
        keyring.start(ctx)
        keyring.secure(front)
    front.bind(address)
    return keyring, front


def keep_freed_memory() -> None:
    """glibc hands a freed block of 128 KiB or more back to the kernel at once
    (munmap, or a trim of the heap), so each 1 MiB value a write brings (and
    LMDB's pages for it) lands on fresh pages, each faulted in and zeroed:
    about a third of the node's CPU under a stream of a file's chunks.  Blocks
    up to MMAP_MAX come from the heap instead, and up to TRIM_MAX bytes of it
    freed stay for the next batch.  Not glibc: left as it is."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, MMAP_MAX)
    mallopt(_M_TRIM_THRESHOLD, TRIM_MAX)


def recv_request(sock, with_user: bool) -> tuple[list, str | None] | None:
    """A waiting message's frames and, `with_user`, its sender's ZAP User-Id
    (as core.protocol.recv_frames_from); None if none waits.  A write's value of
    VIEW_FROM bytes or more is a memoryview of the message libzmq received, not
    a copy of it: a file's 1 MiB chunk is copied into LMDB anyway."""
    try:
        first = _recv(sock, zmq.NOBLOCK, False)
    except zmq.Again:
        return None
    parts = [first]
    while parts[-1].more:
        parts.append(_recv(sock, 0, False))
    view = 2 if len(parts) > 2 and len(parts[2]) >= VIEW_FROM and \
        parts[1].bytes[:1] in sp.WITH_VALUE else -1
    frames = [part.buffer if i == view else part.bytes for i, part in enumerate(parts)]
    if not with_user:
        return frames, None
    try:
        return frames, first.get("User-Id")
    except zmq.ZMQError:  # a connection without ZAP has no User-Id
        return frames, None


class StorageNode:
    """One node's storage front-end; ``run()`` until SIGTERM/SIGINT."""

    def __init__(self, config: Config, node: NodeSettings, ctx: zmq.Context | None = None):
        self.config, self.node = config, node
        keep_freed_memory()
        self.store = Store(Path(node.data_dir) / "store", node.name, node.sync, node.max_value,
                           node.max_index_bytes, config.search.languages)
        index_path = Path(node.data_dir) / "index.sqlite"
        self.fulltext = FullText(index_path, node.sync, config.search.languages)
        self.searcher = Searcher(str(index_path), config.search.languages,
                                 config.search.timeout, node.name)
        self.own_ctx = ctx is None  # ours to terminate when stopping
        self.ctx = ctx or zmq.Context()
        self.keyring, self.front = bind_front(self.ctx, config, node.storage)
        # With curve: the capabilities a script's calls carry (storage/grants.py).
        self.grants = Grants(self.ctx, config, node, self.keyring) \
            if self.keyring is not None else None
        self.relay = Relay(self.ctx, node, config.broker.request_timeout, self.broker_reply,
                           config.max_message, security.role_credentials(config, "node"))
        self.indexer = Indexer(self.store, self.fulltext, node.name, self.relay.exec,
                               self.reply)
        self.node_commands = {sp.STAT: self.stat, sp.ROUTES: self.routes,
                              sp.SEARCH: self.search, sp.REVOKE: self.no_capabilities,
                              sp.REVOKE_PEER: self.no_capabilities}
        self.stopping = False
        self.close_at: float | None = None  # stopping, answered: when the sockets close
        self.replied_at = float("-inf")  # the last reply to a client left then (STOP_LINGER)

    # Main loop ---------------------------------------------------------------

    def run(self) -> None:
        wake_r, _ = loop.wake_on_signals(self._on_stop_signal, (signal.SIGTERM, signal.SIGINT))
        poller = zmq.Poller()
        for sock in (self.front, self.relay.sock, wake_r, self.searcher.wake_r):
            poller.register(sock, zmq.POLLIN)
        log.info("storage %s listening on %s, store %s (sync %s), exec relayed to %s",
                 self.node.name, self.node.storage, self.store.path,
                 "on" if self.node.sync else "off", self.node.broker)
        self.indexer.reconcile()
        stop_at = None
        while self.close_at is None or time.monotonic() < self.close_at:
            events = dict(poller.poll(self._poll_timeout_ms()))
            if wake_r in events:
                os.read(wake_r, 512)
            if self.relay.sock in events:
                self.relay.read_replies(self.send)
            if self.front in events:
                self.serve_clients()
            if self.grants is not None:
                self.grants.tick()
            if self.searcher.wake_r in events:
                self.searcher.drain(self.reply)
            now = time.monotonic()
            self.relay.expire(now)
            self.indexer.flush(now)   # script replies (and expired ones) -> one FTS5 commit
            self.indexer.tick(now)
            if self.keyring is not None:
                self.keyring.refresh()
            if self.stopping and stop_at is None:
                stop_at = now + timeouts.STORAGE_STOP
            # Relayed replies in, then a moment for clients to read the last
            # replies before the connection drops (timeouts.STOP_LINGER): counted
            # from the last reply, so an idle node closes at once.
            if stop_at is not None and self.close_at is None and \
                    (not self.relay.pending or now >= stop_at):
                self.relay.answer_all(f"node {self.node.name} stopped")
                self.close_at = max(now, self.replied_at + timeouts.STOP_LINGER)
        self.indexer.flush(time.monotonic())
        self.close()
        log.info("storage %s stopped", self.node.name)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stopping = True

    def _poll_timeout_ms(self) -> int:
        wakes = [t for t in (self.relay.next_deadline(), self.indexer.next_wake(),
                             self.close_at) if t is not None]
        deadline = min(wakes, default=None)
        if deadline is None:
            return 1000
        return max(0, min(1000, int((deadline - time.monotonic()) * 1000) + 1))

    def close(self) -> None:
        self.relay.close()
        if self.grants is not None:
            self.grants.close()
        self.front.close(linger=int(timeouts.STOP_LINGER * 1000))  # the last replies still leave
        self.searcher.close()
        self.fulltext.close()
        self.store.close()
        if self.keyring is not None:
            self.keyring.stop()
        if self.own_ctx:
            self.ctx.term()  # the last replies leave first (see Broker.close)

    # Requests ----------------------------------------------------------------

    def serve_clients(self) -> None:
        batch: list[sp.StorageRequest] = []
        front, user = self.front, None
        while len(batch) < BATCH:
            frames, user = recv_request(front, self.keyring is not None) or (None, None)
            if frames is None:
                break
            request = self.on_frames(frames, user)
            if request is not None:
                batch.append(request)
        if batch:
            replies = self.store.apply(batch)
            self.indexer.after_batch(self.store.changes)  # before any writer is answered
            for req, reply in zip(batch, replies):
                if reply is not DEFERRED:  # an indexed write is answered by the indexer
                    self.reply(req.client, req.rid, *reply)

    def on_frames(self, frames: list[bytes], user: str | None = None) -> sp.StorageRequest | None:
        """A data request for the batch; everything else is answered or relayed here."""
        try:
            if len(frames) == 3 and bp.is_front_request(frames[1]):
                self.relay_exec(bp.FrontRequest.from_frames(frames), user)
                return None
            req = sp.StorageRequest.from_frames(frames)
        except sp.ProtocolError as exc:
            log.warning("storage %s: bad request from client %s: %s", self.node.name,
                        frames[0].hex(), exc)
            self.reply(frames[0], sp.rid_of(frames), bp.BAD_REQUEST,
                       error=f"node {self.node.name}: bad request: {exc}")
            return None
        if self.keyring is not None:
            refusal = self.refusal(req, user)
            if req.cmd in sp.REVOCATIONS and refusal is None:
                return self.revoke(req)
            if refusal is not None:
                self.reply(req.client, req.rid, bp.FORBIDDEN,
                           error=f"node {self.node.name}: {refusal}")
                return None
        handler = self.node_commands.get(req.cmd)
        if handler is None:
            return req
        reply = handler(req)
        if reply is not DEFERRED:  # a search is answered by its thread (self.searcher)
            self.reply(req.client, req.rid, *reply)
        return None

    def refusal(self, req: sp.StorageRequest, user: str | None) -> str | None:
        """None if the sender may do this; else the message of a ``forbidden`` reply.
        The scripts key acts only through a capability (storage/grants.py)."""
        if req.cmd in sp.REVOCATIONS:
            return None if self.keyring.is_node(user) else \
                "only the nodes' own key may revoke capabilities"
        identity = self.keyring.identity(user)
        if identity is not None and identity.name == "scripts":
            return self.grants.refusal(req)
        right = "write" if req.cmd in sp.MUTATING else "read"
        return self.keyring.refusal(user, (right,), req.name)

    def relay_exec(self, req: bp.FrontRequest, user: str | None) -> None:
        """An exec or status for the broker, once the caller's rights allow it."""
        if self.keyring is not None:
            needed, what = security.rights_for(req.cmd == bp.EXEC, req.meta)
            refusal = self.keyring.refusal(user, needed, what)
            if refusal is not None:
                self.broker_reply(req.client, req.rid, bp.FORBIDDEN,
                                  error=f"node {self.node.name}: {refusal}")
                return
            # The broker sees our key: it runs the exec for the caller we name.
            req = req._replace(meta=req.meta._replace(caller=user))
        self.relay.forward(req)

    def revoke(self, req: sp.StorageRequest) -> None:
        """A worker's (or a peer front's) answered requests: not answered when taken,
        since no worker waits for it."""
        try:
            entries = sp.parse_revoke(req.data)
        except sp.ProtocolError as exc:
            self.reply(req.client, req.rid, bp.BAD_REQUEST, error=f"node {self.node.name}: {exc}")
            return None
        self.grants.revoke(entries, pass_on=req.cmd == sp.REVOKE)
        return None

    def no_capabilities(self, req: sp.StorageRequest):
        return bp.BAD_REQUEST, b"", (f"node {self.node.name}: no capabilities to revoke: "
                                     "[security] curve is off")

    def stat(self, req: sp.StorageRequest):
        return bp.OK, bp.pack({"name": self.node.name, "group": self.node.group,
                               **self.store.stats(), "indexed": self.fulltext.count(),
                               "start": os.environ.get(START_ENV, "")}), ""

    def routes(self, req: sp.StorageRequest):
        """The cluster as this node's config knows it: what a client bootstraps from."""
        return bp.OK, bp.pack({"nodes": [{"name": n.name, "group": n.group,
                                          "storage": n.storage, "broker": n.broker,
                                          "ids": list(n.ids)} for n in self.config.nodes]}), ""

    def search(self, req: sp.StorageRequest):
        """This node's index, best first, in a search thread (storage/searcher.py;
        storage/query.py has the query syntax)."""
        try:
            search = sp.parse_search(req.data)
        except sp.ProtocolError as exc:
            return bp.BAD_REQUEST, b"", f"node {self.node.name}: {exc}"
        self.searcher.submit(req.client, req.rid, search)
        return DEFERRED

    def reply(self, client: bytes, rid: bytes, status: str, data: bytes = b"",
              error: str = "") -> None:
        """A storage reply (storage/protocol.py)."""
        self.send(sp.reply_frames(client, rid, status, data, error))

    def broker_reply(self, client: bytes, rid: bytes, status: str, data: bytes = b"",
                     error: str = "") -> None:
        """A reply to a relayed exec or status, in the broker's layout."""
        self.send(bp.reply_frames(client, rid, status, self.node.name, self.node.group, data,
                                  error))

    def send(self, frames: list[bytes]) -> None:
        self.replied_at = time.monotonic()
        try:
            bp.send_frames(self.front, frames, noblock=True)
        except zmq.ZMQError as exc:  # client gone or its queue full: nothing to do
            log.debug("reply to %s dropped: %s", frames[0].hex(), exc)
