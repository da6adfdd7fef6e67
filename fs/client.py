"""``FsClient``: a POSIX-like tree of directories and files over a ``Session``.

Paths are resolved by reading directory objects (no lock: each is written
whole); every change is one exec of ``history/fs.py`` on the directory it
changes (``key="fs:d:<ino>"``, so the node's per-id lock serializes the
changes to one directory).  The format and the rename protocol are in that
script's header.  Errors are ``FsError``, an OSError with the usual errno.

What the store holds and what the script answers are hostile (anyone with the
``write`` right can write ``fs:d:<ino>``): each is checked by ``fs.shape``
before it is used; a value of the wrong shape is EIO, with its reason in the
log, and a name no directory can hold is left out of listings.

    with Session(config) as session:
        fs = FsClient(session)
        fs.mkdir("/a")
        fs.write_file("/a/f", b"hello")
        fs.rename("/a/f", "/g")
        fs.readdir("/")          # {"a": Entry(...), "g": Entry(...)}
"""
from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import time

import msgpack

from core import protocol as p
from storage.client import NotFound, Session

from . import shape
from .shape import NAME_MAX, Entry

__all__ = ["FsClient", "FsError", "Entry", "ROOT", "SCRIPT"]

SCRIPT = "fs.py"
ROOT = "root"
DIR, CHUNKS, INODE = "fs:d:", "fs:c:", "fs:i:"
# A file's contents are fixed-size chunks, `fs:c:{<ino>}:<n>` (the braces are a
# Redis Cluster hash tag: a file's chunks share one slot).  1 MiB: the largest
# write the kernel sends FUSE, so a sequential write is one store write per
# request and its round trip is paid per MiB, not per 128 KiB; a read that is
# not sequential moves only its own bytes (``read_part``); and far under any
# max_value a node should have (the mount refuses to start on a node with
# less).  A chunk never written, or shorter than its share of the file, reads
# as zeros: sparse files cost nothing.
CHUNK = 1 << 20
REMOVES = 128   # chunk removes sent before their replies are waited for (drop_chunks)
# Chunks written together, all sent before a reply is awaited: a node commits (and
# fsyncs) those it finds waiting together (write_data; the mount's write-behind).
GROUP = 4
log = logging.getLogger("srw.fs")


class FsError(OSError):
    """An operation's errno, with the path it concerns."""

    def __init__(self, code: int, path: str):
        super().__init__(code, os.strerror(code), path)


ROOT_ENTRY = Entry(ROOT, "d", 0o755, 0, 0.0, 0, 0, 0.0, 0.0, 0)


def split_path(path: str) -> list[str]:
    """The path's components, ``.`` and ``..`` resolved; EINVAL, ENAMETOOLONG or
    ENOENT (``..`` above the root) for a path no directory could hold.  The
    whole path has no limit of its own: the kernel limits what a process
    passes (PATH_MAX), and a path relative to a deep working directory can be
    longer inside the tree."""
    if "\0" in path:
        raise FsError(errno.EINVAL, path)
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if not parts:
                raise FsError(errno.ENOENT, path)   # would leave the filesystem
            parts.pop()
            continue
        try:
            size = len(part.encode("utf-8"))
        except UnicodeEncodeError:
            raise FsError(errno.EINVAL, path) from None
        if size > NAME_MAX:
            raise FsError(errno.ENAMETOOLONG, path)
        parts.append(part)
    return parts


def bucket_key(ino: str, depth: int, prefix: int) -> str:
    """A directory's bucket of entries (history/fs.py's header): the braces
    put a directory's buckets in one Redis Cluster slot."""
    return f"{DIR}{{{ino}}}:{depth}.{prefix}"


def whole_chunks(stream):
    """A binary stream's contents in pieces of CHUNK bytes, the last one shorter:
    a read may return less than it was asked (a pipe), and a short piece in the
    middle of a file would move every byte after it."""
    while piece := stream.read(CHUNK):
        while len(piece) < CHUNK and (more := stream.read(CHUNK - len(piece))):
            piece += more
        yield piece


