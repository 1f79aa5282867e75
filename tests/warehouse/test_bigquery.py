"""The BigQuery warehouse against the stack's emulator (local-bigquery), read back through the official client.

Every check reads BigQuery with google-cloud-bigquery directly and the DuckDB file with duckdb
directly, never through the backends under test. Rows are compared for equality, table by
table, with the processing-time columns left out (when a row was written or published).
"""
from __future__ import annotations

import json
from datetime import datetime, timezone
from decimal import Decimal

import duckdb
import orjson
import pytest

from cdpflow.cli import main
from cdpflow.schemas.tables import ALL_TABLES
from cdpflow.synthetic import generate

pytestmark = pytest.mark.e2e

# written at processing time: the two runs cannot share them
PROCESSING_TIME = {"updated_at", "fitted_at", "created_at", "published_at", "suppressed_at", "warehouse_version"}
NOT_COMPARED_TABLES = {"warehouse_meta", "stream_offsets"}


def _client(emulator):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    return bigquery.Client(project="local", credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": emulator.endpoint()})


def _canonical(column, value):
    if value is None:
        return None
    if column.mode == "REPEATED":
        return sorted(value) if column.name == "profiles" else list(value)
    if column.type == "TIMESTAMP":
        if isinstance(value, datetime):
            delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
            return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
        return value
    if column.type == "NUMERIC":
        return Decimal(value).normalize()
    if column.type == "JSON":
        return orjson.loads(value) if isinstance(value, (str, bytes)) else value
    if column.type == "FLOAT64":
        return round(float(value), 9)
    return value


def _rows(table, raw_rows):
    columns = [c for c in table.columns if c.name not in PROCESSING_TIME]
    rows = [{c.name: _canonical(c, r[c.name]) for c in columns} for r in raw_rows]
    if table.name == "dead_letters":
        for row in rows:
            if '"receivedAt"' not in row["raw"]:
                row["received_at"] = None  # a record without one: when it was read, processing time
    return sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS, default=str) for r in rows)


def duckdb_tables(path):
    con = duckdb.connect(str(path), read_only=True)
    try:
        out = {}
        for name, table in ALL_TABLES.items():
            if name in NOT_COMPARED_TABLES:
                continue
            cur = con.execute(f'SELECT * FROM "{name}"')
            names = [d[0] for d in cur.description]
            out[name] = _rows(table, [dict(zip(names, r)) for r in cur.fetchall()])
        return out
    finally:
        con.close()


def bigquery_tables(client, dataset):
    out = {}
    for name, table in ALL_TABLES.items():
        if name in NOT_COMPARED_TABLES:
            continue
        out[name] = _rows(table, [dict(r.items()) for r in client.query(f"SELECT * FROM `local.{dataset}.{name}`").result()])
    return out


@pytest.fixture(scope="module")
def traffic(tmp_path_factory):
    sample = tmp_path_factory.mktemp("bq") / "sample"
    generate(sample, customers=40, days=60, seed=5)
    return sample


def _run(sample, warehouse, *extra):
    assert main(["run", "--input", str(sample / "events"), "--catalog", str(sample / "catalog.csv"),
                 "--rates", str(sample / "rates.csv"), "--warehouse", str(warehouse), *extra]) == 0


