"""Normalize: schema-valid events -> NormalizedEvent (identifiers, UTC skew-corrected times, money).

Input: PCollection[ParsedEvent]. Outputs: `normalized` (NormalizedEvent) and `dead_letters`
(stage `normalize`: no usable identifier, an unusable timestamp or amount).
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from cdpflow.core.ingest import ParsedEvent, normalize
from cdpflow.schemas.records import DeadLetter
from cdpflow.transforms import DEAD_LETTERS

NORMALIZED = "normalized"


class _NormalizeFn(beam.DoFn):
    def __init__(self, default_region: str):
        self.default_region = default_region
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")

    def process(self, parsed: ParsedEvent):
        self.received.inc()
        event = normalize(parsed, self.default_region)
        if isinstance(event, DeadLetter):
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, event)
            return
        self.succeeded.inc()
        yield event


class Normalize(beam.PTransform):
    """PCollection[ParsedEvent] -> {'normalized': PCollection[NormalizedEvent], 'dead_letters': ...}.

    Args:
      default_region: region for phone numbers written without a country code.
    """

    def __init__(self, default_region: str = "US"):
        super().__init__()
        self.default_region = default_region

    def expand(self, parsed):
        results = (parsed
                   | "Normalize" >> beam.ParDo(_NormalizeFn(self.default_region))
                   .with_input_types(ParsedEvent)
                   .with_outputs(DEAD_LETTERS, main=NORMALIZED))
        return {NORMALIZED: results[NORMALIZED], DEAD_LETTERS: results[DEAD_LETTERS]}
