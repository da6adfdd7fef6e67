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
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from broker.client import BrokerUnavailable, Client
from srw import security
from srw.config import Config, NodeSettings
from storage.client import storage_ready

log = logging.getLogger("srw.serve")

EXIT_REFUSED = 3  # a child that refuses to start (python.init, profile, store): stop all
MAX_RESTARTS = 5          # per child, within RESTART_WINDOW
RESTART_WINDOW = 60.0
READY_TIMEOUT = 60.0
SUPERVISOR_ENV = "SRW_SUPERVISOR_PID"


class StartError(RuntimeError):
    """A node could not be started; the message says why."""


@dataclass
class Child:
    role: str                 # "storage", "broker", "pool" or "proxy"
    node: str
    argv: list[str]
    proc: subprocess.Popen | None = None
    restarts: list[float] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.role} {self.node}" if self.node else self.role

    def start(self) -> None:
        env = dict(os.environ, **{SUPERVISOR_ENV: str(os.getpid())})
        # Its own session, without the operator's terminal and with stdin from
        # /dev/null: Ctrl-C reaches the supervisor only, which stops the children
        # in order, and nothing below can push keystrokes into that terminal.
        self.proc = subprocess.Popen(self.argv, env=env, start_new_session=True,
                                     stdin=subprocess.DEVNULL)

    def signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)


def child_argv(role: str, config: Config, node: str = "") -> list[str]:
    argv = [sys.executable, "-m", "srw", role, "--config", str(config.path)]
    return argv + (["--node", node] if node else [])


class Supervisor:
    def __init__(self, config: Config, nodes: list[NodeSettings], extra: list[Child] = ()):
        self.config, self.nodes = config, nodes
        self.children: list[Child] = []
        for node in nodes:
            self.children.append(Child("storage", node.name,
                                       child_argv("storage", config, node.name)))
            self.children.append(Child("broker", node.name, child_argv("broker", config, node.name)))
            self.children.append(Child("pool", node.name, child_argv("pool", config, node.name)))
        self.children += list(extra)
        self.stopping = False

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop)
        try:
            for child in self.children:
                child.start()
            self.wait_ready()
            while not self.stopping:
                self.watch_children()
                time.sleep(0.1)
            return 0
        except StartError as exc:
            print(f"srw: {exc}", file=sys.stderr)
            return 1
        finally:
            self.stop()

    def _on_stop(self, signum, frame) -> None:
        self.stopping = True

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
                    if status["workers"] >= self.config.pool.workers and \
                            storage_ready(pending[name].storage, curve=curve):
                        node = pending.pop(name)
                        print(f"srw: node {name} ready: broker {node.broker}, "
                              f"{status['workers']} workers, group {node.group}", flush=True)
                if time.monotonic() > deadline:
                    raise StartError(f"nodes {', '.join(pending)} not ready within "
                                     f"{READY_TIMEOUT:.0f} s; see the log above")
                time.sleep(0.05)
        finally:
            for client in clients.values():
                client.close()

    def watch_children(self) -> None:
        for child in self.children:
            code = child.proc.poll() if child.proc else None
            if code is None or self.stopping:
                continue
            if code == EXIT_REFUSED:
                raise StartError(f"node {child.node} refuses to start ({child.label} exited; "
                                 "the reason is above)")
            now = time.monotonic()
            child.restarts = [t for t in child.restarts if now - t < RESTART_WINDOW] + [now]
            if len(child.restarts) > MAX_RESTARTS:
                raise StartError(f"{child.label} died {MAX_RESTARTS} times within "
                                 f"{RESTART_WINDOW:.0f} s; giving up")
            print(f"srw: {child.label} exited with status {code}; restarting it",
                  file=sys.stderr, flush=True)
            child.start()

    def stop(self) -> None:
        """Drain brokers, then stop pools and the rest; SIGKILL what stays."""
        grace = self.config.broker.request_timeout + 2.0
        for roles, wait in ((("proxy",), 5.0), (("broker",), grace), (("pool", "storage"), 8.0)):
            group = [c for c in self.children if c.role in roles]
            for child in group:
                child.signal(signal.SIGTERM)
            deadline = time.monotonic() + wait
            for child in group:
                if child.proc is None:
                    continue
                try:
                    child.proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    print(f"srw: {child.label} (pid {child.proc.pid}) did not stop; SIGKILL",
                          file=sys.stderr, flush=True)
                    child.proc.kill()
                    child.proc.wait()
