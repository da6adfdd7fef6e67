"""The ``srw`` command.  Every subcommand takes --config (default ./config.toml)
and exits non-zero with a one-line reason on failure."""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time

from core import config as cfg
from core import logs
from core import exits
from core.exits import UsageError

EXAMPLES = """examples:
  srw serve                                   start the nodes of ./config.toml
  echo -n hi | srw exec test_script.py --id 0123456789 --data -
  srw exec '' --code '__return_data = "x" * 3'
  srw status --scripts                        pools, workers and executions per script
  srw reload / srw resize 4 / srw stop      a running serve, through its control socket
  srw scripts push examples/scripts/count.py && srw scripts list   scripts kept in the cluster
  echo -n value | srw write mykey --data -
  srw read mykey
  srw remove mykey
  srw write doc1 --data notes.txt --index && srw search '"exact phrase" OR pref*'
  srw keys init && srw keys new alice --rights exec,read   CurveZMQ keys (README "Security")
  srw exec test_script.py --key keys/clients/alice.key_secret
"""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.command == "keys":  # makes files; needs no config
            return args.func(args)
        config = cfg.load(args.config)
        return args.func(config, args)
    except cfg.ConfigError as exc:
        print(f"srw: {exc}", file=sys.stderr)
        return exits.CONFIG
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # one line for what the user can act on; a bug keeps its traceback
        from broker.client import BrokerUnavailable
        from core.ids import BadId
        from srw.pushed import PushError
        from storage.client import StorageError
        if isinstance(exc, (BrokerUnavailable, BadId, UsageError, PushError, OSError,
                            StorageError)):
            print(f"srw: {exc}", file=sys.stderr)
            return exits.FAILED
        raise


