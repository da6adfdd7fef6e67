"""The broker's jobs and workers, with no sockets and no clock of its own.

    admit(...)  -> job id          a request becomes a job: queued, or waiting for its id
    dispatch(now) -> Batches       queued jobs to workers within their credits
    replied(worker, job, ...)      a worker's reply: the job is answered
    expire(now)                    jobs past their deadline are answered timeout
    register(identity, ready, now) a worker's READY; one that replaces a dead worker
                                   hands over (`replaced`): what the dead one never
                                   began goes to others, what it held is answered killed
    gone(worker, why)              a worker dropped: what it held is answered killed
    check_liveness(now, expiry)    a heartbeat tick: silent and dead workers are gone
A READY worker announces N credits: up to N requests wait at it, so none idles
during a round trip; beyond the credits they wait in a bounded queue (full ->
``busy``).  Every job is answered exactly once, through the `answer` callback the broker
gives (it sends the reply).  The execs of one id run one at a time, in arrival
order (broker/idlocks.py).  The broker keeps the sockets, the timers and the
token a READY must carry; tests/test_dispatch.py drives this class alone, with
the same registration calls the broker makes.
"""
from __future__ import annotations

import collections
import heapq
import itertools
import logging
import time
from typing import Callable

from core import protocol as p
from core.exits import process_alive
from core.ids import lock_key

from .affinity import TenantAffinity
from .idlocks import IdLocks

log = logging.getLogger("srw.broker")

PACK_US = 500.0      # how long a request may wait behind others on a busy worker, not woken
SERVICE_EWMA = 0.05  # weight of a new run time in its script's average
SERVICE_NAMES = 1024  # scripts whose average run time is kept (then all are forgotten)
REREGISTER_MAX = 1024  # strangers answered REREGISTER per heartbeat tick
DEADLINES_SLACK = 1024  # answered requests' deadlines kept before the heap is rebuilt
REPLACEMENT_WAIT = 10.0  # seconds a dead worker of a live pool waits for its replacement
AFFINITY_SCAN = 64  # queued jobs looked through for one of a worker's own tenants

class Job:
    __slots__ = ("client", "rid", "deadline", "received", "meta", "data", "worker", "lock",
                 "batched", "size")

    def __init__(self, client, rid, deadline, received, meta, data, lock, batched, size):
        self.client, self.rid, self.deadline = client, rid, deadline
        self.received, self.meta, self.data = received, meta, data
        self.worker = None
        self.lock = lock  # the id this job holds or waits for, or None
        self.batched = batched  # the client batches: its reply waits for the turn's others
        self.size = size  # bytes it takes in a REQUEST (p.request_bytes)


class Worker:
    __slots__ = ("identity", "name", "slot", "pid", "pool", "credits", "jobs", "load",
                 "expired", "replied", "last_seen", "draining", "gone_at", "warm")

    def __init__(self, identity: bytes, ready: p.Ready, now: float, node: str = ""):
        self.identity, self.slot, self.pid = identity, ready.slot, ready.pid
        self.name = f"worker {node}#{ready.slot} (pid {ready.pid})"
        self.pool = ready.pool
        self.credits = ready.credits
        # job id -> its expected run time (us), in dispatch order: the order it runs them
        # (changed through hold and drop only, which keep `load`, their sum)
        self.jobs: dict[bytes, float] = {}
        self.load = 0.0
        # jobs answered 'timeout' while it held them -> the id lock each still
        # holds (None: no id): its late reply is no error, and frees the lock
        self.expired: dict[bytes, str | None] = {}
        self.replied = 0
        self.last_seen = now
        self.draining = False
        self.gone_at = 0.0  # when the broker found its process gone
        self.warm = 0  # runners it keeps warm, as its last REPLY said

    def __repr__(self):
        return self.name

    def hold(self, job_id: bytes, cost_us: float) -> None:
        self.jobs[job_id] = cost_us
        self.load += cost_us

    def drop(self, job_id: bytes) -> bool:
        """Forget a job it held; False if it held none by that id."""
        cost = self.jobs.pop(job_id, None)
        if cost is None:
            return False
        # Exact zero when empty: the float sum drifts, and an idle worker must not look busy.
        self.load = self.load - cost if self.jobs else 0.0
        return True

    def drop_all(self) -> None:
        self.jobs.clear()
        self.load = 0.0


