"""Sandbox uids per deployment: each pool claims a block no one else on the host uses.

RLIMIT_NPROC counts per uid across the whole host, and a uid is what the
kernel uses to keep one deployment's scripts from another's processes (and
one runner's from another's: every runner has a uid of its own,
Sandbox.uid), so two pools must never share one.  Started as root, a pool
claims as many consecutive blocks of BLOCK uids as its runners need and
records the claim in REGISTRY, one file per block:

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
    paths: tuple[Path, ...]  # one per block

    @property
    def last(self) -> int:
        return self.first + len(self.paths) * BLOCK - 1

    def release(self) -> None:
        """Forget the claim if it is still ours (a later pool may have taken it over)."""
        for path in self.paths:
            try:
                if json.loads(path.read_text()).get("pid") == os.getpid():
                    path.unlink()
            except (OSError, ValueError):
                pass


def claim(start: int, node: str, config: str, exact: bool, count: int,
          registry: Path = REGISTRY) -> Claim:
    """Claim the first free run of blocks holding `count` uids at or above `start`
    (or exactly at `start`)."""
    blocks = -(-count // BLOCK)
    if start + blocks * BLOCK > MAX_UID:
        raise UidsUnavailable(f"node {node}: {count} sandbox uids from {start} do not fit "
                              f"below uid {MAX_UID}")
    registry.mkdir(parents=True, exist_ok=True, mode=0o755)
    with open(registry / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        running = _uids_in_use()
        first = start
        while first + blocks * BLOCK <= MAX_UID:
            starts = range(first, first + blocks * BLOCK, BLOCK)
            holder = next((h for b in starts
                           if (h := _holder(registry / str(b), b, running)) is not None), None)
            if holder is None:
                return Claim(first, tuple(_record(registry / str(b), node, config)
                                          for b in starts))
            if exact:
                raise UidsUnavailable(
                    f"node {node}: sandbox uids {first}-{first + blocks * BLOCK - 1} are in "
                    f"use by {holder}; give the node another `uids` (or remove the key to "
                    "have a free block found)")
            first += BLOCK
    raise UidsUnavailable(f"node {node}: no {blocks} free blocks of {BLOCK} sandbox uids "
                          f"above {start}")


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


def _record(path: Path, node: str, config: str) -> Path:
    pid = os.getpid()
    tmp = path.with_name(f".{path.name}.{pid}")
    tmp.write_text(json.dumps({"pid": pid, "start": _start_time(pid), "node": node,
                               "config": config}))
    os.replace(tmp, path)
    return path


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
