"""Chunks carried to and from the store by threads of the mount's own.

The mount serves the kernel from one thread; while that thread waits for the
store, the kernel waits for it.  The Courier takes the waits it can off that
thread: a changed chunk written out (write-behind) and the next chunk of a
sequential read fetched (read-ahead), each a ``Future``.  It has LANES
threads, each with its own Session (ZeroMQ sockets and Redis clients are not
shared between threads), made there; each runs one job at a time in the
order given.  A write job is GROUP chunks of one file, all sent before any
reply is awaited: a node commits (and fsyncs) the writes it finds waiting
together, so a sequential write pays one synced commit per few MiB, not per
MiB; two lanes keep the next group on its way while the node commits one.
Order between jobs is the mount's (fs/mount.py): it sends no chunk while an
older write of it is in flight, and reads no chunk from the store while it
is being written (it has the bytes).  Chunk `n`'s read-ahead goes to lane
``n % LANES``.  What a job raises is raised by its ``Future.result()``.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .client import GROUP, FsClient

LANES = 2


class Courier:
    def __init__(self, session_factory, local=None):
        """`session_factory()`: a new Session (a context manager), for each thread;
        `local`: FsClient's, shared."""
        self._lanes = [_Lane(session_factory, local) for _ in range(LANES)]

    def write(self, path: str, ino: str, chunks: list) -> Future:
        """Each (n, data) stored in every group, sent together (FsClient.write_chunks),
        by the lane of the first; no data is changed by the caller after."""
        return self._lanes[chunks[0][0] // GROUP % LANES].submit(
            lambda fs: fs.write_chunks(path, ino, chunks))

    def read(self, ino: str, n: int) -> Future:
        """Chunk `n` as stored (FsClient.read_chunk)."""
        return self._lanes[n % LANES].submit(lambda fs: fs.read_chunk(ino, n))

    def close(self) -> None:
        """Finish what was given, then close the threads' Sessions."""
        for lane in self._lanes:
            lane.close()


class _Lane:
    """One thread and its Session."""

    def __init__(self, session_factory, local):
        self._factory, self._local, self._session, self._fs = session_factory, local, None, None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="srw-courier",
                                        initializer=self._start)

    def _start(self) -> None:
        self._session = self._factory().__enter__()
        self._fs = FsClient(self._session, local=self._local)   # used by this thread alone

    def submit(self, job) -> Future:
        return self._pool.submit(lambda: job(self._fs))

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._session is not None:
            self._session.__exit__(None, None, None)