def choose_worker(workers, cost_us: float) -> Worker | None:
    """The worker for a request expected to run `cost_us`: within its credits,
    not draining.

    A short request joins a worker that already holds some, while all it holds
    is expected to run within PACK_US: waking an idle worker costs more CPU
    than a few short requests (~100-200 us on a small VM), and one message
    carries them all.  Otherwise the request joins the shortest queue, which
    keeps requests off a worker stuck in a slow script while another has room."""
    best, best_key = None, None
    for worker in workers:
        held = len(worker.jobs)
        if held >= worker.credits or worker.draining:
            continue
        if held and worker.load + cost_us <= PACK_US:
            key = (0, -held)  # awake, and the wait is short: pack
        else:
            key = (1, held)
        if best_key is None or key < best_key:
            best, best_key = worker, key
    return best


def never_started(dead: Worker, ready: p.Ready) -> list[bytes]:
    """The requests a dead worker held but had not begun, from its replacement's READY.

    The worker's slot record names how far into its requests, in the order
    they were sent, it has begun any (run, or written to a runner; a worker
    may run some out of turn, runtime/worker.py): the last one begun, while
    it is busy, and their count `served`.  If that request is still ours,
    everything sent after it never started.  Otherwise the first `served` it
    was sent have begun; those whose replies we have not counted yet may
    still be on their way, and the rest never started.  Those can go to
    another worker: they cannot have had side effects."""
    order = list(dead.jobs)
    if ready.job in dead.jobs:
        begun = order.index(ready.job) + 1
    else:
        begun = max(0, ready.served - dead.replied)
    return order[begun:]


