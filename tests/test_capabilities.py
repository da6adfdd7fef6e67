"""Scripts act with their caller's rights (core/capability.py, storage/grants.py).

One two-node cluster (groups 1 and 2, one worker each, default profile) with
curve on: a script's store calls go out under the node's scripts key, and
the storage fronts let them do only what the request's capability allows.
Clients: execonly (exec), reader (exec, read), writer (exec, read, write);
the harness's admin reads and writes to check what happened.  definer.py is
a definer script with read and write."""
from __future__ import annotations

import asyncio
import hashlib
import os
import textwrap
import time
import uuid

import msgpack
import pytest

from broker.client import AsyncClient, Client
from core import capability
from core import protocol as p
from core import security as sec
from storage import protocol as sp
from runtime import channel
from storage.client import NotFound, Session, StorageClient
from core.ids import key_id

from conftest import Cluster, retire, wait_until

INIT = """
import json
from storage.handle import StorageHandle
n = StorageHandle()
"""
READ = """
__return_data = n.read_data(__input_binary_data_tuple[0].decode())
"""
WRITE = """
key = __input_binary_data_tuple[0].decode()
n.write_data(key, b"written")
__return_data = "wrote " + key
"""
# Keeps the first request's capability in the runner and uses it in the next
# request of the same tenant (same caller, same script: the same warm runner).
KEEP = """
import builtins
from core import capability
key = __input_binary_data_tuple[0].decode()
kept = getattr(builtins, "kept_capability", None)
if kept is None:
    builtins.kept_capability = capability.current()
else:
    capability.CURRENT = kept
n.write_data(key, b"kept")
__return_data = "wrote " + key
"""
# Hands its capability out, as a leftover process or a copy could keep it.
TOKEN = """
from core import capability
__return_data = capability.current()
"""
# What a request holds before its script calls the store: no token yet.
UNASKED = """
from core import capability
__return_data = capability.CURRENT
"""
# Whether its token came with the request (its script asked before) or was asked for.
AGAIN = """
from core import capability
before = capability.CURRENT
token = capability.current()
__return_data = (b"up front " if before else b"asked ") + token
"""
# Asks its worker for the token twice, past current()'s once.
GREEDY = """
from core import capability
ask = capability.ASK
ask()
ask()
"""
SCRIPTS = {"read.py": READ, "write.py": WRITE, "definer.py": WRITE, "keep.py": KEEP,
           "token.py": TOKEN, "unasked.py": UNASKED, "greedy.py": GREEDY,
           "again.py": AGAIN}


def sha256(text: str) -> str:
    return hashlib.sha256(textwrap.dedent(text).encode()).hexdigest()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("caps"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1}, {}, SCRIPTS, INIT, security={})
    with open(cluster.path, "a") as f:
        f.write(f'\n[security.definers]\n"definer.py" = {{ sha256 = "{sha256(WRITE)}", '
                'rights = ["read", "write"] }\n')
    cluster.add_client("execonly", ("exec",))
    cluster.add_client("reader", ("exec", "read"))
    cluster.add_client("writer", ("exec", "read", "write"))
    cluster.add_client("coder", ("exec", "code", "read"))
    cluster.srw("serve")
    cluster.wait_ready()
    yield cluster
    retire([cluster])


def run(cluster: Cluster, client: str, script: str, data: str, node: str = "n1"):
    with Client(cluster.node(node)["broker"], timeout=5, curve=cluster.curve(client)) as c:
        return c.exec(script, data.encode())


def stored(cluster: Cluster, key: str, group: int) -> bytes | None:
    with Session(cluster.path, timeout=3.0, curve=cluster.curve()) as s:
        try:
            return s.read(key, groups=[group])
        except NotFound:
            return None


def new_key() -> str:
    return f"k-{uuid.uuid4().hex}"


def test_an_exec_only_callers_script_can_neither_read_nor_write(cluster):
    key = new_key()
    result = run(cluster, "execonly", "write.py", key)
    assert result.status == p.SCRIPT_ERROR
    assert "Forbidden" in result.error and "may not write" in result.error
    assert "the 'write' right is needed" in result.error
    assert stored(cluster, key, 1) is None and stored(cluster, key, 2) is None
    with Session(cluster.path, timeout=3.0, curve=cluster.curve()) as s:
        s.write(key, b"there")
    result = run(cluster, "execonly", "read.py", key)
    assert result.status == p.SCRIPT_ERROR and "may not read" in result.error


def test_a_read_callers_script_reads_but_cannot_write(cluster):
    key = new_key()
    with Session(cluster.path, timeout=3.0, curve=cluster.curve()) as s:
        s.write(key, b"there")
    result = run(cluster, "reader", "read.py", key)
    assert (result.status, result.data) == (p.OK, b"there")
    result = run(cluster, "reader", "write.py", key)
    assert result.status == p.SCRIPT_ERROR and "may not write" in result.error
    assert stored(cluster, key, 1) == b"there" and stored(cluster, key, 2) == b"there"


