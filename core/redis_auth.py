"""Who may do what in a Redis Cluster srw sits beside (``engine = "redis-cluster"``).

Scripts reach Redis (``n.redis``, and raw sockets to the admitted Redis
ports), so Redis's own ACL is the limit, not anything in srw's code:

    default   the operator's: every command (CONFIG, CLUSTER RESET, SHUTDOWN,
              MIGRATE, replication).  Its password is ``redis-admin.secret``,
              which no srw process reads; redis-cli takes it from
              REDISCLI_AUTH, replicas from ``masterauth``.
    srw       every trusted srw process (router, Session, proxy, scripts
              push): all key and channel commands, none of @admin,
              @dangerous (FLUSHALL, KEYS, MIGRATE, INFO, CLIENT KILL, ...) or
              @scripting (a Lua loop would stop the whole shard).  Its
              password is ``[security] redis_secret``, which no runner holds.
    srw-write scripts whose caller may write: what srw may.
    srw-read  scripts whose caller may read only: what srw may but @write.
              Their passwords are derived from srw's (HMAC-SHA256 with the
              user's name); a worker reads srw's after it forked its zygote
              and hands a runner the login its tenant's rights call for
              (script_login).  A runner keeps it for its later requests: the
              weaker promise of redis-cluster mode (README "Sandbox").

``write_secrets`` makes both passwords and ``redis.conf``, the file each
redis-server is started with (``redis-server keys/redis.conf --port ...``):
``requirepass`` and ``masterauth`` for the default user, and the srw user
with the SHA-256 of its password.  All three are mode 0600.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from core.config import Config, ConfigError, plain_name
from core.exits import UsageError
from core.secrets import read_secret, write_secret

SECRET = "redis.secret"            # the srw user's password
ADMIN_SECRET = "redis-admin.secret"  # the default user's: the operator's, never srw's
CONF = "redis.conf"                # what each redis-server is started with
RIGHTS = "~* &* +@all -@admin -@dangerous -@scripting"
# The scripts' users: suffix of redis_user -> its rules.
SCRIPT_USERS = {"write": RIGHTS, "read": RIGHTS + " -@write"}


def write_secrets(folder: str | Path, user: str = "srw") -> list[Path]:
    """The two passwords and redis.conf in `folder`; refuses to overwrite any."""
    if not plain_name(user):
        raise UsageError(f"Redis user {user!r}: letters, digits, - and _ only")
    folder = Path(folder)
    paths = [folder / SECRET, folder / ADMIN_SECRET, folder / CONF]
    for path in paths:
        if path.exists():
            raise OSError(f"{path} exists; remove {', '.join(p.name for p in paths)} "
                          "first to make new Redis passwords")
    password, admin = os.urandom(32).hex(), os.urandom(32).hex()
    write_secret(paths[0], password + "\n")
    write_secret(paths[1], admin + "\n")
    write_secret(paths[2], _redis_conf(user, password, admin))
    return paths


def _redis_conf(user: str, password: str, admin: str) -> str:
    digest = hashlib.sha256(password.encode()).hexdigest()  # redis.conf holds no srw password
    scripts = "".join(
        f"user {user}-{kind} on "
        f"#{hashlib.sha256(script_password(password, f'{user}-{kind}').encode()).hexdigest()} "
        f"{rules}\n" for kind, rules in SCRIPT_USERS.items())
    return ("# Written by `srw keys redis`.  Start every Redis node of the cluster with\n"
            "# it first: redis-server redis.conf --port 7000 ...  (core/redis_auth.py)\n"
            "# Scripts may write any key: give each node a maxmemory (with\n"
            "# maxmemory-policy noeviction), or a script can fill its memory.\n"
            "# A shard whose master is down (and not yet failed over) stops only its own\n"
            "# slots: the healthy shards keep serving.  The trade-off: while a shard has\n"
            "# no master, its keys are unavailable (as with yes) and a client sees a\n"
            "# cluster that holds only part of the keys (Redis's default, yes, stops\n"
            "# every shard until the slots are covered again).\n"
            "cluster-require-full-coverage no\n"
            f"requirepass {admin}\nmasterauth {admin}\n"
            f"user {user} on #{digest} {RIGHTS}\n" + scripts)


def script_password(password: str, name: str) -> str:
    """A scripts user's password: derived from srw's, so no more files to keep."""
    return hmac.new(password.encode(), name.encode(), hashlib.sha256).hexdigest()


def script_login(credentials: tuple[str, str], rights) -> tuple[str, str] | None:
    """(user, password) for scripts run with `rights`, None when they may neither
    read nor write.  `write` alone gets srw-write, which can read too: Redis's
    categories do not split the two cleanly."""
    user, password = credentials
    kind = "write" if "write" in rights else "read" if "read" in rights else None
    if kind is None:
        return None
    return f"{user}-{kind}", script_password(password, f"{user}-{kind}")


def is_script_login(credentials: tuple[str, str], login: tuple[str, str]) -> bool:
    """Whether `login` is one script_login hands out (so its request's caller had
    read or write): what a trusted process that sees a script's login checks."""
    for right in ("read", "write"):
        user, password = script_login(credentials, (right,))
        if login[0] == user and hmac.compare_digest(login[1].encode(), password.encode()):
            return True
    return False


def read_proof(credentials: tuple[str, str], login_user: str) -> str:
    """What a script's grant carries beside its login when its caller may read.
    srw-write is handed to callers with `write` alone too (Redis cannot split the
    two), so the search front-end, which Redis's ACL does not guard, asks for
    this: a MAC with srw's password, which no runner holds."""
    return hmac.new(credentials[1].encode(), b"may read\0" + login_user.encode(),
                    hashlib.sha256).hexdigest()


def may_read(credentials: tuple[str, str], login: tuple[str, str], proof: str) -> bool:
    """Whether `login` is one script_login hands out and `proof` says its caller may read."""
    return is_script_login(credentials, login) and hmac.compare_digest(
        proof.encode(), read_proof(credentials, login[0]).encode())


def credentials(config: Config) -> tuple[str, str]:
    """(user, password) srw logs in to Redis with; ConfigError saying what to do
    when the secret is missing or short."""
    password = read_secret(
        config.security.redis_secret, "Redis password", "run `srw keys redis` (it writes "
        "keys/redis.secret and keys/redis.conf, which every Redis node starts with), or point "
        "[security] redis_secret at the file (README \"Redis Cluster\")", ConfigError)
    return config.security.redis_user, password


def admin_password(folder: str | Path) -> str:
    """The default user's password, for the operator's tools (redis-cli, tests)."""
    return read_secret(Path(folder) / ADMIN_SECRET, "Redis admin password", "", OSError)
