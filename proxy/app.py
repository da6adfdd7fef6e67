"""HTTP front-end: the aiohttp application (DESIGN.md "HTTP proxy", "Statuses").

    POST   /elliptics?exec&name=NAME[&id=HEX|&key=KEY][&groups=1:2]   run a named script
    POST   /elliptics?upload&name=KEY[&index=1[&lang=L]]              write (and index) the body
    GET    /elliptics?search=QUERY[&limit=N&offset=N&lang=L&raw=1&timeout=S]  search, JSON
    GET    /elliptics?name=KEY                                        read
    DELETE /elliptics?name=KEY                                        remove
    GET    /ping      200 when every role (broker, pool, storage) of every node answers,
                      else 503; a line per node names what is down
    GET    /status    the nodes and their workers as HTML reloading itself every
                      ?refresh=N s, or JSON (Accept: application/json or ?format=json)
    GET    /metrics   Prometheus metrics of every node and of the proxy (proxy/metrics.py)

An exec with one target answers the script's ``__return_data`` as the body;
with several, ``multipart/mixed`` with one part per node (``X-Srw-Node``,
``X-Srw-Group``, ``X-Srw-Status``).  A status other than ok becomes the HTTP
code of ``HTTP_STATUS`` with a plain-text message.  HTTP clients name scripts
only: the proxy never sends script content, and the configured cookies reach
the script as the bound variable ``__cookie_string``, never as code.
"""
from __future__ import annotations

import asyncio
import json
import logging

from aiohttp import MultipartWriter, web

from core import protocol as p
from broker.client import Result
from runtime.scripts import ScriptNameError, check_name
from core import security
from core.config import Config
from core.exits import UsageError
from core.ids import BadId, parse_id
from storage.router import Route

from . import metrics, status_page
from .cluster import Cluster, DataStore, storage_errors

log = logging.getLogger("srw.proxy")

HTTP_STATUS = {
    p.OK: 200, p.SCRIPT_ERROR: 500, p.TIMEOUT: 504, p.MEMORY: 507, p.KILLED: 500,
    p.OUTPUT_TOO_LARGE: 413, p.NOT_FOUND: 404, p.BAD_REQUEST: 400, p.FORBIDDEN: 403,
    p.BUSY: 503, p.UNAVAILABLE: 503,
}

CLUSTER = web.AppKey("cluster", Cluster)
DATA = web.AppKey("data", DataStore)
CONFIG = web.AppKey("config", Config)
REQUESTS = metrics.COUNTS  # counted by the server's access logger (proxy/server.py)

OCTETS = "application/octet-stream"


class HTTPProblem(Exception):
    """A request we answer with `code` and a plain-text message."""

    def __init__(self, code: int, message: str, close: bool = False):
        super().__init__(message)
        self.code, self.message, self.close = code, message, close


def text(code: int, message: str, headers: dict | None = None) -> web.Response:
    return web.Response(status=code, text=message.rstrip("\n") + "\n", headers=headers)


# Query parameters -------------------------------------------------------------

def _query(request: web.Request, allowed: tuple[str, ...]) -> dict[str, str]:
    return query_dict(request.rel_url.query, allowed)


