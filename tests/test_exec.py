"""Exec end to end: real broker, pool and workers over real sockets."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import threading
import time

import psutil


from broker.client import AsyncClient
from runtime import isolation

from conftest import wait_until

ORIGINAL_REPLY = b"its nothing I can do for you without cookies: this is some data in POST request"


def test_cli_runs_the_2011_example(shared_node):
    out = shared_node.run("exec", "test_script.py", "--id", "0123456789", "--data", "-",
                   input=b"this is some data in POST request")
    assert out.returncode == 0, out.stderr
    assert out.stdout == ORIGINAL_REPLY


def test_log_line_per_exec_with_microseconds_and_request_id(node):
    """One line per exec at info (the worker's HotLine), in the file once the
    worker goes idle: no other request comes to push it out."""
    with node.client() as c:
        for size in range(33, 43):
            assert c.exec("test_script.py", b"x" * size).ok
    expected = [f"exec test_script.py {size} B -> {size + 46} B ok" for size in range(33, 43)]

    def all_lines():
        lines = node.log().splitlines()
        return all(any(e in line for line in lines) for e in expected) and lines
    lines = wait_until(all_lines, 5, "a log line per exec")
    for e in expected:
        [line] = [line for line in lines if e in line]  # once each
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} worker n1#\d\[\d+\] INFO "
                            + re.escape(e) + r" \d+ us req [0-9a-f]+", line), line


def test_thousand_concurrent_requests_over_four_workers(make_cluster):
    cluster = make_cluster(pool={"workers": 4}, log_level="warning")
    cluster.serve()

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=30) as client:
            tokens = [os.urandom(8).hex().encode() for _ in range(1000)]
            results = await asyncio.gather(*(client.exec("echo.py", t) for t in tokens))
            return tokens, results

    tokens, results = asyncio.run(asyncio.wait_for(main(), 60))
    assert [r.status for r in results] == ["ok"] * 1000
    assert [r.data for r in results] == tokens
    assert cluster.status()["served"] >= 1000


def test_rebinding_a_global_does_not_leak(make_cluster):
    cluster = make_cluster(pool={"workers": 1},
                           init="counter = 0\nitems = []\n__return_data = 'unused'\n",
                           scripts={"bump.py": """
                               counter = counter + 1
                               secret = "left behind"
                               __return_data = str(counter)
                           """, "look.py": """
                               __return_data = repr((counter, 'secret' in globals()))
                           """})
    cluster.serve()
    with cluster.client() as c:
        assert [c.exec("bump.py").data for _ in range(3)] == [b"1"] * 3
        assert c.exec("look.py").data == b"(0, False)"
        # python.init's __return_data is the starting value
        assert c.exec("").data == b"unused"


def test_script_error_returns_traceback_and_worker_survives(shared_node):
    with shared_node.client() as c:
        pids = {p.pid for p in shared_node.workers()}
        r = c.exec("", code="def f():\n    raise KeyError('nope')\nf()\n")
        assert r.status == "script_error"
        assert "KeyError: 'nope'" in r.error and 'line 2, in f' in r.error
        assert "runtime/" not in r.error  # the script's frames only
        r = c.exec("", code="raise SystemExit(3)")
        assert r.status == "script_error" and "SystemExit" in r.error
        assert c.exec("echo.py", b"still here").data == b"still here"
        assert {p.pid for p in shared_node.workers()} == pids


def test_bad_names_and_unknown_scripts(shared_node):
    with shared_node.client() as c:
        for name in ("../config.toml", "/etc/passwd", ".hidden", "a/b.py", "x\0y",
                     "..", "n" * 10_000):
            r = c.exec(name)
            assert r.status == "bad_request", name
            assert "plain file name" in r.error
        r = c.exec("no_such_script.py")
        assert r.status == "not_found" and "no_such_script.py" in r.error


def test_return_data_types(shared_node):
    with shared_node.client() as c:
        assert c.exec("", code="__return_data = b'\\xff\\x00'").data == b"\xff\x00"
        assert c.exec("", code="__return_data = 'h\\u00e9'").data == "hé".encode()
        r = c.exec("", code="__return_data = 42")
        assert r.status == "script_error" and "str or bytes" in r.error


def test_script_content_runs_before_named_script_in_one_context(shared_node):
    with shared_node.client() as c:
        r = c.exec("test_script.py", b"data", code="__cookie_string = 'sid=1'")
        assert r.data == b"cookie: sid=1: data"


def test_named_script_recompiled_when_changed(shared_node):
    path = shared_node.history / "changing.py"
    with shared_node.client() as c:
        for version in range(3):
            path.write_text(f"__return_data = 'v{version}' + ' ' * {version}\n")
            assert {c.exec("changing.py").data for _ in range(4)} == \
                {f"v{version}".encode() + b" " * version}


def test_sigkill_of_busy_worker_answers_killed_and_refills(make_cluster):
    cluster = make_cluster(pool={"workers": 2, "credits": 1},
                           broker={"request_timeout": 20.0},
                           scripts={"slow.py": "import time\ntime.sleep(10)\n"})
    cluster.serve()
    with cluster.client(timeout=20) as c:
        rid, wait = c.submit("slow.py")
        victim = wait_until(lambda: [p for p in cluster.workers()
                                     if "busy slow.py" in " ".join(p.cmdline())], 5,
                            "a busy worker")[0]
        started = time.monotonic()
        victim.send_signal(signal.SIGKILL)
        result = c.result(rid, wait)
        assert result.status == "killed"
        assert "SIGKILL" in result.error
        assert time.monotonic() - started < 3.0  # far before the 20 s deadline
        wait_until(lambda: len(cluster.workers()) == 2 and cluster.status()["workers"] == 2,
                   10, "pool back at 2 workers")
        assert victim.pid not in {p.pid for p in cluster.workers()}
        assert c.exec("echo.py", b"ok").data == b"ok"
        assert cluster.status()["restarts"] >= 1


async def workers_running(cluster, script: str) -> list:
    """The workers whose title shows them running `script`; up to 5 s for one to."""
    for _ in range(100):
        await asyncio.sleep(0.05)
        busy = [p for p in cluster.workers() if f"busy {script}" in " ".join(p.cmdline())]
        if busy:
            return busy
    return []


def test_requests_held_behind_a_killed_request_run_elsewhere(make_cluster):
    """A worker gets its requests in batches; when it dies running one, the
    requests it held behind that one never started and are run by another."""
    cluster = make_cluster(pool={"workers": 2, "credits": 8},
                           broker={"request_timeout": 20.0},
                           scripts={"slow.py": "import time\ntime.sleep(10)\n"})
    cluster.serve()

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=20) as client:
            # One event-loop turn: one message to the broker, one batch per worker.
            slow = asyncio.ensure_future(client.exec("slow.py"))
            echoes = [asyncio.ensure_future(client.exec("echo.py", b"%d" % i))
                      for i in range(12)]
            busy = await workers_running(cluster, "slow.py")
            assert busy, "no worker ran slow.py"
            victim = busy[0]
            await asyncio.sleep(0.5)  # the other worker answers its share
            held = [e for e in echoes if not e.done()]
            started = time.monotonic()
            victim.send_signal(signal.SIGKILL)
            results = await asyncio.gather(slow, *echoes)
            return held, results, time.monotonic() - started

    held, results, elapsed = asyncio.run(asyncio.wait_for(main(), 60))
    assert held, "no request waited behind slow.py: the test did not test anything"
    assert results[0].status == "killed"
    assert [(r.status, r.data) for r in results[1:]] == [("ok", b"%d" % i) for i in range(12)]
    assert elapsed < 5.0  # requeued at once, not after the 20 s deadline


def test_short_requests_share_a_worker_slow_ones_spread(make_cluster):
    """Dispatch packs requests known to be short onto a worker that is awake, but
    never a slow or unknown script's: a burst of those still runs in parallel."""
    cluster = make_cluster(pool={"workers": 2, "credits": 8}, log_level="warning",
                           scripts={"nap.py": "import time\ntime.sleep(0.4)\n"})
    cluster.serve()

    async def burst(client, name, n):
        started = time.monotonic()
        results = await asyncio.gather(*(client.exec(name, b"%d" % i) for i in range(n)))
        assert [(r.status, r.data) for r in results if name == "echo.py"] == \
            [("ok", b"%d" % i) for i in range(n) if name == "echo.py"]
        assert {r.status for r in results} == {"ok"}
        return time.monotonic() - started

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=20) as client:
            await burst(client, "echo.py", 300)  # echo.py is now known to be short
            first = await burst(client, "nap.py", 4)  # never seen: not packed
            again = await burst(client, "nap.py", 4)  # now known to be slow
            return first, again

    first, again = asyncio.run(asyncio.wait_for(main(), 60))
    assert first < 1.4 and again < 1.4, (first, again)  # 0.8 s on two workers, 1.6 s on one


