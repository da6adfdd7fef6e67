"""What a worker does to itself right after the fork, before it serves.

Kernel-enforced limits that a script cannot raise back: rlimits with the
hard limit equal to the soft one (memory, open files, file size, no core
files), and the parent-death signal so a worker never outlives its pool.
CPU and wall time are per request, so the pool parent's watchdog enforces
them from outside (see slots.py).
"""
from __future__ import annotations

import ctypes
import resource
import signal

from .profile import Profile

PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


def apply_limits(profile: Profile) -> None:
    mb = 1024 * 1024
    limits = {
        resource.RLIMIT_AS: profile.memory_mb * mb,
        resource.RLIMIT_NOFILE: profile.open_files,
        resource.RLIMIT_FSIZE: profile.file_size_mb * mb,
        resource.RLIMIT_CORE: 0,
    }
    for which, value in limits.items():
        resource.setrlimit(which, (value, value))
