"""The pool parent: the one owner of worker processes.

    Pool.start(): run python.init once (GC off), gc.freeze(), fork N workers
    Pool.run():   wait_for_signals -> reap_workers -> watchdog -> manage_workers

The pool forks, kills and reaps workers (each worker forks its slot's
zygote, which forks runners: isolation.py, zygote.py).  Signal handlers only
record (through the wakeup fd); the loop reaps, kills and respawns.  A dead
worker's replacement tells the broker whom it replaces and why, so the
broker can answer what the dead one held at once.  The watchdog kills a
worker whose request is past its deadline: in isolation "none" at the
deadline or past the CPU budget (scripts run in the worker), otherwise only
a backstop after the worker missed its own deadline.  Started as root, the
pool claims a block of sandbox uids no other deployment on the host uses
(uids.py) and gives it back when it stops.
A failing python.init, or workers that keep dying at boot, stop the pool
with exit status 3 (the node refuses to start) instead of looping.

Live changes, like gunicorn's: SIGHUP re-reads the config and python.init
and rolls the pool (a worker of the new generation is READY before one of
the old retires; a failing python.init or config keeps the old workers);
SIGTTIN and SIGTTOU add or retire one worker.  On the control socket that
``srw serve`` hands over (CONTROL_FD_ENV, a socketpair), ``size N`` sets the
size and ``reload ID`` reloads as SIGHUP does, answered with ``reload ID ok
generation N`` or ``reload ID refused REASON`` (one line).  The pool owns
twice its ceiling of slots (PoolSettings.slots), so a full pool can roll.
A retired worker drains: the broker gives it nothing more and it exits
once it has answered what it holds.
"""
from __future__ import annotations

import builtins
import gc
import logging
import os
import select
import signal
import sys
import time
import traceback
from pathlib import Path

import psutil
import setproctitle

from core import protocol as p
from core import logs
from core import config as configs
from core.config import (CONTROL_FD_ENV, MESSAGE_HEADROOM, RESUME_ENV, Config, ConfigError,
                         NodeSettings)
from core import exits, loop, timeouts

from . import profile as profiles
from . import uids
from .executor import Executor
from .isolation import seats as runner_seats
from .sandbox import PR_SET_CHILD_SUBREAPER, Sandbox, _prctl
from .roster import Roster, WorkerRecord
from .slots import BOOTING, BUSY, SlotTable
from .worker import Worker

log = logging.getLogger("srw.pool")

MAX_BOOT_FAILURES = 3
TICK = 0.05            # watchdog period, seconds
RESPAWN_WAIT = 1.0     # at most this long for a dead worker's leftovers to go first
MAX_ANSWER = 512       # bytes of a `reload` answer to serve
SIZE_FILE = "pool.size"  # in data_dir: the size now, which a pool serve restarts resumes


class InitError(Exception):
    """python.init raised; the message holds its traceback."""


def run_init(history_dir: Path) -> dict:
    """Run history/python.init in a new namespace and return it (the global context)."""
    path = history_dir / "python.init"
    context = {"__name__": "__srw_init__", "__builtins__": builtins}
    if not path.exists():
        return context
    if str(history_dir) not in sys.path:
        sys.path.insert(0, str(history_dir))
    gc.disable()  # python.init may build large structures; collect once at the end
    try:
        exec(compile(path.read_bytes(), str(path), "exec"), context)
    except BaseException as exc:
        tb = exc.__traceback__.tb_next if exc.__traceback__ else None
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        raise InitError(f"{path} failed:\n{text}") from None
    finally:
        gc.enable()
    return context