class _Version(argparse.Action):
    """--version: the version is read only when asked (core.__version__ is lazy:
    importlib.metadata would slow every srw process's start)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from core import __version__
        print(f"srw {__version__}")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    # --config is accepted before and after the subcommand; the subcommand's
    # copy must not overwrite a value given before it with its default.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=argparse.SUPPRESS,
                        help="config file (default: ./config.toml)")
    common.add_argument("--key", dest="client_key", default=argparse.SUPPRESS, metavar="FILE",
                        help="this client's CurveZMQ key, NAME.key_secret (default: the "
                             "config's [security] key)")
    top = argparse.ArgumentParser(
        prog="srw", description="srw: run your own Python next to your data.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--config", default="config.toml",
                     help="config file (default: ./config.toml)")
    top.add_argument("--version", action=_Version, nargs=0)
    top.add_argument("--key", dest="client_key", default=None, metavar="FILE",
                     help="this client's CurveZMQ key, NAME.key_secret (default: the "
                          "config's [security] key)")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", parents=[common],
                           help="start every node of the config in the foreground")
    serve.add_argument("--node", action="append", metavar="NAME",
                       help="start only this node (repeatable); the HTTP proxy is then "
                            "not started unless --proxy is given")
    serve.add_argument("--proxy", action="store_true",
                       help="with --node: start the HTTP proxy too (one per cluster)")
    serve.set_defaults(func=cmd_serve)

    ex = sub.add_parser("exec", parents=[common], help="run a script on the cluster",
                        description="Run a named script (and/or --code) on the owner of "
                        "--id/--key in each group, or on every node when neither is given. "
                        "Prints each result's data; exits 1 if any result is not ok.")
    ex.add_argument("name", help="script file name in the history directory ('' for none)")
    target = ex.add_mutually_exclusive_group()
    target.add_argument("--id", help="hex id of the target (zero-padded on the right)")
    target.add_argument("--for", dest="for_key", metavar="KEY",
                        help="run on the owner of this key (its sha512 picks the target)")
    ex.add_argument("--data", metavar="FILE|-", help="request data from a file, or - for stdin")
    ex.add_argument("--code", default="", help="script content, run before the named script")
    ex.add_argument("--groups", help="only these groups, e.g. 1:2")
    ex.add_argument("--timeout", type=seconds, help="seconds (default: broker.request_timeout)")
    ex.add_argument("--json", action="store_true", help="print results as a JSON array")
    ex.set_defaults(func=cmd_exec)

    status = sub.add_parser("status", parents=[common], help="show every node's pool")
    status.add_argument("--scripts", action="store_true",
                        help="also each node's executions per script, by status, with "
                             "p50/p99 of their ok replies")
    status.set_defaults(func=cmd_status)

    reload = sub.add_parser("reload", parents=[common], help="roll every pool (like SIGHUP)",
                            description="Ask the running `srw serve` of this config (through "
                            "[serve] control) to re-read the config and python.init and roll "
                            "every pool: a new worker is READY before an old one retires. A "
                            "failing python.init or config keeps the old workers; then it "
                            "exits 1 and names the node and the reason.")
    reload.set_defaults(func=cmd_reload)
    resize = sub.add_parser("resize", parents=[common], help="set the live worker count",
                            description="Set each pool (or --node's) to N workers without a "
                            "restart (TTIN/TTOU add or retire one); waits until the nodes "
                            "report N live workers. A pool serve restarts after a crash "
                            "keeps N; the next `srw serve` starts at pool.workers.")
    resize.add_argument("size", type=int, metavar="N")
    resize.add_argument("--node", metavar="NAME", default="", help="only this node")
    resize.add_argument("--wait", type=float, default=30.0,
                        help="seconds to wait for the new size (default 30; 0: do not wait)")
    resize.set_defaults(func=cmd_resize)
    stop = sub.add_parser("stop", parents=[common], help="stop the running srw serve",
                          description="Stop the `srw serve` of this config like SIGTERM: "
                          "new requests get 'unavailable', those in flight are answered, "
                          "then every process exits. Waits until it has.")
    stop.add_argument("--wait", type=float, default=60.0,
                      help="seconds to wait for it to exit (default 60)")
    stop.set_defaults(func=cmd_stop)

    scripts = sub.add_parser("scripts", help="named scripts kept in the cluster itself",
                             description="push: store scripts (and python.init) in the "
                             "cluster, versioned; every node's serve writes them into its "
                             "history dir within 2 s (at once for the serves of this host), "
                             "and rolls its pools for a new python.init; each push takes the "
                             "next sequence, and a node never takes an older one. list: each "
                             "node's sequence, and the version and sha256 of each pushed "
                             "script, as on its disk.")
    scripts_sub = scripts.add_subparsers(dest="scripts_command", required=True,
                                         metavar="ACTION")
    push = scripts_sub.add_parser("push", parents=[common], help="store scripts in the cluster")
    push.add_argument("files", nargs="+", metavar="FILE",
                      help="stored under its file name (a plain script name)")
    push.add_argument("--init", action="store_true",
                      help="FILE (one) is python.init, whatever its name")
    push.set_defaults(func=cmd_scripts_push)
    listing = scripts_sub.add_parser("list", parents=[common],
                                     help="each node's pushed scripts: sequence, version "
                                          "and sha256")
    listing.add_argument("--json", action="store_true",
                         help='print {node: {"sequence", "map_sha256", "scripts": {name: '
                              '[version, sha256]}} or {"error": ...}}')
    listing.set_defaults(func=cmd_scripts_list)

    proxy = sub.add_parser("proxy", parents=[common],
                           help="run the HTTP proxy alone against a running cluster")
    proxy.set_defaults(func=cmd_proxy)

    write = sub.add_parser("write", parents=[common], help="store a value in every group",
                           description="Store the value under KEY on its owner in every "
                           "group; exits 1 if any group did not store it.")
    write.add_argument("key", metavar="KEY")
    write.add_argument("--data", metavar="FILE|-", help="the value from a file, or - for stdin")
    write.add_argument("--index", action="store_true",
                       help="also index the value for full-text search (history/index.py)")
    write.add_argument("--lang", help="with --index: stem the document's words with this "
                       "stemmer (english, russian, en, ru, none), kept with it; by default "
                       "each word by its script's")
    write.set_defaults(func=cmd_write)
    search = sub.add_parser("search", parents=[common], help="full-text search of indexed values",
                            description="Search every node's index; best first. The query is "
                            "plain text: words (stemmed: foxes finds fox), \"a phrase\", "
                            "e-mail (a phrase of e and mail), prefix*, -excluded, a OR b; "
                            "--raw takes SQLite FTS5's own syntax. Prints score, key and "
                            "snippet per hit (terms in bold on a terminal, in [brackets] "
                            "otherwise), or JSON with --json. Exits 1 when nothing matches, "
                            "2 when the query cannot be run or a node failed (the other "
                            "nodes' hits are printed).")
    search.add_argument("query", metavar="QUERY")
    search.add_argument("--limit", type=int, default=10, help="hits at most (default 10)")
    search.add_argument("--offset", type=int, default=0, help="hits to skip (default 0)")
    search.add_argument("--lang", help="stem every word with this stemmer (english, russian, "
                        "en, ru, none); by default each word by its script's")
    search.add_argument("--raw", action="store_true", help="the query is FTS5 syntax, "
                        "run as given against the stemmed terms")
    search.add_argument("--timeout", type=float, help="seconds each node may search "
                        "(default [search] timeout); past it a node answers what it has")
    search.add_argument("--json", action="store_true",
                        help='print {"hits": [{"key", "score", "snippet", "parts"}], "count", '
                        '"partial", "failures"}')
    search.set_defaults(func=cmd_search)
    read = sub.add_parser("read", parents=[common], help="print a value (raw bytes)")
    read.add_argument("key", metavar="KEY")
    read.set_defaults(func=cmd_read)
    remove = sub.add_parser("remove", parents=[common], help="remove a key from every group")
    remove.add_argument("key", metavar="KEY")
    remove.set_defaults(func=cmd_remove)

    keys = sub.add_parser("keys", help="make CurveZMQ key pairs (README \"Security\")",
                          description="Key pairs for [security] curve = true: NAME.key "
                          "(public) and NAME.key_secret (mode 0600), pyzmq certificates.")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    init = keys_sub.add_parser("init", help="the node's own keys and secrets: server, scripts, "
                               "proxy, push.secret, Redis passwords",
                               description="Write server, scripts and proxy key pairs, "
                               "push.secret and the Redis passwords (as `srw keys redis`) into "
                               "DIR, the defaults of [security] server_key, scripts_key, "
                               "proxy_key, push_secret and redis_secret; refuses to overwrite "
                               "any.")
    init.add_argument("--dir", default="keys", help="folder (default: keys)")
    init.set_defaults(func=cmd_keys_init)
    redis = keys_sub.add_parser(
        "redis", help="Redis passwords and the redis.conf every Redis node starts with",
        description="For cluster.engine = \"redis-cluster\": write redis.secret (the password "
        "of the Redis user srw and its scripts log in as: no admin, dangerous or Lua commands), "
        "redis-admin.secret (Redis's default user: the operator's, for redis-cli; no srw process "
        "reads it) and redis.conf (start each Redis node with it: redis-server DIR/redis.conf "
        "--port 7000 ...), mode 0600; refuses to overwrite any.")
    redis.add_argument("--dir", default="keys", help="folder (default: keys)")
    redis.add_argument("--user", default="srw",
                       help="the Redis user srw logs in as ([security] redis_user; default: srw)")
    redis.set_defaults(func=cmd_keys_redis)
    new = keys_sub.add_parser("new", help="one key pair, e.g. a client's",
                              description="Write NAME.key and NAME.key_secret into DIR. A "
                              "client's public NAME.key goes into [security] clients "
                              "(default keys/clients); give NAME.key_secret to the client.")
    new.add_argument("name", metavar="NAME")
    new.add_argument("--dir", default="keys/clients",
                     help="folder (default: keys/clients, where nodes look for clients)")
    new.add_argument("--rights", default="exec",
                     help="comma-separated, written into the certificate: exec (named "
                          "scripts), code (script content), read, write (default: exec)")
    new.set_defaults(func=cmd_keys_new)

    roles = (("broker", "run one node's broker alone", cmd_broker),
             ("pool", "run one node's worker pool alone", cmd_pool),
             ("storage", "run one node's storage front-end alone", cmd_storage))
    for role, text, func in roles:
        p = sub.add_parser(role, parents=[common], help=text)
        p.add_argument("--node", required=True, metavar="NAME")
        p.set_defaults(func=func)

    from fs.cli import register  # `srw fs ...` and `srw mount`
    register(sub, common, _session)
    return top


def seconds(text: str) -> float:
    """--timeout: a finite number of seconds above 0 (float() takes inf and nan)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"{text!r}: give a finite number of seconds above 0")
    return value


