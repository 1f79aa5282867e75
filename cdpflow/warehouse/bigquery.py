"""The BigQuery warehouse backend: `bigquery://PROJECT/DATASET`, the same table contract as DuckDB's.

    cdpflow bq init --warehouse bigquery://my-project/cdp           # dataset and tables, idempotent
    cdpflow run --warehouse bigquery://my-project/cdp ...            # a batch run commits here
    bigquery://local/cdp?endpoint=http://127.0.0.1:9050              # the stack's emulator
                                                                     # (or CDPFLOW_BIGQUERY_ENDPOINT)

Through the official client (google-cloud-bigquery): Beam's WriteToBigQuery has no endpoint
option, so it cannot be proven against an emulator, and the commit below needs a transaction
across tables anyway. Against real BigQuery the client uses Application Default Credentials;
with an endpoint, anonymous ones (the emulator).

Tables come from `cdpflow.schemas.tables` (`bigquery_schema`): `events` partitioned by event
day and clustered by profile_id and event, `dead_letters` partitioned by the day received; the
tables looked up by profile are clustered by it. `init` creates what is missing and adds the
columns a newer contract has (never drops or retypes one).

How the `Warehouse` contract maps (docs/bigquery.md):
- a commit loads each staged table into a staging table of its own (a load job: no insertAll,
  so no row ever sits in the streaming buffer, where DML could not touch it), then runs one
  multi-statement transaction: it checks the version row (RAISE if another commit moved it:
  `ConcurrentWriteError`, nothing written), replaces or appends (an append skips keys already
  there, so a replay or a retried commit never duplicates a row), writes the outbox and the new
  version, and commits. The staging tables are dropped after (and expire in a day regardless).
- the tables a run re-derives whole are replaced with DELETE then INSERT inside that transaction;
  no MERGE, which the emulator cannot run inside a transaction (it opens one of its own).
- rows a load job refuses are found by splitting the load in halves, and become dead letters
  (stage `warehouse`) in the same commit; the rest lands.
- a transaction that loses a race with another (BigQuery aborts one of two that touch the same
  table) is also a `ConcurrentWriteError`: run the command again.
"""
from __future__ import annotations

import hashlib
import io
import os
import time
import uuid
from datetime import datetime, timezone
from decimal import Decimal
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import parse_qs

import orjson

from cdpflow.core.governance import LEGACY_KEY_ID, GovernanceState, SuppressionKey
from cdpflow.core.segments import SEGMENT_CHANGES_TOPIC, outbox_message
from cdpflow.core.timeutil import format_ts
from cdpflow.schemas.tables import ALL_TABLES, Table
from cdpflow.warehouse.base import (ConcurrentWriteError, Warehouse, WarehouseError, companion_path,
                                    identifier_candidates)

ENDPOINT_VARIABLE = "CDPFLOW_BIGQUERY_ENDPOINT"
_READY: set = set()  # warehouses this process has checked the tables of
VERSION_CONFLICT = "cdpflow-version-conflict"
# (partitioned by the day of, clustered by): cost follows what queries filter on
LAYOUT = {
    "events": ("timestamp", ["profile_id", "event"]),
    "dead_letters": ("received_at", ["stage"]),
    "profiles": (None, ["profile_id"]),
    "identity_links": (None, ["profile_id"]),
    "segment_memberships": (None, ["profile_id", "segment"]),
    "lifecycle_transitions": (None, ["profile_id"]),
    "outbox": (None, ["topic"]),
}


def parse_uri(uri: str) -> Tuple[str, str, Optional[str]]:
    """(project, dataset, endpoint) of `bigquery://PROJECT/DATASET[?endpoint=URL]`.

    Raises:
      WarehouseError: not of that form.
    """
    rest = str(uri).partition("://")[2]
    path, _, query = rest.partition("?")
    parts = [p for p in path.split("/") if p]
    if len(parts) != 2:
        raise WarehouseError(f"{uri!r}: a BigQuery warehouse is bigquery://PROJECT/DATASET")
    endpoint = (parse_qs(query).get("endpoint") or [None])[0] or os.environ.get(ENDPOINT_VARIABLE) or None
    return parts[0], parts[1], endpoint


def _bq_value(column, value):
    """A staged value (timestamps as µs, money as numbers or strings) as the load job's JSON takes it."""
    if value is None:
        return [] if column.mode == "REPEATED" else None
    if column.mode == "REPEATED":
        return list(value)
    if column.type == "TIMESTAMP":
        if isinstance(value, datetime):
            return value.astimezone(timezone.utc).isoformat()
        return format_ts(int(value))
    if column.type == "NUMERIC":
        return str(Decimal(str(value)).quantize(Decimal("0.000000001")))
    if column.type == "JSON":
        # a JSON column takes an object or an array; the raw event arrives as its text
        return orjson.loads(value) if isinstance(value, (str, bytes)) else value
    if column.type == "BOOL":
        return bool(value)
    return value


def load_rows(table: Table, rows: Iterable[Mapping[str, Any]]) -> bytes:
    """Rows (staged form) as newline-delimited JSON for a load job, by the contract's columns."""
    return b"".join(orjson.dumps({c.name: _bq_value(c, r.get(c.name)) for c in table.columns}) + b"\n"
                    for r in rows)


def _plain(value):
    # What the DuckDB backend gives back, so readers see one warehouse whatever the backend: JSON
    # as its text, timestamps as aware datetimes, money as Decimal.
    if isinstance(value, (dict, list)):
        return orjson.dumps(value).decode()
    return value


