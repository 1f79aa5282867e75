"""End to end: the batch pipeline on generated data, checked against independent references."""
from __future__ import annotations

import glob
import json
import os
import shutil

import orjson
import phonenumbers
import pytest

from cdpflow.config import load_config
from cdpflow.pipelines.batch import run_batch
from cdpflow.warehouse import DuckDBWarehouse
from cdpflow.core.identity import IdentityRules
from tests.oracles import SequentialIdentityReference, components_of

pytestmark = pytest.mark.e2e


def config_for(sample, **overrides):
    return load_config(enrichment={"catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")},
                       **overrides)


PROTECTION_OFF = {"max_per_profile": {t: None for t in ("user_id", "email", "phone", "loyalty_id", "device_id", "anonymous_id")},
                  "blocked": {"*": [], "email": [], "phone": []}, "quarantine": {"max_profiles": 10 ** 9}}


def oracle_identifiers(event):
    """Identifiers of an event, extracted here without cdpflow's normalisation code."""
    found = set()
    for key, id_type in (("userId", "user_id"), ("anonymousId", "anonymous_id")):
        if event.get(key) not in (None, ""):
            found.add((id_type, str(event[key]).strip()))
    if event.get("type") == "alias" and event.get("previousId"):
        found.add(("anonymous_id", str(event["previousId"]).strip()))
    context = event.get("context") or {}
    for traits in (event.get("traits") if event.get("type") != "group" else None, context.get("traits")):
        traits = traits or {}
        email = traits.get("email")
        if isinstance(email, str) and "@" in email:
            found.add(("email", email.strip().lower()))
        if traits.get("phone"):
            try:
                number = phonenumbers.parse(str(traits["phone"]), "US")
                if phonenumbers.is_valid_number(number):
                    found.add(("phone", phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)))
            except phonenumbers.NumberParseException:
                pass
    if (context.get("device") or {}).get("id"):
        found.add(("device_id", str(context["device"]["id"])))
    for ext in context.get("externalIds") or []:
        found.add((ext["type"].lower(), str(ext["id"])))
    return found


def partition_from_links(wh):
    groups = {}
    for row in wh.query("SELECT identifier_type, identifier_value, profile_id FROM identity_links"):
        groups.setdefault(row["profile_id"], set()).add((row["identifier_type"], row["identifier_value"]))
    return {frozenset(g) for g in groups.values()}


def profiles_by_identifiers(wh):
    """Profile rows keyed by their identifier sets (never by id), without processing-time columns."""
    ids = {}
    for row in wh.query("SELECT identifier_type, identifier_value, profile_id FROM identity_links"):
        ids.setdefault(row["profile_id"], set()).add((row["identifier_type"], row["identifier_value"]))
    out = {}
    for row in wh.query("SELECT * FROM profiles"):
        key = frozenset(ids[row.pop("profile_id")])
        row.pop("updated_at")
        out[key] = row
    return out


@pytest.fixture(scope="module")
def first_run(sample, tmp_path_factory):
    warehouse = str(tmp_path_factory.mktemp("wh") / "cdp.duckdb")
    summary = run_batch([str(sample / "events")], warehouse, config_for(sample))
    return warehouse, summary


def test_conservation_from_the_counters(sample, first_run):
    warehouse, summary = first_run
    c = summary.counter
    lines = sum(1 for path in glob.glob(str(sample / "events" / "*.jsonl")) for line in open(path) if line.strip())
    assert summary.read == lines
    assert summary.read == summary.accepted + summary.dead_lettered + summary.deduplicated + summary.suppressed
    assert c("_ParseAndValidateFn", "received") == c("_ParseAndValidateFn", "succeeded") + c("_ParseAndValidateFn", "dead_lettered")
    assert c("_NormalizeFn", "received") == c("_NormalizeFn", "succeeded") + c("_NormalizeFn", "dead_lettered")
    assert c("_CheckLatenessFn", "received") == c("_NormalizeFn", "succeeded")
    assert c("_CheckLatenessFn", "received") == c("_CheckLatenessFn", "succeeded") + c("_CheckLatenessFn", "dead_lettered")
    assert c("_PickFirstFn", "received") == c("_CheckLatenessFn", "succeeded")
    assert c("_EnrichFn", "received") == c("_EnrichFn", "succeeded") == c("_PickFirstFn", "succeeded")
    assert c("_ResolveFn", "succeeded") == c("_ResolveFn", "received") == c("_EnrichFn", "succeeded")
    assert c("_AttachProfileFn", "received") == c("_EnrichFn", "succeeded")
    assert c("_AttachProfileFn", "received") == (c("_AttachProfileFn", "succeeded") + c("_AttachProfileFn", "dead_lettered")
                                                 + c("_AttachProfileFn", "suppressed"))
    manifest = json.loads((sample / "manifest.json").read_text())
    files = [f for name, f in manifest["files"].items() if name.startswith("events/")]
    # every broken line and every event received more than 3 days late (the generator's very
    # late ones, 4-20 days) is a dead letter; the identity stage may add events whose only
    # identifiers are blocked values
    # Each event's copies are either refused as late (an event received 4-20 days late takes
    # its re-sent copies with it) or kept once with the rest counted as duplicates.
    late = c("_CheckLatenessFn", "dead_lettered")
    assert late >= manifest["noise"]["very_late"] > 0
    assert late + summary.deduplicated == manifest["noise"]["very_late"] + sum(f["duplicate"] for f in files)
    assert summary.dead_lettered == (sum(f["malformed_json"] + f["schema_violation"] for f in files)
                                     + late + c("_AttachProfileFn", "dead_lettered"))
    with DuckDBWarehouse(warehouse, read_only=True) as wh:
        assert wh.count("events") == summary.accepted
        letters = wh.query("SELECT raw, stage, error FROM dead_letters")
        # identical broken lines collapse into one dead letter row; none is lost otherwise
        assert len(letters) == len({(r["raw"], r["stage"]) for r in letters}) <= summary.dead_lettered
        assert len(letters) >= summary.dead_lettered - 2
        assert all(r["raw"] and r["error"] for r in letters)
        assert {r["stage"] for r in letters} <= {"parse", "validate", "normalize", "dedup", "lateness"}
        assert any(r["stage"] == "lateness" and "allowed lateness is 72.0 h" in r["error"] for r in letters)