def parse_groups(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(g) for g in text.split(":")]
    except ValueError:
        raise UsageError(f"bad --groups {text!r}: use group numbers joined by ':', e.g. 1:2")


def read_data(source: str | None) -> bytes:
    if source is None:
        return b""
    if source == "-":
        return sys.stdin.buffer.read()
    with open(source, "rb") as f:
        return f.read()


def cmd_serve(config: cfg.Config, args) -> int:
    from proxy.cluster import allowed_groups
    from srw.serve import Child, Supervisor, child_argv
    allowed_groups(config)  # a bad [proxy] groups stops here, not in a restart loop
    logs.setup(config.log, "serve")
    nodes = [config.node(n) for n in args.node] if args.node else list(config.nodes)
    _check_history(config)
    for node in nodes:  # bad keys or plain text off loopback: stop here, with the reason
        _check_security(config, node)
    for node in nodes:
        os.makedirs(node.data_dir, exist_ok=True)
    # One proxy per cluster: a cluster spread over several `serve --node` processes
    # must not start one in each (they would fight over proxy.listen).
    with_proxy = not args.node or args.proxy
    if with_proxy:  # with curve on, the proxy's key must be there
        from core import security
        security.role_credentials(config, "proxy")
    extra = [Child("proxy", "", child_argv("proxy", config))] if with_proxy else []
    return Supervisor(config, nodes, extra=extra, every_node=not args.node).run(with_proxy)


