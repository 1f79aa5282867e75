"""The Redis identity-store backend (`redis://127.0.0.1:6379/0`), shared by workers on many machines.

The rules and the graph algorithm are `cdpflow.core.identity.graph`'s, in Python, unchanged;
this module only stores. A batch runs against a private view of the store: reads go to Redis
(and are cached for the batch), writes are buffered. At the end the buffered writes are applied
by one Lua script that first compares the store's version key with the version the batch
started from (compare-and-set): if another process committed meanwhile, nothing is applied and
the batch runs again on fresh reads. So a batch is atomic and isolated (serialisable, as SQLite's
`BEGIN IMMEDIATE` makes it), and a retried batch meets the decisions recorded by messageId and
changes nothing. The script applies writes only; it holds no rule.

Layout (every key under a prefix, `cdpflow:identity` by default; `?prefix=` in the URI):
  {p}:version              string   commits so far (the compare-and-set key)
  {p}:node                 hash     node key -> [type, value, owner, founder, quarantined, first, last]
  {p}:owner:{pid}          set      node keys a founder owns
  {p}:owner:{pid}:{type}   set      the same, of one identifier type (fan-out reads the accounts only)
  {p}:profile              hash     pid -> [root, founder key]
  {p}:root:{root}          set      founders whose root this is
  {p}:counts:{root}        hash     identifier type -> how many the profile holds
  {p}:linkset              hash     link set (JSON list of node keys) -> [message_id, ts]
  {p}:lsm:{key}            set      link sets holding a node
  {p}:decision             hash     messageId -> [status, key, profile, worker]
  {p}:merge                hash     seq -> [survivor, absorbed, cause, reason, ts, undone_at, undone_by]
  {p}:open_merges:{pid}    set      seqs of merges not undone whose survivor is pid
  {p}:conflict             hash     seq -> [type, value, profiles, rule, cause, ts]
  {p}:meta                 hash     epoch, merge_seq, conflict_seq, warehouse_version
  {p}:moved:{epoch}        hash     node key -> profile
  {p}:moved_keys:{key}     set      epochs that moved a node
  {p}:decided_in           hash     messageId -> epoch
  {p}:fanout:{key}         hash     account -> [first_ts, last_ts]
  {p}:fanout_of:{account}  set      nodes whose fan-out rows name this account
  {p}:gov:{kind}           set      separations (JSON node-key pairs), suppressed hashes and founders' names
                                    (JSON [node key, profile id, at]) the store holds
"""
from __future__ import annotations

import json
import os
import urllib.parse
from typing import Any, Callable, Dict, List, Optional, Set, TypeVar

from cdpflow.core.identity.graph import IdentityStore
from cdpflow.core.identity.rules import IdentityRules, key_identifier, node_key
from cdpflow.errors import BadInput

T = TypeVar("T")

# KEYS[1] the version key; ARGV[1] the version the batch read; then (op, key, field, value)
# quadruples. Writes only: the rules stay in Python.
_APPLY = """
local current = redis.call('GET', KEYS[1]) or '0'
if current ~= ARGV[1] then return 0 end
for i = 2, #ARGV, 4 do
  local op, key, field, value = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  if op == 'hset' then redis.call('HSET', key, field, value)
  elseif op == 'hdel' then redis.call('HDEL', key, field)
  elseif op == 'sadd' then redis.call('SADD', key, field)
  elseif op == 'srem' then redis.call('SREM', key, field)
  elseif op == 'del' then redis.call('DEL', key)
  end
end
redis.call('SET', KEYS[1], tostring(tonumber(current) + 1))
return 1
"""

_MISSING = object()


class _Conflict(Exception):
    """Another process committed while this batch ran: it runs again."""


