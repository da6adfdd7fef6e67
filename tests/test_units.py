"""Fast tests of pure logic: config, ids and routing, script names, wire messages."""
from __future__ import annotations

import os
import stat

import msgpack
import pytest

from core import protocol as p
from runtime.executor import Executor
from runtime.scripts import ScriptCache, ScriptNameError, ScriptNotFound, check_name
from core import config as cfg
from core.ids import BadId, key_id, parse_id
from storage.ring import Ring

NODE = """
[[node]]
name = "n1"
group = 1
storage = "tcp://127.0.0.1:1025"
broker = "tcp://127.0.0.1:1026"
data_dir = "var/n1"
"""


def write(tmp_path, text):
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


def test_config_defaults_and_relative_paths(tmp_path):
    config = cfg.load(write(tmp_path, NODE))
    assert config.pool.workers == 2 and config.broker.request_timeout == 5.0
    assert config.nodes[0].data_dir == str(tmp_path / "var/n1")
    assert config.pool.history_dir == str(tmp_path / "history")
    assert (config.proxy.header_timeout, config.proxy.body_timeout,
            config.proxy.max_connections) == (10.0, 60.0, 1000)


@pytest.mark.parametrize("text, words", [
    ("[pool]\nworkerz = 3\n" + NODE, "unknown key pool.workerz"),
    ("[pool]\nworkers = 'x'\n" + NODE, "pool.workers must be int"),
    ("[pool]\nworkers = 0\n" + NODE, "pool.workers must be from 1 to 499"),
    ("[broker]\nrequest_timeout = -1\n" + NODE, "request_timeout"),
    ("[bogus]\n" + NODE, "unknown section or key 'bogus'"),
    ("[pool]\n", "at least one [[node]]"),
    (NODE.replace('group = 1\n', ''), "needs key 'group'"),
    (NODE + NODE, "node name 'n1' is used twice"),
    (NODE + NODE.replace("n1", "n2"), "node n1: storage and node n2: storage use the same "
                                      "address tcp://127.0.0.1:1025"),
    (NODE.replace("1025", "1O25"), "node n1: storage is '127.0.0.1:1O25': it must be "
                                   "tcp://HOST:PORT with a port from 1 to 65535"),
    (NODE.replace("1025", "70000"), "with a port from 1 to 65535"),
    ("[proxy]\nlisten = '127.0.0.1'\n" + NODE, "proxy.listen is '127.0.0.1': it must be"),
    ("[proxy]\nlisten = '127.0.0.1:1026'\n" + NODE, "node n1: broker and proxy.listen use"),
    (NODE.replace("tcp://127.0.0.1:1025", "127.0.0.1:1025"), "storage must be a tcp://"),
    ("[log]\nlevel = 'loud'\n" + NODE, "log.level must be one of"),
    ("[proxy]\nheader_timeout = 0\n" + NODE, "proxy.header_timeout must be > 0"),
    ("[proxy]\nbody_timeout = -1.5\n" + NODE, "proxy.body_timeout must be > 0"),
    ("[proxy]\nmax_connections = 0\n" + NODE, "proxy.max_connections must be at least 1"),
    ("[proxy]\nmax_connections = 1.5\n" + NODE, "proxy.max_connections must be int"),
    ("not toml [", "not valid TOML"),
    ("[security.definers]\n'a.py' = { sha256 = 'abc', rights = ['write'] }\n" + NODE,
     "security.definers.a.py.sha256 must be the script's SHA-256"),
    ("[security.definers]\n'a.py' = { sha256 = '" + "0" * 64 + "', rights = ['root'] }\n"
     + NODE, "security.definers.a.py.rights: unknown right 'root'"),
    ("[security.definers]\n'a.py' = { rights = ['read'] }\n" + NODE,
     "security.definers.a.py needs key 'sha256'"),
    ("[security.definers]\n'a.py' = 'read'\n" + NODE,
     "[security.definers.a.py] must be a table"),
])
def test_config_errors_name_the_key(tmp_path, text, words):
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load(write(tmp_path, text))
    assert words in str(err.value)
    assert str(tmp_path) in str(err.value)


def test_ids_are_zero_padded_on_the_right():
    assert parse_id("0123456789") == int("0123456789" + "0" * 118, 16)
    assert parse_id("f") == 0xF << 508
    for bad in ("", "xyz", "0" * 129, "12 34"):
        with pytest.raises(BadId):
            parse_id(bad)