def _check_history(config: cfg.Config) -> None:
    if not os.path.isdir(config.pool.history_dir):
        raise cfg.ConfigError(f"{config.path}: pool.history_dir {config.pool.history_dir} is "
                              "not a directory; it holds python.init and the scripts clients "
                              "name (create it, or point pool.history_dir at it)")


def _check_security(config: cfg.Config, node: cfg.NodeSettings) -> None:
    from core import security
    security.check_listen(config, node)
    security.role_credentials(config, "node")


def _session(config: cfg.Config, args=None):
    """The cluster, with the node's own limit on message size (Config.max_message),
    and the client key of --key (default: [security] key)."""
    from storage.client import Session
    return Session(config, max_message=config.max_message, key=getattr(args, "client_key", None))


def cmd_keys_init(args) -> int:
    from core import redis_auth, secrets, security
    for name in ("server", "scripts", "proxy"):
        _refuse_overwrite(args.dir, name)
    secret = os.path.join(args.dir, "push.secret")
    for path in (secret, *(os.path.join(args.dir, f) for f in (
            redis_auth.SECRET, redis_auth.ADMIN_SECRET, redis_auth.CONF))):
        if os.path.exists(path):
            raise OSError(f"{path} exists; remove it first to make a new one")
    for name in ("server", "scripts", "proxy"):
        print(f"wrote {security.write_pair(args.dir, name)} and its public {name}.key")
    print(f"wrote {secrets.write_secret(secret)} (signs `srw scripts push`; give every node "
          "and pusher the same file)")
    _write_redis_secrets(args.dir, "srw")
    print("next: srw keys new NAME --rights exec,read (a client); then [security] curve = true")
    return 0


def cmd_keys_redis(args) -> int:
    _write_redis_secrets(args.dir, args.user)
    return 0


def _write_redis_secrets(folder: str, user: str) -> None:
    from core import redis_auth
    secret, admin, conf = redis_auth.write_secrets(folder, user)
    print(f"wrote {secret} (Redis user {user}: srw and its scripts), {admin} (Redis's "
          f"default user: yours, for REDISCLI_AUTH) and {conf} (start every Redis node with "
          f"it first: redis-server {conf} --port ...)")


def cmd_keys_new(args) -> int:
    from core import security
    try:
        rights = security.parse_rights(args.rights)
    except ValueError as exc:
        print(f"srw: --rights: {exc}", file=sys.stderr)
        return 2
    _refuse_overwrite(args.dir, args.name)
    secret = security.write_pair(args.dir, args.name, rights)
    print(f"wrote {secret} (give it to the client) and {args.name}.key beside it "
          f"(rights: {','.join(rights) or 'none'})")
    return 0


def _refuse_overwrite(folder: str, name: str) -> None:
    path = os.path.join(folder, f"{name}.key_secret")
    if os.path.exists(path):
        raise OSError(f"{path} exists; remove it first to make a new key pair")


def cmd_exec(config: cfg.Config, args) -> int:
    data = read_data(args.data)
    with _session(config, args) as session:
        results = session.exec(args.name, data, args.code, id=args.id, key=args.for_key,
                               groups=parse_groups(args.groups), timeout=args.timeout)
    if args.json:
        print(json.dumps([r.to_json() for r in results]))
    else:
        for r in results:
            sys.stdout.buffer.write(r.data)
        sys.stdout.flush()
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"srw: node {r.node} (group {r.group}): {r.status}: {summary(r.error or '')}",
              file=sys.stderr)
    return 1 if failed else 0


