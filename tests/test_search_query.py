"""Typed queries, stemming, snippets, ties and deadlines on one FullText index,
in this process (storage/query.py, storage/analyzer.py, storage/fulltext.py).
The end-to-end paths (CLI, HTTP, exit statuses) are in test_search.py."""
from __future__ import annotations

import select
import sqlite3
import time

import pytest

from core import protocol as bp
from storage import fulltext, searcher
from storage import protocol as sp
from storage.fulltext import FullText
from storage.query import BadQuery

DOCS = {
    "walrus": "The walrus-tusk is ivory; a walrus tusk grows all its life.",
    "tusk": "A tusk of ivory, and a walrus nearby.",
    "cpp": "C++ and e-mail: how to send e-mail from C++ code.",
    "email": "An email address, and mail for everyone.",
    "fox": "The quick brown fox jumps over the lazy dog.",
    "foxes": "Foxes and dogs: foxes run, dogs bark.",
    "cat-ru": "Кошки спят на диване весь день.",
    "moscow": "Прогулка по Москве-реке летом, красиво.",
    "hedgehog": "Ёжик в тумане ищет лошадку.",
    "mixed": "Кошка and the fox live together in Moscow.",
    "cafe": "Café naïve résumé, and nothing else.",
}


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    ft = FullText(tmp_path_factory.mktemp("fts") / "index.sqlite", sync=False)
    ft.apply([(key.encode().ljust(64, b"\0"), key, 1, text, None)
              for key, text in DOCS.items()], [])
    yield ft
    ft.close()


def found(ft: FullText, query: str, **kw) -> set[str]:
    return {h["key"] for h in ft.search(query, 100, **kw)["hits"]}


TYPED = [  # (what a person types, the keys it finds)
    ("walrus-tusk", {"walrus"}),               # hyphenated: a phrase of its words
    ("walrus tusk", {"walrus", "tusk"}),       # words: all must appear
    ('"walrus tusk"', {"walrus"}),             # a phrase: in this order
    ('"tusk walrus"', set()),
    ('"tusk of ivory', {"tusk"}),              # an unclosed quote runs to the end
    ("C++", {"cpp"}),                          # + separates words: c
    ("C++ OR e-mail", {"cpp"}),
    ("e-mail", {"cpp"}),                       # the phrase "e mail", not email
    ("email OR fox", {"email", "fox", "foxes", "mixed"}),
    ("tusk -walrus-tusk", {"tusk"}),           # -phrase excludes
    ("walrus -ivory", set()),
    ("fox -dog", {"mixed"}),                   # -word excludes; dog finds dogs too
    ("ivor*", {"walrus", "tusk"}),             # prefix
    ("кошка", {"cat-ru", "mixed"}),            # Russian stems: кошка finds Кошки
    ("Москва", {"moscow"}),                    # Москва finds Москве
    ("ежик", {"hedgehog"}),                    # е finds Ё
    ("ЁЖИК", {"hedgehog"}),
    ("foxes", {"fox", "foxes", "mixed"}),      # English stems: foxes finds fox
    ("fox кошка", {"mixed"}),                  # mixed scripts, each word by its own
    ("cafe naive resume", {"cafe"}),           # diacritics folded
    ("AND OR NOT", {"cafe", "cpp", "email", "foxes", "mixed", "tusk"}),  # and OR not
    ("NEAR(walrus tusk)", set()),              # the word near, then walrus tusk
    ("walrus) OR (", {"walrus", "tusk"}),
    ("col:walrus", set()),                     # no column filters: the phrase "col walrus"
    ("*walrus*", {"walrus", "tusk"}),
    ("walrus\x00 \x1b[\x7f", {"walrus", "tusk"}),  # control bytes are no words
]
ERRORS = [  # (what a person types, what the one-line error says)
    ("", "no words"),
    ("   ", "no words"),
    ('"', "no words"),
    ("-walrus", "only excludes"),
    ("OR", "no words"),
    ("+++ --- ***", "no words"),
    ("w " * 65, "at most 64"),
]


@pytest.mark.parametrize("typed, keys", TYPED)
def test_typed_query_finds_its_keys(index, typed, keys):
    assert found(index, typed) == keys


@pytest.mark.parametrize("typed, why", ERRORS)
def test_typed_query_without_words_is_one_clear_error(index, typed, why):
    with pytest.raises(BadQuery, match=why) as caught:
        index.search(typed, 10)
    assert "\n" not in str(caught.value)


