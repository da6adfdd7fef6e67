"""Wire messages between clients, the broker and workers: defined here, once.

Few frames per message: each ZeroMQ frame costs ~3 us to send and receive in
Python, more than packing a small msgpack header.  Batches: the broker hands a
worker every request it gives it at once in one message, and a client may
send several requests in one message: each message costs the sender, the
receiver and both I/O threads a wake-up.

Front (client DEALER -> broker ROUTER; the ROUTER adds the client identity)::

    request  [header, data]
             header  msgpack [cmd, rid, name, code, cookie, timeout, id(, caller)]
                     cmd      EXEC | STATUS
                     rid      client-chosen request id (bytes, <= 64), echoed back
                     name, code, cookie   str; timeout float|None; id hex str|None
                     caller   only in what a node relays (the storage front): the
                              caller it authenticated; the broker takes it from
                              node keys alone (README "Sandbox", callers)
             data    the request's binary data, never decoded by the broker
    reply    [header, data]
             header  msgpack [rid, status, node, group, error(, moved)]
                     moved    true when the script's Redis calls met MOVED: the
                              client's slot map is old (a hint: the client's
                              router reads the map itself; storage/router.py)

    A client may also send several requests in one message, and then gets
    their replies in batches too (one message per broker turn):
    requests [batch]  msgpack [[cmd, rid, name, code, cookie, timeout, id(, caller), data],
                               ...]
    replies  [batch]  msgpack [[rid, status, node, group, error, data(, moved)], ...]
    One frame is a batch, two frames are one request or reply.

Back (worker DEALER, identity "node#slot:pid" -> broker ROUTER)::

    worker -> broker  [READY, meta]           meta msgpack {"slot", "pid", "credits",
                                                "token", "pool", "replaces", "reason",
                                                "restarts", "job", "job_status", "served"}
                                              (types and ranges: Ready.from_meta;
                                              token: core/trust.py)
                      [REPLY, replies]        msgpack [[job, status, error, data,
                                                run_us, warm, hit(, moved)], ...]; run_us:
                                                time it ran; warm: runners it keeps warm
                                                after it; hit: it found one warm; moved:
                                                its runner said MOVED (the hint above)
                      [HEARTBEAT]             sent while idle
                      [DRAIN]                 "give me no more work" (recycle, stop)
    broker -> worker  [REQUEST, jobs]         msgpack [[job, budget, name, code, cookie,
                                                caller, rights, data], ...]; budget:
                                                seconds left; caller: who sent it (a
                                                tenant's first half: runtime/tenants.py);
                                                rights: the caller's, a list of
                                                core.config.RIGHTS (what its script's
                                                store calls may do: core/capability.py)
                      [HEARTBEAT]             also at once after a READY it took
                      [REREGISTER]            "I do not know you": answer with READY
                      [BYE]                   drained: the worker may exit

Anything else is a ProtocolError.  From a client: the broker logs it and
answers bad_request when it can tell whom to answer, else drops the frames.
From a registered worker: the broker drops the worker (its requests are
answered killed) and sends it BYE.  From anyone else: ignored, but for a
REREGISTER now and then.  No frame may exceed Config.max_message.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack
import zmq

from .config import RIGHTS
from .ids import BadId, check_id
from .statuses import (BAD_REQUEST, BUSY, FORBIDDEN, KILLED, MEMORY, NOT_FOUND, OK,  # noqa: F401
                       OUTPUT_TOO_LARGE, SCRIPT_ERROR, STATUSES, TIMEOUT, UNAVAILABLE,
                       Result, Unavailable)

# Front commands.
EXEC = 1
STATUS = 2

# Back commands.
READY = b"\x01"
REPLY = b"\x02"
HEARTBEAT = b"\x03"
DRAIN = b"\x04"
REQUEST = b"\x11"
REREGISTER = b"\x12"
BYE = b"\x13"

MAX_RID = 64
MAX_CALLER = 128  # characters of a caller: a z85 public key (40), "node:NAME", "local"
LOCAL_CALLER = "local"  # every caller without curve: no one is authenticated

_RIGHTS = frozenset(RIGHTS)

# The status vocabulary and Result are core/statuses.py's; the protocol carries them.
_STATUS_SET = frozenset(STATUSES)


class ProtocolError(ValueError):
    """Frames that do not form a message of this protocol."""


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


# packb builds a Packer per call (2-3x the cost of packing a small header); one
# Packer, kept, is reused for headers of bounded size only: it keeps the largest
# buffer it ever needed.  Its pack holds the GIL throughout (plain types, no
# `default` hook), so threads cannot interleave in it.
_pack_header = msgpack.Packer(use_bin_type=True).pack


def unpack_map(raw: bytes) -> dict:
    return _unpack(raw, dict, "map")


def unpack_list(raw: bytes) -> tuple:
    """A msgpack array (as tuples), or ProtocolError."""
    return _unpack_list(raw)


def _unpack_list(raw: bytes) -> tuple:
    try:
        obj = msgpack.unpackb(raw, use_list=False)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {exc}") from None
    if type(obj) is not tuple:
        raise ProtocolError("expected a msgpack array")
    return obj


def _unpack(raw: bytes, kind: type, name: str):
    try:
        obj = msgpack.unpackb(raw, raw=False, use_list=kind is not tuple)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"not msgpack: {exc}") from None
    if not isinstance(obj, kind):
        raise ProtocolError(f"expected a msgpack {name}")
    return obj


class ExecMeta(NamedTuple):
    """What an exec request asks for, besides its data."""
    name: str = ""
    code: str = ""
    cookie: str = ""
    timeout: float | None = None
    id: str | None = None
    caller: str | None = None  # set by a relaying node; the broker decides (broker.py)
    # Never on the front wire: the broker's, from the caller's identity, for the worker
    rights: tuple[str, ...] = ()

    def check(self) -> "ExecMeta":
        if not (isinstance(self.name, str) and isinstance(self.code, str)
                and isinstance(self.cookie, str)):
            raise ProtocolError("exec name, code and cookie must be strings")
        t = self.timeout
        if t is not None and (not isinstance(t, (int, float)) or isinstance(t, bool)
                              or not 0 < t < math.inf):
            raise ProtocolError("exec timeout must be a finite positive number of seconds")
        if self.id is not None:
            try:
                check_id(self.id)
            except BadId as exc:
                raise ProtocolError(f"exec id: {exc}") from None
        if self.caller is not None and not (isinstance(self.caller, str) and self.caller.isascii()
                                            and 0 < len(self.caller) <= MAX_CALLER):
            raise ProtocolError(f"exec caller must be 1 to {MAX_CALLER} ASCII characters")
        return self

    def to_list(self) -> list:
        """The header fields after cmd and rid: caller only when there is one."""
        return list(self[:6] if self.caller is not None else self[:5])


class FrontRequest(NamedTuple):
    """A client's request as the broker's ROUTER sees it."""
    client: bytes
    cmd: int
    rid: bytes
    meta: ExecMeta
    data: bytes

    @classmethod
    def from_frames(cls, frames: list[bytes]) -> "FrontRequest":
        if len(frames) != 3:
            raise ProtocolError(f"expected 2 frames after the identity, got {len(frames) - 1}")
        return cls.from_header(frames[0], _unpack_list(frames[1]), frames[2])

    @classmethod
    def from_header(cls, client: bytes, header: tuple, data: bytes) -> "FrontRequest":
        if len(header) not in (7, 8):
            raise ProtocolError("request header must have 7 fields (8 with a caller)")
        cmd, rid = header[0], header[1]
        if cmd not in (EXEC, STATUS):
            raise ProtocolError(f"unknown command {cmd!r:.20}")
        if not isinstance(rid, bytes) or len(rid) > MAX_RID:
            raise ProtocolError("request id must be bytes, at most 64")
        if not isinstance(data, bytes):
            raise ProtocolError("request data must be bytes")
        return cls(client, cmd, rid, ExecMeta(*header[2:]).check(), data)


def parse_batch(frames: list[bytes]) -> list[FrontRequest | tuple[bytes | None, ProtocolError]]:
    """Broker side: [identity, batch] -> one FrontRequest per entry, or, for an
    entry that is not one, (its rid if readable, the error)."""
    entries = _unpack_list(frames[1])
    out: list[FrontRequest | tuple[bytes | None, ProtocolError]] = []
    for entry in entries:
        try:
            if not isinstance(entry, tuple) or len(entry) not in (8, 9):
                raise ProtocolError("a batched request must have 8 fields (9 with a caller)")
            out.append(FrontRequest.from_header(frames[0], entry[:-1], entry[-1]))
        except ProtocolError as exc:
            rid = entry[1] if isinstance(entry, tuple) and len(entry) > 1 else None
            out.append((rid if isinstance(rid, bytes) and len(rid) <= MAX_RID else None, exc))
    return out


def is_front_request(header: bytes) -> bool:
    """Whether a frame can be a request header: a 7- or 8-item msgpack array starts
    0x97 or 0x98.

    Lets another ROUTER (the storage front-end) tell exec requests it relays
    from its own commands, which start with an ASCII letter."""
    return header[:1] in (b"\x97", b"\x98")


def salvage_rid(frames: list[bytes]) -> bytes | None:
    """The request id of a malformed request, if one can be read, to answer it."""
    try:
        rid = msgpack.unpackb(frames[1], raw=False)[1] if len(frames) > 1 else None
    except Exception:
        return None
    return rid if isinstance(rid, bytes) and len(rid) <= MAX_RID else None


def request_frames(cmd: int, rid: bytes, meta: ExecMeta, data: bytes) -> list[bytes]:
    """What a client sends (its DEALER adds nothing)."""
    return [pack([cmd, rid, *meta.to_list()]), data]


def batch_frames(requests: list[tuple[int, bytes, ExecMeta, bytes]]) -> list[bytes]:
    """Several requests, (cmd, rid, meta, data) each, in one message."""
    return [pack([[cmd, rid, *meta.to_list(), data] for cmd, rid, meta, data in requests])]


def reply_frames(client: bytes, rid: bytes, status: str, node: str, group: int,
                 data: bytes = b"", error: str = "", moved: bool = False) -> list[bytes]:
    """What the broker sends back through its ROUTER."""
    header = [rid, status, node, group, error, True] if moved else [rid, status, node, group,
                                                                     error]
    return [client, _pack_header(header), data]


def reply_entry(rid: bytes, status: str, node: str, group: int, data: bytes,
                error: str, moved: bool = False) -> list:
    return [rid, status, node, group, error, data] + ([True] if moved else [])


def reply_batch_frames(client: bytes, entries: list[list]) -> list[bytes]:
    """The replies to a client that batches, as `reply_entry` lists, in one message."""
    return [client, pack(entries)]


def parse_reply(frames: list[bytes]) -> tuple[bytes, Result]:
    """A client's view of a reply: (rid, Result)."""
    if len(frames) != 2:
        raise ProtocolError(f"reply must have 2 frames, got {len(frames)}")
    header = _unpack_list(frames[0])
    if len(header) not in (5, 6) or header[1] not in _STATUS_SET:
        raise ProtocolError("bad reply header")
    rid, status, node, group, error = header[:5]
    return rid, Result(node, group, status, frames[1], error or None,
                       moved=header[5:] == (True,))


