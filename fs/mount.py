"""``srw mount MOUNTPOINT``: the cluster's tree through FUSE (mfusepy, libfuse3).

One thread serves the kernel (mfusepy's ``nothreads``): the FsClient and its
Session (ZeroMQ sockets) are not thread-safe, and every call is a network
round trip anyway.  An open file's contents are held in memory from its first
read or write to its flush (close-to-open, as NFS): a write is one store write
of the whole file and one exec for its size, at flush.  Ctrl-C or
``fusermount3 -u MOUNTPOINT`` unmounts; libfuse returns and the Session closes.
A directory value in the store that is not one is EIO (FsClient checks every
value it reads, ``fs/shape.py``; the reason goes to this process's log).
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import stat
import sys
import time
from dataclasses import dataclass

import mfusepy

from broker.client import BrokerUnavailable
from storage.client import StorageError

from .client import Entry, FsClient, FsError

BLOCK = 4096
log = logging.getLogger("srw.fs.mount")
# fuse_main's status when its loop ended on SIGINT, SIGTERM or SIGHUP (libfuse3
# helper.c: any non-zero loop result becomes 8); the mount is gone by then.
ENDED_BY_SIGNAL = 8


def storage_errors_as_eio(cls):
    """A node that does not answer is EIO to the caller (and a line in the log),
    not the EINVAL mfusepy gives an OSError without an errno."""
    def wrap(method):
        @functools.wraps(method)
        def call(self, path, *args):
            try:
                return method(self, path, *args)
            except (StorageError, BrokerUnavailable) as exc:
                log.error("%s %s: %s", method.__name__, path, exc)
                raise FsError(errno.EIO, path) from None
        return call
    for name, method in list(vars(cls).items()):
        if callable(method) and not name.startswith("_"):
            setattr(cls, name, wrap(method))
    return cls


@dataclass
class OpenFile:
    path: str
    entry: Entry
    data: bytearray | None = None     # loaded at first use
    dirty: bool = False


@storage_errors_as_eio
class SrwOperations(mfusepy.Operations):
    use_ns = True   # utimens in nanoseconds

    def __init__(self, fs: FsClient):
        self.fs = fs
        self.files: dict[int, OpenFile] = {}
        self.next_fh = 1
        self.uid, self.gid = os.getuid(), os.getgid()

    # Attributes ------------------------------------------------------------------

    def getattr(self, path, fh=None):
        entry, size = self.fs.stat(path), None
        for handle in self.files.values():     # an open file's size is its buffer's
            if handle.entry.ino == entry.ino and handle.data is not None:
                size = len(handle.data)
        return self._attrs(entry, size)

    def _attrs(self, entry: Entry, size: int | None = None) -> dict:
        size = entry.size if size is None else size
        mtime = int(entry.mtime * 1e9)
        return {"st_mode": entry.st_mode, "st_nlink": 2 if entry.is_dir else 1,
                "st_size": size, "st_blocks": (size + 511) // 512, "st_blksize": BLOCK,
                "st_uid": self.uid, "st_gid": self.gid,
                "st_mtime": mtime, "st_ctime": mtime, "st_atime": mtime}

    def readdir(self, path, fh):
        listing = self.fs.readdir(path)
        return [".", ".."] + [(name, self._attrs(e), 0) for name, e in listing.items()]

    def chmod(self, path, mode):
        self.fs.setattr(path, self.fs.stat(path), mode=stat.S_IMODE(mode))

    def chown(self, path, uid, gid):
        return 0    # no owners: every entry belongs to whoever mounted

    def utimens(self, path, times=None):
        mtime = times[1] / 1e9 if times else time.time()
        self.fs.setattr(path, self.fs.stat(path), mtime=mtime)

    def statfs(self, path):
        return {"f_bsize": BLOCK, "f_frsize": BLOCK, "f_blocks": 1 << 30,
                "f_bfree": 1 << 30, "f_bavail": 1 << 30, "f_namemax": 255}

    # Directories -------------------------------------------------------------------

    def mkdir(self, path, mode):
        self.fs.mkdir(path, stat.S_IMODE(mode))

    def rmdir(self, path):
        self.fs.rmdir(path)

    def unlink(self, path):
        self.fs.unlink(path)

    def rename(self, old, new):
        self.fs.rename(old, new)
        for handle in self.files.values():     # open files follow their name
            if handle.path == old or handle.path.startswith(old + "/"):
                handle.path = new + handle.path[len(old):]

    # Files -------------------------------------------------------------------------

    def create(self, path, mode, flags=0):
        entry = self.fs.create(path, stat.S_IMODE(mode), exclusive=bool(flags & os.O_EXCL))
        return self._open(path, entry, bytearray())

    def open(self, path, flags):
        entry = self.fs.stat(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR, path)
        handle = self._open(path, entry, bytearray() if flags & os.O_TRUNC else None)
        self.files[handle].dirty = bool(flags & os.O_TRUNC) and entry.size > 0
        return handle

    def _open(self, path: str, entry: Entry, data: bytearray | None) -> int:
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.files[fh] = OpenFile(path, entry, data)
        return fh

    def _data(self, handle: OpenFile) -> bytearray:
        if handle.data is None:
            handle.data = bytearray(self.fs.read_data(handle.entry.ino))
        return handle.data

    def read(self, path, size, offset, fh):
        return bytes(self._data(self.files[fh])[offset:offset + size])

    def write(self, path, data, offset, fh):
        handle = self.files[fh]
        buf = self._data(handle)
        if offset > len(buf):
            buf.extend(bytes(offset - len(buf)))
        buf[offset:offset + len(data)] = data
        handle.dirty = True
        return len(data)

    def truncate(self, path, length, fh=None):
        if fh is None:
            fh = self._open(path, self.fs.stat(path), None)
            try:
                self._truncate(self.files[fh], length)
                self.flush(path, fh)
            finally:
                self.files.pop(fh)
            return
        self._truncate(self.files[fh], length)

    def _truncate(self, handle: OpenFile, length: int) -> None:
        buf = self._data(handle)
        del buf[length:]
        buf.extend(bytes(length - len(buf)))
        handle.dirty = True

    def flush(self, path, fh):
        handle = self.files[fh]
        if handle.dirty:
            handle.entry = self.fs.write_data(handle.path, handle.entry, bytes(handle.data))
            handle.dirty = False

    def fsync(self, path, datasync, fh):
        self.flush(path, fh)

    def release(self, path, fh):
        try:
            self.flush(path, fh)
        finally:
            self.files.pop(fh, None)


def mount(session_factory, mountpoint: str) -> int:
    """Serve the tree at `mountpoint` until it is unmounted; 0 on a clean unmount."""
    if not os.path.isdir(mountpoint):
        raise FsError(errno.ENOTDIR if os.path.exists(mountpoint) else errno.ENOENT,
                      mountpoint)
    logging.basicConfig(level=logging.WARNING, format="srw mount: %(message)s")
    with session_factory() as session:
        operations = SrwOperations(FsClient(session))
        try:
            mfusepy.FUSE(operations, mountpoint, foreground=True, nothreads=True,
                         fsname="srw", default_permissions=False)
        except RuntimeError as exc:   # fuse_main's non-zero status
            if exc.args == (ENDED_BY_SIGNAL,):
                return 0              # Ctrl-C or SIGTERM: libfuse has unmounted
            print(f"srw: {mountpoint}: libfuse could not serve it (fuse_main: {exc}); "
                  "its reason is on the line above", file=sys.stderr)
            return 1
    return 0
