"""Ids and keys: the one parser and validator every entry point uses.

An id is 1 to 128 hex digits naming the most significant digits of a 512-bit
value (shorter ids are zero-padded on the right, as in Elliptics); a key's id
is its sha512.  Whatever reaches srw (CLI, HTTP, the wire, the config) is
checked here, so one spelling is refused or taken the same way everywhere.
"""
from __future__ import annotations

import hashlib

ID_BITS = 512
ID_HEX = ID_BITS // 4
_HEX = frozenset("0123456789abcdef")


class BadId(ValueError):
    """Not an id: 1 to 128 hex digits and nothing else."""


def check_id(hex_id: str) -> str:
    """The id in its one spelling (lower case); raises BadId."""
    text = hex_id.lower() if isinstance(hex_id, str) else ""
    if not text or len(text) > ID_HEX or not _HEX.issuperset(text):
        shown = hex_id[:40] if isinstance(hex_id, str) else type(hex_id).__name__
        raise BadId(f"bad id {shown!r}: give 1 to {ID_HEX} hex digits and nothing else, "
                    "e.g. 0123456789")
    return text


def parse_id(hex_id: str) -> int:
    return int(check_id(hex_id).ljust(ID_HEX, "0"), 16)


def key_id(key: str | bytes) -> int:
    raw = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha512(raw).digest(), "big")


def id_hex(value: int) -> str:
    return f"{value:0{ID_HEX}x}"


def lock_key(hex_id: str) -> str:
    """One spelling per id for the broker's per-id lock: ids are zero-padded on
    the right, so trailing zeros name the same id."""
    return hex_id.lower().rstrip("0")