def test_junk_never_reaches_fts5_as_syntax(index):
    """4 KiB of every ASCII punctuation mark and some words: an answer or a
    BadQuery of ours, never sqlite3's error."""
    punct = "".join(chr(c) for c in range(33, 127) if not chr(c).isalnum())
    for i in range(len(punct)):
        junk = (punct[i:] + " walrus " + punct[:i]) * 40
        try:
            index.search(junk[:4096], 10)
        except BadQuery as exc:
            assert "at most 64" in str(exc) or "no words" in str(exc)
    with pytest.raises(BadQuery, match="no words"):
        index.search(punct * 43, 10)


def test_raw_query_is_fts5_and_its_errors_are_bad_queries(index):
    assert {h["key"] for h in index.search("walrus NOT ivori", 10, raw=True)["hits"]} \
        == {"mixed"} - {"mixed"}  # every walrus document says ivory
    assert {h["key"] for h in index.search("fox NOT dog", 10, raw=True)["hits"]} == {"mixed"}
    with pytest.raises(BadQuery, match="cannot parse"):
        index.search('"unbalanced', 10, raw=True)


def test_lang_stems_every_word_with_one_stemmer(index):
    assert found(index, "fox", lang="none") == {"fox", "foxes", "mixed"}
    assert found(index, "foxes", lang="none") == set()    # as written: foxes is not fox
    assert found(index, "foxes", lang="en") == {"fox", "foxes", "mixed"}
    assert found(index, "кошки", lang="english") == set()   # English leaves Кошки whole
    with pytest.raises(ValueError, match="unknown language"):
        index.search("fox", 10, lang="klingon")


def test_snippet_marks_the_matched_words_as_written(index):
    hit = index.search("кошка", 10)["hits"]
    ru = next(h for h in hit if h["key"] == "cat-ru")
    assert ru["parts"][1] == "Кошки" and ru["snippet"].startswith("[Кошки] спят")
    (hit,) = index.search('"walrus tusk"', 10)["hits"]
    assert hit["parts"][1::2] == ["walrus", "tusk", "walrus", "tusk"]
    long = FullText.snippet(index, "pad " * 100 + "the narwhal here " + "pad " * 100,
                            _query(index, "narwhal"))
    assert long[0].startswith("...") and long[1] == "narwhal" and long[2].endswith("...")
    assert len("".join(long)) <= fulltext.SNIPPET_CHARS + 6   # and two "..."


def _query(index, text):
    from storage.query import parse
    return parse(text, index.analyzer)


def test_ties_go_by_key_and_pages_add_up(tmp_path):
    ft = FullText(tmp_path / "ties.sqlite", sync=False)
    keys = [f"tie-{i:02d}" for i in range(30)]
    # Inserted in reverse so that rowid order is not key order.
    ft.apply([(k.encode().ljust(64, b"\0"), k, 1, "same words here", None) for k in reversed(keys)],
             [])
    hits = ft.search("same", 30)["hits"]
    assert [h["key"] for h in hits] == keys
    assert len({h["score"] for h in hits}) == 1
    assert [h["key"] for h in ft.search("same", 7)["hits"]] == keys[:7]
    assert ft.search("same", 7)["count"] == 30
    ft.close()


def test_a_search_past_its_deadline_answers_partial(tmp_path, monkeypatch):
    monkeypatch.setattr(fulltext, "CHUNK", 10)   # rows ranked between deadline checks
    ft = FullText(tmp_path / "big.sqlite", sync=False)
    ft.apply([(i.to_bytes(64, "big"), f"k{i}", 1, "common word", None) for i in range(25)], [])
    whole = ft.search("common", 5)
    assert not whole["partial"] and whole["count"] == 25
    cut = ft.search("common", 5, deadline=time.monotonic() - 1)
    assert cut["partial"] and cut["count"] < 25
    ft.close()


def test_an_index_made_otherwise_is_emptied_for_reindexing(tmp_path):
    path = tmp_path / "old.sqlite"
    old = sqlite3.connect(path)  # the format before stemming: FTS5 over the text itself
    old.executescript("""
        CREATE TABLE meta (doc INTEGER PRIMARY KEY, id BLOB NOT NULL UNIQUE,
                           key TEXT NOT NULL, version INTEGER NOT NULL);
        CREATE VIRTUAL TABLE docs USING fts5(body, tokenize = 'unicode61 remove_diacritics 2');
        INSERT INTO meta VALUES (1, x'01', 'old', 7);
        INSERT INTO docs (rowid, body) VALUES (1, 'foxes');
    """)
    old.commit()
    old.close()
    ft = FullText(path, sync=False)
    assert ft.versions() == {}          # reconcile finds every document missing
    ft.apply([(b"\x01", "old", 7, "foxes", None)], [])
    assert found(ft, "fox") == {"old"}
    ft.close()
    ft = FullText(path, sync=False)     # the same stamp: kept
    assert ft.versions() == {b"\x01": 7}
    ft.close()
    ft = FullText(path, sync=False, languages=("russian",))   # other languages: emptied
    assert ft.versions() == {}
    ft.close()


