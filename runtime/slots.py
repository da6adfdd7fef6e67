"""The pool's slot table: one record per worker slot in shared memory.

Created by the pool parent before any fork (an anonymous MAP_SHARED mmap), so
each worker writes its own record and the parent reads them all without a
message: which request a worker runs (the broker learns it when the worker
dies) and when it must be killed.  Only trusted processes map it: a worker's
zygote unmaps it before it closes its sandbox, so no script can write it.
In isolation "none" the parent's watchdog enforces the wall and CPU limits
from it; in copy and fork isolation the worker enforces them on its runner,
and the watchdog kills a worker only past its deadline plus a backstop.

    record: pid q | state q | kill_at d | served q | job 16s
"""
from __future__ import annotations

import mmap
import struct

BOOTING, IDLE, BUSY = 0, 1, 2
_RECORD = struct.Struct("<qqdq16s")


class SlotTable:
    def __init__(self, count: int):
        self.count = count
        self._mem = mmap.mmap(-1, _RECORD.size * (count + 1))

    def close(self) -> None:
        """Unmap the table (in a process that must not see it: a zygote)."""
        self._mem.close()

    def _offset(self, slot: int) -> int:
        return _RECORD.size * slot

    def reset(self, slot: int, pid: int) -> None:
        _RECORD.pack_into(self._mem, self._offset(slot), pid, BOOTING, 0.0, 0, b"")

    def read(self, slot: int) -> tuple[int, int, float, int, bytes]:
        pid, state, kill_at, served, job = _RECORD.unpack_from(self._mem, self._offset(slot))
        return pid, state, kill_at, served, job.rstrip(b"\0")

    # Called by the worker that owns the slot.

    def idle(self, slot: int, pid: int, served: int) -> None:
        _RECORD.pack_into(self._mem, self._offset(slot), pid, IDLE, 0.0, served, b"")

    def busy(self, slot: int, pid: int, kill_at: float, served: int, job: bytes) -> None:
        _RECORD.pack_into(self._mem, self._offset(slot), pid, BUSY, kill_at, served, job)