def one_line(text: str) -> str:
    """An error for one line of the control socket: python.init's traceback
    becomes its first line and its last (the exception)."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines)
    return f"{lines[0]} {lines[-1]}"


def _control_pipe() -> int:
    """The read end of the pipe `srw serve` passed us, non-blocking; -1 if none."""
    value = os.environ.pop(CONTROL_FD_ENV, "")
    if not value.isdigit():
        return -1
    fd = int(value)
    try:
        os.set_blocking(fd, False)
        os.set_inheritable(fd, False)
    except OSError:
        return -1
    return fd


def read_size(path: Path, ceiling: int) -> int | None:
    """The pool size kept in `path`, clamped to 1..ceiling; None when the file is
    missing or holds anything but a short number (at most 17 bytes are read)."""
    try:
        with open(path, "rb") as f:
            text = f.read(17)
        if len(text) > 16:
            return None
        return max(1, min(int(text.decode("ascii").strip()), ceiling))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None


class Pool:
    def __init__(self, config: Config, node: NodeSettings):
        self.config, self.node = config, node
        self.size = self._resumed_size() or config.pool.workers  # live workers wanted
        self.slot_count = config.pool.slots
        self.profile = profiles.load(config.pool.profile, config.path.parent)
        seats = runner_seats(self.profile.isolation, config.pool.warm_runners)
        self.uids = self._claim_uids(1 + self.slot_count * seats)
        self.sandbox = Sandbox(self.profile, node, self.uids.first if self.uids else 0,
                               self.slot_count, config.pool.history_dir, cluster=config.nodes,
                               seats=seats)
        self.slots = SlotTable(self.slot_count)   # what workers write; shared memory
        self.roster = Roster(self.slot_count)     # a record per worker and per slot
        self.generation = 0                       # python.init's; a reload adds one
        self.restarts = 0
        self.boot_failures = 0
        self.stopping = False
        self.reload_requested = False
        self.reopen_requested = False
        self.reload_asks: list[str] = []   # `reload ID` lines from serve, answered after it
        self.resize_steps: list[int] = []  # TTIN +1, TTOU -1, in order, by the handler
        self.control = _control_pipe()  # fd, or -1 when started alone
        self.control_buf = b""
        self.fatal: str | None = None

    def _claim_uids(self, count: int) -> uids.Claim | None:
        """Started as root with a profile that changes uids: `count` of our own."""
        if os.geteuid() != 0 or not self.profile.user or self.profile.isolation == "none":
            return None
        node = self.node
        start = node.uids or self.profile.user
        return uids.claim(start, node.name, str(self.config.path), bool(node.uids), count)

    # Start -------------------------------------------------------------------

    def start(self) -> None:
        setproctitle.setproctitle(f"srw: pool {self.node.name}")
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # what a dead worker leaves behind comes to us
        self.context = run_init(Path(self.config.pool.history_dir))
        self._setup_signals()
        gc.collect()
        gc.freeze()  # children share init's objects without the GC dirtying their pages
        self._save_size()
        for slot in range(1, self.size + 1):
            self.spawn(slot)
        sb = self.sandbox
        log.info("pool %s: %d workers, profile %s (%s isolation, network %s, %s, %s, %s), "
                 "history %s", self.node.name, self.size, self.profile.name,
                 self.profile.isolation, self.profile.network,
                 f"a uid per runner, {sb.uid(1, 0)}-{sb.uid(self.slot_count, sb.seats - 1)} "
                 f"(claimed {self.uids.first}-{self.uids.last})" if sb.drop else "no uid change",
                 "slot cgroups" if sb.cgroups.enabled else "no cgroups",
                 "seccomp" if self.profile.seccomp else "no seccomp",
                 self.config.pool.history_dir)

    def _setup_signals(self) -> None:
        self.wake_r, self.wake_w = loop.wake_on_signals(
            self._record_signal, (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                                  signal.SIGUSR1, signal.SIGTTIN, signal.SIGTTOU))

    def _record_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_requested = True
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self.resize_steps.append(1 if signum == signal.SIGTTIN else -1)
        elif signum == signal.SIGUSR1:
            self.reopen_requested = True

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate): our log file, and the workers'."""
        self.reopen_requested = False
        logs.reopen()
        for pid in list(self.roster.workers):
            self._signal(pid, signal.SIGUSR1)

    def spawn(self, slot: int) -> None:
        # A reply must fit a message to the broker, headers and all.
        output_bytes = min(self.profile.output_bytes,
                           self.config.max_message - MESSAGE_HEADROOM)
        executor = Executor(self.context, output_bytes)
        predecessor = self.roster.slots[slot].predecessor
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker; it always leaves through os._exit()
            code, worker = 0, None
            try:
                self._child_reset()
                worker = Worker(self.config, self.node, self.sandbox, slot, executor,
                                self.slots, predecessor, self.restarts)
                code = worker.run()
            except BaseException:
                serving = worker is not None and worker.registered
                log.exception("worker %s#%d (pid %d) %s", self.node.name, slot, os.getpid(),
                              "failed while serving" if serving else "could not start")
                code = exits.WORKER_FAILED if serving else exits.WORKER_BOOT
            finally:
                logging.shutdown()
                sys.stderr.flush()
                os._exit(code)
        self.slots.reset(slot, pid)
        self.roster.spawned(slot, pid, self.generation)

    def _child_reset(self) -> None:
        # Its own session and group: no terminal (no script may reach the operator's
        # through it), and killpg reaches the worker and its zygote.
        os.setsid()
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        for sig in (signal.SIGTTIN, signal.SIGTTOU):  # the pool's business; default: stop
            signal.signal(sig, signal.SIG_IGN)
        signal.signal(signal.SIGUSR1, logs.on_reopen_signal)
        os.close(self.wake_r)
        os.close(self.wake_w)
        if self.control >= 0:
            os.close(self.control)

    # Main loop ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        while not self.stopping and self.fatal is None:
            self.wait_for_signals(TICK)
            self.read_control()
            if self.reopen_requested:
                self.reopen_logs()
            self.reap_workers()
            self.watchdog()
            self.kill_strays()
            if self.reload_requested:
                self.reload()
            while self.resize_steps:  # one by one: each clamped as it comes
                self.resize(self.size + self.resize_steps.pop(0))
            self.manage_workers()
        self.stop()
        if self.fatal:
            log.error("pool %s: %s", self.node.name, self.fatal)
            return exits.REFUSED
        return 0

    def wait_for_signals(self, timeout: float) -> None:
        fds = [self.wake_r] + ([self.control] if self.control >= 0 else [])
        try:
            ready, _, _ = select.select(fds, [], [], timeout)
        except InterruptedError:
            return
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 4096)
            except BlockingIOError:
                pass

    def read_control(self) -> None:
        """Commands from `srw serve` on the control pipe, one per line: ``size N``,
        and ``reload ID``, answered on the same socket (reload())."""
        if self.control < 0:
            return
        try:
            chunk = os.read(self.control, 4096)
        except BlockingIOError:
            return
        if not chunk:  # serve closed its end
            os.close(self.control)
            self.control = -1
            return
        *lines, self.control_buf = (self.control_buf + chunk).split(b"\n")
        self.control_buf = self.control_buf[-4096:]
        for line in lines:
            word, _, arg = line.decode("ascii", "replace").strip().partition(" ")
            if word == "size" and arg.isdigit():
                self.resize(int(arg))
            elif word == "reload" and arg.isalnum() and len(arg) <= 32:
                self.reload_requested = True
                self.reload_asks.append(arg)
            else:
                log.warning("pool %s: unknown control command %r", self.node.name, line[:80])

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if os.WIFSTOPPED(status):
                if pid in self.roster.workers:
                    self.kill(self.roster.workers[pid], f"{exits.describe(status)}; killed by "
                              "the pool", p.KILLED)
                else:
                    self._signal(pid, signal.SIGKILL)
                continue
            self.on_exit(pid, status)

    def on_exit(self, pid: int, status: int) -> None:
        record = self.roster.workers.get(pid)
        if record is None:
            return  # a grandchild reparented to us, or already handled
        self._kill_leftovers(pid, record.slot)
        _, state, _, served, job = self.slots.read(record.slot)
        end = self.roster.exited(pid, status, state, served, job, time.monotonic())
        where = f"worker {self.node.name}#{record.slot} (pid {pid})"
        if state == BOOTING and not end.planned:
            self.boot_failures += 1
            log.error("%s died at boot: %s", where, end.reason)
            if self.boot_failures >= MAX_BOOT_FAILURES:
                self.fatal = (f"{self.boot_failures} workers in a row died at boot "
                              f"(last: {end.reason}); see the errors above")
        elif not end.planned:
            self.restarts += 1
            self.boot_failures = 0
            busy = f" while running request {job.decode('ascii', 'replace')}" \
                if state == BUSY else ""
            log.warning("%s %s%s", where, end.reason, busy)
        else:
            log.debug("%s exited (%s)", where, "retired" if end.retired else "recycled")

    def watchdog(self) -> None:
        """Kill workers whose request ran past its deadline (and, in isolation none,
        its CPU budget: the worker measures its runners' CPU itself)."""
        now = time.monotonic()
        inline = self.profile.isolation == "none"
        for worker in list(self.roster.workers.values()):
            record = self.slots.read(worker.slot)
            wpid, state, kill_at, _, job = record
            if state != BUSY or wpid != worker.pid or worker.kill is not None:
                continue
            # The worker rewrites its record every request and a read can catch it
            # half written (BUSY with the idle record's kill_at 0): act on a record
            # only when a second read finds it whole and the same.
            if now > kill_at and kill_at > 0 and self.slots.read(worker.slot) == record:
                self.kill(worker, "request ran past its deadline (wall limit "
                                  f"{self.profile.wall_seconds:g} s or the request timeout)",
                          p.TIMEOUT)
                continue
            if not inline:
                continue
            # A request's CPU counts from the first tick that sees it (<= TICK late).
            if worker.cpu_job != job:
                worker.cpu_job, worker.cpu_start = job, self._cpu_used(worker.pid)
            elif self._cpu_used(worker.pid) - worker.cpu_start > self.profile.cpu_seconds:
                self.kill(worker, f"request used more than {self.profile.cpu_seconds:g} s "
                                  "of CPU", p.TIMEOUT)

    def _cpu_used(self, pid: int) -> float:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    def kill(self, worker: WorkerRecord, reason: str, job_status: str) -> None:
        worker.kill = (reason, job_status)
        self._signal(worker.pid, signal.SIGKILL, group=True)  # the worker and what it spawned

    def _kill_leftovers(self, pid: int, slot: int) -> None:
        """Whatever the dead worker's scripts started goes with it."""
        try:
            os.killpg(pid, signal.SIGKILL)  # the group outlives its leader while it has members
        except ProcessLookupError:
            pass
        self.sandbox.cgroups.kill(slot)

    def kill_strays(self) -> None:
        """SIGKILL our children that are not workers: orphans of dead workers' scripts."""
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                children = [int(x) for x in f.read().split()]
        except OSError:
            return
        for pid in children:
            if pid not in self.roster.workers:
                self._signal(pid, signal.SIGKILL)

    def manage_workers(self) -> None:
        if self.stopping or self.fatal:
            return
        self.retire_extra()
        now = time.monotonic()
        for slot in self.roster.to_spawn(self.generation, self.size):
            # Leftovers still dying would count against the new worker's process limit.
            dead_at = self.roster.slots[slot].dead_at
            if self.sandbox.cgroups.kill(slot) and now - dead_at < RESPAWN_WAIT:
                continue
            self.spawn(slot)

    def retire_extra(self) -> None:
        """Roster.to_retire: rolling to a new generation, or shrinking."""
        for worker in self.roster.to_retire(self.generation, self.size,
                                            lambda slot: self.slots.read(slot)[1]):
            self.retire(worker.pid)

    def retire(self, pid: int) -> None:
        """SIGTERM: the worker drains (DRAIN to the broker), then exits 0."""
        if self.roster.retire(pid):
            self._signal(pid, signal.SIGTERM)

    def resize(self, size: int) -> None:
        wanted, ceiling = size, self.config.pool.ceiling
        size = max(1, min(size, ceiling))
        if size != wanted:
            log.warning("pool %s: %d workers asked; the pool takes 1 to %d (pool.max_workers)",
                        self.node.name, wanted, ceiling)
        if size != self.size:
            log.info("pool %s: resized from %d to %d workers", self.node.name, self.size, size)
        self.size = size
        self._save_size()

    def _size_file(self) -> Path:
        return Path(self.node.data_dir) / SIZE_FILE

    def _save_size(self) -> None:
        """Where a pool serve restarts finds the size (TTIN/TTOU, `srw resize`)."""
        path = self._size_file()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.with_suffix(".tmp").write_text(f"{self.size}\n")
            path.with_suffix(".tmp").replace(path)
        except OSError as exc:
            log.warning("pool %s: cannot keep its size in %s (%s); a restart starts at "
                        "pool.workers", self.node.name, path, exc.strerror)

    def _resumed_size(self) -> int | None:
        """Restarted by `srw serve` (RESUME_ENV): the size the pool before had."""
        if not os.environ.get(RESUME_ENV):
            return None
        size = read_size(self._size_file(), self.config.pool.ceiling)
        if size is None:
            return None
        log.info("pool %s: restarted at %d workers, the size before", self.node.name, size)
        return size

    def reload(self) -> None:
        """SIGHUP: read the config and run python.init again; on success roll the
        pool to the new generation (manage_workers).  A failure keeps the old."""
        self.reload_requested = False
        try:
            config = self._reread_config()
            context = run_init(Path(config.pool.history_dir))
        except (ConfigError, InitError) as exc:
            log.error("pool %s: reload refused, keeping the old workers: %s",
                      self.node.name, exc)
            self._answer_reload(f"refused {one_line(str(exc))}")
            return
        gc.unfreeze()
        self.context = context
        gc.collect()
        gc.freeze()
        if config.pool.workers != self.config.pool.workers:
            self.resize(config.pool.workers)
        self.config = config
        self.generation += 1
        log.info("pool %s: python.init reloaded; rolling %d workers to generation %d",
                 self.node.name, self.size, self.generation)
        self._answer_reload(f"ok generation {self.generation}")

    def _answer_reload(self, outcome: str) -> None:
        """`reload ID OUTCOME` to serve for each reload it asked for (a HUP asks none)."""
        asks, self.reload_asks = self.reload_asks, []
        for ask in asks:
            try:
                os.write(self.control, f"reload {ask} {outcome}".encode()[:MAX_ANSWER] + b"\n")
            except OSError:  # serve went away or its end is full: it stops waiting on its own
                return

    def _reread_config(self) -> Config:
        """The config file again; what the sandbox was built from must not change."""
        config = configs.load(self.config.path)
        fixed = [("pool.profile", lambda c: c.pool.profile),
                 ("pool.history_dir", lambda c: c.pool.history_dir),
                 ("pool.max_workers", lambda c: c.pool.ceiling),
                 (f"node {self.node.name}", lambda c: c.node(self.node.name)),
                 ("the node list", lambda c: c.nodes)]
        for what, value in fixed:
            if value(config) != value(self.config):
                raise ConfigError(f"{what} changed in {config.path}; that takes a restart "
                                  "(srw stop, then srw serve)")
        return config

    # Stop --------------------------------------------------------------------

    def stop(self) -> None:
        """SIGUSR2 (finish what you hold and go: the broker stopped first), wait up
        to timeouts.POOL_STOP, SIGKILL, final reap."""
        workers = self.roster.workers
        for pid in list(workers):
            log.debug("stopping worker pid %d", pid)
            self.roster.retire(pid)
            self._signal(pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeouts.POOL_STOP
        while workers and time.monotonic() < deadline:
            self.wait_for_signals(TICK)
            self.reap_workers()
        for pid in list(workers):
            log.warning("worker pid %d did not stop within %.0f s; SIGKILL", pid,
                        timeouts.POOL_STOP)
            self._signal(pid, signal.SIGKILL, group=True)
        while workers:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            if pid in workers:
                self._kill_leftovers(pid, workers[pid].slot)
                self.roster.exited(pid, status, BOOTING, 0, b"", time.monotonic())  # forgotten
        self.sandbox.cgroups.remove()
        if self.uids:
            self.uids.release()

    @staticmethod
    def _signal(pid: int, sig: int, group: bool = False) -> None:
        try:
            (os.killpg if group else os.kill)(pid, sig)
        except ProcessLookupError:
            pass


def main(config: Config, node_name: str) -> int:
    node = config.node(node_name)
    try:
        pool = Pool(config, node)
        pool.start()
    except (InitError, ConfigError) as exc:
        print(f"srw: node {node.name} refuses to start: {exc}", file=sys.stderr)
        return exits.REFUSED
    return pool.run()
