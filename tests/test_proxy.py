"""HTTP proxy end to end: `srw serve` (or `srw proxy` alone) on loopback, real HTTP clients.

Most tests share one node started once for this module; the multi-node, busy
and node-down cases have clusters of their own.
"""
from __future__ import annotations

import email.parser
import http.client
import json
import signal
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import Cluster, proxy_url, wait_proxy, wait_until, serving_with_proxy
from conftest import proxy_request as request

DATA = b"this is some data in POST request"
ORIGINAL_REPLY = b"its nothing I can do for you without cookies: this is some data in POST request"
MAX_BODY = 65536


def post(cluster: Cluster, query: str, body: bytes = DATA, headers: dict | None = None):
    return request(cluster, "POST", f"/elliptics?{query}", body, headers)


def parts(headers, body: bytes) -> list:
    """The parts of a multipart/mixed reply, as email.message.Message objects."""
    raw = f"Content-Type: {headers['Content-Type']}\r\n\r\n".encode() + body
    message = email.parser.BytesParser().parsebytes(raw)
    assert message.is_multipart()
    return message.get_payload()


@pytest.fixture(scope="module")
def web(tmp_path_factory):
    """One node behind `srw serve`, with two cookies configured and a short timeout."""
    cluster = Cluster(tmp_path_factory.mktemp("proxy"), [{"name": "n1"}], {"workers": 2},
                      {"request_timeout": 1.5},
                      {"raise.py": "raise ValueError('boom from the script')\n",
                       "sleep.py": "import time\ntime.sleep(30)\n"},
                      None, {"cookies": ["session_id", "user"], "max_body": MAX_BODY})
    with serving_with_proxy(cluster):
        yield cluster


# The 2011 example ----------------------------------------------------------------

