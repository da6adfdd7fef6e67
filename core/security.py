"""Who may talk to a node over ZeroMQ, and what each caller may do.

With ``[security] curve = true`` every front socket of a node (broker,
storage) is a CurveZMQ server: traffic is encrypted, and pyzmq's own ZAP
handler (``zmq.auth``, a thread beside the socket) admits only public keys
this node knows.  Everything else here is bookkeeping around that:

- Key pairs are pyzmq certificate files: ``NAME.key`` (public) and
  ``NAME.key_secret``, made by ``srw keys`` with ``zmq.auth.create_certificates``.
- Identities a node knows, with their rights (RIGHTS):
    node     the server key itself, used by the node's own hops (the storage
             front relaying an exec to its broker, ``srw serve``'s readiness
             check): every right; it relays only what it checked itself;
    scripts  ``scripts_key``: the storage handle scripts use: read and write;
    proxy    ``proxy_key``: the HTTP proxy: ``proxy_rights``, never code;
    clients  every ``*.key`` in the ``clients`` folder: the rights in the
             certificate's metadata (``rights = "exec,read"``) unless
             ``[security.rights]`` names the client.
- The folder is scanned again every RESCAN seconds by the node's loop, so a
  certificate added or removed takes effect without a restart.  ZAP runs only
  when a connection is made, so every message is checked too (its ZAP
  ``User-Id`` against the current table): a removed client's open connection
  gets ``forbidden`` from then on.

Without curve, a node listens in plain text on loopback addresses only
(``check_listen``).
"""
from __future__ import annotations

import functools
import ipaddress
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

from core.config import RIGHTS, Config, ConfigError, NodeSettings, SecuritySettings
from core.logs import Throttle
from core.protocol import LOCAL_CALLER

log = logging.getLogger("srw.security")

DOMAIN = "srw"          # the ZAP domain of srw's server sockets
RESCAN = 1.0            # seconds between scans of the clients folder
RESCAN_SOON = 0.2       # an unknown key rescans it at once, at most this often
WARN_EVERY = 1.0        # seconds between warnings about refused keys (clients retry)
SECRET_SUFFIX = "_secret"


# Key files -----------------------------------------------------------------------

def public_path(secret_path: str | Path) -> Path:
    """keys/server.key_secret -> keys/server.key (pyzmq's naming)."""
    path = Path(secret_path)
    if path.name.endswith(SECRET_SUFFIX):
        return path.with_name(path.name[:-len(SECRET_SUFFIX)])
    return path


def load_pair(path: str | Path, what: str) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a .key_secret file, or ConfigError saying what to do."""
    public, secret = _load(path, what)
    if not secret:
        raise ConfigError(f"{what} {path} holds no secret key: give the NAME.key_secret "
                          "file (`srw keys init` makes the node's own, `srw keys new NAME` "
                          "a client's)")
    return public, secret


def load_public(path: str | Path, what: str) -> bytes:
    """The public key of a .key or .key_secret file."""
    return _load(path, what)[0]


def _load(path: str | Path, what: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{what} {path}: cannot read a key from it ({exc}); {_maker(what)} "
                          "(README \"Security\")") from None


def _maker(what: str) -> str:
    """Which command writes the key a message names: a client's comes from
    `srw keys new`, the node's own (server, scripts, proxy) from `srw keys init`."""
    if what.startswith("client"):
        return "make one with `srw keys new NAME` (it writes keys/clients/NAME.key_secret)"
    return "`srw keys init` makes the node's own keys (server, scripts, proxy)"


def write_pair(folder: str | Path, name: str, rights: tuple[str, ...] | None = None) -> Path:
    """NAME.key and NAME.key_secret in `folder` (the secret one mode 0600)."""
    os.makedirs(folder, exist_ok=True)
    metadata = {"rights": ",".join(rights)} if rights is not None else None
    public, secret = zmq.auth.create_certificates(str(folder), name, metadata)
    os.chmod(secret, 0o600)
    if metadata:  # pyzmq writes metadata into the secret file only; the node reads the public
        text = Path(public).read_text()
        Path(public).write_text(text.replace("metadata\n", f"metadata\n    rights = "
                                             f"{metadata['rights']}\n", 1))
    return Path(secret)


