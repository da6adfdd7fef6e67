"""Which worker a tenant's requests go to, so that they find its warm runner.

In copy isolation each worker keeps up to pool.warm_runners runners warm, one
per tenant (runtime/tenants.py).  Spread over the workers by load alone,
every tenant visits every worker, and a node keeps warm no more tenants than
one worker does; sent to one worker each, the node keeps warm_runners times
its workers.  A tenant gets a worker slot when first seen, the slots taken in
turn; its requests go there while that worker has credit, is not draining
and holds no more than SLACK requests, and WAIT_US of expected run time,
beyond the least busy worker.  Past that they go where `choose_worker`
says, so a busy tenant still uses every worker, and a worker running a
script known to be slow (dispatch.Worker.load: learned run times; a script
never timed counts PACK_US) keeps its tenants' next requests off it.  A
preference, not a rule: nothing depends on it but warm hits.
"""
from __future__ import annotations

import collections

SLACK = 2         # requests a tenant's worker may hold beyond the least busy one
# ... and expected run time (us, dispatch.Worker.load): about what a fresh runner on
# another worker costs (a fork and its page faults), so that a tenant's requests do
# not wait long behind a slow one of its own while another worker has room.
WAIT_US = 1000.0
TENANTS = 4096    # tenants whose slot is remembered (then all are forgotten)
CODE_WHOLE = 1024  # script content compared whole up to this many characters


def tenant_key(meta) -> tuple:
    """The broker's view of runtime/tenants.tenant (the caller, the script's name,
    its content): longer content by its length and ends, as a hint needs no digest."""
    code = meta.code
    if len(code) > CODE_WHOLE:
        code = (len(code), code[:CODE_WHOLE // 2], code[-CODE_WHOLE // 2:])
    return meta.caller, meta.name, code


class TenantAffinity:
    def __init__(self):
        self.slots: dict[tuple, int] = {}
        self.assigned: collections.Counter[int] = collections.Counter()  # tenants per slot
        self.turn = 0

    def has_tenants(self, slot: int) -> bool:
        """Whether any tenant was given `slot` (a worker with none has no own
        requests to look for in the queue)."""
        return self.assigned[slot] > 0

    def worker(self, meta, by_slot: dict, workers):
        """The tenant's worker if it should take `meta`'s request now, else None.
        `by_slot`: the live workers by slot; `workers`: all of them."""
        key = tenant_key(meta)
        worker = by_slot.get(self.slots.get(key))
        if worker is None:
            slot = self._assign(key, by_slot)
            if slot is None:
                return None
            worker = by_slot[slot]
        held = len(worker.jobs)
        if held >= worker.credits or worker.draining:
            return None
        if held > SLACK or worker.load > WAIT_US:  # (a loop, not min(): it runs per request)
            for other in workers:
                if (len(other.jobs) + SLACK < held or other.load + WAIT_US < worker.load) \
                        and not other.draining:
                    return None
        return worker

    def _assign(self, key: tuple, by_slot: dict) -> int | None:
        slots = sorted(slot for slot, worker in by_slot.items() if not worker.draining)
        if not slots:
            return None
        if len(self.slots) >= TENANTS:
            self.slots.clear()
            self.assigned.clear()
        slot = self.slots[key] = slots[self.turn % len(slots)]
        self.assigned[slot] += 1
        self.turn += 1
        return slot
