"""The identity graph algorithm, once, over the storage primitives every backend provides.

`IdentityStore` is the interface every path resolves through (the batch and streaming Beam
stages, the Flink job to come, replays, `forget`): `resolve_batch`, `resolve_batch_with_moves`,
`final_profiles`, read-outs, `forget`. It holds the whole algorithm; a backend subclass
(`sqlite.SQLiteIdentityStore`, `redis.RedisIdentityStore`) implements only the storage
primitives (the `_`-prefixed abstract methods below) and `_atomically`, which runs one batch
as one atomic transaction: SQLite with `BEGIN IMMEDIATE`, Redis by buffering the batch's writes
and applying them with a compare-and-set on a version key (retrying the batch if another
process committed first). Either way a batch's unions are atomic even when they span keys and
processes, and a retried batch meets the decision recorded for each messageId and changes
nothing.

The model:
- a node per identifier (type, normalised value);
- a profile is a set of nodes; profiles are named by their *founders*: the identifiers that
  created them (`p_` + hash of the founder), and a profile's id is the smallest founder id in it,
  so a union keeps the smaller id (the survivor) and replays give the same ids; a split can
  rename two founders (they swap ids, recorded as governance like the separations) so that the
  part marketers know, the one holding the user id or most identifiers, keeps the id;
- every accepted event adds a *link set* (its identifiers that ended in one profile); profiles
  are the connected components of the link sets, which is what a split re-derives.

Rules, applied to each event in order (`IdentityRules`):
1. blocked values (empty, null-like, test addresses, all-zero phones...) are ignored; an event
   carrying a forgotten (suppressed) identifier is not attributed at all, even if it was decided
   before (suppression is checked before the recorded decision);
2. the event's target is the profile of its highest-priority known, non-quarantined identifier
   (none if it has none: then its first new identifier founds a profile);
3. each other known identifier's profile is merged into the target unless the union would exceed
   a per-type maximum (a type limited to one can never hold two values) or cross a manual split:
   then the link is refused and recorded as a conflict. Re-homing: when the refusal is a clash of
   accounts (two user_ids), the event's target comes from an account, and the refused identifier
   is a non-account one (a cookie, a device) whose link sets hold no account, the identifier
   moves to the target: it had reached the other profile only through weaker evidence, such as
   a family's shared email;
4. each new identifier joins the target unless that exceeds its type's maximum; a refused one
   founds a profile of its own;
5. fan-out: an identifier whose partners (identifiers seen on events with it, within
   `quarantine_window_days` of event time) belonged, on those events, to profiles holding more
   than `quarantine_max_profiles` distinct accounts (identifiers of the types limited to one per
   profile: user_id, loyalty_id) is quarantined: recorded, it merges nothing any more, and its
   profile is re-derived from the link sets without it (the merges it caused are undone);
6. the event belongs to the profile of its highest-priority non-quarantined identifier.
"""
from __future__ import annotations

import abc
import dataclasses
import json
from typing import Callable, Dict, FrozenSet, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple, TypeVar

from cdpflow.core.identity.rules import (BLOCKED, OK, SUPPRESSED, Decision, IdentityRules, key_identifier,
                                             node_key)
from cdpflow.schemas.records import Identifier

T = TypeVar("T")
# A node as backends return it: (type, value, owner, founder, quarantined, first_seen, last_seen).
NodeRow = Tuple[str, str, str, int, int, int, int]
Event = Tuple[str, int, Sequence[Identifier]]
SEPARATION, SUPPRESSION, NAME = "separation", "suppression", "name"
Held = Tuple[FrozenSet[str], FrozenSet[str], FrozenSet[str]]  # separation, suppression and name items


def separation_item(left: Identifier, right: Identifier) -> str:
    """How a store holds a separation: the two node keys, sorted, as JSON (one item per pair)."""
    return json.dumps(sorted([node_key(tuple(left)), node_key(tuple(right))]))


def name_item(identifier: Identifier, profile_id: str, at: int) -> str:
    """How a store holds a name a split gave a founder: [node key, profile id, recorded at µs] as JSON."""
    return json.dumps([node_key(tuple(identifier)), profile_id, int(at)])


def _name_of_item(item: str) -> Tuple[Identifier, str, int]:
    key, pid, at = json.loads(item)
    return key_identifier(key), pid, at


def _with_held(rules: IdentityRules, held: Held) -> IdentityRules:
    separations, hashes, names = held
    if not separations and not hashes and not names:
        return rules
    pairs = frozenset(tuple(key_identifier(k) for k in json.loads(item)) for item in separations)
    return dataclasses.replace(rules, separations=rules.separations | pairs, suppressed=rules.suppressed | hashes,
                               names=rules.names | frozenset(_name_of_item(i) for i in names))


class SplitOutcome(NamedTuple):
    """What a split did: `epoch` and `moves` as `resolve_batch_with_moves` reports them (a repeat
    of a command already applied gets the moves it made then in `replayed`), the separations it
    recorded, the profiles the split profile now consists of (empty: nothing to split), and the
    names it gave founders (identifier, profile id, at) so the part marketers know keeps its id."""

    epoch: int
    moves: Dict[str, str]
    replayed: List[Tuple[int, str, str]]
    separations: List[Tuple[Identifier, Identifier]]
    profiles: List[str]
    names: List[Tuple[Identifier, str, int]] = []


