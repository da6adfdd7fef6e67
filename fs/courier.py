"""Chunks carried to and from the store by a thread of the mount's own.

The mount serves the kernel from one thread; while that thread waits for the
store, the kernel waits for it.  The Courier takes the waits it can off that
thread: a changed chunk written out (write-behind) and the next chunk of a
sequential read fetched (read-ahead), each a ``Future``.  Its thread has its
own Session (ZeroMQ sockets and Redis clients are not shared between
threads), made there, and runs one job at a time in the order given: writes
of one chunk land in order, and a read sent after a write of its chunk sees
that write.  What a job raises is raised by its ``Future.result()``.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

from .client import FsClient


class Courier:
    def __init__(self, session_factory):
        """`session_factory()`: a new Session (a context manager), for the thread."""
        self._factory, self._session, self._fs = session_factory, None, None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="srw-courier",
                                        initializer=self._start)

    def _start(self) -> None:
        self._session = self._factory().__enter__()
        self._fs = FsClient(self._session)      # used by the thread alone

    def write(self, path: str, ino: str, n: int, data) -> Future:
        """Chunk `n` stored in every group (FsClient.write_chunk); `data` is not
        changed by the caller after."""
        return self._pool.submit(lambda: self._fs.write_chunk(path, ino, n, data))

    def read(self, ino: str, n: int) -> Future:
        """Chunk `n` as stored (FsClient.read_chunk)."""
        return self._pool.submit(lambda: self._fs.read_chunk(ino, n))

    def close(self) -> None:
        """Finish what was given, then close the thread's Session."""
        self._pool.shutdown(wait=True)
        if self._session is not None:
            self._session.__exit__(None, None, None)
