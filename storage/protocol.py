"""Wire messages of the storage front-end: defined here, once.

Front (client DEALER -> storage ROUTER; the ROUTER adds the client identity)::

    request  [head, data] or [head, data, capability]
             head  cmd (1 byte) + id (64 bytes, data commands only) + rid
                   cmd   WRITE | READ | REMOVE | LOOKUP    data commands on one key
                         READ_RANGE                        part of a value (see data)
                         INDEXED_WRITE                     a write the node indexes
                         WRITE_IF                          a write only if the value is
                                                           still the one the caller read
                         STAT | ROUTES | SEARCH            about the node (no id)
                         REVOKE | REVOKE_PEER              requests answered (no id;
                                                           node key only, see below)
                   id    the key's id: sha512 of the key, or a hex id zero-padded
                   rid   client-chosen request id, echoed in the reply (<= 64 bytes)
             data  the value for WRITE; for INDEXED_WRITE len(key) (2 bytes, big-endian)
                   + key + len(lang) (1 byte) + lang (ASCII: a [search] language,
                   its short name or "none"; empty: each word by its script)
                   + value, sha512(key) being the id; for WRITE_IF len(expected)
                   (1 byte: 0 or 32) + expected + value, expected being the sha256
                   (32 bytes) of the value the caller read, empty for "must not
                   exist"; for READ_RANGE offset (8 bytes) + length (4 bytes), both
                   big-endian unsigned, offset below 2**63 (range_data); for SEARCH msgpack
                   {"query": str, "limit": int, and optionally "lang": str (a stemmer
                   for every word), "raw": bool (FTS5's own syntax), "timeout": float
                   (seconds the node may search; else [search] timeout)}; for REVOKE
                   msgpack [[cap id, deadline], ...]; empty otherwise
             capability  core/capability.py's token: what a script's call may do.
                   With curve, a call from the scripts key needs one, and the
                   right its command needs (NEEDS); other keys send none
    reply    [head, data]
             head  status (1 byte: its index in core.protocol.STATUSES)
                   + len(rid) (1 byte) + rid + error (UTF-8, empty when ok)
             READ ok     data = the value
             READ_RANGE ok   data = the value's bytes from offset, at most length
                         of them: fewer where the value ends, none from past its end
             LOOKUP ok   data = msgpack {"size": int, "mtime": float (Unix seconds),
                                         "id": hex str}
             STAT ok     data = msgpack {"name", "group", "entries", "bytes", "map_size",
                                         "sync", "max_value", "indexed"}
             ROUTES ok   data = msgpack {"nodes": [{"name", "group", "storage",
                                                    "broker", "ids"}, ...]}
             INDEXED_WRITE ok   data = b"" (indexed) or why it was not (e.g. binary)
             WRITE_IF busy      nothing written: the stored value is not the expected
                                one; data = sha256 hex of the stored value (b"" when
                                there is none).  Checked and written in one LMDB write
                                transaction, so two callers that read the same value
                                cannot both write (compare-and-set)
             SEARCH ok   data = msgpack {"hits": [{"key", "score", "snippet", "parts"}, ...]
                         best first, ties by key; "count": matches on the node;
                         "partial": true when cut at the deadline}
             statuses    ok | not_found (READ, READ_RANGE, REMOVE, LOOKUP of a
                         missing key) |
                         output_too_large (value above node.max_value, or an indexed
                         one above node.max_index_bytes) |
                         bad_request (malformed frames, unknown command, a query the
                         index cannot parse) |
                         unavailable (the store failed: disk full, I/O error)

REVOKE (from a worker, with the node key) names capabilities whose requests
were answered: the front refuses them from then on, and passes them on to
the other nodes' fronts as REVOKE_PEER (which go no further).  Neither is
answered when accepted; from any other key, ``forbidden``.

Two frames, not one per field: every frame costs a send and a receive on
both sides, and on the data path that is most of the time spent in Python.

Exec relay: ``core.protocol`` front requests ``[header, data]`` (told apart
by ``core.protocol.is_front_request``) sent to the storage ROUTER go to the
node's broker with a request id of the storage node's own for the hop, and
the broker's reply comes back with the caller's rid, so
``broker.client.Client`` pointed at a storage address can exec.

Anything else is a ProtocolError, answered ``bad_request`` (with an empty rid
when the request id cannot be told).  A write is acknowledged only after its
transaction committed; an indexed write only once the node's indexing script
ran on the value and the index committed its row (storage/node.py).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from core import capability as cap
from core import protocol as bp
from core.protocol import ProtocolError
from core.exits import UsageError

WRITE = b"W"
READ = b"R"
REMOVE = b"D"
LOOKUP = b"L"
STAT = b"T"
ROUTES = b"O"
INDEXED_WRITE = b"I"
SEARCH = b"S"
WRITE_IF = b"C"
READ_RANGE = b"G"
REVOKE = cap.REVOKE            # defined in core/capability.py: workers send it too
REVOKE_PEER = cap.REVOKE_PEER
revoke_data, parse_revoke = cap.revoke_data, cap.parse_revoke

DATA_COMMANDS = frozenset((WRITE, READ, REMOVE, LOOKUP, INDEXED_WRITE, WRITE_IF, READ_RANGE))
NODE_COMMANDS = frozenset((STAT, ROUTES, SEARCH, REVOKE, REVOKE_PEER))
REVOCATIONS = frozenset((REVOKE, REVOKE_PEER))
MUTATING = frozenset((WRITE, REMOVE, INDEXED_WRITE, WRITE_IF))
WITH_DATA = frozenset((WRITE, INDEXED_WRITE, WRITE_IF, READ_RANGE))
WITH_VALUE = frozenset((WRITE, INDEXED_WRITE, WRITE_IF))   # their data frame holds a value
NAMES = {WRITE: "write", READ: "read", REMOVE: "remove", LOOKUP: "lookup",
         STAT: "stat", ROUTES: "routes", INDEXED_WRITE: "indexed write", SEARCH: "search",
         WRITE_IF: "write-if", READ_RANGE: "ranged read", REVOKE: "revoke",
         REVOKE_PEER: "revoke"}
# The right a script's capability needs for each command (core/capability.py).
NEEDS = {WRITE: "write", REMOVE: "write", INDEXED_WRITE: "write", WRITE_IF: "write",
         READ: "read", READ_RANGE: "read", LOOKUP: "read", STAT: "read", SEARCH: "read",
         ROUTES: "read"}

ID_BYTES = 64
MAX_HITS = 1000     # results one SEARCH may ask for
MAX_QUERY = 4096    # characters of a SEARCH's query
MAX_SEARCH_TIMEOUT = 600.0   # seconds a SEARCH may ask to run
MAX_LANG = 40       # bytes of an INDEXED_WRITE's or a SEARCH's lang

__all__ = ["ProtocolError", "StorageRequest", "request_frames", "WRITE", "READ", "REMOVE",
           "LOOKUP", "STAT", "ROUTES", "INDEXED_WRITE", "SEARCH", "WRITE_IF", "READ_RANGE"]


_STATUS_CODE = {status: bytes([i]) for i, status in enumerate(bp.STATUSES)}


@dataclass(frozen=True, slots=True)
class StorageRequest:
    """A data or node command as the storage ROUTER sees it."""
    client: bytes
    cmd: bytes
    rid: bytes
    id: bytes
    data: bytes
    capability: bytes = b""

    @property
    def name(self) -> str:
        return NAMES[self.cmd]

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> "StorageRequest":
        """[identity, head, data(, capability)] -> StorageRequest, or ProtocolError."""
        if len(frames) not in (3, 4):
            raise ProtocolError(f"expected 2 frames after the identity [head, data] (3 with "
                                f"a capability), got {len(frames) - 1}")
        client, head, data = frames[:3]
        capability = frames[3] if len(frames) == 4 else b""
        cmd = head[:1]
        if cmd in DATA_COMMANDS:
            if len(head) < 1 + ID_BYTES:
                raise ProtocolError(f"{NAMES[cmd]}: the head must be the command, the "
                                    f"{ID_BYTES}-byte id (sha512 of the key) and the request "
                                    f"id; got {len(head)} bytes")
            key_id, rid = head[1:1 + ID_BYTES], head[1 + ID_BYTES:]
            if cmd not in WITH_DATA and data:
                raise ProtocolError(f"{NAMES[cmd]}: the data frame must be empty")
        elif cmd in NODE_COMMANDS:
            key_id, rid = b"", head[1:]
        else:
            raise ProtocolError(f"unknown command {cmd!r} (known: write W, read R, remove D, "
                                "lookup L, indexed write I, write-if C, ranged read G, stat T, "
                                "routes O, search S; exec and status as core.protocol requests)")
        if len(rid) > bp.MAX_RID:
            raise ProtocolError("request id longer than 64 bytes")
        return cls(client, cmd, rid, key_id, data, capability)


def indexed_value(key: bytes, value: bytes, lang: str = "") -> bytes:
    """The data frame of an INDEXED_WRITE."""
    if len(key) > 0xFFFF:
        raise UsageError(f"key of {len(key)} bytes is too long to index (at most 65535)")
    raw_lang = lang.encode()
    if len(raw_lang) > MAX_LANG:
        raise UsageError(f"lang {lang[:40]!r} is longer than {MAX_LANG} bytes")
    return len(key).to_bytes(2, "big") + key + bytes([len(raw_lang)]) + raw_lang + value


def split_indexed(data: bytes) -> tuple[bytes, str, bytes]:
    """(key, lang, value) of an INDEXED_WRITE's data frame, or ProtocolError."""
    size = int.from_bytes(data[:2], "big")
    lang_at = 2 + size
    lang_size = data[lang_at] if len(data) > lang_at else -1
    if not size or lang_size < 0 or lang_size > MAX_LANG or \
            len(data) < lang_at + 1 + lang_size:
        raise ProtocolError("indexed write: the data must be len(key) (2 bytes), the key, "
                            f"len(lang) (1 byte, at most {MAX_LANG}), the lang and the value")
    lang = bytes(data[lang_at + 1:lang_at + 1 + lang_size]).decode("ascii", errors="replace")
    return bytes(data[2:lang_at]), lang, data[lang_at + 1 + lang_size:]


