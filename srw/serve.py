"""``srw serve``: start the nodes of a config in the foreground, stop them cleanly.

Each node is a broker process and a pool process (each its own interpreter,
so nothing ZeroMQ or LMDB crosses a fork).  The supervisor waits until every
pool has all its workers registered, then watches: a broker that dies is
restarted (the workers find it again); a pool that refuses to start (exit
status 3: python.init failed, workers die at boot) stops the whole node set
with that reason.  SIGTERM or Ctrl-C drains: brokers first (they answer what
is in flight), then pools, each step bounded, SIGKILL last.

Each node also has a storage process (storage/node.py, LMDB): a node is ready
when its storage answers too; a dead one is restarted like a broker, and one
that cannot open its store or bind its address exits 3 (refuses to start).
With ``[cluster] engine = "redis-cluster"`` the data is in Redis, which srw
neither starts nor watches: a node is its broker and pool only.

As a service: HUP rolls every pool, TTIN/TTOU add or retire a worker per
node, USR1 reopens logs, QUIT stops at once; the control socket (srw/control.py)
takes the same from `srw reload|resize|stop`; [serve] pidfile holds our pid;
under systemd (Type=notify) we report READY=1 and STOPPING=1.

Scripts pushed into the cluster (`srw scripts push`, srw/pushed.py) reach the
history dir from here (srw/pushsync.py: never an older map than the one taken):
the loop checks the store every 2 s, and the control
socket's `sync` does it at once; a new python.init rolls the pools as HUP does.
"""
from __future__ import annotations

import gc
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from broker.client import BrokerUnavailable, Client
from core import exits, logs, loop, security, timeouts
from core.config import (CONTROL_FD_ENV, RESUME_ENV, START_ENV, SUPERVISOR_ENV, Config,
                         NodeSettings)
from srw.control import COMMANDS, ControlServer, ControlUnavailable, socket_path
from srw.pushed import INIT, PushError
from srw.pushsync import NodeSync
from storage.engine import engine_class
from storage.errors import StorageError

log = logging.getLogger("srw.serve")

MAX_RESTARTS = 5          # per child, within RESTART_WINDOW
RESTART_WINDOW = 60.0
READY_TIMEOUT = 60.0
READY_POLL = 0.02         # s between asking a starting node's broker for its workers
LOOP_TICK = 0.1           # s between child checks when no signal or command comes
# What each signal does, as logged when it arrives (once, from the loop).
SIGNAL_ACTIONS = {
    signal.SIGTERM: "draining, then stopping", signal.SIGINT: "draining, then stopping",
    signal.SIGQUIT: "stopping at once", signal.SIGHUP: "reloading python.init in every pool",
    signal.SIGUSR1: "reopening the log files", signal.SIGUSR2: "ignored (no meaning here)",
    signal.SIGTTIN: "one more worker per pool", signal.SIGTTOU: "one worker fewer per pool",
}
SIGNALS = tuple(SIGNAL_ACTIONS)


class StartError(RuntimeError):
    """A node could not be started; the message says why.  `status` is serve's exit
    status: 2 (exits.CONFIG) for what the operator must change before a restart
    helps (a taken port or control socket), which a unit's
    RestartPreventExitStatus=2 then does not retry."""

    def __init__(self, message: str, status: int = exits.FAILED):
        super().__init__(message)
        self.status = status


