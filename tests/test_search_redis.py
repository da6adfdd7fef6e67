"""Full-text search in redis-cluster mode: each srw node indexes the slots its
Redis node serves (storage/slot_indexer.py), and follows failover and
resharding.  One cluster of its own (6 Redis nodes, 6 srw nodes with a search
front-end each): the last tests move a slot and SIGKILL a master."""
from __future__ import annotations

import json
import subprocess
import time

import pytest
from redis.crc import key_slot

from conftest import proxy_request, wait_proxy, wait_until
from core import config as cfg
from core import redis_auth
from core.exits import UsageError
from redis_support import srw_beside_redis
from storage import redis_index as ix
from storage.errors import NotFound, StorageError
from storage.slot_indexer import MAX_KEY

NODE_TIMEOUT = 2.0     # s: cluster-node-timeout
FOUND_WITHIN = 30.0    # s from cluster_state:ok to every acknowledged document found

WORDS = ["walrus", "tusk", "harbour", "lantern", "meadow", "copper", "falcon", "ribbon"]


@pytest.fixture(scope="module")
def rs(tmp_path_factory):
    """(redis nodes, srw cluster, session); everything stopped at the end, by pid."""
    with srw_beside_redis(tmp_path_factory.mktemp("rs"), NODE_TIMEOUT, search=True,
                          timeout=5.0) as rs:
        yield rs


def found(session, query: str, keys: set[str], lang: str | None = None) -> bool:
    """Whether the search finds exactly `keys`, every slot covered."""
    hits = session.search(query, limit=1000, lang=lang)
    return not hits.partial and {h["key"] for h in hits} == keys


def wait_found(session, query: str, keys: set[str], within: float = 10.0,
               lang: str | None = None) -> float:
    """Seconds until `query` finds exactly `keys`, covered (AssertionError past `within`)."""
    start = time.monotonic()
    wait_until(lambda: found(session, query, keys, lang), within,
               f"{query!r} finding {len(keys)} keys, every slot covered", interval=0.1)
    return time.monotonic() - start


def keys_on(redis, shard: dict, prefix: str, count: int) -> list[str]:
    ranges = list(zip(shard["slots"][::2], shard["slots"][1::2]))
    return [k for k in (f"{prefix}{i}" for i in range(100_000))
            if any(a <= key_slot(k.encode()) <= b for a, b in ranges)][:count]


def test_indexed_writes_on_every_shard_are_found_with_snippets(rs):
    redis, _, session = rs
    keys = {f"doc{i}" for i in range(30)}
    for i, key in enumerate(sorted(keys)):
        [result] = session.write(key, f"the {WORDS[i % 8]} and the foxes mark{i}".encode(),
                                 index=True)
        assert result.ok and not result.data, result   # data: why it is not indexed yet
        # Answered once indexed, as in lmdb mode: found at once.
        assert found(session, f"mark{i}", {key}), key
    assert len({redis.keyslot(k) for k in keys}) == 30
    assert found(session, "foxes", keys)
    hits = session.search("fox walrus", limit=100)   # stemmed: fox finds foxes
    assert {h["key"] for h in hits} == {k for i, k in enumerate(sorted(keys)) if i % 8 == 0}
    assert hits.count == 4 and hits.unindexed == 0
    assert "[walrus]" in hits[0]["snippet"] and "[foxes]" in hits[0]["snippet"]
    paged = session.search("foxes", limit=10, offset=10)
    assert [h["key"] for h in paged] == [h["key"] for h in session.search("foxes", 30)][10:20]


