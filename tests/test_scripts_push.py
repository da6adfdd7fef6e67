"""`srw scripts push` / `srw scripts list`: scripts kept in the cluster reach
every node's history dir without a restart (srw/pushed.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from srw import pushed
from storage.client import Session

from conftest import (kill_tree, proxy_request, serving_with_proxy, wait_storage,
                      wait_until)

NODES = [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}]
INIT_V2 = """
from storage.handle import StorageHandle
n = StorageHandle()
GREETING = "from the pushed python.init"
"""


def second_host(cluster) -> tuple[subprocess.Popen, str]:
    """Node n2 served as if on another host: its own config copy and history dir
    (and control socket), so it learns of a push only from the store."""
    host = cluster.root / "host2"
    if not host.exists():
        host.mkdir()
        shutil.copytree(cluster.history, host / "history")
        shutil.copytree(cluster.root / "keys", host / "keys")  # the same push secret
    config = host / "config.toml"
    config.write_text(cluster.path.read_text())
    proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--node", "n2",
                             "--config", str(config)], cwd=host, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    cluster.procs.append(proc)
    return proc, str(host / "history")


def each_node(session: Session, name: str) -> dict[str, tuple[str, bytes]]:
    return {r.node: (r.status, r.data) for r in session.exec(name)}


def test_push_reaches_every_node_and_list_shows_its_hash(make_cluster, tmp_path):
    cluster = make_cluster(nodes=NODES, pool={"workers": 1},
                           scripts={"ver.py": '__return_data = "v1"'})
    cluster.srw("serve", "--node", "n1")
    n2, history2 = second_host(cluster)
    cluster.wait_ready()
    wait_storage(cluster)

    script = tmp_path / "ver.py"
    script.write_text('__return_data = "v2 " + str(globals().get("GREETING"))')
    init = tmp_path / "my.init"
    init.write_text(INIT_V2)
    pushed_ok = cluster.run("scripts", "push", str(script))
    assert pushed_ok.returncode == 0, pushed_ok.stderr
    assert b"ver.py: version 1, sha256 " in pushed_ok.stdout
    assert b"srw: n1: " in pushed_ok.stdout   # this host's serve synced before it answered

    with Session(cluster.path, timeout=5.0) as s:
        [at_once] = s.exec("ver.py", key="k", groups=[1])
        assert (at_once.node, at_once.data) == ("n1", b"v2 None")
        # n2 polls the store: bounded by the sync period (2 s), plus slack.
        wait_until(lambda: each_node(s, "ver.py") == {"n1": ("ok", b"v2 None"),
                                                      "n2": ("ok", b"v2 None")},
                   10.0, "the pushed ver.py on both nodes")
        pids = {w.pid for w in cluster.workers("n1") + cluster.workers("n2")}

        out = cluster.run("scripts", "push", "--init", str(init))
        assert out.returncode == 0 and b"python.init: version 1" in out.stdout, out.stderr
        wait_until(lambda: each_node(s, "ver.py") == {
            "n1": ("ok", b"v2 from the pushed python.init"),
            "n2": ("ok", b"v2 from the pushed python.init")},
            15.0, "the pushed python.init in both pools")
        # A rolling reload, not a restart: the pools stayed, the workers were replaced.
        assert len(cluster.processes("srw: pool n1")) == 1
        assert pids.isdisjoint(w.pid for w in cluster.workers("n1") + cluster.workers("n2"))

    listed = cluster.run("scripts", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    shown = json.loads(listed.stdout)
    digest = pushed.Pushed.make("ver.py", script.read_bytes(), 1).sha256
    assert shown["n1"]["scripts"]["ver.py"] == shown["n2"]["scripts"]["ver.py"] == [1, digest]
    assert shown["n1"]["scripts"]["python.init"] == shown["n2"]["scripts"]["python.init"]
    assert shown["n1"]["scripts"]["python.init"][0] == 1
    assert shown["n1"]["sequence"] == shown["n2"]["sequence"] == 2
    assert open(f"{history2}/ver.py", "rb").read() == script.read_bytes()

    # Pushing the same content again keeps its version; a change bumps it.
    again = cluster.run("scripts", "push", str(script))
    assert b"ver.py: version 1," in again.stdout
    script.write_text('__return_data = "v3"')
    bumped = cluster.run("scripts", "push", str(script))
    assert b"ver.py: version 2," in bumped.stdout, bumped.stdout

    # A node down during a push says so (exit 1), and takes the push when it is
    # back: its serve reads the other nodes' copies at start (CATCH_UP_EVERY).
    kill_tree(n2)
    script.write_text('__return_data = "v4"')
    missed = cluster.run("scripts", "push", str(script))
    assert missed.returncode == 1 and b"not stored on n2: " in missed.stderr, missed.stderr
    second_host(cluster)
    cluster.wait_ready()
    with Session(cluster.path, timeout=5.0) as s:
        wait_until(lambda: each_node(s, "ver.py") == {"n1": ("ok", b"v4"), "n2": ("ok", b"v4")},
                   10.0, "n2 to catch up with the push it missed")


@pytest.mark.parametrize("name, words", [
    (".hidden", b"bad script name"),
    ("a..b", b"bad script name"),
    ("srw_scripts.py", b"srw's own"),
])
def test_push_refuses_a_bad_name(make_cluster, tmp_path, name, words):
    cluster = make_cluster(nodes=[{"name": "n1"}])
    path = tmp_path / name
    path.write_text("__return_data = 1")
    out = cluster.run("scripts", "push", str(path))
    assert out.returncode == 1
    assert out.stderr.startswith(b"srw: ") and words in out.stderr, out.stderr
    assert out.stderr.count(b"\n") == 1


def test_push_refuses_a_large_script(make_cluster, tmp_path):
    cluster = make_cluster(nodes=[{"name": "n1"}])
    path = tmp_path / "big.py"
    path.write_bytes(b"#" * (pushed.MAX_SCRIPT + 1))
    out = cluster.run("scripts", "push", str(path))
    assert out.returncode == 1 and b"larger than" in out.stderr, out.stderr


def test_stored_scripts_are_checked_like_hostile_input():
    good = pushed.Pushed.make("a.py", b"x = 1", 3)
    assert pushed.unpack(pushed.pack(7, {"a.py": good})) == (7, {"a.py": good})
    for bad, words in [
        ([1, {"a.py": ["a.py", 1, "0" * 64, b"x = 1"]}], "sha256"),
        ([1, {"../x": ["../x", 1, good.sha256, b"x = 1"]}], "bad script name"),
        ([1, {"b.py": good.to_list()}], "names itself"),
        ([1, {"a.py": ["a.py", -1, good.sha256, b"x = 1"]}], "wrong types"),
        ([1, [1, 2]], "not a map"),
        ({"a.py": good.to_list()}, "not \\[sequence, map\\]"),
        ([0, {}], "sequence is not 1"),
        ([1 << 63, {}], "sequence is not 1"),
        (["1", {}], "sequence is not 1"),
    ]:
        import msgpack
        with pytest.raises(pushed.PushError, match=words):
            pushed.unpack(msgpack.packb(bad, use_bin_type=True))
    with pytest.raises(pushed.PushError):
        pushed.unpack(b"\xc1garbage")


FORGE = """
stamp, value = __input_binary_data_tuple[0].split(b"\\n", 1)
n.write_data("srw:scripts", value)          # a script may write any key of the store...
n.write_data("srw:scripts:stamp", stamp)
__return_data = "written"
"""


@pytest.mark.parametrize("sealed_with", [None, b"a guess at the secret, 32+ chars long"])
def test_a_map_a_script_wrote_never_reaches_the_history_dir(make_cluster, sealed_with):
    """...but python.init runs in the trusted pool, outside the sandbox: a node
    takes only a map sealed with [security] push_secret, which scripts cannot read."""
    import hashlib

    from srw.control import send, socket_path
    cluster = make_cluster(nodes=NODES, pool={"workers": 1}, scripts={"forge.py": FORGE})
    cluster.serve()
    init = b"import os\nos.system('id > /tmp/srw-forged-init')\n"
    forged = pushed.pack(99, {"python.init": pushed.Pushed.make("python.init", init, 99)})
    value = forged if sealed_with is None else pushed.seal(forged, sealed_with)
    stamp = hashlib.sha256(value).hexdigest().encode()
    with cluster.client(timeout=10) as client:
        r = client.exec("forge.py", stamp + b"\n" + value)
    assert (r.status, r.data) == ("ok", b"written"), r  # the store took it
    before = (cluster.history / "python.init").read_bytes()
    from core.config import load
    reply = send(socket_path(load(cluster.path)), "sync")
    assert "python.init" not in reply, reply
    assert (cluster.history / "python.init").read_bytes() == before
    assert "seal" in cluster.log() and "n1:" in cluster.log()


# A script that copies the sealed map and its stamp, and later writes the copy back.
REPLAY = """
what = __input_binary_data_tuple[0].decode()
if what == "save":
    n.write_data("saved:map", n.read_data("srw:scripts"))
    n.write_data("saved:stamp", n.read_data("srw:scripts:stamp"))
