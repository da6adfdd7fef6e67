"""Scripts that fork, spawn threads, exit, crash or signal others."""
from __future__ import annotations

import os

import psutil

from conftest import wait_until

FORK_BOMB = """
import os, errno, time
forked = 0
try:
    while True:
        if os.fork() == 0:
            time.sleep(60)  # CPU-bound children would only make this slow on 2 cores
            os._exit(0)
        forked += 1
except OSError as exc:
    __return_data = f"{forked} {errno.errorcode[exc.errno]}"
"""

THREAD_BOMB = """
import threading, time
started = 0
try:
    while True:
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
        started += 1
except RuntimeError as exc:
    __return_data = f"{started} {exc}"
"""

KILL_EACH = """
import os, errno
out = []
for pid in map(int, __input_binary_data_tuple[0].split()):
    if pid == os.getpid():
        out.append("self")
        continue
    try:
        os.kill(pid, 9)
        out.append("killed")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
__return_data = " ".join(out)
"""

SEGFAULT = "import ctypes\nctypes.string_at(0)\n"


def srw_pids(hostile) -> dict[str, int]:
    c = hostile.cluster
    pids = {"pool": c.processes("srw: pool n1")[0].pid, "broker": c.processes("srw: broker n1")[0].pid}
    pids.update({f"worker{i}": w.pid for i, w in enumerate(c.workers())})
    return pids


def test_fork_bomb(hostile):
    r = hostile.expect("ok", FORK_BOMB)
    forked, err = r.data.decode().split()
    assert err == "EAGAIN" and int(forked) < 24  # the slot's process limit


def test_thread_bomb(hostile):
    r = hostile.expect("ok", THREAD_BOMB)
    assert int(r.data.split()[0]) < 24 and b"can't start new thread" in r.data


def test_os_exit(hostile):
    hostile.expect("killed", "import os\nos._exit(0)\n")


def test_ctypes_segfault(hostile):
    hostile.expect("killed", SEGFAULT, error="SIGSEGV")


def test_killing_the_parent(hostile):
    r = hostile.expect("script_error", "import os\nos.kill(os.getppid(), 9)\n")
    assert "PermissionError" in r.error


def test_killing_the_pool_broker_and_workers(hostile):
    before = srw_pids(hostile)
    data = " ".join(str(pid) for pid in before.values()).encode()
    r = hostile.expect("ok", KILL_EACH, data=data)
    got = r.data.decode().split()
    assert set(got) <= {"EPERM", "self"} and got.count("EPERM") >= len(before) - 1, got
    after = srw_pids(hostile)
    assert after["pool"] == before["pool"] and after["broker"] == before["broker"]


def test_kill_minus_one(hostile):
    before = srw_pids(hostile)
    hostile.run("import os\ntry:\n    os.kill(-1, 9)\nexcept OSError:\n    pass\n")
    hostile.assert_recovered()
    after = srw_pids(hostile)
    assert after["pool"] == before["pool"] and after["broker"] == before["broker"]
    # at most the worker that ran it went; the other one is untouched
    assert len(set(before.values()) & set(after.values())) >= len(before) - 1


def test_leaving_the_process_group(hostile):
    r = hostile.expect("script_error", "import os\nos.setsid()\n")
    assert "PermissionError" in r.error


def test_nothing_left_behind_after_a_bomb(hostile):
    hostile.run(FORK_BOMB)
    hostile.assert_recovered()
    wait_until(lambda: settled_leftovers(hostile) == [], 10, "no process of the bomb left")


def settled_leftovers(hostile) -> list:
    try:
        return leftovers(hostile)
    except (psutil.Error, ProcessLookupError):  # a process went while we looked: look again
        return ["changing"]


def leftovers(hostile) -> list[psutil.Process]:
    """Live processes of the node's sandbox uids other than the runners the
    zygotes keep (each leads its own process group; a script's processes do not)."""
    zygotes = hostile.cluster.processes("srw: zygote n1#")
    runner_uids = {r.uids().real for r in hostile.cluster.runners()} - {0}
    assert runner_uids, "the runners run as uids of their own"
    block = min(runner_uids) // 1000 * 1000  # the node's block of sandbox uids
    rest = []
    for proc in psutil.process_iter(["uids", "status"]):
        if proc.info["uids"] and block <= proc.info["uids"].real < block + 1000 \
                and proc.info["status"] != psutil.STATUS_ZOMBIE:
            rest.append(proc)
    zygote_pids = {z.pid for z in zygotes}
    return [p for p in rest if not (p.ppid() in zygote_pids and os.getpgid(p.pid) == p.pid)]
