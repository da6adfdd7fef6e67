"""The cluster as the proxy sees it: exec routing over asyncio, data calls in threads.

Exec is the hot path: one ``AsyncClient`` per node (many requests in flight on
one socket), routed by the engine's router (storage/router.py, as ``Session``
routes), fanned out with ``asyncio.gather``; the placement and result logic is
``Session.exec``'s (storage/execs.py), only the waiting is async.  When the
router's placement moves (redis-cluster's slot map) a task re-reads it in a
thread when it is due, so no request waits on Redis.  A node that does not
answer becomes a Result with status ``unavailable``, so an HTTP request always
gets one answer per target.

Data calls (read, write, remove) go through the blocking
``storage.client.Session``: each runs in a small thread pool, one Session per
thread (a Session's sockets must stay in the thread that made them).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from broker.client import AsyncClient, BrokerUnavailable, Result
from core.config import Config, ConfigError, NodeSettings
from core.security import Credentials
from core.sched import CALM_AFTER, LoadScheduling
from storage import execs
from storage.engine import engine_class
from storage.node_client import storage_ready
from storage.router import Route

DATA_THREADS = 4
PING_TIMEOUT = 2.0
BUSY_IN_FLIGHT = 4   # execs in flight beyond which the proxy takes them in batches (core.sched)
SLOT_MAP_CHECK = 0.05  # s between looks at whether the slot map is due (redis-cluster)
ROUTES_KEPT = 4096     # lmdb: routes remembered by (id, key, groups); a ring never changes
ROUTE_KEY_KEPT = 256   # ... for keys up to this long: memory stays bounded whatever clients send


def allowed_groups(config: Config) -> list[int]:
    """The groups the proxy serves: [proxy] groups, or every group of the config."""
    known = sorted({n.group for n in config.nodes})
    for group in config.proxy.groups:
        if group not in known:
            raise ConfigError(f"{config.path}: proxy.groups lists group {group}, but no "
                              f"[[node]] is in it (groups: {', '.join(map(str, known))})")
    return list(config.proxy.groups) or known


class Cluster:
    """Exec, status and ping over every node's broker; call ``start`` inside the loop."""

    def __init__(self, config: Config, curve: Credentials | None = None):
        self.config = config
        self.curve = curve
        self.engine = engine_class(config)  # chosen once: its router and its roles
        self.router = self.engine.make_router(config)
        self.groups = allowed_groups(config)
        self.clients: dict[str, AsyncClient] = {}
        self.in_flight = 0
        self.scheduling = LoadScheduling()
        self._slot_map_task: asyncio.Task | None = None
        # lmdb: the ring is the config, so a route is the same every time (and
        # working it out cost ~10 us an exec); a slot map changes, so no cache.
        self._kept_route = (None if self.router.moves else
                            functools.lru_cache(ROUTES_KEPT)(self._route))

    def start(self) -> None:
        timeout = self.config.broker.request_timeout
        # max_message as every srw socket (the config keeps it above max_body).
        self.clients = {n.name: AsyncClient(n.broker, timeout=timeout, curve=self.curve,
                                            max_message=self.config.max_message)
                        for n in self.config.nodes}
        if self.router.moves:
            self.router.refresh()  # at start-up, before the first request
            self._slot_map_task = asyncio.get_running_loop().create_task(self._keep_slot_map())

    async def _keep_slot_map(self) -> None:
        while True:
            if self.router.due():
                await asyncio.to_thread(self.router.refresh)
            await asyncio.sleep(SLOT_MAP_CHECK)

    async def close(self) -> None:
        if self._slot_map_task is not None:
            self._slot_map_task.cancel()
        await asyncio.gather(*(c.close() for c in self.clients.values()))

    def route(self, id: str | None, key: str | None, groups: list[int] | None) -> Route:
        """Raises BadId (a ValueError) for an id it cannot route."""
        groups = tuple(groups or self.groups)
        if self._kept_route is not None and (key is None or len(key) <= ROUTE_KEY_KEPT):
            return self._kept_route(id, key, groups)
        return self._route(id, key, groups)

    def _route(self, id: str | None, key: str | None, groups: tuple[int, ...]) -> Route:
        return self.router.route(id, key, list(groups), refresh=False)

    async def exec(self, route: Route, name: str, data: bytes, cookie: str) -> list[Result]:
        """One Result per target, in route order; never raises for a node that is down.
        The placement and result logic is Session.exec's (storage/execs.py)."""
        if (unplaced := execs.nowhere(self.router, route)) is not None:
            return unplaced
        targets, hex_id = route.nodes, route.hex_id
        self.in_flight += 1
        self.scheduling.update(self.in_flight > BUSY_IN_FLIGHT, time.monotonic())
        try:
            if len(targets) == 1:  # the common case, without gather's extra task
                results = [await self._exec_one(targets[0], name, data, cookie, hex_id)]
            else:
                results = list(await asyncio.gather(
                    *(self._exec_one(n, name, data, cookie, hex_id) for n in targets)))
            return execs.settle(self.router, route, results)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self.scheduling.batch:
                asyncio.get_running_loop().call_later(CALM_AFTER, self._relax_if_idle)

    def _relax_if_idle(self) -> None:
        if not self.in_flight:
            self.scheduling.relax()

    async def _exec_one(self, node: NodeSettings, name: str, data: bytes, cookie: str,
                        hex_id: str | None) -> Result:
        try:
            outcome = await self.clients[node.name].exec(name, data, cookie=cookie, id=hex_id)
        except BrokerUnavailable as exc:
            outcome = exc
        return execs.answer(node, outcome)

    async def status(self) -> list[dict]:
        """Each node's pool status; a node that does not answer is {name, group, error}."""
        return list(await asyncio.gather(*(self._status_one(n) for n in self.config.nodes)))

    async def ping(self) -> list[tuple[NodeSettings, list[str], list[str]]]:
        """Each node with its roles that answer and those that do not, one phrase
        each: its broker (status), its pool (live workers, as its broker counts
        them), its storage process (lmdb: a stat; redis-cluster: its search
        front-end's stat where it has a storage address; its data is in
        Redis, which srw does not watch)."""
        return list(await asyncio.gather(*(self._ping_one(n) for n in self.config.nodes)))

    async def _ping_one(self, node: NodeSettings) -> tuple[NodeSettings, list[str], list[str]]:
        up, down = [], []
        checks = [self._status_one(node)]
        if "storage" in self.engine.roles_of(node):
            checks.append(asyncio.to_thread(storage_ready, node.storage, PING_TIMEOUT / 2,
                                            self.curve))
        status, *storage = await asyncio.gather(*checks)
        if "error" in status:
            down.append(f"broker {node.broker} does not answer (nor can it count the pool's "
                        "workers)")
        else:
            up.append("broker")
            workers = status.get("workers", 0)
            (up if workers else down).append(f"pool ({workers} live workers)")
        if storage:
            (up if storage[0] else down).append(
                "storage" if storage[0] else f"storage {node.storage} does not answer")
        return node, up, down

    async def _status_one(self, node: NodeSettings) -> dict:
        try:
            return await self.clients[node.name].status(timeout=PING_TIMEOUT)
        except BrokerUnavailable as exc:
            return {"name": node.name, "group": node.group, "error": str(exc)}