def test_bq_init_creates_every_table_partitioned_and_clustered_and_adds_missing_columns(bigquery_emulator, capsys):
    from google.cloud import bigquery
    client = _client(bigquery_emulator)
    uri = bigquery_emulator.warehouse_uri("init_test")
    # a profiles table of an older cdpflow: two columns short, with a row in it
    client.create_dataset("local.init_test", exists_ok=True)
    old = [f for f in ALL_TABLES["profiles"].bigquery_schema() if f["name"] not in ("clv_model_id", "top_category")]
    client.create_table(bigquery.Table("local.init_test.profiles", schema=[
        bigquery.SchemaField(f["name"], f["type"], mode=f["mode"]) for f in old]))
    client.query("INSERT INTO `local.init_test.profiles` (profile_id, as_of, updated_at) VALUES "
                 "('p_old', CURRENT_TIMESTAMP(), CURRENT_TIMESTAMP())").result()
    assert main(["bq", "init", "--warehouse", uri]) == 0
    said = capsys.readouterr().out
    assert "profiles.clv_model_id" in said and "profiles.top_category" in said
    assert main(["bq", "init", "--warehouse", uri]) == 0  # idempotent
    assert "nothing to do" in capsys.readouterr().out
    for name, table in ALL_TABLES.items():
        got = client.get_table(f"local.init_test.{name}")
        assert {f.name for f in got.schema} == set(table.column_names), name
    events = client.get_table("local.init_test.events")
    assert events.time_partitioning.field == "timestamp" and events.time_partitioning.type_ == "DAY"
    assert events.clustering_fields == ["profile_id", "event"]
    kept = list(client.query("SELECT profile_id, clv_model_id FROM `local.init_test.profiles`").result())
    assert [(r[0], r[1]) for r in kept] == [("p_old", None)]


@pytest.fixture(scope="module")
def loaded(bigquery_emulator, traffic, tmp_path_factory):
    """The same input run into a DuckDB file and into the BigQuery dataset `cdp` (the analysts' name)."""
    folder = tmp_path_factory.mktemp("loaded")
    mp = pytest.MonkeyPatch()
    mp.setenv("CDPFLOW_STATE_DIR", str(folder / "state"))
    local = folder / "cdp.duckdb"
    uri = bigquery_emulator.warehouse_uri("cdp")
    _run(traffic, local)
    _run(traffic, uri)
    yield uri, local
    mp.undo()


def test_a_batch_run_into_bigquery_holds_the_rows_of_the_same_run_into_duckdb_and_a_replay_adds_none(
        bigquery_emulator, traffic, loaded, tmp_path, monkeypatch):
    # No insertAll anywhere (load jobs and DML only), so nothing relies on insertIds, whose memory
    # is a minute in BigQuery and does not survive the emulator's restart: a replay is kept from
    # duplicating by the keys the commit checks.
    uri, local = loaded
    monkeypatch.setenv("CDPFLOW_STATE_DIR", str(local.parent / "state"))
    client = _client(bigquery_emulator)
    ours, theirs = bigquery_tables(client, "cdp"), duckdb_tables(local)
    assert ours.keys() == theirs.keys()
    for name in theirs:
        assert ours[name] == theirs[name], f"{name}: {len(ours[name])} rows in BigQuery, {len(theirs[name])} in DuckDB"
    assert len(theirs["events"]) > 300 and theirs["dead_letters"] and theirs["segment_memberships"]
    # the same input again (a replay of the warehouse's events with it): not one row more
    _run(traffic, uri)
    again = bigquery_tables(client, "cdp")
    for name in ("events", "dead_letters", "identity_links", "profiles", "clv_models", "identity_conflicts",
                 "segment_memberships"):
        assert again[name] == ours[name], name
    versions = [r[0] for r in client.query("SELECT value FROM `local.cdp.warehouse_meta` "
                                           "WHERE name = 'version'").result()]
    assert versions == [2]
    # what a user reads back through cdpflow: a profile, and an export
    profile_id = json.loads(theirs["profiles"][0])["profile_id"]
    assert main(["profile", profile_id, "--warehouse", uri, "--json"]) == 0
    out = tmp_path / "events.jsonl"
    assert main(["export", "events", "--warehouse", uri, "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == len(theirs["events"])


def analyst_queries():
    """(title, BigQuery SQL, DuckDB SQL) of every query in docs/analyst-sql.md."""
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "docs" / "analyst-sql.md").read_text()
    found = []
    for section in re.split(r"^## ", text, flags=re.M)[1:]:
        title = section.splitlines()[0].strip()
        blocks = dict((dialect or "both", body) for dialect, body in
                      re.findall(r"```sql ?(bigquery|duckdb)?\n(.*?)```", section, flags=re.S))
        found.append((title, blocks.get("bigquery", blocks.get("both")), blocks.get("duckdb", blocks.get("both"))))
    return found


def _answer_value(value):
    from datetime import date
    if isinstance(value, datetime):
        delta = value - datetime(1970, 1, 1, tzinfo=timezone.utc)
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value.normalize())
    if isinstance(value, float):
        return round(value, 9)
    return value


