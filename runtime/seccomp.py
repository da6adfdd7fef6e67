"""seccomp filters (libseccomp through pyseccomp): the system calls scripts never need.

Filters are built in the pool parent (pyseccomp's import and libseccomp's
set-up cost milliseconds) and loaded after the fork.  They allow everything
by default and deny, with EPERM:

- running programs (execve, execveat), ptrace and other processes' memory;
- namespaces and mounts (unshare, setns, mount..., clone with CLONE_NEW* flags);
  clone3 gets ENOSYS instead, so the C library falls back to clone, whose
  flags a filter can read (threads keep working);
- io_uring (it would open sockets past this filter), bpf, perf, userfaultfd, keys;
- pushing input into a terminal (ioctl TIOCSTI, TIOCLINUX);
- in a runner: changing its resource limits, personality or CPU-time timers;
- leaving the runner's process group (setsid; setpgid in the runner's own
  filter), so killpg reaches everything a script starts;
- sockets by network mode: "none" and "local" deny unix sockets (no script
  may reach the broker's workers socket or the host's), "local" allows AF_INET
  TCP (Landlock then allows only the node's own ports), "any" leaves sockets
  alone.  The runner's own filter, stacked on the zygote's, takes every
  socket away when its profile has no network.
"""
from __future__ import annotations

import ctypes
import errno
import os
import socket
import tempfile

import pyseccomp as sc

ALWAYS_DENIED = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev",
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "open_tree",
    "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "mount_setattr",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "bpf", "perf_event_open",
    "userfaultfd", "keyctl", "add_key", "request_key", "kexec_load", "init_module",
    "finit_module", "delete_module", "setsid",
)
CLONE_NEW = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
             0x40000000, 0x00000080)  # NS, CGROUP, UTS, IPC, USER, PID, NET, TIME
SOCK_TYPE_MASK = 0xF
NOT_STREAM = (socket.SOCK_DGRAM, socket.SOCK_RAW, socket.SOCK_RDM, socket.SOCK_SEQPACKET,
              6, 10)  # SOCK_DCCP, SOCK_PACKET
IPPROTO_TCP = 6
EPERM = sc.ERRNO(errno.EPERM)
TTY_INJECTION = (0x5412, 0x541C)  # TIOCSTI (push input into a terminal), TIOCLINUX
PERSONALITY_QUERY = 0xFFFFFFFF


def zygote_filter(network: str) -> sc.SyscallFilter:
    """The filter a zygote loads once, before it forks runners (they inherit it)."""
    f = sc.SyscallFilter(sc.ALLOW)
    for name in ALWAYS_DENIED:
        f.add_rule(EPERM, name)
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for flag in CLONE_NEW:
        f.add_rule(EPERM, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    for request in TTY_INJECTION:  # the ioctl number is an unsigned int: compare 32 bits
        f.add_rule(EPERM, "ioctl", sc.Arg(1, sc.MASKED_EQ, 0xFFFFFFFF, request))
    if network != "any":
        _limit_sockets(f, allow_inet_tcp=network == "local")
    return f


def runner_filter(network: str) -> sc.SyscallFilter:
    """Stacked on the zygote's in a runner: it stays in its process group, keeps
    its limits, personality and CPU timers (so nothing of them outlives a
    request in a reused runner), and without network it gets no sockets."""
    f = sc.SyscallFilter(sc.ALLOW)
    f.add_rule(EPERM, "setpgid")
    f.add_rule(EPERM, "setrlimit")
    f.add_rule(EPERM, "prlimit64", sc.Arg(2, sc.NE, 0))  # reading a limit stays allowed
    f.add_rule(EPERM, "personality", sc.Arg(0, sc.NE, PERSONALITY_QUERY))
    for timer in (1, 2):  # ITIMER_VIRTUAL, ITIMER_PROF: ITIMER_REAL is reset after each request
        f.add_rule(EPERM, "setitimer", sc.Arg(0, sc.EQ, timer))
    if network == "none":
        f.add_rule(EPERM, "socket")
        f.add_rule(EPERM, "socketpair")
    return f


def _limit_sockets(f: sc.SyscallFilter, allow_inet_tcp: bool) -> None:
    # No unix sockets: the node's own (the broker's workers socket) and the
    # host's pathname sockets that anyone may write are out of reach, which
    # Landlock (ABI 7) cannot say.  ZeroMQ over TCP needs none (eventfd).
    f.add_rule(EPERM, "socket", sc.Arg(0, sc.LE, socket.AF_UNIX))
    f.add_rule(EPERM, "socket", sc.Arg(0, sc.GT, socket.AF_INET))
    f.add_rule(EPERM, "socketpair")
    f.add_rule(EPERM, "listen")  # scripts serve nothing
    if not allow_inet_tcp:
        f.add_rule(EPERM, "socket", sc.Arg(0, sc.EQ, socket.AF_INET))
        return
    # Landlock's port rules cover TCP only: refuse UDP, raw and SCTP/MPTCP sockets.
    for kind in NOT_STREAM:
        f.add_rule(EPERM, "socket", sc.Arg(0, sc.EQ, socket.AF_INET),
                   sc.Arg(1, sc.MASKED_EQ, SOCK_TYPE_MASK, kind))
    f.add_rule(EPERM, "socket", sc.Arg(0, sc.EQ, socket.AF_INET),
               sc.Arg(2, sc.GT, IPPROTO_TCP))


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
_libc = ctypes.CDLL(None, use_errno=True)


class Compiled:
    """A filter turned into its BPF program once, in the pool parent: loading it
    in each runner is one prctl (libseccomp would build the program again,
    about 0.1 ms a fork in fork isolation).  Needs no_new_privs, as any filter."""

    def __init__(self, f: sc.SyscallFilter):
        with tempfile.TemporaryFile() as out:
            f.export_bpf(out)
            out.seek(0)
            program = out.read()
        self._program = ctypes.create_string_buffer(program, len(program))
        self._fprog = _SockFprog(len(program) // ctypes.sizeof(_SockFilter),
                                 ctypes.addressof(self._program))

    def load(self) -> None:
        if _libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(self._fprog), 0, 0):
            err = ctypes.get_errno()
            raise OSError(err, f"loading a seccomp filter: {os.strerror(err)}")


def available() -> bool:
    """True when libseccomp loads and the kernel has filter mode."""
    try:
        sc.SyscallFilter(sc.ALLOW)
    except OSError:
        return False
    with open("/proc/self/status") as f:
        return any(line.startswith("Seccomp:") for line in f)
