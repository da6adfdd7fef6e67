"""Full-text search bench: indexing and search through srw, next to the engine used directly.

    .venv/bin/python bench/search_bench.py [--docs N] [--queries Q] [--rounds R]
                                           [--tree DIR] [--baseline DIR] [--keep DIR]
                                           [--engines]

Generates N documents (default 100,000; seeded, so every run sees the same
ones): words drawn by a Zipf law (s = 1.07, like English text) over a
vocabulary of 30,000 made-up words, lengths log-normal around 120 words.
Then, in one run, side by side (the comparisons of issue 26):

- **indexing**: srw, a one-node cluster (``srw serve``, 2 workers, in a
  temporary folder; ``--tree DIR`` runs that tree's srw), indexes every
  document through its real indexed-write path (``Session.write(...,
  index=True)``, 64 writes in flight from 64 threads: bulk loading), timed
  over the first ``--direct-docs`` documents and over all; **direct**, this
  process puts those first ``--direct-docs`` documents into a FullText of its
  own with one insert and one commit per document (``synchronous=FULL``, the
  node's durability).
- **search**, ``--rounds`` rounds, srw and direct interleaved in each: srw
  runs the queries (``Session.search``, typed text) with a timeout no query
  reaches, 16 in flight and then one at a time; **direct**, this process
  runs, on the node's own index file, the FTS5 query srw made of each
  (storage/query.py), 16 threads with a connection each and then one: the 10
  best keys by BM25, ties by key, and the count of matches -- what srw
  answers, but for the snippets (srw's extra work: it makes them, direct
  does not).  Then once with the node's default deadline (1 s), counting
  the partial answers.  The load average is printed with every round: under
  load the figures mean little; compare rounds of one run only.  Each
  ``--baseline DIR`` tree's srw is searched in turn with ``--tree``'s in
  every round, on the same data (srw restarted per tree), each next to its
  own direct run; at the end, issue 26's targets per tree, with every
  round's figure and whether every round meets them.
- ``--keep DIR`` keeps the node's data there: a later run with the same
  ``--docs`` searches it without indexing again (and without the indexing
  row).
- **storage reads during a broad search**: the p50 of a ``Session.read``
  while the node is idle, and while a search for the most common word runs
  back to back (the search runs in the node's search thread, not its loop).
- with ``--engines``, also **tantivy direct** (``pip install tantivy``),
  the alternative measured when the engine was chosen.

Queries: one word of middle frequency, two words, a two-word phrase taken
from a document, and a prefix.  Not run by the test suite.
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import shutil
import signal
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
WRITES_IN_FLIGHT = 64
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
    """A line of the --engines table."""
    return (f"{name:24} {docs / index_s:>10,.0f} {pct(lat, 0.5) * 1e6:>9,.0f} "
            f"{pct(lat, 0.99) * 1e6:>9,.0f} {len(lat) / q_total:>10,.0f}")


# Engines used directly -------------------------------------------------------

# What srw answers but the snippets: the 10 best keys (ties by key) and the count.
_DIRECT = """SELECT meta.key, bm25(docs) AS rank FROM docs JOIN meta ON meta.doc = docs.rowid
WHERE docs MATCH ? ORDER BY rank, meta.key LIMIT 10"""
_DIRECT_COUNT = "SELECT count(*) FROM docs WHERE docs MATCH ?"


def index_direct(root: Path, docs: list[str]) -> float:
    """docs/s of one insert and one commit per document, synced as a node syncs."""
    from storage.fulltext import FullText
    index = FullText(root / "direct.sqlite", sync=True)
    start = time.perf_counter()
    for i, text in enumerate(docs):
        index.apply([(b"%064d" % i, f"doc{i}", 1, text, None)], [])
    took = time.perf_counter() - start
    index.close()
    return len(docs) / took


def search_direct(index_file: Path, qs: list[str], threads: int = IN_FLIGHT
                  ) -> tuple[float, list[float]]:
    """The FTS5 query srw makes of each typed query, on srw's own index file."""
    import sqlite3

    from storage.analyzer import Analyzer
    from storage.query import parse
    analyzer = Analyzer(("english", "russian"))
    fts = [parse(q, analyzer).fts for q in qs]
    local = threading.local()

    def search(q):
        if not hasattr(local, "db"):
            local.db = sqlite3.connect(index_file, check_same_thread=False)
        local.db.execute(_DIRECT, (q,)).fetchall()
        local.db.execute(_DIRECT_COUNT, (q,)).fetchone()
    return timed_in_flight(search, fts, threads)


def tantivy_direct(root: Path, docs: list[str], qs: list[str]) -> str:
    import tantivy
    schema = (tantivy.SchemaBuilder().add_text_field("key", stored=True)
              .add_text_field("body", stored=True).build())
    shutil.rmtree(root / "tantivy", ignore_errors=True)
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

def srw_cluster(root: Path, tree: Path):
    """`srw serve` of `tree` on root's data (kept between runs: a new config, new ports)."""
    shutil.rmtree(root / "history", ignore_errors=True)
    config = write_config(root, workers=2, log_level="warning")
    proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config", str(config)],
                            cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(tree)},
                            start_new_session=True)
    return config, proc


