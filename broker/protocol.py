"""Wire messages between clients, the broker and workers: defined here, once.

Front (client DEALER -> broker ROUTER; the ROUTER adds the client identity)::

    request  [cmd, rid, meta, data]
             cmd   EXEC | STATUS
             rid   client-chosen request id, echoed in the reply (<= 64 bytes)
             meta  msgpack {"name": str, "code": str, "cookie": str,
                            "timeout": float | None, "id": hex str | None}
             data  the request's binary data, never decoded by the broker
    reply    [rid, status, node, group, data, error]

Back (worker DEALER, identity "node#slot:pid" -> broker ROUTER)::

    worker -> broker  [READY, meta]           meta msgpack {"slot", "pid", "credits",
                                                "replaces", "reason", "restarts"}
                      [REPLY, job, status, data, error]
                      [HEARTBEAT]             sent while idle
                      [DRAIN]                 "give me no more work" (recycle, stop)
    broker -> worker  [REQUEST, job, budget, meta, data]   budget: seconds left, ascii
                      [HEARTBEAT]
                      [REREGISTER]            "I do not know you": answer with READY
                      [BYE]                   drained: the worker may exit

Anything else is a ProtocolError: the broker logs it and answers bad_request
when it can tell whom to answer, else drops the frames.
"""
from __future__ import annotations

from dataclasses import dataclass

import msgpack

# Front commands.
EXEC = b"X"
STATUS = b"S"

# Back commands.
READY = b"\x01"
REPLY = b"\x02"
HEARTBEAT = b"\x03"
DRAIN = b"\x04"
REQUEST = b"\x11"
REREGISTER = b"\x12"
BYE = b"\x13"

MAX_RID = 64
_HEX = frozenset("0123456789abcdefABCDEF")

# Reply statuses (DESIGN.md "Statuses").
OK = "ok"
SCRIPT_ERROR = "script_error"
TIMEOUT = "timeout"
MEMORY = "memory"
KILLED = "killed"
OUTPUT_TOO_LARGE = "output_too_large"
NOT_FOUND = "not_found"
BAD_REQUEST = "bad_request"
FORBIDDEN = "forbidden"
BUSY = "busy"
UNAVAILABLE = "unavailable"
STATUSES = (OK, SCRIPT_ERROR, TIMEOUT, MEMORY, KILLED, OUTPUT_TOO_LARGE, NOT_FOUND,
            BAD_REQUEST, FORBIDDEN, BUSY, UNAVAILABLE)
_STATUS_BYTES = {s.encode(): s for s in STATUSES}


