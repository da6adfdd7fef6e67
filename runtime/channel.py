"""The pipes between a worker and its runner: one request down, one reply up.

    worker --req pipe-->  runner      REQUEST  header + name, source, code, cookie,
                                               capability, data
    worker <--res pipe--  runner      REPLY    header + error, data

    REQUEST header  <QQIIIIIQ seq, version, name_len, source_len, code_len,
                              cookie_len, capability_len, data_len
                    capability: the request's token (core/capability.py), b""
                    without curve
                    version 0: no named script; else the worker's number for one
                    version of it, whose source comes along the first time this
                    runner gets it (source_len 0 afterwards)
    REPLY header    <QBBHIQ   seq, status, flags, spare, error_len, data_len

    worker <--res pipe--  runner      ASK      REPLY header, status ASK, lengths 0:
                                               the running request's capability,
                                               once, at its script's first store call
    worker --req pipe-->  runner      GRANT    REQUEST header, version GRANT, only
                                               capability_len set: the answer (it may
                                               follow requests written ahead)

In copy isolation the worker may write a runner its tenant's next requests
while it runs the current one (runtime/isolation.py: held requests); the
runner reads them one at a time and answers each in order.

The worker is trusted and the runner is not: every reply is read against a
deadline, its header is checked (the sequence number it answers, which the
worker draws at random for each request, a status a script run can earn,
lengths within the caps) before the rest of it is read, and nothing the
runner writes is ever unpickled or unmarshalled.  A reply that breaks a rule
is `Garbled`, and the worker replaces the runner; so it does when more than
the reply was waiting and no request was written ahead.
"""
from __future__ import annotations

import os
import select
import struct
import time
from typing import NamedTuple

from core import statuses

REQUEST = struct.Struct("<QQIIIIIQ")
REPLY = struct.Struct("<QBBHIQ")

# What a script run can earn; the worker decides timeouts, kills and refusals.
RUN_STATUSES = (statuses.OK, statuses.SCRIPT_ERROR, statuses.MEMORY, statuses.OUTPUT_TOO_LARGE,
                statuses.UNAVAILABLE)  # a script's store was down (protocol.Unavailable)
STATUS_CODE = {status: i for i, status in enumerate(RUN_STATUSES)}
ASK = 255           # a REPLY header's status: not a reply, the capability asked for
ASKED = "asked"     # what read_reply returns for an ASK
GRANT = 2**64 - 1   # a REQUEST header's version: not a request, the ASK's answer

# Reply flags: what the runner says of itself once the script is done.
STALE = 1   # it could not reset what the script left: replace it
ZEROMQ = 2  # it holds a ZeroMQ context (a storage session): two threads of its own
MOVED = 4   # its Redis calls met MOVED: the client's slot map is old (a hint, no more)

MAX_ERROR = 64 * 1024  # bytes of traceback a reply may carry
FIRST = 64 * 1024  # a first read takes a small message whole (and stays below malloc's mmap)
CHUNK = 1 << 20


class Garbled(Exception):
    """A runner's reply that breaks the protocol; the runner must be replaced."""


class TooLarge(Garbled):
    """A reply announcing more data than output_bytes allows (never read)."""

    def __init__(self, size: int, cap: int):
        super().__init__(f"__return_data is {size} bytes; the sandbox profile allows "
                         f"{cap} (output_bytes)")


# NamedTuples, not frozen dataclasses: one is made per request on each side, and a
# frozen dataclass sets each field through object.__setattr__ (~3x the cost).
class Request(NamedTuple):
    seq: int
    version: int
    name: str
    source: bytes
    code: str
    cookie: str
    capability: bytes
    data: bytes


class Reply(NamedTuple):
    status: str
    flags: int
    error: str
    data: bytes


# Worker side -----------------------------------------------------------------

def request_bytes(seq: int, version: int, name: str, source: bytes, code: str,
                  cookie: str, capability: bytes, data: bytes) -> list[bytes]:
    """One request's header and fields, in the order they go down the pipe."""
    raw_name, raw_code = name.encode(), code.encode("utf-8", "surrogatepass")
    raw_cookie = cookie.encode("utf-8", "surrogatepass")
    parts = [raw_name, source, raw_code, raw_cookie, capability, data]
    header = REQUEST.pack(seq, version, len(raw_name), len(source), len(raw_code),
                          len(raw_cookie), len(capability), len(data))
    return [header, *parts]


def send_request(fd: int, parts: list[bytes], deadline: float) -> None:
    """Write requests (request_bytes, one or more joined) to a non-blocking pipe;
    TimeoutError past `deadline`."""
    if sum(map(len, parts)) < FIRST:  # one write, usually done at once
        message = b"".join(parts)
        try:
            written = os.write(fd, message)
        except BlockingIOError:
            written = 0
        if written < len(message):
            _write_all(fd, [memoryview(message)[written:]], deadline)
        return
    _write_all(fd, parts, deadline)


def reply_waiting(raw: bytes) -> bool:
    """Whether `raw` (bytes read ahead of a reply) holds that whole reply, or at
    least a header read_reply will refuse: read_reply needs no more from the pipe."""
    if len(raw) < REPLY.size:
        return False
    _, status, _, _, error_len, data_len = REPLY.unpack_from(raw)
    return status >= len(RUN_STATUSES) or error_len > MAX_ERROR or \
        len(raw) >= REPLY.size + error_len + data_len


