"""A property of the worker: whatever its runner does, the worker survives.

Hypothesis draws what each request's runner does to the worker: random bytes
on its reply pipe, reply headers with any sequence number, status, flags and
lengths, sleeps, deaths by any signal, exits before and after replying, and
children that write to the pipe after the runner is gone.  Each request is
sent on a raw socket; afterwards: every request got exactly one reply, the
workers are the same processes, and none holds more descriptors or children
than before."""
from __future__ import annotations

import json
import os
import time

import psutil
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core import protocol as p
from runtime import channel, isolation

from conftest import wait_until

# Runs the plan in the request's data, in the runner: the serve loop's frame
# holds the reply pipe and the request's sequence number.
PLAN_RUNNER = """
import json, os, struct, sys, time
frame = sys._getframe()
while frame is not None and "res_w" not in frame.f_locals:
    frame = frame.f_back
res_w, seq = frame.f_locals["res_w"], frame.f_locals["request"].seq
REPLY = struct.Struct("<QBBHIQ")

def header(a):
    return REPLY.pack(seq if a["own_seq"] else a["seq"], a["status"], a["flags"], 0,
                      a["error_len"], a["data_len"]) + bytes.fromhex(a["body"])

def do(a):
    kind = a["do"]
    if kind == "write":
        os.write(res_w, bytes.fromhex(a["bytes"]))
    elif kind == "reply":
        os.write(res_w, header(a))
    elif kind == "sleep":
        time.sleep(a["s"])
    elif kind == "kill":
        os.kill(os.getpid(), a["sig"])
    elif kind == "exit":
        os._exit(a["code"])
    elif kind == "late":
        if os.fork() == 0:
            time.sleep(a["s"])
            try:
                os.write(res_w, header(a) if a["valid"] else bytes.fromhex(a["body"]))
            finally:
                os._exit(0)

for action in json.loads(__input_binary_data_tuple[0]):
    do(action)
__return_data = "done"
"""

STOPPING = (19, 20)  # SIGSTOP, SIGTSTP: the request's deadline ends them
TIMEOUT = 0.4        # seconds per request
REPLY_WAIT = 3.0     # seconds for a reply (the deadline, the kill, the next runner)

hex_bytes = st.binary(max_size=64).map(bytes.hex)
header_fields = dict(
    own_seq=st.booleans(), seq=st.integers(0, 2**64 - 1), status=st.integers(0, 255),
    flags=st.integers(0, 255), error_len=st.sampled_from([0, 5, 1 << 16, 2**32 - 1]),
    data_len=st.sampled_from([0, 4, 1 << 30, 2**64 - 1]), body=hex_bytes)
action = st.one_of(
    st.fixed_dictionaries({"do": st.just("write"), "bytes": hex_bytes}),
    st.fixed_dictionaries({"do": st.just("reply"), **header_fields}),
    st.fixed_dictionaries({"do": st.just("sleep"), "s": st.sampled_from([0, 0.01, 0.05])}),
    st.fixed_dictionaries({"do": st.just("kill"),
                           "sig": st.integers(1, 64).filter(lambda s: s not in STOPPING)}),
    st.fixed_dictionaries({"do": st.just("exit"), "code": st.integers(0, 255)}),
    st.fixed_dictionaries({"do": st.just("late"), "s": st.sampled_from([0, 0.02, 0.1]),
                           "valid": st.booleans(), **header_fields}),
)
plans = st.lists(st.lists(action, max_size=4), min_size=1, max_size=3)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def children(pid: int) -> int:
    return len(psutil.Process(pid).children())


def exec_frames(rid: bytes, plan: list) -> list[bytes]:
    meta = p.ExecMeta(code=PLAN_RUNNER, timeout=TIMEOUT)
    return p.request_frames(p.EXEC, rid, meta, json.dumps(plan).encode())


def test_a_hostile_runner_never_takes_its_worker_down(hostile):
    cluster = hostile.cluster
    hostile.assert_recovered()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.node("n1")["broker"])
    counter = iter(range(10**6))

    def settle():
        """The plan runner's tenant warm in each worker, as after any example."""
        for i in range(4):
            sock.send_multipart(exec_frames(b"settle %d" % i, []))
            assert sock.poll(REPLY_WAIT * 1000)
            assert p.parse_reply(sock.recv_multipart())[1].status == "ok"

    settle()
    workers = {w.pid: (open_fds(w.pid), children(w.pid)) for w in cluster.workers()}
    try:
        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(plans)
        def each_request_answered_once(batch):
            replies: dict[bytes, list[str]] = {}
            for plan in batch:
                rid = b"r%d" % next(counter)
                sock.send_multipart(exec_frames(rid, plan))
                if sock.poll(REPLY_WAIT * 1000):
                    got, result = p.parse_reply(sock.recv_multipart())
                    replies.setdefault(got, []).append(result.status)
                assert rid in replies, f"no reply to {plan}"
            time.sleep(0.05)  # a second reply would be on its way by now
            while sock.poll(0):
                got, result = p.parse_reply(sock.recv_multipart())
                replies.setdefault(got, []).append(result.status)
            assert all(len(statuses) == 1 for statuses in replies.values()), replies
            assert {w.pid for w in cluster.workers()} == set(workers)

        each_request_answered_once()
        hostile.assert_recovered()
        settle()
    finally:
        sock.close()
        ctx.term()
    assert {w.pid for w in cluster.workers()} == set(workers)
    # What the last requests' runners left (orphans, their pipes) is gone shortly;
    # the spares forked meanwhile may wait with their two pipe ends each (the
    # worker takes in every runner the zygote has sent).
    spares = isolation.FORK_SPARES if hostile.fork else isolation.COPY_SPARES
    for pid, (fds, kids) in workers.items():
        wait_until(lambda: open_fds(pid) <= fds + 2 * spares and children(pid) <= kids, 5,
                   f"worker {pid} back to {fds} descriptors (+ {spares} spares' 2) and "
                   f"{kids} children")
    assert channel.REPLY.size == 24  # the layout the plan runner packs
