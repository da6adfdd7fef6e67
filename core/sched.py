"""CPU scheduling by load: SCHED_BATCH while a process has a backlog.

The proxy, the broker and the workers pass every request on in small
messages.  Under the default policy each message that arrives wakes its
receiver (and ZeroMQ's I/O thread before it) at once, pre-empting whatever
runs: on a busy machine each of them then wakes about once per request and
pays a context switch per message.  SCHED_BATCH (sched(7)) keeps the wake-up
but not the pre-emption: the receiver runs when a CPU falls free or at the
next tick, and by then finds several messages to take in one turn.  That
costs a lone request tens of microseconds, so the policy applies only while
requests queue; the default one comes back after CALM_AFTER without a backlog.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("srw.sched")

CALM_AFTER = 0.005  # seconds without a backlog before the default policy comes back


class LoadScheduling:
    """Every thread of this process under SCHED_BATCH while `update` says busy."""

    def __init__(self, threads: list[int] | None = None):
        self.threads = threads  # their ids; None: read /proc/self/task at each switch
        self.batch = False
        self.calm_since: float | None = None
        self.enabled = hasattr(os, "SCHED_BATCH")

    def update(self, busy: bool, now: float) -> None:
        if busy:
            self.calm_since = None
            if not self.batch:
                self._apply(True)
        elif self.batch:
            if self.calm_since is None:
                self.calm_since = now
            elif now - self.calm_since >= CALM_AFTER:
                self._apply(False)

    def relax(self) -> None:
        """The default policy now: the caller knows it has been calm for a while."""
        if self.batch:
            self._apply(False)

    def _apply(self, batch: bool) -> None:
        if not self.enabled:
            return
        policy = os.SCHED_BATCH if batch else os.SCHED_OTHER
        try:
            # The policy is per thread: ZeroMQ's I/O thread wakes first on every message.
            for tid in self.threads or os.listdir("/proc/self/task"):
                try:
                    os.sched_setscheduler(int(tid), policy, os.sched_param(0))
                except ProcessLookupError:  # a thread that just ended
                    pass
        except OSError as exc:  # no /proc, or not allowed: stop trying
            log.info("cannot change the scheduling policy (%s); it stays as it is", exc)
            self.enabled = False
            return
        self.batch = batch
        self.calm_since = None


def open_thread_list() -> int:
    """A descriptor of /proc/self/task (-1 without /proc), to list this process's
    threads after a sandbox has closed /proc."""
    try:
        return os.open("/proc/self/task", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return -1


def thread_ids(fd: int) -> list[int] | None:
    """This process's thread ids through `open_thread_list`'s descriptor, which it closes."""
    if fd < 0:
        return None
    try:
        return [int(tid) for tid in os.listdir(fd)]
    except OSError:
        return None
    finally:
        os.close(fd)


def slot_cpu(slot: int) -> int:
    """The CPU of a slot's worker and runners: the slot-th of those this process
    may use, round robin.  A worker and its runner then hand each request over
    on one CPU: measured here, a wake-up across CPUs costs the pipe round trip
    ~40 us more, as the hypervisor relays it."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[(slot - 1) % len(cpus)]


def pin_to_cpu(cpu: int) -> None:
    """This process (and what it starts from now on) on `cpu` alone."""
    os.sched_setaffinity(0, {cpu})
