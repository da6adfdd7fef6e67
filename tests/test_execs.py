"""The exec routine Session.exec and the proxy's Cluster.exec share (storage/execs.py):
pure placement and result logic, checked without sockets."""
from __future__ import annotations

from broker.client import BrokerUnavailable, Result
from core import protocol as p
from core.config import NodeSettings
from storage import execs
from storage.router import Route

N1 = NodeSettings(name="n1", group=1, broker="tcp://127.0.0.1:1", data_dir="")
N2 = NodeSettings(name="n2", group=1, broker="tcp://127.0.0.1:2", data_dir="",
                  redis="127.0.0.1:7000")


class Router:
    """Counts stale(): the one thing the routine asks of a router."""

    def __init__(self):
        self.stales = 0

    def stale(self) -> None:
        self.stales += 1


def test_a_route_with_no_node_is_answered_unavailable_and_the_map_read_again():
    router = Router()
    route = Route([], "ab", "master 127.0.0.1:7001 of slot 5 is failing", "127.0.0.1:7001")
    assert execs.nowhere(router, route) == [
        Result("", 1, p.UNAVAILABLE, b"", route.error, "127.0.0.1:7001")]
    assert router.stales == 1
    assert execs.nowhere(router, Route([N1], "ab")) is None and router.stales == 1


def test_each_node_answers_once_named_for_the_redis_beside_it():
    down = execs.answer(N1, BrokerUnavailable("no reply"))
    assert (down.node, down.group, down.status, down.error) == ("n1", 1, p.UNAVAILABLE,
                                                               "no reply")
    ok = execs.answer(N2, Result("n2", 1, p.OK, b"x"))
    assert (ok.status, ok.data, ok.redis) == (p.OK, b"x", "127.0.0.1:7000")
    assert execs.answer(N1, Result("n1", 1, p.OK)).redis == ""


def test_only_a_placed_exec_that_met_a_failover_or_a_move_reads_the_map_again():
    """Both callers decide by the route's id (they had drifted: key vs hex_id)."""
    router = Router()
    ok, down = Result("n1", 1, p.OK), Result("n1", 1, p.UNAVAILABLE)
    moved = Result("n1", 1, p.OK, moved=True)
    for hex_id, results, stales in ((None, [down], 0), ("ab", [ok], 0), ("ab", [ok, down], 1),
                                    ("ab", [moved], 2), (None, [moved], 2)):
        assert execs.settle(router, Route([N1], hex_id), results) is results
        assert router.stales == stales, (hex_id, results)
