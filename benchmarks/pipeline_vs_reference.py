"""Benchmark: `cdpflow run` (Beam) against the plain-Python reference on the same generated sample.

    make bench                                   # 2,000 customers x 180 days (~65k events)
    .venv/bin/python benchmarks/pipeline_vs_reference.py --customers 4000 --runners direct multiprocess

Prints events/s for each and the ratio reference/pipeline (how many times slower Beam is), and
writes them to benchmarks/results/latest.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from reference import run_reference  # noqa: E402

from cdpflow.config import load_config  # noqa: E402
from cdpflow.pipelines.batch import run_batch  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402


# The benchmark's warehouses are throwaway demo ones: a generated suppression key beside each.
os.environ.setdefault("CDPFLOW_DEMO", "1")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, default=2000)
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--runners", nargs="+", default=["direct", "multiprocess"])
    args = parser.parse_args(argv)
    root = tempfile.mkdtemp(prefix="cdpflow-bench-")
    sample = os.path.join(root, "sample")
    generate(sample, customers=args.customers, days=args.days, seed=args.seed)
    config = load_config(enrichment={"catalog": os.path.join(sample, "catalog.csv"),
                                     "rates": os.path.join(sample, "rates.csv")})
    started = time.perf_counter()
    reference = run_reference(os.path.join(sample, "events"), config)
    ref_seconds = time.perf_counter() - started
    results = {"machine": common.machine(),
               "sample": {"customers": args.customers, "days": args.days, "events": reference["read"]},
               "reference": {"seconds": round(ref_seconds, 2), "events_per_s": round(reference["read"] / ref_seconds)},
               "pipeline": {}}
    print(f"events: {reference['read']:,}  (accepted {reference['accepted']:,}, profiles {reference['profiles']:,})")
    print(f"plain-Python reference: {ref_seconds:6.1f} s  {reference['read'] / ref_seconds:10,.0f} events/s")
    for runner in args.runners:
        warehouse = os.path.join(root, f"{runner}.duckdb")
        started = time.perf_counter()
        summary = run_batch([os.path.join(sample, "events")], warehouse, config, runner=runner)
        seconds = time.perf_counter() - started
        assert summary.accepted == reference["accepted"], (summary.accepted, reference["accepted"])
        assert summary.written["profiles"] == reference["profiles"], (summary.written, reference)
        rate = summary.read / seconds
        ratio = (reference["read"] / ref_seconds) / rate
        results["pipeline"][runner] = {"seconds": round(seconds, 2), "events_per_s": round(rate),
                                       "slower_than_reference": round(ratio, 1)}
        print(f"cdpflow run --runner {runner:12s}: {seconds:6.1f} s  {rate:10,.0f} events/s  "
              f"({ratio:.1f}x the reference's time)")
    common.save_results("latest", results)
    return results


if __name__ == "__main__":
    main()
