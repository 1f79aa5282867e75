"""Runs the streaming graph on a TestStream and collects what it emits, in emission order.

Runners: `direct` is Beam's BundleBased DirectRunner in streaming mode; `prism` is Prism (the
binary `make prism` builds), whose Python workers run in this process (loopback).
"""
from __future__ import annotations

import itertools
import json
from collections import defaultdict
from typing import Dict, List, Optional

import apache_beam as beam
from apache_beam.testing.test_stream import TestStream as EventStream
from apache_beam.utils.timestamp import Timestamp

from cdpflow.config import load_config
from cdpflow.core.timeutil import US_PER_DAY, format_ts, parse_ts
from cdpflow.core import governance
from cdpflow.pipelines.stream import build_stream
from cdpflow.runners.direct import streaming_pipeline

# The runner executes in this process, so a module-level sink can collect the outputs.
_COLLECTED: Dict[str, Dict[str, list]] = defaultdict(lambda: defaultdict(list))
_RUNS = itertools.count()
HOUR = US_PER_DAY // 24


def track(mid, at, received=None, name="Order Completed", revenue=None, **fields):
    """A raw track line; `at` and `received` are UTC microseconds."""
    body = {"type": "track", "event": name, "messageId": mid, "timestamp": format_ts(at),
            "receivedAt": format_ts(received if received is not None else at + 1_000_000)}
    if revenue is not None:
        body["properties"] = {"revenue": revenue, "currency": "USD"}
    body.update(fields)
    return body


def stamped(body):
    """A TestStream element: the line, stamped with its arrival time (receivedAt)."""
    return beam.window.TimestampedValue(json.dumps(body).encode(), Timestamp(micros=parse_ts(body["receivedAt"])))


class _Collect(beam.DoFn):
    def __init__(self, run, table):
        self.run, self.table = run, table

    def process(self, row):
        # Imported here so that the unpickled DoFn writes to this module's dict, not a copy.
        from tests.stream import helpers
        helpers._COLLECTED[self.run][self.table].append(row)


def run_stream(stream: EventStream, store: str, config: Optional[dict] = None, preload: Optional[List[bytes]] = None,
               clv_model: Optional[dict] = None, runner: str = "direct", until: Optional[int] = None,
               **overrides) -> Dict[str, list]:
    """Runs build_stream on `stream`; returns {table: rows in emission order}."""
    run = f"run{next(_RUNS)}"
    pipeline = streaming_pipeline(runner)
    lines = pipeline | "Source" >> stream
    old = pipeline | "Preload" >> beam.Create(preload) if preload is not None else None
    config = config or load_config(**overrides)
    # A stream without a warehouse: no governance state (nothing forgotten, nothing separated).
    rules = governance.identity_rules(config, governance.GovernanceState(), governance.LEGACY_KEY)
    outputs = build_stream(lines, config, store, rules, preload=old, clv_model=clv_model, until=until)
    for table, pcoll in outputs.items():
        _ = pcoll | f"Collect_{table}" >> beam.ParDo(_Collect(run, table))
    pipeline.run().wait_until_finish()
    return _COLLECTED.pop(run)


def latest_rows(rows: List[dict], until: Optional[int] = None) -> Dict[str, dict]:
    """The last row (as of `until` at the latest) of each profile that still exists.

    When a TestStream ends, the runner moves the watermark to the end of time and every timer
    fires, down to the last window and lifecycle threshold; `until` (the last watermark the
    test set) leaves those out.
    """
    latest = {}
    for row in rows:
        if until is not None and row["as_of"] > until:
            continue
        current = latest.get(row["profile_id"])
        if current is None or row["as_of"] >= current["as_of"]:
            latest[row["profile_id"]] = row
    return {p: r for p, r in latest.items() if not r.get("deleted")}
