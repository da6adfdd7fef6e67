"""``srw mount MOUNTPOINT``: the cluster's tree through FUSE (mfusepy, libfuse3).

One thread serves the kernel (mfusepy's ``nothreads``): the FsClient and its
Session (ZeroMQ sockets) are not thread-safe, and every call is a network
round trip anyway.  A file is read and written in chunks (``fs.client.CHUNK``):
a read or write touches only the chunks it covers, and a read that is not
sequential only its own bytes (a ranged read).  Each open file (``Inode``,
shared by every handle on it in this mount) holds at most DIRTY changed,
SENDING written out and CACHED read chunks, and one read ahead, whatever the
offsets.  The waits for the store that the kernel need not see are the
courier's (``fs/courier.py``, threads of its own): changed chunks are handed
to it GROUP at a time when there are more than DIRTY (write-behind: a node
commits the writes it finds waiting together), and a sequential read
has it fetch the next chunk (read-ahead).  At flush every changed chunk is
stored, then the size and mtime (close-to-open, as NFS); a chunk written out
that failed is EIO at the file's next write, fsync or close.  Ctrl-C or
``fusermount3 -u MOUNTPOINT`` unmounts; libfuse returns and the Sessions
close.  Every other error is answered at the call that caused it: a value
in the store that is not what it should be is EIO (FsClient checks every
value it reads, ``fs/shape.py``), a node that does not answer is EIO, and
anything unexpected is EIO with one line in the log.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import mfusepy

from broker.client import BrokerUnavailable
from storage.client import StorageError

from .client import CHUNK, Entry, FsClient, FsError, fit
from .courier import GROUP, Courier
from .shape import KINDS

BLOCK = 4096
DIRTY = 8       # changed chunks an open file holds before writing the oldest out
SENDING = 2 * GROUP     # chunks written out, not yet stored, per open file (write-behind)
CACHED = 4      # chunks read, kept per open file (re-reads of a chunk are free)
VERSIONS = 4096     # files whose version the kernel's cached pages are of (see kept)
# What utimensat's UTIME_NOW and UTIME_OMIT reach utimens as (libfuse passes
# tv_sec 0 and the marker in tv_nsec; mfusepy gives sec * 1e9 + nsec).
UTIME_NOW, UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
log = logging.getLogger("srw.fs.mount")
# fuse_main's status when its loop ended on SIGINT, SIGTERM or SIGHUP (libfuse3
# helper.c: any non-zero loop result becomes 8); the mount is gone by then.
ENDED_BY_SIGNAL = 8


def errors_at_the_call(cls):
    """Every operation answers an errno, never mfusepy's "uncaught exception"
    (a traceback and EINVAL): an FsError is its own errno; a node that does not
    answer, or anything unexpected, is EIO and one line in the log."""
    def wrap(method):
        @functools.wraps(method)
        def call(self, path, *args):
            try:
                return method(self, path, *args)
            except FsError:
                raise
            except (StorageError, BrokerUnavailable) as exc:
                log.error("%s %s: %s", method.__name__, path, exc)
                raise FsError(errno.EIO, path) from None
            except Exception as exc:  # a bug of ours: EIO, not the mount's end
                log.error("%s %s: %s: %s", method.__name__, path, type(exc).__name__, exc)
                raise FsError(errno.EIO, path) from None
        return call
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, wrap(method))
    return cls


NO_ID = 2 ** 32 - 1     # chown's -1 as an unsigned uid_t/gid_t
KIND_OF = {v: k for k, v in KINDS.items()}


def inode_number(ino: str) -> int:
    """st_ino: the ino's 64 bits (the root's is 1)."""
    return 1 if ino == "root" else int(ino, 16) or 2


def ns(seconds: float) -> int:
    return int(seconds * 1e9)


def owner() -> tuple[int, int]:
    """(uid, gid) of the process whose call this is."""
    uid, gid, _pid = mfusepy.fuse_get_context()
    return uid, gid


@dataclass
class Inode:
    """An open file's state in this mount, shared by its handles."""
    path: str
    entry: Entry
    size: int
    links: int | None = None       # its link count, while no link or unlink since
    walked: float = 0.0            # when its path was last resolved (time.monotonic)
    pages: tuple = ()              # the version the kernel's pages of it are of (version)
    opens: int = 0
    # Attributes to store at flush, with the size (mtime and ctime of a write or
    # truncate; mode, owner and times set on the open file): one exec at close
    # for what tar -x and cp -a set one call at a time.
    changes: dict = field(default_factory=dict)
    next_read: int = 0             # where the last read ended: the next is sequential
    dirty: OrderedDict = field(default_factory=OrderedDict)    # n -> bytearray (bytes: whole)
    sending: OrderedDict = field(default_factory=OrderedDict)  # n -> (Future, bytearray)
    clean: OrderedDict = field(default_factory=OrderedDict)    # n -> bytes, LRU
    ahead: tuple | None = None     # (n, Future): the chunk a sequential read comes to next
    failed: Exception | None = None    # a write-out that failed: EIO at the next call


