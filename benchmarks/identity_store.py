"""Benchmark: identity resolutions per second through the ResolveIdentity stage, and store size.

    .venv/bin/python benchmarks/identity_store.py                   # 200,000 events
    .venv/bin/python benchmarks/identity_store.py --events 1000000

Events carry 1-3 identifiers drawn so that about 2.5 identifiers are new per 1 event and
profiles merge now and then (like real traffic: many anonymous cookies, fewer accounts). It
measures:
  - the store alone (resolve_batch in transactions of 500) on one process, on each backend:
    SQLite (a file), and Redis (started through `cdpflow stack`'s code on a free port, AOF on,
    or the one `--redis URL` names),
  - the Beam stage, ordered (one worker) and parallel (2 SDK worker processes),
  - a plain in-memory union-find over the same events (the floor),
  - bytes of the SQLite file per million identifiers,
  - two adversarial graphs: a shared device seen with 20,000 different cookies (a hub), and a
    chain of 20,000 events gluing one giant profile; both must stay linear.
Results go to benchmarks/results/identity.json.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.portability.fn_api_runner import FnApiRunner

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.core.identity import IdentityRules, SQLiteIdentityStore, open_identity_store  # noqa: E402
from cdpflow.schemas.records import NormalizedEvent  # noqa: E402
from cdpflow.transforms.identity import ResolveIdentity  # noqa: E402


def synthetic_keys(n: int, seed: int = 1):
    """(message_id, timestamp, identifiers) tuples shaped like web traffic."""
    rng = random.Random(seed)
    persons = max(1, n // 25)
    keys = []
    for i in range(n):
        person = rng.randrange(persons)
        ids = [("anonymous_id", f"c{person}-{rng.randrange(3)}")]
        if rng.random() < 0.3:
            ids.append(("user_id", f"u{person}"))
        if rng.random() < 0.1:
            ids.append(("email", f"e{person}@x.com"))
        if rng.random() < 0.5:
            ids.append(("anonymous_id", f"s{i}"))  # one-off sessions: most identifiers are seen once
        keys.append((f"m{i}", i * 1000, tuple(ids)))
    return keys


def bench_store(keys, path, rules):
    store = SQLiteIdentityStore(path, rules)
    started = time.perf_counter()
    for start in range(0, len(keys), 500):
        store.resolve_batch(keys[start:start + 500])
    seconds = time.perf_counter() - started
    identifiers = store.db.execute("SELECT count(*) FROM node").fetchone()[0]
    store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return seconds, identifiers, os.path.getsize(path)


def bench_redis_store(keys, url, rules):
    """Seconds for the keys through the Redis backend, and the server's memory for them."""
    store = open_identity_store(f"{url}?prefix=bench-{os.getpid()}", rules)
    store.flush()
    started = time.perf_counter()
    for start in range(0, len(keys), 500):
        store.resolve_batch(keys[start:start + 500])
    seconds = time.perf_counter() - started
    used = store.client.info("memory")["used_memory"]
    store.flush()
    store.close()
    return seconds, used


def redis_for_benchmark(root):
    """A Redis of the stack's own (free port, AOF on) and how to stop it."""
    from pathlib import Path
    from cdpflow.stack.base import free_port
    from cdpflow.stack.redis import Redis
    server = Redis(Path(root) / "stack", port=free_port())
    server.up()
    return server.url(), server.down


def bench_union_find(keys):
    parent = {}

    def find(x):
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x
    started = time.perf_counter()
    for _, _, ids in keys:
        for i in ids:
            parent.setdefault(i, i)
        for other in ids[1:]:
            a, b = find(ids[0]), find(other)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return time.perf_counter() - started


def bench_stage(keys, path, rules, ordered, args):
    events = [NormalizedEvent(m, "track", "x", ts, ts, ids, {}, {}, {}, "{}", "track/v1") for m, ts, ids in keys]
    p = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(args))
    _ = (p | beam.Create(events, reshuffle=False) | ResolveIdentity(path, rules, ordered=ordered))
    started = time.perf_counter()
    p.run().wait_until_finish()
    return time.perf_counter() - started