class _Batch:
    """A batch's private view: reads through to Redis and are cached, writes buffered in order."""

    def __init__(self, client, version: str):
        self.client = client
        self.version = version
        self.hashes: Dict[str, Dict[str, Any]] = {}  # hash -> field -> value or None (deleted), read or written
        self.sets: Dict[str, Set[str]] = {}  # set -> members as this batch sees them
        self.gone: Set[str] = set()  # keys this batch deleted whole
        self.whole: Dict[str, Dict[str, str]] = {}  # hashes read whole, as committed
        self.ops: List[str] = []

    # Priming: what a batch will read, fetched in a few pipelined round trips up front.
    def prime_fields(self, name: str, fields: List[str], raws: List[Optional[bytes]]) -> None:
        known = self.hashes.setdefault(name, {})
        for field, raw in zip(fields, raws):
            known.setdefault(field, raw.decode() if raw is not None else None)

    def prime_hash(self, name: str, mapping: Dict[bytes, bytes]) -> None:
        self.whole.setdefault(name, {k.decode(): v.decode() for k, v in mapping.items()})

    def prime_set(self, name: str, members: Set[bytes]) -> None:
        self.sets.setdefault(name, {m.decode() for m in members})

    def hget(self, name: str, field: str) -> Optional[str]:
        known = self.hashes.setdefault(name, {})
        found = known.get(field, _MISSING)
        if found is _MISSING and name in self.gone:
            return None
        if found is _MISSING and name in self.whole:
            return self.whole[name].get(field)
        if found is _MISSING:
            raw = self.client.hget(name, field)
            found = raw.decode() if raw is not None else None
            known[field] = found
        return found

    def hset(self, name: str, field: str, value: str) -> None:
        self.hashes.setdefault(name, {})[field] = value
        self.ops += ["hset", name, field, value]

    def hdel(self, name: str, field: str) -> None:
        self.hashes.setdefault(name, {})[field] = None
        self.ops += ["hdel", name, field, ""]

    def smembers(self, name: str) -> Set[str]:
        if name not in self.sets:
            self.sets[name] = {m.decode() for m in self.client.smembers(name)}
        return self.sets[name]

    def sadd(self, name: str, member: str) -> None:
        self.smembers(name).add(member)
        self.ops += ["sadd", name, member, ""]

    def srem(self, name: str, member: str) -> None:
        self.smembers(name).discard(member)
        self.ops += ["srem", name, member, ""]

    def delete(self, name: str) -> None:
        self.sets[name] = set()
        self.ops += ["del", name, "", ""]
        self.hashes[name] = {}
        self.whole[name] = {}
        self.gone.add(name)

    def hgetall(self, name: str) -> Dict[str, str]:
        """A whole hash as this batch sees it."""
        if name in self.gone:
            found = {}
        else:
            if name not in self.whole:
                self.whole[name] = {k.decode(): v.decode() for k, v in self.client.hgetall(name).items()}
            found = dict(self.whole[name])
        for field, value in self.hashes.get(name, {}).items():
            if value is None:
                found.pop(field, None)
            else:
                found[field] = value
        return found


def _dump(value) -> str:
    return json.dumps(value, separators=(",", ":"))