def query_dict(query, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query (a URL's MultiDict) as a plain dict; unknown or repeated
    parameters are a 400."""
    out = {}
    for key, value in query.items():
        if key not in allowed:
            raise HTTPProblem(400, f"unknown query parameter {key[:40]!r}; this request "
                                   f"takes {', '.join(allowed)}")
        if key in out:
            raise HTTPProblem(400, f"query parameter {key!r} given twice")
        out[key] = value
    return out


def _name(query: dict[str, str], what: str) -> str:
    name = query.get("name")
    if not name:
        raise HTTPProblem(400, f"missing name=: give the {what}, e.g. "
                               "/elliptics?exec&name=test_script.py")
    return name


def _route(cluster: Cluster, query: dict[str, str]) -> Route:
    """Where an exec's id=, key= and groups= send it (storage/router.py)."""
    if "id" in query and "key" in query:
        raise HTTPProblem(400, "give id= or key=, not both")
    if "id" in query:
        try:  # checked before groups=, as it always was
            parse_id(query["id"])
        except BadId as exc:
            raise HTTPProblem(400, str(exc)) from None
    groups = _groups(cluster, query.get("groups"))
    try:
        return cluster.route(query.get("id"), query.get("key"), groups)
    except BadId as exc:  # redis-cluster: an exec by id
        raise HTTPProblem(400, str(exc)) from None


MAX_GROUPS_CHARS = 1024  # room for ~200 groups each named once; a group named twice runs once


def _groups(cluster: Cluster, raw: str | None) -> list[int] | None:
    if raw is None:
        return None
    if len(raw) > MAX_GROUPS_CHARS:
        raise HTTPProblem(400, f"groups= is {len(raw)} characters long, at most "
                               f"{MAX_GROUPS_CHARS}: name each group once, e.g. groups=1:2")
    try:
        groups = [int(g) for g in raw.split(":")]
    except ValueError:
        raise HTTPProblem(400, f"bad groups={raw[:40]!r}: use group numbers joined by ':', "
                               "e.g. groups=1:2") from None
    unknown = [g for g in groups if g not in cluster.groups]
    if unknown:
        raise HTTPProblem(400, f"group {unknown[0]} is not served here (groups: "
                               f"{', '.join(map(str, cluster.groups))})")
    return groups  # duplicates collapse in Ring.select_groups: one exec per group


def _cookie_string(request: web.Request, names: tuple[str, ...]) -> str:
    """The configured cookies present in the request, as `name=value` joined by '; '."""
    if not names:
        return ""
    jar = request.cookies
    return "; ".join(f"{name}={jar[name]}" for name in names if name in jar)


async def _body(request: web.Request) -> bytes:
    """The whole body, within proxy.max_body and proxy.body_timeout (else 413, 408)."""
    settings = request.app[CONFIG].proxy
    _check_length(request, settings.max_body)
    content = request.content
    if content.is_eof():  # all in already (most requests): no timer, no read loop
        data = content.read_nowait()
        if len(data) > settings.max_body:  # a chunked body (no Content-Length to check)
            raise HTTPProblem(413, _too_large(settings.max_body), close=True)
        return data
    try:
        async with asyncio.timeout(settings.body_timeout):
            return await request.read()
    except web.HTTPRequestEntityTooLarge:  # a chunked body that outgrew the limit
        raise HTTPProblem(413, _too_large(settings.max_body), close=True) from None
    except TimeoutError:
        raise HTTPProblem(408, f"request body not complete within {settings.body_timeout:g} s "
                               "(proxy.body_timeout)", close=True) from None


def _check_length(request: web.Request, limit: int) -> None:
    if request.content_length is not None and request.content_length > limit:
        # Answer before reading the body, and close: never drain gigabytes.
        raise HTTPProblem(413, _too_large(limit), close=True)


def _too_large(limit: int) -> str:
    return f"request body larger than {limit} bytes (proxy.max_body)"


async def expect_continue(request: web.Request):
    """`Expect: 100-continue`: refuse an oversized body before the client sends it."""
    try:
        _check_length(request, request.app[CONFIG].proxy.max_body)
    except HTTPProblem as exc:
        return _problem_response(exc)
    if request.version != (1, 1):
        return None
    expect = request.headers.get("Expect", "").lower()
    if expect != "100-continue":
        return text(417, f"unknown Expect: {expect[:40]!r}; only 100-continue is understood")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    request.writer.output_size = 0  # the interim line is not part of the response
    return None


# Exec -------------------------------------------------------------------------

def exec_target(cluster: Cluster, query) -> tuple[Route, str]:
    """(where, script name) of an exec, from its URL's query; HTTPProblem if bad.
    The one check of an exec's query, for this handler and proxy/fastexec.py."""
    query = query_dict(query, ("exec", "name", "id", "key", "groups"))
    name = _name(query, "script name")
    try:
        check_name(name)
    except ScriptNameError as exc:
        raise HTTPProblem(400, str(exc)) from None
    return _route(cluster, query), name


async def exec_script(request: web.Request) -> web.StreamResponse:
    cluster = request.app[CLUSTER]
    route, name = exec_target(cluster, request.rel_url.query)
    data = await _body(request)
    cookie = _cookie_string(request, request.app[CONFIG].proxy.cookies)
    results = await cluster.exec(route, name, data, cookie)
    if len(results) == 1:
        return single_reply(results[0])
    return multipart_reply(results)


def node_headers(r: Result) -> dict[str, str]:
    return {"X-Srw-Node": r.node, "X-Srw-Group": str(r.group), "X-Srw-Status": r.status}


def describe(r: Result) -> str:
    """A failed result in words: status, node, then the node's own explanation."""
    error = (r.error or "no further detail").rstrip()
    sep = "\n" if "\n" in error else " "
    return f"{r.status} on node {r.node} (group {r.group}):{sep}{error}\n"


def single_reply(r: Result) -> web.Response:
    if r.ok:
        return web.Response(body=r.data, content_type=OCTETS, headers=node_headers(r))
    return text(HTTP_STATUS.get(r.status, 500), describe(r), node_headers(r))


def multipart_reply(results: list[Result]) -> web.Response:
    """One part per node; the HTTP status is 200, each part carries its own status."""
    writer = MultipartWriter("mixed")
    for r in results:
        if r.ok:
            writer.append(r.data, {"Content-Type": OCTETS, **node_headers(r)})
        else:
            writer.append(describe(r).encode(), {"Content-Type": "text/plain; charset=utf-8",
                                                 **node_headers(r)})
    return web.Response(body=writer)


# Data -------------------------------------------------------------------------

async def read_key(request: web.Request) -> web.Response:
    key = _name(_query(request, ("name",)), "key")
    data = await _storage(request.app[DATA].read(key), "read", key)
    return web.Response(body=data, content_type=OCTETS)


async def upload_key(request: web.Request) -> web.Response:
    query = _query(request, ("upload", "name", "index", "lang"))
    key = _name(query, "key")
    if query.get("index", "0") not in ("0", "1"):
        raise HTTPProblem(400, "index= must be 1 (index the body for search) or 0")
    if "lang" in query and query.get("index") != "1":
        raise HTTPProblem(400, "lang= is for an indexed write (index=1)")
    data = await _body(request)
    try:
        results = await _storage(request.app[DATA].write(
            key, data, query.get("index") == "1", query.get("lang")), "write", key)
    except UsageError as exc:  # a lang that is no configured language
        raise HTTPProblem(400, str(exc)) from None
    return _per_group_reply(f"wrote {len(data)} B to {key[:80]!r}", f"write of {key[:80]!r}",
                            results, {p.OK})


async def remove_key(request: web.Request) -> web.Response:
    key = _name(_query(request, ("name",)), "key")
    results = await _storage(request.app[DATA].remove(key), "remove", key)
    if results and all(r.status == p.NOT_FOUND for r in results):
        raise HTTPProblem(404, f"no key {key[:80]!r} in any group")
    return _per_group_reply(f"removed {key[:80]!r}", f"remove of {key[:80]!r}", results,
                            {p.OK, p.NOT_FOUND})


async def search(request: web.Request) -> web.Response:
    """JSON {"hits": [{"key", "score", "snippet", "parts"}], "count", "partial",
    "failures"}, best first; 400 for a query that cannot be run."""
    query = _query(request, ("search", "limit", "offset", "lang", "raw", "timeout"))
    terms = query["search"]
    if not terms.strip():
        raise HTTPProblem(400, "search= is empty: give words, \"a phrase\" or a prefix*")
    limit, offset = _number(query, "limit", 10), _number(query, "offset", 0)
    timeout = _number(query, "timeout", None, float)
    if query.get("raw", "0") not in ("0", "1"):
        raise HTTPProblem(400, "raw= must be 1 (FTS5 syntax) or 0 (plain text)")
    try:
        hits = await _storage(request.app[DATA].search(
            terms, limit, offset, timeout, query.get("lang"), query.get("raw") == "1"),
            "search", terms)
    except ValueError as exc:  # BadQuery, or a limit out of range
        raise HTTPProblem(400, str(exc)) from None
    return web.Response(text=json.dumps({"hits": hits, "count": hits.count,
                                         "partial": hits.partial,
                                         "failures": hits.failures}, ensure_ascii=False),
                        content_type="application/json")


def _number(query: dict[str, str], name: str, default, kind=int):
    if name not in query:
        return default
    try:
        return kind(query[name])
    except ValueError:
        raise HTTPProblem(400, f"bad {name}={query[name][:20]!r}: give a number") from None


async def _storage(call, verb: str, key: str):
    """Await a storage call; its NotFound is a 404, StorageUnavailable a 503, any
    other StorageError (redis-cluster: a script stored a list there, or more
    than the proxy reads) a 502."""
    not_found, unavailable, refused = storage_errors()
    try:
        return await call
    except not_found:
        raise HTTPProblem(404, f"no key {key[:80]!r} in any group") from None
    except unavailable as exc:
        raise HTTPProblem(503, f"cannot {verb} {key[:80]!r}: {exc}") from None
    except refused as exc:
        raise HTTPProblem(502, f"cannot {verb} {key[:80]!r}: {exc}") from None


def _per_group_reply(done: str, what: str, results: list[Result], fine: set[str]):
    """200 when every group did it; else the first failure's code. Both list every group."""
    if not results:
        return text(503, f"{what} failed: no group serves it")
    lines = "\n".join(f"group {r.group} node {r.node}: {r.status}"
                      + (f": {r.error}" if r.error else "") for r in results)
    failed = [r for r in results if r.status not in fine]
    if failed:
        return text(HTTP_STATUS.get(failed[0].status, 500),
                    f"{what} failed in {len(failed)} of {len(results)} groups\n{lines}")
    return text(200, f"{done} in {len(results)} group(s)\n{lines}")


# Ping and status --------------------------------------------------------------

async def ping(request: web.Request) -> web.Response:
    """200 when every role of every node answers (broker, pool, storage), else
    503; a line per node either way, what is down first."""
    nodes = await request.app[CLUSTER].ping()
    lines = [f"node {node.name} (group {node.group}): "
             + "; ".join([f"DOWN: {d}" for d in down] + (["up: " + ", ".join(up)] if up else []))
             for node, up, down in nodes]
    failing = sum(bool(down) for _, _, down in nodes)
    if failing:
        return text(503, f"{failing} of {len(nodes)} nodes have a role down\n" + "\n".join(lines))
    return text(200, f"ok: {len(nodes)} of {len(nodes)} nodes answer\n" + "\n".join(lines))


async def status(request: web.Request) -> web.Response:
    try:
        kind, refresh = _status_view(request)
    except HTTPProblem as exc:
        return _problem_response(exc)
    nodes = await request.app[CLUSTER].status()
    if kind == "json":
        return web.Response(text=status_page.status_json(nodes), content_type="application/json")
    return web.Response(text=status_page.status_html(nodes, refresh), content_type="text/html")


def _status_view(request: web.Request) -> tuple[str, int]:
    """("json" or "html", seconds between reloads) from the query and Accept."""
    query = _query(request, ("refresh", "format"))
    try:
        refresh = status_page.parse_refresh(query.get("refresh"))
    except ValueError as exc:
        raise HTTPProblem(400, str(exc)) from None
    wants_json = "application/json" in request.headers.get("Accept", "")
    kind = query.get("format") or ("json" if wants_json else "html")
    if kind not in ("json", "html"):
        raise HTTPProblem(400, f"bad format={kind[:20]!r}: give json or html")
    return kind, refresh


async def prometheus(request: web.Request) -> web.Response:
    nodes = await request.app[CLUSTER].status()
    return metrics.exposition(nodes, request.app[REQUESTS])


# Dispatch ---------------------------------------------------------------------

ACTIONS = {
    ("POST", "exec"): exec_script,
    ("POST", "upload"): upload_key,
    ("GET", ""): read_key,
    ("GET", "search"): search,
    ("HEAD", ""): read_key,
    ("DELETE", ""): remove_key,
}


async def elliptics(request: web.Request) -> web.StreamResponse:
    query = request.rel_url.query
    actions = [a for a in ("exec", "upload", "search") if a in query]
    if len(actions) > 1:
        return text(400, f"give {actions[0]} or {actions[1]}, not both")
    action = actions[0] if actions else ""
    if request.method == "POST" and not action:
        return text(400, "POST needs ?exec (run a script) or ?upload (write the body)")
    handler = ACTIONS.get((request.method, action))
    if handler is None:
        return text(405, _method_hint(request.method, action), {"Allow": "GET, POST, DELETE"})
    try:
        return await handler(request)
    except HTTPProblem as exc:
        return _problem_response(exc)
    except Exception as exc:  # a bug or a storage failure: one answer, the details in the log
        log.exception("%s %s failed", request.method, request.rel_url)
        return text(500, f"internal error in the proxy: {type(exc).__name__}: {exc} "
                         "(the proxy log has the traceback)")


def _method_hint(method: str, action: str) -> str:
    if action:
        return f"{action} needs {'GET' if action == 'search' else 'POST'}, not {method}"
    return f"{method} is not supported here; use GET, POST or DELETE"


def _problem_response(exc: HTTPProblem) -> web.Response:
    response = text(exc.code, exc.message)
    if exc.close:
        response.force_close()
    return response


# The application --------------------------------------------------------------

def make_app(config: Config) -> web.Application:
    """The proxy's aiohttp application for `config`; clients connect at startup."""
    requests = metrics.RequestCounts()
    app = web.Application(client_max_size=config.proxy.max_body)
    app[CONFIG] = config
    app[REQUESTS] = requests
    curve = security.role_credentials(config, "proxy")  # the proxy's own key: never "code"
    app[CLUSTER] = Cluster(config, curve)
    app[DATA] = DataStore(config, curve)
    app.router.add_route("*", "/elliptics", elliptics, expect_handler=expect_continue)
    app.router.add_get("/ping", ping)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", prometheus)
    app.on_startup.append(_start)
    app.on_cleanup.append(_stop)
    return app


async def _start(app: web.Application) -> None:
    app[CLUSTER].start()


async def _stop(app: web.Application) -> None:
    await app[CLUSTER].close()
    app[DATA].close()
