"""HTTP data API: upload, read, remove through the proxy, on real storage nodes.

These need ``storage.client.Session.write/read/remove`` (and the storage
front-end that `srw serve` starts for them), which come from the storage
branch.  On a build without them the whole module is reported as skipped,
with that reason; once they exist it runs.
"""
from __future__ import annotations

import dataclasses
import os

import pytest

from conftest import Cluster, wait_proxy, serving_with_proxy
from conftest import proxy_request as request
from storage.client import Session

pytestmark = pytest.mark.skipif(
    not all(hasattr(Session, m) for m in ("write", "read", "remove")),
    reason="needs the storage branch: storage.client.Session.write/read/remove")

MAX_BODY = 65536


def upload(cluster, key: str, data: bytes):
    return request(cluster, "POST", f"/elliptics?upload&name={key}", data)


def read(cluster, key: str):
    return request(cluster, "GET", f"/elliptics?name={key}")


def remove(cluster, key: str):
    return request(cluster, "DELETE", f"/elliptics?name={key}")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Two groups, one node each, behind `srw serve`."""
    cluster = Cluster(tmp_path_factory.mktemp("data"),
                      [{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                      {"workers": 1}, {}, {}, None, {"max_body": MAX_BODY})
    with serving_with_proxy(cluster):
        yield cluster


def test_upload_read_remove_round_trip(data):
    status, _, body = upload(data, "greeting", b"hello over http")
    assert status == 200, body
    assert b"group 1 node n1: ok" in body and b"group 2 node n2: ok" in body
    status, headers, body = read(data, "greeting")
    assert (status, body) == (200, b"hello over http")
    assert headers["Content-Length"] == str(len(b"hello over http"))
    status, _, body = remove(data, "greeting")
    assert status == 200, body
    status, _, body = read(data, "greeting")
    assert status == 404 and b"greeting" in body
    assert remove(data, "greeting")[0] == 404


def test_binary_values_and_keys_with_odd_characters(data):
    value = bytes(range(256)) * 64 + os.urandom(1000)
    key = "dir/sub%20dir/%E2%9C%93.bin"   # "dir/sub dir/✓.bin"
    assert upload(data, key, value)[0] == 200
    assert read(data, key)[2] == value
    assert upload(data, key, b"")[0] == 200     # an empty value is a value
    assert read(data, key)[:3:2] == (200, b"")


def test_missing_key_and_missing_name(data):
    assert read(data, "never-written")[0] == 404
    status, _, body = request(data, "GET", "/elliptics")
    assert status == 400 and b"missing name=" in body
    status, _, body = request(data, "GET", "/elliptics?name=k&id=01")
    assert status == 400 and b"unknown query parameter 'id'" in body


def test_upload_over_max_body_is_413(data):
    status, _, body = upload(data, "big", b"x" * (MAX_BODY + 1))
    assert status == 413 and b"proxy.max_body" in body
    assert read(data, "big")[0] == 404


def test_upload_goes_to_the_proxy_groups_only(make_cluster):
    cluster = make_cluster(nodes=[{"name": "n1", "group": 1}, {"name": "n2", "group": 2}],
                           pool={"workers": 1}, proxy={"groups": [2]})
    cluster.serve()
    wait_proxy(cluster)
    status, _, body = upload(cluster, "only-two", b"2")
    assert status == 200, body
    assert b"group 2 node n2: ok" in body and b"group 1" not in body
    from core import config as cfg
    from storage.client import NotFound
    config = cfg.load(cluster.path)
    group1 = dataclasses.replace(config, nodes=tuple(n for n in config.nodes if n.group == 1))
    with Session(group1) as session, pytest.raises(NotFound):
        session.read("only-two")
    assert read(cluster, "only-two")[2] == b"2"


def test_no_storage_answering_is_503(make_cluster):
    cluster = make_cluster(pool={"workers": 1})
    proxy = cluster.srw("proxy")       # no node runs at all
    wait_proxy(cluster)
    status, _, body = read(cluster, "k")
    assert status == 503, body
    status, _, body = upload(cluster, "k", b"v")
    assert status == 503, body
    assert b"unavailable" in body or b"cannot write" in body
    assert proxy.poll() is None
    assert "Traceback" not in cluster.log()
