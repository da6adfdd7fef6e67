"""How a worker runs one request: in itself (`copy`) or in a child (`fork`).

copy:  the worker runs the script in a fresh copy of the global context.  A
       script that leaves threads or processes behind gets its worker recycled
       once the reply is out (the pool then kills whatever is left).

fork:  zygote ──fork──► child (sandboxed again, warmed up, waits on a pipe)   ahead of time
       worker: takes a ready child from the zygote
       worker: compile ──pipe──► child: exec in a copy of the context
       worker ◄──pipe── (status, data, error); the worker replies, then tells the
       zygote, which kills the child's group and forks the next child 2 ms later
       Nothing a script does survives its child; no fork is on a request's path.  The worker enforces the wall
       limit itself (SIGKILL to the child's group); RLIMIT_CPU stops a child
       that burns its CPU budget.
"""
from __future__ import annotations

import _thread
import collections
import logging
import marshal
import os
import select
import signal
import socket
import struct
import time

import setproctitle

from broker import protocol as p

from .executor import Executor, Refused
from .sandbox import PR_SET_CHILD_SUBREAPER, Sandbox, _libc, _prctl, die_with_parent

log = logging.getLogger("srw.worker")
_LEN = struct.Struct("<Q")
READY = 2      # children waiting per worker: back-to-back requests never wait for a fork
RETRY = 0.05   # seconds before the zygote tries a refused fork again
SETTLE = 0.002  # seconds after a reply before its child is killed and the next forked


class CopyRunner:
    def __init__(self, executor: Executor):
        self.executor = executor
        self.threads = _thread._count()

    def start(self) -> None:
        self.pid = os.getpid()  # the worker's; getpid is a system call, once is enough

    def run(self, name: str, code: str, data: bytes, cookie: str,
            deadline: float) -> tuple[str, bytes, str]:
        reply = self.executor.run(name, code, data, cookie)
        _leave_if_forked(self.pid)
        return reply

    def after(self) -> str:
        """Why this worker must be recycled after the request ("" = it need not)."""
        if _thread._count() > self.threads:
            return "the script left threads running"
        try:
            os.waitpid(-1, os.WNOHANG)  # (0, 0): children alive; a pid: one had exited
        except ChildProcessError:
            return ""
        return "the script left processes behind"


class ForkRunner:
    """fork isolation.  The worker never forks on a request's path: a zygote,
    forked once at start, keeps READY sandboxed children and hands each over
    (its pid and pipe ends, by SCM_RIGHTS); the worker asks for the next one
    once it has replied."""

    def __init__(self, executor: Executor, sandbox: Sandbox, title: str):
        self.executor, self.sandbox, self.title = executor, sandbox, title
        self.cpu_seconds = sandbox.profile.cpu_seconds
        self.ready: collections.deque[tuple[int, int, int]] = collections.deque()  # pid, pipes
        self.exits: dict[int, tuple[int, float]] = {}   # pid -> (wait status, CPU seconds)
        self.current: tuple[int, int, int] | None = None  # the child of the request in hand

    def start(self) -> None:
        self.zsock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:  # the zygote; it always leaves through os._exit()
            code = 1
            try:
                self.zsock.close()
                Zygote(theirs, self.executor, self.sandbox, self.title).run()
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.zygote = pid

    def after(self) -> str:
        """Once the reply is out: hand the child back to the zygote, which kills its
        group and forks its successor a moment later (see Zygote.run)."""
        if self.current is not None:
            pid, req_w, res_r = self.current
            self.current = None
            os.close(req_w)
            os.close(res_r)
            self.zsock.send(b"D %d" % pid)  # done: the zygote ends it and forks the next
        return ""

    def _receive(self, timeout: float | None) -> bool:
        """One message from the zygote: a ready child or a child's exit.  False on timeout."""
        if timeout is not None and not select.select([self.zsock], [], [], timeout)[0]:
            return False
        msg, fds, _, _ = socket.recv_fds(self.zsock, 128, 2)
        if not msg:
            raise RuntimeError("the zygote of this worker died")
        kind, *fields = msg.split()
        if kind == b"R":
            self.ready.append((int(fields[0]), fds[0], fds[1]))
        else:
            self.exits[int(fields[0])] = (int(fields[1]), float(fields[2]))
        return True

    def _take(self) -> tuple[int, int, int]:
        while not self.ready:
            self._receive(None)
        self.exits.clear()  # exits of earlier children nobody waits for
        return self.ready.popleft()

    def run(self, name: str, code: str, data: bytes, cookie: str,
            deadline: float) -> tuple[str, bytes, str]:
        try:
            named, content = self.executor.prepare(name, code)
        except Refused as exc:
            return exc.reply
        pid, req_w, res_r = self.current = self._take()
        try:
            _write_message(req_w, marshal.dumps((named, content, data, cookie)))
            return _reply(marshal.loads(_read_message(res_r, deadline) or b""))
        except (ValueError, TypeError):  # the script wrote on the result pipe itself
            return p.SCRIPT_ERROR, b"", "the script garbled its reply pipe"
        except TimeoutError:
            _killpg(pid)
            self.after()
            return (p.TIMEOUT, b"", "request ran past its deadline (wall limit "
                    f"{self.sandbox.profile.wall_seconds:g} s or the request timeout)")
        except (BrokenPipeError, EOFError):  # the child died before it answered
            _killpg(pid)
            self.after()
            return self._died(pid)

    def _died(self, pid: int) -> tuple[str, bytes, str]:
        deadline = time.monotonic() + 5.0
        while pid not in self.exits and self._receive(max(0.0, deadline - time.monotonic())):
            pass
        status, cpu = self.exits.pop(pid, (0, 0.0))
        self.exits.clear()
        if os.WIFSIGNALED(status) and (os.WTERMSIG(status) == signal.SIGXCPU
                                       or cpu >= self.cpu_seconds):
            return (p.TIMEOUT, b"", f"request used more than {self.cpu_seconds:g} s of CPU "
                    "(sandbox cpu_seconds)")
        if os.WIFSIGNALED(status):
            how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(status)}"
        return p.KILLED, b"", f"the request's process {how} before it answered"


