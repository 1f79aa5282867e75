"""End to end: every feature column the batch job writes equals the pandas oracle of docs/features.md.

Generated data is run through the batch pipeline; then, for every row of `profiles`, each
feature column is compared exactly with tests/feature_oracle.py computed from the warehouse's
own `events` table (whose profile_id is the final identity partition) at the row's `as_of`, and
every `lifecycle_transitions` row with the oracle's stage history. The data is first checked to
hold the cases that make features hard: out-of-order arrival, duplicates, late events inside the
allowed lateness, refused later ones, and merges of two profiles that both had history.

    python -m pytest tests/pipelines/test_features_oracle.py
"""
from __future__ import annotations

import json
import sqlite3
from collections import Counter, defaultdict
from decimal import Decimal

import duckdb
import pytest

from cdpflow.config import load_config
from cdpflow.pipelines.batch import identity_store_path, run_batch
from cdpflow.synthetic import generate
from tests.feature_oracle import events_from_warehouse, oracle_profiles, oracle_transitions

pytestmark = pytest.mark.e2e

HOUR_US = 3_600_000_000
TIME_COLUMNS = ("first_seen", "last_seen", "last_order_at")
STAGES = {"prospect", "new", "reactivated", "active", "at_risk", "lapsed", "churned"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """300 persons over 500 days (default noise), through the batch job once (about 15 s).

    500 days, not fewer: lapsed and churned need 180 and 365 days without an order, reactivated
    a gap of 180 days, and the 365-day window has to cut something off.
    """
    sample = tmp_path_factory.mktemp("features_sample")
    generate(sample, customers=300, days=500, seed=23)
    config = load_config(enrichment={"catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")})
    warehouse = str(tmp_path_factory.mktemp("features_wh") / "cdp.duckdb")
    summary = run_batch([str(sample / "events")], warehouse, config)
    return warehouse, summary, config


@pytest.fixture(scope="module")
def events(run):
    return events_from_warehouse(run[0])


def query(warehouse, sql):
    con = duckdb.connect(warehouse, read_only=True)
    try:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        con.close()


def pipeline_profiles(warehouse, columns):
    """profiles rows by id, with times as int microseconds and category_affinity parsed."""
    select = ["profile_id", "epoch_us(as_of) AS as_of"]
    for column in columns:
        if column in TIME_COLUMNS:
            select.append(f'epoch_us("{column}") AS "{column}"')
        elif column == "category_affinity":
            select.append(f'"{column}"::VARCHAR AS "{column}"')
        else:
            select.append(f'"{column}"')
    rows = query(warehouse, f"SELECT {', '.join(select)} FROM profiles")
    for row in rows:
        if row["category_affinity"] is not None:
            row["category_affinity"] = json.loads(row["category_affinity"])
    return {row.pop("profile_id"): row for row in rows}


def same(pipeline_value, oracle_value):
    """Exact equality, with a Decimal's scale ignored (DECIMAL(38, 9) keeps trailing zeros) and no bool/int mixing."""
    if isinstance(oracle_value, bool) or isinstance(pipeline_value, bool):
        return type(pipeline_value) is type(oracle_value) and pipeline_value == oracle_value
    if isinstance(oracle_value, Decimal):
        return isinstance(pipeline_value, Decimal) and pipeline_value == oracle_value
    return pipeline_value == oracle_value


# ---------------------------------------------------------------------------------- the data is hard enough
def test_the_data_holds_out_of_order_duplicate_late_and_refused_events(run):
    warehouse, summary, config = run
    allowed = config["features"]["allowed_lateness_hours"] * HOUR_US
    # within a profile, an event received after one with a later event time
    out_of_order = query(warehouse, """
        SELECT count(*) AS n FROM (
          SELECT "timestamp", max("timestamp") OVER (PARTITION BY profile_id ORDER BY received_at, message_id
                                                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING) AS before
          FROM events) WHERE "timestamp" < before""")[0]["n"]
    assert out_of_order > 0
    assert summary.deduplicated > 0
    lateness = query(warehouse, f"""
        SELECT count(*) FILTER (WHERE late BETWEEN {HOUR_US} AND {allowed}) AS late_accepted, max(late) AS latest
        FROM (SELECT epoch_us(received_at) - epoch_us("timestamp") AS late FROM events)""")[0]
    assert lateness["late_accepted"] > 0
    assert lateness["latest"] <= allowed  # nothing later than the allowed lateness was accepted...
    refused = query(warehouse, "SELECT count(*) AS n FROM dead_letters WHERE stage = 'lateness'")[0]["n"]
    assert refused > 0  # ...and the later ones were refused