def write_if_data(expected: bytes | None, value: bytes) -> bytes:
    """The data frame of a WRITE_IF: `expected` is the sha256 digest of the value
    read (32 bytes), or None when the key must not exist."""
    expected = expected or b""
    if len(expected) not in (0, 32):
        raise ValueError("write-if: expected is a sha256 digest (32 bytes) or nothing")
    return bytes([len(expected)]) + expected + value


def split_write_if(data: bytes) -> tuple[bytes | None, bytes]:
    """(expected digest or None, value) of a WRITE_IF's data frame, or ProtocolError."""
    size = data[0] if data else -1
    if size not in (0, 32) or len(data) < 1 + size:
        raise ProtocolError("write-if: the data must be len(expected) (1 byte, 0 or 32), "
                            "the expected value's sha256 and the value")
    return (bytes(data[1:1 + size]) or None), data[1 + size:]


# A READ_RANGE's data frame: offset (u64, below 2**63: Redis's GETRANGE takes a
# signed 64-bit end) and length (u32: one reply is bounded whatever is asked).
_RANGE = struct.Struct(">QI")
MAX_OFFSET = (1 << 63) - 1
MAX_LENGTH = (1 << 32) - 1


def range_data(offset: int, length: int) -> bytes:
    """The data frame of a READ_RANGE; ValueError for a range no node takes."""
    if not (0 <= offset <= MAX_OFFSET and 0 <= length <= MAX_LENGTH):
        raise ValueError(f"ranged read: offset must be 0 to {MAX_OFFSET} and length 0 to "
                         f"{MAX_LENGTH}, not {offset!r} and {length!r}")
    return _RANGE.pack(offset, length)


