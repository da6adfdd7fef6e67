"""broker/idlocks.py on its own: unit cases, and a hypothesis state machine that
drives it the way the broker does (arrivals, dispatch to workers with credits,
replies in order, timeouts, worker deaths) and checks the promises: every
exec is answered exactly once, none is lost, and per id the execs run one at
a time, in the order they arrived."""
from __future__ import annotations

import collections

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from broker.idlocks import IdLocks

CREDITS = 3


def test_a_second_exec_of_an_id_waits_and_then_goes_first():
    locks: IdLocks[str] = IdLocks()
    assert locks.arrive("ab", b"1") is True
    assert locks.arrive("ab", b"2") is False and locks.blocked == 1
    assert locks.arrive("cd", b"3") is True
    assert locks.release("ab", b"1", lambda job: True) == b"2"
    assert locks.blocked == 0
    assert locks.release("ab", b"2", lambda job: True) is None
    assert "ab" not in locks and "cd" in locks


def test_answered_waiters_are_skipped_and_a_timed_out_waiter_leaves():
    locks: IdLocks[str] = IdLocks()
    locks.arrive("ab", b"1")
    for job in (b"2", b"3", b"4"):
        locks.arrive("ab", job)
    assert locks.release("ab", b"3", lambda job: True) is None  # 3 timed out waiting
    assert locks.blocked == 2
    assert locks.release("ab", b"1", lambda job: job != b"2") == b"4"  # 2 was answered
    assert locks.blocked == 0


def test_waiters_join_the_worker_of_their_holders():
    locks: IdLocks[str] = IdLocks()
    locks.arrive("ab", b"1")
    locks.arrive("ab", b"2")
    assert locks.take_waiter("ab", lambda job: True) is None  # holders not given yet
    locks.given("ab", "w1")
    assert locks.joinable() == {"ab"} and locks.joinable() == set()
    assert locks.worker_of("ab") == "w1"
    assert locks.take_waiter("ab", lambda job: True) == b"2"
    # w1 dies before it began 2: 2 waits again, first, and holds the lock alone.
    assert locks.wait_again("ab", b"2") is True
    assert locks.promote("ab", lambda job: True) is None  # 1 still holds it
    assert locks.wait_again("ab", b"1") is True
    assert locks.promote("ab", lambda job: True) == b"1"
    assert locks.worker_of("ab") is None


class BrokerModel(RuleBasedStateMachine):
    """The broker's use of IdLocks, with a queue and workers as lists."""

    def __init__(self):
        super().__init__()
        self.locks: IdLocks[int] = IdLocks()
        self.queue: list[int] = []
        self.workers: dict[int, list[int]] = {1: [], 2: []}   # worker -> jobs, in order
        self.id_of: dict[int, str] = {}
        self.live: set[int] = set()
        self.answers: collections.Counter[int] = collections.Counter()
        self.started: dict[str, list[int]] = collections.defaultdict(list)
        self.next_job = 0

    def alive(self, job: bytes) -> bool:
        return int(job) in self.live

    def answer(self, job: int) -> None:
        self.answers[job] += 1
        self.live.discard(job)
        self.queue_first(self.locks.release(self.id_of[job], b"%d" % job, self.alive))

    def queue_first(self, job: bytes | None) -> None:
        if job is not None:
            self.queue.insert(0, int(job))

    @rule(lock=st.sampled_from(["a", "b", "c"]))
    def arrive(self, lock):
        job = self.next_job = self.next_job + 1
        self.id_of[job] = lock
        self.live.add(job)
        if self.locks.arrive(lock, b"%d" % job):
            self.queue.append(job)

    @rule(worker=st.sampled_from([1, 2]))
    def dispatch(self, worker):
        held = self.workers[worker]
        while self.queue and len(held) < CREDITS:
            job = self.queue.pop(0)
            held.append(job)
            self.locks.given(self.id_of[job], worker)
        for lock in self.locks.joinable():
            owner = self.locks.worker_of(lock)
            if owner is None:
                continue
            while len(self.workers[owner]) < CREDITS:
                job = self.locks.take_waiter(lock, self.alive)
                if job is None:
                    break
                self.workers[owner].append(int(job))

    @precondition(lambda self: any(self.workers.values()))
    @rule(data=st.data())
    def reply(self, data):
        """A worker finishes the first job it holds: they run in the order given."""
        worker = data.draw(st.sampled_from([w for w, jobs in self.workers.items() if jobs]))
        job = self.workers[worker].pop(0)
        self.started[self.id_of[job]].append(job)
        self.answer(job)

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def timeout(self, data):
        job = data.draw(st.sampled_from(sorted(self.live)))
        if job in self.queue:
            self.queue.remove(job)
        for jobs in self.workers.values():
            if job in jobs:
                jobs.remove(job)
        self.answer(job)

    @precondition(lambda self: any(self.workers.values()))
    @rule(data=st.data(), began=st.booleans())
    def worker_dies(self, data, began):
        """Its first job is answered killed if it had begun; the others never
        started and go back (broker.requeue)."""
        worker = data.draw(st.sampled_from([w for w, jobs in self.workers.items() if jobs]))
        jobs, self.workers[worker] = self.workers[worker], []
        if began:
            self.started[self.id_of[jobs[0]]].append(jobs[0])
            self.answer(jobs.pop(0))
        waiting_again = set()
        for job in reversed(jobs):
            if job not in self.live:
                continue
            if self.locks.wait_again(self.id_of[job], b"%d" % job):
                waiting_again.add(self.id_of[job])
            else:
                self.queue.insert(0, job)
        for lock in waiting_again:
            self.queue_first(self.locks.promote(lock, self.alive))

    @invariant()
    def answered_at_most_once(self):
        assert all(count == 1 for count in self.answers.values())

    @invariant()
    def one_worker_per_id(self):
        for lock in "abc":
            owners = {w for w, jobs in self.workers.items()
                      if any(self.id_of[j] == lock for j in jobs)}
            in_queue = any(self.id_of[j] == lock for j in self.queue)
            assert len(owners) + in_queue <= 1, (lock, owners, self.queue)

    @invariant()
    def in_arrival_order(self):
        for jobs in self.started.values():
            assert jobs == sorted(jobs)

    @invariant()
    def nothing_lost(self):
        """Each live job is queued, at a worker, or waiting for its id."""
        placed = set(self.queue) | {j for jobs in self.workers.values() for j in jobs}
        assert len(placed) + self.locks.blocked >= len(self.live)
        assert placed <= self.live

    def teardown(self):
        for _ in range(10 * (len(self.live) + 1)):  # bounded: each turn answers some
            if not self.live:
                break
            self.dispatch(1)
            for worker, jobs in self.workers.items():
                while jobs:
                    job = jobs.pop(0)
                    self.started[self.id_of[job]].append(job)
                    self.answer(job)
        assert not self.live, f"lost: {sorted(self.live)}"
        assert set(self.answers) == set(self.id_of)
        self.in_arrival_order()


TestBrokerModel = BrokerModel.TestCase
TestBrokerModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
