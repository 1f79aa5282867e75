"""End to end through the command line: `cdpflow replay` on a warehouse's later traffic.

The generated sample's first half goes into a warehouse with `cdpflow run`; `cdpflow replay`
then plays the second half as a stream starting from that warehouse. Its JSON-lines output must
hold, for every profile, a last row equal to the pandas oracle over all the traffic (the batch
job's accepted events, partitioned by the replay's identity store).
"""
from __future__ import annotations

import glob
import os
from decimal import Decimal

import orjson
import pytest

from cdpflow.cli import main
from cdpflow.config import load_config
from cdpflow.pipelines.batch import run_batch
from cdpflow.pipelines.replay import arrival_order, end_of
from tests.feature_oracle import events_from_warehouse
from tests.stream.test_stream_oracle import assert_equals_oracle, assert_transitions_equal_the_oracle

pytestmark = pytest.mark.e2e


def read_rows(folder):
    return [orjson.loads(line) for path in sorted(glob.glob(os.path.join(folder, "*.jsonl")))
            for line in open(path, "rb") if line.strip()]


def test_replay_from_a_warehouse_writes_rows_equal_to_the_oracle(sample, tmp_path, capsys):
    references = ["--catalog", str(sample / "catalog.csv"), "--rates", str(sample / "rates.csv")]
    config = load_config(enrichment={"catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")})
    lines = arrival_order([str(sample / "events")])
    half = len(lines) // 2
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    first.write_bytes(b"".join(line + b"\n" for _, line in lines[:half]))
    second.write_bytes(b"".join(line + b"\n" for _, line in lines[half:]))
    warehouse = str(tmp_path / "wh.duckdb")
    assert main(["run", "--input", str(first), "--warehouse", warehouse, *references]) == 0
    out = tmp_path / "stream"
    store = tmp_path / "replay-identity.sqlite"
    assert main(["replay", "--input", str(second), "--warehouse", warehouse, "--out", str(out),
                 "--identity-store", f"sqlite://{store}", *references]) == 0
    # nothing but the outputs under --out: no copy of the warehouse's raw events or identity graph
    assert sorted(os.listdir(out)) == ["dead_letters", "lifecycle_transitions", "profiles"]
    printed = capsys.readouterr().out
    assert "profile rows emitted" in printed and "events preloaded from the warehouse" in printed

    everything = str(tmp_path / "all.duckdb")
    run_batch([str(sample / "events")], everything, config)
    rows = read_rows(out / "profiles")
    assert rows and max(r["as_of"] for r in rows) <= end_of(lines)  # no row past the recording
    for row in rows:  # JSON lines carry amounts as strings
        for key, value in row.items():
            if key.startswith(("revenue", "avg_order_value")) and value is not None:
                row[key] = Decimal(value)
    _, events, final = assert_equals_oracle(rows, str(store), events_from_warehouse(everything),
                                            config, end_of(lines))
    transitions = read_rows(out / "lifecycle_transitions")
    assert transitions and {t["source"] for t in transitions} == {"stream"}
    assert_transitions_equal_the_oracle(transitions, events, final, config)
    letters = read_rows(out / "dead_letters")
    assert letters and all(l["raw"] and l["error"] for l in letters)


def test_replay_refuses_what_it_cannot_read(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    assert main(["replay", "--input", str(empty), "--out", str(tmp_path / "o")]) == 2
    assert "no event lines" in capsys.readouterr().err
    one = tmp_path / "one.jsonl"
    one.write_text('{"type": "page", "messageId": "m", "anonymousId": "a", "timestamp": "2026-01-01T00:00:00Z", '
                   '"receivedAt": "2026-01-01T00:00:01Z"}\n')
    assert main(["replay", "--input", str(one), "--out", str(tmp_path / "o"), "--warehouse", str(tmp_path / "none.duckdb")]) == 2
    assert "no warehouse at" in capsys.readouterr().err


def test_a_retried_bundle_leaves_no_rows_of_its_failed_attempt(tmp_path):
    from cdpflow.pipelines.replay import _AppendJsonLines
    failed = _AppendJsonLines(str(tmp_path), "profiles")
    failed.start_bundle()
    for i in range(3):
        failed.process({"profile_id": f"p{i}"})
    # the worker dies here: finish_bundle never runs; the runner retries the bundle elsewhere
    retry = _AppendJsonLines(str(tmp_path), "profiles")
    retry.start_bundle()
    for i in range(3):
        retry.process({"profile_id": f"p{i}", "_internal": 1})
    retry.finish_bundle()
    assert [r["profile_id"] for r in read_rows(tmp_path / "profiles")] == ["p0", "p1", "p2"]
    assert all("_internal" not in r for r in read_rows(tmp_path / "profiles"))
    assert not [f for f in os.listdir(tmp_path / "profiles") if not f.endswith(".jsonl")]
