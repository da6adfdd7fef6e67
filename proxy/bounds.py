"""What one HTTP client can make the proxy hold: connections, time, log lines.

aiohttp's server has neither a header read timeout nor a connection limit,
so the proxy listens through its own protocol factory, a ``Gate``:

- Each accepted socket gets a ``Connection`` (aiohttp's ``RequestHandler``
  with a few hooks) while fewer than ``[proxy] max_connections`` are open.
- A connection with no request in progress (just accepted, or between two
  requests of a keep-alive connection) is *idle*.  The gate keeps the idle
  ones in arrival order, each with the time by which its next request's
  headers must be complete (``header_timeout`` after the accept or the end
  of the previous response), and one timer for the whole gate closes those
  past it.  Bytes arriving do not push the deadline back: a client sending
  its headers a byte at a time is closed like a silent one.  Nothing is
  scheduled per request: a request takes its connection out of the
  ordered dict and its response puts it back.
- At the limit, a new connection closes the longest-idle one and takes its
  place, so silent connections cannot lock clients out (a client's request
  arrives within milliseconds of its connect, long before it is the
  longest idle); when every connection has a request in progress, the new
  one is answered 503 and closed at once.  Either way the process keeps its
  file descriptors: open connections stay at max_connections, plus those
  accepted in the last loop turn (ACCEPT_BATCH at most) until they are let
  in or closed.
- The gate accepts on the listening socket itself, with public asyncio
  calls (``add_reader``, ``connect_accepted_socket``): asyncio's own accept
  loop (Python 3.11 here; fixed upstream by cpython gh-151615), when accept()
  fails for lack of descriptors, reports it and schedules a retry once for
  every connection waiting, and each retry does so again: measured here,
  the failed accepts a second (and the timers) grew by ~1,000 every second.
  Here a failed accept closes the longest-idle connection (its descriptor
  serves the next accept) and pauses accepting for 10 ms, or for a second
  when no connection is idle.
- Failed accepts, the gate's own closings and malformed requests (which
  aiohttp logs as errors with a traceback each: ~40 times the bytes of a
  garbage request) are logged at most once a second, with a count of the
  lines left out.  Each request still has its access log line.

The body's own timeout (``body_timeout``) is the handler's: see
``proxy.app._body``.

What this relies on in aiohttp's server (``web_protocol.py``, the same in
these respects in 3.9.5 and 3.14.5; tests/test_proxy_bounds.py exercises each):
- ``web.RequestHandler(manager, loop=..., **kwargs)`` is the asyncio protocol
  of one connection and takes the keyword arguments ``web.AppRunner``
  passes on; it reports itself to ``manager`` (the runner's ``web.Server``)
  in ``connection_made``/``connection_lost``, so the runner's cleanup
  closes and drains our connections as it would its own;
- it calls ``manager.request_factory(message, payload, protocol, writer,
  task)`` (the Server's public attribute, read when the handler is made)
  once per request, when it starts handling it (headers complete, or a
  parse error to answer), and its ``finish_response(request, response,
  start_time)`` once per request, when the response has been written;
- ``force_close()`` closes the connection (its ``start()`` loop ends);
- a request it cannot parse is answered 400 and reported through its
  ``log_exception(..., exc_info=HttpProcessingError)``.

The fast path (``Connection.data_received``, proxy/fastexec.py) relies on
more of it, as in 3.14.5 (tests/test_proxy.py's fast-path tests exercise
each): ``data_received`` parses into the deque ``_messages`` and wakes
``start()`` through the future ``_waiter`` (None while ``start()`` is busy);
``_request_count`` counts the requests parsed; ``_request_in_progress`` and
``_handler_waiter`` are what a shutdown waits on; ``start()`` moves
``_next_keepalive_close_time`` after each response; ``writing_paused`` is
true while the transport's buffer is over its high-water mark.
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time
from collections import OrderedDict

from aiohttp import web
from aiohttp.http import HttpProcessingError

log = logging.getLogger("srw.proxy")

FD_RESERVE = 64      # descriptors besides client connections: log, ZeroMQ, data sessions, ...
ACCEPT_BATCH = 128   # accepts per loop turn at most: a flood of connects cannot hold the loop
RETRY_SOON = 0.01    # s before accepting again after a failed accept closed an idle connection
RETRY_LATER = 1.0    # ... when it could not (asyncio's own delay)

_REFUSAL = b"proxy.max_connections reached and every connection is busy; try again\n"
REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain; charset=utf-8\r\n"
           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(_REFUSAL), _REFUSAL))


class Throttled:
    """A warning that may recur a thousand times a second: logged at most once
    per `period` seconds; the occurrences left out are counted and reported
    in one line at the end of the period."""

    def __init__(self, message: str, detail: str = "", period: float = 1.0):
        self.message, self.detail, self.period = message, detail, period
        self.quiet_until = 0.0
        self.left_out = 0
        self.last: tuple = ()

    def __call__(self, *args) -> None:
        """One occurrence; `args` fill `detail` (formatted only when logged)."""
        now = time.monotonic()
        if now >= self.quiet_until:
            self.quiet_until = now + self.period
            log.warning("%s" + (": " + self.detail if self.detail else ""), self.message, *args)
            return
        if not self.left_out:
            asyncio.get_running_loop().call_later(self.quiet_until - now, self._report)
        self.left_out += 1
        self.last = args

    def _report(self) -> None:
        count, self.left_out = self.left_out, 0
        self.quiet_until = time.monotonic() + self.period
        log.warning("%s: %d more time(s) in the last %g s"
                    + (", the last: " + self.detail if self.detail else ""),
                    self.message, count, self.period, *self.last)


class Connection(web.RequestHandler):
    """aiohttp's handler of one connection, counted and timed by its gate."""

    def __init__(self, gate: Gate, **kwargs):
        super().__init__(gate.server, loop=gate.loop, **kwargs)
        self.gate = gate
        self.counted = True  # in gate.open; cleared by the gate's release()
        self.fast: asyncio.Task | bool | None = None  # the fast path's exec in flight
        self.remote = "?"

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, (tuple, list)) else str(peer)
        if not self.counted:  # the gate closed it to make room before it was made
            self.force_close()

    def data_received(self, data: bytes) -> None:
        """aiohttp parses; a plain exec is the fast path's (gate.fast), anything
        else wakes start() as aiohttp would have."""
        if self.gate.fast is None:
            return super().data_received(data)
        waiter, self._waiter = self._waiter, None  # start()'s, while it waits for a request
        try:
            super().data_received(data)
        finally:
            self._waiter = waiter
        if self.fast is not None:  # in order: start() waits until its reply is written
            return
        # A client that does not read its replies (the transport's buffer is
        # full) is left to aiohttp, whose response waits for the buffer to drain.
        if not self.writing_paused and self._start_idle(waiter) and \
                len(self._messages) == 1 and self._take_fast():
            return
        self._wake(waiter)

    def _start_idle(self, waiter: asyncio.Future | None) -> bool:
        """start() has no request: it waits for one and was not woken, or it
        has not run yet and the one queued is the connection's first."""
        if waiter is None:
            return getattr(self, "_request_count", 0) == 1 and len(self._messages) == 1
        return not waiter.done()

    def _take_fast(self) -> bool:
        """Offer the one queued request to the fast path; True if it took it."""
        # Out of the queue while it is offered: reading its body may resume
        # reading, and call data_received again (aiohttp's resume_reading).
        message, payload = self._messages.popleft()
        self.fast = True  # meanwhile, that call leaves what it parses to wait
        try:
            taken = self.gate.fast.take(self, message, payload)
        finally:
            if self.fast is True:
                self.fast = None
        if not taken:
            self._messages.appendleft((message, payload))
        elif hasattr(self._parser, "message_consumed"):  # aiohttp >= 3.13: a parser slot
            self._parser.message_consumed()
        return taken

    def _wake(self, waiter: asyncio.Future | None) -> None:
        if self._messages and waiter is not None and not waiter.done():
            waiter.set_result(None)

    def fast_started(self, task: asyncio.Task) -> None:
        """The fast path took a request: no longer idle, and in progress (a
        shutdown waits for its reply as for the handler's)."""
        self.gate.idle.pop(self, None)
        self.fast = task
        self._request_in_progress = True

    def fast_finished(self, response: bytes) -> None:
        """Write the fast path's response; the connection waits for its next
        request (or start() takes the one that came meanwhile)."""
        self.fast = None
        self._request_in_progress = False
        shutdown = getattr(self, "_handler_waiter", None)  # aiohttp >= 3.10
        if shutdown is not None and not shutdown.done():
            shutdown.set_result(None)  # a shutdown waiting for this reply
        if self.transport is None:  # closed meanwhile: the client left, or a shutdown
            return
        self.transport.write(response)
        # aiohttp's keep-alive clock, as start() moves it after a response.
        self._next_keepalive_close_time = self._loop.time() + self._keepalive_timeout
        self.gate.waiting(self)
        self._wake(self._waiter)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.gate.release(self)
        super().connection_lost(exc)

    def log_exception(self, *args, **kw) -> None:
        exc = kw.get("exc_info")
        if isinstance(exc, HttpProcessingError):  # the client's mistake, answered 400
            message = (str(exc.message).strip() or type(exc).__name__).splitlines()[0][:200]
            peer = self.transport.get_extra_info("peername") if self.transport else None
            self.gate.malformed(message, peer[0] if peer else "?")
            return
        super().log_exception(*args, **kw)

    async def finish_response(self, *args):
        try:
            return await super().finish_response(*args)
        finally:
            if self.transport is not None:  # open: it now waits for its next request
                self.gate.waiting(self)


