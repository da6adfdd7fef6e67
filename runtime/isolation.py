"""How a worker runs one request: in itself (`copy`) or in a child (`fork`).

copy:  the worker runs the script in a fresh copy of the global context.  A
       script that leaves threads or processes behind gets its worker recycled
       once the reply is out (the pool then kills whatever is left).

fork:  worker ──fork──► child (sandboxed again, waits on a pipe)        ahead of the request
       worker: compile ──pipe──► child: exec in a copy of the context
       worker ◄──pipe── (status, data, error) ── child exits          the worker kills its group
       worker: reply, then fork the next child                        off the request's path
       Nothing a script does survives its child.  The worker enforces the wall
       limit itself (SIGKILL to the child's group); RLIMIT_CPU stops a child
       that burns its CPU budget.
"""
from __future__ import annotations

import _thread
import marshal
import os
import resource
import select
import signal
import struct
import time

import setproctitle

from broker import protocol as p

from .executor import Executor, Refused
from .sandbox import Sandbox

_LEN = struct.Struct("<Q")


class CopyRunner:
    def __init__(self, executor: Executor):
        self.executor = executor
        self.threads = _thread._count()

    def start(self) -> None:
        pass

    def run(self, name: str, code: str, data: bytes, cookie: str,
            deadline: float) -> tuple[str, bytes, str]:
        return self.executor.run(name, code, data, cookie)

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
    def __init__(self, executor: Executor, sandbox: Sandbox, title: str):
        self.executor, self.sandbox, self.title = executor, sandbox, title
        self.cpu_seconds = sandbox.profile.cpu_seconds
        self.child: tuple[int, int, int] | None = None  # pid, request pipe, result pipe

    def start(self) -> None:
        self._fork()

    def after(self) -> str:
        if self.child is None:
            self._fork()
        return ""

    def _fork(self) -> None:
        req_r, req_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the request child; it always leaves through os._exit()
            code = 1
            try:
                os.close(req_w)
                os.close(res_r)
                setproctitle.setproctitle(self.title)
                self.sandbox.enter_child()
                self._serve_one(req_r, res_w)
                code = 0
            finally:
                os._exit(code)
        os.close(req_r)
        os.close(res_w)
        self.child = (pid, req_w, res_r)

    def _serve_one(self, req_r: int, res_w: int) -> None:
        request = _read_message(req_r, None)
        if request is None:
            return  # the worker went away
        named, content, data, cookie = marshal.loads(request)
        reply = self.executor.execute(named, content, data, cookie)
        _write_message(res_w, marshal.dumps(reply))

    def run(self, name: str, code: str, data: bytes, cookie: str,
            deadline: float) -> tuple[str, bytes, str]:
        try:
            named, content = self.executor.prepare(name, code)
        except Refused as exc:
            return exc.reply
        pid, req_w, res_r = self.child
        self.child = None
        try:
            _write_message(req_w, marshal.dumps((named, content, data, cookie)))
            result = _read_message(res_r, deadline)
        except BrokenPipeError:
            result = None
        except TimeoutError:
            result = "timeout"
        finally:
            os.close(req_w)
            os.close(res_r)
        status = self._finish(pid)
        if result == "timeout":
            return (p.TIMEOUT, b"", "request ran past its deadline (wall limit "
                    f"{self.sandbox.profile.wall_seconds:g} s or the request timeout)")
        if result is not None:
            return marshal.loads(result)
        return self._died(status)

    def _finish(self, pid: int) -> tuple[int, resource.struct_rusage | None]:
        """Kill the child's group (whatever the script started), reap the child."""
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, status, usage = os.wait4(pid, 0)
        while True:  # orphans the script left come back to us (child subreaper)
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        return status, usage

    def _died(self, finished) -> tuple[str, bytes, str]:
        status, usage = finished
        cpu = usage.ru_utime + usage.ru_stime
        if os.WIFSIGNALED(status) and (os.WTERMSIG(status) == signal.SIGXCPU
                                       or cpu >= self.cpu_seconds):
            return (p.TIMEOUT, b"", f"request used more than {self.cpu_seconds:g} s of CPU "
                    "(sandbox cpu_seconds)")
        if os.WIFSIGNALED(status):
            how = f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        else:
            how = f"exited with status {os.waitstatus_to_exitcode(status)}"
        return p.KILLED, b"", f"the request's process {how} before it answered"


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