@dataclass
class Child:
    role: str                 # "storage", "broker", "pool" or "proxy"
    node: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    control: int = -1         # a pool's: serve's end of its control socket
    answers: bytes = b""      # what the pool said on it, not yet a whole line

    @property
    def label(self) -> str:
        return f"{self.role} {self.node}" if self.node else self.role

    def start(self) -> None:
        env = dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())}, **self.env)
        pass_fds = ()
        if self.role == "pool":  # `size N`, `reload ID` reach the pool on a socket of its own
            if self.control >= 0:
                os.close(self.control)
            ours, theirs = socket.socketpair()
            self.control, read_end, self.answers = ours.detach(), theirs.detach(), b""
            os.set_blocking(self.control, False)
            env[CONTROL_FD_ENV], pass_fds = str(read_end), (read_end,)
        # Its own session, without the operator's terminal and with stdin from
        # /dev/null: Ctrl-C reaches the supervisor only, which stops the children
        # in order, and nothing below can push keystrokes into that terminal.
        try:
            self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True,
                                         stdin=subprocess.DEVNULL, pass_fds=pass_fds)
        finally:
            for fd in pass_fds:
                os.close(fd)

    def tell(self, line: str) -> bool:
        """A line on the control pipe (pools only); False if it cannot take it now."""
        try:
            return os.write(self.control, line.encode() + b"\n") > 0
        except (BlockingIOError, BrokenPipeError, OSError):
            return False

    def answer(self, ask: str) -> str | None:
        """The pool's answer to `reload ASK` ("ok generation N" or "refused
        REASON"), if it has come; older answers are dropped."""
        try:
            self.answers += os.read(self.control, 4096)
        except (BlockingIOError, OSError):
            pass
        *lines, self.answers = self.answers.split(b"\n")
        self.answers = self.answers[-4096:]
        prefix = f"reload {ask} ".encode()
        for line in lines:
            if line.startswith(prefix):
                return line[len(prefix):].decode("utf-8", "replace")
        return None

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)


def _holder(port: int) -> str:
    """Who listens on `port`, as far as this user may see; what to do."""
    try:
        for conn in psutil.net_connections("tcp"):
            if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN \
                    and conn.pid:
                name = " ".join(psutil.Process(conn.pid).cmdline()).replace("\n", " ")[:60]
                return f"pid {conn.pid} ({name}) listens on it; stop it or change the port"
    except (psutil.Error, OSError):
        pass
    return "another process listens on it; stop it or change the port"


def child_argv(role: str, config: Config, node: str = "") -> list[str]:
    argv = [sys.executable, "-m", "srw", role, "--config", str(config.path)]
    return argv + (["--node", node] if node else [])


