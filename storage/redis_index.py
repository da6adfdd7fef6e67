"""Which documents are indexed in redis-cluster mode, kept in Redis beside them.

    indexed write (Session, CLI, HTTP)            remove of an indexed key
      MULTI on the key's master:                    MULTI on the key's master:
        SET key value                                 DEL key
        HSET srw:index:{T} key lang                   HDEL srw:index:{T} key
        XADD srw:index:log:{T} MAXLEN ~ LOG_MAX       XADD srw:index:log:{T} ...  k=key
             k=key
        PUBLISH srw:index <slot>: a hint              PUBLISH srw:index <slot>
      EXEC; then the writer waits until its log entry is gone
                          |
                          v
      the srw node beside the slot's master (storage/slot_indexer.py) tails the
      log, reads the key and its lang, keeps its FTS5 index in step, and deletes
      the entries it committed

{T} is the slot's own hash tag (_tags: four letters whose CRC16 is the slot),
so a value, its slot's index hash and its slot's log are on one master and
one MULTI covers all three: the index hash is the truth (which keys of the
slot are indexed, each with its language), the log only says what changed
since, and a node that takes a slot indexes it again from the hash.  Redis
replicates and migrates both keys with the slot's values, so a failover or a
resharded slot carries its index state with it.

Everything here is hostile to the indexer: a script with write rights may
HSET, XADD, PUBLISH or overwrite these keys like any other (it could write
the documents themselves just as well).  The indexer reads them only within
bounds (slot_indexer.py); what a script can do is index keys it could
overwrite anyway, or make its slot be indexed again.
"""
from __future__ import annotations

import binascii
import functools


__all__ = ["SLOTS", "CHANNEL", "tag", "index_key", "log_key", "text_of"]

SLOTS = 16384
CHANNEL = b"srw:index"      # PUBLISH <slot>: the slot's log has something new
LOG_MAX = 10_000            # entries a slot's log keeps (XADD MAXLEN ~); past it, a rebuild
LOG_FIELD = b"k"


@functools.cache
def _tags() -> tuple[bytes, ...]:
    """slot -> a 4-letter hash tag in that slot.  Each letter is 0x40 | 4 bits, so
    the CRC16 of the 65536 tags is an affine map of their 16 bits: it reaches
    every slot (checked here), in one pass (~50 ms)."""
    tags = [b""] * SLOTS
    crc = binascii.crc_hqx
    for i in range(1 << 16):
        raw = (0x40404040 | (i & 0xF000) << 12 | (i & 0xF00) << 8 | (i & 0xF0) << 4 |
               i & 0xF).to_bytes(4, "big")
        slot = crc(raw, 0) & (SLOTS - 1)
        if not tags[slot]:
            tags[slot] = raw
    assert all(tags), "every slot has a tag"  # a property of CRC16, not of input
    return tuple(tags)


def tag(slot: int) -> bytes:
    return _tags()[slot]


def index_key(slot: int) -> bytes:
    """The slot's hash: indexed key -> its lang ("" for by script)."""
    return b"srw:index:{" + tag(slot) + b"}"


def log_key(slot: int) -> bytes:
    """The slot's stream of changed indexed keys (field LOG_FIELD)."""
    return b"srw:index:log:{" + tag(slot) + b"}"


def text_of(value: bytes) -> str:
    """The text indexed for a value: history/index.py's rule (UTF-8, binary skipped)."""
    if b"\0" in value:
        return ""
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return ""
