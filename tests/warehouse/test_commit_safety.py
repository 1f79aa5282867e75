"""Commits that cannot lose work: races, crashes between commit and publish, older warehouses.

- Two commands race for one warehouse: the one that committed first stands, the other fails
  with a clear message (exit 3) and writes nothing.
- A process killed after its commit and before its publish (or after delivering and before
  marking) loses no segment change and repeats none once published again: the published file
  equals the one an uninterrupted run writes, line for line as a set, with no key twice.
- A warehouse written by the previous release's schema (frozen in fixtures/previous_schema.sql,
  filled the way that release wrote: by position) opens, gains the new columns and keeps every
  value in its own column; a person that release forgot (legacy hashes, an identity store the
  forget never cleaned) stays gone after the upgrade, through batch and stream.
"""
import glob
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter

import duckdb
import orjson
import pytest

from cdpflow.cli import main
from cdpflow.config import load_config
from cdpflow.pipelines.batch import run_batch
from cdpflow.warehouse import ConcurrentWriteError, open_warehouse
from tests.warehouse.helpers import copy_warehouse, query, stem

pytestmark = pytest.mark.e2e

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
AS_OF_LATER = "2026-12-20T00:00:00Z"  # weeks after the sample ends: lifecycle stages move, segments change


def references(sample):
    return ["--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]


@pytest.fixture(scope="module")
def base(sample, tmp_path_factory):
    wh = tmp_path_factory.mktemp("commit") / "base.duckdb"
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(wh), *references(sample)]) == 0
    return wh


def cdpflow(*args, fault=None):
    env = {**os.environ, "CDPFLOW_DEMO": "1"}
    env.pop("CDPFLOW_FAULT", None)
    if fault:
        env["CDPFLOW_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "cdpflow.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def published(path):
    return [orjson.loads(line) for line in open(path, "rb") if line.strip()] if os.path.exists(path) else []


# ------------------------------------------------------------------------------------------ races
def test_a_run_that_lost_the_race_writes_nothing_and_the_forget_that_won_stands(sample, base, tmp_path):
    wh = tmp_path / "race.duckdb"
    copy_warehouse(base, wh)
    email, profile_id = query(wh, "SELECT identifier_value, profile_id FROM identity_links "
                                  "WHERE identifier_type = 'email' ORDER BY 1 LIMIT 1")[0]
    config = load_config(enrichment={"catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")})
    version = query(wh, "SELECT value FROM warehouse_meta WHERE name = 'version'")[0][0]

    # While the run works, a forget commits: the run's commit must not undo it.
    def forget_meanwhile():
        assert main(["forget", f"email:{email}", "--warehouse", str(wh)]) == 0

    with pytest.raises(ConcurrentWriteError, match="nothing was written"):
        run_batch([str(sample / "events")], str(wh), config, as_of=None, before_commit=forget_meanwhile)
    assert query(wh, "SELECT value FROM warehouse_meta WHERE name = 'version'")[0][0] == version + 1
    assert query(wh, "SELECT count(*) FROM identity_links WHERE profile_id = ?", [profile_id])[0][0] == 0
    assert query(wh, "SELECT count(*) FROM events WHERE profile_id = ?", [profile_id])[0][0] == 0
    assert query(wh, "SELECT count(*) FROM identity_suppressions")[0][0] > 0
    # run again, it wins this time, and the person stays gone
    run_batch([str(sample / "events")], str(wh), config)
    assert query(wh, "SELECT count(*) FROM identity_links WHERE identifier_value = ?", [email])[0][0] == 0


