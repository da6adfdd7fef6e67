"""The runner: the one kind of process in which scripts run (copy and fork isolation).

A runner is forked by its slot's zygote and closes its own sandbox (nested in
the zygote's) before it takes a request.  It holds nothing of the node's: its
two pipes to the worker, stdin from /dev/null, stdout and stderr into a pipe
the worker reads.  It reads one request, compiles and runs it, and writes
one reply (runtime/channel.py).  In copy isolation it is used again: after
each request it undoes what a script may have left behind (signal mask and
handlers, timers) and asks to be replaced (STALE) when it cannot (changed
rlimits or personality, threads, child processes, new descriptors).  In
fork isolation it waits to be killed.

None of this is a limit: a script can change anything in its own process,
this code included.  Limits and deadlines live in the worker and the kernel;
these checks only keep what one request left by accident from failing the
next one in the same runner.
"""
from __future__ import annotations

import _signal
import _thread
import functools
import logging
import os
import resource
import signal
import stat
import sys
import time

import zmq

from core import capability

from . import channel
from .executor import Executor
from .sandbox import _libc
from .scripts import compile_named

log = logging.getLogger("srw.runner")
LIMITS = (resource.RLIMIT_AS, resource.RLIMIT_NOFILE, resource.RLIMIT_FSIZE,
          resource.RLIMIT_NPROC, resource.RLIMIT_CORE, resource.RLIMIT_CPU)