def parse_reply_message(frames: list[bytes]) -> list[tuple[bytes, Result]]:
    """A batching client's view of a message: one reply, or a batch of them."""
    if len(frames) != 1:
        return [parse_reply(frames)]
    out = []
    for entry in _unpack_list(frames[0]):
        if not (isinstance(entry, tuple) and len(entry) in (6, 7) and isinstance(entry[1], str)
                and entry[1] in _STATUS_SET and isinstance(entry[5], bytes)):
            raise ProtocolError("bad reply in a batch")
        rid, status, node, group, error, data = entry[:6]
        out.append((rid, Result(node, group, status, data, error or None,
                                moved=entry[6:] == (True,))))
    return out


# Back end --------------------------------------------------------------------

MAX_PID = 1 << 22       # Linux's pid_max ceiling
MAX_SLOT = 1 << 16
MAX_COUNT = 1 << 62
MAX_JOB = 64            # job ids are the broker's own, a few hex digits
MAX_REASON = 1024
# The only statuses a dead worker's request can have earned: it was killed, or
# the watchdog killed it at its deadline.  Never ok: the worker did not answer.
DEATH_STATUSES = ("", KILLED, TIMEOUT)


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready:
    slot: int
    pid: int
    credits: int
    token: bytes = field(repr=False)  # the broker's token (core/trust.py): who may register
    pool: int              # pid of the pool process that forked this worker
    replaces: int = 0      # pid of the worker this one replaces, 0 if none
    reason: str = ""       # why that worker went away
    restarts: int = 0      # unplanned worker deaths in this pool so far
    job: bytes = b""       # the request that worker was running when it went away,
    job_status: str = ""   # and the status it earned: killed, or timeout for a wall or CPU kill
    served: int = 0        # how many of its requests, in the order sent, that worker had begun

    def to_frames(self) -> list[bytes]:
        return [READY, pack({name: getattr(self, name) for name in _READY_FIELDS})]

    @classmethod
    def from_meta(cls, raw: bytes) -> "Ready":
        """Every field checked for its exact type and range; anything else is a
        ProtocolError (bools are not ints, unknown and missing fields are errors)."""
        obj = unpack_map(raw)
        for key, value in obj.items():
            rule = _READY_FIELDS.get(key) if isinstance(key, str) else None
            if rule is None:
                raise ProtocolError(f"READY has an unknown field {key!r:.40}")
            kind, low, high = rule
            if type(value) is not kind:
                raise ProtocolError(f"READY {key} must be {kind.__name__}, "
                                    f"not {type(value).__name__}")
            if not low <= (value if kind is int else len(value)) <= high:
                raise ProtocolError(f"READY {key} out of range {low}..{high}"
                                    f"{'' if kind is int else ' in length'}")
        missing = [name for name in _READY_REQUIRED if name not in obj]
        if missing:
            raise ProtocolError(f"READY without {', '.join(missing)}")
        if obj.get("job_status", "") not in DEATH_STATUSES:
            raise ProtocolError(f"READY job_status {obj['job_status']!r:.20} is not "
                                "killed or timeout: a dead worker's request earned no other")
        return cls(**obj)


