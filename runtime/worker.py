"""A pool worker: the child side of the fork, serving exec requests until told to go.

    broker back ROUTER  <-- DEALER (identity "n1#2:<pid>") --  Worker.run()
                                                                  | pipes
                                                        runner (sandboxed, isolation.py)

The worker is trusted: it holds the node's socket to the broker, its slot
record and the request's deadline, and runs no script (except in isolation
"none", the trusted profile).  After the fork it first forks its slot's
zygote (before any socket or request exists in it), then opens its own
ZeroMQ context (nothing ZeroMQ crosses the fork), announces READY with its
credits and the broker's token, and loops: take the jobs of each REQUEST
(one or more), run them one by one in that order through the runner (in copy
isolation the requests queued for the current one's tenant are written to its
runner with it, so that it goes from one to the next without waiting for the
worker, and they run next, out of turn: Worker._ahead, isolation.Ahead), reply
to each as it ends (in copy and fork isolation several replies may share a
REPLY, held at most REPLY_HOLD), heartbeat while idle.  If the broker goes silent
it announces READY again, so a restarted broker gets its workers back.  On
SIGTERM, after max_requests or when the broker says BYE it finishes what the
broker already gave it and exits.  On SIGUSR2 (the pool stops, its broker
already stopped) it finishes what it holds and exits without that handshake.
"""
from __future__ import annotations

import _signal
import collections
import functools
import itertools
import logging
import os
import signal
import time
from typing import NamedTuple

import setproctitle
import zmq

from core import protocol as p
from core import trust
from core import exits, logs, loop, timeouts
from core.config import Config, NodeSettings
from core.sched import LoadScheduling, open_thread_list, pin_to_cpu, slot_cpu, thread_ids

from .executor import Executor
from .grantor import Grantor
from .isolation import AHEAD, AHEAD_BYTES, Ahead, InlineRunner, ProcessRunner, ZygoteFailed, \
    ahead_bytes, no_grant
from .profile import Profile
from .sandbox import Sandbox, die_with_parent
from .scripts import NAME_RE, Script, ScriptCache, ScriptNameError, ScriptNotFound
from .roster import Predecessor
from .slots import SlotTable

log = logging.getLogger("srw.worker")
# The line per exec (README): the broker's id of the request ends it, as in its warnings.
exec_line = logs.HotLine(log, "exec %s %d B -> %d B %s %d us req %s")


IDLE_AFTER_MS = 5  # a worker waiting this long is idle: title and log lines updated
SEND_TIMEOUT_MS = 10_000  # a reply the broker cannot take within this: the worker goes
REPLY_HOLD = 0.002  # copy, fork: a reply waits at most this long to share a message
REPLY_BATCH = 16    # ... with at most this many others
LEAVE_LINGER_MS = 100
REGISTER_RETRY_MS = 50  # a READY that could not be sent at start (no broker yet): again
AHEAD_MARGIN = 0.05  # seconds: a request this close to its deadline is not written ahead
AHEAD_SCAN = 64  # queued requests looked through for those of the current one's tenant
SHOWN_NAMES = 1024  # script names whose exec-line form is kept (Worker._shown)


class Queued(NamedTuple):
    """A request the broker gave this worker, not yet run."""
    job: bytes
    deadline: float  # monotonic
    meta: p.ExecMeta
    data: bytes
    position: int  # from 1, in the order the broker sent them (Worker.begun)


