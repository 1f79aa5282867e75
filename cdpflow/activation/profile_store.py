"""The profile store: each profile's newest row, its open memberships and an identifier index, in Redis.

Kept from the stream's change topics by `ProfileStoreUpdater` (its own consumer group,
read_committed, offsets committed once applied):

    cdp.profiles.changes  -> {p}:profile:{id}   hash: row (JSON), as_of, updated_at
                             {p}:lookup:{kind}:{value} -> profile id   (email, phone, user_id)
                             a tombstone removes the profile; {p}:gone:{id} keeps its time
    cdp.segments.changes  -> {p}:segments:{id}  set of the segments it is in now
                             {p}:members:{segment}  sorted set (by id) of its members

Idempotent under redelivery: a profile row older than the one held (by as_of, then updated_at)
or than the profile's tombstone is ignored, in one Lua script per row; a profile's enters and
exits arrive in their order (the topic is keyed by profile), so applying them again leaves the
same sets. A forget (`forget`) removes the profile and its memberships and marks it forgotten:
nothing about it is stored again, and the sidecar delivers nothing for it.
"""
from __future__ import annotations

import time
import urllib.parse
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import orjson

from cdpflow.activation.consent import email_consent

LOOKUP_KINDS = ("email", "phone", "user_id")

_APPLY_PROFILE = """
local p, pid, row, as_of, updated = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('SISMEMBER', p .. ':forgotten', pid) == 1 then return 0 end
local key = p .. ':profile:' .. pid
local gone = redis.call('HMGET', p .. ':gone:' .. pid, 'as_of', 'updated_at')
if gone[1] and (tonumber(gone[1]) > as_of or (tonumber(gone[1]) == as_of and tonumber(gone[2]) >= updated)) then
  return 0
end
local held = redis.call('HMGET', key, 'as_of', 'updated_at', 'email', 'phone', 'user_id')
if held[1] and (tonumber(held[1]) > as_of or (tonumber(held[1]) == as_of and tonumber(held[2]) >= updated)) then
  return 0
end
local kinds = {'email', 'phone', 'user_id'}
for i, kind in ipairs(kinds) do
  local value = held[i + 2]
  if value and value ~= '' then
    local index = p .. ':lookup:' .. kind .. ':' .. value
    if redis.call('GET', index) == pid then redis.call('DEL', index) end
  end
end
if row == '' then
  redis.call('DEL', key)
  redis.call('HSET', p .. ':gone:' .. pid, 'as_of', as_of, 'updated_at', updated)
  for _, segment in ipairs(redis.call('SMEMBERS', p .. ':segments:' .. pid)) do
    redis.call('ZREM', p .. ':members:' .. segment, pid)
  end
  redis.call('DEL', p .. ':segments:' .. pid)
  return 1
end
redis.call('DEL', p .. ':gone:' .. pid)
redis.call('HSET', key, 'row', row, 'as_of', as_of, 'updated_at', updated,
           'email', ARGV[5], 'phone', ARGV[6], 'user_id', ARGV[7])
for i, kind in ipairs(kinds) do
  local value = ARGV[i + 4]
  if value ~= '' then redis.call('SET', p .. ':lookup:' .. kind .. ':' .. value, pid) end
end
return 1
"""

_APPLY_CHANGE = """
local p, pid, segment, direction = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if redis.call('SISMEMBER', p .. ':forgotten', pid) == 1 then return 0 end
if direction == 'enter' then
  redis.call('SADD', p .. ':segments:' .. pid, segment)
  redis.call('ZADD', p .. ':members:' .. segment, 0, pid)
  redis.call('SADD', p .. ':segment_names', segment)
else
  redis.call('SREM', p .. ':segments:' .. pid, segment)
  redis.call('ZREM', p .. ':members:' .. segment, pid)
end
return 1
"""

_FORGET = """
local p, pid = KEYS[1], ARGV[1]
local key = p .. ':profile:' .. pid
local held = redis.call('HMGET', key, 'email', 'phone', 'user_id')
local kinds = {'email', 'phone', 'user_id'}
for i, kind in ipairs(kinds) do
  local value = held[i]
  if value and value ~= '' then
    local index = p .. ':lookup:' .. kind .. ':' .. value
    if redis.call('GET', index) == pid then redis.call('DEL', index) end
  end
end
for _, segment in ipairs(redis.call('SMEMBERS', p .. ':segments:' .. pid)) do
  redis.call('ZREM', p .. ':members:' .. segment, pid)
end
local existed = redis.call('DEL', key, p .. ':segments:' .. pid, p .. ':gone:' .. pid)
redis.call('SADD', p .. ':forgotten', pid)
return existed
"""