elif what == "replay":
    n.write_data("srw:scripts", n.read_data("saved:map"))
    n.write_data("srw:scripts:stamp", n.read_data("saved:stamp"))
elif what == "delete":
    n.remove("srw:scripts")
    n.remove("srw:scripts:stamp")
__return_data = what
"""


def run_replay(cluster, what: str) -> None:
    with cluster.client(timeout=10) as client:
        r = client.exec("replay.py", what.encode())
    assert (r.status, r.data) == ("ok", what.encode()), r


def sync_now(cluster) -> str:
    from core.config import load
    from srw.control import send, socket_path
    return send(socket_path(load(cluster.path)), "sync")


def push(cluster, path, content: str) -> bytes:
    path.write_text(content)
    out = cluster.run("scripts", "push", str(path))
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_a_replayed_older_map_is_refused_also_after_a_restart(make_cluster, tmp_path):
    """A script copies the sealed map of sequence 1, the operator pushes sequence
    2, the script writes the copy back: the seal matches, but the node took 2
    and refuses 1, says so once, and still after a restart of `srw serve`."""
    cluster = make_cluster(pool={"workers": 1}, scripts={"replay.py": REPLAY})
    cluster.serve()
    script = tmp_path / "ver.py"
    assert b"sequence 1" in push(cluster, script, '__return_data = "v1"')
    run_replay(cluster, "save")
    assert b"sequence 2" in push(cluster, script, '__return_data = "v2"')
    run_replay(cluster, "replay")

    said = "sequence 1 is older than the 2 this node took"
    reply = sync_now(cluster)
    assert said in reply and reply.startswith("ok: n1: sequence 2, up to date"), reply
    assert "put back the map this node took" in reply, reply
    sync_now(cluster)
    assert (cluster.history / "ver.py").read_text() == '__return_data = "v2"'
    assert cluster.log().count(said) == 1   # once, not at every sync
    with cluster.client(timeout=10) as client:
        assert client.exec("ver.py").data == b"v2"
    # The node put its map back, so the next push builds on it, not on the copy.
    assert b"sequence 3" in push(cluster, script, '__return_data = "v3"')

    # Stopped, the copy of sequence 1 written into its store: serve forgets nothing.
    with Session(cluster.path, timeout=5.0) as s:
        copy = s.read("saved:map"), s.read("saved:stamp")
    cluster.stop()
    write_store(cluster, {"srw:scripts": copy[0], "srw:scripts:stamp": copy[1]})
    cluster.serve()
    said = "sequence 1 is older than the 3 this node took"
    wait_until(lambda: said in cluster.log(), 10.0, "the restarted serve's refusal")
    assert (cluster.history / "ver.py").read_text() == '__return_data = "v3"'
    with cluster.client(timeout=10) as client:
        assert client.exec("ver.py").data == b"v3"
    listed = json.loads(cluster.run("scripts", "list", "--json").stdout)
    assert listed["n1"]["sequence"] == 3 and listed["n1"]["scripts"]["ver.py"][0] == 3


def test_a_map_replayed_over_http_is_refused(make_cluster, tmp_path):
    """The same replay by an HTTP client: upload&name=srw:scripts."""
    cluster = make_cluster(pool={"workers": 1})
    with serving_with_proxy(cluster):
        script = tmp_path / "ver.py"
        push(cluster, script, '__return_data = "v1"')
        with Session(cluster.path, timeout=5.0) as s:
            copy = s.read("srw:scripts"), s.read("srw:scripts:stamp")
        push(cluster, script, '__return_data = "v2"')
        for key, value in zip(("srw:scripts", "srw:scripts:stamp"), copy):
            status, _, body = proxy_request(cluster, "POST", f"/elliptics?upload&name={key}",
                                            value)
            assert status == 200, body
        reply = sync_now(cluster)
        assert "sequence 1 is older than the 2 this node took" in reply, reply
        assert (cluster.history / "ver.py").read_text() == '__return_data = "v2"'


def write_store(cluster, values: dict[str, bytes], node: str = "n1") -> None:
    """Write into a stopped node's LMDB store, as its storage process would."""
    import hashlib

    from storage import protocol as sp
    from storage.store import Store
    store = Store(cluster.root / "var" / node / "store", node)
    try:
        replies = store.apply([sp.StorageRequest(b"", sp.WRITE, b"", hashlib.sha512(k.encode())
                                                 .digest(), v) for k, v in values.items()])
        assert all(r[0] == "ok" for r in replies), replies
    finally:
        store.close()


