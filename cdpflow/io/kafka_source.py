"""ReadKafkaTopic: an unbounded Beam source over a Kafka topic, in Python (a splittable DoFn).

Beam's `ReadFromKafka` is a cross-language transform whose Java expansion service is not
served by the registries cdpflow builds from, so the stream reads Kafka with this splittable
DoFn around kafka-python instead (docs/versions.md has the probe). On Dataflow, `ReadFromKafka`
or Pub/Sub can replace it: what follows in the graph only needs `(key, value)` bytes with
the record's timestamp.

    records = pipeline | ReadKafkaTopic("127.0.0.1:9092", "cdp.events.raw", start="earliest")

- One element per partition; its restriction is an offset range, claimed record by record,
  so a runner may checkpoint and split it and resume at the next unclaimed offset.
- Each record comes out at its Kafka timestamp (the collector's receipt time), and the
  partition's watermark follows those timestamps. A partition with nothing to read moves its
  watermark to the wall clock less `idle_lag` (an idle partition must not hold the stream's
  event time back for ever); a record older than that arrives late.
- `stop_after_us` makes a bounded run: each partition ends at its first record received after
  that time, or when it is idle past it (the restriction's rest is claimed, so it is done).
- `start`: `earliest`, `latest` (the end of each partition when the job starts), or
  `committed` (the group's committed offsets, else earliest). This source commits no offsets:
  the loader commits them with the warehouse rows they produced.

Runs on Prism (the BundleBased DirectRunner rejects splittable DoFns) and on Dataflow.
"""
from __future__ import annotations

import time
from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.io.watermark_estimators import ManualWatermarkEstimator
from apache_beam.transforms.core import RestrictionProvider
from apache_beam.utils.timestamp import Duration, Timestamp

from cdpflow.errors import BadInput

STARTS = ("earliest", "latest", "committed")
_END = 2 ** 62  # an unbounded partition's restriction ends here


def _consumer(bootstrap: str, group: Optional[str] = None):
    from kafka import KafkaConsumer
    return KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                         consumer_timeout_ms=1000, request_timeout_ms=30_000)


def start_offsets(bootstrap: str, topic: str, start: str, group: Optional[str] = None) -> List[Tuple[int, int]]:
    """(partition, first offset to read) of every partition of the topic, for `start`.

    Raises:
      BadInput: an unknown `start`, or a topic the brokers do not have.
    """
    from kafka import TopicPartition
    if start not in STARTS:
        raise BadInput(f"--from {start!r}: one of {', '.join(STARTS)}")
    consumer = _consumer(bootstrap, group)
    try:
        partitions = consumer.partitions_for_topic(topic)
        if not partitions:
            raise BadInput(f"no topic {topic!r} at {bootstrap} (`cdpflow stack up kafka` creates the project's topics)")
        tps = [TopicPartition(topic, p) for p in sorted(partitions)]
        if start == "latest":
            ends = consumer.end_offsets(tps)
            return [(tp.partition, ends[tp]) for tp in tps]
        beginnings = consumer.beginning_offsets(tps)
        if start == "earliest":
            return [(tp.partition, beginnings[tp]) for tp in tps]
        found = []
        for tp in tps:
            committed = consumer.committed(tp)
            found.append((tp.partition, committed if committed is not None else beginnings[tp]))
        return found
    finally:
        consumer.close()


class _CheckpointOnlyTracker(OffsetRestrictionTracker):
    """An offset tracker that splits only at checkpoints (at the next unclaimed offset).

    A partition's restriction ends at a far-off sentinel, so a split at a fraction of it (a
    runner's dynamic split: Prism asks for half) would hand the "second half" a start offset the
    partition will never reach. Declining those keeps one reader per partition; a checkpoint
    (fraction 0) still hands over the rest at the next offset.
    """

    def try_split(self, fraction_of_remainder):
        if fraction_of_remainder > 0:
            return None
        return super().try_split(fraction_of_remainder)


