"""A storage handle for python.init: made before the fork, connected after it.

    # history/python.init
    from storage.handle import StorageHandle
    n = StorageHandle()                       # nothing is opened here

    # a script
    n.write_data("counter", b"1")
    value = n.read_data("counter")

python.init runs in the pool parent, which forks the workers later; ZeroMQ
contexts and sockets must never cross a fork.  So the handle opens nothing
when made: its first call in a process builds a Session there (and its own
ZeroMQ context), and a call in a process other than the one that built the
Session (a forked worker) builds a fresh one.  The parent's Session, if any,
is kept, never closed, in the child: closing it there would act on sockets
that belong to the parent.

Where the cluster is: the remotes given to ``add_remote`` (the first storage
node that answers tells the whole cluster, as in Elliptics), else the config
the node runs with (``SRW_CONFIG``, set by ``srw pool``), else
``./config.toml``, read when the handle is made (in the pool parent).

With ``[cluster] engine = "redis-cluster"`` the handle needs no address at
all: it reaches every key of the Redis Cluster through a redis-py cluster
client (storage/redis_store.py) that starts from the node's own Redis
(``[[node]] redis`` of ``SRW_NODE``) and ``cluster.seeds``, built at the first
call in each process like the Session.  ``add_remote`` and ``add_groups`` are
accepted and ignored there (Redis replicates each shard itself); ``n.redis`` is
the client itself, for any other command, logged in as the Redis user the
request's rights call for (srw-read or srw-write, handed to the runner with
the request: core/redis_auth.py); Redis's ACL refuses them admin, dangerous
and Lua commands, and srw-read every write.  Its one-key commands of the slots
the node's own master serves go straight to that master, as the same user
(storage/redis_store.py, "The own master").

With CurveZMQ on, the handle connects with the node's scripts key
(``[security] scripts_key``, read here in the pool parent).  Every script can
see that key; it is no secret from them, and alone it may do nothing: every
call carries the running request's capability (core/capability.py), which
grants its caller's rights (or a definer script's) until the request is
answered.  A call the capability does not allow raises Forbidden.
"""
from __future__ import annotations

import logging
import os

from core import protocol as p
from core import config as cfg
from core import capability, security

from . import protocol as sp
from .client import Session
from .engine import engine_class
from .errors import (Forbidden, NodeUnavailable, ReplicaWriteFailed, StorageError,
                     StorageUnavailable)
from .node_client import StorageClient, config_from_remote

__all__ = ["StorageHandle", "Forbidden"]


log = logging.getLogger("srw.storage.handle")


