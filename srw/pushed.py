"""Named scripts kept in the cluster itself: ``srw scripts push`` and each node's sync.

    srw scripts push FILE...  ──► the store, key "srw:scripts": one msgpack map
                                  {name: [name, version, sha256, content]}
                                  (lmdb: on every node's own store; redis: one key)
                              └─► "sync" on each control socket of this host
    srw serve  ── every SYNC_EVERY s (when the stamp, the map's sha256 written
                  after it, moved), and on "sync" ──► reads the map from the store
                  (lmdb: its own nodes', and every CATCH_UP_EVERY s the others'
                  too, keeping a newer one; redis: the cluster) ──► history dir:
                  temp file + rename per changed script, then srw_scripts.py
                  (the manifest); python.init changed → its pools roll (SIGHUP)
    srw scripts list ── exec srw_scripts.py on every node ──► {name: [version, sha256]}

Why the node pulls instead of the pusher pushing to each node: the control
socket is a unix socket, reachable only on its own host, and a node that was
down during a push must still catch up.  Polling one small key every 2 s costs
a node one storage read; the "sync" a push sends to this host's serves makes
a local push take effect at once.

Each script file is replaced by a rename, so a worker reads either the old or
the new version, never half of one (it reads a script again when its mtime
or size changes).  A set of scripts pushed together is not replaced as one:
for a moment a node may run the new version of one and the old of another.

Everything read from the store is treated as hostile.  Scripts may write the
store (their handle has read and write; in redis-cluster mode `n.redis` reaches
every key), and python.init runs in the trusted pool, outside any sandbox: so
the map is stored sealed, an HMAC-SHA256 under `[security] push_secret` (a file
only the operator's pushers and nodes hold; `srw keys init` writes it) before
it, and a node checks the seal before it parses anything.  Then names must be
plain script names (runtime/scripts.py), contents at most MAX_SCRIPT bytes and
match their sha256, the map at most MAX_SCRIPTS entries.
"""
from __future__ import annotations

import ast
import hashlib
import hmac
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from runtime.scripts import ScriptNameError, check_name
from core.config import Config, NodeSettings
from core.secrets import read_secret
from storage import protocol as sp
from storage.client import (NodeUnavailable, NotFound, StorageClient, StorageError,
                            StorageUnavailable)

log = logging.getLogger("srw.pushed")

KEY = "srw:scripts"
STAMP = "srw:scripts:stamp"     # sha256 of the map, written after it: what nodes poll
INIT = "python.init"
MANIFEST = "srw_scripts.py"     # written by the sync; `srw scripts list` execs it
MAX_SCRIPT = 1 << 20            # bytes of one script
MAX_SCRIPTS = 256
MAX_MAP = 16 << 20              # bytes of the sealed map: the most a node reads
SYNC_EVERY = 2.0                # s between a node's reads of the key
CATCH_UP_EVERY = 30.0           # lmdb: s between reads of the other nodes' copies
STORE_TIMEOUT = 2.0             # s a sync waits for the store
SEAL = b"srw-push-1 "            # then the HMAC (64 hex digits), a newline, the packed map


class PushError(ValueError):
    """A script that cannot be pushed, or a map from the store that does not parse."""


@dataclass(frozen=True, slots=True)
class Pushed:
    name: str
    version: int
    sha256: str
    content: bytes

    @classmethod
    def make(cls, name: str, content: bytes, version: int) -> "Pushed":
        check(name, content)
        return cls(name, version, hashlib.sha256(content).hexdigest(), content)

    def to_list(self) -> list:
        return [self.name, self.version, self.sha256, self.content]

    @classmethod
    def from_list(cls, item) -> "Pushed":
        if not (isinstance(item, list) and len(item) == 4):
            raise PushError("a pushed script is not [name, version, sha256, content]")
        name, version, digest, content = item
        if not (isinstance(name, str) and isinstance(version, int) and version > 0
                and isinstance(digest, str) and isinstance(content, bytes)):
            raise PushError("a pushed script has fields of the wrong types")
        check(name, content)
        if hashlib.sha256(content).hexdigest() != digest:
            raise PushError(f"pushed script {name!r}: content does not match its sha256")
        return cls(name, version, digest, content)


def check(name: str, content: bytes) -> None:
    """Raises PushError unless `name` may be a pushed script of this size."""
    try:
        check_name(name)
    except ScriptNameError as exc:
        raise PushError(str(exc)) from None
    if name == MANIFEST:
        raise PushError(f"{MANIFEST} is srw's own (the sync writes it); use another name")
    if len(content) > MAX_SCRIPT:
        raise PushError(f"script {name!r} has {len(content)} bytes; at most {MAX_SCRIPT}")


