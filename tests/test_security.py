"""The front door: CurveZMQ on every node endpoint, and rights per client.

One two-node cluster (groups 1 and 2) with curve on serves most tests; its
clients are made here: alice (exec, read), reader (read), writer (write), dave
(no rights in his certificate, read and write from [security.rights]), and the
harness's admin (every right).  A script's side effect (a key it writes through the
node's scripts key) shows whether anything ran: mark.py is a definer script
with read and write, so it writes whoever runs it (tests/test_capabilities.py
has the callers' own rights)."""
from __future__ import annotations

import hashlib
import textwrap
import time
import urllib.request
import uuid

import pytest
import zmq

from core import protocol as p
from broker.client import BrokerUnavailable, Client
from core import config as cfg
from core import security as sec
from storage.client import NodeUnavailable, NotFound, Session, StorageClient

from conftest import Cluster, proxy_url, retire, wait_proxy, wait_until

MARK = """
key = __input_binary_data_tuple[0].decode()
n.write_data(key, b"ran")
__return_data = "marked " + key
"""
INIT = """
from storage.handle import StorageHandle
n = StorageHandle()
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("curve"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1}, {}, {"mark.py": MARK}, INIT,
                      security={"rights": {"dave": ["read", "write"]}})
    digest = hashlib.sha256(textwrap.dedent(MARK).encode()).hexdigest()
    with open(cluster.path, "a") as f:
        f.write(f'\n[security.definers]\n"mark.py" = {{ sha256 = "{digest}", '
                'rights = ["read", "write"] }\n')
    cluster.add_client("alice", ("exec", "read"))
    cluster.add_client("reader", ("read",))
    cluster.add_client("writer", ("write",))
    cluster.add_client("dave", None)
    cluster.srw("serve")
    cluster.wait_ready()
    wait_proxy(cluster)
    yield cluster
    retire([cluster])


def session(cluster: Cluster, client: str = "admin") -> Session:
    return Session(cluster.path, timeout=3.0, curve=cluster.curve(client))


def ran(cluster: Cluster, key: str) -> bool:
    """Whether mark.py ran for `key` on any node (read as admin)."""
    with session(cluster) as s:
        try:
            return s.read(key) == b"ran"
        except NotFound:
            return False


def stranger(cluster: Cluster) -> sec.Credentials:
    """A valid key pair the cluster has never heard of."""
    public, secret = zmq.curve_keypair()
    server = sec.load_public(cluster.root / "keys" / "server.key", "server key")
    return sec.Credentials(public, secret, server)


def test_a_client_with_its_rights_runs_scripts_that_use_the_store(cluster):
    key = f"k-{uuid.uuid4().hex}"
    with session(cluster, "alice") as s:
        results = s.exec("mark.py", key.encode(), key=key)
    assert [(r.node, r.status, r.data) for r in results] == \
        [("n1", "ok", f"marked {key}".encode()), ("n2", "ok", f"marked {key}".encode())]
    assert ran(cluster, key)
    with session(cluster, "alice") as s:
        assert s.read(key) == b"ran"  # alice may read


@pytest.mark.parametrize("how", ["unknown key", "plain text"])
def test_an_unknown_or_plaintext_client_gets_no_reply_and_nothing_runs(cluster, how):
    key = f"k-{uuid.uuid4().hex}"
    curve = stranger(cluster) if how == "unknown key" else None
    for endpoint in (cluster.node("n1")["broker"], cluster.node("n1")["storage"]):
        with Client(endpoint, timeout=0.5, curve=curve) as client:
            with pytest.raises(BrokerUnavailable, match="cannot connect"):
                client.exec("mark.py", key.encode())
    with StorageClient(cluster.node("n1")["storage"], curve=curve) as store:
        with pytest.raises(NodeUnavailable, match="cannot connect"):
            store.call(b"W", b"\0" * 64, b"overwrite", wait=0.5)
    assert not ran(cluster, key)
    if how == "unknown key":
        assert "refused a connection: unknown client key" in cluster.log()


def test_a_client_without_the_code_right_gets_forbidden_and_nothing_runs(cluster):
    key = f"k-{uuid.uuid4().hex}"
    code = f"n.write_data({key!r}, b'ran')"
    for endpoint in (cluster.node("n1")["broker"], cluster.node("n1")["storage"]):
        with Client(endpoint, timeout=3, curve=cluster.curve("alice")) as client:
            result = client.exec("", code=code)
        assert result.status == p.FORBIDDEN
        assert "'alice' may not send script content" in result.error
        assert "lacks the 'code' right" in result.error
    with Client(cluster.node("n1")["broker"], timeout=3, curve=cluster.curve("reader")) as c:
        result = c.exec("mark.py", key.encode())
    assert result.status == p.FORBIDDEN and "lacks the 'exec' right" in result.error
    with Client(cluster.node("n1")["broker"], timeout=3, curve=cluster.curve("reader")) as c:
        assert c.status()["workers"] == 1  # a known key needs no right for status
    assert not ran(cluster, key)


def test_data_rights_come_from_the_certificate_or_the_config(cluster):
    key = f"k-{uuid.uuid4().hex}"
    with session(cluster, "alice") as s:
        results = s.write(key, b"by alice")
    assert {r.status for r in results} == {p.FORBIDDEN}
    assert "lacks the 'write' right" in results[0].error
    with session(cluster, "dave") as s:  # [security.rights] dave = ["read", "write"]
        assert {r.status for r in s.write(key, b"by dave")} == {p.OK}
        assert s.read(key) == b"by dave"
        [result] = s.exec("mark.py", key.encode(), key=key, groups=[1])
    assert result.status == p.FORBIDDEN and "'dave' may not run script 'mark.py'" in result.error


def answers(client: Client) -> bool:
    try:
        return client.exec("mark.py", b"k-erin").ok
    except BrokerUnavailable:  # refused before the folder was scanned again: reconnects
        return False


def test_removing_a_certificate_locks_its_client_out_without_a_restart(cluster):
    secret = cluster.add_client("erin", ("exec", "read"))
    server_key = str(cluster.root / "keys" / "server.key")
    with Client(cluster.node("n1")["broker"], timeout=3, key=str(secret),
                server_key=server_key) as client:
        # Added while the node runs: admitted within the rescan, not after a restart.
        wait_until(lambda: answers(client), 5, "erin admitted")
        (cluster.root / "keys" / "clients" / "erin.key").unlink()
        removed = time.monotonic()
        wait_until(lambda: client.exec("mark.py", b"k-erin").status == p.FORBIDDEN, 5,
                   "erin's open connection refused")
        assert time.monotonic() - removed < 5.0
        assert "not (or no longer) authorized" in client.exec("mark.py", b"k-erin").error
    # n2 scans the folder on its own clock: a fresh connection is refused once it has.
    wait_until(lambda: not admitted_fresh(cluster.node("n2")["broker"], secret, server_key), 5,
               "erin refused by n2")


def admitted_fresh(endpoint: str, secret, server_key: str) -> bool:
    with Client(endpoint, timeout=0.5, key=str(secret), server_key=server_key) as fresh:
        try:
            fresh.exec("mark.py", b"k-erin")
        except BrokerUnavailable:
            return False
    return True


def test_a_client_refused_once_gets_in_when_its_key_is_added(cluster, tmp_path):
    """libzmq never reconnects a socket whose CurveZMQ handshake was refused: a
    client that tried before its certificate reached the node must still get in
    once it is there, blocking and asyncio alike."""
    import asyncio
    import shutil
    from broker.client import AsyncClient
    server_key = str(cluster.root / "keys" / "server.key")
    secrets = {name: sec.write_pair(tmp_path, name, ("exec",)) for name in ("fay", "gus")}
    endpoint = cluster.node("n1")["broker"]
    with Client(endpoint, timeout=3, key=str(secrets["fay"]), server_key=server_key) as fay:
        with pytest.raises(BrokerUnavailable, match="does it know this client's key"):
            fay.exec("mark.py", b"k-fay")
        shutil.copy(tmp_path / "fay.key", cluster.root / "keys" / "clients")
        wait_until(lambda: answers(fay), 5, "fay admitted")

    async def gus_gets_in():
        async with AsyncClient(endpoint, timeout=3, key=str(secrets["gus"]),
                               server_key=server_key) as gus:
            with pytest.raises(BrokerUnavailable, match="does it know this client's key"):
                await gus.exec("mark.py", b"k-gus")
            shutil.copy(tmp_path / "gus.key", cluster.root / "keys" / "clients")
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                try:
                    if (await gus.exec("mark.py", b"k-gus")).ok:
                        return True
                except BrokerUnavailable:
                    await asyncio.sleep(0.05)
            return False
    assert asyncio.run(gus_gets_in()), "gus admitted"


def test_srw_exec_and_the_http_proxy_work_on_a_curve_cluster(cluster):
    key = f"k-{uuid.uuid4().hex}"
    alice = str(cluster.root / "keys" / "clients" / "alice.key_secret")
    done = cluster.run("exec", "mark.py", "--for", key, "--groups", "2", "--data", "-",
                       "--key", alice, input=key.encode())
    assert (done.returncode, done.stdout) == (0, f"marked {key}".encode()), done.stderr
    refused = cluster.run("exec", "", "--code", "x = 1", "--key", alice)
    assert refused.returncode == 1 and b"forbidden" in refused.stderr
    no_key = cluster.run("status")
    assert no_key.returncode == 2 and b"give a client key" in no_key.stderr

    url = proxy_url(cluster, f"/elliptics?exec&name=mark.py&key={key}&groups=1")
    with urllib.request.urlopen(urllib.request.Request(url, data=key.encode()), timeout=10) as r:
        assert r.read() == f"marked {key}".encode()
    url = proxy_url(cluster, f"/elliptics?upload&name={key}-http")
    with urllib.request.urlopen(urllib.request.Request(url, data=b"via http"), timeout=10):
        pass
    with session(cluster, "reader") as s:
        assert s.read(f"{key}-http") == b"via http"


def test_plaintext_off_loopback_and_a_proxy_with_code_are_refused(make_cluster, tmp_path):
    cluster = make_cluster()
    text = cluster.path.read_text()
    cluster.path.write_text(text.replace("tcp://127.0.0.1:", "tcp://0.0.0.0:", 1))
    done = cluster.run("serve", timeout=20)
    assert done.returncode == 2
    assert b"is not a loopback address and [security] curve is off" in done.stderr
    assert len(done.stderr.splitlines()) == 1

    cluster.path.write_text(text + '\n[security]\nproxy_rights = ["exec", "code"]\n')
    with pytest.raises(cfg.ConfigError, match='proxy_rights may not hold "code"'):
        cfg.load(cluster.path)
    cluster.path.write_text(text + '\n[security]\ncurve = true\n')  # no keys made
    done = cluster.run("serve", timeout=20)
    assert done.returncode == 2 and b"cannot read a key" in done.stderr


def test_key_files_and_rights(tmp_path):
    secret = sec.write_pair(tmp_path, "bob", ("exec", "write"))
    assert secret.stat().st_mode & 0o777 == 0o600
    assert sec.certificate_rights(tmp_path / "bob.key") == ("exec", "write")
    assert sec.public_path(secret) == tmp_path / "bob.key"
    assert sec.load_public(tmp_path / "bob.key", "k") == sec.load_pair(secret, "k")[0]
    with pytest.raises(ValueError, match="unknown right 'admin'"):
        sec.parse_rights("exec,admin")
    with pytest.raises(cfg.ConfigError, match="holds no secret key"):
        sec.load_pair(tmp_path / "bob.key", "client key")
    for endpoint, loopback in (("tcp://127.0.0.1:1", True), ("tcp://[::1]:1", True),
                               ("tcp://localhost:1", True), ("tcp://0.0.0.0:1", False),
                               ("tcp://*:1", False), ("tcp://10.0.0.1:1", False)):
        assert sec.is_loopback(endpoint) is loopback, endpoint


@pytest.mark.parametrize("client, local", [("admin", True), ("writer", False),
                                           ("reader", False)])
def test_only_a_client_that_may_read_and_write_reads_a_store_on_this_host(cluster, client,
                                                                          local):
    """Local reads (storage/local_read.py) check at start what the node grants:
    the probe is written and read back over the network, so a key without read
    (or without write to probe) never reads the node's store in-process."""
    with session(cluster, client) as s:
        reads = s.engine.local_reads()
        try:
            assert (reads is not None and reads.nodes == ["n1", "n2"]) is local
        finally:
            if reads is not None:
                reads.close()