class Dispatcher:
    def __init__(self, node: str, max_batch: int,
                 answer: Callable[["Job", str, bytes, str], None], queue_limit: int = 10_000,
                 alive: Callable[[int], bool] = process_alive,
                 affinity: TenantAffinity | None = None):
        self.node, self.max_batch, self.answer = node, max_batch, answer
        self.affinity = affinity  # copy isolation: a tenant's requests to its worker
        self.queue_limit = queue_limit
        self.alive = alive  # whether a pid runs (a test's clock plays processes too)
        self.workers: dict[bytes, Worker] = {}
        self.by_slot: dict[int, Worker] = {}
        self.queue: collections.OrderedDict[bytes, Job] = collections.OrderedDict()
        # The execs of one id run one at a time on this node, in the order they came.
        self.locks: IdLocks[Worker] = IdLocks()
        self.jobs: dict[bytes, Job] = {}
        # Average run time per script name, us; a script never seen is not packed.
        self.service_us: dict[str, float] = {}
        self.deadlines: list[tuple[float, bytes]] = []
        self.next_job = 0
        self.served = 0
        # Peers not registered that were told to register again this heartbeat tick:
        # once per tick each, so that a flood of strangers costs little.
        self.reregistered: set[bytes] = set()

    @property
    def waiting(self) -> int:
        """Jobs no worker holds yet: queued, or waiting for their id."""
        return len(self.queue) + self.locks.blocked

    def next_deadline(self) -> float | None:
        return self.deadlines[0][0] if self.deadlines else None

    # Jobs --------------------------------------------------------------------

    def refusal(self, size: int) -> tuple[str, str] | None:
        """(status, error) if a request of `size` bytes (p.request_bytes) cannot
        be admitted: the queue is full, or it could travel to no worker."""
        if self.waiting >= self.queue_limit:
            return p.BUSY, (f"node {self.node}: queue full ({self.queue_limit} requests "
                            "waiting); retry later or raise broker.queue_limit")
        if size > self.max_batch:
            return p.BAD_REQUEST, (f"node {self.node}: request of {size} bytes with its "
                                   f"headers is larger than broker.max_message allows "
                                   f"({self.max_batch} bytes)")
        return None

    def admit(self, client: bytes, rid: bytes, meta: p.ExecMeta, data: bytes, size: int,
              deadline: float, batched: bool) -> bytes:
        job_id = b"%x" % self.next_job
        self.next_job += 1
        lock = lock_key(meta.id) if meta.id else None
        job = Job(client, rid, deadline, time.perf_counter(), meta, data, lock, batched, size)
        self.jobs[job_id] = job
        self._track_deadline(job_id, job.deadline)
        if lock is None or self.locks.arrive(lock, job_id):
            self.queue[job_id] = job
        return job_id  # else it waits for the execs of its id before it

    def _track_deadline(self, job_id: bytes, deadline: float) -> None:
        heapq.heappush(self.deadlines, (deadline, job_id))
        # An answered request's deadline stays in the heap until it passes: after
        # a burst with long deadlines the broker would pop them for seconds, a
        # few per request (~10 us of CPU per request measured). Keep it small.
        if len(self.deadlines) > 2 * len(self.jobs) + DEADLINES_SLACK:
            self.deadlines = [(job.deadline, i) for i, job in self.jobs.items()]
            heapq.heapify(self.deadlines)

    def finish(self, job_id: bytes, status: str, data: bytes = b"", error: str = "",
               keep_lock: bool = False) -> None:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return  # already answered (timeout) or unknown
        self.queue.pop(job_id, None)
        if job.lock is not None and not keep_lock:
            self._release(job.lock, job_id)
        self.served += 1
        self.answer(job, status, data, error)

    def _release(self, lock: str, job_id: bytes) -> None:
        self._queue_first(self.locks.release(lock, job_id, self.jobs.__contains__))

    def _queue_first(self, job_id: bytes | None) -> None:
        """A job that now holds its id's lock goes first in the queue."""
        if job_id is not None:
            self.queue[job_id] = self.jobs[job_id]
            self.queue.move_to_end(job_id, last=False)

    # Workers ---------------------------------------------------------------

    def requeue(self, worker: Worker, job_ids: list[bytes]) -> None:
        """Give a dead worker's never-started requests to the others, first in line.
        Those holding an id's lock wait for it again, first in line: the lock
        passes on only when the last of its holders there is answered."""
        locks = set()
        for job_id in reversed(job_ids):
            worker.drop(job_id)
            job = self.jobs.get(job_id)
            if job is None:
                continue
            job.worker = None
            if job.lock is not None and self.locks.wait_again(job.lock, job_id):
                locks.add(job.lock)
                continue
            self._queue_first(job_id)
        for lock in locks:
            self._queue_first(self.locks.promote(lock, self.jobs.__contains__))

    def gone(self, worker: Worker, why: str, quiet: bool = False) -> None:
        """Forget a worker; what it held is answered ``killed``, never retried."""
        self.workers.pop(worker.identity, None)
        if self.by_slot.get(worker.slot) is worker:
            del self.by_slot[worker.slot]
        if worker.jobs and not quiet:
            log.warning("%s; answering its %d request(s) 'killed'", why, len(worker.jobs))
        for job_id in list(worker.jobs):
            self.finish(job_id, p.KILLED, error=why)
        worker.drop_all()
        for job_id, lock in worker.expired.items():  # it runs nothing any more
            if lock is not None:
                self._release(lock, job_id)
        worker.expired.clear()
        worker.draining = True  # in case something still holds it: give it nothing

    # Registry ----------------------------------------------------------------

    def register(self, identity: bytes, ready: p.Ready, now: float) -> tuple[Worker, bool]:
        """A worker's READY: (the worker registered, whether it replaces a dead
        one of its slot).  Raises ProtocolError for a READY that makes no sense:
        another slot or pid than it registered with, or the replacement of a
        worker that still runs."""
        old = self.workers.get(identity)
        if old is not None and (old.slot, old.pid, old.pool) != (ready.slot, ready.pid,
                                                                  ready.pool):
            raise p.ProtocolError(f"READY as slot {ready.slot}, pid {ready.pid}, pool "
                                  f"{ready.pool}, registered as slot {old.slot}, pid "
                                  f"{old.pid}, pool {old.pool}")
        self.drop_orphans(ready.pool)
        if old is None and ready.replaces:
            old = self.by_slot.get(ready.slot)
            if old is not None and (old.pid != ready.replaces or old.pool != ready.pool):
                old = None
            elif old is not None and self.alive(old.pid):
                raise p.ProtocolError(f"READY claims to replace {old}, which is still running")
        if old is None and ready.slot in self.by_slot:
            log.warning("slot %d claimed by pid %d and pid %d: do two pools serve node %s?",
                        ready.slot, self.by_slot[ready.slot].pid, ready.pid, self.node)
        restarted = old is not None and ready.replaces == old.pid
        if old is not None:
            self.replaced(old, ready)
        worker = Worker(identity, ready, now, self.node)
        self.reregistered.discard(identity)
        self.workers[identity] = worker
        self.by_slot[ready.slot] = worker
        return worker, restarted

    def replaced(self, old: Worker, ready: p.Ready) -> None:
        """`ready` takes `old`'s place.  If it replaces a dead `old`, its READY
        tells what `old` was running (answered with the status the pool saw)
        and so what it never began (given to others); the rest is answered killed."""
        why = (f"worker {self.node}#{old.slot} (pid {old.pid}) went away: "
               f"{ready.reason or 'it registered again'}")
        if ready.replaces == old.pid:
            self.requeue(old, never_started(old, ready))
        if ready.job_status and old.drop(ready.job):
            self.finish(ready.job, ready.job_status, error=why)
        self.gone(old, why)

    def stranger(self, identity: bytes) -> bool:
        """Whether to tell `identity`, not registered, to register again: once a
        heartbeat tick, for at most REREGISTER_MAX peers."""
        if identity in self.reregistered or len(self.reregistered) >= REREGISTER_MAX:
            return False
        self.reregistered.add(identity)
        return True

    def counts(self) -> dict:
        """The pool's counts for the status.  Draining workers are on their way
        out (recycled, retired by a reload or TTOU)."""
        live = [w for w in self.workers.values() if not w.gone_at and not w.draining]
        return {"workers": len(live), "busy": sum(1 for w in live if w.jobs),
                "warm_runners": sum(w.warm for w in live),
                "queued": self.waiting, "served": self.served}

    def drop_orphans(self, pool: int) -> None:
        """Forget the workers of pools other than `pool` that are gone: a pool
        that died (SIGKILL) took its workers with it, and its successor's are
        registering.  Two live pools on one node keep each other's."""
        alive = {other: self.alive(other)
                 for other in {w.pool for w in self.workers.values()} - {pool}}
        orphans = [w for w in self.workers.values() if w.pool != pool and not alive[w.pool]]
        if not orphans:
            return
        held = sum(len(w.jobs) for w in orphans)
        for worker in orphans:
            self.gone(worker, f"{worker}: its pool (pid {worker.pool}) is gone", quiet=True)
        log.warning("node %s: dropped %d worker(s) of pool(s) %s, which are gone; answered "
                    "their %d request(s) 'killed'", self.node, len(orphans),
                    ", ".join(f"pid {pid}" for pid, up in alive.items() if not up), held)

    def check_liveness(self, now: float, expiry: float) -> list[Worker]:
        """A heartbeat tick: forget the workers silent for `expiry` seconds with
        nothing held, and the dead ones no replacement came for; the others,
        to send a heartbeat to.  A dead worker's replacement tells what it held
        (READY): while its pool lives, wait for it (REPLACEMENT_WAIT at most),
        counting the dead one no more and giving it nothing."""
        self.reregistered.clear()
        beat = []
        for worker in list(self.workers.values()):
            if not worker.jobs and now - worker.last_seen > expiry:
                self.gone(worker, f"{worker} missed its heartbeats")
                continue
            if not self.alive(worker.pid):
                if not worker.gone_at:
                    worker.gone_at = now
                    worker.draining = True
                pool_gone = not self.alive(worker.pool)
                if pool_gone or now - worker.gone_at > REPLACEMENT_WAIT:
                    self.gone(worker, f"{worker} is gone, " + (
                        f"with its pool (pid {worker.pool})" if pool_gone
                        else "and no replacement registered"))
                    continue
            beat.append(worker)
        return beat

    # Dispatch and deadlines ------------------------------------------------

    def dispatch(self, now: float) -> p.Batches:
        """Each waiting request to a worker within its credits (its tenant's,
        broker/affinity.py, or `choose_worker`'s pick), in batches: each worker
        gets what it was given in one message, or in as few as max_message allows."""
        queue = self.queue
        batches = p.Batches(self.max_batch)
        affine = self.affinity is not None
        while queue:
            if affine:
                job_id, job, worker, affine = self._affine()
            else:
                (job_id, job), worker = next(iter(queue.items())), None
            cost = self.expected_us(job)
            worker = worker or choose_worker(self.workers.values(), cost)
            if worker is None:
                break
            del queue[job_id]
            self._give(worker, job_id, job, cost, now, batches)
            if job.lock is not None:
                self.locks.given(job.lock, worker)
        for lock in self.locks.joinable():
            self._chain(lock, now, batches)
        return batches

    def _affine(self) -> tuple[bytes, Job, Worker | None, bool]:
        """The next queued job, its tenant's worker (broker/affinity.py) if that
        worker takes it now, and whether to ask again for the next one.  When
        the first job's worker cannot and another has credit, a job of one of
        that other worker's own tenants among the next AFFINITY_SCAN goes first
        (a tenant's jobs keep their order; an id's execs are queued one at a
        time); if there is none, or no worker with credit has tenants (one
        tenant, all on one worker), the first job (worker None), and the rest
        of this dispatch goes by load: a scan that found nothing is not repeated."""
        workers, by_slot = self.workers.values(), self.by_slot
        first_id, first = next(iter(self.queue.items()))
        worker = self.affinity.worker(first.meta, by_slot, workers)
        if worker is not None:
            return first_id, first, worker, True
        if not any(self.affinity.has_tenants(w.slot) for w in workers
                   if len(w.jobs) < w.credits and not w.draining):
            return first_id, first, None, False  # none with credit has tenants: by load
        for job_id, job in itertools.islice(self.queue.items(), 1, AFFINITY_SCAN):
            worker = self.affinity.worker(job.meta, by_slot, workers)
            if worker is not None:
                return job_id, job, worker, True
        return first_id, first, None, False

    def _give(self, worker: Worker, job_id: bytes, job: Job, cost: float, now: float,
              batches: p.Batches) -> None:
        job.worker = worker
        worker.hold(job_id, cost)
        batches.add(worker, p.job_entry(job_id, job.deadline - now, job.meta, job.data),
                    job.size)

    def _chain(self, lock: str, now: float, batches: p.Batches) -> None:
        """An id's waiters join the worker that runs its holders, within its credits."""
        worker = self.locks.worker_of(lock)
        if worker is None or self.workers.get(worker.identity) is not worker:
            return
        while len(worker.jobs) < worker.credits and not worker.draining:
            job_id = self.locks.take_waiter(lock, self.jobs.__contains__)
            if job_id is None:
                return
            job = self.jobs[job_id]
            self._give(worker, job_id, job, self.expected_us(job), now, batches)

    def expected_us(self, job: Job) -> float:
        """How long `job` should run: its script's average; PACK_US for one never seen."""
        return self.service_us.get(job.meta.name, PACK_US)

    def learn(self, name: str, run_us: float) -> None:
        """Fold a request's run time into its script's average."""
        average = self.service_us.get(name)
        if average is None:
            if len(self.service_us) >= SERVICE_NAMES:
                self.service_us.clear()
            self.service_us[name] = run_us
        else:
            self.service_us[name] = average + (run_us - average) * SERVICE_EWMA

    def expire(self, now: float) -> None:
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job_id = heapq.heappop(self.deadlines)
            job = self.jobs.get(job_id)
            if job is None:
                continue
            if job.worker is None and not self.workers:
                self.finish(job_id, p.UNAVAILABLE,
                            error=f"node {self.node}: no workers are connected; "
                                  "is the pool running?")
            else:
                # The worker ends the request at this deadline too (it kills its
                # runner, or the pool kills it in isolation none, and then what it
                # never began is requeued): its late reply is for a request answered.
                # Its id stays locked until that reply (or the worker's end): the
                # worker's clock runs from when the request reached it, a little
                # later, and the next exec of the id must not start before it stops.
                held = job.worker is not None and job.worker.drop(job_id)
                if held:
                    job.worker.expired[job_id] = job.lock
                self.finish(job_id, p.TIMEOUT, keep_lock=held,
                            error=f"node {self.node}: no reply within the request's "
                                  "deadline (broker.request_timeout or the request's timeout)")

    def answer_all(self, status: str, error: str) -> None:
        for job_id in list(self.jobs):
            self.finish(job_id, status, error=error)

    def replied(self, worker: Worker, job_id: bytes, status: str, data: bytes, error: str,
                run_us: float) -> None:
        """One entry of a worker's REPLY.  Raises ProtocolError for a job it was
        never given (one answered timeout while it held it is no error)."""
        worker.replied += 1
        if worker.drop(job_id):
            job = self.jobs.get(job_id)
            if job is not None:
                self.learn(job.meta.name, run_us)
            self.finish(job_id, status, data, error)
        elif job_id in worker.expired:  # late: answered 'timeout' already
            lock = worker.expired.pop(job_id)
            if lock is not None:
                self._release(lock, job_id)
        else:
            raise p.ProtocolError(f"REPLY to job {job_id[:16]!r}, which it was never given")
