"""The node's broker: spreads exec requests from clients over the pool's workers.

    clients (DEALER) --> [front ROUTER]  Broker  [back ROUTER] <-- workers (DEALER)

The broker keeps the sockets, the timers (heartbeats, the stop) and who may
connect and register; what runs where is the Dispatcher's (broker/dispatch.py,
no sockets: credits, the bounded queue, `choose_worker`, execs with the same
id in order; in copy isolation a tenant's requests to one worker,
broker/affinity.py).  A client that sends batches gets its replies in
batches, one message per loop turn, as a worker gets what it is given at once.
Every request gets exactly one reply: the worker's, ``timeout`` at its
deadline, ``killed`` when its worker died (learned from the replacement's
READY, or from a missed heartbeat) or was dropped, or ``bad_request`` for
frames that make no sense.

The back socket trusts only the pool's own workers (core/trust.py): only
the broker's uid can connect, and a READY must carry the token the broker
wrote beside the socket.  Whatever bytes a registered worker sends that do
not parse, or make no sense (a reply to a job it never got), get it dropped
and sent BYE; nothing a peer sends stops the broker.  No message in or out
is larger than ``Config.max_message``: libzmq disconnects a peer that sends
more, and the broker cuts its own batches to fit.
"""
from __future__ import annotations

import logging
import os
import signal
import time

import zmq

from core import __version__, logs, loop, security, timeouts, trust
from core import protocol as p
from core.config import START_ENV, Config, ConfigError, NodeSettings
from core.logs import Throttle
from core.sched import CALM_AFTER, LoadScheduling
from runtime import profile as profiles

from .affinity import TenantAffinity
from .dispatch import Dispatcher, Job, Worker
from .stats import ExecStats, WorkerMemory, worker_rows

log = logging.getLogger("srw.broker")

FRONT_HWM = 100_000  # messages queued per client
WARN_EVERY = 1.0     # seconds between warnings about strangers on the back socket


def back_hwm(credits: int) -> int:
    """ZMQ_RCVHWM of the back socket: the messages a worker may have queued at
    the broker.  Past that libzmq stops reading from it (it waits, loses
    nothing), so a worker that floods holds at most this many messages of at
    most max_message bytes in the broker's memory.  A worker has at most its
    credits replies outstanding, plus a READY, a DRAIN and a heartbeat or two:
    credits + 8.  Times 4, because libzmq wakes its I/O thread each time the
    broker has read half the HWM: at credits + 8 that cost 0.5 us per request
    (measured in process, 16 credits), at 4x nothing measurable."""
    return 4 * (credits + 8)


def keeps_tenants_warm(config: Config) -> bool:
    """Whether the pool's workers keep runners warm per tenant (copy isolation),
    so that a tenant's requests should go to one worker (broker/affinity.py)."""
    try:
        isolation = profiles.load(config.pool.profile, config.path.parent).isolation
    except ConfigError:  # the pool refuses to start with it, and says why
        return False
    return isolation == "copy" and config.pool.warm_runners > 0


