"""How a worker runs one request: in itself (isolation none) or in a runner (copy, fork).

none:  the worker runs the script in a fresh copy of the global context.  Only
       for code as trusted as srw (the `trusted` profile): the script shares
       the worker's process, its socket to the broker included.

copy, fork:
       worker (trusted) ──req pipe──► runner (sandboxed; runtime/runner.py)
              ◄──res pipe──  one request at a time, replies checked (channel.py)
              ◄──stdout/stderr pipe── logged line by line, marked as the sandbox's
       The worker forks its slot's zygote (runtime/zygote.py) before it opens a
       socket; the zygote keeps runners ready.  The worker keeps every limit:
       it kills the runner's process group at the wall deadline, reads the
       runner's CPU (its cgroup: the runner and all it started) every TICK and
       kills past cpu_seconds, and reads no more reply than output_bytes.
       copy: a runner serves one tenant (a caller running one piece of code,
       runtime/tenants.py), request after request; the worker keeps up to
       `warm_runners` of them warm and replaces one when it breaks the
       protocol, dies, or is left with threads, memory or anything it cannot
       reset (runner.Hygiene).  fork: a fresh runner for every request; the
       worker kills the used one and the zygote forks the next.  Each runner has a seat
       of its own in its slot: its own uid and cgroups (zygote.py), so limits,
       CPU and leftovers are counted per runner.
"""
from __future__ import annotations

import _thread
import collections
import functools
import logging
import math
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field
from typing import Callable

import psutil

from core import capability, exits, logs
from core import protocol as p

from . import channel, zygote
from .cgroups import cpu_seconds, read_int
from .executor import Executor
from .runner import redis_moved
from .sandbox import Sandbox
from .scripts import Script, ScriptCache
from .slots import SlotTable
from .tenants import WarmRunners, tenant

log = logging.getLogger("srw.worker")

TICK = 0.05        # seconds between CPU checks of a running request
IDLE_CPU = 0.05    # seconds of CPU a reused runner may use between requests
ZEROMQ_THREADS = 2  # a ZeroMQ context's I/O thread and reaper
WAIT_EXIT = 5.0    # seconds to learn how a dead runner died
CPU_SLACK = 0.1    # seconds: how far below RLIMIT_CPU the kernel's rusage may say it acted
LINE_MAX = 4096    # bytes of one line of script output that reach the log
OUTPUT_BUDGET = 64 * 1024  # bytes of script output logged per request; the rest is counted
PAGE = os.sysconf("SC_PAGE_SIZE")


AHEAD = 8  # requests written ahead to a runner, at most ...
AHEAD_BYTES = 16 * 1024  # ... and at most this much with the current one: a pipe
# holds 64 KiB, so the write never waits for the runner


# Tenant digests kept per worker (ProcessRunner._tenant): a SHA-256 per request
# was ~6% of a busy worker's time, and the same few tenants come again and again.
TENANT_DIGESTS = 256
TENANT_CODE_MAX = 1024  # longer content is hashed each time: kept keys stay small (~256 KiB)


def ahead_bytes(data: bytes, cookie: str, code: str) -> int:
    """What a request adds to the runner's write, at most (with its name and capability)."""
    return len(data) + len(cookie) + len(code) + 512


# A request's capability: grant(False) is what goes with the request (b"" when
# it is minted on demand), grant(True) what the script gets when it asks.
Grant = Callable[[bool], bytes]


def no_grant(asked: bool) -> bytes:
    return b""


@dataclass(frozen=True, slots=True)
class Ahead:
    """A request queued behind the current one, of the same caller and code."""
    job: bytes
    position: int  # in the order the broker sent them (worker.Worker.begun)
    data: bytes
    cookie: str
    grant: Grant  # its capability (see ProcessRunner.run)


class ZygoteFailed(RuntimeError):
    """The slot's zygote died or spoke nonsense: the worker cannot go on."""