TIMERS = (signal.ITIMER_REAL, signal.ITIMER_VIRTUAL, signal.ITIMER_PROF)  # REAL first
# Handlers that could act on a later request: what the runner's own calls raise
# (SIGPIPE, SIGXFSZ), and what its timers or its children would send (the
# timers are reset and children make it stale, but a handler is cheap to reset).
SIGNALS = (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGALRM, signal.SIGCHLD, signal.SIGINT,
           signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


def serve(executor: Executor, history_dir: str, req_r: int, res_w: int, reuse: bool,
          limits_fixed: bool, tasks_watched: bool, cpu: int | None = None,
          mask: set[signal.Signals] | None = None) -> None:
    """Answer requests until the worker closes the pipe (copy) or after one (fork).
    `limits_fixed`: seccomp keeps the script from changing its rlimits,
    personality and CPU timers, so they need no check; `tasks_watched`: the
    worker counts the slot's tasks (processes and threads) itself; `mask`: the
    signal mask the runner was forked with (its zygote's).

    What a request left is checked when the next one comes, not after its
    reply, and the worker's CPU (`cpu`) is joined then too: a runner that
    serves one request (new tenants one after another, each soon retired)
    pays for neither.  The check's first run in a fresh runner cost ~0.3 ms
    of CPU and made its exit dearer (pages it wrote: copy-on-write), and
    joining the worker's busy CPU at once waited ~2.5 ms at load 20.  A
    later request of the same tenant meets its runner as the check leaves
    it: reset, or, when stale, the request runs and its reply says STALE,
    so the worker replaces the runner after it (as for the requests written
    ahead to it: isolation.ProcessRunner._finish)."""
    pid = os.getpid()
    hygiene = Hygiene({0, 1, 2, req_r, res_w}, not limits_fixed, not tasks_watched, mask) \
        if reuse else None
    named: dict[int, object] = {}
    requests = channel.RequestReader(req_r, res_w)
    served = zeromq = False
    while True:
        request = requests.next()
        if request is None:
            return  # the worker is done with us
        stale = 0
        if served and hygiene is not None:
            stale = hygiene.check(zeromq)
            if cpu is not None:  # not a limit: a script may move itself anywhere
                _join_cpu(cpu)
                cpu = None
        # What the script's store calls carry: asked of the worker when first needed.
        capability.running(request.capability, functools.partial(requests.ask, request.seq))
        status, data, error = executor.run(_named(request, named, history_dir), request.code,
                                           request.data, request.cookie)
        capability.running(b"", None)
        _flush_stdio()
        if os.getpid() != pid:  # a copy the script forked came back from it: not ours
            os._exit(0)
        zeromq = hygiene is not None and zeromq_live()
        flags = stale | (channel.ZEROMQ if zeromq else 0) | (channel.MOVED if redis_moved() else 0)
        channel.write_reply(res_w, request.seq, status, flags, error, data)
        if hygiene is None:
            break
        served = True
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
    while True:  # fork isolation: the zygote kills us (and our group) now
        time.sleep(3600)


def _join_cpu(cpu: int) -> None:
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:  # a CPU taken offline: stay where we are
        pass


def _named(request: channel.Request, cache: dict, history_dir: str):
    """A compiler for the request's named script, or None; the worker sends a
    version's source once per runner (and replaces a runner that holds
    isolation.NAMED_VERSIONS of them)."""
    if not request.version:
        return None

    def compile_it():
        code = cache.get(request.version)
        if code is None:
            if not request.source:  # only a script that emptied the cache gets here
                raise LookupError(f"this runner lost script {request.name!r}")
            code = cache[request.version] = compile_named(request.name, request.source,
                                                           history_dir)
        return code
    return compile_it


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a script may have replaced or closed them
            pass


def zeromq_live() -> bool:
    """Whether this process has a ZeroMQ context (a storage session): its two
    threads (I/O and reaper) and its descriptors are expected, not leftovers."""
    ctx = zmq.Context._instance
    return ctx is not None and not ctx.closed and zmq.Context._instance_pid == os.getpid()


def redis_live() -> bool:
    """Whether the storage handle holds a Redis Cluster client here (redis-cluster
    mode): its connections stay open from one request to the next, on purpose.
    Looked up, not imported: lmdb mode never loads redis."""
    store = sys.modules.get("storage.redis_store")
    return store is not None and store.client_in_this_process()


def redis_moved() -> bool:
    """Whether this request's Redis calls met MOVED (storage.redis_store.take_moved);
    looked up like redis_live."""
    store = sys.modules.get("storage.redis_store")
    return store is not None and store.take_moved()


class Hygiene:
    """The runner's state after it started, and the check before each later request."""

    def __init__(self, own_fds: set[int], check_limits: bool, check_children: bool,
                 mask: set[signal.Signals] | None = None):
        self.own_fds, self.check_limits, self.check_children = \
            own_fds, check_limits, check_children
        if check_limits:  # else seccomp keeps them (and asking costs a fresh runner)
            self.limits = [resource.getrlimit(r) for r in LIMITS]
            self.personality = _libc.personality(0xFFFFFFFF)
        self.mask = mask if mask is not None else signal.pthread_sigmask(signal.SIG_BLOCK, [])
        self.handlers = {sig: _signal.getsignal(sig) for sig in SIGNALS}
        self.threads = _thread._count()
        self.free_fd = lowest_free_fd()

    def check(self, zeromq: bool) -> int:
        """Undo what can be undone; STALE when the runner should be replaced.
        `zeromq`: whether the last request left a ZeroMQ context (zeromq_live).
        Why a runner is stale goes to its stderr, which the worker logs."""
        # _signal's: signal's wraps the old mask it returns in enums (~1.5 us more)
        _signal.pthread_sigmask(signal.SIG_SETMASK, self.mask)
        for timer in TIMERS if self.check_limits else TIMERS[:1]:
            signal.setitimer(timer, 0)
        for sig, handler in self.handlers.items():
            if _signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)
        stale = self._why_stale(zeromq or redis_live())
        if stale:
            log.info("runner stale after the last request: %s", stale)
        return channel.STALE if stale else 0

    def _why_stale(self, session: bool) -> str:
        if self.check_children and self._children():
            return "the script left processes running"
        if _thread._count() > self.threads:
            return "the script left threads running"
        if self.check_limits:
            if [resource.getrlimit(r) for r in LIMITS] != self.limits:
                return "the script changed its resource limits"
            if _libc.personality(0xFFFFFFFF) != self.personality:
                return "the script changed its personality"
        if self._new_descriptors(session):
            return "the script left files open"
        return ""

    @staticmethod
    def _children() -> bool:
        """Whether a process the script started still runs (exited ones are reaped)."""
        for _ in range(64):
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return False
            if pid == 0:
                return True
        return True

    def _new_descriptors(self, session: bool) -> bool:
        """Descriptors opened since the last check (new ones take the lowest free
        number): only a storage session's sockets and event descriptors may stay."""
        if not _is_open(self.free_fd):
            return False
        fd = self.free_fd
        while fd in self.own_fds or _is_open(fd):
            if fd not in self.own_fds and not (session and _session_kind(fd)):
                return True
            fd += 1
        self.free_fd = lowest_free_fd()
        return False


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _session_kind(fd: int) -> bool:
    """A socket, or an anonymous inode (eventfd, epoll): what ZeroMQ and redis-py open."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISSOCK(mode) or stat.S_IFMT(mode) == 0


def lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd
