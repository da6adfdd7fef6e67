"""Storage nodes: LMDB store, wire protocol, Session data calls, scripts using the store."""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

import psutil
import pytest
import zmq

from core import protocol as bp
from broker.client import AsyncClient, Client
from libelliptics_python import elliptics_log_file
from storage import protocol as sp
from storage.client import NotFound, Session
from core.ids import id_hex, key_id
from storage.store import Store

from conftest import kill_tree, set_node_keys, wait_storage, wait_until

POST_INIT = """\
import sys
sys.path.append('/usr/lib')
from libelliptics_python import *

log = elliptics_log_file('/tmp/data/history.2/python.log', 40)
n = elliptics_node_python(log)
n.add_groups([1,2,3])
n.add_remote('elisto19f.dev', 1030)
__return_data = 'unused'
"""

COUNTER = """
from storage.client import NotFound
try:
    value = int(n.read_data("counter"))
except NotFound:
    value = 0
n.write_data("counter", str(value + 1))
__return_data = str(value + 1)
"""


def req(cmd, key=b"k", data=b"", rid=b"r"):
    return sp.StorageRequest(b"client", cmd, rid, hashlib.sha512(key).digest(), data)


# Pure logic ------------------------------------------------------------------

ID = b"i" * 64


@pytest.mark.parametrize("frames, words", [
    ([b"c", b"R" + ID + b"r", b"", b"x", b"y"], "expected 2 frames"),  # 3 with a capability
    ([b"c", b"R" + b"short", b""], "64-byte id"),
    ([b"c", b"R" + ID + b"r", b"data"], "data frame must be empty"),
    ([b"c", b"?r", b""], "unknown command"),
    ([b"c", b"W" + ID + b"r" * 65, b""], "longer than 64"),
])
def test_protocol_rejects_bad_frames(frames, words):
    with pytest.raises(sp.ProtocolError, match=words):
        sp.StorageRequest.from_frames(frames)


def test_protocol_round_trip():
    [head, data] = sp.request_frames(sp.WRITE, b"rid", ID, b"value")
    request = sp.StorageRequest.from_frames([b"c", head, data])
    assert (request.cmd, request.rid, request.id, request.data) == (sp.WRITE, b"rid", ID, b"value")
    stat = sp.StorageRequest.from_frames([b"c", *sp.request_frames(sp.STAT, b"r2")])
    assert (stat.cmd, stat.rid, stat.id) == (sp.STAT, b"r2", b"")
    reply = sp.reply_frames(b"c", b"rid", "not_found", b"", "no such key")
    assert sp.parse_reply(reply[1:]) == (b"rid", "not_found", b"", "no such key")
    assert sp.parse_reply(sp.reply_frames(b"c", b"", "ok", b"v")[1:]) == (b"", "ok", b"v", None)
    for bad in ([b"\xff\x00", b""], [b"\x00\x09ab", b""], [b"\x00"]):
        with pytest.raises(sp.ProtocolError):
            sp.parse_reply(bad)


def test_store_batch_runs_in_order_and_persists(tmp_path):
    store = Store(tmp_path / "s", "n1", sync=True, max_value=10)
    replies = store.apply([req(sp.WRITE, data=b"v1"), req(sp.READ), req(sp.LOOKUP),
                           req(sp.WRITE, data=b"x" * 11), req(sp.REMOVE), req(sp.READ),
                           req(sp.REMOVE), req(sp.WRITE, b"k2", b"kept")])
    statuses = [r[0] for r in replies]
    assert statuses == ["ok", "ok", "ok", "output_too_large", "ok", "not_found", "not_found",
                        "ok"]
    assert replies[1][1] == b"v1"
    meta = bp.unpack_map(replies[2][1])
    assert meta["size"] == 2 and abs(meta["mtime"] - time.time()) < 60
    assert "11 bytes" in replies[3][2] and "max_value" in replies[3][2]
    store.close()
    reopened = Store(tmp_path / "s", "n1")
    assert reopened.apply([req(sp.READ, b"k2")]) == [("ok", b"kept", "")]
    assert reopened.stats()["entries"] == 1


