"""cgroup v1 memory and pids limits and CPU accounting, one cgroup per worker slot.

    /sys/fs/cgroup/memory/srw-<node>-<pool pid>/slot<N>/memory.limit_in_bytes
    /sys/fs/cgroup/pids/srw-<node>-<pool pid>/slot<N>/pids.max
    /sys/fs/cgroup/cpuacct/srw-<node>-<pool pid>/slot<N>/cpuacct.usage

The pool parent creates them (root only; this machine's cgroup v2 has no
memory or pids controller).  What runs scripts moves itself in before it
drops its uid (the slot's zygote, or the worker itself in isolation "none"),
and everything it spawns inherits the cgroup, so the limits hold for the
slot as a whole, root or not, and the worker reads the CPU that the slot's
runners and everything they started have used.  After a worker dies the pool
kills whatever is left in its slot's cgroup.
"""
from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

log = logging.getLogger("srw.pool")

ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("memory", "pids", "cpuacct")


def available() -> bool:
    return os.geteuid() == 0 and all(
        os.access(ROOT / c, os.W_OK) and (ROOT / c / "cgroup.procs").exists() for c in CONTROLLERS)


class SlotCgroups:
    """The cgroups of one pool; every method is safe to call when unavailable."""

    def __init__(self, node: str, slots: int, memory_bytes: int, pids: int):
        self.enabled = available()
        self.base = f"srw-{node}-{os.getpid()}"
        self.slots = slots
        if not self.enabled:
            return
        remove_stale()
        for slot in range(1, slots + 1):
            for c in CONTROLLERS:
                self.path(c, slot).mkdir(parents=True, exist_ok=True)
            (self.path("memory", slot) / "memory.limit_in_bytes").write_text(str(memory_bytes))
            (self.path("pids", slot) / "pids.max").write_text(str(pids))

    def path(self, controller: str, slot: int) -> Path:
        return ROOT / controller / self.base / f"slot{slot}"

    def join(self, slot: int) -> None:
        """Called by the worker itself, while still root."""
        if self.enabled:
            for c in CONTROLLERS:
                (self.path(c, slot) / "cgroup.procs").write_text(str(os.getpid()))

    def cpu_usage_file(self, slot: int) -> int:
        """A descriptor of the slot's CPU use (`cpu_seconds`), or -1 without cgroups."""
        return self._open(slot, "cpuacct", "cpuacct.usage")

    def tasks_file(self, slot: int) -> int:
        """A descriptor of the slot's task count (`read_int`), or -1 without cgroups."""
        return self._open(slot, "pids", "pids.current")

    def _open(self, slot: int, controller: str, name: str) -> int:
        if not self.enabled:
            return -1
        return os.open(self.path(controller, slot) / name, os.O_RDONLY | os.O_CLOEXEC)

    def kill(self, slot: int) -> int:
        """SIGKILL everything left in the slot; returns how many were signalled."""
        if not self.enabled:
            return 0
        return _kill_all(self.path("pids", slot))

    def remove(self) -> None:
        if not self.enabled:
            return
        for slot in range(1, self.slots + 1):
            _kill_all(self.path("pids", slot))
        for c in CONTROLLERS:
            _rmtree(ROOT / c / self.base)


def cpu_seconds(usage_fd: int) -> float:
    """CPU time used in a slot's cgroup (its processes and their reaped children)."""
    return read_int(usage_fd) / 1e9


def read_int(fd: int) -> int:
    return int(os.pread(fd, 32, 0))


def _kill_all(path: Path) -> int:
    try:
        pids = [int(x) for x in (path / "cgroup.procs").read_text().split()]
    except OSError:
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def _rmtree(path: Path) -> None:
    """rmdir the cgroup and its children; a cgroup still holding a process stays."""
    if not path.is_dir():
        return
    for child in path.iterdir():
        if child.is_dir():
            _rmtree(child)
    try:
        path.rmdir()
    except OSError as exc:
        log.debug("cgroup %s not removed: %s", path, exc)


def remove_stale() -> None:
    """Remove the cgroups of pools that died without cleaning up (SIGKILL)."""
    for c in CONTROLLERS:
        for path in (ROOT / c).glob("srw-*-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                for slot in path.glob("slot*"):
                    _kill_all(slot)
                _rmtree(path)
