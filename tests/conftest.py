"""Test harness: real srw processes on loopback, found and torn down by pid.

``cluster(...)`` writes a config into tmp_path (free loopback ports, its own
history dir), starts ``srw serve`` (or single roles), waits against a
deadline until every pool has registered all its workers, and at teardown
stops everything it started: SIGTERM to the supervisor, then SIGKILL to every
process it ever saw in the tree.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import random
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from broker.client import BrokerUnavailable, Client
from core import security as sec
from core.config import RIGHTS
from core.secrets import write_secret

REPO = Path(__file__).resolve().parent.parent
READY_TIMEOUT = 30.0


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _port_range() -> tuple[int, int]:
    """20000 up to the kernel's ephemeral range; under pytest-xdist (`make test`)
    a slice of it per worker process (gw0, gw1, ...), so that two workers never
    hand out the same port between its check and the moment a node binds it."""
    low, high = 20000, _ephemeral_low() - 1
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if worker.startswith("gw") and count > 1:
        size = (high - low + 1) // count
        low += int(worker[2:]) % count * size
        high = low + size - 1
    return low, high


_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on, below the kernel's ephemeral range.

    A port from that range (what binding port 0 gives) can be taken by any
    outgoing connection between now and the moment a node binds it: a node's
    own connection to its neighbour once did, and the node refused to start."""
    low, high = _port_range()
    for _ in range(1000):
        port = random.randint(low, high)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def _log_start(seconds: float, nodes: int) -> None:
    """With SRW_TEST_STARTS=FILE, a line per cluster made ready: seconds since its
    last `srw` process started, nodes, test id (which tests start nodes, and how
    long it takes: see the README's tests)."""
    path = os.environ.get("SRW_TEST_STARTS")
    if path:
        with open(path, "a") as f:
            f.write(f"{seconds:.3f} {nodes} "
                    f"{os.environ.get('PYTEST_CURRENT_TEST', '?')}\n")


