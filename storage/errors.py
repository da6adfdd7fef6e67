"""The errors of the storage layer, in a module that imports none of its engines.

Both engines raise them (storage/engine_lmdb.py, storage/engine_redis.py and
its storage/redis_store.py), and every caller catches them; living here, no
engine imports the Session (storage/client.py) to reach them.  Per-node statuses are data (``Result``), not errors: only a call that
no node could answer raises.
"""
from __future__ import annotations

from broker.client import BrokerUnavailable

__all__ = ["StorageError", "NotFound", "StorageUnavailable", "ReplicaWriteFailed",
           "Forbidden", "NodeUnavailable"]


class StorageError(Exception):
    """Base of the errors a data call raises; per-node statuses are data, not errors."""


class NotFound(StorageError, KeyError):
    """No group has the key (every owner that answered said not_found)."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0]) if self.args else "not found"


class StorageUnavailable(StorageError, ConnectionError):
    """No owner of the key answered (all down, or their stores failed)."""


class ReplicaWriteFailed(StorageError):
    """A write that some groups stored and others did not: the value is on fewer
    replicas than asked.  ``failed`` and ``stored`` are the Results of each side
    (one per group); the caller decides whether to write again."""

    def __init__(self, key, failed: list, stored: list):
        self.key, self.failed, self.stored = key, list(failed), list(stored)
        super().__init__(
            f"write of {key!r} failed in group(s) "
            f"{', '.join(str(r.group) for r in self.failed)} ("
            + "; ".join(f"{r.node}: {r.status}: {r.error}" for r in self.failed)
            + f"); stored in group(s) {', '.join(str(r.group) for r in self.stored)}")


class Forbidden(StorageError, PermissionError):
    """The node refused the call: the caller (for a script: its request's
    capability, core/capability.py) lacks the right it needs."""


class NodeUnavailable(BrokerUnavailable):
    """One storage node did not answer; the Session turns it into a Result."""
