"""Sandbox uid blocks: one per node's pool, never shared across deployments on a host."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import set_node_keys, wait_until
from runtime import uids
from runtime.uids import BLOCK, UidsUnavailable

FREE = 3_000_000  # far above any account or process uid on a test machine


def test_each_claim_gets_its_own_block(tmp_path):
    a = uids.claim(FREE, "n1", "/a/config.toml", False, 2, registry=tmp_path)
    b = uids.claim(FREE, "n1", "/b/config.toml", False, 2, registry=tmp_path)
    assert (a.first, b.first) == (FREE, FREE + BLOCK)
    big = uids.claim(FREE, "n3", "/d/config.toml", False, 2 * BLOCK + 1, registry=tmp_path)
    assert (big.first, big.last) == (FREE + 2 * BLOCK, FREE + 5 * BLOCK - 1)  # 3 blocks
    assert all((tmp_path / str(FREE + k * BLOCK)).exists() for k in range(2, 5))
    big.release()
    assert not any((tmp_path / str(FREE + k * BLOCK)).exists() for k in range(2, 5))
    record = json.loads((tmp_path / str(FREE)).read_text())
    assert (record["pid"], record["node"], record["config"]) == (os.getpid(), "n1",
                                                                 "/a/config.toml")
    a.release()
    assert uids.claim(FREE, "n2", "/c/config.toml", False, 2, registry=tmp_path).first == FREE


def test_a_claim_of_a_dead_pool_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    (tmp_path / str(FREE)).write_text(json.dumps({"pid": int(dead), "start": 1,
                                                  "node": "n1", "config": "/old"}))
    assert uids.claim(FREE, "n1", "/new", True, 2, registry=tmp_path).first == FREE


def test_a_configured_block_in_use_is_refused_naming_its_holder(tmp_path):
    uids.claim(FREE, "n1", "/srv/a/config.toml", False, 2, registry=tmp_path)
    with pytest.raises(UidsUnavailable) as err:
        uids.claim(FREE, "n7", "/srv/b/config.toml", True, 2, registry=tmp_path)
    message = str(err.value)
    assert f"{FREE}-{FREE + BLOCK - 1}" in message and "node n7" in message
    assert "node n1 of /srv/a/config.toml" in message and str(os.getpid()) in message


def test_blocks_with_running_processes_or_accounts_are_skipped(tmp_path):
    # uid 0 runs processes here; 65534 (nobody) is an account on Debian
    assert uids.claim(0, "n1", "/a", False, 2, registry=tmp_path).first >= BLOCK
    with pytest.raises(UidsUnavailable) as err:
        uids.claim(0, "n1", "/a", True, 2, registry=tmp_path)
    assert "runs as uid 0" in str(err.value)
    with pytest.raises(UidsUnavailable) as err:
        uids.claim(65000, "n1", "/a", True, 2, registry=tmp_path)
    assert "account" in str(err.value) and "65534" in str(err.value)


@pytest.mark.skipif(os.geteuid() != 0, reason="uid blocks are claimed when started as root")
def test_a_node_configured_onto_a_running_deployments_uids_refuses_to_start(make_cluster):
    first = make_cluster()
    first.serve()
    wait_until(first.runners, 10, "the first deployment's runners")
    # The block's first uid, as the pool logged its claim (a runner's uid tells
    # it only for seat 0 of slot 1, and that runner may have been replaced).
    claimed = wait_until(lambda: re.search(r"\(claimed (\d+)-\d+\)", first.log()), 5,
                         "the pool's claim in the log")
    taken = int(claimed.group(1))
    second = make_cluster()
    set_node_keys(second, "n1", uids=taken)
    proc = second.serve(wait=False)
    assert proc.wait(30) != 0
    err = proc.stderr.read().decode()
    assert "refuses to start" in err and f"{taken}-{taken + BLOCK - 1}" in err
    assert str(first.path) in err  # names the deployment that holds them
