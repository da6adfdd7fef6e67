"""Capabilities: what a script's store calls may do, for one request only.

    worker (trusted)                 runner (sandboxed)              storage front
    mint(caller, rights, job, ...) --REQUEST--> CURRENT --store call--> verify, rights,
    ...reply sent: REVOKE (id, deadline) ------------------------------> revoked ids

With CurveZMQ on, a script's store handle connects with the node's scripts
key, which every script can read; what it may do comes from the capability
it sends with every call (storage/protocol.py): the caller's rights (or a
definer script's, core/config.py DefinerSettings), the request's id and
deadline, MAC'd (keyed BLAKE2b) with a key derived from the nodes' server
secret.  Only workers and storage fronts read that secret, and a worker
reads it after it forked its slot's zygote, so no runner's memory holds it.
The front refuses a capability past its deadline or once the worker has told
it the request was answered (REVOKE).

Token: msgpack [VERSION, id, node, job, caller, rights, deadline] + MAC (32
bytes); id 8 random bytes (what revocation names), rights a bit mask of
core.config.RIGHTS, deadline Unix seconds (nodes' clocks must agree).

In redis-cluster mode there is no front to check a token: CURRENT holds the
login of the Redis user for the request's rights instead (redis_grant).

A token is minted only when the running script first needs one: the storage
handle calls current(), which asks the worker through ASK (the runner's pipe,
runtime/channel.py; the worker's own call under isolation none) once per
request and keeps the answer in CURRENT for the rest of it.  A request whose
script never calls its store costs no MAC and no revocation (most execs).
A script can overwrite CURRENT, but only with a token it was given: an old
one is revoked, and it cannot make a new one.
"""
from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass

import msgpack

from .config import RIGHTS
from .protocol import ProtocolError, pack, unpack_list

VERSION = 2   # 2: keyed BLAKE2b (1: HMAC-SHA256, ~4x the CPU per mint and check)
MAC_BYTES = 32
ID_BYTES = 8
MAX_TOKEN = 1024   # bytes: a caller (128), a node name and a job id fit with room
LABEL = b"srw capability key v1"

# Storage commands (storage/protocol.py): a worker's answered requests, and the
# same passed on by its front to the other nodes' fronts (which go no further).
REVOKE = b"V"
REVOKE_PEER = b"P"
MAX_REVOKE = 4096  # ids one REVOKE may carry

CURRENT = b""      # the token of the request this process runs now (b"": none yet)
ASK = None         # while a request runs: asks the worker for its token, once
_asking = threading.Lock()  # a script's threads may call their store at once


def current() -> bytes:
    """The running request's token (what the storage handle sends), asked of
    the worker at the first call of the request."""
    global ASK, CURRENT
    if not CURRENT and ASK is not None:
        with _asking:
            ask, ASK = ASK, None
            if ask is not None:
                CURRENT = ask()
    return CURRENT


def running(token: bytes, ask) -> None:
    """A request begins (token: what came with it; ask: mints its own when
    first needed) or, with (b"", None), ends."""
    global ASK, CURRENT
    CURRENT, ASK = token, ask


# Redis-cluster mode has no storage front to check tokens: a request's
# "capability" is then the login of the Redis user its rights call for
# (core/redis_auth.py script_login), which the handle logs in with.
REDIS_LOGIN = b"redis-login\0"


def redis_grant(login: tuple[str, str] | None, read_proof: str = "") -> bytes:
    """`read_proof`: redis_auth.read_proof when the caller may read (what search
    checks: srw-write is handed to callers that may write but not read)."""
    if login is None:
        return b""
    return REDIS_LOGIN + login[0].encode() + b"\0" + login[1].encode() + \
        (b"\0" + read_proof.encode() if read_proof else b"")


def redis_login() -> tuple[str, str] | None:
    """The running request's Redis login, None when its caller may neither read
    nor write (or no request is running)."""
    return parse_redis_grant(CURRENT)


