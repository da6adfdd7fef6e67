"""The sandbox each slot's zygote, then each runner, closes around itself.

    pool parent (root)                  zygote, forked by the worker    runner, forked by the zygote
    ------------------                  ----------------------------    ----------------------------
    Sandbox(profile): check the kernel, enter_zygote(slot):             (moves into its seat's cgroups)
    import what scripts may import,       join the slot's cgroups       enter_runner(slot, seat):
    create slot and seat cgroups,         scrub the environment           drop to the seat's own uid
    build the Landlock ruleset and        rlimits, hard = soft            RLIMIT_NPROC of that uid
    seccomp filters                       keep only CAP_SETUID,           parent-death signal
                                            CAP_SETGID, CAP_KILL          RLIMIT_CPU (fork isolation)
                                          parent-death signal             its own process group
                                          no_new_privs, Landlock,         nested Landlock domain
                                            seccomp                       stacked seccomp filter

The zygote keeps uid 0 with those three capabilities alone, so that each
runner it forks can take a uid of its own (a seat's: a tenant's runner never
shares a uid, or a cgroup, with another's).  It never runs a script, takes
input from its worker alone, and no runner can signal, trace or read it
(Landlock's scoping, another uid).

The worker itself (trusted: it talks to the broker) is never sandboxed and
never runs a script, except in isolation "none" (the trusted profile: limits
only, `enter_worker`).  Everything here is enforced by the kernel or by a
parent, never by code the script could undo: rlimits cannot be raised past
the hard limit by a non-root uid, Landlock and seccomp cannot be lifted,
cgroups and uids belong to root.
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

from core.config import ConfigError, NodeSettings

from . import landlock
from .cgroups import SlotCgroups
from .profile import Profile

PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_CHILD_SUBREAPER = 1, 38, 36
MB = 1024 * 1024
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


def tcp_ports(node: NodeSettings, cluster: tuple[NodeSettings, ...] = ()) -> tuple[int, ...]:
    """What `network = "local"` allows: the node's own storage and broker, and the
    storage of every node of the cluster (a script's store handle writes to every
    group, as a 2011 script did).  In redis-cluster mode: the broker and the Redis
    nodes the config names (cluster.seeds and every node's redis).  Landlock rules
    are by port and fixed when the sandbox closes, so a Redis node the cluster
    gains later on another port is out of reach until it is in the config and the
    pool restarted (README "Redis Cluster")."""
    redis = tuple(f"tcp://{address}" for address in node.cluster_redis)
    ports = []
    for endpoint in (node.storage, node.broker, *(n.storage for n in cluster), *redis):
        if endpoint.startswith("tcp://"):
            port = urllib.parse.urlsplit(endpoint).port
            if port and port not in ports:
                ports.append(port)
    return tuple(ports)


class Sandbox:
    """Built once per pool in the parent; entered by each zygote and runner (copy and
    fork isolation) or by the worker itself (isolation none: limits only)."""

    def __init__(self, profile: Profile, node: NodeSettings, uid_base: int, slots: int,
                 history_dir: str, features: Features | None = None,
                 cluster: tuple[NodeSettings, ...] = (), seats: int = 0):
        """`seats`: runners a slot may have at once (isolation.seats), each with a
        uid and cgroups of its own; 0 in isolation none."""
        self.profile = profile
        self.features = features or probe()
        check(profile, self.features)
        preload(SCRIPT_IMPORTS + profile.imports)
        self.uid_base, self.seats = uid_base, seats
        self.drop = self.features.root and uid_base > 0
        self.cgroups = SlotCgroups(node.name, slots, 2 * profile.memory_mb * MB,
                                   profile.processes, seats if profile.isolation == "copy" else 0)
        self.ruleset = -1
        self.zygote_seccomp = self.runner_seccomp = None
        if profile.isolation == "none":
            return
        abi = self.features.landlock_abi
        # Scoping alone (signals, abstract sockets) is worth having whenever the
        # kernel has it: a runner cannot signal its zygote or another slot's.
        if profile.uses_landlock or abi >= LANDLOCK_ABI_NEEDED:
            ports = None if profile.network == "any" else \
                tcp_ports(node, cluster) if profile.network == "local" else ()
            readable = profile.readable + ((history_dir,) if profile.isolation == "copy" else ())
            self.ruleset = landlock.ruleset(abi, readable, profile.writable,
                                            profile.files_restricted, ports)
        if profile.seccomp:
            from . import seccomp
            self.zygote_seccomp = seccomp.Compiled(seccomp.zygote_filter(profile.network))
            self.runner_seccomp = seccomp.Compiled(seccomp.runner_filter(profile.network))

    def uid(self, slot: int, seat: int) -> int:
        """Seat `seat` of slot `slot` (from 1): the block's first uid is left unused."""
        return self.uid_base + 1 + (slot - 1) * self.seats + seat

    def uids_needed(self, slots: int) -> int:
        return 1 + slots * self.seats

    def inherited_fds(self) -> list[int]:
        """What a zygote keeps, and a runner until it has closed its sandbox."""
        return [self.ruleset] if self.ruleset >= 0 else []

    def _limit(self, nproc: bool) -> None:
        p = self.profile
        limits = {resource.RLIMIT_AS: p.memory_mb * MB, resource.RLIMIT_NOFILE: p.open_files,
                  resource.RLIMIT_FSIZE: p.file_size_mb * MB, resource.RLIMIT_CORE: 0}
        if nproc:  # RLIMIT_NPROC binds only non-root uids and counts per uid
            limits[resource.RLIMIT_NPROC] = p.processes
        for which, value in limits.items():
            resource.setrlimit(which, (value, value))

    # Isolation none: the worker runs scripts itself -------------------------------

    def enter_worker(self, slot: int) -> None:
        """Limits on the worker itself; the profile has nothing else (profile.py)."""
        self.cgroups.join(slot)
        scrub_environment()
        self._limit(nproc=False)
        die_with_parent()

    # Copy and fork isolation -----------------------------------------------------

    def enter_zygote(self, slot: int) -> None:
        """Close the sandbox around a slot's zygote, which its runners inherit."""
        self.cgroups.join(slot)
        scrub_environment()
        self._limit(nproc=False)
        if self.drop:  # what giving each runner a uid of its own takes, and no more
            keep_capabilities(CAP_SETUID, CAP_SETGID, CAP_KILL)
        die_with_parent()
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        if self.ruleset >= 0:
            landlock.restrict(self.ruleset)
        if self.zygote_seccomp is not None:
            self.zygote_seccomp.load()

    def enter_runner(self, reuse: bool, slot: int, seat: int) -> None:
        """In a runner: the seat's uid, its own process group and a Landlock domain
        of its own, nested in the zygote's (so it can signal neither the zygote
        nor another runner)."""
        if self.drop:
            uid = self.uid(slot, seat)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)  # every capability goes with uid 0
            p = self.profile.processes  # counted per uid: this runner and what it starts
            resource.setrlimit(resource.RLIMIT_NPROC, (p, p))
        die_with_parent()  # after the uid change, which clears it
        if not reuse:  # fork isolation: the request's whole CPU budget, from the kernel too
            cpu = math.ceil(self.profile.cpu_seconds)
            # SIGXCPU at the soft limit; SIGKILL a second later if the script ignores it.
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        os.setpgid(0, 0)  # its own group: killing it reaches what a script started
        if self.ruleset >= 0:
            landlock.restrict(self.ruleset)
            os.close(self.ruleset)
        if self.runner_seccomp is not None:
            self.runner_seccomp.load()


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


CAP_KILL, CAP_SETGID, CAP_SETUID = 5, 6, 7
PR_CAPBSET_DROP = 24
CAPABILITY_VERSION_3 = 0x20080522


def keep_capabilities(*keep: int) -> None:
    """Drop every capability but `keep`: from the bounding set (so no exec could
    bring one back) and from the effective and permitted sets (capset(2))."""
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        if cap not in keep:
            _prctl(PR_CAPBSET_DROP, cap)
    mask = sum(1 << cap for cap in keep)  # all below 32
    header = (ctypes.c_uint32 * 2)(CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)(mask, mask, 0, 0, 0, 0)  # effective, permitted, inheritable
    if _libc.capset(header, data) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"capset failed: {os.strerror(err)}")


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
