"""A pool worker: the child side of the fork, serving exec requests until told to go.

    broker back ROUTER  <-- DEALER (identity "n1#2:<pid>") --  Worker.run()

After the fork the worker closes its sandbox around itself (sandbox.py), opens
its own ZeroMQ context (nothing ZeroMQ crosses the fork), announces READY with
its credits and then loops: take the jobs of each REQUEST (one or more), run
them one by one in that order through the runner, send a REPLY for each as it
ends, heartbeat while idle.  If the broker goes silent it announces READY again, so a
restarted broker gets its workers back.  On SIGTERM or after max_requests
it sends DRAIN, finishes what the broker already gave it, and exits on BYE.
"""
from __future__ import annotations

import _signal
import collections
import logging
import os
import signal
import time
from dataclasses import dataclass

import setproctitle
import zmq

from broker import protocol as p
from broker import trust
from srw import logs
from srw.config import Config, NodeSettings
from srw.sched import LoadScheduling, open_thread_list, thread_ids

from .executor import Executor
from .isolation import CopyRunner, ForkRunner
from .profile import Profile
from .sandbox import Sandbox
from .scripts import NAME_RE
from .slots import SlotTable

log = logging.getLogger("srw.worker")


@dataclass(frozen=True)
class Predecessor:
    """What the pool tells a new worker about the one it replaces (sent in READY)."""
    pid: int = 0
    reason: str = ""
    job: bytes = b""
    job_status: str = ""
    served: int = 0


FORK_BACKSTOP = 2.0  # fork isolation: the pool kills the worker only if it misses its own deadline
IDLE_AFTER_MS = 5     # a worker waiting this long is idle: title and log lines updated


