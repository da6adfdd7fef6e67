"""Logging for every srw process: one format, the level and file from [log].

A line per executed request is part of the contract, so a line must be
cheap: records skip the caller's frame, which we never print (the pid is
written into the format once), the timestamp is formatted
once a second, and the busy processes (broker, workers, proxy) buffer their
lines and write them with one system call when they go idle (`flush`), after
BUFFER_SECONDS, or at once for a warning or worse.

The worker's line per exec takes a shorter path still (`HotLine`): no
LogRecord, no Formatter, no filters; its time and arguments go into the buffer as they
are, and become text when the buffer is written.  CPU per line on this 2-CPU
machine, written to a file: 10-13 us through `logger.info` (under cProfile the
LogRecord is 37% of it, the Formatter 25%, handler locks and filters 18%),
2.5-3.5 us through `HotLine` (bench/log_bench.py).
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time

from core.config import LogSettings

BUFFER_LINES = 256      # a buffered handler writes at least this often ...
BUFFER_SECONDS = 0.1    # ... and no line waits longer than this for the next record

# Two of the logging HOWTO's "Optimization" switches: no caller lookup (a
# formatter that prints %(lineno)d or %(funcName)s gets 0 and a placeholder) and
# no multiprocessing lookup.  Thread and process ids stay: python.init's own
# formatters (libelliptics_python's prints %(process)d) fail on a None.
logging._srcfile = None
logging.logMultiprocessing = False

_FILE_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
_path = ""  # the [log] file this process writes, for `reopen`
_hot: LineHandler | None = None  # the buffered handler HotLine writes to, if any


class LineHandler(logging.Handler):
    """Whole lines to a file descriptor opened for appending, so the lines of
    the node's processes interleave but never split."""

    def __init__(self, fd: int, buffered: bool):
        super().__init__()
        self.fd, self.buffered = fd, buffered
        self.tag = ""  # "process[pid]", for HotLine's lines (retag)
        # Lines, or HotLine's (time, tag, format, args) that `flush` formats.
        self.lines: list[str | tuple] = []
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

    def defer(self, tag: str, fmt: str, args: tuple) -> None:
        """HotLine's INFO line, formatted when written."""
        now = time.time()
        lines = self.lines
        if not lines:
            self.oldest = now
        lines.append((now, tag, fmt, args))  # no lock: `flush` never replaces the list
        if len(lines) >= BUFFER_LINES or now - self.oldest >= BUFFER_SECONDS:
            self.flush()

    def flush(self) -> None:
        with self.lock:
            # Taken from the front of the same list, so that a line appended
            # meanwhile (by another thread, isolation none) stays for the next.
            lines = self.lines[:]
            if not lines:
                return
            del self.lines[:len(lines)]
        data = self._text(lines).encode("utf-8", "backslashreplace")
        try:
            while data:
                data = data[os.write(self.fd, data):]
        except OSError:
            pass  # a full disk or a closed stderr must not take the process down

    def _text(self, lines: list[str | tuple]) -> str:
        """The buffer as text, a line each, HotLine's formatted as logging would:
        one `%` per line, into a head (date and time, tag, level) made once per
        second of lines and format (as LineFormatter.stamp)."""
        formatter = self.formatter if isinstance(self.formatter, LineFormatter) \
            else LineFormatter("")
        out = []
        key, head = None, ""
        for line in lines:
            if line.__class__ is tuple:
                created, tag, fmt, args = line
                second = int(created)
                if key != (second, tag, fmt):
                    key = (second, tag, fmt)
                    head = f"{formatter.date(second)},%03d {tag.replace('%', '%%')} INFO {fmt}"
                try:
                    line = head % (int((created - second) * 1000), *args)
                except Exception:  # a bad line is shown, and the others written
                    line = f"{formatter.stamp(created)} {tag} INFO {fmt!r} % {args!r}: " \
                        "bad arguments"
            out.append(line)
        out.append("")
        return "\n".join(out)

    def _forget(self) -> None:
        self.lines = []  # the parent's lines: the parent writes them


