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


class SequentialIdentityReference:
    """Merge protection applied to events one by one, the simple way (for comparison with the store).

    Profiles are recomputed from scratch as connected components of the accepted link sets, without
    quarantined identifiers as bridges. Rules: an event's target is the profile of its
    highest-priority known non-quarantined identifier; other known identifiers' profiles merge
    into it unless a per-type maximum would be exceeded; new identifiers join it unless their type
    is full (then they stand alone); an identifier whose partners (seen with it within `window`)
    were, on those events, in profiles holding more than `max_profiles` accounts (types limited to
    one) is quarantined.
    """

    def __init__(self, priority, limits, max_profiles, window):
        self.rank = {t: i for i, t in enumerate(priority)}
        self.limits = limits
        self.max_profiles = max_profiles
        self.window = window
        self.nodes: list = []
        self.linksets: list = []
        self.quarantined: set = set()
        self.seen: dict = {}  # identifier -> [(account seen with it, ts)]

    def key(self, identifier):
        return self.rank.get(identifier[0], len(self.rank)), identifier[0], identifier[1]

    def components(self):
        uf = UnionFind()
        for node in self.nodes:
            uf.add(node)
        for linkset in self.linksets:
            usable = [i for i in linkset if i not in self.quarantined]
            for other in usable[1:]:
                uf.union(usable[0], other)
        return {node: uf.find(node) for node in self.nodes}

    def count(self, comp, root, id_type):
        return sum(1 for node, r in comp.items() if r == root and node[0] == id_type)

    def resolve(self, ts, identifiers):
        ids = sorted(set(identifiers), key=self.key)
        comp = self.components()
        known = [i for i in ids if i in comp]
        new = [i for i in ids if i not in comp]
        usable = [i for i in known if i not in self.quarantined]
        target = comp[usable[0]] if usable else None
        members = {n for n, r in comp.items() if r == target} if target is not None else set()
        lead, others = (usable[0] if usable else None), usable[1:]
        account_types = {t for t, n in self.limits.items() if n == 1}
        if (lead and new and self.key(new[0]) < self.key(lead) and new[0][0] in account_types
                and sum(1 for n in members if n[0] == new[0][0]) + 1 > self.limits[new[0][0]]):
            self.nodes.append(new[0])
            lead, target, members, new, others = new[0], new[0], {new[0]}, new[1:], usable
        def exceeds(left, right, types):
            return any(self.limits.get(t) is not None and
                       sum(1 for n in left if n[0] == t) + sum(1 for n in right if n[0] == t) > self.limits[t]
                       for t in types)

        for identifier in others:
            if identifier in members:
                continue
            comp = self.components()
            other = {n for n, r in comp.items() if r == comp[identifier]}
            if not exceeds(members, other, {n[0] for n in members | other}):
                members |= other
                continue
            # re-homing: an account clash, an account-led event, a non-account identifier whose
            # link sets hold no account
            if (lead[0] in account_types and identifier[0] not in account_types
                    and exceeds(members, other, account_types)
                    and not any(n != identifier and n[0] in account_types
                                for linkset in self.linksets if identifier in linkset for n in linkset)):
                self.linksets = [[n for n in linkset if n != identifier] for linkset in self.linksets]
                if not exceeds(members, {identifier}, {identifier[0]}):
                    members.add(identifier)
        for identifier in new:
            self.nodes.append(identifier)
            if target is None:
                target, members = identifier, {identifier}
                continue
            limit = self.limits.get(identifier[0])
            if limit is not None and sum(1 for n in members if n[0] == identifier[0]) + 1 > limit:
                continue
            members.add(identifier)
        linkset = [i for i in ids if i in members and i not in self.quarantined]
        if len(linkset) > 1:
            self.linksets.append(linkset)
        account_types = {t for t, n in self.limits.items() if n == 1}
        comp = self.components()
        for i in ids:
            if i in self.quarantined:
                continue
            for j in ids:
                if j != i:
                    self.seen.setdefault(i, []).extend(
                        (n, ts) for n, r in comp.items() if r == comp[j] and n[0] in account_types and n != i)
        for identifier in ids:
            if identifier in self.quarantined:
                continue
            accounts = {n for n, t in self.seen.get(identifier, ()) if abs(t - ts) <= self.window}
            if len(accounts) > self.max_profiles:
                self.quarantined.add(identifier)

    def partition(self):
        groups = {}
        for node, root in self.components().items():
            groups.setdefault(root, set()).add(node)
        return {frozenset(g) for g in groups.values()}


class SeparatedReference:
    """Events one by one with manual separations in force from the start, no limits (for splits).

    An event's identifiers in priority order; its target is the profile of the first one seen
    before (or, if none was, of its first identifier). Every other identifier joins the target,
    with its whole profile if it had one, unless that would put two separated identifiers in one
    profile: then it stays where it is (or alone, if it is new).
    """

    def __init__(self, priority, separations):
        self.rank = {t: i for i, t in enumerate(priority)}
        self.separations = [tuple(p) for p in separations]
        self.profile_of = {}  # identifier -> profile number
        self.members = {}  # profile number -> set of identifiers
        self.next = 0

    def _new(self, identifier):
        self.next += 1
        self.profile_of[identifier] = self.next
        self.members[self.next] = {identifier}
        return self.next

    def _apart(self, left, right):
        return any((a in self.members[left] and b in self.members[right]) or
                   (b in self.members[left] and a in self.members[right]) for a, b in self.separations)

    def resolve(self, identifiers):
        ordered = sorted(set(map(tuple, identifiers)), key=lambda i: (self.rank.get(i[0], len(self.rank)), i))
        known = [i for i in ordered if i in self.profile_of]
        lead = known[0] if known else ordered[0]
        target = self.profile_of[lead] if known else self._new(lead)
        for identifier in ordered:
            if identifier == lead:
                continue
            other = self.profile_of.get(identifier)
            if other == target:
                continue
            if other is None:
                other = self._new(identifier)
            if self._apart(target, other):
                continue
            for member in self.members.pop(other):
                self.profile_of[member] = target
                self.members[target].add(member)

    def partition(self):
        return {frozenset(m) for m in self.members.values()}