def test_log_file_that_cannot_be_opened_falls_back_to_the_node_log(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        log = elliptics_log_file(str(tmp_path / "missing" / "python.log"), 40)
    assert "cannot open log file" in caplog.text and log.logger.propagate
    good = elliptics_log_file(str(tmp_path / "python.log"), 40)
    good.logger.error("an error line")
    good.logger.info("below level 40: dropped")
    good.logger.handlers[0].flush()
    text = (tmp_path / "python.log").read_text()
    assert "an error line" in text and "dropped" not in text


# One node --------------------------------------------------------------------

def test_session_data_calls_and_cli(shared_node):
    with Session(shared_node.path) as s:
        [result] = s.write("key", b"\x00\xffvalue")
        assert (result.node, result.group, result.status) == ("n1", 1, "ok")
        assert s.read("key") == b"\x00\xffvalue" and s.read(b"key") == b"\x00\xffvalue"
        assert s.read(id=id_hex(key_id("key"))) == b"\x00\xffvalue"
        info = s.lookup("key")
        assert info["size"] == 7 and abs(info["mtime"] - time.time()) < 60
        assert [r.status for r in s.remove("key")] == ["ok"]
        assert [r.status for r in s.remove("key")] == ["not_found"]
        with pytest.raises(NotFound, match="key 'key' not found"):
            s.read("key")
        with pytest.raises(KeyError):
            s.lookup("key")
    assert shared_node.run("write", "cli key", "--data", "-", input=b"from\nstdin").returncode == 0
    out = shared_node.run("read", "cli key")
    assert out.returncode == 0 and out.stdout == b"from\nstdin"
    assert shared_node.run("remove", "cli key").returncode == 0
    missing = shared_node.run("read", "cli key")
    assert missing.returncode == 1 and b"not found" in missing.stderr
    assert shared_node.processes("srw: storage n1")


RANGES = {(0, 4): b"0123", (3, 4): b"3456", (8, 100): b"89", (10, 5): b"", (5, 0): b"",
          (1 << 40, 5): b"", (0, sp.MAX_LENGTH): b"0123456789",
          (sp.MAX_OFFSET, sp.MAX_LENGTH): b""}
BAD_RANGES = ((-1, 4), (0, -1), (sp.MAX_OFFSET + 1, 1), (0, sp.MAX_LENGTH + 1))


def check_ranged_reads(session: Session) -> None:
    """Ranges of a 10-byte value: cut where it ends, empty past it; a range no
    node takes is a ValueError before anything is sent; an absent key NotFound.
    A script's ``read_data(key, offset, size)`` reads the same range."""
    session.write("ranged", b"0123456789")
    for (offset, length), want in RANGES.items():
        assert session.read_range("ranged", offset, length) == want, (offset, length)
    for offset, length in BAD_RANGES:
        with pytest.raises(ValueError, match="ranged read"):
            session.read_range("ranged", offset, length)
    with pytest.raises(NotFound):
        session.read_range("no such key", 0, 4)
    [result] = session.exec("", code="__return_data = fs_store.read_data('ranged', 3, 4)",
                            key="ranged")
    assert (result.status, result.data) == ("ok", b"3456"), result.error


def test_ranged_reads(shared_node):
    with Session(shared_node.path) as s:
        check_ranged_reads(s)


def test_store_ranged_reads_refuse_bad_frames(tmp_path):
    store = Store(tmp_path / "s", "n1")
    replies = store.apply([req(sp.WRITE, data=b"0123456789"),
                           req(sp.READ_RANGE, data=sp.range_data(2, 3)),
                           req(sp.READ_RANGE, data=sp.range_data(2, 3)[:-1]),
                           req(sp.READ_RANGE, data=(1 << 63).to_bytes(8, "big") + bytes(4)),
                           req(sp.READ_RANGE, b"absent", sp.range_data(0, 1))])
    assert [r[:2] for r in replies] == [("ok", b""), ("ok", b"234"), ("bad_request", b""),
                                        ("bad_request", b""), ("not_found", b"")]
    assert "offset (8 bytes)" in replies[2][2]
    assert "above" in replies[3][2]
    store.close()


def test_storage_node_answers_bad_input_and_keeps_serving(make_cluster):
    cluster = make_cluster()
    set_node_keys(cluster, "n1", max_value=1000)
    storage = cluster.srw("storage", "--node", "n1")
    wait_storage(cluster)
    endpoint = cluster.node("n1")["storage"]
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, 5000)
    sock.connect(endpoint)
    an_id = hashlib.sha512(b"k").digest()
    cases = [
        ([b"R" + b"short id", b""], b"", "bad_request", "64-byte id"),
        ([b"Qr2", b""], b"r2", "bad_request", "unknown command"),
        ([b"W" + an_id + b"r3"], b"", "bad_request", "expected 2 frames"),
        ([b"W" + an_id + b"r4", b"x" * 1001], b"r4", "output_too_large", "max_value"),
        ([b"R" + an_id + b"r5", b""], b"r5", "not_found", "no value"),
        ([b""], b"", "bad_request", "expected 2 frames"),
        ([b"\xff" * 3, b"x" * 100, b"", b""], b"", "bad_request", "expected 2 frames"),
        ([b"G" + an_id + b"r7", b"short"], b"r7", "bad_request", "offset (8 bytes)"),
        ([b"G" + an_id + b"r8", b"\xff" * 12], b"r8", "bad_request", "is above"),
        ([b"G" + an_id + b"r9", sp.range_data(0, 5)], b"r9", "not_found", "no value"),
    ]
    try:
        for frames, rid, status, words in cases:
            sock.send_multipart(frames)
            got, got_status, _, error = sp.parse_reply(sock.recv_multipart())
            assert (got, got_status) == (rid, status), frames
            assert words in error and "n1" in error, error
        # exec relayed to a broker that is not running: the broker's reply layout
        sock.send_multipart(bp.request_frames(bp.EXEC, b"r6", bp.ExecMeta(name="echo.py"), b""))
        rid, result = bp.parse_reply(sock.recv_multipart())
        assert (rid, result.status, result.node) == (b"r6", "unavailable", "n1")
        assert "broker" in result.error
        with Session(cluster.path) as s:
            assert [r.status for r in s.write("k", b"v")] == ["ok"]
            assert s.read("k") == b"v"
            assert s.stat()[0]["entries"] == 1
    finally:
        sock.close()
        ctx.term()
    assert storage.poll() is None
    assert "bad request" in cluster.log()
    second = cluster.run("storage", "--node", "n1", timeout=30)  # its address is taken
    assert second.returncode == 3 and b"refuses to start" in second.stderr
    assert b"Address already in use" in second.stderr


