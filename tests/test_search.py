"""Full-text search end to end: indexed writes and searches on real nodes, on loopback.

Most tests share one 3-node, 2-group cluster (n1, n2 in group 1; n3 in group 2)
behind `srw serve` with its proxy, started once for this module; each test uses
words of its own so that they do not see each other's documents.  The SIGKILL
test starts a node of its own.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import urllib.parse

import pytest

from conftest import (Cluster, free_port, kill_tree, proxy_request, serving_with_proxy,
                      set_node_keys, wait_until)
from storage.client import BadQuery, NotFound, Session

MAX_INDEX = 4096


@pytest.fixture(scope="module")
def fts(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("search"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 1},
                       {"name": "n3", "group": 2}], {"workers": 2}, {}, {}, None)
    for node in ("n1", "n2", "n3"):
        set_node_keys(cluster, node, max_index_bytes=MAX_INDEX)
    with serving_with_proxy(cluster):
        with Session(cluster.path) as session:
            cluster.session = session
            yield cluster


def keys(hits: list[dict] | dict) -> list[str]:
    """The keys of Session.search's hits, or of a JSON answer's (CLI --json, HTTP)."""
    return [h["key"] for h in (hits["hits"] if isinstance(hits, dict) else hits)]


def http_search(cluster: Cluster, query: str, limit: int = 10, **params):
    path = f"/elliptics?search={urllib.parse.quote(query)}&limit={limit}"
    path += "".join(f"&{k}={urllib.parse.quote(str(v))}" for k, v in params.items())
    return proxy_request(cluster, "GET", path)


def indexed(session: Session, key: str, text: str | bytes) -> None:
    data = text.encode() if isinstance(text, str) else text
    results = session.write(key, data, index=True)
    assert results and all(r.ok and not r.data for r in results), results


def test_found_from_every_front_end(fts):
    s = fts.session
    indexed(s, "fe-session", "walrus tusk from the session")
    out = fts.run("write", "fe-cli", "--data", "-", "--index", input=b"walrus tusk from the cli")
    assert out.returncode == 0, out.stderr
    status, _, body = proxy_request(fts, "POST", "/elliptics?upload&name=fe-http&index=1",
                                    b"walrus tusk from http")
    assert status == 200, body
    want = {"fe-session", "fe-cli", "fe-http"}
    assert set(keys(s.search("walrus tusk"))) == want
    out = fts.run("search", "walrus", "--json")
    assert out.returncode == 0, out.stderr
    assert set(keys(json.loads(out.stdout))) == want
    status, headers, body = http_search(fts, "walrus")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    found = json.loads(body)
    assert set(keys(found)) == want and found["count"] == 3 and not found["partial"]
    hits = found["hits"]
    assert all(h["score"] > 0 and "[walrus]" in h["snippet"] and "walrus" in h["parts"][1::2]
               for h in hits)
    assert keys(s.search("walrus", limit=2)) == keys(hits)[:2]  # deduped: replicas count once


def test_overwrite_is_found_by_its_new_words_only(fts):
    s = fts.session
    indexed(s, "ow-doc", "original parsnip words")
    assert keys(s.search("parsnip")) == ["ow-doc"]
    indexed(s, "ow-doc", "replacement turnip words")
    assert keys(s.search("turnip")) == ["ow-doc"]
    assert s.search("parsnip") == []
    # A plain (unindexed) overwrite takes the document out of the index.
    assert all(r.ok for r in s.write("ow-doc", b"plain turnip"))
    assert s.search("turnip") == []


def test_removed_document_vanishes(fts):
    s = fts.session
    indexed(s, "rm-doc", "ephemeral marmalade")
    assert keys(s.search("marmalade")) == ["rm-doc"]
    out = fts.run("remove", "rm-doc")
    assert out.returncode == 0, out.stderr
    assert s.search("marmalade") == []
    with pytest.raises(NotFound):
        s.read("rm-doc")


def on_node(session: Session, prefix: str, node: str) -> str:
    """A key named `prefix`-N that node `node` owns in its group."""
    for i in range(1000):
        key = f"{prefix}-{i}"
        if node in [n.name for n in session.route(key=key)]:
            return key
    raise AssertionError(f"no key {prefix}-N on {node} in 1000 tries")


def test_lang_at_write_from_every_front_end_and_refused_when_unknown(fts):
    """lang= at write stems the document with that stemmer: "none" keeps
    "running" as written, so only an unstemmed query finds it."""
    s = fts.session
    assert all(r.ok for r in s.write("lang-session", b"running geese", index=True,
                                     lang="none"))
    out = fts.run("write", "lang-cli", "--data", "-", "--index", "--lang", "none",
                  input=b"running geese")
    assert out.returncode == 0, out.stderr
    status, _, body = proxy_request(fts, "POST", "/elliptics?upload&name=lang-http&index=1"
                                    "&lang=none", b"running geese")
    assert status == 200, body
    indexed(s, "lang-default", "running geese")
    assert keys(s.search("run")) == ["lang-default"]
    assert sorted(keys(s.search("running", lang="none"))) == ["lang-cli", "lang-http",
                                                             "lang-session"]
    out = fts.run("write", "lang-bad", "--data", "-", "--index", "--lang", "klingon",
                  input=b"x")
    assert out.returncode != 0 and b"unknown language 'klingon'" in out.stderr
    status, _, body = proxy_request(fts, "POST", "/elliptics?upload&name=lang-bad&index=1"
                                    "&lang=klingon", b"x")
    assert status == 400 and b"unknown language" in body
    with pytest.raises(NotFound):
        s.read("lang-bad")


def test_ranking_puts_the_most_matches_first(fts):
    # BM25 weighs a word by how rare it is among each node's own documents, so
    # the three share an owner (n2 in group 1; n3 holds group 2).
    s = fts.session
    once, many, twice = (on_node(s, f"rank-{n}", "n2") for n in ("once", "many", "twice"))
    filler = " ".join(f"filler{i}" for i in range(40))
    indexed(s, once, f"pelican {filler}")
    indexed(s, many, "pelican pelican pelican pelican pelican pelican beak")
    indexed(s, twice, f"pelican {filler} pelican")
    hits = s.search("pelican")
    assert keys(hits) == [many, twice, once], hits
    assert hits[0]["score"] > hits[1]["score"] > hits[2]["score"]


def test_russian_and_english_phrases_and_prefixes(fts):
    s = fts.session
    indexed(s, "ru-fox", "Быстрая коричневая лиса прыгает через ленивую собаку. ПРИВЕТ, МИР!")
    indexed(s, "ru-dog", "Коричневая собака и быстрая лиса")
    indexed(s, "en-fox", "The Quick brown fox jumps over the lazy dog")
    indexed(s, "en-dog", "A brown quick dog")
    assert keys(s.search("привет мир")) == ["ru-fox"]            # case folded
    assert keys(s.search('"быстрая коричневая"')) == ["ru-fox"]  # phrase: word order counts
    assert set(keys(s.search("коричнев*"))) == {"ru-fox", "ru-dog"}
    assert keys(s.search('"quick brown"')) == ["en-fox"]
    assert set(keys(s.search("quick brown"))) == {"en-fox", "en-dog"}
    assert set(keys(s.search("jum* OR quic*"))) == {"en-fox", "en-dog"}
    status, _, body = http_search(fts, "ленив*")
    assert status == 200 and keys(json.loads(body)) == ["ru-fox"]
    assert "[ленивую]" in json.loads(body)["hits"][0]["snippet"]


def test_typed_text_is_a_query_and_only_wordless_text_an_error(fts):
    s = fts.session
    indexed(s, "tq-dash", "Прогулка по Москве-реке, e-mail и C++")
    indexed(s, "tq-mail", "an email to Москва")
    status, _, body = http_search(fts, '"unbalanced quote')   # engine syntax once
    assert status == 200 and json.loads(body)["hits"] == []
    assert keys(json.loads(http_search(fts, "москва-река")[2])) == ["tq-dash"]
    assert keys(s.search("C++ OR e-mail")) == ["tq-dash"]
    assert set(keys(s.search("москва"))) == {"tq-dash", "tq-mail"}
    assert keys(s.search("москва -e-mail")) == ["tq-mail"]
    status, _, body = http_search(fts, "   ")
    assert status == 400
    status, _, body = http_search(fts, "+++")
    assert status == 400 and b"no words" in body and b"fts5" not in body
    out = fts.run("search", "")
    assert out.returncode == 2 and out.stdout == b""
    assert out.stderr.count(b"\n") == 1 and b"no words" in out.stderr, out.stderr
    with pytest.raises(BadQuery, match="only excludes"):
        s.search("-москва")
    assert http_search(fts, "x", limit=0)[0] == 400
    status, _, body = http_search(fts, "word " * 1000)
    assert status == 400 and b"at most 4096" in body
    status, _, body = http_search(fts, "fox", lang="klingon")
    assert status == 400 and b"unknown language" in body


def test_no_match_exits_1_and_a_failed_node_exits_2_with_the_others_hits(fts):
    indexed(fts.session, "ex-doc", "a xylophone in the hall")
    out = fts.run("search", "xylophone")
    assert out.returncode == 0 and b"[xylophone]" in out.stdout, out.stderr  # not a tty
    assert b"1 match; 1 to 1 shown" in out.stderr
    out = fts.run("search", "zanzibarquux")
    assert out.returncode == 1 and out.stdout == b""
    assert out.stderr.startswith(b"srw: no matches"), out.stderr
    # A config that names one more node, which is not running.
    dead = fts.root / "with-dead-node.toml"
    dead.write_text(fts.path.read_text() + f"""
