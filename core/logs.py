"""Logging for every srw process: one format, the level and file from [log].

A line per executed request is part of the contract, so a line must be
cheap: records skip the caller's frame, which we never print (the pid is
written into the format once), the timestamp is formatted
once a second, and the busy processes (broker, workers, proxy) buffer their
lines and write them with one system call when they go idle (`flush`), after
BUFFER_SECONDS, or at once for a warning or worse.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import time

from core.config import LogSettings

BUFFER_LINES = 256      # a buffered handler writes at least this often ...
BUFFER_SECONDS = 0.2    # ... and no line waits longer than this for the next record

# Two of the logging HOWTO's "Optimization" switches: no caller lookup (a
# formatter that prints %(lineno)d or %(funcName)s gets 0 and a placeholder) and
# no multiprocessing lookup.  Thread and process ids stay: python.init's own
# formatters (libelliptics_python's prints %(process)d) fail on a None.
logging._srcfile = None
logging.logMultiprocessing = False

_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_path = ""  # the [log] file this process writes, for `reopen`


class LineHandler(logging.Handler):
    """Whole lines to a file descriptor opened for appending, so the lines of
    the node's processes interleave but never split."""

    def __init__(self, fd: int, buffered: bool):
        super().__init__()
        self.fd, self.buffered = fd, buffered
        self.lines: list[str] = []
        self.oldest = 0.0
        os.register_at_fork(after_in_child=self._forget)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        if not self.lines:
            self.oldest = record.created
        self.lines.append(line)
        if (not self.buffered or record.levelno >= logging.WARNING
                or len(self.lines) >= BUFFER_LINES
                or record.created - self.oldest >= BUFFER_SECONDS):
            self.flush()

    def flush(self) -> None:
        with self.lock:
            if not self.lines:
                return
            data = ("\n".join(self.lines) + "\n").encode("utf-8", "backslashreplace")
            self.lines = []
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # a full disk or a closed stderr must not take the process down

    def _forget(self) -> None:
        self.lines = []  # the parent's lines: the parent writes them


class LineFormatter(logging.Formatter):
    """logging's default timestamp, `strftime` once per second instead of per line."""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self._stamp = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime(self.default_time_format,
                                                 self.converter(second)))
        return f"{self._stamp[1]},{int(record.msecs):03d}"


class Throttle:
    """At most one event per `interval` seconds; counts the others."""
    __slots__ = ("interval", "next", "suppressed")

    def __init__(self, interval: float):
        self.interval, self.next, self.suppressed = interval, 0.0, 0

    def allow(self, now: float) -> int | None:
        """None to suppress this event, else how many were suppressed before it."""
        if now < self.next:
            self.suppressed += 1
            return None
        self.next = now + self.interval
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


def setup(settings: LogSettings, process: str, buffered: bool = False) -> None:
    """Log to [log] file (appended; lines from all processes interleave) or stderr.

    A `buffered` process must call `flush()` whenever it is about to wait."""
    global _path
    _path = settings.file
    if settings.file:
        fd = os.open(settings.file, _FILE_FLAGS, 0o644)
        signal.signal(signal.SIGUSR1, on_reopen_signal)
    else:
        fd = sys.stderr.fileno()
    root = logging.getLogger()
    for old in root.handlers:
        old.flush()
    root.handlers[:] = [LineHandler(fd, buffered)]
    root.setLevel(settings.level.upper())
    retag(process)


def retag(process: str, buffered: bool | None = None) -> None:
    """A forked process names itself (and its pid) in the lines it logs."""
    for handler in logging.getLogger().handlers:
        if buffered is not None and isinstance(handler, LineHandler):
            handler.buffered = buffered
        handler.setFormatter(LineFormatter(
            f"%(asctime)s {process}[{os.getpid()}] %(levelname)s %(message)s"))


def reopen() -> None:
    """The log file again, under the same descriptor (logrotate moved the old
    one away): what is buffered goes to the old file, what follows to the new."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, LineHandler)]
    if not _path or not handlers:
        return
    try:
        fd = os.open(_path, _FILE_FLAGS, 0o644)
    except OSError as exc:
        logging.getLogger("srw.logs").error("cannot reopen the log file %s: %s", _path, exc)
        return
    for handler in handlers:
        handler.flush()
        os.dup2(fd, handler.fd, inheritable=False)
    os.close(fd)


def on_reopen_signal(signum, frame) -> None:
    """SIGUSR1 in every srw process that logs to a file: `reopen`."""
    reopen()


def flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def to_stderr(process: str) -> None:
    """In a sandbox process (zygote, runner), whose stderr is a pipe the worker
    reads and logs: every record goes there, unbuffered, with its own pid (set
    once in the zygote, its runners inherit it).  Handlers python.init gave its
    own loggers (log files, which the sandbox may not hold open) go there too,
    keeping their formats."""
    global _path
    _path = ""  # nothing here to reopen
    stderr = logging.StreamHandler(sys.stderr)
    stderr.setFormatter(logging.Formatter(f"{process}[%(process)d] %(levelname)s %(message)s"))
    logging.getLogger().handlers[:] = [stderr]
    for logger in logging.root.manager.loggerDict.values():
        for i, handler in enumerate(getattr(logger, "handlers", [])):
            if isinstance(handler, logging.FileHandler):
                moved = logging.StreamHandler(sys.stderr)
                moved.setFormatter(handler.formatter)
                moved.setLevel(handler.level)
                logger.handlers[i] = moved