def test_a_removed_map_changes_nothing_on_the_node(make_cluster, tmp_path):
    cluster = make_cluster(pool={"workers": 1}, scripts={"replay.py": REPLAY})
    cluster.serve()
    script = tmp_path / "ver.py"
    push(cluster, script, '__return_data = "v1"')
    push(cluster, script, '__return_data = "v2"')
    run_replay(cluster, "delete")
    said = "no map under srw:scripts"
    for _ in range(3):
        reply = sync_now(cluster)
        assert reply.startswith("ok: n1: sequence 2, up to date"), reply
    assert (cluster.history / "ver.py").read_text() == '__return_data = "v2"'
    assert cluster.log().count(said) == 1, cluster.log()   # and the map was put back
    with cluster.client(timeout=10) as client:
        assert client.exec("ver.py").data == b"v2"

    # A node that lost its copy cannot put the map back: it still keeps its
    # scripts, says so once (not at every sync), and the next push starts from
    # no map, after the sequence the node took.
    (cluster.root / "var" / "n1" / "pushed.map").unlink()
    run_replay(cluster, "delete")
    lost = "no copy of sequence 2 in pushed.map to put back"
    for _ in range(3):
        assert lost in sync_now(cluster)
    assert cluster.log().count(lost) == 1, cluster.log()
    assert (cluster.history / "ver.py").read_text() == '__return_data = "v2"'
    other = tmp_path / "other.py"
    other.write_text('__return_data = "other"')
    out = cluster.run("scripts", "push", str(other))
    assert out.returncode == 0 and b"sequence 3" in out.stdout, out.stderr
    assert b"the store holds no map, not the sequence 2 the nodes took" in out.stderr
    assert b"srw: n1: sequence 3, took other.py\n" in out.stdout
    assert (cluster.history / "ver.py").read_text() == '__return_data = "v2"'