def test_ring_owner_is_largest_start_not_above_id(tmp_path):
    text = "".join(NODE.replace("n1", name).replace("group = 1", f"group = {g}")
                   .replace("1025", str(port)).replace("1026", str(port + 1))
                   for name, g, port in (("a", 1, 2000), ("b", 1, 2002), ("c", 2, 2004)))
    ring = Ring(cfg.load(write(tmp_path, text)))
    assert [n.name for n in ring.targets(None, None)] == ["a", "b", "c"]
    assert [n.name for n in ring.targets(parse_id("01"), None)] == ["a", "c"]
    assert [n.name for n in ring.targets(parse_id("80"), None)] == ["b", "c"]
    assert [n.name for n in ring.targets(parse_id("7f"), [1])] == ["a"]
    assert key_id("k") == key_id(b"k")
    with pytest.raises(ValueError):
        ring.targets(None, [7])
    # a group named again is not another target; first-seen order is kept
    assert [n.name for n in ring.targets(parse_id("01"), [2, 1, 2, 1] * 100)] == ["c", "a"]
    assert [n.name for n in ring.targets(None, [1] * 300)] == ["a", "b"]


def test_explicit_ids_wrap_around(tmp_path):
    text = (NODE.replace('data_dir = "var/n1"', 'data_dir = "var/n1"\nids = ["40", "c0"]')
            + NODE.replace("n1", "n2").replace("1025", "1027").replace("1026", "1028")
            .replace('data_dir = "var/n2"', 'data_dir = "var/n2"\nids = ["80"]'))
    ring = Ring(cfg.load(write(tmp_path, text)))
    owner = lambda h: ring.owner(1, parse_id(h)).name
    assert [owner(h) for h in ("00", "3f", "40", "7f", "80", "bf", "c0", "ff")] == \
        ["n1", "n1", "n1", "n1", "n2", "n2", "n1", "n1"]


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", ".hidden", "a/b", "..", "x\0",
                                  "", "a" * 300, "a\nb", "a..b"])
def test_bad_script_names(name):
    with pytest.raises(ScriptNameError):
        check_name(name)


def test_good_script_names():
    for name in ("test_script.py", "a-b.c", "x+1", "python.init"):
        assert check_name(name) == name


def test_executor_isolates_requests(tmp_path):
    (tmp_path / "s.py").write_text("g.append(1)\nx = len(g)\n__return_data = str(x)\n")
    scripts = ScriptCache(tmp_path)
    ex = Executor({"g": [], "__builtins__": __builtins__}, 100)
    named = lambda: scripts.code(scripts.get("s.py"))  # noqa: E731
    assert ex.run(named, "", b"", "") == ("ok", b"1", "")
    # mutation of a shared object is visible (copy isolation), rebinding is not
    assert ex.run(named, "", b"", "") == ("ok", b"2", "")
    assert ex.run(None, "__return_data = 'y' * 101", b"", "")[0] == "output_too_large"
    assert ex.run(None, "__return_data = b'y' * 100", b"", "")[0] == "ok"
    status, _, error = ex.run(None, "def (", b"", "")
    assert status == "script_error" and error.startswith("  File") and "SyntaxError" in error
    assert ex.run(None, "x = bytearray(10**12)", b"", "")[0] == "memory"


def test_script_cache_numbers_each_version_and_rereads_a_changed_file(tmp_path):
    path = tmp_path / "s.py"
    path.write_text("__return_data = 1\n")
    scripts = ScriptCache(tmp_path)
    first = scripts.get("s.py")
    scripts.new_batch()
    assert scripts.get("s.py") is first  # unchanged: no second read
    path.write_text("__return_data = 22\n")
    scripts.new_batch()
    second = scripts.get("s.py")
    assert second.version != first.version and second.source == b"__return_data = 22\n"
    with pytest.raises(ScriptNotFound):
        scripts.get("missing.py")


def test_front_request_validation():
    good = p.request_frames(p.EXEC, b"r", p.ExecMeta(name="a", timeout=1.5, id="ab"), b"d")
    req = p.FrontRequest.from_frames([b"client", *good])
    assert req.meta.timeout == 1.5 and req.rid == b"r" and req.data == b"d"
    for header in ([1, b"r"], [1, b"r", 1, "", "", None, None], [1, b"r", "", "", "", 0, None],
                   [1, b"r", "", "", "", True, None], [1, b"r", "", "", "", None, "xyz"],
                   [7, b"r", "", "", "", None, None], [1, "r", "", "", "", None, None],
                   {"name": "x"}):
        with pytest.raises(p.ProtocolError):
            p.FrontRequest.from_frames([b"client", msgpack.packb(header), b""])
    with pytest.raises(p.ProtocolError):
        p.FrontRequest.from_frames([b"client", b"\xc1", b""])