def test_a_definer_script_writes_for_any_caller_until_its_content_changes(cluster):
    key = new_key()
    result = run(cluster, "execonly", "definer.py", key)
    assert (result.status, result.data) == (p.OK, f"wrote {key}".encode())
    assert stored(cluster, key, 1) == b"written" and stored(cluster, key, 2) == b"written"
    path = cluster.history / "definer.py"
    original = path.read_text()
    try:
        path.write_text(original + "# changed\n")
        key = new_key()
        result = run(cluster, "execonly", "definer.py", key)
        assert result.status == p.SCRIPT_ERROR and "may not write" in result.error
        assert stored(cluster, key, 1) is None
        assert "definer script definer.py: its content" in cluster.log()
    finally:
        path.write_text(original)


def test_content_sent_with_a_definer_does_not_get_its_rights(cluster):
    """Content runs first in the definer's context: it must not ride its grant."""
    key = new_key()
    with Client(cluster.node("n1")["broker"], timeout=5, curve=cluster.curve("coder")) as c:
        result = c.exec("definer.py", key.encode(), code="x = 1")
    assert result.status == p.SCRIPT_ERROR and "may not write" in result.error
    assert stored(cluster, key, 1) is None


def test_a_script_gets_its_token_when_it_asks_and_only_once(cluster):
    """Minted at the first store call (most scripts make none: no MAC, no
    revocation); a runner that asks again is replaced, and the worker goes on."""
    result = run(cluster, "writer", "unasked.py", "")
    assert (result.status, result.data) == (p.OK, b"")
    result = run(cluster, "writer", "greedy.py", "")
    assert result.status == p.SCRIPT_ERROR and "asked twice" in result.error, result
    key = new_key()
    assert run(cluster, "writer", "write.py", key).status == p.OK
    assert stored(cluster, key, 1) == b"written"
    # A script that asked gets its next requests' tokens up front, each its own.
    first, second = (run(cluster, "writer", "again.py", "") for _ in range(2))
    assert first.data.startswith(b"asked ") and second.data.startswith(b"up front ")
    assert first.data.split(b" ", 1)[1] != second.data.split(b" ", 2)[2]


def test_requests_written_ahead_ask_for_their_own_tokens(cluster):
    """One tenant's requests in a burst: the worker writes the next ones to the
    runner ahead, so an ask's answer may come after them in the pipe."""
    keys = [new_key() for _ in range(24)]

    async def burst():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=10,
                               curve=cluster.curve("writer")) as c:
            return await asyncio.gather(*(c.exec("write.py", k.encode()) for k in keys))

    assert [r.status for r in asyncio.run(burst())] == [p.OK] * len(keys)
    assert all(stored(cluster, k, 1) == b"written" for k in keys)


def test_a_runner_reads_requests_written_before_its_grant_in_order():
    req_r, req_w = os.pipe()
    res_r, res_w = os.pipe()
    try:
        reader = channel.RequestReader(req_r, res_w)
        later = channel.request_bytes(8, 1, "w.py", b"", "", "", b"", b"next")
        os.write(req_w, b"".join(later) + channel.grant_bytes(7, b"token"))
        assert reader.ask(7) == b"token"
        asked = channel.read_reply(res_r, 7, 0, time.monotonic() + 1)
        assert asked == (channel.ASKED, b"")
        assert reader.next().data == b"next"
    finally:
        for fd in (req_r, req_w, res_r, res_w):
            os.close(fd)


def test_a_capability_kept_past_its_request_is_refused(cluster):
    """Copied by the script and used by the same tenant's next request (the same
    warm runner): refused on both nodes, once its request was answered."""
    first, second = new_key(), new_key()
    result = run(cluster, "writer", "keep.py", first)
    assert result.status == p.OK, result.error
    assert stored(cluster, first, 1) == b"kept" and stored(cluster, first, 2) == b"kept"
    result = run(cluster, "writer", "keep.py", second)
    assert result.status == p.SCRIPT_ERROR
    assert "its request was already answered" in result.error
    assert stored(cluster, second, 1) is None and stored(cluster, second, 2) is None


def scripts_store(cluster: Cluster, node: str, token: bytes) -> StorageClient:
    """A store client as a script's leftover has it: the scripts key (no secret
    from scripts) and a token."""
    keys = cluster.root / "keys"
    curve = sec.Credentials.from_files(keys / "scripts.key_secret", keys / "server.key")
    return StorageClient(cluster.node(node)["storage"], node, curve=curve,
                         capability=lambda: token)


def write_with(cluster: Cluster, node: str, token: bytes, key: str):
    with scripts_store(cluster, node, token) as store:
        return store.call(sp.WRITE, key_id(key).to_bytes(sp.ID_BYTES, "big"), b"late")


