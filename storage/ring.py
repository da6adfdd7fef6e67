"""Routing by id: who owns which part of the 512-bit key space.

Groups are replicas.  Within a group the nodes split the id space into ranges:
evenly in config order, or at the hex starts a node lists in ``ids``.  The
owner of an id is the node with the largest start <= id, wrapping around to
the largest start when the id is below every start.
"""
from __future__ import annotations

import bisect
import hashlib

from srw.config import Config, NodeSettings

ID_BITS = 512
ID_HEX = ID_BITS // 4


class BadId(ValueError):
    """Not a hex id of at most 128 digits."""


def parse_id(hex_id: str) -> int:
    """A hex id names the most significant bytes; shorter ids are zero-padded on the right."""
    text = hex_id.strip().lower()
    if not text or len(text) > ID_HEX or any(c not in "0123456789abcdef" for c in text):
        raise BadId(f"bad id {hex_id[:40]!r}: give up to {ID_HEX} hex digits, e.g. 0123456789")
    return int(text.ljust(ID_HEX, "0"), 16)


def key_id(key: str | bytes) -> int:
    raw = key.encode() if isinstance(key, str) else key
    return int.from_bytes(hashlib.sha512(raw).digest(), "big")


def id_hex(value: int) -> str:
    return f"{value:0{ID_HEX}x}"


class Ring:
    def __init__(self, config: Config):
        self.groups: dict[int, list[NodeSettings]] = {}
        for node in config.nodes:
            self.groups.setdefault(node.group, []).append(node)
        self._starts: dict[int, tuple[list[int], list[NodeSettings]]] = {}
        for group, nodes in self.groups.items():
            pairs = []
            for index, node in enumerate(nodes):
                if node.ids:
                    pairs += [(parse_id(h), node) for h in node.ids]
                else:
                    pairs.append(((1 << ID_BITS) * index // len(nodes), node))
            pairs.sort(key=lambda pair: pair[0])
            self._starts[group] = ([s for s, _ in pairs], [n for _, n in pairs])

    def owner(self, group: int, value: int) -> NodeSettings:
        starts, nodes = self._starts[group]
        index = bisect.bisect_right(starts, value) - 1
        return nodes[index]  # index -1 wraps to the largest start

    def select_groups(self, groups: list[int] | None) -> list[int]:
        if not groups:
            return sorted(self.groups)
        unknown = [g for g in groups if g not in self.groups]
        if unknown:
            raise ValueError(f"no group {unknown[0]} in the config (groups: "
                             f"{', '.join(map(str, sorted(self.groups)))})")
        return list(dict.fromkeys(groups))  # a group named twice is still one target

    def targets(self, value: int | None, groups: list[int] | None) -> list[NodeSettings]:
        """The owner of `value` in each group, or every node when value is None."""
        chosen = self.select_groups(groups)
        if value is None:
            return [n for g in chosen for n in self.groups[g]]
        return [self.owner(g, value) for g in chosen]