[[node]]
name = "n4"
group = 3
broker = "tcp://127.0.0.1:{free_port()}"
storage = "tcp://127.0.0.1:{free_port()}"
data_dir = "{fts.root / 'n4'}"
""")
    out = subprocess.run([sys.executable, "-m", "srw", "search", "xylophone", "--json",
                          "--config", str(dead)], cwd=fts.root, capture_output=True, timeout=30)
    assert out.returncode == 2, out.stderr
    answer = json.loads(out.stdout)
    assert keys(answer) == ["ex-doc"] and answer["partial"]
    assert [f for f in answer["failures"] if "n4" in f] == answer["failures"]
    assert b"n4" in out.stderr


def test_terminal_gets_bold_terms_and_never_the_documents_control_bytes(fts):
    indexed(fts.session, "tty-doc", "quokka \x1b]0;owned\x07 and \x1b[2J quokka again")
    command = f"{sys.executable} -m srw search quokka --config {fts.path}"
    out = subprocess.run(["script", "-qec", command, "/dev/null"], cwd=fts.root,
                         capture_output=True, timeout=30)   # stdout on a pseudo-terminal
    assert out.returncode == 0, out.stdout
    assert b"\x1b[1mquokka\x1b[0m" in out.stdout, out.stdout
    assert b"\x1b]" not in out.stdout and b"\x1b[2J" not in out.stdout, out.stdout


def test_ties_go_by_key_and_pages_add_up(fts):
    # Equal scores need equal BM25 statistics: the same owner (n2; n3 holds group 2).
    s = fts.session
    names = [on_node(s, f"page{i:02d}", "n2") for i in range(12)]
    for name in reversed(names):
        indexed(s, name, "identical okapi text")
    hits = s.search("okapi", limit=12)
    assert keys(hits) == names and hits.count == 12 and not hits.partial
    pages = [keys(s.search("okapi", limit=5, offset=o)) for o in (0, 5, 10)]
    assert sum(pages, []) == names
    out = fts.run("search", "okapi", "--limit", "3", "--offset", "9", "--json")
    answer = json.loads(out.stdout)
    assert keys(answer) == names[9:] and answer["count"] == 12
    out = fts.run("search", "okapi", "--offset", "12")
    assert out.returncode == 1 and b"past the first 12" in out.stderr


def test_binary_content_is_stored_but_not_indexed(fts):
    s = fts.session
    blob = b"quagga binary\x00\xff\xfe quagga"
    results = s.write("bin-doc", blob, index=True)
    assert [r.status for r in results] == ["ok", "ok"]
    assert all(b"not indexed" in r.data for r in results)
    assert s.read("bin-doc") == blob
    assert s.search("quagga") == []
    indexed(s, "bin-after", "quagga in plain text")   # the nodes still index
    assert keys(s.search("quagga")) == ["bin-after"]


def test_too_large_document_is_refused(fts):
    s = fts.session
    big = ("narwhal " * MAX_INDEX).encode()
    results = s.write("big-doc", big, index=True)
    assert [r.status for r in results] == ["output_too_large"] * 2
    assert "max_index_bytes" in results[0].error
    with pytest.raises(NotFound):
        s.read("big-doc")
    status, _, body = proxy_request(fts, "POST", "/elliptics?upload&name=big-doc&index=1", big)
    assert status == 413 and b"max_index_bytes" in body
    assert s.search("narwhal") == []
    assert all(r.ok for r in s.write("big-doc", big))  # unindexed, the value fits max_value


def test_what_the_index_script_answers_is_bounded_like_a_document(fts):
    """The script's answer enters the trusted storage process: at most
    max_index_bytes of it are indexed, whatever the script returns."""
    index = fts.history / "index.py"
    shipped = index.read_text()
    index.write_text(f"__return_data = 'headword ' + 'pad ' * {MAX_INDEX} + 'tailword'\n")
    try:
        indexed(fts.session, "inflated", "a small document")
        assert keys(fts.session.search("headword")) == ["inflated"]
        assert fts.session.search("tailword") == []
    finally:
        index.write_text(shipped)


def test_sigkill_during_indexing_loses_no_acknowledged_document(make_cluster):
    cluster = make_cluster([{"name": "n1"}])
    serve = cluster.serve()
    acked: list[str] = []
    stop = threading.Event()

    def writer():
        with Session(cluster.path, timeout=3.0) as s:
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    results = s.write(f"kill-{i}", f"survivor number{i}".encode(), index=True)
                except Exception:
                    return
                if results[0].ok:
                    acked.append(f"kill-{i}")

    with Session(cluster.path) as s:
        assert s.write("kill-lang", b"running survivor", index=True, lang="none")[0].ok
        indexed(s, "kill-removed", "survivor removed")
        indexed(s, "kill-overwritten", "survivor overwritten")
        assert all(r.ok for r in s.remove("kill-removed"))
        indexed(s, "kill-overwritten", "replaced words")
    thread = threading.Thread(target=writer)
    thread.start()
    wait_until(lambda: len(acked) >= 40, 30, "40 indexed writes acknowledged")
    kill_tree(serve)   # the whole node: storage, broker, pool, mid-indexing
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    before = list(acked)
    cluster.serve()
    with Session(cluster.path) as s:
        found = set(keys(s.search("survivor", limit=1000)))
        assert set(before) <= found
        assert {"kill-removed", "kill-overwritten"}.isdisjoint(found)
        assert keys(s.search("replaced")) == ["kill-overwritten"]
    assert "index n1:" in cluster.log()
    # The lang is kept with the document: an index made again from the store
    # stems it as its write asked.
    cluster.stop()
    for path in (cluster.root / "var" / "n1").glob("index.sqlite*"):
        path.unlink()
    cluster.serve()
    with Session(cluster.path) as s:
        wait_until(lambda: "kill-lang" in keys(s.search("running", lang="none")), 10,
                   "the index made again")
        assert "kill-lang" not in keys(s.search("run", limit=1000))