def test_wget_runs_the_2011_example_byte_for_byte(web):
    url = proxy_url(web, "/elliptics?exec&name=test_script.py&id=0123456789")
    out = subprocess.run(["wget", "-q", "-O-", "-S", f"--post-data={DATA.decode()}", url],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ORIGINAL_REPLY
    assert len(ORIGINAL_REPLY) == 79
    headers = out.stderr.decode()
    assert "HTTP/1.1 200 OK" in headers
    assert "Content-Length: 79" in headers


def test_keep_alive_serves_several_requests_on_one_connection(web):
    host, port = web.proxy["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=15)
    try:
        socks = set()
        for i in range(3):
            conn.request("POST", "/elliptics?exec&name=echo.py", body=b"round %d" % i)
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"round %d" % i)
            assert resp.headers["X-Srw-Node"] == "n1" and resp.headers["X-Srw-Status"] == "ok"
            socks.add(id(conn.sock))
        assert len(socks) == 1
    finally:
        conn.close()


def test_access_log_line_with_time_taken(web):
    assert post(web, "exec&name=echo.py&key=logged")[0] == 200
    lines = wait_until(lambda: [l for l in web.log().splitlines()
                                if '"POST /elliptics?exec&name=echo.py&key=logged HTTP/1.1" 200'
                                in l], 5, "the access log line")
    assert lines[0].split()[-1] == "us" and lines[0].split()[-2].isdigit()


# Cookies -------------------------------------------------------------------------

def test_configured_cookies_reach_the_script_in_config_order(web):
    status, _, body = post(web, "exec&name=test_script.py",
                           headers={"Cookie": "user=bob; other=x; session_id=abc"})
    assert status == 200
    assert body == b"cookie: session_id=abc; user=bob: " + DATA
    # a configured cookie missing from the request is left out
    status, _, body = post(web, "exec&name=test_script.py", headers={"Cookie": "user=bob"})
    assert body == b"cookie: user=bob: " + DATA
    # only unconfigured cookies: the script sees none
    assert post(web, "exec&name=test_script.py", headers={"Cookie": "other=1"})[2] == \
        ORIGINAL_REPLY


def test_cookie_holding_code_comes_back_as_literal_text(web, tmp_path):
    marker = tmp_path / "ran"
    # A quoted cookie value: \" is a quote and \012 a newline once parsed.
    payload = (f"x'\"\\012__return_data = 'pwned'\\012__import__('pathlib').Path("
               f"'{marker}').write_text('ran')\\012'")
    literal = (f"x'\"\n__return_data = 'pwned'\n__import__('pathlib').Path("
               f"'{marker}').write_text('ran')\n'")
    status, _, body = post(web, "exec&name=test_script.py",
                           headers={"Cookie": f'session_id="{payload}"'})
    assert status == 200
    assert body.decode() == f"cookie: session_id={literal}: {DATA.decode()}"
    assert not marker.exists()


# Names and parameters ------------------------------------------------------------

@pytest.mark.parametrize("name", ["../config.toml", "/etc/passwd", "..%2fconfig.toml",
                                  "..%2F..%2Fetc%2Fpasswd", "a%00b", "n" * 10_000, ".hidden"])
def test_name_tricks_are_refused(web, name):
    status, _, body = post(web, f"exec&name={name}")
    assert status == 400
    assert b"bad script name" in body
    assert b"[pool]" not in body and b"root:" not in body


def test_unknown_script_is_404(web):
    status, headers, body = post(web, "exec&name=no_such_script.py")
    assert status == 404
    assert headers["X-Srw-Status"] == "not_found"
    assert b"no_such_script.py" in body


def test_raising_script_is_500_with_the_exception(web):
    status, headers, body = post(web, "exec&name=raise.py&id=01")
    assert status == 500
    assert headers["Content-Type"].startswith("text/plain")
    assert b"script_error on node n1" in body
    assert b"ValueError: boom from the script" in body


@pytest.mark.parametrize("query, words", [
    ("exec", "missing name="),
    ("exec&name=", "missing name="),
    ("exec&name=echo.py&id=0123&key=k", "not both"),
    ("exec&name=echo.py&id=xyz", "bad id"),
    ("exec&name=echo.py&id=" + "0" * 129, "bad id"),
    ("exec&name=echo.py&id=%200123", "bad id"),  # one validator: the wire's, the ring's
    ("exec&name=echo.py&groups=1:two", "bad groups"),
    ("exec&name=echo.py&groups=7", "group 7"),
    ("exec&name=echo.py&name=x", "given twice"),
    ("exec&name=echo.py&code=print(1)", "unknown query parameter 'code'"),
    ("exec&upload&name=k", "not both"),
    ("name=k", "?exec"),
])
def test_bad_query_parameters_are_400(web, query, words):
    status, _, body = post(web, query)
    assert status == 400, body
    assert words in body.decode()


def test_exec_needs_post(web):
    status, headers, body = request(web, "GET", "/elliptics?exec&name=echo.py")
    assert status == 405 and b"exec needs POST" in body


def test_timed_out_script_is_504(web):
    trusted, runners = web.trusted_pids(), {r.pid for r in web.runners()}
    status, headers, body = post(web, "exec&name=sleep.py")
    assert status == 504
    assert headers["X-Srw-Status"] == "timeout"
    assert b"timeout on node n1" in body
    # the worker kills the sleeping runner (a spare sleep.py's tenant took, just
    # after the broker's answer): the node serves again with the same two workers
    wait_until(lambda: runners - {r.pid for r in web.runners()}, 15,
               "the sleeping runner gone")
    assert [post(web, "exec&name=echo.py", b"after")[2] for _ in range(4)] == [b"after"] * 4
    assert web.trusted_pids() == trusted


# The fast path (proxy/fastexec.py) -------------------------------------------------

def _plain(query: str, body: bytes) -> bytes:
    """An exec the fast path takes: HTTP/1.1, keep-alive, the body with the headers."""
    return (b"POST /elliptics?%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
            % (query.encode(), len(body), body))


def _chunked(query: str, body: bytes) -> bytes:
    """The same exec with a chunked body: always aiohttp's and app.exec_script's."""
    return (b"POST /elliptics?%s HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"%x\r\n%s\r\n0\r\n\r\n" % (query.encode(), len(body), body))


def _responses(sock: socket.socket, count: int) -> list[tuple[bytes, list[bytes], bytes]]:
    """`count` responses read off one connection: (status line, header lines
    without Date, body)."""
    reader = sock.makefile("rb")
    out = []
    for _ in range(count):
        status, headers = reader.readline().rstrip(), []
        while (line := reader.readline().rstrip()):
            headers.append(line)
        length = next(int(h.split(b":")[1]) for h in headers
                      if h.lower().startswith(b"content-length:"))
        out.append((status, [h for h in headers if not h.startswith(b"Date:")],
                    reader.read(length)))
    return out


def _exchange(cluster: Cluster, requests: list[bytes], at_once: bool = False) -> list:
    """Send `requests` on one keep-alive connection, one by one (or in one
    write: pipelined), and read their responses."""
    host, port = cluster.proxy["listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        if at_once:
            sock.sendall(b"".join(requests))
            return _responses(sock, len(requests))
        out = []
        for req in requests:
            sock.sendall(req)
            out += _responses(sock, 1)
        return out


@pytest.mark.parametrize("query", ["exec&name=test_script.py",
                                   "exec&name=test_script.py&id=0123456789",
                                   "exec&name=no_such_script.py", "exec&name=raise.py"])
def test_fast_path_answers_byte_for_byte_as_the_handler(web, query):
    # Plain requests on a keep-alive connection go the fast way, chunked ones
    # the handler's: the same status, headers (but Date) and body.
    plain = _exchange(web, [_plain(query, DATA)] * 3)
    handled = _exchange(web, [_chunked(query, DATA)] * 2)
    assert plain[0] == plain[1] == plain[2] == handled[0] == handled[1]
    expected = {"test_script": b"200", "no_such": b"404", "raise": b"500"}
    code = next(c for part, c in expected.items() if part in query)
    assert plain[0][0].startswith(b"HTTP/1.1 " + code), plain[0]


def test_pipelined_requests_are_answered_in_order_by_either_path(web):
    requests = [_plain("exec&name=echo.py", b"one"), _plain("exec&name=../x", b"two"),
                _plain("exec&name=echo.py", b"three"), _chunked("exec&name=echo.py", b"four"),
                _plain("exec&name=echo.py", b"five")]
    for at_once in (True, False):
        replies = _exchange(web, requests, at_once)
        assert [(r[0].split()[1], r[2][:5]) for r in replies] == [
            (b"200", b"one"), (b"400", b"bad s"), (b"200", b"three"), (b"200", b"four"),
            (b"200", b"five")], at_once


def test_a_request_behind_a_fast_exec_in_flight_waits_its_turn(web):
    # sleep.py times out (504) after request_timeout; echo.py, sent while it
    # runs, is answered after it, not before.
    host, port = web.proxy["listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_plain("exec&name=sleep.py", b""))
        wait_until(lambda: _busy(web) >= 1, 5, "sleep.py running")
        sock.sendall(_plain("exec&name=echo.py", b"next"))
        replies = _responses(sock, 2)
    assert [(r[0].split()[1], r[2][:4]) for r in replies] == [(b"504", b"time"),
                                                              (b"200", b"next")]


def _busy(cluster: Cluster) -> int:
    status, _, body = request(cluster, "GET", "/status?format=json")
    return json.loads(body)["nodes"][0]["busy"] if status == 200 else 0


def test_fast_path_counts_and_logs_each_exec(web):
    before = _exec_count(web)
    replies = _exchange(web, [_plain("exec&name=echo.py&key=fastlogged", b"x")] * 3)
    assert [r[0] for r in replies] == [b"HTTP/1.1 200 OK"] * 3
    assert _exec_count(web) == before + 3
    wait_until(lambda: web.log().count('"POST /elliptics?exec&name=echo.py&key=fastlogged '
                                       'HTTP/1.1" 200 1 B') == 3, 5, "three access lines")


def _exec_count(cluster: Cluster) -> int:
    status, _, body = request(cluster, "GET", "/metrics")
    assert status == 200
    line = [l for l in body.decode().splitlines() if l.startswith(
        'srw_proxy_http_requests_total{code="200",method="POST",path="/elliptics"}')]
    return int(float(line[0].split()[-1])) if line else 0


# Body size -----------------------------------------------------------------------

def _raw(cluster: Cluster, head: bytes, body: bytes = b"", timeout: float = 10.0) -> bytes:
    """Send raw bytes and read until the proxy closes the connection."""
    host, port = cluster.proxy["listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(head + body)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_body_over_max_body_is_413_without_reading_it(web):
    # Claims 100 MB, sends 1 kB: the answer must come (and the connection close)
    # without the proxy waiting for the rest.
    head = (b"POST /elliptics?exec&name=echo.py HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 100000000\r\n\r\n")
    reply = _raw(web, head, b"x" * 1024)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"proxy.max_body" in reply


def test_chunked_body_over_max_body_is_413(web):
    chunk = b"y" * 16384
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(6)) + b"0\r\n\r\n"
    head = (b"POST /elliptics?exec&name=echo.py HTTP/1.1\r\nHost: x\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")
    reply = _raw(web, head, body)
    assert reply.startswith(b"HTTP/1.1 413 ")


def test_expect_continue_is_refused_before_the_body(web):
    head = (b"POST /elliptics?exec&name=echo.py HTTP/1.1\r\nHost: x\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % (MAX_BODY + 1))
    reply = _raw(web, head)
    assert reply.startswith(b"HTTP/1.1 413 ")
    assert b"100 Continue" not in reply


def test_body_at_the_limit_is_accepted(web):
    status, _, body = post(web, "exec&name=echo.py", b"z" * MAX_BODY)
    assert status == 200 and body == b"z" * MAX_BODY


# Ping and status -----------------------------------------------------------------

def test_ping_and_status(web):
    status, _, body = request(web, "GET", "/ping")
    assert status == 200 and body.startswith(b"ok"), body
    assert b"node n1 (group 1): up: broker, pool (2 live workers), storage" in body
    status, headers, body = request(web, "GET", "/status",
                                    headers={"Accept": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    nodes = json.loads(body)["nodes"]
    assert [n["name"] for n in nodes] == ["n1"]
    assert set(nodes[0]) == {"name", "group", "version", "uptime", "workers", "busy",
                             "warm_runners", "warm_execs",
                             "queued", "served", "restarts", "latency_us", "latency_window",
                             "statuses", "restart_causes", "latency_buckets_us", "scripts",
                             "worker_rows", "start", "request_timeout"}
    assert set(nodes[0]["latency_us"]) == {"p50", "p99"}
    assert nodes[0]["workers"] == 2 and nodes[0]["served"] >= 1
    status, headers, body = request(web, "GET", "/status")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"node n1 (group 1)" in body


def test_serve_runs_the_proxy_as_a_titled_child_and_restarts_it(web):
    proxies = web.processes("srw: proxy")
    assert len(proxies) == 1
    assert proxies[0].ppid() == web.procs[0].pid
    proxies[0].send_signal(signal.SIGKILL)
    new = wait_until(lambda: [p for p in web.processes("srw: proxy") if p.pid != proxies[0].pid],
                     15, "a restarted proxy")
    assert new[0].ppid() == web.procs[0].pid
    wait_proxy(web)
    assert post(web, "exec&name=echo.py", b"again")[:3:2] == (200, b"again")


def test_loaded_proxy_switches_to_batch_scheduling_and_back(web):
    """More than a few execs in flight: every proxy thread runs SCHED_BATCH
    (core.sched); once calm, the default policy again."""
    import asyncio
    import os
    import threading

    import aiohttp
    stop, failures = threading.Event(), []
    url = proxy_url(web, "/elliptics?exec&name=test_script.py")

    def load():
        async def main():
            async with aiohttp.ClientSession() as session:
                async def one():
                    async with session.post(url, data=DATA) as resp:
                        if resp.status != 200 or await resp.read() != ORIGINAL_REPLY:
                            failures.append(resp.status)
                for _ in range(500):  # bounded: ~50 ms a round on this machine
                    if stop.is_set():
                        return
                    await asyncio.gather(*(one() for _ in range(32)))
        asyncio.run(main())

    def policies():
        return {os.sched_getscheduler(t.id) for proc in web.processes("srw: proxy")
                for t in proc.threads()}

    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: policies() == {os.SCHED_BATCH}, 20, "the loaded proxy's batch policy")
    finally:
        stop.set()
        loader.join(60)
    assert not loader.is_alive() and not failures
    wait_until(lambda: policies() == {os.SCHED_OTHER}, 10, "the default policy once calm")


# Several nodes -------------------------------------------------------------------

@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """Two nodes in two groups, one worker each, room for one queued request."""
    cluster = Cluster(tmp_path_factory.mktemp("proxy2"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1, "credits": 1}, {"queue_limit": 1, "request_timeout": 10.0},
                      {"nap.py": "import time\ntime.sleep(0.4)\n__return_data = 'rested'\n"},
                      None, {})
    with serving_with_proxy(cluster):
        yield cluster


def test_exec_without_id_answers_one_part_per_node(two):
    status, headers, body = post(two, "exec&name=test_script.py")
    assert status == 200
    assert headers["Content-Type"].startswith("multipart/mixed; boundary=")
    got = [(p["X-Srw-Node"], p["X-Srw-Group"], p["X-Srw-Status"], p.get_payload(decode=True))
           for p in parts(headers, body)]
    assert got == [("n1", "1", "ok", ORIGINAL_REPLY), ("n2", "2", "ok", ORIGINAL_REPLY)]


def test_exec_with_id_runs_on_the_owner_in_each_group(two):
    status, headers, body = post(two, "exec&name=echo.py&id=0123456789", b"both")
    assert status == 200
    assert [(p["X-Srw-Node"], p.get_payload(decode=True)) for p in parts(headers, body)] == \
        [("n1", b"both"), ("n2", b"both")]
    status, headers, body = post(two, "exec&name=echo.py&id=0123456789&groups=2", b"one")
    assert (status, body, headers["X-Srw-Node"]) == (200, b"one", "n2")


def test_part_statuses_are_per_node(two):
    status, headers, body = post(two, "exec&name=raise_nowhere.py")
    assert status == 200
    for part in parts(headers, body):
        assert part["X-Srw-Status"] == "not_found"
        assert b"raise_nowhere.py" in part.get_payload(decode=True)


def test_full_queue_is_503(two):
    def nap(_):
        return post(two, "exec&name=nap.py&groups=1", b"")

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(nap, range(6)))
    codes = [status for status, _, _ in answers]
    assert codes.count(503) >= 2, codes
    assert set(codes) <= {200, 503}
    for status, headers, body in answers:
        if status == 503:
            assert headers["X-Srw-Status"] == "busy" and b"queue full" in body
        else:
            assert body == b"rested"


# The proxy alone -----------------------------------------------------------------

def test_srw_proxy_alone_reports_a_node_that_is_down(make_cluster):
    """`srw proxy` against n1 started role by role; n2 of the config never runs."""
    cluster = make_cluster(nodes=[{"name": "n1", "group": 1}, {"name": "n2", "group": 2}])
    cluster.srw("broker", "--node", "n1")
    cluster.srw("pool", "--node", "n1")
    proxy = cluster.srw("proxy")
    wait_until(lambda: (cluster.status("n1") or {}).get("workers") == 2, 30, "n1 ready")
    wait_proxy(cluster)
    assert [p.pid for p in cluster.processes("srw: proxy")] == [proxy.pid]

    assert post(cluster, "exec&name=echo.py&groups=1", b"up")[:3:2] == (200, b"up")
    status, headers, body = post(cluster, "exec&name=echo.py&groups=2", b"down")
    assert status == 503 and headers["X-Srw-Status"] == "unavailable"
    assert b"unavailable on node n2" in body and b"is the node running" in body

    status, headers, body = post(cluster, "exec&name=echo.py", b"half")
    assert status == 200
    got = {p["X-Srw-Node"]: p["X-Srw-Status"] for p in parts(headers, body)}
    assert got == {"n1": "ok", "n2": "unavailable"}

    status, _, body = request(cluster, "GET", "/ping")
    assert status == 503 and b"node n2 (group 2): DOWN: broker" in body
    status, _, body = request(cluster, "GET", "/status")
    assert status == 200 and b"node n2 (group 2)" in body and b"is the node running" in body
    nodes = json.loads(request(cluster, "GET", "/status",
                               headers={"Accept": "application/json"})[2])["nodes"]
    assert nodes[0]["name"] == "n1" and nodes[0]["workers"] == 2
    assert nodes[1]["name"] == "n2" and "error" in nodes[1]


def test_sigterm_answers_the_fast_exec_in_flight_before_the_proxy_exits(make_cluster):
    cluster = make_cluster(scripts={"slow.py": "import time\ntime.sleep(1.0)\n"
                                               "__return_data = b'slept'\n"})
    cluster.srw("broker", "--node", "n1")
    cluster.srw("pool", "--node", "n1")
    proxy = cluster.srw("proxy")
    wait_until(lambda: (cluster.status("n1") or {}).get("workers") == 2, 30, "n1 ready")
    wait_proxy(cluster)
    host, port = cluster.proxy["listen"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(_plain("exec&name=slow.py", b""))
        wait_until(lambda: (cluster.status("n1") or {}).get("busy", 0) >= 1, 5, "slow.py runs")
        proxy.send_signal(signal.SIGTERM)
        reply = _responses(sock, 1)[0]
    assert (reply[0], reply[2]) == (b"HTTP/1.1 200 OK", b"slept")
    assert proxy.wait(15) == 0


def test_proxy_refuses_a_taken_port(make_cluster):
    cluster = make_cluster()
    host, port = cluster.proxy["listen"].rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        out = cluster.run("proxy", timeout=30)
    assert out.returncode == 1
    assert b"cannot listen on" in out.stderr


def test_proxy_groups_outside_the_config_refuse_to_start(make_cluster):
    cluster = make_cluster(proxy={"groups": [1, 5]})
    for command in ("serve", "proxy"):
        out = cluster.run(command, timeout=30)
        assert out.returncode == 2
        assert b"proxy.groups lists group 5" in out.stderr


def test_kept_routes_are_the_routers_for_every_id_key_and_groups(make_cluster):
    """The proxy remembers lmdb routes (proxy/cluster.py); each must be the one the
    router gives, for ids, keys and groups= alike, long keys (not kept) included."""
    from core import config as cfg
    from proxy.cluster import ROUTE_KEY_KEPT
    from proxy.cluster import Cluster as ProxyCluster
    cluster = make_cluster(nodes=[{"name": "a1", "group": 1}, {"name": "a2", "group": 1},
                                  {"name": "b1", "group": 2}, {"name": "b2", "group": 2}])
    proxy = ProxyCluster(cfg.load(cluster.path))
    asks = [(None, None, None), (None, None, [2]), (None, None, [2, 1])]
    asks += [(f"{i:x}" * 8, None, groups) for i in range(16) for groups in (None, [1], [2])]
    asks += [(None, key, groups) for key in ("k", "other key", "k" * (ROUTE_KEY_KEPT + 1))
             for groups in (None, [2])]
    for _ in range(2):  # the second time from what the proxy kept
        for id, key, groups in asks:
            kept = proxy.route(id, key, groups)
            fresh = proxy.router.route(id, key, groups or proxy.groups, refresh=False)
            assert [n.name for n in kept.nodes] == [n.name for n in fresh.nodes], (id, key, groups)
            assert kept.hex_id == fresh.hex_id
    owners = {proxy.route(f"{i:x}" * 8, None, [1]).nodes[0].name for i in range(16)}
    assert owners == {"a1", "a2"}  # the ids do land on different nodes
