"""Operating `srw serve` as one would gunicorn: signals, start-up checks, messages."""
from __future__ import annotations

import errno
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import psutil

from conftest import wait_proxy, wait_until

INIT = """
generation = {generation}
"""
WHICH = "__return_data = str(generation)"
FAIL = """
x = 1
raise RuntimeError("boom " + str(x))
"""


def test_hup_reloads_python_init_and_usr1_reopens_the_log(make_cluster):
    cluster = make_cluster(init=INIT.format(generation=1), scripts={"which.py": WHICH})
    serve = cluster.serve()
    with cluster.client(timeout=5) as client:
        assert client.exec("which.py").data == b"1"
        (cluster.history / "python.init").write_text(INIT.format(generation=2))
        serve.send_signal(signal.SIGHUP)
        wait_until(lambda: client.exec("which.py").data == b"2", 20, "the new python.init")
        assert serve.poll() is None
        assert "python.init reloaded" in cluster.log()

        rotated = cluster.log_file.with_suffix(".1")
        cluster.log_file.rename(rotated)
        serve.send_signal(signal.SIGUSR1)
        wait_until(lambda: cluster.log_file.exists(), 10, "a new log file")

        def workers_log_there():
            assert client.exec("which.py").ok
            return "exec which.py" in cluster.log_file.read_text()
        wait_until(workers_log_there, 10, "the workers' lines in the new log file", 0.2)
        assert serve.poll() is None
    rotations_under_load_lose_no_line(cluster, serve)


def rotations_under_load_lose_no_line(cluster, serve):
    """Two rotations while two clients exec 300 requests: each request's line is
    in one of the files, once (a line buffered at the signal goes to the new file)."""
    sizes = {"a": range(1000, 1150), "b": range(2000, 2150)}
    done = []

    def load(which):
        with cluster.client(timeout=10) as client:
            for size in sizes[which]:
                done.append(client.exec("echo.py", b"x" * size).ok)
    threads = [threading.Thread(target=load, args=(w,)) for w in sizes]
    for thread in threads:
        thread.start()
    for n, suffix in ((100, ".2"), (200, ".3")):
        wait_until(lambda: len(done) >= n, 30, f"{n} execs")
        cluster.log_file.rename(cluster.log_file.with_name(f"srw{suffix}"))
        serve.send_signal(signal.SIGUSR1)
    for thread in threads:
        thread.join(30)
    assert len(done) == 300 and all(done)
    expected = [size for r in sizes.values() for size in r]
    files = [cluster.log_file.with_name(name) for name in ("srw.2", "srw.3", "srw.log")]

    def logged():
        text = "".join(f.read_text() for f in files if f.exists())
        return sorted(int(m) for m in re.findall(r"INFO exec echo\.py (\d+) B ", text))
    wait_until(lambda: set(logged()) >= set(expected), 10, "every exec's line")
    assert logged() == expected  # and none twice
    # The rotations came during the load: lines in more than one file (which ones
    # depends on when the 0.1 s buffers were written).
    assert sum(f.exists() and "INFO exec echo.py" in f.read_text() for f in files) >= 2, \
        "a rotation came after the load"


def test_quit_stops_every_process_at_once_and_leaves_no_pidfile_or_socket(make_cluster):
    """QUIT kills every process at once, and nothing is left that a later
    `kill $(cat pidfile)` or `srw stop` could send to a pid that is not ours."""
    cluster = make_cluster(serve={"pidfile": "srw.pid"})
    serve = cluster.serve()
    pidfile, control = cluster.root / "srw.pid", cluster.root / "var" / "srw.ctl"
    assert pidfile.read_text() == f"{serve.pid}\n" and control.exists()
    tree = [serve.pid] + [c.pid for c in psutil.Process(serve.pid).children(recursive=True)]
    serve.send_signal(signal.SIGQUIT)
    serve.wait(5)
    wait_until(lambda: not any(psutil.pid_exists(pid) and
                               psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                               for pid in tree), 5, "every process of the node gone")
    assert b"SIGQUIT: stopping at once" in serve.stderr.read()
    assert not pidfile.exists() and not control.exists()
    assert log_lines(cluster, "serve", "SIGQUIT: ") == ["SIGQUIT: stopping at once"]


def log_lines(cluster, tag: str, start: str) -> list[str]:
    """The messages of the node's log lines from `tag` (e.g. "serve") that start with `start`."""
    out = []
    for line in cluster.log().splitlines():
        message = line.split(" INFO ", 1)[-1]
        if f" {tag}[" in line and message.startswith(start):
            out.append(message)
    return out


