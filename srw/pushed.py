"""Named scripts kept in the cluster itself: ``srw scripts push`` and each node's sync.

    srw scripts push FILE...  ──► the store, key "srw:scripts": one sealed msgpack
                                  [sequence, {name: [name, version, sha256, content]}]
                                  on each of the engine's places (storage/engine.py;
                                  lmdb: every node's own store, each by WRITE_IF;
                                  redis: one key, by WATCH/MULTI/EXEC)
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

The seal covers the content, not its age: a script can copy a sealed map
and write it back after the next push.  So the sealed bytes carry a sequence
that only grows (each push stores the one it read plus one, by compare-and-set
so two pushes cannot take the same), and a node takes a map only if its
sequence is higher than the one it took last, or the same map again.  It
keeps that sequence and the map's sha256 in data_dir/pushed.seq, so a
restart does not forget it (srw/pushsync.py).  Anything else (an older map,
another map of the same sequence, no map at all: a script may delete the
key) is logged once and changes nothing on the node: it keeps running what
it took, and puts that map back in the store.  A pusher, too, never builds on
a map older than the one the nodes took (their manifests say which): a
replayed map's old scripts must not come back under a new sequence.
"""
from __future__ import annotations

import ast
import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

import msgpack

from runtime.scripts import ScriptNameError, check_name
from core.config import Config, NodeSettings
from core.secrets import read_secret
from storage.engine import UNREADABLE, Place, engine_class
from storage.errors import NotFound, StorageError, StorageUnavailable

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
SEAL = b"srw-push-2 "            # then the HMAC (64 hex digits), a newline, the packed map
OLD_SEALS = (b"srw-push-1 ",)   # no sequence inside: refused
MAX_SEQ = (1 << 63) - 1


class PushError(ValueError):
    """A script that cannot be pushed, or a map from the store that does not parse."""


class PushConflict(PushError):
    """Another push stored its map between our read and our write."""


@dataclass(frozen=True, slots=True)
class Stored:
    """A map as read from the store, its seal checked: `stamp` is the sha256 (hex)
    of the sealed value, as the stamp key holds it."""
    seq: int
    scripts: dict
    stamp: str


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


def pack(seq: int, scripts: dict[str, Pushed]) -> bytes:
    return msgpack.packb([seq, {name: s.to_list() for name, s in sorted(scripts.items())}],
                         use_bin_type=True)


def unpack(raw: bytes) -> tuple[int, dict[str, Pushed]]:
    """(sequence, scripts) of a packed map."""
    try:
        outer = msgpack.unpackb(raw, raw=False, max_bin_len=MAX_SCRIPT,
                                max_str_len=MAX_SCRIPT, max_map_len=MAX_SCRIPTS,
                                max_array_len=4)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PushError(f"the stored scripts do not parse: {exc}") from None
    if not (isinstance(outer, list) and len(outer) == 2):
        raise PushError("the stored scripts are not [sequence, map]")
    seq, data = outer
    if not (isinstance(seq, int) and 0 < seq <= MAX_SEQ):
        raise PushError(f"the stored scripts' sequence is not 1 to {MAX_SEQ}")
    if not isinstance(data, dict):
        raise PushError("the stored scripts are not a map")
    scripts = {}
    for name, item in data.items():
        script = Pushed.from_list(item)
        if script.name != name:
            raise PushError(f"stored script {name!r} names itself {script.name!r}")
        scripts[name] = script
    return seq, scripts


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
    if value.startswith(OLD_SEALS):
        raise PushError(f"the stored scripts are of an older format ({value[:10].decode()}, "
                        "no sequence); refused: run `srw scripts push` again")
    head = len(SEAL) + 64 + 1
    if not (value.startswith(SEAL) and len(value) >= head and value[head - 1:head] == b"\n"):
        raise PushError("the stored scripts are not sealed; pushed by `srw scripts push`?")
    mac, raw = value[len(SEAL):head - 1], value[head:]
    if not hmac.compare_digest(mac, hmac.new(secret, raw, hashlib.sha256).hexdigest().encode()):
        raise PushError("the stored scripts' seal does not match [security] push_secret: "
                        "not written by a pusher holding it; ignored")
    return raw


