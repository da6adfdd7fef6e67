"""config.toml, defined once.

Every component reads its settings from one frozen dataclass below; defaults
live in the fields.  Unknown keys, wrong types and bad values raise
ConfigError naming the file and the key, so a typo never passes silently.
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from .ids import BadId, check_id


class ConfigError(Exception):
    """A config file that cannot be used; the message names file and key."""


@dataclass(frozen=True)
class PoolSettings:
    workers: int = 2
    history_dir: str = "history"
    profile: str = "default"
    max_requests: int = 100_000
    credits: int = 16  # requests queued at a worker; hides the broker round trip
    pin: bool = True   # copy isolation: each worker and its runner on a CPU of their own
    max_workers: int = 0  # the most TTIN / `srw resize` may grow a pool to; 0: 4 x workers
    warm_runners: int = 8     # copy isolation: runners kept warm per worker, one per tenant
    warm_per_caller: int = 4  # ... of which each caller keeps this many whatever the others do

    @property
    def ceiling(self) -> int:
        # A pool's slots share one block of 1000 sandbox uids (runtime/uids.py).
        return self.max_workers or max(self.workers, min(4 * self.workers, 499))

    @property
    def slots(self) -> int:
        """Slots a pool owns: room for a full pool and its replacement during a reload."""
        return 2 * self.ceiling


@dataclass(frozen=True)
class BrokerSettings:
    queue_limit: int = 10_000
    request_timeout: float = 5.0
    heartbeat_interval: float = 0.5
    liveness: int = 4  # missed heartbeats before a peer is presumed gone
    # Bytes: the largest ZeroMQ message (frame) any srw socket accepts; 0 derives
    # it from proxy.max_body and the nodes' max_value (Config.max_message).
    max_message: int = 0


@dataclass(frozen=True)
class ProxySettings:
    listen: str = "127.0.0.1:9000"
    cookies: tuple[str, ...] = ()
    groups: tuple[int, ...] = ()
    max_body: int = 64 * 1024 * 1024
    header_timeout: float = 10.0   # s from accept (or the last response) to a request's headers
    body_timeout: float = 60.0     # s for a request's whole body, once its headers are in
    max_connections: int = 1000    # open client connections; beyond it idle ones make room


ENGINES = ("lmdb", "redis-cluster")
LMDB, REDIS_CLUSTER = ENGINES


@dataclass(frozen=True)
class ClusterSettings:
    """Where the data lives: srw's own LMDB store per node, routed by the Ring
    (storage/ring.py), or a Redis Cluster that srw nodes sit beside, routed by
    its slot map (storage/router.py)."""
    engine: str = LMDB
    seeds: tuple[str, ...] = ()  # redis-cluster: Redis nodes to learn the cluster from

    @property
    def redis(self) -> bool:
        return self.engine == REDIS_CLUSTER


@dataclass(frozen=True)
class NodeSettings:
    name: str
    group: int
    broker: str
    data_dir: str      # the workers' socket; lmdb: also the store (data_dir/store)
    # lmdb: the storage front-end (required); redis-cluster: the search front-end,
    # which indexes the slots of the node's Redis (optional: without it, no search)
    storage: str = ""
    redis: str = ""    # redis-cluster: HOST:PORT of the Redis node this node sits beside
    ids: tuple[str, ...] = ()
    sync: bool = True
    max_value: int = 64 * 1024 * 1024  # bytes; larger writes get output_too_large
    max_index_bytes: int = 1024 * 1024  # bytes; larger indexed writes get output_too_large
    uids: int = 0  # first uid of the node's sandbox uid block; 0 = find a free one
    # Derived at load, never written in a config: in redis-cluster mode the Redis
    # nodes the node's scripts may reach (cluster.seeds and every node's redis).
    # It lives here because the sandbox is built from the node and the node list.
    cluster_redis: tuple[str, ...] = field(default=(), metadata={"derived": True})

    @property
    def workers_endpoint(self) -> str:
        """Where the pool's workers meet the broker: a socket file in data_dir, or
        in /tmp under a hash of it when that path is too long for a unix socket.
        Started as root, workers drop to unprivileged uids that may not reach
        data_dir (nor should they read it), so the socket lives in /run instead
        (root's, open to all for traversal); the pool lets the workers' group in."""
        path = str(Path(self.data_dir) / "workers.ipc")
        digest = hashlib.sha1(path.encode()).hexdigest()[:20]
        if os.geteuid() == 0 and os.path.isdir("/run"):
            path = f"/run/srw-{digest}.ipc"
        elif len(path) > 100:
            path = f"/tmp/srw-{digest}.ipc"
        return f"ipc://{path}"


@dataclass(frozen=True)
class DefinerSettings:
    """A definer script: run with these rights instead of its caller's while its
    bytes are the ones named (a push of new content drops the grant until the
    operator renews `sha256`).  README "Sandbox", core/capability.py."""
    sha256: str
    rights: tuple[str, ...] = ()


@dataclass(frozen=True)
class SecuritySettings:
    """CurveZMQ on every front socket and rights per client (core/security.py)."""
    curve: bool = False
    server_key: str = "keys/server.key_secret"    # the nodes' key pair
    clients: str = "keys/clients"                 # public certificates of the clients
    scripts_key: str = "keys/scripts.key_secret"  # the storage handle's: read, write
    proxy_key: str = "keys/proxy.key_secret"      # the HTTP proxy's
    proxy_rights: tuple[str, ...] = ("exec", "read", "write")  # never "code"
    key: str = ""  # the key srw's own clients (CLI, Session) use with this config
    # Signs `srw scripts push`'s map: scripts may write the store, so nodes take
    # only a map signed with this secret (srw/pushed.py); `srw keys init` writes it.
    push_secret: str = "keys/push.secret"
    # redis-cluster: the Redis user srw and its scripts log in as, and its password
    # (core/redis_auth.py; `srw keys redis` writes it and the Redis nodes' redis.conf).
    redis_user: str = "srw"
    redis_secret: str = "keys/redis.secret"
    rights: dict[str, tuple[str, ...]] = field(default_factory=dict)  # client -> rights
    # script name -> {sha256, rights}: scripts that act with rights of their own
    definers: dict[str, DefinerSettings] = field(default_factory=dict)


# Snowball stemmers full-text search may use (storage/analyzer.py): name ->
# (the script whose words it stems by default, the short name lang= also takes).
SEARCH_LANGUAGES = {"english": ("latin", "en"), "russian": ("cyrillic", "ru")}


@dataclass(frozen=True)
class SearchSettings:
    """Full-text search (storage/fulltext.py).  Changing `languages` changes
    how documents are indexed: each node rebuilds its index at its next start."""
    # Stemmers in use; a word is stemmed by the first whose script it is written in.
    languages: tuple[str, ...] = ("english", "russian")
    timeout: float = 1.0   # seconds a search may run on a node when the request gives none


@dataclass(frozen=True)
class FsSettings:
    """The tree of directories and files (fs/, `srw fs`, `srw mount`)."""
    # The largest file (st_size) a write or truncate may reach; beyond it, EFBIG.
    # Default 16 TiB, as ext4 with 4 KiB blocks: 2**24 chunks of 1 MiB, so
    # removing even the largest file is a bounded number of store removes.
    max_file: int = 1 << 44


@dataclass(frozen=True)
class ServeSettings:
    """`srw serve` as a service: its pid file and the socket `srw reload|resize|stop` use."""
    pidfile: str = ""               # "" = none
    control: str = "var/srw.ctl"    # unix socket, mode 0600; "" = none (srw/control.py)


@dataclass(frozen=True)
class LogSettings:
    level: str = "info"
    file: str = ""


@dataclass(frozen=True)
class Config:
    path: Path
    pool: PoolSettings = field(default_factory=PoolSettings)
    broker: BrokerSettings = field(default_factory=BrokerSettings)
    proxy: ProxySettings = field(default_factory=ProxySettings)
    nodes: tuple[NodeSettings, ...] = ()
    log: LogSettings = field(default_factory=LogSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    cluster: ClusterSettings = field(default_factory=ClusterSettings)
    search: SearchSettings = field(default_factory=SearchSettings)
    fs: FsSettings = field(default_factory=FsSettings)

    def node(self, name: str) -> NodeSettings:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ConfigError(f"{self.path}: no [[node]] named {name!r} (known: {known})")

    @property
    def largest_payload(self) -> int:
        """The largest legitimate payload: an HTTP body, or a value a node stores."""
        return max([self.proxy.max_body, *(n.max_value for n in self.nodes)])

    @property
    def max_message(self) -> int:
        """The largest ZeroMQ message any srw socket accepts (ZMQ_MAXMSGSIZE, which
        libzmq applies to each frame): [broker] max_message, or by default 1 MiB
        above the largest legitimate payload.  A peer that sends more is
        disconnected by libzmq before the message is read into memory."""
        return self.broker.max_message or self.largest_payload + MIB


MIB = 1024 * 1024
# What a message carries besides its largest payload (a request's data, a value):
# headers, names, cookies.  max_message must leave at least this much room.
MESSAGE_HEADROOM = 64 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
# The environment srw's processes hand their children, all of it:
# Set by `srw serve` for its children: a nonce per start, which the broker's
# status and the storage's stat repeat, so serve knows it hears its own nodes.
START_ENV = "SRW_START"
# Set by `srw serve` for its children: its pid (`srw pool` under serve leaves
# the slow stop to it).
SUPERVISOR_ENV = "SRW_SUPERVISOR_PID"
# Set by `srw serve` for a pool: the fd of a pipe it writes ``size N`` lines to.
CONTROL_FD_ENV = "SRW_CONTROL_FD"
# Set by `srw serve` for a pool it restarts: start at the size the last one had.
RESUME_ENV = "SRW_POOL_RESUME"
# Set by `srw pool` for python.init: the config the node runs with, and the
# node's name (a storage handle made there finds the cluster and asks this
# node's index for n.search).
CONFIG_ENV = "SRW_CONFIG"
NODE_ENV = "SRW_NODE"
SECTIONS = {"pool": PoolSettings, "broker": BrokerSettings, "proxy": ProxySettings,
            "log": LogSettings, "security": SecuritySettings, "serve": ServeSettings,
            "cluster": ClusterSettings, "search": SearchSettings, "fs": FsSettings}
RIGHTS = ("exec", "code", "read", "write")


def load(path: str | Path) -> Config:
    """Read and validate a config file."""
    path = Path(path).resolve()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (pass --config PATH)") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a directory; pass --config PATH/config.toml") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    unknown = set(raw) - set(SECTIONS) - {"node"}
    if unknown:
        raise ConfigError(f"{path}: unknown section or key {sorted(unknown)[0]!r}")
    sections = {name: _build(cls, raw.get(name, {}), name, path)
                for name, cls in SECTIONS.items()}
    nodes_raw = raw.get("node", [])
    if not isinstance(nodes_raw, list) or not nodes_raw:
        raise ConfigError(f"{path}: at least one [[node]] table is needed")
    nodes = tuple(_build(NodeSettings, t, f"node[{i}]", path) for i, t in enumerate(nodes_raw))
    config = Config(path=path, nodes=nodes, **sections)
    _check(config)
    return _resolve_paths(_derive(config))


def _build(cls, table, section: str, path: Path):
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: [{section}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if not f.metadata.get("derived")}
    values = {}
    for key, value in table.items():
        if key not in names:
            raise ConfigError(f"{path}: unknown key {section}.{key} (known: {', '.join(sorted(names))})")
        values[key] = _coerce(value, hints[key], f"{section}.{key}", path)
    try:
        return cls(**values)
    except TypeError:
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.default is dataclasses.MISSING and f.name not in values]
        raise ConfigError(f"{path}: {section} needs key {missing[0]!r}") from None


def _coerce(value, hint, key: str, path: Path):
    if typing.get_origin(hint) is dict:
        key_type, value_type = typing.get_args(hint)
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: {key} must be a table")
        return {_coerce(k, key_type, key, path): _coerce(v, value_type, f"{key}.{k}", path)
                for k, v in value.items()}
    if typing.get_origin(hint) is tuple:
        item_type = typing.get_args(hint)[0]
        if not isinstance(value, list):
            raise ConfigError(f"{path}: {key} must be a list of {item_type.__name__}")
        return tuple(_coerce(v, item_type, key, path) for v in value)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key, path)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{path}: {key} must be {hint.__name__}, not {value!r}")
    return value


def _check(config: Config) -> None:
    """Values that have the right type but make no sense."""
    p = config.path
    rules = [
        (1 <= config.pool.workers < 500, "pool.workers must be from 1 to 499"),
        (config.pool.credits >= 1, "pool.credits must be at least 1"),
        (0 < config.fs.max_file < 1 << 63, "fs.max_file must be from 1 to 2**63-1 bytes"),
        (config.pool.max_workers == 0 or config.pool.workers <= config.pool.max_workers < 500,
         "pool.max_workers must be 0 (4 x workers) or from pool.workers to 499"),
        (config.pool.max_requests >= 0, "pool.max_requests must be 0 (no limit) or more"),
        (1 <= config.pool.warm_runners <= 64, "pool.warm_runners must be from 1 to 64"),
        (1 <= config.pool.warm_per_caller <= config.pool.warm_runners,
         "pool.warm_per_caller must be from 1 to pool.warm_runners"),
        (config.broker.queue_limit >= 1, "broker.queue_limit must be at least 1"),
        (set(config.search.languages) <= set(SEARCH_LANGUAGES),
         f"search.languages: known are {', '.join(SEARCH_LANGUAGES)}"),
        (0 < config.search.timeout <= 600, "search.timeout must be above 0 and at most 600 s"),
        (config.broker.request_timeout > 0, "broker.request_timeout must be > 0 seconds"),
        (config.broker.heartbeat_interval > 0, "broker.heartbeat_interval must be > 0 seconds"),
        (config.broker.liveness >= 2, "broker.liveness must be at least 2"),
        (config.log.level in LOG_LEVELS, f"log.level must be one of {', '.join(LOG_LEVELS)}"),
        (config.proxy.max_body > 0, "proxy.max_body must be > 0 bytes"),
        (config.proxy.header_timeout > 0, "proxy.header_timeout must be > 0 seconds"),
        (config.proxy.body_timeout > 0, "proxy.body_timeout must be > 0 seconds"),
        (config.proxy.max_connections >= 1, "proxy.max_connections must be at least 1"),
        (config.broker.max_message >= 0, "broker.max_message must be 0 (derived) or more bytes"),
    ]
    rules += _cluster_rules(config)  # first: a missing storage address before its form
    security = config.security
    rules.append(("code" not in security.proxy_rights,
                  "security.proxy_rights may not hold \"code\": HTTP clients never send "
                  "script content"))
    rules.append((plain_name(security.redis_user),
                  f"security.redis_user {security.redis_user!r}: letters, digits, - and _ only"))
    for name, definer in security.definers.items():
        rules.append((len(definer.sha256) == 64 and all(c in "0123456789abcdef"
                                                        for c in definer.sha256),
                      f"security.definers.{name}.sha256 must be the script's SHA-256 in "
                      "64 lower-case hex digits (sha256sum history/NAME)"))
    for who, rights in [("proxy_rights", security.proxy_rights),
                        *((f"rights.{name}", r) for name, r in security.rights.items()),
                        *((f"definers.{name}.rights", d.rights)
                          for name, d in security.definers.items())]:
        for right in rights:
            rules.append((right in RIGHTS, f"security.{who}: unknown right {right!r} "
                                           f"(rights: {', '.join(RIGHTS)})"))
    rules.append(_address_rule("proxy.listen", config.proxy.listen, "HOST:PORT"))
    names = [n.name for n in config.nodes]
    twice = _repeated(names)
    rules.append((not twice, f"node name {twice!r} is used twice; node names must be unique"))
    endpoints = [(f"node {n.name}: {key}", getattr(n, key)) for n in config.nodes
                 for key in ("storage", "broker") if getattr(n, key)]
    endpoints.append(("proxy.listen", f"tcp://{config.proxy.listen}"))
    taken = _repeated([e for _, e in endpoints])
    rules.append((not taken, f"{' and '.join(w for w, e in endpoints if e == taken)} "
                             f"use the same address {taken}; give each its own"))
    for node in config.nodes:
        rules.append((node.name.isidentifier(), f"node name {node.name!r} must be a plain word"))
        rules.append((node.group >= 1, f"node {node.name}: group must be >= 1"))
        rules.append((node.max_value >= 1, f"node {node.name}: max_value must be >= 1 byte"))
        rules.append((node.max_index_bytes >= 1,
                      f"node {node.name}: max_index_bytes must be >= 1 byte"))
        rules.append((node.uids == 0 or 1000 <= node.uids < 2**31 - 2000,
                      f"node {node.name}: uids must be 0 (find a free block) or a uid "
                      "from 1000 up"))
        for key in ("storage", "broker"):
            endpoint = getattr(node, key)
            if key == "storage" and not endpoint:  # redis-cluster: optional (lmdb: see above)
                continue
            if endpoint.startswith("tcp://"):
                rules.append(_address_rule(f"node {node.name}: {key}", endpoint[len("tcp://"):],
                                           "tcp://HOST:PORT"))
            rules.append((endpoint.startswith(("tcp://", "ipc://")),
                          f"node {node.name}: {key} must be a tcp:// or ipc:// address"))
        for hex_id in node.ids:
            rules.append((_is_id(hex_id), f"node {node.name}: ids must be 1 to 128 hex digits"))
    explicit = config.broker.max_message
    if explicit:
        need = config.largest_payload + MESSAGE_HEADROOM
        rules.append((explicit >= need,
                      f"broker.max_message ({explicit} bytes) is too small: the largest of "
                      f"proxy.max_body and the nodes' max_value ({config.largest_payload}) plus "
                      f"{MESSAGE_HEADROOM} bytes of headers is {need}; raise it, or leave it "
                      "out to derive it"))
    for ok, message in rules:
        if not ok:
            raise ConfigError(f"{p}: {message}")


def _cluster_rules(config: Config) -> list[tuple[bool, str]]:
    """[cluster] and what each engine needs of a [[node]]."""
    cluster = config.cluster
    if cluster.engine not in ENGINES:
        return [(False, f"cluster.engine is {cluster.engine!r}: it must be "
                        f"{' or '.join(map(repr, ENGINES))}")]
    if not cluster.redis:
        rules = [(not cluster.seeds, 'cluster.seeds is for cluster.engine = "redis-cluster"')]
        for i, node in enumerate(config.nodes):
            rules.append((not node.redis, f'node {node.name}: redis is for cluster.engine = '
                                          '"redis-cluster"; lmdb nodes have a storage address'))
            rules.append((bool(node.storage), f"node[{i}] needs key 'storage'"))
        return rules
    rules = [(bool(cluster.seeds), 'cluster.seeds is empty: cluster.engine = "redis-cluster" '
                                   'needs at least one Redis node, e.g. ["127.0.0.1:7000"]')]
    rules += [_address_rule("cluster.seeds", seed, "HOST:PORT") for seed in cluster.seeds]
    for node in config.nodes:
        rules.append((bool(node.redis), f'node {node.name}: redis is missing: with cluster.'
                                        'engine = "redis-cluster" each [[node]] names the '
                                        'Redis node it sits beside, redis = "HOST:PORT"'))
        if node.redis:
            rules.append(_address_rule(f"node {node.name}: redis", node.redis, "HOST:PORT"))
        # Redis Cluster replicates each shard itself: srw's groups would be a second,
        # unsynchronised replication on top (README "Redis Cluster").
        rules.append((node.group == 1, f"node {node.name}: group must be 1 with "
                                       'cluster.engine = "redis-cluster" (Redis replicates)'))
    return rules


def _derive(config: Config) -> Config:
    """Fill the derived fields (NodeSettings.cluster_redis)."""
    if not config.cluster.redis:
        return config
    reachable = tuple(dict.fromkeys([*config.cluster.seeds, *(n.redis for n in config.nodes)]))
    return dataclasses.replace(config, nodes=tuple(
        dataclasses.replace(n, cluster_redis=reachable) for n in config.nodes))


def _repeated(items: list) -> object | None:
    """The first item that occurs twice, or None."""
    seen = set()
    for item in items:
        if item in seen:
            return item
        seen.add(item)
    return None


def _address_rule(what: str, address: str, form: str) -> tuple[bool, str]:
    """HOST:PORT with a port from 1 to 65535 ("*" for any host is allowed)."""
    host, _, port = address.rpartition(":")
    ok = bool(host) and port.isdigit() and 1 <= int(port) <= 65535
    return ok, f"{what} is {address!r}: it must be {form} with a port from 1 to 65535"


def _is_id(text: str) -> bool:
    try:
        check_id(text)
    except BadId:
        return False
    return True


def plain_name(name: str) -> bool:
    """Letters, digits, - and _ (a Redis user name that goes into redis.conf as is)."""
    return bool(name) and name.isascii() and name.replace("-", "").replace("_", "").isalnum()


def _resolve_paths(config: Config) -> Config:
    base = config.path.parent

    def absolute(p: str) -> str:
        return str((base / p).resolve()) if p else p

    pool = dataclasses.replace(config.pool, history_dir=absolute(config.pool.history_dir))
    log = dataclasses.replace(config.log, file=absolute(config.log.file))
    sec = config.security
    security = dataclasses.replace(sec, **{k: absolute(getattr(sec, k)) for k in (
        "server_key", "clients", "scripts_key", "proxy_key", "key", "push_secret",
        "redis_secret")})
    nodes = tuple(dataclasses.replace(n, data_dir=absolute(n.data_dir)) for n in config.nodes)
    serve = dataclasses.replace(config.serve, pidfile=absolute(config.serve.pidfile),
                                control=absolute(config.serve.control))
    return dataclasses.replace(config, pool=pool, log=log, nodes=nodes, security=security,
                               serve=serve)
