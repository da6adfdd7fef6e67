"""The broker under failure: restarts, garbage on both sockets, exactly one reply."""
from __future__ import annotations

import os
import signal
import time

import msgpack
import pytest
import zmq

from core import protocol as p
from broker.client import BrokerUnavailable

from conftest import FakeWorker, wait_until


def start_node_by_roles(cluster):
    broker = cluster.srw("broker", "--node", "n1")
    pool = cluster.srw("pool", "--node", "n1")
    cluster.wait_ready()
    return broker, pool


@pytest.mark.parametrize("profile", ["trusted", "default"])
def test_broker_killed_and_restarted_recovers_without_restarting_pool(make_cluster, profile):
    """The new broker has a new token: the workers (trusted, never sandboxed) read
    it and register again, the same processes."""
    cluster = make_cluster(pool={"workers": 2, "profile": profile},
                           broker={"heartbeat_interval": 0.1})
    broker, pool = start_node_by_roles(cluster)
    workers_before = {w.pid for w in cluster.workers()}
    with cluster.client(timeout=2.0) as c:
        assert c.exec("echo.py", b"before").data == b"before"
        broker.send_signal(signal.SIGKILL)
        broker.wait(5)
        with pytest.raises(BrokerUnavailable):
            c.exec("echo.py", b"while down", timeout=0.5)
        cluster.srw("broker", "--node", "n1")
        wait_until(lambda: (cluster.status() or {}).get("workers") == 2, 15,
                   "workers registered with the new broker")
        assert c.exec("echo.py", b"after").data == b"after"
    assert pool.poll() is None
    assert {w.pid for w in cluster.workers()} == workers_before


def raw_socket(ctx, kind, endpoint, identity=None):
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 3000)
    if identity:
        sock.setsockopt(zmq.IDENTITY, identity)
    sock.connect(endpoint)
    return sock


def header(*fields):
    return msgpack.packb(list(fields))


GARBAGE = [
    [b""], [b"X"], [b"X", b"rid"], [b"\xff" * 3, b"r", b"", b""],
    [header(1, b"r1", "x"), b""],
    [header(1, b"r2", 5, "", "", None, None), b""],
    [header(9, b"r3", "", "", "", None, None), b""],
    [header(1, b"r4", "echo.py", "", "", -1, None), b""],
    [header(1, b"r5", "", "", "", None, "zz"), b""],
    [header(1, b"r6", "", "", "", None, None), b"", b"extra"],
    [header(1, b"x" * 100, "", "", "", None, None), b""],
    [msgpack.packb({"name": "x"}), b""],
    [os.urandom(50) for _ in range(7)],
]


def test_garbage_on_the_front_is_answered_or_dropped(shared_node):
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, zmq.DEALER, shared_node.node("n1")["broker"])
        for frames in GARBAGE:
            sock.send_multipart(frames)
        replies = []
        while True:
            try:
                replies.append(sock.recv_multipart())
            except zmq.Again:
                break
        statuses = {rid: result.status for rid, result in map(p.parse_reply, replies)}
        for rid in (b"r1", b"r2", b"r3", b"r4", b"r5", b"r6"):
            assert statuses.get(rid) == "bad_request", rid
        with shared_node.client() as c:
            assert c.exec("echo.py", b"fine").data == b"fine"
    finally:
        ctx.destroy()


