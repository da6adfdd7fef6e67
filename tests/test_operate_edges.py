"""The operator's rough edges (issue 27): what a command says and how it exits."""
from __future__ import annotations

import signal

import pytest

from conftest import REPO, proxy_request, serving_with_proxy, wait_until
from core import security
from core.config import ConfigError, load
from core.protocol import ExecMeta, ProtocolError
from srw import cli
from srw.control import send

CONFIG = str(REPO / "config.toml")


def test_the_cli_says_a_usage_error_in_one_line_and_lets_a_bug_keep_its_traceback(
        monkeypatch, capsys):
    assert cli.main(["--config", CONFIG, "exec", "x.py", "--groups", "1:a"]) == 1
    assert capsys.readouterr().err == "srw: bad --groups '1:a': use group numbers joined " \
                                      "by ':', e.g. 1:2\n"

    def buggy(config, args):
        return int("not a number")  # a ValueError no one meant
    monkeypatch.setattr(cli, "cmd_status", buggy)
    with pytest.raises(ValueError, match="invalid literal"):
        cli.main(["--config", CONFIG, "status"])


@pytest.mark.parametrize("text", ["inf", "nan", "0", "soon"])
def test_a_timeout_that_is_not_finite_and_positive_is_refused(text, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["--config", CONFIG, "exec", "x.py", "--timeout", text])
    assert exit.value.code == 2
    assert "give a finite number of seconds above 0" in capsys.readouterr().err
    if text in ("inf", "nan"):  # and on the wire, whoever sends it
        with pytest.raises(ProtocolError, match="finite"):
            ExecMeta(timeout=float(text)).check()
    assert ExecMeta(timeout=1e6).check().timeout == 1e6


def test_a_missing_key_names_the_command_that_makes_it(tmp_path):
    with pytest.raises(ConfigError, match="`srw keys init` makes the node's own"):
        security.load_pair(tmp_path / "server.key_secret", "[security] server_key")
    with pytest.raises(ConfigError, match="keys/clients/NAME.key_secret"):
        security.load_pair(tmp_path / "alice.key_secret", "client key")


def test_a_refused_reload_names_the_node_and_fails_on_the_cli_and_the_control_socket(
        make_cluster):
    cluster = make_cluster(pool={"workers": 1}, scripts={"which.py": "__return_data = started_by"})
    cluster.serve()  # with the shipped python.init, which sets started_by = "srw"
    assert "cannot open log file" not in cluster.log()  # it names no 2011 log file now
    (cluster.history / "python.init").write_text("x = 1\nraise RuntimeError('broken init')\n")
    done = cluster.run("reload")
    assert done.returncode == 1, done
    [line] = done.stderr.decode().splitlines()
    assert line.startswith("srw: reload refused, old workers kept: node n1: ") and \
        line.endswith("RuntimeError: broken init"), line
    reply = send(str(cluster.root / "var" / "srw.ctl"), "reload", timeout=30)
    assert reply.startswith("error: reload refused, old workers kept: node n1: "), reply
    with cluster.client(timeout=5) as client:
        assert client.exec("which.py").data == b"srw"  # the old workers serve on

    (cluster.history / "python.init").write_text("started_by = 'v2'\n")
    done = cluster.run("reload")
    assert done.returncode == 0 and done.stdout == b"srw: node n1: rolling to generation 1\n", done
    with cluster.client(timeout=5) as client:
        wait_until(lambda: client.exec("which.py").data == b"v2", 10, "the new python.init")