def test_the_data_holds_merges_of_two_profiles_that_both_had_events_before(run):
    warehouse, _, _ = run
    # The final profile_id of an event cannot tell which profile it was first resolved to; the
    # identity store kept beside the warehouse records that decision per messageId.
    store = sqlite3.connect(f"file:{identity_store_path(warehouse)}?mode=ro", uri=True)
    try:
        first_profile = dict(store.execute("SELECT message_id, profile FROM decision WHERE status = 'ok'").fetchall())
    finally:
        store.close()
    events = query(warehouse, 'SELECT message_id, profile_id, epoch_us("timestamp") AS ts FROM events')
    history = defaultdict(list)  # first-resolved profile -> [(event time, final profile)]
    for e in events:
        history[first_profile[e["message_id"]]].append((e["ts"], e["profile_id"]))
    merges = query(warehouse, "SELECT survivor_id, absorbed_id, epoch_us(merged_at) AS at FROM profile_merges "
                              "WHERE undone_at IS NULL")
    both_sides = []
    for m in merges:
        absorbed = [final for ts, final in history[m["absorbed_id"]] if ts < m["at"]]
        survivor = [final for ts, final in history[m["survivor_id"]] if ts < m["at"]]
        if absorbed and survivor:
            # the two histories now belong to one final profile
            assert len(set(absorbed) | set(survivor)) == 1, m
            both_sides.append(m)
    assert both_sides, f"none of {len(merges)} merges joined two profiles with earlier events"


# ---------------------------------------------------------------------------------- the comparison
def test_every_profile_feature_equals_the_oracle(run, events):
    warehouse, summary, config = run
    as_of = {r["profile_id"]: r["as_of"] for r in query(warehouse, "SELECT profile_id, epoch_us(as_of) AS as_of FROM profiles")}
    assert set(as_of.values()) == {summary.as_of}  # one batch run: one as_of
    expected = oracle_profiles(events, as_of, config)
    assert set(expected) == set(as_of) == set(events["profile_id"])  # every profile, and only those with events
    columns = sorted(next(iter(expected.values())))
    got = pipeline_profiles(warehouse, columns)
    mismatches = [(profile, column, got[profile][column], want)
                  for profile, row in sorted(expected.items()) for column, want in row.items()
                  if not same(got[profile][column], want)]
    by_column = Counter(m[1] for m in mismatches)
    detail = "\n".join(f"  {p} {c}: pipeline {g!r} oracle {w!r}" for p, c, g, w in mismatches[:30])
    assert not mismatches, f"{len(mismatches)} mismatches over {len(expected)} profiles, by column {dict(by_column)}:\n{detail}"
    # the comparison covered more than empty profiles
    stages = Counter(r["lifecycle_stage"] for r in expected.values())
    assert len(stages) >= 6, stages
    assert sum(r["orders_365d"] < r["orders_total"] for r in expected.values()) > 10
    assert sum(r["sessions_7d"] > 0 for r in expected.values()) > 10
    assert sum(len(r["category_affinity"]) > 1 for r in expected.values()) > 10


def test_lifecycle_transitions_equal_the_oracle_stage_history(run, events):
    warehouse, summary, config = run
    rows = query(warehouse, """SELECT profile_id, from_stage, to_stage, epoch_us(transitioned_at) AS at,
                                      epoch_us(as_of) AS as_of, source FROM lifecycle_transitions""")
    assert {(r["as_of"], r["source"]) for r in rows} == {(summary.as_of, "batch")}
    got = defaultdict(list)
    for r in sorted(rows, key=lambda r: (r["profile_id"], r["at"])):
        got[r["profile_id"]].append((r["at"], r["from_stage"], r["to_stage"]))
    # the first batch run has no previous as_of: the whole history up to its own
    expected = oracle_transitions(events, None, summary.as_of, config)
    # every stage is reached, by more than one kind of change
    assert {to for history in expected.values() for _, _, to in history} == STAGES
    assert len({(before, to) for history in expected.values() for _, before, to in history}) >= 10
    wrong = sorted(p for p in set(got) | set(expected) if got.get(p) != expected.get(p))
    detail = "\n".join(f"  {p}: pipeline {got.get(p)} oracle {expected.get(p)}" for p in wrong[:10])
    assert not wrong, f"{len(wrong)} of {len(expected)} profiles differ:\n{detail}"