def test_a_batch_is_answered_entry_by_entry(shared_node):
    """Requests sent as one batch get one reply each, in batches; a bad entry is
    answered bad_request and spoils nothing else; a batch that is not msgpack,
    or whose entries have no readable rid, is dropped."""
    ctx = zmq.Context()
    try:
        sock = raw_socket(ctx, zmq.DEALER, shared_node.node("n1")["broker"])
        sock.send_multipart([b"\xc1 not msgpack"])
        sock.send_multipart([msgpack.packb([[1, {"rid": 1}]] + [7] * 3)])
        good = [[1, b"g%d" % i, "echo.py", "", "", None, None, b"%d" % i] for i in range(5)]
        bad = [[1, b"b1", "echo.py", "", "", None, None, "data must be bytes"],
               [1, b"b2", "echo.py", "", "", -1.0, None, b""],
               [1, b"b3", "echo.py"],
               [9, b"b4", "", "", "", None, None, b""]]
        sock.send_multipart([msgpack.packb(good[:3] + bad + good[3:])])
        replies = {}
        while len(replies) < 9:
            for rid, result in p.parse_reply_message(sock.recv_multipart()):  # 3 s timeout
                assert rid not in replies, "two replies to one request"
                replies[rid] = result
        assert {rid: r.data for rid, r in replies.items() if rid[:1] == b"g"} == \
            {b"g%d" % i: b"%d" % i for i in range(5)}
        assert {rid: r.status for rid, r in replies.items() if rid[:1] == b"b"} == \
            dict.fromkeys((b"b1", b"b2", b"b3", b"b4"), "bad_request")
        with pytest.raises(zmq.Again):
            sock.recv_multipart()  # nothing more: the two broken batches were dropped
        assert shared_node.status()["workers"] == 2
    finally:
        ctx.destroy()


def test_garbage_on_the_back_is_dropped(shared_node):
    """An unregistered peer's frames, READYs without the token among them, are
    ignored: it never registers, and the node keeps serving."""
    with FakeWorker(shared_node, identity=b"intruder") as fake:
        good = fake.ready()
        for frames in [
            [p.READY], [p.READY, b"\xc1"], [p.READY, msgpack.packb({"slot": 1})],
            [p.READY, msgpack.packb({"slot": "x", "pid": 1, "credits": 5000})],
            fake.ready(token=b"\0" * 32), fake.ready(token=b""), good[:1] + good + [b"x"],
        ]:
            fake.send(frames)
        # None of those registered it: its heartbeat gets "I do not know you",
        # and nothing came before that (a worker would get HEARTBEAT, REQUEST).
        fake.send([p.HEARTBEAT])
        assert fake.wait_for(p.REREGISTER) == [[p.REREGISTER]]
        for frames in GARBAGE + [
            [p.REPLY, b"nojob", b"ok", b"", b""], [p.REPLY, b"j"], [p.HEARTBEAT, b"x"],
            [p.DRAIN], [b"\x99"],
        ]:
            fake.send(frames)
        with shared_node.client() as c:
            assert [c.exec("echo.py", b"%d" % i).data for i in range(20)] == \
                [b"%d" % i for i in range(20)]
        assert shared_node.status()["workers"] == 2


def test_fake_worker_that_never_answers_cannot_steal_requests_forever(shared_node):
    """A peer that registers and then dies is dropped after missed heartbeats."""
    fake = FakeWorker(shared_node, identity=b"n1#99:1")
    try:
        fake.register(3, pid=1)
    finally:
        fake.close()
    wait_until(lambda: shared_node.status()["workers"] == 2, 10, "fake worker expired")
    with shared_node.client() as c:
        assert all(c.exec("echo.py", b"x").ok for _ in range(10))


def test_request_timeout_answers_once(make_cluster):
    """A raw socket sees every reply the broker sends (Client drops replies to
    ids it no longer waits for): the timed-out request gets one, `timeout`,
    and the script's late end adds none."""
    cluster = make_cluster(pool={"workers": 1},
                           scripts={"nap.py": "import time\ntime.sleep(1.0)\n"})
    cluster.serve()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(cluster.node("n1")["broker"])
        sock.send_multipart(p.request_frames(p.EXEC, b"nap", p.ExecMeta("nap.py", timeout=0.3),
                                             b""))
        sock.send_multipart(p.request_frames(p.EXEC, b"echo", p.ExecMeta("echo.py"), b"next"))
        replies = []
        deadline = time.monotonic() + 2.5  # well past the nap's own end
        while time.monotonic() < deadline:
            if sock.poll(100):
                replies.append(p.parse_reply(sock.recv_multipart()))
        by_rid = {}
        for rid, result in replies:
            by_rid.setdefault(rid, []).append(result.status)
        assert by_rid == {b"nap": ["timeout"], b"echo": ["ok"]}, by_rid
    finally:
        sock.close()
        ctx.term()