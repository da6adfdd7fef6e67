"""broker/dispatch.py alone: a hypothesis state machine plays clients, workers
and the clock against the Dispatcher (no sockets) and checks what the broker
promises: every request is answered exactly once, none is lost when workers
die, and the execs of one id run one at a time, in the order they came.
Workers register, die, vanish and miss heartbeats through the Dispatcher's own
registry calls (register, check_liveness), the ones the Broker makes."""
from __future__ import annotations

import collections

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import pytest

from broker.affinity import TenantAffinity
from broker.dispatch import REPLACEMENT_WAIT, Dispatcher, Worker
from core import protocol as p

CREDITS = 3
IDS = [None, "ab", "cd"]


def ready(slot: int, pid: int, **fields) -> p.Ready:
    return p.Ready(slot=slot, pid=pid, credits=CREDITS, token=b"t", pool=1, **fields)


class Node(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.answers: collections.Counter[bytes] = collections.Counter()
        self.statuses: dict[bytes, str] = {}
        self.live = {1}  # pids that run: the pool's, and its workers'
        self.d = Dispatcher("n1", 1 << 20, self.answer, alive=self.live.__contains__)
        self.clock = 0.0
        self.pids = iter(range(100, 10_000))
        self.runs: dict[bytes, list[bytes]] = {}  # worker -> jobs sent to it, in order
        for slot in (1, 2):
            self.register(slot)
        self.id_of: dict[bytes, str | None] = {}
        self.arrived: dict[str, list[bytes]] = collections.defaultdict(list)
        self.started: dict[str, list[bytes]] = collections.defaultdict(list)

    def answer(self, job, status, data, error) -> None:
        self.answers[job.rid] += 1
        self.statuses[job.rid] = status

    def register(self, slot: int, **fields) -> Worker:
        pid = next(self.pids)
        self.live.add(pid)
        worker, _ = self.d.register(b"w%d" % pid, ready(slot, pid, **fields), self.clock)
        self.runs[worker.identity] = []
        return worker

    def beat(self) -> None:
        """A heartbeat tick (live workers were heard from); a worker the
        dispatcher forgot gets nothing more."""
        for worker in self.d.workers.values():
            if worker.pid in self.live:
                worker.last_seen = self.clock
        self.d.check_liveness(self.clock, 3.0)
        for identity in set(self.runs) - set(self.d.workers):
            del self.runs[identity]

    def start(self, job: bytes) -> None:
        """A worker runs `job`, even one the broker has answered timeout: the
        worker's clock started when the request reached it, a little later."""
        if self.id_of[job] is not None:
            self.started[self.id_of[job]].append(job)

    @rule(id=st.sampled_from(IDS), timeout=st.floats(0.5, 5.0), tenant=st.sampled_from("abc"))
    def request(self, id, timeout, tenant):
        meta = p.ExecMeta(name="echo.py", id=id, code=f"# {tenant}")
        job = self.d.admit(b"client", b"", meta, b"", 64, self.clock + timeout, False)
        # The rid is the job id, so answers can be told apart.
        self.d.jobs[job].rid = job
        self.id_of[job] = id
        if id is not None:
            self.arrived[id].append(job)

    @rule()
    def dispatch(self):
        for worker, entries in self.d.dispatch(self.clock).messages():
            self.runs[worker.identity] += [entry[0] for entry in entries]

    @precondition(lambda self: any(self.runs.values()))
    @rule(data=st.data())
    def worker_replies(self, data):
        """A worker runs the first job it was sent and replies (even to one the
        broker answered timeout meanwhile: its reply comes late)."""
        identity = data.draw(st.sampled_from(sorted(i for i, jobs in self.runs.items() if jobs)))
        job = self.runs[identity].pop(0)
        self.start(job)
        self.d.replied(self.d.workers[identity], job, p.OK, b"", "", 50.0)

    @rule(step=st.floats(0.1, 10.0))
    def time_passes(self, step):
        self.clock += step
        self.d.expire(self.clock)
        self.beat()

    @precondition(lambda self: any(self.runs.values()))
    @rule(data=st.data(), began=st.booleans())
    def worker_dies(self, data, began):
        """Its replacement's READY says what it was running, as the pool read it
        from the slot table; the broker requeues what never began."""
        identity = data.draw(st.sampled_from(sorted(i for i, jobs in self.runs.items() if jobs)))
        dead = self.d.workers[identity]
        self.live.discard(dead.pid)
        sent = self.runs.pop(identity)
        running = sent[0] if began else b""
        if began:
            self.start(running)
        self.register(dead.slot, replaces=dead.pid, reason="killed by SIGKILL", job=running,
                      job_status=p.KILLED if began else "", served=dead.replied)
        assert identity not in self.d.workers
        never_began = sent[1:] if began else sent
        assert not [job for job in never_began if self.statuses.get(job) == p.KILLED], \
            "a request its worker never began was answered killed, not given to another"

    @precondition(lambda self: self.d.workers)
    @rule(data=st.data())
    def worker_vanishes(self, data):
        """A worker dies and no replacement registers: after REPLACEMENT_WAIT a
        heartbeat tick forgets it (what it held is answered killed); a new
        worker takes the slot later."""
        identity = data.draw(st.sampled_from(sorted(self.d.workers)))
        dead = self.d.workers[identity]
        self.live.discard(dead.pid)
        self.beat()
        assert identity in self.d.workers and dead.draining  # given nothing more
        self.clock += REPLACEMENT_WAIT + 0.1
        self.d.expire(self.clock)
        self.beat()
        assert identity not in self.d.workers
        self.runs.pop(identity, None)
        self.register(dead.slot)

    @precondition(lambda self: self.d.workers)
    @rule(data=st.data())
    def a_running_worker_is_not_replaced(self, data):
        """A READY that claims to replace a worker that still runs is refused."""
        live = self.d.workers[data.draw(st.sampled_from(sorted(self.d.workers)))]
        with pytest.raises(p.ProtocolError):
            self.d.register(b"impostor", ready(live.slot, 99_999, replaces=live.pid),
                            self.clock)
        assert self.d.by_slot[live.slot] is live

    @invariant()
    def answered_at_most_once(self):
        assert all(count == 1 for count in self.answers.values()), self.answers

    @invariant()
    def an_id_is_at_one_worker_at_most(self):
        for id in IDS[1:]:
            holders = {w.identity for w in self.d.workers.values()
                       for job in w.jobs if self.id_of.get(job) == id}
            queued = any(self.id_of.get(job) == id for job in self.d.queue)
            assert len(holders) + queued <= 1, (id, holders, queued)

    @invariant()
    def in_arrival_order(self):
        for id, started in self.started.items():
            order = {job: i for i, job in enumerate(self.arrived[id])}
            assert [order[job] for job in started] == sorted(order[job] for job in started)

    def teardown(self):
        """The workers run what is left: every request still open reaches one (none
        is stuck, whatever workers died), and each was answered exactly once."""
        for _ in range(10 * (len(self.id_of) + 1)):
            self.dispatch()
            if not any(self.runs.values()):
                break
            for identity, jobs in self.runs.items():
                while jobs:
                    job = jobs.pop(0)
                    self.start(job)
                    self.d.replied(self.d.workers[identity], job, p.OK, b"", "", 50.0)
        assert not self.d.jobs, f"stuck: {sorted(self.d.jobs)}"
        assert set(self.answers) == set(self.id_of), "a request was never answered"
        self.answered_at_most_once()
        self.in_arrival_order()


TestNode = Node.TestCase
TestNode.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


class AffineNode(Node):
    """The same promises with each tenant's requests sent to its worker (copy
    isolation, broker/affinity.py)."""

    def __init__(self):
        super().__init__()
        self.d.affinity = TenantAffinity()


TestAffineNode = AffineNode.TestCase
TestAffineNode.settings = settings(max_examples=100, stateful_step_count=40, deadline=None)
