"""broker/dispatch.py alone: a hypothesis state machine plays clients, workers
and the clock against the Dispatcher (no sockets) and checks what the broker
promises: every request is answered exactly once, none is lost when workers
die, and the execs of one id run one at a time, in the order they came."""
from __future__ import annotations

import collections

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.dispatch import Dispatcher, Worker, never_started
from core import protocol as p

CREDITS = 3
IDS = [None, "ab", "cd"]


def ready(slot: int, pid: int, **fields) -> p.Ready:
    return p.Ready(slot=slot, pid=pid, credits=CREDITS, token=b"t", pool=1, **fields)


class Node(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.answers: collections.Counter[bytes] = collections.Counter()
        self.d = Dispatcher("n1", 1 << 20, self.answer)
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

    def register(self, slot: int, **fields) -> Worker:
        pid = next(self.pids)
        worker = Worker(b"w%d" % pid, ready(slot, pid, **fields), self.clock, "n1")
        self.d.workers[worker.identity] = worker
        self.d.by_slot[slot] = worker
        self.runs[worker.identity] = []
        return worker

    def start(self, job: bytes) -> None:
        """A worker runs `job`, even one the broker has answered timeout: the
        worker's clock started when the request reached it, a little later."""
        if self.id_of[job] is not None:
            self.started[self.id_of[job]].append(job)

    @rule(id=st.sampled_from(IDS), timeout=st.floats(0.5, 5.0))
    def request(self, id, timeout):
        meta = p.ExecMeta(name="echo.py", id=id)
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

    @precondition(lambda self: any(self.runs.values()))
    @rule(data=st.data(), began=st.booleans())
    def worker_dies(self, data, began):
        """Its replacement's READY says what it was running, as the pool read it
        from the slot table; the broker requeues what never began."""
        identity = data.draw(st.sampled_from(sorted(i for i, jobs in self.runs.items() if jobs)))
        dead = self.d.workers[identity]
        sent = self.runs.pop(identity)
        running = sent[0] if began else b""
        if began:
            self.start(running)
        fields = dict(replaces=dead.pid, reason="killed by SIGKILL", job=running,
                      job_status=p.KILLED if began else "", served=dead.replied)
        replacement = ready(dead.slot, 0, **fields)
        self.d.requeue(dead, never_started(dead, replacement))
        if running in dead.jobs:
            del dead.jobs[running]
            self.d.finish(running, p.KILLED, error="its worker died")
        self.d.remove_worker(dead, "died")
        self.register(dead.slot)

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
TestNode.settings = settings(max_examples=300, stateful_step_count=40, deadline=None)