def open_map(value: bytes, secret: bytes) -> Stored:
    """The map in a stored value; PushError unless sealed with `secret` and sound."""
    seq, scripts = unpack(unseal(value, secret))
    return Stored(seq, scripts, _stamp(value).decode())


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


def newest(maps: list[Stored]) -> Stored | None:
    """The map of the highest sequence (lmdb: a node that missed a push has an
    older one); a tie, which only a split push leaves, goes to the higher stamp,
    the same on every node."""
    return max(maps, key=lambda m: (m.seq, m.stamp), default=None)


# What a node may take --------------------------------------------------------

def base(current: Stored | None, floor: tuple[int, str]) -> tuple[Stored | None, str]:
    """What a push builds on: the stored map, unless it is older than `floor`, the
    (sequence, stamp) a node took: then no map, at the sequence after the floor
    (a replayed map's old scripts must not come back under a new sequence), and
    why, for the pusher to say."""
    if floor[0] and (current is None or refusal(current, *floor)):
        held = "no map" if current is None else f"a map of sequence {current.seq}"
        return Stored(floor[0], {}, ""), (f"{KEY}: the store holds {held}, not the sequence "
                                          f"{floor[0]} the nodes took (removed or written "
                                          "back by a script or a client?)")
    return current, ""


def refusal(found: Stored, seq: int, stamp: str) -> str:
    """Why a node that took (seq, stamp) must not take `found`, or ""."""
    if found.seq < seq:
        return (f"sequence {found.seq} is older than the {seq} this node took (a copy "
                "written back by a script or a client?); refused")
    if found.seq == seq and found.stamp != stamp:
        return (f"sequence {found.seq} with another content than the map this node took "
                f"(sha256 {stamp[:12]}); refused")
    return ""


# The history directory ---------------------------------------------------------

def sync_dir(history_dir: str | Path, stored: Stored) -> list[str]:
    """Bring `history_dir` to the map `stored`; the names whose file changed.  Each
    file is replaced whole (temp file + rename); the manifest last."""
    folder = Path(history_dir)
    taken, versions = _manifest(folder)
    changed = []
    for name, script in sorted(stored.scripts.items()):
        path = folder / name
        if versions.get(name) == [script.version, script.sha256] and _sha256(path) == script.sha256:
            continue
        replace_file(path, script.content)
        changed.append(name)
    if changed or taken != [stored.seq, stored.stamp]:
        listed = {name: [s.version, s.sha256] for name, s in sorted(stored.scripts.items())}
        replace_file(folder / MANIFEST, manifest_source(str(folder), listed, stored).encode())
    return changed