def _uri_parts(uri: str) -> Tuple[str, str]:
    """(the Redis URL without cdpflow's `prefix` parameter, the prefix: default `cdp`)."""
    parsed = urllib.parse.urlsplit(uri)
    query = urllib.parse.parse_qs(parsed.query)
    prefix = (query.pop("prefix", ["cdp"]) or ["cdp"])[0]
    rest = urllib.parse.urlencode({k: v[0] for k, v in query.items()})
    return urllib.parse.urlunsplit(parsed._replace(query=rest)), prefix


class RedisProfileStore:
    """Profiles and memberships in Redis (see the module docstring). `uri`: redis://HOST:PORT/DB[?prefix=P]."""

    def __init__(self, uri: str):
        import redis
        url, self.prefix = _uri_parts(uri)
        self.client = redis.Redis.from_url(url)
        kwargs = self.client.connection_pool.connection_kwargs
        # names this store among others (the updater's consumer group): server, database, prefix
        self.identity = f"{kwargs.get('host', kwargs.get('path', ''))}:{kwargs.get('port', '')}/{kwargs.get('db', 0)}/{self.prefix}"
        self._profile = self.client.register_script(_APPLY_PROFILE)
        self._change = self.client.register_script(_APPLY_CHANGE)
        self._forget = self.client.register_script(_FORGET)

    def close(self) -> None:
        self.client.close()

    # ------------------------------------------------------------------ writes
    def apply_profile(self, profile_id: str, row: Optional[Mapping[str, Any]], as_of: int, updated_at: int) -> bool:
        """Stores a profile's row (None: its tombstone) unless a newer one is held; True if applied."""
        values = ["", "", ""] if row is None else [str(row.get(k) or "") for k in LOOKUP_KINDS]
        body = b"" if row is None else orjson.dumps(row)
        return bool(self._profile(keys=[self.prefix], args=[profile_id, body, int(as_of), int(updated_at), *values]))

    def apply_change(self, change: Mapping[str, Any]) -> bool:
        """Applies one segment enter or exit; False for a forgotten profile."""
        return bool(self._change(keys=[self.prefix], args=[change["profile_id"], change["segment"],
                                                            change["direction"]]))

    def forget(self, profile_id: str) -> bool:
        """Removes the profile, its index entries and memberships, and keeps it out for good."""
        return bool(self._forget(keys=[self.prefix], args=[profile_id]))

    def ping(self) -> bool:
        return bool(self.client.ping())

    # ------------------------------------------------------------------ reads
    def profile(self, profile_id: str) -> Optional[Dict[str, Any]]:
        row = self.client.hget(f"{self.prefix}:profile:{profile_id}", "row")
        return orjson.loads(row) if row else None

    def profile_and_segments(self, profile_id: str) -> Tuple[Optional[Dict[str, Any]], List[str]]:
        """The profile's row and its segments, read in one round trip."""
        row, segments = (self.client.pipeline(transaction=False)
                         .hget(f"{self.prefix}:profile:{profile_id}", "row")
                         .smembers(f"{self.prefix}:segments:{profile_id}").execute())
        return (orjson.loads(row) if row else None), sorted(s.decode() for s in segments)

    def rows(self, profile_ids: Sequence[str]) -> List[Optional[Dict[str, Any]]]:
        """The rows of several profiles (None where unknown), in one round trip."""
        pipe = self.client.pipeline(transaction=False)
        for profile_id in profile_ids:
            pipe.hget(f"{self.prefix}:profile:{profile_id}", "row")
        return [orjson.loads(row) if row else None for row in pipe.execute()]

    def forget_where(self, test, batch: int = 500) -> int:
        """Forgets every stored profile whose row passes `test(row)`; returns how many."""
        forgotten = 0
        ids: List[str] = []
        start = len(f"{self.prefix}:profile:")

        def check() -> int:
            gone = [pid for pid, row in zip(ids, self.rows(ids)) if row is not None and test(row)]
            for pid in gone:
                self.forget(pid)
            ids.clear()
            return len(gone)
        for key in self.client.scan_iter(match=f"{self.prefix}:profile:*", count=batch):
            ids.append(key.decode()[start:])
            if len(ids) >= batch:
                forgotten += check()
        return forgotten + (check() if ids else 0)

    def is_forgotten(self, profile_id: str) -> bool:
        return bool(self.client.sismember(f"{self.prefix}:forgotten", profile_id))

    def lookup(self, kind: str, value: str) -> Optional[str]:
        """The profile id an email, phone or user id belongs to now (None: unknown)."""
        if kind not in LOOKUP_KINDS:
            raise ValueError(f"lookup by {kind!r}: one of {', '.join(LOOKUP_KINDS)}")
        found = self.client.get(f"{self.prefix}:lookup:{kind}:{value}")
        return found.decode() if found else None

    def record_consent_withdrawal(self, profile_id: str, at_us: int) -> None:
        self.client.zadd(f"{self.prefix}:consent_withdrawn", {profile_id: at_us})

    def consent_withdrawals(self, after: float = 0) -> List[Tuple[str, float]]:
        """(profile id, when recorded) of consent withdrawals recorded after `after`, oldest first."""
        return [(m.decode(), s) for m, s in self.client.zrangebyscore(f"{self.prefix}:consent_withdrawn",
                                                                      f"({after}", "+inf", withscores=True)]

    def segments_of(self, profile_id: str) -> List[str]:
        return sorted(s.decode() for s in self.client.smembers(f"{self.prefix}:segments:{profile_id}"))

    def segment_names(self) -> List[str]:
        return sorted(s.decode() for s in self.client.smembers(f"{self.prefix}:segment_names"))

    def segment_size(self, segment: str) -> int:
        return int(self.client.zcard(f"{self.prefix}:members:{segment}"))

    def members(self, segment: str, after: Optional[str] = None, limit: int = 100) -> List[str]:
        """Members of a segment in id order, after the cursor `after` (exclusive)."""
        low = f"({after}" if after else "-"
        return [m.decode() for m in self.client.zrangebylex(f"{self.prefix}:members:{segment}", low, "+",
                                                            start=0, num=limit)]