def test_two_pushes_racing_never_take_the_same_sequence(make_cluster):
    """Two pushers both read sequence N, then both write N + 1 by compare-and-set:
    the storage nodes let exactly one of them, and the other stores nothing."""
    import threading
    from core.config import load
    cluster = make_cluster(nodes=NODES)
    cluster.serve()
    config = load(cluster.path)
    barrier = threading.Barrier(2, timeout=10)

    class ReadThenWait(pushed.ScriptStore):
        def _next(self, current, files):  # both have read before either writes
            made = super()._next(current, files)
            barrier.wait()
            return made

    for round_ in range(1, 4):
        outcome = {}

        def push_one(name: str) -> None:
            store = ReadThenWait(config, timeout=5.0)
            try:
                outcome[name] = store.push({name: f"x = {round_}".encode()})
            except pushed.PushConflict as exc:
                outcome[name] = str(exc)
            finally:
                store.close()

        threads = [threading.Thread(target=push_one, args=(f"p{i}.py",)) for i in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
        [(winner, (stored, errors, _))] = [(k, v) for k, v in outcome.items()
                                           if not isinstance(v, str)]
        [lost] = [v for v in outcome.values() if isinstance(v, str)]
        assert stored.seq == round_ and errors == []
        assert lost == f"another push took sequence {round_}; run push again"
        store = pushed.ScriptStore(config)
        on_nodes = [store.read(node) for node in config.nodes]
        store.close()
        assert on_nodes == [stored, stored]  # the loser wrote nowhere


def test_write_if_compares_and_sets_in_one_transaction(shared_node):
    """The storage command under the push: written only over the value expected."""
    import hashlib

    from storage import protocol as sp
    from storage.client import StorageClient
    key = hashlib.sha512(b"cas").digest()
    with StorageClient(shared_node.node("n1")["storage"]) as client:
        def write_if(expected, value):
            return client.call(sp.WRITE_IF, key, sp.write_if_data(expected, value))
        assert write_if(None, b"one").ok                        # must not exist: it did not
        refused = write_if(None, b"two")
        assert (refused.status, refused.data) == ("busy", hashlib.sha256(b"one").hexdigest()
                                                  .encode())
        assert write_if(hashlib.sha256(b"one").digest(), b"two").ok
        assert write_if(hashlib.sha256(b"one").digest(), b"three").status == "busy"
        assert client.call(sp.READ, key).data == b"two"
        bad = client.call(sp.WRITE_IF, key, b"\x05abc")
        assert bad.status == "bad_request" and "len(expected)" in bad.error


def test_a_push_never_builds_on_a_map_older_than_the_nodes_took(node):
    """Else a replayed map would come back under a new sequence, with its old
    python.init beside the pushed file: it starts from no map, after theirs."""
    from core.config import load
    store = pushed.ScriptStore(load(node.path))
    try:
        first, _, _ = store.push({"a.py": b"x = 1"})
        second, _, _ = store.push({"a.py": b"x = 2"})
        assert (first.seq, second.seq) == (1, 2)
        for floor, held in (((3, "0" * 64), 2), ((4, "0" * 64), 4)):  # older; other content
            stored, errors, replaced = store.push({"b.py": b"y = 1"}, floor)
            assert (stored.seq, sorted(stored.scripts), errors) == (floor[0] + 1, ["b.py"], [])
            [why] = replaced
            assert f"a map of sequence {held}, not the sequence {floor[0]} the nodes took" in why
        latest = store.read()
        stored, _, replaced = store.push({"c.py": b"z = 1"}, (latest.seq, latest.stamp))
        assert replaced == [] and sorted(stored.scripts) == ["b.py", "c.py"]
    finally:
        store.close()


def test_the_state_file_is_read_as_hostile_input(tmp_path, caplog):
    """data_dir/pushed.seq: one short number and one sha256; else ignored, said."""
    from srw.pushsync import STATE, read_state
    good = "ab" * 32
    assert read_state(tmp_path) == (0, "")            # none yet: nothing taken
    for text, want in [
        (f"7 {good}\n", (7, good)),
        (f"7 {good}", (7, good)),
        (f"-7 {good}\n", (0, "")),
        (f"7 {good.upper()}\n", (0, "")),
        (f"{1 << 63} {good}\n", (0, "")),              # past the largest sequence
        ("7" * 30 + f" {good}\n", (0, "")),
        (f"7 {good} extra\n", (0, "")),
        (f"7 {good}\n" + " " * 200, (0, "")),          # longer than MAX_STATE
        ("\xff\xfe garbage", (0, "")),
    ]:
        (tmp_path / STATE).write_bytes(text.encode("utf-8", "surrogateescape"))
        assert read_state(tmp_path) == want, text
    assert caplog.text.count("is not \"SEQUENCE SHA256\"; ignored") == 7
