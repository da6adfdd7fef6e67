"""Run an aiohttp application as the ``srw: proxy`` process.

``run(app, listen)`` is the one piece of server machinery: HTTP/1.1 with
keep-alive, an access log line per request with the time taken
(``127.0.0.1 "POST /elliptics?exec&name=x HTTP/1.1" 200 79 B 812 us``, logger
``srw.proxy.access`` at info) and the application's request counts for /metrics
(``metrics.COUNTS``) kept by the same hook, SIGTERM or SIGINT to stop (requests in flight
are answered first), and the bounds of ``proxy.bounds`` (header timeout,
connection cap, throttled accept errors, raised open-files limit) from the
``[proxy]`` settings given.  The benchmark runs its bare handler through the
same function, so the two are compared on equal terms.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

import uvloop
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from core import logs, timeouts
from core.config import ProxySettings

from .bounds import Gate, raise_fd_limit
from .metrics import COUNTS, RequestCounts

MAX_LINE = 64 * 1024      # request line: a 10 kB script name gets our own 400, not the parser's
BACKLOG = 1024
# Objects the collector lets accumulate before a young collection (Python's default: 700).
# A request's objects go by reference counting; the default still ran a collection
# every ~70 HTTP execs, ~20 us CPU per exec in all (measured with gc.callbacks under
# wrk); at 20,000 none ran in 13k requests, and cyclic garbage stays bounded.
GC_THRESHOLD = 20_000


ACCESS = logging.getLogger("srw.proxy.access")
access_line = logs.HotLine(ACCESS, '%s "%s %s HTTP/%d.%d" %d %d B %d us')


class AccessLog(AbstractAccessLogger):
    """Called by aiohttp once per response: the application's request counts
    (``counts``, for /metrics) and an access line at info, put in the log
    buffer unformatted (core.logs.HotLine; aiohttp's own logger parses its
    format on every line)."""
    counts: RequestCounts | None = None  # set in a subclass per application (serve)

    @property
    def enabled(self) -> bool:
        return True  # every response is counted, whatever the log level

    def log(self, request, response, time: float) -> None:
        if self.counts is not None:
            self.counts.answered(request, response.status, time)
        size = response.content_length
        access_line(request.remote, request.method, request.rel_url, request.version.major,
                    request.version.minor, response.status,
                    response.body_length if size is None else size, time * 1e6)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    try:
        return host.strip("[]") or "127.0.0.1", int(port)
    except ValueError:
        raise ValueError(f"bad listen address {listen!r}: use HOST:PORT") from None


async def serve(app: web.Application, listen: str, ready=None,
                limits: ProxySettings | None = None, fast=None) -> None:
    """Serve `app` on `listen` (HOST:PORT) until SIGTERM or SIGINT, within the
    header_timeout and max_connections of `limits` (default: the defaults);
    `fast`, if given, answers the requests it takes past aiohttp (proxy/fastexec.py)."""
    limits = limits or ProxySettings()
    host, port = split_listen(listen)
    # The keyword arguments of each connection's web.RequestHandler (made by the gate).
    counting = type("AccessLog", (AccessLog,), {"counts": app.get(COUNTS)})
    handler_args = dict(access_log=ACCESS, access_log_class=counting, max_line_size=MAX_LINE,
                        # A body the handler refused to read (413) is not drained
                        # for seconds: the connection closes after the answer.
                        lingering_time=0)
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=timeouts.PROXY_SHUTDOWN)
    raise_fd_limit(limits.max_connections)
    await runner.setup()
    loop = asyncio.get_running_loop()
    gate = None
    try:
        # The gate listens, not a web.TCPSite; the runner's Server still
        # manages the connections (and closes them at cleanup).
        gate = Gate(runner.server, handler_args, limits.header_timeout, limits.max_connections,
                    fast)
        await gate.listen(host, port, BACKLOG)
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready:
            ready()
        flusher = loop.create_task(_flush_logs())
        await stop.wait()
        flusher.cancel()
    finally:
        if gate is not None:
            gate.close()  # no new connections; the runner closes and drains the rest
        await runner.cleanup()
        logs.flush()


async def _flush_logs() -> None:
    """The access log is buffered (core.logs): write it out while requests come."""
    while True:
        await asyncio.sleep(logs.BUFFER_SECONDS)
        logs.flush()


def run(app: web.Application, listen: str, title: str = "srw: proxy",
        limits: ProxySettings | None = None, stock_loop: bool = False, fast=None) -> int:
    """Blocking: set the process title, serve, return an exit status.
    `stock_loop`: asyncio's own event loop instead of uvloop (a benchmark's
    baseline as stock aiohttp runs it); `fast` as for serve."""
    import setproctitle
    setproctitle.setproctitle(title)

    def ready():
        print(f"{title} listening on http://{listen}", flush=True)

    # What start-up made (modules, the app) lives as long as the process: out of
    # the collector's way; and young collections far less often (GC_THRESHOLD).
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD)
    try:
        # uvloop: transports, callbacks and timers in C where asyncio's are
        # Python, and much of a request's cost is loop work (read, write, wake).
        loop_factory = None if stock_loop else uvloop.new_event_loop
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(serve(app, listen, ready, limits, fast))
    except OSError as exc:  # the port is taken, or the address is not ours
        print(f"{title} cannot listen on {listen}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0