def summary(error: str) -> str:
    """A script's traceback in one line: its last line, and where it was raised."""
    lines = error.strip().splitlines()
    if not lines:
        return ""
    frames = [line.strip() for line in lines if line.startswith('  File "')]
    if not frames:
        return lines[-1]
    # '  File "/srv/history/name.py", line 3, in <module>' -> name.py, line 3
    path, _, rest = frames[-1][len('File "'):].partition('", ')
    return f"{lines[-1]} ({os.path.basename(path)}, {rest.split(', in ')[0]})"


def _report(results, quiet_status: str = "") -> int:
    """Failures on stderr, one line each; exit status 1 if any."""
    failed = [r for r in results if not r.ok and r.status != quiet_status]
    for r in failed:
        print(f"srw: node {r.node} (group {r.group}): {r.status}: {r.error}", file=sys.stderr)
    return 1 if failed else 0


def cmd_write(config: cfg.Config, args) -> int:
    if args.lang is not None and not args.index:
        raise UsageError("--lang is for an indexed write (--index)")
    data = read_data(args.data)
    with _session(config, args) as session:
        results = session.write(args.key, data, index=args.index, lang=args.lang)
    for r in results:
        if r.ok and r.data:  # an indexed write that was stored but not indexed says why
            print(f"srw: node {r.node} (group {r.group}): {r.data.decode()}", file=sys.stderr)
    return _report(results)


SEARCH_NOTHING = 1       # srw search found nothing (like grep)
SEARCH_FAILED = 2        # srw search: the query cannot be run, or a node failed (the
                         # other nodes' hits are printed), as grep's 2 for errors
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # never sent to a terminal as is


def cmd_search(config: cfg.Config, args) -> int:
    from storage.client import BadQuery
    with _session(config, args) as session:
        try:
            hits = session.search(args.query, args.limit, args.offset, timeout=args.timeout,
                                  lang=args.lang, raw=args.raw)
        except BadQuery as exc:
            print(f"srw: bad_request: {exc}", file=sys.stderr)
            return SEARCH_FAILED
    if args.json:
        print(json.dumps({"hits": hits, "count": hits.count, "partial": hits.partial,
                          "failures": hits.failures}, ensure_ascii=False))
    else:
        marks = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("[", "]")
        for hit in hits:
            snippet = "".join(_CONTROL.sub(" ", part) if i % 2 == 0 else
                              marks[0] + _CONTROL.sub(" ", part) + marks[1]
                              for i, part in enumerate(hit["parts"]))
            print(f"{hit['score']:.3f}\t{_CONTROL.sub('?', hit['key'])}\t{snippet}")
    for failure in hits.failures:
        print(f"srw: search incomplete: {failure}", file=sys.stderr)
    if hits.unindexed:
        print(f"srw: search incomplete: {hits.unindexed} slots are not indexed yet (a node "
              "is indexing slots it took, a shard fails over, or the srw node beside a "
              "master is down or has no storage address)", file=sys.stderr)
    elif hits.partial and not hits.failures:
        print("srw: search incomplete: a node reached its deadline (--timeout) and answered "
              "what it had ranked by then", file=sys.stderr)
    if hits.failures:
        return SEARCH_FAILED
    if not hits:
        print(f"srw: no matches for {args.query[:80]!r}"
              + (f" past the first {args.offset}" if args.offset and hits.count else ""),
              file=sys.stderr)
        return SEARCH_NOTHING
    if not args.json:
        print(f"srw: {hits.count} match{'' if hits.count == 1 else 'es'}; {args.offset + 1} "
              f"to {args.offset + len(hits)} shown", file=sys.stderr)
    return 0


def cmd_read(config: cfg.Config, args) -> int:
    from storage.client import NotFound
    with _session(config, args) as session:
        try:
            value = session.read(args.key)
        except NotFound as exc:
            print(f"srw: {exc}", file=sys.stderr)
            return 1
    sys.stdout.buffer.write(value)
    sys.stdout.flush()
    return 0


def cmd_remove(config: cfg.Config, args) -> int:
    from core.protocol import NOT_FOUND
    with _session(config, args) as session:
        results = session.remove(args.key)
    if all(r.status == NOT_FOUND for r in results):
        print(f"srw: key {args.key!r} not found in any group", file=sys.stderr)
        return 1
    return _report(results, quiet_status=NOT_FOUND)


