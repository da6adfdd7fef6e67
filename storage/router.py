"""Placement: which srw nodes an exec goes to, for either engine.

    Session (CLI, Python API) --.
                                 +--> engine.router.route(id, key, groups) -> Route
    proxy/cluster.py -----------'         |   (the engine's, storage/engine.py)
                                          +-- lmdb: RingRouter, the Ring (sha512 ranges per group)
                                          '-- redis-cluster: SlotRouter
                                               key -> slot (CRC16, hash tags) -> master
                                               (CLUSTER SHARDS) -> srw node whose redis it is

Without an id or key a request goes to every node of the requested groups.

In redis-cluster mode there is one group, 1: Redis replicates each shard
itself.  A key's exec runs on the srw node beside the master of its slot, so
its reads and writes stay on that host; its script may still reach every key
(storage/handle.py).  A master with no srw node beside it, or one marked
failing, gives a Route with no node and the reason: the caller answers it
``unavailable``.  An exec by hex ``id`` is refused (BadId): Redis places keys,
not ids, and an id names no key whose slot could be found.

The slot map is read from any reachable Redis node (the node list's redis
addresses, then cluster.seeds) every REFRESH_EVERY seconds, and sooner after
``stale()`` (a caller saw ``unavailable``: a master may have failed over).
Between reads, every EPOCH_EVERY seconds, the router asks the node it read
the map from for the cluster's config epoch (CLUSTER INFO, a small reply);
Redis bumps it at every failover and every finished slot move (SETSLOT NODE),
so a moved slot is followed within about EPOCH_EVERY plus the cluster bus's
gossip delay, instead of REFRESH_EVERY.  Until then an exec may still run
beside the old master: its script's Redis calls follow MOVED/ASK to the new
owner (redis-py), so it reads and writes the right data, only from one hop
further away; and its reply says MOVED (Result.moved), so the caller's
router reads the map before the next request (``stale``): a moved slot is
followed on the next request, whatever the polls.
``route`` refreshes inline when the map is due; the proxy calls ``refresh``
from a thread instead, so its event loop never waits on a Redis node.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

from core import redis_auth
from core.config import Config, NodeSettings
from core.exits import UsageError

from core.ids import BadId, id_hex, key_id, parse_id

from .ring import Ring

__all__ = ["Route", "RingRouter", "SlotRouter", "SLOTS", "split_address"]

SLOTS = 16384
REFRESH_EVERY = 5.0    # s between slot-map reads when nothing went wrong
REFRESH_AFTER = 0.1    # s: the soonest a refresh follows the previous one after stale()
# s a stale() keeps the map due while reads find it unchanged: the node asked may
# not have heard of a moved slot yet (the cluster bus: cluster-node-timeout / 2)
STALE_FOR = 2.0
EPOCH_EVERY = 0.5      # s between config-epoch checks (CLUSTER INFO) between map reads
ASK_TIMEOUT = 0.5      # s per Redis node asked for CLUSTER SHARDS

log = logging.getLogger("srw.storage.router")


@dataclass(frozen=True)
class Route:
    """Where a request goes.  ``hex_id``: the id the broker locks on (None: no
    lock).  No nodes and an ``error``: nowhere it could run (answer it
    ``unavailable``); ``redis``: the Redis node that owns the key, if known."""
    nodes: list[NodeSettings]
    hex_id: str | None = None
    error: str = ""
    redis: str = ""


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (as core.config checked it) -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _check_key(id, key) -> None:
    if id is not None and key is not None:
        raise UsageError("give id or key, not both")


class RingRouter:
    """lmdb: the owner of the id in each requested group (storage/ring.py)."""
    moves = False  # the ring is the config: a route is the same every time

    def __init__(self, config: Config):
        self.ring = Ring(config)
        self.groups = sorted(self.ring.groups)

    def route(self, id: str | None = None, key: str | bytes | None = None,
              groups: list[int] | None = None, refresh: bool = True) -> Route:
        _check_key(id, key)
        value = parse_id(id) if id is not None else key_id(key) if key is not None else None
        hex_id = id if id is not None else (None if value is None else id_hex(value))
        return Route(self.ring.targets(value, groups), hex_id)

    def stale(self) -> None:
        """Nothing to learn: the ring is the config."""

    def refresh(self) -> None:
        pass

    def due(self) -> bool:
        return False

    def beside(self) -> dict[str, str]:
        """Nothing: srw nodes sit beside no other store."""
        return {}


@dataclass
class SlotMap:
    """slot -> master address, and the masters marked failing, as one node saw them."""
    owner: list[str] = field(default_factory=lambda: [""] * SLOTS)
    failing: set[str] = field(default_factory=set)
    source: str = ""
    epoch: int = -1        # cluster_current_epoch as `source` saw it, before the shards


def _connect(address: str, auth: tuple[str, str], timeout: float):
    """A plain connection to one Redis node, for the router's own questions,
    logged in as `auth` (user, password: core/redis_auth.py)."""
    from redis import Redis  # redis-cluster mode only: lmdb never loads redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry
    host, port = split_address(address)
    # No retry: redis-py's default backs off 1, 2, 4 s on a dead node, while the
    # next address would answer at once (measured: a route stalled 3.6 s).
    return Redis(host, port, username=auth[0], password=auth[1], socket_timeout=timeout,
                 socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
                 decode_responses=True)


def read_slot_map(address: str, auth: tuple[str, str], timeout: float = ASK_TIMEOUT) -> SlotMap:
    """CLUSTER SHARDS of the Redis node at `address`.  Raises redis errors."""
    with _connect(address, auth, timeout) as conn:
        epoch = _epoch(conn)  # first: a move between the two shows at the next check
        shards = conn.execute_command("CLUSTER", "SHARDS")
    slot_map = SlotMap(source=address, epoch=epoch)
    for shard in shards:
        master = next((n for n in shard["nodes"] if n["role"] == "master"), None)
        ranges = shard["slots"]
        if master is None or not ranges:  # a failed master's husk after its failover
            continue
        where = f"{master.get('ip') or master['endpoint']}:{master['port']}"
        if master.get("health") == "fail":
            slot_map.failing.add(where)
        for start, end in zip(ranges[::2], ranges[1::2]):
            slot_map.owner[start:end + 1] = [where] * (end - start + 1)
    return slot_map


def _epoch(conn) -> int:
    """cluster_current_epoch from CLUSTER INFO (lines of "field:value")."""
    info = conn.execute_command("CLUSTER", "INFO")
    line = next(l for l in info.splitlines() if l.startswith("cluster_current_epoch:"))
    return int(line.split(":", 1)[1])


def read_epoch(address: str, auth: tuple[str, str], timeout: float = ASK_TIMEOUT) -> int:
    """The cluster's config epoch as the Redis node at `address` sees it."""
    with _connect(address, auth, timeout) as conn:
        return _epoch(conn)


