"""Who may do what in a Redis Cluster srw sits beside (``engine = "redis-cluster"``).

Scripts reach Redis (``n.redis``, and raw sockets to the admitted Redis
ports), so Redis's own ACL is the limit, not anything in srw's code:

    default   the operator's: every command (CONFIG, CLUSTER RESET, SHUTDOWN,
              MIGRATE, replication).  Its password is ``redis-admin.secret``,
              which no srw process reads; redis-cli takes it from
              REDISCLI_AUTH, replicas from ``masterauth``.
    srw       every srw process (router, Session, proxy, scripts push) and
              every script: all key and channel commands, none of @admin,
              @dangerous (FLUSHALL, KEYS, MIGRATE, INFO, CLIENT KILL, ...) or
              @scripting (a Lua loop would stop the whole shard).  Its
              password is ``[security] redis_secret``; the pool parent reads
              it before the fork, so scripts can read it from memory: it gives
              them nothing they do not already have.

``write_secrets`` makes both passwords and ``redis.conf``, the file each
redis-server is started with (``redis-server keys/redis.conf --port ...``):
``requirepass`` and ``masterauth`` for the default user, and the srw user
with the SHA-256 of its password.  All three are mode 0600.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from core.config import Config, ConfigError, plain_name

SECRET = "redis.secret"            # the srw user's password
ADMIN_SECRET = "redis-admin.secret"  # the default user's: the operator's, never srw's
CONF = "redis.conf"                # what each redis-server is started with
RIGHTS = "~* &* +@all -@admin -@dangerous -@scripting"
MIN_PASSWORD = 32


def write_secrets(folder: str | Path, user: str = "srw") -> list[Path]:
    """The two passwords and redis.conf in `folder`; refuses to overwrite any."""
    if not plain_name(user):
        raise ValueError(f"Redis user {user!r}: letters, digits, - and _ only")
    folder = Path(folder)
    paths = [folder / SECRET, folder / ADMIN_SECRET, folder / CONF]
    for path in paths:
        if path.exists():
            raise OSError(f"{path} exists; remove {', '.join(p.name for p in paths)} "
                          "first to make new Redis passwords")
    folder.mkdir(parents=True, exist_ok=True)
    password, admin = os.urandom(32).hex(), os.urandom(32).hex()
    digest = hashlib.sha256(password.encode()).hexdigest()
    _write(paths[0], password + "\n")
    _write(paths[1], admin + "\n")
    _write(paths[2], "# Written by `srw keys redis`.  Start every Redis node of the cluster with\n"
                     "# it first: redis-server redis.conf --port 7000 ...  (core/redis_auth.py)\n"
                     "# Scripts may write any key: give each node a maxmemory (with\n"
                     "# maxmemory-policy noeviction), or a script can fill its memory.\n"
                     f"requirepass {admin}\nmasterauth {admin}\n"
                     f"user {user} on #{digest} {RIGHTS}\n")
    return paths


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def credentials(config: Config) -> tuple[str, str]:
    """(user, password) srw logs in to Redis with; ConfigError saying what to do
    when the secret is missing or short."""
    path = config.security.redis_secret
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(f"no Redis password at {path} ({exc.strerror}): run `srw keys redis` "
                          "(it writes keys/redis.secret and keys/redis.conf, which every Redis "
                          "node starts with), or point [security] redis_secret at the file "
                          "(README \"Redis Cluster\")") from None
    if len(password) < MIN_PASSWORD:
        raise ConfigError(f"{path}: a Redis password needs at least {MIN_PASSWORD} characters")
    return config.security.redis_user, password


def admin_password(folder: str | Path) -> str:
    """The default user's password, for the operator's tools (redis-cli, tests)."""
    return (Path(folder) / ADMIN_SECRET).read_text().strip()