def version(entry: Entry) -> tuple:
    """What changes whenever a file's contents do, by any client (a write
    stamps mtime and ctime, a utimens ctime)."""
    return entry.mtime, entry.ctime, entry.size


@errors_at_the_call
class SrwOperations(mfusepy.Operations):
    use_ns = True   # utimens in nanoseconds

    def __init__(self, fs: FsClient, courier: Courier, attr_timeout: float = 1.0):
        self.fs, self.courier, self.attr_timeout = fs, courier, attr_timeout
        self.inodes: dict[str, Inode] = {}     # ino -> state, while open
        self.files: dict[int, str] = {}        # fh -> ino
        self.next_fh = 1
        # ino -> version (stored mtime, ctime, size) the kernel's pages of it are
        # of, LRU; and the handles opened on such a version (``_kept``).
        self.versions: OrderedDict = OrderedDict()
        self.keep: set[int] = set()

    # Attributes ------------------------------------------------------------------

    def getattr(self, path, fh=None):
        """A file open here is answered from what this mount holds of it (the
        entry as opened or last flushed, and the changes since) with no walk,
        while its path was resolved within the attribute timeout (``_fresh``)."""
        inode = self._fresh(path, fh)
        if inode is None:
            entry, links = self.fs.stat_links(path)
            inode = self.inodes.get(entry.ino)
            if inode is None:
                return self._attrs(entry, links)
            inode.entry, inode.links, inode.walked = entry, links, time.monotonic()
        return self._attrs(inode.entry._replace(size=inode.size, **inode.changes), inode.links)

    def _fresh(self, path: str, fh: int | None) -> Inode | None:
        """The open file of handle `fh`, or at `path`, if its path was resolved
        less than the attribute timeout ago (the time the kernel itself keeps a
        name and its attributes) and its link count is known: tar -x, cp -a
        and libfuse's answers after each change then cost no walk."""
        inode = self.inodes.get(self.files.get(fh))
        if inode is None:
            inode = next((i for i in self.inodes.values() if i.path == path), None)
        if inode is None or inode.links is None or \
                time.monotonic() - inode.walked >= self.attr_timeout:
            return None
        return inode

    def _attrs(self, entry: Entry, links: int = 1) -> dict:
        size, mtime = entry.size, entry.mtime
        return {"st_ino": inode_number(entry.ino), "st_mode": entry.st_mode,
                "st_nlink": links,
                "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": BLOCK,
                "st_uid": entry.uid, "st_gid": entry.gid,
                "st_rdev": entry.extra if entry.kind in ("c", "b") else 0,
                "st_mtime": ns(mtime), "st_ctime": ns(entry.ctime),
                "st_atime": ns(entry.atime)}

    def readdir(self, path, fh):
        listing = self.fs.readdir(path)
        return [".", ".."] + [(name, self._attrs(e), 0) for name, e in listing.items()]

    def readlink(self, path):
        entry = self.fs.stat(path)
        if entry.kind != "l":
            raise FsError(errno.EINVAL, path)
        return entry.extra

    def chmod(self, path, mode, fh=None):
        self._setattr(path, fh, mode=stat.S_IMODE(mode), ctime=time.time())

    def chown(self, path, uid, gid, fh=None):
        """-1 (as the unsigned 2**32-1 too) leaves that id as it is."""
        uid = None if uid in (-1, NO_ID) else uid
        gid = None if gid in (-1, NO_ID) else gid
        self._setattr(path, fh, uid=uid, gid=gid, ctime=time.time())

    def _setattr(self, path: str, fh: int | None, **fields) -> None:
        """Attributes of a file open here are kept with it and stored at its
        flush, with its size (checked now: EINVAL at this call); any other
        entry's are stored now.  Given a handle (fchmod, fchown, futimens),
        its file needs no walk."""
        inode = self._fresh(path, fh)
        entry = inode.entry if inode is not None else self.fs.stat(path)
        inode = self.inodes.get(entry.ino)
        if inode is None:
            self.fs.setattr(path, entry, **fields)
            return
        inode.entry = entry     # as stored now, if just walked
        changes = {**inode.changes, **{k: v for k, v in fields.items() if v is not None}}
        self.fs.check(path, entry._replace(size=inode.size, **changes))
        inode.changes = changes

    def utimens(self, path, times=None, fh=None):
        now = time.time()
        atime, mtime = (UTIME_NOW, UTIME_NOW) if times is None else times
        atime = None if atime == UTIME_OMIT else now if atime == UTIME_NOW else atime / 1e9
        mtime = None if mtime == UTIME_OMIT else now if mtime == UTIME_NOW else mtime / 1e9
        if atime is None and mtime is None:
            return
        self._setattr(path, fh, atime=atime, mtime=mtime, ctime=now)

    def getxattr(self, path, name, position=0):
        """No extended attributes.  ENOSYS, not mfusepy's ENOTSUP: the kernel
        then stops asking (it asks for security.capability before every write)
        and answers EOPNOTSUPP itself."""
        raise FsError(errno.ENOSYS, path)

    def statfs(self, path):
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": 1 << 30,
                "f_bfree": 1 << 30, "f_bavail": 1 << 30, "f_namemax": 255}

    # Directories -------------------------------------------------------------------

    def mkdir(self, path, mode):
        self.fs.mkdir(path, stat.S_IMODE(mode), owner())

    def mknod(self, path, mode, dev):
        kind = KIND_OF.get(stat.S_IFMT(mode))
        if kind is None:
            raise FsError(errno.EINVAL, path)
        if kind == "f":
            self.fs.create(path, stat.S_IMODE(mode), exclusive=True, owner=owner())
            return
        self.fs.make(path, kind, stat.S_IMODE(mode), owner(),
                     dev if kind in ("c", "b") else 0)

    def link(self, target, source):
        """mfusepy's order: the new name `target`, for the file at `source`."""
        self._forget_links()
        self.fs.link(source, target)

    def _forget_links(self) -> None:
        """Link counts of open files are read anew after a link, unlink or rename."""
        for inode in self.inodes.values():
            inode.links = None

    def symlink(self, target, source):
        """mfusepy's order: the link `target` made, pointing at `source`."""
        self.fs.symlink(target, source, owner())

    def rmdir(self, path):
        self.fs.rmdir(path)

    def unlink(self, path):
        self._forget_links()
        self._settle_all()
        self.fs.unlink(path)

    def rename(self, old, new):
        self._forget_links()
        self._settle_all()      # a file it replaces loses its chunks
        self.fs.rename(old, new)
        for inode in self.inodes.values():     # open files follow their name
            if inode.path == old or inode.path.startswith(old + "/"):
                inode.path = new + inode.path[len(old):]

    # Files -------------------------------------------------------------------------

    def create(self, path, mode, flags=0):
        entry = self.fs.create(path, stat.S_IMODE(mode), exclusive=bool(flags & os.O_EXCL),
                               owner=owner())
        fh = self._open(path, entry)
        if not entry.linked:
            self.inodes[entry.ino].links = 1
        if entry.size:     # an existing file, created without O_EXCL: O_TRUNC still applies
            if flags & os.O_TRUNC:
                self._truncate(self.inodes[entry.ino], 0)
        return fh

    def open(self, path, flags):
        entry, links = self.fs.stat_links(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR, path)
        fh = self._open(path, entry)
        self.inodes[entry.ino].links = links
        if self.versions.get(entry.ino) == version(entry) and not flags & os.O_TRUNC:
            self.keep.add(fh)
        self._seen(entry.ino, version(entry))
        if flags & os.O_TRUNC:
            self._truncate(self.inodes[entry.ino], 0)
        return fh

    def _kept(self, fh: int) -> bool:
        """Whether the kernel may keep the pages it holds of the file just opened
        as `fh` (close-to-open, as NFS): only if they are of the version now
        stored, the one this mount last opened or closed it at.  Otherwise
        the kernel drops them, and a file another client changed is read anew."""
        kept = fh in self.keep
        self.keep.discard(fh)
        return kept

    def _seen(self, ino: str, pages: tuple) -> None:
        """The kernel's pages of file `ino` are of version `pages` now."""
        self.versions[ino] = pages
        self.versions.move_to_end(ino)
        if len(self.versions) > VERSIONS:
            self.versions.popitem(last=False)

    def _open(self, path: str, entry: Entry) -> int:
        """A handle on the file at `path`, just resolved to `entry`."""
        inode = self.inodes.get(entry.ino)
        if inode is None:
            inode = self.inodes[entry.ino] = Inode(path, entry, entry.size)
        inode.opens += 1
        inode.walked, inode.pages = time.monotonic(), version(entry)    # kept, or read anew
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.files[fh] = entry.ino
        return fh

    def read(self, path, size, offset, fh):
        """A sequential read (from where the last one ended) takes whole chunks
        and keeps them; any other reads only its own bytes from the store (a
        ranged read), unless its chunk is held already."""
        inode = self.inodes[self.files[fh]]
        end = min(offset + size, inode.size)
        sequential, inode.next_read = offset == inode.next_read, max(end, offset)
        parts, n = [], offset // CHUNK
        while offset < end:
            n, at = divmod(offset, CHUNK)
            take = min(end - offset, CHUNK - at)
            if sequential or self._held(inode, n):
                part = self._chunk(inode, n)[at:at + take]
                parts.append(part if len(part) == take else fit(part, take))
            else:
                parts.append(self.fs.read_part(inode.entry.ino, n, at, take))
            offset += take
        if sequential:
            self._read_ahead(inode, n + 1)
        return b"".join(parts)

    @staticmethod
    def _held(inode: Inode, n: int) -> bool:
        return n in inode.dirty or n in inode.sending or n in inode.clean or \
            inode.ahead is not None and inode.ahead[0] == n

    def _read_ahead(self, inode: Inode, n: int) -> None:
        """Chunk `n` fetched by the courier while the kernel takes this one."""
        if n * CHUNK < inode.size and not self._held(inode, n):
            inode.ahead = (n, self.courier.read(inode.entry.ino, n))

    def _chunk(self, inode: Inode, n: int):
        """Chunk `n` as the file's bytes (its share of the size, zeros where
        never written): changed, cached, or read now and cached."""
        if n in inode.dirty:
            return inode.dirty[n]
        if n in inode.sending:
            return inode.sending[n][1]
        if n in inode.clean:
            inode.clean.move_to_end(n)
            return inode.clean[n]
        share = max(0, min(CHUNK, inode.size - n * CHUNK))
        if inode.ahead is not None and inode.ahead[0] == n:
            stored, inode.ahead = inode.ahead[1].result(), None
        else:
            stored = self.fs.read_chunk(inode.entry.ino, n) if share else b""
        data = fit(stored, share) if share else b""
        inode.clean[n] = data
        if len(inode.clean) > CACHED:
            inode.clean.popitem(last=False)
        return data

    def write(self, path, data, offset, fh):
        inode = self.inodes[self.files[fh]]
        self._raise_failed(inode)
        end = offset + len(data)
        if end > self.fs.max_file:
            raise FsError(errno.EFBIG, path)
        view, done = memoryview(data), 0
        while done < len(data):
            n, at = divmod(offset + done, CHUNK)
            take = min(len(data) - done, CHUNK - at)
            if take == CHUNK:       # a whole chunk: kept as the kernel gave it, not copied
                self._changing(inode, n, whole=True)
                inode.dirty[n] = data if take == len(data) else bytes(view[done:done + take])
            else:
                chunk = self._changing(inode, n)
                if len(chunk) < at:
                    chunk.extend(bytes(at - len(chunk)))
                chunk[at:at + take] = view[done:done + take]
            done += take
        inode.size = max(inode.size, end)
        inode.changes.update(mtime=(now := time.time()), ctime=now)
        self._write_out(inode, keep=DIRTY)
        return len(data)

    def _changing(self, inode: Inode, n: int, whole: bool = False) -> bytearray:
        """Chunk `n` to change, as a bytearray of its share of the size (empty
        when the write covers it whole: nothing to read)."""
        if n not in inode.dirty:
            start = bytearray() if whole else bytearray(self._chunk(inode, n))
            inode.clean.pop(n, None)
            if inode.ahead is not None and inode.ahead[0] == n:
                inode.ahead = None
            inode.dirty[n] = start
        elif type(inode.dirty[n]) is bytes:     # a whole chunk as written, now changed in part
            inode.dirty[n] = bytearray(inode.dirty[n])
        return inode.dirty[n]

    def _write_out(self, inode: Inode, keep: int = 0) -> None:
        """Hand changed chunks to the courier, oldest first and GROUP at a time,
        until at most `keep` are left; at most SENDING of them in flight
        (write-behind)."""
        while len(inode.dirty) > keep:
            chunks = [inode.dirty.popitem(last=False)
                      for _ in range(min(GROUP, len(inode.dirty)))]
            for n, _ in chunks:
                if n in inode.sending:  # an older copy: stored first, its error kept
                    self._settle(inode, keep=0, only=n)
            sent = self.courier.write(inode.path, inode.entry.ino, chunks)
            for n, data in chunks:
                inode.sending[n] = (sent, data)
            self._settle(inode, keep=SENDING)

    def _settle(self, inode: Inode, keep: int = 0, only: int | None = None) -> None:
        """Let go of chunks the courier stored, waiting (oldest first) until at
        most `keep` are in flight; the first that failed is kept in
        `inode.failed`, answered EIO by the next write, fsync or close."""
        for n, (sent, _) in list(inode.sending.items()):
            if only is not None and n != only:
                continue
            if len(inode.sending) <= keep and not sent.done():
                break
            del inode.sending[n]
            if sent.exception() is not None and inode.failed is None:
                inode.failed = sent.exception()

    @staticmethod
    def _raise_failed(inode: Inode) -> None:
        failed, inode.failed = inode.failed, None
        if failed is not None:
            log.error("write %s: a chunk written out failed: %s", inode.path, failed)
            raise FsError(errno.EIO, inode.path)

    def _settle_all(self) -> None:
        """Every open file's chunks stored, before an op that may remove a file's
        chunks (none may land after they are removed)."""
        for inode in self.inodes.values():
            self._settle(inode)

    def truncate(self, path, length, fh=None):
        if length > self.fs.max_file:
            raise FsError(errno.EFBIG, path)
        if fh is not None:
            self._truncate(self.inodes[self.files[fh]], length)
            return
        entry = self.fs.stat(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR, path)
        fh = self._open(path, entry)
        try:
            self._truncate(self.inodes[entry.ino], length)
        finally:
            self.release(path, fh)

    def _truncate(self, inode: Inode, length: int) -> None:
        """Cut the chunk the new end falls in (so a later growth reads zeros)
        and remove the chunks past it; growing stores nothing (sparse)."""
        inode.ahead = None
        if length < inode.size:
            self._settle(inode)     # no chunk written out lands after the removes
            n, at = divmod(length, CHUNK)
            if at:
                del self._changing(inode, n)[at:]
            first_gone = n + (1 if at else 0)
            for cached in (inode.dirty, inode.clean):
                for k in [k for k in cached if k >= first_gone]:
                    del cached[k]
            self.fs.drop_chunks(inode.entry.ino, first_gone, inode.size)
        inode.size = length
        inode.changes.update(mtime=(now := time.time()), ctime=now)

    def flush(self, path, fh):
        inode = self.inodes[self.files[fh]]
        self._write_out(inode)
        self._settle(inode)
        self._raise_failed(inode)
        if inode.changes or inode.size != inode.entry.size:
            inode.entry = self.fs.setattr(inode.path, inode.entry, size=inode.size,
                                          **inode.changes)
            inode.changes, inode.pages = {}, version(inode.entry)

    def fsync(self, path, datasync, fh):
        self.flush(path, fh)

    def release(self, path, fh):
        ino, flushed = self.files[fh], False
        try:
            self.flush(path, fh)
            flushed = True
        finally:
            del self.files[fh]
            inode = self.inodes[ino]
            inode.opens -= 1
            if inode.opens == 0:
                del self.inodes[ino]
            if flushed:         # what the kernel wrote through to its pages is stored
                self._seen(ino, inode.pages)
            else:
                self.versions.pop(ino, None)


