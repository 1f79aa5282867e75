"""What a new user runs into: wrong paths, files of the wrong shape, typos and noise.

Every case is run as a user runs it (the `cdpflow` command, in this process or as a program) and
checked for what the user sees: the exit code, the words on stderr, and no traceback.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from cdpflow.cli import main

pytestmark = pytest.mark.e2e

CDPFLOW = Path(sys.executable).parent / "cdpflow"


def _event(message_id, user="u1", **extra):
    return {"type": "track", "event": "Product Viewed", "userId": user, "messageId": message_id,
            "timestamp": "2026-10-01T10:00:00Z", "receivedAt": "2026-10-01T10:00:01Z", **extra}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(root, a generated sample, a warehouse of it)."""
    root = tmp_path_factory.mktemp("guard")
    sample = root / "sample"
    assert main(["generate", "--customers", "15", "--days", "20", "--seed", "3", "--out", str(sample)]) == 0
    wh = root / "cdp.duckdb"
    assert main(["run", "--input", str(sample / "events"), "--warehouse", str(wh)]) == 0
    return root, sample, wh


def _exit_code(argv):
    try:
        return main(argv)
    except SystemExit as done:  # argparse's refusals
        return done.code


def test_a_warehouse_path_that_is_not_a_cdpflow_warehouse_is_refused_and_left_as_it_was(small, tmp_path, capsys):
    _, sample, _ = small
    events = tmp_path / "x.jsonl"
    events.write_bytes(b"".join(json.dumps(_event(f"m{i}")).encode() + b"\n" for i in range(3)))
    before = events.read_bytes()
    capsys.readouterr()
    # The input named as the warehouse too: DuckDB would open it as a view and save nothing.
    assert main(["run", "--input", str(events), "--warehouse", str(events)]) == 2
    said = " ".join(capsys.readouterr().err.split())
    assert "is not a cdpflow warehouse" in said and "Traceback" not in said
    assert events.read_bytes() == before
    assert main(["export", "profiles", "--warehouse", str(events), "--out", str(tmp_path / "p.jsonl")]) == 2
    assert not (tmp_path / "p.jsonl").exists()
    # A folder, and a DuckDB database some other tool made (its tables stay as they were).
    assert main(["run", "--input", str(events), "--warehouse", str(tmp_path)]) == 2
    other = tmp_path / "other.duckdb"
    con = duckdb.connect(str(other))
    con.execute("CREATE TABLE orders (id INTEGER)")
    con.close()
    assert main(["run", "--input", str(events), "--warehouse", str(other)]) == 2
    con = duckdb.connect(str(other), read_only=True)
    assert [r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()] == ["orders"]
    con.close()
    # An empty DuckDB database is a new warehouse.
    empty = tmp_path / "empty.duckdb"
    duckdb.connect(str(empty)).close()
    assert main(["run", "--input", str(events), "--warehouse", str(empty)]) == 0
    con = duckdb.connect(str(empty), read_only=True)
    assert con.execute("SELECT count(*) FROM events").fetchone()[0] == 3
    con.close()


