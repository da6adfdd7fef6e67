"""The HTTP exec fast path: a plain ``POST /elliptics?exec...`` answered without
aiohttp's per-request machinery.

    Connection.data_received (proxy/bounds.py) -> aiohttp's parser -> one whole request
      -> FastExec.take: plain? and checked by app.exec_target, as the handler checks it
      -> a task: Cluster.exec -> the response's bytes, written to the transport
      -> the access line and the request counts (proxy/server.py), the gate's idle clock

aiohttp answers a request in its connection's ``start()`` loop: a future to wake
it, a task per request, a ``web.Request``, routing, a ``StreamWriter``, a
``web.Response`` whose headers are built in a multidict, ``finish_response``
and the access logger: about a third of the proxy's own CPU per exec
(measured under wrk against the proxy before this path, README).  Here the parsed message is taken before ``start()`` wakes: one
task runs the exec and one ``transport.write`` sends status line, headers
and body together.  What the client sees is what the handler would send
(the same status, headers and body; tests/test_proxy*.py hold either path to it).

Only plain requests come here; anything else goes the generic way, which
has every rule and every error message:
- not ``POST /elliptics?exec...``, not HTTP/1.1 keep-alive, an ``Expect`` or
  ``Cookie`` header (when ``proxy.cookies`` names some), a body not all in
  yet (its ``body_timeout`` is the handler's), chunked, or over ``max_body``;
- a query the checks refuse (the handler answers the 400), several targets;
- a client that does not read its replies (the transport's buffer is over
  its high-water mark: aiohttp's response waits for it to drain);
- requests pipelined behind another (more than one in a read, or one
  arriving while an exec is in flight: it waits for the reply, then
  ``start()`` takes it).
"""
from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from http import HTTPStatus

from aiohttp import hdrs
from aiohttp.http import SERVER_SOFTWARE, HttpVersion11

from broker.client import Result
from storage.router import Route

from . import server
from .app import CLUSTER, CONFIG, HTTP_STATUS, OCTETS, REQUESTS, HTTPProblem, describe, \
    exec_target, node_headers

log = logging.getLogger("srw.proxy")

PATH = "/elliptics"
PREFIX = PATH + "?"
TEXT = "text/plain; charset=utf-8"
TARGETS_KEPT = 4096       # targets remembered by the request's path and query ...
TARGET_CHARS_KEPT = 256   # ... up to this long: memory stays bounded whatever clients send
HEADS_KEPT = 256          # response heads by (code, type, node headers): nodes x statuses
SERVER = f"Server: {SERVER_SOFTWARE}\r\n\r\n".encode()  # as aiohttp's responses say


class FastExec:
    """Answers the plain execs of one proxy application (see the module's docstring)."""

    def __init__(self, app):
        self.cluster = app[CLUSTER]
        settings = app[CONFIG].proxy
        self.max_body = settings.max_body
        self.cookies = bool(settings.cookies)  # configured: a Cookie header goes the long way
        self.counts = app[REQUESTS]
        # lmdb: a ring never changes, so the same query is the same target (a
        # slot map moves: nothing kept); a query is then parsed and checked once.
        self.keep = not self.cluster.router.moves
        self.kept: dict[str, tuple[Route, str]] = {}  # request path -> target, oldest first
        self._date = (0, b"")
        self._heads: dict[tuple, bytes] = {}  # status line to Content-Type, made once

    def target(self, path: str, url) -> tuple[Route, str]:
        """exec_target of the request's query; HTTPProblem if bad (never kept)."""
        found = self.kept.get(path)
        if found is None:
            query = url.query
            if "exec" not in query:  # not an exec at all: app.elliptics says why
                raise HTTPProblem(400, "not an exec")
            found = exec_target(self.cluster, query)
            if self.keep and len(path) <= TARGET_CHARS_KEPT:
                if len(self.kept) >= TARGETS_KEPT:
                    del self.kept[next(iter(self.kept))]
                self.kept[path] = found
        return found

    def take(self, conn, message, payload) -> bool:
        """Start answering `message` on `conn` and return True, or return False
        and leave it to aiohttp (and proxy/app.py)."""
        if getattr(message, "method", None) != "POST" or not message.path.startswith(PREFIX) \
                or message.version != HttpVersion11 or message.should_close \
                or message.chunked or message.upgrade or not payload.is_eof():
            return False
        headers = message.headers
        if hdrs.EXPECT in headers or (self.cookies and hdrs.COOKIE in headers):
            return False
        length = headers.get(hdrs.CONTENT_LENGTH)
        if length is not None and not (length.isdigit() and int(length) <= self.max_body):
            return False
        try:
            route, name = self.target(message.path, message.url)
        except HTTPProblem:
            return False
        if len(route.nodes) != 1:
            return False
        conn.fast_started(asyncio.get_running_loop().create_task(
            self._answer(conn, message, route, name, payload.read_nowait())))
        return True

    async def _answer(self, conn, message, route, name: str, data: bytes) -> None:
        started = time.perf_counter()
        try:
            result = (await self.cluster.exec(route, name, data, ""))[0]
            status, head, body = self.reply(result)
        except Exception as exc:  # a bug: one answer, as app.elliptics gives it
            log.exception("POST %s failed", message.path)
            status, head, body = internal_error(exc)
        seconds = time.perf_counter() - started
        conn.fast_finished(head + body)
        self.counts.add("POST", PATH, status, seconds)
        server.access_line(conn.remote, "POST", message.url, 1, 1, status, len(body),
                           seconds * 1e6)

    def reply(self, r: Result) -> tuple[int, bytes, bytes]:
        """(status, head, body) as app.single_reply answers `r`."""
        if r.ok:
            return 200, self.head(200, OCTETS, r, len(r.data)), r.data
        return self.text(HTTP_STATUS.get(r.status, 500), describe(r), r)

    def text(self, code: int, message: str, r: Result | None = None
             ) -> tuple[int, bytes, bytes]:
        body = (message.rstrip("\n") + "\n").encode()
        return code, self.head(code, TEXT, r, len(body)), body

    def head(self, code: int, content_type: str, r: Result | None, length: int) -> bytes:
        """The response's head; its first lines, the same for every reply of one
        node, status and type, are made once (a few us an exec)."""
        which = (code, content_type) if r is None else (code, content_type, r.node, r.group,
                                                         r.status)
        start = self._heads.get(which)
        if start is None:
            node = "" if r is None else "".join(f"{name}: {value}\r\n"
                                                for name, value in node_headers(r).items())
            start = (f"HTTP/1.1 {code} {HTTPStatus(code).phrase}\r\n{node}Content-Type: "
                     f"{content_type}\r\n").encode()
            if len(self._heads) < HEADS_KEPT:
                self._heads[which] = start
        return start + b"Content-Length: %d\r\n" % length + self.date() + SERVER

    def date(self) -> bytes:
        """The Date header, made once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode())
        return self._date[1]


def internal_error(exc: Exception) -> tuple[int, bytes, bytes]:
    """The 500 of a bug, made of nothing that could fail in turn."""
    body = (f"internal error in the proxy: {type(exc).__name__}: {exc} (the proxy log has "
            "the traceback)\n").encode(errors="replace")
    return 500, (f"HTTP/1.1 500 Internal Server Error\r\nContent-Type: {TEXT}\r\n"
                 f"Content-Length: {len(body)}\r\n").encode() + SERVER, body