def test_exec_through_the_storage_endpoint(shared_node):
    with Client(shared_node.node("n1")["storage"], timeout=5) as c:
        assert c.exec("echo.py", b"relayed").data == b"relayed"
        r = c.exec("", code="raise ValueError('from the script')")
        assert r.status == "script_error" and "from the script" in r.error
        assert c.status()["workers"] == 2


def test_acknowledged_write_survives_sigkill_and_restart(make_cluster):
    cluster = make_cluster(pool={"workers": 1})
    serve = cluster.serve()
    wait_storage(cluster)
    values = {f"key{i}": os.urandom(64) for i in range(50)}
    with Session(cluster.path) as s:
        for key, value in values.items():
            assert [r.status for r in s.write(key, value)] == ["ok"]
    kill_tree(serve)
    assert not cluster.processes("srw: storage n1")
    cluster.serve()
    wait_storage(cluster)
    with Session(cluster.path) as s:
        assert {key: s.read(key) for key in values} == values


def test_two_hundred_concurrent_execs_on_one_id_lose_no_update(make_cluster):
    cluster = make_cluster(
        pool={"workers": 3}, broker={"request_timeout": 60.0}, log_level="warning",
        init="from storage.handle import StorageHandle\nn = StorageHandle()\n",
        scripts={"counter.py": COUNTER})
    cluster.serve()
    wait_storage(cluster)
    counter_id = id_hex(key_id("counter"))

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=60) as client:
            return await asyncio.gather(*(client.exec("counter.py", id=counter_id)
                                          for _ in range(200)))

    results = asyncio.run(asyncio.wait_for(main(), 90))
    assert [r.status for r in results] == ["ok"] * 200, {r.error for r in results}
    assert sorted(int(r.data) for r in results) == list(range(1, 201))
    with Session(cluster.path) as s:
        assert s.read("counter") == b"200"


def test_the_2011_python_init_runs_with_only_its_address_changed(make_cluster):
    cluster = make_cluster(pool={"workers": 1}, scripts={"store.py": """
        n.write_data("k", __input_binary_data_tuple[0])
        __return_data = n.read_data("k") + b" " + str(n.lookup("k")["size"]).encode()
    """})
    host, port = cluster.node("n1")["storage"][len("tcp://"):].split(":")
    (cluster.history / "python.init").write_text(
        POST_INIT.replace("n.add_remote('elisto19f.dev', 1030)",
                          f"n.add_remote('{host}', {port})"))
    cluster.serve()
    wait_storage(cluster)
    parent = cluster.processes("srw: pool n1")[0]
    with cluster.client() as c:
        r = c.exec("store.py", b"stored by a 2011 script")
        assert (r.status, r.data) == ("ok", b"stored by a 2011 script 23"), r.error
        # the test_script.py of the post still runs against this context
        assert c.exec("test_script.py", b"x").data.endswith(b"without cookies: x")
    with Session(cluster.path) as s:
        assert s.read("k") == b"stored by a 2011 script"
    wait_until(lambda: "groups [2, 3] are not in the cluster" in cluster.log(), 5,
               "the handle's warning in the node's log")
    # python.init made the handle in the pool parent: it opened nothing there
    # (no ZeroMQ thread, no socket); the runner that used it connected itself.
    assert parent.num_threads() == 1
    assert not parent.net_connections(kind="tcp")
    # (store.py's runner: test_script.py, another tenant, has a warm runner of its own)
    assert any(c.raddr and c.raddr.port == int(port)
               for runner in cluster.runners() for c in runner.net_connections("tcp"))


