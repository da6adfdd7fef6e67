"""One node's full-text index: SQLite FTS5 under ``data_dir/index.sqlite``.

Owned by the storage process (trusted, like a Redis module beside its data);
scripts never open it.  Each indexed value is one row, keyed by its 64-byte
id, holding the key's name, the text and the *version* (lmdb: the value's
mtime in nanoseconds, as LMDB holds it, of the text it was made from; that
version is what lets the node tell, after a crash, whether a row still
matches its value, storage/indexer.py.  redis-cluster: the key's slot, which
tells the rows a slot that moved away takes with it, storage/slot_indexer.py).

FTS5 indexes the text's *terms* (storage/analyzer.py: folded and stemmed), so
its own tokenizer only splits them on spaces; the text itself is kept beside
them for snippets.  The index file carries a stamp of how its terms were made
(FORMAT and the configured languages): an index of another stamp is emptied
at open, and the node's start-up reconcile indexes every document again.

Commits are durable before the storage node acknowledges anything that
depends on them: WAL with ``synchronous=FULL`` when the node syncs.  Searches
run on reader connections of their own (storage/searcher.py), one per thread.
Ranking is BM25, scores negated so that higher is better; ties go by key.
"""
from __future__ import annotations

import heapq
import logging
import re
import sqlite3
import time
from pathlib import Path

from .analyzer import Analyzer, UnknownLanguage, fold
from .query import BadQuery, Query, parse

log = logging.getLogger("srw.storage.index")

INDEX_SCRIPT = "index.py"    # in the history dir: value -> the text to index
FORMAT = 2                   # of the terms; bump when analyzer.py cuts or stems otherwise
SNIPPET_CHARS = 120          # of the text in a snippet, about
SNIPPET_CONTEXT = 30         # characters before the first matched word, when not at the start
SNIPPET_MARK = ("[", "]")
SNIPPET_SCAN = 64 * 1024     # characters of a document a snippet is looked for in
CHUNK = 100_000              # matching rows ranked at a time: what a cut search has ranked
PROGRESS_STEPS = 10_000      # SQLite VM steps between deadline checks within a chunk
READER_MMAP = 1 << 30        # bytes of the index file a reader maps (pages shared, no copies)
READER_CACHE_KIB = 16 * 1024  # a reader's page cache

_SCHEMA = """
CREATE TABLE IF NOT EXISTS stamp (value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (
    doc INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    key TEXT NOT NULL,
    version INTEGER NOT NULL,
    body TEXT NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(
    terms, tokenize = 'unicode61 remove_diacritics 0'
);
"""
_TABLES = ("stamp", "meta", "docs")

# One rowid range of the index: its best rows by score alone (FTS5 only: no row of
# meta read per match), and, when a tie crosses the cut, by score then key.
_BEST = """
SELECT bm25(docs) AS score, rowid FROM docs
WHERE docs MATCH ? AND rowid BETWEEN ? AND ? ORDER BY score LIMIT ?
"""
_RANKED = """
SELECT bm25(docs) AS score, docs.rowid FROM docs JOIN meta ON meta.doc = docs.rowid
WHERE docs MATCH ? AND docs.rowid BETWEEN ? AND ? ORDER BY score, meta.key LIMIT ?
"""
_COUNT = "SELECT count(*) FROM docs WHERE docs MATCH ?"   # cheap: no score, no row read
_SPAN = "SELECT (SELECT min(doc) FROM meta), (SELECT max(doc) FROM meta)"  # two seeks, no scan
_SPACES = re.compile(r"\s+")


