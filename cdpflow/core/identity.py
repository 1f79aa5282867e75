"""Identity resolution: the identity graph, its merge-protection rules, and the store it lives in.

The graph lives in one SQLite database (WAL mode) that every worker process opens: a file beside
the warehouse for the embedded demo and batch runs, `:memory:` for tests and the reference. Each
call to `IdentityStore.resolve_batch` is one `BEGIN IMMEDIATE` transaction, so the unions a
batch makes are atomic even when they span keys and workers, and a retried bundle sees the
decision recorded for each messageId and changes nothing (idempotent). docs/identity.md says how
the same design moves to Redis (Lua scripts) for a cluster.

The model:
- a node per identifier (type, normalised value);
- a profile is a set of nodes; profiles are named by their *founders*: the identifiers that
  created them (`p_` + hash of the founder), and a profile's id is the smallest founder id in it,
  so a union keeps the smaller id (the survivor) and replays give the same ids;
- every accepted event adds a *link set* (its identifiers that ended in one profile); profiles
  are the connected components of the link sets, which is what a split re-derives.

Rules, applied to each event in order (`IdentityRules`):
1. blocked values (empty, null-like, test addresses, all-zero phones...) are ignored; an event
   carrying a forgotten (suppressed) identifier is not attributed at all;
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

import hashlib
import json
import os
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Dict, FrozenSet, Iterable, List, Mapping, NamedTuple, Optional, Sequence, Set, Tuple

from cdpflow.schemas.records import Identifier

DEFAULT_PRIORITY = ("user_id", "email", "phone", "loyalty_id", "device_id", "anonymous_id")
DEFAULT_LIMITS = {"user_id": 1, "email": 5, "phone": 5, "loyalty_id": 1, "device_id": 20, "anonymous_id": 100}
NULL_LIKE = r"(?i)^(null|none|nil|undefined|unknown|n/?a|-|0|test|anonymous|\[object object\])$"
DEFAULT_BLOCKED = {
    "*": [NULL_LIKE],
    "email": [r"(?i)^(test|noreply|no-reply|donotreply|example|none|null)@", r"(?i)@(example\.(com|org|net)|test\.com|mailinator\.com)$"],
    "phone": [r"^\+?\d?0{6,}$", r"^\+?1?(\d)\1{9}$"],
}

US_PER_DAY = 86_400 * 1_000_000

OK, SUPPRESSED, BLOCKED = "ok", "suppressed", "blocked"


def node_key(identifier: Identifier) -> str:
    return f"{identifier[0]}\x00{identifier[1]}"


def key_identifier(key: str) -> Identifier:
    id_type, value = key.split("\x00", 1)
    return id_type, value


def profile_id_for(identifier: Identifier) -> str:
    """The deterministic id of a profile founded by this identifier."""
    digest = hashlib.sha256(node_key(identifier).encode("utf-8")).hexdigest()
    return "p_" + digest[:20]


def identifier_hash(identifier: Identifier, key=None) -> str:
    """How a forgotten identifier is remembered: only as a hash, so that it can be recognised, not read.

    Args:
      key: a `cdpflow.core.governance.SuppressionKey` (default: the legacy constant salt).
    """
    from cdpflow.core.governance import LEGACY_KEY
    return (key or LEGACY_KEY).hash(tuple(identifier))


@dataclass(frozen=True)
class IdentityRules:
    """Merge protection. Build with `from_config` from the `identity` section of the configuration."""

    priority: Tuple[str, ...] = DEFAULT_PRIORITY
    max_per_profile: Mapping[str, int] = field(default_factory=lambda: dict(DEFAULT_LIMITS))
    blocked: Mapping[str, Sequence[str]] = field(default_factory=lambda: dict(DEFAULT_BLOCKED))
    quarantine_max_profiles: int = 3
    quarantine_window_days: float = 90
    separations: FrozenSet[Tuple[Identifier, Identifier]] = frozenset()
    suppressed: FrozenSet[str] = frozenset()  # identifier_hash values
    suppression_keys: Tuple = ()  # SuppressionKeys the hashes were made with (default: the legacy salt)

    @classmethod
    def from_config(cls, section: Optional[Mapping] = None, separations=(), suppressed=(),
                    suppression_keys: Tuple = ()) -> "IdentityRules":
        section = dict(section or {})
        quarantine = section.get("quarantine") or {}
        return cls(
            priority=tuple(section.get("priority") or DEFAULT_PRIORITY),
            # null in the configuration lifts a default limit
            max_per_profile={t: n for t, n in {**DEFAULT_LIMITS, **(section.get("max_per_profile") or {})}.items()
                             if n is not None},
            blocked={**DEFAULT_BLOCKED, **(section.get("blocked") or {})},
            quarantine_max_profiles=int(quarantine.get("max_profiles", 3)),
            quarantine_window_days=float(quarantine.get("window_days", 90)),
            separations=frozenset((tuple(a), tuple(b)) for a, b in separations),
            suppressed=frozenset(suppressed),
            suppression_keys=tuple(suppression_keys),
        )

    def __post_init__(self):
        if not self.suppression_keys:
            from cdpflow.core.governance import LEGACY_KEY
            object.__setattr__(self, "suppression_keys", (LEGACY_KEY,))
        compiled = {t: [re.compile(p) for p in patterns] for t, patterns in self.blocked.items()}
        object.__setattr__(self, "_blocked", compiled)
        object.__setattr__(self, "_rank", {t: i for i, t in enumerate(self.priority)})

    def rank(self, identifier: Identifier):
        """Sort key: priority of the type, then type and value (a total, deterministic order)."""
        return self._rank.get(identifier[0], len(self._rank)), identifier[0], identifier[1]

    def is_blocked(self, identifier: Identifier) -> bool:
        value = identifier[1]
        for pattern in self._blocked.get("*", []) + self._blocked.get(identifier[0], []):
            if pattern.search(value):
                return True
        return False

    def is_suppressed(self, identifiers: Iterable[Identifier]) -> bool:
        """True if any of the identifiers was forgotten (its hash under any known key is suppressed)."""
        if not self.suppressed:
            return False
        return any(key.hash(tuple(i)) in self.suppressed for i in identifiers for key in self.suppression_keys)

    def limit(self, id_type: str) -> Optional[int]:
        return self.max_per_profile.get(id_type)

    @property
    def account_types(self) -> Tuple[str, ...]:
        """Types limited to one per profile: what fan-out quarantine counts."""
        return tuple(sorted(t for t, n in self.max_per_profile.items() if n == 1))

    @property
    def window_us(self) -> int:
        return int(self.quarantine_window_days * US_PER_DAY)


class Decision(NamedTuple):
    """What the store decided for one event."""

    message_id: str
    status: str  # ok | suppressed | blocked
    key: Optional[str]  # node key of the identifier the event is attributed to
    profile_id: Optional[str]  # its profile when decided, or now for an event decided before


_SCHEMA = """
CREATE TABLE IF NOT EXISTS node(key TEXT PRIMARY KEY, type TEXT NOT NULL, value TEXT NOT NULL,
    owner TEXT NOT NULL, founder INTEGER NOT NULL DEFAULT 0, quarantined INTEGER NOT NULL DEFAULT 0,
    first_seen INTEGER NOT NULL, last_seen INTEGER NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS node_owner ON node(owner, type);
CREATE TABLE IF NOT EXISTS profile(pid TEXT PRIMARY KEY, root TEXT NOT NULL, founder_key TEXT NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS profile_root ON profile(root);
CREATE TABLE IF NOT EXISTS counts(root TEXT NOT NULL, type TEXT NOT NULL, n INTEGER NOT NULL, PRIMARY KEY(root, type)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS linkset(members TEXT PRIMARY KEY, message_id TEXT NOT NULL, ts INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS linkset_member(key TEXT NOT NULL, members TEXT NOT NULL, PRIMARY KEY(key, members)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decision(message_id TEXT PRIMARY KEY, status TEXT NOT NULL, key TEXT, profile TEXT, worker INTEGER) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS merge(seq INTEGER PRIMARY KEY AUTOINCREMENT, survivor TEXT NOT NULL, absorbed TEXT NOT NULL,
    cause TEXT NOT NULL, reason TEXT NOT NULL, ts INTEGER NOT NULL, undone_at INTEGER, undone_by TEXT);
CREATE INDEX IF NOT EXISTS merge_survivor ON merge(survivor);
CREATE TABLE IF NOT EXISTS conflict(seq INTEGER PRIMARY KEY AUTOINCREMENT, type TEXT NOT NULL, value TEXT NOT NULL,
    profiles TEXT NOT NULL, rule TEXT NOT NULL, cause TEXT NOT NULL, ts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta(name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS moved(epoch INTEGER NOT NULL, key TEXT NOT NULL, profile TEXT NOT NULL, PRIMARY KEY(epoch, key)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS decided_in(message_id TEXT PRIMARY KEY, epoch INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout(key TEXT NOT NULL, account TEXT NOT NULL, first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL, PRIMARY KEY(key, account)) WITHOUT ROWID;
"""


class IdentityStore:
    """The shared identity graph in SQLite.

    Args:
      path: database file (shared by worker processes) or ":memory:".
      rules: merge protection.
      worker: recorded with each decision (the process id by default), so tests can tell who worked.
    """

    def __init__(self, path: str, rules: IdentityRules = IdentityRules(), worker: Optional[int] = None):
        self.path = path
        self.rules = rules
        self.worker = os.getpid() if worker is None else worker
        # isolation_level=None: transactions are ours (BEGIN IMMEDIATE takes the write lock up
        # front, so two workers never interleave the reads and writes of one union).
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
        self._changed: Set[str] = set()  # profile ids (founders) whose root the open batch changed
        self.replayed_moves: List[Tuple[int, str, str]] = []
        self._initialise(path)

    def _initialise(self, path: str):
        # Several workers open a new store at once; switching to WAL and creating the tables
        # can meet another worker's lock before any busy handler applies, so retry a while.
        deadline = time.monotonic() + 60
        while True:
            try:
                if path != ":memory:" and self.db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.execute("BEGIN IMMEDIATE")
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(statement)
                self.db.execute("COMMIT")
                return
            except sqlite3.OperationalError as err:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if "locked" not in str(err) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self):
        self.db.close()

    # ---------------------------------------------------------------- small reads and writes
    def _root_of_pid(self, pid: str) -> str:
        return self.db.execute("SELECT root FROM profile WHERE pid = ?", (pid,)).fetchone()[0]

    def _node(self, key: str):
        return self.db.execute("SELECT owner, quarantined FROM node WHERE key = ?", (key,)).fetchone()

    def _root(self, key: str) -> str:
        return self.db.execute(
            "SELECT p.root FROM node n JOIN profile p ON p.pid = n.owner WHERE n.key = ?", (key,)).fetchone()[0]

    def _count(self, root: str, id_type: str) -> int:
        row = self.db.execute("SELECT n FROM counts WHERE root = ? AND type = ?", (root, id_type)).fetchone()
        return row[0] if row else 0

    def _bump(self, root: str, id_type: str, n: int = 1):
        self.db.execute("INSERT INTO counts(root, type, n) VALUES (?, ?, ?) "
                        "ON CONFLICT(root, type) DO UPDATE SET n = n + excluded.n", (root, id_type, n))

    def _conflict(self, identifier: Identifier, profiles: Iterable[str], rule: str, cause: str, ts: int):
        self.db.execute("INSERT INTO conflict(type, value, profiles, rule, cause, ts) VALUES (?, ?, ?, ?, ?, ?)",
                        (identifier[0], identifier[1], json.dumps(sorted(set(profiles))), rule, cause, ts))

    def _found(self, identifier: Identifier, ts: int) -> str:
        pid = profile_id_for(identifier)
        key = node_key(identifier)
        self.db.execute("INSERT OR REPLACE INTO profile(pid, root, founder_key) VALUES (?, ?, ?)", (pid, pid, key))
        self.db.execute("INSERT INTO node(key, type, value, owner, founder, first_seen, last_seen) VALUES (?, ?, ?, ?, 1, ?, ?)",
                        (key, identifier[0], identifier[1], pid, ts, ts))
        self._bump(pid, identifier[0])
        return pid

    def _separated(self, left_root: str, right_root: str) -> bool:
        for a, b in self.rules.separations:
            ra, rb = self._root_if_known(a), self._root_if_known(b)
            if ra and rb and {ra, rb} == {left_root, right_root}:
                return True
        return False

    def _root_if_known(self, identifier: Identifier) -> Optional[str]:
        row = self.db.execute("SELECT p.root FROM node n JOIN profile p ON p.pid = n.owner WHERE n.key = ?",
                              (node_key(identifier),)).fetchone()
        return row[0] if row else None

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

    def _linksets_of(self, key: str) -> List[str]:
        return [r[0] for r in self.db.execute("SELECT members FROM linkset_member WHERE key = ? ORDER BY members", (key,))]

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
            first = self.db.execute("SELECT message_id, ts FROM linkset WHERE members = ?", (text,)).fetchone()
            self.db.execute("DELETE FROM linkset WHERE members = ?", (text,))
            self.db.execute("DELETE FROM linkset_member WHERE members = ?", (text,))
            rest = [k for k in json.loads(text) if k != key]
            if len(rest) > 1:
                reduced = json.dumps(rest)
                if self.db.execute("INSERT OR IGNORE INTO linkset(members, message_id, ts) VALUES (?, ?, ?)",
                                   (reduced, first[0], first[1])).rowcount:
                    self.db.executemany("INSERT OR IGNORE INTO linkset_member(key, members) VALUES (?, ?)",
                                        [(k, reduced) for k in rest])
        self.split_profile(other, message_id, ts, f"rehoming of {identifier[0]}")
        own = self._root(key)
        refusal = self._merge_refusal(target, own)
        if refusal:
            self._conflict(identifier, (target, own), refusal, message_id, ts)
            return target
        survivor, absorbed = min(target, own), max(target, own)
        self._union(survivor, absorbed)
        self.db.execute("INSERT INTO merge(survivor, absorbed, cause, reason, ts) VALUES (?, ?, ?, ?, ?)",
                        (survivor, absorbed, message_id, f"rehomed {identifier[0]} from {other}", ts))
        return survivor

    def _epochs_of(self, message_ids: Sequence[str]) -> Dict[str, int]:
        """The epoch of the batch that decided each of these events, for those whose batch moved identifiers."""
        found: Dict[str, int] = {}
        for start in range(0, len(message_ids), 500):
            chunk = list(message_ids[start:start + 500])
            found.update(self.db.execute(
                f"SELECT message_id, epoch FROM decided_in WHERE message_id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def _union(self, survivor: str, absorbed: str):
        # Flattened union-find: every founder points straight at its root, so a find is one
        # indexed read; a union rewrites the absorbed profile's founders (few per profile).
        self._changed.update(r[0] for r in self.db.execute("SELECT pid FROM profile WHERE root = ?", (absorbed,)))
        self.db.execute("UPDATE profile SET root = ? WHERE root = ?", (survivor, absorbed))
        for id_type, n in self.db.execute("SELECT type, n FROM counts WHERE root = ?", (absorbed,)).fetchall():
            self._bump(survivor, id_type, n)
        self.db.execute("DELETE FROM counts WHERE root = ?", (absorbed,))

    # ---------------------------------------------------------------- resolution
    def resolve_batch(self, events: Iterable[Tuple[str, int, Sequence[Identifier]]]) -> List[Decision]:
        """Resolves events (message_id, event time in UTC microseconds, identifiers) in the order given, atomically.

        Returns:
          One Decision per event; an event already decided gets its recorded decision back.
        """
        return self.resolve_batch_with_moves(events, record=False)[0]

    def resolve_batch_with_moves(self, events: Iterable[Tuple[str, int, Sequence[Identifier]]], record: bool = True
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
        decisions = []
        self._changed = set()
        self.db.execute("BEGIN IMMEDIATE")
        try:
            events = list(events)
            earlier = self._epochs_of([m for m, _, _ in events]) if record else {}
            for message_id, ts, identifiers in events:
                decisions.append(self._resolve(message_id, ts, identifiers))
            row = self.db.execute("SELECT value FROM meta WHERE name = 'epoch'").fetchone()
            epoch = row[0] if row else 0
            moves: Dict[str, str] = {}
            if self._changed:
                epoch += 1
                self.db.execute("INSERT INTO meta(name, value) VALUES ('epoch', ?) "
                                "ON CONFLICT(name) DO UPDATE SET value = excluded.value", (epoch,))
                changed = sorted(self._changed)
                for start in range(0, len(changed), 500):
                    chunk = changed[start:start + 500]
                    moves.update(self.db.execute(
                        "SELECT n.key, p.root FROM node n JOIN profile p ON p.pid = n.owner "
                        f"WHERE n.owner IN ({','.join('?' * len(chunk))})", chunk).fetchall())
                if record:
                    self.db.executemany("INSERT INTO moved(epoch, key, profile) VALUES (?, ?, ?)",
                                        [(epoch, k, p) for k, p in moves.items()])
                    self.db.executemany("INSERT OR IGNORE INTO decided_in(message_id, epoch) VALUES (?, ?)",
                                        [(m, epoch) for m, _, _ in events if m not in earlier])
            # A retried bundle (its outputs were lost with it) must tell the stream again about
            # the moves its events caused the first time; an older epoch is harmless to repeat.
            replayed = [(e, k, p) for e in sorted(set(earlier.values()))
                        for k, p in self.db.execute("SELECT key, profile FROM moved WHERE epoch = ?", (e,))]
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        finally:
            self._changed = set()
        self.replayed_moves = replayed
        return decisions, epoch, moves

    def resolve(self, message_id: str, ts: int, identifiers: Sequence[Identifier]) -> Decision:
        return self.resolve_batch([(message_id, ts, identifiers)])[0]

    def _resolve(self, message_id: str, ts: int, identifiers: Sequence[Identifier]) -> Decision:
        rules = self.rules
        # Suppression first, before any recorded decision: a person forgotten after their events
        # were decided must not come back through a retry or a replay of those events.
        if rules.is_suppressed(identifiers):
            # Recorded (replacing an older decision) so that read-outs by messageId answer too.
            self.db.execute("INSERT OR REPLACE INTO decision(message_id, status, key, profile, worker) "
                            "VALUES (?, ?, NULL, NULL, ?)", (message_id, SUPPRESSED, self.worker))
            return Decision(message_id, SUPPRESSED, None, None)
        row = self.db.execute("SELECT status, key, profile FROM decision WHERE message_id = ?", (message_id,)).fetchone()
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
                self.db.execute("UPDATE node SET first_seen = min(first_seen, ?), last_seen = max(last_seen, ?) WHERE key = ?",
                                (ts, ts, node_key(identifier)))
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
            self.db.execute("INSERT INTO merge(survivor, absorbed, cause, reason, ts) VALUES (?, ?, ?, ?, ?)",
                            (survivor, absorbed, message_id, "shared " + "+".join(bridge), ts))
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
            self.db.execute("INSERT INTO node(key, type, value, owner, founder, first_seen, last_seen) VALUES (?, ?, ?, ?, 0, ?, ?)",
                            (node_key(identifier), identifier[0], identifier[1], target, ts, ts))
            self._bump(target, identifier[0])
        roots = {i: self._root(node_key(i)) for i in ids}
        members = [i for i in ids if roots[i] == target and i not in quarantined]
        if len(members) > 1:
            text = json.dumps([node_key(i) for i in members])
            if self.db.execute("INSERT OR IGNORE INTO linkset(members, message_id, ts) VALUES (?, ?, ?)",
                               (text, message_id, ts)).rowcount:
                self.db.executemany("INSERT OR IGNORE INTO linkset_member(key, members) VALUES (?, ?)",
                                    [(node_key(i), text) for i in members])
        self._fan_out(ids, roots, quarantined, message_id, ts)
        attributed = next((i for i in ids if not self._node(node_key(i))[1]), ids[0])
        return self._decide(message_id, OK, node_key(attributed), self._root(node_key(attributed)))

    def _decide(self, message_id, status, key, profile) -> Decision:
        self.db.execute("INSERT INTO decision(message_id, status, key, profile, worker) VALUES (?, ?, ?, ?, ?)",
                        (message_id, status, key, profile, self.worker))
        return Decision(message_id, status, key, profile)

    # ---------------------------------------------------------------- fan-out quarantine
    def _fan_out(self, ids, roots, quarantined, message_id, ts):
        # What is counted are the *accounts* (identifiers of a type limited to one per profile:
        # user_id, loyalty_id) in the profiles of the identifiers seen with this one, as those
        # profiles stood on that event. Two accounts can never merge, so the count cannot collapse
        # when the identifier's own merges succeed, and a user id joining its own cookies counts
        # nothing. One row per (identifier, account) with the first and last time: in event-time
        # order "seen within the window" is "last seen at most a window ago", and the check
        # costs one indexed read however many partners a shared device collects.
        account_types = self.rules.account_types
        if not account_types:
            return
        marks = ",".join("?" * len(account_types))
        accounts_of = {}
        for root in set(roots.values()):
            accounts_of[root] = [r[0] for r in self.db.execute(
                "SELECT n.key FROM profile p JOIN node n ON n.owner = p.pid "
                f"WHERE p.root = ? AND n.type IN ({marks})", (root, *account_types))]
        rows = []
        for identifier in ids:
            if identifier in quarantined:
                continue
            key = node_key(identifier)
            for other in ids:
                if other != identifier:
                    rows.extend((key, account, ts, ts) for account in accounts_of[roots[other]] if account != key)
        self.db.executemany(
            "INSERT INTO fanout(key, account, first_ts, last_ts) VALUES (?, ?, ?, ?) ON CONFLICT(key, account) "
            "DO UPDATE SET first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts)", rows)
        window = self.rules.window_us
        for identifier in ids:
            key = node_key(identifier)
            if identifier in quarantined or self._node(key)[1]:
                continue
            accounts = [r[0] for r in self.db.execute(
                "SELECT account FROM fanout WHERE key = ? AND last_ts >= ? AND first_ts <= ?",
                (key, ts - window, ts + window))]
            if len(accounts) > self.rules.quarantine_max_profiles:
                profiles = {self._root(a) for a in accounts}
                self._quarantine(identifier, profiles, message_id, ts)

    def _quarantine(self, identifier: Identifier, seen: Set[str], message_id: str, ts: int):
        key = node_key(identifier)
        self.db.execute("UPDATE node SET quarantined = 1 WHERE key = ?", (key,))
        self._conflict(identifier, seen, "fan_out_quarantine", message_id, ts)
        self.split_profile(self._root(key), message_id, ts, f"quarantine of {identifier[0]}")

    def split_profile(self, root: str, cause: str, ts: int, why: str) -> List[str]:
        """Re-derives one profile from its link sets (quarantined identifiers bridge nothing).

        Returns:
          The ids of the profiles it now consists of.
        """
        founders = [r[0] for r in self.db.execute("SELECT pid FROM profile WHERE root = ?", (root,))]
        self._changed.update(founders)
        marks = ",".join("?" * len(founders))
        nodes = {r[0]: r for r in self.db.execute(
            f"SELECT key, type, value, owner, founder, quarantined FROM node WHERE owner IN ({marks})", founders)}
        parent = {k: k for k in nodes}

        def find(k):
            while parent[k] != k:
                parent[k] = parent[parent[k]]
                k = parent[k]
            return k

        member_keys = list(nodes)
        linksets = set()
        for start in range(0, len(member_keys), 500):
            chunk = member_keys[start:start + 500]
            linksets.update(r[0] for r in self.db.execute(
                f"SELECT members FROM linkset_member WHERE key IN ({','.join('?' * len(chunk))})", chunk))
        for text in sorted(linksets):
            usable = [k for k in json.loads(text) if k in nodes and not nodes[k][5]]
            for k in usable[1:]:
                a, b = find(usable[0]), find(k)
                if a != b:
                    parent[max(a, b)] = min(a, b)
        components: Dict[str, List[str]] = {}
        for k in sorted(nodes):
            components.setdefault(find(k), []).append(k)
        self.db.execute("DELETE FROM counts WHERE root = ?", (root,))
        new_roots = []
        for keys in components.values():
            own_founders = [k for k in keys if nodes[k][4]]
            if not own_founders:
                promoted = min(keys, key=lambda k: self.rules.rank(key_identifier(k)))
                pid = profile_id_for(key_identifier(promoted))
                self.db.execute("INSERT OR REPLACE INTO profile(pid, root, founder_key) VALUES (?, ?, ?)", (pid, pid, promoted))
                self.db.execute("UPDATE node SET founder = 1 WHERE key = ?", (promoted,))
                self._changed.add(pid)
                own_founders = [promoted]
            founder_pids = {profile_id_for(key_identifier(k)) for k in own_founders}
            new_root = min(founder_pids)
            new_roots.append(new_root)
            self.db.executemany("UPDATE profile SET root = ? WHERE pid = ?", [(new_root, p) for p in founder_pids])
            for k in keys:
                if nodes[k][3] not in founder_pids:
                    self.db.execute("UPDATE node SET owner = ? WHERE key = ?", (new_root, k))
                    self._changed.add(new_root)
                self._bump(new_root, nodes[k][1])
        for seq, survivor, absorbed in self.db.execute(
                f"SELECT seq, survivor, absorbed FROM merge WHERE undone_at IS NULL AND survivor IN ({marks})",
                founders).fetchall():
            if self._root_of_pid(survivor) != self._root_of_pid(absorbed):
                self.db.execute("UPDATE merge SET undone_at = ?, undone_by = ? WHERE seq = ?", (ts, f"{why} ({cause})", seq))
        return sorted(new_roots)

    # ---------------------------------------------------------------- governance
    def forget(self, identifiers: Iterable[Identifier]) -> int:
        """Removes every trace of the profiles holding these identifiers; returns the identifiers removed.

        Nodes, founders, counts, link sets, decisions of the events attributed to them, merges,
        conflicts, fan-out rows and recorded moves all go, in one transaction. Their events, if
        replayed, meet the suppression check (the caller records the hashes) and are not attributed.
        """
        wanted = [node_key(tuple(i)) for i in identifiers]
        self.db.execute("BEGIN IMMEDIATE")
        try:
            roots = {r[0] for k in wanted for r in self.db.execute(
                "SELECT p.root FROM node n JOIN profile p ON p.pid = n.owner WHERE n.key = ?", (k,))}
            pids = [r[0] for root in roots for r in self.db.execute("SELECT pid FROM profile WHERE root = ?", (root,))]
            keys = set(wanted)
            for pid in pids:
                keys.update(r[0] for r in self.db.execute("SELECT key FROM node WHERE owner = ?", (pid,)))
            present = [k for k in keys if self._node(k) is not None]
            for key in keys:
                for (text,) in self.db.execute("SELECT members FROM linkset_member WHERE key = ?", (key,)).fetchall():
                    self.db.execute("DELETE FROM linkset WHERE members = ?", (text,))
                    self.db.execute("DELETE FROM linkset_member WHERE members = ?", (text,))
                self.db.execute("DELETE FROM decision WHERE key = ?", (key,))
                self.db.execute("DELETE FROM fanout WHERE key = ? OR account = ?", (key, key))
                self.db.execute("DELETE FROM moved WHERE key = ?", (key,))
                id_type, value = key_identifier(key)
                self.db.execute("DELETE FROM conflict WHERE type = ? AND value = ?", (id_type, value))
                self.db.execute("DELETE FROM node WHERE key = ?", (key,))
            for pid in pids:
                self.db.execute("DELETE FROM profile WHERE pid = ?", (pid,))
                self.db.execute("DELETE FROM merge WHERE survivor = ? OR absorbed = ?", (pid, pid))
                self.db.execute("DELETE FROM conflict WHERE profiles LIKE ?", (f'%"{pid}"%',))
            for root in roots:
                self.db.execute("DELETE FROM counts WHERE root = ?", (root,))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        return len(present)

    def purge(self, rules: "IdentityRules") -> int:
        """Forgets every profile holding an identifier the rules suppress (for a store older than a forget)."""
        hit = [key_identifier(r[0]) for r in self.db.execute("SELECT key FROM node").fetchall()
               if rules.is_suppressed([key_identifier(r[0])])]
        return self.forget(hit) if hit else 0

    def warehouse_version(self) -> Optional[int]:
        """The warehouse version this store was last made to agree with (None: never stamped)."""
        row = self.db.execute("SELECT value FROM meta WHERE name = 'warehouse_version'").fetchone()
        return int(row[0]) if row else None

    def stamp_warehouse_version(self, version: int) -> None:
        """Records that the store agrees with this warehouse version (after a commit or a forget)."""
        self.db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('warehouse_version', ?)", (int(version),))

    # ---------------------------------------------------------------- read-outs
    def profile_of(self, identifier: Identifier) -> Optional[str]:
        return self._root_if_known(tuple(identifier))

    def final_profiles(self, message_ids: Sequence[str]) -> Dict[str, Tuple[str, Optional[str]]]:
        """(status, current profile) of many decided events, read in chunks (one query per 500)."""
        found: Dict[str, Tuple[str, Optional[str]]] = {}
        for start in range(0, len(message_ids), 500):
            chunk = list(message_ids[start:start + 500])
            found.update((mid, (status, root)) for mid, status, root in self.db.execute(
                "SELECT d.message_id, d.status, p.root FROM decision d LEFT JOIN node n ON n.key = d.key "
                f"LEFT JOIN profile p ON p.pid = n.owner WHERE d.message_id IN ({','.join('?' * len(chunk))})", chunk))
        missing = [m for m in message_ids if m not in found]
        if missing:
            raise KeyError(f"no identity decision for messages {missing[:5]}")
        return found

    def links(self) -> List[Dict]:
        return [dict(zip(("identifier_type", "identifier_value", "profile_id", "first_seen", "last_seen", "quarantined"), r))
                for r in self.db.execute(
                    "SELECT n.type, n.value, p.root, n.first_seen, n.last_seen, n.quarantined FROM node n "
                    "JOIN profile p ON p.pid = n.owner ORDER BY n.type, n.value")]

    def merges(self) -> List[Dict]:
        return [dict(zip(("survivor_id", "absorbed_id", "cause_message_id", "reason", "merged_at", "undone_at", "undone_by"), r))
                for r in self.db.execute(
                    "SELECT survivor, absorbed, cause, reason, ts, undone_at, undone_by FROM merge ORDER BY seq")]

    def conflicts(self) -> List[Dict]:
        return [{"identifier_type": t, "identifier_value": v, "profiles": json.loads(p), "rule": rule,
                 "cause_message_id": cause, "event_time": ts}
                for t, v, p, rule, cause, ts in self.db.execute(
                    "SELECT type, value, profiles, rule, cause, ts FROM conflict ORDER BY seq")]

    def partition(self) -> Set[FrozenSet[Identifier]]:
        """The profiles as sets of identifiers (how runs are compared)."""
        groups: Dict[str, Set[Identifier]] = {}
        for link in self.links():
            groups.setdefault(link["profile_id"], set()).add((link["identifier_type"], link["identifier_value"]))
        return {frozenset(g) for g in groups.values()}

    def workers(self) -> Dict[int, int]:
        """Decisions per worker process id."""
        return dict(self.db.execute("SELECT worker, count(*) FROM decision GROUP BY worker").fetchall())
