"""The redis-cluster engine: the data is in a Redis Cluster that srw nodes sit beside.

    data call ──► key ──► RedisStore (storage/redis_store.py): redis-py's cluster
                          client, at most once, bounded reads of hostile values
    exec ──► SlotRouter (storage/router.py): the srw node beside the key's master
    search ──► every node's search front-end (storage/search_node.py: the index
               of the slots its Redis node serves) ──► hits merged (storage/hits.py)

One group, 1: Redis replicates each shard itself, so a write or remove returns
one Result, named for the srw node beside the key's master.  Data is found by
key, never by id.  srw keeps no data of its own here: a node's storage role,
when it has a storage address, is its search front-end.

Made for a script's handle (`script_node`), the engine logs in as the Redis user
the running request's rights call for (core/capability.py, core/redis_auth.py),
starts from the node's own Redis, builds no router (the srw password is no
script's), and lets a node down raise ClusterUnavailable: the exec is then
answered ``unavailable``.
"""
from __future__ import annotations

from typing import Callable

from core import capability as capabilities
from core import config as cfg
from core import protocol as p
from core import redis_auth, security
from core.exits import UsageError
from broker.client import Result

from . import protocol as sp
from .analyzer import UnknownLanguage, language_name
from .engine import UNREADABLE, Engine, Place
from .errors import NotFound, StorageError, StorageUnavailable
from .hits import Hits, merge_hits, search_data, send_all
from .node_client import DATA_TIMEOUT, StorageClient, storage_ready
from .redis_index import SLOTS
from .redis_store import RedisStore
from .router import SlotRouter

__all__ = ["RedisEngine"]