def parse_redis_grant(token: bytes) -> tuple[str, str] | None:
    """(user, password) of a redis_grant token, None for anything else."""
    if not token.startswith(REDIS_LOGIN):
        return None
    user, _, rest = token[len(REDIS_LOGIN):].partition(b"\0")
    return user.decode(errors="replace"), rest.partition(b"\0")[0].decode(errors="replace")


def redis_read_proof(token: bytes) -> str:
    """The read proof a redis_grant token carries ("" for none)."""
    if not token.startswith(REDIS_LOGIN):
        return ""
    fields = token[len(REDIS_LOGIN):].split(b"\0", 2)
    return fields[2].decode(errors="replace") if len(fields) == 3 else ""


class Refused(ValueError):
    """A token that is forged, garbled, expired or revoked; the message says which."""


def derive_key(server_secret: bytes) -> bytes:
    """The MAC key: HMAC(server secret, LABEL), so the secret itself is used for
    nothing but CurveZMQ and this key for nothing but capabilities."""
    return hmac.new(server_secret, LABEL, hashlib.sha256).digest()


def mac(key: bytes, body: bytes) -> bytes:
    """BLAKE2b in its keyed mode, a MAC by design (RFC 7693): 2 us a token
    where HMAC-SHA256 through OpenSSL took 9."""
    return hashlib.blake2b(body, key=key, digest_size=MAC_BYTES).digest()


def rights_mask(rights) -> int:
    mask = 0
    for right in rights:
        mask |= 1 << RIGHTS.index(right)
    return mask


@dataclass(frozen=True, slots=True)
class Capability:
    id: bytes
    node: str
    job: bytes
    caller: str
    rights: int     # bit mask (rights_mask)
    deadline: float  # Unix seconds

    def allows(self, right: str) -> bool:
        return bool(self.rights >> RIGHTS.index(right) & 1)

    def rights_text(self) -> str:
        return ",".join(r for r in RIGHTS if self.allows(r)) or "no rights"


def mint(key: bytes, node: str, job: bytes, caller: str, rights, deadline: float) -> tuple[bytes, bytes]:
    """(token, id) for one request; `deadline` in Unix seconds."""
    cap_id = os.urandom(ID_BYTES)
    body = msgpack.packb([VERSION, cap_id, node, job, caller, rights_mask(rights), deadline],
                         use_bin_type=True)
    return body + mac(key, body), cap_id


def verify(key: bytes, token: bytes, now: float | None = None) -> Capability:
    """The capability a token grants now, or Refused saying why."""
    if not MAC_BYTES < len(token) <= MAX_TOKEN:
        raise Refused("not a capability (wrong length)")
    body, tag = token[:-MAC_BYTES], token[-MAC_BYTES:]
    if not hmac.compare_digest(mac(key, body), tag):
        raise Refused("forged or altered capability (its MAC does not match)")
    fields = msgpack.unpackb(body, raw=False)  # ours: the MAC proves a worker made it
    if fields[0] != VERSION:
        raise Refused(f"capability version {fields[0]!r}; this node knows {VERSION}")
    cap = Capability(*fields[1:])
    if (time.time() if now is None else now) > cap.deadline:
        raise Refused("the capability's request is past its deadline")
    return cap


def revoke_data(revoked: list[tuple[bytes, float]]) -> bytes:
    """The data frame of a REVOKE: msgpack [[id, deadline], ...]."""
    return pack([list(r) for r in revoked])


def parse_revoke(data: bytes) -> list[tuple[bytes, float]]:
    """[(id, deadline)] of a REVOKE's data frame, or ProtocolError."""
    try:
        entries = unpack_list(data)
    except ProtocolError:
        raise ProtocolError("revoke: the data must be msgpack [[id, deadline], ...]") from None
    if len(entries) > MAX_REVOKE:
        raise ProtocolError(f"revoke: {len(entries)} ids; at most {MAX_REVOKE}")
    for entry in entries:
        if not (isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], bytes)
                and isinstance(entry[1], float)):
            raise ProtocolError("revoke: each entry must be [id (bytes), deadline (float)]")
    return list(entries)