def test_a_remote_that_does_not_answer_is_a_script_error_not_a_crash(make_cluster):
    # The failing call takes about a second (the connect wait); a heartbeat
    # interval of 0.5 s keeps the worker from presuming its broker silent meanwhile.
    cluster = make_cluster(pool={"workers": 1}, broker={"heartbeat_interval": 0.5},
                           init=POST_INIT.replace("'elisto19f.dev', 1030", "'127.0.0.1', 9"))
    cluster.serve()
    with cluster.client(timeout=15) as c:
        r = c.exec("", code="n.read_data('k')")
        assert r.status == "script_error" and "tcp://127.0.0.1:9" in r.error
        assert c.exec("echo.py", b"alive").data == b"alive"
    assert psutil.pid_exists(cluster.workers()[0].pid)


def test_a_full_store_fails_only_the_writes_that_do_not_fit(tmp_path, monkeypatch):
    monkeypatch.setattr("storage.store.MAP_SIZE", 256 * 1024)
    store = Store(tmp_path / "small", "n1", sync=False)
    batch = [req(sp.WRITE, b"small", b"s"), req(sp.WRITE, b"big", b"b" * 1024 * 1024),
             req(sp.READ, b"small")]
    replies = store.apply(batch)
    assert [r[0] for r in replies] == ["ok", "unavailable", "ok"]
    assert "MapFullError" in replies[1][2] and "disk full" in replies[1][2]
    assert replies[2][1] == b"s"
    assert store.apply([req(sp.READ, b"big")])[0][0] == "not_found"


def test_a_large_value_is_taken_from_its_message_and_nothing_else(tmp_path):
    """recv_request: the value frame of a write (WRITE, WRITE_IF, INDEXED_WRITE) of
    VIEW_FROM bytes or more is a view of the received message, stored intact;
    every other frame (a read's, an exec's for the relay, a small value) is bytes."""
    from storage.node import VIEW_FROM, recv_request
    ctx = zmq.Context()
    router, dealer = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        router.bind("inproc://views")
        dealer.connect("inproc://views")
        big, an_id = os.urandom(VIEW_FROM), hashlib.sha512(b"k").digest()
        sent = [(sp.request_frames(sp.WRITE, b"r1", an_id, big), memoryview),
                (sp.request_frames(sp.WRITE_IF, b"r2", an_id, sp.write_if_data(None, big)),
                 memoryview),
                (sp.request_frames(sp.WRITE, b"r3", an_id, big[:-1]), bytes),
                (sp.request_frames(sp.READ_RANGE, b"r4", an_id, sp.range_data(0, 1)), bytes),
                (bp.request_frames(bp.EXEC, b"r5", bp.ExecMeta(name="echo.py"), big), bytes)]
        for frames, _ in sent:
            dealer.send_multipart(frames)
        got = []
        for _ in range(len(sent)):
            assert router.poll(5000)
            frames, user = recv_request(router, with_user=False)
            assert user is None and all(type(f) is bytes for f in frames[:2])
            got.append(frames)
        for frames, (want, kind) in zip(got, sent):
            assert type(frames[2]) is kind and bytes(frames[2]) == want[1]
        store = Store(tmp_path / "s", "n1")
        requests = [sp.StorageRequest.from_frames(frames) for frames in got[:2]]
        replies = store.apply([requests[0], req(sp.READ, b"k"), requests[1]])
        assert replies[:2] == [("ok", b"", ""), ("ok", big, "")]
        assert replies[2][0] == "busy"      # "must not exist", and it does
        store.close()
    finally:
        dealer.close(linger=0)
        router.close(linger=0)
        ctx.term()


def test_write_keys_answers_each_key_in_order(make_cluster):
    """Engine.write_keys (lmdb): every write sent before a reply is awaited, each
    key answered as its own write would be (a value over max_value refused
    alone), the others stored and read back."""
    cluster = make_cluster()
    set_node_keys(cluster, "n1", max_value=300_000)
    cluster.srw("storage", "--node", "n1")
    wait_storage(cluster)
    values = {"a": os.urandom(200_000), "b": os.urandom(300_001), "c": b"small",
              "d": os.urandom(300_000)}
    with Session(cluster.path) as s:
        results = s.engine.write_keys(list(values.items()))
        assert [[r.status for r in rs] for rs in results] == \
            [["ok"], ["output_too_large"], ["ok"], ["ok"]]
        assert {k: s.read(k) for k in "acd"} == {k: values[k] for k in "acd"}
        with pytest.raises(NotFound):
            s.read("b")