class Supervisor:
    def __init__(self, config: Config, nodes: list[NodeSettings], extra: list[Child] = (),
                 every_node: bool = True):
        self.config, self.nodes = config, nodes
        self.every_node = every_node  # else `serve --node`: its control socket is per node
        self.engine = engine_class(config)  # chosen once: the roles each node runs
        self.engine.check_config(config)  # e.g. no Redis password: said once, not per pool
        self.children: list[Child] = [Child(role, node.name, child_argv(role, config, node.name))
                                      for node in nodes for role in self.engine.roles_of(node)]
        self.children += list(extra)
        self.start_id = os.urandom(8).hex()  # our children answer with it (START_ENV)
        for child in self.children:
            child.env[START_ENV] = self.start_id
        self.stopping = False
        self.reload_requested = False  # HUP: the main loop reloads
        self.quit = False  # SIGQUIT: stop at once, no drain
        self.control: ControlServer | None = None
        self.notify_socket = os.environ.pop("NOTIFY_SOCKET", "")  # ours, not the children's
        self.scripts = NodeSync(config, nodes, security.role_credentials(config, "node"))

    def run(self, with_proxy: bool = False) -> int:
        self._setup_signals()
        try:
            self.check_ports(with_proxy)
            self.open_control()
            for child in self.children:
                child.start()
            self.wait_ready()
            if not self.stopping:
                self.notify("READY=1\nSTATUS=" + ", ".join(n.name for n in self.nodes) + " ready")
            while not self.stopping:
                self.watch_children()
                if self.reload_requested:
                    self.reload("SIGHUP")
                self.took_scripts(self.scripts.poll(time.monotonic()))
                self.wait(LOOP_TICK)
            return 0
        except StartError as exc:
            print(f"srw: {exc}", file=sys.stderr)
            return exc.status
        finally:
            self.notify("STOPPING=1")
            try:
                self.stop()
            finally:  # whatever stopped us: no pidfile or socket outlives us
                self.close_control()
                self.scripts.close()
                # The interpreter's last collections walk every object for nothing
                # (0.3-0.6 s at exit, measured): serve's stop ends here.
                gc.freeze()

    # Signals: the handler records, the loop acts (and logs each one once) ------

    def _setup_signals(self) -> None:
        """Each signal of SIGNALS is queued by _on_signal; the wakeup pipe ends any
        wait (self.wait) at once.  SIGCHLD only wakes: a child's exit ends a wait
        for it without a poll interval."""
        self.pending: list[int] = []
        self.wake_r, _ = loop.wake_on_signals(self._on_signal, SIGNALS)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)

    def _on_signal(self, signum, frame) -> None:
        self.pending.append(signum)
        if signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            self.stopping = True  # ends whatever loop we are in; handle_signals says why

    def wait(self, timeout: float) -> None:
        """Up to `timeout` s, until a signal, a child's exit or a control command;
        then act on the signals that came and serve the command."""
        fds = [self.wake_r] + ([self.control.sock] if self.control is not None else [])
        try:
            ready, _, _ = select.select(fds, [], [], max(0.0, timeout))
        except InterruptedError:
            ready = []
        if self.wake_r in ready:
            try:
                os.read(self.wake_r, 4096)
            except BlockingIOError:
                pass
        self.handle_signals()
        if self.control is not None and self.control.sock in ready:
            self.control.poll(0)

    def handle_signals(self) -> None:
        while self.pending:
            signum = self.pending.pop(0)
            name = signal.Signals(signum).name
            what = SIGNAL_ACTIONS[signum]
            log.info("%s: %s", name, what)
            if signum == signal.SIGQUIT:
                print(f"srw: {name}: {what}", file=sys.stderr, flush=True)
                self.quit = True
            elif signum == signal.SIGHUP:
                self._on_reload(signum, None)
            elif signum == signal.SIGUSR1:
                self._on_reopen(signum, None)
            elif signum in (signal.SIGTTIN, signal.SIGTTOU):
                self._on_resize_signal(signum, None)

    def notify(self, state: str) -> None:
        """sd_notify: tell systemd (Type=notify) our state.  Five lines over a
        datagram socket; libsystemd's bindings would need a C build."""
        address = self.notify_socket
        if not address:
            return
        if address.startswith("@"):
            address = "\0" + address[1:]  # an abstract socket
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(state.encode(), address)
            except OSError as exc:
                log.warning("cannot notify systemd on %s: %s", self.notify_socket, exc)

    # The control socket and the pid file --------------------------------------

    def open_control(self) -> None:
        settings = self.config.serve
        if settings.pidfile:
            tmp = f"{settings.pidfile}.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(tmp, settings.pidfile)  # never a half-written pid
        if settings.control:
            try:
                path = socket_path(self.config, "" if self.every_node else self.nodes[0].name)
                self.control = ControlServer(path, self.on_command)
            except ControlUnavailable as exc:
                raise StartError(f"[serve] control: {exc}", exits.CONFIG) from None

    def close_control(self) -> None:
        if self.control is not None:
            self.control.close()
        pidfile = self.config.serve.pidfile
        try:
            if pidfile and Path(pidfile).read_text().strip() == str(os.getpid()):
                os.unlink(pidfile)
        except OSError:
            pass

    def on_command(self, words: list[str]) -> str:
        """One command from the control socket (srw/control.py); the reply line."""
        command, args = words[0], words[1:]
        if command == "reload" and not args:
            rolled, refused = self.reload("srw reload")
            if refused:
                return ("error: reload refused, old workers kept: " + "; ".join(refused)
                        + "".join(f"; {line}" for line in rolled))
            return "ok: " + "; ".join(rolled)
        if command == "stop" and not args:
            self.stopping = True
            return f"ok: stopping (pid {os.getpid()})"
        if command == "resize" and 1 <= len(args) <= 2 and args[0].isdigit():
            return self.resize(int(args[0]), args[1] if len(args) == 2 else "")
        if command == "sync" and not args:
            return self.sync_scripts()
        return f"error: unknown command {' '.join(words)[:80]!r}; commands: {COMMANDS}"

    def sync_scripts(self) -> str:
        """`sync`: the pushed scripts into the history dir now (srw/pushed.py)."""
        try:
            changed = self.scripts.sync()
        except (StorageError, PushError, OSError) as exc:
            return f"error: script sync: {exc}"
        self.took_scripts(changed)
        nodes = ", ".join(n.name for n in self.nodes)
        said = f"took {', '.join(changed)}" if changed else "up to date"
        refused = "".join(f"; {note}" for note in self.scripts.notes)
        return f"ok: {nodes}: sequence {self.scripts.taken[0]}, {said}{refused}"

    def took_scripts(self, changed: list[str]) -> None:
        """A new python.init rolls the pools (as HUP); other scripts need nothing:
        a worker reads a script again when its file changes."""
        if INIT in changed:
            self.reload("a new python.init was pushed")

    def resize(self, size: int, node: str) -> str:
        ceiling = self.config.pool.ceiling
        if not 1 <= size <= ceiling:
            return f"error: a pool takes 1 to {ceiling} workers (pool.max_workers)"
        names = [n.name for n in self.nodes]
        if node and node not in names:
            return f"error: no node {node!r} here (nodes: {', '.join(names)})"
        pools = [c for c in self.children if c.role == "pool" and c.node in (node or c.node)]
        failed = [c.node for c in pools if not c.tell(f"size {size}")]
        if failed:
            return f"error: the pool of {', '.join(failed)} did not take the command"
        return f"ok: {', '.join(c.node for c in pools)} resizing to {size} workers"

    def _on_reload(self, signum, frame) -> None:
        """HUP: the main loop reloads every pool (reload())."""
        self.reload_requested = True

    def reload(self, why: str) -> tuple[list[str], list[str]]:
        """Every pool runs python.init again and rolls its workers (a failing
        python.init or config keeps the old ones); the other roles have nothing
        to reload.  Waits for each pool's answer (timeouts.RELOAD_WAIT) and
        returns (NODE's line per pool that rolled, one per pool that did not).
        Under systemd, RELOADING=1 before and READY=1 after, for
        Type=notify-reload (systemd 253 and later)."""
        self.reload_requested = False
        self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        if why != "SIGHUP":  # a signal is logged as it arrives (handle_signals)
            log.info("%s: reloading python.init in every pool", why)
        ask = os.urandom(8).hex()
        pools = [c for c in self.children if c.role == "pool"]
        waiting = {c.node: c for c in pools if c.tell(f"reload {ask}")}
        rolled, refused = [], [f"node {c.node}: its pool did not take the command (it is "
                               "restarting?)" for c in pools if c.node not in waiting]
        deadline = time.monotonic() + timeouts.RELOAD_WAIT
        while waiting and not self.stopping:
            select.select([c.control for c in waiting.values()], [], [], 0.1)
            for name, child in list(waiting.items()):
                said = child.answer(ask)
                if said is None and child.proc.poll() is None and time.monotonic() < deadline:
                    continue
                del waiting[name]
                if said and said.startswith("ok "):
                    rolled.append(f"node {name}: rolling to {said[3:]}")
                else:
                    refused.append(f"node {name}: " + (
                        said.removeprefix("refused ") if said else
                        f"its pool exited ({child.label})" if child.proc.poll() is not None
                        else f"no answer within {timeouts.RELOAD_WAIT:g} s"))
        refused += [f"node {name}: serve is stopping" for name in waiting]
        for line in refused:
            log.error("reload refused, old workers kept: %s", line)
        self.notify("READY=1")
        return rolled, refused

    def _on_resize_signal(self, signum, frame) -> None:
        """TTIN / TTOU: each pool adds / retires one worker."""
        for child in self.children:
            if child.role == "pool":
                child.signal(signum)

    def _on_reopen(self, signum, frame) -> None:
        """USR1 (logrotate): every process opens the log file again."""
        logs.reopen()
        for child in self.children:
            child.signal(signal.SIGUSR1)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        pending = {n.name: n for n in self.nodes}
        curve = security.role_credentials(self.config, "node")
        clients = {n.name: Client(n.broker, max_message=self.config.max_message, curve=curve)
                   for n in self.nodes}
        try:
            while pending:
                if self.stopping:
                    return
                self.watch_children()
                for name in list(pending):
                    try:
                        status = clients[name].status(timeout=0.5)
                    except BrokerUnavailable:
                        continue
                    if status.get("start") == self.start_id and \
                            status["workers"] >= self.config.pool.workers and \
                            self._storage_ready(pending[name], curve):
                        node = pending.pop(name)
                        line = (f"node {name} ready: broker {node.broker}, "
                                f"{status['workers']} workers, "
                                + (f"beside redis {node.redis}" if node.redis
                                   else f"group {node.group}"))
                        print(f"srw: {line}", flush=True)
                        log.info("%s", line)
                if time.monotonic() > deadline:
                    raise StartError(f"nodes {', '.join(pending)} not ready within "
                                     f"{READY_TIMEOUT:.0f} s; see the log above")
                self.wait(READY_POLL)
        finally:
            for client in clients.values():
                client.close()

    def _storage_ready(self, node: NodeSettings, curve) -> bool:
        """The node's storage role answers (the engine's: lmdb's own storage process;
        redis-cluster: nothing of ours to ask)."""
        return self.engine.ready(node, curve, self.start_id)

    def check_ports(self, with_proxy: bool) -> None:
        """Every TCP address we are about to listen on is free: one taken by another
        process stops us now, with one line, before a child fails on it."""
        addresses = [(f"node {n.name}: {key}", getattr(n, key)[len("tcp://"):])
                     for n in self.nodes for key in ("storage", "broker")
                     if getattr(n, key).startswith("tcp://")]
        if with_proxy:
            addresses.append(("proxy.listen", self.config.proxy.listen))
        for what, address in addresses:
            host, port = address.rsplit(":", 1)
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("" if host == "*" else host, int(port)))
                except OSError as exc:
                    raise StartError(f"{what} {address}: cannot listen there ({exc.strerror}); "
                                     f"{_holder(int(port))}", exits.CONFIG) from None

    def watch_children(self) -> None:
        for child in self.children:
            code = child.proc.poll() if child.proc else None
            if code is None or self.stopping:
                continue
            if code == exits.REFUSED:
                raise StartError(f"node {child.node} refuses to start ({child.label} exited; "
                                 "the reason is above)")
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW] + [now]
            if len(child.restarts) > MAX_RESTARTS:
                raise StartError(f"{child.label} died {MAX_RESTARTS} times within "
                                 f"{RESTART_WINDOW:.0f} s; giving up")
            print(f"srw: {child.label} exited with status {code}; restarting it",
                  file=sys.stderr, flush=True)
            if child.role == "pool":  # at the size it had (TTIN/TTOU, srw resize)
                child.env[RESUME_ENV] = "1"
            child.start()

    def stop(self) -> None:
        """Drain brokers, then stop pools and the rest; SIGKILL what stays.  QUIT
        (before or during this) kills every child at once."""
        began = time.monotonic()
        self.handle_signals()
        for roles, wait in ((("proxy",), timeouts.SERVE_PROXY_WAIT),
                            (("broker",), timeouts.broker_drain(self.config)),
                            (("pool", "storage"), timeouts.SERVE_STOP_WAIT)):
            if self.quit:
                break
            group = [c for c in self.children if c.role in roles and c.proc]
            for child in group:
                child.signal(signal.SIGTERM)
            self._wait_exit(group, time.monotonic() + wait)
            for child in group:
                if child.proc.poll() is None and not self.quit:
                    print(f"srw: {child.label} (pid {child.proc.pid}) did not stop; SIGKILL",
                          file=sys.stderr, flush=True)
                    child.proc.kill()
                    child.proc.wait()
        if self.quit:  # the workers die with their pools (die_with_parent)
            for child in self.children:
                child.signal(signal.SIGKILL)
            for child in self.children:
                if child.proc is not None:
                    child.proc.wait()
        log.info("every process stopped, %.2f s after the stop began", time.monotonic() - began)

    def _wait_exit(self, group: list[Child], deadline: float) -> None:
        """Until every child of `group` exited, the deadline, or QUIT: woken by
        SIGCHLD (self.wait), never a poll interval."""
        while not self.quit and any(c.proc.poll() is None for c in group):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            self.wait(left)