class RedisIdentityStore(IdentityStore):
    """The identity graph in Redis.

    Args:
      url: `redis://HOST:PORT/DB[?prefix=NAME]`.
      rules: merge protection and governance.
      worker: recorded with each decision (the process id by default).
      max_retries: how often a batch runs again after losing a compare-and-set before it fails.
    """

    def __init__(self, url: str, rules: IdentityRules = IdentityRules(), worker: Optional[int] = None,
                 max_retries: int = 1000):
        import redis
        super().__init__(rules, os.getpid() if worker is None else worker)
        parsed = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parsed.query)
        self.prefix = (query.get("prefix") or ["cdpflow:identity"])[0]
        self.uri = url
        self.client = redis.Redis.from_url(urllib.parse.urlunsplit(parsed._replace(query="")))
        try:
            self.client.ping()  # a wrong address is an error now, not in the first batch
        except redis.exceptions.RedisError as err:
            raise BadInput(f"identity store {url}: cannot reach Redis ({err}); is it running (`cdpflow stack up redis`)?") from None
        self._apply = self.client.register_script(_APPLY)
        self.max_retries = max_retries
        self.batch: Optional[_Batch] = None
        self.retries = 0  # batches that ran again after losing a race (for tests and metrics)

    def close(self):
        self.client.close()

    def k(self, *parts: str) -> str:
        return ":".join((self.prefix,) + parts)

    # the transaction ---------------------------------------------------------------------
    def _atomically(self, work: Callable[[], T]) -> T:
        for _ in range(self.max_retries):
            raw = self.client.get(self.k("version"))
            self.batch = _Batch(self.client, raw.decode() if raw is not None else "0")
            try:
                result = work()
                if not self.batch.ops or self._apply(keys=[self.k("version")], args=[self.batch.version, *self.batch.ops]):
                    return result
                self.retries += 1
            finally:
                self.batch = None
        raise RuntimeError(f"identity store {self.uri}: a batch lost {self.max_retries} races in a row")

    def _prefetch(self, events) -> None:
        """Reads what resolving these events will read, in three pipelined round trips."""
        batch, k = self.batch, self.k
        mids = [m for m, _, _ in events]
        keys = sorted({node_key(tuple(i)) for _, _, ids in events for i in ids})
        if not mids:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(k("decision"), mids)
        pipe.hmget(k("decided_in"), mids)
        pipe.hmget(k("node"), keys or ["-"])
        for key in keys:
            pipe.hgetall(k("fanout", key))
            pipe.smembers(k("lsm", key))
        out = pipe.execute()
        batch.prime_fields(k("decision"), mids, out[0])
        batch.prime_fields(k("decided_in"), mids, out[1])
        batch.prime_fields(k("node"), keys, out[2])
        for i, key in enumerate(keys):
            batch.prime_hash(k("fanout", key), out[3 + 2 * i])
            batch.prime_set(k("lsm", key), out[4 + 2 * i])
        owners = sorted({json.loads(raw)[2] for raw in out[2] if raw is not None})
        if not owners:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.hmget(k("profile"), owners)
        for pid in owners:
            pipe.smembers(k("owner", pid))
        out = pipe.execute()
        batch.prime_fields(k("profile"), owners, out[0])
        for pid, members in zip(owners, out[1:]):
            batch.prime_set(k("owner", pid), members)
        roots = sorted({json.loads(raw)[0] for raw in out[0] if raw is not None})
        pipe = self.client.pipeline(transaction=False)
        for root in roots:
            pipe.smembers(k("root", root))
            pipe.hgetall(k("counts", root))
        out = pipe.execute()
        for i, root in enumerate(roots):
            batch.prime_set(k("root", root), out[2 * i])
            batch.prime_hash(k("counts", root), out[2 * i + 1])

    def _view(self) -> _Batch:
        # Reads outside a batch (read-outs) see the committed store.
        return self.batch if self.batch is not None else _Batch(self.client, "")

    def _hget_json(self, name: str, field: str):
        raw = self._view().hget(name, field)
        return json.loads(raw) if raw is not None else None

    # nodes -----------------------------------------------------------------------------
    def _get_node(self, key):
        row = self._hget_json(self.k("node"), key)
        return tuple(row) if row is not None else None

    def _put_node(self, key, row):
        self.batch.hset(self.k("node"), key, _dump(list(row)))

    def _insert_node(self, key, owner, founder, ts):
        id_type, value = key_identifier(key)
        self._put_node(key, (id_type, value, owner, founder, 0, ts, ts))
        self.batch.sadd(self.k("owner", owner), key)
        self.batch.sadd(self.k("owner", owner, id_type), key)

    def _touch_node(self, key, ts):
        row = list(self._get_node(key))
        row[5], row[6] = min(row[5], ts), max(row[6], ts)
        self._put_node(key, row)

    def _set_node_flag(self, key, name, value):
        row = list(self._get_node(key))
        row[{"founder": 3, "quarantined": 4}[name]] = value
        self._put_node(key, row)

    def _set_node_owner(self, key, owner):
        row = list(self._get_node(key))
        self.batch.srem(self.k("owner", row[2]), key)
        self.batch.srem(self.k("owner", row[2], row[0]), key)
        row[2] = owner
        self._put_node(key, row)
        self.batch.sadd(self.k("owner", owner), key)
        self.batch.sadd(self.k("owner", owner, row[0]), key)

    def _delete_node(self, key):
        row = self._get_node(key)
        self.batch.hdel(self.k("node"), key)
        if row is not None:
            self.batch.srem(self.k("owner", row[2]), key)
            self.batch.srem(self.k("owner", row[2], row[0]), key)

    def _keys_of_owner(self, pid):
        return sorted(self._view().smembers(self.k("owner", pid)))

    def _account_keys(self, root, account_types):
        view = self._view()
        return sorted(k for pid in self._pids_of_root(root) for t in sorted(account_types)
                      for k in view.smembers(self.k("owner", pid, t)))

    def _all_nodes(self):
        return [(key, tuple(json.loads(raw))) for key, raw in self._view().hgetall(self.k("node")).items()]

    # profiles --------------------------------------------------------------------------
    def _profile(self, pid):
        return self._hget_json(self.k("profile"), pid)

    def _profile_root(self, pid):
        row = self._profile(pid)
        return row[0] if row else None

    def _put_profile(self, pid, root, founder_key):
        old = self._profile(pid)
        if old is not None:
            self.batch.srem(self.k("root", old[0]), pid)
        self.batch.hset(self.k("profile"), pid, _dump([root, founder_key]))
        self.batch.sadd(self.k("root", root), pid)

    def _set_profile_root(self, pid, root):
        old = self._profile(pid)
        self._put_profile(pid, root, old[1])

    def _pids_of_root(self, root):
        return sorted(self._view().smembers(self.k("root", root)))

    def _delete_profile(self, pid):
        old = self._profile(pid)
        if old is not None:
            self.batch.srem(self.k("root", old[0]), pid)
            self.batch.hdel(self.k("profile"), pid)

    # counts ----------------------------------------------------------------------------
    def _count(self, root, id_type):
        raw = self._view().hget(self.k("counts", root), id_type)
        return int(raw) if raw is not None else 0

    def _bump(self, root, id_type, n=1):
        self.batch.hset(self.k("counts", root), id_type, str(self._count(root, id_type) + n))

    def _counts_of(self, root):
        return {t: int(n) for t, n in self._view().hgetall(self.k("counts", root)).items()}

    def _delete_counts(self, root):
        self.batch.delete(self.k("counts", root))

    # link sets -------------------------------------------------------------------------
    def _linksets_of(self, key):
        return sorted(self._view().smembers(self.k("lsm", key)))

    def _linkset_origin(self, text):
        row = self._hget_json(self.k("linkset"), text)
        return tuple(row) if row else None

    def _add_linkset(self, text, message_id, ts):
        if self._linkset_origin(text) is not None:
            return False
        self.batch.hset(self.k("linkset"), text, _dump([message_id, ts]))
        for key in json.loads(text):
            self.batch.sadd(self.k("lsm", key), text)
        return True

    def _delete_linkset(self, text):
        self.batch.hdel(self.k("linkset"), text)
        for key in json.loads(text):
            self.batch.srem(self.k("lsm", key), text)

    # decisions -------------------------------------------------------------------------
    def _decision(self, message_id):
        row = self._hget_json(self.k("decision"), message_id)
        return tuple(row[:3]) if row else None

    def _put_decision(self, message_id, status, key, profile):
        self.batch.hset(self.k("decision"), message_id, _dump([status, key, profile, self.worker]))

    def _decided_keys(self, message_ids):
        found = {}
        for start in range(0, len(message_ids), 1000):
            chunk = list(message_ids[start:start + 1000])
            for mid, raw in zip(chunk, self.client.hmget(self.k("decision"), chunk)):
                if raw is not None:
                    row = json.loads(raw)
                    found[mid] = (row[0], row[1])
        return found

    def _all_decisions(self):
        return {m: json.loads(raw) for m, raw in self._view().hgetall(self.k("decision")).items()}

    def _delete_decisions_of_key(self, key):
        # Forget only (rare): a scan of the decisions, not an index kept up on every event.
        for mid, row in self._all_decisions().items():
            if row[1] == key:
                self.batch.hdel(self.k("decision"), mid)

    def _decisions_per_worker(self):
        counts: Dict[int, int] = {}
        for row in self._all_decisions().values():
            counts[row[3]] = counts.get(row[3], 0) + 1
        return counts

    # merges and conflicts --------------------------------------------------------------
    def _next_seq(self, name):
        seq = (self._meta(name) or 0) + 1
        self._set_meta(name, seq)
        return seq

    def _add_merge(self, survivor, absorbed, cause, reason, ts):
        seq = self._next_seq("merge_seq")
        self.batch.hset(self.k("merge"), str(seq), _dump([survivor, absorbed, cause, reason, ts, None, None]))
        self.batch.sadd(self.k("open_merges", survivor), str(seq))

    def _open_merges_by_survivors(self, pids):
        found = []
        for pid in pids:
            for seq in self._view().smembers(self.k("open_merges", pid)):
                row = self._hget_json(self.k("merge"), seq)
                found.append((int(seq), row[0], row[1]))
        return sorted(found)

    def _undo_merge(self, seq, ts, by):
        row = self._hget_json(self.k("merge"), str(seq))
        row[5], row[6] = ts, by
        self.batch.hset(self.k("merge"), str(seq), _dump(row))
        self.batch.srem(self.k("open_merges", row[0]), str(seq))

    def _all_merges(self):
        rows = self._view().hgetall(self.k("merge"))
        return [tuple(json.loads(rows[s])) for s in sorted(rows, key=int)]

    def _delete_merges_of(self, pid):
        for seq, raw in self._view().hgetall(self.k("merge")).items():
            row = json.loads(raw)
            if pid in (row[0], row[1]):
                self.batch.hdel(self.k("merge"), seq)
                self.batch.srem(self.k("open_merges", row[0]), seq)

    def _add_conflict(self, identifier, profiles, rule, cause, ts):
        seq = self._next_seq("conflict_seq")
        self.batch.hset(self.k("conflict"), str(seq), _dump([identifier[0], identifier[1], profiles, rule, cause, ts]))

    def _all_conflicts(self):
        rows = self._view().hgetall(self.k("conflict"))
        return [tuple(json.loads(rows[s])) for s in sorted(rows, key=int)]

    def _delete_conflicts(self, identifiers, pids):
        about, naming = {tuple(i) for i in identifiers}, set(pids)
        for seq, raw in self._view().hgetall(self.k("conflict")).items():
            row = json.loads(raw)
            if (row[0], row[1]) in about or naming & set(row[2]):
                self.batch.hdel(self.k("conflict"), seq)

    # epochs and moves ------------------------------------------------------------------
    def _meta(self, name):
        raw = self._view().hget(self.k("meta"), name)
        return int(raw) if raw is not None else None

    def _set_meta(self, name, value):
        self.batch.hset(self.k("meta"), name, str(int(value)))

    def _record_moves(self, epoch, moves):
        for key, profile in moves.items():
            self.batch.hset(self.k("moved", str(epoch)), key, profile)
            self.batch.sadd(self.k("moved_keys", key), str(epoch))

    def _moves_of(self, epoch):
        return sorted(self._view().hgetall(self.k("moved", str(epoch))).items())

    def _record_decided_in(self, message_ids, epoch):
        for mid in message_ids:
            if self._view().hget(self.k("decided_in"), mid) is None:
                self.batch.hset(self.k("decided_in"), mid, str(epoch))

    def _decided_epochs(self, message_ids):
        found = {}
        view = self._view()
        for mid in message_ids:
            raw = view.hget(self.k("decided_in"), mid)
            if raw is not None:
                found[mid] = int(raw)
        return found

    def _delete_moves_of_key(self, key):
        for epoch in self._view().smembers(self.k("moved_keys", key)):
            self.batch.hdel(self.k("moved", epoch), key)
        self.batch.delete(self.k("moved_keys", key))

    # governance ------------------------------------------------------------------------
    def _governance_items(self, kind):
        return set(self._view().smembers(self.k("gov", kind)))

    def _add_governance_item(self, kind, item):
        self.batch.sadd(self.k("gov", kind), item)

    def _delete_governance_item(self, kind, item):
        self.batch.srem(self.k("gov", kind), item)

    # fan-out ---------------------------------------------------------------------------
    def _fanout_upsert(self, rows):
        for key, account, ts in rows:
            old = self._hget_json(self.k("fanout", key), account)
            first, last = (min(old[0], ts), max(old[1], ts)) if old else (ts, ts)
            self.batch.hset(self.k("fanout", key), account, _dump([first, last]))
            if old is None:
                self.batch.sadd(self.k("fanout_of", account), key)

    def _fanout_accounts(self, key, low, high):
        return sorted(account for account, raw in self._view().hgetall(self.k("fanout", key)).items()
                      if json.loads(raw)[1] >= low and json.loads(raw)[0] <= high)

    def _delete_fanout_of(self, key):
        for account in self._view().hgetall(self.k("fanout", key)):
            self.batch.srem(self.k("fanout_of", account), key)
        self.batch.delete(self.k("fanout", key))
        for other in self._view().smembers(self.k("fanout_of", key)):
            self.batch.hdel(self.k("fanout", other), key)
        self.batch.delete(self.k("fanout_of", key))

    def flush(self) -> None:
        """Deletes every key of this store (tests and `cdpflow replay` into a fresh store)."""
        for key in self.client.scan_iter(match=self.prefix + ":*", count=1000):
            self.client.delete(key)

