"""Clients of one node's broker.

``Client`` is blocking, one request at a time (not thread-safe: one per
thread).  ``AsyncClient`` keeps many requests in flight on one socket and
matches replies to callers by request id.  Both return a ``Result`` for
anything the node answered (per-node statuses are data) and raise
``BrokerUnavailable`` only when no reply came at all.
"""
from __future__ import annotations

import asyncio
import itertools
import math
import os
import time

import zmq

from core import loop
from core import protocol as p
from core.protocol import Result
from core import timeouts
from core.exits import UsageError
from core.security import Credentials

__all__ = ["Client", "AsyncClient", "Result", "BrokerUnavailable"]

DEFAULT_WAIT = timeouts.CLIENT_DEFAULT_WAIT  # no timeout given, none learned (_learned_timeout)
_LEARNED: dict[str, float] = {}  # endpoint -> its broker's request_timeout, from its status
CONNECT_WAIT = 1.0      # how long a send waits for a connection to the broker
SEND_RETRY = 0.005      # seconds between an AsyncClient's tries while it waits
# An AsyncClient's batch: requests of one loop turn in one message, up to this
# many bytes (any broker takes it); a larger request goes alone, its data in
# a frame of its own, as Client sends it.
BATCH_BYTES = 1024 * 1024


class BrokerUnavailable(ConnectionError):
    """No reply from the broker within the request's deadline plus a grace period."""


def credentials(key: str | None, server_key: str | None,
                given: Credentials | None = None) -> Credentials | None:
    """A client's CurveZMQ credentials: `given`, else read from the key files
    (both or neither: ``key`` the client's .key_secret, ``server_key`` the
    server's public .key)."""
    if given is not None or (key is None and server_key is None):
        return given
    if not (key and server_key):
        raise UsageError("CurveZMQ needs both key (the client's NAME.key_secret) and "
                         "server_key (the server's public server.key)")
    return Credentials.from_files(key, server_key)


def unreachable_hint(curve: Credentials | None) -> str:
    """Why a connection may not be made: a CurveZMQ handshake that failed looks
    the same to a client as a node that is down."""
    return "is the node running (srw serve), " + (
        "and does it know this client's key?" if curve else
        "or does it want a client key (README \"Security\")?")


def _socket(ctx: zmq.Context, endpoint: str, max_message: int | None,
            curve: Credentials | None = None) -> zmq.Socket:
    return loop.client_socket(ctx, endpoint, max_message, curve and curve.apply)


class _Base:
    def __init__(self, endpoint: str, timeout: float | None = None,
                 max_message: int | None = None, curve: Credentials | None = None,
                 ctx: zmq.Context | None = None):
        self.endpoint = endpoint
        self.curve = curve
        self.timeout = timeout
        self.max_message = max_message
        self._ctx = ctx or zmq.Context.instance()
        self._sock = _socket(self._ctx, endpoint, max_message, curve)
        self._prefix = os.urandom(4)
        self._counter = itertools.count()

    def _renew_refused_socket(self) -> None:
        """After CONNECT_WAIT without a connection, with CurveZMQ: a new socket for
        the next request.  libzmq (4.3.5) never reconnects a socket whose handshake
        the node refused, so a client whose key the node learns later (a
        certificate added at run time) would stay locked out on the old one.
        """
        if self.curve is None:
            return
        self._sock.close()
        self._sock = _socket(self._ctx, self.endpoint, self.max_message, self.curve)

    def _next_rid(self) -> bytes:
        return self._prefix + next(self._counter).to_bytes(8, "little")

    def _exec_request(self, name, data, code, timeout, cookie, id) -> tuple[tuple, float]:
        """((EXEC, rid, meta, data), how long to wait for the reply)."""
        timeout = timeout if timeout is not None else self.timeout
        meta = p.ExecMeta(name=name, code=code, cookie=cookie, timeout=timeout, id=id)
        # No timeout: the broker's request_timeout applies, and the client waits for it.
        works = timeout if timeout is not None else self._learned_timeout() or DEFAULT_WAIT
        wait = timeouts.client_wait(works)
        data = bytes(data)
        if self.max_message:
            size = p.request_bytes(meta, data)
            if size > p.batch_limit(self.max_message):
                raise UsageError(f"request of {size} bytes with its headers (data {len(data)}, "
                                 f"code {len(code)} chars) is larger than max_message "
                                 f"({self.max_message} bytes): the broker would not take it")
        return (p.EXEC, self._next_rid(), meta.check(), data), wait

    def _learned_timeout(self) -> float | None:
        """The node's request_timeout, as its broker said (an async client learns
        none: give it a timeout)."""
        return None

    def _unavailable(self, wait: float) -> BrokerUnavailable:
        return BrokerUnavailable(f"no reply from broker {self.endpoint} within {wait:.1f} s; "
                                 "is the node running (srw serve)?")

    def _unreachable(self) -> BrokerUnavailable:
        return BrokerUnavailable(f"cannot connect to broker {self.endpoint}; "
                                 f"{unreachable_hint(self.curve)}")


