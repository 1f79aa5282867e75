"""Forget and split end to end, each followed by a replay of the raw events through every path.

A forgotten person must appear in no output at all afterwards: not in a batch run's tables,
not in what a replay of the raw files through the streaming graph emits, not in segment
changes or dead letters, and not in either identity store. The checks read the raw identifiers
from the warehouse before the forget and search every output for them, by exact identifier and
as text.
"""
import glob
import hashlib
import hmac
import os
import sqlite3
import uuid

import duckdb
import orjson
import pytest

from cdpflow.cli import main
from cdpflow.core.governance import SuppressionKey
from cdpflow.core.identity import IdentityRules, open_identity_store
from cdpflow.pipelines.replay import rebuild_identity_store
from cdpflow.warehouse import open_warehouse
from tests.warehouse.helpers import copy_warehouse, family_split_input, query

pytestmark = pytest.mark.e2e


def run_args(sample, wh):
    return ["--warehouse", str(wh), "--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """A small sample of this module's own (every test here replays it more than once)."""
    from cdpflow.synthetic import generate
    out = tmp_path_factory.mktemp("gov-sample")
    generate(out, customers=50, days=60, seed=5)
    return out


@pytest.fixture(scope="module")
def base(sample, tmp_path_factory):
    wh = tmp_path_factory.mktemp("gov") / "base.duckdb"
    assert main(["run", "--input", str(sample / "events"), *run_args(sample, wh)]) == 0
    return wh


def texts_of_every_table(wh):
    """Every row of every table as lower-case text."""
    con = duckdb.connect(str(wh), read_only=True)
    try:
        tables = [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        return {t: [r[0].lower() for r in con.execute(f'SELECT lower(t::VARCHAR) FROM "{t}" t').fetchall()] for t in tables}
    finally:
        con.close()


def store_nodes(path):
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return {(t, v) for t, v in con.execute("SELECT type, value FROM node").fetchall()}
    finally:
        con.close()


def person_with_a_dead_letter(sample, wh, tmp_path):
    """A buying person, given dead letters of their own: (profile_id, email, identifiers, refused lines).

    Two refused records name them: one with a bad field beside their email (schema error), and
    one with their phone written as a person would type it (found only once normalised).
    """
    profile_id, email = query(wh, """SELECT p.profile_id, l.identifier_value FROM profiles p
        JOIN identity_links l USING (profile_id) WHERE l.identifier_type = 'email' AND p.orders_total > 0
        ORDER BY p.profile_id LIMIT 1""")[0]
    user_id = query(wh, "SELECT identifier_value FROM identity_links WHERE profile_id = ? AND identifier_type = 'user_id'",
                    [profile_id])
    refused = tmp_path / "refused.jsonl"
    lines = [{"type": "identify", "messageId": "refused-1", "anonymousId": "refused-anon-1",
              "traits": {"email": email.upper()}, "timestamp": 12, "receivedAt": "2026-10-01T00:00:00Z"}]
    if user_id:
        lines.append({"type": "track", "event": "", "messageId": "refused-2", "userId": user_id[0][0],
                      "timestamp": "not a time", "receivedAt": "2026-10-01T00:00:00Z"})
    refused.write_bytes(b"".join(orjson.dumps(l) + b"\n" for l in lines))
    assert main(["run", "--input", str(refused), *run_args(sample, wh)]) == 0
    letters = [orjson.loads(r[0]) for r in query(wh, "SELECT identifiers::VARCHAR FROM dead_letters WHERE raw LIKE '%refused-%'")]
    assert len(letters) == len(lines) and all(letters)
    identifiers = [tuple(r) for r in query(
        wh, "SELECT identifier_type, identifier_value FROM identity_links WHERE profile_id = ?", [profile_id])]
    return profile_id, email, identifiers, refused


def assert_absent(texts, needles, where):
    found = [(name, n) for name, rows in texts.items() for n in needles for row in rows if n in row]
    assert not found, f"{where}: the forgotten person is still in {sorted(set(found))[:5]}"


def redis_nodes(uri):
    store = open_identity_store(uri)
    try:
        return {(l["identifier_type"], l["identifier_value"]) for l in store.links()}
    finally:
        store.close()


def test_a_forgotten_person_appears_in_no_output_after_replays_through_batch_and_stream(sample, base, tmp_path,
                                                                                        redis_url):
    wh = tmp_path / "forget.duckdb"
    copy_warehouse(base, wh)
    changes = tmp_path / "forget.segment_changes.jsonl"
    store = tmp_path / "forget.identity.sqlite"
    profile_id, email, identifiers, refused = person_with_a_dead_letter(sample, wh, tmp_path)
    message_ids = [r[0] for r in query(wh, "SELECT message_id FROM events WHERE profile_id = ?", [profile_id])]
    open_segments = query(wh, "SELECT count(*) FROM segment_memberships WHERE profile_id = ? AND exited_at IS NULL", [profile_id])[0][0]
    assert message_ids and open_segments and set(identifiers) <= store_nodes(store)
    # Needles: the values that name this person and no one else (anonymous ids and emails are unique here).
    needles = [v.lower() for t, v in identifiers if t in ("email", "user_id", "anonymous_id")] + [profile_id]
    assert query(wh, "SELECT count(*) FROM dead_letters WHERE raw LIKE '%refused-%'")[0][0] > 0
    published_before = changes.read_text().count("\n")

    assert main(["forget", f"email:{email.upper()}", "--warehouse", str(wh)]) == 0
    assert query(wh, "SELECT count(*) FROM identity_suppressions")[0][0] == len(identifiers)
    exits = [orjson.loads(l) for l in changes.read_text().splitlines()[published_before:]]
    assert len(exits) == open_segments and {(c["profile_id"], c["direction"]) for c in exits} == {(profile_id, "exit")}
    # the identity store kept with the warehouse forgot them too, everywhere
    assert not set(identifiers) & store_nodes(store)
    con = sqlite3.connect(str(store))
    assert con.execute(f"SELECT count(*) FROM decision WHERE message_id IN ({','.join('?' * len(message_ids))})",
                       message_ids).fetchone()[0] == 0
    con.close()
    after_forget = texts_of_every_table(wh)
    assert_absent({k: v for k, v in after_forget.items() if k != "outbox"}, needles, "after the forget")
    # the outbox holds just the exits that tell the destinations
    assert all('"direction": "exit"' in row or '"direction":"exit"' in row or profile_id not in row
               for row in after_forget["outbox"])

    # the raw files again through the batch run
    published_after_forget = changes.read_text().count("\n")
    assert main(["run", "--input", str(sample / "events"), str(refused), *run_args(sample, wh)]) == 0
    assert_absent({k: v for k, v in texts_of_every_table(wh).items() if k != "outbox"}, needles, "after a batch replay")
    assert not set(identifiers) & store_nodes(store)
    later = changes.read_text().splitlines()[published_after_forget:]
    assert not [l for l in later if any(n in l.lower() for n in needles)]
    assert main(["profile", email, "--warehouse", str(wh)]) == 2

    # and through the streaming graph, starting on the warehouse, its identity store in Redis
    out, replay_store = tmp_path / "stream", f"{redis_url}?prefix=gov-replay-{uuid.uuid4().hex}"
    assert main(["replay", "--input", str(sample / "events"), str(refused), "--out", str(out), "--warehouse", str(wh),
                 "--identity-store", replay_store, "--catalog", str(sample / "catalog.csv"),
                 "--rates", str(sample / "rates.csv")]) == 0
    outputs = {os.path.relpath(p, out): [l.lower() for l in open(p)] for p in glob.glob(str(out / "*" / "*.jsonl"))}
    assert any("profiles" in k for k in outputs) and any("dead_letters" in k for k in outputs)
    assert_absent(outputs, needles, "after a stream replay")
    assert not set(identifiers) & redis_nodes(replay_store)
    assert redis_nodes(replay_store)  # everyone else is there


def test_forget_clears_every_identity_store_named_redis_too(base, tmp_path, redis_url):
    wh = tmp_path / "stores.duckdb"
    copy_warehouse(base, wh)
    with open_warehouse(str(wh), read_only=True) as warehouse:
        history = warehouse.identity_history()
    shared = f"{redis_url}?prefix=gov-forget-{uuid.uuid4().hex}"
    rebuild_identity_store(shared, IdentityRules(), history)  # what a stream on Redis holds
    user_id, profile_id = query(wh, "SELECT identifier_value, profile_id FROM identity_links "
                                    "WHERE identifier_type = 'user_id' ORDER BY 1 LIMIT 1")[0]
    identifiers = {tuple(r) for r in query(
        wh, "SELECT identifier_type, identifier_value FROM identity_links WHERE profile_id = ?", [profile_id])}
    before = redis_nodes(shared)
    assert identifiers <= before
    assert main(["forget", f"user_id:{user_id}", "--warehouse", str(wh), "--identity-store", shared]) == 0
    after = redis_nodes(shared)
    assert not identifiers & after and after == before - identifiers
    assert not identifiers & store_nodes(tmp_path / "stores.identity.sqlite")
    store = open_identity_store(shared)
    assert store.warehouse_version() == query(wh, "SELECT value FROM warehouse_meta WHERE name = 'version'")[0][0]
    store.flush()
    store.close()


def test_forget_needs_an_exact_identifier(base, tmp_path, capsys):
    wh = tmp_path / "exact.duckdb"
    copy_warehouse(base, wh)
    email = query(wh, "SELECT identifier_value FROM identity_links WHERE identifier_type = 'email' ORDER BY 1 LIMIT 1")[0][0]
    before = query(wh, "SELECT count(*) FROM profiles")[0][0]
    # a part of an address is not an identifier: nothing is forgotten
    assert main(["forget", email.split("@")[0], "--warehouse", str(wh)]) == 2
    assert main(["forget", "email:" + email[1:], "--warehouse", str(wh)]) == 2
    assert query(wh, "SELECT count(*) FROM profiles")[0][0] == before
    assert query(wh, "SELECT count(*) FROM identity_suppressions")[0][0] == 0


def test_suppression_hashes_are_keyed_by_the_deployment_secret(base, tmp_path, monkeypatch, capsys):
    wh = tmp_path / "keyed.duckdb"
    copy_warehouse(base, wh)
    secret = "a long random deployment secret"
    monkeypatch.setenv("CDPFLOW_SUPPRESSION_SECRET", secret)
    email = query(wh, "SELECT identifier_value FROM identity_links WHERE identifier_type = 'email' ORDER BY 1 LIMIT 1")[0][0]
    assert main(["forget", f"email:{email}", "--warehouse", str(wh)]) == 0
    rows = query(wh, "SELECT identifier_hash, key_id FROM identity_suppressions")
    key_id = "k_" + hashlib.sha256(b"cdpflow-suppression-key-id\x00" + secret.encode()).hexdigest()[:16]
    assert {k for _, k in rows} == {key_id} == {SuppressionKey.from_secret(secret).key_id}
    expected = hmac.new(secret.encode(), f"email\x00{email}".encode(), hashlib.sha256).hexdigest()
    assert expected in {h for h, _ in rows}
    assert hashlib.sha256(f"forget\x00email\x00{email}".encode()).hexdigest() not in {h for h, _ in rows}

    # another secret cannot match these hashes: every path refuses to start rather than let them back
    monkeypatch.setenv("CDPFLOW_SUPPRESSION_SECRET", "another secret")
    capsys.readouterr()
    one_event = tmp_path / "one.jsonl"
    one_event.write_text('{"type": "track", "event": "Product Viewed", "userId": "u-new", "messageId": "m-new", '
                         '"timestamp": "2026-10-01T10:00:00Z", "receivedAt": "2026-10-01T10:00:01Z"}\n')
    assert main(["run", "--input", str(one_event), "--warehouse", str(wh)]) == 2
    assert key_id in capsys.readouterr().err


def test_outside_the_demo_a_missing_secret_is_a_start_up_error(sample, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CDPFLOW_DEMO", raising=False)
    monkeypatch.delenv("CDPFLOW_SUPPRESSION_SECRET", raising=False)
    wh = tmp_path / "prod.duckdb"
    assert main(["run", "--input", str(sample / "events"), *run_args(sample, wh)]) == 2
    err = capsys.readouterr().err
    assert "CDPFLOW_SUPPRESSION_SECRET" in err and "Traceback" not in err
    assert query(wh, "SELECT count(*) FROM profiles")[0][0] == 0  # nothing ran


def test_a_split_stays_split_after_a_replay(sample, base, tmp_path, capsys):
    wh = tmp_path / "split.duckdb"
    copy_warehouse(base, wh)
    survivor, absorbed = query(wh, "SELECT survivor_id, absorbed_id FROM profile_merges WHERE undone_at IS NULL "
                                   "ORDER BY merged_at LIMIT 1")[0]
    before = query(wh, "SELECT count(*) FROM profiles")[0][0]
    capsys.readouterr()
    assert main(["identity", "split", survivor, "--merge", absorbed, *run_args(sample, wh)]) == 0
    said = capsys.readouterr().out
    assert query(wh, "SELECT count(*) FROM identity_separations")[0][0] == 1
    (lt, lv, rt, rv), = query(wh, "SELECT left_type, left_value, right_type, right_value FROM identity_separations")
    # The command says which id each part has now, with how many identifiers it holds.
    for id_type, value in ((lt, lv), (rt, rv)):
        (pid, held), = query(wh, "SELECT l.profile_id, (SELECT count(*) FROM identity_links m WHERE m.profile_id = "
                                 "l.profile_id) FROM identity_links l WHERE identifier_type = ? AND identifier_value = ?",
                             [id_type, value])
        assert any(pid in line and f": {held} identifier(s)" in line for line in said.splitlines()), (pid, held, said)

    def apart():
        left = query(wh, "SELECT profile_id FROM identity_links WHERE identifier_type = ? AND identifier_value = ?", [lt, lv])
        right = query(wh, "SELECT profile_id FROM identity_links WHERE identifier_type = ? AND identifier_value = ?", [rt, rv])
        return left[0][0] != right[0][0]

    assert apart()
    assert query(wh, "SELECT count(*) FROM profiles")[0][0] == before + 1
    assert query(wh, "SELECT count(*) FROM identity_conflicts WHERE rule = 'manual_split'")[0][0] >= 1
    assert main(["run", "--input", str(sample / "events"), *run_args(sample, wh)]) == 0
    assert apart()
    # the same split again records nothing, and says so with a non-zero exit
    assert main(["identity", "split", survivor, "--merge", absorbed, *run_args(sample, wh)]) == 2
    assert query(wh, "SELECT count(*) FROM identity_separations")[0][0] == 1


def test_a_split_leaves_the_id_with_the_part_holding_the_user_id_on_every_path(tmp_path, capsys, redis_url):
    # A shared cookie founded a profile before the person signed in (the cookie's id sorts first,
    # so the merge kept it); split, the id marketers know must stay with the person's part, in the
    # warehouse, after a later batch run, and in what a replay through the streaming graph emits.
    raw, cookie, known, moved, person = family_split_input(tmp_path)
    wh = tmp_path / "family.duckdb"
    assert main(["run", "--input", raw, "--warehouse", str(wh)]) == 0

    def ids():
        return {(t, v): p for t, v, p in query(wh, "SELECT identifier_type, identifier_value, profile_id FROM identity_links")}

    assert set(ids().values()) == {known} and person <= set(ids())
    capsys.readouterr()
    assert main(["identity", "split", known, "--warehouse", str(wh)]) == 0
    said = capsys.readouterr().out
    after = ids()
    assert {after[i] for i in person} == {known} and after[("anonymous_id", cookie)] == moved
    assert f"{known} (the id it had): 4 identifier(s), user id u-ann" in said
    assert f"{moved}: 1 identifier(s), user id -" in said
    assert query(wh, "SELECT identifier_type, identifier_value, profile_id FROM identity_names ORDER BY 1") == [
        ("anonymous_id", cookie, moved), ("user_id", "u-ann", known)]
    (orders,), = query(wh, "SELECT orders_total FROM profiles WHERE profile_id = ?", [known])
    assert orders == 1

    # a later batch run: the person's new event joins the id they kept
    later = tmp_path / "later.jsonl"
    later.write_bytes(orjson.dumps({"type": "track", "event": "Product Viewed", "userId": "u-ann", "messageId": "fam-5",
                                    "timestamp": "2026-10-06T10:00:00Z", "receivedAt": "2026-10-06T10:00:01Z"}) + b"\n")
    assert main(["run", "--input", str(later), "--warehouse", str(wh)]) == 0
    assert ids() == {**after} and query(wh, "SELECT profile_id FROM events WHERE message_id = 'fam-5'") == [(known,)]

    # the streaming graph, starting on the warehouse, its identity store in Redis
    out, store = tmp_path / "stream", f"{redis_url}?prefix=gov-split-{uuid.uuid4().hex}"
    assert main(["replay", "--input", raw, str(later), "--out", str(out), "--warehouse", str(wh),
                 "--identity-store", store]) == 0
    rows = [orjson.loads(l) for p in glob.glob(str(out / "profiles" / "*.jsonl")) for l in open(p)]
    assert {r["profile_id"] for r in rows if r.get("orders_total")} == {known}
    assert {r["profile_id"] for r in rows} == {known, moved}
    replayed = open_identity_store(store)
    try:
        assert {replayed.profile_of(i) for i in person} == {known}
        assert replayed.profile_of(("anonymous_id", cookie)) == moved
    finally:
        replayed.flush()
        replayed.close()

    # forgetting the person drops the governance rows that name their identifiers in the clear
    assert main(["forget", "user_id:u-ann", "--warehouse", str(wh)]) == 0
    assert query(wh, "SELECT count(*) FROM identity_separations")[0][0] == 0
    assert query(wh, "SELECT identifier_value FROM identity_names") == [(cookie,)]
