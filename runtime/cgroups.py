"""cgroup v1 memory and pids limits and CPU accounting: a cgroup per worker slot,
and one per runner seat inside it.

    /sys/fs/cgroup/memory/srw-<node>-<pool pid>/slot<N>/seat<J>/memory.limit_in_bytes
    /sys/fs/cgroup/pids/srw-<node>-<pool pid>/slot<N>/seat<J>/pids.max
    /sys/fs/cgroup/cpuacct/srw-<node>-<pool pid>/slot<N>/seat<J>/cpuacct.usage

The pool parent creates them (root only; this machine's cgroup v2 has no
memory or pids controller).  A slot's zygote sits in the slot's cgroup; each
runner it forks moves itself into a free seat's cgroup (through descriptors
the zygote opened before its sandbox closed) before it drops to the seat's
uid, and everything the runner spawns inherits the seat.  So the limits, the
CPU the worker reads and the count of tasks left behind are each runner's
own: a runner of one tenant cannot starve another's.  In isolation "none"
the worker itself joins the slot's cgroup, which then carries the limits.
After a worker dies the pool kills whatever is left in its slot's cgroups.
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

    def __init__(self, node: str, slots: int, memory_bytes: int, pids: int, seats: int):
        """`seats`: runner cgroups per slot, each with the limits (0: none; the
        slot itself has them: for a worker that runs scripts itself, and for
        fork isolation, where a runner serves one request and moving each into
        cgroups of its own would add about a third to its fork: three moves
        0.4 ms, a fork 1.1-1.25 ms, measured here)."""
        self.enabled = available()
        self.base = f"srw-{node}-{os.getpid()}"
        self.slots, self.seats = slots, seats
        if not self.enabled:
            return
        self.limits = {"memory": ("memory.limit_in_bytes", memory_bytes),
                       "pids": ("pids.max", pids)}
        remove_stale()
        for slot in range(1, slots + 1):
            for c in CONTROLLERS:
                self.path(c, slot).mkdir(parents=True, exist_ok=True)
            if not seats:
                self._limit(slot, None)

    def make_seats(self, slot: int) -> None:
        """The slot's seat cgroups, by its worker before it forks its zygote: only
        slots in use pay for them (a cgroup costs ~0.2 ms to make, ~0.8 to remove)."""
        if not self.enabled:
            return
        for seat in range(self.seats):
            for c in CONTROLLERS:
                self.path(c, slot, seat).mkdir(exist_ok=True)
            self._limit(slot, seat)

    def _limit(self, slot: int, seat: int | None) -> None:
        for controller, (name, value) in self.limits.items():
            (self.path(controller, slot, seat) / name).write_text(str(value))

    def path(self, controller: str, slot: int, seat: int | None = None) -> Path:
        path = ROOT / controller / self.base / f"slot{slot}"
        return path if seat is None else path / f"seat{seat}"

    def join(self, slot: int) -> None:
        """Called by the worker itself, while still root."""
        if self.enabled:
            for c in CONTROLLERS:
                (self.path(c, slot) / "cgroup.procs").write_text(str(os.getpid()))

    def seat_doors(self, slot: int, count: int) -> list[tuple[int, tuple[int, ...]]]:
        """Per seat, (its task count, its cgroup.procs files) as descriptors, or
        (-1, ()) without seat cgroups: opened by the zygote before its sandbox
        closes, so that it can tell an empty seat and a runner can move itself
        in (by writing "0")."""
        if not self.enabled or not self.seats:
            return [(-1, ()) for _ in range(count)]
        return [(self.tasks_file(slot, seat),
                 tuple(os.open(self.path(c, slot, seat) / "cgroup.procs",
                               os.O_WRONLY | os.O_CLOEXEC) for c in CONTROLLERS))
                for seat in range(self.seats)]

    def cpu_usage_file(self, slot: int, seat: int) -> int:
        """A descriptor of a seat's CPU use (`cpu_seconds`; the slot's without seat
        cgroups), or -1 without cgroups."""
        return self._open(slot, seat, "cpuacct", "cpuacct.usage")

    def tasks_file(self, slot: int, seat: int) -> int:
        """A descriptor of a seat's task count (`read_int`), or -1 without seat cgroups."""
        return self._open(slot, seat, "pids", "pids.current") if self.seats else -1

    def _open(self, slot: int, seat: int, controller: str, name: str) -> int:
        if not self.enabled:
            return -1
        path = self.path(controller, slot, seat if self.seats else None) / name
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

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
    """SIGKILL every process in the cgroup and the cgroups below it."""
    try:
        pids = [int(x) for x in (path / "cgroup.procs").read_text().split()]
        below = [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return 0
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids) + sum(_kill_all(child) for child in below)


def _rmtree(path: Path) -> None:
    """rmdir the cgroup and its children; a cgroup still holding a process stays."""
    try:  # scandir's d_type: no stat of each of a cgroup's dozen files
        children = [Path(e.path) for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:  # gone, or never made
        return
    for child in children:
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
