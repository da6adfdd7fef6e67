"""Per-id locks: the execs of one id run one at a time on a node, in arrival order.

Pure bookkeeping, no sockets and no clock: the broker tells what happened to a
job (arrived, given to a worker, finished, sent back by a dead worker) and
gets back which jobs may go where.  An id's *holders* are all in the broker's
queue, or all given to one worker, which runs them one after another; its
*waiters* wait.  Giving a worker the waiters of an id it already runs keeps
them one at a time without a round trip through the broker between them.

    arrive(id, job)           -> True: it holds the lock (queue it); False: it waits
    given(id, worker)            its holders went to `worker`: waiters may join them
    release(id, job, alive)   -> the waiter that now holds the lock (queue it first)
    wait_again(id, job)       -> True: a holder whose worker died before it began;
                                 it waits first in line (then `promote`)
    take_waiter(id, alive)    -> the next waiter, now a holder, to give its worker
"""
from __future__ import annotations

import collections
from typing import Callable, Generic, TypeVar

W = TypeVar("W")


class IdLock(Generic[W]):
    __slots__ = ("holders", "worker", "waiting")

    def __init__(self):
        self.holders: set[bytes] = set()
        self.worker: W | None = None
        self.waiting: collections.deque[bytes] = collections.deque()


class IdLocks(Generic[W]):
    def __init__(self):
        self._locks: dict[str, IdLock[W]] = {}
        self.blocked = 0  # jobs waiting, over every id (the queue limit counts them)
        self._joinable: set[str] = set()  # ids whose holders' worker may take waiters

    def __contains__(self, lock: str) -> bool:
        return lock in self._locks

    def arrive(self, lock: str, job: bytes) -> bool:
        id_lock = self._locks.get(lock)
        if id_lock is None:
            id_lock = self._locks[lock] = IdLock()
        elif id_lock.holders:
            self._wait(id_lock, job)
            self._joinable.add(lock)
            return False
        id_lock.holders.add(job)
        return True

    def given(self, lock: str, worker: W) -> None:
        self._locks[lock].worker = worker
        self._joinable.add(lock)

    def release(self, lock: str, job: bytes, alive: Callable[[bytes], bool]) -> bytes | None:
        """`job` was answered: a holder that finished, or a waiter that timed out."""
        id_lock = self._locks.get(lock)
        if id_lock is None:
            return None
        if job in id_lock.holders:
            id_lock.holders.discard(job)
        elif job in id_lock.waiting:  # a waiter that timed out: it never held the lock
            id_lock.waiting.remove(job)
            self.blocked -= 1
        if id_lock.holders and id_lock.waiting:
            self._joinable.add(lock)  # their worker has room again
        return self.promote(lock, alive)

    def wait_again(self, lock: str, job: bytes) -> bool:
        id_lock = self._locks.get(lock)
        if id_lock is None or job not in id_lock.holders:
            return False
        id_lock.holders.discard(job)
        self._wait(id_lock, job, first=True)
        return True

    def promote(self, lock: str, alive: Callable[[bytes], bool]) -> bytes | None:
        """With no holder left, the first live waiter holds the lock (returned);
        with no waiter either, the lock goes."""
        id_lock = self._locks.get(lock)
        if id_lock is None or id_lock.holders:
            return None
        id_lock.worker = None
        job = self._next_live(id_lock, alive)
        if job is None:
            del self._locks[lock]
        return job

    def take_waiter(self, lock: str, alive: Callable[[bytes], bool]) -> bytes | None:
        """For the worker running the id's holders (`worker_of`), within its credits."""
        id_lock = self._locks.get(lock)
        if id_lock is None or id_lock.worker is None or not id_lock.holders:
            return None
        return self._next_live(id_lock, alive)

    def worker_of(self, lock: str) -> W | None:
        id_lock = self._locks.get(lock)
        return id_lock.worker if id_lock is not None and id_lock.holders else None

    def joinable(self) -> set[str]:
        """The ids whose waiters may join their holders' worker now (and forget them)."""
        joinable, self._joinable = self._joinable, set()
        return joinable

    def _wait(self, id_lock: IdLock[W], job: bytes, first: bool = False) -> None:
        (id_lock.waiting.appendleft if first else id_lock.waiting.append)(job)
        self.blocked += 1

    def _next_live(self, id_lock: IdLock[W], alive: Callable[[bytes], bool]) -> bytes | None:
        """Pop waiters until a live one (answered ones just go); it becomes a holder."""
        while id_lock.waiting:
            job = id_lock.waiting.popleft()
            self.blocked -= 1
            if alive(job):
                id_lock.holders.add(job)
                return job
        return None
