"""Routing by id: who owns which part of the 512-bit key space.

Groups are replicas.  Within a group the nodes split the id space into ranges:
evenly in config order, or at the hex starts a node lists in ``ids``.  The
owner of an id is the node with the largest start <= id, wrapping around to
the largest start when the id is below every start.
"""
from __future__ import annotations

import bisect

from core.config import Config, NodeSettings
from core.exits import UsageError
from core.ids import ID_BITS, parse_id

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
            raise UsageError(f"no group {unknown[0]} in the config (groups: "
                             f"{', '.join(map(str, sorted(self.groups)))})")
        return list(dict.fromkeys(groups))  # a group named twice is still one target

    def targets(self, value: int | None, groups: list[int] | None) -> list[NodeSettings]:
        """The owner of `value` in each group, or every node when value is None."""
        chosen = self.select_groups(groups)
        if value is None:
            return [n for g in chosen for n in self.groups[g]]
        return [self.owner(g, value) for g in chosen]
