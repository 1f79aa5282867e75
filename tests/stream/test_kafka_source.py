"""ReadKafkaTopic on Prism against a real broker: every record once, per-key order, and event time that an idle partition does not hold back."""
import os
import time
import uuid

import apache_beam as beam
import pytest
from apache_beam.coders import VarIntCoder
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.userstate import ReadModifyWriteStateSpec, TimerSpec, on_timer

from cdpflow.errors import BadInput
from cdpflow.io.kafka_source import ReadKafkaTopic, start_offsets
from cdpflow.runners.direct import streaming_pipeline

pytestmark = pytest.mark.e2e


class _Append(beam.DoFn):
    def __init__(self, path):
        self.path = path

    def process(self, record):
        key, value = record
        with open(self.path, "a") as handle:
            handle.write(f"{key.decode()} {value.decode()}\n")


class _CountAtEventTime(beam.DoFn):
    # Fires when the watermark passes the key's last record: only if every partition's
    # watermark moves, the empty one included.
    COUNT = ReadModifyWriteStateSpec("count", VarIntCoder())
    DUE = TimerSpec("due", TimeDomain.WATERMARK)

    def __init__(self, path):
        self.path = path

    def process(self, record, at=beam.DoFn.TimestampParam, count=beam.DoFn.StateParam(COUNT),
                due=beam.DoFn.TimerParam(DUE)):
        count.write((count.read() or 0) + 1)
        due.set(at)

    @on_timer(DUE)
    def fire(self, key=beam.DoFn.KeyParam, count=beam.DoFn.StateParam(COUNT)):
        with open(self.path, "a") as handle:
            handle.write(f"{key.decode()} {count.read()}\n")


def lines(path):
    return open(path).read().splitlines() if os.path.exists(path) else []


def test_every_record_once_in_order_and_an_idle_partition_does_not_stop_event_time(kafka_bootstrap, tmp_path):
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic
    topic = f"test.source.{uuid.uuid4().hex[:8]}"
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1)])
    admin.close()
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    then = int(time.time() * 1000) - 60_000
    # Partition 1 has one early record and then nothing: its watermark would stay at that record
    # for ever, and hold back every timer after it, unless an idle partition's watermark moves.
    producer.send(topic, key=b"early", value=b"-1", partition=1, timestamp_ms=then)
    for i in range(40):
        producer.send(topic, key=f"k{i % 4}".encode(), value=str(i).encode(), partition=0,
                      timestamp_ms=then + 1000 + i * 10)
    producer.flush()
    producer.close()

    records, counts = str(tmp_path / "records.txt"), str(tmp_path / "counts.txt")
    pipeline = streaming_pipeline("prism")
    read = pipeline | ReadKafkaTopic(kafka_bootstrap, topic, start="earliest", poll_ms=200, idle_lag_s=2)
    _ = read | "Append" >> beam.ParDo(_Append(records))
    _ = read | "Count" >> beam.ParDo(_CountAtEventTime(counts))
    result = pipeline.run()
    try:
        deadline = time.monotonic() + 60
        while (len(lines(records)) < 41 or len(lines(counts)) < 5) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        result.cancel()
    got = [line.split() for line in lines(records)]
    assert sorted(int(v) for _, v in got) == list(range(-1, 40))  # each record once
    for key in ("k0", "k1", "k2", "k3"):
        assert [int(v) for k, v in got if k == key] == sorted(int(v) for k, v in got if k == key)  # in order
    assert sorted(lines(counts)) == ["early 1", "k0 10", "k1 10", "k2 10", "k3 10"]


def test_start_offsets_and_a_missing_topic(kafka_bootstrap):
    assert [p for p, _ in start_offsets(kafka_bootstrap, "cdp.control", "latest")] == [0, 1]
    with pytest.raises(BadInput, match="no topic"):
        start_offsets(kafka_bootstrap, f"missing.{uuid.uuid4().hex}", "earliest")
    with pytest.raises(BadInput, match="--from"):
        start_offsets(kafka_bootstrap, "cdp.control", "yesterday")
