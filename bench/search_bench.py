"""Full-text search bench: indexing and search through srw, next to the engine used directly.

    .venv/bin/python bench/search_bench.py [--docs N] [--queries Q] [--engines]

Generates N documents (default 100,000; seeded, so every run sees the same
ones): words drawn by a Zipf law (s = 1.07, like English text) over a
vocabulary of 30,000 made-up words, lengths log-normal around 120 words.
Then, in one run, side by side:

- **srw**: a one-node cluster (``srw serve``, 2 workers, in a temporary
  folder) indexes every document (``Session.write(..., index=True)``, 16
  writes in flight from 16 threads), then runs the queries
  (``Session.search``) 16 in flight: indexing docs/s, search p50/p99 and
  queries/s.
- **sqlite FTS5 direct**: the node's own engine (``storage.fulltext``) in
  this process on the same documents, committing every 256 (what a busy
  node's batch does), then the same queries from 16 threads, one connection
  each.
- with ``--engines``, also **tantivy direct** (``pip install tantivy``),
  the alternative measured when the engine was chosen.

Queries: one word of middle frequency, two words, a two-word phrase taken
from a document, and a prefix.  Not run by the test suite.
"""
from __future__ import annotations

import argparse
import math
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from common import pct, wait_for  # noqa: E402
from http_bench import stop, write_config  # noqa: E402

SEED = 2011
VOCABULARY = 30_000
ZIPF_S = 1.07
IN_FLIGHT = 16
COMMIT_EVERY = 256
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "ta", "si", "vo", "de", "pa", "zu", "ri", "on",
             "el", "ba", "qu", "ter", "san", "dor", "vel", "mar", "lin", "gro", "fen")


# Documents and queries -------------------------------------------------------

def vocabulary(rng: random.Random) -> list[str]:
    words: set[str] = set()
    while len(words) < VOCABULARY:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words, key=lambda w: (len(w), w))  # short words are the common ones


def documents(count: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    words = vocabulary(rng)
    weights = [1 / (rank ** ZIPF_S) for rank in range(1, len(words) + 1)]
    cumulative = list(_accumulate(weights))
    docs = []
    for _ in range(count):
        length = max(5, min(2000, int(rng.lognormvariate(math.log(120), 0.6))))
        docs.append(" ".join(rng.choices(words, cum_weights=cumulative, k=length)))
    return docs


def _accumulate(values):
    total = 0.0
    for v in values:
        total += v
        yield total


def queries(docs: list[str], count: int, seed: int = SEED) -> list[str]:
    rng = random.Random(seed + 1)
    words = vocabulary(random.Random(seed))
    out = []
    for i in range(count):
        kind = i % 4
        if kind == 0:
            out.append(rng.choice(words[200:5000]))
        elif kind == 1:
            out.append(f"{rng.choice(words[50:2000])} {rng.choice(words[50:2000])}")
        elif kind == 2:
            text = rng.choice(docs).split()
            at = rng.randrange(len(text) - 1)
            out.append(f'"{text[at]} {text[at + 1]}"')
        else:
            out.append(rng.choice(words[100:3000])[:4] + "*")
    return out


# Measuring -------------------------------------------------------------------

def timed_in_flight(call, items: list, threads: int = IN_FLIGHT) -> tuple[float, list[float]]:
    """(seconds for all, latency of each) with `threads` calls in flight."""
    latencies: list[float] = []
    lock = threading.Lock()

    def one(item):
        start = time.perf_counter()
        call(item)
        took = time.perf_counter() - start
        with lock:
            latencies.append(took)

    start = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, items))
    return time.perf_counter() - start, latencies


def row(name: str, docs: int, index_s: float, q_total: float, lat: list[float]) -> str:
    return (f"{name:24} {docs / index_s:>10,.0f} {pct(lat, 0.5) * 1e6:>9,.0f} "
            f"{pct(lat, 0.99) * 1e6:>9,.0f} {len(lat) / q_total:>10,.0f}")


# Engines used directly -------------------------------------------------------

