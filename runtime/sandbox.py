"""The sandbox a worker closes around itself after the fork, before it serves.

    pool parent (root)                      worker, after fork            fork-isolation child
    ------------------                      ------------------            --------------------
    Sandbox(profile): check the kernel,     enter_worker(slot):           enter_child():
    import what scripts may import,           join the slot's cgroups       parent-death signal
    create slot cgroups, build Landlock       scrub the environment         RLIMIT_CPU per request
    rulesets and seccomp filters              rlimits, hard = soft          nested Landlock domain
                                              child subreaper               (the profile's files only)
                                              drop to the slot's uid        stacked seccomp filter
                                              parent-death signal
                                              no_new_privs, Landlock, seccomp

Everything here is enforced by the kernel or by a parent, never by code the
script could undo: rlimits cannot be raised past the hard limit by a non-root
uid, Landlock and seccomp cannot be lifted, cgroups and uids belong to root.
A profile the kernel cannot enforce raises SandboxUnavailable naming the
missing feature, and the node does not start.
"""
from __future__ import annotations

import ctypes
import importlib
import math
import os
import posix
import resource
import signal
import urllib.parse
from dataclasses import dataclass

from srw.config import ConfigError, NodeSettings

from . import landlock
from .cgroups import SlotCgroups
from .profile import Profile

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
MB = 1024 * 1024
UIDS_PER_NODE = 1000
LANDLOCK_ABI_NEEDED = 6  # TCP port rules (4) and signal scoping (6)
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

# What scripts may import: imported in the pool parent, so a worker that has
# dropped to a uid that cannot read the interpreter's directory still has them.
SCRIPT_IMPORTS = (
    "array", "base64", "binascii", "bisect", "calendar", "collections", "contextlib", "copy",
    "csv", "ctypes", "dataclasses", "datetime", "decimal", "enum", "errno", "fractions",
    "functools", "gzip", "hashlib", "heapq", "hmac", "html", "io", "itertools", "json",
    "math", "mmap", "operator", "os", "pickle", "pprint", "random", "re", "resource",
    "secrets", "select", "signal", "socket", "statistics", "string", "struct", "sys",
    "textwrap", "threading", "time", "traceback", "typing", "unicodedata", "urllib.parse",
    "uuid", "zlib", "encodings.idna", "encodings.ascii", "encodings.latin_1",
    "encodings.utf_16", "encodings.utf_32", "encodings.cp1252", "encodings.punycode",
)

_libc = ctypes.CDLL(None, use_errno=True)


class SandboxUnavailable(ConfigError):
    """The profile asks for a restriction this kernel or machine cannot enforce."""


@dataclass(frozen=True)
class Features:
    root: bool
    landlock_abi: int
    seccomp: bool
    cgroups: bool


def probe() -> Features:
    from . import cgroups
    return Features(root=os.geteuid() == 0, landlock_abi=landlock.abi(),
                    seccomp=_seccomp_available(), cgroups=cgroups.available())


def _seccomp_available() -> bool:
    try:
        from . import seccomp
    except (ImportError, OSError):
        return False
    return seccomp.available()


def check(profile: Profile, features: Features) -> None:
    """Raise SandboxUnavailable naming the first missing feature the profile needs."""
    where = f"sandbox profile {profile.name!r}"
    if profile.seccomp and not features.seccomp:
        raise SandboxUnavailable(
            f"{where} needs seccomp filters (libseccomp2 and pyseccomp; `make system-deps`), "
            "which this machine does not have")
    if profile.uses_landlock and features.landlock_abi < LANDLOCK_ABI_NEEDED:
        what = "file allow-lists" if profile.files_restricted else f"network = {profile.network!r}"
        raise SandboxUnavailable(
            f"{where} needs Landlock ABI {LANDLOCK_ABI_NEEDED} for {what} (TCP port rules, "
            f"signal scoping); this kernel has "
            f"{'ABI %d' % features.landlock_abi if features.landlock_abi else 'no Landlock'}")


def tcp_ports(node: NodeSettings) -> tuple[int, ...]:
    """The node's own TCP endpoints (storage and broker): all `network = "local"` allows."""
    ports = []
    for endpoint in (node.storage, node.broker):
        if endpoint.startswith("tcp://"):
            port = urllib.parse.urlsplit(endpoint).port
            if port:
                ports.append(port)
    return tuple(ports)