class RedisEngine(Engine):
    roles = ("broker", "pool")

    def __init__(self, config: cfg.Config, timeout: float | None = None,
                 max_message: int | None = None,
                 curve: security.Credentials | None = None,
                 capability: Callable[[], bytes] | None = None,
                 script_node: str | None = None):
        self.config, self.node = config, script_node
        self.max_message, self.curve, self.capability = max_message, curve, capability
        self._fronts: dict[str, StorageClient] = {}
        if script_node is None:
            self._router: SlotRouter | None = SlotRouter(config)
            self.store = RedisStore(self._router.ask, self._router.auth, timeout,
                                    max_value=config.largest_payload)
        else:  # no password here: each request hands its runner its login
            self._router = None
            own = [config.node(script_node).redis] if script_node else []
            self.store = RedisStore(own + list(config.cluster.seeds), capabilities.redis_login,
                                    timeout, direct=own[0] if own else None)

    @classmethod
    def roles_of(cls, node: cfg.NodeSettings) -> tuple[str, ...]:
        """The search front-end first, where the node has a storage address."""
        return ("storage", *cls.roles) if node.storage else cls.roles

    @classmethod
    def storage_node(cls) -> type:
        from .search_node import SearchNode  # its process only: FTS5, the indexer
        return SearchNode

    @classmethod
    def make_router(cls, config: cfg.Config) -> SlotRouter:
        return SlotRouter(config)

    @property
    def router(self) -> SlotRouter:
        if self._router is None:
            raise StorageError("a script's handle places no execs")
        return self._router

    # Data ------------------------------------------------------------------------

    def write(self, key, data: bytes, id, groups, index: bool = False,
              lang: str | None = None) -> list[Result]:
        if not index:
            return [self._call("write", key, id, groups, bytes(data))]
        try:
            lang = language_name(lang, self.config.search.languages)
        except UnknownLanguage as exc:
            raise UsageError(str(exc)) from None
        limit = min(n.max_index_bytes for n in self.config.nodes)
        if len(data) > limit:
            node, redis = self._beside(self._key(key, id, groups))
            return [Result(node, 1, p.OUTPUT_TOO_LARGE, b"", f"an indexed value of "
                           f"{len(data)} bytes is above {limit} (node.max_index_bytes); "
                           "nothing was stored", redis)]
        # Answered once indexed, as in lmdb mode, where a node beside the master indexes.
        name = self._beside(self._key(key, id, groups))[0]
        wait = self.store.timeout if any(n.name == name and n.storage
                                         for n in self.config.nodes) else 0.0
        return [self._call("write_indexed", key, id, groups, bytes(data), lang or "", wait)]

    def remove(self, key, id, groups) -> list[Result]:
        return [self._call("remove", key, id, groups)]

    def read(self, key, id, groups) -> bytes:
        return self.store.read(self._key(key, id, groups))

    def read_range(self, key, id, groups, offset: int, length: int) -> bytes:
        sp.range_data(offset, length)   # the same bounds as lmdb's (ValueError)
        return self.store.read_range(self._key(key, id, groups), offset, length)

    def lookup(self, key, id, groups) -> dict:
        """{"size", "node", "group", "redis"}: Redis keeps no mtime ({"size"} for a
        script, which knows no slot map)."""
        size = self.store.size(self._key(key, id, groups))
        if self._router is None:
            return {"size": size}
        node, redis = self._beside(key)
        return {"size": size, "node": node, "group": 1, "redis": redis}

    def stat(self) -> list[dict]:
        return [{"name": n.name, "group": n.group, "redis": n.redis,
                 "error": "no srw store: the data is in Redis (INFO keyspace there)"}
                for n in self.config.nodes]

    def search(self, query: str, limit: int, offset: int, groups, timeout, lang,
               raw) -> Hits:
        """Every search front-end at once; partial unless they covered every slot."""
        SlotRouter.check_groups(groups)
        data = search_data(query, limit, offset, timeout, lang, raw)
        nodes = [n for n in self.config.nodes if n.storage]
        if not nodes:
            raise StorageError("no node has a storage address: in redis-cluster mode a "
                               "node's storage address is its search front-end")
        wait = (timeout or self.config.search.timeout) + DATA_TIMEOUT
        results = send_all([(n, self._front(n)) for n in nodes], sp.SEARCH, b"", data, wait)
        return merge_hits(results, limit, offset, slots=SLOTS)

    def _front(self, node: cfg.NodeSettings) -> StorageClient:
        client = self._fronts.get(node.name)
        if client is None:
            client = self._fronts[node.name] = StorageClient(
                node.storage, node.name, node.group, max_message=self.max_message,
                curve=self.curve, capability=self.capability)
        return client

    def use_groups(self, asked: list[int] | None, groups: set[int]) -> list[int] | None:
        return None  # a script's groups are ignored: Redis replicates each shard itself

    @property
    def client(self):
        return self.store.client

    def _key(self, key, id, groups) -> str | bytes:
        SlotRouter.check_groups(groups)
        if id is not None or key is None:
            raise UsageError('give the key: with cluster.engine = "redis-cluster" data is '
                             "found by key, not by id")
        return key

    def _beside(self, key) -> tuple[str, str]:
        """(srw node beside the key's master, that master); a script's: its own node."""
        if self._router is None:
            return self.node or "", ""
        route = self._router.route(key=key)
        return (route.nodes[0].name if route.nodes else ""), route.redis

    def _call(self, method: str, key, id, groups, *args) -> Result:
        """write or remove; one Result, named for the srw node beside the key's master."""
        key = self._key(key, id, groups)
        node, redis = self._beside(key)
        try:
            found = getattr(self.store, method)(key, *args)
        except StorageUnavailable as exc:
            if self._router is None:
                raise  # a script's: its exec is answered unavailable
            self._router.stale()
            return Result(node, 1, p.UNAVAILABLE, b"", str(exc), redis)
        if found is False:
            return Result(node, 1, p.NOT_FOUND, b"", f"key {key!r} not found", redis)
        # An indexed write's data says why it is not indexed yet (as lmdb's does).
        return Result(node, 1, p.OK, found if isinstance(found, bytes) else b"", None, redis)

    # The nodes -------------------------------------------------------------------

    @classmethod
    def check_config(cls, config: cfg.Config) -> None:
        redis_auth.credentials(config)  # ConfigError: no password, and what to do

    @classmethod
    def ready(cls, node: cfg.NodeSettings, curve, start: str) -> bool:
        """Its search front-end answers (none: nothing of ours to ask)."""
        return not node.storage or storage_ready(node.storage, curve=curve, start=start)

    @classmethod
    def places(cls, config: cfg.Config, nodes, curve, timeout: float,
               max_value: int) -> list[Place]:
        """One key in the cluster, whichever nodes ask."""
        return [KeyPlace(config, timeout, max_value)]

    def close(self) -> None:
        self.store.close()
        for client in self._fronts.values():
            client.close()
        self._fronts.clear()


class _Changed(Exception):
    """Raised inside a watched write: the key holds another value than expected."""

    def __init__(self, outcome: str):
        super().__init__(outcome)
        self.outcome = outcome


class KeyPlace(Place):
    """One key of the cluster, reached as srw's own Redis user; compare-and-set
    by WATCH/MULTI/EXEC on the key's master (the srw user may run no Lua)."""
    name = "redis"

    def __init__(self, config: cfg.Config, timeout: float, max_value: int):
        own = [n.redis for n in config.nodes if n.redis]
        self.store = RedisStore(list(config.cluster.seeds) + own,
                                redis_auth.credentials(config), timeout, max_value=max_value)

    def read(self, key: str, max_bytes: int | None = None) -> bytes:
        return self.store.read(key, max_bytes)

    def write(self, key: str, value: bytes) -> None:
        self.store.write(key, value)

    def write_if(self, key: str, value: bytes, expected) -> str:
        def make() -> bytes:  # run while the key is watched
            held = self._held(key)
            if held != expected:
                raise _Changed("ok" if held == value else "busy")
            return value

        try:
            return "ok" if self.store.write_watched(key, make) else "busy"
        except _Changed as changed:
            return changed.outcome

    def _held(self, key: str):
        try:
            return self.store.read(key)
        except NotFound:
            return None
        except StorageUnavailable:
            raise
        except StorageError:  # a script stored a list there, or too much
            return UNREADABLE

    def close(self) -> None:
        self.store.close()