def test_cli_and_http_write_and_search_as_in_lmdb_mode(rs):
    """srw write --index / srw search and HTTP upload&index=1 / search=: the same
    commands and answers as lmdb's (test_search.py), here through Redis."""
    _, srw, session = rs
    wait_proxy(srw)
    out = srw.run("write", "cli-doc", "--data", "-", "--index", input=b"narwhal from the cli")
    assert out.returncode == 0, out.stderr
    status, _, body = proxy_request(srw, "POST", "/elliptics?upload&name=http-doc&index=1",
                                    b"narwhal from http")
    assert status == 200, body
    wait_found(session, "narwhal", {"cli-doc", "http-doc"})
    out = srw.run("search", "narwhal", "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert sorted(h["key"] for h in answer["hits"]) == ["cli-doc", "http-doc"]
    assert answer["count"] == 2 and not answer["partial"] and not answer["failures"]
    status, _, body = proxy_request(srw, "GET", "/elliptics?search=narwhal")
    assert status == 200 and sorted(h["key"] for h in json.loads(body)["hits"]) == \
        ["cli-doc", "http-doc"]
    out = srw.run("search", "unicorn")
    assert out.returncode == 1 and b"no matches" in out.stderr
    status, _, body = proxy_request(srw, "GET", "/ping")   # the search fronts answer too
    assert status == 200 and body.count(b"storage") == len(srw.nodes), body
    # n.search in a script: its own node's index, which holds its key's slot.
    [result] = session.exec("", code="__return_data = json.dumps([h['key'] for h in "
                                      "n.search('narwhal', 10)])", key="cli-doc")
    assert result.ok and "cli-doc" in json.loads(result.data), result


def test_lang_at_write_is_kept_with_the_document(rs):
    _, _, session = rs
    assert session.write("lang-none", b"running foxes", index=True, lang="none")[0].ok
    assert session.write("lang-en", b"running foxes", index=True, lang="en")[0].ok
    # Stemmed at write, "running" is "run"; unstemmed, it stays "running".
    wait_found(session, "run", {"lang-en"})
    wait_found(session, '"running foxes"', {"lang-none"}, lang="none")
    with pytest.raises(UsageError, match="unknown language 'klingon'"):
        session.write("lang-bad", b"x", index=True, lang="klingon")
    with pytest.raises(NotFound):
        session.read("lang-bad")   # nothing stored


def test_remove_and_rewrite_change_what_is_found(rs):
    _, _, session = rs
    for key in ("gone1", "gone2"):
        assert session.write(key, b"ephemeral quokka", index=True)[0].ok
    wait_found(session, "quokka", {"gone1", "gone2"})
    assert session.remove("gone1")[0].ok
    assert session.write("gone2", b"steadfast wombat", index=True)[0].ok
    wait_found(session, "quokka", set())
    wait_found(session, "wombat", {"gone2"})
    # A plain (unindexed) overwrite takes the document out of the index, as in lmdb mode.
    assert session.write("gone2", b"plain numbat")[0].ok
    wait_found(session, "wombat", set())
    wait_found(session, "numbat", set())
    assert session.read("gone2") == b"plain numbat"


def test_a_custom_index_script_is_not_run_in_redis_mode(rs):
    """The text indexed is the value's own UTF-8 text (README: a slot is indexed
    again from Redis on every failover, reshard and restart, by a thread of the
    search front-end, with no runner)."""
    _, srw, session = rs
    index = srw.history / "index.py"
    shipped = index.read_text()
    index.write_text("__return_data = b'scriptword'\n")
    try:
        assert session.write("custom-ix", b"valueword here", index=True)[0].ok
        wait_found(session, "valueword", {"custom-ix"})
        assert found(session, "scriptword", set())
    finally:
        index.write_text(shipped)


def test_what_a_script_may_write_cannot_break_or_lie_to_the_indexer(rs):
    """With the login of scripts that may write (core/redis_auth.py), a script can
    spoil the index keys of a slot: an oversized and an out-of-slot key, a junk
    lang and a 100 kB one, a list where a value is, junk log entries and hints,
    a log that is a string.  The indexer reads
    within bounds, indexes only text Redis holds under a key, and keeps going."""
    from redis.cluster import ClusterNode, RedisCluster
    redis, srw, session = rs
    user, password = redis_auth.script_login(redis_auth.credentials(cfg.load(srw.path)),
                                             ("write",))
    script = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", redis.ports[0])],
                          username=user, password=password)
    try:
        slot = key_slot(b"victim")
        script.set("victim", b"unindexed yak")       # a plain write: not indexed
        script.set("{victim}:2", b"another yak")
        script.lpush("{victim}:list", b"listed yak")
        script.hset(ix.index_key(slot), mapping={b"victim": b"klingon",
                                                 b"{victim}:2": b"x" * 100_000,
                                                 b"{victim}:list": b"",
                                                 b"x" * (MAX_KEY + 1): b"",
                                                 b"not-in-this-slot": b""})
        for key in (b"victim", b"{victim}:2", b"{victim}:list"):
            script.xadd(ix.log_key(slot), {b"k": key})
        script.xadd(ix.log_key(slot), {b"junk": b"x" * 1000})
        other = (slot + 1) % ix.SLOTS
        for junk in (b"-1", b"99999", b"x" * 100, str(slot).encode()):
            script.publish(ix.CHANNEL, junk)
        # What Redis holds under each key is what gets indexed, junk langs by script.
        wait_found(session, "yak", {"victim", "{victim}:2"})
        assert session.write("after", b"sturdy yak", index=True)[0].ok
        wait_found(session, "yak", {"victim", "{victim}:2", "after"})
        # A slot whose log a script made a string: the indexed write there says
        # WRONGTYPE (MULTI runs the rest: value and index entry are stored), and
        # its hint makes the indexer drop the log and index the slot again.
        spoiled = "{%s}" % ix.tag(other).decode()
        # Spoiled only now: the indexer's sweep (every SWEEP_EVERY) would find the
        # string log itself meanwhile and drop it, and the write would succeed.
        script.set(ix.log_key(other), b"a string, not a stream")
        with pytest.raises(StorageError, match="WRONGTYPE"):
            session.write(spoiled, b"still a yak", index=True)
    finally:
        script.close()
    wait_found(session, "yak", {"victim", "{victim}:2", "after", spoiled})
    assert session.write(spoiled, b"a calm yak", index=True)[0].ok   # the log is whole again
    wait_found(session, "calm", {spoiled})


