"""The embedded warehouse backend: one DuckDB file with the tables of `cdpflow.schemas.tables`.

DuckDB admits one writing process, so the warehouse has a single writer: the launcher of a run
commits the run's staged tables in one transaction after the pipeline has finished, and the
readers (`cdpflow export`, `cdpflow profile`) open the file read-only. A writer that meets
another's lock waits for it (`CDPFLOW_LOCK_TIMEOUT` seconds, default 60) instead of failing.

Opened for writing, an older file is migrated first: tables added since are created, columns
added since are appended (all nullable), and rows are always written by column name, never by
position, so a column that sits elsewhere in an older file still gets its own values.
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import time
from decimal import Decimal
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import duckdb
import orjson
import pyarrow as pa

from cdpflow.core.governance import LEGACY_KEY_ID, GovernanceState, SuppressionKey, identifiers_of_raw
from cdpflow.core.segments import idempotency_key, outbox_message, segment_change
from cdpflow.core.timeutil import format_ts
from cdpflow.schemas.tables import ALL_TABLES, Table, duckdb_column
from cdpflow.core.segments import SEGMENT_CHANGES_TOPIC
from cdpflow.warehouse.base import ConcurrentWriteError, Warehouse, WarehouseError, identifier_candidates

_ARROW = {
    "STRING": pa.string(), "INT64": pa.int64(), "FLOAT64": pa.float64(),
    "NUMERIC": pa.decimal128(38, 9), "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"), "JSON": pa.string(),
}

EXPORT_FORMATS = ("jsonl", "csv", "parquet")


def _arrow_value(column, value):
    if value is None:
        return None
    if column.type == "JSON":
        return value if isinstance(value, str) and column.name == "raw" else orjson.dumps(value).decode()
    if column.type == "BOOL":
        return bool(value)
    if column.type == "NUMERIC":
        return Decimal(str(value)).quantize(Decimal("0.000000001"))
    return value


def arrow_table(table: Table, rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Rows (staged form) as an Arrow table with the contract's types."""
    arrays, fields = [], []
    for column in table.columns:
        arrow_type = _ARROW[column.type]
        if column.mode == "REPEATED":
            arrow_type = pa.list_(arrow_type)
            values = [list(r.get(column.name) or []) for r in rows]
        else:
            values = [_arrow_value(column, r.get(column.name)) for r in rows]
        arrays.append(pa.array(values, type=arrow_type))
        fields.append(pa.field(column.name, arrow_type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def read_staged(staging_dir: str, name: str) -> List[Dict[str, Any]]:
    rows = []
    for path in sorted(glob.glob(os.path.join(staging_dir, name, "*.jsonl"))):
        with open(path, "rb") as handle:
            rows.extend(orjson.loads(line) for line in handle if line.strip())
    return rows


def _exit_of_span(row: Mapping[str, Any], now_us: int, request_id: str) -> Dict[str, Any]:
    """The exit a forget sends for an open span: keyed by the span's ordinal, as the stream keys
    it (`MembershipMachine`), so a destination that hears the stream's own exit later drops it."""
    change = segment_change(row["profile_id"], row["segment"], row["source"], "exit", format_ts(now_us),
                            f"forget:{request_id}", row["model_version"])
    change["idempotency_key"] = idempotency_key(row["profile_id"], row["segment"], "exit", f"#{row['entries']}")
    change["ordinal"] = row["entries"]
    return change


# Every DuckDB database file carries this magic at byte 8 of its first block.
_DUCKDB_MAGIC = b"DUCK"


def _refuse_foreign_file(path: str) -> None:
    """Refuses a path that exists and is not a DuckDB database.

    DuckDB opens any other file (JSON lines, CSV, Parquet) as an in-memory database with a view
    over it: a run would then report its counts and save nothing, and the user's file is what the
    warehouse path named. A folder is refused too.
    """
    if os.path.isdir(path):
        raise WarehouseError(f"{path} is a folder, not a warehouse file; give a path such as {os.path.join(path, 'cdp.duckdb')}")
    if not os.path.exists(path):
        return
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[8:12] != _DUCKDB_MAGIC:
        kind = "an empty file" if not head else f"a file that is not a DuckDB database (it starts {head[:12]!r})"
        raise WarehouseError(f"{path} is not a cdpflow warehouse: it exists and is {kind}. cdpflow neither reads it "
                             "as a warehouse nor writes over it; give the path of a cdpflow warehouse, or of a file "
                             "that does not exist yet for a new one")


class DuckDBWarehouse(Warehouse):
    """A DuckDB warehouse file.

    Args:
      path: the .duckdb file (created on first write).
      read_only: open for reading only (fails if the file does not exist).
      default_region: how dead letters written before identifiers were stored are read when migrating.
      lock_timeout: seconds to wait for another process's lock (default $CDPFLOW_LOCK_TIMEOUT or 60).
    """

    def __init__(self, path: str, read_only: bool = False, default_region: str = "US",
                 lock_timeout: Optional[float] = None):
        self.path = str(path)
        self.uri = f"duckdb://{self.path}"
        if read_only and not os.path.exists(self.path):
            raise WarehouseError(f"no warehouse at {self.path}; run `cdpflow run --warehouse {self.path} ...` first")
        _refuse_foreign_file(self.path)
        deadline = time.monotonic() + (lock_timeout if lock_timeout is not None
                                       else float(os.environ.get("CDPFLOW_LOCK_TIMEOUT", "60")))
        while True:
            try:
                self.con = duckdb.connect(self.path, read_only=read_only)
                break
            except (duckdb.IOException, duckdb.ConnectionException) as err:
                # Another process holds the file (DuckDB: one writer, and no reader beside it), or
                # another connection of this process with the other mode (the stream's loader
                # thread beside its governance reads): wait for it.
                busy = "lock" in str(err).lower() or "different configuration" in str(err).lower()
                if not busy or time.monotonic() > deadline:
                    raise WarehouseError(f"cannot open {self.path}: {err}") from None
                time.sleep(0.2)
        try:
            self._refuse_foreign_database()
        except WarehouseError:
            self.con.close()
            raise
        if not read_only:
            self._migrate(default_region)

    def _refuse_foreign_database(self):
        # A DuckDB database some other tool made: adding our tables to it would mix two owners'
        # data, and reading it would show nothing. An empty one is a new warehouse.
        tables = {r[0] for r in self.con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()").fetchall()}
        if tables and not tables & (set(ALL_TABLES) | {"warehouse_meta"}):
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise WarehouseError(f"{self.path} is a DuckDB database but not a cdpflow warehouse (its tables: {shown}); "
                                 "give the path of a cdpflow warehouse or of a file that does not exist yet")

    def _migrate(self, default_region: str):
        for table in ALL_TABLES.values():
            self.con.execute(table.duckdb_ddl())
            self._add_missing_columns(table)
        # Dead letters written before they carried their identifiers: read them once from the raw
        # record, so that a forget finds them by exact identifier.
        rows = self.con.execute("SELECT dead_letter_id, raw FROM dead_letters WHERE identifiers IS NULL").fetchall()
        if rows:
            self.con.executemany("UPDATE dead_letters SET identifiers = ?::JSON WHERE dead_letter_id = ?", [
                (orjson.dumps([list(i) for i in identifiers_of_raw(raw, default_region)]).decode(), dead_letter_id)
                for dead_letter_id, raw in rows])

    def _add_missing_columns(self, table: Table):
        # A warehouse written by an older cdpflow gains the columns added since (all nullable).
        have = {r[0] for r in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]).fetchall()}
        for column in table.columns:
            if column.name not in have:
                self.con.execute(f'ALTER TABLE "{table.name}" ADD COLUMN {duckdb_column(column, nullable=True)}')

    def close(self):
        self.con.close()

    def demo_key_file(self) -> Optional[str]:
        return os.path.splitext(self.path)[0] + ".suppression.key"

    def default_identity_store(self) -> Optional[str]:
        return "sqlite://" + os.path.abspath(os.path.splitext(self.path)[0] + ".identity.sqlite")

    # Reading -------------------------------------------------------------------------------
    def has_table(self, name: str) -> bool:
        return bool(self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])

    def count(self, name: str) -> int:
        return self.con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] if self.has_table(name) else 0

    def version(self) -> int:
        if not self.has_table("warehouse_meta"):
            return 0
        row = self.con.execute("SELECT value FROM warehouse_meta WHERE name = 'version'").fetchone()
        return int(row[0]) if row else 0

    def accepted_events(self) -> List[str]:
        if not self.has_table("events"):
            return []
        return [r[0] for r in self.con.execute("SELECT raw::VARCHAR FROM events ORDER BY message_id").fetchall()]

    def identity_history(self) -> List[tuple]:
        if not self.has_table("events"):
            return []
        return [(ts, mid, tuple(tuple(i) for i in orjson.loads(ids or "[]"))) for ts, mid, ids in self.con.execute(
            "SELECT epoch_us(timestamp), message_id, identifiers::VARCHAR FROM events "
            "ORDER BY timestamp, message_id").fetchall()]

    def latest_clv_model(self) -> Optional[Dict[str, Any]]:
        if not self.has_table("clv_models"):
            return None
        rows = self.query("SELECT * FROM clv_models WHERE status = 'fitted' ORDER BY as_of DESC, fitted_at DESC LIMIT 1")
        return rows[0] if rows else None

    def latest_as_of(self) -> Optional[int]:
        if not self.has_table("profiles"):
            return None
        return self.con.execute("SELECT epoch_us(max(as_of)) FROM profiles").fetchone()[0]

    def memberships(self) -> List[Dict[str, Any]]:
        if not self.has_table("segment_memberships"):
            return []
        cur = self.con.execute(
            "SELECT profile_id, segment, source, epoch_us(entered_at), epoch_us(exited_at), model_version "
            "FROM segment_memberships ORDER BY profile_id, segment, entered_at")
        keys = ("profile_id", "segment", "source", "entered_at", "exited_at", "model_version")
        return [dict(zip(keys, row)) for row in cur.fetchall()]

    def profiles(self) -> List[Dict[str, Any]]:
        return self.query("SELECT * FROM profiles ORDER BY profile_id") if self.has_table("profiles") else []

    def open_segment_sizes(self) -> Dict[str, int]:
        if not self.has_table("segment_memberships"):
            return {}
        return dict(self.con.execute("SELECT segment, count(*) FROM segment_memberships WHERE exited_at IS NULL "
                                     "GROUP BY segment ORDER BY segment").fetchall())

    def identity_links(self) -> List[Dict[str, Any]]:
        if not self.has_table("identity_links"):
            return []
        return self.query("SELECT identifier_type, identifier_value, profile_id FROM identity_links")

    def query(self, sql: str, params: Optional[list] = None) -> List[Dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    def pending_outbox(self, topic: str = SEGMENT_CHANGES_TOPIC) -> List[Dict[str, Any]]:
        if not self.has_table("outbox"):
            return []
        return [{"idempotency_key": k, "message_key": m, "payload": orjson.loads(p)} for k, m, p in self.con.execute(
            "SELECT idempotency_key, message_key, payload::VARCHAR FROM outbox WHERE topic = ? AND published_at IS NULL "
            "ORDER BY warehouse_version, idempotency_key", [topic]).fetchall()]

    # Writing -------------------------------------------------------------------------------
    def _begin(self, expected_version: Optional[int]) -> int:
        """Starts a transaction and checks the version the caller read; returns the new version."""
        self.con.execute("BEGIN TRANSACTION")
        found = self.version()
        if expected_version is not None and found != expected_version:
            self.con.execute("ROLLBACK")
            raise ConcurrentWriteError(expected_version, found)
        return found + 1

    @contextlib.contextmanager
    def _transaction(self, expected_version: Optional[int]):
        """A write transaction that checks the version (`_begin`), raises it by one and commits;
        rolled back whole if anything in it fails. Yields the new version."""
        version = self._begin(expected_version)
        try:
            yield version
            self._set_version(version)
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    def _set_version(self, version: int):
        self.con.execute("DELETE FROM warehouse_meta WHERE name = 'version'")
        self.con.execute("INSERT INTO warehouse_meta BY NAME SELECT 'version' AS name, ? AS value, now() AS updated_at",
                         [version])

    def _insert_outbox(self, messages: Sequence[Mapping[str, Any]], version: int, now_us: int) -> int:
        rows = [{"idempotency_key": m["idempotency_key"], "topic": m.get("topic", SEGMENT_CHANGES_TOPIC),
                 "message_key": m.get("message_key"), "payload": m["payload"], "created_at": now_us,
                 "warehouse_version": version, "published_at": None} for m in messages]
        if not rows:
            return 0
        staged = arrow_table(ALL_TABLES["outbox"], rows)
        self.con.register("staged_outbox", staged)
        try:
            return self.con.execute(
                'INSERT INTO outbox BY NAME SELECT DISTINCT ON (idempotency_key) * FROM staged_outbox '
                'WHERE idempotency_key NOT IN (SELECT idempotency_key FROM outbox)').fetchone()[0]
        finally:
            self.con.unregister("staged_outbox")

    def commit(self, staging_dir: str, replace: Iterable[str], append_unique: Mapping[str, str],
               outbox: Sequence[Mapping[str, Any]] = (), expected_version: Optional[int] = None,
               suppressed=None) -> Dict[str, int]:
        """Loads a run's staged tables and its outbox messages in one transaction.

        Args:
          staging_dir: where the run staged `<table>/*.jsonl`.
          replace: tables whose content the run re-derived in full (old rows are replaced).
          append_unique: table -> key column, for tables the run appends to (rows whose key
            already exists are skipped, so replays do not repeat them).
          outbox: messages (idempotency_key, payload, message_key, topic) for the change topics.
          expected_version: the version the run read; another means another command committed.
          suppressed: identifiers -> True for a forgotten person (their old dead letters go).

        Returns:
          Rows written per table.

        Raises:
          ConcurrentWriteError: the warehouse is no longer at `expected_version` (nothing written).
        """
        written = {}
        with self._transaction(expected_version) as version:
            for name in replace:
                staged = arrow_table(ALL_TABLES[name], read_staged(staging_dir, name))
                self.con.register("staged", staged)
                self.con.execute(f'DELETE FROM "{name}"')
                # BY NAME: an older file may hold its columns in another order.
                self.con.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM staged')
                self.con.unregister("staged")
                written[name] = staged.num_rows
            for name, key in append_unique.items():
                written[name] = self._insert_new(name, key, read_staged(staging_dir, name))
            if suppressed is not None:
                written["dead_letters_forgotten"] = self._delete_dead_letters(self._dead_letters_where(suppressed))
            if outbox:
                written["outbox"] = self._insert_outbox(outbox, version, int(time.time() * 1_000_000))
        return written

    # The stream's loader -----------------------------------------------------------------
    def stream_offsets(self) -> Dict[tuple, int]:
        """(topic, partition) -> the first offset the loader has not loaded yet."""
        if not self.has_table("stream_offsets"):
            return {}
        return {(t, p): o for t, p, o in self.con.execute(
            "SELECT topic, \"partition\", next_offset FROM stream_offsets").fetchall()}

    def load_stream_batch(self, records: Sequence[Mapping[str, Any]], identity: Mapping[str, Any],
                          now_us: int, suppressed=None) -> Dict[str, int]:
        """Loads what the stream put on its topics, with the offsets, in one transaction.

        Args:
          records: {"topic", "partition", "offset", "key", "value" (parsed JSON or None), "order"
            (of a profile record: (as_of, tombstone, emitted at); newer wins)}
            in offset order per partition. Records below the stored offset of their partition were
            loaded before (by this loader before a crash, or by another) and are skipped.
          identity: the identity store's read-out: "links", "merges", "conflicts" (whole tables),
            "profiles" (profile ids it knows) and "final" (a function: message ids -> their
            current profile).
          suppressed: identifiers -> True for a forgotten person (their rows are not loaded).

        Returns:
          Rows written or changed per table, and "skipped" (records loaded before).
        """
        from cdpflow.warehouse.loading import plan_stream_batch
        counts: Dict[str, int] = {}
        with self._transaction(None):
            plan = plan_stream_batch(records, identity, self.stream_offsets(), suppressed)
            counts["skipped"] = plan.skipped
            # Accepted events: new message ids only, each with the profile it belongs to now.
            if plan.events:
                counts["events"] = self._insert_new("events", "message_id", plan.events)
            # Identity tables: the store's read-out replaces them (the store is the graph).
            for name in ("identity_links", "profile_merges", "identity_conflicts"):
                rows = identity[{"identity_links": "links", "profile_merges": "merges",
                                 "identity_conflicts": "conflicts"}[name]]
                self.con.register("staged", arrow_table(ALL_TABLES[name], rows))
                self.con.execute(f'DELETE FROM "{name}"')
                self.con.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM staged')
                self.con.unregister("staged")
                counts[name] = len(rows)
            # Events of profiles a merge absorbed (or a split moved) follow their identifiers.
            moved = self.con.execute("SELECT message_id FROM events WHERE profile_id NOT IN "
                                     "(SELECT DISTINCT profile_id FROM identity_links)").fetchall()
            if moved:
                final = identity["final"]([m for m, in moved])
                self.con.executemany("UPDATE events SET profile_id = ? WHERE message_id = ?",
                                     [(pid, mid) for mid, pid in final.items() if pid is not None])
                counts["events_moved"] = len(moved)
            # Profiles: the newest row per profile wins; a tombstone deletes; a profile the
            # identity store no longer knows (forgotten, absorbed) is not loaded.
            if plan.gone:
                self.con.executemany("DELETE FROM profiles WHERE profile_id = ?", [(p,) for p in plan.gone])
            if plan.tombstones:
                # a tombstone that overtook a newer row on the way deletes nothing
                self.con.executemany("DELETE FROM profiles WHERE profile_id = ? AND as_of <= make_timestamp(?)",
                                     plan.tombstones)
            if plan.upserts:
                self.con.register("staged", arrow_table(ALL_TABLES["profiles"], plan.upserts))
                self.con.execute("DELETE FROM profiles WHERE profile_id IN (SELECT s.profile_id FROM staged s "
                                 "JOIN profiles p USING (profile_id) WHERE s.as_of > p.as_of OR (s.as_of = p.as_of AND s.updated_at >= p.updated_at))")
                self.con.execute("INSERT INTO profiles BY NAME SELECT * FROM staged WHERE profile_id NOT IN "
                                 "(SELECT profile_id FROM profiles)")
                self.con.unregister("staged")
            counts["profiles"], counts["profiles_deleted"] = len(plan.upserts), len(plan.gone) + len(plan.tombstones)
            # Segment changes, once each by idempotency key (kept in the outbox as published).
            counts["segment_changes"] = self._apply_changes(plan.changes, now_us)
            # Lifecycle transitions: added, or taken back when a late event superseded them.
            for row in plan.transitions:
                self.con.execute("DELETE FROM lifecycle_transitions WHERE profile_id = ? AND transitioned_at = "
                                 "make_timestamp(?) AND to_stage = ?",
                                 [row["profile_id"], row["transitioned_at"], row["to_stage"]])
                if not row.get("retracted"):
                    self._insert_new("lifecycle_transitions", None, [row])
            counts["lifecycle_transitions"] = len(plan.transitions)
            counts["dead_letters"] = self._insert_new("dead_letters", "dead_letter_id", plan.letters) if plan.letters else 0
            # The offsets, in the same transaction as the rows they produced.
            for (topic, partition), offset in plan.ends.items():
                self.con.execute('DELETE FROM stream_offsets WHERE topic = ? AND "partition" = ?', [topic, partition])
                self.con.execute('INSERT INTO stream_offsets BY NAME SELECT ? AS topic, ? AS "partition", '
                                 '? AS next_offset, make_timestamp(?) AS updated_at', [topic, partition, offset, now_us])
        return counts

    def _insert_new(self, name: str, key: Optional[str], rows: Sequence[Mapping[str, Any]]) -> int:
        """Inserts rows (staged form); with a key, only those whose key is not in the table yet."""
        self.con.register("staged_rows", arrow_table(ALL_TABLES[name], rows))
        try:
            before = self.count(name)
            if key is None:
                self.con.execute(f'INSERT INTO "{name}" BY NAME SELECT * FROM staged_rows')
            else:
                self.con.execute(f'INSERT INTO "{name}" BY NAME SELECT DISTINCT ON ("{key}") * FROM staged_rows '
                                 f'WHERE "{key}" NOT IN (SELECT "{key}" FROM "{name}")')
            return self.count(name) - before
        finally:
            self.con.unregister("staged_rows")

    def _apply_changes(self, changes: Sequence[Mapping[str, Any]], now_us: int) -> int:
        """Applies segment changes to the membership spans, each idempotency key once, in order."""
        from cdpflow.core.timeutil import parse_ts
        applied = 0
        ordered = sorted(changes, key=lambda c: (c["profile_id"], c["segment"], c.get("ordinal", 0),
                                                  c["direction"] == "exit"))
        for change in ordered:
            key = change["idempotency_key"]
            if self.con.execute("SELECT count(*) FROM outbox WHERE idempotency_key = ?", [key]).fetchone()[0]:
                continue
            at = parse_ts(change["at"])
            if change["direction"] == "enter":
                self.con.execute(
                    "INSERT INTO segment_memberships BY NAME SELECT ? AS profile_id, ? AS segment, ? AS source, "
                    "make_timestamp(?) AS entered_at, NULL AS exited_at, ? AS model_version WHERE NOT EXISTS ("
                    "SELECT 1 FROM segment_memberships WHERE profile_id = ? AND segment = ? AND exited_at IS NULL)",
                    [change["profile_id"], change["segment"], change["source"], at, change.get("model_version"),
                     change["profile_id"], change["segment"]])
            else:
                closed = self.con.execute(
                    "UPDATE segment_memberships SET exited_at = make_timestamp(?) WHERE profile_id = ? "
                    "AND segment = ? AND exited_at IS NULL", [at, change["profile_id"], change["segment"]]).fetchone()[0]
                if not closed:
                    continue  # nothing open (a forget closed it, or it never loaded): nothing to record
            self.con.execute(
                "INSERT INTO outbox BY NAME SELECT ? AS idempotency_key, ? AS topic, ? AS message_key, ?::JSON AS payload, "
                "make_timestamp(?) AS created_at, ? AS warehouse_version, make_timestamp(?) AS published_at",
                [key, SEGMENT_CHANGES_TOPIC, change["profile_id"], orjson.dumps(change).decode(), now_us,
                 self.version() + 1, now_us])
            applied += 1
        return applied

    def mark_published(self, idempotency_keys: Sequence[str], now_us: int) -> None:
        if not idempotency_keys:
            return
        self.con.execute("BEGIN TRANSACTION")
        try:
            self.con.executemany("UPDATE outbox SET published_at = make_timestamp(?) WHERE idempotency_key = ?",
                                 [(now_us, k) for k in idempotency_keys])
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise

    # Export and look-up ----------------------------------------------------------------------
    def export(self, table: str, fmt: str, out: str) -> int:
        """Copies a table to a file as jsonl, csv or parquet; returns the row count."""
        if table not in ALL_TABLES:
            raise WarehouseError(f"unknown table {table!r}; tables: {', '.join(ALL_TABLES)}")
        if fmt not in EXPORT_FORMATS:
            raise WarehouseError(f"unknown format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
        options = {"jsonl": "FORMAT JSON", "csv": "FORMAT CSV, HEADER", "parquet": "FORMAT PARQUET"}[fmt]
        escaped = out.replace("'", "''")
        self.con.execute(f"COPY (SELECT * FROM \"{table}\") TO '{escaped}' ({options})")
        return self.count(table)

    @staticmethod
    def _candidates(identifier: str):
        return identifier_candidates(identifier)

    def profiles_holding(self, identifier: str) -> List[str]:
        """Every profile holding an identifier that exactly equals `identifier` (typed, or bare and normalised)."""
        id_type, values = self._candidates(identifier)
        found = set()
        for value in values:
            sql = "SELECT DISTINCT profile_id FROM identity_links WHERE identifier_value = ?"
            params = [value]
            if id_type:
                sql += " AND identifier_type = ?"
                params.append(id_type)
            found.update(r[0] for r in self.con.execute(sql, params).fetchall())
        return sorted(found)

    def resolve_profile_id(self, identifier: str) -> Optional[str]:
        """The current profile for an identifier ("type:value" or a bare value) or a profile id.

        An absorbed profile id answers with its survivor (merges that were undone are not followed).
        """
        found = self.profiles_holding(identifier)
        if found:
            return found[0]
        profile_id = identifier
        for _ in range(1000):  # merges form chains survivor <- absorbed; follow them to the end
            row = self.con.execute(
                "SELECT survivor_id FROM profile_merges WHERE absorbed_id = ? AND undone_at IS NULL "
                "ORDER BY merged_at DESC LIMIT 1", [profile_id]).fetchone()
            if row is None:
                break
            profile_id = row[0]
        exists = self.con.execute("SELECT count(*) FROM profiles WHERE profile_id = ?", [profile_id]).fetchone()[0]
        return profile_id if exists else None

    def profile(self, identifier: str) -> Optional[Dict[str, Any]]:
        """One unified profile: its row, identifiers, open segments and merges; None if unknown."""
        profile_id = self.resolve_profile_id(identifier)
        if profile_id is None:
            return None
        rows = self.query("SELECT * FROM profiles WHERE profile_id = ?", [profile_id])
        return {
            "profile": rows[0] if rows else {"profile_id": profile_id},
            "identifiers": self.query(
                "SELECT identifier_type, identifier_value, first_seen, last_seen FROM identity_links "
                "WHERE profile_id = ? ORDER BY identifier_type, identifier_value", [profile_id]),
            "segments": self.query(
                "SELECT segment, source, entered_at, model_version FROM segment_memberships "
                "WHERE profile_id = ? AND exited_at IS NULL ORDER BY segment", [profile_id]),
            "merges": self.query(
                "SELECT survivor_id, absorbed_id, cause_message_id, reason, merged_at FROM profile_merges "
                "WHERE survivor_id = ? ORDER BY merged_at", [profile_id]),
        }

    # Identity governance -------------------------------------------------------------------
    def governance(self) -> GovernanceState:
        suppressed = frozenset((key_id or LEGACY_KEY_ID, h) for h, key_id in self.con.execute(
            "SELECT identifier_hash, key_id FROM identity_suppressions").fetchall())
        separations = frozenset(((a, b), (c, d)) for a, b, c, d in self.con.execute(
            "SELECT left_type, left_value, right_type, right_value FROM identity_separations").fetchall())
        names = frozenset(((t, v), pid, at) for t, v, pid, at in self.con.execute(
            "SELECT identifier_type, identifier_value, profile_id, epoch_us(created_at) FROM identity_names").fetchall()
        ) if self.has_table("identity_names") else frozenset()  # (a warehouse older than names, opened read-only)
        return GovernanceState(suppressed, separations, names)

    def forget(self, identifier: str, now_us: int, key: SuppressionKey,
               expected_version: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """Deletes the person holding `identifier` everywhere in the warehouse; suppresses their identifiers.

        `identifier` is `type:value` (normalised by type), an exact bare value (refused if it
        names several profiles) or a profile id. Gone: the profile's row, links, events, merges,
        conflicts, lifecycle transitions, memberships, the dead letters that carry one of their
        identifiers (matched exactly, never by text search) and their outbox messages. The open
        memberships' exits are written to the outbox in the same transaction, so the destinations
        drop the person too.

        Returns:
          What was deleted (counts, the identifiers, the closed memberships), or None if no profile holds it.

        Raises:
          WarehouseError: a bare value that names several profiles.
          ConcurrentWriteError: the warehouse is no longer at `expected_version`.
        """
        profile_id = self.forget_target(identifier)
        if profile_id is not None:
            identifiers = [(r["identifier_type"], r["identifier_value"]) for r in self.query(
                "SELECT identifier_type, identifier_value FROM identity_links WHERE profile_id = ?", [profile_id])]
            closed = self.query("SELECT m.profile_id, m.segment, m.source, m.model_version, (SELECT count(*) FROM "
                                "segment_memberships s WHERE s.profile_id = m.profile_id AND s.segment = m.segment) "
                                "AS entries FROM segment_memberships m WHERE m.profile_id = ? AND m.exited_at IS NULL",
                                [profile_id])
            absorbed = [r[0] for r in self.con.execute(
                "SELECT absorbed_id FROM profile_merges WHERE survivor_id = ?", [profile_id]).fetchall()]
            ids = [profile_id, *absorbed]
        else:
            # No profile, but a typed identifier may still sit in dead letters (every event of the
            # person refused): those go, and the identifier is suppressed for later arrivals.
            id_type, values = self._candidates(identifier)
            if id_type is None:
                return None
            identifiers = [(id_type, values[0])]
            if not self._dead_letters_holding({identifiers[0]}):
                return None
            closed, ids = [], []
        request_id = hashlib.sha256(f"{profile_id or identifiers[0]}\x00{now_us}".encode()).hexdigest()[:16]
        wanted = {tuple(i) for i in identifiers}
        counts = {}
        with self._transaction(expected_version) as version:
            for identifier_pair in identifiers:
                self._insert_suppression(key.hash(identifier_pair), now_us, request_id, key.key_id)
            marks = ",".join("?" * len(ids))
            for table in ("events", "identity_links", "profiles", "segment_memberships", "lifecycle_transitions"):
                counts[table] = self.con.execute(
                    f'DELETE FROM "{table}" WHERE profile_id IN ({marks})', ids).fetchone()[0] if ids else 0
            counts["profile_merges"] = self.con.execute(
                f"DELETE FROM profile_merges WHERE survivor_id IN ({marks}) OR absorbed_id IN ({marks})",
                ids + ids).fetchone()[0] if ids else 0
            conflicts = 0
            for id_type, value in identifiers:
                conflicts += self.con.execute("DELETE FROM identity_conflicts WHERE identifier_type = ? AND "
                                              "identifier_value = ?", [id_type, value]).fetchone()[0]
            if ids:
                conflicts += self.con.execute(
                    f"DELETE FROM identity_conflicts WHERE list_has_any(profiles, [{marks}])", ids).fetchone()[0]
            counts["identity_conflicts"] = conflicts
            # Governance rows that hold their identifiers in the clear go too (the hashes keep the
            # person out; another identifier's name stays, so no profile takes a forgotten id).
            counts["identity_separations"] = counts["identity_names"] = 0
            for id_type, value in identifiers:
                counts["identity_separations"] += self.con.execute(
                    "DELETE FROM identity_separations WHERE (left_type = ? AND left_value = ?) OR "
                    "(right_type = ? AND right_value = ?)", [id_type, value, id_type, value]).fetchone()[0]
                counts["identity_names"] += self.con.execute(
                    "DELETE FROM identity_names WHERE identifier_type = ? AND identifier_value = ?",
                    [id_type, value]).fetchone()[0]
            counts["dead_letters"] = self._delete_dead_letters(self._dead_letters_holding(wanted))
            # Their messages go too, delivered or not (the exits below tell the destinations).
            counts["outbox"] = self.con.execute(
                f"DELETE FROM outbox WHERE message_key IN ({marks})", ids).fetchone()[0] if ids else 0
            exits = [outbox_message(_exit_of_span(row, now_us, request_id)) for row in closed]
            self._insert_outbox(exits, version, now_us)
        return {"profile_id": profile_id, "request_id": request_id, "identifiers": identifiers,
                "deleted": counts, "closed_memberships": closed, "exits": len(exits)}

    def identifier_of(self, identifier: str) -> Optional[tuple]:
        """(type, normalised value) of an identifier as a user types it: `type:value`, or a bare
        value one link holds; None if it names nothing (or several)."""
        id_type, values = self._candidates(identifier)
        if id_type is not None:
            return (id_type, values[0])
        found = set()
        for value in values:
            found.update(tuple(r) for r in self.con.execute(
                "SELECT identifier_type, identifier_value FROM identity_links WHERE identifier_value = ?", [value]).fetchall())
        return found.pop() if len(found) == 1 else None

    def suppress(self, identifiers, now_us: int, key: SuppressionKey) -> int:
        """Keeps keyed hashes of identifiers (a person forgotten before the warehouse held them); returns how many were new."""
        added = 0
        with self._transaction(None):
            request_id = hashlib.sha256(f"{sorted(identifiers)}\x00{now_us}".encode()).hexdigest()[:16]
            for identifier in identifiers:
                added += self._insert_suppression(key.hash(tuple(identifier)), now_us, request_id, key.key_id)
        return added

    def _insert_suppression(self, digest: str, now_us: int, request_id: str, key_id: str) -> int:
        """Keeps one identifier's keyed hash (once); returns 1 if it was new."""
        return self.con.execute(
            "INSERT INTO identity_suppressions BY NAME SELECT ? AS identifier_hash, make_timestamp(?) AS suppressed_at, "
            "? AS request_id, ? AS key_id WHERE NOT EXISTS (SELECT 1 FROM identity_suppressions WHERE identifier_hash = ?)",
            [digest, now_us, request_id, key_id, digest]).fetchone()[0]

    def _dead_letters_where(self, test) -> List[str]:
        """Ids of the dead letters whose stored identifiers ([(type, normalised value)]) pass `test`."""
        return [dead_letter_id for dead_letter_id, found in self.con.execute(
            "SELECT dead_letter_id, identifiers::VARCHAR FROM dead_letters WHERE identifiers IS NOT NULL").fetchall()
            if test([tuple(i) for i in orjson.loads(found)])]

    def _dead_letters_holding(self, wanted) -> List[str]:
        """Ids of the dead letters that carry one of these (type, normalised value) identifiers exactly."""
        return self._dead_letters_where(lambda identifiers: any(i in wanted for i in identifiers))

    def _delete_dead_letters(self, dead_letter_ids: Sequence[str]) -> int:
        if dead_letter_ids:
            self.con.executemany("DELETE FROM dead_letters WHERE dead_letter_id = ?", [(d,) for d in dead_letter_ids])
        return len(dead_letter_ids)

    def add_separations(self, pairs, now_us: int, reason: str, expected_version: Optional[int] = None,
                        names=()) -> int:
        """Records pairs of identifiers that must stay in different profiles, and the names the
        split gave founders ((identifier, profile id, at µs), kept once); returns how many pairs were new."""
        added = 0
        with self._transaction(expected_version):
            for (t, v), pid, at in names:
                self.con.execute(
                    "INSERT INTO identity_names BY NAME SELECT ? AS identifier_type, ? AS identifier_value, ? AS "
                    "profile_id, make_timestamp(?) AS created_at, ? AS reason WHERE NOT EXISTS (SELECT 1 FROM "
                    "identity_names WHERE identifier_type = ? AND identifier_value = ? AND profile_id = ? AND "
                    "created_at = make_timestamp(?))", [t, v, pid, at, reason, t, v, pid, at])
            for (lt, lv), (rt, rv) in pairs:
                exists = self.con.execute(
                    "SELECT count(*) FROM identity_separations WHERE left_type = ? AND left_value = ? "
                    "AND right_type = ? AND right_value = ?", [lt, lv, rt, rv]).fetchone()[0]
                if not exists:
                    self.con.execute("INSERT INTO identity_separations BY NAME SELECT ? AS left_type, ? AS left_value, "
                                     "? AS right_type, ? AS right_value, make_timestamp(?) AS created_at, ? AS reason",
                                     [lt, lv, rt, rv, now_us, reason])
                    added += 1
        return added

    def merges_into(self, profile_id: str) -> List[Dict[str, Any]]:
        """Merges (not undone) whose survivor is, or was absorbed into, this profile."""
        found, frontier = [], [profile_id]
        while frontier:
            current = frontier.pop()
            rows = self.query("SELECT survivor_id, absorbed_id, cause_message_id, reason FROM profile_merges "
                              "WHERE survivor_id = ? AND undone_at IS NULL", [current])
            found.extend(rows)
            frontier.extend(r["absorbed_id"] for r in rows)
        return found

