"""WriteToKafka: the stream's Kafka sink, a DoFn around kafka-python's idempotent producer.

    messages | WriteToKafka("127.0.0.1:9092")      # messages: (topic, key bytes, value bytes or None[, headers])

Each bundle's records are sent with `acks=all` and flushed before the bundle finishes, so a
bundle the runner counts as done has every record on the brokers; a send that fails raises,
the runner retries the bundle, and what the retry sends again carries the same keys and
idempotency keys (the loader and the sidecar deduplicate). A value of None is a tombstone (on
a compacted topic, the key's end). Beam's cross-language `WriteToKafka` can replace it on
Dataflow; what goes in is the same (topic, key, value).
"""
from __future__ import annotations

from typing import List

import apache_beam as beam
from apache_beam.metrics import Metrics

from cdpflow.io.kafka_producer import Record, producer, send_all


class _WriteFn(beam.DoFn):
    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.client = None
        self.pending: List[Record] = []
        self.sent = Metrics.counter(self.__class__, "sent")

    def setup(self):
        self.client = producer(self.bootstrap)

    def teardown(self):
        if self.client is not None:
            self.client.close(timeout=10)

    def start_bundle(self):
        self.pending = []

    def process(self, record):
        self.pending.append(record)
        if len(self.pending) >= 1000:
            self._flush()

    def finish_bundle(self):
        self._flush()

    def _flush(self):
        if self.pending:
            self.sent.inc(send_all(self.client, self.pending))
            self.pending = []


class WriteToKafka(beam.PTransform):
    """PCollection[(topic, key, value[, headers])] -> records on the brokers before each bundle ends."""

    def __init__(self, bootstrap: str):
        super().__init__()
        self.bootstrap = bootstrap

    def expand(self, records):
        return records | "Produce" >> beam.ParDo(_WriteFn(self.bootstrap))