class Zygote:
    """Forks request children ahead of time (READY of them waiting) and reaps them.

    Forked from the sandboxed worker before it opened any socket or thread, so
    its children are small, single-threaded copies.  To the worker it sends
    ``R pid`` with the child's two pipe ends, and ``X pid status cpu`` when a
    child exits; when the worker sends ``D pid`` (done with that child) it
    kills the child's group and forks the next child.
    """

    def __init__(self, sock: socket.socket, executor: Executor, sandbox: Sandbox, title: str):
        self.sock, self.executor, self.sandbox, self.title = sock, executor, sandbox, title
        self.children: set[int] = set()

    def run(self) -> None:
        setproctitle.setproctitle(self.title.replace("request", "zygote"))
        die_with_parent()
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans of scripts come here to be reaped
        _libc.malloc_trim(0)  # fewer pages to copy on every fork
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        self.missing = READY
        self.due: list[tuple[float, int]] = []  # (when, pid): children to end
        fork_at = retry_at = 0.0
        while True:
            now = time.monotonic()
            while self.due and self.due[0][0] <= now:
                _killpg(self.due.pop(0)[1])
            # No child ready at all: fork now rather than after the settling delay.
            next_fork = max(retry_at, fork_at if self.missing < READY else 0.0)
            if self.missing and now >= next_fork:
                if self.fork_child():
                    self.missing -= 1
                else:  # refused for now: a script's leftovers still hold the process limit
                    retry_at = now + RETRY
                continue
            timers = [t for t, _ in self.due[:1]] + ([next_fork] if self.missing else [])
            wait = max(0.0, min(timers) - now) if timers else None
            ready = select.select([self.sock, self.wake_r], [], [], wait)[0]
            if self.wake_r in ready:
                os.read(self.wake_r, 4096)
                self.reap()
            if self.sock in ready:
                msg = self.sock.recv(32)
                if not msg:
                    return  # the worker is gone
                # The worker has replied.  Ending the child and forking its successor
                # cost a couple of milliseconds of CPU: done at once, they would slow
                # the reply on its way to the client on a small machine.
                when = time.monotonic() + SETTLE
                self.due.append((when, int(msg.split()[1])))
                self.missing += 1
                fork_at = when

    def fork_child(self) -> bool:
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        try:
            pid = os.fork()
        except OSError as exc:
            log.warning("%s: fork failed (%s); trying again",
                        self.title.replace("request", "zygote"), exc)
            for fd in (req_r, req_w, res_r, res_w):
                os.close(fd)
            return False
        if pid == 0:  # the request child; it always leaves through os._exit()
            code = 1
            try:
                self.sock.close()
                os.close(req_w)
                os.close(res_r)
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                os.close(self.wake_r)
                os.close(self.wake_w)
                setproctitle.setproctitle(self.title)
                self.sandbox.enter_child()
                self.executor.warm_up()
                serve_one(self.executor, req_r, res_w)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(res_w)
        self.children.add(pid)
        socket.send_fds(self.sock, [b"R %d" % pid], [req_w, res_r])
        os.close(req_w)
        os.close(res_r)
        return True

    def reap(self) -> None:
        while True:
            try:
                pid, status, usage = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid in self.children:
                self.children.discard(pid)
                cpu = usage.ru_utime + usage.ru_stime
                self.sock.send(b"X %d %d %.3f" % (pid, status, cpu))


def serve_one(executor: Executor, req_r: int, res_w: int) -> None:
    """In the request child: read one request, run it, write the reply."""
    request = _read_message(req_r, None)
    if request is None:
        return  # the worker went away
    named, content, data, cookie = marshal.loads(request)
    pid = os.getpid()
    reply = executor.execute(named, content, data, cookie)
    _leave_if_forked(pid)
    _write_message(res_w, marshal.dumps(reply))
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGINT])
    while True:  # the zygote kills it (and its group) once the reply is on its way
        time.sleep(3600)


def _leave_if_forked(pid: int) -> None:
    """A process the script forked that returned from it must not go on as the worker
    (or child) it is a copy of: it would answer on their sockets and pipes."""
    if os.getpid() != pid:
        os._exit(0)


def _reply(value) -> tuple[str, bytes, str]:
    status, data, error = value
    if not (isinstance(status, str) and isinstance(data, bytes) and isinstance(error, str)):
        raise TypeError("not a reply")
    return status, data, error


def _killpg(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _write_message(fd: int, payload: bytes) -> None:
    view = memoryview(_LEN.pack(len(payload)) + payload)
    while view:
        view = view[os.write(fd, view):]


def _read_message(fd: int, deadline: float | None) -> bytes | None:
    """One length-prefixed message; None on EOF; TimeoutError past `deadline`."""
    header = _read_exactly(fd, _LEN.size, deadline)
    if header is None:
        return None
    return _read_exactly(fd, _LEN.unpack(header)[0], deadline)


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes | None:
    chunks, left = [], size
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while left:
        if deadline is not None:
            wait = deadline - time.monotonic()
            if wait <= 0 or not poller.poll(wait * 1000):
                raise TimeoutError
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)
