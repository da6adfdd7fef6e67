"""One node's full-text index: SQLite FTS5 under ``data_dir/index.sqlite``.

Owned by the storage process (trusted, like a Redis module beside its data);
scripts never open it.  Each indexed value is one row, keyed by its 64-byte
id, holding the key's name and the *version* (the value's mtime in
nanoseconds, as LMDB holds it) of the text it was made from.  That version
is what lets the node tell, after a crash, whether a row still matches its
value (storage/node.py, "index agrees with the data").

Commits are durable before the storage node acknowledges anything that
depends on them: WAL with ``synchronous=FULL`` when the node syncs.

Queries use FTS5's syntax: words (all must match), ``"a phrase"``,
``prefix*``, ``OR``, ``NOT``, ``NEAR(a b, 5)``, parentheses.  Text is
tokenised by ``unicode61`` with diacritics removed, which case-folds
Cyrillic and Latin alike.  Ranking is BM25; scores are negated so that
higher is better.
"""
from __future__ import annotations

import sqlite3
from pathlib import Path

INDEX_SCRIPT = "index.py"    # in the history dir: value -> the text to index
SEARCH_SCRIPT = "search.py"  # run on every node by Session.search
SNIPPET_WORDS = 12
SNIPPET_MARK = ("[", "]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    doc INTEGER PRIMARY KEY,
    id BLOB NOT NULL UNIQUE,
    key TEXT NOT NULL,
    version INTEGER NOT NULL
);
CREATE VIRTUAL TABLE IF NOT EXISTS docs USING fts5(
    body, tokenize = 'unicode61 remove_diacritics 2'
);
"""

_SEARCH = f"""
SELECT meta.key, -bm25(docs) AS score,
       snippet(docs, 0, '{SNIPPET_MARK[0]}', '{SNIPPET_MARK[1]}', '...', {SNIPPET_WORDS})
FROM docs JOIN meta ON meta.doc = docs.rowid
WHERE docs MATCH ? ORDER BY bm25(docs) LIMIT ?
"""


class BadQuery(ValueError):
    """A query FTS5 cannot parse; the message says why."""


class FullText:
    def __init__(self, path: str | Path, sync: bool = True):
        self.path = str(path)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if sync else 'NORMAL'}")
        self.db.executescript(_SCHEMA)

    # Changes: each call is one transaction, committed (and synced) on return --

    def apply(self, puts: list[tuple[bytes, str, int, str]], drops: list[bytes]) -> None:
        """Rows (id, key, version, text) replace any row of their id; ids in
        `drops` lose theirs.  One transaction for all."""
        with self._transaction():
            for key_id in drops:
                self._drop(key_id)
            for key_id, key, version, text in puts:
                self._drop(key_id)
                cur = self.db.execute("INSERT INTO meta (id, key, version) VALUES (?, ?, ?)",
                                      (key_id, key, version))
                self.db.execute("INSERT INTO docs (rowid, body) VALUES (?, ?)",
                                (cur.lastrowid, text))

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

    def search(self, query: str, limit: int) -> list[dict]:
        """Best first: [{"key", "score", "snippet"}]; raises BadQuery."""
        try:
            rows = self.db.execute(_SEARCH, (query, limit)).fetchall()
        except sqlite3.OperationalError as exc:
            raise BadQuery(f"cannot parse the query {query[:80]!r}: {exc}") from None
        return [{"key": key, "score": score, "snippet": snippet}
                for key, score, snippet in rows]

    def count(self) -> int:
        return self.db.execute("SELECT count(*) FROM meta").fetchone()[0]

    def close(self) -> None:
        self.db.close()


class _Transaction:
    """BEGIN ... COMMIT, or ROLLBACK when the block raises."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind, exc, tb):
        self.db.execute("ROLLBACK" if kind else "COMMIT")
        return False
