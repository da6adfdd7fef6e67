"""Indexing on upload, inside the storage process: LMDB rows -> script -> FTS5 rows.

    INDEXED_WRITE --> Store: value + fulltext row (id -> version, key), one commit
                        |
                        v  Relay.exec("index.py", id=the key's id, data=the value)
                      the node's broker -> a sandboxed runner: __return_data = the text
                        |
                        v  (next loop turn, every reply that came, one SQLite commit)
                      FullText row (id, key, version, text) --> reply to the writer

Scripts decide *what* is indexed (``history/index.py`` returns the text, or
nothing for binary content); only this trusted process writes the index, so
no script can put rows for keys it was not asked about.  The exec carries the
key's id, so the broker's per-id lock orders it with every other exec of
that key.

Why the index agrees with the data after SIGKILL: the LMDB ``fulltext`` row
is written in the same transaction as the value (or deleted with it), and the
FTS5 row carries the version it was made from.  The writer is acknowledged
only after the FTS5 commit (synchronous=FULL).  At start, ``reconcile``
drops every FTS5 row whose version is not the one LMDB holds (overwritten
or removed while the index lagged) and runs the script again for every value
whose row is missing or stale, logging its progress.  A reply whose version
is no longer LMDB's (a newer write came meanwhile) changes nothing.
"""
from __future__ import annotations

import collections
import logging

from core import protocol as bp

from .fulltext import INDEX_SCRIPT, FullText
from .store import Changes, IndexJob, Store

log = logging.getLogger("srw.storage.index")

REINDEX_IN_FLIGHT = 32    # start-up jobs handed to the broker at once
RETRY_AFTER = 1.0         # seconds before a start-up job the broker could not take is retried
RETRIES = 60              # ... and how often (the broker may start after the storage)
PROGRESS_EVERY = 1000     # start-up jobs between progress lines
RETRYABLE = frozenset((bp.UNAVAILABLE, bp.BUSY, bp.TIMEOUT, bp.KILLED))
NOT_INDEXED = b"not indexed: the indexing script found no text (binary or empty content)"


class Indexer:
    """Runs the indexing script for indexed writes and keeps the FTS5 rows in step.

    `exec(meta, data, on_reply)` is the relay's; `reply(client, rid, status,
    data, error)` answers a storage request."""

    def __init__(self, store: Store, fulltext: FullText, node_name: str, exec, reply):
        self.store, self.fulltext, self.node_name = store, fulltext, node_name
        self.exec, self.reply = exec, reply
        self.done: list[tuple[IndexJob, bp.Result, int]] = []   # (job, reply, tries)
        self.backlog: collections.deque[tuple[float, int, IndexJob]] = collections.deque()
        self.in_flight = 0
        self.reindexed = self.reindex_total = 0

    # Start-up: the index against the data --------------------------------------

    def reconcile(self) -> None:
        wanted = self.store.indexed()
        have = self.fulltext.versions()
        stale = [i for i, version in have.items() if wanted.get(i, (None,))[0] != version]
        missing = [i for i, (version, _) in wanted.items() if have.get(i) != version]
        self.fulltext.apply([], stale)
        jobs = [job for job in map(self.store.job, missing) if job is not None]
        self.backlog.extend((0.0, 0, job) for job in jobs)
        self.reindex_total = len(jobs)
        log.info("index %s: %d documents indexed, %d rows in the index; dropped %d stale "
                 "rows, %d documents to index again", self.node_name, len(wanted), len(have),
                 len(stale), len(jobs))

    def next_wake(self) -> float | None:
        return self.backlog[0][0] if self.backlog else None

    def tick(self, now: float) -> None:
        """Hand due start-up jobs to the broker, a few at a time."""
        while self.backlog and self.in_flight < REINDEX_IN_FLIGHT and self.backlog[0][0] <= now:
            _, tries, job = self.backlog.popleft()
            self._run(job, tries)

    # Indexed writes --------------------------------------------------------------

    def after_batch(self, changes: Changes) -> None:
        """After the LMDB commit: rows of overwritten or removed values go (before
        their writers are answered), indexed values go to the script."""
        if changes.dropped:
            self.fulltext.apply([], changes.dropped)
        for job in changes.to_index:
            self._run(job, 0)

    def _run(self, job: IndexJob, tries: int) -> None:
        self.in_flight += 1
        meta = bp.ExecMeta(name=INDEX_SCRIPT, id=job.id.hex())
        self.exec(meta, job.value, lambda result: self.done.append((job, result, tries)))

    def flush(self, now: float) -> None:
        """Every script reply that came: one FTS5 commit, then the writers' replies."""
        if not self.done:
            return
        done, self.done = self.done, []
        self.in_flight -= len(done)
        puts, answers = [], []
        for job, result, tries in done:
            current = self.store.is_current(job.id, job.version)
            if current and result.ok and result.data:
                # The script's answer, bounded like the documents themselves.
                text = result.data[:self.store.max_index_bytes].decode(errors="replace")
                puts.append((job.id, job.key.decode(errors="replace"), job.version, text,
                             job.lang))
            answers.append((job, result, tries, current))
        self.fulltext.apply(puts, [])
        for job, result, tries, current in answers:
            self._answer(job, result, tries, current, now)

    def _answer(self, job: IndexJob, result: bp.Result, tries: int, current: bool,
                now: float) -> None:
        if job.request is None:
            self._startup_done(job, result, tries, current, now)
            return
        req = job.request
        if not current or result.ok:  # superseded by a newer write: that one indexes
            self.reply(req.client, req.rid, bp.OK, b"" if result.data or not current
                       else NOT_INDEXED)
        else:
            self.reply(req.client, req.rid, result.status, b"",
                       f"node {self.node_name}: stored, but not indexed: the indexing script "
                       f"({INDEX_SCRIPT}) answered {result.status}: {result.error or ''}")

    def _startup_done(self, job: IndexJob, result: bp.Result, tries: int, current: bool,
                      now: float) -> None:
        if current and result.status in RETRYABLE and tries < RETRIES:
            self.backlog.append((now + RETRY_AFTER, tries + 1, job))
            return
        if current and not result.ok:
            log.warning("index %s: %s of id %s failed (%s: %s); it stays unindexed until "
                        "the next start", self.node_name, INDEX_SCRIPT, job.id.hex()[:16],
                        result.status, (result.error or "").strip()[-200:])
        self.reindexed += 1
        if self.reindexed % PROGRESS_EVERY == 0 or self.reindexed == self.reindex_total:
            log.info("index %s: indexed again %d of %d", self.node_name, self.reindexed,
                     self.reindex_total)