def test_loaded_broker_and_workers_switch_to_batch_scheduling_and_back(make_cluster):
    """With a backlog the broker and a worker run SCHED_BATCH, every thread of
    them (core.sched); once calm, the default policy again."""
    cluster = make_cluster(pool={"workers": 2}, log_level="warning")
    cluster.serve()
    stop, failures = threading.Event(), []

    def load():
        async def main():
            async with AsyncClient(cluster.node("n1")["broker"], timeout=30) as client:
                for _ in range(2000):  # bounded: ~100 ms a round on this machine
                    if stop.is_set():
                        return
                    results = await asyncio.gather(*(client.exec("echo.py", b"x")
                                                     for _ in range(256)))
                    failures.extend(r for r in results if not r.ok)
        asyncio.run(main())

    def policies(procs):
        return {os.sched_getscheduler(t.id) for proc in procs for t in proc.threads()}

    broker = cluster.processes("srw: broker n1")
    loader = threading.Thread(target=load)
    loader.start()
    try:
        wait_until(lambda: policies(broker) == {os.SCHED_BATCH}, 20,
                   "the loaded broker's batch policy")
        wait_until(lambda: any(policies([w]) == {os.SCHED_BATCH} for w in cluster.workers()),
                   20, "a loaded worker's batch policy")
    finally:
        stop.set()
        loader.join(60)
    assert not loader.is_alive() and not failures
    wait_until(lambda: policies(broker + cluster.workers()) == {os.SCHED_OTHER}, 10,
               "the default policy once calm")