def certificate_rights(path: Path) -> tuple[str, ...] | None:
    """The ``rights`` entry of a certificate's metadata section, if any.  pyzmq
    writes the metadata but its loader returns only the keys."""
    section = ""
    for line in path.read_text(errors="replace").splitlines():
        text = line.split("#", 1)[0].rstrip()
        if not text:
            continue
        if not text[0].isspace():
            section = text.strip()
        elif section == "metadata" and "=" in text:
            key, value = (part.strip() for part in text.split("=", 1))
            if key == "rights":
                return parse_rights(value.strip('"'))
    return None


def parse_rights(text: str) -> tuple[str, ...]:
    words = tuple(w.strip() for w in text.split(",") if w.strip())
    unknown = [w for w in words if w not in RIGHTS]
    if unknown:
        raise ValueError(f"unknown right {unknown[0]!r} (rights: {', '.join(RIGHTS)})")
    return words


# Clients -------------------------------------------------------------------------

@dataclass(frozen=True)
class Credentials:
    """What a client socket needs: its own key pair and the server's public key."""
    public: bytes
    secret: bytes
    server: bytes

    def apply(self, sock: zmq.Socket) -> None:
        """Before connect."""
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.curve_serverkey = self.server

    @classmethod
    def from_files(cls, key: str | Path, server_key: str | Path) -> Credentials:
        public, secret = load_pair(key, "client key")
        return cls(public, secret, load_public(_public_if_there(server_key), "server key"))


def _public_if_there(path: str | Path) -> Path:
    """A client reads the server's public half; it may not have the secret one."""
    public = public_path(path)
    return public if public.exists() else Path(path)


def client_credentials(config: Config, key: str | None = None,
                       server_key: str | None = None) -> Credentials | None:
    """A client's credentials: `key` and `server_key` when given, else the
    config's ``[security] key``; None when neither is given and curve is off."""
    settings = config.security
    if key is None and not settings.curve:
        return None
    key = key or settings.key
    if not key:
        raise ConfigError(f"{config.path}: [security] curve is on: give a client key "
                          "(--key keys/clients/NAME.key_secret, or [security] key)")
    return Credentials.from_files(key, server_key or settings.server_key)


def role_credentials(config: Config, role: str) -> Credentials | None:
    """The credentials of one of the node's own identities ("node", "scripts",
    "proxy"), or None when curve is off."""
    settings = config.security
    if not settings.curve:
        return None
    path = {"node": settings.server_key, "scripts": settings.scripts_key,
            "proxy": settings.proxy_key}[role]
    public, secret = load_pair(path, f"[security] {role} key")
    return Credentials(public, secret, load_public(_public_if_there(settings.server_key),
                                                   "server key"))


# Servers -------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    name: str
    rights: frozenset[str]

    @functools.cached_property
    def ordered_rights(self) -> tuple[str, ...]:
        """Its rights in RIGHTS' order (rights_of, once per exec: made once)."""
        return tuple(r for r in RIGHTS if r in self.rights)