class InlineRunner:
    """Isolation none: the script runs in the worker (trusted scripts only)."""

    def __init__(self, executor: Executor, scripts: ScriptCache):
        self.executor, self.scripts = executor, scripts
        self.threads = _thread._count()

    def start(self) -> None:
        self.pid = os.getpid()  # the worker's; getpid is a system call, once is enough

    def holds(self, job: bytes) -> bool:
        return False  # requests run one at a time, here

    def run(self, script: Script | None, code: str, data: bytes, cookie: str,
            deadline: float, caller: str, grant: Grant = no_grant, job: bytes = b"",
            ahead: list | None = None) -> tuple[str, bytes, str]:
        named = (lambda: self.scripts.code(script)) if script is not None else None
        # Trusted scripts: they could mint their own anyway.
        capability.running(grant(False), functools.partial(grant, True))
        try:
            reply = self.executor.run(named, code, data, cookie)
        finally:
            capability.running(b"", None)
        if os.getpid() != self.pid:  # a copy the script forked came back from it: not us
            os._exit(0)
        return reply

    def warm_state(self) -> tuple[int, bool]:
        return 0, False

    def moved(self) -> bool:
        """Whether the last request's Redis calls met MOVED (a hint for the client)."""
        return redis_moved()

    def after(self) -> str:
        """Why this worker must be recycled after the request ("" = it need not)."""
        if _thread._count() > self.threads:
            return "the script left threads running"
        try:
            os.waitpid(-1, os.WNOHANG)  # (0, 0): children alive; a pid: one had exited
        except ChildProcessError:
            return ""
        return "the script left processes behind"

    def idle(self) -> None:
        pass


# copy: a runner waiting for a new tenant.  Four (tried again 2026-12-07: a
# worker serving new tenants back to back waited 2.7-3.4 ms per fresh runner
# instead of 4.5-7.4 at load 16) left the 64-tenant rate unchanged once the
# machine was quieter (CPU-bound: it follows the CPU per fresh runner), and
# cost ~1.8 MB of private memory per spare.
COPY_SPARES = 1
# fork: runners waiting, so that requests back to back do not wait for a fork
# (measured: 2 -> 4 took one-at-a-time p50 from 2.2 to 1.8 ms here)
FORK_SPARES = 4
DYING_SEATS = 4    # seats for runners killed and not yet gone (their leftovers)


def seats(isolation: str, warm: int) -> int:
    """Runners a slot may have at once, each with a uid and cgroups of its own:
    the warm ones, the one at work, the spares, and the dying."""
    if isolation == "none":
        return 0
    if isolation == "copy":
        return warm + 1 + COPY_SPARES + DYING_SEATS
    return 1 + FORK_SPARES + 2 * DYING_SEATS  # one killed after each request


@dataclass(eq=False)
class Runner:
    """A runner the worker holds: its pid, seat and the worker's ends of its pipes."""
    pid: int
    seat: int
    req_w: int
    res_r: int
    poller: select.poll
    stat_fd: int = -1   # copy isolation: its /proc/PID/stat (threads, without cgroups)
    statm_fd: int = -1  # ... and statm (size)
    cpu_fd: int = -1    # its seat's cgroup: CPU used and tasks (-1 without cgroups),
    tasks_fd: int = -1  # the ProcessRunner's (seat_fds), not closed with the runner
    sent: set[int] = field(default_factory=set)  # script versions it has the source of
    vsize: int = 0  # its address space after its first request
    idle_cpu: float | None = None  # its CPU when the worker last saw it idle
    leftover: bytes = b""  # read past the last reply: the next held request's reply
    stale: int = 0  # a held request's reply said STALE: judged after the last one

    def close(self) -> None:
        for fd in (self.req_w, self.res_r, self.stat_fd, self.statm_fd):
            if fd >= 0:
                os.close(fd)