def _sha256(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def replace_file(path: Path, content: bytes) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"  # hidden: never a script name
    with open(tmp, "wb") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def manifest_source(history_dir: str, listed: dict[str, list], stored: Stored) -> str:
    """srw_scripts.py: answers {"sequence": N, "map_sha256": the map's stamp,
    "scripts": {name: [version, sha256]}} for what is on this node's disk: the
    hash of each file read now (where the sandbox lets the script read its
    history dir), else the one the sync wrote it with."""
    return (
        "# Written by srw's script sync (srw/pushed.py); `srw scripts list` runs it.\n"
        "import hashlib, json, os\n"
        f"_dir = {history_dir!r}\n"
        f"_taken = json.loads({json.dumps([stored.seq, stored.stamp])!r})\n"
        f"_listed = json.loads({json.dumps(listed)!r})\n"
        "_seen = {}\n"
        "for _name, (_version, _sha) in _listed.items():\n"
        "    try:\n"
        "        with open(os.path.join(_dir, _name), 'rb') as _f:\n"
        "            _sha = hashlib.sha256(_f.read()).hexdigest()\n"
        "    except OSError:\n"
        "        pass\n"
        "    _seen[_name] = [_version, _sha]\n"
        "__return_data = json.dumps({'sequence': _taken[0], 'map_sha256': _taken[1],\n"
        "                            'scripts': _seen})\n")


def _manifest(folder: Path) -> tuple[list, dict[str, list]]:
    """([sequence, stamp], {name: [version, sha256]}) the last sync wrote in its
    manifest; ([], {}) when there is none (or it is of an older srw)."""
    try:
        found = {}
        for line in (folder / MANIFEST).read_text().splitlines():
            for name in ("_taken", "_listed"):
                if line.startswith(f"{name} = json.loads("):
                    found[name] = json.loads(ast.literal_eval(line[len(name) + 14:-1]))
        return found["_taken"], found["_listed"]
    except (OSError, KeyError, ValueError, SyntaxError, TypeError):
        return [], {}


def taken_by(answer: bytes) -> tuple[int, str]:
    """(sequence, stamp) from a node's manifest answer (`srw scripts list`), read
    as hostile: (0, "") unless it is a sound one."""
    try:
        shown = json.loads(answer)
        seq, stamp = shown["sequence"], shown["map_sha256"]
    except (ValueError, TypeError, KeyError):
        return 0, ""
    if isinstance(seq, int) and 0 < seq <= MAX_SEQ and isinstance(stamp, str) and \
            len(stamp) == 64 and all(c in "0123456789abcdef" for c in stamp):
        return seq, stamp
    return 0, ""


# The store -------------------------------------------------------------------

class ScriptStore:
    """The map in the cluster, where the engine keeps a value every node shares
    (storage/engine.py ``places``): lmdb: a copy on every node's own store (each
    node reads its own); redis-cluster: one key, which every node reads.  One
    push writes every place in config order, each by compare-and-set."""

    def __init__(self, config: Config, curve=None, timeout: float = STORE_TIMEOUT):
        self.config, self.curve, self.timeout = config, curve, timeout
        self.secret = load_secret(config)
        self.places: list[Place] = engine_class(config).places(config, config.nodes, curve,
                                                               timeout, MAX_MAP)

    def places_of(self, nodes: list[NodeSettings]) -> list[Place]:
        """The places where `nodes` keep the map (the shared one counts for all)."""
        return [place for place in self.places if place.node is None or place.node in nodes]

    def read(self, node: NodeSettings | None = None) -> Stored | None:
        """The map as `node`'s place holds it (default the first node's); None when
        none is stored.  Raises StorageError, PushError."""
        value = self.read_raw(self.places_of([node or self.config.nodes[0]])[0])
        return None if value is None or value is UNREADABLE else open_map(value, self.secret)

    def read_raw(self, place: Place, key: str = KEY) -> bytes | None:
        """The stored value, unchecked; None when there is none.  Raises
        StorageError (a value this reader may not take: a script stored a list,
        or more than MAX_MAP; a stamp is 64 hex digits)."""
        try:
            return place.read(key, None if key == KEY else len(_stamp(b"")))
        except NotFound:
            return None

    def push(self, files: dict[str, bytes], floor: tuple[int, str] = (0, "")
             ) -> tuple[Stored, list[str], list[str]]:
        """Store `files` (name -> content) with the next versions, as the stored
        sequence plus one; returns the map stored, the places that did not take
        it (why), and the stored maps that are not built on and are replaced
        (why: a script may have written the key, or written back an older map
        than `floor`, the (sequence, stamp) a node took; the scripts they held
        keep their files on the nodes, but leave the map until pushed again).
        Raises PushConflict when another push wrote the first place between our
        read and our write: then nothing of ours is stored."""
        for name, content in files.items():
            check(name, content)
        raws, errors, replaced, maps = {}, [], [], []
        for place in self.places:
            try:
                raws[place.name] = raw = self.read_raw(place)
            except StorageUnavailable as exc:
                errors.append(f"{place.name}: {exc}")
                continue
            except StorageError as exc:  # written over, compared with what is there
                raws[place.name], raw = UNREADABLE, None
                replaced.append(f"{KEY}: {exc}")
            if raw is not None:
                try:
                    maps.append(open_map(raw, self.secret))
                except PushError as exc:
                    replaced.append(f"{place.name}: {exc}")
        current, why = base(newest(maps), floor)
        stored, value = self._next(current, files)
        replaced += [why] if why else []
        # Every pusher writes the places in config order: the first one that
        # answers decides which of two racing pushes takes the sequence.
        first = True
        for place in self.places:
            if place.name not in raws:
                continue
            try:
                error = self.write_if(place, value, raws[place.name])
            except PushConflict:
                if first:
                    raise PushConflict(f"another push took sequence {stored.seq}; run push "
                                       "again") from None
                error = self._write_over_older(place, stored, value)
            if error:
                errors.append(error)
            first = False
        return stored, errors, replaced

    def _next(self, current: Stored | None, files: dict[str, bytes]) -> tuple[Stored, bytes]:
        """The map after `current` with `files` pushed, and its sealed value."""
        seq = (current.seq if current else 0) + 1
        if seq > MAX_SEQ:
            raise PushError(f"the stored sequence is {MAX_SEQ}, the most there is")
        merged = merge(current.scripts if current else {}, files)
        value = self._sealed(seq, merged)
        return Stored(seq, merged, _stamp(value).decode()), value

    def _write_over_older(self, place: Place, stored: Stored, value: bytes) -> str:
        """`place` changed since we read it (a push that came after ours wrote it
        first, or a node's catch-up): write over it while it holds an older map."""
        for _ in range(3):
            try:
                raw = self.read_raw(place)
                held = None if raw is None else open_map(raw, self.secret)
            except StorageUnavailable as exc:
                return f"{place.name}: {exc}"
            except StorageError:
                raw, held = UNREADABLE, None
            except PushError:
                held = None  # a value no node takes: ours replaces it
            if held is not None and (held.seq, held.stamp) >= (stored.seq, stored.stamp):
                return "" if held.stamp == stored.stamp else \
                    f"{place.name}: holds a newer push (sequence {held.seq})"
            try:
                return self.write_if(place, value, raw)
            except PushConflict:
                continue
        return f"{place.name}: {KEY} kept changing while we wrote it"

    def write_if(self, place: Place, value: bytes, read) -> str:
        """`value` onto `place` if it still holds `read` (bytes, None: no map, or
        UNREADABLE), then its stamp; why not, or "".  Raises PushConflict when
        another value came first (not when it is this very value)."""
        try:
            outcome = place.write_if(KEY, value, read)
            if outcome == "busy":
                raise PushConflict(f"{place.name}: another writer changed {KEY} since it "
                                   "was read; not stored")
            if outcome != "ok":
                return outcome
            place.write(STAMP, _stamp(value))
        except StorageError as exc:
            return f"{place.name}: {exc}"
        return ""

    def put_back(self, place: Place, value: bytes, seen) -> str:
        """A node's sync: `value`, the map it took, into `place` again over a map
        it refused, if the place still holds `seen`, what the sync read.  What
        happened, for its log."""
        try:
            error = self.write_if(place, value, seen)
        except PushConflict:
            return "a push came meanwhile"
        return error or "put back the map this node took"

    def _sealed(self, seq: int, scripts: dict[str, Pushed]) -> bytes:
        value = seal(pack(seq, scripts), self.secret)
        if len(value) > MAX_MAP:
            raise PushError(f"the pushed scripts together take {len(value)} bytes; at most "
                            f"{MAX_MAP}")
        return value

    def stamp(self, place: Place) -> bytes:
        """The stamp of the map as `place` has it; b"" when nothing was pushed.
        Raises StorageError."""
        return self.read_raw(place, STAMP) or b""

    def close(self) -> None:
        for place in self.places:
            place.close()


def _stamp(raw: bytes) -> bytes:
    return hashlib.sha256(raw).hexdigest().encode()
