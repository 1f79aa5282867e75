"""Sinks: table rows staged as JSON-lines shards, then committed to the warehouse by one writer.

Why staging: DuckDB admits one writing process, and BigQuery's batch path loads files too. Beam
workers (any number of them) write shards under `<staging>/<table>/`; after the pipeline has
finished, `cdpflow.warehouse` loads every table in one transaction. A failed run leaves the
warehouse as it was.

Rows are dicts with the table contract's column names; timestamps are integer microseconds,
amounts Decimal (written as strings).
"""
from __future__ import annotations

import os

import apache_beam as beam
from apache_beam.metrics import Metrics

from cdpflow.core.governance import identifiers_of_raw
# The rows themselves are the core's (the Flink job writes the same); imported here where callers found them.
from cdpflow.core.rows import dead_letter_row, event_row, to_json_line  # noqa: F401
from cdpflow.schemas.records import DeadLetter


class _DeadLetterRowFn(beam.DoFn):
    def __init__(self, default_region: str, rules):
        self.default_region = default_region
        self.rules = rules
        self.written = Metrics.counter(self.__class__, "written")
        self.suppressed = Metrics.counter(self.__class__, "suppressed")

    def process(self, letter: DeadLetter):
        identifiers = identifiers_of_raw(letter.raw, self.default_region)
        if self.rules is not None and self.rules.is_suppressed(identifiers):
            # A forgotten person's refused record: counted, kept nowhere (as their accepted events).
            self.suppressed.inc()
            return
        self.written.inc()
        yield dead_letter_row(letter, identifiers)


class DeadLetterRows(beam.PTransform):
    """PCollection[DeadLetter] -> `dead_letters` rows carrying the record's normalised identifiers.

    The identifiers are what a forget finds a dead letter by (exactly, never by searching the raw
    text); a dead letter of a forgotten identifier is dropped and counted (`suppressed`).

    Args:
      default_region: how phone numbers without a country code are read.
      rules: the `IdentityRules` of the run (from `cdpflow.core.governance.identity_rules`).
    """

    def __init__(self, default_region: str, rules):
        super().__init__()
        self.default_region = default_region
        self.rules = rules

    def expand(self, letters):
        return letters | "DeadLetterRow" >> beam.ParDo(_DeadLetterRowFn(self.default_region, self.rules))


class WriteStaged(beam.PTransform):
    """PCollection[dict] -> JSON-lines shards under `<staging>/<name>/part-*.jsonl`.

    Rows keep only the columns that do not start with '_' (internal fields stay in the pipeline).
    """

    def __init__(self, staging_dir: str, name: str):
        super().__init__()
        self.prefix = os.path.join(staging_dir, name, "part")

    def expand(self, rows):
        return (rows
                | "ToJson" >> beam.Map(lambda r: to_json_line({k: v for k, v in r.items() if not k.startswith("_")}))
                | "Write" >> beam.io.WriteToText(self.prefix, file_name_suffix=".jsonl"))
