"""What comes back from a runner to its worker besides replies, and where they run."""
from __future__ import annotations

import os

import pytest

from conftest import set_node_keys, wait_until

PRINTS = r"""
import sys
print("plain line from a script")
print("2026-11-29 23:59:59,000 broker n1[1] WARNING \x1b[31mforged\x07")
sys.stderr.write("x" * 100 + "\n" + ("y" * 1000 + "\n") * 100)  # past the 64 KiB budget
"""


def test_script_output_reaches_the_log_marked_escaped_and_bounded(make_cluster):
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    with cluster.client() as c:
        assert c.exec("", code=PRINTS).ok
    log = wait_until(lambda: "more bytes of output not logged" in (t := cluster.log()) and t,
                     10, "the dropped-output line")
    lines = log.splitlines()
    plain = [l for l in lines if l.endswith("sandbox n1#1: plain line from a script")]
    assert plain and " INFO " in plain[0]
    forged = [l for l in lines if "forged" in l]
    assert forged and all("sandbox n1#1: 2026-11-29" in l and "\\x1b[31mforged\\x07" in l
                          for l in forged)
    assert not any(l.startswith("2026-11-29 23:59:59,000 broker") for l in lines)
    logged = sum(1 for l in lines if l.endswith("y" * 1000))
    assert 40 < logged < 100  # 64 KiB of the 100 kB, the rest counted


def test_a_reply_larger_than_a_message_is_output_too_large_even_for_trusted(make_cluster):
    """The trusted profile allows 256 MB of output; a reply that could not reach the
    broker (max_message) is refused where it is made, and the worker stays."""
    cluster = make_cluster(pool={"workers": 1, "profile": "trusted"},
                           broker={"max_message": 2 << 20}, proxy={"max_body": 1 << 20})
    set_node_keys(cluster, "n1", max_value=1 << 20)
    cluster.serve()
    worker = cluster.workers()[0].pid
    with cluster.client(timeout=10) as c:
        r = c.exec("", code="__return_data = b'x' * (3 << 20)")
        assert r.status == "output_too_large" and "output_bytes" in r.error, r.error
        assert c.exec("echo.py", b"after").data == b"after"
    assert [w.pid for w in cluster.workers()] == [worker]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="pinning needs two CPUs")
@pytest.mark.parametrize("pin", [True, False])
def test_copy_isolation_pins_each_worker_and_its_runner_to_a_cpu(make_cluster, pin):
    cluster = make_cluster(pool={"workers": 2, "pin": pin})
    cluster.serve()
    with cluster.client() as c:
        assert all(c.exec("echo.py", b"x").ok for _ in range(4))
    everything = frozenset(os.sched_getaffinity(0))

    def affinities(title: str) -> set[frozenset]:
        return {frozenset(os.sched_getaffinity(p.pid)) for p in cluster.processes(title)}
    cpus = {}
    for slot in (1, 2):
        # The zygote forks and sets up runners on any CPU: a new tenant's fork
        # need not wait for its worker's CPU.
        assert affinities(f"srw: zygote n1#{slot}") == {everything}
        workers = affinities(f"srw: worker n1#{slot}")
        if not pin:
            assert workers | affinities(f"srw: runner n1#{slot}") == {everything}
            continue
        assert len(workers) == 1 and len(cpu := next(iter(workers))) == 1, workers
        cpus[slot] = cpu
        # A runner joins its worker's CPU after its first reply; spares (and runners
        # of one request) stay on any CPU.
        assert affinities(f"srw: runner n1#{slot}") <= {cpu, everything}
    if pin:  # the runners that served the requests have joined (just after replying)
        wait_until(lambda: any(cpu in affinities(f"srw: runner n1#{slot}")
                               for slot, cpu in cpus.items()), 5, "a runner on its worker's CPU")


def test_a_zygote_that_dies_with_a_message_unread_ends_its_worker(make_cluster):
    """A zygote gone with the worker's last message unread resets their socket
    (ECONNRESET): the next request that needs a runner is answered `killed`
    naming the zygote, and the worker is replaced, so the one after is served."""
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    worker = cluster.workers()[0].pid
    zygote = cluster.processes("srw: zygote n1#1")[0]
    with cluster.client(timeout=20) as c:
        zygote.suspend()
        assert c.exec("", b"a", code="__return_data = b'a'").ok  # takes the spare: "T" unread
        zygote.kill()
        wait_until(lambda: zygote.status() == "zombie", 10, "the zygote's death")
        r = c.exec("", b"b", code="__return_data = b'b'")  # no spare left: from the zygote
        assert r.status == "killed" and "zygote of n1#1 failed" in r.error, (r.status, r.error)
        assert wait_until(lambda: c.exec("echo.py", b"next").data == b"next", 20,
                          "a replacement worker")
    assert [w.pid for w in cluster.workers()] != [worker]