class Broker:
    """One node's broker; ``run()`` until SIGTERM/SIGINT, then drain and return."""

    def __init__(self, config: Config, node: NodeSettings, ctx: zmq.Context | None = None):
        self.node = node
        self.settings = config.broker
        self.max_message = config.max_message
        self.max_batch = p.batch_limit(self.max_message)
        # A reply entry's bytes besides its data and error (node name included).
        self.reply_overhead = p.ENTRY_OVERHEAD + 4 * len(node.name)
        self.own_ctx = ctx is None  # ours to terminate when stopping
        self.ctx = ctx or zmq.Context()
        self.front = self.back = None
        self.token = b""  # written beside the back socket; removed with it when stopping
        # With curve: who may connect (ZAP) and what each client may do.
        self.keyring = security.keyring(config)
        try:
            if self.keyring is not None:
                self.keyring.start(self.ctx)
            self.front = loop.socket(self.ctx, zmq.ROUTER, self.max_message, rcvhwm=FRONT_HWM,
                                     secure=self.keyring and self.keyring.secure,
                                     ROUTER_MANDATORY=0)
            loop.bind(self.front, node.broker)
            self.back = loop.socket(self.ctx, zmq.ROUTER, self.max_message, ROUTER_MANDATORY=0,
                                    rcvhwm=back_hwm(config.pool.credits))
            self.token = trust.bind_workers_socket(self.back, node.workers_endpoint)
        except BaseException:
            self.close()
            raise
        self.d = Dispatcher(node.name, self.max_batch, self._answer, self.settings.queue_limit,
                            affinity=TenantAffinity() if keeps_tenants_warm(config) else None)
        # The dispatcher's registry and jobs, read here (status, heartbeats, stop).
        self.workers, self.jobs = self.d.workers, self.d.jobs
        self.outbox = p.Batches(self.max_batch)  # replies to clients that batch, this turn
        self.restarts = 0
        self.stats = ExecStats()
        self.memory = WorkerMemory()
        self.started = time.monotonic()
        self.stopping = False
        self.moved = False  # the worker reply being handled said MOVED (on_worker)
        self.close_at: float | None = None  # stopping, answered: when the sockets close
        self.replied_at = float("-inf")  # the last reply to a client left then (STOP_LINGER)
        self.next_heartbeat = 0.0
        self.scheduling = LoadScheduling()
        # Strangers on the back socket are warned about once a second (and answered
        # REREGISTER once per heartbeat tick: Dispatcher.stranger).
        self.stranger_warnings = Throttle(WARN_EVERY)

    def close(self) -> None:
        """Close the sockets; remove the socket file and the token, if still ours.
        The last replies to clients still get up to STOP_LINGER to leave."""
        for sock in (self.front, self.back):
            if sock is not None:
                sock.close(linger=int(timeouts.STOP_LINGER * 1000) if sock is self.front else 0)
        if self.token:
            trust.remove_worker_files(self.node.workers_endpoint, self.token)
            self.token = b""
        if self.keyring is not None:
            self.keyring.stop()
        if self.own_ctx:
            # Waits (up to the linger) until the last replies left: pyzmq does not
            # terminate a context at interpreter exit, and what was queued is lost.
            self.ctx.term()

    # Main loop ---------------------------------------------------------------

    def run(self) -> None:
        wake_r, _ = loop.wake_on_signals(self._on_stop_signal, (signal.SIGTERM, signal.SIGINT))
        sources = [(source, zmq.POLLIN) for source in (self.front, self.back, wake_r)]
        log.info("broker %s listening on %s, workers on %s, messages up to %d bytes",
                 self.node.name, self.node.broker, self.node.workers_endpoint, self.max_message)
        try:
            self._serve(sources, wake_r)
        finally:
            self.close()

    def _serve(self, sources: list[tuple], wake_r: int) -> None:
        drain_until = None
        while True:
            logs.flush()  # buffered lines go out before the broker waits
            events = dict(p.poll(sources, self._poll_timeout_ms()))
            if wake_r in events:
                os.read(wake_r, 512)
            if self.back in events:
                self.read_workers()
            if self.front in events:
                self.read_clients()
            now = time.monotonic()
            self.dispatch(now)
            self.d.expire(now)
            if now >= self.next_heartbeat:
                self.heartbeat(now)
            self.send_replies()
            # More requests in flight than workers: they queue, and taking
            # them in fewer, larger turns matters more than a wake-up's speed.
            self.scheduling.update(len(self.jobs) > len(self.workers), now)
            if self.stopping:
                drain_until = drain_until or now + self.settings.request_timeout
                if self.jobs and now > drain_until:
                    self.d.answer_all(p.UNAVAILABLE, f"node {self.node.name} stopped")
                    self.send_replies()
                # Answered: stay connected a moment after the last reply, so that
                # clients read it before the connection drops (see STOP_LINGER); an
                # idle broker has sent none lately and closes at once.
                self.close_at = self.close_at or (
                    None if self.jobs else max(now, self.replied_at + timeouts.STOP_LINGER))
                if self.close_at is not None and now >= self.close_at:
                    break
        log.info("broker %s stopped after %d requests", self.node.name, self.d.served)

    def _on_stop_signal(self, signum, frame):
        self.stopping = True

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        until = min(self.next_heartbeat, self.close_at or self.next_heartbeat)
        deadline = self.d.next_deadline()
        until = until if deadline is None else min(until, deadline)
        if self.scheduling.batch:  # wake to restore the default policy when calm
            until = min(until, now + CALM_AFTER)
        return max(0, int((until - now) * 1000) + 1)

    # Clients ----------------------------------------------------------------

    def read_clients(self) -> None:
        """Up to 1000 messages; under curve each with its sender's ZAP User-Id."""
        curve = self.keyring is not None
        for _ in range(1000):
            got = p.recv_frames_from(self.front) if curve else p.recv_frames_nowait(self.front)
            if got is None:
                return
            self.on_client(*got) if curve else self.on_client(got)

    def on_client(self, frames: list[bytes], user: str | None = None) -> None:
        if len(frames) == 2:  # a batch
            try:
                requests = p.parse_batch(frames)
            except p.ProtocolError as exc:
                log.warning("bad batch from client %s: %s", frames[0].hex(), exc)
                return
            for req in requests:
                if isinstance(req, p.FrontRequest):
                    self.accept(req, batched=True, user=user)
                else:
                    self._refuse(frames[0], *req, batched=True)
            return
        try:
            req = p.FrontRequest.from_frames(frames)
        except p.ProtocolError as exc:
            self._refuse(frames[0], p.salvage_rid(frames), exc, batched=False)
            return
        self.accept(req, batched=False, user=user)

    def _refuse(self, client: bytes, rid: bytes | None, exc: p.ProtocolError,
                batched: bool) -> None:
        log.warning("bad request from client %s: %s", client.hex(), exc)
        if rid is not None:
            self.reply(client, rid, p.BAD_REQUEST, error=f"bad request: {exc}", batched=batched)

    def accept(self, req: p.FrontRequest, batched: bool, user: str | None = None) -> None:
        meta = req.meta
        if self.keyring is not None:
            refusal = self.keyring.request_refusal(user, req.cmd == p.EXEC, meta)
            if refusal is not None:
                self.reply(req.client, req.rid, p.FORBIDDEN,
                           error=f"node {self.node.name}: {refusal}", batched=batched)
                return
        caller = security.caller(self.keyring, user, meta.caller, self.node.name)
        # Built whole: namedtuple's _replace costs ~3x a constructor call.
        meta = p.ExecMeta(meta.name, meta.code, meta.cookie, meta.timeout, meta.id, caller,
                          security.rights_of(self.keyring, caller))
        if req.cmd == p.STATUS:
            self.reply(req.client, req.rid, p.OK, p.pack(self.status()), batched=batched)
            return
        if self.stopping:
            self.reply(req.client, req.rid, p.UNAVAILABLE,
                       error=f"node {self.node.name} is shutting down", batched=batched)
            return
        size = p.request_bytes(meta, req.data)
        refused = self.d.refusal(size)
        if refused is not None:
            self.reply(req.client, req.rid, refused[0], error=refused[1], batched=batched)
            return
        deadline = time.monotonic() + (meta.timeout or self.settings.request_timeout)
        self.d.admit(req.client, req.rid, meta, req.data, size, deadline, batched)

    def _answer(self, job: Job, status: str, data: bytes, error: str) -> None:
        """The dispatcher's answer to a job: counted, then sent (or batched)."""
        self.stats.record(job.meta.name, status, int((time.perf_counter() - job.received) * 1e6))
        self.reply(job.client, job.rid, status, data, error, job.batched, self.moved)

    def reply(self, client: bytes, rid: bytes, status: str, data: bytes = b"",
              error: str = "", batched: bool = False, moved: bool = False) -> None:
        """Answer now, or, to a client that batches, with its other replies of this
        turn, in messages of at most max_message.  A reply too large to share one
        goes alone, its data in a frame of its own (clients take both layouts)."""
        if batched:
            size = len(data) + 4 * len(error) + self.reply_overhead  # at 4 bytes a character
            if size <= self.max_batch:
                self.outbox.add(client, p.reply_entry(rid, status, self.node.name,
                                                      self.node.group, data, error, moved),
                                size)
                return
        self._send_reply(p.reply_frames(client, rid, status, self.node.name, self.node.group,
                                        data, error, moved))

    def send_replies(self) -> None:
        if self.outbox:
            outbox, self.outbox = self.outbox, p.Batches(self.max_batch)
            for client, entries in outbox.messages():
                self._send_reply(p.reply_batch_frames(client, entries))

    def _send_reply(self, frames: list[bytes]) -> None:
        self.replied_at = time.monotonic()
        try:
            p.send_frames(self.front, frames, noblock=True)
        except zmq.ZMQError as exc:  # client gone or its queue full: nothing to do
            log.debug("reply to %s dropped: %s", frames[0].hex(), exc)

    # Workers ----------------------------------------------------------------

    def read_workers(self) -> None:
        for _ in range(1000):
            frames = p.recv_frames_nowait(self.back)
            if frames is None:
                return
            try:
                self.on_worker(frames)
            except Exception as exc:  # whatever a peer sends, the broker goes on
                self.reject(frames[0], exc)

    def on_worker(self, frames: list[bytes]) -> None:
        identity = frames[0]
        worker = self.workers.get(identity)
        if worker is None:
            self.on_stranger(identity, frames)
            return
        if len(frames) < 2:
            raise p.ProtocolError("no command frame")
        cmd = frames[1]
        now = time.monotonic()
        worker.last_seen = now
        if cmd == p.REPLY:
            for job_id, status, data, error, run_us, warm, hit, moved in \
                    p.parse_worker_replies(frames):
                self.moved = moved  # _answer, called from within, passes the hint on
                self.d.replied(worker, job_id, status, data, error, run_us)
                self.moved = False
                worker.warm = warm
                self.stats.found_warm(hit)
            if worker.draining and not worker.jobs:
                self.back.send_multipart([identity, p.BYE], zmq.NOBLOCK)
        elif len(frames) != 2 and cmd != p.READY:
            raise p.ProtocolError(f"{len(frames) - 2} frames after command {cmd[:16]!r}")
        elif cmd == p.HEARTBEAT:
            pass
        elif cmd == p.DRAIN:
            worker.draining = True
            if not worker.jobs:
                self.back.send_multipart([identity, p.BYE], zmq.NOBLOCK)
        elif cmd == p.READY:
            self.on_ready(identity, self._ready(frames), now)
        else:
            raise p.ProtocolError(f"unknown worker command {cmd[:16]!r}")

    def on_stranger(self, identity: bytes, frames: list[bytes]) -> None:
        """A peer that is not a registered worker: it may register (READY with the
        token); anything else only gets a REREGISTER, once per heartbeat tick."""
        if len(frames) >= 2 and frames[1] == p.READY:
            self.on_ready(identity, self._ready(frames), time.monotonic())
        elif self.d.stranger(identity):
            self.back.send_multipart([identity, p.REREGISTER], zmq.NOBLOCK)

    def _ready(self, frames: list[bytes]) -> p.Ready:
        if len(frames) != 3:
            raise p.ProtocolError("READY must have one meta frame")
        ready = p.Ready.from_meta(frames[2])
        if not trust.token_matches(self.token, ready.token):
            raise p.ProtocolError("READY without this broker's token")
        return ready

    def reject(self, identity: bytes, exc: Exception) -> None:
        """What `identity` sent did not parse or made no sense: a registered worker
        is dropped; about anyone else the broker only warns, once a second."""
        what = (str(exc) if isinstance(exc, p.ProtocolError)
                else f"{type(exc).__name__}: {exc}")[:200]
        worker = self.workers.get(identity)
        if worker is not None:
            self.drop_worker(worker, f"{worker} sent a bad message ({what})")
            return
        suppressed = self.stranger_warnings.allow(time.monotonic())
        if suppressed is not None:
            more = f" ({suppressed} more since the last warning)" if suppressed else ""
            log.warning("node %s: ignored a message from unregistered peer %r on the workers' "
                        "socket: %s%s", self.node.name, identity[:64], what, more)

    def on_ready(self, identity: bytes, ready: p.Ready, now: float) -> None:
        worker, restarted = self.d.register(identity, ready, now)
        self.restarts = max(self.restarts, ready.restarts)
        if restarted:
            self.stats.restarted(ready.reason)
        # At once, not at the next beat: the worker counts as started (for its
        # pool, which retires an old worker for it during a reload) only then.
        self.back.send_multipart([identity, p.HEARTBEAT], zmq.NOBLOCK)
        log.debug("%s ready with %d credits", worker, worker.credits)

    def drop_worker(self, worker: Worker, why: str) -> None:
        """A worker that broke the protocol: its requests are answered ``killed``
        and it is told BYE (it exits; its pool forks a replacement)."""
        held = len(worker.jobs)
        self.d.gone(worker, why, quiet=True)
        self.back.send_multipart([worker.identity, p.BYE], zmq.NOBLOCK)
        log.warning("%s; dropped it, answered its %d request(s) 'killed' and sent it BYE",
                    why, held)

    # Dispatch and timers --------------------------------------------------------

    def dispatch(self, now: float) -> None:
        for worker, batch in self.d.dispatch(now).messages():
            # Never blocks: a worker that does not read loses what passes its
            # queue, and those requests end at their deadlines.
            p.send_frames(self.back, p.jobs_frames(worker.identity, batch), noblock=True)

    def heartbeat(self, now: float) -> None:
        if self.keyring is not None:
            self.keyring.refresh()
        interval = self.settings.heartbeat_interval
        self.next_heartbeat = now + interval
        for worker in self.d.check_liveness(now, interval * self.settings.liveness):
            self.back.send_multipart([worker.identity, p.HEARTBEAT], zmq.NOBLOCK)

    # Status ------------------------------------------------------------------

    def status(self) -> dict:
        """The node's status (docs/DESIGN.md "Status"): counts, workers, scripts, latency."""
        return {"name": self.node.name, "group": self.node.group, "version": __version__,
                "uptime": round(time.monotonic() - self.started, 3),
                **self.d.counts(), "restarts": self.restarts,
                "request_timeout": self.settings.request_timeout,  # how long a client waits
                **self.stats.snapshot(),
                "worker_rows": worker_rows(self.workers.values(), self.jobs, self.memory),
                "start": os.environ.get(START_ENV, "")}