class SlotRouter:
    """redis-cluster: the srw node beside the master of the key's slot."""
    moves = True  # slots move and masters fail over: keep the map fresh (refresh)

    def __init__(self, config: Config, refresh_every: float = REFRESH_EVERY):
        from redis.crc import key_slot  # CRC16 with {hash tags}, as CLUSTER KEYSLOT
        from redis.exceptions import RedisError
        self._key_slot, self._redis_error = key_slot, RedisError
        self.nodes = list(config.nodes)
        self.groups = [1]
        self.by_redis = {n.redis: n for n in config.nodes}
        self.ask = list(dict.fromkeys([*(n.redis for n in config.nodes),
                                       *config.cluster.seeds]))
        self.refresh_every = refresh_every
        self.epoch_every = EPOCH_EVERY
        self.auth = redis_auth.credentials(config)  # ConfigError when there is no secret
        self.map: SlotMap | None = None
        self.error = ""             # why the last refresh failed, "" when it worked
        self._fetched = -float("inf")
        self._checked = -float("inf")   # the last epoch check (or map read)
        self._tried = -float("inf")
        self._stale_since: float | None = None  # a stale() no read has answered yet
        self._avoid = ""  # a node whose map read as before after a stale(): asked last
        self._lock = threading.Lock()  # the proxy refreshes from a thread

    # The slot map -----------------------------------------------------------------

    def due(self) -> bool:
        """Whether `refresh` has something to do: the map, or just the epoch, is due."""
        now = time.monotonic()
        return now - self._tried >= REFRESH_AFTER and \
            (now - self._fetched >= self.refresh_every or now - self._checked >= self.epoch_every)

    def stale(self) -> None:
        """A caller met a node down, or a reply said its script's Redis calls met
        MOVED: read the map again at the next chance, at most once per
        REFRESH_AFTER.  A MOVED comes from a runner, which anything a script
        does can forge, so it only makes us read the map from Redis ourselves;
        no address or map ever comes from a reply."""
        self._fetched = -float("inf")
        if self._stale_since is None:
            self._stale_since = time.monotonic()

    def refresh(self) -> None:
        """Read the slot map from the first Redis node that answers; keep the old
        one (and say why in ``error``) when none does."""
        with self._lock:
            self._tried = now = time.monotonic()
            if self.map is not None and now - self._fetched < self.refresh_every:
                self._checked = now
                try:
                    if read_epoch(self.map.source, self.auth) == self.map.epoch:
                        return
                except (self._redis_error, OSError, StopIteration, ValueError):
                    pass  # that node is gone: read the map from any
            errors = []
            last = self.map.source if self.map else ""  # it answered last time: first
            for address in sorted(self.ask, key=lambda a: (a == self._avoid, a != last)):
                try:
                    old, self.map = self.map, read_slot_map(address, self.auth)
                except (self._redis_error, OSError, KeyError, TypeError, StopIteration,
                        ValueError) as exc:
                    errors.append(f"{address}: {exc}")
                    continue
                self._fetched = self._checked = time.monotonic()
                self.error = ""
                self._still_stale(old, address)
                return
            self.error = "no Redis node answered CLUSTER SHARDS (" + "; ".join(errors) + ")"
            log.warning("slot map: %s", self.error)

    def _still_stale(self, old: SlotMap | None, address: str) -> None:
        """After a stale(), a map that reads as before may come from a node that
        has not heard of the change yet: keep the map due (once per REFRESH_AFTER,
        for STALE_FOR at most), asking the other nodes first."""
        since = self._stale_since
        unchanged = old is not None and old.owner == self.map.owner and \
            old.failing == self.map.failing
        if since is None or not unchanged or time.monotonic() - since >= STALE_FOR:
            self._stale_since, self._avoid = None, ""
            return
        self._fetched = -float("inf")
        self._avoid = address  # ask the other nodes first next time

    def beside(self) -> dict[str, str]:
        """node -> "master 127.0.0.1:7000", or "127.0.0.1:7003 (no slots)" for a
        Redis node that owns none (a replica: execs by key run beside masters
        only), from a slot map read now."""
        self.refresh()
        if self.map is None:
            return {n.name: f"{n.redis} (no slot map: {self.error})" for n in self.nodes}
        masters = set(self.map.owner)
        return {n.name: f"master {n.redis}" if n.redis in masters else f"{n.redis} (no slots)"
                for n in self.nodes}

    # Routing ----------------------------------------------------------------------

    def route(self, id: str | None = None, key: str | bytes | None = None,
              groups: list[int] | None = None, refresh: bool = True) -> Route:
        _check_key(id, key)
        self.check_groups(groups)
        if id is not None:
            raise BadId(f"exec by id ({id[:40]}) needs cluster.engine = \"lmdb\": in a Redis "
                        "Cluster give the key (--for KEY, key=) so its slot can be found")
        if key is None:
            return Route(list(self.nodes))
        if refresh and self.due():
            self.refresh()
        return self._by_slot(key)

    @staticmethod
    def check_groups(groups: list[int] | None) -> None:
        unknown = [g for g in groups or () if g != 1]
        if unknown:
            raise UsageError(f"no group {unknown[0]}: with cluster.engine = \"redis-cluster\" "
                             "there is one group, 1 (Redis replicates each shard)")

    def _by_slot(self, key: str | bytes) -> Route:
        raw = key.encode() if isinstance(key, str) else bytes(key)
        hex_id = id_hex(key_id(raw))  # the broker's per-key lock, as in lmdb mode
        if self.map is None:
            return Route([], hex_id, f"no slot map yet: {self.error or 'never read'}")
        slot = self._key_slot(raw)
        master = self.map.owner[slot]
        if not master:
            return Route([], hex_id, f"slot {slot} has no master (as {self.map.source} "
                                     "sees the cluster)")
        if master in self.map.failing:
            return Route([], hex_id, f"master {master} of slot {slot} is failing; a "
                                     "failover is under way", master)
        node = self.by_redis.get(master)
        if node is None:
            return Route([], hex_id, f"no srw node beside {master}, master of slot {slot}; "
                                     "give a [[node]] redis = \"" + master + "\"", master)
        return Route([node], hex_id, "", master)