def chunk_key(ino: str, n: int) -> str:
    return f"{CHUNKS}{{{ino}}}:{n}"


def fit(chunk: bytes, length: int) -> bytes:
    """A stored chunk as `length` bytes: cut, or padded with zeros (a chunk
    never written, or written shorter; what lies past the size is not read)."""
    return chunk[:length] if len(chunk) >= length else chunk + bytes(length - len(chunk))


SAME = "same"     # _replaceable: the target is another name of the moved file


def inode_key(ino: str) -> str:
    """A hard-linked file's inode object (history/fs.py): the chunks' hash tag."""
    return f"{INODE}{{{ino}}}"


def own(entry: Entry, d: dict) -> Entry:
    """A directory's entry with the attributes its own object holds, if any."""
    m = d.get("m")
    if m is None:
        return entry
    mode, uid, gid, atime, mtime, ctime = m
    return entry._replace(mode=mode, uid=uid, gid=gid, atime=atime, mtime=mtime, ctime=ctime)


def base(entry: Entry) -> list:
    """A directory's attributes as an op on it carries them (history/fs.py "m")."""
    return [entry.mode, entry.uid, entry.gid, entry.atime, entry.mtime, entry.ctime]


def new_ino() -> str:
    return os.urandom(8).hex()


def bad(path: str, why: str) -> FsError:
    """EIO for `path`: a value in the store, or the script's reply, is not what it
    should be; `why` (which key, what is wrong) goes to the log, on one line."""
    log.warning("%s", shape.one_line(why))
    return FsError(errno.EIO, path)