# redis-cluster mode's pure parts -----------------------------------------------------

def test_every_slot_has_a_tag_in_that_slot():
    from redis.crc import key_slot
    from storage import redis_index as ix
    assert all(key_slot(b"{" + ix.tag(s) + b"}") == s and
               key_slot(ix.index_key(s)) == key_slot(ix.log_key(s)) == s
               for s in range(ix.SLOTS))


def test_slots_a_node_answers_decide_partial():
    from broker.client import Result
    from core import protocol as p
    from storage.hits import merge_hits
    from storage.search_node import slot_ranges
    assert slot_ranges({0, 1, 2, 7, 9, 10}) == [[0, 2], [7, 7], [9, 10]]

    def reply(node, ranges, keys):
        hits = [{"key": k, "score": 1.0, "snippet": k, "parts": [k]} for k in keys]
        return Result(node, 1, p.OK, p.pack({"hits": hits, "count": len(hits),
                                              "partial": False, "slots": ranges}), None)
    whole = merge_hits([reply("a", [[0, 99]], ["x"]), reply("b", [[100, 199]], ["y"])], 10,
                       slots=200)
    assert not whole.partial and whole.unindexed == 0 and [h["key"] for h in whole] == ["x", "y"]
    # Overlapping (a slot mid-move), a gap, and junk from a confused node.
    part = merge_hits([reply("a", [[0, 120]], ["x"]), reply("b", [[100, 150], "junk",
                                                                   [190, 10**9]], ["x"])],
                      10, slots=200)
    assert part.partial and part.unindexed == 39 and [h["key"] for h in part] == ["x"]


def test_only_a_login_handed_to_scripts_may_search_for_one():
    """The redis-cluster search front takes the scripts key's search only with a
    login script_login hands out (a caller with read or write)."""
    from core import redis_auth
    from core.capability import parse_redis_grant, redis_grant
    srw = ("srw", "f" * 64)
    for rights in (("read",), ("write",), ("read", "write")):
        login = parse_redis_grant(redis_grant(redis_auth.script_login(srw, rights)))
        assert redis_auth.is_script_login(srw, login)
    for forged in (srw, ("srw-read", "0" * 64), ("srw-write", "")):
        assert not redis_auth.is_script_login(srw, forged)
    assert parse_redis_grant(b"") is None and parse_redis_grant(b"\x01token") is None


def test_a_scripts_search_in_redis_mode_needs_a_caller_that_may_read():
    """srw-write is handed to a caller with `write` alone too (Redis's ACL cannot
    split reading from writing), so the search front-end asks the grant for the
    read proof its worker adds only for a caller with `read`."""
    from types import SimpleNamespace
    from core import capability
    from core import protocol as bp
    from runtime.grantor import RedisGrantor
    from storage.search_node import SearchNode
    srw = ("srw", "f" * 64)
    grantor = RedisGrantor.__new__(RedisGrantor)
    grantor.credentials, grantor.definers, grantor.warned = srw, {}, set()
    scripts = SimpleNamespace(identity=lambda user: SimpleNamespace(name="scripts"))
    front = SimpleNamespace(keyring=scripts, indexer=SimpleNamespace(auth=srw))

    def refusal(rights) -> str | None:
        meta = bp.ExecMeta(name="search.py", rights=rights)
        token, _ = grantor.grant(b"job", meta, None, time.time() + 5)
        req = SimpleNamespace(capability=token, name="search")
        return SearchNode.refusal(front, req, "scripts-user")

    assert refusal(("read",)) is None and refusal(("read", "write")) is None
    assert "may read" in refusal(("write",))           # srw-write, no proof
    assert "may read" in refusal(("exec",))            # no login at all
    write_only, _ = grantor.grant(b"job", bp.ExecMeta(name="s", rights=("write",)), None, 0)
    reader, _ = grantor.grant(b"job", bp.ExecMeta(name="s", rights=("read",)), None, 0)
    # A proof is bound to its login: srw-read's does not make srw-write's a reader's.
    forged = write_only + b"\0" + capability.redis_read_proof(reader).encode()
    req = SimpleNamespace(capability=forged, name="search")
    assert SearchNode.refusal(front, req, "scripts-user") is not None
    assert capability.parse_redis_grant(reader)[0] == "srw-read"   # the login still parses