def split_range(data: bytes) -> tuple[int, int]:
    """(offset, length) of a READ_RANGE's data frame, or ProtocolError."""
    if len(data) != _RANGE.size:
        raise ProtocolError(f"ranged read: the data must be offset (8 bytes) and length "
                            f"(4 bytes), got {len(data)} bytes")
    offset, length = _RANGE.unpack(data)
    if offset > MAX_OFFSET:
        raise ProtocolError(f"ranged read: offset {offset} is above {MAX_OFFSET}")
    return offset, length


@dataclass(frozen=True, slots=True)
class Search:
    """A SEARCH's data frame."""
    query: str
    limit: int
    lang: str | None = None
    raw: bool = False
    timeout: float | None = None


def search_data(search: Search) -> bytes:
    """The data frame of a SEARCH."""
    fields = {"query": search.query, "limit": search.limit}
    for name in ("lang", "raw", "timeout"):
        if getattr(search, name):
            fields[name] = getattr(search, name)
    return bp.pack(fields)


def parse_search(data: bytes) -> Search:
    """A SEARCH's data frame, or ProtocolError."""
    try:
        fields = bp.unpack_map(data)
    except ProtocolError:
        raise ProtocolError("search: the data must be msgpack {query, limit}") from None
    query, limit = fields.get("query"), fields.get("limit")
    lang, raw, timeout = fields.get("lang"), fields.get("raw", False), fields.get("timeout")
    if not isinstance(query, str) or not isinstance(limit, int) or not 0 < limit <= MAX_HITS:
        raise ProtocolError(f"search: query must be text and limit 1 to {MAX_HITS}")
    if len(query) > MAX_QUERY:
        raise ProtocolError(f"search: the query is {len(query)} characters; at most "
                            f"{MAX_QUERY}")
    if not (lang is None or isinstance(lang, str) and len(lang) <= MAX_LANG) or \
            not isinstance(raw, bool):
        raise ProtocolError("search: lang must be text (at most 40 characters), raw a bool")
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not 0 < timeout <= MAX_SEARCH_TIMEOUT):
        raise ProtocolError(f"search: timeout must be above 0 and at most "
                            f"{MAX_SEARCH_TIMEOUT:.0f} seconds")
    return Search(query, limit, lang, raw, float(timeout) if timeout is not None else None)