class FullText:
    def __init__(self, path: str | Path, sync: bool = True,
                 languages: tuple[str, ...] = ("english", "russian"), reader: bool = False):
        self.path = str(path)
        self.analyzer = Analyzer(languages)
        self.stamp = f"{FORMAT} {' '.join(languages)}"
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        if reader:
            self.db.execute("PRAGMA query_only=1")
            self.db.execute(f"PRAGMA mmap_size={READER_MMAP}")
            self.db.execute(f"PRAGMA cache_size=-{READER_CACHE_KIB}")
            return
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
        self._check_stamp()

    def _check_stamp(self) -> None:
        """An index whose terms were made otherwise (an older srw, other languages)
        is emptied: reconcile then indexes every document again."""
        have = {r[0] for r in self.db.execute("SELECT name FROM sqlite_master")}
        stamp = None
        if "stamp" in have:
            stamp = (self.db.execute("SELECT value FROM stamp").fetchone() or (None,))[0]
        if have & set(_TABLES) and stamp != self.stamp:
            log.warning("index %s was made by %s, this node makes %s: emptied; every "
                        "indexed document is indexed again", self.path,
                        f"format {stamp!r}" if stamp else "an older srw", repr(self.stamp))
            with self._transaction():
                for table in _TABLES:
                    self.db.execute(f"DROP TABLE IF EXISTS {table}")
        self.db.executescript(_SCHEMA)
        if stamp != self.stamp:
            self.db.execute("INSERT INTO stamp (value) VALUES (?)", (self.stamp,))

    # Changes: each call is one transaction, committed (and synced) on return --

    def apply(self, puts: list[tuple[bytes, str, int, str, str | None]], drops: list[bytes],
              versions=()) -> None:
        """Rows (id, key, version, text, lang) replace any row of their id (`lang`:
        the stemmer for every word, None: by script); ids in `drops`, and every
        row of a version in `versions`, lose theirs.  One transaction for all."""
        terms = [" ".join(self.analyzer.terms(text, self._stemmer(lang)))
                 for _, _, _, text, lang in puts]
        with self._transaction():
            if versions:
                self._drop_versions(sorted(versions))
            for key_id in drops:
                self._drop(key_id)
            for (key_id, key, version, text, _), words in zip(puts, terms):
                self._drop(key_id)
                cur = self.db.execute("INSERT INTO meta (id, key, version, body) "
                                      "VALUES (?, ?, ?, ?)", (key_id, key, version, text))
                self.db.execute("INSERT INTO docs (rowid, terms) VALUES (?, ?)",
                                (cur.lastrowid, words))

    def _stemmer(self, lang: str | None) -> str | None:
        """A stored lang -> the stemmer; one no longer configured: by script."""
        try:
            return self.analyzer.language(lang)
        except UnknownLanguage:
            return None

    def _drop_versions(self, versions: list[int]) -> None:
        for start in range(0, len(versions), 500):  # SQLite's bound on parameters
            chunk = versions[start:start + 500]
            marks = ",".join("?" * len(chunk))
            self.db.execute(f"DELETE FROM docs WHERE rowid IN (SELECT doc FROM meta WHERE "
                            f"version IN ({marks}))", chunk)
            self.db.execute(f"DELETE FROM meta WHERE version IN ({marks})", chunk)

    def _drop(self, key_id: bytes) -> None:
        row = self.db.execute("SELECT doc FROM meta WHERE id = ?", (key_id,)).fetchone()
        if row is not None:
            self.db.execute("DELETE FROM docs WHERE rowid = ?", row)
            self.db.execute("DELETE FROM meta WHERE doc = ?", row)

    def _transaction(self):
        return _Transaction(self.db)

    # Reads -------------------------------------------------------------------

    def versions(self) -> dict[bytes, int]:
        """id -> version of every row: what the start-up check compares with LMDB."""
        return dict(self.db.execute("SELECT id, version FROM meta"))

    def search(self, text: str, limit: int, lang: str | None = None, raw: bool = False,
               deadline: float | None = None, pause=None) -> dict:
        """{"hits": [{"key", "score", "snippet", "parts"}], best first, "count":
        how many match, "partial": cut at `deadline` (time.monotonic()) with
        what was ranked by then}.  Raises BadQuery.  `pause(count)` is called
        once the count is known and `pause(None)` every PROGRESS_STEPS of SQLite's
        work: it may block while other searches run (storage/searcher.py)."""
        query = parse(text, self.analyzer, self.analyzer.language(lang), raw)
        self.db.execute("BEGIN")   # one snapshot: the count, every chunk and the bodies agree
        try:
            if deadline is not None or pause is not None:
                self.db.set_progress_handler(lambda: _progress(pause, deadline),
                                             PROGRESS_STEPS)
            try:
                best, count, partial = self._rank(query, limit, deadline, pause)
            finally:
                self.db.set_progress_handler(None, 0)
            return {"hits": self._hits(best, query), "count": count, "partial": partial}
        finally:
            self.db.execute("COMMIT")

    def _rank(self, query: Query, limit: int, deadline: float | None, pause=None):
        """(the best `limit` (score, key, doc), best first, how many match, cut).
        Counting is cheap (no score, no row read); ranking costs per match, so
        the rowid range is ranked in chunks of about CHUNK matches, and a search
        cut at its deadline keeps what the finished chunks ranked."""
        best: list[tuple] = []
        count = 0
        try:
            if deadline is not None and time.monotonic() > deadline:
                return best, count, True
            count = self.db.execute(_COUNT, (query.fts,)).fetchone()[0]
            if count == 0:
                return best, count, False
            if pause is not None:
                pause(count)
            low, top = self.db.execute(_SPAN).fetchone()
            step = (top - low) // -(-count // CHUNK) + 1
            for start in range(low, top + 1, step):
                if deadline is not None and time.monotonic() > deadline:
                    return best, count, True
                best = heapq.nsmallest(limit, best + self._best(query.fts, start,
                                                                start + step - 1, limit))
        except sqlite3.OperationalError as exc:
            if str(exc) == "interrupted":   # by the progress handler: the deadline
                return best, count, True
            raise BadQuery(f"cannot parse the query {query.text[:80]!r}: {exc}") from None
        return best, count, False

    def _best(self, fts: str, low: int, high: int, limit: int) -> list[tuple]:
        """The best `limit` (score, key, doc) of rowids `low` to `high`, ties by key.
        By score alone first; only when the row past the cut ties the last one
        kept may another key belong in its place: then ranked by score and key."""
        rows = self.db.execute(_BEST, (fts, low, high, limit + 1)).fetchall()
        if len(rows) > limit and rows[limit][0] == rows[limit - 1][0]:
            rows = self.db.execute(_RANKED, (fts, low, high, limit)).fetchall()
        key = "SELECT key FROM meta WHERE doc = ?"
        return [(score, self.db.execute(key, (doc,)).fetchone()[0], doc)
                for score, doc in rows[:limit]]

    def _hits(self, best: list[tuple], query: Query) -> list[dict]:
        hits = []
        for rank, key, doc in best:
            body = self.db.execute("SELECT body FROM meta WHERE doc = ?", (doc,)).fetchone()
            parts = self.snippet(body[0] if body else "", query)
            hits.append({"key": key, "score": -rank, "parts": parts,
                         "snippet": "".join(p if i % 2 == 0 else SNIPPET_MARK[0] + p +
                                            SNIPPET_MARK[1] for i, p in enumerate(parts))})
        return hits

    def snippet(self, body: str, query: Query) -> list[str]:
        """About SNIPPET_CHARS of `body` around the most matched words, as parts:
        plain text at even indexes, the matched words (as written) at odd ones."""
        text = body[:SNIPPET_SCAN]
        marks = self._marks(text, query)
        first, most, last = 0, 0, 0
        for i, (start, _) in enumerate(marks):   # the window with the most marks
            while last < len(marks) and marks[last][1] <= start + SNIPPET_CHARS:
                last += 1
            if last - i > most:
                first, most = i, last - i
        begin = 0
        if marks and marks[first][1] > SNIPPET_CHARS:  # not near the start: some words before
            begin = text.find(" ", max(0, marks[first][0] - SNIPPET_CONTEXT), marks[first][0])
            begin = marks[first][0] if begin < 0 else begin + 1
        end = len(text)
        if end > begin + SNIPPET_CHARS:  # cut at a space, past the window's first mark
            end = text.rfind(" ", begin, begin + SNIPPET_CHARS)
            end = begin + SNIPPET_CHARS if end <= begin else end
            end = max(end, marks[first][1] if marks else 0)
        parts, at = ["..." if begin > 0 else ""], begin
        for start, stop in marks:
            if begin <= start and stop <= end:
                parts[-1] += text[at:start]
                parts += [text[start:stop], ""]
                at = stop
        parts[-1] += text[at:end] + ("..." if end < len(body) else "")
        return [_SPACES.sub(" ", p) for p in parts]

    def _marks(self, text: str, query: Query) -> list[tuple[int, int]]:
        """(start, end) of each word of `text` that a query term matches.  Only the
        words that begin as a term does are stemmed (a stem is its word's beginning,
        but for the last letters), each distinct one once."""
        if query.candidates is None:
            return []
        verdicts: dict[str, bool] = {}
        folded = fold(text)
        if len(folded) == len(text):  # folding kept every character in place (most text)
            words = ((m.start(), m.end(), m.group()) for m in query.candidates.finditer(folded))
        else:
            words = iter(self.analyzer.spans(text))
        marks = []
        for start, end, word in words:
            if word not in verdicts:
                verdicts[word] = query.matches(self.analyzer.terms(word, query.lang))
            if verdicts[word]:
                marks.append((start, end))
        return marks

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM meta").fetchone()[0]

    def close(self) -> None:
        self.db.close()


def _progress(pause, deadline: float | None) -> bool:
    """SQLite's progress handler: True interrupts the statement (the deadline)."""
    if pause is not None:
        pause(None)
    return deadline is not None and time.monotonic() > deadline


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False
