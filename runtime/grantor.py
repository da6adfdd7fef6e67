"""The worker's side of capabilities (core/capability.py): one per request
whose script calls its store, revoked once its reply is sent (lmdb, curve
on); in redis-cluster mode, the login of the Redis user the request's rights
call for (RedisGrantor).

    runner: first store call --ASK--> worker --grant()--> token --GRANT--> runner
    Worker.flush_replies --revoke()--> [DEALER, node key] --> own storage front

A request goes out with offer()'s token: in lmdb mode none, and one is
minted when the script asks (measured: the mint and the revocation message,
~45 us of node CPU per exec, were most of what curve cost an exec that never
calls its store), unless its script asked before: then at once, sparing the
runner's ask a round trip; the Redis login, which nothing revokes, at once.

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

from core import capability, redis_auth, security
from core import protocol as p
from core.config import Config, NodeSettings

from .scripts import Script

log = logging.getLogger("srw.worker")

STORAGE_REVOKE = capability.REVOKE
ASKERS = 1024  # named scripts remembered as calling their store (then forgotten at once)


class Grantor:
    """lmdb, curve on: signed tokens, revoked once answered (storage/grants.py)."""

    def __init__(self, config: Config, node: NodeSettings, ctx: zmq.Context):
        _, secret = security.load_pair(config.security.server_key, "[security] server_key")
        self.key = capability.derive_key(secret)
        self.node = node.name
        self.definers = config.security.definers
        self.warned: set[tuple[str, bytes]] = set()
        self.askers: set[str] = set()  # scripts whose requests asked: minted up front
        self.sock = ctx.socket(zmq.DEALER)
        security.role_credentials(config, "node").apply(self.sock)
        self.sock.setsockopt(zmq.LINGER, 1000)
        self.sock.setsockopt(zmq.SNDHWM, 100_000)
        self.sock.connect(node.storage)

    @classmethod
    def for_config(cls, config: Config, node: NodeSettings, ctx: zmq.Context,
                   network: str) -> Grantor | None:
        """A RedisGrantor in redis-cluster mode; None when the profile's network
        is none (no script reaches a store) and, in lmdb mode, without curve
        (no one is authenticated: every caller has every right)."""
        if network == "none":
            return None
        if config.cluster.redis:
            return RedisGrantor(config)
        if not config.security.curve:
            return None
        return cls(config, node, ctx)

    def offer(self, job: bytes, meta: p.ExecMeta, script: Script | None,
              deadline: float) -> tuple[bytes, tuple[bytes, float] | None]:
        """What goes with the request: its token if its script asked before,
        else nothing (it asks when it needs one)."""
        if script is not None and script.name in self.askers:
            return self.grant(job, meta, script, deadline)
        return b"", None

    def ask(self, job: bytes, meta: p.ExecMeta, script: Script | None,
            deadline: float) -> tuple[bytes, tuple[bytes, float]]:
        """The token its script asked for; its next requests get one up front."""
        if script is not None:
            if len(self.askers) >= ASKERS:
                self.askers.clear()
            self.askers.add(script.name)
        return self.grant(job, meta, script, deadline)

    def grant(self, job: bytes, meta: p.ExecMeta, script: Script | None,
              deadline: float) -> tuple[bytes, tuple[bytes, float]]:
        """(token, revocation entry) for one request; `deadline` is monotonic."""
        rights = self.rights(meta, script)
        wall = time.time() + (deadline - time.monotonic())
        token, cap_id = capability.mint(self.key, self.node, job, meta.caller or "",
                                        rights, wall)
        return token, (cap_id, wall)

    def rights(self, meta: p.ExecMeta, script: Script | None) -> tuple[str, ...]:
        """The caller's, or a definer script's (see the module's docstring)."""
        if script is not None and not meta.code:
            return self._definer(script) or meta.rights
        return meta.rights

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


class RedisGrantor(Grantor):
    """redis-cluster mode: no front checks tokens, so a request's grant is the
    login of the Redis user its rights call for (core/redis_auth.py).  A runner
    keeps it for its tenant's later requests: nothing revokes it."""

    def __init__(self, config: Config):
        self.definers = config.security.definers
        self.warned = set()
        self.credentials = redis_auth.credentials(config)  # after the zygote's fork

    def grant(self, job: bytes, meta: p.ExecMeta, script: Script | None,
              deadline: float) -> tuple[bytes, None]:
        rights = self.rights(meta, script)
        login = redis_auth.script_login(self.credentials, rights)
        proof = redis_auth.read_proof(self.credentials, login[0]) \
            if login and "read" in rights else ""
        return capability.redis_grant(login, proof), None

    offer = ask = grant  # a runner keeps the login for its tenant's later requests anyway

    def revoke(self, answered: list) -> None:
        pass

    def close(self) -> None:
        pass