def test_lang_rides_the_indexed_write_and_old_rows_still_read():
    from storage import protocol as sp
    from storage import store
    data = sp.indexed_value(b"k\x00ey", b"\x00value", "ru")
    assert sp.split_indexed(data) == (b"k\x00ey", "ru", b"\x00value")
    assert sp.split_indexed(sp.indexed_value(b"k", b"v")) == (b"k", "", b"v")
    for bad in (b"\x00\x01k", b"\x00\x01k\x29" + b"x" * 41, b"\x00\x00\x00v"):
        with pytest.raises(sp.ProtocolError):
            sp.split_indexed(bad)
    assert store._split_row(store._row(123, "russian", b"key")) == (123, "russian", b"key")
    assert store._split_row(store._row(123, None, b"key")) == (123, None, b"key")
    old = (123).to_bytes(8, "big") + b"\xffkey"   # a row an older node wrote
    assert store._split_row(old) == (123, None, b"\xffkey")


def test_a_narrow_search_passes_a_broad_one_that_runs(tmp_path, monkeypatch):
    """One turn: a broad search has counted and runs; a narrow one that comes
    meanwhile takes the turn at the broad one's next progress check and is
    answered first; the broad one then finishes, whole."""
    path = tmp_path / "turns.sqlite"
    ft = FullText(path, sync=False)
    ft.apply([(i.to_bytes(64, "big"), f"k{i}", 1, "common word" + " rare" * (i == 7), None)
              for i in range(3000)], [])
    ft.close()
    monkeypatch.setattr(searcher, "TURNS", 1)
    s = searcher.Searcher(str(path), ("english", "russian"), 1.0, "n1")
    pause = s._pause

    def paused(job, count):   # the broad one, counted: holds until the narrow one waits
        if count is not None and job.search.query == "common":
            deadline = time.monotonic() + 10
            while not s.waiting and time.monotonic() < deadline:
                time.sleep(0.01)
        pause(job, count)
    monkeypatch.setattr(s, "_pause", paused)
    replies = []
    try:
        s.submit(b"c", b"broad", sp.Search("common", 10, None, False, 20.0))
        s.submit(b"c", b"narrow", sp.Search("rare", 10, None, False, 20.0))
        deadline = time.monotonic() + 10
        while len(replies) < 2 and time.monotonic() < deadline:
            select.select([s.wake_r], [], [], 0.5)
            s.drain(lambda client, rid, status, data, error: replies.append((rid, data)))
    finally:
        s.close()
    assert [rid for rid, _ in replies] == [b"narrow", b"broad"]
    narrow, broad = (bp.unpack_map(data) for _, data in replies)
    assert [h["key"] for h in narrow["hits"]] == ["k7"]
    assert broad["count"] == 3000 and not broad["partial"] and len(broad["hits"]) == 10


def test_turns_go_to_the_fewest_matches_and_urgent_ones_by_deadline():
    """Not counted yet (0) before narrow before broad; a search waiting past
    PATIENCE or half its time to the deadline before all of them, the earliest
    deadline first, but never in the last turn (narrow searches' lane)."""
    def job(seq, count, timeout):
        one = searcher._Job(b"c", b"r", sp.Search("x", 10, None, False, timeout),
                            100.0 + timeout, {}, None, seq)
        one.urgent, one.count = 100.0 + timeout / 2, count
        return one
    new, narrow, broad = job(3, 0, 10.0), job(1, 5, 10.0), job(0, 90_000, 10.0)
    late, later = job(4, 90_000, 1.0), job(2, 90_000, 2.0)
    jobs = [broad, later, narrow, new, late]
    fresh = searcher._Job(b"c", b"r", sp.Search("x", 10, None, False, 60.0),
                          time.monotonic() + 60.0, {}, None, 5)
    assert fresh.urgent <= time.monotonic() + searcher.PATIENCE
    assert sorted(jobs, key=lambda j: j.rank(100.1)) == [new, narrow, broad, later, late]
    assert sorted(jobs, key=lambda j: j.rank(101.5)) == [late, later, new, narrow, broad]
    # Two turns: while an urgent search holds one, the other goes by fewest matches.
    order = searcher.Searcher._order([late], 101.5)
    assert sorted([broad, later, narrow, new], key=order) == [new, narrow, broad, later]
    assert searcher.Searcher._order([narrow], 101.5)(later) < \
        searcher.Searcher._order([narrow], 101.5)(new)