def cmd_status(config: cfg.Config, args) -> int:
    from broker.stats import uptime_text
    with _session(config, args) as session:
        nodes = session.status()
        beside = session.router.beside()
    print(f"{'node':10} {'group':>5} {'workers':>7} {'busy':>5} {'queued':>6} "
          f"{'served':>9} {'restarts':>8} {'p50 us':>7} {'p99 us':>7}  uptime"
          + ("      beside" if beside else ""))
    for n in nodes:
        if "error" in n:
            print(f"{n['name']:10} {n['group']:>5} {n['error']}")
            continue
        lat = n["latency_us"]
        print(f"{n['name']:10} {n['group']:>5} {n['workers']:>7} {n['busy']:>5} "
              f"{n['queued']:>6} {n['served']:>9} {n['restarts']:>8} {lat['p50']:>7} "
              f"{lat['p99']:>7}  {uptime_text(n['uptime'])}"
              + (f"  {beside.get(n['name'], '')}" if beside else ""))
    print("p50/p99: of each node's last ok replies (up to 2000); errors and timeouts are "
          "counted, not timed")
    if args.scripts:
        for n in nodes:
            if "error" not in n:
                _print_scripts(n)
    return 1 if any("error" in n for n in nodes) else 0


def _print_scripts(node: dict) -> None:
    """A node's per-script table; p50/p99 estimated from its latency buckets."""
    from broker.stats import bucket_quantile
    print(f"\nnode {node['name']} (group {node['group']}): scripts since its broker started, "
          "p50/p99 of ok replies from latency buckets")
    print(f"{'script':30} {'execs':>9} {'ok':>9} {'p50 us':>8} {'p99 us':>8}  other statuses")
    bounds = node["latency_buckets_us"]
    for name, s in sorted(node["scripts"].items()):
        statuses = s["statuses"]
        p50, p99 = (bucket_quantile(s["buckets"], bounds, q) for q in (0.5, 0.99))
        others = ", ".join(f"{k} {v}" for k, v in sorted(statuses.items()) if k != "ok")
        shown = name if name.isprintable() else ascii(name)  # names come from clients
        print(f"{shown:30} {sum(statuses.values()):>9} {statuses.get('ok', 0):>9} "
              f"{'-' if p50 is None else p50:>8} {'-' if p99 is None else p99:>8}  "
              f"{others or '-'}")


def _control(config: cfg.Config, command: str) -> list[str]:
    """Send a command to every running `srw serve` of this config (srw/control.py);
    the replies that say ok.  Raises UsageError with the reason when none does."""
    ok, errors = _control_replies(config, command)
    if not ok:
        raise UsageError("; ".join(errors))
    return ok


def _control_replies(config: cfg.Config, command: str,
                     timeout: float = 5.0) -> tuple[list[str], list[str]]:
    """(replies that say ok, the others and the serves that did not answer), of
    every running `srw serve` of this config; UsageError when there is none."""
    from srw.control import ControlUnavailable, send, socket_path, socket_paths
    if not config.serve.control:
        raise UsageError(f"{config.path}: [serve] control is off; use signals instead "
                         "(HUP reload, TTIN/TTOU resize, TERM stop)")
    paths = socket_paths(config)
    if not paths:
        raise UsageError(f"no srw serve of {config.path} is running (no control socket "
                         f"at {socket_path(config)})")
    ok, errors = [], []
    for path in paths:
        try:
            reply = send(path, command, timeout)
        except ControlUnavailable as exc:
            errors.append(str(exc))
            continue
        (ok if reply.startswith("ok") else errors).append(reply.removeprefix("ok: ")
                                                          .removeprefix("error: "))
    return ok, errors


def cmd_scripts_push(config: cfg.Config, args) -> int:
    from core import security
    from srw import pushed
    if args.init and len(args.files) != 1:
        raise UsageError("--init takes one FILE: the python.init to push")
    files = {}
    for path in args.files:
        name = pushed.INIT if args.init else os.path.basename(path)
        if os.path.getsize(path) > pushed.MAX_SCRIPT:  # before reading it whole
            raise UsageError(f"{path}: larger than {pushed.MAX_SCRIPT} bytes")
        with open(path, "rb") as f:
            files[name] = f.read()
        pushed.check(name, files[name])
    floor = _pushed_floor(config, args)
    store = pushed.ScriptStore(config, security.client_credentials(config, args.client_key),
                               timeout=5.0)
    try:
        stored, errors, replaced = store.push(files, floor)
    finally:
        store.close()
    for name in files:
        script = stored.scripts[name]
        print(f"{name}: version {script.version}, sha256 {script.sha256}")
    print(f"sequence {stored.seq}")
    for error in errors:
        print(f"srw: not stored on {error}", file=sys.stderr)
    for why in replaced:
        print(f"srw: replaced a stored map this push could not build on ({why}); push "
              "again the other scripts it held (the nodes keep running them)", file=sys.stderr)
    try:
        replies = _control(config, "sync")
    except UsageError as exc:  # no serve of this config here: the nodes poll
        print(f"srw: {exc}; running nodes take it within {pushed.SYNC_EVERY:g} s")
        return 1 if errors else 0
    behind = 0
    for reply in replies:  # "NODES: sequence N, ...": a node that refused it says why
        if f"sequence {stored.seq}," in reply:
            print(f"srw: {reply}")
            continue
        behind += 1  # its store lacks this push: "up to date" would read as a success
        print(f"srw: {reply.replace('up to date', 'nothing newer in its store')}; not at "
              f"sequence {stored.seq}", file=sys.stderr)
    return 1 if errors or behind else 0


