"""Landlock through ctypes: file allow-lists, TCP port rules and scopes.

A ruleset is built once in the pool parent (it opens the allowed paths while
it still can) and handed to workers as a file descriptor; each worker, and in
``fork`` isolation each request child, calls ``restrict(fd)``.  Domains nest:
a child restricted again gets the intersection, so it can only lose rights.
Root does not bypass Landlock.  See Documentation/userspace-api/landlock.rst.
"""
from __future__ import annotations

import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446  # same on every arch
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

# Filesystem rights by the ABI that introduced them.
EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
_FS_BY_ABI = {1: (1 << 13) - 1, 2: (1 << 14) - 1, 3: (1 << 15) - 1, 4: (1 << 15) - 1,
              5: (1 << 16) - 1}
FILE_RIGHTS = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # allowed on non-dirs
READ = READ_FILE | READ_DIR
WRITE = (WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | REFER
         | TRUNCATE)

NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1                  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1      # ABI 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


def abi() -> int:
    """The kernel's Landlock ABI version; 0 when Landlock is missing or disabled."""
    version = _libc.syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    return max(0, version)


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"landlock {what}: {os.strerror(err)}")
    return result


def ruleset(version: int, readable=(), writable=(), files=True, tcp_connect=None) -> int:
    """Build a ruleset and return its fd.

    files: restrict the filesystem to `readable` (read) and `writable` (read and
    write) paths.  tcp_connect: None leaves TCP alone; a collection of ports
    allows connecting to those only (and binding nothing).  Signals and abstract
    unix sockets are always scoped to the domain (ABI 6).
    """
    fs = _FS_BY_ABI[min(version, 5)] if files else 0
    attr = _RulesetAttr(fs, 0 if tcp_connect is None else NET_BIND_TCP | NET_CONNECT_TCP,
                        SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if version >= 6 else 0)
    size = ctypes.sizeof(attr) if version >= 6 else 16  # older kernels reject unknown fields
    fd = _check(_libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), size, 0),
                "create_ruleset")
    try:
        if files:
            for path, rights in [(p, READ) for p in readable] + [(p, READ | WRITE) for p in writable]:
                _allow_path(fd, path, rights & fs)
        for port in tcp_connect or ():
            rule = _NetPort(NET_CONNECT_TCP, port)
            _check(_libc.syscall(SYS_ADD_RULE, fd, RULE_NET_PORT, ctypes.byref(rule), 0),
                   f"add_rule tcp port {port}")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _allow_path(ruleset_fd: int, path: str, rights: int) -> None:
    try:
        path_fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        return  # a missing path grants nothing; there is nothing to read there
    try:
        if not os.path.isdir(f"/proc/self/fd/{path_fd}"):
            rights &= FILE_RIGHTS
        rule = _PathBeneath(rights, path_fd)
        _check(_libc.syscall(SYS_ADD_RULE, ruleset_fd, RULE_PATH_BENEATH, ctypes.byref(rule), 0),
               f"add_rule {path}")
    finally:
        os.close(path_fd)


def restrict(ruleset_fd: int) -> None:
    """Enter the ruleset's domain for good (needs no_new_privs or CAP_SYS_ADMIN)."""
    _check(_libc.syscall(SYS_RESTRICT_SELF, ruleset_fd, 0), "restrict_self")