def test_every_query_for_analysts_gives_the_same_answer_on_bigquery_and_duckdb(bigquery_emulator, loaded):
    uri, local = loaded
    client = _client(bigquery_emulator)
    queries = analyst_queries()
    assert len(queries) == 5 and all(bq and duck for _, bq, duck in queries), [q[0] for q in queries]
    # someone with memberships stands in for the example email
    con = duckdb.connect()
    con.execute(f"ATTACH '{local}' AS cdp (READ_ONLY)")
    email = con.execute("SELECT l.identifier_value FROM cdp.identity_links l JOIN cdp.segment_memberships m "
                        "USING (profile_id) WHERE l.identifier_type = 'email' AND m.segment = 'high_value' "
                        "ORDER BY 1 LIMIT 1").fetchone()[0]
    for title, bq_sql, duck_sql in queries:
        bq_sql, duck_sql = (q.replace("ann@example.com", email) for q in (bq_sql, duck_sql))
        ours = [tuple(_answer_value(v) for v in row.values()) for row in client.query(bq_sql).result()]
        theirs = [tuple(_answer_value(v) for v in row) for row in con.execute(duck_sql).fetchall()]
        assert ours, f"{title}: no rows (the test data should give some)"
        assert ours == theirs, title
    con.close()


def test_a_person_forgotten_in_bigquery_is_gone_from_every_table_and_a_replay_does_not_bring_them_back(
        bigquery_emulator, traffic, loaded, monkeypatch):
    # (after the tests that compare the loaded warehouses: this one forgets someone in it)
    uri, local = loaded
    monkeypatch.setenv("CDPFLOW_STATE_DIR", str(local.parent / "state"))
    client = _client(bigquery_emulator)

    def sql(text):
        return [tuple(r.values()) for r in client.query(text.replace("ds.", "`local.cdp`.")).result()]

    # someone with an email, orders and open memberships
    profile_id, email = sql("SELECT l.profile_id, l.identifier_value FROM ds.identity_links l JOIN ds.profiles p "
                            "USING (profile_id) WHERE l.identifier_type = 'email' AND p.orders_total > 0 "
                            "ORDER BY l.profile_id LIMIT 1")[0]
    identifiers = sql(f"SELECT identifier_type, identifier_value FROM ds.identity_links WHERE profile_id = '{profile_id}'")
    held = {r[0] for r in sql(f"SELECT segment FROM ds.segment_memberships WHERE profile_id = '{profile_id}' "
                              "AND exited_at IS NULL")}
    assert main(["forget", f"email:{email}", "--warehouse", uri]) == 0

    def traces():
        found = {}
        for table in ("events", "identity_links", "profiles", "segment_memberships", "lifecycle_transitions"):
            found[table] = sql(f"SELECT COUNT(*) FROM ds.{table} WHERE profile_id = '{profile_id}'")[0][0]
        values = [v for _, v in identifiers]
        found["links_by_value"] = len([r for r in sql("SELECT identifier_value FROM ds.identity_links")
                                       if r[0] in values])
        found["events_by_identifier"] = len([r for r in sql("SELECT TO_JSON_STRING(identifiers) FROM ds.events")
                                             if any(v in r[0] for v in values)])
        found["dead_letters"] = len([r for r in sql("SELECT raw FROM ds.dead_letters") if email in r[0]])
        return found

    assert set(traces().values()) == {0}
    assert sql("SELECT COUNT(*) FROM ds.identity_suppressions")[0][0] == len(identifiers)
    # their messages went with them; what is left of them is the exit of each open membership, for the destinations
    exits = sql(f"SELECT JSON_VALUE(payload, '$.direction'), JSON_VALUE(payload, '$.segment') FROM ds.outbox "
                f"WHERE message_key = '{profile_id}'")
    assert held and sorted(exits) == sorted(("exit", segment) for segment in held)
    _run(traffic, uri)  # the same input again, the forgotten person's events in it
    assert set(traces().values()) == {0}


