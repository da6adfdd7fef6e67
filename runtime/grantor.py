"""The worker's side of capabilities (core/capability.py): one per request,
revoked once its reply is sent.

    Worker.run_next --grant()--> token --> runner (REQUEST) --> store calls
    Worker.flush_replies --revoke()--> [DEALER, node key] --> own storage front

The worker makes its Grantor after it forked its slot's zygote, so the MAC
key (derived from the server secret read here) is in no zygote's and so in
no runner's memory; runners cannot read keys/ either (sandbox).  Isolation
none runs scripts in the worker itself: there they could mint their own,
which is why none is only for trusted scripts.

Rights: the caller's, as the broker sent them; a definer script
(``[security.definers]``) runs with its own instead, only while its bytes are
the ones named and only when the request sends no content of its own (which
would run first, in the same context, with the definer's rights).
"""
from __future__ import annotations

import logging
import time

import zmq

from core import capability, security
from core import protocol as p
from core.config import Config, NodeSettings

from .scripts import Script

log = logging.getLogger("srw.worker")

STORAGE_REVOKE = capability.REVOKE


class Grantor:
    def __init__(self, config: Config, node: NodeSettings, ctx: zmq.Context):
        _, secret = security.load_pair(config.security.server_key, "[security] server_key")
        self.key = capability.derive_key(secret)
        self.node = node.name
        self.definers = config.security.definers
        self.warned: set[tuple[str, bytes]] = set()
        self.sock = ctx.socket(zmq.DEALER)
        security.role_credentials(config, "node").apply(self.sock)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(node.storage)

    @classmethod
    def for_config(cls, config: Config, node: NodeSettings, ctx: zmq.Context,
                   network: str) -> Grantor | None:
        """None without curve (no one is authenticated: no capabilities), in
        redis-cluster mode (no storage front checks them there), and when the
        profile's network is none (no script reaches a store)."""
        if not config.security.curve or config.cluster.redis or network == "none":
            return None
        return cls(config, node, ctx)

    def grant(self, job: bytes, meta: p.ExecMeta, script: Script | None,
              deadline: float) -> tuple[bytes, tuple[bytes, float]]:
        """(token, revocation entry) for one request; `deadline` is monotonic."""
        rights = meta.rights
        if script is not None and not meta.code:
            rights = self._definer(script) or rights
        wall = time.time() + (deadline - time.monotonic())
        token, cap_id = capability.mint(self.key, self.node, job, meta.caller or "",
                                        rights, wall)
        return token, (cap_id, wall)

    def _definer(self, script: Script) -> tuple[str, ...] | None:
        definer = self.definers.get(script.name)
        if definer is None:
            return None
        if definer.sha256 == script.sha256.hex():
            return definer.rights
        if (script.name, script.sha256) not in self.warned:
            self.warned.add((script.name, script.sha256))
            log.warning("definer script %s: its content (sha256 %s) is not the one "
                        "[security.definers] names; it runs with its callers' rights until "
                        "the operator renews the sha256", script.name, script.sha256.hex())
        return None

    def revoke(self, answered: list[tuple[bytes, float]]) -> None:
        """Tell the node's storage front these requests were answered: their
        capabilities are refused from then on (storage/grants.py)."""
        if not answered:
            return
        try:
            p.send_frames(self.sock, [STORAGE_REVOKE, capability.revoke_data(answered)],
                          noblock=True)
        except zmq.Again:  # the front takes nothing: they last until their deadline
            log.warning("%d capabilities not revoked: the storage front takes no message",
                        len(answered))

    def close(self) -> None:
        self.sock.close()
