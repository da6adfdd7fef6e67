"""Sandbox uids per deployment: each pool claims a block no one else on the host uses.

RLIMIT_NPROC counts per uid across the whole host, and a uid is what the
kernel uses to keep one deployment's scripts from another's processes, so two
pools must never share one.  Started as root, a pool claims a block of
BLOCK uids (slot N's zygote and runners run as first + N) and records the
claim in REGISTRY, one file per block:

    /run/srw/uids/61000
    {"pid": 4242, "start": 1234567, "node": "n1", "config": "/srv/a/config.toml"}

A block is free when no live pool claims it (a claim whose pid is gone, or
was reused by another process, is stale), no process on the host runs with
one of its uids, and no account in the passwd database has one.  Blocks are
looked for from the profile's `user` upward (derived), or exactly where a
node's `uids` key says (configured): a configured block that is not free is
refused with a line naming who holds it.  Claims are made under an flock.
"""
from __future__ import annotations

import fcntl
import json
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError

REGISTRY = Path("/run/srw/uids")
BLOCK = 1000
MAX_UID = 2**31 - 2 * BLOCK


class UidsUnavailable(ConfigError):
    """No block of sandbox uids can be claimed; the message says why."""


@dataclass(frozen=True)
class Claim:
    first: int
    path: Path

    def uid(self, slot: int) -> int:
        return self.first + slot

    def release(self) -> None:
        """Forget the claim if it is still ours (a later pool may have taken it over)."""
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass


def claim(start: int, node: str, config: str, exact: bool, slots: int,
          registry: Path = REGISTRY) -> Claim:
    """Claim the first free block at or above `start` (or exactly `start`)."""
    if slots >= BLOCK:
        raise UidsUnavailable(f"{slots} workers need more than {BLOCK - 1} uids per node")
    registry.mkdir(parents=True, exist_ok=True, mode=0o755)
    with open(registry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = _uids_in_use()
        first = start
        while first <= MAX_UID:
            holder = _holder(registry / str(first), first, running)
            if holder is None:
                return _record(registry / str(first), first, node, config)
            if exact:
                raise UidsUnavailable(
                    f"node {node}: sandbox uids {first}-{first + BLOCK - 1} are in use "
                    f"by {holder}; give the node another `uids` (or remove the key to "
                    "have a free block found)")
            first += BLOCK
    raise UidsUnavailable(f"node {node}: no free block of {BLOCK} sandbox uids above {start}")


def _holder(path: Path, first: int, running: dict[int, int]) -> str | None:
    """Who holds the block starting at `first`, in words; None when it is free."""
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        record = None
    except (OSError, ValueError):
        record = {}
    if record is not None and _alive(record):
        return (f"node {record.get('node')} of {record.get('config')} "
                f"(pool pid {record.get('pid')})")
    block = range(first, first + BLOCK)
    for uid, pid in running.items():
        if uid in block:
            return f"process {pid}, which runs as uid {uid}"
    for uid in block:
        try:
            return f"the account {pwd.getpwuid(uid).pw_name!r} (uid {uid})"
        except KeyError:
            pass
    return None


def _record(path: Path, first: int, node: str, config: str) -> Claim:
    pid = os.getpid()
    tmp = path.with_name(f".{path.name}.{pid}")
    tmp.write_text(json.dumps({"pid": pid, "start": _start_time(pid), "node": node,
                               "config": config}))
    os.replace(tmp, path)
    return Claim(first, path)


def _alive(record: dict) -> bool:
    pid = record.get("pid")
    return isinstance(pid, int) and pid > 0 and _start_time(pid) == record.get("start")


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks (tells a reused pid apart)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return int(stat.rsplit(b")", 1)[1].split()[19])


def _uids_in_use() -> dict[int, int]:
    """Uid (real, effective or saved) -> a pid, for every process on the host.
    Read from status: a process that changed its uid is not dumpable, and its
    /proc entry then belongs to root."""
    out: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{entry.path}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"Uid:"):
                        for uid in line.split()[1:4]:
                            out.setdefault(int(uid), int(entry.name))
                        break
        except OSError:
            pass
    return out
