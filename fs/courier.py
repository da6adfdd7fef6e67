"""Chunks carried to and from the store by threads of the mount's own.

The mount serves the kernel from one thread; while that thread waits for the
store, the kernel waits for it.  The Courier takes the waits it can off that
thread: a changed chunk written out (write-behind) and the next chunk of a
sequential read fetched (read-ahead), each a ``Future``.  It has LANES
threads, each with its own Session (ZeroMQ sockets and Redis clients are not
shared between threads), made there; chunk `n` always goes to lane
``n % LANES``, which runs one job at a time in the order given: writes of
one chunk land in order, and a read sent after a write of its chunk sees
that write.  Two lanes put the two chunks a file may have in flight
(fs/mount.py SENDING) before the node together, and a node that finds both
waiting commits (and fsyncs) them as one batch.  What a job raises is
raised by its ``Future.result()``.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .client import FsClient

LANES = 2


class Courier:
    def __init__(self, session_factory, local=None):
        """`session_factory()`: a new Session (a context manager), for each thread;
        `local`: FsClient's, shared."""
        self._lanes = [_Lane(session_factory, local) for _ in range(LANES)]

    def write(self, path: str, ino: str, n: int, data) -> Future:
        """Chunk `n` stored in every group (FsClient.write_chunk); `data` is not
        changed by the caller after."""
        return self._lanes[n % LANES].submit(lambda fs: fs.write_chunk(path, ino, n, data))

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
