"""The `cdpflow` command end to end: generate -> run -> export -> profile."""
import csv
import json

import duckdb
import orjson
import pytest

from cdpflow.cli import main

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def warehouse(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    sample = root / "sample"
    assert main(["generate", "--customers", "60", "--days", "60", "--seed", "5", "--out", str(sample)]) == 0
    wh = root / "cdp.duckdb"
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(wh),
                 "--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv"),
                 "--as-of", "2026-11-01T00:00:00Z"]) == 0
    return root, sample, wh


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_export_every_format(warehouse, fmt):
    root, _, wh = warehouse
    out = root / f"profiles.{fmt}"
    assert main(["export", "profiles", "--warehouse", str(wh), "--format", fmt, "--out", str(out)]) == 0
    expected = duckdb.connect(str(wh), read_only=True).execute("SELECT count(*) FROM profiles").fetchone()[0]
    if fmt == "jsonl":
        rows = [orjson.loads(line) for line in out.read_text().splitlines()]
    elif fmt == "csv":
        rows = list(csv.DictReader(out.open()))
    else:
        rows = duckdb.sql(f"SELECT * FROM read_parquet('{out}')").fetchall()
    assert len(rows) == expected > 0


def test_profile_lookup_by_any_identifier_and_absorbed_id(warehouse, capsys):
    root, sample, wh = warehouse
    con = duckdb.connect(str(wh), read_only=True)
    email, profile_id = con.execute(
        "SELECT identifier_value, profile_id FROM identity_links WHERE identifier_type = 'email' ORDER BY 1 LIMIT 1").fetchone()
    absorbed, survivor = con.execute("SELECT absorbed_id, survivor_id FROM profile_merges LIMIT 1").fetchone()
    con.close()
    capsys.readouterr()
    assert main(["profile", f"  {email.upper()} ", "--warehouse", str(wh), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["profile"]["profile_id"] == profile_id
    assert ["email", email] in [[i["identifier_type"], i["identifier_value"]] for i in shown["identifiers"]]
    assert any(s["segment"].startswith("lifecycle:") for s in shown["segments"])
    assert main(["profile", absorbed, "--warehouse", str(wh), "--json"]) == 0
    resolved = json.loads(capsys.readouterr().out)["profile"]["profile_id"]
    assert resolved not in (absorbed,)
    assert main(["profile", "nobody@nowhere.example", "--warehouse", str(wh)]) == 2


def test_clear_errors_for_bad_arguments(warehouse, tmp_path):
    root, _, wh = warehouse
    assert main(["run", "--input", str(tmp_path / "missing"), "--warehouse", str(tmp_path / "x.duckdb")]) == 2
    with pytest.raises(SystemExit) as refused:  # argparse: the table is one of the listed choices
        main(["export", "nope", "--warehouse", str(wh)])
    assert refused.value.code == 2
    assert main(["profile", "x", "--warehouse", str(tmp_path / "absent.duckdb")]) == 2
    bad_rules = tmp_path / "bad.yaml"
    bad_rules.write_text("segments: {segments: [{name: x, when: {age: {older: 1}}}]}\n")
    assert main(["run", "--input", str(root / "sample" / "events"), "--warehouse", str(tmp_path / "y.duckdb"),
                 "--config", str(bad_rules)]) == 2


@pytest.mark.parametrize("config, fragment", [
    ("default_region: [\n", "not valid YAML"),
    ("dedup: {horizon_hours: abc}\n", "dedup.horizon_hours"),
    ("lifecycle: {active_days: 200, at_risk_days: 100}\n", "active_days"),
    ("identity: {max_per_profile: {email: 0}}\n", "identity.max_per_profile.email"),
    ("identity: {mode: sometimes}\n", "identity.mode"),
    ("reporting_currency: dollars\n", "reporting_currency"),
    # A typo is refused with its path and the nearest valid key, not ignored for the default.
    ("dedup: {horizon_hourz: 24}\n", "unknown configuration key dedup.horizon_hourz; did you mean dedup.horizon_hours?"),
    ("lifecycel: {active_days: 60}\n", "unknown configuration key lifecycel; did you mean lifecycle?"),
    ("features: {engagement: {click_weigth: 2}}\n", "features.engagement.click_weigth; did you mean "
                                                     "features.engagement.click_weight?"),
])
def test_bad_configuration_is_refused_before_the_run_with_the_key_named(warehouse, tmp_path, capsys, config, fragment):
    root, _, _ = warehouse
    path = tmp_path / "c.yaml"
    path.write_text(config)
    capsys.readouterr()
    assert main(["run", "--input", str(root / "sample" / "events"), "--warehouse", str(tmp_path / "w.duckdb"),
                 "--config", str(path)]) == 2
    said = "".join(capsys.readouterr().err.split())  # the console wraps long lines
    assert fragment.replace(" ", "") in said


def test_missing_or_broken_reference_files_are_clear_errors(warehouse, tmp_path, capsys):
    root, _, _ = warehouse
    events = str(root / "sample" / "events")
    assert main(["run", "--input", events, "--warehouse", str(tmp_path / "w.duckdb"),
                 "--catalog", str(tmp_path / "missing.csv")]) == 2
    rates = tmp_path / "rates.csv"
    rates.write_text("date,currency,rate\n2026-01-01,EUR,abc\n")
    capsys.readouterr()
    assert main(["run", "--input", events, "--warehouse", str(tmp_path / "w.duckdb"), "--rates", str(rates)]) == 2
    assert "rates.csv:2" in "".join(capsys.readouterr().err.split())