def test_the_shipped_unit_writes_only_where_it_may_and_reloads_with_srw_reload():
    """contrib/systemd: every path srw writes is absolute and inside the unit's
    StateDirectory, RuntimeDirectory or LogsDirectory (relative ones landed
    under /etc/srw); `systemctl reload` runs `srw reload`, which fails a refusal."""
    unit = (REPO / "contrib" / "systemd" / "srw.service").read_text()
    settings = dict(line.split("=", 1) for line in unit.splitlines()
                    if "=" in line and not line.startswith("#"))
    assert settings["ExecReload"].split()[1:3] == ["reload", "--config"]
    assert settings["ProtectSystem"] == "strict"
    # libzmq binds through getifaddrs() (netlink) and aborts without it: the
    # broker and storage died at start under a real systemd before this
    assert "AF_NETLINK" in settings["RestrictAddressFamilies"].split()
    config = load(REPO / "contrib" / "systemd" / "config.toml")
    writable = [f"/var/lib/{settings['StateDirectory']}/", f"/run/{settings['RuntimeDirectory']}/",
                f"/var/log/{settings['LogsDirectory']}/"]
    written = [config.pool.history_dir, config.serve.pidfile, config.serve.control,
               config.log.file] + [n.data_dir for n in config.nodes]
    for path in written:
        assert any(path.startswith(w) for w in writable), path


def test_a_client_waits_as_long_as_the_node_may_work(make_cluster, monkeypatch):
    """A script that runs past the client's built-in wait (set to 0.2 s here, so
    the test is short) on a node whose request_timeout (6 s) allows it: a bare
    Client learns that timeout from the broker's status and gets the answer
    instead of giving up; a Session sends its config's."""
    from broker import client as broker_client
    from storage.client import Session
    monkeypatch.setattr(broker_client, "DEFAULT_WAIT", 0.2)
    monkeypatch.setattr(broker_client, "_LEARNED", {}, raising=False)
    cluster = make_cluster(pool={"workers": 1}, broker={"request_timeout": 6.0},
                           scripts={"slow.py": "import time\ntime.sleep(2.5)\n"
                                                "__return_data = 'done'"})
    cluster.serve()
    endpoint = cluster.node("n1")["broker"]
    with broker_client.Client(endpoint) as client:
        assert client.exec("slow.py").data == b"done"
    assert broker_client._LEARNED == {endpoint: 6.0}  # asked once, kept for the node
    with Session(str(cluster.path)) as session:  # sends its config's: waits the same
        assert session._broker("n1").timeout == 6.0


def test_ping_names_a_dead_storage_process(make_cluster):
    cluster = make_cluster(pool={"workers": 1})
    with serving_with_proxy(cluster):
        status, _, body = proxy_request(cluster, "GET", "/ping")
        assert status == 200, body
        [storage] = cluster.processes("srw: storage n1")
        storage.send_signal(signal.SIGSTOP)  # alive but silent; serve would restart a dead one
        try:
            status, _, body = proxy_request(cluster, "GET", "/ping")
        finally:
            storage.send_signal(signal.SIGCONT)
    assert status == 503, body
    assert b"node n1 (group 1): DOWN: storage tcp://" in body and b"up: broker, pool" in body


def test_the_shipped_redis_conf_keeps_healthy_shards_serving_and_unavailable_is_one_line(
        tmp_path):
    from core import redis_auth
    from core.statuses import Unavailable
    from runtime.executor import _one_line
    conf = redis_auth.write_secrets(tmp_path)[2].read_text()
    assert "\ncluster-require-full-coverage no\n" in conf

    class Down(Unavailable):
        pass
    assert _one_line(Down("CLUSTERDOWN The cluster is down\nretry")) == \
        "Down: CLUSTERDOWN The cluster is down retry"


def test_a_reply_carries_the_moved_hint_and_older_layouts_still_parse():
    from core import protocol as p
    _, frame, data = p.reply_frames(b"c", b"r", p.OK, "n1", 1, b"x", "", moved=True)
    assert p.parse_reply([frame, data])[1].moved
    _, frame, data = p.reply_frames(b"c", b"r", p.OK, "n1", 1, b"x", "")
    assert not p.parse_reply([frame, data])[1].moved
    entries = [p.reply_entry(b"a", p.OK, "n1", 1, b"", "", moved=True),
               p.reply_entry(b"b", p.OK, "n1", 1, b"", "")]
    [(_, first), (_, second)] = p.parse_reply_message(p.reply_batch_frames(b"c", entries)[1:])
    assert first.moved and not second.moved