class Sandbox:
    """Built once per pool in the parent; entered by each worker (and request child)."""

    def __init__(self, profile: Profile, node: NodeSettings, node_index: int, slots: int,
                 history_dir: str, features: Features | None = None):
        self.profile = profile
        self.features = features or probe()
        check(profile, self.features)
        preload(SCRIPT_IMPORTS + profile.imports)
        self.uid_base = profile.user + UIDS_PER_NODE * node_index if profile.user else 0
        self.drop = self.features.root and self.uid_base > 0
        self.cgroups = SlotCgroups(node.name, slots, 2 * profile.memory_mb * MB,
                                   profile.processes)
        self.worker_ruleset = self.child_ruleset = -1
        self.worker_seccomp = self.child_seccomp = None
        fork = profile.isolation == "fork"
        if profile.uses_landlock:
            abi = self.features.landlock_abi
            ports = None if profile.network == "any" else \
                tcp_ports(node) if profile.network == "local" else ()
            files = profile.files_restricted
            self.worker_ruleset = landlock.ruleset(
                abi, profile.readable + (history_dir,), profile.writable, files, ports)
            if fork:  # the script's own domain, nested: without the history dir
                self.child_ruleset = landlock.ruleset(
                    abi, profile.readable, profile.writable, files, ports)
        if profile.seccomp:
            from . import seccomp
            self.worker_seccomp = seccomp.worker_filter(profile.network, may_setpgid=fork)
            if fork:
                self.child_seccomp = seccomp.child_filter(profile.network)

    @property
    def group(self) -> int:
        """The node's workers' group: it may connect to the workers socket, nothing more."""
        return self.uid_base

    def uid(self, slot: int) -> int:
        return self.uid_base + slot

    # In the worker -----------------------------------------------------------

    def enter_worker(self, slot: int) -> None:
        """Close the sandbox around this worker; call it before any socket is opened."""
        p = self.profile
        self.cgroups.join(slot)
        scrub_environment()
        limits = {resource.RLIMIT_AS: p.memory_mb * MB, resource.RLIMIT_NOFILE: p.open_files,
                  resource.RLIMIT_FSIZE: p.file_size_mb * MB, resource.RLIMIT_CORE: 0}
        if self.drop:  # RLIMIT_NPROC binds only non-root uids and counts per uid
            limits[resource.RLIMIT_NPROC] = p.processes
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))
        _prctl(PR_SET_CHILD_SUBREAPER, 1)  # orphans a script leaves come back to us
        if self.drop:
            uid = self.uid(slot)
            os.setgroups([self.group])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        die_with_parent()  # after the uid change, which clears it
        if p.seccomp or p.uses_landlock:
            _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if self.worker_ruleset >= 0:
            landlock.restrict(self.worker_ruleset)
            os.close(self.worker_ruleset)
        if self.worker_seccomp is not None:
            self.worker_seccomp.load()

    def enter_child(self) -> None:
        """In a fork-isolation request child: the script's own, tighter sandbox."""
        die_with_parent()
        cpu = math.ceil(self.profile.cpu_seconds)
        # SIGXCPU at the soft limit; SIGKILL a second later if the script ignores it.
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        os.setpgid(0, 0)  # its own group: the worker kills what it started afterwards
        if self.child_ruleset >= 0:
            landlock.restrict(self.child_ruleset)
            os.close(self.child_ruleset)
        if self.child_seccomp is not None:
            self.child_seccomp.load()


def preload(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"sandbox profile imports {name!r}, which cannot be "
                              f"imported: {exc}") from None


def scrub_environment() -> None:
    """Leave scripts an environment with nothing of the srw process in it.

    The C environment strings are zeroed before they are dropped, and both of
    Python's copies (os.environ and posix.environ) are emptied.
    """
    environ = ctypes.POINTER(ctypes.c_void_p).in_dll(_libc, "environ")
    i = 0
    while environ and environ[i]:
        ctypes.memset(environ[i], 0, len(ctypes.string_at(environ[i])))
        i += 1
    _libc.clearenv()
    posix.environ.clear()
    os.environ._data.clear()  # os.environb shares this dict
    for key, value in CLEAN_ENV.items():
        os.environ[key] = value


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Have the kernel send `sig` to this process when its parent dies."""
    parent = os.getppid()
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:  # the parent died before the call took effect
        os._exit(1)


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, value, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}) failed: {os.strerror(err)}")