@contextlib.contextmanager
def srw_session(root: Path, tree: Path):
    """A running srw of `tree` on root's data and a Session per calling thread."""
    from storage.client import Session
    config, proc = srw_cluster(root, tree)
    try:
        probe = Session(config)
        wait_for(lambda: _answers(probe), 180, "srw node")   # slow under load
        local = threading.local()

        def session():
            if not hasattr(local, "s"):
                local.s = Session(config)
            return local.s
        yield probe, session
    finally:
        stop(proc)


def srw_index(root: Path, docs: list[str], args) -> tuple[float, float]:
    """(docs/s over the first --direct-docs, over all): bulk indexing through srw."""
    with srw_session(root, args.tree) as (_, session):
        def write(i):
            results = session().write(f"doc{i}", docs[i].encode(), index=True)
            if not all(r.ok for r in results):
                raise SystemExit(f"bench: indexed write failed: {results}")
        sample = min(len(docs), args.direct_docs)
        first_s, _ = timed_in_flight(write, list(range(sample)), WRITES_IN_FLIGHT)
        rest_s, _ = timed_in_flight(write, list(range(sample, len(docs))), WRITES_IN_FLIGHT)
    print(f"indexed {len(docs):,} documents through srw in {first_s + rest_s:.0f} s "
          f"({len(docs) / (first_s + rest_s):,.0f}/s); load {_load()}", flush=True)
    return sample / first_s, len(docs) / (first_s + rest_s)


def srw_round(root: Path, tree: Path, docs: list[str], qs: list[str], args) -> dict:
    """One round on `tree`'s srw, direct interleaved: 16 in flight, one at a time
    (a deadline no query reaches: the same work as direct), then the default
    deadline (partial answers counted) and reads during a broad search."""
    index_file = root / "var" / "n1" / "index.sqlite"
    with srw_session(root, tree) as (probe, session):
        one = {"load": _load(),
               "srw": timed_in_flight(lambda q: session().search(q, 10, timeout=60.0), qs),
               "direct": search_direct(index_file, qs)}
        serial = qs[:args.serial]
        one["srw1"] = timed_in_flight(lambda q: session().search(q, 10, timeout=60.0),
                                      serial, 1)
        one["direct1"] = search_direct(index_file, serial, 1)
        partial = []
        one["default"] = timed_in_flight(
            lambda q: partial.append(session().search(q, 10).partial), qs)
        one["partial"] = sum(partial)
        one["reads"] = reads_during_broad_search(probe, docs)
        one["load_end"] = _load()
    return one


def print_round(number: int, name: str, one: dict) -> None:
    for label, srw, direct in (("16 in flight", "srw", "direct"),
                               ("one at a time", "srw1", "direct1")):
        (total, lat), (d_total, d_lat) = one[srw], one[direct]
        print(f"round {number} {name}, {label}: srw p50 {pct(lat, .5) * 1e3:.1f} ms p99 "
              f"{pct(lat, .99) * 1e3:.1f} ms {len(lat) / total:,.0f}/s; direct p50 "
              f"{pct(d_lat, .5) * 1e3:.1f} ms p99 {pct(d_lat, .99) * 1e3:.1f} ms "
              f"{len(d_lat) / d_total:,.0f}/s: p50 {_p50_ratio(one, srw, direct):.2f}x, "
              f"throughput {_rate_ratio(one, srw, direct):.2f}x", flush=True)
    total, lat = one["default"]
    idle, busy, searches = one["reads"]
    print(f"round {number} {name}, default 1 s deadline, 16 in flight: p50 "
          f"{pct(lat, .5) * 1e3:.1f} ms p99 {pct(lat, .99) * 1e3:.1f} ms "
          f"{len(lat) / total:,.0f}/s, {one['partial']} of {len(lat)} partial; storage read "
          f"p50 idle {idle * 1e6:,.0f} us, during a broad search {busy * 1e6:,.0f} us "
          f"({busy / idle:.2f}x; {len(searches)} broad searches, p50 "
          f"{pct(searches, .5) * 1e3:.0f} ms) (load {one['load']} .. {one['load_end']})",
          flush=True)


def _p50_ratio(one: dict, srw: str, direct: str) -> float:
    return pct(one[srw][1], .5) / pct(one[direct][1], .5)


def _rate_ratio(one: dict, srw: str, direct: str) -> float:
    (total, lat), (d_total, d_lat) = one[srw], one[direct]
    return (len(lat) / total) / (len(d_lat) / d_total)


# Issue 26's targets: (what, the figure of a round, the bound, "max" or "min").
TARGETS = (
    ("search p50, 16 in flight / direct", lambda o: _p50_ratio(o, "srw", "direct"), 1.5, "max"),
    ("throughput, 16 in flight / direct", lambda o: _rate_ratio(o, "srw", "direct"), 0.7, "min"),
    ("search p50, one at a time / direct", lambda o: _p50_ratio(o, "srw1", "direct1"), 1.5,
     "max"),
    ("throughput, one at a time / direct", lambda o: _rate_ratio(o, "srw1", "direct1"), 0.7,
     "min"),
    ("read p50 during a broad search / idle", lambda o: o["reads"][1] / o["reads"][0], 2.0,
     "max"),
)


