"""The SQLite identity-store backend: the embedded default (`sqlite:///path/identity.sqlite`).

One database file in WAL mode that every worker process on the machine opens: a file beside the
warehouse for the embedded demo and batch runs, `:memory:` for tests and the reference. A batch
is one `BEGIN IMMEDIATE` transaction: it takes the write lock up front, so two workers never
interleave the reads and writes of one union.
"""
from __future__ import annotations

import json
import os
import sqlite3
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, TypeVar

from cdpflow.core.identity.graph import IdentityStore, NodeRow
from cdpflow.core.identity.rules import IdentityRules, key_identifier
from cdpflow.schemas.records import Identifier

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS governance(kind TEXT NOT NULL, item TEXT NOT NULL, PRIMARY KEY(kind, item)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS fanout(key TEXT NOT NULL, account TEXT NOT NULL, first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL, PRIMARY KEY(key, account)) WITHOUT ROWID;
"""


def _chunks(items: Sequence, size: int = 500):
    for start in range(0, len(items), size):
        yield list(items[start:start + size])


class SQLiteIdentityStore(IdentityStore):
    """The identity graph in one SQLite file shared by the machine's worker processes.

    Args:
      path: database file or ":memory:".
      rules: merge protection and governance.
      worker: recorded with each decision (the process id by default).
    """

    def __init__(self, path: str, rules: IdentityRules = IdentityRules(), worker: Optional[int] = None):
        super().__init__(rules, os.getpid() if worker is None else worker)
        self.path = path
        self.uri = "sqlite://" + (path if path == ":memory:" else os.path.abspath(path))
        # isolation_level=None: transactions are ours.
        self.db = sqlite3.connect(path, timeout=60, isolation_level=None, check_same_thread=False)
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

    def _atomically(self, work: Callable[[], T]) -> T:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            result = work()
            self.db.execute("COMMIT")
            return result
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _one(self, sql: str, params=()):
        return self.db.execute(sql, params).fetchone()

    # nodes ---------------------------------------------------------------------------
    def _get_node(self, key):
        return self._one("SELECT type, value, owner, founder, quarantined, first_seen, last_seen FROM node WHERE key = ?",
                         (key,))

    def _insert_node(self, key, owner, founder, ts):
        id_type, value = key_identifier(key)
        self.db.execute("INSERT INTO node(key, type, value, owner, founder, first_seen, last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key, id_type, value, owner, founder, ts, ts))

    def _touch_node(self, key, ts):
        self.db.execute("UPDATE node SET first_seen = min(first_seen, ?), last_seen = max(last_seen, ?) WHERE key = ?",
                        (ts, ts, key))

    def _set_node_flag(self, key, name, value):
        assert name in ("founder", "quarantined"), name
        self.db.execute(f"UPDATE node SET {name} = ? WHERE key = ?", (value, key))

    def _set_node_owner(self, key, owner):
        self.db.execute("UPDATE node SET owner = ? WHERE key = ?", (owner, key))

    def _delete_node(self, key):
        self.db.execute("DELETE FROM node WHERE key = ?", (key,))

    def _keys_of_owner(self, pid):
        return [r[0] for r in self.db.execute("SELECT key FROM node WHERE owner = ?", (pid,))]

    def _all_nodes(self) -> Iterable[Tuple[str, NodeRow]]:
        return [(r[0], r[1:]) for r in self.db.execute(
            "SELECT key, type, value, owner, founder, quarantined, first_seen, last_seen FROM node").fetchall()]

    # read-outs as one query each (the generic ones read node by node) -------------------
    def final_profiles(self, message_ids):
        found: Dict[str, Tuple[str, Optional[str]]] = {}
        for chunk in _chunks(list(message_ids)):
            found.update((mid, (status, root)) for mid, status, root in self.db.execute(
                "SELECT d.message_id, d.status, p.root FROM decision d LEFT JOIN node n ON n.key = d.key "
                f"LEFT JOIN profile p ON p.pid = n.owner WHERE d.message_id IN ({','.join('?' * len(chunk))})", chunk))
        missing = [m for m in message_ids if m not in found]
        if missing:
            raise KeyError(f"no identity decision for messages {missing[:5]}")
        return found

    def links(self):
        return [dict(zip(("identifier_type", "identifier_value", "profile_id", "first_seen", "last_seen", "quarantined"), r))
                for r in self.db.execute(
                    "SELECT n.type, n.value, p.root, n.first_seen, n.last_seen, n.quarantined FROM node n "
                    "JOIN profile p ON p.pid = n.owner ORDER BY n.type, n.value")]

    # profiles ------------------------------------------------------------------------
    def _profile_root(self, pid):
        row = self._one("SELECT root FROM profile WHERE pid = ?", (pid,))
        return row[0] if row else None

    def _put_profile(self, pid, root, founder_key):
        self.db.execute("INSERT OR REPLACE INTO profile(pid, root, founder_key) VALUES (?, ?, ?)", (pid, root, founder_key))

    def _set_profile_root(self, pid, root):
        self.db.execute("UPDATE profile SET root = ? WHERE pid = ?", (root, pid))

    def _pids_of_root(self, root):
        return [r[0] for r in self.db.execute("SELECT pid FROM profile WHERE root = ?", (root,))]

    def _delete_profile(self, pid):
        self.db.execute("DELETE FROM profile WHERE pid = ?", (pid,))

    def _account_keys(self, root, account_types):
        # One indexed query (node_owner covers owner and type): a giant profile costs no more.
        types = sorted(account_types)
        return [r[0] for r in self.db.execute(
            "SELECT n.key FROM profile p JOIN node n ON n.owner = p.pid "
            f"WHERE p.root = ? AND n.type IN ({','.join('?' * len(types))})", (root, *types))]

    def _reroot(self, absorbed, survivor):
        self.db.execute("UPDATE profile SET root = ? WHERE root = ?", (survivor, absorbed))

    # counts --------------------------------------------------------------------------
    def _count(self, root, id_type):
        row = self._one("SELECT n FROM counts WHERE root = ? AND type = ?", (root, id_type))
        return row[0] if row else 0

    def _bump(self, root, id_type, n=1):
        self.db.execute("INSERT INTO counts(root, type, n) VALUES (?, ?, ?) "
                        "ON CONFLICT(root, type) DO UPDATE SET n = n + excluded.n", (root, id_type, n))

    def _counts_of(self, root):
        return dict(self.db.execute("SELECT type, n FROM counts WHERE root = ?", (root,)).fetchall())

    def _delete_counts(self, root):
        self.db.execute("DELETE FROM counts WHERE root = ?", (root,))

    # link sets -----------------------------------------------------------------------
    def _linksets_of(self, key):
        return [r[0] for r in self.db.execute("SELECT members FROM linkset_member WHERE key = ? ORDER BY members", (key,))]

    def _linkset_origin(self, text):
        return self._one("SELECT message_id, ts FROM linkset WHERE members = ?", (text,))

    def _add_linkset(self, text, message_id, ts):
        if not self.db.execute("INSERT OR IGNORE INTO linkset(members, message_id, ts) VALUES (?, ?, ?)",
                               (text, message_id, ts)).rowcount:
            return False
        self.db.executemany("INSERT OR IGNORE INTO linkset_member(key, members) VALUES (?, ?)",
                            [(k, text) for k in json.loads(text)])
        return True

    def _delete_linkset(self, text):
        self.db.execute("DELETE FROM linkset WHERE members = ?", (text,))
        self.db.execute("DELETE FROM linkset_member WHERE members = ?", (text,))

    # decisions -----------------------------------------------------------------------
    def _decision(self, message_id):
        return self._one("SELECT status, key, profile FROM decision WHERE message_id = ?", (message_id,))

    def _put_decision(self, message_id, status, key, profile):
        self.db.execute("INSERT OR REPLACE INTO decision(message_id, status, key, profile, worker) VALUES (?, ?, ?, ?, ?)",
                        (message_id, status, key, profile, self.worker))

    def _decided_keys(self, message_ids):
        found = {}
        for chunk in _chunks(message_ids):
            found.update((m, (s, k)) for m, s, k in self.db.execute(
                f"SELECT message_id, status, key FROM decision WHERE message_id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def _delete_decisions_of_key(self, key):
        self.db.execute("DELETE FROM decision WHERE key = ?", (key,))

    def _decisions_per_worker(self):
        return dict(self.db.execute("SELECT worker, count(*) FROM decision GROUP BY worker").fetchall())

    # merges and conflicts ------------------------------------------------------------
    def _add_merge(self, survivor, absorbed, cause, reason, ts):
        self.db.execute("INSERT INTO merge(survivor, absorbed, cause, reason, ts) VALUES (?, ?, ?, ?, ?)",
                        (survivor, absorbed, cause, reason, ts))

    def _open_merges_by_survivors(self, pids):
        found = []
        for chunk in _chunks(list(pids)):
            found.extend(self.db.execute(
                f"SELECT seq, survivor, absorbed FROM merge WHERE undone_at IS NULL AND survivor IN ({','.join('?' * len(chunk))})",
                chunk).fetchall())
        return sorted(found)

    def _undo_merge(self, seq, ts, by):
        self.db.execute("UPDATE merge SET undone_at = ?, undone_by = ? WHERE seq = ?", (ts, by, seq))

    def _all_merges(self):
        return self.db.execute("SELECT survivor, absorbed, cause, reason, ts, undone_at, undone_by FROM merge "
                               "ORDER BY seq").fetchall()

    def _delete_merges_of(self, pid):
        self.db.execute("DELETE FROM merge WHERE survivor = ? OR absorbed = ?", (pid, pid))

    def _add_conflict(self, identifier: Identifier, profiles, rule, cause, ts):
        self.db.execute("INSERT INTO conflict(type, value, profiles, rule, cause, ts) VALUES (?, ?, ?, ?, ?, ?)",
                        (identifier[0], identifier[1], json.dumps(profiles), rule, cause, ts))

    def _all_conflicts(self):
        return [(t, v, json.loads(p), rule, cause, ts) for t, v, p, rule, cause, ts in self.db.execute(
            "SELECT type, value, profiles, rule, cause, ts FROM conflict ORDER BY seq")]

    def _delete_conflicts(self, identifiers, pids):
        self.db.executemany("DELETE FROM conflict WHERE type = ? AND value = ?", [tuple(i) for i in identifiers])
        self.db.executemany("DELETE FROM conflict WHERE profiles LIKE ?", [(f'%"{pid}"%',) for pid in pids])

    # epochs and moves ----------------------------------------------------------------
    def _meta(self, name):
        row = self._one("SELECT value FROM meta WHERE name = ?", (name,))
        return int(row[0]) if row else None

    def _set_meta(self, name, value):
        self.db.execute("INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                        (name, value))

    def _record_moves(self, epoch, moves):
        self.db.executemany("INSERT INTO moved(epoch, key, profile) VALUES (?, ?, ?)", [(epoch, k, p) for k, p in moves.items()])

    def _moves_of(self, epoch):
        return self.db.execute("SELECT key, profile FROM moved WHERE epoch = ?", (epoch,)).fetchall()

    def _record_decided_in(self, message_ids, epoch):
        self.db.executemany("INSERT OR IGNORE INTO decided_in(message_id, epoch) VALUES (?, ?)", [(m, epoch) for m in message_ids])

    def _decided_epochs(self, message_ids):
        found: Dict[str, int] = {}
        for chunk in _chunks(list(message_ids)):
            found.update(self.db.execute(
                f"SELECT message_id, epoch FROM decided_in WHERE message_id IN ({','.join('?' * len(chunk))})", chunk))
        return found

    def _delete_moves_of_key(self, key):
        self.db.execute("DELETE FROM moved WHERE key = ?", (key,))

    # governance ----------------------------------------------------------------------
    def _governance_items(self, kind):
        return {r[0] for r in self.db.execute("SELECT item FROM governance WHERE kind = ?", (kind,))}

    def _add_governance_item(self, kind, item):
        self.db.execute("INSERT OR IGNORE INTO governance(kind, item) VALUES (?, ?)", (kind, item))

    def _delete_governance_item(self, kind, item):
        self.db.execute("DELETE FROM governance WHERE kind = ? AND item = ?", (kind, item))

    # fan-out -------------------------------------------------------------------------
    def _fanout_upsert(self, rows):
        self.db.executemany(
            "INSERT INTO fanout(key, account, first_ts, last_ts) VALUES (?, ?, ?, ?) ON CONFLICT(key, account) "
            "DO UPDATE SET first_ts = min(first_ts, excluded.first_ts), last_ts = max(last_ts, excluded.last_ts)",
            [(k, a, ts, ts) for k, a, ts in rows])

    def _fanout_accounts(self, key, low, high) -> List[str]:
        return [r[0] for r in self.db.execute(
            "SELECT account FROM fanout WHERE key = ? AND last_ts >= ? AND first_ts <= ?", (key, low, high))]

    def _delete_fanout_of(self, key):
        self.db.execute("DELETE FROM fanout WHERE key = ? OR account = ?", (key, key))
