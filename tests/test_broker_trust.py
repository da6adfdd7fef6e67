"""Who may talk on the broker's back socket, and what survives: real processes.

Only the pool's own workers register (the socket is 0600, a READY needs the
token beside it); a registered worker that sends anything that makes no sense
is dropped and told BYE, never the broker; no message is larger than
max_message; stale workers of a dead pool are not counted.
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import signal
import socket
import stat
import time

import msgpack
import psutil
import pytest
import zmq

from core import protocol as p
from core import trust
from broker.client import AsyncClient, BrokerUnavailable
from conftest import FakeWorker, set_node_keys, wait_until, workers_endpoint

NOBODY = 65000  # a uid with no process and no group on this machine


def broker_process(cluster) -> psutil.Process:
    procs = cluster.processes("srw: broker n1")
    assert len(procs) == 1, procs
    return procs[0]


def echo_all(cluster, n: int = 10) -> None:
    """Bystanders: each gets its own reply."""
    with cluster.client(timeout=10) as c:
        assert [c.exec("echo.py", b"bystander %d" % i).data for i in range(n)] == \
            [b"bystander %d" % i for i in range(n)]


# Registration -------------------------------------------------------------------

def test_registering_takes_the_token_from_beside_the_socket(shared_node):
    """Without the token, or with a wrong one, a peer never registers; with the
    one read from the file (as root), it does: the check is real."""
    for name, fields in (("none", None), ("wrong", {"token": os.urandom(trust.TOKEN_BYTES)}),
                         ("short", {"token": b"x"})):
        with FakeWorker(shared_node, identity=b"fake-" + name.encode()) as fake:
            if fields is None:
                meta = msgpack.unpackb(fake.ready()[1])
                del meta["token"]
                fake.send([p.READY, msgpack.packb(meta, use_bin_type=True)])
            else:
                fake.send(fake.ready(**fields))
            fake.send([p.HEARTBEAT])
            # Unregistered: its heartbeat is answered "I do not know you", first thing.
            assert fake.wait_for(p.REREGISTER) == [[p.REREGISTER]], name
        assert shared_node.status()["workers"] == 2
    with FakeWorker(shared_node, identity=b"fake-right") as fake:
        fake.register(3)
        fake.send([p.HEARTBEAT])
        fake.send([p.DRAIN])  # it holds nothing: drained at once
        assert {f[0] for f in fake.wait_for(p.BYE)[:-1]} <= {p.HEARTBEAT}  # then BYE
    echo_all(shared_node)


def probe_as_nobody(path: str) -> dict:
    """In a forked child that dropped to uid NOBODY (as a script runs): connect
    to the workers' socket, read the token, and try a READY through ZeroMQ."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            out = {"uid": os.getuid(), "groups": os.getgroups()}
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(path)
                    out["connect"] = "connected"
                except OSError as exc:
                    out["connect"] = exc.errno
            try:
                with open(path + trust.TOKEN_SUFFIX, "rb") as f:
                    out["token"] = f.read().hex()
            except OSError as exc:
                out["token"] = exc.errno
            ctx = zmq.Context()
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect("ipc://" + path)
            ready = {"slot": 98, "pid": os.getpid(), "credits": 1,
                     "token": os.urandom(trust.TOKEN_BYTES), "pool": os.getppid()}
            dealer.send_multipart([p.READY, msgpack.packb(ready, use_bin_type=True)])
            dealer.send_multipart([p.HEARTBEAT])
            out["answered"] = bool(dealer.poll(1500))
            ctx.destroy(linger=0)
            os.write(write_end, json.dumps(out).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the probe failed"
    return json.loads(data)


def test_another_uid_cannot_connect_nor_read_the_token(shared_node):
    """A process of an unprivileged uid cannot connect to the workers' socket
    or read the token, and what it sends never registers."""
    out = probe_as_nobody(trust.socket_path(workers_endpoint(shared_node)))
    assert out["uid"] == NOBODY and out["groups"] == []
    assert out["connect"] in (errno.EACCES, errno.ECONNREFUSED), out
    assert out["token"] == errno.EACCES, out
    assert out["answered"] is False
    assert shared_node.status()["workers"] == 2
    echo_all(shared_node)


# A registered worker that misbehaves ----------------------------------------------

MISCHIEF = {
    "READY with a str pid": lambda f: f.ready(pid="1"),
    "READY with float credits": lambda f: f.ready(credits=1.0),
    "READY with a bool slot": lambda f: f.ready(slot=True),
    "READY with a list job": lambda f: f.ready(job=[1, 2]),
    "READY with a huge job": lambda f: f.ready(job=b"j" * 100_000),
    "READY with an unknown field": lambda f: f.ready(extra=1),
    "READY with a wrong token": lambda f: f.ready(token=os.urandom(trust.TOKEN_BYTES)),
    "REPLY to a job it never got": lambda f: [p.REPLY, p.pack([[b"ff", "ok", "", b"", 1.0]])],
    "REPLY not msgpack": lambda f: [p.REPLY, b"\xc1\xc1\xc1"],
    "REPLY with extra frames": lambda f: [p.REPLY, p.pack([]), b"x"],
    "HEARTBEAT with a frame": lambda f: [p.HEARTBEAT, b"x"],
    "an unknown command": lambda f: [b"\x99"],
    "10 MB of random frames": lambda f: [os.urandom(1024 * 1024) for _ in range(10)],
}


@pytest.mark.parametrize("what", list(MISCHIEF))
def test_a_registered_worker_that_misbehaves_is_dropped(shared_node, what):
    broker = broker_process(shared_node)
    seen = len(shared_node.log())  # the node is shared: this test's lines come after
    with FakeWorker(shared_node) as fake:
        fake.register(3)
        fake.send(MISCHIEF[what](fake))
        fake.wait_for(p.BYE)
        wait_until(lambda: shared_node.status()["workers"] == 2, 10, "the fake worker dropped")
    assert broker.is_running() and broker_process(shared_node).pid == broker.pid
    echo_all(shared_node)
    wait_until(lambda: "worker n1#99 (pid" in shared_node.log()[seen:] and
               "sent a bad message" in shared_node.log()[seen:], 5,
               "one warning naming the worker")


def busy_worker(cluster) -> tuple[int, int]:
    """(slot, pid) of the worker running the slow request."""
    def find():
        for proc in cluster.workers():
            title = " ".join(proc.cmdline())
            if " busy " in title:
                return int(title.split("#")[1].split()[0]), proc.pid
        return None
    return wait_until(find, 10, "a worker busy with the slow request")


@pytest.mark.parametrize("status, registered", [("ok", True), ("killed", True),
                                                ("ok", False), ("killed", False)])
def test_a_ready_naming_a_live_workers_request_changes_nothing(node, status, registered):
    """A peer with the token that claims a busy worker died (its request "ok", or
    "killed") changes nothing: a registered one is dropped, a new one does not
    register; the request is answered by the worker that runs it."""
    broker = broker_process(node)
    pool = node.processes("srw: pool n1")[0].pid
    with node.client(timeout=10) as c, FakeWorker(node) as fake:
        slow = c.submit(code="import time\ntime.sleep(1.0)\n__return_data = 'slept'")
        slot, pid = busy_worker(node)
        if registered:
            fake.register(3)
        # The first exec of this broker is job 0.
        fake.send(fake.ready(slot=slot, replaces=pid, job=b"0", job_status=status, pool=pool,
                             reason="made up"))
        if registered:
            fake.wait_for(p.BYE)
        else:
            fake.send([p.HEARTBEAT])
            assert fake.wait_for(p.REREGISTER) == [[p.REREGISTER]]
        result = c.result(*slow)
        assert (result.status, result.data) == ("ok", b"slept")
        assert pid in {w.pid for w in node.workers()}
    assert broker_process(node).pid == broker.pid
    wait_until(lambda: node.status()["workers"] == 2, 10, "the fake worker dropped")
    echo_all(node)


# Message size ----------------------------------------------------------------------

MAX_MESSAGE = 1024 * 1024
SMALL = 256 * 1024  # max_body and max_value: max_message may be 1 MiB


def small_limits(make_cluster, **kw):
    cluster = make_cluster(broker={"max_message": MAX_MESSAGE}, proxy={"max_body": SMALL},
                           **kw)
    set_node_keys(cluster, "n1", max_value=SMALL)
    return cluster


def test_a_batch_larger_than_max_message_is_split(make_cluster):
    """Five 600 kB requests wait for a worker; when one registers it gets them
    all at once, in messages its socket (max_message) takes: one each."""
    cluster = small_limits(make_cluster)
    cluster.srw("broker", "--node", "n1")  # no pool: the fake is the only worker
    wait_until(lambda: cluster.status() is not None, 15, "the broker")
    datas = [bytes([i]) * 600_000 for i in range(5)]
    with cluster.client(timeout=20, max_message=MAX_MESSAGE) as c:
        sent = [c.submit("echo.py", data) for data in datas]
        wait_until(lambda: cluster.status()["queued"] == 5, 10, "the requests queued")
        with FakeWorker(cluster, max_message=MAX_MESSAGE) as fake:
            fake.send(fake.ready(credits=8))
            messages, jobs = 0, []
            deadline = time.monotonic() + 20
            while len(jobs) < 5 and time.monotonic() < deadline:
                frames = fake.recv(deadline - time.monotonic())
                if frames is None or frames[0] != p.REQUEST:
                    continue
                assert len(frames[1]) <= MAX_MESSAGE
                messages += 1
                jobs += p.parse_jobs(frames)
            assert len(jobs) == 5 and messages == 5  # two never fit in one
            for job, _, meta, data in jobs:
                fake.send(p.worker_replies_frames([[job, "ok", "", data, 10.0, 0, False]]))
            results = [c.result(*s) for s in sent]
    assert [r.data for r in results] == datas


def test_messages_larger_than_max_message_never_reach_a_worker(make_cluster):
    cluster = small_limits(make_cluster, pool={"workers": 1})
    cluster.serve()
    broker = broker_process(cluster)
    big = os.urandom(MAX_MESSAGE + 1)
    with cluster.client(max_message=MAX_MESSAGE) as c:  # refuses, sends nothing
        with pytest.raises(ValueError, match="max_message"):
            c.exec("echo.py", big)
    with cluster.client(timeout=1.0) as c:  # no limit: libzmq drops its connection
        with pytest.raises(BrokerUnavailable):
            c.exec("echo.py", big)
    with cluster.client() as c:
        # Each frame within max_message, not the request with its code: refused.
        r = c.exec("echo.py", b"d" * (MAX_MESSAGE - 1000), code="#" * 2000)
        assert r.status == "bad_request" and "broker.max_message" in r.error
    assert broker.is_running() and broker_process(cluster).pid == broker.pid

    async def several():  # one worker: its batch is cut in six
        async with AsyncClient(cluster.node("n1")["broker"], timeout=20,
                               max_message=MAX_MESSAGE) as client:
            return await asyncio.gather(*(client.exec("echo.py", bytes([i]) * 600_000)
                                          for i in range(6)))
    results = asyncio.run(several())
    assert [r.data for r in results] == [bytes([i]) * 600_000 for i in range(6)]
    echo_all(cluster)
    log = cluster.log()
    assert f"{len(big)} B" not in log  # no worker ran it


# Files -------------------------------------------------------------------------

def socket_files(cluster) -> tuple[str, str]:
    path = trust.socket_path(workers_endpoint(cluster))
    return path, path + trust.TOKEN_SUFFIX


def assert_private(path: str, kind) -> None:
    st = os.lstat(path)
    assert kind(st.st_mode), path
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == os.geteuid()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_broker_alone_makes_private_files_and_removes_them(make_cluster, sig):
    cluster = make_cluster()
    sock, token = socket_files(cluster)
    # Left by a killed broker: a stale file and a link to a file of someone else's.
    victim = cluster.root / "victim"
    victim.write_bytes(b"untouched")
    with open(sock, "w") as f:
        f.write("stale")
    os.symlink(victim, token)
    try:
        broker = cluster.srw("broker", "--node", "n1")
        wait_until(lambda: cluster.status() is not None, 15, "the broker")
        assert_private(sock, stat.S_ISSOCK)
        assert_private(token, stat.S_ISREG)
        assert len(trust.read_worker_token(workers_endpoint(cluster))) == trust.TOKEN_BYTES
        assert victim.read_bytes() == b"untouched"
        broker.send_signal(sig)
        assert broker.wait(15) == 0
        assert not os.path.lexists(sock) and not os.path.lexists(token)
    finally:
        for path in (sock, token):
            if os.path.lexists(path):
                os.unlink(path)


@pytest.mark.parametrize("profile", ["default", "trusted"])
def test_srw_serve_makes_private_files_and_removes_them(make_cluster, profile):
    cluster = make_cluster(pool={"profile": profile})
    sock, token = socket_files(cluster)
    serve = cluster.serve()
    assert_private(sock, stat.S_ISSOCK)
    assert_private(token, stat.S_ISREG)
    echo_all(cluster, 3)
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(30) == 0
    assert not os.path.lexists(sock) and not os.path.lexists(token)


# Stale workers --------------------------------------------------------------------

def test_workers_of_a_killed_pool_are_not_counted(make_cluster):
    """SIGKILL the pool (its workers die with it) and start another: the broker
    never counts more workers than the pool has, and gets to all of them.
    Heartbeats alone would keep the dead ones for 10 s."""
    cluster = make_cluster(pool={"workers": 2},
                           broker={"heartbeat_interval": 1.0, "liveness": 10})
    cluster.srw("broker", "--node", "n1")
    pool = cluster.srw("pool", "--node", "n1")
    cluster.wait_ready()
    echo_all(cluster, 3)
    pool.send_signal(signal.SIGKILL)
    pool.wait(5)
    cluster.srw("pool", "--node", "n1")
    seen = []

    def settled():
        seen.append(cluster.status()["workers"])
        return seen[-20:] == [2] * 20  # a few seconds of the new pool's two
    wait_until(settled, 30, "the new pool's workers, and only those", interval=0.1)
    assert max(seen) <= 2, seen
    echo_all(cluster, 3)
