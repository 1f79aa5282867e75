"""Forget and split end to end, each followed by a replay of the raw events."""
import shutil

import duckdb
import pytest

from cdpflow.cli import main

pytestmark = pytest.mark.e2e


def run_args(sample, wh):
    return ["--warehouse", str(wh), "--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]


@pytest.fixture(scope="module")
def base(sample, tmp_path_factory):
    wh = tmp_path_factory.mktemp("gov") / "base.duckdb"
    assert main(["run", "--input", str(sample / "events"), *run_args(sample, wh)]) == 0
    return wh


def query(wh, sql, params=()):
    con = duckdb.connect(str(wh), read_only=True)
    try:
        return con.execute(sql, list(params)).fetchall()
    finally:
        con.close()


def test_a_forgotten_person_stays_gone_after_a_replay_of_old_raw_events(sample, base, tmp_path):
    wh = tmp_path / "forget.duckdb"
    shutil.copy(base, wh)
    profile_id, email = query(wh, """SELECT p.profile_id, l.identifier_value FROM profiles p
        JOIN identity_links l USING (profile_id) WHERE l.identifier_type = 'email' AND p.orders_total > 0
        ORDER BY p.profile_id LIMIT 1""")[0]
    identifiers = query(wh, "SELECT identifier_type, identifier_value FROM identity_links WHERE profile_id = ?", [profile_id])
    message_ids = [r[0] for r in query(wh, "SELECT message_id FROM events WHERE profile_id = ?", [profile_id])]
    open_segments = query(wh, "SELECT count(*) FROM segment_memberships WHERE profile_id = ? AND exited_at IS NULL", [profile_id])[0][0]
    assert message_ids and open_segments

    assert main(["forget", email.upper(), "--warehouse", str(wh)]) == 0
    assert query(wh, "SELECT count(*) FROM identity_suppressions")[0][0] == len(identifiers)
    exits = [l for l in open(str(wh).replace(".duckdb", ".segment_changes.jsonl")) if '"exit"' in l and profile_id in l]
    assert len(exits) == open_segments

    # replaying the original raw files must not bring the person back
    assert main(["run", "--input", str(sample / "events"), *run_args(sample, wh)]) == 0
    values = [v for _, v in identifiers]
    marks = ",".join("?" * len(values))
    assert query(wh, f"SELECT count(*) FROM identity_links WHERE identifier_value IN ({marks})", values)[0][0] == 0
    marks = ",".join("?" * len(message_ids))
    assert query(wh, f"SELECT count(*) FROM events WHERE message_id IN ({marks})", message_ids)[0][0] == 0
    assert query(wh, "SELECT count(*) FROM events WHERE contains(raw::VARCHAR, ?)", [email])[0][0] == 0
    assert query(wh, "SELECT count(*) FROM dead_letters WHERE contains(lower(raw), ?)", [email])[0][0] == 0
    assert main(["profile", email, "--warehouse", str(wh)]) == 2


def test_a_split_stays_split_after_a_replay(sample, base, tmp_path):
    wh = tmp_path / "split.duckdb"
    shutil.copy(base, wh)
    survivor, absorbed = query(wh, "SELECT survivor_id, absorbed_id FROM profile_merges WHERE undone_at IS NULL "
                                   "ORDER BY merged_at LIMIT 1")[0]
    before = query(wh, "SELECT count(*) FROM profiles")[0][0]
    assert main(["identity", "split", survivor, "--merge", absorbed, *run_args(sample, wh)]) == 0
    assert query(wh, "SELECT count(*) FROM identity_separations")[0][0] == 1
    (lt, lv, rt, rv), = query(wh, "SELECT left_type, left_value, right_type, right_value FROM identity_separations")

    def apart():
        left = query(wh, "SELECT profile_id FROM identity_links WHERE identifier_type = ? AND identifier_value = ?", [lt, lv])
        right = query(wh, "SELECT profile_id FROM identity_links WHERE identifier_type = ? AND identifier_value = ?", [rt, rv])
        return left[0][0] != right[0][0]

    assert apart()
    assert query(wh, "SELECT count(*) FROM profiles")[0][0] == before + 1
    assert query(wh, "SELECT count(*) FROM identity_conflicts WHERE rule = 'manual_split'")[0][0] >= 1
    assert main(["run", "--input", str(sample / "events"), *run_args(sample, wh)]) == 0
    assert apart()