class Refused(asyncio.Protocol):
    """A connection over the limit while none is idle: a 503, then closed."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(REFUSED)
        transport.close()


class Gate:
    """The listening sockets and the protocol factory (see the module's docstring)."""

    def __init__(self, server: web.Server, handler_args: dict, header_timeout: float,
                 max_connections: int, fast=None):
        self.server = server
        self.fast = fast  # takes plain execs past aiohttp (proxy/fastexec.py), or None
        self.handler_args = handler_args
        self.header_timeout = header_timeout
        self.limit = max_connections
        self.loop = asyncio.get_running_loop()
        self.sockets: list[socket.socket] = []
        self.starting: set[asyncio.Task] = set()  # accepted sockets becoming connections
        self.open = 0
        # Idle connections, longest idle first -> when their next headers are due.
        # A connection enters at the back (accept, end of a response) and leaves
        # when a request starts, so the deadlines are in order.
        self.idle: OrderedDict[Connection, float] = OrderedDict()
        self.sweeper: asyncio.TimerHandle | None = None
        full = f"proxy.max_connections ({max_connections}) reached"
        self.made_room = Throttled(f"{full}: closed the longest idle connection for a new one")
        self.refused = Throttled(f"{full}: refused a connection (503), every connection is busy")
        self.malformed = Throttled("malformed request answered 400", "%s (from %s)")
        self.failed_accept = Throttled("cannot accept connections", "%s (%d connections open, "
                                       "open files limit %d)%s")
        server.request_factory = self._request_starts(server.request_factory)

    # Listening ----------------------------------------------------------------

    async def listen(self, host: str, port: int, backlog: int) -> None:
        """Listen on every address `host` resolves to, as loop.create_server would."""
        infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                            flags=socket.AI_PASSIVE)
        for family, _, _, _, address in dict.fromkeys(infos):
            sock = socket.create_server(address, family=family, backlog=backlog)
            sock.setblocking(False)
            self.sockets.append(sock)
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:  # EMFILE, ENFILE, ENOBUFS, ENOMEM, ...
                self._accept_failed(sock, exc)
                return
            task = self.loop.create_task(self._connect(conn))
            self.starting.add(task)
            task.add_done_callback(self.starting.discard)

    async def _connect(self, conn: socket.socket) -> None:
        try:  # calls self() for the protocol
            await self.loop.connect_accepted_socket(self, sock=conn)
        except OSError:  # gone before its transport was made
            conn.close()

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        room = self._make_room()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.failed_accept(exc.strerror or str(exc), self.open, soft,
                           "; closed the longest idle connection" if room else "")
        # The connection stays in the kernel's queue; try again once a descriptor is free.
        self.loop.remove_reader(sock.fileno())
        self.loop.call_later(RETRY_SOON if room else RETRY_LATER, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        if sock.fileno() >= 0:  # not closed meanwhile
            self.loop.add_reader(sock.fileno(), self._accept, sock)

    def close(self) -> None:
        """Stop listening (the connections are the runner's to close)."""
        for sock in self.sockets:
            self.loop.remove_reader(sock.fileno())
            sock.close()
        for task in self.starting:
            task.cancel()
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None

    # Connections --------------------------------------------------------------

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limit:
            if not self._make_room():
                self.refused()
                return Refused()
            self.made_room()
        self.open += 1
        conn = Connection(self, **self.handler_args)
        # Idle from now, not from connection_made: asyncio makes the protocols
        # of a burst of accepts before it calls connection_made on any of them.
        self.waiting(conn)
        return conn

    def _request_starts(self, factory):
        idle = self.idle

        def request_factory(message, payload, protocol, writer, task):
            idle.pop(protocol, None)  # its headers are in: no longer idle
            return factory(message, payload, protocol, writer, task)
        return request_factory

    def waiting(self, conn: Connection) -> None:
        """`conn` has no request in progress: its next headers are due in header_timeout."""
        due = self.loop.time() + self.header_timeout
        self.idle[conn] = due
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(due, self._sweep)

    def release(self, conn: Connection) -> None:
        """`conn` no longer counts against the limit (idempotent)."""
        if conn.counted:
            conn.counted = False
            self.open -= 1
        self.idle.pop(conn, None)

    def _close(self, conn: Connection) -> None:
        self.release(conn)  # now: its descriptor is closed in the next loop turn
        conn.force_close()

    def _make_room(self) -> bool:
        """Close the longest-idle connection; False when none is idle."""
        if not self.idle:
            return False
        self._close(next(iter(self.idle)))
        return True

    def _sweep(self) -> None:
        """Close the idle connections whose headers are overdue; wake at the next due time."""
        self.sweeper = None
        now = self.loop.time()
        while self.idle:
            conn, due = next(iter(self.idle.items()))
            if due > now:
                self.sweeper = self.loop.call_at(due, self._sweep)
                return
            self._close(conn)


def raise_fd_limit(max_connections: int) -> int:
    """Raise this process's open-files soft limit to its hard limit; warn when
    max_connections would not fit.  Returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and soft != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an infinite hard limit above nr_open
            log.debug("cannot raise the open files limit from %d to %s: %s", soft, hard, exc)
    if soft != resource.RLIM_INFINITY and max_connections + FD_RESERVE > soft:
        log.warning("proxy.max_connections = %d does not fit the open files limit (%d) with "
                    "%d to spare: accepts may fail before the cap; lower max_connections or "
                    "raise the limit (ulimit -n)", max_connections, soft, FD_RESERVE)
    return soft
