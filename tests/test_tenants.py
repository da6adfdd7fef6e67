"""A runner per tenant: one caller's script never meets another caller's request.

A tenant is (caller, digest of the code): a runner serves one tenant only.
The hook below is what a hostile caller plants: a module that outlives the
request in its runner and records every later request it sees there."""
from __future__ import annotations

import ast
import os
import time

import psutil
import pytest

from conftest import Cluster, proxy_request, retire, wait_proxy, wait_until

HOOK = """
import os, sys
seen = sys.modules.setdefault("planted_hook", [])  # outlives the request in this runner
seen.append(__input_binary_data_tuple[0].decode())
__return_data = repr((os.getpid(), seen))
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="a uid and cgroup per runner need root")


def planted(result) -> tuple[int, list[str]]:
    assert result.status == "ok", (result.status, result.error)
    return ast.literal_eval(result.data.decode())


@pytest.fixture(scope="module")
def curve_node(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("tenants-curve"), [{"name": "n1"}],
                      {"workers": 1, "warm_runners": 3, "warm_per_caller": 2}, {},
                      {"hook.py": HOOK}, None, security={})
    cluster.add_client("alice", ("exec", "code"))
    cluster.add_client("bob", ("exec", "code"))
    cluster.srw("serve")
    cluster.wait_ready()
    wait_proxy(cluster)
    yield cluster
    retire([cluster])


def test_callers_never_share_a_runner_with_curve(curve_node):
    """Same code, named or sent, from alice, bob and the proxy: three tenants."""
    c = curve_node
    with c.client(curve=c.curve("alice")) as alice, c.client(curve=c.curve("bob")) as bob:
        for run in (lambda who, data: who.exec("", data, code=HOOK),
                    lambda who, data: who.exec("hook.py", data)):
            a_pid, a_seen = planted(run(alice, b"alice 1"))
            b_pid, b_seen = planted(run(bob, b"bob 1"))
            assert b_seen == ["bob 1"] and b_pid != a_pid
            assert planted(run(alice, b"alice 2")) == (a_pid, ["alice 1", "alice 2"])
            assert planted(run(bob, b"bob 2")) == (b_pid, ["bob 1", "bob 2"])
        status, _, body = proxy_request(c, "POST", "/elliptics?exec&name=hook.py", b"http 1")
        assert status == 200
        http_pid, http_seen = ast.literal_eval(body.decode())
        assert http_seen == ["http 1"] and http_pid not in (a_pid, b_pid)


def test_a_caller_cycling_code_evicts_only_its_own_warm_runners(curve_node):
    c = curve_node
    with c.client(curve=c.curve("alice")) as alice, c.client(curve=c.curve("bob")) as bob:
        b_pid, _ = planted(bob.exec("", b"bob before", code=HOOK + "# bob's\n"))
        for i in range(5):  # past warm_per_caller (2), and past warm_runners (3)
            planted(alice.exec("", b"alice %d" % i, code=HOOK + f"# {i}\n"))
        pid, seen = planted(bob.exec("", b"bob after", code=HOOK + "# bob's\n"))
        assert (pid, seen) == (b_pid, ["bob before", "bob after"])
        status = c.status()
    assert status["warm_runners"] <= 3
    assert status["warm_execs"]["found"] >= 1 and status["warm_execs"]["missed"] >= 6


def test_without_curve_code_keeps_callers_apart(make_cluster):
    """Every caller is "local": a runner serves one piece of code, whoever sends it."""
    cluster = make_cluster(pool={"workers": 1}, scripts={"hook.py": HOOK})
    cluster.serve()
    with cluster.client() as c:
        pid, _ = planted(c.exec("", b"x 1", code=HOOK))
        other_pid, seen = planted(c.exec("", b"y 1", code=HOOK + "# another\n"))
        assert seen == ["y 1"] and other_pid != pid
        named_pid, seen = planted(c.exec("hook.py", b"z 1"))
        assert seen == ["z 1"] and named_pid not in (pid, other_pid)
        assert planted(c.exec("", b"x 2", code=HOOK)) == (pid, ["x 1", "x 2"])
        assert planted(c.exec("hook.py", b"z 2")) == (named_pid, ["z 1", "z 2"])
        # New bytes under the same name (an edit or a push): a new tenant, though
        # the worker keeps the digests of tenants it has seen.
        (cluster.history / "hook.py").write_text(HOOK + "# edited\n")
        edited_pid, seen = planted(c.exec("hook.py", b"z 3"))
        assert seen == ["z 3"] and edited_pid not in (pid, other_pid, named_pid)


LEAK = """
import os
os.open("/dev/null", os.O_RDONLY)  # left open
__return_data = str(os.getpid())
"""


def test_what_a_request_left_is_judged_when_its_tenant_comes_again(make_cluster):
    """A runner checks what a request left when the next request of its tenant
    comes, not after the reply: that request still runs there (the same
    caller's same code), and the runner is replaced after it."""
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    with cluster.client() as c:
        pids = []
        for _ in range(3):
            r = c.exec("", code=LEAK)
            assert r.ok, r.error
            pids.append(int(r.data))
    assert pids[0] == pids[1] != pids[2]
    wait_until(lambda: "stale after the last request: the script left files open"
               in cluster.log(), 5, "the runner's word on why it is stale, logged")


PROBE = """
import ctypes, errno, os, signal
target = int(__input_binary_data_tuple[0])
out = []
for sig in (0, signal.SIGSTOP, signal.SIGKILL):
    try:
        os.kill(target, sig)
        out.append("signalled")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
libc = ctypes.CDLL(None, use_errno=True)
PTRACE_ATTACH = 16
out.append("traced" if libc.ptrace(PTRACE_ATTACH, target, 0, 0) == 0
           else errno.errorcode[ctypes.get_errno()])
for name in ("mem", "environ", "status", "cmdline"):
    try:
        with open("/proc/%d/%s" % (target, name), "rb") as f:
            f.read(1)
        out.append("read")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
__return_data = " ".join(out)
"""


@needs_root
def test_another_tenants_warm_runner_is_out_of_reach(make_cluster):
    """Signal, ptrace and /proc of a warm runner of the same slot, from another
    tenant: refused; the two run as different uids in different cgroups."""
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    with cluster.client() as c:
        victim, _ = planted(c.exec("", b"victim", code=HOOK))
        r = c.exec("", str(victim).encode(), code=PROBE)
        assert r.status == "ok", r.error
        signals, trace, files = r.data.decode().split()[:3], r.data.split()[3], r.data.split()[4:]
        assert signals == ["EPERM"] * 3, r.data
        assert trace != b"traced" and all(f != b"read" for f in files), r.data
        assert planted(c.exec("", b"victim again", code=HOOK)) == (victim,
                                                                   ["victim", "victim again"])
    runners = cluster.runners()
    assert len({r.uids().real for r in runners}) == len(runners) > 1
    assert all(r.uids().real != 0 for r in runners)
    cgroups = [cgroup_of(r.pid, "pids") for r in runners]
    assert len(set(cgroups)) == len(cgroups) and all("/seat" in g for g in cgroups), cgroups


def cgroup_of(pid: int, controller: str) -> str:
    with open(f"/proc/{pid}/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if controller in controllers.split(","):
                return path
    return ""


def test_runners_are_counted_in_status(make_cluster):
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    with cluster.client() as c:
        for i in range(3):
            assert c.exec("echo.py", b"%d" % i).ok
    status = cluster.status()
    assert status["warm_runners"] == 1 and status["worker_rows"][0]["warm_runners"] == 1
    assert status["warm_execs"] == {"found": 2, "missed": 1}
    assert psutil.pid_exists(cluster.workers()[0].pid)


def test_each_tenant_keeps_to_one_worker_so_the_node_keeps_more_warm(make_cluster):
    """Two workers keeping two runners warm each, four tenants one at a time in
    turn: each goes to its own worker (broker/affinity.py), so after their first
    request all are found warm.  Spread by load alone, all four would go to
    the first idle worker and evict each other there."""
    cluster = make_cluster(pool={"workers": 2, "warm_runners": 2, "warm_per_caller": 2},
                           scripts={f"s{i}.py": f"__return_data = '{i}'\n" for i in range(4)})
    cluster.serve()
    with cluster.client() as c:
        for _ in range(3):
            for i in range(4):
                r = c.exec(f"s{i}.py")
                assert (r.status, r.data) == ("ok", str(i).encode()), (i, r.error)
    status = cluster.status()
    assert status["warm_execs"] == {"found": 8, "missed": 4}, status["warm_execs"]
    assert sorted(row["warm_runners"] for row in status["worker_rows"]) == [2, 2]


def test_only_a_node_may_name_the_caller_it_relays_for(curve_node):
    """The relay field is hostile input from anyone but the nodes' own key:
    alice naming bob as the caller is refused, and nothing runs."""
    import zmq

    from core import protocol as p
    c = curve_node
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    c.curve("alice").apply(sock)
    sock.connect(c.node("n1")["broker"])
    try:
        bob = c.curve("bob").public.decode()
        meta = p.ExecMeta(code=HOOK, caller=bob)
        sock.send_multipart(p.request_frames(p.EXEC, b"r1", meta, b"as bob"))
        assert sock.poll(10_000)
        rid, result = p.parse_reply(sock.recv_multipart())
        assert (rid, result.status) == (b"r1", "forbidden")
        assert "only a node" in result.error
    finally:
        sock.close()
        ctx.term()


SLEEP = "import time; time.sleep(float(__input_binary_data_tuple[0]))"


def test_requests_queued_together_are_written_ahead_only_to_their_own_tenant(curve_node):
    """A worker writes a runner the requests queued behind its current one while it
    runs it, but only those of the same caller and code: alice's and bob's requests
    queued in one worker, interleaved, each land in their own tenant's runner."""
    c = curve_node
    code = HOOK + "# queued together\n"
    with c.client(curve=c.curve("alice"), timeout=20) as alice, \
            c.client(curve=c.curve("bob"), timeout=20) as bob:
        hold = alice.submit("", b"0.5", code=SLEEP)  # the one worker is busy: the rest queue
        sent = [(who, data, who.submit("", data, code=code)) for who, data in
                [(alice, b"alice 1"), (alice, b"alice 2"), (bob, b"bob 1"),
                 (alice, b"alice 3"), (bob, b"bob 2")]]
        assert alice.result(*hold).ok
        seen = {}
        for who, data, handle in sent:
            pid, lines = planted(who.result(*handle))
            seen.setdefault(who is alice, set()).add(pid)
            assert lines[-1] == data.decode()
            assert all(line.startswith("alice" if who is alice else "bob") for line in lines)
        assert len(seen[True]) == len(seen[False]) == 1 and seen[True] != seen[False]


CLOCK = "import time\n__return_data = repr(time.monotonic())  # %s\n"


def test_a_tenants_queued_requests_run_together_but_an_ids_stay_in_order(curve_node):
    """A worker writes a runner every request queued for its tenant, not only those
    right behind the current one, and runs them next: code a's second request runs
    before code b's, sent before it.  Requests with an id never run before one
    sent earlier: its lock's order holds across tenants.  (One client: its
    requests reach the broker in the order sent.)"""
    c = curve_node
    with c.client(curve=c.curve("alice"), timeout=20) as alice:
        def ran_at(rid):
            hold = alice.submit("", b"0.5", code=SLEEP)  # the one worker is busy: they queue
            handles = [alice.submit("", b"", code=CLOCK % tenant, id=rid) for tenant in "aba"]
            assert alice.result(*hold).ok
            results = [alice.result(*handle) for handle in handles]
            assert all(r.ok for r in results), [r.error for r in results]
            return [float(r.data) for r in results]

        a1, b1, a2 = ran_at(None)
        assert a1 < a2 < b1
        a1, b1, a2 = ran_at("0123")
        assert a1 < b1 < a2


def test_a_runner_that_dies_answers_the_requests_written_ahead_to_it_killed(make_cluster):
    """Written ahead, a request has started: if its runner dies first, it is
    answered `killed`, never run again elsewhere; the worker goes on."""
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    code = ("import os, time\n"
            "if __input_binary_data_tuple[0] == b'die':\n"
            "    time.sleep(0.2)\n"
            "    os.kill(os.getpid(), 9)\n"
            "__return_data = __input_binary_data_tuple[0]\n")
    worker = cluster.workers()[0].pid
    with cluster.client(timeout=20) as c:
        hold = c.submit("", b"0.5", code=SLEEP)
        die = c.submit("", b"die", code=code)
        behind = [c.submit("", b"after %d" % i, code=code) for i in range(3)]
        assert c.result(*hold).ok
        assert c.result(*die).status == "killed"
        results = [c.result(*handle) for handle in behind]
        assert [r.status for r in results] == ["killed"] * 3, [r.error for r in results]
        assert all("replaced before it answered" in r.error for r in results)
        assert c.exec("", b"next", code=code).data == b"next"
    assert [w.pid for w in cluster.workers()] == [worker]


def test_requests_written_ahead_are_never_run_again_after_their_worker_dies(make_cluster):
    """The slot record names the last request written to the runner, so when the
    worker dies the broker counts those written ahead as started: answered
    `killed`, not handed to the replacement to run a second time."""
    cluster = make_cluster(pool={"workers": 1})
    cluster.serve()
    worker = cluster.workers()[0]
    with cluster.client(timeout=20) as c:
        hold = c.submit("", b"0.5", code=SLEEP)
        chain = [c.submit("", data, code=SLEEP + "\n# chain\n")
                 for data in (b"3", b"0", b"0")]
        assert c.result(*hold).ok
        time.sleep(0.5)  # the first of the chain sleeps 3 s, the others written behind it
        worker.kill()
        results = [c.result(*handle) for handle in chain]
    assert [r.status for r in results] == ["killed"] * 3, [r.error for r in results]
