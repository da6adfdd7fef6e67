"""What a hostile HTTP client can make the proxy do, bounded (proxy/bounds.py).

Real `srw serve` processes on loopback, raw sockets for the misbehaving
clients.  Time bounds are generous upper limits ("closed within the timeout
plus slack"), and lower limits that show a timer closed the connection, never
a speed goal.  Every loop is bounded in count and in time.
"""
from __future__ import annotations

import contextlib
import email.parser
import http.client
import resource
import socket
import time

import psutil
import pytest

from conftest import Cluster, proxy_request, serving_with_proxy, wait_until

HEADER_TIMEOUT = 1.0
BODY_TIMEOUT = 2.0
SLACK = 5.0           # on top of a timeout, for a loaded 2-CPU machine
CAP = 20              # max_connections of the clusters that test the cap
LONG = 60.0           # a timeout that never fires during a test


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


def closed_by_proxy(sock: socket.socket) -> bool:
    """True once the proxy has closed `sock` (EOF or reset waiting); never blocks."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True
    finally:
        sock.settimeout(10)


def proxy_process(cluster: Cluster) -> psutil.Process:
    procs = cluster.processes("srw: proxy")
    assert len(procs) == 1, procs
    return procs[0]


def log_lines(cluster: Cluster) -> list[str]:
    return cluster.log().splitlines()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """Two nodes in two groups behind the proxy, with short header and body timeouts."""
    cluster = Cluster(tmp_path_factory.mktemp("bounds"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1}, {}, {}, None,
                      {"header_timeout": HEADER_TIMEOUT, "body_timeout": BODY_TIMEOUT})
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


# Header timeout ------------------------------------------------------------------

def test_half_a_request_line_is_closed_after_header_timeout(web):
    with connect(web) as slow:
        start = time.monotonic()
        slow.sendall(b"POST /elliptics?exec&na")
        # meanwhile, another connection is served
        assert post(web, "exec&name=echo.py&groups=1", b"meanwhile")[::2] == (200, b"meanwhile")
        data, closed = read_until_closed(slow, HEADER_TIMEOUT + SLACK)
        elapsed = time.monotonic() - start
    assert closed and data == b""
    assert elapsed >= 0.8 * HEADER_TIMEOUT  # the timer closed it, not a parse error


def test_headers_sent_a_byte_at_a_time_do_not_extend_the_deadline(web):
    request = (b"GET /ping HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"s" * 200 + b"\r\n\r\n")
    with connect(web) as slow:
        start = time.monotonic()
        closed = False
        for byte in request[:-1]:  # bounded: 230 bytes, 0.05 s each at most
            try:
                slow.sendall(bytes([byte]))
            except OSError:  # the proxy closed it while we were sending
                closed = True
                break
            data, closed = read_until_closed(slow, 0.05)
            assert data == b""
            if closed or time.monotonic() - start > HEADER_TIMEOUT + SLACK:
                break
        elapsed = time.monotonic() - start
    assert closed, "the proxy kept a connection whose headers came a byte at a time"
    assert 0.8 * HEADER_TIMEOUT <= elapsed <= HEADER_TIMEOUT + SLACK


def test_idle_keep_alive_connection_is_closed_after_header_timeout(web):
    host, port = web.proxy["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        for i in range(2):  # keep-alive still works within the timeout
            conn.request("POST", "/elliptics?exec&name=echo.py&groups=1", body=b"%d" % i)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"%d" % i)
        start = time.monotonic()
        conn.sock.sendall(b"GET /pi")  # half a request line after a response
        data, closed = read_until_closed(conn.sock, HEADER_TIMEOUT + SLACK)
        elapsed = time.monotonic() - start
    finally:
        conn.close()
    assert closed and data == b""
    assert elapsed >= 0.8 * HEADER_TIMEOUT


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


def test_malformed_requests_are_400_and_logged_once_a_second(web):
    before = web.log_file.stat().st_size
    start = time.monotonic()
    garbage = (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
               b"POST /elliptics?exec&name=echo.py HTTP/1.1\r\nContent-Length: x\r\n\r\n")
    for i in range(150):
        with connect(web) as sock:
            sock.sendall(garbage[i % 3])
            data, closed = read_until_closed(sock, 10)
            assert closed and data.split(b" ", 2)[1] == b"400", data[:100]
    elapsed = time.monotonic() - start
    assert post(web, "exec&name=echo.py&groups=1", b"fine")[::2] == (200, b"fine")
    time.sleep(1.5)  # the last summary line
    grown = web.log().encode()[before:].decode().splitlines()
    reported = [l for l in grown if "malformed request answered 400" in l]
    assert 1 <= len(reported) <= 2 + 2 * (elapsed + 1.5), reported
    assert not [l for l in grown if "Traceback" in l or " ERROR " in l]
    # the rest is one access line per request
    assert len([l for l in grown if '" 400 ' in l]) == 150


# Connection cap ------------------------------------------------------------------

@pytest.fixture
def capped(make_cluster):
    """A proxy with room for CAP connections and a header timeout that never fires here."""
    cluster = make_cluster(proxy={"max_connections": CAP, "header_timeout": LONG,
                                  "body_timeout": BODY_TIMEOUT})
    with serving_with_proxy(cluster):
        yield cluster


def test_over_the_cap_a_new_connection_closes_the_longest_idle(capped):
    proxy = proxy_process(capped)
    fds_before = proxy.num_fds()
    held = []
    try:
        for _ in range(2 * CAP):
            held.append(connect(capped))
        # the oldest CAP made room for the newest CAP, in order
        wait_until(lambda: sum(closed_by_proxy(s) for s in held) >= CAP, 10,
                   f"{CAP} idle connections closed")
        assert [closed_by_proxy(s) for s in held] == [True] * CAP + [False] * CAP
        # a client is served at once (no waiting for timeouts): it takes the next slot
        assert post(capped, "exec&name=echo.py", b"served")[::2] == (200, b"served")
        assert closed_by_proxy(held[CAP]) and not closed_by_proxy(held[CAP + 1])
        fds = proxy.num_fds()
    finally:
        for sock in held:
            sock.close()
    assert proxy.is_running() and proxy_process(capped).pid == proxy.pid
    assert fds - fds_before <= CAP + 2  # the process holds CAP connections, not 2 x CAP
    lines = [l for l in log_lines(capped) if "max_connections (20) reached" in l]
    assert lines and "closed the longest idle connection" in lines[0]


def test_connection_storm_at_the_cap_keeps_the_log_small(capped):
    proxy = proxy_process(capped)
    before = capped.log_file.stat().st_size
    start = time.monotonic()
    held: list[socket.socket] = []
    made = 0
    try:
        while made < 3000 and time.monotonic() - start < 3.0:  # ~ thousands of evictions
            held.append(connect(capped))
            made += 1
            if len(held) > 2 * CAP:
                held.pop(0).close()
        elapsed = time.monotonic() - start
        # the storm is over; a client is served at once, the process is the same
        assert post(capped, "exec&name=echo.py", b"after")[::2] == (200, b"after")
    finally:
        for sock in held:
            sock.close()
    assert made > 10 * CAP
    assert proxy_process(capped).pid == proxy.pid
    time.sleep(1.5)  # let the last summary line out (at most 1 s late, buffered 0.2 s)
    grown = capped.log().encode()[before:].decode().splitlines()
    # one line a second at most (plus a summary and the access line), not one per connection
    assert 1 <= len(grown) <= 4 + 2 * (elapsed + 1.5), grown
    assert any("more time(s) in the last 1 s" in l for l in grown), grown


def test_over_the_cap_with_every_connection_busy_is_503(capped):
    busy = []
    try:
        for _ in range(CAP):  # each stops after its headers: a request in progress
            sock = connect(capped)
            sock.sendall(b"POST /elliptics?exec&name=echo.py HTTP/1.1\r\nHost: x\r\n"
                         b"Expect: 100-continue\r\nContent-Length: 10\r\n\r\n")
            busy.append(sock)
        for sock in busy:  # "100 Continue" shows the proxy is handling that request
            assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        with connect(capped) as extra:
            data, closed = read_until_closed(extra, 10)
        assert closed and data.startswith(b"HTTP/1.1 503 ") and b"max_connections" in data
        # body_timeout frees them: each busy one gets its 408, then a client is served
        for sock in busy:
            data, closed = read_until_closed(sock, BODY_TIMEOUT + SLACK)
            assert closed and data.startswith(b"HTTP/1.1 408 ")
    finally:
        for sock in busy:
            sock.close()
    assert post(capped, "exec&name=echo.py", b"again")[::2] == (200, b"again")


# Out of file descriptors -----------------------------------------------------------

def test_out_of_descriptors_idle_connections_make_room_and_the_log_stays_small(make_cluster):
    """max_connections above what the open-files limit allows: a failed accept
    closes the longest idle connection, and is logged at most once a second."""
    cluster = make_cluster(proxy={"header_timeout": LONG})
    ours = resource.getrlimit(resource.RLIMIT_NOFILE)
    started_with = min(ours[0], 1024)
    with contextlib.ExitStack() as stack:
        resource.setrlimit(resource.RLIMIT_NOFILE, (started_with, ours[1]))  # srw inherits it
        try:
            stack.enter_context(serving_with_proxy(cluster))
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, ours)
        proxy = proxy_process(cluster)
        soft, hard = proxy.rlimit(psutil.RLIMIT_NOFILE)
        assert (soft, hard) == (ours[1], ours[1])  # raised to the hard limit at start
        assert cluster.processes("srw: broker")[0].rlimit(psutil.RLIMIT_NOFILE)[0] == started_with
        held = []
        before = cluster.log_file.stat().st_size
        try:
            # room for a few connections only: the rest wait in the kernel's queue
            proxy.rlimit(psutil.RLIMIT_NOFILE, (proxy.num_fds() + 5, hard))
            start = time.monotonic()
            for _ in range(40):
                held.append(connect(cluster))  # the kernel completes them, not accept()
            wait_until(lambda: "cannot accept connections" in cluster.log(), 10,
                       "a failed accept in the log")
            # the idle ones make room: every held connection is accepted and closed in
            # turn, then a client is served, all while descriptors are short
            wait_until(lambda: sum(closed_by_proxy(s) for s in held) >= 35, 15,
                       "idle connections closed to make room")
            assert post(cluster, "exec&name=echo.py", b"short")[::2] == (200, b"short")
            elapsed = time.monotonic() - start
        finally:
            proxy.rlimit(psutil.RLIMIT_NOFILE, (soft, hard))
            for sock in held:
                sock.close()
        time.sleep(1.5)  # let the last summary line out (1 s late at most, buffered 0.2 s)
        grown = cluster.log().encode()[before:].decode().splitlines()
        failed = [l for l in grown if "cannot accept connections" in l]
        assert "Too many open files" in failed[0]
        assert any("closed the longest idle connection" in l for l in failed), failed
        assert 1 <= len(failed) <= 2 + 2 * (elapsed + 1.5), failed
        assert len(grown) <= 5 + 2 * (elapsed + 1.5), grown
        assert post(cluster, "exec&name=echo.py", b"back")[::2] == (200, b"back")
        assert proxy_process(cluster).pid == proxy.pid