class IdentityStore(abc.ABC):
    """The identity graph: the algorithm here, the storage in a backend subclass.

    Args:
      rules: merge protection and governance (`cdpflow.core.governance.identity_rules`).
      worker: recorded with each decision (the process id by default), so tests can tell who worked.
    """

    uri: str = ""

    def __init__(self, rules: IdentityRules, worker: int):
        # Governance the store itself holds (separations and forgotten identifiers written by a
        # split or a forget on any path), read at the start of every batch: every worker of a
        # running stream honours it from its next batch on, not when it next re-reads the
        # warehouse. `rules` is what the caller gave plus what the store holds.
        self._held: Held = (frozenset(), frozenset(), frozenset())
        self.rules = rules
        self.worker = worker
        self._changed: Set[str] = set()  # profile ids (founders) whose root the open batch changed
        self.replayed_moves: List[Tuple[int, str, str]] = []

    @property
    def rules(self) -> IdentityRules:
        return self._rules

    @rules.setter
    def rules(self, rules: IdentityRules) -> None:
        self._given_rules = rules
        self._rules = _with_held(rules, self._held)

    def close(self) -> None:
        """Releases the connection."""

    # ================================================================ storage primitives
    # Every one runs inside `_atomically` when it writes; reads see the open batch's writes.
    @abc.abstractmethod
    def _atomically(self, work: Callable[[], T]) -> T:
        """Runs `work` as one atomic, isolated transaction (retrying it if the backend must)."""

    @abc.abstractmethod
    def _get_node(self, key: str) -> Optional[NodeRow]: ...

    @abc.abstractmethod
    def _insert_node(self, key: str, owner: str, founder: int, ts: int) -> None: ...

    @abc.abstractmethod
    def _touch_node(self, key: str, ts: int) -> None:
        """first_seen = min(first_seen, ts), last_seen = max(last_seen, ts)."""

    @abc.abstractmethod
    def _set_node_flag(self, key: str, name: str, value: int) -> None:
        """Sets `founder` or `quarantined`."""

    @abc.abstractmethod
    def _set_node_owner(self, key: str, owner: str) -> None: ...

    @abc.abstractmethod
    def _delete_node(self, key: str) -> None: ...

    @abc.abstractmethod
    def _keys_of_owner(self, pid: str) -> List[str]: ...

    @abc.abstractmethod
    def _all_nodes(self) -> Iterable[Tuple[str, NodeRow]]:
        """(key, node) of every node, outside any batch (read-outs)."""

    @abc.abstractmethod
    def _profile_root(self, pid: str) -> Optional[str]: ...

    @abc.abstractmethod
    def _put_profile(self, pid: str, root: str, founder_key: str) -> None:
        """Inserts or replaces a founder's profile row."""

    @abc.abstractmethod
    def _set_profile_root(self, pid: str, root: str) -> None: ...

    @abc.abstractmethod
    def _pids_of_root(self, root: str) -> List[str]: ...

    @abc.abstractmethod
    def _delete_profile(self, pid: str) -> None: ...

    def _account_keys(self, root: str, account_types: FrozenSet[str]) -> List[str]:
        """Node keys of these types in the profile `root` (the accounts fan-out counts)."""
        return [k for pid in self._pids_of_root(root) for k in self._keys_of_owner(pid)
                if k.split("\x00", 1)[0] in account_types]

    def _reroot(self, absorbed: str, survivor: str) -> None:
        """Every founder whose root is `absorbed` now has root `survivor`."""
        for pid in self._pids_of_root(absorbed):
            self._set_profile_root(pid, survivor)

    @abc.abstractmethod
    def _count(self, root: str, id_type: str) -> int: ...

    @abc.abstractmethod
    def _bump(self, root: str, id_type: str, n: int = 1) -> None: ...

    @abc.abstractmethod
    def _counts_of(self, root: str) -> Dict[str, int]: ...

    @abc.abstractmethod
    def _delete_counts(self, root: str) -> None: ...

    @abc.abstractmethod
    def _linksets_of(self, key: str) -> List[str]:
        """The link sets (JSON lists of node keys) holding this node, sorted."""

    @abc.abstractmethod
    def _linkset_origin(self, text: str) -> Optional[Tuple[str, int]]:
        """(message_id, ts) of the event that first made this link set."""

    @abc.abstractmethod
    def _add_linkset(self, text: str, message_id: str, ts: int) -> bool:
        """Records a link set unless it exists; True if it was new."""

    @abc.abstractmethod
    def _delete_linkset(self, text: str) -> None: ...

    @abc.abstractmethod
    def _decision(self, message_id: str) -> Optional[Tuple[str, Optional[str], Optional[str]]]:
        """(status, key, profile when decided) of a decided event."""

    @abc.abstractmethod
    def _put_decision(self, message_id: str, status: str, key: Optional[str], profile: Optional[str]) -> None:
        """Records (or replaces) the decision of an event, with this store's worker id."""

    @abc.abstractmethod
    def _decided_keys(self, message_ids: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
        """(status, key) of those of these events that were decided, outside any batch."""

    @abc.abstractmethod
    def _delete_decisions_of_key(self, key: str) -> None: ...

    @abc.abstractmethod
    def _decisions_per_worker(self) -> Dict[int, int]: ...

    @abc.abstractmethod
    def _add_merge(self, survivor: str, absorbed: str, cause: str, reason: str, ts: int) -> None: ...

    @abc.abstractmethod
    def _open_merges_by_survivors(self, pids: Sequence[str]) -> List[Tuple[int, str, str]]:
        """(seq, survivor, absorbed) of merges not undone whose survivor is one of these."""

    @abc.abstractmethod
    def _undo_merge(self, seq: int, ts: int, by: str) -> None: ...

    @abc.abstractmethod
    def _all_merges(self) -> List[Tuple]:
        """(survivor, absorbed, cause, reason, ts, undone_at, undone_by) in the order they were made."""

    @abc.abstractmethod
    def _delete_merges_of(self, pid: str) -> None: ...

    @abc.abstractmethod
    def _add_conflict(self, identifier: Identifier, profiles: List[str], rule: str, cause: str, ts: int) -> None: ...

    @abc.abstractmethod
    def _all_conflicts(self) -> List[Tuple]:
        """(type, value, profiles (list), rule, cause, ts) in the order they were recorded."""

    @abc.abstractmethod
    def _delete_conflicts(self, identifiers: Sequence[Identifier], pids: Sequence[str]) -> None:
        """Deletes the conflicts about these identifiers, or naming one of these profiles."""

    @abc.abstractmethod
    def _meta(self, name: str) -> Optional[int]: ...

    @abc.abstractmethod
    def _set_meta(self, name: str, value: int) -> None: ...

    @abc.abstractmethod
    def _record_moves(self, epoch: int, moves: Dict[str, str]) -> None: ...

    @abc.abstractmethod
    def _moves_of(self, epoch: int) -> List[Tuple[str, str]]: ...

    @abc.abstractmethod
    def _record_decided_in(self, message_ids: Sequence[str], epoch: int) -> None:
        """Records the epoch of the batch that decided these events (keeping an earlier one)."""

    @abc.abstractmethod
    def _decided_epochs(self, message_ids: Sequence[str]) -> Dict[str, int]: ...

    @abc.abstractmethod
    def _delete_moves_of_key(self, key: str) -> None: ...

    @abc.abstractmethod
    def _fanout_upsert(self, rows: Sequence[Tuple[str, str, int]]) -> None:
        """(key, account, ts): first_ts = min, last_ts = max per (key, account)."""

    @abc.abstractmethod
    def _fanout_accounts(self, key: str, low: int, high: int) -> List[str]:
        """Accounts seen with `key` whose [first_ts, last_ts] overlaps [low, high]."""

    @abc.abstractmethod
    def _delete_fanout_of(self, key: str) -> None:
        """Deletes the fan-out rows of this node, as an identifier and as an account."""

    @abc.abstractmethod
    def _governance_items(self, kind: str) -> Set[str]:
        """What the store holds of one kind of governance: `separation` (a JSON pair of node
        keys, sorted), `suppression` (a forgotten identifier's keyed hash) or `name` (`name_item`)."""

    @abc.abstractmethod
    def _add_governance_item(self, kind: str, item: str) -> None: ...

    @abc.abstractmethod
    def _delete_governance_item(self, kind: str, item: str) -> None: ...

    def _prefetch(self, events: Sequence[Event]) -> None:
        """Inside a batch, before it resolves: a backend may read ahead what the batch will read."""

    # ================================================================ derived reads
    def _node(self, key: str):
        row = self._get_node(key)
        return None if row is None else (row[2], row[4])

    def _root(self, key: str) -> str:
        return self._profile_root(self._get_node(key)[2])

    def _root_if_known(self, identifier: Identifier) -> Optional[str]:
        row = self._get_node(node_key(identifier))
        return self._profile_root(row[2]) if row else None

    def _root_of_pid(self, pid: str) -> str:
        return self._profile_root(pid)

    # ================================================================ the algorithm
    def _conflict(self, identifier: Identifier, profiles: Iterable[str], rule: str, cause: str, ts: int):
        self._add_conflict(identifier, sorted(set(profiles)), rule, cause, ts)

    def _found(self, identifier: Identifier, ts: int) -> str:
        pid = self.rules.profile_id(identifier)
        key = node_key(identifier)
        self._put_profile(pid, pid, key)
        self._insert_node(key, pid, 1, ts)
        self._bump(pid, identifier[0])
        return pid

    def _separated(self, left_root: str, right_root: str) -> bool:
        for a, b in self.rules.separations:
            ra, rb = self._root_if_known(a), self._root_if_known(b)
            if ra and rb and {ra, rb} == {left_root, right_root}:
                return True
        return False

    def _merge_refusal(self, target: str, other: str) -> Optional[str]:
        for id_type in self.rules.priority + tuple(sorted(set(self.rules.max_per_profile) - set(self.rules.priority))):
            limit = self.rules.limit(id_type)
            if limit is not None and self._count(target, id_type) + self._count(other, id_type) > limit:
                return f"max_per_profile:{id_type}"
        if self.rules.separations and self._separated(target, other):
            return "manual_split"
        return None

    def _attach_refusal(self, target: str, identifier: Identifier) -> Optional[str]:
        limit = self.rules.limit(identifier[0])
        if limit is not None and self._count(target, identifier[0]) + 1 > limit:
            return f"max_per_profile:{identifier[0]}"
        for a, b in self.rules.separations:
            other = b if a == identifier else a if b == identifier else None
            if other is not None and self._root_if_known(other) == target:
                return "manual_split"
        return None

    def _account_clash(self, target: str, other: str) -> bool:
        return any(self._count(target, t) + self._count(other, t) > self.rules.limit(t) for t in self.rules.account_types)

    def _may_rehome(self, identifier: Identifier, target: str, other: str) -> bool:
        # A cookie or device that reached another account's profile only through non-account
        # evidence (typically a shared family email) moves to the account it is now seen with.
        if identifier[0] in self.rules.account_types or not self._account_clash(target, other):
            return False
        key = node_key(identifier)
        return not any(k != key and k.split("\x00", 1)[0] in self.rules.account_types
                       for text in self._linksets_of(key) for k in json.loads(text))

    def _rehome(self, identifier: Identifier, other: str, target: str, message_id: str, ts: int) -> str:
        """Moves an identifier out of `other` (re-deriving it without the identifier's links) into `target`."""
        key = node_key(identifier)
        for text in self._linksets_of(key):
            first = self._linkset_origin(text)
            self._delete_linkset(text)
            rest = [k for k in json.loads(text) if k != key]
            if len(rest) > 1:
                self._add_linkset(json.dumps(rest), first[0], first[1])
        self.split_profile(other, message_id, ts, f"rehoming of {identifier[0]}")
        own = self._root(key)
        refusal = self._merge_refusal(target, own)
        if refusal:
            self._conflict(identifier, (target, own), refusal, message_id, ts)
            return target
        survivor, absorbed = min(target, own), max(target, own)
        self._union(survivor, absorbed)
        self._add_merge(survivor, absorbed, message_id, f"rehomed {identifier[0]} from {other}", ts)
        return survivor

    def _union(self, survivor: str, absorbed: str):
        # Flattened union-find: every founder points straight at its root, so a find is one
        # read; a union rewrites the absorbed profile's founders (few per profile).
        self._changed.update(self._pids_of_root(absorbed))
        self._reroot(absorbed, survivor)
        for id_type, n in self._counts_of(absorbed).items():
            self._bump(survivor, id_type, n)
        self._delete_counts(absorbed)

    # ---------------------------------------------------------------- resolution
    def resolve_batch(self, events: Iterable[Event]) -> List[Decision]:
        """Resolves events (message_id, event time in UTC microseconds, identifiers) in the order given, atomically.

        Returns:
          One Decision per event; an event already decided gets its recorded decision back.
        """
        return self.resolve_batch_with_moves(events, record=False)[0]

    def resolve_batch_with_moves(self, events: Iterable[Event], record: bool = True
                                 ) -> Tuple[List[Decision], int, Dict[str, str]]:
        """`resolve_batch`, and what a stream needs to move feature state with the profiles.

        Returns:
          (decisions, epoch, moves): `epoch` counts the batches (of any worker) that merged or
          split profiles, so later is larger; the decisions were taken at `epoch - 1` or, if
          this batch moved nothing, at `epoch`; `moves` maps the node key of every identifier
          whose profile this batch changed to its profile after the batch (at `epoch`).
          After the call, `replayed_moves` lists (epoch, node key, profile) of the moves that
          earlier batches deciding some of these same events made: a retried bundle repeats them.
          `record=False` (batch runs, which read final profiles instead) keeps no such record.
        """
        events = list(events)

        def work():
            self._changed = set()
            self._sync_governance()
            self._prefetch(events)
            earlier = self._decided_epochs([m for m, _, _ in events]) if record else {}
            decisions = [self._resolve(message_id, ts, identifiers) for message_id, ts, identifiers in events]
            epoch, moves = self._close_epoch(record)
            if moves and record:
                self._record_decided_in([m for m, _, _ in events if m not in earlier], epoch)
            # A retried bundle (its outputs were lost with it) must tell the stream again about
            # the moves its events caused the first time; an older epoch is harmless to repeat.
            replayed = [(e, k, p) for e in sorted(set(earlier.values())) for k, p in self._moves_of(e)]
            return decisions, epoch, moves, replayed

        try:
            decisions, epoch, moves, replayed = self._atomically(work)
        finally:
            self._changed = set()
        self.replayed_moves = replayed
        return decisions, epoch, moves

    def _held_now(self) -> Held:
        return tuple(frozenset(self._governance_items(kind)) for kind in (SEPARATION, SUPPRESSION, NAME))

    def _sync_governance(self) -> None:
        """Inside a batch: takes up the separations, suppressions and names the store holds now."""
        held = self._held_now()
        if held != self._held:
            self._held = held
            self._rules = _with_held(self._given_rules, held)

    def _close_epoch(self, record: bool) -> Tuple[int, Dict[str, str]]:
        """Inside a batch, at its end: a new epoch if it changed profiles, and every moved node's profile."""
        epoch = self._meta("epoch") or 0
        moves: Dict[str, str] = {}
        if self._changed:
            epoch += 1
            self._set_meta("epoch", epoch)
            for pid in sorted(self._changed):
                root = self._profile_root(pid)
                if root is None:
                    continue
                for key in self._keys_of_owner(pid):
                    moves[key] = root
            if record:
                self._record_moves(epoch, moves)
        return epoch, moves

    def resolve(self, message_id: str, ts: int, identifiers: Sequence[Identifier]) -> Decision:
        return self.resolve_batch([(message_id, ts, identifiers)])[0]

    def _resolve(self, message_id: str, ts: int, identifiers: Sequence[Identifier]) -> Decision:
        rules = self.rules
        # Suppression first, before any recorded decision: a person forgotten after their events
        # were decided must not come back through a retry or a replay of those events.
        if rules.is_suppressed(identifiers):
            # Recorded (replacing an older decision) so that read-outs by messageId answer too.
            self._put_decision(message_id, SUPPRESSED, None, None)
            return Decision(message_id, SUPPRESSED, None, None)
        row = self._decision(message_id)
        if row is not None:
            # Decided before (a retry, or a replay of accepted history): its profile is today's.
            return Decision(message_id, row[0], row[1], self._root(row[1]) if row[1] else None)
        ids = sorted({tuple(i) for i in identifiers if not rules.is_blocked(tuple(i))}, key=rules.rank)
        if not ids:
            return self._decide(message_id, BLOCKED, None, None)
        known, new, quarantined = [], [], set()
        for identifier in ids:
            node = self._node(node_key(identifier))
            if node is None:
                new.append(identifier)
            else:
                known.append(identifier)
                if node[1]:
                    quarantined.add(identifier)
                self._touch_node(node_key(identifier), ts)
        usable = [i for i in known if i not in quarantined]
        # A quarantined identifier attracts nothing: without a usable known identifier the event
        # founds a new profile from its new identifiers.
        lead = usable[0] if usable else None
        target = self._root(node_key(lead)) if lead else None
        others = usable[1:]
        refusal = (self._attach_refusal(target, new[0]) if lead and new and new[0][0] in self.rules.account_types
                   and self.rules.rank(new[0]) < self.rules.rank(lead) else None)
        if refusal:
            # The event's first identifier is a new account that cannot join the known profile
            # (which holds another account): it founds the event's profile, and the known
            # identifiers are asked to join it (and may be re-homed) like any other.
            own = self._found(new[0], ts)
            self._conflict(new[0], (target, own), refusal, message_id, ts)
            lead, target, new, others = new[0], own, new[1:], usable
        for identifier in others:
            other = self._root(node_key(identifier))
            if other == target:
                continue
            refusal = self._merge_refusal(target, other)
            if refusal:
                self._conflict(identifier, (target, other), refusal, message_id, ts)
                if lead[0] in self.rules.account_types and self._may_rehome(identifier, target, other):
                    target = self._rehome(identifier, other, target, message_id, ts)
                continue
            survivor, absorbed = min(target, other), max(target, other)
            bridge = sorted({i[0] for i in ids if i in known and self._root(node_key(i)) in (target, other)})
            self._union(survivor, absorbed)
            self._add_merge(survivor, absorbed, message_id, "shared " + "+".join(bridge), ts)
            target = survivor
        for identifier in new:
            if target is None:
                target = self._found(identifier, ts)
                continue
            refusal = self._attach_refusal(target, identifier)
            if refusal:
                own = self._found(identifier, ts)
                self._conflict(identifier, (target, own), refusal, message_id, ts)
                continue
            self._insert_node(node_key(identifier), target, 0, ts)
            self._bump(target, identifier[0])
        roots = {i: self._root(node_key(i)) for i in ids}
        members = [i for i in ids if roots[i] == target and i not in quarantined]
        if len(members) > 1:
            self._add_linkset(json.dumps([node_key(i) for i in members]), message_id, ts)
        self._fan_out(ids, roots, quarantined, message_id, ts)
        attributed = next((i for i in ids if not self._node(node_key(i))[1]), ids[0])
        return self._decide(message_id, OK, node_key(attributed), self._root(node_key(attributed)))

    def _decide(self, message_id, status, key, profile) -> Decision:
        self._put_decision(message_id, status, key, profile)
        return Decision(message_id, status, key, profile)

    # ---------------------------------------------------------------- fan-out quarantine
    def _fan_out(self, ids, roots, quarantined, message_id, ts):
        # What is counted are the *accounts* (identifiers of a type limited to one per profile:
        # user_id, loyalty_id) in the profiles of the identifiers seen with this one, as those
        # profiles stood on that event. Two accounts can never merge, so the count cannot collapse
        # when the identifier's own merges succeed, and a user id joining its own cookies counts
        # nothing. One row per (identifier, account) with the first and last time: in event-time
        # order "seen within the window" is "last seen at most a window ago", and the check
        # costs one read however many partners a shared device collects.
        account_types = frozenset(self.rules.account_types)
        if not account_types:
            return
        accounts_of = {root: self._account_keys(root, account_types) for root in set(roots.values())}
        rows = []
        for identifier in ids:
            if identifier in quarantined:
                continue
            key = node_key(identifier)
            for other in ids:
                if other != identifier:
                    rows.extend((key, account, ts) for account in accounts_of[roots[other]] if account != key)
        self._fanout_upsert(rows)
        window = self.rules.window_us
        for identifier in ids:
            key = node_key(identifier)
            if identifier in quarantined or self._node(key)[1]:
                continue
            accounts = self._fanout_accounts(key, ts - window, ts + window)
            if len(accounts) > self.rules.quarantine_max_profiles:
                profiles = {self._root(a) for a in accounts}
                self._quarantine(identifier, profiles, message_id, ts)

    def _quarantine(self, identifier: Identifier, seen: Set[str], message_id: str, ts: int):
        key = node_key(identifier)
        self._set_node_flag(key, "quarantined", 1)
        self._conflict(identifier, seen, "fan_out_quarantine", message_id, ts)
        self.split_profile(self._root(key), message_id, ts, f"quarantine of {identifier[0]}")

    def split_profile(self, root: str, cause: str, ts: int, why: str, record_refusals: bool = False) -> List[str]:
        """Re-derives one profile from its link sets (quarantined identifiers bridge nothing).

        The link sets are joined in event-time order (then messageId), as the events made them,
        and a join that would put two separated identifiers together is refused: so a profile
        split by hand ends as a sequential run with the separation in force from the start
        would have left it. `record_refusals` records each refused join as a `manual_split`
        conflict, as that run would have.

        Returns:
          The ids of the profiles it now consists of.
        """
        return self._rederive([root], cause, ts, why, record_refusals)

    def _rederive(self, roots: Sequence[str], cause: str, ts: int, why: str, record_refusals: bool = False,
                  rename_only: bool = False) -> List[str]:
        """`split_profile` over the profiles of several roots together. `rename_only` keeps each
        root's profile as it is and only names it (and owns its nodes) by its founders' names now:
        what a renaming needs, the two profiles whose founders swapped names at once."""
        root_of = {pid: root for root in roots for pid in self._pids_of_root(root)}
        founders = sorted(root_of)
        self._changed.update(founders)
        nodes = {k: self._get_node(k) for pid in founders for k in self._keys_of_owner(pid)}
        if rename_only:
            components: Dict[str, List[str]] = {root: [] for root in roots}
            for k in sorted(nodes):
                components[root_of[nodes[k][2]]].append(k)  # (a node's owner is a founder of its root)
            return self._name_components(roots, founders, nodes, components, [], cause, ts, why, False)
        parent = {k: k for k in nodes}
        members = {k: {k} for k in nodes}  # component root -> its node keys

        def find(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        separated = [(node_key(a), node_key(b)) for a, b in self.rules.separations]
        separated = [(a, b) for a, b in separated if a in nodes and b in nodes]

        def apart(a, b):
            return any((x in members[a] and y in members[b]) or (y in members[a] and x in members[b])
                       for x, y in separated)

        linksets = set()
        for key in nodes:
            linksets.update(self._linksets_of(key))
        ordered = []
        for text in linksets:
            message_id, made_at = self._linkset_origin(text) or ("", 0)
            ordered.append((made_at, message_id, text))
        refused = []
        for made_at, message_id, text in sorted(ordered):
            usable = [k for k in json.loads(text) if k in nodes and not nodes[k][4]]
            for k in usable[1:]:
                a, b = find(usable[0]), find(k)
                if a == b:
                    continue
                if separated and apart(a, b):
                    refused.append((k, usable[0], message_id, made_at))
                    continue
                low, high = min(a, b), max(a, b)
                parent[high] = low
                members[low] |= members.pop(high)
        components = {}
        for k in sorted(nodes):
            components.setdefault(find(k), []).append(k)
        return self._name_components(roots, founders, nodes, components, refused, cause, ts, why, record_refusals)

    def _name_components(self, roots, founders, nodes, components, refused, cause, ts, why, record_refusals
                         ) -> List[str]:
        """The end of `_rederive`: each component becomes a profile named by its founders' names."""
        for root in roots:
            self._delete_counts(root)
        new_roots, named = [], set()
        for keys in components.values():
            own_founders = [k for k in keys if nodes[k][3]]
            if not own_founders:
                promoted = min(keys, key=lambda k: self.rules.rank(key_identifier(k)))
                self._set_node_flag(promoted, "founder", 1)
                own_founders = [promoted]
            # A founder's profile id is its name (its hash unless a split renamed it).
            founder_pids = {self.rules.name_of_key(k): k for k in own_founders}
            new_root = min(founder_pids)
            new_roots.append(new_root)
            for p, k in sorted(founder_pids.items()):
                self._put_profile(p, new_root, k)
            named.update(founder_pids)
            self._changed.update(founder_pids)
            own_pid = {k: p for p, k in founder_pids.items()}
            for k in keys:
                # A founder is owned by its own id (also after a renaming); any other node by a
                # founder of its part.
                owner = own_pid.get(k, nodes[k][2] if nodes[k][2] in founder_pids else new_root)
                if nodes[k][2] != owner:
                    self._set_node_owner(k, owner)
                    self._changed.add(owner)
                self._bump(new_root, nodes[k][0])
        for pid in founders:
            if pid not in named:  # (a founder renamed away, its old id named by none)
                self._delete_profile(pid)
        for seq, survivor, absorbed in self._open_merges_by_survivors(founders):
            if self._root_of_pid(survivor) != self._root_of_pid(absorbed):
                self._undo_merge(seq, ts, f"{why} ({cause})")
        if record_refusals:
            for key, lead, message_id, made_at in refused:
                self._conflict(key_identifier(key), (self._root(key), self._root(lead)), "manual_split",
                               message_id, made_at)
        return sorted(new_roots)

    # ---------------------------------------------------------------- manual splits
    def separations(self) -> List[Tuple[Identifier, Identifier]]:
        """The separations the store holds (recorded by `split` or `separate`), as identifier pairs."""
        return sorted(tuple(key_identifier(k) for k in json.loads(item))
                      for item in self._governance_items(SEPARATION))

    def names(self) -> List[Tuple[Identifier, str, int]]:
        """The names splits gave founders that the store holds: (identifier, profile id, at)."""
        return sorted(_name_of_item(item) for item in self._governance_items(NAME))

    def separate(self, pairs: Iterable[Tuple[Identifier, Identifier]], cause: str, ts: int,
                 names: Iterable[Tuple[Identifier, str, int]] = ()) -> SplitOutcome:
        """Keeps each pair of identifiers apart from now on, splitting any profile that holds both,
        and gives founders the names a split gave them (renaming the profiles they found).

        For separations and names recorded elsewhere (the warehouse's, by `cdpflow identity
        split`) that a store kept across runs has not applied yet. What the store holds already
        changes nothing.
        """
        items = sorted({separation_item(a, b) for a, b in pairs})
        named = sorted({name_item(i, pid, at) for i, pid, at in names})

        def work():
            self._changed = set()
            self._sync_governance()
            return self._separate_now(items, cause, ts, named)

        try:
            return self._atomically(work)
        finally:
            self._changed = set()

    def split(self, reference, command_id: str, ts: int, merge: Optional[str] = None) -> SplitOutcome:
        """Undoes the merges that made a profile, as `cdpflow identity split` does, on the live graph.

        Each merge into the profile (or only the one that absorbed `merge`) becomes a separation
        of the two founders' identifiers, held by the store and so honoured by every worker's
        next batch; the profile is re-derived with them in force (`split_profile`). Idempotent by
        `command_id`: the stream and the loader both apply a split read from `cdp.control`, and
        whichever comes second gets the first one's moves back in `replayed`.

        Args:
          reference: a profile id (founder or survivor), or an identifier (type, normalised value).
          command_id: the command's id (`cdpflow.core.control.command_id`).
          ts: when the split is made (UTC µs).
          merge: undo only the merge that absorbed this profile id.
        """
        def work():
            self._changed = set()
            self._sync_governance()
            done = self._meta("command:" + command_id)
            if done is not None:
                replayed = [(done, k, p) for k, p in self._moves_of(done)] if done else []
                return SplitOutcome(self._meta("epoch") or 0, {}, replayed, [], [])
            root = self._reference_root(reference)
            pairs = []
            if root is not None:
                founders = self._pids_of_root(root)
                founder_key = {}
                for pid in founders:
                    for key in self._keys_of_owner(pid):
                        if self.rules.name_of_key(key) == pid:
                            founder_key[pid] = key
                for _, survivor, absorbed in self._open_merges_by_survivors(founders):
                    if merge in (None, absorbed) and survivor in founder_key and absorbed in founder_key:
                        pairs.append((key_identifier(founder_key[survivor]), key_identifier(founder_key[absorbed])))
            items = sorted({separation_item(a, b) for a, b in pairs})
            new = [i for i in items if i not in self._held[0]]
            cause = f"split {command_id}"
            profiles = self._apply_separations(new, cause, ts)
            names = self._keep_known_id(root, profiles, cause, ts) if profiles else []
            epoch, moves = self._close_epoch(True)
            self._set_meta("command:" + command_id, epoch if moves else 0)
            return SplitOutcome(epoch, moves, [], [tuple(key_identifier(k) for k in json.loads(i)) for i in new],
                                profiles, names)

        try:
            outcome = self._atomically(work)
        finally:
            self._changed = set()
        self.replayed_moves = outcome.replayed
        return outcome

    def _separate_now(self, items: Sequence[str], cause: str, ts: int, names: Sequence[str] = ()) -> SplitOutcome:
        """Inside a batch (governance synced): applies the separations and names the store does
        not hold yet and closes the epoch."""
        new = [i for i in items if i not in self._held[0]]
        profiles = self._apply_separations(new, cause, ts)
        new_names = [i for i in names if i not in self._held[2]]
        if new_names:
            profiles = sorted(set(profiles) | set(self._apply_names(new_names, cause, ts)))
        epoch, moves = self._close_epoch(True)
        return SplitOutcome(epoch, moves, [], [tuple(key_identifier(k) for k in json.loads(i)) for i in new], profiles,
                            [_name_of_item(i) for i in new_names])

    def _apply_names(self, items: Sequence[str], cause: str, ts: int) -> List[str]:
        """Inside a batch: records names and re-derives the profiles of the founders they name
        together (a swap renames two profiles at once); returns those profiles' ids now."""
        for item in items:
            self._add_governance_item(NAME, item)
        self._sync_governance()
        roots = sorted({self._root(key) for key in (json.loads(i)[0] for i in items) if self._get_node(key) is not None})
        return self._rederive(roots, cause, ts, "naming after a split", rename_only=True) if roots else []

    def _keep_known_id(self, old_id: str, parts: Sequence[str], cause: str, ts: int) -> List[Tuple[Identifier, str, int]]:
        """Inside a split, after it: the part marketers know keeps the id the profile had.

        That is the part holding a user id, else the one holding most identifiers (on a tie,
        the part that has the id already). The id belongs to whichever part holds the founder
        it hashes from, so when another part is the keeper the two founders swap names: the
        keeper's founder takes `old_id`, the other part's founder the keeper's id. The names
        are governance like the separations (held by the store, recorded in the warehouse), so
        every path and every later re-derivation gives the parts the same ids.
        """
        if old_id not in parts or len(parts) < 2:
            return []

        def weight(part):
            counts = self._counts_of(part)
            return counts.get("user_id", 0) > 0, sum(counts.values()), part == old_id

        keeper = max(parts, key=weight)
        if keeper == old_id:
            return []
        founder_of = {}
        for part in (old_id, keeper):
            for key in self._keys_of_owner(part):
                if self.rules.name_of_key(key) == part and self._get_node(key)[3]:
                    founder_of[part] = key
        if len(founder_of) < 2:
            return []
        names = [(key_identifier(founder_of[old_id]), keeper, ts), (key_identifier(founder_of[keeper]), old_id, ts)]
        self._apply_names([name_item(*n) for n in names], cause, ts)
        return names

    def _reference_root(self, reference) -> Optional[str]:
        if isinstance(reference, str):
            root = self._profile_root(reference)
            if root is None:
                # an absorbed profile's id names its survivor, as in the warehouse
                for row in self._all_merges():  # (survivor, absorbed, ..., undone_at, undone_by)
                    if row[1] == reference and row[5] is None:
                        root = self._profile_root(row[0])
            return root
        return self._root_if_known(tuple(reference))

    def _apply_separations(self, items: Sequence[str], cause: str, ts: int) -> List[str]:
        """Inside a batch: records new separations and splits each profile that holds both of a pair."""
        for item in items:
            self._add_governance_item(SEPARATION, item)
        if not items:
            return []
        self._sync_governance()
        profiles: Set[str] = set()
        for item in items:
            left, right = json.loads(item)
            if self._get_node(left) is None or self._get_node(right) is None:
                continue
            root = self._root(left)
            if root == self._root(right):  # (an earlier pair's split may have parted them already)
                parts = self.split_profile(root, cause, ts, "manual split", record_refusals=True)
                profiles.difference_update({root})
                profiles.update(parts)
        return sorted(profiles)

    # ---------------------------------------------------------------- governance
    def forget(self, identifiers: Iterable[Identifier], hashes: Iterable[str] = ()) -> int:
        """Removes every trace of the profiles holding these identifiers; returns the identifiers removed.

        Nodes, founders, counts, link sets, decisions of the events attributed to them, merges,
        conflicts, fan-out rows, recorded moves and the separations and names that hold their
        identifiers all go, in one transaction. Their events, if
        replayed, meet the suppression check and are not attributed: the caller records the
        hashes in the warehouse, and `hashes` (the same keyed hashes) are kept by the store too,
        so every worker resolving against it refuses the person from its next batch on.
        """
        wanted = [node_key(tuple(i)) for i in identifiers]
        hashes = sorted(set(hashes))

        def work():
            for digest in hashes:
                self._add_governance_item(SUPPRESSION, digest)
            roots = {self._root(k) for k in wanted if self._get_node(k) is not None}
            pids = [pid for root in sorted(roots) for pid in self._pids_of_root(root)]
            keys = set(wanted)
            for pid in pids:
                keys.update(self._keys_of_owner(pid))
            present = [k for k in keys if self._get_node(k) is not None]
            for key in sorted(keys):
                for text in self._linksets_of(key):
                    self._delete_linkset(text)
                self._delete_decisions_of_key(key)
                self._delete_fanout_of(key)
                self._delete_moves_of_key(key)
            self._delete_conflicts([key_identifier(k) for k in keys], pids)
            for key in sorted(keys):
                if self._get_node(key) is not None:
                    self._delete_node(key)
            for pid in pids:
                self._delete_merges_of(pid)
                self._delete_profile(pid)
            for root in roots:
                self._delete_counts(root)
            # Separations and names hold identifiers in the clear: theirs go too (the hashes
            # keep the person out, so there is nothing left for them to keep apart or name).
            for kind, keys_of in ((SEPARATION, json.loads), (NAME, lambda i: json.loads(i)[:1])):
                for item in self._governance_items(kind):
                    if keys.intersection(keys_of(item)):
                        self._delete_governance_item(kind, item)
            return len(present)

        return self._atomically(work)

    def purge(self, rules: IdentityRules) -> int:
        """Forgets every profile holding an identifier the rules suppress (for a store older than a forget)."""
        hit = [key_identifier(k) for k, _ in self._all_nodes() if rules.is_suppressed([key_identifier(k)])]
        return self.forget(hit) if hit else 0

    def governed_rules(self) -> IdentityRules:
        """The store's rules with the separations and forgotten hashes it holds now (for readers
        outside a batch, such as the sidecar, that must honour a forget made while they run)."""
        return _with_held(self._given_rules, self._held_now())

    def warehouse_version(self) -> Optional[int]:
        """The warehouse version this store was last made to agree with (None: never stamped)."""
        return self._meta("warehouse_version")

    def stamp_warehouse_version(self, version: int) -> None:
        """Records that the store agrees with this warehouse version (after a commit or a forget)."""
        self._atomically(lambda: self._set_meta("warehouse_version", int(version)))

    # ---------------------------------------------------------------- read-outs
    def is_empty(self) -> bool:
        """True if the store holds no identifier and no decision."""
        return not list(self._all_nodes()) and not self.workers()

    def identifier_count(self, profile_id: str) -> int:
        """How many identifiers the profile holds now (0 for one that does not exist)."""
        return sum(self._counts_of(profile_id).values())

    def profile_of(self, identifier: Identifier) -> Optional[str]:
        return self._root_if_known(tuple(identifier))

    def final_profiles(self, message_ids: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
        """(status, current profile) of many decided events."""
        decided = self._decided_keys(list(message_ids))
        missing = [m for m in message_ids if m not in decided]
        if missing:
            raise KeyError(f"no identity decision for messages {missing[:5]}")
        roots: Dict[str, Optional[str]] = {}
        found = {}
        for mid, (status, key) in decided.items():
            if key is not None and key not in roots:
                row = self._get_node(key)
                roots[key] = self._profile_root(row[2]) if row else None
            found[mid] = (status, roots.get(key) if key is not None else None)
        return found

    def current_profiles(self, message_ids: Sequence[str]) -> Dict[str, Optional[str]]:
        """The current profile of each decided event (an undecided one is left out; None: not attributed)."""
        decided = set(self._decided_keys(list(message_ids)))
        return {m: pid for m, (_, pid) in self.final_profiles([m for m in message_ids if m in decided]).items()}

    def links(self) -> List[Dict]:
        rows = sorted((n[0], n[1], self._profile_root(n[2]), n[5], n[6], n[4]) for _, n in self._all_nodes())
        return [dict(zip(("identifier_type", "identifier_value", "profile_id", "first_seen", "last_seen", "quarantined"), r))
                for r in rows]

    def merges(self) -> List[Dict]:
        return [dict(zip(("survivor_id", "absorbed_id", "cause_message_id", "reason", "merged_at", "undone_at", "undone_by"), r))
                for r in self._all_merges()]

    def conflicts(self) -> List[Dict]:
        return [{"identifier_type": t, "identifier_value": v, "profiles": list(p), "rule": rule,
                 "cause_message_id": cause, "event_time": ts}
                for t, v, p, rule, cause, ts in self._all_conflicts()]

    def partition(self) -> Set[FrozenSet[Identifier]]:
        """The profiles as sets of identifiers (how runs are compared)."""
        groups: Dict[str, Set[Identifier]] = {}
        for link in self.links():
            groups.setdefault(link["profile_id"], set()).add((link["identifier_type"], link["identifier_value"]))
        return {frozenset(g) for g in groups.values()}

    def workers(self) -> Dict[int, int]:
        """Decisions per worker process id."""
        return self._decisions_per_worker()
