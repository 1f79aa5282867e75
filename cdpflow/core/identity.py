"""Identity resolution: the identity graph as a union-find over identifiers, with merges recorded.

Each identifier (type, normalised value) is owned by the profile it was first attributed to
(its *anchor*, which never changes); profiles are joined by union, the smaller id surviving.
An event's profile is the root of its identifiers' anchors. Profile ids are deterministic:
`p_` + a hash of the highest-priority identifier of the event that created the profile, so a
replay in the same order gives the same ids.

`IdentityGraph.resolve` is idempotent by messageId: a retried event gets the decision that was
recorded for it back, and changes nothing. Merge protection (per-type limits, blocked values,
fan-out quarantine) is not applied here yet.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from cdpflow.schemas.records import Identifier

DEFAULT_PRIORITY = ("user_id", "email", "phone", "loyalty_id", "device_id", "anonymous_id")


class Merge(NamedTuple):
    survivor_id: str
    absorbed_id: str
    cause_message_id: str
    reason: str
    merged_at: int  # event time of the cause, UTC microseconds


class Resolution(NamedTuple):
    message_id: str
    anchor_id: str  # the profile the event was first attributed to; never changes
    profile_id: str  # the root at the time of resolution
    merges: Tuple[Merge, ...]


def profile_id_for(identifier: Identifier) -> str:
    """The deterministic id of a profile created by this identifier."""
    digest = hashlib.sha256(f"{identifier[0]}\x00{identifier[1]}".encode("utf-8")).hexdigest()
    return "p_" + digest[:20]


@dataclass
class _Seen:
    first: int
    last: int


class IdentityGraph:
    """An in-memory identity graph; the store behind it can be swapped for a shared one.

    Args:
      priority: identifier types from most to least trusted; decides which identifier names a
        new profile. Types not listed rank after the listed ones, alphabetically.
    """

    def __init__(self, priority: Sequence[str] = DEFAULT_PRIORITY):
        self._rank = {t: i for i, t in enumerate(priority)}
        self._owner: Dict[Identifier, str] = {}
        self._parent: Dict[str, str] = {}
        self._seen: Dict[Identifier, _Seen] = {}
        self._decisions: Dict[str, Resolution] = {}
        self.merges: List[Merge] = []

    def _priority_key(self, identifier: Identifier):
        return (self._rank.get(identifier[0], len(self._rank)), identifier[0], identifier[1])

    def find(self, profile_id: str) -> str:
        """The current survivor for a profile id (itself if never absorbed)."""
        root = profile_id
        while self._parent.get(root, root) != root:
            root = self._parent[root]
        # Path compression: later finds on this chain are one step.
        while profile_id != root:
            self._parent[profile_id], profile_id = root, self._parent[profile_id]
        return root

    def resolve(self, message_id: str, timestamp: int, identifiers: Iterable[Identifier]) -> Resolution:
        """Attributes one event to a profile, creating or merging profiles as its identifiers demand.

        Args:
          message_id: the event's messageId (the idempotency key).
          timestamp: event time, UTC microseconds (for first/last seen and the merge record).
          identifiers: the event's normalised identifiers; at least one.

        Returns:
          The event's anchor, its root profile now, and the merges it caused.
        """
        recorded = self._decisions.get(message_id)
        if recorded is not None:
            return recorded
        ordered = sorted(set(identifiers), key=self._priority_key)
        if not ordered:
            raise ValueError(f"event {message_id} has no identifiers")
        known = [i for i in ordered if i in self._owner]
        merges: List[Merge] = []
        if not known:
            anchor = profile_id_for(ordered[0])
            self._parent.setdefault(anchor, anchor)
            root = self.find(anchor)
        else:
            anchor = self._owner[known[0]]
            roots: Dict[str, List[str]] = {}
            for identifier in known:
                roots.setdefault(self.find(self._owner[identifier]), []).append(identifier[0])
            root = min(roots)
            for absorbed in sorted(roots):
                if absorbed == root:
                    continue
                self._parent[absorbed] = root
                types = "+".join(sorted(set(roots[absorbed]) | set(roots[root])))
                merges.append(Merge(root, absorbed, message_id, f"shared {types}", timestamp))
        for identifier in ordered:
            if identifier not in self._owner:
                self._owner[identifier] = root
                self._seen[identifier] = _Seen(timestamp, timestamp)
            else:
                seen = self._seen[identifier]
                seen.first = min(seen.first, timestamp)
                seen.last = max(seen.last, timestamp)
        self.merges.extend(merges)
        resolution = Resolution(message_id, anchor, root, tuple(merges))
        self._decisions[message_id] = resolution
        return resolution

    def profile_of(self, identifier: Identifier) -> Optional[str]:
        """The current profile of an identifier, or None if it was never seen."""
        owner = self._owner.get(identifier)
        return self.find(owner) if owner is not None else None

    def links(self) -> Iterator[Tuple[str, str, str, int, int]]:
        """(identifier_type, identifier_value, current profile, first_seen, last_seen) for every identifier."""
        for identifier in sorted(self._owner):
            seen = self._seen[identifier]
            yield identifier[0], identifier[1], self.find(self._owner[identifier]), seen.first, seen.last