class FsClient:
    """The tree of one cluster.  Not thread-safe (one Session).  With `local`
    (storage/local_read.py, may be shared by threads), values whose first owner
    is a node on this host are read from its store in this process."""

    def __init__(self, session: Session, script: str = SCRIPT, local=None):
        self.session, self.script, self.local = session, script, local
        self.groups = sorted(session.ring.groups)   # execs go to the first that answers
        # The largest file a write or truncate may reach ([fs] max_file); beyond, EFBIG.
        self.max_file = session.config.fs.max_file

    # Reading ---------------------------------------------------------------------

    def read(self, key: str, at: int = 0, length: int | None = None) -> bytes:
        """The stored value (from `at`, at most `length` bytes): from this host's
        node if it is the key's first owner, else over the network (a ranged
        read when `length` is given); NotFound like Session.read."""
        if self.local is not None:
            value = self.local.read(key, at, length)
            if value is not None:
                return value
        if length is None:
            return self.session.read(key)
        return self.session.read_range(key, at, length)

    def directory(self, ino: str, path: str = "") -> dict:
        """A directory's object as last written (an absent one is empty), its
        shape checked (``shape.directory``: not yet each entry); EIO if it is not one."""
        try:
            return shape.directory(self.read(DIR + ino))
        except NotFound:
            return {"e": {}, "i": {}, "a": {}, "dead": False}
        except shape.BadShape as exc:
            raise bad(path, f"{DIR}{ino}: {exc}") from None

    def entry(self, raw, ino: str, name: str, path: str) -> Entry:
        """Directory `ino`'s entry `name` as an Entry; EIO if it is not one."""
        try:
            return shape.entry(raw)
        except shape.BadShape as exc:
            raise bad(path, f"{DIR}{ino}: {name!r}: {exc}") from None

    def walk(self, path: str, follow_last: bool = True) -> tuple[list[str], Entry]:
        """(components, entry) of an existing path; ENOENT / ENOTDIR on the way.
        A directory's entry carries its own attributes (``own``) where the walk
        read its object; the last one's is not read here (``stat`` does)."""
        parts = split_path(path)
        entry = ROOT_ENTRY
        for part in parts if follow_last else parts[:-1]:
            if not entry.is_dir:
                raise FsError(errno.ENOTDIR, path)
            raw = self.lookup(entry.ino, part, path)
            if raw is None:
                raise FsError(errno.ENOENT, path)
            entry = self.entry(raw, entry.ino, part, path)
        return parts, entry

    def lookup(self, ino: str, name: str, path: str):
        """Directory `ino`'s entry `name` as stored (None if none): its head, then
        the one bucket the head names.  A bucket gone since the head was read
        was split: the head is read again (a bucket the latest head names and
        that is absent is empty).  ENOENT if the directory was removed."""
        d = self.directory(ino, path)
        for _ in range(shape.MAX_DEPTH + 2):
            if d["dead"]:
                raise FsError(errno.ENOENT, path)
            if d["e"] is not None:
                return d["e"].get(name)
            at = shape.where(d, name)
            try:
                return self.bucket(ino, at, path).get(name)
            except NotFound:
                d = self.directory(ino, path)
                if d["e"] is None and shape.where(d, name) == at:
                    return None
        raise bad(path, f"{DIR}{ino}: its buckets kept splitting under the lookup of {name!r}")

    def bucket(self, ino: str, at: tuple[int, int], path: str) -> dict:
        """A bucket (NotFound if absent), its shape checked; EIO if it is not one."""
        key = bucket_key(ino, *at)
        try:
            return shape.bucket(self.read(key))
        except shape.BadShape as exc:
            raise bad(path, f"{key}: {exc}") from None

    def entries(self, ino: str, d: dict, path: str) -> tuple[dict, list]:
        """(every entry of directory `ino` as stored, names in a bucket they do
        not belong in): each bucket of head `d` in turn; one gone since `d` was
        read was split or merged, and the buckets that now hold its names are
        read from the latest head (a merged one once)."""
        if d["e"] is not None:
            return d["e"], []
        out, misplaced, todo, latest = {}, [], shape.buckets(d), d
        reads, done = 0, set()
        while todo:
            depth, prefix = todo.pop()
            if (depth, prefix) in done:
                continue
            reads += 1
            if reads > (1 << shape.MAX_DEPTH) * 2:
                raise bad(path, f"{DIR}{ino}: its buckets kept changing under a listing")
            try:
                found = self.bucket(ino, (depth, prefix), path)
            except NotFound:
                latest = self.directory(ino, path)
                m = latest["b"]
                if latest["e"] is not None or prefix < len(m) and m[prefix] == depth:
                    continue            # absent and still named: empty
                todo += [(dd, p) for dd, p in shape.buckets(latest)
                         if (p % (1 << depth) == prefix if dd > depth
                             else prefix % (1 << dd) == p)]
                continue
            done.add((depth, prefix))
            for name, value in found.items():
                if type(name) is str and shape.slot(d["k"], name) % (1 << depth) != prefix:
                    misplaced.append(name)
                else:
                    out[name] = value
        return out, misplaced

    def parent(self, path: str, attrs: bool = True) -> tuple[Entry, str]:
        """(parent directory entry, with its own attributes unless not `attrs`
        (one read less); last name) of a path that may not exist yet."""
        parts, parent = self.walk(path, follow_last=False)
        if not parts:
            raise FsError(errno.EEXIST, path)       # the root itself
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR, path)
        return own(parent, self.directory(parent.ino, path)) if attrs else parent, parts[-1]

    def stat(self, path: str) -> Entry:
        return self.stat_links(path)[0]

    def stat_links(self, path: str) -> tuple[Entry, int]:
        """(entry, link count): a directory's own attributes, and 2 plus its
        subdirectories; a hard-linked entry's from its inode object; else 1."""
        entry = self.walk(path)[1]
        if entry.linked:
            return self.node(entry, path)
        if not entry.is_dir:
            return entry, 1
        d = self.directory(entry.ino, path)
        if d["e"] is None:
            return own(entry, d), 2 + d["s"]
        subdirs = sum(1 for v in d["e"].values() if type(v) is list and v[1:2] == ["d"])
        return own(entry, d), 2 + subdirs

    def readdir(self, path: str) -> dict[str, Entry]:
        """Name -> Entry; half-done renames out of this directory are finished
        first.  A name no directory can hold is left out, with a line in the log."""
        entry = self.stat(path)
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR, path)
        d = self.directory(entry.ino, path)
        if d["i"]:
            self.recover(entry.ino, d["i"], path)
            d = self.directory(entry.ino, path)
        if d["dead"]:
            raise FsError(errno.ENOENT, path)
        found, misplaced = self.entries(entry.ino, d, path)
        try:
            listing, skipped = shape.listing(found)
        except shape.BadShape as exc:
            raise bad(path, f"{DIR}{entry.ino}: {exc}") from None
        skipped += misplaced
        if skipped:
            log.warning("%s%s: %d names no directory can hold left out of the listing: %s",
                        DIR, entry.ino, len(skipped), shape.show_names(skipped))
        return listing

    def node(self, entry: Entry, path: str) -> tuple[Entry, int]:
        """A hard-linked entry's attributes and link count (its inode object;
        the entry itself, 1, if the object is gone: its last link went)."""
        try:
            raw = self.read(inode_key(entry.ino))
        except NotFound:
            return entry, 1
        try:
            return shape.inode(shape.unpack(raw, "an inode"), entry.ino)
        except shape.BadShape as exc:
            raise bad(path, f"{inode_key(entry.ino)}: {exc}") from None

    def read_file(self, path: str) -> bytes:
        """The whole file, in memory: for small files (``srw fs get`` streams)."""
        return b"".join(self.stream(path))

    def stream(self, path: str):
        """The file's contents, a chunk at a time."""
        entry = self.stat(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR, path)
        return self.chunks(entry)

    def chunks(self, entry: Entry):
        for n in range(-(-entry.size // CHUNK)):
            part = entry.size - n * CHUNK
            yield fit(self.read_chunk(entry.ino, n), min(part, CHUNK))

    def read_data(self, entry: Entry) -> bytes:
        return b"".join(self.chunks(entry))

    def read_chunk(self, ino: str, n: int) -> bytes:
        """Chunk `n` as stored (b"" if never written): its length is not checked
        here, the caller fits it to the file's size (``fit``)."""
        try:
            return self.read(chunk_key(ino, n))
        except NotFound:
            return b""

    def read_part(self, ino: str, n: int, at: int, length: int) -> bytes:
        """`length` bytes of chunk `n` from `at` (a ranged read: only those cross
        the network), zeros where the chunk was never written or is shorter."""
        try:
            return fit(self.read(chunk_key(ino, n), at, length), length)
        except NotFound:
            return bytes(length)

    def write_chunk(self, path: str, ino: str, n: int, data: bytes) -> None:
        """Chunk `n` in every group; EIO only if no group took it."""
        self.write_chunks(path, ino, [(n, data)])

    def write_chunks(self, path: str, ino: str, chunks: list) -> None:
        """Each (n, data) in every group, all sent before any reply is awaited (a
        node commits, and fsyncs, those it finds waiting together); EIO if any
        chunk was taken by no group."""
        replies = self.session.engine.write_keys([(chunk_key(ino, n), bytes(data))
                                                  for n, data in chunks])
        for results in replies:
            failed = [r for r in results if not r.ok]
            if len(failed) == len(self.groups):
                raise FsError(errno.EIO, f"{path}: {failed[0].status}: {failed[0].error}")

    def drop_chunks(self, ino: str, start: int, size: int) -> None:
        """Remove the chunks from `start` up to those of a file of `size` bytes
        (absent ones included: nothing records which a sparse file has).  A
        size beyond max_file is not one of ours (a hostile entry, or a file
        from before max_file was lowered): its chunks stay, with a line in the
        log, rather than millions of removes."""
        if size > self.max_file:
            log.warning("fs:c:{%s}: not removed: its size %d is over the largest file",
                        ino, size)
            return
        end = -(-size // CHUNK)
        for first in range(start, end, REMOVES):
            self.session.engine.remove_keys([chunk_key(ino, n)
                                             for n in range(first, min(end, first + REMOVES))])

    # Changing ----------------------------------------------------------------------

    def call(self, ino: str, op: str, path: str, /, **args) -> dict:
        """One exec of the script on directory `ino`; its errno raised as FsError."""
        return self._exec(DIR + ino, {"op": op, "dir": ino, **args}, path)

    def call_inode(self, ino: str, op: str, path: str, /, **args) -> dict:
        """One exec of the script on hard-linked file `ino`'s inode object."""
        return self._exec(inode_key(ino), {"op": op, "ino": ino, **args}, path)

    def _exec(self, key: str, request: dict, path: str) -> dict:
        data = msgpack.packb({**request, "now": time.time()})
        result = None
        for group in self.groups:
            result = self.session.exec(self.script, data, key=key, groups=[group])[0]
            if result.status != p.UNAVAILABLE:
                break
        if not result.ok:
            last = (result.error or "").strip().splitlines()[-1:] or [""]
            raise FsError(errno.EIO, f"{path}: {result.status}: {last[0]}")
        try:
            reply = shape.reply(result.data)
        except shape.BadShape as exc:
            raise bad(path, f"{self.script} on {key}: {exc}") from None
        if reply["err"] == "EIO":
            raise bad(path, reply.get("why") or f"{self.script} on {key}: EIO")
        if reply["err"]:
            raise FsError(getattr(errno, reply["err"]), path)
        if reply.get("gone"):           # a file this op removed or replaced
            gone_ino, gone_size = reply["gone"]
            self.drop_chunks(gone_ino, 0, gone_size)
        if reply.get("unref"):          # a hard-linked file lost a name
            self.call_inode(reply["unref"], "iref", path, delta=-1)
        return reply

    def mkdir(self, path: str, mode: int = 0o755, owner: tuple[int, int] = (0, 0)) -> Entry:
        return self.make(path, "d", mode, owner)

    def make(self, path: str, kind: str, mode: int, owner: tuple[int, int] = (0, 0),
             extra: str | int = 0) -> Entry:
        """A new entry of `kind` (shape.KINDS) at `path`; EEXIST if the name is
        taken.  `owner` is (uid, gid) of the caller; see `_new`."""
        parent, name = self.parent(path)
        entry = self._new(parent, kind, mode, owner, extra)
        try:
            shape.entry(list(entry))
        except shape.BadShape:
            raise FsError(errno.EINVAL, path) from None
        self.call(parent.ino, "make", path, name=name, entry=list(entry), base=base(parent))
        return entry

    def symlink(self, path: str, target: str, owner: tuple[int, int] = (0, 0)) -> Entry:
        if len(target.encode("utf-8", "surrogateescape")) > shape.TARGET_MAX:
            raise FsError(errno.ENAMETOOLONG, path)
        return self.make(path, "l", 0o777, owner, target)

    @staticmethod
    def _new(parent: Entry, kind: str, mode: int, owner: tuple[int, int],
             extra: str | int = 0) -> Entry:
        """A new entry in `parent`: in a set-group-ID directory it takes the
        directory's group, and a directory the set-group-ID bit (as Linux)."""
        uid, gid = owner
        mode &= 0o7777
        if parent.mode & stat.S_ISGID:
            gid = parent.gid
            if kind == "d":
                mode |= stat.S_ISGID
        now = time.time()
        size = len(extra.encode("utf-8", "surrogateescape")) if kind == "l" else 0
        return Entry(new_ino(), kind, mode, size, now, uid, gid, now, now, extra)

    def create(self, path: str, mode: int = 0o644, exclusive: bool = False,
               owner: tuple[int, int] = (0, 0)) -> Entry:
        """The file at `path`, made empty if it did not exist (EEXIST if `exclusive`)."""
        parent, name = self.parent(path)
        entry = self._new(parent, "f", mode, owner)
        reply = self.call(parent.ino, "create", path, name=name, entry=list(entry),
                          excl=exclusive, base=base(parent))
        if reply["entry"].linked:       # an existing hard-linked file: its inode's
            return self.node(reply["entry"], path)[0]
        return reply["entry"]

    def write_file(self, path: str, data, mode: int = 0o644) -> Entry:
        """Create or replace the file's contents (write_data): data first, then its size."""
        entry = self.create(path, mode)
        return self.write_data(path, entry, data)

    def write_data(self, path: str, entry: Entry, data) -> Entry:
        """The file's contents: `data` as bytes, or an iterable of its pieces,
        each CHUNK bytes but the last (`whole_chunks`: a file larger than memory
        goes a group at a time).  GROUP chunks are sent before their replies are
        awaited; the size is set last, and old chunks past it are removed."""
        if isinstance(data, (bytes, bytearray, memoryview)):
            if len(data) > self.max_file:
                raise FsError(errno.EFBIG, path)
            view = memoryview(data)
            data = (view[at:at + CHUNK] for at in range(0, len(view), CHUNK))
        old_size, size, count = entry.size, 0, 0
        while group := list(itertools.islice(data, GROUP)):
            size += sum(map(len, group))
            if size > self.max_file:
                raise FsError(errno.EFBIG, path)
            self.write_chunks(path, entry.ino, list(enumerate(group, count)))
            count += len(group)
        entry = self.setattr(path, entry, size=size, mtime=time.time())
        self.drop_chunks(entry.ino, count, old_size)
        return entry

    def setattr(self, path: str, entry: Entry, **fields) -> Entry:
        """Change size, mode, uid, gid, atime, mtime or ctime; EINVAL for a value
        an entry cannot hold (readers would find the directory's entry bad and
        answer EIO).  A directory's go into its own object."""
        fields = {k: v for k, v in fields.items() if v is not None}
        self.check(path, entry._replace(**fields))
        if entry.is_dir:
            fields.pop("size", None)
            reply = self.call(entry.ino, "dirattr", path, base=base(entry), **fields)
            return own(entry, reply)
        if entry.linked:
            reply = self.call_inode(entry.ino, "iset", path, **fields)
            return self._node_reply(reply, entry, path)
        parent, name = self.parent(path, attrs=False)    # its ino alone
        reply = self.call(parent.ino, "setattr", path, name=name, ino=entry.ino, **fields)
        if reply["entry"].linked:       # linked since `entry` was read: its inode holds them
            return self.setattr(path, reply["entry"], **fields)
        return reply["entry"]

    @staticmethod
    def check(path: str, entry: Entry) -> None:
        """EINVAL for an entry no directory can hold (a time or id out of range)."""
        try:
            shape.entry(list(entry))
        except shape.BadShape:
            raise FsError(errno.EINVAL, path) from None

    def _node_reply(self, reply: dict, entry: Entry, path: str) -> Entry:
        try:
            return shape.inode(reply.get("node"), entry.ino)[0]
        except shape.BadShape as exc:
            raise bad(path, f"{inode_key(entry.ino)}: {exc}") from None

    def link(self, old: str, new: str) -> Entry:
        """A second name for a file (not a directory: EPERM).  Its attributes
        move into an inode object on its first link; the count is raised
        before the new name is made, so a crash between leaks, never loses."""
        entry = self.stat(old)
        if entry.is_dir:
            raise FsError(errno.EPERM, old)
        parent, name = self.parent(new)
        node = [*list(entry)[1:10], 1]
        self.call_inode(entry.ino, "iref", new, delta=1, base=node)
        if not entry.linked:
            old_parent, old_name = self.parent(old)
            self.call(old_parent.ino, "setattr", old, name=old_name, ino=entry.ino, linked=1)
        made = entry._replace(linked=1)
        try:
            self.call(parent.ino, "make", new, name=name, entry=list(made), base=base(parent))
        except FsError:
            self.call_inode(entry.ino, "iref", new, delta=-1)
            raise
        return made

    def unlink(self, path: str) -> None:
        parent, name = self.parent(path)
        self.call(parent.ino, "unlink", path, name=name, base=base(parent))

    def rmdir(self, path: str) -> None:
        """Mark the directory dead if empty (no create can land in it after),
        then drop its entry from the parent."""
        parent, name = self.parent(path)
        entry = self.stat(path)
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR, path)
        self.call(entry.ino, "kill", path)
        self.call(parent.ino, "drop", path, name=name, ino=entry.ino, base=base(parent))

    def rename(self, old: str, new: str) -> None:
        src_parent, name = self.parent(old)
        dst_parent, to_name = self.parent(new)
        entry = self.stat(old)
        if entry.is_dir:
            self._refuse_cycle(new, entry)
        replace_ino = self._replaceable(new, entry, old)
        if replace_ino == SAME:
            return                  # another name of the same file: nothing to do
        if src_parent.ino == dst_parent.ino:
            self.call(src_parent.ino, "rename", old, name=name, to_name=to_name,
                      replace_ino=replace_ino, base=base(src_parent))
            return
        iid = new_ino() + new_ino()
        self.call(src_parent.ino, "take", old, name=name, iid=iid, to=dst_parent.ino,
                  to_name=to_name, replace_ino=replace_ino, base=base(src_parent))
        rejected = self.recover(src_parent.ino, {iid: [name, list(entry), dst_parent.ino,
                                                       to_name, replace_ino]}, old,
                                dst_parent)[iid]
        if rejected:
            raise FsError(getattr(errno, rejected), new)

    def _replaceable(self, new: str, entry: Entry, old: str = "") -> str | None:
        """The ino of an empty directory at `new` that the move may replace (made
        dead first, so nothing lands in it); the errno when it cannot be replaced."""
        try:
            target = self.stat(new)
        except FsError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        if target.ino == entry.ino and split_path(new) != split_path(old):
            return SAME
        if not target.is_dir or target.ino == entry.ino:
            if entry.is_dir and not target.is_dir:
                raise FsError(errno.ENOTDIR, new)
            return None
        if not entry.is_dir:
            raise FsError(errno.EISDIR, new)
        self.call(target.ino, "kill", new)
        return target.ino

    def _refuse_cycle(self, new: str, entry: Entry) -> None:
        """A directory cannot move into itself.  Checked here, not under a lock:
        two concurrent moves of directories into each other are not refused."""
        parts = split_path(new)[:-1]
        node = ROOT_ENTRY
        for part in parts:
            raw = self.lookup(node.ino, part, new)
            if raw is None:
                return
            node = self.entry(raw, node.ino, part, new)
            if node.ino == entry.ino:
                raise FsError(errno.EINVAL, new)

    def recover(self, src: str, intents: dict, path: str = "",
                target: Entry | None = None) -> dict[str, str]:
        """Finish renames out of directory `src` (at `path`, for errors): apply
        on the target, drop the intent (putting the entry back if the target
        refused), forget.  Returns each intent's errno name ("" when applied or
        already finished)."""
        results = {}
        for iid, (_name, _entry, to, _to_name, _replace) in intents.items():
            known = {"base": base(target)} if target is not None and target.ino == to else {}
            result = self.call(to, "apply", path, iid=iid, src=src, **known)["result"]
            self.call(src, "finish", path, iid=iid, rejected=bool(result))
            self.call(to, "forget", path, iid=iid)
            results[iid] = result or ""
        return results
