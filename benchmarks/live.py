"""Benchmark: from the collector's 200 to the change on `cdp.segments.changes`, at sustained rates.

    .venv/bin/python benchmarks/live.py [--engine beam|flink] [--rates 10 25 50 100] [--seconds 30]

Starts a Kafka broker (free ports, a temporary folder), the collector as its own process and
the stream: `--engine beam` runs `cdpflow stream` (Prism, its loader in-process) as another
process on a new warehouse; `--engine flink` starts Redis and a Flink session cluster (a
JobManager, two TaskManagers) and submits the PyFlink job at parallelism 2 with `cdpflow flink
submit`'s code (its output is exactly once: a change is visible to the read_committed reader
at the checkpoint after it is written, so `--checkpoint-ms` bounds the latency from below, as
does the job's 5 s bounded out-of-orderness: a profile row is emitted when the watermark passes
its event). For each rate
it sends generated events live (times moved to the moment they are sent; new messageIds), 5 a
request, paced to the rate, and notes when the collector answered 200 for each. A consumer of
`cdp.segments.changes` notes when each change reached Kafka (its record time) and the
messageId that caused it; latency is the change's record time minus the 200 of its cause.
After each rate it waits for the stream to catch up (marker events sent after the rate's
events come out on `cdp.warehouse.rows`). A rate is sustained when that takes at most 15 s and
the p99 from 200 to change stays within 10 s (beyond, the feature stages fall behind). Reports p50/p99 per
rate and the highest sustained rate; results go to benchmarks/results/live.json (Beam) or
benchmarks/results/live-flink.json.
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import orjson
import requests

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # noqa: E402
from cdpflow.collector.app import EVENT_TYPES  # noqa: E402
from cdpflow.collector.send import live  # noqa: E402
from cdpflow.core.timeutil import format_ts  # noqa: E402
from cdpflow.schemas.topics import SEGMENT_CHANGES, WAREHOUSE_ROWS  # noqa: E402
from cdpflow.stack.base import free_port  # noqa: E402
from cdpflow.stack.kafka import Kafka  # noqa: E402
from cdpflow.synthetic import generate  # noqa: E402

KEY = "wk_bench"
PER_REQUEST = 5


class Watch(threading.Thread):
    """Reads a topic from its end as it is now; keeps (record time in µs, key, value) of each record."""

    def __init__(self, bootstrap: str, topic: str):
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, isolation_level="read_committed")
        tps = [TopicPartition(topic, p) for p in self.consumer.partitions_for_topic(topic)]
        self.consumer.assign(tps)
        for tp, end in self.consumer.end_offsets(tps).items():
            self.consumer.seek(tp, end)
        self.records, self.stopped = [], threading.Event()

    def run(self):
        while not self.stopped.is_set():
            for batch in self.consumer.poll(timeout_ms=200).values():
                self.records.extend((r.timestamp * 1000, r.key, r.value) for r in batch)
        self.consumer.close()


def events_for(root: Path, count: int):
    generate(root / "sample", customers=max(100, count // 20), days=120, seed=9)
    found = []
    for path in sorted((root / "sample" / "events").glob("*.jsonl")):
        for line in path.read_bytes().splitlines():
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(event, dict) and event.get("type") in EVENT_TYPES and event.get("messageId"):
                found.append(event)
    found.sort(key=lambda e: e.get("receivedAt") or "")
    return found


def send_batch(url: str, batch, answered: dict) -> None:
    answer = requests.post(f"{url}/v1/batch", json={"batch": batch}, auth=(KEY, ""), timeout=60)
    if answer.status_code == 200:
        at = int(time.time() * 1_000_000)
        answered.update((e["messageId"], at) for e in batch)


def send_at(url: str, events, rate: float, answered: dict) -> None:
    session = requests.Session()
    session.auth = (KEY, "")
    started = time.monotonic()
    for i in range(0, len(events), PER_REQUEST):
        due = started + i / rate
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        now = int(time.time() * 1_000_000)
        batch = [dict(live(e, now), messageId=f"{uuid.uuid4().hex[:8]}-{e['messageId']}") for e in events[i:i + PER_REQUEST]]
        answer = session.post(f"{url}/v1/batch", json={"batch": batch}, timeout=60)
        at = int(time.time() * 1_000_000)
        if answer.status_code == 200:
            for event in batch:
                answered[event["messageId"]] = at


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 25, 50, 100])
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--engine", choices=("beam", "flink"), default="beam")
    parser.add_argument("--checkpoint-ms", type=int, default=1000, help="the Flink job's checkpoint interval")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="cdpflow-live-bench-"))
    pool = events_for(root, int(sum(args.rates) * args.seconds) + 500)
    broker = Kafka(root / "stack", port=free_port(), controller_port=free_port())
    broker.up()
    bootstrap = broker.bootstrap_servers()
    collector, url = common.start_collector(bootstrap, root, KEY)
    env = dict(os.environ, CDPFLOW_DEMO="1", CDPFLOW_PRISM=os.path.abspath(".cache/bin/prism"))
    stream, services, job = None, [], None
    if args.engine == "beam":
        stream = subprocess.Popen([sys.executable, "-m", "cdpflow.cli", "stream", "--bootstrap", bootstrap,
                                   "--warehouse", str(root / "live.duckdb")], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=open(root / "stream.log", "wb"))
    else:
        from cdpflow import flink
        from cdpflow.config import load_config
        from cdpflow.stack.flink import Flink
        from cdpflow.stack.redis import Redis
        os.environ.setdefault("CDPFLOW_DEMO", "1")
        redis = Redis(root / "stack", port=free_port())
        cluster = Flink(root / "stack", port=free_port(), rpc_port=free_port())
        services = [redis, cluster]
        for service in services:
            service.up()
        spec = flink.job_spec(bootstrap, str(root / "live.duckdb"), load_config(None), redis.url(), 2,
                              args.checkpoint_ms)
        job = (flink, cluster.address, flink.submit(spec, str(root / "spec.json"), cluster.address))
    results_name = "live" if args.engine == "beam" else "live-flink"
    changes, rows = Watch(bootstrap, SEGMENT_CHANGES.name), Watch(bootstrap, WAREHOUSE_ROWS.name)
    changes.start()
    rows.start()
    results = {"machine": common.machine(), "engine": args.engine, "per_request": PER_REQUEST,
               "seconds_per_rate": args.seconds, "rates": []}
    if args.engine == "flink":
        results["checkpoint_ms"] = args.checkpoint_ms
    try:
        # warm up: the stream is running once a first event's row is out
        answered: dict = {}
        send_at(url, pool[:20], 20, answered)
        deadline = time.monotonic() + 180
        while not rows.records:
            if (stream is not None and stream.poll() is not None) or time.monotonic() > deadline:
                raise RuntimeError(f"the stream did not start; see {root / 'stream.log'} or the Flink logs")
            time.sleep(0.5)
        offset = 20
        for rate in args.rates:
            count = int(rate * args.seconds)
            mine, answered = pool[offset:offset + count], {}
            offset += count
            started = time.monotonic()
            send_at(url, mine, rate, answered)
            sent_for = time.monotonic() - started
            # Caught up when clean markers sent after the rate's events are out (on every partition:
            # some sent events are rightly refused by the pipeline and never come out).
            markers = {}
            now = int(time.time() * 1_000_000)
            send_batch(url, [{"type": "track", "event": "Benchmark Marker", "userId": f"marker-{uuid.uuid4().hex}",
                              "messageId": f"marker-{uuid.uuid4().hex}", "timestamp": format_ts(now)}
                             for _ in range(8)], markers)
            wanted = {f"events:{m}".encode() for m in markers}
            drain_start, drained = time.monotonic(), None
            while time.monotonic() - drain_start < 120:
                seen = {k for _, k, _ in list(rows.records)} & wanted
                if len(seen) == len(wanted):
                    drained = time.monotonic() - drain_start
                    break
                time.sleep(0.5)
            time.sleep(2)
            latencies = sorted((at - answered[c["cause_message_id"]]) / 1000 for at, _, value in list(changes.records)
                               for c in [orjson.loads(value)] if c.get("cause_message_id") in answered)
            entry = {"rate": rate, "sent": len(answered), "send_seconds": round(sent_for, 1),
                     "drain_seconds": None if drained is None else round(drained, 1),
                     "sustained": False, "changes": len(latencies)}
            if latencies:
                entry.update(p50_ms=round(statistics.median(latencies)), p99_ms=round(latencies[int(len(latencies) * 0.99) - 1]))
                entry["sustained"] = drained is not None and drained <= 15 and entry["p99_ms"] <= 10_000
            results["rates"].append(entry)
            print(f"{rate:>6.0f} events/s: {entry['sent']} sent in {entry['send_seconds']} s, stream caught up "
                  f"{'after ' + str(entry['drain_seconds']) + ' s' if drained is not None else 'not within 120 s'}; "
                  f"{len(latencies)} segment changes, 200 -> change p50 {entry.get('p50_ms')} ms, p99 {entry.get('p99_ms')} ms")
            if drained is None:
                break
    finally:
        changes.stopped.set()
        rows.stopped.set()
        if job is not None:
            module, address, job_id = job
            module.cancel(job_id, address)
        for service in reversed(services):
            service.down()
        if stream is not None and stream.poll() is None:
            os.killpg(stream.pid, signal.SIGTERM)
            try:
                stream.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(stream.pid, signal.SIGKILL)
        collector.terminate()
        collector.wait(20)
        broker.down()
    sustained = [r["rate"] for r in results["rates"] if r["sustained"]]
    results["highest_sustained_rate"] = max(sustained) if sustained else None
    print(f"highest sustained rate on this machine: {results['highest_sustained_rate']} events/s")
    common.save_results(results_name, results)
    return results


if __name__ == "__main__":
    main()