def test_with_protection_off_the_partition_equals_an_independent_union_find(sample, tmp_path):
    warehouse = str(tmp_path / "off.duckdb")
    run_batch([str(sample / "events")], warehouse, config_for(sample, identity=PROTECTION_OFF))
    with DuckDBWarehouse(warehouse, read_only=True) as wh:
        raws = [r["raw"] for r in wh.query("SELECT raw::VARCHAR AS raw FROM events")]
        expected = components_of([sorted(oracle_identifiers(orjson.loads(r))) for r in raws])
        assert partition_from_links(wh) == expected
        # every event points at the profile holding its identifiers
        stray = wh.query("""SELECT count(*) AS n FROM events e WHERE NOT EXISTS (
                              SELECT 1 FROM identity_links l WHERE l.profile_id = e.profile_id)""")
        assert stray[0]["n"] == 0
        merges = wh.query("SELECT count(*) AS n FROM profile_merges")[0]["n"]
        assert merges > 0


def test_with_protection_on_the_partition_equals_the_sequential_reference(first_run):
    warehouse, _ = first_run
    rules = IdentityRules.from_config(load_config()["identity"])
    reference = SequentialIdentityReference(rules.priority, dict(rules.max_per_profile),
                                            rules.quarantine_max_profiles, rules.window_us)
    with DuckDBWarehouse(warehouse, read_only=True) as wh:
        rows = wh.query("SELECT epoch_us(timestamp) AS ts, message_id, identifiers::VARCHAR AS ids FROM events "
                        "ORDER BY ts, message_id")
        for row in rows:
            ids = [tuple(i) for i in orjson.loads(row["ids"]) if not rules.is_blocked(tuple(i))]
            reference.resolve(row["ts"], ids)
        assert partition_from_links(wh) == reference.partition()
        quarantined = {(r["identifier_type"], r["identifier_value"])
                       for r in wh.query("SELECT * FROM identity_links WHERE quarantined")}
        assert quarantined == reference.quarantined
        conflicts = wh.query("SELECT rule, count(*) AS n FROM identity_conflicts GROUP BY rule")
        assert any(r["rule"] == "max_per_profile:user_id" for r in conflicts)  # the family emails


