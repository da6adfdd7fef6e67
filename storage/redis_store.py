"""Redis Cluster as the store (``[cluster] engine = "redis-cluster"``).

``RedisStore`` is one process's way into the cluster: a redis-py
``RedisCluster`` client built at the first call in that process (a client
never crosses a fork: its sockets would then be shared with the parent), from
the node's own Redis address first and then ``cluster.seeds``.  Both the
scripts' handle (storage/handle.py) and ``Session`` (CLI, Python API, proxy
data calls) use it, so a key means the same value from everywhere.

At most once.  redis-py would resend a command after a connection error, on
the refreshed slot map: after a master is killed that is the promoted
replica, which may already have the write (INCR twice).  So the client makes
no such retry; it still follows MOVED and ASK (those say the command was not
run), and refreshes its slot map after any error.  A command that meets a
node down raises ``ClusterUnavailable`` (a ``StorageUnavailable`` and a
``core.protocol.Unavailable``): out of a script, the exec is answered
``unavailable``, and its effect may or may not have happened.

The own master, directly.  A script's handle starts from the node's own Redis,
the master beside it, which serves the keys the node's execs are routed by.
For a command of one key (ONE_KEY) whose slot that master serves by the
client's slot map, the client skips redis-py's cluster routing (about half of
a call's CPU) and sends it on one connection of its own to that master,
logged in as the same ACL user.  A MOVED or ASK there says it did not run:
the command then goes the cluster client's way, which follows it and notes
the MOVED.  Anything else (another master's key, other commands) goes that
way from the start.

Hostile values.  Scripts write any key, so what ``read`` meets may be a list
where a string was expected, or a 512 MB string: a wrong type is a
StorageError like any other, and with ``max_value`` set (the trusted
readers: Session, the proxy, scripts push) no more than that is ever read
(GETRANGE), so no script can make a trusted process allocate what it likes.
"""
from __future__ import annotations

import contextlib
import os
import time
from typing import Callable

from redis import exceptions as rx
from redis import Redis
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.retry import Retry

from core import protocol as p

from . import redis_index as ix
from .errors import Forbidden, NotFound, StorageError, StorageUnavailable
from .router import split_address

__all__ = ["RedisStore", "ClusterUnavailable"]

CONNECT_TIMEOUT = 1.0   # s; on loopback a live node accepts in microseconds
COMMAND_TIMEOUT = 5.0   # s; like a storage node's DATA_TIMEOUT
INDEXED_POLL = 0.005    # s: the first pause of an indexed write waiting for its indexer

# What redis-py raises when the cluster, not the command, is at fault.
DOWN = (rx.ConnectionError, rx.TimeoutError, rx.ClusterDownError, rx.TryAgainError,
        rx.MasterDownError, rx.SlotNotCoveredError, rx.ClusterError)


# Commands whose one key is their first argument, whatever follows it: those the
# client may send straight to the key's master (_Cluster.execute_command).
ONE_KEY = frozenset("""
    GET SET SETNX SETEX PSETEX GETSET GETDEL GETEX GETRANGE SETRANGE STRLEN APPEND
    INCR INCRBY INCRBYFLOAT DECR DECRBY TYPE TTL PTTL EXPIRE PEXPIRE PERSIST
    HGET HSET HSETNX HMGET HGETALL HDEL HEXISTS HINCRBY HKEYS HVALS HLEN
    LPUSH RPUSH LPOP RPOP LRANGE LLEN LINDEX SADD SREM SMEMBERS SISMEMBER SCARD
    ZADD ZREM ZSCORE ZINCRBY ZCARD""".split())
# One key only when given one: DEL a b may span slots.
ONE_KEY_IF_ALONE = frozenset(("DEL", "UNLINK", "EXISTS"))

_built_in = 0  # the pid that last built a client: its sockets are no script's leftovers
_moved = False  # a MOVED since take_moved(): the slot map a router used is old


def take_moved() -> bool:
    """Whether a command of this process met MOVED since the last call (the runner
    asks after each request, runtime/runner.py).  Only a hint to the client's
    router, which then reads the slot map itself (storage/router.py): anything a
    script runs can set it."""
    global _moved
    moved, _moved = _moved, False
    return moved


def client_in_this_process() -> bool:
    """Whether a handle built its cluster client in this process (runtime/runner.py
    then lets its sockets stay open between requests, like a ZeroMQ session's)."""
    return _built_in == os.getpid()


