"""The operator's terminal: no script may push keystrokes into it (TIOCSTI).

`srw serve` runs on a pseudo-terminal that is its controlling terminal, as in
an operator's shell.  The test holds both sides and never runs a shell on
it: whatever a script pushed as input would wait there to be read.
"""
from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import sys
import termios
import time

import pytest

from conftest import Cluster

from .conftest import write_profile

INJECT = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
TIOCSTI = 0x5412
out = []
fds = [0, 1, 2]
try:
    fds.append(os.open("/dev/tty", os.O_RDWR))
except OSError as exc:
    out.append("/dev/tty:" + errno.errorcode.get(exc.errno, str(exc.errno)))
for fd in fds:
    failed = 0
    for ch in b"echo INJECTED\\n":
        if libc.ioctl(fd, TIOCSTI, ctypes.byref(ctypes.c_char(ch))) != 0:
            failed = ctypes.get_errno()
            break
    out.append("%d:%s" % (fd, errno.errorcode.get(failed, failed) if failed else "pushed"))
__return_data = " ".join(out)
"""


def read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    for _ in range(1000):
        try:
            chunk = os.read(fd, 65536)
        except (BlockingIOError, OSError):
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def take_terminal():
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.parametrize("profile", ["default", "strict"])
def test_a_script_cannot_type_into_the_operators_terminal(tmp_path, profile):
    master, slave = pty.openpty()
    cluster = Cluster(tmp_path, [{"name": "n1"}], {"workers": 2, "profile": profile},
                      {}, {}, None, log_level="warning")
    write_profile(cluster, profile)
    proc = subprocess.Popen([sys.executable, "-m", "srw", "serve", "--config",
                             str(cluster.path)], cwd=tmp_path, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True, preexec_fn=take_terminal)
    cluster.procs.append(proc)
    try:
        cluster.wait_ready()
        screen = read_all(master)
        with cluster.client(timeout=10) as c:
            replies = [c.exec("", code=INJECT) for _ in range(4)]  # both workers
        assert all(r.status == "ok" for r in replies), [r.error for r in replies]
        assert not any(b"pushed" in r.data for r in replies), [r.data for r in replies]
        time.sleep(0.3)
        screen += read_all(master)
        assert b"INJECTED" not in screen  # nothing echoed as typed input
        assert b"INJECTED" not in read_all(slave)  # nothing waiting to be read as input
        assert proc.poll() is None
    finally:
        cluster.stop()
        os.close(master)
        os.close(slave)
