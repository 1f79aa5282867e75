"""The profile store of the embedded demo: the profile API over a DuckDB warehouse, without Redis or Kafka.

    CDPFLOW_DEMO=1 cdpflow serve api --warehouse out/cdp.duckdb

It answers what `RedisProfileStore` answers (a profile by id, the profile an identifier belongs
to, its open segments, segments with their members) from a snapshot of the warehouse's
`profiles`, `identity_links` and open `segment_memberships`. DuckDB lets one process write a file
and no other read it meanwhile, so the API does not hold the warehouse open: it reads the
snapshot and closes it, and reads again when the file has changed (checked at most once a
second), keeping the snapshot it has while a `cdpflow run` holds the file.

A forget (`DELETE /v1/profiles/{id}`) runs what `cdpflow forget` runs, directly: the warehouse,
its identity stores and its outbox forget the person (`cdpflow.forget`), every configured
destination is asked to delete the member, and the snapshot is read again.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Any, Dict, List, Mapping, Optional, Tuple

from cdpflow.forget import profile_row
from cdpflow.warehouse import open_warehouse, warehouse_path
from cdpflow.warehouse.base import WarehouseError

LOOKUP_KINDS = ("email", "phone", "user_id", "anonymous_id", "loyalty_id")


class _Snapshot:
    def __init__(self, profiles: Dict[str, Dict[str, Any]], links: Dict[Tuple[str, str], str],
                 segments: Dict[str, List[str]], members: Dict[str, List[str]]):
        self.profiles, self.links, self.segments, self.members = profiles, links, segments, members


class WarehouseProfileStore:
    """Reads like `RedisProfileStore`; every identifier type is a lookup (from `identity_links`)."""

    lookup_kinds = LOOKUP_KINDS

    def __init__(self, warehouse: str, config: Mapping[str, Any], recheck_s: float = 1.0):
        self.warehouse, self.config, self.recheck_s = warehouse, config, recheck_s
        self.path = warehouse_path(warehouse)
        if self.path is None or not os.path.exists(self.path):
            raise WarehouseError(f"no warehouse at {warehouse}: run `cdpflow run --warehouse {warehouse} ...` first")
        self._lock = threading.Lock()
        self._checked = 0.0
        self._stamp = self._file_stamp()
        self._snapshot = self._read()

    # ------------------------------------------------------------------ the snapshot
    def _file_stamp(self) -> Tuple[int, ...]:
        return tuple(os.stat(p).st_mtime_ns if os.path.exists(p) else 0 for p in (self.path, self.path + ".wal"))

    def _read(self) -> _Snapshot:
        with open_warehouse(self.warehouse, read_only=True, lock_timeout=2.0) as wh:
            profiles = {row["profile_id"]: profile_row(row) for row in wh.profiles()}
            links = {(r["identifier_type"], r["identifier_value"]): r["profile_id"] for r in wh.identity_links()}
            segments: Dict[str, List[str]] = {}
            members: Dict[str, List[str]] = {}
            for row in wh.memberships():
                if row["exited_at"] is None and row["profile_id"] in profiles:
                    segments.setdefault(row["profile_id"], []).append(row["segment"])
                    members.setdefault(row["segment"], []).append(row["profile_id"])
        for names in segments.values():
            names.sort()
        for ids in members.values():
            ids.sort()
        return _Snapshot(profiles, links, segments, members)

    def refresh(self, force: bool = False) -> None:
        """Reads the warehouse again if its file changed (at most once per `recheck_s`, unless forced)."""
        now = time.monotonic()
        if not force and now - self._checked < self.recheck_s:
            return
        with self._lock:
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp and not force:
                return
            try:
                self._snapshot = self._read()
                self._stamp = stamp
            except WarehouseError:
                pass  # a run holds the file: keep answering from the snapshot, and look again later

    def ping(self) -> bool:
        return os.path.exists(self.path)

    def close(self) -> None:
        pass  # nothing held open

    # ------------------------------------------------------------------ reads (RedisProfileStore's)
    def profile(self, profile_id: str) -> Optional[Dict[str, Any]]:
        self.refresh()
        return self._snapshot.profiles.get(profile_id)

    def profile_and_segments(self, profile_id: str) -> Tuple[Optional[Dict[str, Any]], List[str]]:
        self.refresh()
        snapshot = self._snapshot  # one snapshot for both
        return snapshot.profiles.get(profile_id), list(snapshot.segments.get(profile_id, ()))

    def lookup(self, kind: str, value: str) -> Optional[str]:
        if kind not in LOOKUP_KINDS:
            raise ValueError(f"lookup by {kind!r}: one of {', '.join(LOOKUP_KINDS)}")
        self.refresh()
        return self._snapshot.links.get((kind, value))

    def segments_of(self, profile_id: str) -> List[str]:
        return list(self._snapshot.segments.get(profile_id, ()))

    def segment_names(self) -> List[str]:
        self.refresh()
        return sorted(self._snapshot.members)

    def segment_size(self, segment: str) -> int:
        return len(self._snapshot.members.get(segment, ()))

    def members(self, segment: str, after: Optional[str] = None, limit: int = 100) -> List[str]:
        import bisect
        ids = self._snapshot.members.get(segment, [])
        start = bisect.bisect_right(ids, after) if after else 0
        return ids[start:start + limit]

    # ------------------------------------------------------------------ the forget
    def forget(self, profile_id: str) -> Dict[str, Any]:
        """Forgets the person everywhere the embedded demo keeps them (see the module docstring).

        Returns the warehouse's account with `unconfirmed`: destinations that did not confirm."""
        from cdpflow.activation.forget import forget_in_activation
        from cdpflow.forget import forget_person
        with self._lock:
            done = forget_person(self.warehouse, profile_id, self.config)
        if done is None:
            return {"profile_id": profile_id, "unconfirmed": []}
        gone = forget_in_activation(profile_id, self.config, profile=done["profile"], segments=done["segments"])
        self.refresh(force=True)
        done["unconfirmed"] = gone.unconfirmed
        return done