# field -> (type, lowest, highest): the value for ints, the length for str and bytes
_READY_FIELDS = {
    "slot": (int, 1, MAX_SLOT), "pid": (int, 1, MAX_PID), "credits": (int, 1, 1024),
    "token": (bytes, 0, 64), "pool": (int, 1, MAX_PID), "replaces": (int, 0, MAX_PID),
    "reason": (str, 0, MAX_REASON), "restarts": (int, 0, MAX_COUNT),
    "job": (bytes, 0, MAX_JOB), "job_status": (str, 0, 16), "served": (int, 0, MAX_COUNT),
}
_READY_REQUIRED = ("slot", "pid", "credits", "token", "pool")


# Sizes ------------------------------------------------------------------------
# libzmq refuses any frame above ZMQ_MAXMSGSIZE (core.config.Config.max_message),
# so batches are cut to fit it.  Bounds, not exact sizes: cheap to compute.

# msgpack headers, ids (rid <= 64, hex id <= 128), caller (<= 128), rights (<= 32),
# numbers of one entry
ENTRY_OVERHEAD = 256 + MAX_CALLER + 32
BATCH_HEADER = 16     # the array header of a batch, with room to spare


def request_bytes(meta: ExecMeta, data: bytes) -> int:
    """At most what one request takes in a client's batch or a worker's REQUEST:
    its data, and its name, code and cookie at 4 bytes a character."""
    return len(data) + 4 * (len(meta.name) + len(meta.code) + len(meta.cookie)) + ENTRY_OVERHEAD