def log_time(line: str) -> float:
    """Seconds of the day of a log line ("2026-12-07 04:27:08,064 ...")."""
    clock = line.split(" ")[1]
    h, m, rest = clock.split(":")
    return int(h) * 3600 + int(m) * 60 + float(rest.replace(",", "."))


def test_every_signal_is_logged_once_and_term_on_an_idle_node_stops_in_order(make_cluster):
    """Each signal serve takes is logged once, by its loop (the handlers only
    record); USR2, which means nothing here, is logged and ignored rather than
    killing serve.  TERM on an idle node: serve's line, then the broker's stop,
    then the workers', then serve's last line; the time between the first and
    the last is in the node's own log (no timing assert: the machine is shared)."""
    cluster = make_cluster(pool={"workers": 1, "max_workers": 2}, log_level="debug")
    serve = cluster.serve()
    for sig in (signal.SIGUSR2, signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU, signal.SIGHUP):
        serve.send_signal(sig)
        name = signal.Signals(sig).name
        wait_until(lambda: log_lines(cluster, "serve", f"{name}: "), 10, f"{name} in the log")
    wait_until(lambda: "python.init reloaded" in cluster.log(), 20, "the reload")
    cluster.wait_ready(serve)
    # The rolled and retired workers gone: one left, whose exit TERM brings.
    [worker] = wait_until(lambda: len(cluster.workers()) == 1 and cluster.workers(), 20,
                          "one worker after the roll")
    assert serve.poll() is None
    serve.send_signal(signal.SIGTERM)
    assert serve.wait(15) == 0
    for name, what in (("SIGUSR2", "ignored (no meaning here)"),
                       ("SIGUSR1", "reopening the log files"),
                       ("SIGTTIN", "one more worker per pool"),
                       ("SIGTTOU", "one worker fewer per pool"),
                       ("SIGHUP", "reloading python.init in every pool"),
                       ("SIGTERM", "draining, then stopping")):
        assert log_lines(cluster, "serve", f"{name}: ") == [f"{name}: {what}"]
    lines = cluster.log().splitlines()

    def first(text: str) -> int:
        return next(i for i, line in enumerate(lines) if text in line)
    term = max(i for i, line in enumerate(lines) if "SIGTERM: draining" in line)
    broker = first("INFO broker n1 stopped")
    worker_exit = first(f"(pid {worker.pid}) exited (retired)")
    last = first("every process stopped")
    assert term < broker < worker_exit < last and first("INFO storage n1 stopped") < last
    took = log_time(lines[last]) - log_time(lines[term])
    print(f"TERM on an idle node: stopped {took:.3f} s after serve logged it")


def test_a_taken_port_or_a_missing_history_dir_stops_serve_with_one_line(make_cluster):
    cluster = make_cluster()
    host, port = cluster.node("n1")["broker"][len("tcp://"):].rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen()
        done = cluster.run("serve", timeout=30)
    assert done.returncode == 2  # a start-up refusal, like a config error: no restart fixes it
    assert done.stdout == b""  # never "ready": the other listener is not our node
    [line] = done.stderr.decode().splitlines()
    assert f"node n1: broker {host}:{port}: cannot listen there" in line
    assert f"pid {psutil.Process().pid}" in line  # who holds it

    for f in cluster.history.iterdir():
        f.unlink()
    cluster.history.rmdir()
    done = cluster.run("serve", timeout=30)
    assert done.returncode == 2
    [line] = done.stderr.decode().splitlines()
    assert "pool.history_dir" in line and "is not a directory" in line


def test_cli_version_and_a_script_error_with_its_file_and_line(shared_node):
    (shared_node.history / "fail.py").write_text(FAIL)
    done = shared_node.run("exec", "fail.py")
    assert done.returncode == 1
    assert b"script_error: RuntimeError: boom 1 (fail.py, line 3)" in done.stderr
    version = subprocess.run([sys.executable, "-m", "srw", "--version"], capture_output=True,
                             timeout=30)
    assert version.returncode == 0 and version.stdout.startswith(b"srw 0.")



SLOW = "import time; time.sleep(0.2); __return_data = 'done'"