class Fuse(mfusepy.FUSE):
    """mfusepy's FUSE, telling the kernel at each open whether it may keep the
    pages it holds of the file (``SrwOperations._kept``)."""

    def open(self, path, fip):
        status = super().open(path, fip)
        fip.contents.keep_cache = self.operations._kept(fip.contents.fh)
        return status

    # fchmod, fchown, futimens: their handle too (mfusepy passes only the path).

    def chmod_fuse_3(self, path, mode, fip):
        return self.operations.chmod(self._path(path), mode, _fh(fip))

    def chown_fuse_3(self, path, uid, gid, fip):
        return self.operations.chown(self._path(path), uid, gid, _fh(fip))

    def utimens_fuse_3(self, path, buf, fip):
        times = None if not buf else (mfusepy.time_of_timespec(buf.contents.actime, use_ns=True),
                                      mfusepy.time_of_timespec(buf.contents.modtime, use_ns=True))
        return self.operations.utimens(self._path(path), times, _fh(fip))

    def _path(self, path: bytes | None) -> str | None:
        return None if path is None else path.decode(self.encoding, self.errors)


def _fh(fip) -> int | None:
    return fip.contents.fh if fip else None


def mount(session_factory, mountpoint: str, allow_other: bool = False,
          default_permissions: bool = False, attr_timeout: float = 1.0,
          local_reads: bool = True) -> int:
    """Serve the tree at `mountpoint` until it is unmounted; 0 on a clean unmount.
    `allow_other`: other users may use the mount; `default_permissions`: the
    kernel checks each entry's mode and owner (see README); `attr_timeout`:
    seconds the kernel keeps a name's attributes (each hard link is a name of
    its own there); `local_reads`: read from the stores of this host's nodes in
    this process where it may (storage/local_read.py)."""
    if not os.path.isdir(mountpoint):
        raise FsError(errno.ENOTDIR if os.path.exists(mountpoint) else errno.ENOENT,
                      mountpoint)
    logging.basicConfig(level=logging.WARNING, format="srw mount: %(message)s")
    with session_factory() as session:
        small = [n.name for n in session.config.nodes if n.max_value < CHUNK]
        if small:
            print(f"srw: {mountpoint}: node {small[0]}'s max_value is under {CHUNK} bytes, "
                  "a file chunk (fs/client.py CHUNK): raise it to mount", file=sys.stderr)
            return 1
        local = session.engine.local_reads() if local_reads else None
        courier = Courier(session_factory, local)
        operations = SrwOperations(FsClient(session, local=local), courier, attr_timeout)
        try:
            if not 0 <= attr_timeout <= 3600:
                raise FsError(errno.EINVAL, f"--attr-timeout {attr_timeout}: 0 to 3600 s")
            options = {"allow_other": True} if allow_other else {}
            if attr_timeout != 1.0:
                options["attr_timeout"] = attr_timeout
            Fuse(operations, mountpoint, foreground=True, nothreads=True, use_ino=True,
                 fsname="srw", default_permissions=default_permissions, **options)
        except RuntimeError as exc:   # fuse_main's non-zero status
            if exc.args == (ENDED_BY_SIGNAL,):
                return 0              # Ctrl-C or SIGTERM: libfuse has unmounted
            print(f"srw: {mountpoint}: libfuse could not serve it (fuse_main: {exc}); "
                  "its reason is on the line above", file=sys.stderr)
            return 1
        finally:
            courier.close()
            if local is not None:
                local.close()
    return 0