def test_stopped_worker_is_noticed_and_replaced(make_cluster):
    cluster = make_cluster(pool={"workers": 2, "credits": 2},
                           broker={"request_timeout": 20.0},
                           scripts={"nap.py": "import time\ntime.sleep(0.3)\n"})
    cluster.serve()
    with cluster.client(timeout=20) as c:
        victim = cluster.workers()[0]
        victim.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        pending = [c.submit("nap.py") for _ in range(6)]
        results = [c.result(rid, wait) for rid, wait in pending]
        assert time.monotonic() - started < 10
        statuses = {r.status for r in results}
        assert statuses <= {"ok", "killed"}, statuses
        for r in results:
            if r.status == "killed":
                assert "SIGSTOP" in r.error
        wait_until(lambda: cluster.status()["workers"] == 2 and len(cluster.workers()) == 2,
                   10, "pool back at 2 workers")
        assert victim.pid not in {p.pid for p in cluster.workers()}
        assert all(c.exec("echo.py", b"x").ok for _ in range(4))


def test_wall_limit_kills_the_runner_and_answers_timeout(make_cluster):
    cluster = make_cluster(pool={"workers": 1},
                           scripts={"spin.py": """
                               while True:
                                   try:
                                       pass
                                   except BaseException:
                                       pass
                           """})
    cluster.serve()
    with cluster.client() as c:
        assert c.exec("echo.py", b"before").ok
        trusted, runners = cluster.trusted_pids(), {r.pid for r in cluster.runners()}
        started = time.monotonic()
        r = c.exec("spin.py", timeout=1.0)
        assert r.status == "timeout"
        assert time.monotonic() - started < 3
        assert c.exec("echo.py", b"after").data == b"after"
        # the worker killed the spinning runner (spin.py's tenant took the spare) and
        # kept echo.py's warm one; nothing trusted moved
        wait_until(lambda: len(runners - {r.pid for r in cluster.runners()}) == 1, 5,
                   "the spinning runner gone, echo.py's kept")
        assert cluster.trusted_pids() == trusted


