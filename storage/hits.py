"""Search answers across nodes, for either engine: the request, the fan-out, the merge.

    Session.search --search_data--> SEARCH to every node's storage front-end at
                                    once (send_all) --> merge_hits --> Hits

lmdb: each group's nodes index their own keys; redis-cluster: each node
indexes the slots its Redis node serves and says which ("slots"), and the
merge marks the answer partial unless every slot was covered.
"""
from __future__ import annotations

import time

from core import protocol as p
from core.exits import UsageError
from broker.client import Result

from . import protocol as sp
from .errors import NodeUnavailable, StorageUnavailable
from .query import BadQuery

__all__ = ["Hits", "merge_hits", "search_data", "send_all", "submit_all", "collect_all"]


class Hits(list):
    """Session.search's answer: the hits, best first, and about them `count`
    (documents that match, in the group with the most), `partial` (a node was
    cut at the deadline or failed), `failures` (one line per failed node) and
    `unindexed` (redis-cluster: slots no node had indexed, then partial too)."""

    def __init__(self, hits: list[dict], count: int, partial: bool, failures: list[str],
                 unindexed: int = 0):
        super().__init__(hits)
        self.count, self.partial, self.failures = count, partial, failures
        self.unindexed = unindexed


def merge_hits(results: list[Result], limit: int, offset: int = 0,
               slots: int | None = None) -> Hits:
    """Every node's SEARCH reply -> hits offset to offset + limit, each key once.
    Replicas give a key several scores (BM25 depends on each node's documents);
    the best one stands for it.  Ties go by key.  With `slots` (redis-cluster:
    how many there are), the replies' "slots" ranges must cover them all, or
    the answer is partial."""
    best: dict[str, dict] = {}
    failures, counts, partial = [], {}, False
    covered: set[int] = set()
    for r in results:
        if r.status == p.BAD_REQUEST:  # the query: every node would say the same
            raise BadQuery(r.error or "bad query")
        try:
            reply = p.unpack_map(r.data) if r.ok else None
        except p.ProtocolError:
            reply = None
        if reply is None:
            failures.append(f"node {r.node} (group {r.group}): {r.status}: "
                            f"{r.error or 'a reply that is not a search reply'}")
            continue
        partial = partial or bool(reply.get("partial"))
        counts[r.group] = counts.get(r.group, 0) + int(reply.get("count", 0))
        covered |= _slots_of(reply.get("slots"), slots or 0)
        for hit in reply.get("hits", []):
            if hit["key"] not in best or hit["score"] > best[hit["key"]]["score"]:
                best[hit["key"]] = hit
    if failures and len(failures) == len(results):
        raise StorageUnavailable("no node answered the search: " + "; ".join(failures))
    ranked = sorted(best.values(), key=lambda h: (-h["score"], h["key"]))
    unindexed = slots - len(covered) if slots else 0
    return Hits(ranked[offset:offset + limit], max(counts.values(), default=0),
                partial or bool(failures) or unindexed > 0, failures, unindexed)


def _slots_of(ranges, slots: int) -> set[int]:
    """A reply's [[first, last], ...] as a set, within 0 to `slots` - 1."""
    out: set[int] = set()
    for pair in ranges if isinstance(ranges, list) else ():
        if isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, int) for x in pair):
            out.update(range(max(pair[0], 0), min(pair[1], slots - 1) + 1))
    return out


def search_data(query: str, limit: int, offset: int, timeout, lang, raw) -> bytes:
    """A SEARCH's data frame for hits offset to offset + limit; UsageError for
    bounds the nodes would refuse."""
    if not isinstance(offset, int) or offset < 0 or not isinstance(limit, int) or \
            not 0 < limit <= sp.MAX_HITS - offset:
        raise UsageError(f"limit must be 1 or more and offset 0 or more, at most "
                         f"{sp.MAX_HITS} together, not {limit!r} and {offset!r}")
    if timeout is not None and not 0 < timeout <= sp.MAX_SEARCH_TIMEOUT:
        raise UsageError(f"timeout must be above 0 and at most {sp.MAX_SEARCH_TIMEOUT:.0f} "
                         f"seconds, not {timeout!r}")
    return sp.search_data(sp.Search(query, offset + limit, lang, raw, timeout))


def send_all(targets, cmd: bytes, raw_id: bytes, data: bytes, wait: float) -> list[Result]:
    """`cmd` to each (node, its StorageClient) at once, then the replies collected:
    the nodes work in parallel, so the whole call takes the slowest node's time.
    A node that does not answer by `wait` gives a Result ``unavailable``."""
    sent = submit_all(targets, cmd, raw_id, data, wait)
    return collect_all(sent, time.monotonic() + wait)


def submit_all(targets, cmd: bytes, raw_id: bytes, data: bytes, wait: float) -> list:
    """`cmd` sent to each (node, its StorageClient), no reply waited for: what
    collect_all takes."""
    sent = []
    for node, client in targets:
        try:
            sent.append((node, client, *client.submit_data(cmd, raw_id, data, wait)))
        except NodeUnavailable as exc:
            sent.append((node, exc))
    return sent


def collect_all(sent: list, deadline: float) -> list[Result]:
    """The replies to submit_all's requests, in order; ``unavailable`` for a node
    not reached or not answering by `deadline` (time.monotonic)."""
    results = []
    for node, *call in sent:
        try:
            if len(call) == 1:
                raise call[0]
            client, rid, _ = call
            results.append(client.result(rid, max(0.0, deadline - time.monotonic())))
        except NodeUnavailable as exc:
            results.append(Result(node.name, node.group, p.UNAVAILABLE, b"", str(exc)))
    return results