def batch_limit(max_message: int) -> int:
    """What the entries of one batch message may add up to."""
    return max_message - BATCH_HEADER


class Batches:
    """Entries for several peers, cut into messages of at most `limit` bytes each.

    `add` costs one dict lookup and one comparison: batching is the hot path.
    `messages()` gives each peer's messages in the order its entries came."""
    __slots__ = ("limit", "open", "full")

    def __init__(self, limit: int):
        self.limit = limit
        self.open: dict = {}   # peer -> [entries, bytes]
        self.full: list = []   # (peer, entries) already at the limit, oldest first

    def add(self, peer, entry, size: int) -> None:
        pending = self.open.get(peer)
        if pending is None:
            self.open[peer] = [[entry], size]
        elif pending[1] + size <= self.limit:
            pending[0].append(entry)
            pending[1] += size
        else:
            self.full.append((peer, pending[0]))
            pending[0] = [entry]
            pending[1] = size

    def __bool__(self) -> bool:
        return bool(self.open)

    def messages(self) -> list[tuple[object, list]]:
        return self.full + [(peer, pending[0]) for peer, pending in self.open.items()]


def job_entry(job: bytes, budget: float, meta: ExecMeta, data: bytes) -> list:
    """A request for a worker; its id only tells the worker that the request runs in
    its id's order (a worker may run other requests out of turn)."""
    return [job, budget, meta.name, meta.code, meta.cookie, meta.caller, list(meta.rights), data,
            meta.id]


