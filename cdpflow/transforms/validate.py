"""ParseAndValidate: raw JSON lines -> (event dict, raw line, schema version), or dead letters.

Input: PCollection of lines (bytes as read, or str). Outputs: `valid` as ParsedEvent tuples and `dead_letters` as DeadLetter
records (stage `parse` for lines that are not JSON, `validate` for schema violations).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

# ParsedEvent and received_at_of are the core's; imported here too, where callers found them.
from cdpflow.core.ingest import ParsedEvent, parse_line, received_at_of  # noqa: F401
from cdpflow.schemas import EventValidator
from cdpflow.schemas.records import DeadLetter
from cdpflow.transforms import DEAD_LETTERS

VALID = "valid"


class _ParseAndValidateFn(beam.DoFn):
    def __init__(self):
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")
        self.validator = None

    def setup(self):
        # Compiling the schemas generates code: once per worker, not per element.
        self.validator = EventValidator()

    def process(self, line):
        self.received.inc()
        parsed = parse_line(line, self.validator)
        if isinstance(parsed, DeadLetter):
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, parsed)
            return
        self.succeeded.inc()
        yield parsed


class ParseAndValidate(beam.PTransform):
    """PCollection[bytes | str] -> {'valid': PCollection[ParsedEvent], 'dead_letters': PCollection[DeadLetter]}."""

    def expand(self, lines):
        results = lines | "Parse" >> beam.ParDo(_ParseAndValidateFn()).with_outputs(DEAD_LETTERS, main=VALID)
        return {VALID: results[VALID], DEAD_LETTERS: results[DEAD_LETTERS]}