class Client(_Base):
    """Blocking client: ``Client("tcp://127.0.0.1:1026").exec("test_script.py", b"data")``.

    With `max_message` (srw's own clients pass ``Config.max_message``) its socket
    takes no larger message, and a request the broker could not take raises
    ValueError instead of being sent; by default there is no limit.  A node
    with CurveZMQ on needs ``key="keys/alice.key_secret",
    server_key="keys/server.key"`` (or ``curve=`` Credentials)."""

    def __init__(self, endpoint: str, timeout: float | None = None,
                 ctx: zmq.Context | None = None, max_message: int | None = None,
                 key: str | None = None, server_key: str | None = None,
                 curve: Credentials | None = None):
        super().__init__(endpoint, timeout, max_message, credentials(key, server_key, curve),
                         ctx)
        self._outstanding: set[bytes] = set()    # submitted, not yet collected
        self._early: dict[bytes, Result] = {}    # their replies that came first

    def exec(self, name: str = "", data: bytes = b"", code: str = "",
             timeout: float | None = None, cookie: str = "", id: str | None = None) -> Result:
        return self.result(*self.submit(name, data, code, timeout, cookie, id))

    def submit(self, name: str = "", data: bytes = b"", code: str = "",
               timeout: float | None = None, cookie: str = "",
               id: str | None = None) -> tuple[bytes, float]:
        """Send an exec without waiting; returns (rid, wait) for ``gather``."""
        request, wait = self._exec_request(name, data, code, timeout, cookie, id)
        self._send(p.request_frames(*request))
        rid = request[1]
        self._outstanding.add(rid)
        return rid, wait

    def result(self, rid: bytes, wait: float) -> Result:
        """The reply to a `submit`ted request; replies to others are kept for them."""
        try:
            if rid in self._early:
                return self._early.pop(rid)
            return self._wait(rid, wait)
        finally:
            self._outstanding.discard(rid)

    def _send(self, frames: list[bytes]) -> None:
        try:
            p.send_frames(self._sock, frames, noblock=True)
            return
        except zmq.Again:
            pass  # not connected (yet): wait a little for the connection
        if not self._sock.poll(int(CONNECT_WAIT * 1000), zmq.POLLOUT):
            self._renew_refused_socket()
            raise self._unreachable()
        p.send_frames(self._sock, frames, noblock=True)

    def _learned_timeout(self) -> float | None:
        """A client given no timeout (and no config) asks the broker's status once
        per endpoint and process: a wait shorter than the node's request_timeout
        gave up on scripts the node was still running."""
        if self.endpoint not in _LEARNED:
            try:
                said = self.status(timeout=CONNECT_WAIT + 1.0).get("request_timeout")
            except BrokerUnavailable:
                return None  # not cached: the next request asks again
            if not isinstance(said, (int, float)) or isinstance(said, bool) or \
                    not 0 < said < math.inf:
                said = DEFAULT_WAIT  # an older broker, or nonsense
            _LEARNED[self.endpoint] = float(said)
        return _LEARNED[self.endpoint]

    def status(self, timeout: float = 5.0) -> dict:
        """The node's pool: workers, busy, queued, served, restarts, latency_us."""
        rid = self._next_rid()
        self._send(p.request_frames(p.STATUS, rid, p.ExecMeta(), b""))
        self._outstanding.add(rid)
        result = self.result(rid, timeout)
        return p.unpack_map(result.data)

    def _wait(self, rid: bytes, wait: float) -> Result:
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self._sock.poll(int(left * 1000) + 1):
                if time.monotonic() >= deadline:
                    raise self._unavailable(wait)
                continue
            try:
                got, result = p.parse_reply(p.recv_frames(self._sock))
            except p.ProtocolError:
                continue
            if got == rid:
                return result
            if got in self._outstanding:
                self._early[got] = result
            # anything else is a late reply to an abandoned request

    def close(self) -> None:
        self._sock.close()

    def _drain(self) -> None:
        """Keep every waiting reply to an outstanding request, without blocking."""
        while (frames := p.recv_frames_nowait(self._sock)) is not None:
            try:
                got, result = p.parse_reply(frames)
            except p.ProtocolError:
                continue
            if got in self._outstanding:
                self._early[got] = result

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def gather(calls: list[tuple[Client, bytes, float]]) -> list[Result | BrokerUnavailable]:
    """Wait for the replies of requests `submit`ted to several Clients at once.

    Each call is (client, rid, wait); each answer is its Result, or
    BrokerUnavailable when that broker did not reply within `wait`.
    """
    start = time.monotonic()
    answers: list[Result | BrokerUnavailable | None] = [None] * len(calls)
    poller = zmq.Poller()
    for client, _, _ in calls:
        poller.register(client._sock, zmq.POLLIN)
    waiting = {i for i in range(len(calls))}
    while waiting:
        now = time.monotonic()
        for i in [i for i in waiting if now - start >= calls[i][2]]:
            answers[i] = calls[i][0]._unavailable(calls[i][2])
            waiting.discard(i)
        if not waiting:
            break
        left = min(calls[i][2] for i in waiting) - (now - start)
        ready = dict(poller.poll(max(1, int(left * 1000) + 1)))
        for client in {calls[i][0] for i in waiting if calls[i][0]._sock in ready}:
            client._drain()
        for i in list(waiting):
            client, rid, _ = calls[i]
            if rid in client._early:
                answers[i] = client._early.pop(rid)
                client._outstanding.discard(rid)
                waiting.discard(i)
    for i, answer in enumerate(answers):
        if isinstance(answer, BrokerUnavailable):
            calls[i][0]._outstanding.discard(calls[i][1])
    return answers