def test_features_segments_and_changes_are_written(first_run):
    warehouse, summary = first_run
    with DuckDBWarehouse(warehouse, read_only=True) as wh:
        profiles = wh.count("profiles")
        assert profiles == len({r["profile_id"] for r in wh.query("SELECT profile_id FROM identity_links")})
        stages = {r["lifecycle_stage"] for r in wh.query("SELECT DISTINCT lifecycle_stage FROM profiles")}
        assert {"prospect", "active"} <= stages
        lifecycle = wh.query("SELECT count(*) AS n FROM segment_memberships WHERE source = 'lifecycle' "
                             "AND exited_at IS NULL")[0]["n"]
        assert lifecycle == profiles  # one lifecycle segment per profile at a time
        # A new warehouse gets each profile's whole history: a lifecycle span per stage it went
        # through, entered and exited at its stage changes.
        spans = wh.query("SELECT profile_id, segment, epoch_us(entered_at) AS entered, epoch_us(exited_at) AS exited "
                         "FROM segment_memberships WHERE source = 'lifecycle'")
        transitions = wh.query("SELECT profile_id, to_stage, epoch_us(transitioned_at) AS at FROM lifecycle_transitions")
        assert sorted((r["profile_id"], r["segment"], r["entered"]) for r in spans) == sorted(
            (t["profile_id"], "lifecycle:" + t["to_stage"], t["at"]) for t in transitions)
        orders = wh.query("SELECT sum(orders_total) AS n FROM profiles")[0]["n"]
        assert orders == wh.query("SELECT count(*) AS n FROM events WHERE event = 'Order Completed'")[0]["n"]
        spans_all = wh.count("segment_memberships")
        closed = wh.query("SELECT count(*) AS n FROM segment_memberships WHERE exited_at IS NOT NULL")[0]["n"]
    changes = [orjson.loads(l) for l in open(summary.changes_file)]
    assert sum(c["direction"] == "enter" for c in changes) == spans_all
    assert sum(c["direction"] == "exit" for c in changes) == closed
    assert len({c["idempotency_key"] for c in changes}) == len(changes)


def test_replay_gives_the_same_profiles_and_no_new_changes(sample, first_run, tmp_path):
    warehouse, summary = first_run
    copy = str(tmp_path / "again.duckdb")
    with DuckDBWarehouse(warehouse, read_only=True) as wh:
        before_links, before_profiles = partition_from_links(wh), profiles_by_identifiers(wh)
        before_letters = wh.count("dead_letters")
    shutil.copy(warehouse, copy)
    again = run_batch([str(sample / "events")], copy, config_for(sample))
    assert again.replayed == summary.accepted
    assert again.accepted == summary.accepted
    # every input line that was accepted or a duplicate before is now a repeat of a warehouse event
    assert again.deduplicated == summary.read - summary.dead_lettered
    assert again.dead_lettered == summary.dead_lettered
    with DuckDBWarehouse(copy, read_only=True) as wh:
        assert partition_from_links(wh) == before_links
        assert profiles_by_identifiers(wh) == before_profiles
        assert wh.count("dead_letters") == before_letters  # the same refusals are not stored twice
    assert not os.path.exists(again.changes_file) or os.path.getsize(again.changes_file) == 0


@pytest.mark.parametrize("runner", ["multiprocess", "prism"])
def test_other_local_runners_give_the_same_result(sample, first_run, tmp_path, runner):
    # prism needs the binary `make prism` builds (make test does); without it the run says so
    warehouse, summary = first_run
    other = str(tmp_path / f"{runner}.duckdb")
    mp = run_batch([str(sample / "events")], other, config_for(sample), runner=runner)
    assert mp.read == summary.read and mp.accepted == summary.accepted
    with DuckDBWarehouse(warehouse, read_only=True) as a, DuckDBWarehouse(other, read_only=True) as b:
        assert partition_from_links(a) == partition_from_links(b)
        assert profiles_by_identifiers(a) == profiles_by_identifiers(b)


def test_amounts_past_what_a_numeric_holds_and_json_nested_too_deep_are_dead_letters_not_a_stopped_run(tmp_path):
    # Both stopped a whole batch run before: 1e30 overflowed the features' Decimal arithmetic, and
    # a record nested 600 levels deep overflowed Python's recursion while Beam pickled it.
    import duckdb
    import orjson

    from cdpflow.cli import main
    from cdpflow.core.ingest import MAX_DEPTH
    base = {"type": "track", "timestamp": "2026-10-01T00:00:00Z", "receivedAt": "2026-10-01T00:00:01Z"}
    lines = [dict(base, messageId="big", userId="u1", event="Order Completed",
                  properties={"order_id": "o1", "revenue": 1e30, "currency": "USD"}),
             dict(base, messageId="deep", userId="u2", event="Deep", properties="DEEP"),
             dict(base, messageId="fine", userId="u3", event="Order Completed",
                  properties={"order_id": "o2", "revenue": 25.5, "currency": "USD"})]
    # (written by hand: orjson itself refuses to write past 255 levels)
    text = b"".join(orjson.dumps(line) + b"\n" for line in lines)
    (tmp_path / "in.jsonl").write_bytes(text.replace(b'"DEEP"', b'{"a":' * 600 + b"{}" + b"}" * 600))
    assert main(["run", "--input", str(tmp_path / "in.jsonl"), "--warehouse", str(tmp_path / "w.duckdb")]) == 0
    con = duckdb.connect(str(tmp_path / "w.duckdb"), read_only=True)
    letters = dict(con.execute("SELECT stage, error FROM dead_letters").fetchall())
    accepted = con.execute("SELECT message_id FROM events").fetchall()
    con.close()
    assert accepted == [("fine",)]
    assert "beyond" in letters["normalize"] and f"more than {MAX_DEPTH} levels" in letters["parse"]