def test_reply_round_trip():
    frames = p.reply_frames(b"client", b"rid", p.TIMEOUT, "n1", 2, b"d", "late")
    rid, result = p.parse_reply(frames[1:])
    assert rid == b"rid"
    assert result == p.Result("n1", 2, "timeout", b"d", "late")
    assert p.Result("n", 1, "ok", b"\xff").to_json()["data_base64"] == "/w=="


def test_back_messages_carry_batches_and_refuse_bad_entries():
    meta = p.ExecMeta(name="a.py", code="x = 1", cookie="c", caller="local")
    frames = p.jobs_frames(b"w", [p.job_entry(b"j1", 2.5, meta, b"d1"),
                                  p.job_entry(b"j2", 1.0, meta, b"")])
    assert p.parse_jobs(frames[1:]) == [(b"j1", 2.5, meta, b"d1"), (b"j2", 1.0, meta, b"")]
    replies = p.worker_replies_frames([[b"j1", p.OK, "", b"out", 12.5, 3, True],
                                       [b"j2", p.TIMEOUT, "late", b"", 3, 0, False, True]])
    assert p.parse_worker_replies([b"w", *replies]) == [  # the 8th: MOVED (a hint)
        (b"j1", "ok", b"out", "", 12.5, 3, True, False),
        (b"j2", "timeout", b"", "late", 3.0, 0, False, True)]
    for entries in ([[b"j", "nonsense", "", b"", 1, 0, False]], [[b"j", {}, "", b"", 1, 0, False]],
                    [[{}, "ok", "", b"", 1, 0, False]], [[b"j", "ok", "", "not bytes", 1, 0, False]],
                    [[b"j", "ok", "", b"", -1, 0, False]], [[b"j", "ok", "", b"", "1", 0, False]],
                    [[b"j", "ok", "", b"", 1, -1, False]], [[b"j", "ok", "", b"", 1, 10**6, True]],
                    [[b"j", "ok", "", b"", 1, True, True]], [[b"j", "ok", "", b"", 1, 0, 1]],
                    [[b"j", "ok", "", b"", 1, 0, False, 1]],
                    [[b"j", "ok", "", b"", 1, 0, False, True, True]],
                    [[b"j", "ok", "", b""]], {"j": 1}, [1]):
        with pytest.raises(p.ProtocolError):
            p.parse_worker_replies([b"w", p.REPLY, msgpack.packb(entries)])
    with pytest.raises(p.ProtocolError):
        p.parse_jobs([p.REQUEST, msgpack.packb([[b"j", 1.0, "", "", ""]])])
    with pytest.raises(p.ProtocolError):  # a job with no caller
        p.parse_jobs([p.REQUEST, msgpack.packb([[b"j", 1.0, "", "", "", None, b""]])])


def test_front_batches_round_trip():
    meta = p.ExecMeta(name="a.py", timeout=2.0)
    [frame] = p.batch_frames([(p.EXEC, b"r1", meta, b"d1"), (p.STATUS, b"r2", p.ExecMeta(), b"")])
    parsed = p.parse_batch([b"client", frame])
    assert parsed == [p.FrontRequest(b"client", p.EXEC, b"r1", meta, b"d1"),
                      p.FrontRequest(b"client", p.STATUS, b"r2", p.ExecMeta(), b"")]
    rid, error = p.parse_batch([b"c", msgpack.packb([[1, b"r3", 5, "", "", None, None, b""]])])[0]
    assert rid == b"r3" and isinstance(error, p.ProtocolError)
    replies = p.reply_batch_frames(b"c", [p.reply_entry(b"r1", p.OK, "n1", 1, b"out", ""),
                                          p.reply_entry(b"r2", p.BUSY, "n1", 1, b"", "full")])
    assert p.parse_reply_message(replies[1:]) == [
        (b"r1", p.Result("n1", 1, "ok", b"out", None)),
        (b"r2", p.Result("n1", 1, "busy", b"", "full"))]
    single = p.reply_frames(b"c", b"r", p.OK, "n1", 1, b"x")
    assert p.parse_reply_message(single[1:]) == [(b"r", p.Result("n1", 1, "ok", b"x", None))]
    with pytest.raises(p.ProtocolError):
        p.parse_reply_message([msgpack.packb([[b"r", "nonsense", "n1", 1, "", b""]])])