def pack(scripts: dict[str, Pushed]) -> bytes:
    return msgpack.packb({name: s.to_list() for name, s in sorted(scripts.items())},
                         use_bin_type=True)


def unpack(raw: bytes) -> dict[str, Pushed]:
    try:
        data = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_SCRIPT,
                               max_str_len=MAX_SCRIPT, max_map_len=MAX_SCRIPTS,
                               max_array_len=4)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PushError(f"the stored scripts do not parse: {exc}") from None
    if not isinstance(data, dict):
        raise PushError("the stored scripts are not a map")
    scripts = {}
    for name, item in data.items():
        script = Pushed.from_list(item)
        if script.name != name:
            raise PushError(f"stored script {name!r} names itself {script.name!r}")
        scripts[name] = script
    return scripts


def load_secret(config: Config) -> bytes:
    """The push secret; PushError (saying what to do) when it is missing or short."""
    return read_secret(config.security.push_secret, "push secret",
                       "run `srw keys init` (it writes keys/push.secret), or point [security] "
                       "push_secret at the file, the same on every node and pusher",
                       PushError).encode()


def seal(raw: bytes, secret: bytes) -> bytes:
    return SEAL + hmac.new(secret, raw, hashlib.sha256).hexdigest().encode() + b"\n" + raw


def unseal(value: bytes, secret: bytes) -> bytes:
    """The packed map inside `value`; PushError unless it carries our seal."""
    head = len(SEAL) + 64 + 1
    if not (value.startswith(SEAL) and len(value) >= head and value[head - 1:head] == b"\n"):
        raise PushError("the stored scripts are not sealed; pushed by `srw scripts push`?")
    mac, raw = value[len(SEAL):head - 1], value[head:]
    if not hmac.compare_digest(mac, hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()):
        raise PushError("the stored scripts' seal does not match [security] push_secret: "
                        "not written by a pusher holding it; ignored")
    return raw


def merge(current: dict[str, Pushed], files: dict[str, bytes]) -> dict[str, Pushed]:
    """`current` with `files` (name -> content) pushed: a changed content gets the
    next version, an unchanged one keeps its own."""
    merged = dict(current)
    for name, content in files.items():
        old = current.get(name)
        if old is not None and old.sha256 == hashlib.sha256(content).hexdigest():
            continue
        merged[name] = Pushed.make(name, content, (old.version if old else 0) + 1)
    if len(merged) > MAX_SCRIPTS:
        raise PushError(f"at most {MAX_SCRIPTS} pushed scripts")
    return merged


def newest(maps: list[dict[str, Pushed]]) -> dict[str, Pushed]:
    """Per name, the highest version among several nodes' maps (lmdb: a node that
    missed a push has an older map)."""
    out: dict[str, Pushed] = {}
    for scripts in maps:
        for name, script in scripts.items():
            if name not in out or script.version > out[name].version:
                out[name] = script
    return out


# The history directory ---------------------------------------------------------