def request_frames(cmd: bytes, rid: bytes, key_id: bytes = b"", data: bytes = b"",
                   capability: bytes = b"") -> list[bytes]:
    """What a client sends (its DEALER adds nothing)."""
    if capability:
        return [cmd + key_id + rid, data, capability]
    return [cmd + key_id + rid, data]



def reply_frames(client: bytes, rid: bytes, status: str, data: bytes = b"",
                 error: str = "") -> list[bytes]:
    """What the storage node sends back through its ROUTER."""
    return [client, _STATUS_CODE[status] + bytes([len(rid)]) + rid + error.encode(), data]


def parse_reply(frames: list[bytes]) -> tuple[bytes, str, bytes, str | None]:
    """A client's view of a reply: (rid, status, data, error or None)."""
    if len(frames) != 2 or len(frames[0]) < 2:
        raise ProtocolError("a storage reply is [head, data]")
    head, data = frames
    if head[0] >= len(bp.STATUSES) or len(head) < 2 + head[1]:
        raise ProtocolError("bad storage reply head")
    end = 2 + head[1]
    return head[2:end], bp.STATUSES[head[0]], data, head[end:].decode(errors="replace") or None


def rid_of(frames: list[bytes]) -> bytes:
    """The request id of frames that failed to parse, when it can be told, else b""."""
    if len(frames) in (3, 4):
        head = frames[1]
        rid = head[1 + ID_BYTES:] if head[:1] in DATA_COMMANDS else head[1:]
        if len(rid) <= bp.MAX_RID:
            return rid
    return b""
