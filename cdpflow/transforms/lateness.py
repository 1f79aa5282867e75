"""CheckLateness: refuses events too late or too far in the future (batch and stream alike).

An event's lateness is receivedAt minus its (skew-corrected) event time; it depends only on the
event, so the batch job and the stream refuse the same events, whatever order they come in.
An event time more than the allowed future skew ahead of receivedAt (a device clock set to
2099) is refused too: accepted, it would move every window and lifecycle clock it touches.
Input: PCollection[NormalizedEvent]. Outputs: `on_time` and `dead_letters` (stage `lateness`
or `future`, the gap and the limit in the error). Counters: received, succeeded, dead_lettered.
"""
from __future__ import annotations

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.metrics import Metrics

from cdpflow.core.ingest import time_refusal
from cdpflow.core.timeutil import US_PER_SECOND
from cdpflow.schemas.records import NormalizedEvent
from cdpflow.transforms import DEAD_LETTERS

ON_TIME = "on_time"


class _CheckLatenessFn(beam.DoFn):
    def __init__(self, allowed_us: int, future_us: int):
        self.allowed_us = allowed_us
        self.future_us = future_us
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")

    def process(self, event: NormalizedEvent):
        self.received.inc()
        refused = time_refusal(event, self.allowed_us, self.future_us)
        if refused is not None:
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, refused)
            return
        self.succeeded.inc()
        yield event


class CheckLateness(beam.PTransform):
    """PCollection[NormalizedEvent] -> {'on_time': ..., 'dead_letters': ...}.

    Args:
      allowed_lateness_us: the most receivedAt may trail the event time (default 3 days).
      max_future_us: the most the event time may lead receivedAt (default a day).
    """

    def __init__(self, allowed_lateness_us: int = 72 * 3600 * US_PER_SECOND,
                 max_future_us: int = 24 * 3600 * US_PER_SECOND):
        super().__init__()
        self.allowed_us = int(allowed_lateness_us)
        self.future_us = int(max_future_us)

    def expand(self, events):
        results = events | "Check" >> beam.ParDo(_CheckLatenessFn(self.allowed_us, self.future_us)).with_outputs(DEAD_LETTERS, main=ON_TIME)
        return {ON_TIME: results[ON_TIME], DEAD_LETTERS: results[DEAD_LETTERS]}
