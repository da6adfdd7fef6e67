"""A real Redis Cluster for tests: redis-server processes on free loopback ports.

``RedisNodes(root, keys, 6).start()`` writes the Redis passwords and
redis.conf into `keys` (as `srw keys redis` does; kept when there), starts six
``redis-server keys/redis.conf --cluster-enabled yes`` (data, config and log
under `root`), joins them with ``redis-cli
--cluster create --cluster-replicas 1`` (3 masters, 3 replicas), and waits,
against a deadline, until every node says ``cluster_state:ok`` and every
replica's link to its master is up (before that a replica cannot take over:
its data is too old).  ``stop`` SIGKILLs every server by pid; the data is
throw-away.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from redis import Redis

from conftest import Cluster, free_port, wait_until
from core import redis_auth
from storage.client import Session

READY_TIMEOUT = 30.0


class RedisNodes:
    def __init__(self, root: Path, keys: Path, count: int = 6, node_timeout_ms: int = 2000):
        self.root, self.keys, self.count = root, keys, count
        self.node_timeout_ms = node_timeout_ms
        if not (keys / redis_auth.CONF).exists():
            redis_auth.write_secrets(keys)
        self.conf = keys / redis_auth.CONF
        self.admin = redis_auth.admin_password(keys)   # the operator's: the tests' own
        self.cli_env = {**os.environ, "REDISCLI_AUTH": self.admin}  # redis-cli logs in
        self.ports = [free_port() for _ in range(count)]
        self.procs: dict[int, subprocess.Popen] = {}

    def keys_into(self, folder: Path) -> None:
        """The Redis passwords and redis.conf into an srw cluster's keys folder."""
        folder.mkdir(parents=True, exist_ok=True)
        for name in (redis_auth.SECRET, redis_auth.ADMIN_SECRET, redis_auth.CONF):
            shutil.copy2(self.keys / name, folder / name)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for port in self.ports]

    def conn(self, port: int, password: str | None = None, **kw) -> Redis:
        """A connection as Redis's default user (the operator), or as `password` says."""
        return Redis("127.0.0.1", port, password=self.admin if password is None else password,
                     socket_timeout=2, socket_connect_timeout=1, decode_responses=True, **kw)

    def start(self) -> "RedisNodes":
        for port in self.ports:
            self._start_server(port)
        for port in self.ports:
            wait_until(lambda: self._answers(port), 10, f"redis-server on {port}")
        subprocess.run(["redis-cli", "--cluster", "create", *self.addresses,
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=READY_TIMEOUT, env=self.cli_env)
        wait_until(self._ready, READY_TIMEOUT, "cluster_state:ok and every replica synced",
                   interval=0.1)
        return self

    def _start_server(self, port: int) -> None:
        folder = self.root / f"redis-{port}"
        folder.mkdir(parents=True)
        # The bus port is set (not port + 10000, maybe taken) and diskless sync
        # starts at once (its default 5 s delay would hold every replica back).
        argv = ["redis-server", str(self.conf), "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-port", str(free_port()), "--dir", str(folder),
                "--save", "", "--appendonly", "no", "--repl-diskless-sync-delay", "0",
                "--cluster-node-timeout", str(self.node_timeout_ms),
                "--logfile", str(folder / "redis.log")]
        self.procs[port] = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                            stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)

    def _answers(self, port: int) -> bool:
        try:
            with self.conn(port) as r:
                return r.ping()
        except OSError:
            return False
        except Exception:  # redis.ConnectionError while it starts
            return False

    def _ready(self) -> bool:
        """Every node sees the whole layout, and every replica has synced."""
        masters = self.count // 2
        for port in self.ports:
            with self.conn(port) as r:
                if r.execute_command("CLUSTER INFO")["cluster_state"] != "ok":
                    return False
                info = r.info("replication")
                if info["role"] == "slave" and info.get("master_link_status") != "up":
                    return False
            shards = self.shards(port)
            if len(shards) != masters or any(len(s["replicas"]) != 1 for s in shards):
                return False
        return True

    # The cluster as it is now ------------------------------------------------------

    def shards(self, port: int | None = None) -> list[dict]:
        """[{"master": addr, "replicas": [addr], "slots": [start, end, ...]}] of live shards."""
        port = port or next(p for p in self.ports if self.alive(p))
        with self.conn(port) as r:
            shards = r.execute_command("CLUSTER", "SHARDS")
        out = []
        for shard in shards:
            if not shard["slots"]:
                continue
            addr = {n["role"]: [] for n in shard["nodes"]}
            for n in shard["nodes"]:
                addr[n["role"]].append(f"{n['ip']}:{n['port']}")
            out.append({"master": addr["master"][0], "replicas": addr.get("replica", []),
                        "slots": shard["slots"]})
        return out

    def keyslot(self, key: str) -> int:
        with self.conn(self.ports[0]) as r:
            return r.execute_command("CLUSTER", "KEYSLOT", key)

    def promoted_at(self, address: str) -> float | None:
        """When the replica at `address` won its failover election (epoch seconds,
        from its log), or None.  Redis logs local time to the millisecond."""
        port = int(address.rsplit(":", 1)[1])
        for line in (self.root / f"redis-{port}" / "redis.log").read_text().splitlines():
            if "Failover election won" in line:
                stamp = " ".join(line.split()[1:5])  # 30 Nov 2026 05:19:41.503
                when = datetime.datetime.strptime(stamp, "%d %b %Y %H:%M:%S.%f")
                return time.mktime(when.timetuple()) + when.microsecond / 1e6
        return None

    def alive(self, port: int) -> bool:
        return self.procs[port].poll() is None

    def kill(self, address: str) -> None:
        """SIGKILL one server: a host losing power."""
        proc = self.procs[int(address.rsplit(":", 1)[1])]
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            proc.wait(max(0.1, deadline - time.monotonic()))


@contextlib.contextmanager
def srw_beside_redis(root: Path, node_timeout: float, scripts: dict | None = None,
                     init: str | None = None, search: bool = False,
                     timeout: float | None = None):
    """(redis nodes, srw cluster, session): a Redis Cluster of six, an srw node
    beside each (with a search front-end if `search`), served; everything
    stopped at the end, by pid."""
    # The Redis passwords where the srw config's [security] redis_secret looks.
    redis = RedisNodes(root / "redis", root / "srw" / "keys",
                       node_timeout_ms=int(node_timeout * 1000))
    srw = None
    try:
        redis.start()
        nodes = [{"name": f"r{i}", "redis": a, "search": search}
                 for i, a in enumerate(redis.addresses)]
        srw = Cluster(root / "srw", nodes, {"workers": 1}, {"request_timeout": 5.0},
                      scripts or {}, init,
                      cluster={"engine": "redis-cluster", "seeds": redis.addresses[:3]})
        srw.serve()
        with Session(srw.path, timeout=timeout) as session:
            yield redis, srw, session
    finally:
        if srw is not None:
            srw.stop()
        redis.stop()