def jobs_frames(worker: bytes, entries: list[list]) -> list[bytes]:
    """Broker side: one REQUEST message carrying `job_entry` lists."""
    return [worker, REQUEST, pack(entries)]


def parse_jobs(frames: list[bytes]) -> list[tuple[bytes, float, ExecMeta, bytes]]:
    """Worker side: [REQUEST, jobs] -> [(job, budget, meta, data), ...]."""
    if len(frames) != 2:
        raise ProtocolError("REQUEST must have 1 frame after the command")
    jobs = []
    for entry in _unpack_list(frames[1]):
        try:  # (msgpack makes exact types: `type(x) is` is isinstance here)
            job, budget, name, code, cookie, caller, rights, data, rid = entry
            ok = type(entry) is tuple and type(caller) is str and type(rights) is tuple \
                and _RIGHTS.issuperset(rights) and type(data) is bytes \
                and (rid is None or type(rid) is str)
        except (TypeError, ValueError):  # not a 9-item array, or unhashable rights
            ok = False
        if not ok:
            raise ProtocolError("bad REQUEST entry")
        jobs.append((job, float(budget), ExecMeta(name, code, cookie, None, rid, caller, rights),
                     data))
    return jobs


MAX_WARM = 1000  # warm runners a worker may say it keeps


def worker_replies_frames(replies: list[list]) -> list[bytes]:
    """Worker side: one REPLY message carrying [job, status, error, data, run_us, warm,
    hit] lists."""
    return [REPLY, pack(replies)]