def _bad_cases(root, sample, wh):
    bad = root / "bad"
    bad.mkdir(exist_ok=True)
    (bad / "array.json").write_text(json.dumps([_event("a1")]) + "\n")
    (bad / "empty.jsonl").write_text("\n\n")
    (bad / "utf16.jsonl").write_bytes(json.dumps(_event("u1")).encode("utf-16"))
    (bad / "wrong-shape.csv").write_text("customer,email\n1,a@example.com\n")
    (bad / "binary.csv").write_bytes(b"\xff\xfe\x00\x81" * 100)
    missing = str(bad / "missing.duckdb")
    events = str(sample / "events")
    return missing, [
        ("generate", ["generate", "--customers", "0", "--out", str(bad / "g")], "--customers"),
        ("generate", ["generate", "--out", str(bad / "array.json")], "is a file"),
        ("generate", ["generate", "--end", "someday", "--out", str(bad / "g")], "--end"),
        ("run", ["run", "--input", str(bad / "nothing-here"), "--warehouse", str(bad / "r.duckdb")], "no event files"),
        ("run", ["run", "--input", str(bad / "empty.jsonl"), "--warehouse", str(bad / "r.duckdb")], "no event lines"),
        ("run", ["run", "--input", str(bad / "utf16.jsonl"), "--warehouse", str(bad / "r.duckdb")], "UTF-16"),
        ("run", ["run", "--input", events, "--warehouse", str(bad / "r.duckdb"), "--as-of", "soon"], "--as-of"),
        ("run", ["run", "--input", events, "--warehouse", str(bad / "r.duckdb"), "--runner", "warp"], "--runner"),
        ("run", ["run", "--input", events, "--warehouse", str(bad / "r.duckdb"), "--config", str(bad / "no.yaml")],
         "no.yaml"),
        ("replay", ["replay", "--input", str(bad / "empty.jsonl"), "--out", str(bad / "rp")], "no event lines"),
        ("replay", ["replay", "--input", str(bad / "utf16.jsonl"), "--out", str(bad / "rp")], "UTF-16"),
        ("replay", ["replay", "--input", events, "--out", str(bad / "array.json")], "is a file"),
        ("export", ["export", "profiles", "--warehouse", str(wh), "--out", str(bad / "no" / "such" / "p.csv")],
         "does not exist"),
        ("export", ["export", "profiles", "--warehouse", str(wh), "--out", str(bad)], "is a folder"),
        ("export", ["export", "profiles", "--warehouse", missing], "no warehouse at"),
        ("export", ["export", "profile", "--warehouse", str(wh)], "invalid choice"),
        ("profile", ["profile", "x", "--warehouse", missing], "no warehouse at"),
        ("profile", ["profile", "x", "--warehouse", str(bad / "array.json")], "not a cdpflow warehouse"),
        ("identity report", ["identity", "report", "--truth", str(bad / "wrong-shape.csv"), "--warehouse", str(wh)],
         "person_id,identifier_type,identifier_value"),
        ("identity report", ["identity", "report", "--truth", str(bad / "binary.csv"), "--warehouse", str(wh)],
         "not UTF-8"),
        ("identity report", ["identity", "report", "--truth", str(bad / "none.csv"), "--warehouse", str(wh)],
         "none.csv"),
        ("identity split", ["identity", "split", "nobody", "--warehouse", missing], "no warehouse at"),
        # checked before the split is recorded (the warehouse is left as it was: see the test)
        ("identity split", ["identity", "split", "anyone", "--warehouse", str(wh), "--catalog", str(bad / "none.csv")],
         "none.csv"),
        ("forget", ["forget", "nobody@example.com", "--warehouse", missing], "no warehouse at"),
        ("publish", ["publish", "--warehouse", missing], "no warehouse at"),
        ("train", ["train", "--warehouse", missing], "no warehouse at"),
        ("report", ["report", "segments", "--warehouse", str(wh), "--out", str(bad / "no" / "r.html")],
         "does not exist"),
        ("import", ["import", "crm", str(bad / "wrong-shape.csv"), "--mapping", str(bad / "no.yaml"), "--to",
                    str(bad / "o.jsonl")], "no.yaml"),
        ("send", ["send", "--input", events, "--collector", "http://127.0.0.1:9", "--write-key", "k"],
         "no collector answers"),
        ("bq init", ["bq", "init", "--warehouse", str(wh)], "bigquery://"),
        ("flink list", ["flink", "list", "--jobmanager", "127.0.0.1:9"], "no Flink JobManager"),
    ]


def test_every_command_says_what_is_wrong_with_common_bad_input_without_a_traceback(small, capsys):
    root, sample, wh = small
    missing, cases = _bad_cases(root, sample, wh)
    failures = []
    for command, argv, words in cases:
        capsys.readouterr()
        try:
            code = _exit_code(argv)
        except Exception as err:  # noqa: BLE001 (what the user would have seen as a traceback)
            failures.append(f"{command}: {argv[1:4]} raised {type(err).__name__}: {err}")
            continue
        said = " ".join(capsys.readouterr().err.split())
        if code != 2 or words.replace(" ", "") not in said.replace(" ", "") or "Traceback" in said:
            failures.append(f"{command}: {argv[1:4]} exited {code}, said {said[-300:]!r} (wanted {words!r})")
    assert not failures, "\n".join(failures)
    # Commands that change a warehouse never create one at a mistyped path, and a split whose
    # re-derivation could not run recorded nothing.
    assert not os.path.exists(missing)
    con = duckdb.connect(str(wh), read_only=True)
    assert con.execute("SELECT count(*) FROM identity_separations").fetchone()[0] == 0
    con.close()
    assert json.loads((root / "bad" / "array.json").read_text())  # a file named as --out is left alone