class ProtocolError(ValueError):
    """Frames that do not form a message of this protocol."""


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack_map(raw: bytes) -> dict:
    try:
        obj = msgpack.unpackb(raw, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"meta is not msgpack: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("meta must be a msgpack map")
    return obj


@dataclass(frozen=True, slots=True)
class Result:
    """One node's answer to one request."""
    node: str
    group: int
    status: str
    data: bytes = b""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict:
        out = {"node": self.node, "group": self.group, "status": self.status}
        try:
            out["data"] = self.data.decode()
        except UnicodeDecodeError:
            import base64
            out["data_base64"] = base64.b64encode(self.data).decode()
        out["error"] = self.error
        return out


@dataclass(frozen=True, slots=True)
class ExecMeta:
    """What an exec request asks for, besides its data."""
    name: str = ""
    code: str = ""
    cookie: str = ""
    timeout: float | None = None
    id: str | None = None

    def to_bytes(self) -> bytes:
        return pack({"name": self.name, "code": self.code, "cookie": self.cookie,
                     "timeout": self.timeout, "id": self.id})

    @classmethod
    def from_bytes(cls, raw: bytes) -> "ExecMeta":
        obj = unpack_map(raw)
        try:
            meta = cls(**obj)
        except TypeError as exc:
            raise ProtocolError(f"bad exec meta: {exc}") from None
        for key in ("name", "code", "cookie"):
            if not isinstance(getattr(meta, key), str):
                raise ProtocolError(f"exec meta {key!r} must be a string")
        if meta.timeout is not None and (not isinstance(meta.timeout, (int, float))
                                         or isinstance(meta.timeout, bool)
                                         or not meta.timeout > 0):
            raise ProtocolError("exec meta 'timeout' must be a positive number of seconds")
        if meta.id is not None and not (isinstance(meta.id, str) and 0 < len(meta.id) <= 128
                                        and all(c in _HEX for c in meta.id)):
            raise ProtocolError("exec meta 'id' must be a hex string of 1 to 128 digits")
        return meta


@dataclass(frozen=True, slots=True)
class FrontRequest:
    """A client's request as the broker's ROUTER sees it."""
    client: bytes
    cmd: bytes
    rid: bytes
    meta: bytes
    data: bytes

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> "FrontRequest":
        if len(frames) != 5:
            raise ProtocolError(f"expected 4 frames after the identity, got {len(frames) - 1}")
        client, cmd, rid, meta, data = frames
        if cmd not in (EXEC, STATUS):
            raise ProtocolError(f"unknown command {cmd[:16]!r}")
        if len(rid) > MAX_RID:
            raise ProtocolError("request id longer than 64 bytes")
        return cls(client, cmd, rid, meta, data)


def request_frames(cmd: bytes, rid: bytes, meta: bytes, data: bytes) -> list[bytes]:
    """What a client sends (its DEALER adds nothing)."""
    return [cmd, rid, meta, data]


def reply_frames(client: bytes, rid: bytes, status: str, node: bytes, group: bytes,
                 data: bytes = b"", error: str = "") -> list[bytes]:
    """What the broker sends back through its ROUTER."""
    return [client, rid, status.encode(), node, group, data, error.encode()]


def parse_reply(frames: list[bytes]) -> tuple[bytes, Result]:
    """A client's view of a reply: (rid, Result)."""
    if len(frames) != 6:
        raise ProtocolError(f"reply must have 6 frames, got {len(frames)}")
    rid, status, node, group, data, error = frames
    if status not in _STATUS_BYTES:
        raise ProtocolError(f"unknown status {status[:32]!r}")
    try:
        result = Result(node.decode(), int(group), _STATUS_BYTES[status], data,
                        error.decode(errors="replace") or None)
    except ValueError:
        raise ProtocolError("bad node or group frame") from None
    return rid, result


# Back end --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Ready:
    slot: int
    pid: int
    credits: int
    replaces: int = 0      # pid of the worker this one replaces, 0 if none
    reason: str = ""       # why that worker went away
    restarts: int = 0      # unplanned worker deaths in this pool so far
    job: bytes = b""       # the request that worker was running when it went away,
    job_status: str = ""   # and the status it earned (timeout for a wall or CPU kill)
    served: int = 0        # replies that worker had sent: tells which requests never started

    def to_frames(self) -> list[bytes]:
        return [READY, pack({"slot": self.slot, "pid": self.pid, "credits": self.credits,
                             "replaces": self.replaces, "reason": self.reason,
                             "restarts": self.restarts, "job": self.job,
                             "job_status": self.job_status, "served": self.served})]

    @classmethod
    def from_meta(cls, raw: bytes) -> "Ready":
        obj = unpack_map(raw)
        try:
            ready = cls(**obj)
        except TypeError as exc:
            raise ProtocolError(f"bad READY: {exc}") from None
        if not (isinstance(ready.credits, int) and 1 <= ready.credits <= 1024):
            raise ProtocolError("READY credits must be 1..1024")
        if not isinstance(ready.slot, int) or not isinstance(ready.job, bytes):
            raise ProtocolError("READY slot must be an int and job bytes")
        if ready.job_status and ready.job_status not in STATUSES:
            raise ProtocolError(f"READY job_status {ready.job_status!r} is not a status")
        return ready


def job_frames(worker: bytes, job: bytes, budget: float, meta: bytes, data: bytes) -> list[bytes]:
    return [worker, REQUEST, job, b"%.6f" % budget, meta, data]


def worker_reply_frames(job: bytes, status: str, data: bytes, error: str) -> list[bytes]:
    return [REPLY, job, status.encode(), data, error.encode()]


def parse_worker_reply(frames: list[bytes]) -> tuple[bytes, str, bytes, str]:
    """Broker side: [identity, REPLY, job, status, data, error] -> (job, status, data, error)."""
    if len(frames) != 6:
        raise ProtocolError("REPLY must have 4 frames after the command")
    status = _STATUS_BYTES.get(frames[3])
    if status is None:
        raise ProtocolError(f"unknown status {frames[3][:32]!r}")
    return frames[2], status, frames[4], frames[5].decode(errors="replace")


def parse_job(frames: list[bytes]) -> tuple[bytes, float, ExecMeta, bytes]:
    """Worker side: [REQUEST, job, budget, meta, data] -> (job, budget, meta, data)."""
    if len(frames) != 5:
        raise ProtocolError("REQUEST must have 4 frames after the command")
    try:
        budget = float(frames[2])
    except ValueError:
        raise ProtocolError("bad budget frame") from None
    return frames[1], budget, ExecMeta.from_bytes(frames[3]), frames[4]