class _FakeWorker:
    def __init__(self, held: int, each_us: float = 20.0, credits: int = 16,
                 draining: bool = False):
        self.jobs = dict.fromkeys(range(held), each_us)
        self.load = held * each_us
        self.credits, self.draining = credits, draining


def test_short_requests_pack_onto_an_awake_worker_slow_ones_spread():
    from broker.dispatch import PACK_US, choose_worker
    idle, awake, full = _FakeWorker(0), _FakeWorker(3), _FakeWorker(16)
    # a 20 us request: the worker already running some takes it (no wake-up) ...
    assert choose_worker([idle, awake, full], 20.0) is awake
    # ... unless what it holds would then run longer than PACK_US
    assert choose_worker([idle, _FakeWorker(3, each_us=PACK_US / 3)], 20.0) is idle
    # a slow request (or an unknown script's): the shortest queue
    assert choose_worker([awake, idle], PACK_US) is idle
    assert choose_worker([_FakeWorker(2), _FakeWorker(1)], 5000.0).jobs.keys() == {0}
    # never a full or draining worker
    assert choose_worker([full, _FakeWorker(0, draining=True)], 20.0) is None


def test_a_tenant_keeps_to_its_worker_within_the_slack():
    """broker/affinity.py: tenants get the live slots in turn, and keep them while
    their worker has credit, is not draining and is not SLACK requests (or
    WAIT_US of expected run time) ahead of the rest."""
    from broker.affinity import SLACK, TenantAffinity
    a, b = _FakeWorker(0), _FakeWorker(0)
    by_slot = {2: b, 1: a}
    affinity = TenantAffinity()

    def meta(code, caller="local", name=""):
        return p.ExecMeta(name=name, code=code, caller=caller)
    picks = [affinity.worker(meta(f"t{i}"), by_slot, [a, b]) for i in range(4)]
    assert picks == [a, b, a, b]  # in turn, by slot
    assert affinity.has_tenants(1) and not affinity.has_tenants(3)
    assert affinity.worker(meta("t2"), by_slot, [a, b]) is a  # kept
    # another caller's is another tenant, with the next slot in turn
    assert affinity.worker(meta("t2", caller="bob"), by_slot, [a, b]) is a
    assert len(affinity.slots) == 5
    a.jobs = dict.fromkeys(range(SLACK + 1), 20.0)
    assert affinity.worker(meta("t0"), by_slot, [a, b]) is None  # too far ahead: choose_worker
    b.jobs = dict.fromkeys(range(1), 20.0)
    assert affinity.worker(meta("t0"), by_slot, [a, b]) is a  # within SLACK of the least busy
    slow = _FakeWorker(1, each_us=30e6)  # one request of a script that runs 30 s
    assert affinity.worker(meta("t0"), {1: slow, 2: b}, [slow, b]) is None
    a.draining = True
    assert affinity.worker(meta("t0"), by_slot, [a, b]) is None
    del by_slot[1]  # gone: its tenants get another slot
    assert affinity.worker(meta("t0"), by_slot, [b]) is b
    # long content is known by its length and ends: the same tenant, not a copy of it
    long = "x" * 5000
    first = affinity.worker(meta(long + "1"), {1: a, 2: b}, [a, b])
    assert affinity.worker(meta(long + "1"), {1: a, 2: b}, [a, b]) is first


