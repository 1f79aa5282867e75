"""Benchmark: feature updates per second and feature state bytes per profile.

    .venv/bin/python benchmarks/features.py                       # 1,000 customers x 365 days
    .venv/bin/python benchmarks/features.py --customers 200 --days 120 --stream-runners direct prism

On generated traffic (identity resolved by the plain-Python reference, so only features are
timed) it measures:
  - fold: events folded into per-profile ProfileStates in plain Python (the floor),
  - rows: profile rows computed from the states (`features`),
  - batch: the ComputeFeatures stage on the FnApiRunner (CombinePerKey of states),
  - stream: the StreamFeatures stage (both stateful stages, timers, rows, CLV scoring) fed by
    a TestStream whose watermark follows event time a day at a time, on the BundleBased
    DirectRunner in streaming mode and on Prism (`make prism`); updates/s counts events in,
    rows out are reported beside it,
  - state: pickled bytes of each profile's ProfileState (one stateful stage's share) and of
    the two stages together, mean / p50 / p95 / max over profiles.
Results go to benchmarks/results/features.json.
"""
from __future__ import annotations

import argparse
import base64
import os
import pickle
import statistics
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_stream import TestStream
from apache_beam.utils.timestamp import Timestamp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import common  # noqa: E402
from reference import accepted_events  # noqa: E402

from cdpflow.config import load_config  # noqa: E402
from cdpflow.core.features import FeatureSettings, ProfileState, features  # noqa: E402
from cdpflow.core.timeutil import US_PER_DAY  # noqa: E402
from cdpflow.runners.direct import streaming_pipeline  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402
from cdpflow.transforms.features import PROFILES, ComputeFeatures  # noqa: E402
from cdpflow.transforms.stream_features import StreamFeatures  # noqa: E402


class _Count(beam.DoFn):
    """Counts rows (not deletions) per bundle into a file (the runner may run this in another process)."""

    def __init__(self, path):
        self.path = path

    def start_bundle(self):
        self.rows = 0

    def process(self, row):
        self.rows += not row.get("deleted")

    def finish_bundle(self):
        with open(self.path, "a") as handle:
            handle.write(f"{self.rows}\n")


def _counted(path):
    with open(path) as handle:
        return sum(int(line) for line in handle)


def bench_batch(events, as_of, config):
    # Read from a file, not beam.Create: Create would put every event into the pipeline proto.
    staged = tempfile.mktemp(suffix=".b64")
    with open(staged, "w") as handle:
        for event in events:
            handle.write(base64.b64encode(pickle.dumps(event)).decode() + "\n")
    pipeline = beam.Pipeline(runner=FnApiRunner())
    read = (pipeline | "Read" >> beam.io.ReadFromText(staged)
            | "Decode" >> beam.Map(lambda line: pickle.loads(base64.b64decode(line))))
    rows = read | ComputeFeatures(
        pipeline | "Links" >> beam.Create([]), pipeline | "AsOf" >> beam.Create([as_of]), config)
    counter = tempfile.mktemp()
    _ = rows[PROFILES] | beam.ParDo(_Count(counter))
    started = time.perf_counter()
    pipeline.run().wait_until_finish()
    return time.perf_counter() - started, _counted(counter)


def bench_stream(events, config, runner):
    # One identifier per profile (identity is not what is measured): key = profile, epoch 0.
    ordered = sorted(events, key=lambda e: (e.timestamp, e.message_id))
    stream, day = TestStream(), None
    chunk = []
    for event in ordered:
        if day is not None and event.timestamp // US_PER_DAY != day and chunk:
            stream = stream.add_elements(chunk).advance_watermark_to(Timestamp(micros=day * US_PER_DAY + US_PER_DAY))
            chunk = []
        day = event.timestamp // US_PER_DAY
        chunk.append(beam.window.TimestampedValue((event.profile_id, (event, 0)), Timestamp(micros=event.timestamp)))
    stream = stream.add_elements(chunk).advance_watermark_to(Timestamp(micros=(day + 1) * US_PER_DAY))
    pipeline = streaming_pipeline(runner)
    routed = pipeline | "Source" >> stream
    moves = pipeline | "NoMoves" >> beam.Create([])
    out = (routed, moves) | StreamFeatures(config)
    counter = tempfile.mktemp()
    _ = out[PROFILES] | beam.ParDo(_Count(counter))
    started = time.perf_counter()
    pipeline.run().wait_until_finish()
    return time.perf_counter() - started, _counted(counter)