def test_term_under_load_answers_every_request(make_cluster):
    """In flight when TERM comes: each request gets its reply (the script's, or
    'unavailable: stopping'), none is left to time out in its client.  The last
    replies went out and were then dropped by the client's socket when the
    connection closed under it, 1 run in 3: the node now stays connected a moment."""
    import asyncio

    from broker.client import AsyncClient
    cluster = make_cluster(scripts={"slow.py": SLOW})
    serve = cluster.serve()

    async def load():
        # A lost reply shows as BrokerUnavailable after 20 s (+ grace): far beyond
        # the node's own stop (its drain is request_timeout, 5 s).
        async with AsyncClient(cluster.node("n1")["broker"], timeout=20) as client:
            calls = [asyncio.ensure_future(client.exec("slow.py")) for _ in range(30)]
            await asyncio.sleep(0.2)
            serve.send_signal(signal.SIGTERM)
            return await asyncio.gather(*calls, return_exceptions=True)
    results = asyncio.run(load())
    failures = [repr(r) for r in results if isinstance(r, Exception)]
    assert not failures, failures[:3]
    statuses = {r.status for r in results}
    assert statuses <= {"ok", "unavailable"} and "ok" in statuses, statuses
    assert serve.wait(15) == 0
    # Every exec a worker ran has its line, written before the worker left
    # (the pool stops its workers with SIGUSR2 once the broker stopped).
    lines = cluster.log().count("INFO exec slow.py 0 B -> 4 B ok")
    assert sum(r.status == "ok" for r in results) <= lines <= len(results)


class SteadyLoad:
    """A ZeroMQ client and an HTTP client exec'ing which.py back to back until
    stopped (60 s at most); every outcome recorded: the data, or what failed."""

    def __init__(self, cluster):
        self.cluster = cluster
        self.outcomes: list[tuple[str, str]] = []  # (via, data or failure)
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._zmq), threading.Thread(target=self._http)]

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        wait_until(lambda: {v for v, _ in self.outcomes} == {"zmq", "http"}, 20, "both clients")
        return self

    def __exit__(self, *exc):
        self.done.set()
        for thread in self.threads:
            thread.join(30)

    def _running(self, deadline: float) -> bool:
        return not self.done.is_set() and time.monotonic() < deadline

    def _zmq(self):
        deadline = time.monotonic() + 60
        with self.cluster.client(timeout=10) as client:
            while self._running(deadline):
                try:
                    r = client.exec("which.py")
                    outcome = r.data.decode() if r.ok else f"{r.status}: {r.error}"
                except Exception as exc:  # recorded, and the test fails on it
                    outcome = f"{type(exc).__name__}: {exc}"
                self.outcomes.append(("zmq", outcome))

    def _http(self):
        deadline = time.monotonic() + 60
        host, port = self.cluster.proxy["listen"].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        while self._running(deadline):
            try:
                conn.request("POST", "/elliptics?exec&name=which.py&id=00", body=b"")
                resp = conn.getresponse()
                body = resp.read().decode()
                outcome = body if resp.status == 200 else f"HTTP {resp.status}: {body}"
            except (OSError, http.client.HTTPException) as exc:
                outcome = f"{type(exc).__name__}: {exc}"
                conn.close()
            self.outcomes.append(("http", outcome))
        conn.close()

    def failures(self) -> list:
        return [o for o in self.outcomes if not o[1].isdigit()]

    def last(self, count: int) -> set[str]:
        return {outcome for _, outcome in self.outcomes[-count:]}