class DataStore:
    """Read, write and remove through ``storage.client.Session``, off the event loop.

    The Session sees only the groups the proxy serves, so writes go to
    ``[proxy] groups`` (every group when that is empty).
    """

    def __init__(self, config: Config, curve: Credentials | None = None):
        groups = set(allowed_groups(config))
        self.curve = curve
        self.config = dataclasses.replace(
            config, nodes=tuple(n for n in config.nodes if n.group in groups))
        self._pool = ThreadPoolExecutor(DATA_THREADS, thread_name_prefix="srw-data")
        self._local = threading.local()
        self._sessions = []
        self._lock = threading.Lock()

    def _session(self):
        session = getattr(self._local, "session", None)
        if session is None:
            from storage.client import Session
            session = self._local.session = Session(self.config, curve=self.curve)
            with self._lock:
                self._sessions.append(session)
        return session

    def _call(self, method: str, *args):
        return getattr(self._session(), method)(*args)

    async def read(self, key: str) -> bytes:
        return await self._run("read", key)

    async def write(self, key: str, data: bytes, index: bool = False,
                    lang: str | None = None) -> list[Result]:
        return await self._run("write", key, data, None, None, index, lang)

    async def search(self, query: str, limit: int, offset: int = 0,
                     timeout: float | None = None, lang: str | None = None,
                     raw: bool = False):
        """storage.client.Hits"""
        return await self._run("search", query, limit, offset, None, timeout, lang, raw)

    async def remove(self, key: str) -> list[Result]:
        return await self._run("remove", key)

    async def _run(self, method: str, *args):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._call, method, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for session in self._sessions:
                session.close()
            self._sessions.clear()


def storage_errors() -> tuple[type, type, type]:
    """(NotFound, StorageUnavailable, StorageError) from storage.client."""
    from storage.client import NotFound, StorageError, StorageUnavailable
    return NotFound, StorageUnavailable, StorageError
