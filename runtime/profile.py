"""Sandbox profiles: ``sandbox_profiles/NAME.toml``.

A profile name is looked up in ``sandbox_profiles/`` beside the config file,
then in the one shipped with srw.  Every key is validated; an unknown key is
an error, so a profile never asks for a restriction that is silently not
enforced.
"""
from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from srw.config import ConfigError

SHIPPED = Path(__file__).resolve().parent.parent / "sandbox_profiles"


@dataclass(frozen=True)
class Profile:
    name: str
    isolation: str = "copy"
    wall_seconds: float = 30.0
    cpu_seconds: float = 10.0
    memory_mb: int = 1024
    output_bytes: int = 64 * 1024 * 1024
    open_files: int = 256
    file_size_mb: int = 64


_POSITIVE = ("wall_seconds", "cpu_seconds", "memory_mb", "output_bytes", "open_files",
             "file_size_mb")


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
    fields = {f.name: f for f in dataclasses.fields(Profile)} 
    values = {}
    for key, value in raw.items():
        field = fields.get(key)
        if field is None or key == "name":
            raise ConfigError(f"{path}: unknown key {key!r} (known: "
                              f"{', '.join(k for k in fields if k != 'name')})")
        default = field.default
        if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not type(default):
            raise ConfigError(f"{path}: {key} must be {type(default).__name__}, not {value!r}")
        if key in _POSITIVE and not value > 0:
            raise ConfigError(f"{path}: {key} must be > 0")
        values[key] = value
    profile = Profile(name=name, **values)
    if profile.isolation != "copy":
        raise ConfigError(f"{path}: isolation {profile.isolation!r} is not supported yet "
                          "(only 'copy')")
    return profile