def adversarial(n: int = 20_000, redis_url=None) -> dict:
    """Seconds to resolve a hub and a chain of n events each (quadratic behaviour would show here).

    On SQLite in memory, or on the Redis at `redis_url`.
    """
    timings = {}
    shapes = {
        "hub": lambda i: [("device_id", "kiosk"), ("anonymous_id", f"c{i}")],
        "chain": lambda i: [("crm_id", f"k{i}"), ("crm_id", f"k{i + 1}")],
    }
    for name, shape in shapes.items():
        store = (open_identity_store(f"{redis_url}?prefix=adversarial-{name}", IdentityRules()) if redis_url
                 else SQLiteIdentityStore(":memory:", IdentityRules()))
        keys = [(f"m{i}", i, shape(i)) for i in range(n)]
        started = time.perf_counter()
        for start in range(0, n, 1000):
            store.resolve_batch(keys[start:start + 1000])
        timings[name] = round(time.perf_counter() - started, 2)
        if redis_url:
            store.flush()
        store.close()
    return timings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--stage-events", type=int, default=50_000, help="events for the Beam stage runs")
    parser.add_argument("--redis-events", type=int, default=50_000, help="events for the Redis backend")
    parser.add_argument("--redis", help="redis://HOST:PORT/DB to measure (default: start one through the stack)")
    args = parser.parse_args(argv)
    rules = IdentityRules()
    keys = synthetic_keys(args.events)
    root = tempfile.mkdtemp(prefix="cdpflow-identity-bench-")
    results = {"events": args.events}

    uf_seconds = bench_union_find(keys)
    results["union_find"] = {"seconds": round(uf_seconds, 2), "events_per_s": round(args.events / uf_seconds)}
    print(f"plain union-find, in memory:   {args.events / uf_seconds:12,.0f} events/s")

    seconds, identifiers, size = bench_store(keys, os.path.join(root, "store.sqlite"), rules)
    results["store"] = {"seconds": round(seconds, 2), "events_per_s": round(args.events / seconds),
                        "identifiers": identifiers, "bytes": size,
                        "mib_per_million_identifiers": round(size / identifiers * 1e6 / 2 ** 20, 1)}
    print(f"identity store (SQLite, 1 process): {args.events / seconds:8,.0f} events/s; "
          f"{identifiers:,} identifiers in {size / 2 ** 20:.1f} MiB "
          f"= {size / identifiers * 1e6 / 2 ** 20:.0f} MiB per million identifiers")

    redis_keys = keys[:args.redis_events]
    url, stop = (args.redis, None) if args.redis else redis_for_benchmark(root)
    try:
        seconds, used = bench_redis_store(redis_keys, url, rules)
        results["adversarial_seconds_20k_events_redis"] = adversarial(redis_url=url)
    finally:
        if stop:
            stop()
    results["store_redis"] = {"events": len(redis_keys), "seconds": round(seconds, 2),
                              "events_per_s": round(len(redis_keys) / seconds), "used_memory_bytes": used}
    print(f"identity store (Redis, 1 process, {len(redis_keys):,} events): {len(redis_keys) / seconds:8,.0f} events/s")
    print(f"adversarial graphs on Redis, 20,000 events each (seconds): {results['adversarial_seconds_20k_events_redis']}")

    stage_keys = keys[:args.stage_events]
    for label, ordered, extra in (("ordered, 1 worker", True, []),
                                  ("parallel, 2 processes", False,
                                   ["--direct_num_workers=2", "--direct_running_mode=multi_processing"])):
        seconds = bench_stage(stage_keys, os.path.join(root, f"stage-{ordered}.sqlite"), rules, ordered, extra)
        results[f"stage_{'ordered' if ordered else 'parallel'}"] = {
            "events": len(stage_keys), "seconds": round(seconds, 2), "events_per_s": round(len(stage_keys) / seconds)}
        print(f"ResolveIdentity stage, {label:22s}: {len(stage_keys) / seconds:8,.0f} events/s")
    results["adversarial_seconds_20k_events"] = adversarial()
    print(f"adversarial graphs, 20,000 events each (seconds): {results['adversarial_seconds_20k_events']}")
    common.save_results("identity", results)
    return results


if __name__ == "__main__":
    main()
