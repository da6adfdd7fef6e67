"""A slot's zygote: forks runners ahead of time and reaps them.

    worker (trusted) ──fork, before any socket or request──► zygote (sandboxed)
                     ◄── "R pid seat" + its two pipe ends (SCM_RIGHTS) ──  forks runners,
                     ──  "T pid": taken, "D pid": done with it ──►         each in a seat:
                     ◄── "X pid status cpu": it exited before "D" ──       reap, fork the next

The zygote is forked from the worker before the worker opens any socket or
sees any request, so what it and its runners inherit is python.init's
context and nothing else of the node: it keeps only its socket to the
worker, stdin from /dev/null and stdout/stderr into the worker's output
pipe, unmaps the pool's slot table, and closes its sandbox before it forks
anything.  It never runs a script.  It keeps `spares` runners waiting, so a
request never waits for a fork: in fork isolation the worker is done with a
runner after each request, in copy isolation when it must be replaced or is
no longer kept warm for its tenant (runtime/tenants.py).

Seats: each runner takes a free seat of the slot, and with it the seat's uid
and cgroups (sandbox.py, cgroups.py); a seat is free once its runner is
reaped and nothing it started is left in its cgroup, so two runners never
share a uid or a cgroup, not even with a dead one's leftovers.
"""
from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import resource
import select
import signal
import socket
import time

import setproctitle

from core import logs

from . import runner
from .executor import Executor
from .sandbox import PR_SET_CHILD_SUBREAPER, Sandbox, _libc, _prctl, die_with_parent

log = logging.getLogger("srw.zygote")
RETRY = 0.05    # seconds before the zygote tries a refused fork again
SETTLE = 0.002  # seconds after a runner is taken before its spare is forked
WARN_EVERY = 10.0  # seconds between two warnings about refused forks


def start(sock: socket.socket, out_w: int, executor: Executor, sandbox: Sandbox, slot: int,
          history_dir: str, title: str, spares: int, reuse: bool, cpu: int | None) -> None:
    """In the forked zygote: keep only what it needs, close the sandbox, serve."""
    setproctitle.setproctitle(title.replace("runner", "zygote"))
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    seats = out_of_the_way(sandbox.cgroups.seat_doors(slot, sandbox.seats))
    keep = {0, 1, 2, sock.fileno(), *sandbox.inherited_fds(),
            *(fd for tasks, doors in seats for fd in (tasks, *doors) if fd >= 0)}
    close_all_but(keep)
    logs.to_stderr(f"sandbox {title.split()[-1]}")
    sandbox.enter_zygote(slot)
    Zygote(sock, executor, sandbox, slot, seats, history_dir, title, spares, reuse, cpu).run()


def out_of_the_way(seats: list[tuple[int, tuple[int, ...]]]) -> list[tuple[int, tuple[int, ...]]]:
    """The seats' descriptors moved to the top of what the process may open, so
    that the pipes of runners keep low numbers: a runner's open_files limit
    (RLIMIT_NOFILE, set after these are open) counts descriptor numbers."""
    # At most 1024: a larger table would be copied with every runner's fork.
    floor = min(resource.getrlimit(resource.RLIMIT_NOFILE)[0], 1024) - 4 * len(seats) - 16
    if floor < 256:
        return seats

    def move(fd: int) -> int:
        if fd < 0:
            return fd
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)
        os.close(fd)
        return high
    return [(move(tasks), tuple(map(move, doors))) for tasks, doors in seats]


def close_all_but(keep: set[int]) -> None:
    """Close every descriptor not in `keep` (close_range over the gaps)."""
    low = 0
    for fd in sorted(keep) + [1 << 30]:
        if fd > low:
            os.closerange(low, fd)
        low = fd + 1


