"""The trust boundary: what a script can reach of the node that runs it.

Each case is a hostile script against a node per profile (default, strict);
`expect` checks its status, that the node's trusted processes (pool, broker,
storage, workers) are the same ones, that it is back at full size, and that
bystanders get their own replies.
"""
from __future__ import annotations

import os
import time

import psutil
import pytest

from conftest import wait_until

SLOT_TABLE = """
import sys
# Up the stack to whatever holds the pool's slot table (the worker, in the memory
# this process inherited), then write into it as an attacker would.
found, wrote = 0, 0
frame = sys._getframe()
while frame is not None:
    for value in list(frame.f_locals.values()):
        table = value if type(value).__name__ == "SlotTable" else getattr(value, "slots", None)
        if type(table).__name__ != "SlotTable":
            continue
        found += 1
        for call in (lambda: table.idle(1, 1, 0), lambda: table.busy(2, 1, 0.0, 0, b"\\xff" * 16)):
            try:
                call()
                wrote += 1
            except (ValueError, TypeError, OSError):  # not mapped here
                pass
    frame = frame.f_back
__return_data = "%d %d" % (found, wrote)
"""


def test_the_slot_table_is_out_of_reach(hostile):
    """The pool's slot table is in the memory a runner inherited, but not mapped:
    nothing a script writes reaches the pool's bookkeeping."""
    found, wrote = hostile.expect("ok", SLOT_TABLE).data.split()
    assert int(found) >= 1 and wrote == b"0"


WORKERS_SOCKET = """
import errno, socket
path = __input_binary_data_tuple[0].decode()
out = []
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    out.append("connected")
except OSError as exc:
    out.append(errno.errorcode[exc.errno])
try:
    a, b = socket.socketpair()
    out.append("socketpair")
except OSError as exc:
    out.append(errno.errorcode[exc.errno])
try:
    open(path + ".token", "rb").read()
    out.append("token read")
except OSError as exc:
    out.append(errno.errorcode[exc.errno])
__return_data = " ".join(out)
"""


def workers_socket(cluster) -> str:
    from core.config import load
    return load(cluster.path).node("n1").workers_endpoint.removeprefix("ipc://")


def test_no_script_can_pose_as_a_worker(hostile):
    """The broker's workers socket (and its token) are out of reach: no unix
    sockets at all for scripts, and the socket is root's alone."""
    got = hostile.expect("ok", WORKERS_SOCKET, data=workers_socket(hostile.cluster).encode())
    connect, pair, token = got.data.decode().split()
    assert connect == "EPERM" and pair == "EPERM"
    assert token in ("EACCES", "EPERM", "ENOENT")
    assert hostile.cluster.status()["workers"] == 2


def test_another_deployments_workers_socket_is_out_of_reach(hostile, tmp_path_factory):
    from .conftest import start
    other = start("default", tmp_path_factory)
    try:
        deployment = next(other)
        got = hostile.expect("ok", WORKERS_SOCKET,
                             data=workers_socket(deployment.cluster).encode())
        assert got.data.decode().split()[:2] == ["EPERM", "EPERM"]
        assert deployment.cluster.status()["workers"] == 2
        # separate uid blocks: neither deployment's scripts share a uid with the other's
        mine = {r.uids().real for r in hostile.cluster.runners()}
        theirs = {r.uids().real for r in deployment.cluster.runners()}
        if os.geteuid() == 0:
            assert mine and theirs and {u // 1000 for u in mine}.isdisjoint(
                {u // 1000 for u in theirs})
    finally:
        other.close()


# The sequence number of the request being served, from the runner's own frames,
# and a function writing to the reply pipe (and any other pipe but stdout/stderr).
FIND_SEQ_AND_PIPE = """
import os, stat, struct, sys
frame, seq = sys._getframe(), None
while frame is not None:
    if "request" in frame.f_locals and hasattr(frame.f_locals["request"], "seq"):
        seq = frame.f_locals["request"].seq
    frame = frame.f_back


def to_pipes(message):
    for fd in range(3, 64):
        try:
            if stat.S_ISFIFO(os.fstat(fd).st_mode):
                os.write(fd, message)
        except OSError:
            pass
"""

FORGED_REPLY = FIND_SEQ_AND_PIPE + """
to_pipes(struct.pack("<QBBHIQ", seq, *[int(x) for x in __input_binary_data_tuple[0].split()]))
__return_data = "not this"
"""


@pytest.mark.parametrize("fields, status", [
    ("0 0 0 0 62914560", "output_too_large"),   # claims 60 MB against a 1 MB output_bytes
    ("0 0 0 0 209715200", "output_too_large"),  # claims 200 MB
    ("7 0 0 0 0", "script_error"),              # a status no script can earn
    ("0 0 0 1000000000 0", "script_error"),     # a 1 GB traceback
])
def test_a_reply_written_by_the_script_is_checked_before_it_is_read(hostile, fields, status):
    r = hostile.expect(status, FORGED_REPLY, data=fields.encode())
    assert r.data == b""


EXTRA_REPLY = FIND_SEQ_AND_PIPE + """
forged = b"forged for the next user"
for n in (seq, seq + 1):  # its own reply, then one for the request after it
    to_pipes(struct.pack("<QBBHIQ", n, 0, 0, 0, 0, len(forged)) + forged)
__return_data = "mine"
"""


def test_a_reply_forged_for_the_next_request_never_reaches_it(hostile):
    """Sequence numbers are unpredictable: a reply written for the next request
    matches nothing.  In copy isolation the next request in that runner may
    still fail because of it (README: what copy isolation does not promise);
    it never gets the forged bytes, and the node recovers."""
    trusted = hostile.cluster.trusted_pids()
    assert hostile.run(EXTRA_REPLY).status == "ok"
    after = [hostile.run("__return_data = 'own'") for _ in range(4)]
    assert all(r.data != b"forged for the next user" for r in after)
    if hostile.fork:
        assert [(r.status, r.data) for r in after] == [("ok", b"own")] * 4
    hostile.assert_recovered(trusted)


FORGE_AND_SPIN = FIND_SEQ_AND_PIPE + """
to_pipes(struct.pack("<QBBHIQ", seq, 0, 0, 0, 0, 5) + b"early")
while True:  # answered already: does anything still stop it?
    pass
"""


def test_a_script_that_answers_early_is_still_stopped(hostile):
    """Its own reply, forged, comes back at once; the runner it keeps spinning in
    is replaced once the worker sees it burn CPU with no request in hand."""
    r = hostile.run(FORGE_AND_SPIN)
    assert (r.status, r.data) == ("ok", b"early")
    time.sleep(3.0)  # it would have burnt about 3 s of CPU by now

    def cpu(proc):
        try:
            times = proc.cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system
    assert max([cpu(p) for p in hostile.cluster.runners()] + [0.0]) < 2.0
    hostile.assert_recovered()


@pytest.mark.parametrize("bomb", [
    "x = " + "-" * 200_000 + "1",          # the compiler recurses
    "x = [" + "1," * 3_000_000 + "]",      # a huge constant
    "x = " + "(" * 500 + ")" * 500,        # too deeply nested for the parser
])
def test_compile_bombs_are_compiled_by_the_runner(hostile, bomb):
    trusted = hostile.cluster.trusted_pids()
    r = hostile.run(bomb)
    # The 3-million-item constant takes about the profile's 1 s of CPU to compile:
    # on a slow moment the runner is stopped at its limit, which is a pass too.
    assert r.status in ("ok", "script_error", "memory", "killed", "timeout"), (r.status, r.error)
    hostile.assert_recovered(trusted)


CHILDREN_SPIN = """
import os, time
for _ in range(3):
    if os.fork() == 0:
        while True:
            pass
time.sleep(30)
"""


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_cpu_of_child_processes_counts(make_cluster, profile):
    """Three children spin while the script sleeps: the slot's CPU passes
    cpu_seconds (1 s) long before the wall limit (20 s)."""
    from .conftest import write_profile
    cluster = make_cluster(pool={"profile": profile}, broker={"request_timeout": 30.0},
                           log_level="warning")
    write_profile(cluster, profile, wall_seconds=20.0)
    cluster.serve()
    trusted = cluster.trusted_pids()
    started = time.monotonic()
    with cluster.client(timeout=30) as c:
        r = c.exec("", code=CHILDREN_SPIN, timeout=25)
        assert (r.status, "CPU" in r.error) == ("timeout", True), r.error  # not the wall
        assert time.monotonic() - started < 15
        assert c.exec("echo.py", b"next").data == b"next"
    assert cluster.trusted_pids() == trusted


LOG_FORGERY = """
import os, stat, sys
line = "2026-11-29 23:59:59,000 broker n1[1] WARNING forged by a script"
print(line)
print(line, file=sys.stderr)
sys.stdout.flush()
done = []
for fd in range(0, 64):  # any descriptor it has, but its own reply pipe
    try:
        if fd < 3 or not stat.S_ISFIFO(os.fstat(fd).st_mode):
            os.write(fd, (line + "\\n").encode())
            done.append(fd)
    except OSError:
        pass
    try:
        os.ftruncate(fd, 0)
        done.append(-fd)
    except OSError:
        pass
__return_data = repr(done)
"""


def test_scripts_cannot_forge_or_truncate_the_node_log(hostile):
    before = hostile.cluster.log_file.stat().st_size
    hostile.expect("ok", LOG_FORGERY)
    log = hostile.cluster.log()
    assert len(log.encode()) >= before
    for line in log.splitlines():
        assert not line.startswith("2026-11-29 23:59:59,000 broker"), line


STATE = {
    "fds": "import os\nkept = [os.dup(0) for _ in range(20)]\n",
    "memfd": ("import os\nfd = os.memfd_create('x')\nos.ftruncate(fd, 900 << 10)\n"
              "os.write(fd, b'x' * (900 << 10))\n"),  # file_size_mb here is 1
    "mapping": ("import mmap\nm = mmap.mmap(-1, 150 << 20)\nm[:1] = b'x'\n"
                "import builtins\nbuiltins.kept_map = m\n"),
    "rlimit": "import resource\nresource.setrlimit(resource.RLIMIT_NOFILE, (8, 8))\n",
    "personality": ("import ctypes\nctypes.CDLL(None).personality(0x0040000)\n"),
    "sigmask": "import signal\nsignal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGALRM])\n",
    "timer": "import signal\nsignal.setitimer(signal.ITIMER_REAL, 0.3)\n",
    "handler": "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n",
    "native thread": (
        "import ctypes\nlibc = ctypes.CDLL(None)\n"
        "CB = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p)\n"
        "import builtins\nbuiltins.cb = CB(lambda _: libc.pause())\n"
        "t = ctypes.c_ulong()\nlibc.pthread_create(ctypes.byref(t), None, builtins.cb, None)\n"),
}

PROBE = """
import ctypes, os, resource, signal, time
libc = ctypes.CDLL(None)
time.sleep(float(__input_binary_data_tuple[0] or 0))  # a timer a script left fires now
free = os.dup(0)
os.close(free)
__return_data = repr((free, resource.getrlimit(resource.RLIMIT_NOFILE),
                      libc.personality(0xFFFFFFFF),
                      sorted(signal.pthread_sigmask(signal.SIG_BLOCK, [])),
                      signal.getsignal(signal.SIGALRM) == signal.SIG_DFL))
"""


@pytest.mark.parametrize("left", list(STATE))
def test_state_a_script_leaves_never_reaches_the_next_request(hostile, left):
    baseline = {hostile.run(PROBE).data for _ in range(2)}
    assert len(baseline) == 1, baseline
    trusted = hostile.cluster.trusted_pids()
    r = hostile.run(STATE[left])  # seccomp refuses new rlimits to begin with
    assert r.status == "ok" or (left == "rlimit" and "not allowed" in r.error), r.error
    hostile.assert_recovered(trusted)
    wait = b"0.4" if left == "timer" else b""  # the timer was set to 0.3 s
    after = [hostile.run(PROBE, data=wait) for _ in range(4)]
    assert [(r.status, r.data) for r in after] == [("ok", baseline.pop())] * 4


def test_a_reload_leaves_no_runner_of_the_old_workers(hostile):
    hostile.expect("ok", STATE["sigmask"] + "import signal\n"
                   "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n")
    old = {p.pid for role in ("worker", "zygote", "runner")
           for p in hostile.cluster.processes(f"srw: {role}")}
    pool = hostile.cluster.processes("srw: pool n1")[0]
    pool.send_signal(1)  # SIGHUP: python.init again, every worker replaced
    wait_until(lambda: not old & {p.pid for p in hostile.cluster.processes("srw: ")}, 15,
               "every worker, zygote and runner of before the reload gone")
    hostile.assert_recovered()


QUEUED_MARKER = b"queued-secret-7f3a"

SCAN_FOR_MARKER = """
import collections, gc, sys, time
time.sleep(0.3)
needle = b"queued-" + b"secret-7f3a"
seen, found = set(), False

def look(obj, depth):
    global found
    if isinstance(obj, bytes):
        found = found or (obj is not needle and needle in obj)
        return
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, collections.deque)):
        items = list(obj)
    else:
        items = list(getattr(obj, "__dict__", {}).values())
    for item in items:
        look(item, depth + 1)

frame = sys._getframe()
while frame is not None:  # what the process's own call stack holds
    look(frame.f_locals, 0)
    frame = frame.f_back
for obj in gc.get_objects():
    look(obj, 2)
__return_data = "found" if found else "not found"
"""


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_requests_queued_behind_a_script_are_not_in_its_reach(make_cluster, profile):
    """Two requests in one batch to a node with one worker: the second waits at
    the worker while the first, a script, looks through its memory for it."""
    import asyncio
    from broker.client import AsyncClient
    from .conftest import write_profile
    cluster = make_cluster(pool={"workers": 1, "credits": 4, "profile": profile},
                           log_level="warning")
    write_profile(cluster, profile)
    cluster.serve()

    async def both():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=10) as c:
            return await asyncio.gather(c.exec("", code=SCAN_FOR_MARKER),
                                        c.exec("echo.py", QUEUED_MARKER))
    scan, victim = asyncio.run(both())
    assert (scan.status, scan.data) == ("ok", b"not found"), scan.error
    assert (victim.status, victim.data) == ("ok", QUEUED_MARKER)


HOLD_THREADS = """
import threading, time
threading.stack_size(64 << 10)  # small stacks: the process limit, not memory, stops it
started = 0
try:
    for _ in range(200):
        threading.Thread(target=time.sleep, args=(3,), daemon=True).start()
        started += 1
except RuntimeError:
    pass
time.sleep(1.7)  # the wall limit here is 2 s
__return_data = str(started)
"""


def test_threads_held_in_one_deployment_never_starve_another(hostile, make_cluster):
    """RLIMIT_NPROC counts per uid across the host: with a block of uids each, a
    script holding its slot's process limit cannot stop another deployment's
    runners from starting."""
    from concurrent.futures import ThreadPoolExecutor

    from .conftest import write_profile
    other = make_cluster(pool={"workers": 1, "credits": 1, "profile": hostile.profile},
                         log_level="warning")
    write_profile(other, hostile.profile)
    other.serve()
    with ThreadPoolExecutor(2) as pool, other.client(timeout=10) as c:
        bombs = [pool.submit(hostile.run, HOLD_THREADS) for _ in range(2)]  # both slots
        time.sleep(0.4)
        for _ in range(3):  # each kills its runner: a new one must start meanwhile
            assert c.exec("", code="import os\nos._exit(0)").status == "killed"
            r = c.exec("echo.py", b"still here", timeout=5)
            assert (r.status, r.data) == ("ok", b"still here"), r.error
        results = [b.result() for b in bombs]
    assert [r.status for r in results] == ["ok", "ok"], [r.error for r in results]
    assert all(int(r.data) > 5 for r in results)
