"""Searches off the storage loop: threads with a reader connection each.

    StorageNode loop --submit(req, search)--> queue --> thread: FullText (its own
          ^                                                 sqlite connection) .search
          |                                                        |
          +---- drain(): replies, sent from the loop <-- done + a byte on the wake pipe

A broad query may take long; the loop keeps serving data calls meanwhile
(SQLite releases the GIL while it runs a statement).  Only the loop touches
the ZeroMQ sockets, so a thread hands its reply back and wakes the loop
through a pipe the loop polls.  A search runs until its deadline (the
request's timeout, else ``[search] timeout``) and answers what it ranked by
then, marked partial.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time

from core import protocol as bp

from . import protocol as sp
from .analyzer import UnknownLanguage
from .fulltext import FullText
from .query import BadQuery

log = logging.getLogger("srw.storage.search")

THREADS = 2   # searches at once; more wait in the queue (a 2-core node gains nothing more)


class Searcher:
    def __init__(self, path: str, languages: tuple[str, ...], default_timeout: float,
                 node_name: str):
        self.path, self.languages = path, languages
        self.default_timeout, self.node_name = default_timeout, node_name
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: collections.deque = collections.deque()
        self.wake_r, self._wake_w = os.pipe()
        for fd in (self.wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self.threads = [threading.Thread(target=self._work, name=f"search-{i}", daemon=True)
                        for i in range(THREADS)]
        for thread in self.threads:
            thread.start()

    def submit(self, client: bytes, rid: bytes, search: sp.Search, extra: dict | None = None
               ) -> None:
        """`extra`: fields the reply carries beside the hits (redis-cluster: "slots")."""
        deadline = time.monotonic() + (search.timeout or self.default_timeout)
        self.jobs.put((client, rid, search, deadline, extra or {}))

    def drain(self, reply) -> None:
        """Send every finished search's reply: `reply(client, rid, status, data, error)`."""
        try:
            os.read(self.wake_r, 4096)
        except BlockingIOError:
            pass
        while self.done:
            reply(*self.done.popleft())

    def _work(self) -> None:
        fulltext = FullText(self.path, languages=self.languages, reader=True)
        try:
            while (job := self.jobs.get()) is not None:
                client, rid, search, deadline, extra = job
                self.done.append((client, rid, *self._run(fulltext, search, deadline, extra)))
                try:
                    os.write(self._wake_w, b"s")
                except OSError:  # full: the loop is woken already; closed: stopping
                    pass
        finally:
            fulltext.close()

    def _run(self, fulltext: FullText, search: sp.Search, deadline: float, extra: dict):
        try:
            found = fulltext.search(search.query, search.limit, search.lang, search.raw,
                                    deadline)
        except (BadQuery, UnknownLanguage) as exc:
            return bp.BAD_REQUEST, b"", f"node {self.node_name}: {exc}"
        except Exception as exc:  # a broken index file: say so, keep the thread
            log.exception("search on node %s failed", self.node_name)
            return bp.UNAVAILABLE, b"", f"node {self.node_name}: the search failed: {exc}"
        return bp.OK, bp.pack({**found, **extra}), ""

    def close(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for thread in self.threads:
            thread.join(5.0)
        os.close(self.wake_r)
        os.close(self._wake_w)
