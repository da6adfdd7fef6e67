"""Wire messages of the storage front-end: defined here, once.

Front (client DEALER -> storage ROUTER; the ROUTER adds the client identity)::

    request  [cmd, rid, id, data]
             cmd   WRITE | READ | REMOVE | LOOKUP    data commands on one key
                   STAT | ROUTES                     about the node (id and data empty)
             rid   client-chosen request id, echoed in the reply (<= 64 bytes)
             id    the key's 64-byte id: sha512 of the key, or a hex id zero-padded
             data  the value for WRITE; empty otherwise
    reply    [rid, status, node, group, data, error]   as broker.protocol replies
             READ ok     data = the value
             LOOKUP ok   data = msgpack {"size": int, "mtime": float (Unix seconds),
                                         "id": hex str}
             STAT ok     data = msgpack {"name", "group", "entries", "bytes", "map_size",
                                         "sync", "max_value"}
             ROUTES ok   data = msgpack {"nodes": [{"name", "group", "storage",
                                                    "broker", "ids"}, ...]}
             statuses    ok | not_found (READ, REMOVE, LOOKUP of a missing key) |
                         output_too_large (value above node.max_value) |
                         bad_request (malformed frames, unknown command) |
                         unavailable (the store failed: disk full, I/O error)

Exec relay: ``broker.protocol`` front requests ``[EXEC|STATUS, rid, meta, data]``
sent to the storage ROUTER go to the node's broker unchanged (the storage
node picks its own request id for the hop) and its reply comes back with the
caller's rid, so a client that knows only a storage address can exec.

Anything else is a ProtocolError, answered ``bad_request`` when the request
id can be told, else dropped.  A write is acknowledged only after its
transaction committed.
"""
from __future__ import annotations

from dataclasses import dataclass

from broker import protocol as bp
from broker.protocol import ProtocolError

WRITE = b"W"
READ = b"R"
REMOVE = b"D"
LOOKUP = b"L"
STAT = b"T"
ROUTES = b"O"

DATA_COMMANDS = frozenset((WRITE, READ, REMOVE, LOOKUP))
NODE_COMMANDS = frozenset((STAT, ROUTES))
MUTATING = frozenset((WRITE, REMOVE))
RELAYED = frozenset((bp.EXEC, bp.STATUS))   # handed to the node's broker
NAMES = {WRITE: "write", READ: "read", REMOVE: "remove", LOOKUP: "lookup",
         STAT: "stat", ROUTES: "routes"}

ID_BYTES = 64

__all__ = ["ProtocolError", "StorageRequest", "request_frames", "WRITE", "READ", "REMOVE",
           "LOOKUP", "STAT", "ROUTES"]


@dataclass(frozen=True, slots=True)
class StorageRequest:
    """A data or node command as the storage ROUTER sees it."""
    client: bytes
    cmd: bytes
    rid: bytes
    id: bytes
    data: bytes

    @property
    def name(self) -> str:
        return NAMES[self.cmd]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> "StorageRequest":
        """[identity, cmd, rid, id, data] -> StorageRequest, or ProtocolError saying why."""
        if len(frames) != 5:
            raise ProtocolError(f"expected 4 frames after the identity "
                                f"[cmd, rid, id, data], got {len(frames) - 1}")
        client, cmd, rid, key_id, data = frames
        if len(rid) > bp.MAX_RID:
            raise ProtocolError("request id longer than 64 bytes")
        if cmd in DATA_COMMANDS:
            if len(key_id) != ID_BYTES:
                raise ProtocolError(f"{NAMES[cmd]}: the id frame must be {ID_BYTES} bytes "
                                    f"(sha512 of the key), got {len(key_id)}")
            if cmd != WRITE and data:
                raise ProtocolError(f"{NAMES[cmd]}: the data frame must be empty")
        elif cmd not in NODE_COMMANDS:
            raise ProtocolError(f"unknown command {cmd[:16]!r} (known: write W, read R, "
                                "remove D, lookup L, stat T, routes O, exec X, status S)")
        return cls(client, cmd, rid, key_id, data)


def request_frames(cmd: bytes, rid: bytes, key_id: bytes = b"", data: bytes = b"") -> list[bytes]:
    """What a client sends (its DEALER adds nothing)."""
    return [cmd, rid, key_id, data]


def rid_of(frames: list[bytes]) -> bytes | None:
    """The request id of frames that failed to parse, when one can be told."""
    if len(frames) >= 3 and len(frames[2]) <= bp.MAX_RID:
        return frames[2]
    return None