def test_full_queue_answers_busy(make_cluster):
    cluster = make_cluster(pool={"workers": 1, "credits": 1}, broker={"queue_limit": 2},
                           scripts={"nap.py": "import time\ntime.sleep(0.5)\n"})
    cluster.serve()
    with cluster.client(timeout=10) as c:
        pending = [c.submit("nap.py") for _ in range(6)]
        statuses = [c.result(rid, wait).status for rid, wait in pending]
    assert statuses.count("busy") >= 3
    assert statuses[0] == "ok"


def test_worker_recycled_after_max_requests_without_losing_requests(make_cluster):
    cluster = make_cluster(pool={"workers": 2, "max_requests": 20}, log_level="warning")
    cluster.serve()

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=20) as client:
            return await asyncio.gather(*(client.exec("echo.py", b"%d" % i) for i in range(200)))

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert [r.data for r in results] == [b"%d" % i for i in range(200)]
    assert {r.status for r in results} == {"ok"}
    assert cluster.status()["restarts"] == 0  # recycling is not a crash


def test_raising_python_init_refuses_to_start(make_cluster):
    cluster = make_cluster(init="x = 1\nraise RuntimeError('no database for you')\n")
    proc = cluster.serve(wait=False)
    code = proc.wait(30)
    err = proc.stderr.read().decode()
    assert code != 0
    assert "RuntimeError: no database for you" in err
    assert "python.init\", line 2" in err
    assert "refuses to start" in err
    # and it did not crash-loop: the pool ran python.init once
    assert err.count("RuntimeError: no database for you") == 1


def test_sighup_reloads_python_init(make_cluster):
    cluster = make_cluster(init="version = 1\n", scripts={"v.py": "__return_data = str(version)"})
    cluster.serve()
    (cluster.history / "python.init").write_text("version = 2\n")
    pool = cluster.processes("srw: pool n1")[0]
    pool.send_signal(signal.SIGHUP)
    with cluster.client() as c:
        wait_until(lambda: c.exec("v.py").data == b"2", 15, "the reloaded context")
        assert pool.is_running()


def test_serve_stops_everything_on_sigterm(node):
    serve = node.procs[0]
    # storage, broker, pool, proxy (which may still be setting its title) and, per
    # worker, its zygote and its spare runners
    spares = isolation.COPY_SPARES
    tree = wait_until(lambda: len(t := node.processes("srw: ")) == 8 + 2 * spares and t, 10,
                      f"storage, broker, pool, proxy, 2 workers, 2 zygotes, {2 * spares} runners")
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(20) == 0
    wait_until(lambda: not any(p.is_running() and p.status() != "zombie" for p in tree), 10,
               "every srw process gone")


def incr_script(nap: float) -> str:
    """Read-modify-write of the counter file the data names, with a nap in between:
    two of them running at once lose an update."""
    return f"""
        import time
        path = __input_binary_data_tuple[0].decode()
        value = int(open(path).read())
        time.sleep({nap})
        open(path, "w").write(str(value + 1))
        __return_data = str(value + 1)
    """