def test_a_workers_load_is_the_sum_of_what_it_holds():
    """choose_worker reads the running total, not a sum per request: it must not drift."""
    from broker.dispatch import Worker
    ready = p.Ready(slot=1, pid=1, credits=16, token=b"", pool=1)
    worker = Worker(b"w", ready, 0.0)
    for i in range(1000):
        worker.hold(b"%d" % i, 0.1 * (i % 7) + 1e-3)
        if i % 3 == 0:
            assert worker.drop(b"%d" % (i // 2))
    assert not worker.drop(b"never given")
    assert worker.load == pytest.approx(sum(worker.jobs.values()))
    for job in list(worker.jobs)[:-1]:
        worker.drop(job)
    assert worker.load == pytest.approx(sum(worker.jobs.values()))
    worker.drop(next(iter(worker.jobs)))
    assert worker.load == 0.0 and not worker.jobs


def test_load_scheduling_switches_the_given_threads_by_load():
    import os
    import threading

    from core.sched import CALM_AFTER, LoadScheduling
    done, started = threading.Event(), threading.Event()
    tid = []

    def idle():
        tid.append(threading.get_native_id())
        started.set()
        done.wait(10)

    thread = threading.Thread(target=idle)
    thread.start()
    try:
        started.wait(5)
        sched = LoadScheduling([tid[0]])
        sched.update(True, 0.0)
        assert os.sched_getscheduler(tid[0]) == os.SCHED_BATCH and sched.batch
        sched.update(False, 1.0)  # calm starts: not yet
        assert os.sched_getscheduler(tid[0]) == os.SCHED_BATCH
        sched.update(True, 1.0 + CALM_AFTER / 2)  # busy again: calm starts over
        sched.update(False, 2.0)
        sched.update(False, 2.0 + 2 * CALM_AFTER)
        assert os.sched_getscheduler(tid[0]) == os.SCHED_OTHER and not sched.batch
        sched.update(True, 3.0)
        sched.relax()
        assert os.sched_getscheduler(tid[0]) == os.SCHED_OTHER
        assert os.sched_getscheduler(0) == os.SCHED_OTHER  # only the given threads
    finally:
        done.set()
        thread.join(5)


def test_broker_deadline_heap_forgets_answered_requests(tmp_path):
    """Answered requests do not pile up in the deadline heap (a burst with long
    deadlines would cost every later request), and a waiting one still expires."""
    import time

    import zmq

    from broker.broker import Broker
    from broker.dispatch import DEADLINES_SLACK
    from conftest import free_port
    config = cfg.load(write(tmp_path, NODE.replace("1025", str(free_port()))
                                      .replace("1026", str(free_port()))))
    ctx = zmq.Context()
    broker = Broker(config, config.nodes[0], ctx)
    try:
        def request(i, timeout):
            meta = p.ExecMeta(name="echo.py", timeout=timeout)
            return p.FrontRequest(b"client", p.EXEC, b"%d" % i, meta, b"")

        broker.accept(request(0, 0.05), batched=True)  # never answered
        waiting = next(iter(broker.jobs))
        for i in range(1, 10 * DEADLINES_SLACK):
            broker.accept(request(i, 60.0), batched=True)
            broker.d.finish(next(reversed(broker.jobs)), p.OK)
        assert len(broker.jobs) == 1
        assert len(broker.d.deadlines) <= 2 * len(broker.jobs) + DEADLINES_SLACK + 1
        broker.d.expire(time.monotonic() + 1.0)
        assert waiting not in broker.jobs
        (client, entries), = broker.outbox.messages()
        assert client == b"client"
        assert entries[-1][1] == p.UNAVAILABLE  # no workers: unavailable
    finally:
        broker.close()
        ctx.term()


# Config: max_message -------------------------------------------------------------

def test_max_message_is_derived_from_the_largest_payload(tmp_path):
    config = cfg.load(write(tmp_path, NODE))
    assert config.max_message == 64 * 1024 * 1024 + 1024 * 1024
    text = "[proxy]\nmax_body = 1000\n" + NODE.replace('data_dir = "var/n1"',
                                                       'data_dir = "var/n1"\nmax_value = 5000000')
    assert cfg.load(write(tmp_path, text)).max_message == 5_000_000 + 1024 * 1024
    text = "[broker]\nmax_message = 80000000\n" + NODE
    assert cfg.load(write(tmp_path, text)).max_message == 80_000_000


@pytest.mark.parametrize("text, words", [
    ("[broker]\nmax_message = 1000\n" + NODE, "too small"),            # below proxy.max_body
    ("[broker]\nmax_message = 67108864\n" + NODE, "too small"),        # no room for headers
    ("[broker]\nmax_message = 2000000\n[proxy]\nmax_body = 1000\n"
     + NODE.replace('data_dir = "var/n1"', 'data_dir = "var/n1"\nmax_value = 3000000'),
     "too small"),                                                     # below a max_value
    ("[broker]\nmax_message = -1\n" + NODE, "must be 0 (derived) or more"),
    ("[broker]\nmax_message = 1.5\n" + NODE, "must be int"),
])
def test_max_message_too_small_names_the_key(tmp_path, text, words):
    with pytest.raises(cfg.ConfigError, match=r"broker\.max_message") as err:
        cfg.load(write(tmp_path, text))
    assert words in str(err.value)


# READY: every field checked ----------------------------------------------------------

def _ready_meta(**fields) -> bytes:
    meta = {"slot": 1, "pid": 1234, "credits": 16, "token": b"t" * 32, "pool": 1000,
            "replaces": 1200, "reason": "killed by SIGKILL", "restarts": 1, "job": b"1f",
            "job_status": "killed", "served": 7, **fields}
    return msgpack.packb({k: v for k, v in meta.items() if v is not ...}, use_bin_type=True)


def test_ready_round_trip_and_the_token_stays_out_of_logs():
    ready = p.Ready(slot=2, pid=99, credits=4, token=b"s" * 32, pool=98, replaces=97,
                    job=b"a", job_status="timeout", served=3)
    assert p.Ready.from_meta(ready.to_frames()[1]) == ready
    assert "sss" not in repr(ready)
    assert p.Ready.from_meta(_ready_meta(job_status="", job=b"")).job_status == ""


@pytest.mark.parametrize("fields", [
    {"pid": "1234"}, {"pid": 1.0}, {"pid": True}, {"pid": 0}, {"pid": 1 << 40},
    {"credits": 16.0}, {"credits": 0}, {"credits": 5000}, {"slot": True}, {"slot": -1},
    {"job": [1, 2]}, {"job": "1f"}, {"job": b"j" * 65}, {"job_status": "ok"},
    {"job_status": "script_error"}, {"job_status": 1}, {"reason": b"x"},
    {"reason": "x" * 2000}, {"token": "t" * 32}, {"token": b"t" * 65}, {"pool": 0},
    {"pool": None}, {"served": -1}, {"restarts": 1 << 63}, {"replaces": -5},
    {"token": ...}, {"pool": ...}, {"slot": ...}, {"extra": 1},
])
def test_ready_refuses_any_field_of_the_wrong_type_or_range(fields):
    with pytest.raises(p.ProtocolError):
        p.Ready.from_meta(_ready_meta(**fields))


def test_ready_refuses_what_is_not_a_map():
    for raw in (b"\xc1", msgpack.packb([1, 2]), msgpack.packb({1: 2}),
                msgpack.packb({b"slot": 1})):
        with pytest.raises(p.ProtocolError):
            p.Ready.from_meta(raw)


# Sizes and batches ---------------------------------------------------------------------

def test_batches_cut_at_the_limit_and_keep_each_peers_order():
    batches = p.Batches(100)
    for i, (peer, size) in enumerate([("a", 60), ("b", 10), ("a", 30), ("a", 20), ("a", 100),
                                      ("b", 90), ("a", 150)]):
        batches.add(peer, i, size)
    messages = batches.messages()
    assert [m for m in messages if m[0] == "a"] == [("a", [0, 2]), ("a", [3]), ("a", [4]),
                                                    ("a", [6])]
    assert [m for m in messages if m[0] == "b"] == [("b", [1, 5])]
    assert not p.Batches(10)


def test_request_bytes_bounds_the_packed_entries():
    meta = p.ExecMeta(name="é.py", code="x = 'ü' * 3", cookie="a=b", id="ab" * 64)
    data = b"d" * 1000
    for entry in (p.job_entry(b"ffffffff", 1e9, meta, data),
                  [1, b"r" * 64, *meta, data]):
        assert len(msgpack.packb(entry, use_bin_type=True)) <= p.request_bytes(meta, data)
    big = [p.job_entry(b"%x" % i, 5.0, meta, data) for i in range(100)]
    assert len(p.jobs_frames(b"w", big)[2]) <= \
        p.BATCH_HEADER + 100 * p.request_bytes(meta, data)


def test_dispatch_cuts_a_workers_batch_to_max_message(tmp_path):
    """Five 600 kB requests waiting when a worker registers: it gets them in
    five messages (two never fit in 1 MiB); small ones still share one."""
    import time

    import zmq

    from broker.broker import Broker
    from conftest import free_port
    text = ("[broker]\nmax_message = 1048576\n[proxy]\nmax_body = 262144\n"
            + NODE.replace("1025", str(free_port())).replace("1026", str(free_port()))
            .replace('data_dir = "var/n1"', 'data_dir = "var/n1"\nmax_value = 262144'))
    config = cfg.load(write(tmp_path, text))
    ctx = zmq.Context()
    broker = Broker(config, config.nodes[0], ctx)
    worker = ctx.socket(zmq.DEALER)
    try:
        worker.setsockopt(zmq.IDENTITY, b"w")
        worker.setsockopt(zmq.MAXMSGSIZE, config.max_message)
        worker.connect(config.nodes[0].workers_endpoint)

        def accept(i, data):
            broker.accept(p.FrontRequest(b"c", p.EXEC, b"%d" % i, p.ExecMeta(name="e.py"), data),
                          batched=True)
        for i in range(5):
            accept(i, bytes([i]) * 600_000)
        worker.send_multipart(p.Ready(slot=1, pid=os.getpid(), credits=16, token=broker.token,
                                      pool=os.getppid()).to_frames())
        deadline = time.monotonic() + 10
        while not broker.workers and time.monotonic() < deadline:
            broker.back.poll(100)
            broker.read_workers()
        assert broker.workers
        broker.dispatch(time.monotonic())
        for i in range(5, 10):
            accept(i, b"small")
        broker.dispatch(time.monotonic())
        got = []
        while len(got) < 6 and worker.poll(5000):
            frames = worker.recv_multipart()
            if frames[0] == p.HEARTBEAT:  # the broker's answer to READY
                continue
            assert frames[0] == p.REQUEST and len(frames[1]) <= config.max_message
            got.append([data for _, _, _, data in p.parse_jobs(frames)])
        assert got == [[bytes([i]) * 600_000] for i in range(5)] + [[b"small"] * 5]
    finally:
        worker.close()
        broker.close()
        ctx.term()


def test_clients_refuse_a_request_larger_than_max_message():
    import asyncio

    from broker.client import AsyncClient, Client
    limit = 1 << 20
    with Client("ipc:///nonexistent/srw.ipc", max_message=limit) as client:
        with pytest.raises(ValueError, match="max_message"):
            client.exec("echo.py", b"x" * limit)
        with pytest.raises(ValueError, match="max_message"):
            client.exec("echo.py", b"", code="#" * limit)

    async def too_big():
        async with AsyncClient("ipc:///nonexistent/srw.ipc", max_message=limit) as client:
            await client.exec("echo.py", b"x" * limit)
    with pytest.raises(ValueError, match="max_message"):
        asyncio.run(too_big())


# The worker token -----------------------------------------------------------------------

def test_worker_token_file_is_fresh_private_and_never_followed(tmp_path):
    from core import trust
    endpoint = f"ipc://{tmp_path}/w.ipc"
    victim = tmp_path / "victim"
    victim.write_bytes(b"mine")
    os.symlink(victim, tmp_path / "w.ipc.token")  # planted: must not be written through
    token = trust.write_worker_token(endpoint)
    assert victim.read_bytes() == b"mine"
    st = os.lstat(trust.token_path(endpoint))
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert len(token) == trust.TOKEN_BYTES and trust.read_worker_token(endpoint) == token
    again = trust.write_worker_token(endpoint)
    assert again != token and trust.read_worker_token(endpoint) == again
    assert trust.token_matches(again, again) and not trust.token_matches(again, token)
    assert not trust.token_matches(b"", b"")
    (tmp_path / "w.ipc").write_bytes(b"socket")
    trust.remove_worker_files(endpoint, token)  # a later broker's: kept
    assert os.path.exists(tmp_path / "w.ipc") and os.path.exists(trust.token_path(endpoint))
    trust.remove_worker_files(endpoint, again)
    assert not os.path.lexists(tmp_path / "w.ipc")
    assert not os.path.lexists(trust.token_path(endpoint))
    with pytest.raises(trust.TokenUnavailable, match="is the node's broker running"):
        trust.read_worker_token(endpoint)
    (tmp_path / "w.ipc.token").write_bytes(b"short")
    with pytest.raises(trust.TokenUnavailable, match="not a 32-byte token"):
        trust.read_worker_token(endpoint)
    with pytest.raises(ValueError):
        trust.token_path("tcp://127.0.0.1:1")


def test_process_alive_sees_exits_and_zombies():
    from core.exits import process_alive
    assert process_alive(os.getpid())
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    import time
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:  # a zombie until reaped
        time.sleep(0.01)
    assert not process_alive(pid)
    os.waitpid(pid, 0)
    assert not process_alive(pid)


def test_throttle_counts_what_it_suppresses():
    from core.logs import Throttle
    throttle = Throttle(1.0)
    assert throttle.allow(10.0) == 0
    assert throttle.allow(10.5) is None and throttle.allow(10.9) is None
    assert throttle.allow(11.0) == 2
    assert throttle.allow(11.1) is None


@pytest.mark.parametrize("content, size", [
    (b"3\n", 3), (b"0\n", 1), (b"999\n", 8), (b"", None), (b"three", None),
    (b"\xff\xfe", None), (b"1" * 10_000, None), (None, None)])
def test_a_kept_pool_size_is_a_small_clamped_number_or_nothing(tmp_path, content, size):
    from runtime.pool import read_size
    path = tmp_path / "pool.size"
    if content is not None:
        path.write_bytes(content)
    assert read_size(path, ceiling=8) == size


def _keep(warm, key, runner) -> list:
    """What the worker does with a runner after its request: the runners retired."""
    return warm.keep(key, runner) if warm.admits(key) else [runner]


def test_warm_runners_a_caller_cycling_code_evicts_its_own():
    from runtime.tenants import WarmRunners, tenant
    warm = WarmRunners(most=3, per_caller=2)
    assert _keep(warm, tenant("bob", "", b"", "b"), "bob's") == []
    retired = []
    for i in range(4):
        retired += _keep(warm, tenant("alice", "", b"", str(i)), f"alice {i}")
    # alice's third and fourth are new when she holds her two: turned away
    assert retired == ["alice 2", "alice 3"] and len(warm) == 3
    # seen lately: kept, and her least recently used goes
    assert _keep(warm, tenant("alice", "", b"", "3"), "alice 3 again") == ["alice 0"]
    assert warm.take(tenant("bob", "", b"", "b")) == "bob's"
    assert warm.take(tenant("bob", "", b"", "b")) is None  # out while it runs
    # past `most` at a tie, the caller just served gives one up; else the busiest
    warm = WarmRunners(most=2, per_caller=2)
    _keep(warm, tenant("a", "", b"", "1"), "a1")
    _keep(warm, tenant("b", "", b"", "1"), "b1")
    assert _keep(warm, tenant("c", "", b"", "1"), "c1") == ["c1"]
    _keep(warm, tenant("a", "", b"", "2"), "a2")
    assert sorted(warm.values()) == ["a2", "b1"]  # a held the most: its oldest went
    assert tenant("x", "n", b"", "c") != tenant("y", "n", b"", "c")  # the caller counts
    assert tenant("x", "ab", b"", "") != tenant("x", "a", b"", "b")  # no two splits alike


def test_warm_runners_a_lone_caller_uses_the_room_others_do_not_need():
    from runtime.tenants import WarmRunners, tenant
    warm = WarmRunners(most=4, per_caller=2)
    for i in range(4):  # past per_caller: no one else needs the room
        assert _keep(warm, tenant("alice", "", b"", str(i)), f"alice {i}") == []
    assert _keep(warm, tenant("alice", "", b"", "4"), "alice 4") == ["alice 4"]  # full
    # bob, under his share, takes room back from the caller holding the most
    assert _keep(warm, tenant("bob", "", b"", "1"), "bob 1") == ["alice 0"]
    assert _keep(warm, tenant("bob", "", b"", "2"), "bob 2") == ["alice 1"]
    # at his share with the set full, bob's new tenant is turned away; alice's
    # two are hers whatever bob does
    assert _keep(warm, tenant("bob", "", b"", "3"), "bob 3") == ["bob 3"]
    assert _keep(warm, tenant("bob", "", b"", "3"), "bob 3") == ["bob 1"]  # seen: his own goes
    assert sorted(warm.values()) == ["alice 2", "alice 3", "bob 2", "bob 3"]


def test_warm_runners_keep_their_tenants_when_more_take_turns():
    """More tenants than warm runners, in turns (LRU's worst case): the runners
    kept stay and are found; the others go after their request."""
    from runtime.tenants import WarmRunners, tenant
    warm = WarmRunners(most=4, per_caller=4)
    found = 0
    for i in range(3 * 16):
        key = tenant("one", "", b"", str(i % 16))
        runner = warm.take(key)
        found += runner is not None
        _keep(warm, key, runner or f"runner {i}")
    assert found == 2 * 4 and len(warm) == 4  # plain LRU: none found


def test_an_exec_caller_is_short_ascii_or_refused():
    good = p.request_frames(p.EXEC, b"r", p.ExecMeta(name="a", caller="node:n1"), b"")
    assert p.FrontRequest.from_frames([b"c", *good]).meta.caller == "node:n1"
    for caller in ("", "x" * (p.MAX_CALLER + 1), "é", 5, b"k"):
        frames = [b"c", msgpack.packb([p.EXEC, b"r", "a", "", "", None, None, caller]), b""]
        with pytest.raises(p.ProtocolError):
            p.FrontRequest.from_frames(frames)