def test_a_capability_handed_out_is_refused_after_the_reply_on_every_node(cluster):
    result = run(cluster, "writer", "token.py", "")
    assert result.status == p.OK and result.data
    token = result.data
    # The worker sends the revocation to n1's front before the reply, and n2 hears
    # it from n1's front one hop later: a window that is the README's, which a
    # loaded machine can stretch, so each node is asked until it refuses.
    def refused(node: str):
        key = new_key()
        answer = write_with(cluster, node, token, key)
        return (answer, key) if answer.status == p.FORBIDDEN else None

    for node, group in (("n1", 1), ("n2", 2)):
        answer, key = wait_until(lambda: refused(node), 2.0, f"{node} to refuse it")
        assert "its request was already answered" in answer.error
        assert stored(cluster, key, group) is None


def test_a_forged_or_altered_capability_is_refused(cluster):
    result = run(cluster, "reader", "token.py", "")
    token, key = result.data, new_key()
    fields = msgpack.unpackb(token[:-capability.MAC_BYTES], raw=False)
    fields[5] = capability.rights_mask(("read", "write"))  # a reader makes itself a writer
    altered = msgpack.packb(fields, use_bin_type=True) + token[-capability.MAC_BYTES:]
    forged, _ = capability.mint(b"k" * 32, "n1", b"job", "x", ("read", "write"),
                                time.time() + 60)
    for bad in (altered, forged, token[:-1] + bytes([token[-1] ^ 1]), b"x" * 40):
        answer = write_with(cluster, "n1", bad, key)
        assert answer.status == p.FORBIDDEN and "capability refused" in answer.error, answer
    answer = write_with(cluster, "n1", b"", key)
    assert answer.status == p.FORBIDDEN and "needs its request's capability" in answer.error
    assert stored(cluster, key, 1) is None
    with scripts_store(cluster, "n1", token) as store:  # nor may a script revoke others'
        answer = store.call(sp.REVOKE, data=sp.revoke_data([(b"\0" * 8, time.time() + 60)]))
    assert answer.status == p.FORBIDDEN and "only the nodes' own key" in answer.error


def test_the_nodes_own_indexing_needs_no_store_rights_and_search_needs_read(cluster):
    """index.py runs as node:NAME with no rights; a search's script reads this
    node's index, so its caller needs exec and read."""
    key, word = new_key(), f"w{uuid.uuid4().hex[:12]}"
    with Session(cluster.path, timeout=5.0, curve=cluster.curve()) as s:
        assert all(r.ok for r in s.write(key, f"hello {word}".encode(), index=True))
    with Session(cluster.path, timeout=5.0, curve=cluster.curve("reader")) as s:
        assert [hit["key"] for hit in s.search(word)] == [key]
    with Session(cluster.path, timeout=5.0, curve=cluster.curve("execonly")) as s:
        with pytest.raises(Exception, match="may not search"):
            s.search(word)


# Redis-cluster mode: per-rights Redis users, handed to each tenant's runner ------

@pytest.fixture(scope="module")
def redis_srw(tmp_path_factory, shared_redis):
    """One srw node with curve beside the suite's Redis Cluster; stopped by pid."""
    root = tmp_path_factory.mktemp("caps-redis")
    redis = shared_redis
    redis.keys_into(root / "srw" / "keys")
    srw = None
    try:
        srw = Cluster(root / "srw", [{"name": "r0", "redis": redis.addresses[0]}],
                      {"workers": 1}, {}, SCRIPTS, INIT, security={},
                      cluster={"engine": "redis-cluster", "seeds": redis.addresses[:3]})
        with open(srw.path, "a") as f:
            f.write(f'\n[security.definers]\n"definer.py" = {{ sha256 = "{sha256(WRITE)}", '
                    'rights = ["read", "write"] }\n')
        for name, rights in (("execonly", ("exec",)), ("reader", ("exec", "read")),
                             ("writer", ("exec", "read", "write"))):
            srw.add_client(name, rights)
        srw.serve()
        yield srw
    finally:
        if srw is not None:
            srw.stop()


def test_redis_scripts_log_in_as_the_user_their_rights_call_for(redis_srw):
    c = redis_srw
    key = new_key()
    result = run(c, "execonly", "write.py", key, node="r0")
    assert result.status == p.SCRIPT_ERROR and "may neither read nor write" in result.error
    result = run(c, "reader", "write.py", key, node="r0")
    assert result.status == p.SCRIPT_ERROR and "Forbidden" in result.error
    assert "no permissions to run the 'set' command" in result.error
    result = run(c, "writer", "write.py", key, node="r0")
    assert result.status == p.OK, result.error
    result = run(c, "reader", "read.py", key, node="r0")
    assert (result.status, result.data) == (p.OK, b"written")
    other = new_key()
    result = run(c, "execonly", "definer.py", other, node="r0")
    assert result.status == p.OK, result.error
    result = run(c, "writer", "read.py", other, node="r0")
    assert (result.status, result.data) == (p.OK, b"written")
