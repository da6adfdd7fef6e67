"""What a hostile HTTP client can make the proxy do, bounded.

Real `srw serve` processes on loopback, raw sockets for the misbehaving
clients.  Time bounds are generous upper limits ("closed within the timeout
plus slack"), and lower limits that show a timer closed the connection, never
a speed goal.  Every loop is bounded in count and in time.
"""
from __future__ import annotations

import email.parser

import pytest

from conftest import Cluster, proxy_request, serving_with_proxy


def post(cluster: Cluster, query: str, body: bytes = b"data"):
    return proxy_request(cluster, "POST", f"/elliptics?{query}", body)


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """Two nodes in two groups behind the proxy."""
    cluster = Cluster(tmp_path_factory.mktemp("bounds"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1}, {}, {}, None, {})
    with serving_with_proxy(cluster):
        yield cluster


# groups= -----------------------------------------------------------------------

def served(cluster: Cluster) -> dict[str, int]:
    return {n["name"]: cluster.status(n["name"])["served"] for n in cluster.nodes}


def test_a_group_named_hundreds_of_times_runs_once(web):
    before = served(web)
    status, headers, body = post(web, "exec&name=echo.py&id=0123&groups=" + ":".join(["1"] * 300),
                                 b"once")
    assert (status, body, headers["X-Srw-Node"]) == (200, b"once", "n1")  # one part, not 300
    assert served(web) == {"n1": before["n1"] + 1, "n2": before["n2"]}


def test_repeated_groups_keep_their_first_seen_order(web):
    before = served(web)
    status, headers, body = post(web, "exec&name=echo.py&groups=" + ":".join(["2", "1"] * 150),
                                 b"each")
    assert status == 200
    raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
    parts = email.parser.BytesParser().parsebytes(raw).get_payload()
    assert [(p["X-Srw-Node"], p.get_payload(decode=True)) for p in parts] == \
        [("n2", b"each"), ("n1", b"each")]
    assert served(web) == {"n1": before["n1"] + 1, "n2": before["n2"] + 1}


def test_an_overlong_groups_value_is_400(web):
    before = served(web)
    status, _, body = post(web, "exec&name=echo.py&groups=" + ":".join(["1"] * 600))
    assert status == 400
    assert b"groups= is 1199 characters long, at most 1024" in body
    assert served(web) == before
