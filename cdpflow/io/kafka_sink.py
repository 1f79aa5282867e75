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

from typing import List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

Record = Tuple  # (topic, key: Optional[bytes], value: Optional[bytes][, headers: [(str, bytes)]])


def producer(bootstrap: str, timeout_s: float = 30.0):
    """An idempotent, acks=all producer (what every cdpflow writer to Kafka uses)."""
    from kafka import KafkaProducer
    return KafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5,
                         max_block_ms=int(timeout_s * 1000), request_timeout_ms=int(timeout_s * 1000),
                         delivery_timeout_ms=int(timeout_s * 1000) + 10, compression_type="gzip")


def send_all(client, records: Sequence[Record], timeout_s: float = 60.0) -> int:
    """Sends the records and waits until the brokers hold every one; raises if any failed."""
    futures: List = []
    for record in records:
        topic, key, value = record[:3]
        headers: Optional[list] = record[3] if len(record) > 3 else None
        futures.append(client.send(topic, key=key, value=value, headers=headers or None))
    client.flush(timeout=timeout_s)
    for future in futures:
        future.get(timeout=timeout_s)  # raises the delivery error, if any
    return len(futures)


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