class Cluster:
    def __init__(self, root: Path, nodes: list[dict], pool: dict, broker: dict,
                 scripts: dict[str, str], init: str | None, proxy: dict | None = None,
                 log_level: str = "info", security: dict | None = None,
                 serve: dict | None = None, cluster: dict | None = None):
        self.root = root
        self.serve_settings = serve
        self.cluster_settings = cluster  # [cluster]: engine, seeds
        # CurveZMQ: the node's keys and an "admin" client with every right, which
        # the harness itself uses (status, client()).
        self.security = None
        if security is not None:
            for name in ("server", "scripts", "proxy"):
                sec.write_pair(root / "keys", name)
            self.add_client("admin", RIGHTS)
            self.security = {"curve": True, **security}
        # The secret that seals `srw scripts push`'s map (srw/pushed.py).
        write_secret(root / "keys" / "push.secret")
        self.history = root / "history"
        self.history.mkdir()
        shipped = REPO / "history"
        for f in shipped.iterdir():
            if f.is_file():
                (self.history / f.name).write_bytes(f.read_bytes())
        for name, body in scripts.items():
            (self.history / name).write_text(textwrap.dedent(body))
        if init is not None:
            (self.history / "python.init").write_text(textwrap.dedent(init))
        self.nodes = []
        for spec in nodes:
            name = spec["name"]
            # A node beside a Redis node (spec "redis") has no storage of its own;
            # with spec "search", a storage address for its search front-end.
            store = {"redis": spec["redis"]} if "redis" in spec else {}
            if "redis" not in spec or spec.get("search"):
                store["storage"] = f"tcp://127.0.0.1:{free_port()}"
            self.nodes.append({
                "name": name, "group": spec.get("group", 1), **store,
                "broker": f"tcp://127.0.0.1:{free_port()}",
                "data_dir": f"var/{name}", **{k: v for k, v in spec.items() if k == "ids"}})
        self.pool = {"workers": 2, **pool}
        self.broker = {"request_timeout": 5.0, "heartbeat_interval": 0.2, **broker}
        self.proxy = {"listen": f"127.0.0.1:{free_port()}", **(proxy or {})}
        self.log_file = root / "srw.log"
        self.path = root / "config.toml"
        self.path.write_text(self._toml(log_level))
        self.procs: list[subprocess.Popen] = []
        self.seen: set[psutil.Process] = set()
        self.started = time.monotonic()  # of the last `srw` process

    def _toml(self, log_level: str) -> str:
        def value(v):
            if isinstance(v, bool):
                return "true" if v else "false"
            if isinstance(v, str):
                return f'"{v}"'
            if isinstance(v, (list, tuple)):
                return "[" + ", ".join(value(x) for x in v) + "]"
            return repr(v)

        def table(name, d):
            return f"[{name}]\n" + "".join(f"{k} = {value(v)}\n" for k, v in d.items())

        parts = [table("pool", self.pool), table("broker", self.broker),
                 table("proxy", self.proxy),
                 table("log", {"level": log_level, "file": str(self.log_file)})]
        if self.security is not None:
            parts.append(table("security", {k: v for k, v in self.security.items()
                                            if k != "rights"}))
            parts.append(table("security.rights", self.security.get("rights", {})))
        if self.serve_settings:
            parts.append(table("serve", self.serve_settings))
        if self.cluster_settings:
            parts.append(table("cluster", self.cluster_settings))
        parts += [table("[node]", n) for n in self.nodes]
        return "\n".join(parts)

    # Processes ---------------------------------------------------------------

    def srw(self, *args: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-m", "srw", *args, "--config", str(self.path)],
                                cwd=self.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, **kw)
        self.started = time.monotonic()
        self.procs.append(proc)
        self._track(proc.pid)
        return proc

    def run(self, *args: str, input: bytes | None = None, timeout: float = 30.0):
        """Run a short srw command to completion."""
        return subprocess.run([sys.executable, "-m", "srw", *args, "--config", str(self.path)],
                              cwd=self.root, input=input, capture_output=True, timeout=timeout)

    def serve(self, wait: bool = True) -> subprocess.Popen:
        proc = self.srw("serve")
        if wait:
            self.wait_ready(proc)
        return proc

    def wait_ready(self, proc: subprocess.Popen | None = None, workers: int | None = None):
        want = workers or self.pool["workers"]
        for node in self.nodes:
            def ready():
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"srw exited with {proc.returncode}: "
                                         f"{proc.stderr.read().decode()}\n{self.log()}")
                status = self.status(node["name"])
                return status and status["workers"] >= want
            wait_until(ready, READY_TIMEOUT, f"node {node['name']} with {want} workers")
        self.track_tree()
        _log_start(time.monotonic() - self.started, len(self.nodes))

    def at_full_strength(self) -> bool:
        """serve runs, and each node has its workers registered and no other."""
        if not self.procs or self.procs[-1].poll() is not None:
            return False
        want = self.pool["workers"]
        return all((self.status(n["name"]) or {}).get("workers") == want and
                   len(self.workers(n["name"])) == want for n in self.nodes)

    def add_client(self, name: str, rights: tuple[str, ...] | None) -> Path:
        """A client key pair in keys/clients; returns its .key_secret."""
        return sec.write_pair(self.root / "keys" / "clients", name, rights)

    def curve(self, client: str = "admin") -> sec.Credentials | None:
        """A client's credentials, when the cluster runs with CurveZMQ."""
        if self.security is None:
            return None
        keys = self.root / "keys"
        return sec.Credentials.from_files(keys / "clients" / f"{client}.key_secret",
                                          keys / "server.key")

    def status(self, node: str = "n1") -> dict | None:
        with Client(self.node(node)["broker"], curve=self.curve()) as client:
            try:
                return client.status(timeout=0.5)
            except BrokerUnavailable:
                return None

    def node(self, name: str) -> dict:
        return next(n for n in self.nodes if n["name"] == name)

    def client(self, node: str = "n1", **kw) -> Client:
        return Client(self.node(node)["broker"], **{"curve": self.curve(), **kw})

    def log(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""

    def _track(self, pid: int) -> None:
        try:
            self.seen.add(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass

    def track_tree(self) -> None:
        for proc in self.procs:
            try:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    self.seen.add(child)
            except psutil.NoSuchProcess:
                pass

    def processes(self, title_prefix: str) -> list[psutil.Process]:
        """Live processes of this cluster whose title starts with `title_prefix`."""
        self.track_tree()
        out = []
        for proc in list(self.seen):
            try:
                if not proc.is_running():  # gone for good (psutil checks the start
                    self.seen.discard(proc)  # time): a long-lived node's runners pile up
                elif proc.status() != psutil.STATUS_ZOMBIE and \
                        " ".join(proc.cmdline()).startswith(title_prefix):
                    out.append(proc)
            except psutil.Error:
                pass
        return sorted(out, key=lambda p: p.pid)

    def workers(self, node: str = "n1") -> list[psutil.Process]:
        """The pool's workers (not a zygote a worker has just forked, which wears
        its parent's title for a moment)."""
        titled = self.processes(f"srw: worker {node}#")
        pids = {w.pid for w in titled}
        out = []
        for worker in titled:
            try:
                if worker.ppid() not in pids:
                    out.append(worker)
            except psutil.Error:
                pass
        return out

    def runners(self, node: str = "n1") -> list[psutil.Process]:
        """The processes where scripts run (copy and fork isolation)."""
        return self.processes(f"srw: runner {node}#")

    def trusted_pids(self, node: str = "n1") -> dict[str, int]:
        """The node's processes that no script may touch: pool, broker, storage, workers."""
        pids = {role: self.processes(f"srw: {role} {node}")[0].pid
                for role in ("pool", "broker", "storage")}
        pids.update({f"worker{i}": w.pid for i, w in enumerate(self.workers(node), 1)})
        return pids

    def stop(self) -> None:
        self.begin_stop()
        self.finish_stop()

    def begin_stop(self) -> None:
        """SIGTERM to every serve (and role) started, its whole tree noted."""
        self.track_tree()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def finish_stop(self) -> None:
        """Wait for what begin_stop signalled; SIGKILL every process ever seen."""
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.seen:
            try:
                proc.kill()
            except psutil.Error:
                pass
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()


# Clusters a fixture is done with: SIGTERMed, their wait and SIGKILL still due.
_stopping: list[Cluster] = []


def retire(clusters) -> None:
    """Stop `clusters` in the background of the next test: finish the clusters
    retired before (by then their processes have exited), then SIGTERM these.
    A node's stop (drain, then every process gone) takes 0.3-0.6 s, which the
    suite would otherwise wait for once per cluster."""
    finish_retired()
    for cluster in clusters:
        cluster.begin_stop()
        _stopping.append(cluster)


def finish_retired() -> None:
    while _stopping:
        _stopping.pop().finish_stop()


def pytest_sessionfinish(session, exitstatus):
    finish_retired()  # after the session fixtures retired theirs


@pytest.fixture
def make_cluster(tmp_path):
    made: list[Cluster] = []

    def make(nodes=({"name": "n1"},), pool=None, broker=None, scripts=None, init=None,
             proxy=None, log_level="info", security=None, serve=None) -> Cluster:
        root = tmp_path / f"c{len(made)}"
        root.mkdir()
        cluster = Cluster(root, list(nodes), pool or {}, broker or {}, scripts or {}, init,
                          proxy, log_level, security, serve)
        made.append(cluster)
        return cluster

    yield make
    retire(made)


@pytest.fixture
def node(make_cluster):
    """One node with 2 workers, started and ready."""
    cluster = make_cluster()
    cluster.serve()
    return cluster


@pytest.fixture(scope="session")
def shared_clusters(tmp_path_factory):
    """Running clusters the suite's tests share, one per set of settings: for tests
    that leave a cluster as they found them (they add scripts and keys of their
    own, but kill, stop, resize or reconfigure nothing; they read the log from
    where it was when they began, and no key another test writes).  A cluster found not at
    full strength (serve gone, a worker short or one still retiring: a test did
    disturb it) is stopped and a new one started, so no test depends on another."""
    made: dict[str, Cluster] = {}

    def get(nodes=({"name": "n1"},), pool=None, broker=None, scripts=None, init=None,
            proxy=None, log_level="info", security=None, serve=None,
            with_proxy: bool = False) -> Cluster:
        key = repr((nodes, pool, broker, init, proxy, log_level, security, serve, with_proxy))
        cluster = made.get(key)
        if cluster is not None and not cluster.at_full_strength():
            cluster.stop()
            cluster = None
        if cluster is None:
            root = tmp_path_factory.mktemp("shared")
            cluster = Cluster(root, list(nodes), pool or {}, broker or {}, {}, init,
                              proxy, log_level, security, serve)
            made[key] = cluster
            cluster.serve()
            if with_proxy:
                wait_proxy(cluster)
        for name, body in (scripts or {}).items():  # read again when the file changes
            (cluster.history / name).write_text(textwrap.dedent(body))
        return cluster

    yield get
    retire(made.values())


@pytest.fixture
def shared_node(shared_clusters):
    """The suite's node with 2 workers (see shared_clusters), ready."""
    return shared_clusters()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory):
    """A Redis Cluster (3 masters, 3 replicas: redis_support.RedisNodes) the suite's
    tests share, started once (5-7 s): for modules that kill, move and reconfigure
    nothing in it.  `keys_into(folder)` gives an srw cluster its passwords."""
    from redis_support import RedisNodes
    root = tmp_path_factory.mktemp("redis")
    redis = RedisNodes(root / "nodes", root / "keys")
    try:
        yield redis.start()
    finally:
        redis.stop()


# HTTP proxy --------------------------------------------------------------------

@contextlib.contextmanager
def serving_with_proxy(cluster: Cluster):
    """`srw serve` with its proxy up for the block; stopped after it (retire)."""
    try:
        cluster.serve()
        wait_proxy(cluster)
        yield cluster
    finally:
        retire([cluster])


def proxy_url(cluster: Cluster, path: str = "") -> str:
    return f"http://{cluster.proxy['listen']}{path}"


def wait_proxy(cluster: Cluster, timeout: float = READY_TIMEOUT) -> None:
    """Wait until the proxy of `cluster` accepts connections on its listen port."""
    host, port = cluster.proxy["listen"].rsplit(":", 1)

    def accepting():
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            return True
        except OSError:
            return False
    wait_until(accepting, timeout, f"the proxy on {cluster.proxy['listen']}", interval=0.05)


def proxy_request(cluster: Cluster, method: str, path: str, body: bytes | None = None,
                  headers: dict | None = None, timeout: float = 15.0):
    """One HTTP request to the proxy on a fresh connection: (status, headers, body)."""
    import http.client
    host, port = cluster.proxy["listen"].rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.headers, resp.read()
    finally:
        conn.close()


# Storage nodes and the cluster -----------------------------------------------

def wait_storage(cluster: Cluster, names: list[str] | None = None,
                 timeout: float = READY_TIMEOUT) -> None:
    """Wait until the storage front-end of each named node (default: all) answers."""
    from storage.client import storage_ready
    for node in cluster.nodes:
        if names is None or node["name"] in names:
            wait_until(lambda: storage_ready(node["storage"], 0.5), timeout,
                       f"storage of node {node['name']}")


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything below it at once: a node losing power."""
    root = psutil.Process(proc.pid)
    victims = [root, *root.children(recursive=True)]
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass
    proc.wait(5)

    def gone():
        for victim in victims:
            try:
                if victim.is_running() and victim.status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.Error:
                pass
        return True
    wait_until(gone, 10, f"every process of {proc.pid} gone")


def set_node_keys(cluster: Cluster, name: str, **keys) -> None:
    """Add [[node]] keys the harness does not pass (e.g. max_value, sync) to the config."""
    cluster.node(name).update(keys)
    log_level = next(line.split('"')[1] for line in cluster.path.read_text().splitlines()
                     if line.startswith("level = "))
    cluster.path.write_text(cluster._toml(log_level))


# A fake worker on a node's workers socket ------------------------------------

def workers_endpoint(cluster: Cluster, node: str = "n1") -> str:
    from core.config import load
    return load(cluster.path).node(node).workers_endpoint


class FakeWorker:
    """A peer on a node's workers socket that speaks the protocol by hand.

    `ready(**fields)` is a READY with this broker's token (read from its file,
    as root) and valid fields, each of which may be replaced."""

    def __init__(self, cluster: Cluster, identity: bytes = b"fake#99", node: str = "n1",
                 max_message: int | None = None):
        import zmq
        self.cluster, self.node = cluster, node
        self.endpoint = workers_endpoint(cluster, node)
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity)
        if max_message:
            self.sock.setsockopt(zmq.MAXMSGSIZE, max_message)
        self.sock.connect(self.endpoint)

    def token(self) -> bytes:
        from core.trust import read_worker_token
        return read_worker_token(self.endpoint)

    def ready(self, **fields) -> list[bytes]:
        import msgpack

        from core import protocol as p
        meta = {"slot": 99, "pid": os.getpid(), "credits": 1, "token": self.token(),
                "pool": os.getpid(), **fields}
        return [p.READY, msgpack.packb(meta, use_bin_type=True)]

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def register(self, workers: int, **fields) -> None:
        """READY, then wait until the node counts `workers` workers."""
        self.send(self.ready(**fields))
        wait_until(lambda: (self.cluster.status(self.node) or {}).get("workers") == workers,
                   10, f"{workers} workers with the fake one")

    def recv(self, timeout: float) -> list[bytes] | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return self.sock.recv_multipart()

    def wait_for(self, command: bytes, timeout: float = 10.0) -> list[list[bytes]]:
        """Messages received until one with `command` (included); fails after `timeout`."""
        got = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            frames = self.recv(deadline - time.monotonic())
            if frames is not None:
                got.append(frames)
                if frames[0] == command:
                    return got
        raise AssertionError(f"no {command!r} within {timeout} s; got {[f[0] for f in got]}")

    def close(self) -> None:
        self.ctx.destroy(linger=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# The `pure` marker ----------------------------------------------------------------

# Words in a test's source, or in that of a fixture of ours it uses, that mean
# it starts processes (or reaches a server): such a test is not pure.
PROCESS_WORDS = ("subprocess", "Popen", "os.fork", "Cluster(", "serve(", "make_cluster",
                 "shared_clusters", "redis", "multiprocessing", "zmq.", "socket.")


def _starts_processes(func) -> bool:
    try:
        source = inspect.getsource(func)
    except (OSError, TypeError):
        return True
    return any(word in source for word in PROCESS_WORDS)


def pytest_collection_modifyitems(config, items):
    """`pytest -m pure`: the tests that start no process and open no socket (units,
    parsers, state machines), in seconds.  Conservative: a test that uses any
    fixture of this folder (they start nodes, mounts, browsers) or whose source
    names a process or socket word is not pure; the rest is `-m "not pure"`."""
    tests_dir = str(REPO / "tests")
    for item in items:
        ours = False
        for defs in item._fixtureinfo.name2fixturedefs.values():
            for fixturedef in defs:
                try:
                    ours |= (inspect.getsourcefile(fixturedef.func) or "").startswith(tests_dir)
                except TypeError:
                    ours = True
        function = getattr(item, "function", None)
        if not ours and function is not None and not _starts_processes(function):
            item.add_marker(pytest.mark.pure)
