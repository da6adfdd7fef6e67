"""Tenants: whom a warm runner may serve (copy isolation).

A tenant is (caller, digest).  The caller is who the broker says sent the
request (a CurveZMQ client key, the caller a node relays for, "node:NAME" for
a node's own execs, "local" without curve: broker.Broker.caller).  The digest
is a SHA-256 over the request's script content, the script name and the
bytes of the named script as this worker resolved them (so a push, or an
edit of the file, makes a new tenant); a worker belongs to one generation of
python.init, so a reload's new workers start with no warm runners at all.

A runner serves one tenant only: whatever a script leaves behind in it (a
hook, a thread, a changed module) meets only later requests of the same
caller running the same code.  WarmRunners keeps a worker's runners between
requests: at most `most` in all (past it, the least recently used of the
caller holding the most goes; at a tie, the caller just served).  So a
caller cycling fresh contents evicts its own warm runners, and another
caller's only while that one holds more than it does: each caller keeps
`per_caller` of them whatever the others do, and one caller alone may use
all `most` (the room no other caller needs; a lone caller is the rule
without curve, where every client is "local").

A caller's tenant not seen lately does not displace warm runners once its
caller holds `per_caller` and the set is full: its runner goes after its
request, and the tenant is remembered (the last `most` such), so that it is
kept when it comes again soon.  Without this, a caller's tenants taking turns, more of
them than it may keep warm (LRU's worst case), evicted every runner before
its tenant came back, and each request paid for a fresh runner and for
evicting another; now the runners kept stay warm and are found.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Generic, TypeVar

Runner = TypeVar("Runner")
Tenant = tuple[str, bytes]


def tenant(caller: str, name: str, source_sha256: bytes, code: str) -> Tenant:
    """(caller, digest) of a request; `source_sha256` is the named script's
    (b"" when the request names none)."""
    h = hashlib.sha256()
    for part in (name.encode(), source_sha256, code.encode("utf-8", "surrogatepass")):
        h.update(len(part).to_bytes(8, "little"))  # lengths first: no two splits alike
        h.update(part)
    return caller, h.digest()


class WarmRunners(Generic[Runner]):
    """Runners by tenant, least recently used first."""

    def __init__(self, most: int, per_caller: int):
        self.most, self.per_caller = most, per_caller
        self.runners: OrderedDict[Tenant, Runner] = OrderedDict()
        self.callers: dict[str, int] = {}  # caller -> its warm runners
        self.seen: OrderedDict[Tenant, None] = OrderedDict()  # turned away lately

    def take(self, key: Tenant) -> Runner | None:
        """The tenant's warm runner, out of the set while it runs (None: none warm)."""
        runner = self.runners.pop(key, None)
        if runner is not None:
            self._count(key[0], -1)
        return runner

    def admits(self, key: Tenant) -> bool:
        """Whether a runner of `key` may be kept warm (keep); a tenant turned away
        (see above) is remembered, and admitted when it comes again soon."""
        if self.callers.get(key[0], 0) < self.per_caller or len(self.runners) < self.most \
                or key in self.seen:
            return True
        self.seen[key] = None
        if len(self.seen) > self.most:
            self.seen.popitem(last=False)
        return False

    def keep(self, key: Tenant, runner: Runner) -> list[Runner]:
        """Keep `runner` warm for `key` (admitted); returns the runners evicted to
        make room."""
        self.seen.pop(key, None)
        self.runners[key] = runner
        self._count(key[0], +1)
        evicted = []
        while len(self.runners) > self.most:  # the busiest caller pays, this one at a tie
            most = max(self.callers.values())
            busiest = key[0] if self.callers.get(key[0]) == most else \
                next(k[0] for k in self.runners if self.callers[k[0]] == most)
            evicted.append(self._evict(busiest))
        return evicted

    def discard(self, runner: Runner) -> None:
        """Forget `runner` (it is being replaced)."""
        for key, held in self.runners.items():
            if held is runner:
                del self.runners[key]
                self._count(key[0], -1)
                return

    def __len__(self) -> int:
        return len(self.runners)

    def values(self) -> list[Runner]:
        return list(self.runners.values())

    def _evict(self, caller: str) -> Runner:
        """The caller's least recently used runner."""
        key = next(k for k in self.runners if k[0] == caller)
        self._count(caller, -1)
        return self.runners.pop(key)

    def _count(self, caller: str, step: int) -> None:
        left = self.callers.get(caller, 0) + step
        if left:
            self.callers[caller] = left
        else:
            self.callers.pop(caller, None)
