"""Shared nodes for the hostile-script suite: one node per profile for the run
(per pytest-xdist process), which every case leaves as it found it
(Hostile.expect: the same trusted processes, every worker back, bystanders
served).  Kept for a whole run, a strict node used to lose zygotes to the
kernel's cap on descriptors in flight (runtime/zygote.py, fixed).

Each node runs with the shipped profile's restrictions but small limits
(written into the cluster's own sandbox_profiles/, which is looked up
before the shipped one), so every hostile case ends within seconds.  The
srw process gets a secret in its environment that no script may see.
"""
from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass

import pytest

from conftest import REPO, Cluster, retire, wait_until

SECRET = "srw-test-secret-5f1c0e"
WORKERS = 2
SMALL_LIMITS = {"wall_seconds": 2.0, "cpu_seconds": 1.0, "memory_mb": 320,
                "output_bytes": 1 << 20, "processes": 24, "file_size_mb": 1}


def write_profile(cluster: Cluster, name: str, **limits) -> dict:
    profile = tomllib.loads((REPO / "sandbox_profiles" / f"{name}.toml").read_text())
    profile.update(SMALL_LIMITS, **limits)
    folder = cluster.root / "sandbox_profiles"
    folder.mkdir(exist_ok=True)
    lines = []
    for key, value in profile.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = f'"{value}"'
        elif isinstance(value, list):
            text = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        else:
            text = repr(value)
        lines.append(f"{key} = {text}\n")
    (folder / f"{name}.toml").write_text("".join(lines))
    return profile


@dataclass
class Hostile:
    """A running node under one profile, and the checks every case ends with."""
    cluster: Cluster
    profile: str

    @property
    def fork(self) -> bool:
        return self.profile == "strict"

    def run(self, code: str = "", name: str = "", data: bytes = b"", timeout: float = 10.0):
        with self.cluster.client(timeout=timeout + 10) as c:
            return c.exec(name, data, code=code, timeout=timeout)

    def expect(self, status: str, code: str = "", *, name: str = "", data: bytes = b"",
               error: str | None = None):
        """Run a hostile script and check its status; then the node's trusted processes
        (pool, broker, storage, workers) are the same and it serves at full size."""
        trusted = self.cluster.trusted_pids()
        r = self.run(code, name, data)
        assert r.status == status, (r.status, r.error, r.data[:200])
        if error is not None:
            assert error in (r.error or ""), r.error
        self.assert_recovered(trusted)
        return r

    def assert_recovered(self, trusted: dict[str, int] | None = None):
        wait_until(lambda: len(self.cluster.workers()) == WORKERS
                   and (self.cluster.status() or {}).get("workers") == WORKERS,
                   15, f"pool back at {WORKERS} workers (and nothing else)")
        if trusted is not None:
            assert self.cluster.trusted_pids() == trusted
        for i in range(2 * WORKERS):  # bystanders: each gets its own reply
            r = self.run(name="echo.py", data=b"next %d" % i)
            assert (r.status, r.data) == ("ok", b"next %d" % i), (r.status, r.error)


@pytest.fixture(scope="session")
def hostile_nodes(tmp_path_factory):
    """get(profile): the run's running node under that profile; one found not at
    full strength (a case did disturb it) is stopped and a new one started, so
    no case depends on another."""
    made: dict[str, Hostile] = {}

    def get(profile: str) -> Hostile:
        node = made.get(profile)
        if node is not None and not node.cluster.at_full_strength():
            node.cluster.stop()
            node = None
        if node is None:
            node = made[profile] = Hostile(serve(profile, tmp_path_factory), profile)
        return node
    yield get
    retire([node.cluster for node in made.values()])


@pytest.fixture(params=["default", "strict"])
def hostile(request, hostile_nodes):
    return hostile_nodes(request.param)


def start(profile: str, tmp_path_factory):
    """A node of its own under `profile` for the block (a generator: next() it)."""
    cluster = serve(profile, tmp_path_factory)
    try:
        yield Hostile(cluster, profile)
    finally:
        retire([cluster])


def serve(profile: str, tmp_path_factory) -> Cluster:
    root = tmp_path_factory.mktemp(f"hostile-{profile}")
    cluster = Cluster(root, [{"name": "n1"}], {"workers": WORKERS, "credits": 1,
                                               "profile": profile},
                      {"request_timeout": 10.0}, {}, None, log_level="warning")
    write_profile(cluster, profile)
    data_dir = root / "var" / "n1"
    data_dir.mkdir(parents=True)
    (data_dir / "data.mdb").write_text("the node's data\n")
    os.chmod(data_dir / "data.mdb", 0o644)
    try:
        proc = cluster.srw("serve", env=dict(os.environ, SRW_TEST_SECRET=SECRET))
        cluster.wait_ready(proc)
    except BaseException:
        cluster.stop()
        raise
    return cluster
