"""The seam between srw and the store its data lives in, chosen once per process.

    Session (CLI, Python API, proxy data calls) --.
    StorageHandle (a script's ``n``) -------------+--> engine_class(config)(config, ...)
    ScriptStore, NodeSync (pushed scripts) -------+        |
    Supervisor (srw serve), proxy's Cluster ------'        |
                                                           +-- "lmdb": LmdbEngine
                                                           |   (storage/engine_lmdb.py)
                                                           '-- "redis-cluster": RedisEngine
                                                               (storage/engine_redis.py)

``[cluster] engine`` names the engine; ``engine_class`` imports its module by
the table ENGINES (so an lmdb process never loads redis-py) and every caller
then talks to the Engine below, with no branch of its own on the engine.

What differs between engines is data, not code paths in the callers:
``roles`` (the processes `srw serve` starts per node), the router
(placement: which nodes answer an exec by key, by id, or with neither,
storage/router.py), one Result per group (lmdb) or one for the cluster
(redis), and ``places``: where a value every node shares (the pushed scripts'
map, srw/pushed.py) is kept: a copy in each node's own store, or one key.

A third engine is a module beside the two with a class that implements this
interface, and one line in ENGINES; core/config.py learns its name and its
settings.
"""
from __future__ import annotations

import abc
import importlib
from typing import Callable

from core import config as cfg
from core import security

__all__ = ["Engine", "Place", "UNREADABLE", "engine_class", "ENGINES"]

ENGINES = {cfg.LMDB: "storage.engine_lmdb:LmdbEngine",
           cfg.REDIS_CLUSTER: "storage.engine_redis:RedisEngine"}


def engine_class(config: cfg.Config) -> type[Engine]:
    """The Engine class of ``[cluster] engine``, its module imported now (a script's
    handle calls this in the pool parent: a sandboxed runner may not read files)."""
    module, _, name = ENGINES[config.cluster.engine].partition(":")
    return getattr(importlib.import_module(module), name)


class _Unreadable:
    def __repr__(self) -> str:
        return "UNREADABLE"


#: What `Place.read` met when a value is there that it may not read (a script
#: stored a list, or more than the reader takes): `write_if` can expect it.
UNREADABLE = _Unreadable()


class Place(abc.ABC):
    """Where one copy of a value every node shares lives: a node's own store
    (lmdb) or the cluster's one key (redis).  ``name`` names it in logs;
    ``node`` is the node whose store it is (None: every node's)."""
    name: str = ""
    node: cfg.NodeSettings | None = None

    @abc.abstractmethod
    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        """The value; raises NotFound, StorageUnavailable (no answer) or
        StorageError (a value is there that this reader may not take)."""

    @abc.abstractmethod
    def write(self, key: str, value: bytes) -> None:
        """Store `value`; raises StorageUnavailable or StorageError."""

    @abc.abstractmethod
    def write_if(self, key: str, value: bytes, expected) -> str:
        """Compare-and-set: store `value` only if the place still holds
        `expected` (bytes as read, None: nothing, or UNREADABLE); "ok" (also when
        it already holds `value`), "busy" when another value came first, or why
        not.  Raises StorageUnavailable."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close what this process opened."""


