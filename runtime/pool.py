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

from broker import protocol as p
from srw import logs
from srw.config import MESSAGE_HEADROOM, Config, ConfigError, NodeSettings
from srw.serve import EXIT_REFUSED  # python.init failed, bad profile, workers die at boot

from . import profile as profiles
from . import uids
from .executor import Executor
from .sandbox import PR_SET_CHILD_SUBREAPER, Sandbox, _prctl
from .slots import BOOTING, BUSY, SlotTable
from .worker import Predecessor, Worker

log = logging.getLogger("srw.pool")

EXIT_WORKER_BOOT = 4   # a worker's own exit status when it cannot start
MAX_BOOT_FAILURES = 3
TICK = 0.05            # watchdog period, seconds
STOP_GRACE = 5.0
RESPAWN_WAIT = 1.0     # at most this long for a dead worker's leftovers to go first


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


def describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"killed by {signal.Signals(sig).name}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Pool:
    def __init__(self, config: Config, node: NodeSettings):
        self.config, self.node = config, node
        self.size = config.pool.workers
        self.profile = profiles.load(config.pool.profile, config.path.parent)
        self.uids = self._claim_uids()
        self.sandbox = Sandbox(self.profile, node, self.uids.first if self.uids else 0,
                               self.size, config.pool.history_dir, cluster=config.nodes)
        self.slots = SlotTable(self.size)
        self.pids: dict[int, int] = {}                  # pid -> slot
        self.predecessors: dict[int, Predecessor] = {}  # slot -> who it replaces
        self.kill_reasons: dict[int, tuple[str, str]] = {}  # pid -> (reason, job status)
        self.cpu_base: dict[int, tuple[bytes, float]] = {}  # pid -> (job, CPU seconds then)
        self.dead_at: dict[int, float] = {}             # slot -> when its worker died
        self.restarts = 0
        self.boot_failures = 0
        self.stopping = False
        self.reload_requested = False
        self.fatal: str | None = None

    def _claim_uids(self) -> uids.Claim | None:
        """Started as root with a profile that changes uids: a block of our own."""
        if os.geteuid() != 0 or not self.profile.user:
            return None
        node = self.node
        start = node.uids or self.profile.user
        return uids.claim(start, node.name, str(self.config.path), bool(node.uids), self.size)

    # Start -------------------------------------------------------------------

    def start(self) -> None:
        setproctitle.setproctitle(f"srw: pool {self.node.name}")
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # what a dead worker leaves behind comes to us
        self.context = run_init(Path(self.config.pool.history_dir))
        self._setup_signals()
        gc.collect()
        gc.freeze()  # children share init's objects without the GC dirtying their pages
        for slot in range(1, self.size + 1):
            self.spawn(slot)
        sb = self.sandbox
        log.info("pool %s: %d workers, profile %s (%s isolation, network %s, %s, %s, %s), "
                 "history %s", self.node.name, self.size, self.profile.name,
                 self.profile.isolation, self.profile.network,
                 f"runner uids {sb.uid(1)}-{sb.uid(self.size)} (block {sb.uid_base}-"
                 f"{sb.uid_base + uids.BLOCK - 1})" if sb.drop else "no uid change",
                 "slot cgroups" if sb.cgroups.enabled else "no cgroups",
                 "seccomp" if self.profile.seccomp else "no seccomp",
                 self.config.pool.history_dir)

    def _setup_signals(self) -> None:
        self.wake_r, wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake_w = wake_w
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                    signal.SIGUSR1):
            signal.signal(sig, self._record_signal)

    def _record_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        elif signum == signal.SIGHUP:
            self.reload_requested = True
        elif signum == signal.SIGUSR1:  # logrotate: our log file, and the workers'
            logs.reopen()
            for pid in list(self.pids):
                self._signal(pid, signal.SIGUSR1)

    def spawn(self, slot: int) -> None:
        predecessor = self.predecessors.pop(slot, Predecessor())
        # A reply must fit a message to the broker, headers and all.
        output_bytes = min(self.profile.output_bytes,
                           self.config.max_message - MESSAGE_HEADROOM)
        executor = Executor(self.context, output_bytes)
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker; it always leaves through os._exit()
            code = 0
            try:
                self._child_reset()
                code = Worker(self.config, self.node, self.sandbox, slot, executor, self.slots,
                              predecessor, self.restarts).run()
            except BaseException:
                traceback.print_exc()
                code = EXIT_WORKER_BOOT
            finally:
                logging.shutdown()
                sys.stderr.flush()
                os._exit(code)
        self.slots.reset(slot, pid)
        self.pids[pid] = slot

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
        signal.signal(signal.SIGUSR1, logs.on_reopen_signal)
        os.close(self.wake_r)
        os.close(self.wake_w)

    # Main loop ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; returns the process exit status."""
        while not self.stopping and self.fatal is None:
            self.wait_for_signals(TICK)
            self.reap_workers()
            self.watchdog()
            self.kill_strays()
            if self.reload_requested:
                self.reload()
            self.manage_workers()
        self.stop()
        if self.fatal:
            log.error("pool %s: %s", self.node.name, self.fatal)
            return EXIT_REFUSED
        return 0

    def wait_for_signals(self, timeout: float) -> None:
        try:
            ready, _, _ = select.select([self.wake_r], [], [], timeout)
        except InterruptedError:
            return
        if ready:
            try:
                os.read(self.wake_r, 4096)
            except BlockingIOError:
                pass

    def reap_workers(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG | os.WUNTRACED)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if os.WIFSTOPPED(status):
                sig = signal.Signals(os.WSTOPSIG(status)).name
                self.kill(pid, f"stopped by {sig}; killed by the pool", p.KILLED)
                continue
            self.on_exit(pid, status)

    def on_exit(self, pid: int, status: int) -> None:
        slot = self.pids.pop(pid, None)
        if slot is None:
            return  # a grandchild reparented to us, or already handled
        self._kill_leftovers(pid, slot)
        _, state, _, served, job = self.slots.read(slot)
        self.cpu_base.pop(pid, None)
        reason, job_status = self.kill_reasons.pop(pid, (describe_exit(status), p.KILLED))
        planned = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if state == BOOTING and not planned:
            self.boot_failures += 1
            log.error("worker %s#%d (pid %d) died at boot: %s", self.node.name, slot, pid, reason)
            if self.boot_failures >= MAX_BOOT_FAILURES:
                self.fatal = (f"{self.boot_failures} workers in a row died at boot "
                              f"(last: {reason}); see the errors above")
        elif not planned:
            self.restarts += 1
            self.boot_failures = 0
            job_id = job.decode("ascii", "replace")
            busy = f" while running request {job_id}" if state == BUSY else ""
            log.warning("worker %s#%d (pid %d) %s%s", self.node.name, slot, pid, reason, busy)
        else:
            log.debug("worker %s#%d (pid %d) exited (recycled)", self.node.name, slot, pid)
        self.predecessors[slot] = Predecessor(
            pid=pid, reason=reason if not planned else "recycled",
            job=job if state == BUSY else b"", job_status=job_status if state == BUSY else "",
            served=served)

    def watchdog(self) -> None:
        """Kill workers whose request ran past its deadline (and, in isolation none,
        its CPU budget: the worker measures its runners' CPU itself)."""
        now = time.monotonic()
        inline = self.profile.isolation == "none"
        for pid, slot in list(self.pids.items()):
            record = self.slots.read(slot)
            wpid, state, kill_at, _, job = record
            if state != BUSY or wpid != pid or pid in self.kill_reasons:
                continue
            # The worker rewrites its record every request and a read can catch it
            # half written (BUSY with the idle record's kill_at 0): act on a record
            # only when a second read finds it whole and the same.
            if now > kill_at and kill_at > 0 and self.slots.read(slot) == record:
                self.kill(pid, "request ran past its deadline (wall limit "
                               f"{self.profile.wall_seconds:g} s or the request timeout)",
                          p.TIMEOUT)
                continue
            if not inline:
                continue
            # A request's CPU counts from the first tick that sees it (<= TICK late).
            seen_job, cpu_start = self.cpu_base.get(pid, (None, 0.0))
            if seen_job != job:
                self.cpu_base[pid] = (job, self._cpu_used(pid))
            elif self._cpu_used(pid) - cpu_start > self.profile.cpu_seconds:
                self.kill(pid, f"request used more than {self.profile.cpu_seconds:g} s of CPU",
                          p.TIMEOUT)

    def _cpu_used(self, pid: int) -> float:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            return 0.0
        return times.user + times.system

    def kill(self, pid: int, reason: str, job_status: str) -> None:
        self.kill_reasons[pid] = (reason, job_status)
        try:
            os.killpg(pid, signal.SIGKILL)  # the worker and anything it spawned
        except ProcessLookupError:
            pass

    def _kill_leftovers(self, pid: int, slot: int) -> None:
        """Whatever the dead worker's scripts started goes with it."""
        try:
            os.killpg(pid, signal.SIGKILL)  # the group outlives its leader while it has members
        except ProcessLookupError:
            pass
        self.sandbox.cgroups.kill(slot)
        self.dead_at[slot] = time.monotonic()

    def kill_strays(self) -> None:
        """SIGKILL our children that are not workers: orphans of dead workers' scripts."""
        try:
            with open(f"/proc/self/task/{os.getpid()}/children") as f:
                children = [int(x) for x in f.read().split()]
        except OSError:
            return
        for pid in children:
            if pid not in self.pids:
                self._signal(pid, signal.SIGKILL)

    def manage_workers(self) -> None:
        if self.stopping or self.fatal:
            return
        live = set(self.pids.values())
        now = time.monotonic()
        for slot in range(1, self.size + 1):
            if slot in live:
                continue
            # Leftovers still dying would count against the new worker's process limit.
            if self.sandbox.cgroups.kill(slot) and now - self.dead_at.get(slot, 0) < RESPAWN_WAIT:
                continue
            self.spawn(slot)

    def reload(self) -> None:
        """SIGHUP: run python.init again; on success recycle every worker gracefully."""
        self.reload_requested = False
        try:
            context = run_init(Path(self.config.pool.history_dir))
        except InitError as exc:
            log.error("reload refused, keeping the old global context: %s", exc)
            return
        gc.unfreeze()
        self.context = context
        gc.collect()
        gc.freeze()
        log.info("pool %s: python.init reloaded; recycling workers", self.node.name)
        for pid in list(self.pids):
            os.kill(pid, signal.SIGTERM)

    # Stop --------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM, wait up to STOP_GRACE, SIGKILL, final reap."""
        for pid in list(self.pids):
            log.debug("stopping worker pid %d", pid)
            self._signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        while self.pids and time.monotonic() < deadline:
            self.wait_for_signals(TICK)
            self.reap_workers()
        for pid in list(self.pids):
            log.warning("worker pid %d did not stop within %.0f s; SIGKILL", pid, STOP_GRACE)
            self._signal(pid, signal.SIGKILL, group=True)
        while self.pids:
            try:
                pid, status = os.waitpid(-1, 0)
            except ChildProcessError:
                break
            slot = self.pids.pop(pid, None)
            if slot is not None:
                self._kill_leftovers(pid, slot)
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
        return EXIT_REFUSED
    return pool.run()