def test_two_processes_racing_one_wins_the_other_fails_clearly(sample, base, tmp_path):
    wh = tmp_path / "two.duckdb"
    copy_warehouse(base, wh)
    version = query(wh, "SELECT value FROM warehouse_meta WHERE name = 'version'")[0][0]
    profiles = query(wh, "SELECT count(*) FROM profiles")[0][0]
    # Two runs read the same version; the first to commit wins. The loser fails with exit 3, a
    # message, no traceback, and the winner's tables are intact.
    args = ["run", "--input", str(sample / "events"), "--warehouse", str(wh), *references(sample),
            "--as-of", AS_OF_LATER]
    env = {**os.environ, "CDPFLOW_DEMO": "1"}
    procs = [subprocess.Popen([sys.executable, "-m", "cdpflow.cli", *args], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    loser = next(err for code, _, err in results if code == 3)
    assert "another command has since committed" in loser and "Traceback" not in loser
    assert query(wh, "SELECT value FROM warehouse_meta WHERE name = 'version'")[0][0] == version + 1
    assert query(wh, "SELECT count(*) FROM profiles")[0][0] == profiles
    changes = published(stem(wh) + ".segment_changes.jsonl")
    assert len(changes) == len({c["idempotency_key"] for c in changes})


# ---------------------------------------------------------------------------------------- crashes
@pytest.fixture(scope="module")
def uninterrupted(sample, base, tmp_path_factory):
    """What a run at a later as-of publishes when nothing goes wrong."""
    wh = tmp_path_factory.mktemp("reference") / "ref.duckdb"
    copy_warehouse(base, wh)
    done = cdpflow("run", "--input", str(sample / "events"), "--warehouse", str(wh), *references(sample),
                   "--as-of", AS_OF_LATER)
    assert done.returncode == 0, done.stderr
    return published(stem(wh) + ".segment_changes.jsonl")


@pytest.mark.parametrize("fault", ["after-commit", "after-deliver"])
def test_a_crash_between_commit_and_publish_loses_no_change_and_repeats_none(sample, base, uninterrupted, tmp_path,
                                                                             fault):
    wh = tmp_path / "crash.duckdb"
    copy_warehouse(base, wh)
    before = published(stem(wh) + ".segment_changes.jsonl")
    assert len(uninterrupted) > len(before)  # the later as-of changes segments
    crashed = cdpflow("run", "--input", str(sample / "events"), "--warehouse", str(wh), *references(sample),
                      "--as-of", AS_OF_LATER, fault=fault)
    assert crashed.returncode == 70, crashed.stderr
    pending = query(wh, "SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0]
    assert pending == len(uninterrupted) - len(before)  # committed, waiting in the outbox
    # restart: publish what is pending, twice (a second publish finds nothing to send)
    for _ in range(2):
        done = cdpflow("publish", "--warehouse", str(wh))
        assert done.returncode == 0, done.stderr
    after = published(stem(wh) + ".segment_changes.jsonl")
    keys = Counter(c["idempotency_key"] for c in after)
    assert max(keys.values()) == 1  # nothing twice
    assert sorted(after, key=lambda c: c["idempotency_key"]) == sorted(uninterrupted, key=lambda c: c["idempotency_key"])
    assert query(wh, "SELECT count(*) FROM outbox WHERE published_at IS NULL")[0][0] == 0


def test_a_crash_before_the_commit_changes_nothing(sample, base, tmp_path):
    wh = tmp_path / "early.duckdb"
    copy_warehouse(base, wh)
    tables = {t: query(wh, f'SELECT count(*) FROM "{t}"')[0][0] for t in ("events", "profiles", "segment_memberships", "outbox")}
    crashed = cdpflow("run", "--input", str(sample / "events"), "--warehouse", str(wh), *references(sample),
                      "--as-of", AS_OF_LATER, fault="before-commit")
    assert crashed.returncode == 70
    assert {t: query(wh, f'SELECT count(*) FROM "{t}"')[0][0] for t in tables} == tables


# ---------------------------------------------------------------------------------------- upgrades
def previous_release_warehouse(base, path):
    """The base warehouse's rows in a file with the previous release's schema, written by position.

    The previous release inserted with `INSERT ... SELECT *`, so its files hold the columns in
    its own order; the new `dead_letters.identifiers` column sits before `received_at` in
    today's contract, and appending it to an old file puts it elsewhere.
    """
    con = duckdb.connect(str(path))
    with open(os.path.join(FIXTURES, "previous_schema.sql")) as handle:
        con.execute(handle.read())
    con.execute(f"ATTACH '{base}' AS new (READ_ONLY)")
    for (table,) in con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = current_database()"
                                ).fetchall():
        columns = [r[0] for r in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = ? AND table_catalog = current_database() "
            "ORDER BY ordinal_position", [table]).fetchall()]
        listed = ", ".join(f'"{c}"' for c in columns)
        con.execute(f'INSERT INTO "{table}" SELECT {listed} FROM new."{table}"')
    con.execute("DETACH new")
    con.close()


def legacy_forget(path, store, profile_id):
    """What the previous release's `cdpflow forget` did: constant-salted hashes, a partial delete.

    It left the person's lifecycle transitions and conflicts, matched dead letters by substring,
    and never touched the identity store.
    """
    con = duckdb.connect(str(path))
    identifiers = con.execute("SELECT identifier_type, identifier_value FROM identity_links WHERE profile_id = ?",
                              [profile_id]).fetchall()
    for id_type, value in identifiers:
        digest = hashlib.sha256(f"forget\x00{id_type}\x00{value}".encode()).hexdigest()
        con.execute("INSERT INTO identity_suppressions VALUES (?, now(), 'legacy-request')", [digest])
    for table in ("events", "identity_links", "profiles", "segment_memberships"):
        con.execute(f'DELETE FROM "{table}" WHERE profile_id = ?', [profile_id])
    con.execute("DELETE FROM profile_merges WHERE survivor_id = ? OR absorbed_id = ?", [profile_id, profile_id])
    con.close()
    return identifiers


def test_a_warehouse_of_the_previous_schema_upgrades_and_a_forgotten_person_stays_gone(sample, base, tmp_path):
    old = tmp_path / "old.duckdb"
    previous_release_warehouse(base, old)
    shutil.copy(stem(base) + ".identity.sqlite", stem(old) + ".identity.sqlite")  # the old store: never cleaned
    shutil.copy(stem(base) + ".suppression.key", stem(old) + ".suppression.key")
    letters_before = {r[0]: r[1:] for r in query(old, "SELECT dead_letter_id, stage, error, schema_version, received_at "
                                                      "FROM dead_letters")}
    events_before = {r[0]: r[1:] for r in query(old, 'SELECT message_id, "timestamp", received_at, raw::VARCHAR '
                                                     "FROM events")}
    assert letters_before and events_before
    # A buyer with a dead letter is forgotten the old way.
    letter_ids = {tuple(i) for r in query(base, "SELECT identifiers::VARCHAR FROM dead_letters") for i in orjson.loads(r[0])}
    candidates = query(base, "SELECT profile_id, identifier_type, identifier_value FROM identity_links ORDER BY 1, 2, 3")
    profile_id = next(p for p, t, v in candidates if (t, v) in letter_ids and t == "email")
    identifiers = legacy_forget(old, stem(old) + ".identity.sqlite", profile_id)
    old_nodes = {(t, v) for t, v in sqlite3.connect(stem(old) + ".identity.sqlite").execute("SELECT type, value FROM node")}
    assert set(identifiers) <= old_nodes  # the old store still holds them

    # Upgrade: the new release opens it, migrates, and replays the raw files.
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(old), *references(sample)]) == 0
    columns = {t: [r[0] for r in query(old, "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                                            "ORDER BY ordinal_position", [t])] for t in ("dead_letters", "identity_suppressions")}
    assert columns["dead_letters"][-1] == "identifiers" and "key_id" in columns["identity_suppressions"]
    # every value in its own column: the rows that were there keep their values...
    letters_after = {r[0]: r[1:] for r in query(old, "SELECT dead_letter_id, stage, error, schema_version, received_at "
                                                     "FROM dead_letters")}
    kept = {k: v for k, v in letters_before.items() if k in letters_after}
    assert kept and all(letters_after[k] == v for k, v in kept.items())
    events_after = {r[0]: r[1:] for r in query(old, 'SELECT message_id, "timestamp", received_at, raw::VARCHAR FROM events')}
    assert all(events_after[m] == v for m, v in events_before.items() if m in events_after)
    # ...and the new column holds identifiers (JSON lists of [type, value]), the timestamps timestamps
    for ids, received in query(old, "SELECT identifiers::VARCHAR, received_at FROM dead_letters"):
        assert isinstance(orjson.loads(ids), list) and all(len(i) == 2 for i in orjson.loads(ids))
        assert received is None or hasattr(received, "year")
    legacy = query(old, "SELECT count(*) FROM identity_suppressions WHERE key_id IS NULL")[0][0]
    assert legacy == len(identifiers)

    # The person stays gone: tables (transitions and conflicts included), dead letters, the kept store.
    values = [v for _, v in identifiers]
    marks = ",".join("?" * len(values))
    assert query(old, f"SELECT count(*) FROM identity_links WHERE identifier_value IN ({marks})", values)[0][0] == 0
    for table in ("events", "profiles", "lifecycle_transitions", "segment_memberships"):
        assert query(old, f'SELECT count(*) FROM "{table}" WHERE profile_id = ?', [profile_id])[0][0] == 0, table
    assert query(old, f"SELECT count(*) FROM identity_conflicts WHERE identifier_value IN ({marks})", values)[0][0] == 0
    for (ids,) in query(old, "SELECT identifiers::VARCHAR FROM dead_letters"):
        assert not {tuple(i) for i in orjson.loads(ids)} & set(identifiers)
    new_nodes = {(t, v) for t, v in sqlite3.connect(stem(old) + ".identity.sqlite").execute("SELECT type, value FROM node")}
    assert new_nodes and not new_nodes & set(identifiers)
    # (the stream path after a forget: tests/test_identity_governance.py)


# --------------------------------------------------------------------------------------- the future
def test_an_event_stamped_in_2099_changes_no_profile(sample, base, tmp_path):
    wh = tmp_path / "future.duckdb"
    copy_warehouse(base, wh)
    profile_id, user_id = query(wh, "SELECT profile_id, identifier_value FROM identity_links "
                                    "WHERE identifier_type = 'user_id' ORDER BY 1 LIMIT 1")[0]
    before = {r[0]: r[1:] for r in query(wh, "SELECT profile_id, last_seen, lifecycle_stage, event_count, as_of FROM profiles")}
    future = tmp_path / "future.jsonl"
    future.write_bytes(orjson.dumps({
        "type": "track", "event": "Order Completed", "messageId": "from-2099", "userId": user_id,
        "timestamp": "2099-01-01T00:00:00Z", "receivedAt": "2026-10-30T12:00:00Z",
        "properties": {"revenue": 10, "currency": "USD"}}) + b"\n")
    assert main(["run", "--input", str(future), "--warehouse", str(wh), *references(sample)]) == 0
    after = {r[0]: r[1:] for r in query(wh, "SELECT profile_id, last_seen, lifecycle_stage, event_count, as_of FROM profiles")}
    assert after == before
    assert query(wh, "SELECT stage FROM dead_letters WHERE raw LIKE '%from-2099%'") == [("future",)]
    assert query(wh, "SELECT count(*) FROM events WHERE message_id = 'from-2099'")[0][0] == 0
    # the stream refuses it the same way
    out = tmp_path / "stream"
    assert main(["replay", "--input", str(future), "--out", str(out)]) == 0
    letters = [orjson.loads(l) for p in glob.glob(str(out / "dead_letters" / "*.jsonl")) for l in open(p)]
    assert [l["stage"] for l in letters] == ["future"]
    assert not glob.glob(str(out / "profiles" / "*.jsonl"))


def test_open_warehouse_by_uri(base, tmp_path):
    wh = tmp_path / "uri.duckdb"
    copy_warehouse(base, wh)
    with open_warehouse(f"duckdb://{wh}", read_only=True) as a, open_warehouse(str(wh), read_only=True) as b:
        assert a.version() == b.version() > 0
        assert a.count("profiles") == b.count("profiles") > 0


def test_resolve_profile_id_follows_merges_but_not_undone_ones(tmp_path):
    path = tmp_path / "merges.duckdb"
    with open_warehouse(str(path)) as wh:  # creates the tables
        wh.con.execute("INSERT INTO profiles BY NAME SELECT unnest(['p_a', 'p_b', 'p_c']) AS profile_id, "
                       "now() AS as_of, now() AS updated_at")
        wh.con.execute("""INSERT INTO profile_merges BY NAME SELECT * FROM (VALUES
            ('p_a', 'p_old', 'm1', 'shared email', TIMESTAMPTZ '2026-01-01', NULL, NULL),
            ('p_b', 'p_c', 'm2', 'shared email', TIMESTAMPTZ '2026-01-02', TIMESTAMPTZ '2026-02-01', 'manual split'))
            AS t(survivor_id, absorbed_id, cause_message_id, reason, merged_at, undone_at, undone_by)""")
        assert wh.resolve_profile_id("p_old") == "p_a"  # absorbed: answers with its survivor
        assert wh.resolve_profile_id("p_c") == "p_c"  # the merge was undone: it is itself again
        assert [m["absorbed_id"] for m in wh.merges_into("p_b")] == []
