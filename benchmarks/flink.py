"""Benchmark: the PyFlink job's sustained throughput on a backlog (the whole job; exactly-once out).

    .venv/bin/python benchmarks/flink.py [--customers 600] [--days 30] [--parallelism 2]

Starts Kafka, Redis and a Flink session cluster (a JobManager, two TaskManagers) through
`cdpflow stack`'s code on free ports in a temporary folder, loads a generated backlog into
`cdp.events.raw` first (produced directly, with each event's receivedAt as the record time),
submits the job with `cdpflow flink submit`, and measures how fast accepted events appear on
`cdp.warehouse.rows` to a read_committed reader: events/s between the first and the last
committed row, so the job's start-up (Python workers, the first checkpoint) is left out and
reported apart. With exactly-once sinks a row is visible at the checkpoint after it is written
(the interval is reported). Results go to benchmarks/results/flink.json.

It covers the whole job: parse, validate, normalise, time checks, dedup with keyed state,
enrichment, identity resolution in batches against Redis, the features' two keyed stages with
event-time timers, CLV scoring in batches, segment assignment, and the one exactly-once Kafka
sink. The rate is of accepted events (their `events:` rows); profile rows, transitions and
segment changes are counted beside it. The latency from the collector's 200 to a segment change
at rising rates is `benchmarks/live.py --engine flink`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow import flink  # noqa: E402
from cdpflow.config import load_config  # noqa: E402
from cdpflow.core.timeutil import parse_ts  # noqa: E402
from cdpflow.pipelines.replay import arrival_order  # noqa: E402
from cdpflow.schemas.topics import PROFILE_CHANGES, RAW_EVENTS, SEGMENT_CHANGES, WAREHOUSE_ROWS  # noqa: E402
from cdpflow.stack.base import free_port  # noqa: E402
from cdpflow.stack.flink import Flink  # noqa: E402
from cdpflow.stack.kafka import Kafka  # noqa: E402
from cdpflow.stack.redis import Redis  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402


def produce_backlog(bootstrap: str, sample: Path) -> int:
    """The sample's events on cdp.events.raw, as a collector would have left them; returns how many."""
    from cdpflow.io.kafka_producer import producer
    client = producer(bootstrap)
    sent = 0
    for _, line in arrival_order([str(sample / "events")]):
        try:
            event = orjson.loads(line)
            received = parse_ts(event["receivedAt"])
            key = (event.get("userId") or event.get("anonymousId") or "").encode() or None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            received, key = int(time.time() * 1_000_000), None
        client.send(RAW_EVENTS.name, key=key, value=line.rstrip(b"\n"), timestamp_ms=received // 1000)
        sent += 1
    client.flush()
    client.close()
    return sent


def read_to_end(group, ends) -> bool:
    """Whether the job's source has committed offsets (at a checkpoint) at the end of the backlog."""
    return all((group.committed(tp) or 0) >= end for tp, end in ends.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=600)
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--parallelism", type=int, default=2)
    parser.add_argument("--checkpoint-ms", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=900)
    args = parser.parse_args()
    from kafka import KafkaConsumer, TopicPartition
    os.environ.setdefault("CDPFLOW_DEMO", "1")
    with tempfile.TemporaryDirectory(prefix="cdpflow-bench-flink-") as folder:
        root = Path(folder)
        kafka = Kafka(root / "stack", port=free_port(), controller_port=free_port())
        redis = Redis(root / "stack", port=free_port())
        cluster = Flink(root / "stack", port=free_port(), rpc_port=free_port())
        started = time.monotonic()
        for component in (kafka, redis, cluster):
            component.up()
        stack_s = time.monotonic() - started
        try:
            generate(root / "sample", customers=args.customers, days=args.days, seed=5)
            events = produce_backlog(kafka.bootstrap_servers(), root / "sample")
            spec = flink.job_spec(kafka.bootstrap_servers(), str(root / "w.duckdb"), load_config(None),
                                  redis.url(), args.parallelism, args.checkpoint_ms)
            submitted = time.monotonic()
            job_id = flink.submit(spec, str(root / "spec.json"), cluster.address)
            consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers(), isolation_level="read_committed",
                                     enable_auto_commit=False)
            # the job's source group (never joined here: only its committed offsets are read)
            group = KafkaConsumer(bootstrap_servers=kafka.bootstrap_servers(), group_id="cdpflow-flink",
                                  enable_auto_commit=False)
            raw_tps = [TopicPartition(RAW_EVENTS.name, p) for p in group.partitions_for_topic(RAW_EVENTS.name)]
            raw_ends = group.end_offsets(raw_tps)
            tps = [TopicPartition(topic, p) for topic in (WAREHOUSE_ROWS.name, PROFILE_CHANGES.name, SEGMENT_CHANGES.name)
                   for p in consumer.partitions_for_topic(topic)]
            consumer.assign(tps)
            consumer.seek_to_beginning(*tps)
            rows, others, first, last, quiet_since = 0, 0, None, None, None
            deadline = time.monotonic() + args.timeout
            while time.monotonic() < deadline:
                polled = consumer.poll(timeout_ms=1000)
                got = sum(len(r) for r in polled.values())
                now = time.monotonic()
                if got:
                    records = [r for batch in polled.values() for r in batch]
                    rows += sum(1 for r in records if r.topic == WAREHOUSE_ROWS.name and r.key.startswith(b"events:"))
                    others += sum(1 for r in records if not (r.topic == WAREHOUSE_ROWS.name
                                                               and r.key.startswith(b"events:")))
                    first = first or now
                    last, quiet_since = now, None
                elif first is not None:
                    quiet_since = quiet_since or now
                    # the source has checkpointed the end of the backlog and nothing new came for
                    # three checkpoint intervals: every row it made has been committed
                    if now - quiet_since > max(10.0, 3 * args.checkpoint_ms / 1000) and read_to_end(group, raw_ends):
                        break
            consumer.close()
            group.close()
            flink.cancel(job_id, cluster.address)
        finally:
            for component in (cluster, redis, kafka):
                component.down()
    span = (last - first) if first and last and last > first else float("nan")
    results = {
        "machine": common.machine(), "events_in": events, "rows_out": rows, "parallelism": args.parallelism,
        "checkpoint_ms": args.checkpoint_ms, "stack_start_s": round(stack_s, 1),
        "first_row_after_submit_s": round(first - submitted, 1) if first else None,
        "events_per_s": round(rows / span, 1) if span == span else None,
        "other_records_out": others,
        "covers": "the whole job: ingest, dedup, enrichment, identity (Redis), features, CLV, segments, "
                  "exactly-once Kafka sink",
    }
    print(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    print("results:", common.save_results("flink", results))


if __name__ == "__main__":
    main()