def read_reply(fd: int, seq: int, output_cap: int, deadline: float,
               raw: bytes = b"") -> tuple[Reply, bytes]:
    """The runner's reply to request `seq`, checked before its body is read, and
    the bytes read past it (the next reply's, when requests were written ahead;
    anything else is the runner's fault).  `raw`: bytes already read past the
    last reply.  Raises Garbled, TimeoutError, or EOFError (the runner is gone).
    A small reply takes one read."""
    while len(raw) < REPLY.size:
        raw += _read_some(fd, deadline)
    got, status, flags, _, error_len, data_len = REPLY.unpack_from(raw)
    if got != seq:
        raise Garbled(f"reply to request {got}, expected {seq}")
    if status == ASK and not error_len and not data_len:  # (ASKED, the bytes after it)
        return ASKED, raw[REPLY.size:]
    if status >= len(RUN_STATUSES):
        raise Garbled(f"unknown status code {status}")
    if error_len > MAX_ERROR:
        raise Garbled(f"a {error_len}-byte error (at most {MAX_ERROR})")
    if data_len > output_cap:
        raise TooLarge(data_len, output_cap)
    end = REPLY.size + error_len + data_len
    if len(raw) < end:
        raw += _read_exactly(fd, end - len(raw), deadline)
    body = memoryview(raw)
    error = str(body[REPLY.size:REPLY.size + error_len], "utf-8", "replace")
    return Reply(RUN_STATUSES[status], flags, error, bytes(body[REPLY.size + error_len:end])), \
        raw[end:]


def grant_bytes(seq: int, capability: bytes) -> bytes:
    """The answer to request `seq`'s ASK."""
    return REQUEST.pack(seq, GRANT, 0, 0, 0, 0, len(capability), 0) + capability


def _write_all(fd: int, parts: list[bytes], deadline: float) -> None:
    views = [memoryview(x) for x in parts if x]
    poller = None
    while views:
        try:
            _consume(views, os.writev(fd, views[:64]))
        except BlockingIOError:
            pass
        if views:
            if poller is None:
                poller = select.poll()
                poller.register(fd, select.POLLOUT)
            _wait(poller, deadline)


def _read_some(fd: int, deadline: float | None, most: int = FIRST) -> bytes:
    """What the pipe holds now, up to `most` bytes; a non-blocking pipe is waited
    for until `deadline`."""
    while True:
        try:
            chunk = os.read(fd, most)
        except BlockingIOError:
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            _wait(poller, deadline)
            continue
        if not chunk:
            raise EOFError
        return chunk


def _read_exactly(fd: int, size: int, deadline: float | None) -> bytes:
    """`size` bytes; a non-blocking pipe is waited for until `deadline`."""
    chunks, left = [], size
    while left:
        chunk = _read_some(fd, deadline, min(left, CHUNK))
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _wait(poller: select.poll, deadline: float) -> None:
    wait = deadline - time.monotonic()
    if wait <= 0 or not poller.poll(wait * 1000):
        raise TimeoutError


# Runner side (blocking pipes) ------------------------------------------------------

class RequestReader:
    """The runner's end of the request pipe: one request at a time, from reads
    that may hold more than one (the worker writes its tenant's next requests
    ahead).  A small request takes one read."""

    def __init__(self, fd: int, res_w: int = -1):
        self.fd, self.raw, self.res_w = fd, b"", res_w
        self.early: list[Request] = []  # written ahead, read while waiting for a GRANT

    def ask(self, seq: int) -> bytes:
        """Request `seq`'s capability, asked of the worker (b"" if it is gone)."""
        write_reply(self.res_w, seq, ASK, 0, "", b"")
        while True:
            got = self._read()
            if got is None:
                return b""
            if got.version == GRANT and got.seq == seq:
                return got.capability
            self.early.append(got)

    def next(self) -> Request | None:
        """The next request, or None when the worker has closed the pipe."""
        return self.early.pop(0) if self.early else self._read()

    def _read(self) -> Request | None:
        raw = self.raw
        try:
            while len(raw) < REQUEST.size:
                more = os.read(self.fd, FIRST)
                if not more:
                    raise EOFError
                raw += more
        except EOFError:
            return None
        seq, version, *lengths = REQUEST.unpack_from(raw)
        end = REQUEST.size + sum(lengths)
        if len(raw) < end:
            raw += _read_exactly(self.fd, end - len(raw), None)
        self.raw = raw[end:]
        fields, at = [], REQUEST.size
        for length in lengths:
            fields.append(raw[at:at + length])
            at += length
        name, source, code, cookie, capability, data = fields
        return Request(seq, version, name.decode(), source,
                       code.decode("utf-8", "surrogatepass"),
                       cookie.decode("utf-8", "surrogatepass"), capability, data)


def write_reply(fd: int, seq: int, status: str | int, flags: int, error: str,
                data: bytes) -> None:
    raw_error = error.encode("utf-8", "replace")[:MAX_ERROR]
    code = status if status == ASK else STATUS_CODE[status]
    header = REPLY.pack(seq, code, flags, 0, len(raw_error), len(data))
    views = [memoryview(x) for x in (header, raw_error, data) if x]
    while views:
        _consume(views, os.writev(fd, views))


def _consume(views: list[memoryview], written: int) -> None:
    """Drop from `views` the bytes a writev wrote."""
    while written and views:
        if written >= len(views[0]):
            written -= len(views.pop(0))
        else:
            views[0] = views[0][written:]
            written = 0