class AsyncClient(_Base):
    """asyncio client; many ``await client.exec(...)`` in flight on one socket.

    Requests made in one turn of the event loop are sent together at its end,
    in one message: the broker takes them in one wake-up, hands each worker
    its share in one message and sends their replies back in batches too, which
    is what keeps a busy node's cost per request low.
    Replies are read by a reader callback on the socket's file descriptor,
    without a task or a future per wake-up.  A batch stays under BATCH_BYTES; a
    larger request goes alone.  `max_message` and the keys as for Client."""

    def __init__(self, endpoint: str, timeout: float | None = None,
                 ctx: zmq.Context | None = None, max_message: int | None = None,
                 key: str | None = None, server_key: str | None = None,
                 curve: Credentials | None = None):
        super().__init__(endpoint, timeout, max_message, credentials(key, server_key, curve),
                         ctx)
        self._batch_bytes = min(BATCH_BYTES, p.batch_limit(max_message or BATCH_BYTES * 2))
        self._pending: dict[bytes, asyncio.Future] = {}
        self._outbox: list[tuple] = []  # (cmd, rid, meta, data) to send at the turn's end
        self._backlog: asyncio.Task | None = None  # sends waiting for a connection
        self._loop: asyncio.AbstractEventLoop | None = None

    async def exec(self, name: str = "", data: bytes = b"", code: str = "",
                   timeout: float | None = None, cookie: str = "",
                   id: str | None = None) -> Result:
        return await self._request(*self._exec_request(name, data, code, timeout, cookie, id))

    async def status(self, timeout: float = 5.0) -> dict:
        result = await self._request((p.STATUS, self._next_rid(), p.ExecMeta(), b""), timeout)
        return p.unpack_map(result.data)

    async def _request(self, request: tuple, wait: float) -> Result:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._attach(loop)
        rid = request[1]
        future = loop.create_future()
        self._pending[rid] = future
        # A timer handle is much cheaper than asyncio.wait_for's wrapper per request.
        timer = loop.call_later(wait, self._expire, rid, wait)
        if not self._outbox:
            loop.call_soon(self._flush)
        self._outbox.append(request)
        try:
            return await future
        finally:
            timer.cancel()
            self._pending.pop(rid, None)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read replies in `loop` (the first one used, or a new one after it closed)."""
        fd = self._sock.getsockopt(zmq.FD)
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(fd)
        self._loop = loop
        loop.add_reader(fd, self._take_replies)

    def _flush(self) -> None:
        """Send the outbox as one batch, synchronously and without blocking."""
        if self._backlog is None and not self._send_outbox():
            self._backlog = self._loop.create_task(self._send_backlog())
        # The socket's fd only signals a change, and our send may have taken
        # the signal of replies that came meanwhile: collect them now.
        self._take_replies()

    def _send_outbox(self) -> bool:
        """False if the socket cannot take it now (no connection yet, IMMEDIATE);
        what was not sent stays in the outbox."""
        # A caller may have given up meanwhile: its request is not sent.
        outbox = [request for request in self._outbox if request[1] in self._pending]
        self._outbox = outbox
        limit = self._batch_bytes
        while outbox:
            batch, size = [], 0
            for request in outbox:
                n = p.request_bytes(request[2], request[3])
                if batch and size + n > limit:
                    break
                batch.append(request)
                size += n
            frames = p.request_frames(*batch[0]) if size > limit else p.batch_frames(batch)
            try:
                p.send_frames(self._sock, frames, noblock=True)
            except zmq.Again:
                return False
            del outbox[:len(batch)]
        return True

    async def _send_backlog(self) -> None:
        """Retry the outbox for up to CONNECT_WAIT, then fail what is in it."""
        give_up = time.monotonic() + CONNECT_WAIT
        try:
            while not self._send_outbox():
                if time.monotonic() >= give_up:
                    for request in self._outbox:
                        future = self._pending.get(request[1])
                        if future is not None and not future.done():
                            future.set_exception(self._unreachable())
                    self._outbox.clear()
                    self._renew_in_loop()
                    return
                await asyncio.sleep(SEND_RETRY)
        finally:
            self._backlog = None
        self._take_replies()

    def _renew_in_loop(self) -> None:
        """_renew_refused_socket, with the reader moved to the new socket.  Replies
        still owed on the old one are lost: with no connection they could come only
        after it came back."""
        if self.curve is None:
            return
        self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        self._renew_refused_socket()
        self._loop.add_reader(self._sock.getsockopt(zmq.FD), self._take_replies)

    def _expire(self, rid: bytes, wait: float) -> None:
        future = self._pending.get(rid)
        if future is not None and not future.done():
            future.set_exception(self._unavailable(wait))

    def _take_replies(self) -> None:
        """Every reply waiting on the socket, synchronously, to its caller."""
        # ZMQ_EVENTS before each message, not a NOBLOCK recv until zmq.Again: this
        # runs after every send too, mostly finding nothing, and the exception
        # costs ~3 us more than the check (1.7 against 4.7 us measured here).
        while p.readable(self._sock):
            frames = p.recv_frames(self._sock)
            try:
                replies = p.parse_reply_message(frames)
            except p.ProtocolError:
                continue
            for rid, result in replies:
                future = self._pending.get(rid)
                if future is not None and not future.done():
                    future.set_result(result)

    async def close(self) -> None:
        if self._backlog is not None:
            self._backlog.cancel()
        if self._loop is not None and not self._sock.closed:
            self._loop.remove_reader(self._sock.getsockopt(zmq.FD))
        self._sock.close()

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()
