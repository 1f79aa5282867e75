"""The embedded warehouse: one DuckDB file with the tables of `cdpflow.schemas.tables`.

DuckDB admits one writing process, so the warehouse has a single writer: the launcher of a run
commits the run's staged tables in one transaction after the pipeline has finished, and the
readers (`cdpflow export`, `cdpflow profile`) open the file read-only.
"""
from __future__ import annotations

import glob
import hashlib
import os
from decimal import Decimal
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import duckdb
import orjson
import pyarrow as pa

from cdpflow.core.identity import identifier_hash
from cdpflow.core.normalize import normalize_email, normalize_phone
from cdpflow.schemas.tables import ALL_TABLES, Table, duckdb_column

_ARROW = {
    "STRING": pa.string(), "INT64": pa.int64(), "FLOAT64": pa.float64(),
    "NUMERIC": pa.decimal128(38, 9), "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"), "JSON": pa.string(),
}

EXPORT_FORMATS = ("jsonl", "csv", "parquet")


class WarehouseError(RuntimeError):
    """The warehouse cannot be opened or does not hold what was asked for."""


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


class DuckDBWarehouse:
    """A DuckDB warehouse file.

    Args:
      path: the .duckdb file (created on first write).
      read_only: open for reading only (fails if the file does not exist).
    """

    def __init__(self, path: str, read_only: bool = False):
        self.path = path
        if read_only and not os.path.exists(path):
            raise WarehouseError(f"no warehouse at {path}; run `cdpflow run --warehouse {path} ...` first")
        try:
            self.con = duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as err:
            raise WarehouseError(f"cannot open {path}: {err}") from None
        if not read_only:
            for table in ALL_TABLES.values():
                self.con.execute(table.duckdb_ddl())
                self._add_missing_columns(table)

    def _add_missing_columns(self, table: Table):
        # A warehouse written by an older cdpflow gains the columns added since (all nullable).
        have = {r[0] for r in self.con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ?", [table.name]).fetchall()}
        for column in table.columns:
            if column.name not in have:
                self.con.execute(f'ALTER TABLE "{table.name}" ADD COLUMN {duckdb_column(column, nullable=True)}')

    def close(self):
        self.con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # Reading -------------------------------------------------------------------------------
    def has_table(self, name: str) -> bool:
        return bool(self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0])

    def count(self, name: str) -> int:
        return self.con.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] if self.has_table(name) else 0

    def write_replay(self, out_path: str) -> int:
        """Writes the raw payload of every accepted event, one per line, for a replay; returns how many."""
        if not self.has_table("events"):
            return 0
        rows = self.con.execute("SELECT raw::VARCHAR FROM events ORDER BY message_id").fetchall()
        with open(out_path, "w", encoding="utf-8") as handle:
            for (raw,) in rows:
                handle.write(raw.replace("\n", " ") + "\n")
        return len(rows)

    def latest_clv_model(self) -> Optional[Dict[str, Any]]:
        """The newest fitted `clv_models` row (parameters for scoring), or None."""
        if not self.has_table("clv_models"):
            return None
        rows = self.query("SELECT * FROM clv_models WHERE status = 'fitted' ORDER BY as_of DESC, fitted_at DESC LIMIT 1")
        return rows[0] if rows else None

    def memberships(self) -> List[Dict[str, Any]]:
        """The segment_memberships rows in staged form (timestamps as microseconds)."""
        if not self.has_table("segment_memberships"):
            return []
        cur = self.con.execute(
            "SELECT profile_id, segment, source, epoch_us(entered_at), epoch_us(exited_at), model_version "
            "FROM segment_memberships ORDER BY profile_id, segment, entered_at")
        keys = ("profile_id", "segment", "source", "entered_at", "exited_at", "model_version")
        return [dict(zip(keys, row)) for row in cur.fetchall()]

    def query(self, sql: str, params: Optional[list] = None) -> List[Dict[str, Any]]:
        cur = self.con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # Writing -------------------------------------------------------------------------------
    def commit(self, staging_dir: str, replace: Iterable[str], append_unique: Mapping[str, str]) -> Dict[str, int]:
        """Loads a run's staged tables in one transaction.

        Args:
          staging_dir: where the run staged `<table>/*.jsonl`.
          replace: tables whose content the run re-derived in full (old rows are replaced).
          append_unique: table -> key column, for tables the run appends to (rows whose key
            already exists are skipped, so replays do not repeat them).

        Returns:
          Rows written per table.
        """
        written = {}
        self.con.execute("BEGIN TRANSACTION")
        try:
            for name in replace:
                staged = arrow_table(ALL_TABLES[name], read_staged(staging_dir, name))
                self.con.register("staged", staged)
                self.con.execute(f'DELETE FROM "{name}"')
                self.con.execute(f'INSERT INTO "{name}" SELECT * FROM staged')
                self.con.unregister("staged")
                written[name] = staged.num_rows
            for name, key in append_unique.items():
                staged = arrow_table(ALL_TABLES[name], read_staged(staging_dir, name))
                self.con.register("staged", staged)
                before = self.count(name)
                self.con.execute(
                    f'INSERT INTO "{name}" SELECT DISTINCT ON ("{key}") * FROM staged '
                    f'WHERE "{key}" NOT IN (SELECT "{key}" FROM "{name}")')
                self.con.unregister("staged")
                written[name] = self.count(name) - before
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        return written

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

    def resolve_profile_id(self, identifier: str) -> Optional[str]:
        """The current profile for an identifier ("type:value" or a bare value) or a profile id.

        An absorbed profile id answers with its survivor.
        """
        candidates = [identifier]
        id_type = None
        if ":" in identifier and not identifier.startswith("p_"):
            id_type, value = identifier.split(":", 1)
            candidates = [value]
        candidates += [c for c in (normalize_email(candidates[0]), normalize_phone(candidates[0])) if c]
        for value in candidates:
            sql = "SELECT DISTINCT profile_id FROM identity_links WHERE identifier_value = ?"
            params = [value]
            if id_type:
                sql += " AND identifier_type = ?"
                params.append(id_type)
            found = self.con.execute(sql, params).fetchall()
            if found:
                return sorted(r[0] for r in found)[0]
        profile_id = identifier
        for _ in range(1000):  # merges form chains survivor <- absorbed; follow them to the end
            row = self.con.execute(
                "SELECT survivor_id FROM profile_merges WHERE absorbed_id = ?", [profile_id]).fetchone()
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
    def suppressions(self) -> List[str]:
        """Hashes of forgotten identifiers."""
        return [r[0] for r in self.con.execute("SELECT identifier_hash FROM identity_suppressions").fetchall()]

    def separations(self) -> List[tuple]:
        """Pairs of identifiers that manual splits keep apart: [((type, value), (type, value)), ...]."""
        return [((a, b), (c, d)) for a, b, c, d in self.con.execute(
            "SELECT left_type, left_value, right_type, right_value FROM identity_separations").fetchall()]

    def forget(self, identifier: str, now_us: int) -> Optional[Dict[str, Any]]:
        """Deletes the profile holding `identifier`, its links and its events; suppresses its identifiers.

        Dead letters whose raw text contains one of the identifiers go too. The open segment
        memberships are closed and returned, so that the caller can publish their exits (the
        destinations must drop the person as well).

        Returns:
          What was deleted (counts, the closed memberships), or None if no profile holds it.
        """
        profile_id = self.resolve_profile_id(identifier)
        if profile_id is None:
            return None
        identifiers = [(r["identifier_type"], r["identifier_value"]) for r in self.query(
            "SELECT identifier_type, identifier_value FROM identity_links WHERE profile_id = ?", [profile_id])]
        request_id = hashlib.sha256(f"{profile_id}\x00{now_us}".encode()).hexdigest()[:16]
        closed = self.query("SELECT profile_id, segment, source, model_version FROM segment_memberships "
                            "WHERE profile_id = ? AND exited_at IS NULL", [profile_id])
        counts = {}
        self.con.execute("BEGIN TRANSACTION")
        try:
            for id_type, value in identifiers:
                self.con.execute("INSERT INTO identity_suppressions SELECT ?, make_timestamp(?), ? "
                                 "WHERE NOT EXISTS (SELECT 1 FROM identity_suppressions WHERE identifier_hash = ?)",
                                 [identifier_hash((id_type, value)), now_us, request_id,
                                  identifier_hash((id_type, value))])
            for table in ("events", "identity_links", "profiles", "segment_memberships"):
                counts[table] = self.con.execute(f'DELETE FROM "{table}" WHERE profile_id = ?', [profile_id]).fetchone()[0]
            counts["profile_merges"] = self.con.execute(
                "DELETE FROM profile_merges WHERE survivor_id = ? OR absorbed_id = ?", [profile_id, profile_id]).fetchone()[0]
            letters = 0
            for _, value in identifiers:
                letters += self.con.execute("DELETE FROM dead_letters WHERE contains(lower(raw), lower(?))", [value]).fetchone()[0]
            counts["dead_letters"] = letters
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        return {"profile_id": profile_id, "request_id": request_id, "identifiers": len(identifiers),
                "deleted": counts, "closed_memberships": closed}

    def add_separations(self, pairs, now_us: int, reason: str) -> int:
        """Records pairs of identifiers that must stay in different profiles; returns how many were new."""
        added = 0
        for (lt, lv), (rt, rv) in pairs:
            exists = self.con.execute(
                "SELECT count(*) FROM identity_separations WHERE left_type = ? AND left_value = ? "
                "AND right_type = ? AND right_value = ?", [lt, lv, rt, rv]).fetchone()[0]
            if not exists:
                self.con.execute("INSERT INTO identity_separations VALUES (?, ?, ?, ?, make_timestamp(?), ?)",
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