class Keyring:
    """A node's side: the server key, the identities it knows, the ZAP thread.

    ``secure(sock)`` before a bind; ``start(ctx)`` once per context, before
    any secured socket binds; ``identity(user_id)`` per message;
    ``refresh()`` from the node's loop (cheap until RESCAN has passed)."""

    def __init__(self, settings: SecuritySettings):
        self.settings = settings
        self.public, self.secret = load_pair(settings.server_key, "[security] server_key")
        self.node_user = self.public.decode()  # the nodes' own User-Id (is_node)
        self.fixed = {self.node_user: Identity("node", frozenset(RIGHTS))}
        for name, path, rights in (("scripts", settings.scripts_key, ("read", "write")),
                                   ("proxy", settings.proxy_key, settings.proxy_rights)):
            key = public_path(path)
            if key.exists():
                self.fixed[load_public(key, f"[security] {name} key").decode()] = \
                    Identity(name, frozenset(rights))
            else:
                log.warning("no %s key at %s: %s", name, key,
                            "scripts cannot reach the store" if name == "scripts"
                            else "the HTTP proxy cannot reach this node")
        self.clients: dict[str, Identity] = {}
        self._scanned = 0.0
        self._signature: tuple = ()
        self._auth = None  # zmq.auth.thread.ThreadAuthenticator, once started
        self._refusals = Throttle(WARN_EVERY)
        # The ZAP thread's forced rescan and the node loop's both write the table: one
        # at a time, or a slower scan of the old folder could put back a removed key.
        self._scan_lock = threading.Lock()
        self.refresh(force=True)

    def secure(self, sock: zmq.Socket) -> None:
        sock.curve_server = True
        sock.curve_publickey = self.public
        sock.curve_secretkey = self.secret
        sock.zap_domain = DOMAIN.encode()
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no ZAP handler: refuse, not admit

    def start(self, ctx: zmq.Context) -> None:
        # Here, not at the top: it imports asyncio (tens of ms), which the processes
        # that only read keys (every CLI call, the pool) never need.
        from zmq.auth.thread import ThreadAuthenticator
        self._auth = ThreadAuthenticator(ctx, log=logging.getLogger("srw.zap"))
        self._auth.start()
        self._auth.configure_curve_callback(DOMAIN, self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def callback(self, domain: str, key: bytes) -> bool:
        """zmq.auth asks, in its thread, whether a public key (z85) may connect."""
        user = key.decode("ascii", "replace")
        if self.identity(user) is None and time.monotonic() - self._scanned > RESCAN_SOON:
            self.refresh(force=True)  # a certificate just added need not wait for the loop
        known = self.identity(user) is not None
        if not known and (suppressed := self._refusals.allow(time.monotonic())) is not None:
            log.warning("refused a connection: unknown client key %s (%d more refusals "
                        "since the last warning)", key[:8].decode(), suppressed)
        return known

    def identity(self, user_id: str | None) -> Identity | None:
        if not user_id:
            return None
        return self.fixed.get(user_id) or self.clients.get(user_id)

    def refresh(self, force: bool = False) -> None:
        with self._scan_lock:
            self._refresh(force)

    def _refresh(self, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._scanned < RESCAN:
            return
        self._scanned = now
        folder = Path(self.settings.clients)
        try:
            entries = sorted((e.name, e.stat().st_mtime_ns, e.stat().st_size)
                             for e in os.scandir(folder) if e.name.endswith(".key"))
        except OSError:
            entries = []
        if entries != self._signature or force:
            self._signature = entries
            self.clients = self._load_clients(folder, entries)

    def _load_clients(self, folder: Path, entries) -> dict[str, Identity]:
        clients = {}
        for name, _, _ in entries:
            path = folder / name
            who = name[:-len(".key")]
            try:
                public = load_public(path, "client certificate").decode()
                rights = self.settings.rights.get(who)
                if rights is None:
                    rights = certificate_rights(path) or ()
            except (ConfigError, ValueError, OSError) as exc:
                log.warning("client certificate %s left out: %s", path, exc)
                continue
            clients[public] = Identity(who, frozenset(rights))
        log.info("clients: %s", ", ".join(f"{i.name} ({','.join(sorted(i.rights)) or 'no rights'})"
                                         for i in clients.values()) or "none")
        return clients

    def is_node(self, user_id: str | None) -> bool:
        """Whether the key is the nodes' own (what a storage front relays with)."""
        return user_id is not None and user_id == self.node_user

    def request_refusal(self, user_id: str | None, is_exec: bool, meta) -> str | None:
        """None if the caller may send this exec or status request (`meta`: its
        core.protocol.ExecMeta); else the message of a ``forbidden`` reply."""
        identity = self.identity(user_id)  # checked first: the refusal's text costs more
        if identity is None or not identity.rights.issuperset(rights_needed(is_exec, meta)):
            refusal = self.refusal(user_id, *rights_for(is_exec, meta))
            if refusal is not None:  # (None: the ZAP thread's rescan just added the key)
                return refusal
        if meta.caller is not None and not self.is_node(user_id):
            return "only a node of the cluster may name the caller it relays for"
        return None

    def refusal(self, user_id: str | None, needed: tuple[str, ...], what: str) -> str | None:
        """None if the caller may do `what`; else the message of a ``forbidden`` reply."""
        identity = self.identity(user_id)
        if identity is None:
            return (f"client key {(user_id or '?')[:8]}... is not (or no longer) authorized "
                    f"on this node (add its certificate to {self.settings.clients})")
        missing = [r for r in needed if r not in identity.rights]
        if not missing:
            return None
        return (f"client {identity.name!r} may not {what}: it lacks the {missing[0]!r} right "
                f"(grant it with rights in its certificate's metadata, or [security.rights] "
                f"{identity.name} = [...] in the node's config)")


def caller(keyring: Keyring | None, user: str | None, relayed: str | None, node: str) -> str:
    """Who an exec runs for (its runners are that caller's alone: a tenant is a
    caller and its code).  With curve: the client key the ZAP handler admitted,
    or, from a node's own key, the caller that node relays for, else the node
    itself (its indexing).  Without curve no one is authenticated: "local"."""
    if keyring is None:
        return LOCAL_CALLER
    if keyring.is_node(user):
        return relayed or f"node:{node}"
    return user or LOCAL_CALLER


def rights_of(keyring: Keyring | None, caller: str) -> tuple[str, ...]:
    """What the caller's scripts may do in the store (core/capability.py): its
    identity's rights; none for the node's own execs (indexing needs no store
    call); every right without curve, where no capability is checked."""
    if keyring is None:
        return RIGHTS
    identity = keyring.identity(caller)
    if identity is None or identity.name == "node":  # node:NAME, or a removed key
        return ()
    return identity.ordered_rights


def rights_needed(is_exec: bool, meta) -> tuple[str, ...]:
    """The rights a request needs; `meta` is a core.protocol.ExecMeta.  A status
    request needs only a known key."""
    if not is_exec:
        return ()
    if meta.code:
        return ("exec", "code") if meta.name else ("code",)
    return ("exec",)


def rights_for(is_exec: bool, meta) -> tuple[tuple[str, ...], str]:
    """(rights_needed, what the request does) for Keyring.refusal."""
    if not is_exec:
        what = "ask for status"
    else:
        what = "send script content" if meta.code else f"run script {meta.name!r}"
    return rights_needed(is_exec, meta), what


def keyring(config: Config) -> Keyring | None:
    return Keyring(config.security) if config.security.curve else None


# Plain text ----------------------------------------------------------------------

def check_listen(config: Config, node: NodeSettings) -> None:
    """Without curve, a node's TCP endpoints must be loopback addresses: anyone
    who reaches them could run code and read every key, in clear text."""
    if config.security.curve:
        return
    for key in ("broker", "storage"):
        endpoint = getattr(node, key)
        if endpoint.startswith("tcp://") and not is_loopback(endpoint):
            raise ConfigError(
                f"{config.path}: node {node.name}: {key} {endpoint} is not a loopback address "
                "and [security] curve is off, so anyone who reaches it could run code and "
                "read every key in clear text; listen on 127.0.0.1, or enable CurveZMQ "
                "([security] curve = true; README \"Security\")")


def is_loopback(endpoint: str) -> bool:
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # "*", an interface name, a host name: not provably loopback
        return False
