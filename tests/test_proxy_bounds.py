"""What a hostile HTTP client can make the proxy do, bounded.

Real `srw serve` processes on loopback, raw sockets for the misbehaving
clients.  Time bounds are generous upper limits ("closed within the timeout
plus slack"), and lower limits that show a timer closed the connection, never
a speed goal.  Every loop is bounded in count and in time.
"""
from __future__ import annotations

import email.parser
import socket
import time

import pytest

from conftest import Cluster, proxy_request, serving_with_proxy, wait_until

BODY_TIMEOUT = 2.0
SLACK = 5.0           # on top of a timeout, for a loaded 2-CPU machine


def post(cluster: Cluster, query: str, body: bytes = b"data"):
    return proxy_request(cluster, "POST", f"/elliptics?{query}", body)


def connect(cluster: Cluster) -> socket.socket:
    host, port = cluster.proxy["listen"].rsplit(":", 1)
    return socket.create_connection((host, int(port)), timeout=10)


def read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    """Everything the proxy sends until it closes the connection: (data, closed),
    closed False when it was still open after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    chunks = []
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except socket.timeout:
            break
        except ConnectionResetError:
            return b"".join(chunks), True
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
    return b"".join(chunks), False


def log_lines(cluster: Cluster) -> list[str]:
    return cluster.log().splitlines()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """Two nodes in two groups behind the proxy, with a short body timeout."""
    cluster = Cluster(tmp_path_factory.mktemp("bounds"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1}, {}, {}, None, {"body_timeout": BODY_TIMEOUT})
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


# Body timeout --------------------------------------------------------------------

SLOW_HEAD = (b"POST /elliptics?exec&name=echo.py&groups=1 HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: 1000\r\n\r\n")


def test_body_that_stops_is_408_after_body_timeout(web):
    with connect(web) as slow:
        start = time.monotonic()
        slow.sendall(SLOW_HEAD + b"x" * 10)
        assert post(web, "exec&name=echo.py&groups=2", b"meanwhile")[::2] == (200, b"meanwhile")
        data, closed = read_until_closed(slow, BODY_TIMEOUT + SLACK)
        elapsed = time.monotonic() - start
    assert closed
    assert data.startswith(b"HTTP/1.1 408 ") and b"proxy.body_timeout" in data
    assert elapsed >= 0.8 * BODY_TIMEOUT
    wait_until(lambda: [l for l in log_lines(web) if '"POST /elliptics?exec&name=echo.py&groups=1 '
                        'HTTP/1.1" 408' in l], 5, "the 408's access log line")


def test_body_trickling_in_is_408_after_body_timeout(web):
    with connect(web) as slow:
        start = time.monotonic()
        slow.sendall(SLOW_HEAD)
        reply, closed = b"", False
        for _ in range(int((BODY_TIMEOUT + SLACK) / 0.1)):  # a byte every 0.1 s at most
            try:
                slow.sendall(b"x")
            except OSError:
                closed = True
                break
            data, closed = read_until_closed(slow, 0.1)
            reply += data
            if closed:
                break
        elapsed = time.monotonic() - start
    assert closed, "the proxy kept reading a body that never completes"
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
    assert 0.8 * BODY_TIMEOUT <= elapsed <= BODY_TIMEOUT + SLACK


def test_complete_slow_body_within_the_timeout_is_served(web):
    body = b"y" * 50
    with connect(web) as sock:
        sock.sendall(SLOW_HEAD.replace(b"1000", b"50"))
        for i in range(0, 50, 10):  # five pieces over ~0.5 s, well within body_timeout
            sock.sendall(body[i:i + 10])
            time.sleep(0.1)
        data, _ = read_until_closed(sock, 0.5 + SLACK)
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(body)