class BigQueryWarehouse(Warehouse):
    """A dataset in BigQuery (or the stack's emulator) holding the contract's tables.

    Args:
      uri: `bigquery://PROJECT/DATASET[?endpoint=URL]`.
      read_only: readers never create anything.
    """

    def __init__(self, uri: str, read_only: bool = False, client=None):
        from google.cloud import bigquery
        self.bigquery = bigquery
        self.project, self.dataset, self.endpoint = parse_uri(uri)
        self.uri = f"bigquery://{self.project}/{self.dataset}" + (f"?endpoint={self.endpoint}" if self.endpoint else "")
        if client is None:
            if self.endpoint:
                from google.auth.credentials import AnonymousCredentials
                client = bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                                         client_options={"api_endpoint": self.endpoint})
            else:
                client = bigquery.Client(project=self.project)
        self.client = client
        self._tables: Optional[set] = None
        if not read_only and self.uri not in _READY:
            # once per process: the loader opens the warehouse for every micro-batch
            self.init()
            _READY.add(self.uri)

    # Schema ------------------------------------------------------------------------------------
    def _ref(self, name: str) -> str:
        return f"{self.project}.{self.dataset}.{name}"

    def _q(self, name: str) -> str:
        return f"`{self.project}.{self.dataset}.{name}`"

    def _schema(self, table: Table):
        fields = self.bigquery.SchemaField
        return [fields(c["name"], c["type"], mode=c["mode"], description=c["description"] or None)
                for c in table.bigquery_schema()]

    def init(self) -> Dict[str, List[str]]:
        """Creates the dataset and every missing table, and adds the columns a table lacks.

        Returns:
          {"created": [tables], "evolved": ["table.column", ...]}.
        """
        from google.api_core.exceptions import NotFound
        self.client.create_dataset(self.bigquery.Dataset(f"{self.project}.{self.dataset}"), exists_ok=True)
        created, evolved = [], []
        for table in ALL_TABLES.values():
            try:
                existing = self.client.get_table(self._ref(table.name))
            except NotFound:
                spec = self.bigquery.Table(self._ref(table.name), schema=self._schema(table))
                spec.description = table.description
                partition, cluster = LAYOUT.get(table.name, (None, None))
                if partition:
                    spec.time_partitioning = self.bigquery.TimePartitioning(
                        type_=self.bigquery.TimePartitioningType.DAY, field=partition)
                if cluster:
                    spec.clustering_fields = cluster
                self.client.create_table(spec, exists_ok=True)
                created.append(table.name)
                continue
            have = {f.name for f in existing.schema}
            missing = [f for f in self._schema(table) if f.name not in have]
            if missing:
                # an added column is nullable (old rows have none); REPEATED stays REPEATED
                existing.schema = list(existing.schema) + [
                    self.bigquery.SchemaField(f.name, f.field_type, mode="REPEATED" if f.mode == "REPEATED" else "NULLABLE",
                                              description=f.description) for f in missing]
                self.client.update_table(existing, ["schema"])
                evolved.extend(f"{table.name}.{f.name}" for f in missing)
        self._tables = None
        return {"created": created, "evolved": evolved}

    def has_table(self, name: str) -> bool:
        if self._tables is None:
            try:
                self._tables = {t.table_id for t in self.client.list_tables(f"{self.project}.{self.dataset}")}
            except Exception:  # noqa: BLE001 (no dataset yet: nothing in it)
                self._tables = set()
        return name in self._tables

    # Queries -----------------------------------------------------------------------------------
    def _params(self, params: Mapping[str, Any]):
        out = []
        for name, value in params.items():
            if isinstance(value, (list, tuple)):
                out.append(self.bigquery.ArrayQueryParameter(name, "STRING", [str(v) for v in value]))
            elif isinstance(value, bool):
                out.append(self.bigquery.ScalarQueryParameter(name, "BOOL", value))
            elif isinstance(value, int):
                out.append(self.bigquery.ScalarQueryParameter(name, "INT64", value))
            elif isinstance(value, datetime):
                out.append(self.bigquery.ScalarQueryParameter(name, "TIMESTAMP", value))
            else:
                out.append(self.bigquery.ScalarQueryParameter(name, "STRING", value))
        return out

    def _run(self, sql: str, params: Optional[Mapping[str, Any]] = None):
        config = self.bigquery.QueryJobConfig(query_parameters=self._params(params or {}))
        return self.client.query(sql.replace("`ds`.", f"`{self.project}.{self.dataset}`."), job_config=config).result()

    def query(self, sql: str, params: Optional[Mapping[str, Any]] = None) -> List[Dict[str, Any]]:
        """Rows of a query (tables named `ds`.name; named @parameters), values as the DuckDB backend gives them."""
        return [{k: _plain(v) for k, v in row.items()} for row in self._run(sql, params)]

    def _scalar(self, sql: str, params: Optional[Mapping[str, Any]] = None):
        rows = list(self._run(sql, params))
        return rows[0][0] if rows else None

    # Reading -----------------------------------------------------------------------------------
    def version(self) -> int:
        if not self.has_table("warehouse_meta"):
            return 0
        return int(self._scalar("SELECT MAX(value) FROM `ds`.warehouse_meta WHERE name = 'version'") or 0)

    def count(self, name: str) -> int:
        return int(self._scalar(f"SELECT COUNT(*) FROM `ds`.{name}")) if self.has_table(name) else 0

    def accepted_events(self) -> List[str]:
        if not self.has_table("events"):
            return []
        return [r[0] for r in self._run("SELECT TO_JSON_STRING(raw) FROM `ds`.events ORDER BY message_id")]

    def identity_history(self) -> List[tuple]:
        if not self.has_table("events"):
            return []
        return [(int(r[0]), r[1], tuple(tuple(i) for i in orjson.loads(r[2] or "[]"))) for r in self._run(
            "SELECT UNIX_MICROS(timestamp), message_id, TO_JSON_STRING(identifiers) FROM `ds`.events "
            "ORDER BY timestamp, message_id")]

    def latest_clv_model(self) -> Optional[Dict[str, Any]]:
        rows = self.query("SELECT * FROM `ds`.clv_models WHERE status = 'fitted' ORDER BY as_of DESC, fitted_at DESC "
                          "LIMIT 1") if self.has_table("clv_models") else []
        return rows[0] if rows else None

    def latest_as_of(self) -> Optional[int]:
        if not self.has_table("profiles"):
            return None
        value = self._scalar("SELECT UNIX_MICROS(MAX(as_of)) FROM `ds`.profiles")
        return int(value) if value is not None else None

    def memberships(self) -> List[Dict[str, Any]]:
        if not self.has_table("segment_memberships"):
            return []
        return self.query("SELECT profile_id, segment, source, UNIX_MICROS(entered_at) AS entered_at, "
                          "UNIX_MICROS(exited_at) AS exited_at, model_version FROM `ds`.segment_memberships "
                          "ORDER BY profile_id, segment, entered_at")

    def profiles(self) -> List[Dict[str, Any]]:
        return self.query("SELECT * FROM `ds`.profiles ORDER BY profile_id") if self.has_table("profiles") else []

    def open_segment_sizes(self) -> Dict[str, int]:
        if not self.has_table("segment_memberships"):
            return {}
        return {r[0]: int(r[1]) for r in self._run("SELECT segment, COUNT(*) FROM `ds`.segment_memberships "
                                                     "WHERE exited_at IS NULL GROUP BY segment ORDER BY segment")}

    def identity_links(self) -> List[Dict[str, Any]]:
        if not self.has_table("identity_links"):
            return []
        return self.query("SELECT identifier_type, identifier_value, profile_id FROM `ds`.identity_links")

    def pending_outbox(self, topic: str = SEGMENT_CHANGES_TOPIC) -> List[Dict[str, Any]]:
        if not self.has_table("outbox"):
            return []
        return [{"idempotency_key": r[0], "message_key": r[1], "payload": orjson.loads(r[2])} for r in self._run(
            "SELECT idempotency_key, message_key, TO_JSON_STRING(payload) FROM `ds`.outbox WHERE topic = @topic "
            "AND published_at IS NULL ORDER BY warehouse_version, idempotency_key", {"topic": topic})]

    def governance(self) -> GovernanceState:
        if not self.has_table("identity_suppressions"):
            return GovernanceState()
        suppressed = frozenset((r[1] or LEGACY_KEY_ID, r[0]) for r in self._run(
            "SELECT identifier_hash, key_id FROM `ds`.identity_suppressions"))
        separations = frozenset(((r[0], r[1]), (r[2], r[3])) for r in self._run(
            "SELECT left_type, left_value, right_type, right_value FROM `ds`.identity_separations"))
        names = frozenset(((r[0], r[1]), r[2], int(r[3])) for r in self._run(
            "SELECT identifier_type, identifier_value, profile_id, UNIX_MICROS(created_at) FROM `ds`.identity_names")
        ) if self.has_table("identity_names") else frozenset()
        return GovernanceState(suppressed, separations, names)

    def demo_key_file(self) -> Optional[str]:
        return companion_path(self.uri, ".suppression.key")

    def default_identity_store(self) -> Optional[str]:
        path = companion_path(self.uri, ".identity.sqlite")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        return "sqlite://" + os.path.abspath(path)

    # Writing -----------------------------------------------------------------------------------
    def _stage(self, name: str, rows: Sequence[Mapping[str, Any]], tag: str,
               refused: Optional[List[Tuple[Mapping[str, Any], str]]] = None) -> str:
        """Loads rows into a staging table of their own (load jobs); returns its name.

        `refused`: where rows BigQuery refuses go, each with BigQuery's reason (a load job is all
        or nothing: a failed one is split in halves until the refused rows stand alone); without
        it a refused row fails the commit.
        """
        table = ALL_TABLES[name]
        staging = f"_staging_{tag}_{name}"
        spec = self.bigquery.Table(self._ref(staging), schema=self._schema(table))
        # a safety net: the commit drops it, but a crash in between must not leave it for good
        spec.expires = datetime.fromtimestamp(time.time() + 86400, tz=timezone.utc)
        self.client.create_table(spec, exists_ok=True)
        ready = []
        for row in rows:
            try:
                ready.append((row, load_rows(table, [row])))
            except (ValueError, TypeError, ArithmeticError, orjson.JSONDecodeError) as err:
                if refused is None:
                    raise WarehouseError(f"a {name} row BigQuery cannot take: {err}") from None
                refused.append((row, f"not a value BigQuery takes: {err}"))
        self._load(table, staging, ready, refused)
        return staging

    def _load(self, table: Table, staging: str, rows: Sequence[Tuple[Mapping[str, Any], bytes]],
              refused: Optional[List[Tuple[Mapping[str, Any], str]]]) -> None:
        if not rows:
            return
        config = self.bigquery.LoadJobConfig(source_format=self.bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
                                             schema=self._schema(table),
                                             write_disposition=self.bigquery.WriteDisposition.WRITE_APPEND)
        job = self.client.load_table_from_file(io.BytesIO(b"".join(line for _, line in rows)), self._ref(staging),
                                               job_config=config)
        try:
            job.result()
            return
        except Exception as err:  # noqa: BLE001 (the load job's errors say what it refused)
            from google.api_core.exceptions import BadRequest
            if refused is None or not isinstance(err, BadRequest):
                raise WarehouseError(f"loading {table.name} into BigQuery failed: {err}") from None
            reason = str(err)
        if len(rows) == 1:
            refused.append((rows[0][0], reason))
            return
        middle = len(rows) // 2
        self._load(table, staging, rows[:middle], refused)
        self._load(table, staging, rows[middle:], refused)

    @staticmethod
    def refused_letters(name: str, refused: Sequence[Tuple[Mapping[str, Any], str]]) -> List[Dict[str, Any]]:
        """Dead letters (stage `warehouse`) of rows BigQuery refused: an event's raw payload and identifiers
        as the event came, another table's row as its JSON."""
        from cdpflow.core.rows import dead_letter_row
        from cdpflow.schemas.records import DeadLetter
        letters = []
        for row, reason in refused:
            raw = row.get("raw") if name == "events" and isinstance(row.get("raw"), str) else \
                orjson.dumps({"table": name, "row": row}, default=str).decode()
            received = row.get("received_at") if isinstance(row.get("received_at"), int) else int(time.time() * 1e6)
            letter = DeadLetter(raw, "warehouse", f"BigQuery refused the {name} row: {reason}",
                                row.get("schema_version") if name == "events" else None, received)
            identifiers = row.get("identifiers") if name == "events" else None
            if isinstance(identifiers, str):
                identifiers = orjson.loads(identifiers)
            letters.append(dead_letter_row(letter, [tuple(i) for i in identifiers] if identifiers else None))
        return letters

    def _drop(self, staging: Iterable[str]) -> None:
        for name in staging:
            self.client.delete_table(self._ref(name), not_found_ok=True)

    def _transaction(self, statements: Sequence[str], expected_version: Optional[int],
                     params: Optional[Mapping[str, Any]] = None) -> int:
        """Runs statements in one transaction that checks and raises the version; returns the new version.

        Raises:
          ConcurrentWriteError: the version is not `expected_version`, or another transaction won
            a race on the same tables (nothing was written).
        """
        found = self.version()
        if expected_version is not None and found != expected_version:
            raise ConcurrentWriteError(expected_version, found)
        new = found + 1
        script = "\n".join([
            "BEGIN TRANSACTION;",
            # read again inside the transaction: a commit between the read above and here loses
            f"IF (SELECT COALESCE(MAX(value), 0) FROM `ds`.warehouse_meta WHERE name = 'version') != {found} THEN",
            f"  ROLLBACK TRANSACTION; RAISE USING MESSAGE = '{VERSION_CONFLICT}';",
            "END IF;",
            *[s.rstrip().rstrip(";") + ";" for s in statements],
            "DELETE FROM `ds`.warehouse_meta WHERE name = 'version';",
            f"INSERT INTO `ds`.warehouse_meta (name, value, updated_at) VALUES ('version', {new}, CURRENT_TIMESTAMP());",
            "COMMIT TRANSACTION;",
        ])
        try:
            self._run(script, params)
        except Exception as err:  # noqa: BLE001 (the client's error types vary by cause)
            text = str(err)
            if VERSION_CONFLICT in text or "concurrent" in text.lower() or "Failed to commit" in text:
                raise ConcurrentWriteError(found, self.version()) from None
            raise WarehouseError(f"BigQuery refused the commit: {text}") from None
        return new

    def _columns(self, name: str) -> str:
        return ", ".join(f"`{c}`" for c in ALL_TABLES[name].column_names)

    def _append_new(self, name: str, staging: str, key: Optional[str]) -> str:
        """The statement appending a staging table's rows whose key the table does not hold yet."""
        cols = self._columns(name)
        if key is None:
            return f"INSERT INTO `ds`.{name} ({cols}) SELECT {cols} FROM `ds`.{staging}"
        return (f"INSERT INTO `ds`.{name} ({cols}) SELECT {cols} FROM `ds`.{staging} s "
                f"WHERE s.`{key}` NOT IN (SELECT `{key}` FROM `ds`.{name}) "
                f"QUALIFY ROW_NUMBER() OVER (PARTITION BY s.`{key}` ORDER BY s.`{key}`) = 1")

    def commit(self, staging_dir: str, replace: Iterable[str], append_unique: Mapping[str, str],
               outbox: Sequence[Mapping[str, Any]] = (), expected_version: Optional[int] = None,
               suppressed: Optional[Callable[[Sequence[Sequence[str]]], bool]] = None) -> Dict[str, int]:
        """Loads a run's staged tables and its outbox in one transaction, checking the version (see module)."""
        from cdpflow.warehouse.embedded import read_staged
        tag = uuid.uuid4().hex[:12]
        staged, statements, written = [], [], {}
        letters: List[Dict[str, Any]] = []
        try:
            for name in replace:
                rows = read_staged(staging_dir, name)
                refused: List[Tuple[Mapping[str, Any], str]] = []
                staging = self._stage(name, rows, tag, refused)
                letters += self.refused_letters(name, refused)
                staged.append(staging)
                cols = self._columns(name)
                statements += [f"DELETE FROM `ds`.{name} WHERE TRUE",
                               f"INSERT INTO `ds`.{name} ({cols}) SELECT {cols} FROM `ds`.{staging}"]
                written[name] = len(rows)
            appended = dict(append_unique)
            for name, key in appended.items():
                rows = read_staged(staging_dir, name)
                if name == "dead_letters":
                    continue  # last: with the rows BigQuery refused
                if not rows:
                    written[name] = 0
                    continue
                refused = []
                staging = self._stage(name, rows, tag, refused)
                letters += self.refused_letters(name, refused)
                staged.append(staging)
                statements.append(self._append_new(name, staging, key))
                written[name] = self._new_keys(name, key, rows) if key else len(rows)
            dead = (read_staged(staging_dir, "dead_letters") if "dead_letters" in appended else []) + letters
            if dead:
                staging = self._stage("dead_letters", dead, tag)
                staged.append(staging)
                statements.append(self._append_new("dead_letters", staging, "dead_letter_id"))
            written["dead_letters"] = self._new_keys("dead_letters", "dead_letter_id", dead)
            written["refused_by_bigquery"] = len(letters)
            if suppressed is not None:
                gone = self._dead_letters_where(suppressed)
                if gone:
                    statements.append("DELETE FROM `ds`.dead_letters WHERE dead_letter_id IN UNNEST(@forgotten_letters)")
                written["dead_letters_forgotten"] = len(gone)
            else:
                gone = []
            if outbox:
                staging, count = self._stage_outbox(outbox, tag, self.version() + 1)
                staged.append(staging)
                statements.append(self._append_new("outbox", staging, "idempotency_key"))
                written["outbox"] = count
            self._transaction(statements, expected_version, {"forgotten_letters": gone} if gone else None)
        finally:
            self._drop(staged)
        return written

    def _new_keys(self, name: str, key: str, rows: Sequence[Mapping[str, Any]]) -> int:
        """How many distinct keys of `rows` the table does not hold yet (only those keys are read back)."""
        keys = {r[key] for r in rows}
        return len(keys - self._keys_in(name, key, [k for k in keys if k is not None]))

    def _stage_outbox(self, messages: Sequence[Mapping[str, Any]], tag: str, version: int) -> Tuple[str, int]:
        now = int(time.time() * 1_000_000)
        rows = [{"idempotency_key": m["idempotency_key"], "topic": m.get("topic", SEGMENT_CHANGES_TOPIC),
                 "message_key": m.get("message_key"), "payload": m["payload"], "created_at": now,
                 "warehouse_version": version, "published_at": None} for m in messages]
        new = self._new_keys("outbox", "idempotency_key", rows)
        return self._stage("outbox", rows, tag), new

    def mark_published(self, idempotency_keys: Sequence[str], now_us: int) -> None:
        if idempotency_keys:
            self._run("UPDATE `ds`.outbox SET published_at = TIMESTAMP_MICROS(@now) "
                      "WHERE idempotency_key IN UNNEST(@keys)", {"now": now_us, "keys": list(idempotency_keys)})

    # Export and look-up --------------------------------------------------------------------------
    def export(self, table: str, fmt: str, out: str) -> int:
        """Copies a table to a local file as jsonl, csv or parquet (written as the embedded backend writes them)."""
        from cdpflow.warehouse.embedded import EXPORT_FORMATS
        if table not in ALL_TABLES:
            raise WarehouseError(f"unknown table {table!r}; tables: {', '.join(ALL_TABLES)}")
        if fmt not in EXPORT_FORMATS:
            raise WarehouseError(f"unknown format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
        import duckdb
        arrow = self._run(f"SELECT * FROM `ds`.{table}").to_arrow(create_bqstorage_client=False)
        options = {"jsonl": "FORMAT JSON", "csv": "FORMAT CSV, HEADER", "parquet": "FORMAT PARQUET"}[fmt]
        con = duckdb.connect()
        try:
            con.register("exported", arrow)
            con.execute(f"COPY (SELECT * FROM exported) TO '{out.replace(chr(39), chr(39) * 2)}' ({options})")
        finally:
            con.close()
        return arrow.num_rows

    @staticmethod
    def _candidates(identifier: str):
        return identifier_candidates(identifier)

    def profiles_holding(self, identifier: str) -> List[str]:
        if not self.has_table("identity_links"):
            return []
        id_type, values = self._candidates(identifier)
        sql = "SELECT DISTINCT profile_id FROM `ds`.identity_links WHERE identifier_value IN UNNEST(@values)"
        params: Dict[str, Any] = {"values": values}
        if id_type:
            sql += " AND identifier_type = @type"
            params["type"] = id_type
        return sorted(r[0] for r in self._run(sql, params))

    def resolve_profile_id(self, identifier: str) -> Optional[str]:
        found = self.profiles_holding(identifier)
        if found:
            return found[0]
        if not self.has_table("profiles"):
            return None
        profile_id = identifier
        for _ in range(1000):  # merges form chains survivor <- absorbed; follow them to the end
            survivor = self._scalar("SELECT survivor_id FROM `ds`.profile_merges WHERE absorbed_id = @id AND "
                                    "undone_at IS NULL ORDER BY merged_at DESC LIMIT 1", {"id": profile_id})
            if survivor is None:
                break
            profile_id = survivor
        exists = self._scalar("SELECT COUNT(*) FROM `ds`.profiles WHERE profile_id = @id", {"id": profile_id})
        return profile_id if exists else None

    def profile(self, identifier: str) -> Optional[Dict[str, Any]]:
        profile_id = self.resolve_profile_id(identifier)
        if profile_id is None:
            return None
        at = {"id": profile_id}
        rows = self.query("SELECT * FROM `ds`.profiles WHERE profile_id = @id", at)
        return {
            "profile": rows[0] if rows else {"profile_id": profile_id},
            "identifiers": self.query("SELECT identifier_type, identifier_value, first_seen, last_seen FROM "
                                      "`ds`.identity_links WHERE profile_id = @id ORDER BY identifier_type, "
                                      "identifier_value", at),
            "segments": self.query("SELECT segment, source, entered_at, model_version FROM `ds`.segment_memberships "
                                   "WHERE profile_id = @id AND exited_at IS NULL ORDER BY segment", at),
            "merges": self.query("SELECT survivor_id, absorbed_id, cause_message_id, reason, merged_at FROM "
                                 "`ds`.profile_merges WHERE survivor_id = @id ORDER BY merged_at", at),
        }

    def merges_into(self, profile_id: str) -> List[Dict[str, Any]]:
        found, frontier = [], [profile_id]
        while frontier:
            current = frontier.pop()
            rows = self.query("SELECT survivor_id, absorbed_id, cause_message_id, reason FROM `ds`.profile_merges "
                              "WHERE survivor_id = @id AND undone_at IS NULL", {"id": current})
            found.extend(rows)
            frontier.extend(r["absorbed_id"] for r in rows)
        return found

    # Governance ----------------------------------------------------------------------------------
    def _dead_letters_where(self, test) -> List[str]:
        if not self.has_table("dead_letters"):
            return []
        return [r[0] for r in self._run("SELECT dead_letter_id, TO_JSON_STRING(identifiers) FROM `ds`.dead_letters "
                                        "WHERE identifiers IS NOT NULL")
                if test([tuple(i) for i in orjson.loads(r[1])])]

    def forget(self, identifier: str, now_us: int, key: SuppressionKey,
               expected_version: Optional[int] = None) -> Optional[Dict[str, Any]]:
        """As `DuckDBWarehouse.forget`: the person deleted from every table, their identifiers kept as
        keyed hashes, the exits of their open memberships in the outbox, in one transaction."""
        from cdpflow.warehouse.embedded import _exit_of_span
        profile_id = self.forget_target(identifier)
        if profile_id is not None:
            at = {"id": profile_id}
            identifiers = [(r["identifier_type"], r["identifier_value"]) for r in self.query(
                "SELECT identifier_type, identifier_value FROM `ds`.identity_links WHERE profile_id = @id", at)]
            closed = self.query("SELECT m.profile_id, m.segment, m.source, m.model_version, (SELECT COUNT(*) FROM "
                                "`ds`.segment_memberships s WHERE s.profile_id = m.profile_id AND s.segment = m.segment) "
                                "AS entries FROM `ds`.segment_memberships m WHERE m.profile_id = @id AND "
                                "m.exited_at IS NULL", at)
            ids = [profile_id] + [r[0] for r in self._run(
                "SELECT absorbed_id FROM `ds`.profile_merges WHERE survivor_id = @id", at)]
        else:
            id_type, values = self._candidates(identifier)
            if id_type is None:
                return None
            identifiers = [(id_type, values[0])]
            if not self._dead_letters_where(lambda found: identifiers[0] in found):
                return None
            closed, ids = [], []
        request_id = hashlib.sha256(f"{profile_id or identifiers[0]}\x00{now_us}".encode()).hexdigest()[:16]
        wanted = {tuple(i) for i in identifiers}
        letters = self._dead_letters_where(lambda found: any(i in wanted for i in found))
        exits = [outbox_message(_exit_of_span(row, now_us, request_id)) for row in closed]
        tag = uuid.uuid4().hex[:12]
        staged, statements = [], []
        counts = {table: self.count_where(table, "profile_id IN UNNEST(@ids)", {"ids": ids}) if ids else 0
                  for table in ("events", "identity_links", "profiles", "segment_memberships", "lifecycle_transitions")}
        try:
            hashes = [{"identifier_hash": key.hash(i), "suppressed_at": now_us, "request_id": request_id,
                       "key_id": key.key_id} for i in identifiers]
            staging = self._stage("identity_suppressions", hashes, tag)
            staged.append(staging)
            statements.append(self._append_new("identity_suppressions", staging, "identifier_hash"))
            if ids:
                for table in counts:
                    statements.append(f"DELETE FROM `ds`.{table} WHERE profile_id IN UNNEST(@ids)")
                statements += [
                    "DELETE FROM `ds`.profile_merges WHERE survivor_id IN UNNEST(@ids) OR absorbed_id IN UNNEST(@ids)",
                    "DELETE FROM `ds`.identity_conflicts WHERE EXISTS (SELECT 1 FROM UNNEST(profiles) p "
                    "WHERE p IN UNNEST(@ids))",
                    "DELETE FROM `ds`.outbox WHERE message_key IN UNNEST(@ids)"]
            for n, (id_type, value) in enumerate(identifiers):
                statements.append(f"DELETE FROM `ds`.identity_conflicts WHERE identifier_type = @t{n} AND "
                                  f"identifier_value = @v{n}")
                # governance rows holding the identifier in the clear (another identifier's name stays)
                statements.append(f"DELETE FROM `ds`.identity_separations WHERE (left_type = @t{n} AND left_value = "
                                  f"@v{n}) OR (right_type = @t{n} AND right_value = @v{n})")
                statements.append(f"DELETE FROM `ds`.identity_names WHERE identifier_type = @t{n} AND "
                                  f"identifier_value = @v{n}")
            if letters:
                statements.append("DELETE FROM `ds`.dead_letters WHERE dead_letter_id IN UNNEST(@letters)")
            if exits:
                staging, _ = self._stage_outbox(exits, tag, self.version() + 1)
                staged.append(staging)
                statements.append(self._append_new("outbox", staging, "idempotency_key"))
            params: Dict[str, Any] = {"ids": ids, "letters": letters}
            for n, (id_type, value) in enumerate(identifiers):
                params[f"t{n}"], params[f"v{n}"] = id_type, value
            self._transaction(statements, expected_version, params)
        finally:
            self._drop(staged)
        counts["dead_letters"] = len(letters)
        return {"profile_id": profile_id, "request_id": request_id, "identifiers": identifiers,
                "deleted": counts, "closed_memberships": closed, "exits": len(exits)}

    def count_where(self, table: str, condition: str, params: Mapping[str, Any]) -> int:
        return int(self._scalar(f"SELECT COUNT(*) FROM `ds`.{table} WHERE {condition}", params) or 0)

    def identifier_of(self, identifier: str) -> Optional[tuple]:
        id_type, values = self._candidates(identifier)
        if id_type is not None:
            return (id_type, values[0])
        found = {(r[0], r[1]) for r in self._run("SELECT identifier_type, identifier_value FROM `ds`.identity_links "
                                                 "WHERE identifier_value IN UNNEST(@values)", {"values": values})}
        return found.pop() if len(found) == 1 else None

    def suppress(self, identifiers, now_us: int, key: SuppressionKey) -> int:
        request_id = hashlib.sha256(f"{sorted(identifiers)}\x00{now_us}".encode()).hexdigest()[:16]
        rows = [{"identifier_hash": key.hash(tuple(i)), "suppressed_at": now_us, "request_id": request_id,
                 "key_id": key.key_id} for i in identifiers]
        new = self._new_keys("identity_suppressions", "identifier_hash", rows)
        staging = self._stage("identity_suppressions", rows, uuid.uuid4().hex[:12])
        try:
            self._transaction([self._append_new("identity_suppressions", staging, "identifier_hash")], None)
        finally:
            self._drop([staging])
        return new

    def add_separations(self, pairs, now_us: int, reason: str, expected_version: Optional[int] = None,
                        names=()) -> int:
        held = self.governance()
        rows = [{"left_type": lt, "left_value": lv, "right_type": rt, "right_value": rv, "created_at": now_us,
                 "reason": reason} for (lt, lv), (rt, rv) in pairs if ((lt, lv), (rt, rv)) not in held.separations]
        named = [{"identifier_type": t, "identifier_value": v, "profile_id": pid, "created_at": int(at),
                  "reason": reason} for (t, v), pid, at in sorted(set((tuple(i), p, int(a)) for i, p, a in names))
                 if ((t, v), pid, int(at)) not in held.names]
        if not rows and not named:
            self._transaction([], expected_version)
            return 0
        tag = uuid.uuid4().hex[:12]
        staged = [(table, self._stage(table, batch, tag)) for table, batch in
                  (("identity_separations", rows), ("identity_names", named)) if batch]
        try:
            self._transaction([self._append_new(table, staging, None) for table, staging in staged], expected_version)
        finally:
            self._drop([staging for _, staging in staged])
        return len(rows)

    # The stream's loader ------------------------------------------------------------------------
    def stream_offsets(self) -> Dict[tuple, int]:
        """(topic, partition) -> the first offset the loader has not loaded yet."""
        if not self.has_table("stream_offsets"):
            return {}
        return {(r[0], int(r[1])): int(r[2]) for r in self._run(
            "SELECT topic, `partition`, next_offset FROM `ds`.stream_offsets")}

    def _stage_pairs(self, name: str, fields: Sequence[Tuple[str, str]], rows: Sequence[Mapping[str, Any]],
                     tag: str) -> str:
        """A staging table of a shape of its own (not a contract table): keys of a statement."""
        staging = f"_staging_{tag}_{name}"
        schema = [self.bigquery.SchemaField(n, t) for n, t in fields]
        spec = self.bigquery.Table(self._ref(staging), schema=schema)
        spec.expires = datetime.fromtimestamp(time.time() + 86400, tz=timezone.utc)
        self.client.create_table(spec, exists_ok=True)
        data = b"".join(orjson.dumps({n: (format_ts(r[n]) if t == "TIMESTAMP" and isinstance(r[n], int) else r[n])
                                      for n, t in fields}) + b"\n" for r in rows)
        config = self.bigquery.LoadJobConfig(source_format=self.bigquery.SourceFormat.NEWLINE_DELIMITED_JSON,
                                             schema=schema, write_disposition=self.bigquery.WriteDisposition.WRITE_APPEND)
        self.client.load_table_from_file(io.BytesIO(data), self._ref(staging), job_config=config).result()
        return staging

    def load_stream_batch(self, records: Sequence[Mapping[str, Any]], identity: Mapping[str, Any],
                          now_us: int, suppressed=None) -> Dict[str, int]:
        """What the stream put on its topics, with the offsets, in one transaction: the same rows the
        DuckDB backend's `load_stream_batch` writes, as set statements over staging tables (a
        micro-batch's changes are worked out here first, then applied at once)."""
        from cdpflow.warehouse.loading import plan_stream_batch
        counts: Dict[str, int] = {}
        plan = plan_stream_batch(records, identity, self.stream_offsets(), suppressed)
        counts["skipped"] = plan.skipped
        tag = uuid.uuid4().hex[:12]
        staged: List[str] = []
        statements: List[str] = []
        params: Dict[str, Any] = {}

        def stage(name, rows, key=None, append=True):
            staging = self._stage(name, rows, f"{tag}{len(staged)}")
            staged.append(staging)
            if append:
                statements.append(self._append_new(name, staging, key))
            return staging

        try:
            if plan.events:
                counts["events"] = self._new_keys("events", "message_id", plan.events)
                stage("events", plan.events, "message_id")
            # Identity tables: the store's read-out replaces them (the store is the graph).
            for name, part in (("identity_links", "links"), ("profile_merges", "merges"),
                               ("identity_conflicts", "conflicts")):
                rows = identity[part]
                statements.append(f"DELETE FROM `ds`.{name} WHERE TRUE")
                if rows:
                    stage(name, rows, None)
                counts[name] = len(rows)
            # Events of profiles a merge absorbed (or a split moved) follow their identifiers.
            holders = sorted({r["profile_id"] for r in identity["links"]})
            moved = [r[0] for r in self._run("SELECT message_id FROM `ds`.events WHERE profile_id NOT IN "
                                             "UNNEST(@holders)", {"holders": holders})] if self.has_table("events") else []
            if moved:
                pairs = [{"message_id": m, "profile_id": p} for m, p in identity["final"](moved).items() if p is not None]
                if pairs:
                    table = self._stage_pairs("moves", (("message_id", "STRING"), ("profile_id", "STRING")), pairs, tag)
                    staged.append(table)
                    statements.append(f"UPDATE `ds`.events e SET profile_id = m.profile_id FROM `ds`.{table} m "
                                      "WHERE e.message_id = m.message_id")
                counts["events_moved"] = len(moved)
            if plan.gone:
                statements.append("DELETE FROM `ds`.profiles WHERE profile_id IN UNNEST(@gone)")
                params["gone"] = plan.gone
            if plan.tombstones:
                # a tombstone that overtook a newer row on the way deletes nothing
                table = self._stage_pairs("tombstones", (("profile_id", "STRING"), ("as_of", "TIMESTAMP")),
                                          [{"profile_id": p, "as_of": at} for p, at in plan.tombstones], tag)
                staged.append(table)
                statements.append(f"DELETE FROM `ds`.profiles p WHERE EXISTS (SELECT 1 FROM `ds`.{table} t "
                                  "WHERE t.profile_id = p.profile_id AND p.as_of <= t.as_of)")
            if plan.upserts:
                table = stage("profiles", plan.upserts, append=False)
                cols = self._columns("profiles")
                statements += [
                    f"DELETE FROM `ds`.profiles p WHERE EXISTS (SELECT 1 FROM `ds`.{table} s WHERE s.profile_id = "
                    "p.profile_id AND (s.as_of > p.as_of OR (s.as_of = p.as_of AND s.updated_at >= p.updated_at)))",
                    f"INSERT INTO `ds`.profiles ({cols}) SELECT {cols} FROM `ds`.{table} WHERE profile_id NOT IN "
                    "(SELECT profile_id FROM `ds`.profiles)"]
            counts["profiles"], counts["profiles_deleted"] = len(plan.upserts), len(plan.gone) + len(plan.tombstones)
            counts["segment_changes"] = self._stage_changes(plan.changes, now_us, tag, staged, statements)
            # Lifecycle transitions: the last word on each (profile, time, stage) decides.
            last: Dict[tuple, Mapping[str, Any]] = {}
            for row in plan.transitions:
                last[(row["profile_id"], row["transitioned_at"], row["to_stage"])] = row
            if last:
                table = stage("lifecycle_transitions", list(last.values()), append=False)
                statements.append(f"DELETE FROM `ds`.lifecycle_transitions t WHERE EXISTS (SELECT 1 FROM `ds`.{table} k "
                                  "WHERE k.profile_id = t.profile_id AND k.transitioned_at = t.transitioned_at "
                                  "AND k.to_stage = t.to_stage)")
                kept = [r for r in last.values() if not r.get("retracted")]
                if kept:
                    stage("lifecycle_transitions", kept, None)
            counts["lifecycle_transitions"] = len(plan.transitions)
            counts["dead_letters"] = self._new_keys("dead_letters", "dead_letter_id", plan.letters)
            if plan.letters:
                stage("dead_letters", plan.letters, "dead_letter_id")
            # The offsets, in the same transaction as the rows they produced.
            if plan.ends:
                table = stage("stream_offsets", [{"topic": t, "partition": p, "next_offset": o, "updated_at": now_us}
                                                 for (t, p), o in plan.ends.items()], append=False)
                statements += [
                    f"DELETE FROM `ds`.stream_offsets o WHERE EXISTS (SELECT 1 FROM `ds`.{table} s WHERE "
                    "s.topic = o.topic AND s.`partition` = o.`partition`)",
                    f"INSERT INTO `ds`.stream_offsets ({self._columns('stream_offsets')}) SELECT "
                    f"{self._columns('stream_offsets')} FROM `ds`.{table}"]
            self._transaction(statements, None, params or None)
        finally:
            self._drop(staged)
        return counts

    def _keys_in(self, name: str, key: str, values: Sequence[str]) -> set:
        if not self.has_table(name) or not values:
            return set()
        return {r[0] for r in self._run(f"SELECT `{key}` FROM `ds`.{name} WHERE `{key}` IN UNNEST(@values)",
                                        {"values": list(values)})}

    def _stage_changes(self, changes: Sequence[Mapping[str, Any]], now_us: int, tag: str, staged: List[str],
                       statements: List[str]) -> int:
        """The membership spans a micro-batch's segment changes make, worked out here as the DuckDB
        backend applies them one by one (each idempotency key once; an enter opens a span unless
        one is open; an exit closes the open one, and without one is not recorded), staged, and
        applied by three statements: close spans that were open, add new spans, record the keys."""
        from cdpflow.core.timeutil import parse_ts
        if not changes:
            return 0
        done = self._keys_in("outbox", "idempotency_key", [c["idempotency_key"] for c in changes])
        pids = sorted({c["profile_id"] for c in changes})
        open_now = {(r[0], r[1]) for r in self._run(
            "SELECT profile_id, segment FROM `ds`.segment_memberships WHERE exited_at IS NULL AND "
            "profile_id IN UNNEST(@pids)", {"pids": pids})} if self.has_table("segment_memberships") else set()
        closures: Dict[tuple, int] = {}
        spans: List[Dict[str, Any]] = []
        opened: Dict[tuple, Dict[str, Any]] = {}
        outbox: List[Dict[str, Any]] = []
        version = self.version() + 1
        for change in sorted(changes, key=lambda c: (c["profile_id"], c["segment"], c.get("ordinal", 0),
                                                      c["direction"] == "exit")):
            key = change["idempotency_key"]
            if key in done:
                continue
            place, at = (change["profile_id"], change["segment"]), parse_ts(change["at"])
            if change["direction"] == "enter":
                if place not in opened and not (place in open_now and place not in closures):
                    opened[place] = {"profile_id": place[0], "segment": place[1], "source": change["source"],
                                     "entered_at": at, "exited_at": None, "model_version": change.get("model_version")}
                    spans.append(opened[place])
            elif place in opened:
                opened.pop(place)["exited_at"] = at
            elif place in open_now and place not in closures:
                closures[place] = at
            else:
                continue  # nothing open (a forget closed it, or it never loaded): nothing to record
            done.add(key)
            outbox.append({"idempotency_key": key, "topic": SEGMENT_CHANGES_TOPIC, "message_key": change["profile_id"],
                           "payload": dict(change), "created_at": now_us, "warehouse_version": version,
                           "published_at": now_us})
        if closures:
            table = self._stage_pairs("closures", (("profile_id", "STRING"), ("segment", "STRING"),
                                                   ("exited_at", "TIMESTAMP")),
                                      [{"profile_id": p, "segment": s, "exited_at": at} for (p, s), at in closures.items()],
                                      tag)
            staged.append(table)
            statements.append(f"UPDATE `ds`.segment_memberships m SET exited_at = c.exited_at FROM `ds`.{table} c "
                              "WHERE m.profile_id = c.profile_id AND m.segment = c.segment AND m.exited_at IS NULL")
        if spans:
            table = self._stage("segment_memberships", spans, tag + "seg")
            staged.append(table)
            statements.append(self._append_new("segment_memberships", table, None))
        if outbox:
            table = self._stage("outbox", outbox, tag + "out")
            staged.append(table)
            statements.append(self._append_new("outbox", table, "idempotency_key"))
        return len(outbox)