class ProcessRunner:
    """Copy and fork isolation: requests run in runner processes, one at a time."""

    def __init__(self, sandbox: Sandbox, slot: int, node: str, history_dir: str,
                 output_cap: int, warm: int = 8, warm_per_caller: int = 4,
                 cpu: int | None = None):
        """`cpu`: the worker's, which each runner takes once set up (None: any)."""
        self.sandbox, self.slot, self.history_dir = sandbox, slot, history_dir
        self.cpu = cpu
        self.profile = sandbox.profile
        self.reuse = self.profile.isolation == "copy"
        self.spares = COPY_SPARES if self.reuse else FORK_SPARES
        self.warm: WarmRunners[Runner] = WarmRunners(warm, warm_per_caller)
        self.output_cap = output_cap
        self.title = f"srw: runner {node}#{slot}"
        self.vsize_slack = max(64, self.profile.memory_mb // 4) << 20
        self.ready: collections.deque[tuple[int, int, int, int]] = collections.deque()
        self.exits: dict[int, tuple[int, float]] = {}  # pid -> (wait status, CPU seconds)
        self.current: Runner | None = None
        self.doomed: list[int] = []  # runners to kill once the reply is on its way
        # Requests written ahead to self.current, in order: (job, seq, grant) ...
        self.held: collections.deque[tuple[bytes, int, Grant]] = collections.deque()
        self.held_jobs: set[bytes] = set()
        self.held_key = None  # ... their tenant
        self.lost: dict[bytes, str] = {}  # held, and their runner replaced: why
        self.seqs: list[int] = []
        self.tenants: dict[tuple, tuple] = {}  # _tenant's digests
        self.found_warm = False
        self.redirected = False  # the last reply's MOVED flag (moved())
        self.seq = 0
        self.grant: Grant | None = no_grant  # self.seq's, None once its runner asked
        self.failed: ZygoteFailed | None = None  # found by _receive_sent while idle
        # The worker's replies held while a request runs: flush() them at flush_at.
        self.flush: Callable[[], None] = lambda: None
        self.flush_at = math.inf

    def start(self, executor: Executor, slots: SlotTable) -> None:
        """Fork the zygote: call it before the worker opens any socket or sees a request."""
        self.sandbox.cgroups.make_seats(self.slot)
        self.zsock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the zygote; it always leaves through os._exit()
            code = 1
            try:
                self.zsock.close()
                os.close(out_r)
                slots.close()  # the pool's bookkeeping is no business of the sandbox
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                zygote.start(theirs, out_w, executor, self.sandbox, self.slot,
                             self.history_dir, self.title, self.spares, self.reuse, self.cpu)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        os.close(out_w)
        self.zygote = pid
        self.output = ScriptOutput(out_r, self.title.replace("srw: runner", "sandbox"))
        # No seat cgroups (fork isolation): every runner's CPU is read from the
        # slot's cgroup, opened once rather than for each request's runner.
        cgroups = self.sandbox.cgroups
        self.slot_cpu_fd = -1 if cgroups.seats else cgroups.cpu_usage_file(self.slot, 0)
        # Each seat's CPU and task count, opened once: a runner per request (64
        # tenants cycling) would otherwise pay two path lookups in kernfs each.
        self.seat_fds = [(cgroups.cpu_usage_file(self.slot, seat),
                          cgroups.tasks_file(self.slot, seat))
                         for seat in range(cgroups.seats if cgroups.enabled else 0)]

    # A request ------------------------------------------------------------------

    def run(self, script: Script | None, code: str, data: bytes, cookie: str,
            deadline: float, caller: str, grant: Grant = no_grant, job: bytes = b"",
            ahead: list[Ahead] | None = None) -> tuple[str, bytes, str]:
        """(status, data, error) of one request; `grant` gives its capability
        token: what goes with the request, and what its runner asks for (once,
        at the script's first store call; runtime/channel.py ASK).
        `ahead`: the requests queued behind it for the same tenant, written to its
        runner now (copy isolation) so that the runner goes from one to the next
        without waiting for the worker; each is then held (`holds`) and counts as
        started: run_held answers it, `killed` if its runner was replaced first.
        Whatever the runner did, only the runner pays: a failure to make sense
        of it replaces the runner, and the worker answers the request and goes on
        (ZygoteFailed alone ends it)."""
        try:
            return self._run(script, code, data, cookie, deadline, caller, grant, ahead or [])
        except ZygoteFailed:
            raise
        except Exception:
            return self._confused()

    def holds(self, job: bytes) -> bool:
        """Whether `job` was written ahead to a runner: run it with run_held."""
        return job in self.held_jobs or job in self.lost

    def run_held(self, job: bytes, deadline: float) -> tuple[str, bytes, str]:
        """The reply to a request written ahead (held), in the order they were."""
        why = self.lost.pop(job, None)
        if why is not None:
            return (p.KILLED, b"", "its runner was replaced before it answered "
                    f"({why or 'an earlier request of the same caller and code failed'})")
        try:
            held_job, seq, grant = self.held.popleft()
            self.held_jobs.discard(held_job)
            if held_job != job or self.current is None:
                raise RuntimeError(f"held request {job!r} is not next")
            self._end_doomed()
            self.output.new_request()
            self.seq, self.grant, self.found_warm, self.redirected = seq, grant, True, False
            return self._finish(self.current, self.held_key, deadline)
        except ZygoteFailed:
            raise
        except Exception:
            return self._confused()

    def _confused(self) -> tuple[str, bytes, str]:
        log.exception("%s: failed to handle its runner; replacing it",
                      self.title.removeprefix("srw: "))
        if self.current is not None:
            self._replace(self.current, "the worker could not make sense of it")
        return (p.KILLED, b"", "the worker could not make sense of what the request's "
                "runner did; the runner is replaced")

    def _run(self, script: Script | None, code: str, data: bytes, cookie: str,
             deadline: float, caller: str, grant: Grant, ahead: list[Ahead]
             ) -> tuple[str, bytes, str]:
        self._end_doomed()
        if self.held and self.current is not None:  # the worker runs held ones first
            self._replace(self.current, "a request came before those written ahead to it")
        self.output.new_request()
        self.seq, self.grant = self._new_seq(), grant
        key = self._tenant(caller, script, code) if self.reuse else None
        self.current = self.warm.take(key) if key is not None else None
        self.found_warm = self.current is not None
        self.redirected = False
        for attempt in range(2 + self.spares):  # a warm one and the spares may have died idle
            try:
                runner = self.current or self._take(deadline)
            except TimeoutError:
                return (p.TIMEOUT, b"", "no runner was ready before the request's deadline "
                        "(the slot's process limit may still be held by a script's leftovers)")
            self.current = runner
            runner.idle_cpu = None
            try:
                self._send(runner, script, code, cookie, grant, data, deadline,
                           ahead if self.reuse else [])
                break
            except BrokenPipeError:  # it died idle, and never read this: a new runner
                self._replace(runner, "it was gone when a request came")
            except TimeoutError:
                self._replace(runner, "it took no request")
                return (p.TIMEOUT, b"", "request ran past its deadline before its runner "
                        "took it")
        else:
            return p.KILLED, b"", "every runner tried was gone before it took the request"
        self.held_key = key
        return self._finish(runner, key, deadline)

    def _tenant(self, caller: str, script: Script | None, code: str):
        """The request's tenant (tenants.tenant), its digest kept under everything
        the digest covers: new bytes of a script (a push) or new content is a new
        key, so a kept digest is always the one tenant() would compute."""
        name, sha256 = (script.name, script.sha256) if script is not None else ("", b"")
        key = (caller, name, sha256, code)
        found = self.tenants.get(key)
        if found is None:
            found = tenant(caller, name, sha256, code)
            if len(code) <= TENANT_CODE_MAX:
                if len(self.tenants) >= TENANT_DIGESTS:
                    self.tenants.clear()
                self.tenants[key] = found
        return found

    def _new_seq(self) -> int:
        """Unpredictable, so that a script cannot write the reply to a later request
        (the `random` module's state is in the runner's memory too); drawn from
        the kernel 64 at a time."""
        if not self.seqs:
            raw = os.urandom(8 * 64)
            self.seqs = [int.from_bytes(raw[i:i + 8], "little") for i in range(0, len(raw), 8)]
        return self.seqs.pop()

    def _finish(self, runner: Runner, key, deadline: float) -> tuple[str, bytes, str]:
        """The runner's reply to the request self.seq, and what becomes of the runner."""
        try:
            reply, extra = self._wait(runner, deadline)
        except channel.TooLarge as exc:
            self._replace(runner, f"its reply broke output_bytes ({exc})")
            return p.OUTPUT_TOO_LARGE, b"", str(exc)
        except channel.Garbled as exc:
            self._replace(runner, f"its reply broke the protocol ({exc})")
            return (p.SCRIPT_ERROR, b"", "the script garbled its runner's reply "
                    f"({exc}); the runner is replaced")
        except TimeoutError:
            self._replace(runner, "")
            return (p.TIMEOUT, b"", "request ran past its deadline (wall limit "
                    f"{self.profile.wall_seconds:g} s or the request timeout)")
        except CpuExceeded:
            self._replace(runner, "")
            return (p.TIMEOUT, b"", f"request used more than {self.profile.cpu_seconds:g} s "
                    "of CPU (sandbox cpu_seconds, its child processes included)")
        except (EOFError, BrokenPipeError):  # how it died first: the zygote tells it until "D"
            kill_group(runner.pid)
            died = self._died(runner.pid)
            self._replace(runner, "")
            return died
        self.redirected = bool(reply.flags & channel.MOVED)
        if not self.reuse:  # ended when this reply is on its way, not before it
            self._replace(runner, "", at_once=False)
        elif self.held:  # it runs the next already: judged after the last one
            runner.leftover = extra
            runner.stale |= reply.flags & channel.STALE
        elif not self.warm.admits(key):  # turned away (tenants.py): ended, not judged
            self._replace(runner, "", at_once=False)
        else:
            stale = self._stale(runner, reply.flags | runner.stale, bool(extra))
            runner.leftover, runner.stale = b"", 0
            if stale:
                self._replace(runner, stale)
            else:
                self._keep_warm(key, runner)
        return reply.status, reply.data, reply.error

    def _keep_warm(self, key, runner: Runner) -> None:
        """The runner waits for its tenant's next request; past the caps, another
        goes (runtime/tenants.py)."""
        self.current = None
        for old in self.warm.keep(key, runner):
            self._replace(old, "")

    def _send(self, runner: Runner, script: Script | None, code: str, cookie: str,
              grant: Grant, data: bytes, deadline: float, ahead: list[Ahead]) -> None:
        """The request, and those of `ahead` (the worker keeps them within AHEAD_BYTES),
        in one write."""
        version, source = 0, b""
        if script is not None:
            version = script.version
            source = b"" if version in runner.sent else script.source
        name = script.name if script else ""
        parts = channel.request_bytes(self.seq, version, name, source, code, cookie,
                                      grant(False), data)
        held = []
        for req in ahead:
            seq = self._new_seq()
            parts += channel.request_bytes(seq, version, name, b"", code, req.cookie,
                                           req.grant(False), req.data)
            held.append((req.job, seq, req.grant))
        channel.send_request(runner.req_w, parts, deadline)
        if script is not None:
            runner.sent.add(version)
        self.held.extend(held)
        self.held_jobs.update(job for job, _, _ in held)

    def _wait(self, runner: Runner, deadline: float) -> tuple[channel.Reply, bytes]:
        """The reply, while the output is logged and the CPU watched."""
        cpu_base = None
        next_tick = time.monotonic() + TICK
        while True:
            wait = min(deadline, next_tick, self.flush_at) - time.monotonic()
            lines_due = logs.due()  # the exec lines of the requests before this one
            if lines_due <= 0:
                logs.flush()
            else:
                wait = min(wait, lines_due)
            if channel.reply_waiting(runner.leftover):  # read with the last reply
                ready = set()
            else:
                ready = {fd for fd, _ in runner.poller.poll(max(0.0, wait) * 1000)}
            if self.output.fd in ready:  # first: the runner wrote it before its reply
                self.output.drain()
            if runner.res_r in ready or not ready and channel.reply_waiting(runner.leftover):
                reply = channel.read_reply(runner.res_r, self.seq, self.output_cap, deadline,
                                           runner.leftover)
                runner.leftover = b""
                if reply[0] is channel.ASKED:
                    runner.leftover = reply[1]
                    self._answer(runner, deadline)
                    continue
                self.output.report()
                return reply
            now = time.monotonic()
            if now >= self.flush_at:
                self.flush_at = math.inf
                self.flush()
            if now >= deadline:
                raise TimeoutError
            if now >= next_tick:  # a request's CPU counts from its first tick (<= TICK late)
                used = self._cpu_used(runner)
                if cpu_base is None:
                    cpu_base = used
                elif used - cpu_base > self.profile.cpu_seconds:
                    raise CpuExceeded
                next_tick = now + TICK

    def _answer(self, runner: Runner, deadline: float) -> None:
        """The capability the running request's script asked for: minted now,
        once per request (a second ask is the script's doing)."""
        if self.grant is None:
            raise channel.Garbled("the runner asked twice for its request's capability")
        grant, self.grant = self.grant, None
        channel.send_request(runner.req_w, [channel.grant_bytes(self.seq, grant(True))],
                             deadline)

    def _cpu_used(self, runner: Runner) -> float:
        fd = runner.cpu_fd if runner.cpu_fd >= 0 else self.slot_cpu_fd
        if fd >= 0:  # its cgroup (seat or slot): the runner and everything it started
            return cpu_seconds(fd)
        try:  # no cgroups (not root): the runner alone
            times = psutil.Process(runner.pid).cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system + times.children_user + times.children_system

    def _stale(self, runner: Runner, flags: int, extra: bool) -> str:
        """Why a reused runner must go after this request ("" = it may stay).  What the
        runner says of itself, then what the worker sees of it from outside."""
        if flags & channel.STALE:
            return "it was left with state it cannot reset"
        if extra:
            return "it wrote more than its reply"
        try:
            if runner.statm_fd < 0:  # once it is to be kept warm: most runners of new
                self._open_proc(runner)  # tenants, one after another, never are
            tasks = self._tasks(runner)
            vsize = int(os.pread(runner.statm_fd, 64, 0).split(maxsplit=1)[0]) * PAGE
        except (OSError, ValueError, IndexError):  # ESRCH: it replied, then went
            return "it is gone (a process it left wrote its reply)"
        if tasks > 1 + (ZEROMQ_THREADS if flags & channel.ZEROMQ else 0):
            return f"the script left threads or processes running ({tasks} tasks)"
        if not runner.vsize:
            runner.vsize = vsize
        elif vsize > runner.vsize + self.vsize_slack:
            return f"the script left memory mapped ({(vsize - runner.vsize) >> 20} MB more)"
        return ""

    def _tasks(self, runner: Runner) -> int:
        """The runner's threads and whatever it started: the tasks in its seat's pids
        cgroup, or (no cgroups) the runner's own threads."""
        if runner.tasks_fd >= 0:
            return read_int(runner.tasks_fd)
        return int(os.pread(runner.stat_fd, 1024, 0).rsplit(b")", 1)[1].split()[17])

    def _died(self, pid: int) -> tuple[str, bytes, str]:
        deadline = time.monotonic() + WAIT_EXIT
        while pid not in self.exits and self._receive(deadline):
            pass
        if pid not in self.exits:
            return p.KILLED, b"", "the request's process ended before it answered"
        status, cpu = self.exits.pop(pid)
        # Past its CPU budget: fork isolation sets RLIMIT_CPU (SIGXCPU, whose CPU the
        # kernel may report short of the limit on a busy machine); in copy isolation
        # only the CPU used tells, since a script can send itself any signal.
        xcpu = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU
        if os.WIFSIGNALED(status) and (cpu >= self.profile.cpu_seconds - CPU_SLACK
                                       or (xcpu and not self.reuse)):
            return (p.TIMEOUT, b"", f"request used more than {self.profile.cpu_seconds:g} s "
                    "of CPU (sandbox cpu_seconds)")
        return p.KILLED, b"", f"the request's process {exits.describe(status)} before it answered"

    # Runners from the zygote ------------------------------------------------------

    def _take(self, deadline: float) -> Runner:
        self._receive_sent()
        while not self.ready:
            if not self._receive(deadline):
                raise TimeoutError
        pid, seat, req_w, res_r = self.ready.popleft()
        self._tell(b"T %d" % pid)  # the zygote forks a spare in its place
        os.set_blocking(req_w, False)
        os.set_blocking(res_r, False)
        poller = select.poll()
        poller.register(res_r, select.POLLIN)
        poller.register(self.output.fd, select.POLLIN)
        runner = Runner(pid, seat, req_w, res_r, poller)
        if seat < len(self.seat_fds):
            runner.cpu_fd, runner.tasks_fd = self.seat_fds[seat]
        return runner

    @staticmethod
    def _open_proc(runner: Runner) -> None:
        """Its /proc files (copy isolation), opened after its first reply: a runner
        that died meanwhile was reaped by the zygote, and its pid comes back only
        pid_max forks later (as for kill_group)."""
        if runner.tasks_fd < 0:
            runner.stat_fd = os.open(f"/proc/{runner.pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
        runner.statm_fd = os.open(f"/proc/{runner.pid}/statm", os.O_RDONLY | os.O_CLOEXEC)

    def _replace(self, runner: Runner, why: str, at_once: bool = True) -> None:
        """Done with this runner: its process group is killed (at once, or with
        `at_once` False when the worker next starts a request or goes idle, so
        that the kill's cost does not delay the reply), and the zygote forks the
        next.  "D" goes first: a death after it is no news the zygote sends."""
        if why:
            log.info("%s (pid %d) replaced: %s", self.title.removeprefix("srw: "),
                     runner.pid, why)
        runner.close()
        if runner is self.current:
            for job, _, _ in self.held:  # written to it: started, and never to run again
                self.lost[job] = why
            self.held.clear()
            self.held_jobs.clear()
        self.current = None
        self._tell(b"D %d" % runner.pid)
        if at_once:
            kill_group(runner.pid)
        else:
            self.doomed.append(runner.pid)

    def _end_doomed(self) -> None:
        for pid in self.doomed:
            kill_group(pid)
        self.doomed.clear()

    def _receive_sent(self) -> None:
        """Every message the zygote has sent by now, taken in: a runner's pipe ends
        count against a per-user kernel cap while they wait in the socket (uid 0:
        every zygote of the machine; zygote.fork_runner).  A failure found while
        idle is raised at the next request's _take."""
        if self.failed is not None:
            raise self.failed
        for _ in range(64):  # a few per runner forked: a bound, not a count
            if not select.select([self.zsock], [], [], 0)[0]:
                return
            try:
                self._receive(time.monotonic() + 1.0)
            except ZygoteFailed as exc:
                self.failed = exc
                raise

    def _failed(self, why: str) -> ZygoteFailed:
        return ZygoteFailed(f"the zygote of {self.title.removeprefix('srw: runner ')} "
                            f"failed: {why}")

    def _tell(self, msg: bytes) -> None:
        try:
            self.zsock.send(msg)
        except OSError as exc:  # it died with our last message unread: ECONNRESET
            raise self._failed(f"it is gone ({exc.strerror})") from None

    def _receive(self, deadline: float) -> bool:
        """One message from the zygote: a ready runner or a runner's exit.  False
        once `deadline` (monotonic) passes."""
        wait = deadline - time.monotonic()
        if wait <= 0 or not select.select([self.zsock], [], [], wait)[0]:
            return False
        try:
            msg, fds, _, _ = socket.recv_fds(self.zsock, 64, 2)
        except OSError as exc:  # ECONNRESET: it died with our last message unread
            raise self._failed(f"it is gone ({exc.strerror})") from None
        fields = msg.split()
        try:
            if not msg:
                raise ValueError("it is gone")
            if fields[0] == b"R" and len(fields) == 3 and len(fds) == 2:
                seat = int(fields[2])
                if not 0 <= seat < max(1, self.sandbox.seats):
                    raise ValueError(f"unexpected message {msg[:40]!r}")
                self.ready.append((int(fields[1]), seat, fds[0], fds[1]))
                return True
            if fields[0] == b"X" and len(fields) == 4 and not fds:
                pid, status, cpu = int(fields[1]), int(fields[2]), float(fields[3])
                if not 0 <= status <= exits.MAX_WAIT_STATUS or not 0 <= cpu < math.inf:
                    raise ValueError(f"unexpected message {msg[:40]!r}")
                self.exits[pid] = (status, cpu)
                if len(self.exits) > 64:  # of runners nobody asked about
                    self.exits.pop(next(iter(self.exits)))
                return True
            raise ValueError(f"unexpected message {msg[:40]!r}")
        except ValueError as exc:
            for fd in fds:
                os.close(fd)
            raise self._failed(str(exc)) from None

    def after(self) -> str:
        return ""

    def warm_state(self) -> tuple[int, bool]:
        """(runners kept warm, whether the last request found its tenant's warm)."""
        return len(self.warm), self.found_warm

    def moved(self) -> bool:
        """Whether the last request's runner said its Redis calls met MOVED: what
        the runner says, so a hint for the client's router and no more."""
        return self.redirected

    def idle(self) -> None:
        """The worker is waiting: log what the sandbox wrote meanwhile, and replace a
        warm runner that burns CPU with no request in hand (a script that
        answered early to run on past its limits)."""
        self._end_doomed()
        try:
            self._receive_sent()
        except ZygoteFailed:
            pass  # the next request ends the worker with it
        self.output.drain()
        burning = []
        for runner in self.warm.values():
            used = self._cpu_used(runner)
            if runner.idle_cpu is not None and used - runner.idle_cpu > IDLE_CPU:
                burning.append(runner)
            runner.idle_cpu = used
        for runner in burning:
            self.warm.discard(runner)
            self._replace(runner, "it used CPU with no request in hand")


def kill_group(pid: int) -> None:
    """SIGKILL a runner's process group: the runner and all it started.

    The worker is the one owner of this kill (the zygote forks and reaps runners,
    and kills none it handed over: zygote.fork_runner): a runner's uid, cgroups and seccomp filter are nested in
    its zygote's sandbox, whose CPU it shares, so a runner may starve or outlive a
    zygote's kill; the worker is outside the sandbox, and nothing a script does
    slows or stops it.  (A runner that ended by itself is reaped by the zygote,
    and its pid could in theory come back, pid_max forks later, before this.)"""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class CpuExceeded(Exception):
    """The slot used more than cpu_seconds on one request."""


class ScriptOutput:
    """What the sandbox writes on stdout and stderr, into the node's log: line by
    line, each marked with its slot and escaped, up to OUTPUT_BUDGET bytes per
    request (the rest is counted), so no script can forge or flood log lines."""

    def __init__(self, fd: int, label: str):
        self.fd, self.label = fd, label
        os.set_blocking(fd, False)
        self.partial = b""
        self.budget = OUTPUT_BUDGET
        self.dropped = 0

    def new_request(self) -> None:
        self.report()
        self.budget = OUTPUT_BUDGET

    def report(self) -> None:
        """One line for the output past the budget, once the request has replied."""
        if self.dropped:
            log.info("%s: %d more bytes of output not logged", self.label, self.dropped)
            self.dropped = 0

    def drain(self) -> None:
        for _ in range(64):  # at most 4 MB a call: the request's deadline still counts
            try:
                chunk = os.read(self.fd, 65536)
            except BlockingIOError:
                return
            if not chunk:
                return
            lines = (self.partial + chunk).split(b"\n")
            self.partial = lines.pop()
            if len(self.partial) > LINE_MAX:
                lines.append(self.partial)
                self.partial = b""
            for line in lines:
                self._log(line)

    def _log(self, line: bytes) -> None:
        if self.budget <= 0:
            self.dropped += len(line) + 1
            return
        self.budget -= len(line) + 1
        text = line[:LINE_MAX].decode("utf-8", "backslashreplace")
        if not text.isprintable():
            text = "".join(ch if ch.isprintable() or ch == "\t" else repr(ch)[1:-1]
                           for ch in text)
        log.info("%s: %s%s", self.label, text, " [...]" if len(line) > LINE_MAX else "")
