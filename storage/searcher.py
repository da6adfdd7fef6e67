"""Searches off the storage loop, narrow ones first: threads with a reader connection each.

    StorageNode loop --submit(req, search)--> queue --> thread: FullText (its own
          ^                                                 sqlite connection) .search,
          |                                                 while it holds a turn
          +---- drain(): replies, sent from the loop <-- done + a byte on the wake pipe

A broad query may take long; the loop keeps serving data calls meanwhile
(SQLite releases the GIL while it runs a statement).  Only the loop touches
the ZeroMQ sockets, so a thread hands its reply back and wakes the loop
through a pipe the loop polls.  A search runs until its deadline (the
request's timeout, else ``[search] timeout``) and answers what it ranked by
then, marked partial.

Order: THREADS searches are begun at once (the rest wait in arrival order),
but only TURNS of them run; the others wait for a turn, and the next turn
goes to the search that matches the fewest documents (counting comes first
and is cheap; one not counted yet counts first, in arrival order).  A
running search checks every few milliseconds of SQLite's work (its progress
handler) whether one that goes before it waits, and hands it its turn if
so: a narrow search passes a broad one that runs.  A search still waiting
PATIENCE after its arrival (or half its time to the deadline, if sooner) is
urgent and goes before the others (urgent ones by deadline), so a broad one
is not starved; but urgent searches hold at most TURNS - 1 turns, and the
last goes by fewest matches alone, so narrow searches always have a lane,
even when broad ones come faster than the node can rank them.
SQLite ranks each search as before (no slicing, no rows through Python):
pausing one is a thread blocked in its progress handler.
"""
from __future__ import annotations

import collections
import itertools
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

THREADS = 16         # searches begun at once, each with a thread and a reader connection
TURNS = 2            # of them running at once (a 2-core node gains nothing more)
PATIENCE = 1.0       # seconds a search waits for narrower ones at most (or half its time)


class _Job:
    def __init__(self, client: bytes, rid: bytes, search: sp.Search, deadline: float,
                 extra: dict, lock: threading.Lock, seq: int):
        self.client, self.rid, self.search, self.extra = client, rid, search, extra
        arrival = time.monotonic()
        self.deadline = deadline
        self.urgent = arrival + min(PATIENCE, (deadline - arrival) / 2)
        self.count, self.seq = 0, seq   # 0 until counted: counting comes first
        self.granted = threading.Condition(lock)
        self.turn = False

    def rank(self, now: float) -> tuple:
        """Who runs first: urgent ones by deadline, then by how many documents match."""
        if now >= self.urgent:
            return 0, self.deadline, self.seq
        return 1, self.count, self.seq


class Searcher:
    def __init__(self, path: str, languages: tuple[str, ...], default_timeout: float,
                 node_name: str):
        self.path, self.languages = path, languages
        self.default_timeout, self.node_name = default_timeout, node_name
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.running: list[_Job] = []    # searches holding a turn
        self.waiting: list[_Job] = []    # at most THREADS
        self.seq = itertools.count()
        self.stopping = False
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
        self.jobs.put(_Job(client, rid, search, deadline, extra or {}, self.lock,
                           next(self.seq)))

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
                if self.stopping:
                    continue
                with self.lock:
                    self._wait_turn(job)
                try:
                    answer = self._run(fulltext, job)
                finally:
                    with self.lock:
                        self.running.remove(job)
                        self._grant()
                self.done.append((job.client, job.rid, *answer))
                try:
                    os.write(self._wake_w, b"s")
                except OSError:  # full: the loop is woken already; closed: stopping
                    pass
        finally:
            fulltext.close()

    def _run(self, fulltext: FullText, job: _Job):
        search = job.search
        try:
            found = fulltext.search(search.query, search.limit, search.lang, search.raw,
                                    job.deadline, lambda count: self._pause(job, count))
        except (BadQuery, UnknownLanguage) as exc:
            return bp.BAD_REQUEST, b"", f"node {self.node_name}: {exc}"
        except Exception as exc:  # a broken index file: say so, keep the thread
            log.exception("search on node %s failed", self.node_name)
            return bp.UNAVAILABLE, b"", f"node {self.node_name}: the search failed: {exc}"
        return bp.OK, bp.pack({**found, **job.extra}), ""

    # Turns (each with the lock held) -----------------------------------------

    def _wait_turn(self, job: _Job) -> None:
        """Until `job` holds a turn: at once if one is free and no one waits."""
        if len(self.running) < TURNS and not self.waiting:
            self.running.append(job)
            return
        job.turn = False
        self.waiting.append(job)
        self._grant()
        while not job.turn:
            job.granted.wait()

    def _grant(self) -> None:
        """Free turns to the waiting searches that rank first."""
        while self.waiting and len(self.running) < TURNS:
            now = time.monotonic()
            order = self._order(self.running, now)
            job = min(self.waiting, key=order)
            self.waiting.remove(job)
            job.turn = True
            self.running.append(job)
            job.granted.notify()

    @staticmethod
    def _order(running: list[_Job], now: float):
        """Who gets the next turn: by rank, unless urgent searches hold TURNS - 1
        turns already: the last one goes by fewest matches (narrow ones' lane)."""
        if sum(job.urgent <= now for job in running) >= TURNS - 1:
            return lambda job: (job.count, job.seq)
        return lambda job: job.rank(now)

    def _pause(self, job: _Job, count: int | None) -> None:
        """From `job`'s search, which holds a turn: its count once known (None at
        each progress check); hands the turn over while one that ranks first waits."""
        with self.lock:
            if count is not None:
                job.count = count
            if not self.waiting:
                return
            order = self._order([j for j in self.running if j is not job], time.monotonic())
            if order(min(self.waiting, key=order)) < order(job):
                self.running.remove(job)
                self._wait_turn(job)

    def close(self) -> None:
        self.stopping = True   # searches not begun are dropped: the node stops
        for _ in self.threads:
            self.jobs.put(None)
        deadline = time.monotonic() + 5.0
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        os.close(self.wake_r)
        os.close(self._wake_w)