def test_rows_bigquery_refuses_become_dead_letters_and_the_rest_land_once(bigquery_emulator, tmp_path):
    # Through the backend's commit: five staged events, one without its messageId (a REQUIRED
    # column: the load job refuses it, and is split until it stands alone) and one whose revenue
    # no NUMERIC holds. The three others land; the two are dead letters of stage `warehouse`, with
    # their raw payload and identifiers (so a forget still finds them); a second commit of the
    # same rows adds nothing.
    from cdpflow.warehouse.bigquery import BigQueryWarehouse
    client = _client(bigquery_emulator)
    staged = tmp_path / "tables" / "events"
    staged.mkdir(parents=True)
    rows = []
    for n in range(5):
        raw = {"type": "track", "event": "Order Completed", "messageId": f"m{n}", "userId": f"u{n}"}
        rows.append({"message_id": f"m{n}", "profile_id": f"p_{n}", "type": "track", "event": "Order Completed",
                     "timestamp": 1_790_000_000_000_000 + n, "received_at": 1_790_000_000_000_000 + n,
                     "revenue": "10.5", "currency": "USD", "identifiers": [["user_id", f"u{n}"]],
                     "raw": orjson.dumps(raw).decode()})
    rows[1]["message_id"] = None
    rows[3]["revenue"] = "1e40"
    staged.joinpath("part-0.jsonl").write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    warehouse = BigQueryWarehouse(bigquery_emulator.warehouse_uri("refused_test"))
    for attempt in range(2):
        written = warehouse.commit(str(tmp_path / "tables"), [], {"events": "message_id",
                                                                  "dead_letters": "dead_letter_id"})
        assert written["refused_by_bigquery"] == 2
        events = sorted(r[0] for r in client.query("SELECT message_id FROM `local.refused_test.events`").result())
        letters = [dict(r.items()) for r in client.query("SELECT * FROM `local.refused_test.dead_letters`").result()]
        assert events == ["m0", "m2", "m4"], attempt
        assert len(letters) == 2 and {r["stage"] for r in letters} == {"warehouse"}, attempt
        assert sorted(orjson.loads(r["raw"])["messageId"] for r in letters) == ["m1", "m3"]
        assert sorted(r["identifiers"][0][1] for r in letters) == ["u1", "u3"]
        assert all("BigQuery refused the events row" in r["error"] for r in letters)


def test_a_split_in_bigquery_gives_the_parts_the_ids_a_split_in_duckdb_gives_and_a_forget_clears_it(
        bigquery_emulator, tmp_path, monkeypatch):
    # The split's governance (separations and the names that keep the person's id) is written
    # and read by the BigQuery backend as by DuckDB; a forget deletes the rows naming the person.
    from tests.warehouse.helpers import family_split_input, query
    monkeypatch.setenv("CDPFLOW_STATE_DIR", str(tmp_path / "state"))
    raw, cookie, known, moved, person = family_split_input(tmp_path)
    client = _client(bigquery_emulator)
    uri, local = bigquery_emulator.warehouse_uri("split_test"), tmp_path / "split.duckdb"
    for warehouse in (uri, local):
        assert main(["run", "--input", raw, "--warehouse", str(warehouse)]) == 0
        assert main(["identity", "split", known, "--warehouse", str(warehouse)]) == 0

    def sql(text):
        return sorted(tuple(r.values()) for r in client.query(text.replace("ds.", "`local.split_test`.")).result())

    links = sql("SELECT identifier_type, identifier_value, profile_id FROM ds.identity_links")
    assert links == sorted(query(local, "SELECT identifier_type, identifier_value, profile_id FROM identity_links"))
    assert {p for t, v, p in links if (t, v) in person} == {known}
    assert sql("SELECT identifier_type, identifier_value, profile_id FROM ds.identity_names") == [
        ("anonymous_id", cookie, moved), ("user_id", "u-ann", known)]
    assert main(["forget", "user_id:u-ann", "--warehouse", uri]) == 0
    assert sql("SELECT COUNT(*) FROM ds.identity_separations") == [(0,)]
    assert sql("SELECT identifier_value FROM ds.identity_names") == [(cookie,)]
