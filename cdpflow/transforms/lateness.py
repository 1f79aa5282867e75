"""CheckLateness: refuses events that arrived later than the allowed lateness (batch and stream).

An event's lateness is receivedAt minus its (skew-corrected) event time; it depends only on the
event, so the batch job and the stream refuse the same events, whatever order they come in.
Input: PCollection[NormalizedEvent]. Outputs: `on_time` and `dead_letters` (stage `lateness`,
the lateness and the limit in the error). Counters: received, succeeded, dead_lettered.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from cdpflow.core.timeutil import US_PER_SECOND
from cdpflow.schemas.records import DeadLetter, NormalizedEvent
from cdpflow.transforms import DEAD_LETTERS

ON_TIME = "on_time"


def _hours(us: int) -> str:
    return f"{us / (3600 * US_PER_SECOND):.1f} h"


class _CheckLatenessFn(beam.DoFn):
    def __init__(self, allowed_us: int):
        self.allowed_us = allowed_us
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")

    def process(self, event: NormalizedEvent):
        self.received.inc()
        lateness = event.received_at - event.timestamp
        if lateness > self.allowed_us:
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, DeadLetter(
                event.raw, "lateness",
                f"received {_hours(lateness)} after its event time; the allowed lateness is {_hours(self.allowed_us)}",
                event.schema_version, event.received_at))
            return
        self.succeeded.inc()
        yield event


class CheckLateness(beam.PTransform):
    """PCollection[NormalizedEvent] -> {'on_time': ..., 'dead_letters': ...}.

    Args:
      allowed_lateness_us: the most receivedAt may trail the event time (default 3 days).
    """

    def __init__(self, allowed_lateness_us: int = 72 * 3600 * US_PER_SECOND):
        super().__init__()
        self.allowed_us = int(allowed_lateness_us)

    def expand(self, events):
        results = events | "Check" >> beam.ParDo(_CheckLatenessFn(self.allowed_us)).with_outputs(DEAD_LETTERS, main=ON_TIME)
        return {ON_TIME: results[ON_TIME], DEAD_LETTERS: results[DEAD_LETTERS]}
