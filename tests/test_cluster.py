"""A real cluster: three nodes in two groups, each node its own `srw serve --node`."""
from __future__ import annotations

import time

from storage.client import Session

from conftest import kill_tree, wait_storage

NODES = [{"name": "n1", "group": 1}, {"name": "n2", "group": 1}, {"name": "n3", "group": 2}]
INIT = """
from storage.handle import StorageHandle
n = StorageHandle()
"""
# Under the default profile (network "local"), a script reaches every node's
# storage (its handle writes every group), and no other node's broker.
REPLICATE = """
import socket
n.write_data("from-a-script", b"in every group")
try:
    socket.create_connection(("127.0.0.1", {broker}), timeout=2).close()
    __return_data = "reached another node's broker"
except PermissionError:
    __return_data = "denied"
"""


def key_owned_by(session: Session, name: str) -> str:
    """A key whose owner in group 1 is node `name`."""
    return next(k for k in (f"key{i}" for i in range(1000))
                if session.route(key=k, groups=[1])[0].name == name)


def test_three_nodes_two_groups_route_replicate_and_survive_a_node(make_cluster):
    cluster = make_cluster(nodes=NODES, pool={"workers": 1}, broker={"request_timeout": 3.0},
                           init=INIT)
    serves = {n["name"]: cluster.srw("serve", "--node", n["name"]) for n in NODES}
    cluster.wait_ready()
    wait_storage(cluster)
    assert {p.cmdline()[0] for p in cluster.processes("srw: storage")} == \
        {"srw: storage n1", "srw: storage n2", "srw: storage n3"}

    with Session(cluster.path, timeout=3.0) as s:
        everyone = s.exec("echo.py", b"all")
        assert [(r.node, r.group, r.status, r.data) for r in everyone] == \
            [("n1", 1, "ok", b"all"), ("n2", 1, "ok", b"all"), ("n3", 2, "ok", b"all")]

        key = key_owned_by(s, "n2")
        owners = s.exec("echo.py", b"one", key=key)
        assert [(r.node, r.status) for r in owners] == [("n2", "ok"), ("n3", "ok")]
        by_id = s.exec("echo.py", id="0123456789")
        assert [r.node for r in by_id] == [s.route(id="0123456789")[0].name, "n3"]

        assert [(r.node, r.group, r.status) for r in s.write(key, b"replicated")] == \
            [("n2", 1, "ok"), ("n3", 2, "ok")]
        assert s.read(key) == b"replicated"

        n3_broker = cluster.node("n3")["broker"].rsplit(":", 1)[1]
        [script] = s.exec("", code=REPLICATE.format(broker=n3_broker),
                          key=key_owned_by(s, "n1"), groups=[1])
        assert (script.node, script.status, script.data) == ("n1", "ok", b"denied"), script
        assert s.read("from-a-script", groups=[2]) == b"in every group"
        assert s.read("from-a-script", groups=[1]) == b"in every group"

        kill_tree(serves["n2"])  # its supervisor, storage, broker, pool and worker
        assert not cluster.processes("srw: storage n2")

        assert s.read(key) == b"replicated"          # group 1's owner is gone: group 2
        assert s.lookup(key)["node"] == "n3"
        started = time.monotonic()
        after = s.exec("echo.py", b"after")
        elapsed = time.monotonic() - started
        assert [(r.node, r.status) for r in after] == \
            [("n1", "ok"), ("n2", "unavailable"), ("n3", "ok")], after
        assert "broker" in after[1].error
        assert elapsed < 3.0 + 2.0  # within the request timeout (plus the client's grace)
        partial = s.write(key, b"while n2 is down")
        assert [(r.node, r.status) for r in partial] == [("n2", "unavailable"), ("n3", "ok")]
        assert s.read(key) == b"while n2 is down"

    # The CLI reads through the same routing.
    out = cluster.run("read", key)
    assert out.returncode == 0 and out.stdout == b"while n2 is down"


WRITE_BOTH = """
from storage.handle import StorageHandle
n = StorageHandle(timeout=1.0)
"""


def test_a_write_that_a_group_did_not_store_is_a_non_ok_exec(make_cluster):
    """Two groups, group 2's node down: a script's write stores in group 1 only,
    and its exec says so (not `ok`), naming both sides."""
    nodes = [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}]
    cluster = make_cluster(nodes=nodes, pool={"workers": 1}, broker={"request_timeout": 5.0},
                           init=WRITE_BOTH)
    serves = {n["name"]: cluster.srw("serve", "--node", n["name"]) for n in nodes}
    cluster.wait_ready()
    wait_storage(cluster)
    kill_tree(serves["n2"])
    assert not cluster.processes("srw: storage n2")

    with Session(cluster.path, timeout=5.0) as s:
        [result] = s.exec("", code='n.write_data("half", b"only in group 1")',
                          key="half", groups=[1])
        assert (result.node, result.status) == ("n1", "script_error"), result
        assert "ReplicaWriteFailed" in result.error
        assert "failed in group(s) 2 (n2: unavailable" in result.error, result.error
        assert "stored in group(s) 1" in result.error, result.error
        assert s.read("half", groups=[1]) == b"only in group 1"