def test_exec_with_an_id_holds_the_id_lock(make_cluster, tmp_path):
    """Read-modify-write scripts on one id lose no update; other ids run in parallel."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    # trusted: the script writes a counter file in tmp_path, which the default profile forbids
    cluster = make_cluster(pool={"workers": 4, "profile": "trusted"}, log_level="warning",
                           scripts={"incr.py": incr_script(0.001)})
    cluster.serve()

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=30) as client:
            return await asyncio.gather(*(
                client.exec("incr.py", str(counter).encode(), id="0123456789" + "0" * (i % 3))
                for i in range(200)))

    results = asyncio.run(asyncio.wait_for(main(), 60))
    assert {r.status for r in results} == {"ok"}
    assert counter.read_text() == "200"
    # the three spellings are one id (trailing zeros): one lock, first come first served
    assert [int(r.data) for r in results] == list(range(1, 201))


def test_id_lock_survives_the_death_of_the_worker_running_its_execs(make_cluster, tmp_path):
    """An id's waiting execs go to the worker that runs the id; when it dies,
    the one it ran is answered killed and the rest still run one at a time,
    in order, elsewhere."""
    counter = tmp_path / "counter"
    counter.write_text("0")
    cluster = make_cluster(pool={"workers": 2, "credits": 8, "profile": "trusted"},
                           broker={"request_timeout": 20.0}, log_level="warning",
                           scripts={"slow_incr.py": incr_script(0.3)})
    cluster.serve()

    async def main():
        async with AsyncClient(cluster.node("n1")["broker"], timeout=20) as client:
            calls = [asyncio.ensure_future(client.exec("slow_incr.py", str(counter).encode(),
                                                       id="abc"))
                     for _ in range(6)]
            busy = await workers_running(cluster, "slow_incr.py")
            assert len(busy) == 1, "the id's execs must run on one worker at a time"
            busy[0].send_signal(signal.SIGKILL)
            return await asyncio.gather(*calls)

    results = asyncio.run(asyncio.wait_for(main(), 60))
    statuses = [r.status for r in results]
    assert statuses[0] == "killed" and statuses[1:] == ["ok"] * 5, statuses
    assert [int(r.data) for r in results[1:]] == [1, 2, 3, 4, 5]
    assert counter.read_text() == "5"


def test_a_runner_that_died_idle_is_replaced_before_the_next_request_reaches_it(shared_node):
    """The request never reached it, so it runs on a new runner: ok, not killed."""
    with shared_node.client() as c:
        assert all(c.exec("echo.py", b"warm").ok for _ in range(4))
        trusted = shared_node.trusted_pids()
        runners = shared_node.runners()  # the warm ones and the spares
        for runner in runners:
            runner.kill()
        psutil.wait_procs(runners, timeout=5)  # SIGKILL lands a moment later
        replies = [c.exec("echo.py", b"after %d" % i) for i in range(4)]
    assert [(r.status, r.data) for r in replies] == [("ok", b"after %d" % i) for i in range(4)]
    assert shared_node.trusted_pids() == trusted


def test_many_scripts_each_get_a_runner_and_the_warm_ones_stay_bounded(make_cluster):
    """A runner per tenant: more scripts than warm runners all answer, the ones
    kept warm are found again (those past the cap, new, did not evict them:
    runtime/tenants.py), and the warm ones stay at the cap."""
    count = 8
    cluster = make_cluster(pool={"workers": 1, "warm_runners": 3, "warm_per_caller": 3},
                           scripts={f"s{i}.py": f"__return_data = '{i}'\n" for i in range(count)})
    cluster.serve()
    with cluster.client() as c:
        for i in list(range(count)) + list(range(3)):
            r = c.exec(f"s{i}.py")
            assert (r.status, r.data) == ("ok", str(i).encode()), (i, r.error)
    status = cluster.status()
    assert status["warm_runners"] == 3 and status["warm_execs"] == {"found": 3, "missed": 8}
    assert len(cluster.runners()) <= 3 + 1 + 4  # warm, a spare, some still dying
