import gzip
import os

import apache_beam as beam
import orjson
import pytest
from apache_beam.testing.util import assert_that, equal_to

from cdpflow.transforms.capture import ReadEvents, expand_inputs
from cdpflow.transforms.sinks import WriteStaged
from cdpflow.warehouse import DuckDBWarehouse
from cdpflow.warehouse.embedded import read_staged
from tests.conftest import local_pipeline


def test_read_events_from_files_folders_and_globs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.jsonl").write_text('{"n": 1}\n\n{"n": 2}\n')
    with gzip.open(tmp_path / "a" / "two.jsonl.gz", "wt") as handle:
        handle.write('{"n": 3}\n')
    (tmp_path / "a" / "notes.txt").write_text("not events\n")
    (tmp_path / "b.ndjson").write_text('{"n": 4}\n')
    assert [os.path.basename(f) for f in expand_inputs([str(tmp_path / "a"), str(tmp_path / "*.ndjson")])] == [
        "one.jsonl", "two.jsonl.gz", "b.ndjson"]
    with pytest.raises(FileNotFoundError, match="no event files"):
        expand_inputs([str(tmp_path / "missing")])
    p = local_pipeline()
    lines = p | ReadEvents([str(tmp_path / "a"), str(tmp_path / "b.ndjson")])
    assert_that(lines, equal_to([b'{"n": 1}', b'{"n": 2}', b'{"n": 3}', b'{"n": 4}']))
    result = p.run()
    result.wait_until_finish()
    blank = [m.committed for m in result.metrics().query()["counters"] if m.key.metric.name == "blank_lines"]
    assert blank == [1]


def test_staged_rows_commit_in_one_transaction_and_append_without_repeats(tmp_path):
    staging = str(tmp_path / "staging")
    row = {"profile_id": "p1", "segment": "s", "source": "rule", "entered_at": 1_700_000_000_000_000,
           "exited_at": None, "model_version": "r1", "_internal": "dropped"}
    letter = {"dead_letter_id": "x1", "raw": "{bad", "stage": "parse", "error": "e", "schema_version": None,
              "received_at": 1_700_000_000_000_000}
    p = local_pipeline()
    _ = p | "Rows" >> beam.Create([row]) | "StageRows" >> WriteStaged(staging, "segment_memberships")
    _ = p | "Letters" >> beam.Create([letter, letter]) | "StageLetters" >> WriteStaged(staging, "dead_letters")
    p.run().wait_until_finish()
    assert read_staged(staging, "segment_memberships")[0].keys() == row.keys() - {"_internal"}
    path = str(tmp_path / "w.duckdb")
    with DuckDBWarehouse(path) as wh:
        assert wh.commit(staging, ["segment_memberships"], {"dead_letters": "dead_letter_id"}) == {
            "segment_memberships": 1, "dead_letters": 1}
        assert wh.commit(staging, ["segment_memberships"], {"dead_letters": "dead_letter_id"}) == {
            "segment_memberships": 1, "dead_letters": 0}
        assert wh.count("segment_memberships") == 1 and wh.count("dead_letters") == 1
        assert wh.memberships()[0]["entered_at"] == row["entered_at"]
        # a failing load leaves the warehouse as it was
        os.makedirs(os.path.join(staging, "profiles"))
        with open(os.path.join(staging, "profiles", "part.jsonl"), "wb") as handle:
            handle.write(orjson.dumps({"profile_id": None, "as_of": 1, "updated_at": 1, "revenue_total": "x"}) + b"\n")
        with pytest.raises(Exception):
            wh.commit(staging, ["segment_memberships", "profiles"], {})
        assert wh.count("segment_memberships") == 1 and wh.count("profiles") == 0