class _SlotMoved(Exception):
    """A transaction met MOVED or ASK: nothing of it ran."""


class ClusterUnavailable(StorageUnavailable, p.Unavailable, rx.ConnectionError):
    """A Redis node the command needed is down, or the cluster is failing over.
    Also a redis ConnectionError, so scripts written against redis-py catch it."""


@contextlib.contextmanager
def _refused(key):
    """Redis refusing a command (WRONGTYPE: a script stored a list there; NOPERM)
    is a StorageError, which every caller of the store handles."""
    try:
        yield
    except rx.NoPermissionError as exc:  # a script whose caller may not (README "Sandbox")
        raise Forbidden(f"key {key!r}: redis: {exc}") from None
    except rx.ResponseError as exc:
        raise StorageError(f"key {key!r}: redis: {exc}") from None


class _Cluster(RedisCluster):
    """RedisCluster whose commands raise ClusterUnavailable for a node down, and
    which notes a MOVED (take_moved).  An ASK is no hint: the slot belongs to
    its old master until the move finishes, and then the next command meets
    MOVED.  With `direct` ("host:port" of a master), a one-key command of a
    slot that master serves goes to it on a connection of its own (the module's
    doc, "The own master")."""

    def __init__(self, *args, direct: str | None = None, **kwargs):
        self._direct_name = None   # none while redis-py's __init__ asks COMMAND
        self._direct: Redis | None = None   # built at its first command
        super().__init__(*args, **kwargs)
        follow = self.nodes_manager.move_slot  # redis-py calls it for each MOVED it follows

        def move_slot(error):
            global _moved
            _moved = True
            return follow(error)
        self.nodes_manager.move_slot = move_slot
        self._direct_name = direct
        self._direct_login = (kwargs.get("username"), kwargs.get("password"))
        self._timeouts = (kwargs.get("socket_connect_timeout"), kwargs.get("socket_timeout"))

    def execute_command(self, *args, **kwargs):
        try:
            if self._direct_name is not None and self._is_direct(args, kwargs):
                try:
                    return self._send_direct(args, kwargs)
                except rx.AskError:  # MOVED too: not run there; the cluster way follows it
                    pass
            return super().execute_command(*args, **kwargs)
        except ClusterUnavailable:
            raise
        except DOWN as exc:
            raise ClusterUnavailable(f"redis cluster: {args[0] if args else '?'}: "
                                     f"{type(exc).__name__}: {exc}") from exc

    def _is_direct(self, args, kwargs) -> bool:
        """Whether the command has one key, of a slot the direct master serves."""
        if len(args) < 2 or kwargs.get("target_nodes") is not None:
            return False
        if args[0] not in ONE_KEY and not (args[0] in ONE_KEY_IF_ALONE and len(args) == 2):
            return False
        nodes = self.nodes_manager.slots_cache.get(self.keyslot(args[1]))
        return bool(nodes) and nodes[0].name == self._direct_name

    def _send_direct(self, args, kwargs):
        if self._direct is None:
            host, port = split_address(self._direct_name)
            # One connection, no pool: no lock or liveness poll per command; no retry
            # (at most once, as the cluster client).
            self._direct = Redis(host, port, username=self._direct_login[0],
                                 password=self._direct_login[1],
                                 socket_connect_timeout=self._timeouts[0],
                                 socket_timeout=self._timeouts[1], retry=Retry(NoBackoff(), 0),
                                 single_connection_client=True)
        try:
            return self._direct.execute_command(*args, **kwargs)
        except rx.ResponseError:
            raise   # Redis answered: the connection is in step
        except BaseException:
            # A reply may still be on its way (an exception between send and read):
            # the next command must not read it as its own.
            self._direct.connection.disconnect()
            raise

    def close(self) -> None:
        if self._direct is not None:
            self._direct.close()
            self._direct = None
        super().close()