class Worker:
    def __init__(self, config: Config, node: NodeSettings, sandbox: Sandbox, slot: int,
                 executor: Executor, slots: SlotTable, predecessor: Predecessor,
                 restarts: int):
        self.config, self.node, self.sandbox = config, node, sandbox
        self.profile: Profile = sandbox.profile
        self.slot, self.pid = slot, os.getpid()
        self.title = f"srw: worker {node.name}#{slot}"
        self.executor, self.slots = executor, slots
        self.predecessor, self.restarts = predecessor, restarts
        self.endpoint = node.workers_endpoint  # read as root: the name depends on who asks
        self.hb_interval = config.broker.heartbeat_interval
        self.silence_limit = self.hb_interval * config.broker.liveness
        self.served = 0  # requests run, replied or not: the broker reads it after a death
        self.jobs: collections.deque = collections.deque()  # received, not yet run
        self.state = ""  # the title's last word(s)
        self.stop_requested = False
        self.draining = False
        self.drain_deadline = 0.0
        self.done = False
        self.token = self._read_token()  # interim, see register(): read as root, at fork

    # Lifecycle ---------------------------------------------------------------

    def run(self) -> None:
        """Serve until drained; the caller leaves the process with os._exit()."""
        self._restore_signals()
        self._title("idle")
        logs.retag(f"worker {self.node.name}#{self.slot}", buffered=True)
        self.executor.scripts.open_dir()
        task_dir = open_thread_list()  # the sandbox closes /proc; ZeroMQ's thread comes after
        self.sandbox.enter_worker(self.slot)
        fork = self.profile.isolation == "fork"
        self.runner = ForkRunner(self.executor, self.sandbox,
                                 f"srw: request {self.node.name}#{self.slot}") if fork \
            else CopyRunner(self.executor)
        self.runner.start()
        self.ctx = zmq.Context(io_threads=1)
        self.sock = self._connect()
        self.scheduling = LoadScheduling(thread_ids(task_dir))
        self.register()
        self.slots.idle(self.slot, self.pid, 0)
        handlers = {p.REQUEST: self.on_request, p.HEARTBEAT: self.on_heartbeat,
                    p.REREGISTER: self.on_reregister, p.BYE: self.on_bye}
        last_heard = next_hb = time.monotonic()
        wait_ms = int(self.hb_interval * 1000)
        while not self.done:
            if self.jobs:
                self.run_next()
                # A request kept us from listening, not the broker from talking:
                # what it sent meanwhile is queued, so count silence from here.
                last_heard = time.monotonic()
            else:
                frames = self._next_message(wait_ms)
                if frames is not None:
                    handler = handlers.get(frames[0])
                    if handler is None:
                        log.warning("%s: unknown command %r from broker", self.title,
                                    frames[0][:16])
                    else:
                        handler(frames)
                    last_heard = time.monotonic()
            now = time.monotonic()
            if now >= next_hb:
                self.sock.send(p.HEARTBEAT)
                next_hb = now + self.hb_interval
            if now - last_heard > self.silence_limit and not self.draining:
                log.info("%s: broker silent for %.1f s, registering again", self.title,
                         now - last_heard)
                self.register()
                last_heard = now
            self._maybe_drain(now)
        self.sock.close(linger=1000)
        self.ctx.term()

    def _next_message(self, wait_ms: int) -> list[bytes] | None:
        # Requests usually wait in the socket (credits): poll only when none does.
        frames = p.recv_frames_nowait(self.sock)
        if frames is None:
            # Under steady load the next batch comes within IDLE_AFTER: only a worker
            # that waits longer pays for the idle title and the log write.
            if not self.sock.poll(IDLE_AFTER_MS):
                self._title("idle")
                logs.flush()
                self.scheduling.relax()
                if not self.sock.poll(wait_ms):
                    return None
            frames = p.recv_frames_nowait(self.sock)
        return frames

    def _title(self, state: str) -> None:
        # setproctitle costs a system call: only on a change, and "idle" only
        # when the worker is about to wait.
        if state != self.state:
            self.state = state
            setproctitle.setproctitle(f"{self.title} {state}")

    def _connect(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, f"{self.node.name}#{self.slot}:{self.pid}".encode())
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RECONNECT_IVL, 50)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 500)
        sock.connect(self.endpoint)
        return sock

    def _read_token(self) -> bytes:
        try:
            return trust.read_worker_token(self.endpoint)
        except trust.TokenUnavailable:
            return b""

    def register(self) -> None:
        # Interim (broker-hardening), until workers register as root: the broker's
        # token is read each time; a worker whose sandbox dropped its uid cannot
        # read it and uses the one read at fork (none: it waits for REREGISTER).
        token = self._read_token() or self.token
        if not token:
            return
        pre = self.predecessor
        ready = p.Ready(slot=self.slot, pid=self.pid, credits=self.config.pool.credits,
                        token=token, pool=os.getppid(),
                        replaces=pre.pid, reason=pre.reason, restarts=self.restarts,
                        job=pre.job, job_status=pre.job_status, served=pre.served)
        self.sock.send_multipart(ready.to_frames())

    def _restore_signals(self) -> None:
        # getsignal reads Python's own table; only a change costs a system call.
        # _signal's returns the raw value: signal's wraps ints in an enum, slowly.
        if _signal.getsignal(signal.SIGTERM) != self._on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        if _signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _maybe_drain(self, now: float) -> None:
        limit = self.config.pool.max_requests
        if not self.draining and (self.stop_requested or (limit and self.served >= limit)):
            self.draining = True
            self.drain_deadline = now + self.silence_limit
            self.sock.send(p.DRAIN)
        elif self.draining and now > self.drain_deadline:
            self.done = True  # broker gone: nothing left to finish for it

    # Commands from the broker ------------------------------------------------

    def on_request(self, frames: list[bytes]) -> None:
        """Take the jobs of a REQUEST; they run one by one, in the order sent."""
        received = time.monotonic()
        try:
            jobs = p.parse_jobs(frames)
        except p.ProtocolError as exc:
            log.warning("%s: bad REQUEST from broker: %s", self.title, exc)
            return
        self.executor.scripts.new_batch()
        for job, budget, meta, data in jobs:
            self.jobs.append((job, received + budget, meta, data))
        # A backlog: the node is loaded, so take messages in batches (srw.sched).
        self.scheduling.update(len(self.jobs) > 1, received)

    def run_next(self) -> None:
        job, deadline, meta, data = self.jobs.popleft()
        started = time.perf_counter()
        now = time.monotonic()
        shown = meta.name if NAME_RE.fullmatch(meta.name) else "<content>" if not meta.name \
            else "<bad name>"
        if now >= deadline:  # the broker has answered it already
            status, out, error = p.TIMEOUT, b"", "the request's deadline passed before it started"
        else:
            deadline = min(deadline, now + self.profile.wall_seconds)
            backstop = FORK_BACKSTOP if self.profile.isolation == "fork" else 0.0
            self.slots.busy(self.slot, self.pid, deadline + backstop, self.served, job)
            self._title(f"busy {shown}")
            status, out, error = self.runner.run(meta.name, meta.code, data, meta.cookie,
                                                 deadline)
        run_us = (time.perf_counter() - started) * 1e6
        self.served += 1
        self.slots.idle(self.slot, self.pid, self.served)
        self.reply(job, status, out, error, run_us)
        self._restore_signals()  # a script in copy isolation may have changed them
        recycle = self.runner.after()
        if recycle and not self.stop_requested:
            log.warning("%s: %s; recycling this worker", self.title, recycle)
            self.stop_requested = True
        if log.isEnabledFor(logging.INFO):
            log.info("exec %s %d B -> %d B %s %d us", shown, len(data), len(out), status, run_us)

    def reply(self, job: bytes, status: str, out: bytes, error: str, run_us: float) -> None:
        # At once, not with the rest of the batch: batching replies measured no
        # faster, and a reply held back would wait for a slow request after it,
        # or die with the worker.
        p.send_frames(self.sock, p.worker_replies_frames([[job, status, error, out, run_us]]))

    def on_heartbeat(self, frames: list[bytes]) -> None:
        pass  # receipt alone proves the broker is alive

    def on_reregister(self, frames: list[bytes]) -> None:
        if not self.draining:
            if not self._read_token():  # interim: sandboxed, it cannot learn a new token;
                self.done = True        # its replacement reads it at fork
                return
            self.register()

    def on_bye(self, frames: list[bytes]) -> None:
        self.done = True