class StorageHandle:
    def __init__(self, config: str | None = None, groups: list[int] | None = None,
                 timeout: float | None = None, logger: logging.Logger | None = None):
        self.config = config
        self.groups = list(groups) if groups else None
        self.remotes: list[str] = []
        self.timeout = timeout
        self.log = logger or log
        self._session: Session | None = None
        self._pid = 0
        self._abandoned: list = []   # built before a fork: never used again
        self._node = os.environ.get(cfg.NODE_ENV)
        self._own_store: StorageClient | None = None
        self._own_pid = 0
        self._use_groups: list[int] | None = None
        # Read the config now, in the pool parent: a sandboxed worker may not read
        # the config file (it holds the node's layout, which scripts must not see).
        self._local, self._local_error, self._curve = None, None, None
        try:
            self._local = cfg.load(config or os.environ.get(cfg.CONFIG_ENV) or "config.toml")
            self._curve = security.role_credentials(self._local, "scripts")
        except cfg.ConfigError as exc:  # no config, or curve on and no scripts key
            self._local, self._local_error = None, exc
        # The engine's module is imported now, in the pool parent: a sandboxed
        # runner may not read the modules' files.
        self._engine = engine_class(self._local) if self._local is not None else None
        # With curve, each call carries the running request's capability.
        self._capability = capability.current if self._curve is not None else None

    @property
    def redis(self):
        """The redis-py ``RedisCluster`` of this process (redis-cluster mode only);
        a node down raises storage.redis_store.ClusterUnavailable."""
        return self.session().engine.client

    # Where the cluster is --------------------------------------------------------

    def add_remote(self, endpoint: str) -> None:
        """A storage node (``tcp://host:port``) to learn the cluster from, at first use."""
        self.remotes.append(endpoint)
        self._forget()

    def add_groups(self, groups: list[int]) -> None:
        """Only these groups (default: every group of the cluster)."""
        self.groups = [int(g) for g in groups] or None

    def session(self) -> Session:
        """This process's Session, built on first use."""
        if self._session is None or self._pid != os.getpid():
            self._forget()
            cluster = self._cluster()
            # The node's own limit when its config is known; a remote's is not.
            limit = cluster.max_message if cluster is self._local else None
            session = Session(cluster, timeout=self.timeout, max_message=limit,
                              curve=self._curve, capability=self._capability,
                              script_node=self._node or "")
            self._use_groups = self._existing_groups(session)
            self._session, self._pid = session, os.getpid()
        return self._session

    def _existing_groups(self, session: Session) -> list[int] | None:
        """The asked-for groups the cluster has (the engine's rule); those it
        lacks are logged once."""
        try:
            have = session.engine.use_groups(self.groups, session.ring.groups)
        except StorageError:
            session.close()
            raise
        missing = [g for g in self.groups or () if have is not None and g not in have]
        if missing:
            log.warning("storage handle: groups %s are not in the cluster; using %s",
                        missing, have)
        return have

    def _forget(self) -> None:
        if self._session is not None:
            if self._pid == os.getpid():
                self._session.close()
            else:
                self._abandoned.append(self._session)
            self._session = None

    def _cluster(self):
        """The config: the remotes' when given and the nodes keep a store of srw's
        own (their storage addresses answer ROUTES), else the node's."""
        if not self.remotes or "storage" not in self._engine_roles():
            if self._local is None:
                raise StorageError(f"storage handle: {self._local_error}")
            return self._local
        errors = []
        for endpoint in self.remotes:
            try:
                return config_from_remote(endpoint, self.timeout or 5.0, self._curve,
                                          self._capability)
            except NodeUnavailable as exc:
                errors.append(str(exc))
        raise StorageUnavailable("no remote answered: " + "; ".join(errors))

    def _engine_roles(self) -> tuple[str, ...]:
        return self._engine.roles if self._engine is not None else ("storage",)

    # Data ----------------------------------------------------------------------

    def _groups(self) -> list[int] | None:
        self.session()
        return self._use_groups

    def read_data(self, key: str | bytes, offset: int = 0, size: int = 0) -> bytes:
        """The value (``size`` bytes from ``offset``, 0 = to the end); raises
        storage.client.NotFound or StorageUnavailable.  With a size, only those
        bytes are read (a ranged read)."""
        if size > 0 and 0 <= offset <= sp.MAX_OFFSET:
            data = self.session().read_range(key, offset, min(size, sp.MAX_LENGTH),
                                             groups=self._groups())
            self.log.debug("read %r: %d bytes from %d", key, len(data), offset)
            return data
        data = self.session().read(key, groups=self._groups())
        self.log.debug("read %r: %d bytes", key, len(data))
        if offset or size:
            return data[offset:offset + size] if size else data[offset:]
        return data

    def write_data(self, key: str | bytes, data: bytes | str) -> list:
        """Store in every group; one Result per group, all ok.  A write that any
        group did not store raises: ReplicaWriteFailed (a StorageError naming the
        groups that failed and those that stored it) when some stored it, else
        StorageUnavailable (no owner answered) or StorageError (e.g. too large).
        So a script that lets it out is answered non-ok, not ``ok`` with fewer
        copies than asked."""
        raw = data.encode() if isinstance(data, str) else bytes(data)
        results = self.session().write(key, raw, groups=self._groups())
        failed = [r for r in results if not r.ok]
        if not failed:
            return results
        for r in failed:
            self.log.error("write %r to node %s (group %d): %s: %s", key, r.node, r.group,
                           r.status, r.error)
        stored = [r for r in results if r.ok]
        if any(r.status == p.FORBIDDEN for r in failed):
            raise Forbidden(f"write of {key!r}: forbidden: {failed[0].error}")
        if stored:
            raise ReplicaWriteFailed(key, failed, stored)
        down = all(r.status == p.UNAVAILABLE for r in failed)
        raise (StorageUnavailable if down else StorageError)(
            f"write of {key!r} failed in every group: "
            + "; ".join(f"{r.node}: {r.status}: {r.error}" for r in failed))

    def remove(self, key: str | bytes) -> list:
        """Remove from every group; one Result per group (``not_found`` where absent)."""
        results = self.session().remove(key, groups=self._groups())
        refused = [r for r in results if r.status == p.FORBIDDEN]
        if refused:
            raise Forbidden(f"remove of {key!r}: forbidden: {refused[0].error}")
        return results

    def lookup(self, key: str | bytes) -> dict:
        """{"size", "mtime", ...}; raises like read_data.  Redis keeps no mtime:
        there, {"size"} only."""
        return self.session().lookup(key, groups=self._groups())

    # This node's full-text index -------------------------------------------------

    def search(self, query: str, limit: int = 10) -> list[dict]:
        """This node's hits for `query` (FTS5 syntax), best first:
        [{"key", "score", "snippet"}].  Raises storage.fulltext.BadQuery (a
        ValueError) for a query the index cannot parse."""
        return self._own_node().search(query, limit, self.timeout or 5.0)

    def _own_node(self) -> StorageClient:
        """The storage node of the pool that made this handle, whatever the remotes."""
        if self._own_store is None or self._own_pid != os.getpid():
            if self._own_store is not None:  # another process's (before a fork): left alone
                self._abandoned.append(self._own_store)
            if self._local is None or self._node is None:
                raise StorageError("n.search works in scripts run by a node (srw serve): "
                                   f"{self._local_error or 'no node named in ' + cfg.NODE_ENV}")
            node = self._local.node(self._node)
            if not node.storage:
                raise StorageError(f"n.search: node {node.name} has no storage address (in "
                                   "redis-cluster mode: its search front-end)")
            self._own_store = StorageClient(node.storage, node.name, node.group,
                                            max_message=self._local.max_message,
                                            curve=self._curve, capability=self._capability)
            self._own_pid = os.getpid()
        return self._own_store