def quantiles(values):
    values = sorted(values)
    return {"mean": round(statistics.fmean(values)), "p50": values[len(values) // 2],
            "p95": values[int(len(values) * 0.95)], "max": values[-1]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=1000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--stream-runners", nargs="+", default=["direct"], choices=["direct", "prism"])
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="cdpflow-bench-features-")
    generate(root, customers=args.customers, days=args.days, seed=args.seed)
    config = load_config(enrichment={"catalog": os.path.join(root, "catalog.csv"), "rates": os.path.join(root, "rates.csv")})
    settings = FeatureSettings.from_config(config)
    _, events, _ = accepted_events(os.path.join(root, "events"), config)
    as_of = max(e.timestamp for e in events)
    results = {"machine": common.machine(),
               "sample": {"customers": args.customers, "days": args.days, "events": len(events)}}

    started = time.perf_counter()
    states = {}
    for event in events:
        state = states.get(event.profile_id)
        if state is None:
            state = states[event.profile_id] = ProfileState(settings.session_timeout_us)
        state.add(event)
    fold = time.perf_counter() - started
    started = time.perf_counter()
    for state in states.values():
        features(state, as_of, settings)
    rows = time.perf_counter() - started
    results["profiles"] = len(states)
    results["fold"] = {"updates_per_s": round(len(events) / fold)}
    results["rows"] = {"rows_per_s": round(len(states) / rows)}

    seconds, emitted = bench_batch(events, as_of, config)
    results["batch_fnapi"] = {"seconds": round(seconds, 1), "updates_per_s": round(len(events) / seconds), "rows": emitted}
    for runner in args.stream_runners:
        seconds, emitted = bench_stream(events, config, runner)
        results[f"stream_{runner}"] = {"seconds": round(seconds, 1), "updates_per_s": round(len(events) / seconds),
                                       "rows": emitted, "rows_per_s": round(emitted / seconds)}

    one_stage = [len(pickle.dumps(s, protocol=pickle.HIGHEST_PROTOCOL)) for s in states.values()]
    results["state_bytes_per_profile"] = {"one_stage": quantiles(one_stage),
                                          "both_stages": quantiles([2 * b for b in one_stage])}
    busiest = max(states.values(), key=lambda s: s.event_count)
    results["state_bytes_per_profile"]["busiest_profile"] = {
        "events": busiest.event_count, "days": len(busiest.days), "bytes": len(pickle.dumps(busiest))}

    print(f"events {len(events):,}, profiles {len(states):,} ({args.customers} customers x {args.days} days)")
    print(f"fold (plain Python):         {results['fold']['updates_per_s']:>10,} updates/s")
    print(f"rows (plain Python):         {results['rows']['rows_per_s']:>10,} rows/s")
    print(f"batch ComputeFeatures:       {results['batch_fnapi']['updates_per_s']:>10,} updates/s (FnApiRunner)")
    for runner in args.stream_runners:
        r = results[f"stream_{runner}"]
        print(f"stream StreamFeatures:       {r['updates_per_s']:>10,} updates/s ({r['rows']:,} rows, "
              f"{r['rows_per_s']:,} rows/s; {'BundleBased DirectRunner' if runner == 'direct' else 'Prism'})")
    q = results["state_bytes_per_profile"]
    print(f"state bytes per profile:     mean {q['one_stage']['mean']:,} p50 {q['one_stage']['p50']:,} "
          f"p95 {q['one_stage']['p95']:,} max {q['one_stage']['max']:,} per stage (x2 for both stages)")
    common.save_results("features", results)
    return results


if __name__ == "__main__":
    main()
