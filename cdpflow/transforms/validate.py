"""ParseAndValidate: raw JSON lines -> (event dict, raw line, schema version), or dead letters.

Input: PCollection of lines (bytes as read, or str). Outputs: `valid` as ParsedEvent tuples and `dead_letters` as DeadLetter
records (stage `parse` for lines that are not JSON, `validate` for schema violations).
"""
from __future__ import annotations

import time
from typing import Any, Dict, NamedTuple

import apache_beam as beam
import orjson
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from cdpflow.core.timeutil import parse_ts
from cdpflow.schemas import EventValidator, SchemaViolation
from cdpflow.schemas.records import DeadLetter
from cdpflow.transforms import DEAD_LETTERS

VALID = "valid"


class ParsedEvent(NamedTuple):
    event: Dict[str, Any]
    raw: str
    schema_version: str


def received_at_of(event: Any) -> int:
    """receivedAt of a (possibly broken) event in microseconds, else now."""
    if isinstance(event, dict) and isinstance(event.get("receivedAt"), str):
        try:
            return parse_ts(event["receivedAt"])
        except ValueError:
            pass
    return int(time.time() * 1_000_000)


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
        if isinstance(line, bytes):
            try:
                line = line.decode("utf-8")
            except UnicodeDecodeError as err:
                self.dead_lettered.inc()
                yield pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                    line.decode("utf-8", "backslashreplace").strip(), "parse", f"not UTF-8: {err}", None,
                    received_at_of(None)))
                return
        raw = line.strip()
        try:
            event = orjson.loads(raw)
        except orjson.JSONDecodeError as err:
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                raw, "parse", f"not valid JSON: {err}", None, received_at_of(None)))
            return
        try:
            version = self.validator.validate(event)
        except SchemaViolation as err:
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                raw, "validate", str(err), err.schema_version, received_at_of(event)))
            return
        self.succeeded.inc()
        yield ParsedEvent(event, raw, version)


class ParseAndValidate(beam.PTransform):
    """PCollection[bytes | str] -> {'valid': PCollection[ParsedEvent], 'dead_letters': PCollection[DeadLetter]}."""

    def expand(self, lines):
        results = lines | "Parse" >> beam.ParDo(_ParseAndValidateFn()).with_outputs(DEAD_LETTERS, main=VALID)
        return {VALID: results[VALID], DEAD_LETTERS: results[DEAD_LETTERS]}