class Worker:
    def __init__(self, config: Config, node: NodeSettings, sandbox: Sandbox, slot: int,
                 executor: Executor, slots: SlotTable, predecessor: Predecessor,
                 restarts: int):
        self.config, self.node, self.sandbox = config, node, sandbox
        self.profile: Profile = sandbox.profile
        self.slot, self.pid = slot, os.getpid()
        self.title = f"srw: worker {node.name}#{slot}"
        self.executor, self.slots = executor, slots
        self.scripts = ScriptCache(config.pool.history_dir)
        self.predecessor, self.restarts = predecessor, restarts
        self.endpoint = node.workers_endpoint  # read as root: the name depends on who asks
        self.hb_interval = config.broker.heartbeat_interval
        self.silence_limit = self.hb_interval * config.broker.liveness
        self.served = 0  # requests run, replied or not (max_requests)
        self.jobs: collections.deque[Queued] = collections.deque()  # received, not yet run
        self.received = 0  # requests received: the last one's position
        # The furthest position begun (run, or written to a runner): the slot
        # record's count, so that after a death the broker requeues only the
        # requests after it (broker/dispatch.never_started).
        self.begun = 0
        self.state = ""  # the title's last word(s)
        self.stop_requested = False
        self.leave = False  # SIGUSR2: the pool stops; no drain handshake
        self.draining = False
        self.drain_deadline = 0.0
        self.done = False
        self.registered = False  # the broker has answered our READY: we are serving
        self.exit_code = 0
        self.pending: list[list] = []  # replies held to share a message (see reply)
        self.answered: list = []  # their capabilities, revoked as they are sent
        # Tokens minted, by job, until its reply: (token, (id, deadline) to revoke).
        self.grants: dict[bytes, tuple[bytes, tuple]] = {}
        self.last_written = b""  # the request at position self.begun (slot record)
        self.pending_since = 0.0
        self.pending_bytes = 0  # what the held replies add up to (at most reply_limit)
        self.reply_limit = p.batch_limit(config.max_message)
        self.hold_replies = self.profile.isolation != "none"
        self.shown: dict[str, str] = {}  # script name -> as the exec line shows it

    # Lifecycle ---------------------------------------------------------------

    def run(self) -> int:
        """Serve until drained; returns the exit status for the caller's os._exit()."""
        self._restore_signals()
        self._title("idle")
        logs.retag(f"worker {self.node.name}#{self.slot}", buffered=True)
        self.runner = self._start_runner()  # first: the zygote forks from a clean worker
        self.scripts.open_dir()
        task_dir = open_thread_list()
        self.ctx = zmq.Context(io_threads=1)
        # After the zygote's fork: no runner holds the MAC key (runtime/grantor.py).
        self.grantor = Grantor.for_config(self.config, self.node, self.ctx,
                                          self.profile.network)
        self.sock = self._connect()
        self.poller = self._poller()
        self.scheduling = LoadScheduling(thread_ids(task_dir))
        unsent = not self.register()  # the slot says BOOTING until the broker answers
        handlers = {p.REQUEST: self.on_request, p.HEARTBEAT: self.on_heartbeat,
                    p.REREGISTER: self.on_reregister, p.BYE: self.on_bye}
        last_heard = next_hb = time.monotonic()
        wait_ms = int(self.hb_interval * 1000)
        while not self.done:
            if self.jobs:
                if self._may_write_ahead():
                    self._take_waiting(handlers)
                self.run_next()
                # A request kept us from listening, not the broker from talking:
                # what it sent meanwhile is queued, so count silence from here.
                last_heard = time.monotonic()
            else:  # a READY not sent yet (no broker yet): try again soon
                frames = self._next_message(REGISTER_RETRY_MS if unsent else wait_ms)
                if frames is not None and not self.registered:
                    self.slots.idle(self.slot, self.pid, self.begun)  # the pool sees us up
                    self.registered = True
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
                try:
                    self.sock.send(p.HEARTBEAT, zmq.NOBLOCK)
                except zmq.Again:  # no broker connected: its silence is counted below
                    pass
                next_hb = now + self.hb_interval
            if unsent and not self.registered and not self.draining:
                unsent = not self.register()
            elif now - last_heard > self.silence_limit and not self.draining:
                log.info("%s: broker silent for %.1f s, registering again", self.title,
                         now - last_heard)
                self.register()
                last_heard = now
            self._maybe_drain(now)
        self.flush_replies()
        # Replies flushed above may still be on their way; a broker that is gone
        # takes none, so leaving waits less for them.
        self.sock.close(linger=LEAVE_LINGER_MS if self.leave else 1000)
        if self.grantor is not None:
            self.grantor.close()
        self.ctx.term()
        return self.exit_code

    def _start_runner(self) -> InlineRunner | ProcessRunner:
        if self.profile.isolation == "none":
            self.sandbox.enter_worker(self.slot)  # limits only: scripts run here
            runner = InlineRunner(self.executor, self.scripts)
            runner.start()
            return runner
        die_with_parent()
        pool = self.config.pool
        cpu = slot_cpu(self.slot) if pool.pin and self.profile.isolation == "copy" else None
        runner = ProcessRunner(self.sandbox, self.slot, self.node.name, pool.history_dir,
                               self.executor.output_bytes, pool.warm_runners,
                               pool.warm_per_caller, cpu)
        runner.start(self.executor, self.slots)
        # After the zygote's fork: it forks and sets up runners on any CPU (a new
        # tenant's fork need not wait for this one), each runner then joins us.
        if cpu is not None:
            pin_to_cpu(cpu)
        runner.flush = self.flush_replies
        return runner

    def _may_write_ahead(self) -> bool:
        """Whether the next request may take others with it to its runner (_ahead):
        copy isolation, few queued, and not itself written ahead already (then
        nothing is written now, and what waits in the socket can wait too)."""
        return self.profile.isolation == "copy" and len(self.jobs) <= AHEAD and \
            not self.runner.holds(self.jobs[0].job)

    def _take_waiting(self, handlers: dict) -> None:
        """What the broker sent while the last request ran, so that the requests
        queued behind the next one can be written ahead to its runner (_ahead).
        Asked with ZMQ_EVENTS, not a NOBLOCK recv: this runs before most requests
        and mostly finds nothing, and zmq.Again costs ~3 us more than the check."""
        for _ in range(AHEAD):
            if not p.readable(self.sock):
                return
            frames = p.recv_frames(self.sock)
            handler = handlers.get(frames[0])
            if handler is None:
                log.warning("%s: unknown command %r from broker", self.title, frames[0][:16])
            else:
                handler(frames)

    def _next_message(self, wait_ms: int) -> list[bytes] | None:
        # Requests usually wait in the socket (credits): poll only when none does.
        frames = p.recv_frames_nowait(self.sock)
        if frames is None:
            # Under steady load the next batch comes within IDLE_AFTER: only a worker
            # that waits longer pays for the idle title and the log write.
            if not p.poll(self.sock_only, IDLE_AFTER_MS):
                self._title("idle")
                self.runner.idle()
                logs.flush()
                self.scheduling.relax()
                events = dict(self.poller.poll(wait_ms))
                if self.wake_r in events:
                    os.read(self.wake_r, 512)
                if self.sock not in events:
                    return None  # a signal (the stop) or the heartbeat's turn
            frames = p.recv_frames_nowait(self.sock)
        return frames

    def _poller(self) -> zmq.Poller:
        """The idle wait: the broker's socket, and a pipe a signal writes to, so
        that TERM or USR2 ends the wait at once rather than at the next heartbeat
        (ZeroMQ's poll resumes after a signal).  Made after the zygote's fork."""
        wake_r, wake_w = os.pipe()
        for fd in (wake_r, wake_w):
            os.set_blocking(fd, False)
        signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
        self.wake_r = wake_r
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        self.sock_only = [(self.sock, zmq.POLLIN)]  # the short wait for the next batch
        return poller

    def _title(self, state: str) -> None:
        # setproctitle costs a system call: only on a change, and "idle" only
        # when the worker is about to wait.
        if state != self.state:
            self.state = state
            setproctitle.setproctitle(f"{self.title} {state}")

    def _connect(self) -> zmq.Socket:
        sock = loop.socket(self.ctx, zmq.DEALER, self.config.max_message,
                           IDENTITY=f"{self.node.name}#{self.slot}:{self.pid}".encode(),
                           SNDTIMEO=SEND_TIMEOUT_MS, RECONNECT_IVL=50, RECONNECT_IVL_MAX=500)
        sock.connect(self.endpoint)
        return sock

    def register(self) -> bool:
        """READY, with the token the broker wrote beside its socket (read each time:
        a restarted broker has a new one); False if not sent.  No broker yet: at
        start, tried again every REGISTER_RETRY_MS (the broker starts beside us);
        later, at the next silence check."""
        try:
            token = trust.read_worker_token(self.endpoint)
        except trust.TokenUnavailable as exc:
            log.debug("%s: not registering yet: %s", self.title, exc)
            return False
        pre = self.predecessor
        ready = p.Ready(slot=self.slot, pid=self.pid, credits=self.config.pool.credits,
                        token=token, pool=os.getppid(),
                        replaces=pre.pid, reason=pre.reason, restarts=self.restarts,
                        job=pre.job, job_status=pre.job_status, served=pre.served)
        try:
            p.send_frames(self.sock, ready.to_frames(), noblock=True)
        except zmq.Again:  # not connected yet
            return False
        return True

    def _restore_signals(self) -> None:
        # getsignal reads Python's own table; only a change costs a system call.
        # _signal's returns the raw value: signal's wraps ints in an enum, slowly.
        if _signal.getsignal(signal.SIGTERM) != self._on_sigterm:
            signal.signal(signal.SIGTERM, self._on_sigterm)
        if _signal.getsignal(signal.SIGINT) != signal.SIG_IGN:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        if _signal.getsignal(signal.SIGUSR2) != self._on_sigusr2:
            signal.signal(signal.SIGUSR2, self._on_sigusr2)

    def _on_sigterm(self, signum, frame) -> None:
        self.stop_requested = True

    def _on_sigusr2(self, signum, frame) -> None:
        """The pool stops, after the broker did (srw serve stops brokers first and
        waits for their last replies): finish what is here and go, with no DRAIN
        for a broker that is not there to answer it."""
        self.stop_requested = self.leave = True

    def _maybe_drain(self, now: float) -> None:
        limit = self.config.pool.max_requests
        if self.leave and not self.jobs:
            self.done = True
        elif not self.draining and (self.stop_requested or (limit and self.served >= limit)):
            self.draining = True
            self.drain_deadline = now + self.silence_limit
            try:
                self.sock.send(p.DRAIN, zmq.NOBLOCK)
            except zmq.Again:  # no broker: the drain deadline ends the wait
                pass
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
        self.scripts.new_batch()
        for job, budget, meta, data in jobs:
            self.received += 1
            self.jobs.append(Queued(job, received + budget, meta, data, self.received))
        # A backlog: the node is loaded, so take messages in batches (core.sched).
        self.scheduling.update(len(self.jobs) > 1, received)

    def run_next(self) -> None:
        job, deadline, meta, data, position = self.jobs.popleft()
        self._begin(job, position)
        started = time.perf_counter()
        now = time.monotonic()
        shown = self.shown.get(meta.name) or self._shown(meta.name)
        if now >= deadline and not self.runner.holds(job):  # the broker answered it
            status, out, error = p.TIMEOUT, b"", "the request's deadline passed before it started"
        else:
            status, out, error = self._run(job, meta, data, min(deadline,
                                                                now + self.profile.wall_seconds))
        run_us = (time.perf_counter() - started) * 1e6
        self.served += 1
        self.slots.idle(self.slot, self.pid, self.begun)
        self.reply(job, status, out, error, run_us)
        if self.profile.isolation == "none":
            self._restore_signals()  # the script ran here and may have changed them
        recycle = self.runner.after()
        if recycle and not self.stop_requested:
            log.warning("%s: %s; recycling this worker", self.title, recycle)
            self.stop_requested = True
        exec_line(shown, len(data), len(out), status, run_us, job.decode("ascii", "replace"))

    def _shown(self, name: str) -> str:
        """`name` as the exec line shows it.  Valid names seen are kept (at most
        SHOWN_NAMES of at most 255 characters: names come from clients, and a bad
        one may be as long as a message)."""
        if not NAME_RE.fullmatch(name):
            return "<content>" if not name else "<bad name>"
        if len(self.shown) < SHOWN_NAMES:
            self.shown[name] = name
        return name

    def _run(self, job: bytes, meta: p.ExecMeta, data: bytes,
             deadline: float) -> tuple[str, bytes, str]:
        backstop = 0.0 if self.profile.isolation == "none" else timeouts.WORKER_BACKSTOP
        try:
            if self.runner.holds(job):  # written ahead to its runner: it has started
                self._busy(meta, deadline + backstop)
                return self.runner.run_held(job, deadline)
            try:
                script = self.scripts.get(meta.name) if meta.name else None
            except ScriptNameError as exc:
                return p.BAD_REQUEST, b"", str(exc)
            except ScriptNotFound as exc:
                return p.NOT_FOUND, b"", str(exc)
            ahead = self._ahead(meta, script, data)
            for req in ahead:  # recorded before they are written: none runs twice
                self._begin(req.job, req.position)
            self._busy(meta, deadline + backstop)
            return self.runner.run(script, meta.code, data, meta.cookie, deadline,
                                   meta.caller or p.LOCAL_CALLER,
                                   self._granter(job, meta, script, deadline), job, ahead)
        except ZygoteFailed as exc:  # no sandbox left to run in: this worker goes
            log.error("%s: %s; leaving", self.title, exc)
            self.stop_requested = self.done = True
            self.exit_code = exits.NO_SANDBOX
            return p.KILLED, b"", f"{exc}; the worker is replaced"

    def _busy(self, meta: p.ExecMeta, kill_at: float) -> None:
        self.slots.busy(self.slot, self.pid, kill_at, self.begun, self.last_written)
        self._title(f"busy {meta.name or '<content>'}")
        if self.pending:  # held replies go out while the runner works, when due
            self.runner.flush_at = self.pending_since + REPLY_HOLD

    def _begin(self, job: bytes, position: int) -> None:
        """`job` has begun: if this worker dies, the broker counts it and every
        request it sent before it as begun (answered, never run again)."""
        if position > self.begun:
            self.begun, self.last_written = position, job

    def _ahead(self, meta: p.ExecMeta, script: Script | None, data: bytes) -> list[Ahead]:
        """The requests queued for this one's tenant (the same caller, script and
        content) that its runner may take next, in the order they came: at most
        AHEAD of them and AHEAD_BYTES in all, none close to its deadline (written
        ahead, a request counts as started, and is answered `timeout` rather than
        refused).  They move to the front of the queue, so that a worker serving
        several tenants wakes a runner once for a run of its requests; the other
        tenants' requests wait at most AHEAD requests longer."""
        if self.profile.isolation != "copy" or not self.jobs:
            return []
        picked: list[Queued] = []
        now = time.monotonic()
        caller = meta.caller or p.LOCAL_CALLER
        size = ahead_bytes(data, meta.cookie, meta.code) + (len(script.source) if script else 0)
        for at, queued in enumerate(itertools.islice(self.jobs, AHEAD_SCAN)):
            other = queued.meta
            if other.name != meta.name or other.code != meta.code or \
                    (other.caller or p.LOCAL_CALLER) != caller:
                continue
            if script is not None:
                try:
                    if self.scripts.get(other.name) is not script:
                        continue
                except (ScriptNameError, ScriptNotFound):
                    continue
            size += ahead_bytes(queued.data, other.cookie, other.code)
            # The tenant's later requests wait too, so that its own stay in order;
            # one with an id never runs before a request sent earlier (its lock's order).
            if queued.deadline - now < AHEAD_MARGIN or size > AHEAD_BYTES or \
                    (other.id is not None and at > len(picked)):
                break
            picked.append(queued)
            if len(picked) == AHEAD:
                break
        if not picked:
            return []
        if picked[-1] is not self.jobs[len(picked) - 1]:  # not the head of the queue
            moved = set(map(id, picked))
            self.jobs = collections.deque(picked + [q for q in self.jobs if id(q) not in moved])
        wall = now + self.profile.wall_seconds
        return [Ahead(q.job, q.position, q.data, q.meta.cookie,
                      self._granter(q.job, q.meta, script, min(q.deadline, wall)))
                for q in picked]

    def _granter(self, job: bytes, meta: p.ExecMeta, script: Script | None,
                 deadline: float):
        """The request's runtime.isolation.Grant (no_grant without a grantor)."""
        if self.grantor is None:
            return no_grant
        return functools.partial(self._grant, job, meta, script, deadline)

    def _grant(self, job: bytes, meta: p.ExecMeta, script: Script | None, deadline: float,
               asked: bool) -> bytes:
        """The request's token: what goes with it, or (asked) what its script gets,
        while it runs; one minted is the request's only one, revoked at its reply."""
        minted = self.grants.get(job)
        if minted is not None:
            return minted[0]
        offer = self.grantor.ask if asked else self.grantor.offer
        token, entry = offer(job, meta, script, deadline)
        if entry is not None:  # (redis-cluster mode: nothing to revoke)
            self.grants[job] = (token, entry)
        return token

    def reply(self, job: bytes, status: str, out: bytes, error: str, run_us: float) -> None:
        """Send a reply, or in copy and fork isolation hold it while more requests
        are queued here, for at most REPLY_HOLD: a runner's request costs a
        round trip, and a message per reply would wake the broker (and its
        clients) for each one.  Scripts that run in the worker (isolation
        none) are answered at once.  Held replies share a message only within
        max_message: the broker's socket drops a worker that sends more."""
        size = len(out) + 4 * len(error) + p.ENTRY_OVERHEAD
        if self.pending and self.pending_bytes + size > self.reply_limit:
            self.flush_replies()
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending_bytes += size
        self.pending.append([job, status, error, out, run_us, *self.runner.warm_state(),
                             self.runner.moved()])
        minted = self.grants.pop(job, None)
        if minted is not None:
            self.answered.append(minted[1])
        if not self.hold_replies or not self.jobs or len(self.pending) >= REPLY_BATCH \
                or time.monotonic() - self.pending_since >= REPLY_HOLD:
            self.flush_replies()

    def flush_replies(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.pending_bytes = self.pending, [], 0
        if self.grantor is not None:  # first: refused before anyone sees the replies
            self.grantor.revoke(self.answered)
            self.answered = []
        try:
            p.send_frames(self.sock, p.worker_replies_frames(pending))
        except zmq.Again:  # the broker takes nothing: let the pool start a worker it knows
            log.error("%s: the broker took no reply for %d s; leaving", self.title,
                      SEND_TIMEOUT_MS // 1000)
            self.stop_requested = self.done = True
            self.exit_code = exits.NO_BROKER

    def on_heartbeat(self, frames: list[bytes]) -> None:
        pass  # receipt alone proves the broker is alive

    def on_reregister(self, frames: list[bytes]) -> None:
        if not self.draining:
            self.register()

    def on_bye(self, frames: list[bytes]) -> None:
        self.done = True
