"""The status every reply carries (docs/DESIGN.md "Statuses"), and Result.

No sockets here: the executor, which runs next to scripts, imports this and
not the wire protocol (core/protocol.py), which carries these.
"""
from __future__ import annotations

from dataclasses import dataclass

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


class Unavailable(ConnectionError):
    """The store a script called could not be reached (a Redis node down, a
    failover under way).  Raised out of a script, it answers the exec
    ``unavailable`` instead of ``script_error``: the caller may retry, and knows
    the script may or may not have had its effect."""


@dataclass(frozen=True, slots=True)
class Result:
    """One node's answer to one request."""
    node: str
    group: int
    status: str
    data: bytes = b""
    error: str | None = None
    redis: str = ""  # redis-cluster: HOST:PORT of the Redis node beside the srw node
    moved: bool = False  # its Redis calls met MOVED: the slot map it was routed by is old

    @property
    def ok(self) -> bool:
        return self.status == OK

    def to_json(self) -> dict:
        out = {"node": self.node, "group": self.group, "status": self.status}
        if self.redis:
            out["redis"] = self.redis
        try:
            out["data"] = self.data.decode()
        except UnicodeDecodeError:
            import base64
            out["data_base64"] = base64.b64encode(self.data).decode()
        out["error"] = self.error
        return out