class Zygote:
    def __init__(self, sock: socket.socket, executor: Executor, sandbox: Sandbox, slot: int,
                 seats: list[tuple[int, tuple[int, ...]]], history_dir: str, title: str,
                 spares: int, reuse: bool, cpu: int | None):
        self.sock, self.executor, self.sandbox, self.slot = sock, executor, sandbox, slot
        self.cpu = cpu  # the worker's: a runner goes there after its first reply (None: stays)
        self.history_dir, self.title = history_dir, title
        self.spares, self.reuse = spares, reuse
        self.seats = seats                       # (task count fd, cgroup.procs fds) per seat
        self.children: dict[int, int] = {}       # runner pid -> its seat: alive, not reaped
        self.out: set[int] = set()       # forked, and the worker not done with them yet
        self.taken: set[int] = set()     # ... of which the worker took these from the spares
        self.warned_at = 0.0

    def run(self) -> None:
        die_with_parent()
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of scripts come here to be reaped
        # What the worker and this setup allocated stays out of the runners' garbage
        # collections, which would otherwise write to (and copy) every page of it.
        gc.freeze()
        _libc.malloc_trim(0)  # fewer pages to copy on every fork
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])  # what each runner starts with
        missing = self.spares
        fork_at = retry_at = 0.0
        while True:
            now = time.monotonic()
            # No runner waiting at all: fork now rather than after the settling delay.
            next_fork = max(retry_at, fork_at if missing < self.spares else 0.0)
            if missing and now >= next_fork:
                if self.fork_runner():
                    missing -= 1
                else:  # refused for now: a script's leftovers still hold the process limit
                    retry_at = now + RETRY
                continue
            wait = max(0.0, next_fork - now) if missing else None
            ready = select.select([self.sock, self.wake_r], [], [], wait)[0]
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
                self.reap()
            if self.sock in ready:
                msg = self.sock.recv(32)
                if not msg:
                    return  # the worker is gone
                kind, pid = _parse(msg)
                if pid not in self.out or (kind == b"T" and pid in self.taken):
                    continue
                if kind == b"T":  # the worker took it: a spare to fork in its place
                    # Forking costs a couple of milliseconds of CPU: done at once, it
                    # would slow the reply on its way to the client on a small machine.
                    self.taken.add(pid)
                    missing += 1
                    fork_at = time.monotonic() + SETTLE
                else:  # "D": done with it; the worker kills it (isolation.kill_group)
                    self.out.discard(pid)
                    self.taken.discard(pid)

    def free_seat(self) -> int | None:
        """A seat with no runner and nothing left in its cgroup (a seat's task
        count reads from a descriptor opened before the sandbox closed)."""
        taken = set(self.children.values())
        for seat, (tasks, _) in enumerate(self.seats):
            if seat not in taken and (tasks < 0 or int(os.pread(tasks, 32, 0)) == 0):
                return seat
        return None

    def fork_runner(self) -> bool:
        seat = self.free_seat()
        if seat is None:
            self._warn("no free seat (a runner's leftovers are still dying)")
            return False
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            self._warn(f"cannot fork a runner ({exc})")
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            return False
        if pid == 0:  # the runner; it always leaves through os._exit()
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for door in self.seats[seat][1]:  # into the seat's cgroups, still as root
                    os.write(door, b"0")
                close_all_but({0, 1, 2, req_r, res_w, *self.sandbox.inherited_fds()})
                setproctitle.setproctitle(self.title)
                self.sandbox.enter_runner(self.reuse, self.slot, seat)
                self.executor.warm_up()
                runner.serve(self.executor, self.history_dir, req_r, res_w, self.reuse,
                             limits_fixed=self.sandbox.runner_seccomp is not None,
                             tasks_watched=self.sandbox.cgroups.enabled, cpu=self.cpu,
                             mask=self.mask)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(res_w)
        self.children[pid] = seat  # its seat is free once it is reaped
        try:
            socket.send_fds(self.sock, [b"R %d %d" % (pid, seat)], [req_w, res_r])
        except OSError as exc:
            if exc.errno != errno.ETOOMANYREFS:
                raise
            # The kernel refuses descriptors in flight in unix sockets beyond the
            # sender's RLIMIT_NOFILE (the profile's open_files), counted for its
            # user, uid 0: every root process of the machine.  Not the worker's to
            # kill: it never had this runner, which has run nothing yet.
            self._warn(f"cannot hand a runner to the worker yet ({exc.strerror})")
            os.kill(pid, signal.SIGKILL)
            return False
        finally:
            os.close(req_w)
            os.close(res_r)
        self.out.add(pid)
        return True

    def _warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self.warned_at >= WARN_EVERY:
            self.warned_at = now
            log.warning("%s; trying again every %g s", what, RETRY)

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:  # not orphans of scripts, which come here too
                del self.children[pid]
                if pid in self.out:  # died in the worker's hands: it wants to know how
                    cpu = usage.ru_utime + usage.ru_stime
                    self.sock.send(b"X %d %d %.3f" % (pid, status, cpu))


def _parse(msg: bytes) -> tuple[bytes, int]:
    """("T" taken | "D" done, pid) of a message from the worker; pid 0 if it is not one."""
    kind, _, pid = msg.partition(b" ")
    return kind, int(pid) if kind in (b"T", b"D") and pid.isdigit() else 0

