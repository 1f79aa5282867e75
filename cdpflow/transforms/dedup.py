"""Dedup: drops repeated messageIds within a configurable horizon (batch: grouped by messageId;
DedupStream: a stateful DoFn per messageId whose state expires with an event-time timer).

Input: PCollection[NormalizedEvent]. Outputs: `unique` (one event per messageId) and
`dead_letters` (stage `dedup`: a repeat received after the horizon). Counters: received,
succeeded (kept), deduplicated, dead_lettered.
"""
from __future__ import annotations

from typing import Iterable, Tuple

import apache_beam as beam
from apache_beam import pvalue
from apache_beam.coders import VarIntCoder
from apache_beam.metrics import Metrics
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer
from apache_beam.utils.timestamp import Timestamp

from cdpflow.core.dedup import DUPLICATE, FIRST, classify_copy, repeat_too_late as _repeat_too_late, split_copies
from cdpflow.core.timeutil import US_PER_SECOND
from cdpflow.schemas.records import NormalizedEvent
from cdpflow.transforms import DEAD_LETTERS

UNIQUE = "unique"


class _PickFirstFn(beam.DoFn):
    def __init__(self, horizon_us: int):
        self.horizon_us = horizon_us
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.deduplicated = Metrics.counter(self.__class__, "deduplicated")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")

    def process(self, element: Tuple[str, Iterable[NormalizedEvent]]):
        _, copies = element
        copies = list(copies)
        self.received.inc(len(copies))
        kept, duplicates, too_late = split_copies(copies, self.horizon_us)
        self.succeeded.inc()
        self.deduplicated.inc(len(duplicates))
        yield kept
        for late in too_late:
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, _repeat_too_late(late, kept.received_at, self.horizon_us))


class Dedup(beam.PTransform):
    """PCollection[NormalizedEvent] -> {'unique': ..., 'dead_letters': ...}.

    Args:
      horizon_hours: how long after the first copy a repeat still counts as a duplicate.
    """

    def __init__(self, horizon_hours: float = 168):
        super().__init__()
        self.horizon_us = int(horizon_hours * 3600 * US_PER_SECOND)

    def expand(self, events):
        results = (events
                   # Typed, so the stateful step's keys get a deterministic coder (Beam checks the
                   # input collection's type, not the ParDo's declared input).
                   | "KeyByMessageId" >> beam.Map(lambda e: (e.message_id, e)).with_output_types(
                       Tuple[str, NormalizedEvent])
                   | "GroupCopies" >> beam.GroupByKey()
                   | "PickFirst" >> beam.ParDo(_PickFirstFn(self.horizon_us)).with_outputs(DEAD_LETTERS, main=UNIQUE))
        return {UNIQUE: results[UNIQUE], DEAD_LETTERS: results[DEAD_LETTERS]}


class _FirstCopyFn(beam.DoFn):
    """Streaming dedup: the first copy of a messageId passes; state is kept for the horizon."""

    # An explicit integer coder, not pickle: state restored after an upgrade still reads.
    FIRST = ReadModifyWriteStateSpec("first_received_at", VarIntCoder())
    EXPIRY = TimerSpec("expiry", TimeDomain.WATERMARK)

    def __init__(self, horizon_us: int, keep_us: int):
        self.horizon_us = horizon_us
        self.keep_us = keep_us
        self.received = Metrics.counter(self.__class__, "received")
        self.succeeded = Metrics.counter(self.__class__, "succeeded")
        self.deduplicated = Metrics.counter(self.__class__, "deduplicated")
        self.dead_lettered = Metrics.counter(self.__class__, "dead_lettered")

    def process(self, element, first=beam.DoFn.StateParam(FIRST), expiry=beam.DoFn.TimerParam(EXPIRY)):
        _, event = element
        self.received.inc()
        seen = first.read()
        decision = classify_copy(seen, event, self.horizon_us)
        if decision == FIRST:
            first.write(event.received_at)
            # Forget the messageId once no copy within the horizon can still arrive in time.
            expiry.set(Timestamp(micros=event.timestamp + self.keep_us))
            self.succeeded.inc()
            yield event
        elif decision == DUPLICATE:
            self.deduplicated.inc()
        else:  # as in batch: a repeat this late cannot be told from a replay bug
            self.dead_lettered.inc()
            yield pvalue.TaggedOutput(DEAD_LETTERS, _repeat_too_late(event, seen, self.horizon_us))

    @on_timer(EXPIRY)
    def forget(self, first=beam.DoFn.StateParam(FIRST)):
        first.clear()


class DedupStream(beam.PTransform):
    """Streaming Dedup: PCollection[NormalizedEvent] -> {'unique', 'dead_letters'}, state per messageId.

    The state of a messageId is dropped when the watermark passes its event time plus the
    horizon plus the allowed lateness: later copies are refused by CheckLateness anyway.
    """

    def __init__(self, horizon_hours: float = 168, allowed_lateness_us: int = 72 * 3600 * US_PER_SECOND):
        super().__init__()
        self.horizon_us = int(horizon_hours * 3600 * US_PER_SECOND)
        self.keep_us = self.horizon_us + int(allowed_lateness_us)

    def expand(self, events):
        results = (events
                   # Typed, so the stateful step's keys get a deterministic coder (Beam checks the
                   # input collection's type, not the ParDo's declared input).
                   | "KeyByMessageId" >> beam.Map(lambda e: (e.message_id, e)).with_output_types(
                       Tuple[str, NormalizedEvent])
                   | "FirstCopy" >> beam.ParDo(_FirstCopyFn(self.horizon_us, self.keep_us)).with_input_types(
                       Tuple[str, NormalizedEvent]).with_outputs(
                       DEAD_LETTERS, main=UNIQUE))
        return {UNIQUE: results[UNIQUE], DEAD_LETTERS: results[DEAD_LETTERS]}