def test_a_killed_search_front_makes_its_index_again_from_redis(rs):
    """The index is derived: a master's search front loses its index file and is
    SIGKILLed; serve starts it again, and it indexes its slots from Redis."""
    redis, srw, session = rs
    shard = redis.shards()[0]
    node = next(n["name"] for n in srw.nodes if n["redis"] == shard["master"])
    keys = set(keys_on(redis, shard, "rb", 10))
    for key in keys:
        assert session.write(key, b"phoenix rising", index=True)[0].ok
    wait_found(session, "phoenix", keys)
    [front] = srw.processes(f"srw: storage {node}")
    for path in (srw.root / "var" / node).glob("index.sqlite*"):
        path.unlink()   # first: the front started again must find no index
    front.kill()
    took = wait_found(session, "phoenix", keys, within=FOUND_WITHIN)
    assert srw.log().count(f"index {node}: took ") >= 2
    print(f"\nsearch front of {node} killed, its index gone: every document found again "
          f"{took:.2f} s later")


# Resharding and failover: the last tests, they change the cluster -----------------

def _node_id(redis, address: str) -> str:
    with redis.conn(int(address.rsplit(":", 1)[1])) as r:
        return r.execute_command("CLUSTER", "MYID")


def _cluster_ok(redis) -> bool:
    for port in redis.ports:
        if redis.alive(port):
            with redis.conn(port) as r:
                if r.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
    return True


def _replicated(redis, shard: dict) -> bool:
    """Every write the shard's master took has reached its replica."""
    with redis.conn(int(shard["master"].rsplit(":", 1)[1])) as r:
        offset = r.info("replication")["master_repl_offset"]
    with redis.conn(int(shard["replicas"][0].rsplit(":", 1)[1])) as r:
        return r.info("replication").get("slave_repl_offset", -1) >= offset


def test_a_moved_slot_is_indexed_by_its_new_master_node(rs):
    """redis-cli --cluster reshard moves a slot holding indexed documents: they
    are found again (every slot covered) within FOUND_WITHIN of the move."""
    redis, _, session = rs
    source, target = redis.shards()[0], redis.shards()[1]
    slot = source["slots"][0]
    tag = next(t for t in (f"mv{i}" for i in range(100_000)) if key_slot(t.encode()) == slot)
    keys = {"{%s}:%d" % (tag, i) for i in range(5)}
    for key in keys:
        assert session.write(key, b"migrating heron", index=True)[0].ok
    wait_found(session, "heron", keys)
    subprocess.run(["redis-cli", "--cluster", "reshard", target["master"],
                    "--cluster-from", _node_id(redis, source["master"]),
                    "--cluster-to", _node_id(redis, target["master"]),
                    "--cluster-slots", "1", "--cluster-yes"],
                   check=True, capture_output=True, timeout=30, env=redis.cli_env)
    wait_until(lambda: _cluster_ok(redis), 10, "cluster_state:ok after the move")
    took = wait_found(session, "heron", keys, within=FOUND_WITHIN)
    # The session's slot map is the old one: its MULTI meets MOVED, nothing of it
    # runs, and it is sent again to the new master.
    late = "{%s}:late" % tag
    assert session.write(late, b"late heron", index=True)[0].ok
    wait_found(session, "heron", keys | {late})
    print(f"\nslot {slot} moved: its documents found again {took:.2f} s after "
          "cluster_state:ok")


def test_every_acknowledged_document_is_found_after_its_master_is_killed(rs):
    """Indexed documents on one shard, replicated; its master SIGKILLed: once
    Redis says cluster_state:ok again, the promoted replica's srw node indexes
    the slots and every document is found, every slot covered, within
    FOUND_WITHIN."""
    redis, srw, session = rs
    shard = redis.shards()[2]
    keys = set(keys_on(redis, shard, "fo", 20))
    for key in keys:
        assert session.write(key, b"resilient otter " + key.encode(), index=True)[0].ok
    wait_found(session, "otter", keys)
    wait_until(lambda: _replicated(redis, shard), 10, "the replica to have every write")
    redis.kill(shard["master"])
    killed = time.monotonic()
    partial_seen = []

    def promoted_and_ok():
        hits = session.search("otter", 100)
        partial_seen.append(hits.partial)
        return _cluster_ok(redis) and any(s["master"] == shard["replicas"][0]
                                          for s in redis.shards())
    wait_until(promoted_and_ok, 30, "the replica promoted, cluster_state:ok", interval=0.2)
    ok_at = time.monotonic()
    took = wait_found(session, "otter", keys, within=FOUND_WITHIN)
    assert any(partial_seen), "while the shard had no master, results said partial"
    print(f"\nfailover: cluster_state:ok {ok_at - killed:.2f} s after the kill; every "
          f"document found {took:.2f} s after that")
