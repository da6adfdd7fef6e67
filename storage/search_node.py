"""redis-cluster mode: a node's storage front-end, which holds the search index only.

    clients (DEALER) --> [ROUTER node.storage]  SearchNode  --SEARCH--> Searcher threads
                                                     |                  (storage/searcher.py)
                                                 SlotIndexer thread --> FullText (FTS5,
                                                 (storage/slot_indexer.py)  data_dir/index.sqlite)
                                                     ^
                                                 the node's own Redis node

The data is in Redis; this process keeps the full-text index of the slots its
Redis node serves as master, and answers SEARCH with it (the same wire
messages as lmdb's storage node, storage/protocol.py) plus "slots": the
ranges of slots whose index was ready when the search began.  STAT says how
much is indexed; every other command is ``bad_request`` (data calls go to
Redis).  With curve, a search needs the read right, as on lmdb's nodes; a
script's (n.search, the scripts key) needs the Redis login its request was
handed and the read proof beside it, which only a caller with read gets.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import zmq

from core import capability, loop
from core import protocol as bp
from core import redis_auth
from core import timeouts
from core.config import START_ENV, Config, NodeSettings

from . import protocol as sp
from .fulltext import FullText
from .node import bind_front
from .searcher import Searcher
from .slot_indexer import SlotIndexer

log = logging.getLogger("srw.storage")

BATCH = 256   # requests read per turn


def slot_ranges(slots) -> list[list[int]]:
    """{0, 1, 2, 7} -> [[0, 2], [7, 7]]."""
    ranges: list[list[int]] = []
    for slot in sorted(slots):
        if ranges and ranges[-1][1] == slot - 1:
            ranges[-1][1] = slot
        else:
            ranges.append([slot, slot])
    return ranges


class SearchNode:
    """One node's search front-end; ``run()`` until SIGTERM/SIGINT."""

    def __init__(self, config: Config, node: NodeSettings):
        self.config, self.node = config, node
        index_path = Path(node.data_dir) / "index.sqlite"
        self.fulltext = FullText(index_path, node.sync, config.search.languages)
        self.searcher = Searcher(str(index_path), config.search.languages,
                                 config.search.timeout, node.name)
        self.indexer = SlotIndexer(config, node, self.fulltext)
        self.ctx = zmq.Context()
        self.keyring, self.front = bind_front(self.ctx, config, node.storage)
        self.commands = {sp.STAT: self.stat, sp.SEARCH: self.search}
        self.stopping = False

    def run(self) -> None:
        wake_r, _ = loop.wake_on_signals(self._on_stop_signal, (signal.SIGTERM, signal.SIGINT))
        poller = zmq.Poller()
        for sock in (self.front, wake_r, self.searcher.wake_r):
            poller.register(sock, zmq.POLLIN)
        log.info("search %s listening on %s, indexing the slots of Redis %s",
                 self.node.name, self.node.storage, self.node.redis)
        self.indexer.start()
        while not self.stopping:
            events = dict(poller.poll(1000))
            if wake_r in events:
                os.read(wake_r, 512)
            if self.front in events:
                self.serve_clients()
            if self.searcher.wake_r in events:
                self.searcher.drain(self.reply)
            if self.keyring is not None:
                self.keyring.refresh()
        self.close()
        log.info("search %s stopped", self.node.name)

    def _on_stop_signal(self, signum, frame) -> None:
        self.stopping = True

    def close(self) -> None:
        self.indexer.stop()
        self.searcher.close()
        self.front.close(linger=int(timeouts.STOP_LINGER * 1000))
        self.fulltext.close()
        if self.keyring is not None:
            self.keyring.stop()
        self.ctx.term()

    def serve_clients(self) -> None:
        for _ in range(BATCH):
            if self.keyring is None:
                frames, user = bp.recv_frames_nowait(self.front), None
            else:
                frames, user = bp.recv_frames_from(self.front) or (None, None)
            if frames is None:
                return
            self.on_frames(frames, user)

    def on_frames(self, frames: list[bytes], user: str | None) -> None:
        try:
            req = sp.StorageRequest.from_frames(frames)
        except sp.ProtocolError as exc:
            self.reply(frames[0], sp.rid_of(frames), bp.BAD_REQUEST,
                       error=f"node {self.node.name}: bad request: {exc}")
            return
        handler = self.commands.get(req.cmd)
        refusal = None if self.keyring is None else self.refusal(req, user)
        if refusal is not None:
            self.reply(req.client, req.rid, bp.FORBIDDEN, error=f"node {self.node.name}: "
                                                                f"{refusal}")
        elif handler is None:
            self.reply(req.client, req.rid, bp.BAD_REQUEST,
                       error=f"node {self.node.name}: {req.name}: the data is in Redis "
                             f"({self.node.redis}); this node answers search and stat only")
        else:
            handler(req)

    def refusal(self, req: sp.StorageRequest, user: str | None) -> str | None:
        """With curve: the read right; the scripts key acts only for a caller that
        may read: the Redis login its request was handed and the read proof
        handed with it (core/redis_auth.py read_proof; srw-write alone is handed
        to callers that may write but not read)."""
        identity = self.keyring.identity(user)
        if identity is None or identity.name != "scripts":
            return self.keyring.refusal(user, ("read",), req.name)
        login = capability.parse_redis_grant(req.capability)
        if login is None or not redis_auth.may_read(
                self.indexer.auth, login, capability.redis_read_proof(req.capability)):
            return "a script's search needs a caller that may read"
        return None

    def stat(self, req: sp.StorageRequest) -> None:
        self.reply(req.client, req.rid, bp.OK, bp.pack({
            "name": self.node.name, "group": self.node.group, "redis": self.node.redis,
            "indexed": self.indexer.documents, "slots": len(self.indexer.ready),
            "start": os.environ.get(START_ENV, "")}))

    def search(self, req: sp.StorageRequest) -> None:
        try:
            search = sp.parse_search(req.data)
        except sp.ProtocolError as exc:
            self.reply(req.client, req.rid, bp.BAD_REQUEST, error=f"node {self.node.name}: {exc}")
            return
        # The slots ready now: a slot taken meanwhile is not promised, one lost
        # meanwhile only loses rows.
        ranges = slot_ranges(self.indexer.ready)
        self.searcher.submit(req.client, req.rid, search, {"slots": ranges})

    def reply(self, client: bytes, rid: bytes, status: str, data: bytes = b"",
              error: str = "") -> None:
        try:
            bp.send_frames(self.front, sp.reply_frames(client, rid, status, data, error),
                           noblock=True)
        except zmq.ZMQError as exc:  # client gone or its queue full
            log.debug("reply to %s dropped: %s", client.hex(), exc)
