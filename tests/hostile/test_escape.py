"""Network, programs, debuggers, namespaces: the kernel refuses them all."""
from __future__ import annotations

import socket

import pytest

CONNECT = """
import socket, errno
host, port = __input_binary_data_tuple[0].decode().split(":")
s = None
try:
    s = socket.create_connection((host, int(port)), timeout=2)
    __return_data = "connected"
except OSError as exc:
    __return_data = errno.errorcode.get(exc.errno, str(exc))
finally:
    if s is not None:
        s.close()
"""

SOCKET_KINDS = """
import socket, errno
out = []
for family, kind in ((socket.AF_INET, socket.SOCK_DGRAM), (socket.AF_INET6, socket.SOCK_STREAM),
                     (socket.AF_NETLINK, socket.SOCK_RAW), (socket.AF_PACKET, socket.SOCK_RAW),
                     (socket.AF_INET, socket.SOCK_RAW)):
    try:
        socket.socket(family, kind).close()
        out.append("open")
    except OSError as exc:
        out.append(errno.errorcode[exc.errno])
__return_data = " ".join(out)
"""

RAW_SYSCALL = """
import ctypes, errno
libc = ctypes.CDLL(None, use_errno=True)
out = []
for family, kind in ((2, 1), (2, 2), (10, 1), (16, 3)):   # INET stream, INET dgram, INET6, NETLINK
    fd = libc.syscall(41, family, kind, 0)                  # SYS_socket on x86_64
    out.append("open" if fd >= 0 else errno.errorcode[ctypes.get_errno()])
__return_data = " ".join(out)
"""

ABSTRACT_UNIX = """
import socket, errno
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(b"\\0" + __input_binary_data_tuple[0])
    __return_data = "connected"
except OSError as exc:
    __return_data = errno.errorcode[exc.errno]
"""

EXEC = """
import os
os.execv("/bin/sh", ["sh", "-c", "echo escaped"])
"""

SPAWN = """
import os
pid = os.posix_spawn("/bin/true", ["true"], {})
__return_data = str(os.waitpid(pid, 0))
"""

CTYPES_CALL = """
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
call, args = __input_binary_data_tuple[0].decode().split(" ", 1)
result = getattr(libc, call)(*[eval(a) for a in args.split(",")])
__return_data = "ok" if result == 0 else errno.errorcode[ctypes.get_errno()]
"""


@pytest.fixture(scope="module")
def listener():
    """A port on loopback that is not the node's: connecting to it must fail."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def connect(hostile, address: str) -> bytes:
    return hostile.expect("ok", CONNECT, data=address.encode()).data


def test_connecting_to_another_port(hostile, listener):
    assert connect(hostile, f"127.0.0.1:{listener}") in (b"EACCES", b"EPERM")


def test_connecting_to_the_proxy_port(hostile):
    assert connect(hostile, hostile.cluster.proxy["listen"]) in (b"EACCES", b"EPERM")


def test_connecting_to_the_broker_and_storage_ports(hostile):
    """default: the node's own endpoints are the one way out; strict: not even those."""
    for key in ("broker", "storage"):
        address = hostile.cluster.node("n1")[key].removeprefix("tcp://")
        got = connect(hostile, address)
        if hostile.fork:
            assert got == b"EPERM", key
        else:  # allowed; nothing listens on storage in this branch yet
            assert got in (b"connected", b"ECONNREFUSED"), key


def test_udp_raw_ipv6_netlink_packet_sockets(hostile):
    r = hostile.expect("ok", SOCKET_KINDS)
    assert r.data.split() == [b"EPERM"] * 5


def test_raw_socket_syscall_through_ctypes(hostile):
    r = hostile.expect("ok", RAW_SYSCALL)
    expected = [b"EPERM" if hostile.fork else b"open", b"EPERM", b"EPERM", b"EPERM"]
    assert r.data.split() == expected


def test_abstract_unix_socket(hostile):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(b"\0srw-hostile-abstract")
        s.listen(1)
        r = hostile.expect("ok", ABSTRACT_UNIX, data=b"srw-hostile-abstract")
    assert r.data == b"EPERM"


def test_running_a_program(hostile):
    r = hostile.expect("script_error", EXEC)
    assert "PermissionError" in r.error


def test_spawning_a_program(hostile):
    r = hostile.expect("script_error", SPAWN)
    assert "PermissionError" in r.error


@pytest.mark.parametrize("call", [
    "ptrace 16,os.getppid(),0,0",                 # PTRACE_ATTACH to the parent
    "unshare 0x10000000",                         # CLONE_NEWUSER
    "unshare 0x20000000",                         # CLONE_NEWPID
    "mount b'none',b'/tmp',b'tmpfs',0,0",
    "syscall 56,0x40000000|17,0,0,0,0",           # clone(CLONE_NEWNET | SIGCHLD)
    "setns 0,0",
])
def test_debugger_namespace_and_mount_calls(hostile, call):
    r = hostile.expect("ok", CTYPES_CALL, data=call.encode())
    assert r.data == b"EPERM", call
