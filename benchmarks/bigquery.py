"""Benchmark: writing to the BigQuery warehouse (the stack's emulator), batch commits and the stream's micro-batches.

    .venv/bin/python benchmarks/bigquery.py [--customers 1000] [--days 120] [--micro-batch 500]

Starts the emulator (`make bigquery-emulator`) on free ports, generates a sample and:
- batch: `cdpflow run` into DuckDB and into BigQuery; the BigQuery commit (load jobs into staging
  tables, one transaction) is timed from the pipeline's end to the commit's end: rows/s;
- stream: the loader's micro-batches (`load_stream_batch`, what `cdpflow load` commits every
  second or 5,000 records) built from that run's tables as the stream's topics would carry
  them (events, profile rows, segment enters, with the identity store's read-out), into a new
  dataset, `--micro-batch` records each: rows/s and seconds per micro-batch.
Results go to benchmarks/results/bigquery.json. The emulator runs on the same 2 cores.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.config import load_config  # noqa: E402
from cdpflow.core.timeutil import format_ts  # noqa: E402
from cdpflow.pipelines.batch import run_batch  # noqa: E402
from cdpflow.schemas.topics import PROFILE_CHANGES, SEGMENT_CHANGES, WAREHOUSE_ROWS  # noqa: E402
from cdpflow.stack.base import free_port  # noqa: E402
from cdpflow.stack.bigquery import BigQueryEmulator  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402
from cdpflow.warehouse import open_warehouse  # noqa: E402


def _us(value):
    return int(value.timestamp() * 1_000_000) if value is not None else None


def batch_commit(sample: Path, uri: str) -> dict:
    config = load_config(None, enrichment={"catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")})
    marks = {}
    summary = run_batch([str(sample / "events")], uri, config, before_commit=lambda: marks.setdefault("at", time.time()))
    seconds = time.time() - marks["at"]
    rows = sum(v for k, v in summary.written.items() if isinstance(v, int) and k != "refused_by_bigquery")
    return {"rows": rows, "commit_seconds": round(seconds, 2), "rows_per_second": round(rows / seconds),
            "whole_run_seconds": round(summary.seconds, 1)}


def micro_batches(local: Path, uri: str, size: int) -> dict:
    """The loader's micro-batches, built from a DuckDB warehouse's tables as the topics carry them."""
    with open_warehouse(str(local), read_only=True) as wh:
        events = wh.query("SELECT * FROM events ORDER BY received_at")
        profiles = wh.profiles()
        spans = wh.query("SELECT * FROM segment_memberships")
        identity = {"links": wh.query("SELECT * FROM identity_links"), "merges": wh.query("SELECT * FROM profile_merges"),
                    "conflicts": wh.query("SELECT * FROM identity_conflicts")}
    owner = {e["message_id"]: e["profile_id"] for e in events}
    identity.update(profiles={p["profile_id"] for p in profiles},
                    final=lambda ids: {m: owner.get(m) for m in ids})
    records = [(WAREHOUSE_ROWS.name, e["message_id"], {"table": "events", "row": e}, None) for e in events]
    records += [(PROFILE_CHANGES.name, p["profile_id"], p, (_us(p["as_of"]), 0, _us(p["updated_at"]))) for p in profiles]
    records += [(SEGMENT_CHANGES.name, s["profile_id"], {
        "idempotency_key": f"{s['profile_id']}|{s['segment']}|enter#1", "profile_id": s["profile_id"],
        "segment": s["segment"], "source": s["source"], "direction": "enter", "at": format_ts(_us(s["entered_at"])),
        "cause_message_id": "benchmark", "model_version": s["model_version"], "ordinal": 1}, None) for s in spans]
    offsets = {}
    shaped = []
    for topic, key, value, order in records:
        offset = offsets[topic] = offsets.get(topic, -1) + 1
        shaped.append({"topic": topic, "partition": 0, "offset": offset, "key": key, "value": value,
                       "order": order or (0, 0, 0)})
    took = []
    with open_warehouse(uri) as wh:
        for i in range(0, len(shaped), size):
            started = time.perf_counter()
            wh.load_stream_batch(shaped[i:i + size], identity, int(time.time() * 1_000_000))
            took.append(time.perf_counter() - started)
    return {"records": len(shaped), "micro_batch": size, "batches": len(took),
            "seconds_per_batch_median": round(sorted(took)[len(took) // 2], 2),
            "rows_per_second": round(len(shaped) / sum(took))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--days", type=int, default=120)
    parser.add_argument("--micro-batch", type=int, default=500)
    args = parser.parse_args()
    os.environ["CDPFLOW_DEMO"] = "1"
    folder = Path(tempfile.mkdtemp(prefix="cdpflow-bench-bigquery-"))
    os.environ["CDPFLOW_STATE_DIR"] = str(folder / "state")
    emulator = BigQueryEmulator(folder / "stack", port=free_port(), grpc_port=free_port())
    emulator.up()
    try:
        sample = folder / "sample"
        generate(sample, customers=args.customers, days=args.days, seed=3)
        local = folder / "cdp.duckdb"
        run_batch([str(sample / "events")], str(local), load_config(None, enrichment={
            "catalog": str(sample / "catalog.csv"), "rates": str(sample / "rates.csv")}))
        results = {"machine": common.machine(), "customers": args.customers, "days": args.days,
                   "batch": batch_commit(sample, emulator.warehouse_uri("bench_batch")),
                   "stream": micro_batches(local, emulator.warehouse_uri("bench_stream"), args.micro_batch)}
    finally:
        emulator.down()
    print(results["batch"], results["stream"])
    print("saved to", common.save_results("bigquery", results))


if __name__ == "__main__":
    main()
