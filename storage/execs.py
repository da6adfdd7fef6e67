"""One exec over the cluster: the placement and result logic that the blocking
``Session.exec`` (storage/client.py) and the proxy's async ``Cluster.exec``
(proxy/cluster.py) share; each only sends and waits in its own way.

    route = router.route(id, key, groups)         placement (storage/router.py)
    nowhere(router, route)  -> the answer when no node could run it, else None
    answer(node, outcome)   -> each node's Result (its broker's, or unavailable)
    settle(router, route, results) -> the results; a placed exec that met a
                                node down or a moved slot makes the router
                                read its map again (lmdb: nothing to read)
"""
from __future__ import annotations

import dataclasses

from core import protocol as p
from broker.client import BrokerUnavailable, Result

__all__ = ["nowhere", "answer", "settle"]


def nowhere(router, route) -> list[Result] | None:
    """One ``unavailable`` Result when the route has no node (redis-cluster: no
    srw node beside the key's master now, which the router should look at
    again); None when the exec can be sent."""
    if route.nodes:
        return None
    router.stale()
    return [Result("", 1, p.UNAVAILABLE, b"", route.error, route.redis)]


def answer(node, outcome: Result | BrokerUnavailable) -> Result:
    """`node`'s Result from what its broker client gave (a node that did not
    answer is ``unavailable``), naming the Redis node beside it, if any."""
    if isinstance(outcome, BrokerUnavailable):
        outcome = Result(node.name, node.group, p.UNAVAILABLE, b"", str(outcome))
    return dataclasses.replace(outcome, redis=node.redis) if node.redis else outcome


def settle(router, route, results: list[Result]) -> list[Result]:
    """`results`, in route order; an exec placed by key or id that met a node down
    or whose script's Redis calls met MOVED marks the map stale (a failover or
    a moved slot: the router reads the map itself, never from a reply)."""
    if route.hex_id is not None and any(r.status == p.UNAVAILABLE or r.moved for r in results):
        router.stale()
    return results
