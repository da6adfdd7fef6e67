"""Files and the environment: nothing of the node's is readable, nothing writable."""
from __future__ import annotations

import os

from .conftest import SECRET

READ = """
path = __input_binary_data_tuple[0].decode()
__return_data = open(path, "rb").read()
"""

LIST = """
import os
__return_data = repr(os.listdir(__input_binary_data_tuple[0].decode()))
"""

WRITE = """
path = __input_binary_data_tuple[0].decode()
with open(path, "w") as f:
    f.write("owned")
"""

ENVIRONMENT = """
import os, posix, ctypes
libc = ctypes.CDLL(None)
libc.getenv.restype = ctypes.c_char_p
seen = [repr(dict(os.environ)), repr(posix.environ), repr(os.environb),
        repr(libc.getenv(b"SRW_TEST_SECRET"))]
try:
    seen.append(repr(open("/proc/self/environ", "rb").read()))
except OSError as exc:
    seen.append(repr(exc))
__return_data = "\\n".join(seen)
"""


def expect_denied(hostile, code, path):
    r = hostile.expect("script_error", code, data=str(path).encode())
    assert "PermissionError" in r.error, r.error
    return r


def test_reading_etc_shadow(hostile):
    expect_denied(hostile, READ, "/etc/shadow")


def test_reading_the_node_config(hostile):
    expect_denied(hostile, READ, hostile.cluster.path)


def test_reading_the_data_dir(hostile):
    data_dir = hostile.cluster.root / "var" / "n1"
    expect_denied(hostile, READ, data_dir / "data.mdb")
    expect_denied(hostile, LIST, data_dir)


def test_writing_into_the_history_dir(hostile):
    target = hostile.cluster.history / "planted.py"
    expect_denied(hostile, WRITE, target)
    assert not target.exists()


def test_writing_to_tmp(hostile, tmp_path):
    expect_denied(hostile, WRITE, "/tmp/srw-hostile-planted")


def test_environment_secret_is_not_visible(hostile):
    r = hostile.expect("ok", ENVIRONMENT)
    assert SECRET.encode() not in r.data
    assert b"SRW_TEST_SECRET" not in r.data
    assert b"'LANG': 'C.UTF-8'" in r.data  # the scrubbed environment is what is left


def test_reading_the_history_dir(hostile):
    """strict: no files at all, not even the scripts.  default may read them (Landlock),
    as far as its uid may reach them: started as root, srw runs scripts as the
    slot's own uid, and tmp_path's parents (root's, 0700) are closed to it; as
    another user, scripts keep that user's uid and read the scripts."""
    r = hostile.run(READ, data=str(hostile.cluster.history / "echo.py").encode())
    if hostile.fork or os.geteuid() == 0:
        assert r.status == "script_error" and "PermissionError" in r.error, r
    else:
        assert r.status == "ok" and b"__return_data" in r.data, r
    hostile.assert_recovered()