def open_profile_store(uri: str) -> RedisProfileStore:
    if not uri.startswith(("redis://", "rediss://", "unix://")):
        from cdpflow.errors import BadInput
        raise BadInput(f"profile store {uri!r}: a redis:// URI (the stack's Redis: `cdpflow stack up redis`)")
    return RedisProfileStore(uri)


def apply_records(store: RedisProfileStore, records: Sequence[Any]) -> int:
    """Applies consumed `cdp.profiles.changes` and `cdp.segments.changes` records; returns how many changed the store."""
    from cdpflow.schemas.topics import PROFILE_CHANGES, SEGMENT_CHANGES
    applied = 0
    for record in records:
        if record.topic == PROFILE_CHANGES.name:
            headers = {k: v for k, v in (record.headers or [])}
            as_of = int(headers.get("as_of", b"0") or 0)
            updated = int(headers.get("updated_at", b"0") or 0)
            row = orjson.loads(record.value) if record.value is not None else None
            profile_id = record.key.decode()
            before = None
            if row is not None:
                as_of = int(row.get("as_of") or as_of)
                updated = int(row.get("updated_at") or updated)
                before = store.profile(profile_id)
            if store.apply_profile(profile_id, row, as_of, updated):
                applied += 1
                # consent withdrawn (or a first row without it): email destinations remove the
                # profile from every audience it is in (`DestinationWorker.consent_sweep`)
                if row is not None and not email_consent(row) and (before is None or email_consent(before)):
                    store.record_consent_withdrawal(profile_id, int(time.time() * 1_000_000))
        elif record.topic == SEGMENT_CHANGES.name and record.value is not None:
            applied += store.apply_change(orjson.loads(record.value))
    return applied


class ProfileStoreUpdater:
    """Keeps a profile store from `cdp.profiles.changes` and `cdp.segments.changes`.

    Its own consumer group (`cdpflow-profile-store`), read_committed; offsets are committed after
    the records are applied, so a restart applies some again (harmless: see the module docstring).
    `catch_up` reads to the ends the topics have when it is called: the sidecar calls it before
    each batch, so the profile rows written with a batch's changes are in the store when the
    deliveries are built.
    """

    GROUP = "cdpflow-profile-store"

    def __init__(self, bootstrap: str, store: RedisProfileStore, group: Optional[str] = None):
        import threading

        from cdpflow.io.kafka_consumer import assigned
        from cdpflow.schemas.topics import PROFILE_CHANGES, SEGMENT_CHANGES
        self.store = store
        # a store that lost its data (a new Redis, a flush) reads the topics again from the start,
        # whatever offsets its group committed before
        self.marker = f"{store.prefix}:updater_started"
        # one group per store: two stores (another Redis, another prefix) each read the topics whole
        self.consumer, self.partitions = assigned(bootstrap, group or f"{self.GROUP}.{store.identity}",
                                                  (PROFILE_CHANGES.name, SEGMENT_CHANGES.name),
                                                  from_start=not store.client.exists(self.marker))
        self.applied = 0
        self._lock = threading.Lock()

    def catch_up(self, timeout_s: float = 30.0) -> int:
        """Applies what the topics hold up to their current ends; returns how many records changed the store."""
        import time

        from cdpflow.io.kafka_consumer import commit_positions
        with self._lock:
            ends = self.consumer.end_offsets(self.partitions)
            deadline = time.monotonic() + timeout_s
            applied = 0
            while any(self.consumer.position(tp) < ends[tp] for tp in self.partitions):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the profile store did not catch up with the change topics in {timeout_s:g} s")
                polled = self.consumer.poll(timeout_ms=200, max_records=2000)
                records = [r for batch in polled.values() for r in batch]
                applied += apply_records(self.store, records)
            commit_positions(self.consumer, self.partitions)
            self.store.client.set(self.marker, int(time.time()))
            self.applied += applied
            return applied

    def close(self) -> None:
        self.consumer.close()
