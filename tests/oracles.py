"""Independent references used by the tests (written apart from cdpflow's own code on purpose)."""
from __future__ import annotations

from typing import Dict, FrozenSet, Hashable, Iterable, Set


class UnionFind:
    """A plain union-find."""

    def __init__(self):
        self.parent: Dict[Hashable, Hashable] = {}

    def add(self, item):
        self.parent.setdefault(item, item)

    def find(self, item):
        while self.parent[item] != item:
            self.parent[item] = self.parent[self.parent[item]]
            item = self.parent[item]
        return item

    def union(self, a, b):
        self.add(a)
        self.add(b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def components(self) -> Set[FrozenSet]:
        groups: Dict[Hashable, Set] = {}
        for item in self.parent:
            groups.setdefault(self.find(item), set()).add(item)
        return {frozenset(g) for g in groups.values()}


def components_of(events: Iterable[Iterable[Hashable]]) -> Set[FrozenSet]:
    """Connected components of the identifiers that co-occur on events."""
    uf = UnionFind()
    for identifiers in events:
        identifiers = list(identifiers)
        for item in identifiers:
            uf.add(item)
        for other in identifiers[1:]:
            uf.union(identifiers[0], other)
    return uf.components()
