"""The pool's bookkeeping, in gunicorn's shape: one record per worker process
and one per slot, with no processes, signals or clock of its own.

    spawned(slot, pid)       a worker forked into a free slot
    exited(pid, status, ...) its end: the record goes, and what the slot's next
                             worker tells the broker is left in the slot
    retire(pid)              asked to drain and go (reload, shrink, stop)
    to_spawn / to_retire     what the pool forks and retires to reach its size
                             and roll to a new generation

runtime/pool.py forks, signals and reaps; tests/test_roster.py drives this
class alone with a hypothesis state machine.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field

from core import exits
from core import protocol as p

from .slots import BOOTING, BUSY


@dataclass(frozen=True)
class Predecessor:
    """What the pool tells a new worker about the one it replaces (sent in READY)."""
    pid: int = 0
    reason: str = ""
    job: bytes = b""
    job_status: str = ""
    served: int = 0


@dataclass
class WorkerRecord:
    pid: int
    slot: int
    generation: int                       # python.init's when it was forked
    retiring: bool = False                # told to drain and exit
    kill: tuple[str, str] | None = None   # we killed it: (reason, its request's status)
    cpu_job: bytes = b""                  # isolation none: the request whose CPU is measured
    cpu_start: float = 0.0                # ... and the worker's CPU seconds when first seen


@dataclass
class SlotRecord:
    number: int
    worker: WorkerRecord | None = None
    respawn: bool = False                 # its worker died unasked: refill it first
    predecessor: Predecessor = field(default_factory=Predecessor)  # for the next worker
    dead_at: float = 0.0                  # when its last worker died


@dataclass(frozen=True)
class Exit:
    """How a worker's end reads, for the pool's log and counters."""
    record: WorkerRecord
    reason: str
    retired: bool        # we asked it to go
    planned: bool        # retired, or it left cleanly (recycled after max_requests)
    state: int           # its slot's state when it died (slots.BOOTING, IDLE, BUSY)
    job: bytes           # the request it was running, if BUSY


def describe_exit(status: int) -> str:
    if os.WIFEXITED(status):
        code = os.WEXITSTATUS(status)
        if code == exits.WORKER_BOOT:
            return f"could not start (exit status {code}; its traceback is in the log)"
        if code == exits.WORKER_FAILED:
            return f"failed while serving (exit status {code}; its traceback is in the log)"
    return exits.describe(status)


class Roster:
    def __init__(self, slot_count: int):
        self.slots = {n: SlotRecord(n) for n in range(1, slot_count + 1)}
        self.workers: dict[int, WorkerRecord] = {}  # pid -> record: live, not yet reaped

    def spawned(self, slot: int, pid: int, generation: int) -> Predecessor:
        """A worker forked into `slot`; returns what it must tell the broker."""
        record = self.slots[slot]
        assert record.worker is None, f"slot {slot} has worker {record.worker}"
        record.worker = self.workers[pid] = WorkerRecord(pid, slot, generation)
        record.respawn = False
        predecessor, record.predecessor = record.predecessor, Predecessor()
        return predecessor

    def exited(self, pid: int, status: int, state: int, served: int, job: bytes,
               now: float) -> Exit | None:
        """A reaped worker (None: not one of ours, or already handled).  Its slot
        keeps what the next worker there tells the broker: who died, why, and
        the request it was running (`state`, `served`, `job`: the slot table's)."""
        record = self.workers.pop(pid, None)
        if record is None:
            return None
        slot = self.slots[record.slot]
        slot.worker, slot.dead_at = None, now
        reason, job_status = record.kill or (describe_exit(status), p.KILLED)
        clean = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        # Retired: we asked it to go (SIGTERM kills one still booting: ours too).
        retired = record.retiring and (clean or (
            os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGTERM, signal.SIGUSR2)))
        planned = retired or clean
        slot.respawn = not retired  # its replacement goes here, to tell the broker
        busy = state == BUSY
        slot.predecessor = Predecessor(
            pid=pid, reason=reason if not planned else "retired" if retired else "recycled",
            job=job if busy else b"", job_status=job_status if busy else "", served=served)
        return Exit(record, reason, retired, planned, state, job if busy else b"")

    def retire(self, pid: int) -> bool:
        """Mark a worker as leaving; False if it is not ours or already leaving."""
        record = self.workers.get(pid)
        if record is None or record.retiring:
            return False
        record.retiring = True
        return True

    def current(self, generation: int) -> list[WorkerRecord]:
        """Workers of this generation that are not retiring: the pool's size counts these."""
        return [w for w in self.workers.values() if w.generation == generation and not w.retiring]

    def old(self, generation: int) -> list[WorkerRecord]:
        """Workers of an earlier generation, not retiring yet: a reload rolls them."""
        return [w for w in self.workers.values() if w.generation != generation and not w.retiring]

    def to_spawn(self, generation: int, size: int) -> list[int]:
        """The slots to fork workers into so that `size` count (current())."""
        missing = size - len(self.current(generation))
        return self.free_slots()[:max(0, missing)]

    def to_retire(self, generation: int, size: int, state_of) -> list[WorkerRecord]:
        """Rolling: an old worker retires for each new one up (not BOOTING) beyond
        the size.  Shrinking: the workers beyond the size retire, idle ones and
        high slots first; booting ones are left to finish booting first.
        `state_of(slot)` is the slot table's state."""
        old, current = self.old(generation), self.current(generation)
        up = [w for w in current if state_of(w.slot) != BOOTING]
        going = old[:max(0, len(up) + len(old) - size)]
        if len(current) > size:
            by_preference = sorted(up, key=lambda w: (state_of(w.slot) == BUSY, -w.slot))
            going += by_preference[:len(current) - size]
        return going

    def free_slots(self) -> list[int]:
        """Slots without a worker: first those whose worker died unasked (its
        replacement there tells the broker what it held), then the lowest."""
        free = [s for s in self.slots.values() if s.worker is None]
        return [s.number for s in sorted(free, key=lambda s: (not s.respawn, s.number))]