class Engine(abc.ABC):
    """The store as srw's callers see it.  Data calls take ``key`` (sha512 placed)
    or ``id`` (hex) and ``groups`` (None: every group), as Session documents;
    `script_node`: made for a script's handle on that node (its rights come
    with each request, and a store that is down raises instead of answering
    ``unavailable``)."""

    #: the processes `srw serve` starts for each node, in start order
    roles: tuple[str, ...] = ()

    @classmethod
    def roles_of(cls, node: cfg.NodeSettings) -> tuple[str, ...]:
        """The roles `node` runs: ``roles``, less those its config leaves out."""
        return cls.roles

    @classmethod
    @abc.abstractmethod
    def storage_node(cls) -> type:
        """The class of the storage role's process (``run()``), made with (config, node)."""

    @abc.abstractmethod
    def __init__(self, config: cfg.Config, timeout: float | None = None,
                 max_message: int | None = None,
                 curve: security.Credentials | None = None,
                 capability: Callable[[], bytes] | None = None,
                 script_node: str | None = None):
        """`timeout`: of each data call (None: the engine's default); `max_message`,
        `curve`, `capability`: as Session takes them."""

    # Placement ----------------------------------------------------------------

    @classmethod
    @abc.abstractmethod
    def make_router(cls, config: cfg.Config):
        """Where execs go (storage/router.py): ``route(id, key, groups) -> Route``."""

    @property
    @abc.abstractmethod
    def router(self):
        """The router made by make_router, the one this engine's calls use."""

    # Data -----------------------------------------------------------------------

    @abc.abstractmethod
    def read(self, key, id, groups) -> bytes:
        """The value, from the first group whose owner has it; raises NotFound,
        StorageUnavailable (no owner answered), Forbidden."""

    @abc.abstractmethod
    def read_range(self, key, id, groups, offset: int, length: int) -> bytes:
        """At most `length` bytes of the value from `offset` (fewer where it ends,
        none past its end), from the first group whose owner has it; raises like
        read, and ValueError for a negative or huge range (storage/protocol.py)."""

    @abc.abstractmethod
    def write(self, key, data: bytes, id, groups, index: bool = False,
              lang: str | None = None) -> list:
        """Store in every group: one Result per group (one for a store that
        replicates itself); `index`: also into the full-text index, its words
        stemmed by `lang` (None: each by its script; UsageError: not configured)."""

    @abc.abstractmethod
    def remove(self, key, id, groups) -> list:
        """Remove from every group; ``not_found`` where it was absent."""

    def local_reads(self):
        """What reads values from the stores of this host's nodes in this process
        (storage/local_read.py), or None: this engine has no such thing
        (redis-cluster: the data is in Redis's memory)."""
        return None

    def remove_keys(self, keys: list) -> None:
        """Remove each key from every group, not waiting for one before sending
        the next where the engine can (a truncated file's chunks); what each
        answered is not told."""
        for key in keys:
            self.remove(key, None, None)

    def write_keys(self, items: list) -> list[list]:
        """Store each (key, data) in every group, not waiting for one before
        sending the next where the engine can (a file's changed chunks): each
        key's Results, as write's, in order."""
        return [self.write(key, data, None, None) for key, data in items]

    @abc.abstractmethod
    def lookup(self, key, id, groups) -> dict:
        """{"size", ...} of the key (what else the store knows); raises like read."""

    @abc.abstractmethod
    def stat(self) -> list[dict]:
        """Each node's store, or why there is none to ask."""

    @abc.abstractmethod
    def search(self, query: str, limit: int, offset: int, groups, timeout, lang, raw):
        """Full-text hits (Session.search); StorageError where nodes keep no index."""

    @abc.abstractmethod
    def use_groups(self, asked: list[int] | None, groups: set[int]) -> list[int] | None:
        """The groups a script's handle asked for that the data calls should use."""

    @property
    @abc.abstractmethod
    def client(self):
        """The store's own client for any other command (a script's ``n.redis``)."""

    # The nodes ------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: cfg.Config) -> None:
        """Raises ConfigError for what the engine needs and the node lacks (checked
        once by `srw serve`, before any child starts)."""

    @classmethod
    @abc.abstractmethod
    def ready(cls, node: cfg.NodeSettings, curve, start: str) -> bool:
        """Whether `node`'s storage role (if any) answers, started with `start`."""

    @classmethod
    @abc.abstractmethod
    def places(cls, config: cfg.Config, nodes, curve, timeout: float,
               max_value: int) -> list[Place]:
        """Where `nodes` keep a value every node shares, in the order every
        writer writes them; `max_value`: the most bytes a read takes."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close what this process opened."""