def _pushed_floor(config: cfg.Config, args) -> tuple[int, str]:
    """The newest (sequence, map sha256) the running nodes took, from their
    manifests: a push must not build on an older map (srw/pushed.py)."""
    from broker.client import BrokerUnavailable
    from srw import pushed
    from storage.client import StorageError
    try:
        with _session(config, args) as session:
            results = session.exec(pushed.MANIFEST, timeout=5.0)
    except (BrokerUnavailable, StorageError, OSError) as exc:  # what the store holds is all we know
        print(f"srw: could not ask the nodes which map they run ({exc})", file=sys.stderr)
        return 0, ""
    silent = [r.node for r in results if not r.ok and r.status != "not_found"]
    if silent:  # those may have taken a newer map than the store shows
        print(f"srw: {', '.join(silent)} did not say which map they run", file=sys.stderr)
    return max((pushed.taken_by(r.data) for r in results if r.ok), default=(0, ""))


def cmd_scripts_list(config: cfg.Config, args) -> int:
    from srw import pushed
    with _session(config, args) as session:
        results = session.exec(pushed.MANIFEST)
    shown, failed = {}, 0
    for r in results:
        if r.status == "not_found":  # nothing pushed has reached this node
            shown[r.node] = {"sequence": 0, "scripts": {}}
            continue
        try:
            shown[r.node] = json.loads(r.data) if r.ok else {"error": f"{r.status}: "
                                                               f"{summary(r.error or '')}"}
            if r.ok and not isinstance(shown[r.node], dict):
                raise TypeError("not an object")
            if r.ok and not {"sequence", "scripts"} <= set(shown[r.node]):
                shown[r.node] = {"error": "the node's manifest is of an older srw; push again"}
        except (ValueError, TypeError):
            shown[r.node] = {"error": "the node's manifest answered no JSON object"}
        failed += "error" in shown[r.node]
    if args.json:
        print(json.dumps(shown))
        return 1 if failed else 0
    print(f"{'node':12} {'sequence':>8} {'script':30} {'version':>7}  sha256")
    for node, taken in shown.items():
        if "error" in taken:
            print(f"{node:12} {'-':>8} {'-':30} {'-':>7}  {taken['error']}")
            continue
        for name, (version, digest) in sorted(taken["scripts"].items()):
            print(f"{node:12} {taken['sequence']:>8} {name:30} {version:>7}  {digest}")
    return 1 if failed else 0


def cmd_reload(config: cfg.Config, args) -> int:
    """Exits 1 when any pool refused (systemctl reload then fails too): each
    serve's reply names the node and the reason."""
    from core.timeouts import RELOAD_CLIENT_WAIT
    ok, refused = _control_replies(config, "reload", RELOAD_CLIENT_WAIT)
    for reply in ok:
        print(f"srw: {reply}")
    for reply in refused:
        print(f"srw: {reply}", file=sys.stderr)
    return 1 if refused else 0


def cmd_resize(config: cfg.Config, args) -> int:
    for reply in _control(config, f"resize {args.size} {args.node}".strip()):
        print(f"srw: {reply}", flush=True)
    deadline = time.monotonic() + args.wait
    with _session(config, args) as session:
        while args.wait > 0:
            nodes = [n for n in session.status() if n["name"] == (args.node or n["name"])]
            sizes = {n["name"]: n.get("workers") for n in nodes}
            if all(size == args.size for size in sizes.values()):
                print(f"srw: {len(sizes)} node(s) at {args.size} live workers")
                return 0
            if time.monotonic() > deadline:
                print(f"srw: not every node at {args.size} workers after {args.wait:g} s: "
                      + ", ".join(f"{k} {v}" for k, v in sizes.items()), file=sys.stderr)
                return 1
            time.sleep(0.2)
    return 0