class _PartitionRestrictions(RestrictionProvider):
    def initial_restriction(self, element):
        _, first = element
        return OffsetRange(first, _END)

    def create_tracker(self, restriction):
        return _CheckpointOnlyTracker(restriction)

    def restriction_size(self, element, restriction):
        return 1  # unknown ahead: every partition weighs the same

    def truncate(self, element, restriction):
        return None  # on drain, the unread rest is left for the next job (from committed offsets)


class _ReadPartitionFn(beam.DoFn):
    def __init__(self, bootstrap: str, topic: str, poll_ms: int, max_records: int, idle_lag_s: float,
                 stop_after_us: Optional[int] = None):
        self.bootstrap, self.topic = bootstrap, topic
        self.stop_after_us = stop_after_us
        self.poll_ms, self.max_records, self.idle_lag_s = poll_ms, max_records, idle_lag_s
        self.consumer = None

    def setup(self):
        self.consumer = _consumer(self.bootstrap)

    def teardown(self):
        if self.consumer is not None:
            self.consumer.close()

    @beam.DoFn.unbounded_per_element()
    def process(self, element, tracker=beam.DoFn.RestrictionParam(_PartitionRestrictions()),
                watermark=beam.DoFn.WatermarkEstimatorParam(ManualWatermarkEstimator.default_provider())
                ) -> Iterable:
        from kafka import TopicPartition
        partition, _ = element
        tp = TopicPartition(self.topic, partition)
        self.consumer.assign([tp])
        self.consumer.seek(tp, tracker.current_restriction().start)
        records = self.consumer.poll(timeout_ms=self.poll_ms, max_records=self.max_records).get(tp, [])
        for record in records:
            if self.stop_after_us is not None and record.timestamp * 1000 > self.stop_after_us:
                tracker.try_claim(_END)  # a bounded run: the rest of the partition is not this run's
                return
            if not tracker.try_claim(record.offset):
                return
            at = Timestamp(micros=record.timestamp * 1000)
            current = watermark.current_watermark()
            if current is None or at > current:
                watermark.set_watermark(at)
            yield beam.window.TimestampedValue((record.key, record.value), at)
        if not records:
            # Idle: event time may not stand still because this partition has nothing to say.
            idle = Timestamp(micros=int((time.time() - self.idle_lag_s) * 1_000_000))
            if self.stop_after_us is not None and idle.micros > self.stop_after_us:
                tracker.try_claim(_END)  # past the end of a bounded run, and nothing more came
                return
            current = watermark.current_watermark()
            if current is None or idle > current:
                watermark.set_watermark(idle)
        tracker.defer_remainder(Duration(seconds=0 if records else self.poll_ms / 1000))


class ReadKafkaTopic(beam.PTransform):
    """PBegin -> PCollection[(key bytes or None, value bytes)], unbounded, at record timestamps.

    Args:
      bootstrap: HOST:PORT of the brokers.
      topic: the topic (all its partitions, as they are when the job starts).
      start: earliest | latest | committed (with `group`).
      group: the consumer group whose committed offsets `committed` starts from.
      idle_lag_s: how far behind the wall clock an idle partition's watermark stays.
      stop_after_us: a bounded run: a partition ends at its first record received after this
        time (UTC µs), or once it is idle past it (None: read for ever).
    """

    def __init__(self, bootstrap: str, topic: str, start: str = "committed", group: Optional[str] = None,
                 poll_ms: int = 500, max_records: int = 500, idle_lag_s: float = 5.0,
                 stop_after_us: Optional[int] = None):
        super().__init__()
        self.stop_after_us = stop_after_us
        self.bootstrap, self.topic, self.start, self.group = bootstrap, topic, start, group
        self.poll_ms, self.max_records, self.idle_lag_s = poll_ms, max_records, idle_lag_s

    def expand(self, pbegin):
        # Partitions and their first offsets are read when the graph is built: a clear error now
        # for a missing topic, and a job that resumes where its group left off.
        offsets = start_offsets(self.bootstrap, self.topic, self.start, self.group)
        return (pbegin
                | "Partitions" >> beam.Create(offsets)
                | "ReadPartition" >> beam.ParDo(_ReadPartitionFn(self.bootstrap, self.topic, self.poll_ms,
                                                                 self.max_records, self.idle_lag_s,
                                                                 self.stop_after_us)))