def print_targets(name: str, rounds: list[dict], indexing: float | None) -> None:
    """Each target with every round's figure and whether every round meets it."""
    print(f"targets, {name}:")
    rows = [(what, [figure(o) for o in rounds], bound, side)
            for what, figure, bound, side in TARGETS]
    if indexing is not None:
        rows.append(("indexing throughput / direct", [indexing], 0.5, "min"))
    for what, figures, bound, side in rows:
        met = all(f <= bound if side == "max" else f >= bound for f in figures)
        print(f"  {what:40} {', '.join(f'{f:.2f}' for f in figures):18} "
              f"{'<=' if side == 'max' else '>='} {bound}: {'met' if met else 'NOT met'}")
    print(f"  {'partial answers at the default deadline':40} "
          f"{', '.join(str(o['partial']) for o in rounds)} (of {len(rounds[0]['default'][1])})",
          flush=True)


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def reads_during_broad_search(session, docs: list[str], count: int = 2000):
    """(idle read p50, read p50 while the most common word is searched back to back,
    searches that ran meanwhile)."""
    keys = [f"doc{i}" for i in range(0, len(docs), max(1, len(docs) // count))][:count]
    idle = [_timed(session.read, k) for k in keys]
    broad = min(vocabulary(random.Random(SEED)), key=len)   # the most common word
    stop_flag, searches = threading.Event(), []

    def search():
        from storage.client import Session
        with Session(session.config) as s:
            while not stop_flag.is_set():
                searches.append(_timed(lambda: s.search(broad, 10, timeout=30.0)))
    thread = threading.Thread(target=search)
    thread.start()
    time.sleep(0.2)
    busy = [_timed(session.read, k) for k in keys]
    stop_flag.set()
    thread.join()
    return pct(idle, 0.5), pct(busy, 0.5), searches


def _timed(call, *args) -> float:
    start = time.perf_counter()
    call(*args)
    return time.perf_counter() - start


def _answers(session) -> bool:
    status = session.status()
    return all("error" not in n and n["workers"] >= 2 for n in status)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="search rounds, srw and direct "
                        "interleaved in each (and every tree in turn)")
    parser.add_argument("--serial", type=int, default=400,
                        help="queries of each round run one at a time too")
    parser.add_argument("--direct-docs", type=int, default=20_000,
                        help="documents indexing is compared over (the first ones)")
    parser.add_argument("--tree", type=Path, default=REPO,
                        help="the srw tree `srw serve` runs (default: this one)")
    parser.add_argument("--baseline", type=Path, action="append", default=[],
                        help="another srw tree, searched in turn with --tree in every round "
                        "(on the same data); may be repeated")
    parser.add_argument("--keep", type=Path, help="a folder for the node's data, kept: a "
                        "later run with the same --docs searches it without indexing again")
    parser.add_argument("--engines", action="store_true", help="also tantivy, directly")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))   # stop srw on the way out
    start = time.perf_counter()
    docs = documents(args.docs)
    qs = queries(docs, args.queries)
    words = sum(len(d.split()) for d in docs)
    print(f"{len(docs):,} documents, {words:,} words ({words / len(docs):.0f} a document), "
          f"{len(qs):,} queries; generated in {time.perf_counter() - start:.1f} s", flush=True)
    with contextlib.ExitStack() as stack:
        root = args.keep or Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="srw-search-bench-")))
        run(root, docs, qs, args)
    return 0


def run(root: Path, docs: list[str], qs: list[str], args) -> None:
    data, built = root / "srw", root / "srw" / "built"
    indexing = None
    if built.exists() and built.read_text() == f"{len(docs)} {SEED}":
        print(f"searching the {len(docs):,} documents indexed in {data} by an earlier run")
    else:
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True)
        (root / "direct.sqlite").unlink(missing_ok=True)
        sample = min(len(docs), args.direct_docs)
        direct_index = index_direct(root, docs[:sample])
        print(f"direct indexing, commit per document: {direct_index:,.0f} docs/s over "
              f"{sample:,}; load {_load()}", flush=True)
        first, _ = srw_index(data, docs, args)
        indexing = first / direct_index
        print(f"indexing docs/s over the first {sample:,}: srw {first:,.0f}, direct "
              f"{direct_index:,.0f}: {indexing:.2f}x", flush=True)
        built.write_text(f"{len(docs)} {SEED}")
    trees = [(f"tree {t}", t) for t in [args.tree, *args.baseline]]
    rounds: dict[str, list[dict]] = {name: [] for name, _ in trees}
    for number in range(1, args.rounds + 1):
        for name, tree in trees:
            one = srw_round(data, tree, docs, qs, args)
            print_round(number, name, one)
            rounds[name].append(one)
    for name, _ in trees:
        print_targets(name, rounds[name], indexing if name == trees[0][0] else None)
    if args.engines:
        print(tantivy_direct(root, docs, qs), flush=True)


if __name__ == "__main__":
    sys.exit(main())