class RedisStore:
    """read, write, remove on the cluster; ``client`` for anything else."""

    def __init__(self, addresses: list[str] | tuple[str, ...],
                 auth: tuple[str, str] | Callable[[], tuple[str, str] | None],
                 timeout: float | None = None, max_value: int | None = None,
                 direct: str | None = None):
        """`auth`: (user, password) to log in with (core/redis_auth.py), or what
        gives it when a client is built (a script's handle: the login its request
        was handed; None: no store rights); `max_value`: the most bytes `read`
        returns (None: any); `direct`: a master ("host:port", a script's handle:
        the node's own) that one-key commands of its slots go to directly."""
        if not addresses:
            raise StorageError("redis-cluster: no Redis node to start from (cluster.seeds)")
        self.addresses = list(dict.fromkeys(addresses))
        self.timeout = timeout or COMMAND_TIMEOUT
        self.auth = auth
        self.max_value = max_value
        self.direct = direct
        self._client: _Cluster | None = None
        self._login: tuple[str, str] | None = None  # what _client logged in as
        self._pid = 0
        self._abandoned: list = []  # another process's clients: kept, never closed here

    @property
    def client(self) -> RedisCluster:
        """This process's cluster client, built (and the slot map read) on first use."""
        login = self.auth() if callable(self.auth) else self.auth
        if login is None:
            raise Forbidden("this script's caller may neither read nor write (README "
                            "\"Sandbox\", rights of scripts)")
        if self._client is None or self._pid != os.getpid() or login != self._login:
            if self._client is not None and self._pid == os.getpid():
                self._client.close()  # another caller's login (isolation none)
            elif self._client is not None:
                # Closing it would shut sockets the parent still uses; GC would too.
                self._abandoned.append(self._client)
            global _built_in
            self._client, self._pid = self._connect(login), os.getpid()
            self._login = login
            _built_in = self._pid
        return self._client

    def live(self) -> bool:
        """Whether this process holds a client (its sockets are expected, not leaks)."""
        return self._client is not None and self._pid == os.getpid()

    def _connect(self, login: tuple[str, str]) -> _Cluster:
        nodes = [ClusterNode(*split_address(a)) for a in self.addresses]
        try:
            return _Cluster(startup_nodes=nodes, retry=Retry(NoBackoff(), 0),
                            username=login[0], password=login[1],
                            socket_connect_timeout=CONNECT_TIMEOUT,
                            socket_timeout=self.timeout, direct=self.direct)
        except (rx.RedisClusterException, *DOWN) as exc:
            raise ClusterUnavailable(f"no Redis node of {', '.join(self.addresses)} "
                                     f"answered: {exc}") from exc

    def read(self, key: str | bytes, max_bytes: int | None = None) -> bytes:
        """The value; StorageError when it holds more than `max_bytes` (default
        ``max_value``), of which no more than one byte past is read."""
        limit = max_bytes if max_bytes is not None else self.max_value
        with _refused(key):
            if limit is None:
                value = self.client.get(key)
            else:  # one byte more than allowed tells it is too large, and no more is read
                value = self.client.getrange(key, 0, limit)
                if not value and not self.client.exists(key):
                    value = None
        if value is None:
            raise NotFound(f"key {key!r} not found")
        if limit is not None and len(value) > limit:
            raise StorageError(f"key {key!r} holds more than {limit} bytes, the most this "
                               "reader takes")
        return value

    def read_range(self, key: str | bytes, offset: int, length: int) -> bytes:
        """At most `length` bytes from `offset` (GETRANGE: no more is read), and
        no more than ``max_value``; NotFound when the key is absent."""
        if self.max_value is not None:
            length = min(length, self.max_value)
        if not length:
            value = b""
        else:
            with _refused(key):
                end = min(offset + length - 1, (1 << 63) - 1)   # Redis takes a signed end
                value = self.client.getrange(key, offset, end)
        if not value:
            with _refused(key):
                if not self.client.exists(key):
                    raise NotFound(f"key {key!r} not found")
        return value

    def write(self, key: str | bytes, data: bytes) -> None:
        """A plain write; an indexed key it overwrites leaves its slot's index
        hash in the same MULTI (one round trip, as a SET), and then its log
        says so, so the old text is no longer found (storage/redis_index.py)."""
        slot = self.client.keyslot(key)

        def queue(pipe):
            pipe.set(key, data)
            pipe.hdel(ix.index_key(slot), key)
        stored, unindexed = self._on_master(key, queue, raise_on_error=False)
        if isinstance(stored, Exception):
            with _refused(key):
                raise stored
        if unindexed == 1:   # an error here: a script made the hash something else
            self._on_master(key, lambda pipe: self._logged(pipe, key, slot))

    def write_watched(self, key: str | bytes, make) -> bool:
        """Compare-and-set: `make()` (which reads what it needs) gives the value,
        written only if no one wrote `key` since it was watched, before `make` ran
        (WATCH/MULTI/EXEC on the key's master: the srw user may run no Lua).
        Whether it was written."""
        with _refused(key):
            try:
                master = self.client.get_redis_connection(self.client.get_node_from_key(key))
                with master.pipeline(transaction=True) as pipe:
                    pipe.watch(key)
                    value = make()
                    pipe.multi()
                    pipe.set(key, value)
                    pipe.execute()
                return True
            except rx.WatchError:
                return False
            except DOWN as exc:
                raise ClusterUnavailable(f"redis cluster: write {key!r}: "
                                         f"{type(exc).__name__}: {exc}") from exc

    def remove(self, key: str | bytes) -> bool:
        """Whether the key was there.  An indexed key leaves its slot's index hash
        in the same MULTI, and its log says so (storage/redis_index.py)."""
        slot = self.client.keyslot(key)
        with _refused(key):
            try:
                indexed = self.client.hexists(ix.index_key(slot), key)
            except rx.ResponseError:  # a script made the hash something else: not indexed
                indexed = False
            if not indexed:
                return bool(self.client.delete(key))

        def queue(pipe):
            pipe.delete(key)
            pipe.hdel(ix.index_key(slot), key)
            self._logged(pipe, key, slot)
        return bool(self._on_master(key, queue)[0])

    def write_indexed(self, key: str | bytes, data: bytes, lang: str, wait: float) -> bytes:
        """Store and mark indexed (with `lang`, "" for by script) in one MULTI on
        the key's master; the srw node beside it indexes it (slot_indexer.py).
        Then, for up to `wait` seconds, wait until that node took its log entry
        (it deletes an entry once its rows committed).  b"", or why it is not
        indexed yet."""
        slot = self.client.keyslot(key)

        def queue(pipe):
            pipe.set(key, data)
            pipe.hset(ix.index_key(slot), key, lang)
            self._logged(pipe, key, slot)
        entry = self._on_master(key, queue)[2]
        deadline, pause = time.monotonic() + wait, INDEXED_POLL
        while wait > 0:
            with _refused(key):
                if not self.client.xrange(ix.log_key(slot), min=entry, max=entry):
                    return b""
            if time.monotonic() >= deadline:
                return (f"stored, not indexed yet after {wait:.0f} s: the search front-end "
                        "beside the key's master has not read it (is it running?)").encode()
            time.sleep(pause)
            pause = min(pause * 2, INDEXED_POLL * 4)
        return b""

    @staticmethod
    def _logged(pipe, key, slot: int) -> None:
        pipe.xadd(ix.log_key(slot), {ix.LOG_FIELD: key}, maxlen=ix.LOG_MAX, approximate=True)
        pipe.publish(ix.CHANNEL, slot)  # a hint to the indexer; its sweep finds it anyway

    def _on_master(self, key, queue, raise_on_error: bool = True) -> list:
        """`queue(pipe)`'s commands in one MULTI/EXEC on the key's master.  A
        MOVED or ASK aborts the whole transaction (nothing ran): the slot map
        is read again and the transaction sent once more.  Without
        `raise_on_error`, a command Redis refused is its Exception in the list."""
        try:
            return self._transaction(key, queue, raise_on_error)
        except _SlotMoved:
            self.client.nodes_manager.initialize()
        try:
            return self._transaction(key, queue, raise_on_error)
        except _SlotMoved as exc:
            raise ClusterUnavailable(f"redis cluster: {key!r}: its slot is moving: {exc}") \
                from None

    def _transaction(self, key, queue, raise_on_error: bool = True) -> list:
        with _refused(key):
            try:
                node = self.client.get_node_from_key(key)
                with self.client.get_redis_connection(node).pipeline(transaction=True) as pipe:
                    queue(pipe)
                    return pipe.execute(raise_on_error=raise_on_error)
            except rx.AskError as exc:  # and MovedError, an AskError: nothing ran
                raise _SlotMoved(str(exc)) from None
            except DOWN as exc:
                raise ClusterUnavailable(f"redis cluster: {key!r}: "
                                         f"{type(exc).__name__}: {exc}") from exc

    def size(self, key: str | bytes) -> int:
        with _refused(key):
            if not self.client.exists(key):
                raise NotFound(f"key {key!r} not found")
            return self.client.strlen(key)

    def close(self) -> None:
        if self.live():
            self._client.close()
        self._client = None