class LineFormatter(logging.Formatter):
    """logging's default timestamp, `strftime` once per second instead of per line."""

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self._stamp = (-1, "")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return self.stamp(record.created)

    def stamp(self, created: float) -> str:
        """`created` (time.time()) as logging prints it: local time, milliseconds."""
        second = int(created)
        return f"{self.date(second)},{int((created - second) * 1000):03d}"

    def date(self, second: int) -> str:
        """The date and time of a second, local time (kept for the next call)."""
        if self._stamp[0] != second:
            self._stamp = (second, time.strftime(self.default_time_format,
                                                 self.converter(second)))
        return self._stamp[1]


class HotLine:
    """`logger.info(fmt, *args)` for a line logged once per request, at a
    third of the cost: in a process with a buffered LineHandler (and no
    other handler) the line goes straight into its buffer, unformatted, and
    takes the same text as any other INFO line when the buffer is written.
    Anywhere else (unbuffered, stderr in a sandbox, a handler python.init
    added in isolation none) it is `logger.info`.  The logger must leave its
    lines to the root's handlers (srw.*'s loggers do): its own handlers and
    filters are not consulted."""
    __slots__ = ("logger", "fmt")

    def __init__(self, logger: logging.Logger, fmt: str):
        self.logger, self.fmt = logger, fmt

    def __call__(self, *args) -> None:
        if not self.logger.isEnabledFor(logging.INFO):
            return
        handler, handlers = _hot, logging.root.handlers
        if handler is not None and len(handlers) == 1 and handlers[0] is handler:
            handler.defer(handler.tag, self.fmt, args)
        else:
            self.logger.info(self.fmt, *args)


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
    global _hot
    _hot = None
    tag = f"{process}[{os.getpid()}]"
    for handler in logging.getLogger().handlers:
        if isinstance(handler, LineHandler):
            if buffered is not None:
                handler.buffered = buffered
            handler.tag = tag
            if handler.buffered:
                _hot = handler
        handler.setFormatter(LineFormatter(f"%(asctime)s {tag} %(levelname)s %(message)s"))


def reopen() -> None:
    """The log file again, under the same descriptor (logrotate moved the old
    one away): what is buffered goes to the new file with what follows.

    Called from a signal handler (SIGUSR1), so it does not flush: the handler
    may have interrupted a write to the buffer, and a flush in between would
    drop that line.  dup2 replaces the file under the descriptor at once."""
    handlers = [h for h in logging.getLogger().handlers if isinstance(h, LineHandler)]
    if not _path or not handlers:
        return
    try:
        fd = os.open(_path, _FILE_FLAGS, 0o644)
    except OSError as exc:
        logging.getLogger("srw.logs").error("cannot reopen the log file %s: %s", _path, exc)
        return
    for handler in handlers:
        os.dup2(fd, handler.fd, inheritable=False)
    os.close(fd)


def on_reopen_signal(signum, frame) -> None:
    """SIGUSR1 in every srw process that logs to a file: `reopen`."""
    reopen()


def due() -> float:
    """Seconds until the oldest buffered exec line must be written (BUFFER_SECONDS
    after it was logged; inf when none waits): a worker waiting on a long script
    writes it then rather than when the script ends."""
    handler = _hot
    if handler is None or not handler.lines:
        return math.inf
    return handler.oldest + BUFFER_SECONDS - time.time()


def flush() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()


def to_stderr(process: str) -> None:
    """In a sandbox process (zygote, runner), whose stderr is a pipe the worker
    reads and logs: every record goes there, unbuffered, with its own pid (set
    once in the zygote, its runners inherit it).  Handlers python.init gave its
    own loggers (log files, which the sandbox may not hold open) go there too,
    keeping their formats."""
    global _path, _hot
    _path, _hot = "", None  # nothing here to reopen, nothing buffered
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
