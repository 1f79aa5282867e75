"""Benchmark: the collector's throughput into Kafka, at 100 events per request.

    .venv/bin/python benchmarks/collector.py [--events 20000] [--batch-size 100]

Starts a Kafka broker through `cdpflow stack`'s code (free ports, a temporary folder) and the
collector as its own process (`cdpflow serve collector`), then sends generated events with
`cdpflow.collector.send` from this process, as fast as the collector answers 200 (each 200
means Kafka acknowledged the request's events). Reports accepted events/s and the p50/p99 time
of a request. Results go to benchmarks/results/collector.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

import orjson

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.collector.app import EVENT_TYPES  # noqa: E402
from cdpflow.collector.send import send  # noqa: E402
from cdpflow.stack.base import free_port  # noqa: E402
from cdpflow.stack.kafka import Kafka  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402


def acceptable(line: bytes) -> bool:
    try:
        event = orjson.loads(line)
    except orjson.JSONDecodeError:
        return False
    return isinstance(event, dict) and event.get("type") in EVENT_TYPES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=100)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="cdpflow-collector-bench-"))
    generate(root / "sample", customers=max(50, args.events // 30), days=120, seed=5)
    # Only events the collector accepts: a refused one makes the sender resend its batch event by
    # event, which would measure the refusal path instead of the throughput.
    lines = [line for path in sorted((root / "sample" / "events").glob("*.jsonl"))
             for line in path.read_bytes().splitlines() if acceptable(line)][:args.events]
    broker = Kafka(root / "stack", port=free_port(), controller_port=free_port())
    broker.up()
    collector, url = common.start_collector(broker.bootstrap_servers(), root)
    try:
        send(lines[:500], url, "wk_bench", batch_size=args.batch_size, is_live=True)  # warm up
        report = send(lines, url, "wk_bench", batch_size=args.batch_size, is_live=True)
    finally:
        collector.terminate()
        collector.wait(20)
        broker.down()
    latencies = sorted(report.request_seconds)
    results = {"machine": common.machine(), "events": len(lines), "batch_size": args.batch_size,
               "accepted": report.accepted, "refused": len(report.refused), "seconds": round(report.seconds, 2),
               "events_per_s": round(report.rate),
               "request_ms_p50": round(statistics.median(latencies) * 1000, 1),
               "request_ms_p99": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1)}
    print(f"collector -> Kafka, {args.batch_size} events a request: {results['events_per_s']:,} events/s accepted "
          f"({report.accepted:,} accepted, {len(report.refused)} refused by validation rules); request p50 "
          f"{results['request_ms_p50']} ms, p99 {results['request_ms_p99']} ms")
    common.save_results("collector", results)
    return results


if __name__ == "__main__":
    main()