def connect_as(uid: int, path: str) -> int:
    """Connect to a unix socket from a child running as `uid`: 0, or the errno."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgid(uid)
            os.setuid(uid)
            socket.socket(socket.AF_UNIX).connect(path)
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def live_workers(cluster) -> int:
    """The node's live worker count, as the proxy's /status (JSON) shows it."""
    url = f"http://{cluster.proxy['listen']}/status?format=json"
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.load(resp)["nodes"][0]["workers"]


def test_reload_resize_and_stop_under_load_fail_nothing(make_cluster):
    """HUP rolls the pool (new workers READY before old ones retire), TTIN/TTOU
    and `srw resize` change the live count both ways, `srw reload` and `srw
    stop` reach serve through its control socket: under steady ZeroMQ and HTTP
    load, not one request fails.  serve tells systemd READY=1 and STOPPING=1."""
    cluster = make_cluster(init=INIT.format(generation=1), scripts={"which.py": WHICH},
                           pool={"workers": 2, "max_workers": 3},
                           serve={"pidfile": "srw.pid"})
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(cluster.root / "notify"))
    notify.settimeout(30)
    serve = cluster.srw("serve", env=dict(os.environ, NOTIFY_SOCKET=str(cluster.root / "notify")))
    cluster.wait_ready(serve)
    wait_proxy(cluster)
    assert notify.recv(4096).startswith(b"READY=1")
    assert (cluster.root / "srw.pid").read_text() == f"{serve.pid}\n"
    with SteadyLoad(cluster) as load:
        old = {w.pid for w in cluster.workers()}
        (cluster.history / "python.init").write_text(INIT.format(generation=2))
        with cluster.client() as watcher:
            serve.send_signal(signal.SIGHUP)
            live = []

            def rolled():  # the broker's count of live workers, every few ms
                live.append(watcher.status(timeout=5)["workers"])
                return load.last(10) == {"2"} and not old & {w.pid for w in cluster.workers()}
            wait_until(rolled, 20, "every worker of generation 2", 0.002)
        assert min(live) >= 2, live  # the old ones retired only as new ones were READY

        serve.send_signal(signal.SIGTTIN)
        wait_until(lambda: live_workers(cluster) == 3, 10, "3 live workers after TTIN")
        serve.send_signal(signal.SIGTTIN)  # beyond pool.max_workers: stays at 3
        # Sent back to back, the two can reach the pool in either order (seen in CI:
        # TTOU first, 3 -> 2, then TTIN, 2 -> 3): TTOU once the pool refused the 4th.
        wait_until(lambda: "4 workers asked" in cluster.log(), 10, "the pool's refusal of a 4th")
        serve.send_signal(signal.SIGTTOU)
        wait_until(lambda: live_workers(cluster) == 2, 10, "2 live workers after TTOU")
        done = cluster.run("resize", "1")
        assert done.returncode == 0, done.stderr
        assert b"1 node(s) at 1 live workers" in done.stdout
        assert len(cluster.workers()) == 1 or wait_until(
            lambda: len(cluster.workers()) == 1, 10, "the retired workers gone")

        control = cluster.root / "var" / "srw.ctl"
        assert control.stat().st_mode & 0o777 == 0o600
        if os.geteuid() == 0:  # another uid (a script's, say) cannot reach it
            assert connect_as(65534, str(control)) == errno.EACCES
        (cluster.history / "python.init").write_text(INIT.format(generation=3))
        done = cluster.run("reload")
        assert done.returncode == 0 and b"node n1: rolling to generation" in done.stdout, \
            done.stderr
        wait_until(lambda: load.last(10) == {"3"}, 20, "generation 3")
        (cluster.history / "python.init").write_text("raise SystemExit('broken init')")
        done = cluster.run("reload")  # answered once the pool refused: nothing rolls after
        assert done.returncode == 1 and b"broken init" in done.stderr, done
    assert load.last(10) == {"3"}
    assert not load.failures(), load.failures()[:5]
    assert len(load.outcomes) > 100
    assert cluster.run("resize", "9").stderr.startswith(b"srw: a pool takes 1 to 3 workers")

    done = cluster.run("stop", timeout=60)
    assert done.returncode == 0 and done.stdout.endswith(b"srw: stopped\n"), done
    assert serve.wait(5) == 0
    said = [notify.recv(4096).split(b"\n")[0] for _ in range(7)]  # HUP, 2 srw reload, stop
    assert said == [b"RELOADING=1", b"READY=1"] * 3 + [b"STOPPING=1"], said
    assert not (cluster.root / "srw.pid").exists()
    done = cluster.run("reload")
    assert done.returncode == 1 and b"no srw serve" in done.stderr
    notify.close()


def test_a_pool_serve_restarts_keeps_the_size_it_was_given(make_cluster):
    """TTIN and `srw resize` change a pool's size; when the pool dies and serve
    starts it again, it comes back at that size, not at pool.workers."""
    cluster = make_cluster(pool={"workers": 1, "max_workers": 4})
    serve = cluster.serve()
    with cluster.client(timeout=5) as client:
        serve.send_signal(signal.SIGTTIN)
        wait_until(lambda: client.status()["workers"] == 2, 10, "2 workers after TTIN")
        done = cluster.run("resize", "3", "--wait", "10")
        assert done.returncode == 0, done.stderr
        [pool] = pools(serve)
        pool.kill()
        wait_until(lambda: [p.pid for p in pools(serve)] not in ([], [pool.pid]), 10,
                   "serve to start the pool again")
        wait_until(lambda: client.status()["workers"] == 3 and client.exec("echo.py").ok,
                   20, "the restarted pool at 3 workers")
        time.sleep(0.5)  # and no more than that
        assert client.status()["workers"] == 3
    assert "restarted at 3 workers, the size before" in cluster.log()
    assert serve.poll() is None


def pools(serve) -> list[psutil.Process]:
    """serve's live pool processes (a dead one waiting to be reaped is left out)."""
    found = []
    for child in psutil.Process(serve.pid).children():
        try:
            if child.cmdline()[0].startswith("srw: pool"):
                found.append(child)
        except (psutil.Error, IndexError):
            pass
    return found
