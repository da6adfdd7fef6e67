"""The storage front's side of capabilities (core/capability.py): checks and revocations.

    script's call (scripts key) + token --> Grants.refusal: MAC, deadline, revoked, right
    worker REVOKE (node key)             --> Grants.revoke --> peers (REVOKE_PEER, batched)

With curve on, a call from the scripts key is done only with the capability
it carries: the MAC proves a worker of the cluster made it for a request it
ran, the deadline and the revocations limit it to that request's life, and
its rights (the caller's, or a definer script's) decide the command.

Revocation: a worker sends REVOKE to its own node's front before it sends
the replies of the requests named; the front refuses those ids from the
turn of its loop that reads it, and passes the ids on, once per turn, to
every other node's front.  An id is kept until its deadline: after that
the capability is refused as expired anyway.  A front that is down or
unreachable when the ids are passed on never gets them: there the
capability lasts until its deadline (README "Sandbox").
"""
from __future__ import annotations

import heapq
import logging
import time

import zmq

from core import capability as cap
from core import protocol as bp
from core import security
from core.config import Config, NodeSettings

from . import protocol as sp

log = logging.getLogger("srw.storage")

# Tokens whose MAC was checked, kept so that a script's next calls skip it
# (measured: verify 6.6 us, a dict lookup well under 1); deadline and
# revocation are still checked on every call.
VERIFIED = 4096


class Grants:
    def __init__(self, ctx: zmq.Context, config: Config, node: NodeSettings,
                 keyring: security.Keyring):
        self.key = cap.derive_key(keyring.secret)
        self.verified: dict[bytes, cap.Capability] = {}  # token -> what its MAC proved
        self.revoked: set[bytes] = set()
        self.expiry: list[tuple[float, bytes]] = []   # (deadline, id), soonest first
        self.outgoing: list[tuple[bytes, float]] = []  # to pass on at the end of the turn
        self.peers = []
        credentials = security.role_credentials(config, "node")
        for other in config.nodes:
            if other.name == node.name or not other.storage:
                continue
            sock = ctx.socket(zmq.DEALER)
            credentials.apply(sock)
            for option, value in ((zmq.LINGER, 0), (zmq.IMMEDIATE, 1), (zmq.SNDHWM, 10_000),
                                  (zmq.RECONNECT_IVL, 50), (zmq.RECONNECT_IVL_MAX, 1000)):
                sock.setsockopt(option, value)
            sock.connect(other.storage)
            self.peers.append((other.name, sock))

    def refusal(self, req: sp.StorageRequest) -> str | None:
        """None if the request's capability allows its command now; else why not."""
        if not req.capability:
            return (f"a script's {req.name} needs its request's capability (the storage "
                    "handle sends it; with curve on, the scripts key alone may do nothing)")
        grant = self.verified.get(req.capability)
        if grant is None:
            try:
                grant = cap.verify(self.key, req.capability)
            except cap.Refused as exc:
                return f"capability refused: {exc}"
            except Exception:  # the MAC matched, yet it does not parse: another version's
                return "capability refused: unreadable"
            if len(self.verified) >= VERIFIED:
                self.verified.clear()
            self.verified[req.capability] = grant
        elif time.time() > grant.deadline:
            return "capability refused: the capability's request is past its deadline"
        if grant.id in self.revoked:
            return ("capability refused: its request was already answered (a script's "
                    "leftover or copy may not act after its request)")
        right = sp.NEEDS.get(req.cmd)
        if right is None or not grant.allows(right):
            return (f"caller {grant.caller[:40]!r} may not {req.name}: its scripts run with "
                    f"{grant.rights_text()} (the {right!r} right is needed)")
        return None

    def revoke(self, entries: list[tuple[bytes, float]], pass_on: bool) -> None:
        now = time.time()
        for cap_id, deadline in entries:
            if deadline > now and cap_id not in self.revoked:
                self.revoked.add(cap_id)
                heapq.heappush(self.expiry, (deadline, cap_id))
        if pass_on and self.peers:
            self.outgoing.extend(entries)

    def tick(self) -> None:
        """Once per turn of the front's loop: pass on this turn's revocations, and
        forget the ids whose deadline has passed."""
        if self.outgoing:
            for start in range(0, len(self.outgoing), cap.MAX_REVOKE):
                frames = sp.request_frames(sp.REVOKE_PEER, b"", data=sp.revoke_data(
                    self.outgoing[start:start + cap.MAX_REVOKE]))
                for name, sock in self.peers:
                    try:
                        bp.send_frames(sock, frames, noblock=True)
                    except zmq.Again:  # down: there, the capabilities last until their deadline
                        log.debug("revocations not passed on to node %s: not connected", name)
            self.outgoing = []
        now = time.time()
        while self.expiry and self.expiry[0][0] <= now:
            self.revoked.discard(heapq.heappop(self.expiry)[1])

    def close(self) -> None:
        for _, sock in self.peers:
            sock.close()