def sqlite_direct(root: Path, docs: list[str], qs: list[str]) -> str:
    from storage.fulltext import FullText
    index = FullText(root / "direct.sqlite")
    start = time.perf_counter()
    for at in range(0, len(docs), COMMIT_EVERY):
        index.apply([(b"%064d" % i, f"doc{i}", 1, docs[i])
                     for i in range(at, min(at + COMMIT_EVERY, len(docs)))], [])
    index_s = time.perf_counter() - start
    local = threading.local()

    def search(q):
        if not hasattr(local, "index"):
            local.index = FullText(root / "direct.sqlite")
        local.index.search(q, 10)
    total, lat = timed_in_flight(search, qs)
    return row("sqlite FTS5 direct", len(docs), index_s, total, lat)


def tantivy_direct(root: Path, docs: list[str], qs: list[str]) -> str:
    import tantivy
    schema = (tantivy.SchemaBuilder().add_text_field("key", stored=True)
              .add_text_field("body", stored=True).build())
    (root / "tantivy").mkdir()
    index = tantivy.Index(schema, path=str(root / "tantivy"))
    writer = index.writer()
    start = time.perf_counter()
    for i, text in enumerate(docs):
        writer.add_document(tantivy.Document(key=f"doc{i}", body=text))
        if (i + 1) % COMMIT_EVERY == 0:
            writer.commit()
    writer.commit()
    writer.wait_merging_threads()
    index_s = time.perf_counter() - start
    index.reload()

    def search(q):
        searcher = index.searcher()
        query = index.parse_query(q.replace("*", ""), ["body"]) if q.endswith("*") \
            else index.parse_query(q, ["body"])
        snippets = tantivy.SnippetGenerator.create(searcher, query, schema, "body")
        for _, address in searcher.search(query, 10).hits:
            snippets.snippet_from_doc(searcher.doc(address)).to_html()
    total, lat = timed_in_flight(search, qs)
    return row("tantivy direct", len(docs), index_s, total, lat)


# srw -------------------------------------------------------------------------

def srw_cluster(root: Path):
    config = write_config(root, workers=2, log_level="warning")
    proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config", str(config)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return config, proc


def srw_run(root: Path, docs: list[str], qs: list[str]) -> str:
    from storage.client import Session
    config, proc = srw_cluster(root)
    try:
        probe = Session(config)
        wait_for(lambda: _answers(probe), 60, "srw node")
        local = threading.local()

        def session():
            if not hasattr(local, "s"):
                local.s = Session(config)
            return local.s

        def write(i):
            results = session().write(f"doc{i}", docs[i].encode(), index=True)
            if not all(r.ok for r in results):
                raise SystemExit(f"bench: indexed write failed: {results}")
        index_s, _ = timed_in_flight(write, list(range(len(docs))))
        total, lat = timed_in_flight(lambda q: session().search(q, 10), qs)
        return row("srw (1 node, 2 workers)", len(docs), index_s, total, lat)
    finally:
        stop(proc)


def _answers(session) -> bool:
    status = session.status()
    return all("error" not in n and n["workers"] >= 2 for n in status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--engines", action="store_true", help="also tantivy, directly")
    parser.add_argument("--no-srw", action="store_true", help="only the engines, directly")
    args = parser.parse_args()
    start = time.perf_counter()
    docs = documents(args.docs)
    qs = queries(docs, args.queries)
    words = sum(len(d.split()) for d in docs)
    print(f"{len(docs):,} documents, {words:,} words ({words / len(docs):.0f} a document), "
          f"{len(qs):,} queries; generated in {time.perf_counter() - start:.1f} s")
    print(f"{'path':24} {'docs/s':>10} {'p50 us':>9} {'p99 us':>9} {'queries/s':>10}   "
          f"(search: {IN_FLIGHT} in flight)")
    with tempfile.TemporaryDirectory(prefix="srw-search-bench-") as tmp:
        root = Path(tmp)
        if not args.no_srw:
            (root / "srw").mkdir()
            print(srw_run(root / "srw", docs, qs), flush=True)
        print(sqlite_direct(root, docs, qs), flush=True)
        if args.engines:
            print(tantivy_direct(root, docs, qs), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
