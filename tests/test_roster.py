"""runtime/roster.py alone: a hypothesis state machine plays the pool's
forks, exits, retirements, reloads (HUP) and resizes (TTIN/TTOU) against
the Roster, with the calls Pool makes, and checks the bookkeeping: one live
record per slot, every exit accounted for once, and a dead worker's slot
refilled first, its replacement told who it replaces."""
from __future__ import annotations

import collections
import itertools
import os
import signal

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from core import protocol as p
from runtime.roster import Roster
from runtime.slots import BOOTING, BUSY, IDLE

SLOTS = 6
CEILING = 3  # the pool owns twice its ceiling of slots, so a full pool can roll


def exited(code: int) -> int:
    return code << 8


def killed(sig: int) -> int:
    return sig


STATUSES = st.sampled_from([exited(0), exited(1), exited(7), killed(signal.SIGKILL),
                            killed(signal.SIGTERM), killed(signal.SIGSEGV),
                            killed(signal.SIGUSR2)])


class PoolRoster(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.roster = Roster(SLOTS)
        self.generation, self.size, self.clock = 0, 2, 0.0
        self.pids = itertools.count(100)
        self.state: dict[int, int] = {}   # slot -> the slot table's state
        self.exits: collections.Counter[int] = collections.Counter()
        self.forked: set[int] = set()
        self.manage()

    def manage(self) -> None:
        """Pool.manage_workers: retire what is beyond the size, fork what is missing."""
        for worker in self.roster.to_retire(self.generation, self.size, self.state.get):
            assert self.roster.retire(worker.pid)
        for slot in self.roster.to_spawn(self.generation, self.size):
            last = self.roster.slots[slot].predecessor
            pid = next(self.pids)
            told = self.roster.spawned(slot, pid, self.generation)
            assert told == last  # the new worker tells the broker whom it replaces
            self.forked.add(pid)
            self.state[slot] = BOOTING

    @precondition(lambda self: self.roster.workers)
    @rule(data=st.data(), state=st.sampled_from([IDLE, BUSY]))
    def worker_boots(self, data, state):
        worker = data.draw(st.sampled_from(sorted(self.roster.workers.values(),
                                                  key=lambda w: w.pid)))
        self.state[worker.slot] = state
        self.manage()

    @precondition(lambda self: self.roster.workers)
    @rule(data=st.data(), status=STATUSES)
    def worker_exits(self, data, status):
        worker = data.draw(st.sampled_from(sorted(self.roster.workers.values(),
                                                  key=lambda w: w.pid)))
        state = self.state[worker.slot]
        self.clock += 1.0
        end = self.roster.exited(worker.pid, status, state, 3, b"job", self.clock)
        assert end is not None and end.record is worker
        self.exits[worker.pid] += 1
        assert self.roster.exited(worker.pid, status, state, 3, b"job", self.clock) is None
        slot = self.roster.slots[worker.slot]
        assert slot.worker is None and slot.dead_at == self.clock
        assert slot.predecessor.pid == worker.pid
        assert slot.predecessor.job == (b"job" if state == BUSY else b"")
        if state == BUSY and not end.planned:
            assert slot.predecessor.job_status == p.KILLED
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert end.retired == (worker.retiring and (clean or status in (
            killed(signal.SIGTERM), killed(signal.SIGUSR2))))
        if not end.retired:  # refilled before any slot that was free anyway
            free = self.roster.free_slots()
            assert slot.respawn and free.index(slot.number) < len(
                [s for s in self.roster.slots.values() if s.respawn])
        self.manage()

    @precondition(lambda self: self.roster.workers)
    @rule(data=st.data())
    def watchdog_kills(self, data):
        """The pool kills a worker (deadline): its exit reads as our reason."""
        worker = data.draw(st.sampled_from(sorted(self.roster.workers.values(),
                                                  key=lambda w: w.pid)))
        worker.kill = ("request ran past its deadline", p.TIMEOUT)
        self.state[worker.slot] = BUSY
        end = self.roster.exited(worker.pid, killed(signal.SIGKILL), BUSY, 1, b"j", self.clock)
        self.exits[worker.pid] += 1
        assert end.reason == "request ran past its deadline"
        assert self.roster.slots[worker.slot].predecessor.job_status == p.TIMEOUT
        self.manage()

    @rule()
    def hup(self):
        """A reload: a new generation; the old ones retire as new ones come up."""
        self.generation += 1
        self.manage()

    @rule(step=st.sampled_from([1, -1]))
    def ttin_ttou(self, step):
        self.size = max(1, min(CEILING, self.size + step))
        self.manage()

    @invariant()
    def one_live_record_per_slot(self):
        for number, slot in self.roster.slots.items():
            if slot.worker is not None:
                assert slot.worker.slot == number
                assert self.roster.workers[slot.worker.pid] is slot.worker
        in_slots = {s.worker.pid for s in self.roster.slots.values() if s.worker}
        assert in_slots == set(self.roster.workers)

    @invariant()
    def every_exit_accounted_once(self):
        assert all(count == 1 for count in self.exits.values())
        assert set(self.exits) | set(self.roster.workers) == self.forked
        assert not set(self.exits) & set(self.roster.workers)

    @invariant()
    def the_size_is_kept(self):
        """As many current workers as the size, unless every slot is taken
        (reloads faster than workers boot: the old ones leave as new ones come up),
        or beyond it by workers still booting (they retire once up)."""
        current = self.roster.current(self.generation)
        booting = sum(1 for w in current if self.state[w.slot] == BOOTING)
        assert len(current) <= self.size + booting
        assert len(current) >= self.size or not self.roster.free_slots()


TestPoolRoster = PoolRoster.TestCase
TestPoolRoster.settings = settings(max_examples=80, stateful_step_count=25, deadline=None)