def sync_dir(history_dir: str | Path, scripts: dict[str, Pushed]) -> list[str]:
    """Bring `history_dir` to `scripts`; the names whose file changed.  Each file
    is replaced whole (temp file + rename); the manifest last."""
    folder = Path(history_dir)
    versions = _manifest_versions(folder)
    changed = []
    for name, script in sorted(scripts.items()):
        path = folder / name
        if versions.get(name) == [script.version, script.sha256] and _sha256(path) == script.sha256:
            continue
        _replace(path, script.content)
        changed.append(name)
    if changed or (scripts and not (folder / MANIFEST).exists()):
        listed = {name: [s.version, s.sha256] for name, s in sorted(scripts.items())}
        _replace(folder / MANIFEST, manifest_source(str(folder), listed).encode())
    return changed


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _replace(path: Path, content: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # hidden: never a script name
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_source(history_dir: str, listed: dict[str, list]) -> str:
    """srw_scripts.py: answers {name: [version, sha256]} for what is on this node's
    disk: the hash of each file read now (where the sandbox lets the script read
    its history dir), else the one the sync wrote it with."""
    return (
        "# Written by srw's script sync (srw/pushed.py); `srw scripts list` runs it.\n"
        "import hashlib, json, os\n"
        f"_dir = {history_dir!r}\n"
        f"_listed = json.loads({json.dumps(listed)!r})\n"
        "_seen = {}\n"
        "for _name, (_version, _sha) in _listed.items():\n"
        "    try:\n"
        "        with open(os.path.join(_dir, _name), 'rb') as _f:\n"
        "            _sha = hashlib.sha256(_f.read()).hexdigest()\n"
        "    except OSError:\n"
        "        pass\n"
        "    _seen[_name] = [_version, _sha]\n"
        "__return_data = json.dumps(_seen)\n")


def _manifest_versions(folder: Path) -> dict[str, list]:
    """What the last sync wrote, from its manifest; {} when there is none."""
    try:
        text = (folder / MANIFEST).read_text()
        line = next(l for l in text.splitlines() if l.startswith("_listed = "))
        return json.loads(ast.literal_eval(line[len("_listed = json.loads("):-1]))
    except (OSError, StopIteration, ValueError, SyntaxError, TypeError):
        return {}


# The store -------------------------------------------------------------------

class ScriptStore:
    """The map in the cluster.  lmdb: a copy on every node's own store (each node
    reads its own); redis-cluster: one key, which every node reads."""

    def __init__(self, config: Config, curve=None, timeout: float = STORE_TIMEOUT):
        self.config, self.curve, self.timeout = config, curve, timeout
        self.secret = load_secret(config)
        self._redis = None
        self._stores: dict = {}

    def read(self, node: NodeSettings | None = None) -> dict[str, Pushed]:
        """The map as `node` sees it (lmdb; default the first node), or the cluster's
        (redis).  Raises StorageError, PushError."""
        try:
            value = self._read_raw(node or self.config.nodes[0])
        except NotFound:
            return {}
        return unpack(unseal(value, self.secret))

    def push(self, files: dict[str, bytes]) -> tuple[dict[str, Pushed], list[str], list[str]]:
        """Store `files` (name -> content) with the next versions; returns the
        merged map, in lmdb mode the nodes that did not take it (why), and the
        stored maps that could not be read and are replaced (why: a script may
        have written the key; the scripts they held keep their files on the
        nodes, but leave the map until pushed again)."""
        for name, content in files.items():
            check(name, content)
        if self.config.cluster.redis:
            try:
                current, replaced = self.read(), []
            except StorageUnavailable:
                raise
            except (StorageError, PushError) as exc:
                current, replaced = {}, [f"{KEY}: {exc}"]
            merged = merge(current, files)
            value = self._sealed(merged)
            self._redis_store().write(KEY, value)
            self._redis_store().write(STAMP, _stamp(value))
            return merged, [], replaced
        maps, unread = self.maps(self.config.nodes)
        merged = merge(newest(maps), files)
        errors = [e for e in (self.write(node, merged) for node in self.config.nodes) if e]
        # A node down is in both lists: its write says so.
        replaced = [e for e in unread if e.split(":", 1)[0] not in
                    {error.split(":", 1)[0] for error in errors}]
        return merged, errors, replaced

    def maps(self, nodes: list[NodeSettings]) -> tuple[list[dict], list[str]]:
        """lmdb: the maps of those of `nodes` that answered, and why the others did not."""
        maps, errors = [], []
        for node in nodes:
            try:
                maps.append(self.read(node))
            except (StorageError, PushError) as exc:
                errors.append(f"{node.name}: {exc}")
        return maps, errors

    def write(self, node: NodeSettings, scripts: dict[str, Pushed]) -> str:
        """lmdb: the sealed map onto `node`'s store, then its stamp; why not, or ""."""
        sealed = self._sealed(scripts)
        for key, value in ((KEY, sealed), (STAMP, _stamp(sealed))):
            try:
                result = self._store(node).call(sp.WRITE, _key_id(key), value,
                                                wait=self.timeout)
            except NodeUnavailable as exc:
                return f"{node.name}: {exc}"
            if not result.ok:
                return f"{node.name}: {result.status}: {result.error}"
        return ""

    def _sealed(self, scripts: dict[str, Pushed]) -> bytes:
        value = seal(pack(scripts), self.secret)
        if len(value) > MAX_MAP:
            raise PushError(f"the pushed scripts together take {len(value)} bytes; at most "
                            f"{MAX_MAP}")
        return value

    def stamp(self, node: NodeSettings | None = None) -> bytes:
        """The stamp of the map as `node` (lmdb) or the cluster (redis) has it; b""
        when nothing was pushed.  Raises StorageError."""
        try:
            return self._read_raw(node or self.config.nodes[0], STAMP)
        except NotFound:
            return b""

    def _read_raw(self, node: NodeSettings, key: str = KEY) -> bytes:
        if self.config.cluster.redis:  # a stamp is 64 hex digits; a script may store more
            return self._redis_store().read(key, None if key == KEY else len(_stamp(b"")))
        try:
            result = self._store(node).call(sp.READ, _key_id(key), wait=self.timeout)
        except NodeUnavailable as exc:
            raise StorageUnavailable(str(exc)) from None
        if result.status == "not_found":
            raise NotFound(key)
        if not result.ok:
            raise StorageUnavailable(f"{node.name}: {result.status}: {result.error}")
        return result.data

    def _store(self, node: NodeSettings) -> StorageClient:
        client = self._stores.get(node.name)
        if client is None:
            client = StorageClient(node.storage, node.name, node.group, curve=self.curve,
                                   max_message=self.config.max_message)
            self._stores[node.name] = client
        return client

    def _redis_store(self):
        if self._redis is None:
            from core import redis_auth
            from storage.redis_store import RedisStore
            own = [n.redis for n in self.config.nodes if n.redis]
            self._redis = RedisStore(list(self.config.cluster.seeds) + own,
                                     redis_auth.credentials(self.config), self.timeout,
                                     max_value=MAX_MAP)
        return self._redis

    def close(self) -> None:
        for client in self._stores.values():
            client.close()
        self._stores.clear()
        if self._redis is not None:
            self._redis.close()
            self._redis = None


def _key_id(key: str) -> bytes:
    return hashlib.sha512(key.encode()).digest()


def _stamp(raw: bytes) -> bytes:
    return hashlib.sha256(raw).hexdigest().encode()


class NodeSync:
    """What `srw serve` runs for its nodes: read the map from the store, write it
    into the history dir, and say which pools must roll (python.init changed)."""

    def __init__(self, config: Config, nodes: list[NodeSettings], curve=None):
        self.config, self.nodes = config, nodes
        try:
            self.store: ScriptStore | None = ScriptStore(config, curve, timeout=0.5)
            self.off = ""
        except PushError as exc:  # no secret: nothing pushed can be trusted, so none is taken
            self.store, self.off = None, str(exc)
            log.info("pushed scripts are off: %s", exc)
        self.next = 0.0          # time.monotonic() of the next sync
        self.next_catch_up = 0.0  # lmdb: of the next look at the other nodes' copies
        self._last_error = ""
        self._synced: tuple = ()  # the stamps the last sync read

    def sync(self, catch_up: bool = False, if_changed: bool = False) -> list[str]:
        """One sync now; the names that changed.  Raises StorageError, PushError,
        OSError (each logged once by `poll`).  With `if_changed`, nothing is read
        but the stamps while they have not moved.  lmdb, with `catch_up`: also
        read the other nodes' copies, and keep a newer one in our own stores (we
        missed a push while we were down)."""
        if self.store is None:
            raise PushError(self.off)
        stamps = tuple(self.store.stamp(n) for n in self.nodes) \
            if not self.config.cluster.redis else (self.store.stamp(),)
        if if_changed and not catch_up and stamps == self._synced:
            return []
        if self.config.cluster.redis:
            scripts = self.store.read()
        else:
            scripts = self._lmdb_scripts(catch_up)
        changed = sync_dir(self.config.pool.history_dir, scripts)
        for name in changed:
            log.info("pushed script %s: version %d (sha256 %s) now in %s", name,
                     scripts[name].version, scripts[name].sha256[:12],
                     self.config.pool.history_dir)
        self._last_error, self._synced = "", stamps
        return changed

    def _lmdb_scripts(self, catch_up: bool) -> dict[str, Pushed]:
        own, errors = self.store.maps(self.nodes)
        if not own:
            raise StorageUnavailable("; ".join(errors))
        if errors:  # e.g. a map in one store that is not sealed: said, and left out
            log.warning("pushed scripts: %s", "; ".join(errors))
        scripts = newest(own)
        if catch_up:
            others, _ = self.store.maps([n for n in self.config.nodes if n not in self.nodes])
            everyone = newest([scripts, *others])
            if everyone != scripts:
                log.info("pushed scripts: a newer copy on another node; keeping it here")
                for node in self.nodes:
                    if error := self.store.write(node, everyone):
                        log.warning("pushed scripts: %s", error)
                scripts = everyone
        return scripts

    def poll(self, now: float) -> list[str]:
        """Sync when due; errors are logged (once while they repeat), never raised."""
        if now < self.next or self.store is None:
            return []
        self.next = now + SYNC_EVERY
        catch_up = now >= self.next_catch_up
        if catch_up:
            self.next_catch_up = now + CATCH_UP_EVERY
        try:
            return self.sync(catch_up, if_changed=True)
        except (StorageError, PushError, OSError) as exc:
            if str(exc) != self._last_error:
                log.warning("script sync: %s", exc)
                self._last_error = str(exc)
            return []
        except Exception as exc:  # a bug here, or data we did not foresee: serve lives on
            if str(exc) != self._last_error:
                log.exception("script sync failed")
                self._last_error = str(exc)
            return []

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