def parse_worker_replies(frames: list[bytes]) -> list[tuple[bytes, str, bytes, str, float,
                                                             int, bool, bool]]:
    """Broker side: [identity, REPLY, replies] -> [(job, status, data, error, run_us,
    warm, hit, moved), ...]."""
    if len(frames) != 3:
        raise ProtocolError("REPLY must have 1 frame after the command")
    replies = []
    for entry in _unpack_list(frames[2]):
        # (msgpack makes exact types: `type(x) is` is isinstance here, and bool no int)
        if not (type(entry) is tuple and 7 <= len(entry) <= 8):
            raise ProtocolError("bad REPLY entry")
        job, status, error, data, run_us, warm, hit = entry[:7]
        moved = entry[7] if len(entry) == 8 else False
        if not (type(job) is bytes and type(status) is str and status in _STATUS_SET
                and type(error) is str and type(data) is bytes
                and type(run_us) in _NUMBERS and 0 <= run_us < 1e12
                and type(warm) is int and 0 <= warm <= MAX_WARM
                and type(hit) is bool and type(moved) is bool):
            raise ProtocolError("bad REPLY entry")
        replies.append((job, status, data, error, float(run_us), warm, hit, moved))
    return replies


_NUMBERS = (int, float)


# Transport ------------------------------------------------------------------
# pyzmq's send_multipart/recv_multipart spend half their time building enum
# flags; with plain ints a multipart round trip costs ~4.5 us instead of ~8.

# These call the Cython socket directly (plain, not asyncio, sockets).  Messages
# are read as Frames, whose `more` comes with each frame: the socket's RCVMORE
# option costs an enum lookup in pyzmq's Socket.get (~1 us) for every frame.

_SNDMORE, _NOBLOCK, _EVENTS, _POLLIN = 2, 1, 15, 1
_send, _recv, _get = zmq.backend.Socket.send, zmq.backend.Socket.recv, zmq.backend.Socket.get


def poll(items: list[tuple], timeout_ms: int) -> list[tuple]:
    """libzmq's zmq_poll over (socket or fd, events) items: the ready ones, as
    (socket or fd, events).  pyzmq's Poller.poll and Socket.poll wrap the same
    call in enums, dicts and, for Socket.poll, a new Poller (2x its cost)."""
    return zmq.backend.zmq_poll(items, timeout_ms)


def send_frames(sock, frames: list[bytes], noblock: bool = False) -> None:
    flags = _NOBLOCK if noblock else 0
    more = flags | _SNDMORE
    for frame in frames[:-1]:
        _send(sock, frame, more)
    _send(sock, frames[-1], flags)


def recv_frames(sock) -> list[bytes]:
    """One whole message; blocks unless `readable(sock)` said one is waiting."""
    return _whole(sock, _recv(sock, 0, False))


def recv_frames_nowait(sock) -> list[bytes] | None:
    """One whole message, or None if none waits.  Draining a socket this way costs
    one system call at the end; `readable` costs one per message (ZMQ_EVENTS
    polls the socket's mailbox each time)."""
    try:
        first = _recv(sock, _NOBLOCK, False)
    except zmq.Again:
        return None
    return _whole(sock, first)


def recv_frames_from(sock) -> tuple[list[bytes], str | None] | None:
    """Like `recv_frames_nowait`, with the ZAP User-Id of the connection the
    message came on (core.security: the client's public key; None without curve)."""
    try:
        first = _recv(sock, _NOBLOCK, False)
    except zmq.Again:
        return None
    frames = _whole(sock, first)
    try:
        return frames, first.get("User-Id")
    except zmq.ZMQError:  # a connection without ZAP has no User-Id
        return frames, None


def _whole(sock, frame) -> list[bytes]:
    """The message `frame` begins, as bytes (libzmq hands a message over whole:
    its other frames are there)."""
    frames = [frame.bytes]
    while frame.more:
        frame = _recv(sock, 0, False)
        frames.append(frame.bytes)
    return frames


def readable(sock) -> bool:
    """A message waits.  For a spin that mostly finds nothing: cheaper than a
    NOBLOCK recv raising zmq.Again.  To drain a socket use `recv_frames_nowait`."""
    return bool(_get(sock, _EVENTS) & _POLLIN)