def cmd_stop(config: cfg.Config, args) -> int:
    deadline = time.monotonic() + args.wait
    for reply in _control(config, "stop"):
        pid = int(reply.rsplit("pid ", 1)[1].rstrip(")"))
        print(f"srw: {reply}; waiting for it to answer what is in flight and exit", flush=True)
        if not _exited_by(pid, deadline):
            print(f"srw: pid {pid} still runs after {args.wait:g} s", file=sys.stderr)
            return 1
    print("srw: stopped")
    return 0


def _exited_by(pid: int, deadline: float) -> bool:
    """Wait for `pid` to exit, until `deadline`: woken by its exit (a pidfd),
    not at a poll interval."""
    import select
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    except OSError:  # no pidfd (Linux < 5.3): poll
        while _running(pid):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True
    try:
        while _running(pid):  # readable once it exited (a zombie too)
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([fd], [], [], left)
        return True
    finally:
        os.close(fd)


def _running(pid: int) -> bool:
    """Alive and not a zombie (which waits for its parent, not for us)."""
    import psutil
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _supervised() -> None:
    """Started by `srw serve`: die with it, never outlive it.  SIGHUP, TTIN and
    TTOU concern only a pool (which sets its own handlers); they must not stop
    (or, TTIN/TTOU's default, suspend) the other roles."""
    for sig in (signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU):
        signal.signal(sig, signal.SIG_IGN)
    supervisor = os.environ.get(cfg.SUPERVISOR_ENV)
    if supervisor:
        from runtime.sandbox import die_with_parent
        die_with_parent(signal.SIGTERM)
        if os.getppid() != int(supervisor):
            sys.exit(1)


def cmd_broker(config: cfg.Config, args) -> int:
    import setproctitle
    from broker.broker import Broker
    node = config.node(args.node)
    setproctitle.setproctitle(f"srw: broker {node.name}")
    logs.setup(config.log, f"broker {node.name}", buffered=True)
    _supervised()
    try:
        _check_security(config, node)
    except cfg.ConfigError as exc:
        print(f"srw: node {node.name} refuses to start: {exc}", file=sys.stderr)
        return exits.REFUSED
    os.makedirs(node.data_dir, exist_ok=True)
    Broker(config, node).run()
    return 0


def cmd_pool(config: cfg.Config, args) -> int:
    from runtime import pool
    node = config.node(args.node)
    logs.setup(config.log, f"pool {node.name}")
    _supervised()
    # Where python.init's storage handles find the cluster (storage.handle).
    os.environ[cfg.CONFIG_ENV] = str(config.path)
    os.environ[cfg.NODE_ENV] = node.name   # and whose index n.search asks
    try:
        _check_history(config)
        return pool.main(config, args.node)
    except cfg.ConfigError as exc:
        print(f"srw: node {node.name} refuses to start: {exc}", file=sys.stderr)
        return exits.REFUSED


def cmd_proxy(config: cfg.Config, args) -> int:
    import setproctitle
    setproctitle.setproctitle("srw: proxy")  # before the imports: serve's callers look for it
    from proxy.app import make_app
    from proxy.fastexec import FastExec
    from proxy.server import run
    logs.setup(config.log, "proxy", buffered=True)
    _supervised()
    app = make_app(config)
    return run(app, config.proxy.listen, limits=config.proxy, fast=FastExec(app))


def cmd_storage(config: cfg.Config, args) -> int:
    import setproctitle
    from storage.engine import engine_class
    node = config.node(args.node)
    engine = engine_class(config)
    if "storage" not in engine.roles_of(node):
        print(f'srw: node {node.name} has no storage role with cluster.engine = '
              f'"{config.cluster.engine}": its data is in Redis ({node.redis}), and it has '
              "no storage address for a search front-end", file=sys.stderr)
        return exits.REFUSED
    setproctitle.setproctitle(f"srw: storage {node.name}")
    logs.setup(config.log, f"storage {node.name}")
    _supervised()
    try:
        _check_security(config, node)
        os.makedirs(node.data_dir, exist_ok=True)
        storage = engine.storage_node()(config, node)
    except Exception as exc:  # lmdb.Error, zmq.ZMQError (address in use), OSError
        print(f"srw: node {node.name} refuses to start: storage at {node.storage}, "
              f"store in {node.data_dir}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return exits.REFUSED
    storage.run()
    return 0
