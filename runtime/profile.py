"""Sandbox profiles: ``sandbox_profiles/NAME.toml``.

A profile name is looked up in ``sandbox_profiles/`` beside the config file,
then in the one shipped with srw.  Every key is validated; an unknown key is
an error naming it, so a profile never asks for a restriction that is
silently not enforced.  What each key does, and who enforces it, is in
README.md ("Sandbox"); sandbox.py applies them.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from core.config import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "sandbox_profiles"

ISOLATIONS = ("none", "copy", "fork")
NETWORKS = ("none", "local", "any")


@dataclass(frozen=True)
class Profile:
    name: str
    isolation: str = "copy"         # none: in the worker; copy: a runner per tenant; fork: fresh ones
    wall_seconds: float = 30.0      # the worker SIGKILLs the runner past it (none: the pool, the worker)
    cpu_seconds: float = 10.0       # the worker reads the runner's cgroup (copy), RLIMIT_CPU (fork)
    memory_mb: int = 1024           # RLIMIT_AS per process; a runner's cgroup gets twice it
    output_bytes: int = 64 * 1024 * 1024
    open_files: int = 256           # RLIMIT_NOFILE
    processes: int = 32             # RLIMIT_NPROC (per runner uid) and cgroup pids.max; threads count
    file_size_mb: int = 64          # RLIMIT_FSIZE
    network: str = "none"           # none | local (own broker, every node's storage port) | any
    readable: tuple[str, ...] = ()  # paths the script may read (Landlock); "/" = everything
    writable: tuple[str, ...] = ()  # paths the script may write (Landlock); "/" = everything
    user: int = 0                   # when root: runner uids come from a block at or above it
    seccomp: bool = True            # deny exec, ptrace, namespaces, mounts, io_uring, bpf, sockets
    imports: tuple[str, ...] = ()   # modules imported before the sandbox closes (besides ours)

    @property
    def files_restricted(self) -> bool:
        return "/" not in self.readable or "/" not in self.writable

    @property
    def uses_landlock(self) -> bool:
        return self.files_restricted or self.network != "any"


_POSITIVE = ("wall_seconds", "cpu_seconds", "memory_mb", "output_bytes", "open_files",
             "processes", "file_size_mb")
_CHOICES = {"isolation": ISOLATIONS, "network": NETWORKS}
_PATHS = ("readable", "writable")


def find(name: str, config_dir: Path) -> Path:
    if not name.replace("_", "").replace("-", "").isalnum():
        raise ConfigError(f"pool.profile {name!r} must be a plain profile name")
    for folder in (config_dir / "sandbox_profiles", SHIPPED):
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    raise ConfigError(f"no sandbox profile {name!r} in {config_dir / 'sandbox_profiles'} "
                      f"or {SHIPPED}")


def load(name: str, config_dir: Path) -> Profile:
    path = find(name, config_dir)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    values = {key: _check(path, key, value) for key, value in raw.items()}
    for key in _PATHS:  # relative paths are relative to the profile's folder
        values[key] = tuple(str((path.parent / p).resolve()) for p in values.get(key, ()))
    profile = Profile(name=name, **values)
    if profile.isolation == "none" and (profile.seccomp or profile.user or
                                        profile.uses_landlock):
        raise ConfigError(
            f"{path}: isolation = \"none\" runs scripts inside the worker, which talks to "
            "the broker for the whole node: it cannot be sandboxed (seccomp, user, network "
            "and file limits need isolation copy or fork)")
    return profile


def _check(path: Path, key: str, value):
    fields = {f.name: f for f in dataclasses.fields(Profile) if f.name != "name"}
    field = fields.get(key)
    if field is None:
        raise ConfigError(f"{path}: unknown key {key!r} (known: {', '.join(fields)})")
    default = field.default
    if isinstance(default, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{path}: {key} must be a list of non-empty strings")
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not type(default):
        raise ConfigError(f"{path}: {key} must be {type(default).__name__}, not {value!r}")
    if key in _POSITIVE and not value > 0:
        raise ConfigError(f"{path}: {key} must be > 0")
    if key in _CHOICES and value not in _CHOICES[key]:
        raise ConfigError(f"{path}: {key} must be one of {', '.join(_CHOICES[key])}, "
                          f"not {value!r}")
    if key == "user" and not 0 <= value < 2**31 - 100_000:
        raise ConfigError(f"{path}: user must be a uid (0 = keep the uid srw runs as)")
    return value
