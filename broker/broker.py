"""The node's broker: spreads exec requests from clients over the pool's workers.

    clients (DEALER) --> [front ROUTER]  Broker  [back ROUTER] <-- workers (DEALER)

The broker keeps the sockets, the timers (heartbeats, the stop) and who may
connect and register; what runs where is the Dispatcher's (broker/dispatch.py,
no sockets).  Dispatch is credit based: a READY worker announces N credits, so
up to N requests wait at each worker and none sits idle during a round trip;
what a worker is given at once travels in one message.  A short request joins
a worker that is already busy, any other the worker holding the fewest
(`choose_worker`).  Requests beyond the credits wait in a bounded queue
(full -> ``busy``).  Execs with the same id run one at a time, in order: the
worker that runs one also gets those waiting for it (broker/idlocks.py).  A
client that sends batches gets its replies in batches, one message per loop turn.
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

from core import __version__, logs, security, timeouts, trust
from core import protocol as p
from core.config import START_ENV, Config, NodeSettings
from core.logs import Throttle
from core.sched import CALM_AFTER, LoadScheduling

from .dispatch import Dispatcher, Job, Worker, never_started
from .stats import CONTENT, ExecStats, WorkerMemory

log = logging.getLogger("srw.broker")

FRONT_HWM = 100_000  # messages queued per client
REREGISTER_MAX = 1024  # strangers answered REREGISTER per heartbeat tick
WARN_EVERY = 1.0     # seconds between warnings about strangers on the back socket
REPLACEMENT_WAIT = 10.0  # seconds a dead worker of a live pool waits for its replacement


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


def process_alive(pid: int) -> bool:
    """Whether `pid` is a process that has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's, alive
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2][1:2] != b"Z"
    except FileNotFoundError:
        return False
    except OSError:
        return True


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
            self.front = self._bind(zmq.ROUTER, node.broker, FRONT_HWM, self.keyring)
            self.back = self._bind_back(node.workers_endpoint, back_hwm(config.pool.credits))
        except BaseException:
            self.close()
            raise
        self.d = Dispatcher(node.name, self.max_batch, self._answer)
        # The dispatcher's registry and jobs, read here (status, heartbeats, stop).
        self.workers, self.jobs = self.d.workers, self.d.jobs
        self.outbox = p.Batches(self.max_batch)  # replies to clients that batch, this turn
        self.restarts = 0
        self.stats = ExecStats()
        self.memory = WorkerMemory()
        self.started = time.monotonic()
        self.stopping = False
        self.close_at: float | None = None  # stopping, answered: when the sockets close
        self.replied_at = float("-inf")  # the last reply to a client left then (STOP_LINGER)
        self.next_heartbeat = 0.0
        self.scheduling = LoadScheduling()
        # Strangers on the back socket: answered REREGISTER once per heartbeat
        # tick, and warned about once a second, so that a flood costs little.
        self.reregistered: set[bytes] = set()
        self.stranger_warnings = Throttle(WARN_EVERY)

    def _bind(self, kind: int, endpoint: str, rcvhwm: int,
              keyring: security.Keyring | None = None) -> zmq.Socket:
        sock = self.ctx.socket(kind)
        if keyring is not None:
            keyring.secure(sock)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
        sock.setsockopt(zmq.MAXMSGSIZE, self.max_message)
        try:
            if endpoint.startswith("ipc://"):
                path = endpoint[len("ipc://"):]
                if len(path) > 100:
                    raise OSError(f"socket path too long for ipc (max 100 chars): {path}")
                if os.path.lexists(path):
                    os.unlink(path)  # left by a killed broker
            sock.bind(endpoint)
        except BaseException:
            sock.close()
            raise
        return sock

    def _bind_back(self, endpoint: str, rcvhwm: int) -> zmq.Socket:
        """The workers' socket: a fresh token beside it first (a worker that can
        connect finds it), then the socket, which only our uid may connect to."""
        self.token = trust.write_worker_token(endpoint)
        mask = os.umask(0o077)
        try:
            sock = self._bind(zmq.ROUTER, endpoint, rcvhwm)
        finally:
            os.umask(mask)
        os.chmod(trust.socket_path(endpoint), 0o600)
        return sock

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
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_stop_signal)
        poller = zmq.Poller()
        poller.register(self.front, zmq.POLLIN)
        poller.register(self.back, zmq.POLLIN)
        poller.register(wake_r, zmq.POLLIN)
        log.info("broker %s listening on %s, workers on %s, messages up to %d bytes",
                 self.node.name, self.node.broker, self.node.workers_endpoint, self.max_message)
        try:
            self._serve(poller, wake_r)
        finally:
            self.close()

    def _serve(self, poller: zmq.Poller, wake_r: int) -> None:
        drain_until = None
        while True:
            logs.flush()  # buffered lines go out before the broker waits
            events = dict(poller.poll(self._poll_timeout_ms()))
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
        if deadline is not None:
            until = min(until, deadline)
        if self.scheduling.batch:  # wake to restore the default policy when calm
            until = min(until, now + CALM_AFTER)
        return max(0, int((until - now) * 1000) + 1)

    # Clients ----------------------------------------------------------------

    def read_clients(self) -> None:
        if self.keyring is not None:
            return self._read_clients_curve()
        for _ in range(1000):
            frames = p.recv_frames_nowait(self.front)
            if frames is None:
                return
            self.on_client(frames)

    def _read_clients_curve(self) -> None:
        """As read_clients, each message with its sender's ZAP User-Id."""
        for _ in range(1000):
            got = p.recv_frames_from(self.front)
            if got is None:
                return
            self.on_client(*got)

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
            refusal = self.keyring.refusal(user, *security.rights_for(req.cmd == p.EXEC, meta))
            if refusal is None and meta.caller is not None and not self.keyring.is_node(user):
                refusal = "only a node of the cluster may name the caller it relays for"
            if refusal is not None:
                self.reply(req.client, req.rid, p.FORBIDDEN,
                           error=f"node {self.node.name}: {refusal}", batched=batched)
                return
        meta = meta._replace(caller=self.caller(user, meta.caller))
        if req.cmd == p.STATUS:
            self.reply(req.client, req.rid, p.OK, p.pack(self.status()), batched=batched)
            return
        if self.stopping:
            self.reply(req.client, req.rid, p.UNAVAILABLE,
                       error=f"node {self.node.name} is shutting down", batched=batched)
            return
        if self.d.waiting >= self.settings.queue_limit:
            self.reply(req.client, req.rid, p.BUSY,
                       error=f"node {self.node.name}: queue full ({self.settings.queue_limit} "
                             "requests waiting); retry later or raise broker.queue_limit",
                       batched=batched)
            return
        size = p.request_bytes(meta, req.data)
        if size > self.max_batch:  # it could travel to no worker
            self.reply(req.client, req.rid, p.BAD_REQUEST,
                       error=f"node {self.node.name}: request of {size} bytes with its headers "
                             f"is larger than broker.max_message ({self.max_message} bytes)",
                       batched=batched)
            return
        deadline = time.monotonic() + (meta.timeout or self.settings.request_timeout)
        self.d.admit(req.client, req.rid, meta, req.data, size, deadline, batched)

    def caller(self, user: str | None, relayed: str | None) -> str:
        """Who an exec runs for (its runners are that caller's alone: a tenant is a
        caller and its code).  With curve: the client key the ZAP handler admitted,
        or, from a node's own key, the caller that node relays for, else the node
        itself (its indexing).  Without curve no one is authenticated: "local"."""
        if self.keyring is None:
            return p.LOCAL_CALLER
        if self.keyring.is_node(user):
            return relayed or f"node:{self.node.name}"
        return user or p.LOCAL_CALLER

    def _answer(self, job: Job, status: str, data: bytes, error: str) -> None:
        """The dispatcher's answer to a job: counted, then sent (or batched)."""
        self.stats.record(job.meta.name, status, int((time.perf_counter() - job.received) * 1e6))
        self.reply(job.client, job.rid, status, data, error, job.batched)

    def reply(self, client: bytes, rid: bytes, status: str, data: bytes = b"",
              error: str = "", batched: bool = False) -> None:
        """Answer now, or, to a client that batches, with its other replies of this
        turn, in messages of at most max_message.  A reply too large to share one
        goes alone, its data in a frame of its own (clients take both layouts)."""
        if batched:
            size = len(data) + 4 * len(error) + self.reply_overhead  # at 4 bytes a character
            if size <= self.max_batch:
                self.outbox.add(client, p.reply_entry(rid, status, self.node.name,
                                                      self.node.group, data, error), size)
                return
        self._send_reply(p.reply_frames(client, rid, status, self.node.name, self.node.group,
                                        data, error))

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
            for job_id, status, data, error, run_us, warm, hit in \
                    p.parse_worker_replies(frames):
                self.d.replied(worker, job_id, status, data, error, run_us)
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
        elif identity not in self.reregistered and len(self.reregistered) < REREGISTER_MAX:
            self.reregistered.add(identity)
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
        what = f"{type(exc).__name__}: {exc}" if not isinstance(exc, p.ProtocolError) \
            else str(exc)
        what = what[:200]
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
        old = self.workers.get(identity)
        if old is not None and (old.slot, old.pid, old.pool) != (ready.slot, ready.pid,
                                                                  ready.pool):
            raise p.ProtocolError(f"READY as slot {ready.slot}, pid {ready.pid}, pool "
                                  f"{ready.pool}, registered as slot {old.slot}, pid "
                                  f"{old.pid}, pool {old.pool}")
        self.drop_orphans(ready.pool)
        if old is None and ready.replaces:
            old = self.d.by_slot.get(ready.slot)
            if old is not None and (old.pid != ready.replaces or old.pool != ready.pool):
                old = None
            elif old is not None and process_alive(old.pid):
                raise p.ProtocolError(f"READY claims to replace {old}, which is still running")
        self.restarts = max(self.restarts, ready.restarts)
        if old is None and ready.slot in self.d.by_slot:
            log.warning("slot %d claimed by pid %d and pid %d: do two pools serve node %s?",
                        ready.slot, self.d.by_slot[ready.slot].pid, ready.pid, self.node.name)
        if old is not None:
            why = (f"worker {self.node.name}#{old.slot} (pid {old.pid}) went away: "
                   f"{ready.reason or 'it registered again'}")
            if ready.replaces == old.pid:
                self.d.requeue(old, never_started(old, ready))
                self.stats.restarted(ready.reason)
            if ready.job in old.jobs and ready.job_status:
                del old.jobs[ready.job]
                self.d.finish(ready.job, ready.job_status, error=why)
            self.d.remove_worker(old, why)
        worker = Worker(identity, ready, now, self.node.name)
        self.workers[identity] = worker
        self.d.by_slot[ready.slot] = worker
        self.reregistered.discard(identity)
        # At once, not at the next beat: the worker counts as started (for its
        # pool, which retires an old worker for it during a reload) only then.
        self.back.send_multipart([identity, p.HEARTBEAT], zmq.NOBLOCK)
        log.debug("%s ready with %d credits", worker, worker.credits)

    def drop_orphans(self, pool: int) -> None:
        """Forget the workers of pools other than `pool` that are gone: a pool
        that died (SIGKILL) took its workers with it, and its successor's are
        registering.  Two live pools on one node keep each other's."""
        alive: dict[int, bool] = {}
        for other in {w.pool for w in self.workers.values()} - {pool}:
            alive[other] = process_alive(other)
        orphans = [w for w in self.workers.values() if w.pool != pool and not alive[w.pool]]
        if not orphans:
            return
        held = sum(len(w.jobs) for w in orphans)
        for worker in orphans:
            self.d.remove_worker(worker, f"{worker}: its pool (pid {worker.pool}) is gone",
                               quiet=True)
        log.warning("node %s: dropped %d worker(s) of pool(s) %s, which are gone; answered "
                    "their %d request(s) 'killed'", self.node.name, len(orphans),
                    ", ".join(f"pid {pid}" for pid, up in alive.items() if not up), held)

    def drop_worker(self, worker: Worker, why: str) -> None:
        """A worker that broke the protocol: its requests are answered ``killed``
        and it is told BYE (it exits; its pool forks a replacement)."""
        held = len(worker.jobs)
        self.d.remove_worker(worker, why, quiet=True)
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
        self.reregistered.clear()
        expiry = interval * self.settings.liveness
        for worker in list(self.workers.values()):
            if not worker.jobs and now - worker.last_seen > expiry:
                self.d.remove_worker(worker, f"{worker} missed its heartbeats")
                continue
            # A dead worker's replacement tells what it held (READY): while its
            # pool lives, wait for it (REPLACEMENT_WAIT at most), counting the
            # dead one no more and giving it nothing.
            if not process_alive(worker.pid):
                if not worker.gone_at:
                    worker.gone_at = now
                    worker.draining = True
                pool_gone = not process_alive(worker.pool)
                if pool_gone or now - worker.gone_at > REPLACEMENT_WAIT:
                    self.d.remove_worker(worker, f"{worker} is gone, " + (
                        f"with its pool (pid {worker.pool})" if pool_gone
                        else "and no replacement registered"))
                    continue
            self.back.send_multipart([worker.identity, p.HEARTBEAT], zmq.NOBLOCK)

    # Status ------------------------------------------------------------------

    def status(self) -> dict:
        """The node's status (docs/DESIGN.md "Status"): pool counts, a row per
        worker, per-script counters and the latency window."""
        # Draining workers are on their way out (recycled, retired by a reload or TTOU).
        live = [w for w in self.workers.values() if not w.gone_at and not w.draining]
        return {"name": self.node.name, "group": self.node.group, "version": __version__,
                "uptime": round(time.monotonic() - self.started, 3),
                "workers": len(live),
                "busy": sum(1 for w in live if w.jobs),
                "warm_runners": sum(w.warm for w in live),
                "queued": self.d.waiting, "served": self.d.served,
                "restarts": self.restarts,
                **self.stats.snapshot(),
                "worker_rows": self.worker_rows(),
                "start": os.environ.get(START_ENV, "")}

    def worker_rows(self) -> list[dict]:
        workers = sorted(self.workers.values(), key=lambda w: w.slot)
        memory = self.memory.of([w.pid for w in workers])
        rows = []
        for w in workers:
            state = ("gone" if w.gone_at else "draining" if w.draining
                     else "busy" if w.jobs else "idle")
            running = self.jobs.get(next(iter(w.jobs), b""))  # it runs its jobs in order
            rows.append({"pid": w.pid, "slot": w.slot, "state": state, "served": w.replied,
                         "held": len(w.jobs),
                         "script": (running.meta.name or CONTENT) if running else "",
                         "uss": memory.get(w.pid, (None, None))[0],
                         "sandbox_uss": memory.get(w.pid, (None, None))[1],
                         "warm_runners": w.warm})
        return rows
