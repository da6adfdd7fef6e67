"""The srw command: output, --json, exit codes and one-line reasons."""
from __future__ import annotations

import json
import subprocess
import sys


def test_exec_json_and_exit_codes(shared_node):
    out = shared_node.run("exec", "echo.py", "--data", "-", "--json", input=b"\xff\x00")
    assert out.returncode == 0
    [result] = json.loads(out.stdout)
    assert result["node"] == "n1" and result["group"] == 1 and result["status"] == "ok"
    assert result["data_base64"] == "/wA=" and "data" not in result

    out = shared_node.run("exec", "", "--code", "raise ValueError('nope')")
    assert out.returncode == 1
    assert out.stderr.decode().strip() == \
        "srw: node n1 (group 1): script_error: ValueError: nope (<script content>, line 1)"


def test_exec_reads_data_from_a_file(shared_node, tmp_path):
    data = tmp_path / "in.bin"
    data.write_bytes(b"from a file")
    out = shared_node.run("exec", "echo.py", "--data", str(data))
    assert out.returncode == 0 and out.stdout == b"from a file"


def test_status_lists_the_pool(shared_node):
    out = shared_node.run("status")
    assert out.returncode == 0
    line = out.stdout.decode().splitlines()[1].split()
    assert line[:3] == ["n1", "1", "2"]


def test_errors_are_one_line(make_cluster):
    cluster = make_cluster()  # configured, not started
    cases = [
        (("exec", "echo.py"), "cannot connect to broker"),
        (("exec", "echo.py", "--id", "xyz"), "bad id 'xyz'"),
        (("exec", "echo.py", "--groups", "one"), "bad --groups"),
        (("exec", "echo.py", "--groups", "7"), "no group 7"),
    ]
    for args, words in cases:
        out = cluster.run(*args, timeout=20)
        err = out.stderr.decode()
        assert out.returncode != 0, args
        assert words in err and len(err.strip().splitlines()) == 1, (args, err)
    out = subprocess.run([sys.executable, "-m", "srw", "status", "--config",
                          str(cluster.root / "missing.toml")], capture_output=True, timeout=20)
    assert out.returncode == 2 and "no such config file" in out.stderr.decode()
    out = subprocess.run([sys.executable, "-m", "srw", "status", "--config", str(cluster.root)],
                         capture_output=True, timeout=20)
    assert out.returncode == 2 and "is a directory; pass --config" in out.stderr.decode()
    before = subprocess.run([sys.executable, "-m", "srw", "--config",
                             str(cluster.root / "elsewhere.toml"), "status"],
                            capture_output=True, timeout=20)
    assert before.returncode == 2 and "elsewhere.toml" in before.stderr.decode()