def test_input_guard_rails_are_dead_letters_that_say_what_is_wrong(small, tmp_path):
    _, _, _ = small
    good = [_event(f"g{i}", user=f"u{i}") for i in range(3)]
    array = tmp_path / "array.json"
    array.write_text(json.dumps(good) + "\n")
    big = tmp_path / "big.jsonl"
    too_big = json.dumps(_event("big", properties={"blob": "x" * 40_000}))
    big.write_text(too_big + "\n" + json.dumps(_event("fits", properties={"blob": "x" * 30_000})) + "\n")
    wh = tmp_path / "w.duckdb"
    assert main(["run", "--input", str(array), str(big), "--warehouse", str(wh)]) == 0
    con = duckdb.connect(str(wh), read_only=True)
    letters = con.execute("SELECT stage, error, length(raw) FROM dead_letters ORDER BY error").fetchall()
    accepted = [r[0] for r in con.execute("SELECT message_id FROM events").fetchall()]
    con.close()
    assert accepted == ["fits"]
    assert [(stage, error.split(":")[0].split(" of ")[0]) for stage, error, _ in letters] == [
        ("parse", "expected JSON lines (one event object per line), found a JSON array"),
        ("parse", f"the line is {len(too_big):,} bytes"),
    ]
    assert "at most 32,768 bytes" in letters[1][1] and letters[1][2] == 4096


def test_the_summary_names_refused_lines_and_stored_rows_and_they_match_the_table(tmp_path, capsys):
    broken = b'{"type": "track", "event": \n'
    lines = [json.dumps(_event(f"m{i}", user=f"u{i}")).encode() + b"\n" for i in range(4)] + [broken] * 3 + [b"[1]\n"]
    events = tmp_path / "e.jsonl"
    events.write_bytes(b"".join(lines))
    wh = tmp_path / "w.duckdb"

    def summary():
        out = capsys.readouterr().out
        rows = {}
        for line in out.splitlines():
            cells = [c.strip() for c in line.strip("│ ").split("│")]
            if len(cells) == 2 and cells[1].replace(",", "").isdigit():
                rows[cells[0]] = int(cells[1].replace(",", ""))
        return rows

    capsys.readouterr()
    assert main(["run", "--input", str(events), "--warehouse", str(wh)]) == 0
    first = summary()
    stored = duckdb.connect(str(wh), read_only=True).execute("SELECT count(*) FROM dead_letters").fetchone()[0]
    assert stored == 2  # the three identical broken lines are one row
    assert first["dead letters (lines refused)"] == 4
    assert first["new rows in dead_letters"] == stored
    assert first["rows in dead_letters (every run)"] == stored
    # The same file again: the lines are refused again, and no row is added.
    assert main(["run", "--input", str(events), "--warehouse", str(wh)]) == 0
    again = summary()
    assert again["dead letters (lines refused)"] == 4
    assert again["new rows in dead_letters"] == 0
    assert again["rows in dead_letters (every run)"] == stored


def test_a_first_run_prints_only_what_cdpflow_says(small, tmp_path):
    """As `make run` runs them: generate, run, replay, export, profile; stderr holds no library warning."""
    _, sample, _ = small
    env = {k: v for k, v in os.environ.items() if k not in ("CDPFLOW_LOG", "PYTHONWARNINGS")}
    env["CDPFLOW_DEMO"] = "1"
    wh = tmp_path / "cdp.duckdb"
    runs = [
        ["generate", "--customers", "10", "--days", "10", "--out", str(tmp_path / "s")],
        ["run", "--input", str(sample / "events"), "--catalog", str(sample / "catalog.csv"),
         "--rates", str(sample / "rates.csv"), "--warehouse", str(wh)],
        ["replay", "--input", str(sample / "events"), "--out", str(tmp_path / "stream"), "--warehouse", str(wh)],
        ["export", "segment_memberships", "--warehouse", str(wh), "--out", str(tmp_path / "m.csv"), "--format", "csv"],
    ]
    for argv in runs:
        done = subprocess.run([str(CDPFLOW), *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        noise = [line for line in done.stderr.splitlines()
                 if "warning" in line.lower() or line.startswith(("WARNING:", "INFO:", "ERROR:"))]
        assert noise == [], f"cdpflow {argv[0]} printed: {noise[:5]}"
    shutil.rmtree(tmp_path / "stream")
